"""verify_rejection (mtpkern/ops/verify_sampled.py): recursive rejection sampling on trees.

Exactness: a tiny explicit "model" (a fixed table of target distributions per context over a
small vocabulary) decodes with sampled tree drafts, and the joint distribution of the first two
emitted tokens is compared by chi-square (tests/test_rejection_sampling.py's helpers) with the
model's own, computed exactly; the same samples are shown far from a wrong answer. Once more
through the C++ kernel.

Kernels: the C++ CPU kernel (and, on a GPU, the CUDA kernel) give the eager reference's results
bit for bit for the same uniforms, over awkward shapes and bad entries; every backend rejects
bad inputs with the same one-line error.
"""

import ctypes
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mtpkern.ops import _backend
from mtpkern.ops.verify_sampled import RejectionResult, verify_rejection, verify_rejection_ref
from mtpkern.sampling import sample_tree_drafts, sampling_probs
from mtpkern.tree import Tree
from tests._errors import assert_one_error, errors_of
from tests.test_rejection_sampling import assert_differs, assert_matches

ROOT = Path(__file__).resolve().parents[1]
V = 5


def table(ctx, temperature, top_k=0, top_p=1.0):
    """p(. | ctx) of the tiny model: fixed logits per context, then the sampling transforms."""
    g = torch.Generator().manual_seed(hash(tuple(ctx)) % 2**31)
    logits = torch.randn(V, generator=g) * 1.5
    return sampling_probs(logits[None], temperature, top_k, top_p)[0]


def exact_pair(ctx, **kw):
    p1 = table(ctx, **kw)
    return torch.stack([p1[a] * table(ctx + [a], **kw) for a in range(V)])


def step(tree, ctxs, heads, g, bias=0.0, backend=None, **kw):
    """One decoding step for each context: sampled drafts, then verify_rejection; the emitted tokens."""
    B, T = len(ctxs), len(tree)
    par = tree.parents
    depth = tree.tensors().depth.tolist()
    q = torch.stack([heads(c) for c in ctxs])  # [B, D, V]
    toks = sample_tree_drafts(q, par, depth, g)
    p = torch.empty(B, T, V)
    for b, c in enumerate(ctxs):
        for t in range(T):
            path = tree.tensors().retrieve[t].tolist()[1:depth[t] + 1]
            p[b, t] = table(c + [int(toks[b, n]) for n in path], **kw)
    if bias:  # an injected bias: 5 points of probability moved onto token 0 at every node
        p = (1 - bias) * p
        p[..., 0] += bias
    row = (tree.tensors().depth - 1).clamp_min(0)
    res = verify_rejection(toks, p, q, row, tree.tensors().parents, tree.max_depth, generator=g, backend=backend)
    return [r[: int(n)] for r, n in zip(res.tokens.tolist(), res.n_emitted)]


def sample_pairs(tree, heads, n, seed, bias=0.0, backend=None, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    outs = step(tree, [[1, 2]] * n, heads, g, bias, backend, **kw)
    short = [i for i, o in enumerate(outs) if len(o) == 1]
    more = step(tree, [[1, 2, outs[i][0]] for i in short], heads, g, bias, backend, **kw) if short else []
    for i, extra in zip(short, more):
        outs[i] = outs[i] + extra
    for o in outs:
        counts[o[0], o[1]] += 1
    return counts


N = 12000
CASES = [  # (sampling transforms, heads): good heads are close to p, poor ones are uniform-ish
    (dict(temperature=0.7, top_k=4, top_p=1.0), "good"),
    (dict(temperature=1.0, top_k=0, top_p=0.9), "poor"),
]


def heads_for(kind, kw):
    if kind == "good":
        return lambda c: torch.stack([table(c, **kw), table(c + [0], **kw)])
    return lambda c: sampling_probs(torch.tensor([[0.3, 0.0, -0.2, 0.1, 0.4], [0.0, 0.5, 0.0, -0.5, 0.2]]), 1.0)


needs_ext = pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _backend.HAS_CUDA_EXT),
                               reason="needs a CUDA GPU and the built extension")


