#!/usr/bin/env bash
# llama.cpp against expertmesh on the same bf16 checkpoint, same machine, same run (the CPU
# engine issue's side-by-side figures): prefill 128 tokens, decode batch 1, decode 32
# sequences, at THREADS threads.
#
#   scripts/llamacpp-baseline.sh [WORK_DIR]      (default: target/llamacpp-baseline)
#
# Everything comes from PyPI: torch + transformers write the Maverick-shaped bench checkpoint
# (`make_bench_model.py` from the shared tools, BENCH_TOOLS), llama.cpp is built from the
# `llama-cpp-python` sdist's vendored sources (cmake from PyPI), its converter makes a bf16
# GGUF (taught the checkpoint's BPE pre-tokenizer: it knows none of this tokenizer's hash),
# then llama-bench / llama-batched-bench and `expertmesh bench decode --model` run one after
# the other. Needs ~8 GB of disk (torch and its CUDA wheels are the bulk) and, on 2 cores,
# ~15 minutes the first time; later runs reuse what WORK_DIR holds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$ROOT/target/llamacpp-baseline}
THREADS=${THREADS:-2}
BENCH_TOOLS=${BENCH_TOOLS:-$ROOT/../shared/tools}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
mkdir -p "$WORK"
cd "$WORK"

step() { printf '\n== %s\n' "$*" >&2; }

if [ ! -x venv/bin/python ]; then
    step "python environment (torch, transformers, cmake)"
    python3 -m venv venv
    venv/bin/pip install -q torch transformers safetensors numpy sentencepiece tokenizers \
        pillow cmake scikit-build-core
fi
PY=$WORK/venv/bin/python

if [ ! -f bench-bf16/config.json ]; then
    step "the bench checkpoint (make_bench_model.py)"
    "$PY" "$BENCH_TOOLS/make_bench_model.py" bench-bf16
fi

SRC=$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
if [ ! -d "$SRC" ]; then
    step "llama.cpp sources (llama-cpp-python $LLAMA_CPP_PYTHON sdist)"
    venv/bin/pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d sdist
    tar xzf "sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
fi

if [ ! -x build/bin/llama-bench ]; then
    step "building llama.cpp (CPU, native)"
    venv/bin/cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    venv/bin/cmake --build build -j "$(nproc)" --target llama-bench llama-batched-bench >/dev/null
fi

if [ ! -f bench-bf16.gguf ]; then
    step "bf16 GGUF (convert_hf_to_gguf.py)"
    # The converter names BPE pre-tokenizers by a hash of how they split a test string and
    # stops on an unknown one; this checkpoint's tokenizer splits as Llama 4's.
    sed -i 's/^        res = None$/        res = "llama4"  # expertmesh baseline: the bench checkpoint/' \
        "$SRC/conversion/base.py"
    PYTHONPATH="$SRC/gguf-py" "$PY" "$SRC/convert_hf_to_gguf.py" bench-bf16 \
        --outtype bf16 --outfile bench-bf16.gguf >/dev/null
fi

EXPERTMESH=${EXPERTMESH:-$ROOT/target/release/expertmesh}
if [ ! -x "$EXPERTMESH" ]; then
    step "building expertmesh (release)"
    (cd "$ROOT" && cargo build --release -p expertmesh)
fi

step "llama.cpp: prefill 128, decode 64 at batch 1 ($THREADS threads)"
build/bin/llama-bench -m bench-bf16.gguf -t "$THREADS" -p 128 -n 64 -r 3 -o json >llama-bench.json
step "llama.cpp: 32 sequences decoding (llama-batched-bench)"
build/bin/llama-batched-bench -m bench-bf16.gguf -t "$THREADS" -c 8192 -b 2048 -ub 512 \
    -npp 128 -ntg 32 -npl 1,32 --output-format jsonl >llama-batched.jsonl 2>/dev/null
step "expertmesh: bench decode --model (same checkpoint)"
"$EXPERTMESH" bench decode --model bench-bf16 --threads "$THREADS" --batch 1,32 --json >expertmesh.json

"$PY" - <<'EOF'
import json
bench = json.load(open("llama-bench.json"))
pp = next(r["avg_ts"] for r in bench if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in bench if r["n_gen"] > 0 and r["n_prompt"] == 0)
batched = [json.loads(l) for l in open("llama-batched.jsonl") if l.strip().startswith("{")]
tg32 = next(r["speed_tg"] for r in batched if r["pl"] == 32)
em = json.load(open("expertmesh.json"))
em_b = {p["batch"]: p["tokens_per_s"] for p in em["decode"]}
rows = [
    ("prefill 128 tokens", pp, em["prefill_tokens_per_s"]),
    ("decode, batch 1", tg, em_b[1]),
    ("decode, 32 sequences", tg32, em_b[32]),
]
print(f"{'':24} {'llama.cpp':>12} {'expertmesh':>12} {'ratio':>7}")
for name, l, e in rows:
    print(f"{name:24} {l:>10.1f}/s {e:>10.1f}/s {e / l:>7.2f}")
print(json.dumps({"llama_cpp": {"prefill_128": pp, "decode_1": tg, "decode_32": tg32},
                  "expertmesh": {"prefill_128": em["prefill_tokens_per_s"], "decode_1": em_b[1],
                                 "decode_32": em_b[32]}}))
EOF
