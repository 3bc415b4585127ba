//! Helpers shared by the process-level tests: paths, running the binary, reading the
//! fixtures' reference cases, and role processes that die with the test.
//!
//! Every process these helpers start speaks mutual TLS: one CA and a certificate per role
//! are made once per test binary ([`tls_root`]) and handed to each process as
//! `EXPERTMESH_TLS_ROOT` (`up` gets `--tls`). `EXPERTMESH_TEST_PLAINTEXT=1` runs them in
//! the clear instead; the OpenAI tests (Python) run `up` in the clear either way.
#![allow(dead_code)]

pub mod load;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The trained demo model, which `up` serves when given no `--model`.
pub fn demo_model() -> PathBuf {
    root().join("models/expertmesh-demo")
}

/// Runs `expertmesh <args>` from the repository root.
pub fn expertmesh(args: &[&str]) -> Output {
    bin().args(args).output().expect("run expertmesh")
}

/// The certificates of this test binary's processes: `ca/` and a directory per role, made
/// on first use; `None` with `EXPERTMESH_TEST_PLAINTEXT` set.
pub fn tls_root() -> Option<&'static Path> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if std::env::var_os("EXPERTMESH_TEST_PLAINTEXT").is_some() {
            return None;
        }
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
        let run = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_expertmesh"))
                .args(args)
                .env_remove("EXPERTMESH_TLS_ROOT")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca = dir.join("ca").display().to_string();
        run(&["certs", "init", "--out", &ca]);
        for role in ["coordinator", "expert-worker", "attention-worker", "admin"] {
            let out = dir.join(role).display().to_string();
            run(&[
                "certs",
                "issue",
                "--ca",
                &ca,
                "--role",
                role,
                "--name",
                role,
                "--hosts",
                "127.0.0.1,localhost",
                "--days",
                "30",
                "--out",
                &out,
            ]);
        }
        Some(dir)
    })
    .as_deref()
}

/// Gives this test process the admin's certificate, for clients it runs itself.
pub fn install_tls() {
    if let Some(root) = tls_root() {
        expertmesh_proto::tls::install(&root.join("admin")).unwrap();
    }
}

/// The named case of a fixture's `reference.json`.
pub fn reference_case(model: &Path, case: &str) -> Value {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap())
            .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap()
        .clone()
}

/// A JSON id list as the `--input-ids` argument.
pub fn ids_arg(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Asserts success and parses stdout as one JSON object.
pub fn json_out(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// A role process that is killed when dropped.
pub struct Role {
    pub child: Child,
    pub address: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a role's stderr goes: a file per process under `$EXPERTMESH_TEST_LOGS` when that
/// is set (to read after a failure), else nowhere.
fn role_stderr(args: &[&str]) -> Stdio {
    let Some(dir) = std::env::var_os("EXPERTMESH_TEST_LOGS") else {
        return Stdio::null();
    };
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(
        "{}-{n}-{}.log",
        std::process::id(),
        args.first().unwrap_or(&"role")
    );
    let _ = std::fs::create_dir_all(&dir);
    std::fs::File::create(std::path::Path::new(&dir).join(name))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Starts `expertmesh <args>` and waits for its `LISTENING` line.
pub fn start(args: &[&str]) -> Role {
    let mut command = bin();
    command.args(args).stderr(role_stderr(args));
    listening(command)
}

/// Starts `command` (its stdout read here) and waits for its `LISTENING` line.
pub fn listening(mut command: Command) -> Role {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("{command:?} printed {line:?}"))
        .to_owned();
    Role { child, address }
}

/// Starts a worker of `role` (`expert-worker`, `attention-worker`) against `coordinator`
/// (one address or a comma-separated list) on a free loopback port, with `extra` flags.
pub fn start_worker(role: &str, coordinator: &str, model: &str, extra: &[&str]) -> Role {
    let mut args = vec![
        role,
        "--coordinator",
        coordinator,
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
    ];
    args.extend_from_slice(extra);
    start(&args)
}

/// A single coordinator with its raft storage in a fresh temporary directory (removed when
/// the returned guard drops).
pub fn start_coordinator(model: &str) -> (Role, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let role = start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
        "--data-dir",
        &data,
    ]);
    (role, dir)
}

/// `expertmesh` from the repository root, with this binary's certificates, to be
/// configured further.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_expertmesh"));
    c.current_dir(root());
    if let Some(tls) = tls_root() {
        c.env("EXPERTMESH_TLS_ROOT", tls);
    }
    c
}

/// `admin status --json` against `coordinators`.
pub fn admin_status(coordinators: &str) -> Value {
    let out = expertmesh(&["admin", "status", "--json", "--coordinators", coordinators]);
    assert!(
        out.status.success(),
        "admin status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `admin status` until `done` holds (90 s at most).
pub fn wait_status(coordinators: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let v = admin_status(coordinators);
        if done(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "{what}: last status {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether the HTTP API at `http` answers `/health` with 200.
pub fn healthy(http: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let asked = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    );
    let mut reply = String::new();
    asked.is_ok() && s.read_to_string(&mut reply).is_ok() && reply.starts_with("HTTP/1.1 200")
}

/// The Prometheus text of `http`'s `/metrics`.
pub fn metrics(http: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// POSTs a JSON body over HTTP/1.1 and returns the parsed JSON reply (or why there is none).
pub fn post(http: &str, path: &str, body: &Value) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("no HTTP reply")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}\n{body}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
}

/// Sends a completion request for `body` to `http` with a `traceparent` header; the raw
/// HTTP reply.
pub fn post_traced(http: &str, body: &Value, traceparent: &str) -> String {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\ntraceparent: {traceparent}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
    reply
}

/// A child process killed when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `expertmesh up <args>` with its up file at `up_file`, waits until it is ready and
/// returns it with the file's contents.
pub fn start_up(args: &[&str], up_file: &Path) -> (Kill, Value) {
    let (up, cluster, _) = start_up_printing(args, up_file);
    (up, cluster)
}

/// `start_up`, with the lines `up` printed before it was ready.
/// Its log (the cluster's processes' stderr) goes next to the up file, and is shown when
/// `up` stops before it is ready.
pub fn start_up_printing(args: &[&str], up_file: &Path) -> (Kill, Value, Vec<String>) {
    let log = up_file.with_extension("log");
    let mut up = Kill(
        bin()
            .arg("up")
            .args(args)
            .env("EXPERTMESH_UP_FILE", up_file)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut printed = Vec::new();
    let mut ready = false;
    for line in BufReader::new(up.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("Ctrl-C") {
            ready = true;
            break;
        }
        printed.push(line);
    }
    if !ready {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "`up {}` stopped before it was ready ({:?}); its log ends:\n{}",
            args.join(" "),
            up.0.wait(),
            tail.join("\n")
        );
    }
    let cluster = serde_json::from_slice(&std::fs::read(up_file).unwrap()).unwrap();
    (up, cluster, printed)
}

/// `kill -9 pid`.
pub fn kill9(pid: u64) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