# backend "cuda" on CPU tensors is the extension's C++ CPU kernel; the C++ case runs one table.
@pytest.mark.parametrize("kw,kind,backend", [(*CASES[0], "eager"), (*CASES[1], "eager"),
                                             pytest.param(*CASES[1], "cuda", marks=[needs_ext, pytest.mark.slow])])
def test_tree_rejection_sampling_is_exact(kw, kind, backend):
    tree = Tree.from_widths([3, 2])  # width 3, depth 2
    counts = sample_pairs(tree, heads_for(kind, kw), N, 0, backend=backend, **kw)
    exact = exact_pair([1, 2], **kw)
    assert_matches(counts, exact, f"(t1, t2), {kind} heads, {backend}")
    # Power: the same number of samples from a rule that moves 5 points of probability
    # onto one token fails.
    biased = sample_pairs(tree, heads_for(kind, kw), N, 1, bias=0.05, backend=backend, **kw)
    assert_differs(biased, exact, f"(t1, t2), {kind} heads, {backend}, 5 points moved onto token 0")


def test_backends_and_edges():
    tree = Tree.from_widths([3])
    p = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    q = torch.tensor([[0.0, 0.0, 1.0]])
    toks = torch.tensor([0, 2, 1, 0])
    res = verify_rejection_ref(toks, p, q, torch.zeros(4, dtype=torch.int64), tree.tensors().parents,
                               torch.rand(4), 1)
    # the only proposed draft (token 2) has no target mass: rejected; 1 and 0 were never proposed
    assert int(res.accept_len) == 0 and int(res.tokens[0]) in (0, 1) and int(res.n_emitted) == 1


def _inputs(B, T=4, V=3):
    tree = Tree.from_widths([T - 1]) if T > 1 else Tree([])
    lead = (B,) if B else ()
    g = torch.Generator().manual_seed(B + T + V)
    p = torch.softmax(torch.randn(lead + (T, V), generator=g), -1)
    q = torch.softmax(torch.randn(lead + (1, V), generator=g), -1)
    toks = torch.randint(0, V, lead + (T,), generator=g)
    u = torch.rand(lead + (T,), generator=g)
    return toks, p, q, torch.zeros(T, dtype=torch.int64), tree.tensors().parents, u, tree.max_depth


@pytest.mark.parametrize("B,T,V", [(0, 1, 1), (0, 4, 3), (5, 4, 97), (1, 1, 3), (5, 6, 1)])
def test_op_batch_and_single_rows_agree(B, T, V):
    args = _inputs(B, T, V)
    res = verify_rejection_ref(*args)
    op = torch.ops.mtpkern.verify_rejection(*args)
    for a, b in zip(res, op):
        assert torch.equal(a, b)
    if B:
        for b in range(B):
            row = verify_rejection_ref(args[0][b], args[1][b], args[2][b], *args[3:5], args[5][b], args[6])
            assert [int(row.accept_len), row.tokens.tolist()] == [int(res.accept_len[b]), res.tokens[b].tolist()]
    assert torch.equal(res.n_emitted, res.accept_len + 1)
    assert ((res.tokens >= 0) & (res.tokens < V)).sum(-1).eq(res.n_emitted).all()


BACKENDS = ["eager"] + (["cuda"] if _backend.HAS_CUDA_EXT else [])


def _calls(args):
    """Every way of calling the op: each backend of the public function, and the registered op."""
    toks, p, q, row, par, u, md = args
    calls = {b: (lambda b=b: verify_rejection(toks, p, q, row, par, md, uniforms=u, backend=b)) for b in BACKENDS}
    calls["op"] = lambda: torch.ops.mtpkern.verify_rejection(*args)
    return calls


_T, _V = 4, 3


