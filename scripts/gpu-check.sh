#!/usr/bin/env bash
# The GPU check: finds the CUDA libraries (system driver, CUDA toolkit, and Python packages'
# site-packages/nvidia/*/lib), runs the CUDA test executables and the expert-shard benchmark.
# Runs prebuilt binaries from target/gpu/ (made by scripts/gpu-build.sh); needs no Rust.
# Usage: scripts/gpu-check.sh [BIN_DIR]   (under 8 minutes on an H100; about 1 on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/gpu}
# shellcheck source=scripts/gpu-env.sh
. scripts/gpu-env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
status=0
echo "== CUDA tests"
for t in "$bin"/test-*; do
  [ -x "$t" ] || continue
  echo "-- $t"
  EXPERTMESH_REQUIRE_NVRTC=1 timeout 180 "$t" --test-threads 1 --nocapture || status=1
done
model=tests/fixtures/tiny-maverick
gen=(generate --model "$model" --input-ids 697,318,676,661,546 --max-tokens 32 --ignore-eos --json)
single=$(timeout 60 "$bin/expertmesh" "${gen[@]}")
echo "== single process on cuda:0 against the CPU (tiny-maverick, 32 greedy tokens)"
gpu_single=$(timeout 120 "$bin/expertmesh" "${gen[@]}" --device cuda:0) || status=1
echo "cpu:    $single"
echo "cuda:0: $gpu_single"
[ "$single" = "$gpu_single" ] && echo "greedy tokens equal" || { echo "greedy tokens differ"; status=1; }
echo "== an image prompt on cuda:0 against the CPU (the fixture's image case)"
img=(generate --model "$model" --chat --prompt "What is in this picture?" --image "$model/test-image.png" --max-tokens 8 --ignore-eos --json)
cpu_image=$(timeout 60 "$bin/expertmesh" "${img[@]}")
gpu_image=$(timeout 120 "$bin/expertmesh" "${img[@]}" --device cuda:0) || status=1
echo "cpu:    $cpu_image"
echo "cuda:0: $gpu_image"
[ "$cpu_image" = "$gpu_image" ] && echo "greedy tokens equal" || { echo "greedy tokens differ"; status=1; }
echo "== a cluster with the attention worker and an expert worker on the GPU, against the CPU"
work=$(mktemp -d)
"$bin/expertmesh" coordinator --listen 127.0.0.1:0 --model "$model" --data-dir "$work/c" > "$work/c.out" 2> "$work/c.err" &
pids=($!)
for _ in $(seq 50); do grep -q LISTENING "$work/c.out" 2>/dev/null && break; sleep 0.2; done
coord=$(sed -n 's/^LISTENING //p' "$work/c.out")
"$bin/expertmesh" expert-worker --device cuda:0 --coordinator "$coord" --listen 127.0.0.1:0 --model "$model" > "$work/e.out" 2> "$work/e.err" &
pids+=($!)
"$bin/expertmesh" attention-worker --device cuda:0 --coordinator "$coord" --listen 127.0.0.1:0 --model "$model" > "$work/a.out" 2> "$work/a.err" &
pids+=($!)
for _ in $(seq 150); do grep -q LISTENING "$work/a.out" 2>/dev/null && break; sleep 0.2; done
attn=$(sed -n 's/^LISTENING //p' "$work/a.out")
sleep 3
cluster=$(timeout 120 "$bin/expertmesh" "${gen[@]}" --attention-worker "$attn") || { status=1; tail -5 "$work/e.err" "$work/a.err"; }
echo "cpu single process: $single"
echo "GPU cluster:        $cluster"
[ "$single" = "$cluster" ] && echo "greedy tokens equal" || { echo "greedy tokens differ"; status=1; }
echo "== an attention worker on the GPU with --dispatch local (its own GPU experts, no sockets)"
"$bin/expertmesh" attention-worker --dispatch local --device cuda:0 --coordinator "$coord" --listen 127.0.0.1:0 --model "$model" > "$work/l.out" 2> "$work/l.err" &
pids+=($!)
for _ in $(seq 150); do grep -q LISTENING "$work/l.out" 2>/dev/null && break; sleep 0.2; done
local_attn=$(sed -n 's/^LISTENING //p' "$work/l.out")
local_run=$(timeout 120 "$bin/expertmesh" "${gen[@]}" --attention-worker "$local_attn") || { status=1; tail -5 "$work/l.err"; }
echo "local dispatch:     $local_run"
[ "$single" = "$local_run" ] && echo "greedy tokens equal" || { echo "greedy tokens differ"; status=1; }
kill "${pids[@]}" 2>/dev/null
echo "== expert shard benchmark (16 experts, 5120 x 8192, bf16)"
timeout 240 "$bin/expertmesh" bench gpu-experts --device cuda:0 --runs 10 || status=1
echo "== single-process decode (the Maverick-shaped synthetic model): the GPU in f32 and bf16, and this machine's CPU"
for g in f32 bf16; do
  timeout 180 "$bin/expertmesh" bench decode --device cuda:0 --gemm "$g" --batch 1,32 || status=1
done
timeout 240 "$bin/expertmesh" bench decode --batch 1,32 || status=1
exit $status
