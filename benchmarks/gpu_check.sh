#!/usr/bin/env bash
# One-shot check on a fresh GPU machine, from the repository root, no network needed:
#
#     OUT=gpu_results bash benchmarks/gpu_check.sh
#
# Builds the extension, runs the kernel tests and the kernel benchmarks first, then the
# speculative-vs-plain greedy agreement, the decode benchmarks, memcheck and the rest of the
# tests, and ends with a one-screen summary (stages passed / failed / skipped, headline
# figures parsed from the JSON). Every stage logs to $OUT/<stage>.log, has its own time limit
# and never stops at its first failure; a failed stage does not stop the script, which exits
# non-zero if any stage failed. The stage limits are sized for a cold machine (Triton JIT
# compiles, the extension build) and clipped so that the whole run ends within TOTAL_S; on an
# H100/H200 it takes under 8 minutes. Every benchmark writes its JSON case by case, so a
# timeout keeps what was measured.
#
# Environment:
#   OUT=DIR      where logs, JSON and summary.txt go (default: gpu_results; relative to the repo root)
#   PYTHON=EXE   the Python to run (default: python3; the GPU machines have no plain python)
#   TOTAL_S=N    the budget for all stages together, in seconds (default: 450)
#   STAGES="a b" run only these stages (names as in the summary); the rest report "skipped"
#   DRY_RUN=1    check the script itself without doing GPU work: GPU stages and the install
#                skip, saying why; env and the test/benchmark collection still run
#                (tests/test_gpu_check.py runs it so on a CPU machine)
#   HF_STATIC=1  also time transformers' static-cache generate (it compiles itself, ~17 s) in
#                bench_decode, where that script has the --hf-static flag
#
# A stage is one line in the list at the bottom:  stage NAME LIMIT_S gpu|any COMMAND...
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
TOTAL_S=${TOTAL_S:-450}
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-}
mkdir -p "$OUT"
: >"$OUT/stages.tsv"  # name, status, seconds, note: read by the summary
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  GPU_WHY=""
else
  GPU_WHY="no CUDA GPU visible to torch"
fi
[ "$DRY_RUN" = 1 ] && GPU_WHY="DRY_RUN=1"

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/stages.tsv"
  echo "== $1: $2 in $3 s${4:+ ($4)}"
}

stage() {  # stage NAME LIMIT_S gpu|any COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 cap=$2 kind=$3
  shift 3
  if [ -n "$STAGES" ] && [[ " $STAGES " != *" $name "* ]]; then
    record "$name" skipped 0 "not in STAGES"; return
  fi
  if [ "$kind" = gpu ] && [ -n "$GPU_WHY" ]; then
    echo "== $name: skipped: $GPU_WHY" >"$OUT/$name.log"; record "$name" skipped 0 "$GPU_WHY"; return
  fi
  local left=$((TOTAL_S - (SECONDS - START) - 5)) limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    record "$name" skipped 0 "no time left in TOTAL_S=$TOTAL_S"; return
  fi
  local t0=$SECONDS rc
  echo "== $name (limit ${limit} s): $*" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  local note
  note=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)' "$OUT/$name.log" | tail -1 | tr -d '=' | xargs)
  if [ "$rc" -eq 0 ] && grep -q '^SKIP: ' "$OUT/$name.log"; then
    record "$name" skipped $((SECONDS - t0)) "$(grep -m1 '^SKIP: ' "$OUT/$name.log" | cut -c7-)"
  elif [ "$rc" -eq 0 ]; then
    record "$name" passed $((SECONDS - t0)) "$note"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAILED $((SECONDS - t0)) "timed out after ${limit} s${note:+; $note}"
  else
    record "$name" FAILED $((SECONDS - t0)) "rc=$rc${note:+; $note}"
  fi
}