@pytest.mark.parametrize("i,bad,kind,match", [
    (0, torch.zeros(_T, dtype=torch.int32), TypeError, "tree_tokens must be int64, got int32"),
    (0, torch.zeros(1, 1, _T, dtype=torch.int64), ValueError,
     "tree_tokens must be 1-D [T] or 2-D [B, T], got shape [1, 1, 4]"),
    (0, torch.zeros(0, dtype=torch.int64), ValueError,
     "the tree has no nodes or the batch is empty (tree_tokens [0])"),
    (0, torch.zeros(1, _T, dtype=torch.int64), ValueError,
     "target_probs must have shape [1, N, V] (tree_tokens has shape [1, 4]), got [4, 3]"),
    (1, torch.ones(_T, _V, dtype=torch.float64), TypeError,
     "target_probs must be float32, float16 or bfloat16, got float64"),
    (1, torch.ones(_V, _T).t(), ValueError, "target_probs must be contiguous"),
    (1, torch.ones(3, _V), ValueError, "target_probs needs 4 rows of V >= 1, got shape [3, 3]"),
    (1, torch.ones(_T, _V, dtype=torch.float16), TypeError, "draft_probs is float32 but target_probs is float16"),
    (2, torch.ones(1, 2), ValueError, "draft_probs must have rows of V = 3, got [1, 2]"),
    (2, torch.ones(0, _V), ValueError, "draft_probs must have rows of V = 3, got [0, 3]"),
    (2, torch.ones(_V), ValueError, "draft_probs must have shape [N, V] (tree_tokens has shape [4]), got [3]"),
    (3, torch.zeros(_T, dtype=torch.int32), TypeError, "draft_row must be int64, got int32"),
    (4, torch.zeros(3, dtype=torch.int64), ValueError, "parents has 3 entries but the tree has 4 nodes"),
    (5, torch.rand(3), ValueError, "uniforms has shape [3] but tree_tokens has [4]"),
    (5, torch.rand(_T, dtype=torch.float64), TypeError, "uniforms must be float32, got float64"),
    (5, torch.rand(_T).to("meta"), ValueError, "uniforms is on meta but the other inputs are on cpu"),
    (6, -1, ValueError, "max_depth must be an int in [0, 4096), got -1"),
    (6, 4096, ValueError, "max_depth must be an int in [0, 4096), got 4096"),
])
def test_input_checks_are_one_line_errors_in_every_backend(i, bad, kind, match):
    args = list(_inputs(0, _T, _V))
    args[i] = bad
    assert_one_error(errors_of(_calls(tuple(args))), kind, match, "verify_rejection")


def test_vocabulary_limit_is_one_error_in_every_backend():
    V = 2**23  # the int64 sums of weights would overflow from here on
    args = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, V, dtype=torch.float16),
            torch.zeros(1, V, dtype=torch.float16), torch.zeros(1, dtype=torch.int64),
            torch.tensor([-1]), torch.rand(1), 0)
    assert_one_error(errors_of(_calls(args)), ValueError, "a vocabulary of 8388608 is too large (at most 8388607)",
                     "verify_rejection")


# ---------------------------------------------------------------- kernels against the reference

