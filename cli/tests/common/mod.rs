//! Helpers shared by the process-level tests: paths, running the binary, reading the
//! fixtures' reference cases, and role processes that die with the test.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
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

/// Runs `expertmesh <args>` from the repository root.
pub fn expertmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_expertmesh"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run expertmesh")
}

/// The named case of a fixture's `reference.json`.
pub fn reference_case(model: &str, case: &str) -> Value {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(model).join("reference.json")).unwrap(),
    )
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

/// Starts `expertmesh <args>` and waits for its `LISTENING` line.
pub fn start(args: &[&str]) -> Role {
    let mut child = Command::new(env!("CARGO_BIN_EXE_expertmesh"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("{args:?} printed {line:?}"))
        .to_owned();
    Role { child, address }
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
