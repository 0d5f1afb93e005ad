"""Compile every Triton kernel for real GPUs (H100 = sm_90, A100 = sm_80) on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler rejects
(a global annotated ``tl.constexpr`` instead of built as one: fused_logits never compiled until
this test) and knows nothing of shared memory, registers or tensor cores. Here the launchers
run for real GPT-2 shapes with a recorder in place of ``torch.library.wrap_triton``; each
recorded launch is then compiled ahead of time through the kernel's own JIT path (the same
argument specialisation as a real launch), with a stand-in driver that names the target GPU
and never launches. Triton ships ``ptxas``, so no GPU, driver
or CUDA toolkit is needed; ``TRITON_PTXAS_PATH`` points Triton at another ``ptxas`` if needed.

Checked per compiled kernel: it compiles; its shared memory fits one block on that GPU; ptxas
spills no more than a few bytes; the grid fits CUDA's limits; and an fp32 launch contains no TF32
tensor-core instruction (TF32 would break greedy decoding's token identity with eager fp32).

The compiles run in a subprocess with ``TRITON_INTERPRET=0`` (tests/conftest.py sets it to 1,
and ``@triton.jit`` then builds interpreter objects). By hand: ``python tests/test_triton_compile.py 90``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

# Per-block shared memory a kernel may use (the opt-in maximum): H100 227 KiB, A100 163 KiB.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = tuple(MAX_SHARED)

# ptxas may spill a few bytes on its own to raise occupancy; register pressure shows as hundreds
# (fp32's FMA-unit dots did, before their blocks were sized for it).
MAX_SPILL_BYTES = 32

# GPT-2 124M: vocab 50257, width 768, 12 heads of 64, context 1024.
VOCAB, WIDTH, HEADS, CONTEXT = 50257, 768, 12, 1024
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128)

# ------------------------------------------------------------------ the launches (subprocess side)


def _fused_logits_launches(torch, fl):
    """R rows, top-k, target: next-token argmax (1, 1), the draft heads' top-10 (6, 10), the
    nodes of a 64-node tree with typical acceptance's targets (64, 1, int64), the largest k
    over two row blocks (97, 64, int32)."""
    cases = ((1, 1, None), (6, 10, None), (64, 1, torch.int64), (97, fl.MAX_K, torch.int32))
    for name in DTYPES:
        dtype = getattr(torch, name)
        weight = torch.empty(VOCAB, WIDTH, dtype=dtype)  # never touched: only its pointer and strides
        for R, k, target_dtype in cases:
            target = None if target_dtype is None else torch.zeros(R, dtype=target_dtype)
            yield f"fused_logits {name} R={R} k={k} target={target_dtype}", name, fl._launch, (
                torch.empty(R, WIDTH, dtype=dtype), weight, k, target, 1.0
            )
        # the final LayerNorm in the prologue: a verification's argmax over 1 and 64 tree tokens
        norm = (torch.empty(WIDTH, dtype=dtype), torch.empty(WIDTH, dtype=dtype), 1e-5)
        for R in (1, 64):
            yield f"fused_logits {name} R={R} k=1 norm", name, fl._launch, (
                torch.empty(R, WIDTH, dtype=dtype), weight, 1, None, 1.0, *norm
            )


def _tree_attention_launches(torch, ta):
    """T tokens over the cache: one decode token (T = 1), a 64-node tree, a 97-token causal
    prefill (the 64-row blocks); every head dim the op accepts, q as the model's transposed view."""
    for name in DTYPES:
        dtype = getattr(torch, name)
        for Dh in HEAD_DIMS:
            cache = torch.empty(1, HEADS, CONTEXT, Dh, dtype=dtype)
            for T in (1, 64, 97):
                if T == 97 and Dh < 64:
                    continue
                q = torch.empty(1, T, HEADS, Dh, dtype=dtype).transpose(1, 2)
                mask = ta.pack_tree_mask(torch.ones(T, T, dtype=torch.bool).tril())
                prefix = torch.tensor(CONTEXT - T)
                yield f"tree_attention {name} Dh={Dh} T={T}", name, ta._launch, (
                    q, cache, cache, prefix, mask, Dh**-0.5
                )


