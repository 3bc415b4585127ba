#!/usr/bin/env bash
# The kernels' NEON build checked on an x86-64 machine: the model crate's kernel tests
# cross-compiled for aarch64 and run under qemu user emulation. There they compare every
# build (baseline and NEON) with the baseline bit for bit, and with the bits recorded on
# x86-64 (`every_architecture_gives_the_recorded_bits`): a cluster of x86-64 and aarch64
# machines computes what one machine does. On an aarch64 machine plain
# `cargo test -p expertmesh-model --lib kernels` runs the same checks natively. CI runs this.
#
#   scripts/aarch64-check.sh        (needs root for apt, and rustup reaching its servers)
#
# Where rustup cannot fetch the aarch64 standard library, it says so and checks nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET" || {
        echo "aarch64-check: rustup could not fetch $TARGET's standard library: NEON NOT CHECKED" >&2
        exit 0
    }
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# The dev profile builds the model crate at opt-level 3 (the workspace's Cargo.toml).
cargo test --target "$TARGET" -p expertmesh-model --lib kernels