def _kernel_case(V, widths, B, dtype, seed):
    """Sampled drafts on Tree.from_widths(widths), p and q of every closeness, and per seed one
    kind of awkward entry: 0 none; 1 tokens outside [0, V) and a draft_row outside [0, Q); 2 a
    drafted token with no q mass, and a repeated sibling; 3 a NaN target row and a q row holding
    a value above 1 (row 0 of a batch only)."""
    tree = Tree.from_widths(widths)
    T, D = len(tree), tree.max_depth
    lead = (B,) if B else ()
    g = torch.Generator().manual_seed(1000 * seed + 10 * V + B)
    z = torch.randn(lead + (1, V), generator=g) * 2
    q = torch.softmax(z + torch.randn(lead + (D, V), generator=g) * (seed % 3), -1)
    p = torch.softmax(z + torch.randn(lead + (T, V), generator=g) * (seed % 2 + 0.5), -1)
    depth = tree.tensors().depth
    toks = sample_tree_drafts(q, tree.parents, depth.tolist(), g)
    row = (depth - 1).clamp_min(0)
    t, r = toks.view(-1, T), row.clone()
    if seed % 4 == 1:
        t[:, 1] = V
        t[:, -1] = -1
        r[-1] = D
    elif seed % 4 == 2:
        q.view(-1, D, V)[:, 0, t[:, 1].clamp(0, V - 1)] = 0.0
        if T > 2 and tree.parents[2] == 0:
            t[:, 2] = t[:, 1]
    elif seed % 4 == 3:
        p.view(-1, T, V)[0, min(1, T - 1), 0] = float("nan")
        q.view(-1, D, V)[0, D - 1, 0] = 1.5
    u = torch.rand(lead + (T,), generator=g)
    return toks, p.to(dtype), q.to(dtype), row, tree.tensors().parents, u, D


def _assert_same(ref, got, where):
    for name, a, b in zip(ref._fields, ref, got):
        assert torch.equal(a.cpu(), b.cpu()), f"{where}: {name} differs: reference {a.tolist()}, kernel {b.tolist()}"


WIDTHS = [[1], [4], [2, 3], [3, 1, 4]]  # widths 1..4, depths 1..3


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [0, 1, 5])  # 0: a 1-D tree
@pytest.mark.parametrize("V", [1, 3, 97])
def test_cpp_kernel_equals_reference(V, B, dtype):
    """The C++ CPU kernel (backend "cuda" on CPU tensors) gives the reference's results bit for
    bit, for every max_depth up to the tree's, with clean and awkward entries."""
    for widths, seed in itertools.product(WIDTHS, range(4)):
        toks, p, q, row, par, u, D = _kernel_case(V, widths, B, dtype, seed)
        for max_depth in range(D + 1):
            ref = verify_rejection_ref(toks, p, q, row, par, u, max_depth)
            got = verify_rejection(toks, p, q, row, par, max_depth, uniforms=u, backend="cuda")
            _assert_same(ref, got, f"V={V} widths={widths} B={B} {dtype} seed={seed} max_depth={max_depth}")


@needs_ext
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (50, 1.0), (0, 0.9)])
def test_cpp_kernel_equals_reference_at_gpt2_vocabulary(top_k, top_p):
    """V = 50257 with dense and top-k / top-p (sparse) distributions: the integer sums stay exact
    and the residual's shortcuts outside the support change no bit."""
    V, tree = 50257, Tree.from_widths([4, 2])
    T, D = len(tree), tree.max_depth
    g = torch.Generator().manual_seed(top_k)
    z = torch.randn(3, 1, V, generator=g) * 3
    q = sampling_probs((z + 2 * torch.randn(3, D, V, generator=g)).view(-1, V), 0.8, top_k, top_p).view(3, D, V)
    p = sampling_probs((z + 2 * torch.randn(3, T, V, generator=g)).view(-1, V), 0.8, top_k, top_p).view(3, T, V)
    depth = tree.tensors().depth
    args = ((depth - 1).clamp_min(0), tree.tensors().parents)
    paths = set()
    for seed in range(4):
        toks, u = sample_tree_drafts(q, tree.parents, depth.tolist(), g), torch.rand(3, T, generator=g)
        ref = verify_rejection_ref(toks, p, q, *args, u, D)
        _assert_same(ref, verify_rejection(toks, p, q, *args, D, uniforms=u, backend="cuda"),
                     f"top_k={top_k} top_p={top_p} seed {seed}")
        paths |= {tuple(r) for r in ref.path.tolist()}
    # some rows reject all four children of the root (four residual updates, then the draw), some accept
    assert (0, -1, -1) in paths and any(r[1] != -1 for r in paths), paths