def _linear_cross_entropy_launches(torch, lce):
    """One chunk of fp32 logits at GPT-2's vocabulary (the chunk's rows are the grid): the
    forward with and without the gradient written in place."""
    C = lce._chunk_rows(4096, VOCAB)
    z = torch.empty(C, VOCAB)
    labels, row_grad, loss, rank = torch.zeros(C, dtype=torch.long), torch.ones(C), torch.empty(C), torch.empty(C, dtype=torch.long)
    for grad in (False, True):
        yield f"linear_cross_entropy rows C={C} grad={grad}", "float32", lce._launch, (
            z, labels, row_grad if grad else None, -100, loss, rank
        )


# ------------------------------------------------------------------ the fused decode layer's kernels


def _decode_layer_launches(torch, ops):
    """GPT-2's decode layer (width 768, 12 heads, context 1024) at T = 1, 16, 64 and 128 tree
    tokens: ln_qkv into the cache, tree_attention_proj (the attention with its output
    projection, the model's path), ln_fc_gelu and the MLP-down linear_residual (split K); the
    attention-output linear_residual too (the op alone), its input as tree attention lays it out."""
    D, B = WIDTH, 1
    for name in DTYPES:
        dtype = getattr(torch, name)
        e = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731 - pointers and strides only
        cache = e(B, HEADS, CONTEXT, D // HEADS)
        for T in (1, 16, 64, 128):
            x = e(B, T, D)
            slots = torch.arange(CONTEXT - T, CONTEXT)
            yield f"ln_qkv {name} T={T}", name, ops["ln_qkv"]._launch, (
                x, e(D), e(D), e(3 * D, D), e(3 * D), cache, cache, slots, 1e-5)
            q = e(B, T, 3 * D)[..., :D].view(B, T, HEADS, D // HEADS).transpose(1, 2)  # ln_qkv's output, as the model views it
            mask = ops["tree_attention"].pack_tree_mask(torch.ones(T, T, dtype=torch.bool).tril())
            yield f"tree_attention_proj {name} T={T}", name, ops["tree_attention"]._launch, (
                q, cache, cache, torch.tensor(CONTEXT - T), mask, 0.125, (e(D, D), e(D), x))
            y = e(B, T, HEADS, D // HEADS).view(B, T, D)
            yield f"linear_residual attn {name} T={T}", name, ops["linear_residual"]._launch, (
                y, e(D, D), e(D), x)
            yield f"ln_fc_gelu {name} T={T}", name, ops["ln_fc_gelu"]._launch, (
                x, e(D), e(D), e(4 * D, D), e(4 * D), 1e-5)
            yield f"linear_residual mlp {name} T={T}", name, ops["linear_residual"]._launch, (
                e(B, T, 4 * D), e(D, 4 * D), e(D), x)


# SmolLM2-135M (issue 24's real model): width 576, 9 query heads over 3 KV heads of 64, MLP 1536;
# and Llama 3 8B's attention (32 query heads over 8 KV heads of 128).
LLAMA = dict(D=576, H=9, H_KV=3, DH=64, I=1536)
LLAMA_LAYER_KERNELS = {"_rms_qkv_rope_kernel", "_rms_swiglu_kernel"}


def _llama_layer_launches(torch, ops):
    """The Llama family's decode layer at T = 1, 16 and 64 tree tokens: rms_qkv_rope (with and
    without the q/k/v bias) into the cache, grouped-query tree attention alone and with its
    output projection (with and without bias; also at Llama 3 8B's heads, and SmolLM2's at head
    dim 8 padded to 16), rms_swiglu and the MLP-down linear_residual without bias."""
    D, H, Hk, Dh, I, B = LLAMA["D"], LLAMA["H"], LLAMA["H_KV"], LLAMA["DH"], LLAMA["I"], 1
    for name in DTYPES:
        dtype = getattr(torch, name)
        e = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731 - pointers and strides only
        cache = e(B, Hk, CONTEXT, Dh)
        for T in (1, 16, 64):
            x = e(B, T, D)
            slots = torch.arange(CONTEXT - T, CONTEXT)
            rope = e(1, T, Dh)
            N = (H + 2 * Hk) * Dh
            for bias in (None, e(N)):
                yield f"rms_qkv_rope {name} T={T} bias={bias is not None}", name, ops["rms_qkv_rope"]._launch, (
                    x, e(D), e(N, D), bias, rope, rope, cache, cache, slots, 1e-6)
            mask = ops["tree_attention"].pack_tree_mask(torch.ones(T, T, dtype=torch.bool).tril())
            prefix = torch.tensor(CONTEXT - T)
            for h, hk, dh in ((H, Hk, Dh), (32, 8, 128), (H, Hk, 8)):
                q = e(B, T, h, dh).transpose(1, 2)
                c = e(B, hk, CONTEXT, dh)
                yield f"tree_attention_gqa {name} H={h} H_kv={hk} Dh={dh} T={T}", name, ops["tree_attention"]._launch, (
                    q, c, c, prefix, mask, dh**-0.5)
                for bias in (None, e(D)):  # the model's path: with the output projection (o_bias or not)
                    yield (f"tree_attention_gqa_proj {name} H={h} H_kv={hk} Dh={dh} T={T} bias={bias is not None}",
                           name, ops["tree_attention"]._launch, (q, c, c, prefix, mask, dh**-0.5, (e(D, h * dh), bias, x)))
            yield f"rms_swiglu {name} T={T}", name, ops["rms_swiglu"]._launch, (x, e(D), e(2 * I, D), 1e-6)
            yield f"linear_residual llama mlp {name} T={T}", name, ops["linear_residual"]._launch, (
                e(B, T, I), e(D, I), None, x)


GEMV = dict(DOT=False, BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=3)


def _decode_layer_gemv_launches(torch, ops):
    """The decode-layer kernels' GEMV path (``DOT=False``, which the block-size sweep times) in
    half precision at 1 and 4 rows, through the launchers with ``blocks`` replaced."""
    D, B = WIDTH, 1
    for name in ("float16", "bfloat16"):
        dtype = getattr(torch, name)
        e = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731
        cache = e(B, HEADS, CONTEXT, D // HEADS)
        for T in (1, 4):
            x = e(B, T, D)
            cases = [("ln_qkv", (x, e(D), e(D), e(3 * D, D), e(3 * D), cache, cache, torch.arange(T), 1e-5)),
                     ("ln_fc_gelu", (x, e(D), e(D), e(4 * D, D), e(4 * D), 1e-5)),
                     ("linear_residual", (e(B, T, 4 * D), e(D, 4 * D), e(D), x))]
            for op, args in cases:
                mod = ops[op]
                default = mod.blocks
                mod.blocks = lambda *a, T=T, **k: dict(GEMV, BLOCK_M=T)
                try:
                    yield f"{op} {name} T={T} [gemv]", name, mod._launch, args
                finally:
                    mod.blocks = default


class _CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: it compiles for
    ``target`` and never loads or launches anything."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # JIT caches are per device: one "device" per target

    def get_current_stream(self, device=None):
        return 0


def _ptxas_report(ptx: str, arch: int) -> dict:
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(spills)}


def compile_all(arch: int) -> list[dict] | dict:
    """Run every launcher case with a recorder, compile each distinct launch for sm_<arch>."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, check=True)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return {"skip": f"no usable ptxas ({e}); point TRITON_PTXAS_PATH at one"}

    fl = importlib.import_module("mtpkern.ops.fused_logits")
    ta = importlib.import_module("mtpkern.ops.tree_attention")
    lce = importlib.import_module("mtpkern.ops.linear_cross_entropy")

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((case, dtype, self.kernel, grid, args, kwargs))

    torch.library.wrap_triton = Recorder  # the launchers look it up at call time
    for case, dtype, launcher, args in [*_fused_logits_launches(torch, fl), *_tree_attention_launches(torch, ta),
                                        *_linear_cross_entropy_launches(torch, lce)]:
        launcher(*args)
    decode_ops = {n: importlib.import_module(f"mtpkern.ops.{n}")
                  for n in ("ln_qkv", "tree_attention", "linear_residual", "ln_fc_gelu")}
    for case, dtype, launcher, args in _decode_layer_launches(torch, decode_ops):
        launcher(*args)
    for case, dtype, launcher, args in _decode_layer_gemv_launches(torch, decode_ops):
        launcher(*args)
    llama_ops = {n: importlib.import_module(f"mtpkern.ops.{n}")
                 for n in ("rms_qkv_rope", "tree_attention", "linear_residual", "rms_swiglu")}
    for case, dtype, launcher, args in _llama_layer_launches(torch, llama_ops):
        launcher(*args)

    triton.runtime.driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    results, seen = [], set()
    for case, dtype, kernel, grid, args, kwargs in launches:
        row = {"case": case, "kernel": kernel.__name__, "grid": list(grid),
               "input_precision": kwargs.get("INPUT_PRECISION"), "fp32": dtype == "float32"}
        try:
            compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # reported per case, so one failure does not hide the others
            results.append({**row, "error": f"{type(e).__name__}: {e}"[-3000:]})
            continue
        key = compiled.hash if hasattr(compiled, "hash") else compiled.metadata.hash
        if key in seen:
            continue
        seen.add(key)
        ptx = compiled.asm["ptx"]
        results.append({
            **row,
            "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps,
            "tf32_mma": bool(re.search(r"\b(?:w?gmma|mma)\S*\.tf32", ptx)),
            "mma": bool(re.search(r"\bw?g?mma\.", ptx)),
            **_ptxas_report(ptx, arch),
        })

    # torch.compile (Inductor) launches user-defined kernels with their Python float arguments
    # typed fp64, where a plain launch types them fp32 (seen on an H200: a loop-carried fp32
    # value turned fp64 and the kernel did not compile). Compile the half-precision launches so.
    from triton.runtime.jit import JITFunction

    pack = JITFunction._pack_args

    def fp64_floats(self, *a):
        options, signature, constexprs, attrs = pack(self, *a)
        return options, {k: "fp64" if v == "fp32" else v for k, v in signature.items()}, constexprs, attrs

    JITFunction._pack_args = fp64_floats
    for case, dtype, kernel, grid, args, kwargs in launches:
        if dtype != "float16" or not any(type(a) is float for a in args):
            continue
        kernel.device_caches.clear()  # its in-memory cache is keyed before the signature is packed
        row = {"case": f"{case} [fp64 floats, as torch.compile passes them]", "kernel": kernel.__name__,
               "grid": list(grid), "input_precision": kwargs.get("INPUT_PRECISION"), "fp32": False}
        try:
            compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as e:
            results.append({**row, "error": f"{type(e).__name__}: {e}"[-3000:]})
            continue
        ptx = compiled.asm["ptx"]
        results.append({**row, "shared": compiled.metadata.shared, "tf32_mma": False,
                        "mma": bool(re.search(r"\bw?g?mma\.", ptx))})
    JITFunction._pack_args = pack
    return results


# ------------------------------------------------------------------ the tests (pytest side)


def _run_compiles() -> dict[int, list[dict]]:
    """One subprocess per GPU target, all at once (the CPU cores share the work)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    procs = {arch: subprocess.Popen([sys.executable, __file__, str(arch)], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in ARCHS}
    outputs = {arch: (proc.communicate(timeout=900), proc.returncode) for arch, proc in procs.items()}
    results = {}
    for arch, ((out, err), code) in outputs.items():
        if code != 0:
            raise AssertionError(f"sm_{arch} compile subprocess failed ({code}):\n{err[-6000:]}")
        results[arch] = json.loads(out.strip().splitlines()[-1])
        if "skip" in results[arch]:
            pytest.skip(results[arch]["skip"])
    return results


@pytest.fixture(scope="module")
def all_compiled():
    pytest.importorskip("triton.backends.nvidia.compiler")
    return _run_compiles()


@pytest.fixture(params=ARCHS, ids=lambda a: f"sm_{a}")
def compiled(request, all_compiled):
    return request.param, all_compiled[request.param]


@pytest.mark.slow
def test_every_launch_compiles(compiled):
    arch, rows = compiled
    failures = [f"{r['case']} ({r['kernel']}): {r['error']}" for r in rows if "error" in r]
    assert not failures, f"sm_{arch}: {len(failures)} launches do not compile:\n" + "\n\n".join(failures)
    assert any("[fp64 floats" in r["case"] for r in rows), "the torch.compile-style launches did not run"
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_logits_partials_kernel", "_logits_merge_kernel", "_tree_attention_kernel",
                       "_cross_entropy_rows_kernel", "_tree_attention_split_kernel",
                       *DECODE_LAYER_KERNELS, *LLAMA_LAYER_KERNELS}, kernels
    llama = {r["case"].split(" ")[0] for r in rows if "Dh=8" in r["case"] or "llama" in r["case"]
             or r["kernel"] in LLAMA_LAYER_KERNELS}
    assert llama == {"tree_attention_gqa", "tree_attention_gqa_proj", "linear_residual", "rms_qkv_rope",
                     "rms_swiglu"}, llama


DECODE_LAYER_KERNELS = {"_ln_qkv_kernel", "_linear_residual_kernel", "_ln_fc_gelu_kernel"}


@pytest.mark.slow
def test_decode_layer_kernels_split_k_on_the_gpu(compiled):
    """The 768-wide projections fill the SMs only with K split: their grids have SPLIT_K > 1
    (the third grid dimension), and at T <= 16 every decode-layer launch gives about 128
    programs or more (one per SM of an H100 / H200)."""
    _, rows = compiled
    # GPT-2's layer; the Llama layer's launches at SmolLM2's width (576) give fewer programs
    # (its down projection: 36 column blocks x 2 splits at T = 1), not asserted here.
    layer = [r for r in rows if r["kernel"] in DECODE_LAYER_KERNELS and "llama" not in r["case"]]
    assert layer
    for r in layer:
        programs = r["grid"][0] * r["grid"][1] * (r["grid"][2] if len(r["grid"]) > 2 else 1)
        if r["case"].endswith(("T=1", "T=16")):  # not the GEMV variants ("... [gemv]")
            assert programs >= 128, f"{r['case']}: grid {r['grid']}"
        if r["kernel"] == "_linear_residual_kernel":
            assert r["grid"][2] > 1, f"{r['case']}: grid {r['grid']} does not split K"
    gemv = [r for r in layer if "[gemv]" in r["case"]]
    assert len({r["kernel"] for r in gemv}) == 3 and not any(r["mma"] for r in gemv if "error" not in r), gemv


@pytest.mark.slow
def test_shared_memory_fits_one_block(compiled):
    arch, rows = compiled
    over = [f"{r['case']} ({r['kernel']}): {r['shared']} bytes" for r in rows if r.get("shared", 0) > MAX_SHARED[arch]]
    assert not over, f"sm_{arch}: shared memory over {MAX_SHARED[arch]} bytes per block:\n" + "\n".join(over)


@pytest.mark.slow
def test_no_register_pressure(compiled):
    arch, rows = compiled
    spills = [f"{r['case']} ({r['kernel']}): {r['spill_bytes']} bytes, {r['registers']} registers"
              for r in rows if r.get("spill_bytes", 0) > MAX_SPILL_BYTES]
    assert not spills, f"sm_{arch}: ptxas spills more than {MAX_SPILL_BYTES} bytes:\n" + "\n".join(spills)


@pytest.mark.slow
def test_grid_within_cuda_limits(compiled):
    _, rows = compiled
    for r in rows:
        x, *yz = r["grid"]
        assert 1 <= x < 2**31 and all(1 <= d <= 65535 for d in yz), f"{r['case']}: grid {r['grid']}"


@pytest.mark.slow
def test_fp32_stays_ieee(compiled):
    """fp32 must not use TF32 tensor cores: greedy decoding promises eager fp32's tokens."""
    _, rows = compiled
    fp32 = [r for r in rows if r["fp32"] and "error" not in r]
    assert fp32, "no fp32 launch was compiled"
    for r in fp32:
        if r["input_precision"] is not None:
            assert r["input_precision"] == "ieee", f"{r['case']}: INPUT_PRECISION={r['input_precision']}"
        assert not r["tf32_mma"], f"{r['case']} ({r['kernel']}): TF32 tensor-core instruction in fp32 code"


@pytest.mark.slow
def test_half_precision_uses_tensor_cores(compiled):
    """The fp16/bf16 dots should become MMA instructions (a sanity check of the checks above)."""
    _, rows = compiled
    dots = [r for r in rows if not r["fp32"] and r["kernel"] != "_logits_merge_kernel" and "error" not in r
            and "[gemv]" not in r["case"]]
    assert dots and all(r["mma"] for r in dots), [r["case"] for r in dots if not r["mma"]]


# ------------------------------------------------------------------ GPU configurations, run on the CPU


def test_fused_logits_gpu_blocks_in_the_interpreter(monkeypatch):
    """The interpreter gets 1024-column blocks (it pays per program); run the GPU's blocks
    once: 128 columns, a last block narrower than k (its top-k holds padding), fp32's 32-wide
    D steps, and a merge over more blocks than one step holds."""
    import importlib

    import torch

    from mtpkern.ops import _backend

    if not _backend.triton_interpret():
        pytest.skip("on a GPU the other tests run these blocks")
    fl = importlib.import_module("mtpkern.ops.fused_logits")
    cpu_config = fl._config

    def gpu_config(*args):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        try:
            return cpu_config(*args)
        finally:
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    monkeypatch.setattr(fl, "_config", gpu_config)
    R, V, D, k = 3, 5000, 64, 40  # 40 blocks, the last with 8 columns; 32 blocks per merge step
    cfg = gpu_config(R, V, k, True)
    assert (cfg["BLOCK_V"], cfg["BLOCK_D"]) == (128, 32) and V % 128 < k and cfg["NB"] > cfg["BLOCK_B"]
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g)
    target = torch.tensor([V - 1, 0, -1])
    out = fl.fused_logits(hidden, weight, k, target, backend="triton")
    ref = fl.fused_logits_ref(hidden, weight, k, target)
    assert torch.equal(out.topk_indices, ref.topk_indices) and torch.equal(out.argmax, ref.argmax)
    for name in ("topk_values", "lse", "entropy", "target_logit"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------ limits the host checks for the GPU


def test_tree_attention_rejects_offsets_beyond_int32():
    """The kernel's element offsets are int32; a cache past 2**31 elements is a clear error
    before any launch (meta tensors: no memory is allocated)."""
    import torch

    from mtpkern.ops import _backend
    from mtpkern.ops.tree_attention import pack_tree_mask, tree_attention

    if not _backend.triton_interpret():
        pytest.skip("meta tensors reach the Triton path only under TRITON_INTERPRET=1")
    B, H, S, Dh = 4096, 12, 1024, 64  # 3.2e9 elements per layer
    q = torch.empty(B, H, 1, Dh, device="meta", dtype=torch.float16)
    cache = torch.empty(B, H, S, Dh, device="meta", dtype=torch.float16)
    mask = pack_tree_mask(torch.ones(1, 1, dtype=torch.bool)).to("meta")
    with pytest.raises(ValueError, match=r"k_cache .* 2\*\*31 elements"):
        tree_attention(q, cache, cache, torch.zeros((), dtype=torch.long, device="meta"), mask, backend="triton")


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
