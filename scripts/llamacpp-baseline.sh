#!/usr/bin/env bash
# llama.cpp against expertmesh on the same bf16 checkpoint, same machine, same run (the CPU
# engine issue's side-by-side figures): prefill 128 and LONG (8192) tokens, decode batch 1,
# decode 32 sequences, at THREADS threads; REPEATS (3) alternating rounds, medians.
#
#   scripts/llamacpp-baseline.sh [WORK_DIR]      (default: target/llamacpp-baseline)
#
# Everything comes from PyPI: torch + transformers write the Maverick-shaped bench checkpoint
# (`make_bench_model.py` from the shared tools, BENCH_TOOLS), llama.cpp is built from the
# `llama-cpp-python` sdist's vendored sources (cmake from PyPI), its converter makes a bf16
# GGUF (taught the checkpoint's BPE pre-tokenizer: it knows none of this tokenizer's hash),
# then llama-bench / llama-batched-bench and `expertmesh bench decode --model` run one after
# the other; on a CPU with AVX512-BF16, a second llama.cpp build without it as well (see
# NO_BF16 below) and expertmesh with `--gemm bf16` (EM_BF16). Needs ~8 GB of disk (torch and its CUDA wheels are the bulk) and, on 2 cores,
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

# build_llama DIR CMAKE_FLAGS...: llama-bench and llama-batched-bench into DIR, unless there.
build_llama() {
    local dir=$1
    shift
    [ -x "$dir/bin/llama-bench" ] && return
    step "building llama.cpp into $dir (CPU: $*)"
    venv/bin/cmake -S "$SRC" -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    venv/bin/cmake --build "$dir" -j "$(nproc)" --target llama-bench llama-batched-bench >/dev/null
}
build_llama build -DGGML_NATIVE=ON

# llama.cpp's bf16 products round the activations to bf16, and where the CPU has AVX512-BF16
# (Zen 4, Sapphire Rapids) its native build takes two products per lane per instruction
# (VDPBF16PS, tinyBLAS). expertmesh keeps f32 activations (the references compute in float32)
# and one FMA per product. On such a CPU a second llama.cpp build without AVX512-BF16 runs
# too (NO_BF16=0 skips it): its products run at f32 multiply-add speed, as ours do.
NO_BF16=${NO_BF16:-1}
# There, expertmesh also runs with `--gemm bf16` (EM_BF16=0 skips it): its dense products then
# round the activations to bf16 as llama.cpp does and run on VDPBF16PS.
EM_BF16=${EM_BF16:-1}
HAS_BF16=0
grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && HAS_BF16=1
GEMMS="f32"
[ "$EM_BF16" = 1 ] && [ "$HAS_BF16" = 1 ] && GEMMS="f32 bf16"
if [ "$NO_BF16" = 1 ] && [ "$HAS_BF16" = 1 ]; then
    build_llama build-nobf16 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AVX512_BF16=OFF
    LLAMAS="build build-nobf16"
else
    LLAMAS="build"
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

LONG=${LONG:-8192}
REPEATS=${REPEATS:-3}
# The machines these run on are noisy (shared cores): the two engines take turns, REPEATS
# rounds, and the figures are medians, with the median of the per-round ratios.
for round in $(seq "$REPEATS"); do
    for llama in $LLAMAS; do
        step "round $round/$REPEATS: llama.cpp ($llama) prefill 128 and $LONG, decode 64 at batch 1 ($THREADS threads)"
        "$llama"/bin/llama-bench -m bench-bf16.gguf -t "$THREADS" -p "128,$LONG" -n 64 -r 1 \
            -o json >"llama-bench.$llama.$round.json"
        step "round $round/$REPEATS: llama.cpp ($llama) 32 sequences decoding (llama-batched-bench)"
        "$llama"/bin/llama-batched-bench -m bench-bf16.gguf -t "$THREADS" -c 8192 -b 2048 \
            -ub 512 -npp 128 -ntg 32 -npl 1,32 --output-format jsonl \
            >"llama-batched.$llama.$round.jsonl" 2>/dev/null
    done
    for gemm in $GEMMS; do
        step "round $round/$REPEATS: expertmesh bench decode --model (same checkpoint, --gemm $gemm)"
        "$EXPERTMESH" bench decode --model bench-bf16 --threads "$THREADS" --batch 1,32 \
            --prompt-tokens "128,$LONG" --gemm "$gemm" --json >"expertmesh.$gemm.$round.json"
    done
