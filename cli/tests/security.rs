//! Secrets against a real `up`: the join token is long, random, refused when wrong (and
//! nothing changes), and on no command line and in no log line; API keys (flags, the
//! environment and a key file read again when it changes) gate the API with OpenAI's 401,
//! `/health` stays open and `/metrics` takes its own key.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `GET path` on `http` with an optional bearer key: the status and the body.
fn get(http: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {http}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply.split_once("\r\n\r\n").map_or("", |p| p.1).to_owned();
    (status, body)
}

/// Every process's command line on this machine.
fn command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

/// Starts `up` (the command given) with its up file and its log in `dir`, and waits until
/// it is ready: the process, the up file, the log's path and what `up` printed.
fn up_logged(
    up: &mut std::process::Command,
    dir: &std::path::Path,
) -> (common::Kill, Value, std::path::PathBuf, String) {
    let log = dir.join("up.log");
    let up_file = dir.join("up.json");
    let mut up = common::Kill(
        up.env("EXPERTMESH_UP_FILE", &up_file)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut stdout = up.0.stdout.take().unwrap();
    let mut printed = String::new();
    let mut byte = [0u8; 1];
    while !printed.contains("Ctrl-C") && stdout.read(&mut byte).unwrap() == 1 {
        printed.push(byte[0] as char);
    }
    let cluster = serde_json::from_slice(&std::fs::read(&up_file).unwrap()).unwrap();
    (up, cluster, log, printed)
}

#[test]
fn a_wrong_join_token_is_refused_and_the_token_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster, log, printed) = up_logged(
        common::bin().args(["up", "--http", "127.0.0.1:0"]),
        dir.path(),
    );
    let token = cluster["join_token"].as_str().unwrap();
    // 256 bits, as hex.
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let coordinators = cluster["coordinators"].as_str().unwrap().to_owned();
    let before = common::admin_status(&coordinators);
    let model = common::demo_model().display().to_string();
    // The token with its last digit changed (one ending in 0 must not stay itself).
    let last = if token.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &token[..63]);
    assert_ne!(wrong, token);
    let mut refused = common::bin()
        .args(["expert-worker", "--coordinator", &coordinators])
        .args(["--join-token", &wrong])
        .args(["--listen", "127.0.0.1:0", "--model", &model])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log is read as it comes (a full pipe would stop the worker) and shown if it hangs.
    let mut stderr = refused.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut why = String::new();
        let _ = stderr.read_to_string(&mut why);
        why
    });
    // Registration is refused at once; a worker that only reached no coordinator would give
    // up after its 30 s of patience.
    let give_up = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > give_up {
            let _ = refused.kill();
            panic!(
                "the refused worker did not exit; its log:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let why = reader.join().unwrap();
    assert!(!status.success());
    assert!(why.contains("wrong join token"), "{why}");
    let after = common::admin_status(&coordinators);
    assert_eq!(after["workers"], before["workers"]);
    assert_eq!(after["placement_epoch"], before["placement_epoch"]);
    // Not on any command line (the roles get it from their environment), not in the log.
    let shown: Vec<String> = command_lines()
        .into_iter()
        .filter(|c| c.contains(token))
        .collect();
    assert!(
        shown.is_empty(),
        "the join token is on a command line: {shown:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(token) && !printed.contains(token),
        "the join token was logged"
    );
}

#[test]
fn api_keys_gate_the_api_and_a_key_file_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "# the team's keys\nfrom-file\n").unwrap();
    let (up, cluster, log, printed) = up_logged(
        common::bin()
            .args(["up", "--http", "127.0.0.1:0", "--api-key", "flag-key"])
            .args(["--api-key-file", key_file.to_str().unwrap()])
            .env("EXPERTMESH_METRICS_KEY", "scraper"),
        dir.path(),
    );
    // The front door and a gateway behind it.
    for http in [
        cluster["api"].as_str().unwrap(),
        cluster["http"][0].as_str().unwrap(),
    ] {
        for bad in [
            None,
            Some("wrong"),
            Some("flag-ke"),
            Some("# the team's keys"),
        ] {
            let (status, body) = get(http, "/v1/models", bad);
            assert_eq!(status, 401, "{bad:?}: {body}");
            let e: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(e["error"]["code"], "invalid_api_key", "{body}");
        }
        for good in ["flag-key", "from-file"] {
            assert_eq!(get(http, "/v1/models", Some(good)).0, 200, "{good}");
        }
        assert_eq!(get(http, "/health", None).0, 200);
    }
    let gateway = cluster["http"][0].as_str().unwrap();
    assert_eq!(get(gateway, "/metrics", None).0, 401);
    assert_eq!(get(gateway, "/metrics", Some("flag-key")).0, 401);
    let (status, text) = get(gateway, "/metrics", Some("scraper"));
    assert_eq!(status, 200);
    assert!(text.contains("expertmesh_requests_total"));
    // Revoke one key and add another without a restart.
    std::fs::write(&key_file, "rotated\n").unwrap();
    let give_up = Instant::now() + Duration::from_secs(20);
    while get(gateway, "/v1/models", Some("rotated")).0 != 200 {
        assert!(Instant::now() < give_up, "the new key file was not read");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(gateway, "/v1/models", Some("from-file")).0, 401);
    assert_eq!(get(gateway, "/v1/models", Some("flag-key")).0, 200);
    drop(up);
    let text = std::fs::read_to_string(&log).unwrap() + &printed;
    for key in ["flag-key", "from-file", "rotated", "scraper"] {
        assert!(!text.contains(key), "{key} was logged");
    }
    let shown = command_lines().into_iter().any(|c| c.contains("scraper"));
    assert!(!shown, "the metrics key is on a command line");
}

