#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# CLI and the CUDA test executables, with the `cuda` feature, stripped, in target/gpu/
# (carry that directory to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
rm -rf "$out" && mkdir -p "$out"
cargo build --release --features cuda
cp target/release/expertmesh "$out/"
# Test executables: cargo prints their paths as JSON messages.
cargo test --release -p expertmesh-model -p expertmesh-expert-worker -p expertmesh-tests \
  --features expertmesh-model/cuda,expertmesh-expert-worker/cuda,expertmesh-tests/cuda \
  --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$out/test-$(basename "$exe" | sed "s/-[0-9a-f]*$//")"; done
strip "$out"/* 2>/dev/null || true
ls -la "$out"