def test_kernel_cases_reach_every_outcome():
    """The cases above are not vacuous: they accept none, some and all of max_depth drafts, and
    emit -1 (a NaN target row) as well as real tokens."""
    seen = set()
    for V, widths, seed in itertools.product([3, 97], WIDTHS, range(4)):
        toks, p, q, row, par, u, D = _kernel_case(V, widths, 5, torch.float32, seed)
        res = verify_rejection_ref(toks, p, q, row, par, u, D)
        for n, last in zip(res.accept_len.tolist(), res.tokens.gather(1, res.accept_len[:, None])[:, 0].tolist()):
            seen.add("none" if n == 0 else "all" if n == D else "some")
            seen.add("-1" if last == -1 else "token")
    assert seen == {"none", "some", "all", "-1", "token"}, seen


@needs_ext
def test_generator_reproduces_and_backends_agree():
    """The same generator state gives the same tokens, in the C++ kernel and the reference alike;
    another state gives others."""
    toks, p, q, row, par, _, D = _kernel_case(97, [3, 2], 5, torch.float32, 0)
    runs = [verify_rejection(toks, p, q, row, par, D, generator=torch.Generator().manual_seed(s), backend=b)
            for s, b in ((7, "cuda"), (7, "eager"), (8, "cuda"))]
    _assert_same(runs[1], runs[0], "seed 7")
    assert not torch.equal(runs[0].tokens, runs[2].tokens)


# The CUDA kernel on a CPU: one block at a time, its 512 threads as std::threads, __syncthreads as
# a std::barrier, a warp shuffle through a block-wide array (the kernel calls every collective
# from uniform code, so block-wide barriers are equivalent). Races the barriers do not order
# would show as wrong or varying results. Only the launcher (CUDA syntax) is cut from the source.
EMULATOR = r"""
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>
struct EmuDim { unsigned x = 0, y = 1, z = 1; };
static thread_local EmuDim threadIdx;
static EmuDim blockIdx, blockDim;
static std::barrier<>* emu_barrier;
static std::atomic<int> emu_or{0};
static int64_t emu_lanes[1024];
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  __syncthreads();
  if (pred) emu_or.fetch_or(1);
  __syncthreads();
  const int r = emu_or.load();
  __syncthreads();
  if (threadIdx.x == 0) emu_or.store(0);
  __syncthreads();
  return r;
}
template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  emu_lanes[threadIdx.x] = static_cast<int64_t>(v);
  __syncthreads();
  const T r = threadIdx.x % 32 + offset < 32 ? static_cast<T>(emu_lanes[threadIdx.x + offset]) : v;
  __syncthreads();
  return r;
}
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)
#include "kernel.inc"
extern "C" void emulate(const mtpkern::RejectionArgs* a, int64_t B, int64_t* accept_len, int64_t* last_node,
                        int64_t* path, int64_t* tokens, int64_t* n_emitted, int64_t* scratch) {
  blockDim.x = mtpkern::kRejectionThreads;
  for (int64_t b = 0; b < B; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    std::barrier<> bar(blockDim.x);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < blockDim.x; ++t)
      threads.emplace_back([=] {
        threadIdx.x = t;
        mtpkern::verify_rejection_kernel(*a, accept_len, last_node, path, tokens, n_emitted, scratch);
      });
    for (auto& th : threads) th.join();
  }
}
"""


class _Args(ctypes.Structure):  # mtpkern::RejectionArgs (csrc/kernels.h)
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("tree_tokens", "target_probs", "draft_probs", "draft_row", "parents", "uniforms")] + \
               [(name, ctypes.c_int64) for name in ("T", "Q", "V", "max_depth")] + [("prob_type", ctypes.c_int)]


