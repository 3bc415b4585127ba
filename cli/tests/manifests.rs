//! The deployment files hold together: the Kubernetes manifests of each overlay (the base
//! with the overlay's patches and config applied, as `kubectl apply -k` would), the compose
//! file and the image's Dockerfiles. Checked: the coordinators' StatefulSet (stable names
//! through a headless Service, Parallel start, a volume per pod under the raft data_dir, a
//! PodDisruptionBudget that keeps a quorum), probes on every container that run the real
//! `expertmesh health` against ports the container declares and its config listens on, GPU
//! requests and the expert arithmetic of the Maverick overlay, configs that parse and
//! validate as their roles', and every subcommand, flag, environment variable and HTTP path
//! named in them known to the binary or the code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use expertmesh_attention_worker::AttentionWorkerConfig;
use expertmesh_coordinator::CoordinatorConfig;
use expertmesh_expert_worker::ExpertWorkerConfig;
use serde::Deserialize;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values (merge keys, `<<: *anchor`, applied).
fn documents(path: &Path) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|d| {
            let mut v = serde_norway::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Merges `patch` into `base` as a strategic merge patch does for what these files use:
/// maps key by key, lists of named items (containers, volumes, mounts) item by name.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if p.iter().all(|x| x.get("name").is_some()) => {
            for item in p {
                match b.iter_mut().find(|x| x["name"] == item["name"]) {
                    Some(slot) => merge(slot, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// An overlay as applied: its objects, its config files (by name) and its image.
struct Applied {
    objects: Vec<Value>,
    config: BTreeMap<String, String>,
    image: String,
    secrets: Vec<String>,
}

/// Builds a kustomization directory the way `kubectl apply -k` does, for the features these
/// files use: resources (files and directories), patches, a config map generator (replace),
/// secret generators and an image rename.
fn build(dir: &Path) -> Applied {
    let k = &documents(&dir.join("kustomization.yaml"))[0];
    let mut applied = Applied {
        objects: Vec::new(),
        config: BTreeMap::new(),
        image: String::new(),
        secrets: Vec::new(),
    };
    for r in k["resources"].as_array().into_iter().flatten() {
        let path = dir.join(r.as_str().unwrap());
        if path.is_dir() {
            let inner = build(&path);
            applied.objects.extend(inner.objects);
            applied.config.extend(inner.config);
            applied.secrets.extend(inner.secrets);
            if !inner.image.is_empty() {
                applied.image = inner.image;
            }
        } else {
            applied.objects.extend(documents(&path));
        }
    }
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        for f in g["files"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            let name = Path::new(f).file_name().unwrap().to_str().unwrap();
            applied.config.insert(name.to_owned(), read(&dir.join(f)));
        }
    }
    for g in k["secretGenerator"].as_array().into_iter().flatten() {
        applied.secrets.push(g["name"].as_str().unwrap().to_owned());
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        for patch in documents(&dir.join(p["path"].as_str().unwrap())) {
            let target = applied
                .objects
                .iter_mut()
                .find(|o| {
                    o["kind"] == patch["kind"] && o["metadata"]["name"] == patch["metadata"]["name"]
                })
                .unwrap_or_else(|| panic!("a patch of nothing: {}", patch["metadata"]));
            merge(target, &patch);
        }
    }
    for i in k["images"].as_array().into_iter().flatten() {
        applied.image = format!(
            "{}:{}",
            i["newName"].as_str().unwrap(),
            i["newTag"].as_str().unwrap()
        );
    }
    applied
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The port of `host:port`.
fn port(address: &str) -> u64 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The text of the binary's `--help` for a subcommand (`["certs", "cluster"]`).
fn help(subcommand: &[String]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_expertmesh"))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`expertmesh {subcommand:?}` is not a subcommand"
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Checks a container's command line: a real subcommand with flags it takes.
fn check_arguments(args: &[String]) {
    let path: Vec<String> = args
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    let text = help(&path);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            text.contains(flag.as_str()),
            "`expertmesh {path:?}` has no {flag}"
        );
    }
}

/// The sources of the code, for names the files use (environment variables, HTTP paths).
fn sources() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        "cli/src/main.rs",
        "cli/src/roles.rs",
        "cli/src/health.rs",
        "gateway/src/routes.rs",
    ]
    .iter()
    .map(|f| read(&root.join(f)))
    .collect()
}

/// Checks a health target against the container: its port is one the container declares
/// (or, for gRPC, the role's config listens on), a gRPC target names the container's role,
/// an HTTP path is one the gateway routes.
fn check_target(target: &str, role: &str, ports: &[u64], code: &str) {
    if let Some(rest) = target.strip_prefix("grpc://") {
        let (named, address) = rest.split_once('@').unwrap();
        assert_eq!(named, role, "{target}");
        assert!(
            ports.contains(&port(address)),
            "{target}: not among {ports:?}"
        );
    } else {
        let rest = target
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{target}"));
        let (address, path) = rest.split_once('/').unwrap();
        assert!(
            ports.contains(&port(address)),
            "{target}: not among {ports:?}"
        );
        assert!(
            code.contains(&format!("\"/{path}\"")),
            "{target}: no route /{path}"
        );
    }
}

/// The ports a worker's `[worker]` section listens on: gRPC, metrics.
fn worker_ports(w: &expertmesh_expert_worker::WorkerConfig) -> Vec<u64> {
    [Some(w.listen.as_str()), w.metrics.as_deref()]
        .into_iter()
        .flatten()
        .map(port)
        .collect()
}

/// The ports a role's config listens on: gRPC, HTTP, metrics.
fn config_ports(role: &str, config: &BTreeMap<String, String>) -> Vec<u64> {
    let text = config.get(&format!("{role}.toml"));
    match role {
        "coordinator" => {
            let c: CoordinatorConfig = toml::from_str(text.unwrap()).unwrap();
            let mut ports = vec![port(&c.listen), port(c.http.as_ref().unwrap())];
            ports.extend(c.metrics.as_deref().map(port));
            ports
        }
        "expert-worker" => {
            let c: ExpertWorkerConfig = toml::from_str(text.unwrap()).unwrap();
            worker_ports(&c.validate().unwrap().worker)
        }
        "attention-worker" => {
            let c: AttentionWorkerConfig = toml::from_str(text.unwrap()).unwrap();
            worker_ports(&c.validate().unwrap().worker)
        }
        _ => Vec::new(),
    }
}

/// Every container of every workload: image, arguments, probes, ports, mounts, secrets.
fn check_workloads(a: &Applied) {
    let code = sources();
    let mut containers = 0;
    for o in a
        .objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
    {
        let pod = &o["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{}",
            o["metadata"]
        );
        for c in pod["containers"].as_array().unwrap() {
            containers += 1;
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            check_arguments(&args);
            let role = args[0].as_str();
            let declared: Vec<u64> = c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["containerPort"].as_u64().unwrap())
                .collect();
            // The container declares what its config listens on.
            let listens = config_ports(role, &a.config);
            for p in &listens {
                assert!(
                    declared.contains(p),
                    "{role} listens on {p}, not declared: {declared:?}"
                );
            }
            let env: BTreeMap<String, String> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_owned(),
                        e["value"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            for name in env.keys().filter(|n| n.starts_with("EXPERTMESH_")) {
                assert!(code.contains(name.as_str()), "{name} is read nowhere");
            }
            for probe in ["readinessProbe", "livenessProbe"] {
                let command: Vec<&str> = c[probe]["exec"]["command"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{role}: no {probe}"))
                    .iter()
                    .map(|x| x.as_str().unwrap())
                    .collect();
                assert_eq!(&command[..2], ["expertmesh", "health"], "{role}");
                let targets: Vec<&str> = if command.len() > 2 {
                    command[2..].to_vec()
                } else {
                    env["EXPERTMESH_HEALTH"].split(' ').collect()
                };
                for t in targets {
                    check_target(t, role, &declared, &code);
                }
            }
            // Secrets mounted are ones the kustomization makes; the TLS directory is mounted.
            for v in pod["volumes"].as_array().into_iter().flatten() {
                if let Some(s) = v["secret"]["secretName"].as_str() {
                    assert!(a.secrets.iter().any(|x| x == s), "no secret {s}");
                }
            }
            if let Some(dir) = env.get("EXPERTMESH_TLS_DIR") {
                let mounts = c["volumeMounts"].as_array().unwrap();
                assert!(
                    mounts.iter().any(|m| m["mountPath"] == dir.as_str()),
                    "{role}: {dir} not mounted"
                );
            }
        }
    }
    assert_eq!(
        containers, 4,
        "coordinator, expert and attention workers, front door"
    );
}

/// The coordinators: stable names, Parallel start, a volume under data_dir, a quorum kept.
fn check_coordinators(a: &Applied) {
    let set = find(&a.objects, "StatefulSet", "expertmesh-coordinator");
    let spec = &set["spec"];
    let replicas = spec["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 3);
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    let headless = find(&a.objects, "Service", spec["serviceName"].as_str().unwrap());
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let mount = spec["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim)
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();
    let c: CoordinatorConfig = toml::from_str(&a.config["coordinator.toml"]).unwrap();
    assert!(
        c.data_dir.starts_with(mount),
        "{} is not on the volume at {mount}",
        c.data_dir
    );
    // The peers are the StatefulSet's pods, by their stable names, ids ordinal + 1.
    let node = c.node("fingerprint".into(), 128).unwrap();
    for (id, address) in &node.peers {
        assert_eq!(
            address,
            &format!(
                "expertmesh-coordinator-{}.expertmesh-coordinator:7000",
                id - 1
            )
        );
    }
    assert_eq!(node.peers.len() as u64, replicas);
    let budget = find(&a.objects, "PodDisruptionBudget", "expertmesh-coordinator");
    assert_eq!(
        budget["spec"]["minAvailable"].as_u64(),
        Some(replicas / 2 + 1)
    );
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        spec["selector"]["matchLabels"]
    );
    // The API's Service selects the front doors, which forward to these gateways.
    let api = find(&a.objects, "Service", "expertmesh-api");
    let front = find(&a.objects, "Deployment", "expertmesh-front");
    assert_eq!(
        api["spec"]["selector"],
        front["spec"]["selector"]["matchLabels"]
    );
    let args = front["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for ordinal in 0..replicas {
        assert!(args.contains(&format!(
            "expertmesh-coordinator-{ordinal}.expertmesh-coordinator:{}",
            port(c.http.as_ref().unwrap())
        )));
    }
}

#[test]
fn the_cpu_overlay_holds_together() {
    let a = build(&deploy().join("k8s/overlays/cpu"));
    assert_eq!(a.image, "expertmesh:local", "what deploy/image.sh builds");
    check_coordinators(&a);
    check_workloads(&a);
    let e: ExpertWorkerConfig = toml::from_str(&a.config["expert-worker.toml"]).unwrap();
    assert_eq!(e.worker.device, expertmesh_model::Device::Cpu);
    let c: CoordinatorConfig = toml::from_str(&a.config["coordinator.toml"]).unwrap();
    assert!(
        c.model.starts_with("/opt/expertmesh/models/"),
        "the checkpoint in the image"
    );
    assert_eq!(c.min_replicas, 2);
}

#[test]
fn the_maverick_overlay_places_every_expert_on_gpus() {
    let a = build(&deploy().join("k8s/overlays/maverick-gpu"));
    check_coordinators(&a);
    check_workloads(&a);
    let workers = find(&a.objects, "Deployment", "expertmesh-expert-worker");
    let replicas = workers["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 8);
    let e: ExpertWorkerConfig = toml::from_str(&a.config["expert-worker.toml"]).unwrap();
    let e = e.validate().unwrap();
    assert_eq!(e.capacity, Some(16));
    assert_eq!(e.worker.device, expertmesh_model::Device::Cuda(0));
    let c: CoordinatorConfig = toml::from_str(&a.config["coordinator.toml"]).unwrap();
    assert!(
        replicas * 16 >= 128 * c.min_replicas as u64,
        "room for every expert's copies"
    );
    for name in ["expertmesh-expert-worker", "expertmesh-attention-worker"] {
        let r = &find(&a.objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
            ["resources"];
        assert_eq!(r["requests"]["nvidia.com/gpu"], 1, "{name}");
        assert_eq!(r["limits"]["nvidia.com/gpu"], 1, "{name}");
    }
    assert_eq!(a.image, "expertmesh:cuda");
}

/// The compose cluster: 3 coordinators, 3 expert workers, 2 attention workers and the front
/// door; every expert on 2 workers; only the API published, on loopback; every health
/// target on a port its config listens on.
#[test]
fn the_compose_file_holds_together() {
    let compose = &documents(&deploy().join("compose.yaml"))[0];
    let services = compose["services"].as_object().unwrap();
    let count = |prefix: &str| services.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(count("coordinator-"), 3);
    assert_eq!(count("expert-worker-"), 3);
    assert_eq!(count("attention-worker-"), 2);
    let config = |role: &str| read(&deploy().join(format!("compose/{role}.toml")));
    let configs: BTreeMap<String, String> = ["coordinator", "expert-worker", "attention-worker"]
        .iter()
        .map(|r| (format!("{r}.toml"), config(r)))
        .collect();
    let c: CoordinatorConfig = toml::from_str(&configs["coordinator.toml"]).unwrap();
    assert_eq!(c.min_replicas, 2);
    let code = sources();
    for (name, s) in services {
        let published = s["ports"].as_array().map_or(0, Vec::len);
        if name == "front" {
            assert!(s["ports"][0].as_str().unwrap().starts_with("127.0.0.1:"));
        } else {
            assert_eq!(published, 0, "{name} publishes a port");
        }
        let Some(command) = s["command"].as_array() else {
            continue;
        };
        let args: Vec<String> = command
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let role = if args[0] == "certs" {
            "certs"
        } else {
            args[0].as_str()
        };
        check_arguments(&args);
        if let Some(health) = s["environment"]["EXPERTMESH_HEALTH"].as_str() {
            let ports = match role {
                "front" => vec![port(
                    &args[args.iter().position(|a| a == "--listen").unwrap() + 1],
                )],
                r => config_ports(r, &configs),
            };
            for t in health.split(' ') {
                check_target(t, role, &ports, &code);
            }
        } else {
            assert_eq!(role, "certs", "{name} has no health check");
        }
    }
}

/// Both images: a non-root user, the health check through the binary, the same ports.
#[test]
fn the_dockerfiles_run_as_a_user_and_check_health() {
    for file in ["Dockerfile", "image/Dockerfile"] {
        let text = read(&deploy().join(file));
        assert!(text.contains("USER 10001:10001"), "{file}");
        assert!(
            text.contains(r#"CMD ["/usr/local/bin/expertmesh", "health"]"#),
            "{file}"
        );
        assert!(text.contains("EXPOSE 7000 7100 7200 8000 9000"), "{file}");
    }
}
