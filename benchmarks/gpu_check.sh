#!/usr/bin/env bash
# One-shot check on a fresh GPU machine, from the repository root, no network needed:
#
#     OUT=gpu_results bash benchmarks/gpu_check.sh
#
# Builds the extension, checks CUDA-graph decoding, runs the kernel tests and the kernel benchmarks, then the
# speculative-vs-plain greedy agreement, the decode benchmarks, memcheck and the rest of the
# tests, and ends with a one-screen summary (stages passed / failed / skipped, headline
# figures parsed from the JSON). Every stage logs to $OUT/<stage>.log, has its own time limit
# and never stops at its first failure; a failed stage does not stop the script, which exits
# non-zero if any stage failed. The stage limits are sized for a cold machine (Triton JIT
# compiles, the extension build) and clipped so that the whole run ends within TOTAL_S; on an
# H100/H200 it takes about 8 minutes. Every benchmark writes its JSON case by case, so a
# timeout keeps what was measured.
#
# Environment:
#   OUT=DIR      where logs, JSON and summary.txt go (default: gpu_results; relative to the repo root)
#   PYTHON=EXE   the Python to run (default: python3; the GPU machines have no plain python)
#   TOTAL_S=N    the budget for all stages together, in seconds (default: 500; give the run ~40 s more)
#   STAGES="a b" run only these stages (names as in the summary); the rest report "skipped"
#   DRY_RUN=1    check the script itself without doing GPU work: GPU stages and the install
#                skip, saying why; env and the test/benchmark collection still run
#                (tests/test_gpu_check.py runs it so on a CPU machine)
#   HF_STATIC=1  also time transformers' static-cache generate (it compiles itself, ~17 s) in
#                bench_decode, where that script has the --hf-static flag
#   JOBS=N       test files run at once in the kernel_tests and tests stages (default: 8); each
#                file is its own pytest process, so a crash in one (a segfault) loses only that file
#   PACK=0|1     1 (default): at the end everything the run wrote goes into $OUT/gpu_results.tgz,
#                beside summary.txt (two files to fetch from a remote machine); 0: leave them loose
#
# A stage is one line in the list at the bottom:  stage NAME LIMIT_S gpu|any COMMAND...
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
TOTAL_S=${TOTAL_S:-500}
JOBS=${JOBS:-8}
PACK=${PACK:-1}
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