done

GEMMS=$GEMMS LLAMAS=$LLAMAS REPEATS=$REPEATS LONG=$LONG THREADS=$THREADS "$PY" - <<'EOF'
import json, os, statistics as st
rounds, long = int(os.environ["REPEATS"]), int(os.environ["LONG"])
llamas = os.environ["LLAMAS"].split()
names = ["prefill 128 tokens", f"prefill {long} tokens", "decode, batch 1", "decode, 32 sequences"]
keys = ["prefill_128", f"prefill_{long}", "decode_1", "decode_32"]
# The native llama.cpp build, and the one without AVX512-BF16 where it ran: (key, title).
labels = {"build": ("llama_cpp", "llama.cpp"),
          "build-nobf16": ("llama_cpp_no_bf16", "llama.cpp without AVX512-BF16")}


def llama_figures(llama, r):
    bench = json.load(open(f"llama-bench.{llama}.{r}.json"))
    pp = {b["n_prompt"]: b["avg_ts"] for b in bench if b["n_prompt"] > 0 and b["n_gen"] == 0}
    tg = next(b["avg_ts"] for b in bench if b["n_gen"] > 0 and b["n_prompt"] == 0)
    lines = open(f"llama-batched.{llama}.{r}.jsonl")
    batched = [json.loads(l) for l in lines if l.strip().startswith("{")]
    tg32 = next(b["speed_tg"] for b in batched if b["pl"] == 32)
    return dict(zip(keys, [pp[128], pp[long], tg, tg32]))


gemms = os.environ["GEMMS"].split()
runs = []
for r in range(1, rounds + 1):
    run = {labels[l][0]: llama_figures(l, r) for l in llamas}
    for gemm in gemms:
        em = json.load(open(f"expertmesh.{gemm}.{r}.json"))
        em_p = {p["prompt_tokens"]: p["tokens_per_s"] for p in em["prefill"]}
        em_b = {p["batch"]: p for p in em["decode"]}
        run[f"expertmesh_{gemm}"] = dict(zip(keys, [em_p[128], em_p[long], em_b[1]["tokens_per_s"],
                                                    em_b[32]["tokens_per_s"]]))
        if gemm == "f32":
            run.update({
                "batch1_step_ms": em_b[1]["step_ms_median"],
                "batch1_read_floor_ms": em_b[1]["step_ms_median"] / em_b[1]["ratio_to_read_floor"],
                "read_gbps": em["read_gbps"],
            })
    runs.append(run)
med = st.median
for l in llamas:
    against, title = labels[l]
    for gemm in gemms:
        ours = f"expertmesh_{gemm}"
        print(f"\n{rounds} rounds, medians ({os.environ['THREADS']} threads): expertmesh --gemm {gemm} against {title}")
        print(f"{'':24} {'llama.cpp':>12} {'expertmesh':>12} {'ratio':>7}   per-round ratios")
        for name, k in zip(names, keys):
            lf = med([r[against][k] for r in runs])
            e = med([r[ours][k] for r in runs])
            ratios = [r[ours][k] / r[against][k] for r in runs]
            print(f"{name:24} {lf:>10.1f}/s {e:>10.1f}/s {med(ratios):>7.2f}   "
                  + " ".join(f"{x:.2f}" for x in ratios))
s, f = med([r["batch1_step_ms"] for r in runs]), med([r["batch1_read_floor_ms"] for r in runs])
print(f"batch 1 step (f32) {s:.2f} ms against a read-bandwidth floor of {f:.2f} ms "
      f"({med([r['read_gbps'] for r in runs]):.1f} GB/s): {s / f:.2f}x the floor")
print(json.dumps({"rounds": runs}))
EOF
