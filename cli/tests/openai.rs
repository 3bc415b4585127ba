//! The OpenAI-compatible API, tested with the official `openai` Python client against
//! `expertmesh up` (`tests/openai/test_api.py`; `pip install -r tests/requirements.txt`).

mod common;

use std::process::Command;

#[test]
fn openai_python_client_against_up() {
    let root = common::root();
    let probe = Command::new("python3")
        .args(["-c", "import openai, pytest"])
        .status()
        .expect("python3 runs");
    assert!(
        probe.success(),
        "the API tests need Python's openai and pytest: pip install -r tests/requirements.txt"
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/openai",
        ])
        .env("EXPERTMESH_BIN", env!("CARGO_BIN_EXE_expertmesh"))
        .current_dir(&root)
        .output()
        .expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" passed"), "{text}");
    assert!(!text.contains("skipped"), "{text}");
}