/// The production profile: a cluster port on an address other machines reach needs TLS, or
/// `--insecure` (which says so in the log).
#[test]
fn an_exposed_port_without_tls_needs_insecure() {
    let model = common::fixture("tiny-maverick").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let coordinator = ["coordinator", "--listen", "0.0.0.0:0", "--model", &model];
    let plain = || {
        let mut c = common::bin();
        c.env_remove("EXPERTMESH_TLS_ROOT");
        c
    };
    let refused = plain()
        .args(coordinator)
        .args(["--data-dir", &data])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("--tls-dir") && why.contains("--insecure"),
        "{why}"
    );
    for role in ["expert-worker", "attention-worker"] {
        let refused = plain()
            .args([
                role,
                "--listen",
                "0.0.0.0:0",
                "--coordinator",
                "127.0.0.1:1",
            ])
            .args(["--model", &model])
            .output()
            .unwrap();
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("--insecure"));
    }
    // With --insecure it starts, warning loudly.
    let log = dir.path().join("coordinator.log");
    let mut command = plain();
    command
        .args(coordinator)
        .args(["--data-dir", &data, "--insecure"])
        .stderr(std::fs::File::create(&log).unwrap());
    // It listens: `listening` fails on any other first line.
    let _started = common::listening(command);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INSECURE"), "{text}");
}

/// The HTTP ports' bounds: a client that sends its request head too slowly (slowloris) or
/// nothing at all is cut off, and a head larger than the cap gets 431.
#[test]
fn slow_idle_and_oversized_http_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, cluster) = common::start_up(&["--http", "127.0.0.1:0"], &dir.path().join("up.json"));
    for http in [
        cluster["api"].as_str().unwrap().to_owned(),
        cluster["http"][0].as_str().unwrap().to_owned(),
    ] {
        let opened = Instant::now();
        let mut slow = std::net::TcpStream::connect(&http).unwrap();
        let mut idle = std::net::TcpStream::connect(&http).unwrap();
        // Half a head, then a byte every second.
        write!(slow, "GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
        let trickle = std::thread::spawn(move || {
            for _ in 0..30 {
                std::thread::sleep(Duration::from_secs(1));
                if slow.write_all(b"X").is_err() {
                    return true;
                }
            }
            false
        });
        idle.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        // The server closes the idle connection (EOF or reset), well before the 30 s.
        assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
        assert!(
            opened.elapsed() < Duration::from_secs(20),
            "{:?}",
            opened.elapsed()
        );
        assert!(trickle.join().unwrap(), "the slow client was never cut off");
        assert!(opened.elapsed() < Duration::from_secs(25));
        // A head of 100 KiB.
        let mut big = std::net::TcpStream::connect(&http).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let filler = "a".repeat(100 << 10);
        let _ = write!(
            big,
            "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n"
        );
        let mut reply = String::new();
        let _ = big.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 431"), "{http}: {reply:.80}");
        // And the port still serves.
        assert!(common::healthy(&http));
    }
}
