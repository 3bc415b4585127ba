#!/usr/bin/env bash
# The kernels' NEON build checked on an x86-64 machine: the model crate's kernel tests
# (every build this CPU has against the baseline, bit for bit: on aarch64 that is NEON)
# cross-compiled for aarch64 and run under qemu user emulation. On an aarch64 machine plain
# `cargo test -p expertmesh-model --lib kernels` runs the same checks natively.
#
#   scripts/aarch64-check.sh        (needs root for apt, and rustup reaching its servers)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
cargo test --release --target "$TARGET" -p expertmesh-model --lib kernels