memcheck() {  # compute-sanitizer memcheck of the extension's kernels, skipped where the tool is missing or broken
  local san
  san=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
  if [ -z "$san" ]; then echo "SKIP: compute-sanitizer not found"; return 0; fi
  if ! "$san" --version >/dev/null 2>&1; then echo "SKIP: $san --version fails"; return 0; fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees any
  # access past its end. Graph capture needs the allocator, so the graph tests sit this out,
  # as does opcheck (slow and CPU-bound).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 99 \
    "$PYTHON" -m pytest tests/test_tree_mask.py tests/test_verify.py tests/test_kv_compact.py -q \
    -p no:cacheprovider -k "not graph and not opcheck"
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ] && [ "$rc" -ne 124 ] && ! grep -q "ERROR SUMMARY" "$OUT/memcheck.log"; then
    echo "SKIP: compute-sanitizer did not run (rc=$rc)"; return 0
  fi
  return "$rc"
}

export -f memcheck
export PYTHON OUT

has_flag() {  # has_flag FLAG COMMAND...: whether COMMAND --help lists FLAG
  local flag=$1; shift
  "$@" --help 2>/dev/null | grep -q -- "$flag"
}

{
  nvidia-smi
  "$PYTHON" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU')"
  nvcc --version
} >"$OUT/env.txt" 2>&1
record env passed 0 "$(grep -m1 '^torch' "$OUT/env.txt")"

KERNEL_TESTS="tests/test_fused_logits.py tests/test_tree_attention.py tests/test_tree_mask.py tests/test_verify.py tests/test_kv_compact.py tests/test_triton_compat.py tests/test_ln_qkv.py tests/test_linear_residual.py tests/test_ln_fc_gelu.py"
DECODE_STATIC=()
if [ "${HF_STATIC:-0}" = 1 ]; then
  if has_flag --hf-static "$PYTHON" benchmarks/bench_decode.py; then
    DECODE_STATIC=(--hf-static)
    echo "HF_STATIC=1: bench_decode also times transformers' static cache (--hf-static)"
  else
    echo "HF_STATIC=1: benchmarks/bench_decode.py has no --hf-static flag; it runs its own default"
  fi
fi
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)

INSTALL_KIND=gpu
[ "$DRY_RUN" = 1 ] || INSTALL_KIND=any
stage install 180 "$INSTALL_KIND" env MAX_JOBS=16 MTPKERN_FORCE_CUDA_BUILD=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
stage import_ext 30 gpu "$PYTHON" -c "import torch; from mtpkern import _C; from mtpkern.ops import _backend; assert _backend.HAS_CUDA_EXT; print('mtpkern._C OK', _C.__file__)"
stage collect 120 any "${PYTEST[@]}" --collect-only benchmarks
stage kernel_tests 150 gpu "${PYTEST[@]}" $KERNEL_TESTS --junitxml="$OUT/kernel_tests.xml"
stage bench_kernels 120 gpu "${PYTEST[@]}" benchmarks --cases-json "$OUT/bench_kernels.json" --benchmark-json "$OUT/bench_kernels_stats.json"
stage agreement 90 gpu "$PYTHON" benchmarks/greedy_agreement.py --prompts 4 --max-new-tokens 64 --json "$OUT/agreement.json"
stage bench_decode 90 gpu "$PYTHON" benchmarks/bench_decode.py --prompts 3 --max-new-tokens 64 "${DECODE_STATIC[@]}" --json "$OUT/bench_decode.json"
# The fused decode step vs the eager and compiled CUDA-graphed steps (T = 1, 16, 64) and ntp /
# medusa tokens/s; torch.compile runs last, so a time limit cuts it first.
stage bench_fused_step 45 gpu "$PYTHON" benchmarks/bench_fused_step.py --iters 100 --max-new-tokens 32 --compile-t 1 \
  --json "$OUT/bench_fused_step.json"
stage bench_e2e 90 gpu "$PYTHON" -m mtpkern.cli bench --device cuda --prompts 3 --max-new-tokens 64 --json "$OUT/bench_e2e.json"
stage bench_memory 90 gpu "$PYTHON" benchmarks/bench_mtp_memory.py --repeat 3 --json "$OUT/bench_mtp_memory.json"  # training step: plain vs fused loss
stage memcheck 90 gpu bash -c memcheck
stage tests 240 gpu "${PYTEST[@]}" tests $(printf -- '--ignore=%s ' $KERNEL_TESTS) --junitxml="$OUT/tests.xml"

"$PYTHON" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
! grep -q $'\tFAILED\t' "$OUT/stages.tsv"