pytest_files() {  # pytest_files NAME LIMIT_S FILE...: one pytest process per file, $JOBS at a time
  local name=$1 limit=$2; shift 2
  local dir="$OUT/$name.files"
  mkdir -p "$dir"
  printf '%s\n' "$@" | xargs -P "$JOBS" -I{} bash -c \
    'f={}; log="$0/$(basename "$f" .py).log"; timeout -k 5 "$1" "$PYTHON" -m pytest -q -p no:cacheprovider -rfE "$f" >"$log" 2>&1; echo "rc=$?" >>"$log"' "$dir" "$limit"
  local bad=0 f log rc
  for f in "$@"; do
    log="$dir/$(basename "$f" .py).log"
    rc=$(tail -1 "$log" | sed 's/^rc=//')
    echo "$f: rc=$rc $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$log" | tail -1 | tr -d '=')"
    case "$rc" in 0) ;; 124|137) bad=1; echo "  timed out after $limit s" ;; 139) bad=1; grep -A4 'Fatal Python error' "$log" ;; *) bad=1; grep -E '^(FAILED|ERROR) ' "$log" ;; esac
  done
  # one total line, in pytest's words, for the stage's note
  cat "$dir"/*.log | grep -E '^=*.*[0-9]+ (passed|failed|skipped|errors?)' | grep -oE '[0-9]+ (passed|failed|skipped|errors?)' |
    awk '{n[$2]+=$1} END {printf "%d passed, %d failed, %d skipped, %d errors\n", n["passed"], n["failed"], n["skipped"], n["errors"]+n["error"]}'
  return "$bad"
}

cxx_errors() {  # does a C++ exception from the extension reach Python, or crash the process?
  c++ --version | head -1
  local probe
  for probe in \
      "import torch; torch.ones(2) @ torch.ones(3)" \
      "import torch, mtpkern.ops; torch.ops.mtpkern.kv_compact_(torch.zeros(1,1,1,4,1), torch.zeros(1,1,1,4,1), torch.tensor([0, 9]), torch.tensor(0), torch.tensor(2))" \
      "import mtpkern.ops.kv_compact as m, torch; m.kv_compact_(torch.zeros(1,1,1,4,1), torch.zeros(1,1,1,4,1), torch.tensor([0, 9]), torch.tensor(0), torch.tensor(2), backend='cuda')"; do
    "$PYTHON" -X faulthandler -c "$probe" >"$OUT/cxx_probe.out" 2>&1
    echo "rc=$? for: $probe"
    grep -m1 -E 'Error|Fatal' "$OUT/cxx_probe.out"
  done
  rm -f "$OUT/cxx_probe.out"
  if command -v cuda-gdb >/dev/null 2>&1; then  # where a crash happens (the machines have no plain gdb)
    timeout 40 cuda-gdb -batch -ex run -ex bt --args "$PYTHON" -c "import torch, mtpkern.ops; torch.ops.mtpkern.kv_compact_(torch.zeros(1,1,1,4,1), torch.zeros(1,1,1,4,1), torch.tensor([0, 9]), torch.tensor(0), torch.tensor(2))" 2>&1 |
      grep -E '^#|signal|exited' | head -30
  fi
  return 0
}

bench_rejection() {  # verify_rejection: the CUDA kernel against the eager reference, one sampled step each
  "$PYTHON" - "$OUT/bench_rejection.json" <<'PY'
import json, sys, time

import torch

from mtpkern.ops.verify_sampled import verify_rejection, verify_rejection_ref
from mtpkern.sampling import sample_tree_drafts
from mtpkern.tree import Tree

V, ITERS = 50257, {"cuda": 200, "eager": 5}  # GPT-2's vocabulary; the reference syncs every call
tree = Tree.from_widths([4, 3, 2, 1])  # 65 nodes, depth 4
T, D, depth = len(tree), tree.max_depth, tree.tensors().depth
par, row = tree.tensors().parents.cuda(), (depth - 1).clamp_min(0).cuda()
cases = {}
for B in (1, 8):
    for dtype in (torch.float32, torch.float16):
        g = torch.Generator(device="cuda").manual_seed(0)
        z = torch.randn(B, 1, V, device="cuda", generator=g) * 3  # heads close to the target: long accepts
        q = torch.softmax(z + torch.randn(B, D, V, device="cuda", generator=g), -1)
        p = torch.softmax(z + torch.randn(B, T, V, device="cuda", generator=g), -1)
        toks = sample_tree_drafts(q, tree.parents, depth.tolist(), g)
        p, q = p.to(dtype), q.to(dtype)
        u = torch.rand(B, T, device="cuda", generator=g)
        got, ref = verify_rejection(toks, p, q, row, par, D, uniforms=u, backend="cuda"), verify_rejection_ref(toks, p, q, row, par, u, D)
        same = all(torch.equal(a, b) for a, b in zip(got, ref))
        us = {}
        for backend, iters in ITERS.items():  # the user's call: uniforms from the generator, then the op
            call = lambda: verify_rejection(toks, p, q, row, par, D, generator=g, backend=backend)
            call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
            us[backend] = (time.perf_counter() - t0) / iters * 1e6
        name = f"B={B} {str(dtype).removeprefix('torch.')}"
        cases[name] = dict(kernel_us=us["cuda"], eager_us=us["eager"], speedup_vs_eager=us["eager"] / us["cuda"],
                           same_as_reference=same, mean_accept_len=float(ref.accept_len.float().mean()), T=T, V=V)
        print(f"verify_rejection {name}: cuda {us['cuda']:.1f} us, eager {us['eager']:.0f} us "
              f"({us['eager'] / us['cuda']:.0f}x), mean accepted {cases[name]['mean_accept_len']:.2f}, "
              f"bit-identical to the reference: {same}", flush=True)
        json.dump({"device": torch.cuda.get_device_name(), "cases": cases}, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if all(c["same_as_reference"] for c in cases.values()) else 1)
PY
}

export -f memcheck pytest_files cxx_errors bench_rejection
export PYTHON OUT JOBS

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

KERNEL_TESTS="tests/test_fused_logits.py tests/test_tree_attention.py tests/test_tree_attention_proj.py tests/test_tree_mask.py tests/test_verify.py tests/test_verify_sampled.py tests/test_kv_compact.py tests/test_triton_compat.py tests/test_ln_qkv.py tests/test_linear_residual.py tests/test_ln_fc_gelu.py tests/test_rms_qkv_rope.py tests/test_rms_swiglu.py tests/test_tree_attention_gqa.py tests/test_llama_fused.py"
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
# CUDA graphs first: one graphed decode each of ntp, mtp and medusa (eager and fused kernels) and
# batches of 16, 4 and 1, each against the same decode without graphs (tests/test_graphs.py, which
# runs on the CPU under a fake of torch's graph primitives in CI). A broken graph path shows here,
# in the first minute, and the stages below still run.
stage graphs 150 gpu "${PYTEST[@]}" -rfE tests/test_graphs.py
stage collect 120 any "${PYTEST[@]}" --collect-only benchmarks
stage cxx_errors 60 gpu bash -c cxx_errors
stage kernel_tests 150 gpu bash -c 'pytest_files kernel_tests 140 "$@"' _ $KERNEL_TESTS
stage bench_kernels 120 gpu "${PYTEST[@]}" benchmarks --cases-json "$OUT/bench_kernels.json" --benchmark-json "$OUT/bench_kernels_stats.json"
# verify_rejection (sampling on trees): its CUDA kernel against the eager reference, bit-identical
# results checked, at GPT-2's vocabulary (tests/test_verify_sampled.py in kernel_tests checks more shapes)
stage bench_rejection 45 gpu bash -c bench_rejection
stage agreement 90 gpu "$PYTHON" benchmarks/greedy_agreement.py --prompts 4 --max-new-tokens 64 --json "$OUT/agreement.json"
stage bench_decode 90 gpu "$PYTHON" benchmarks/bench_decode.py --prompts 3 --max-new-tokens 64 "${DECODE_STATIC[@]}" --json "$OUT/bench_decode.json"
# Batched decoding (mtpkern.batch: fused kernels on CUDA, with and without CUDA graphs) at B = 1, 4, 16:
# what survives of the speed-up
stage bench_batch 90 gpu "$PYTHON" benchmarks/bench_decode.py --prompts 16 --max-new-tokens 48 --batch 1,4,16 \
  --json "$OUT/bench_batch.json"
stage tests 180 gpu bash -c 'pytest_files tests 170 "$@"' _ $(ls tests/test_*.py | grep -v -F "$(printf '%s\n' $KERNEL_TESTS tests/test_graphs.py)")
stage bench_e2e 90 gpu "$PYTHON" -m mtpkern.cli bench --device cuda --prompts 3 --max-new-tokens 64 --batch none \
  --json "$OUT/bench_e2e.json"
# The fused decode step vs the eager and compiled CUDA-graphed steps (T = 1, 16, 64) and ntp /
# medusa tokens/s; torch.compile runs last, so a time limit cuts it first.
stage bench_fused_step 45 gpu "$PYTHON" benchmarks/bench_fused_step.py --iters 100 --max-new-tokens 32 --compile-t 1 \
  --json "$OUT/bench_fused_step.json"
stage bench_memory 90 gpu "$PYTHON" benchmarks/bench_mtp_memory.py --repeat 3 --json "$OUT/bench_mtp_memory.json"  # training step: plain vs fused loss
stage memcheck 90 gpu bash -c memcheck

"$PYTHON" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
FAILED=0
grep -q $'\tFAILED\t' "$OUT/stages.tsv" && FAILED=1
if [ "$PACK" = 1 ]; then  # only what this run wrote: the stage logs and files, the JSON, the XML
  ( shopt -s nullglob; cd "$OUT" && written=(env.txt stages.tsv ./*.log ./*.json ./*.xml ./*.files) &&
    tar czf gpu_results.tgz "${written[@]}" && rm -rf -- "${written[@]}" ) &&
    echo "packed into $OUT/gpu_results.tgz (beside summary.txt)"
fi
exit "$FAILED"