@pytest.fixture(scope="module")
def emulated_cuda_kernel(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("emulated")
    (out / "probe.cpp").write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(out / "probe.cpp"), "-o", str(out / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} has no C++20 <barrier>")
    src = (ROOT / "csrc" / "cuda" / "verify_rejection.cu").read_text()
    src = src.replace('#include "../kernels.h"', '#include "kernels.h"')
    (out / "kernel.inc").write_text(src[: src.index("cudaError_t launch_verify_rejection(")] + "}  // namespace mtpkern\n")
    (out / "emulate.cpp").write_text(EMULATOR)
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-DMTPKERN_CPU_ONLY",
                            "-I", str(ROOT / "csrc"), "-I", str(out), str(out / "emulate.cpp"), "-o", str(out / "emulate.so")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    lib = ctypes.CDLL(str(out / "emulate.so"))

    def run(toks, p, q, row, par, u, max_depth):
        B, T, V = (1 if toks.dim() == 1 else toks.shape[0]), toks.shape[-1], p.shape[-1]
        dtype = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[p.dtype]
        a = _Args(*(t.data_ptr() for t in (toks, p, q, row, par, u)), T, q.shape[-2], V, max_depth, dtype)
        lead = (B,) if toks.dim() == 2 else ()
        outs = [torch.full(lead + shape, -7, dtype=torch.int64) for shape in ((), (), (max_depth + 1,),
                                                                             (max_depth + 1,), ())]
        scratch = torch.empty(2 * B * V, dtype=torch.int64)
        lib.emulate(ctypes.byref(a), ctypes.c_int64(B), *(ctypes.c_void_p(t.data_ptr()) for t in outs + [scratch]))
        return RejectionResult(*outs)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("V", [1, 97, 1500])  # 1500: several entries per thread, the draw across segments
def test_emulated_cuda_kernel_equals_reference(emulated_cuda_kernel, V):
    """The CUDA kernel's source, its block emulated on the CPU, gives the reference's results bit
    for bit (clean and awkward cases, one tree and a batch of two, fp32 and fp16)."""
    for (B, dtype), widths, seed in itertools.product([(0, torch.float32), (2, torch.float16)], WIDTHS[1:], range(4)):
        args = _kernel_case(V, widths, B, dtype, seed)
        ref = verify_rejection_ref(*args)
        _assert_same(ref, emulated_cuda_kernel(*args), f"V={V} widths={widths} B={B} {dtype} seed={seed}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_equals_reference(dtype):
    """On a GPU: the CUDA kernel's results equal the reference's bit for bit (the same cases as
    the C++ kernel's, and a GPT-2-sized vocabulary)."""
    for V, B, widths, seed in itertools.product([1, 3, 97, 50257], [0, 5], WIDTHS, range(4)):
        args = _kernel_case(V, widths, B, dtype, seed)
        for max_depth in range(args[-1] + 1):
            ref = verify_rejection_ref(*args[:-1], max_depth)
            got = torch.ops.mtpkern.verify_rejection(*(a.cuda() for a in args[:-1]), max_depth)
            _assert_same(ref, got, f"V={V} widths={widths} B={B} {dtype} seed={seed} max_depth={max_depth}")


@needs_gpu
def test_cuda_generator_no_sync_and_graph():
    """On a GPU: the uniforms come from a CUDA generator, nothing syncs with the host, the same
    seed reproduces, and the op replays from a CUDA graph."""
    toks, p, q, row, par, u, D = (a.cuda() if torch.is_tensor(a) else a
                                  for a in _kernel_case(97, [4, 2], 5, torch.float32, 0))

    gens = [torch.Generator(device="cuda").manual_seed(s) for s in (3, 3, 4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b, c = (verify_rejection(toks, p, q, row, par, D, generator=g) for g in gens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same(a, b, "seed 3 twice")
    assert not torch.equal(a.tokens, c.tokens)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = torch.ops.mtpkern.verify_rejection(toks, p, q, row, par, u, D)
    u.copy_(torch.rand_like(u))
    graph.replay()
    _assert_same(verify_rejection_ref(toks, p, q, row, par, u, D), out, "graph replay")
