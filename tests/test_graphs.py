"""The engines' real CUDA-graph code, on a GPU or on the CPU under a fake of torch's primitives.

Without a GPU, ``fake_cuda`` gives ``torch.cpu`` the ``torch.cuda`` graph and stream
primitives, with a capture's contract (see its docstring): what a capture runs is recorded and
takes effect only on ``replay()``, host syncs inside a capture fail, and tensors the graph holds
may not be freed or reallocated. Under it, ``CapturedCall``, the ``Decoder``'s whole-step and
forward-only graphs and the graphed ``BatchDecoder`` run end to end, and must decode token for
token as without graphs. Nothing of mtpkern's is replaced. With a GPU the same decoding tests
run on real CUDA graphs (``benchmarks/gpu_check.sh`` runs this file first).
"""

import copy
import functools
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

import fake_cuda
from _tiny import assert_same_greedy_tokens, random_prompts, tiny_gpt2, tiny_medusa, tiny_mtp
from fake_cuda import CaptureError
from mtpkern import Decoder
from mtpkern.costmodel import step_cost_tree, time_step
from mtpkern.batch import BatchDecoder
from mtpkern.calibrate import time_tree_step
from mtpkern.graphs import CapturedCall, graphs_available
from mtpkern.ops import _backend

CPU = torch.device("cpu")
PROMPTS = random_prompts(20, seed=71, min_len=2, max_len=24)
ON_GPU = torch.cuda.is_available()
fake_only = pytest.mark.skipif(ON_GPU, reason="the fake's contract checks; a GPU has the real ones")


@pytest.fixture
def fake_graphs(monkeypatch):
    fake_cuda.install(monkeypatch)


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """Where graphs are captured: the GPU if there is one, else the CPU under the fake."""
    if ON_GPU:
        return torch.device("cuda")
    fake_cuda.install(monkeypatch)
    return CPU


@functools.lru_cache(maxsize=None)
def _model(name: str, device: torch.device):
    model = {"ntp": tiny_gpt2, "medusa": tiny_medusa, "mtp": tiny_mtp}[name]()
    return model if device == CPU else copy.deepcopy(model).to(device)


def _same_tokens(model, prompts, got, want) -> None:
    """Token for token; on a GPU the two may part only at a near-tie (see assert_same_greedy_tokens)."""
    for prompt, a, b in zip(prompts, got, want):
        assert_same_greedy_tokens(model, prompt, a.tokens, b.tokens)
        if a.tokens == b.tokens:
            assert a.accept_lengths == b.accept_lengths


# ----------------------------------------------------------------------------- the seam


@fake_only
def test_graphs_are_refused_on_the_cpu_without_the_fake():
    assert not graphs_available(CPU)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        Decoder(tiny_gpt2(), "ntp", cuda_graph=True)


@fake_only
def test_a_captured_call_replays_with_new_inputs(fake_graphs):
    state = torch.zeros(3)
    calls = []

    def fn(x):
        calls.append(1)
        state.add_(x)  # a write to memory from before the capture
        return x * 2 + state

    graph = CapturedCall(fn, (torch.ones(3),), CPU)
    assert len(calls) == 3  # two warm-up runs, then the capture
    assert state.tolist() == [2.0] * 3  # the warm-ups ran; the capture took no effect
    assert torch.isnan(graph.out).all()  # the capture's output holds garbage until a replay
    out = graph(torch.full((3,), 5.0))
    assert out is graph.out and out.tolist() == [17.0] * 3 and state.tolist() == [7.0] * 3
    assert graph(torch.ones(3)).tolist() == [10.0] * 3 and len(calls) == 3  # replays run no Python
    with pytest.raises(TypeError, match="captured with 1 inputs was called with 2"):
        graph(torch.ones(3), torch.ones(3))


@fake_only
@pytest.mark.parametrize("sync, message", [
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: int(x[0]), "_local_scalar_dense"),
    (lambda x: x * 2 if bool(x.sum() > 0) else x, "reads a tensor's truth value|_local_scalar_dense"),
    (lambda x: x.tolist(), "Tensor.tolist"),
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "torch.tensor"),
    (lambda x: torch.cpu.synchronize(), r"synchronize\(\)"),
    (lambda x: torch.cpu.current_stream().synchronize(), r"Stream.synchronize\(\)"),
])
def test_a_capture_that_syncs_fails(fake_graphs, sync, message):
    """Each of these runs fine eagerly (the warm-up runs it) and fails in the capture."""
    with pytest.raises(CaptureError, match=message):
        CapturedCall(sync, (torch.ones(3),), CPU)


@fake_only
def test_a_replay_after_the_memory_moved_fails(fake_graphs):
    holder = {"t": torch.ones(4)}
    graph = CapturedCall(lambda x: x + holder["t"], (torch.ones(4),), CPU)
    graph(torch.ones(4))
    holder["t"] = torch.zeros(4)  # reallocated: the graph still reads the old, now freed, tensor
    with pytest.raises(CaptureError, match="was freed after the capture"):
        graph(torch.ones(4))
    kept = torch.ones(4)
    graph = CapturedCall(lambda x: x + kept, (torch.ones(4),), CPU)
    kept.resize_(1 << 16)  # grown in place: new memory behind the same tensor
    with pytest.raises(CaptureError, match="was reallocated after the capture"):
        graph(torch.ones(4))


# ----------------------------------------------------------------------------- Decoder


DECODER_CASES = [
    ("ntp", None, {}, True),
    ("medusa", "3,2,1", {}, True),
    ("medusa", None, {}, True),
    ("mtp", None, {}, True),
    ("mtp", "2,2,1", {}, True),
    ("medusa", "dynamic:6", dict(kernels="auto"), ON_GPU or _backend.HAS_CUDA_EXT),  # the extension's buffers: no sync
    ("medusa", "dynamic:6", {}, False),  # the eager tree buffers sync: the forward alone
    ("medusa", "3,2,1", dict(acceptance="typical", temperature=0.7), True),
    ("medusa", "chain:3", dict(acceptance="rejection", temperature=0.8), False),  # the forward alone
    ("ntp", None, dict(temperature=0.9, top_k=20), False),
]


def _graph_of(dec: Decoder, whole: bool):
    return dec._graphs[1].graph if whole else dec.step.forward.graphs[1].graph


@pytest.mark.filterwarnings("ignore:no calibration")
@pytest.mark.parametrize("strategy, tree, kw, whole", DECODER_CASES)
def test_graphed_decoder_decodes_as_without_graphs(device, strategy, tree, kw, whole):
    model = _model(strategy, device)
    kw = dict(kernels="eager") | kw
    graphed = Decoder(model, strategy, tree=tree, cuda_graph=True, **kw)
    plain = Decoder(model, strategy, tree=tree, **kw)
    assert graphed.whole_step_graph == whole
    eos = PROMPTS[0][1]
    for i, prompt in enumerate(PROMPTS[:5]):
        gens = [torch.Generator(device).manual_seed(i) for _ in range(2)] if graphed.sampling else [None, None]
        got = graphed.generate(prompt, max_new_tokens=16, eos_token_id=eos, generator=gens[0])
        want = plain.generate(prompt, max_new_tokens=16, eos_token_id=eos, generator=gens[1])
        if graphed.sampling and ON_GPU:  # the same draws, but a GPU may round a probability differently
            assert len(got.tokens) == len(want.tokens) or eos in got.tokens + want.tokens
        else:
            _same_tokens(model, [prompt], [got], [want])
    if not ON_GPU:
        assert _graph_of(graphed, whole).replays >= 5  # one capture, replayed at every step


@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "2,1"), ("mtp", "2,1")])
def test_graphed_decoder_with_fused_kernels(device, strategy, tree):
    """The fused decoder-layer kernels (Triton's interpreter on the CPU) inside a whole-step capture."""
    model = _model(strategy, device)
    graphed = Decoder(model, strategy, tree=tree, kernels="fused", cuda_graph=True)
    plain = Decoder(model, strategy, tree=tree, kernels="fused")
    assert graphed.whole_step_graph
    prompts = PROMPTS[:2]
    got = [graphed.generate(p, max_new_tokens=6) for p in prompts]
    _same_tokens(model, prompts, got, [plain.generate(p, max_new_tokens=6) for p in prompts])


def test_graphs_are_captured_again_after_a_reset(device):
    """A graph reads the weights at the addresses it was captured with: ``reset_graphs`` (after
    the weights move) captures again, on the next generation."""
    graphed = Decoder(_model("ntp", device), "ntp", kernels="eager", cuda_graph=True)
    before = graphed.generate(PROMPTS[1], max_new_tokens=6).tokens
    first = graphed._graphs[1]
    graphed.generate(PROMPTS[1], max_new_tokens=6)
    assert graphed._graphs[1] is first
    graphed.reset_graphs()
    assert graphed.generate(PROMPTS[1], max_new_tokens=6).tokens == before and graphed._graphs[1] is not first


def test_graphs_follow_the_weights_the_decoder_rebuilds(device):
    """``refresh()`` (after an in-place weight change) rebuilds the decoder's own weight copies
    (the CPU's contiguous ones): the next generation captures again instead of replaying a
    graph that reads the old copies."""
    model = _model("medusa", device)
    graphed = Decoder(model, "medusa", tree="3,2,1", kernels="eager", cuda_graph=True)
    want = Decoder(model, "medusa", tree="3,2,1", kernels="eager").generate(PROMPTS[2], max_new_tokens=10)
    assert graphed.generate(PROMPTS[2], max_new_tokens=10).tokens == want.tokens
    graphed.refresh()
    got = graphed.generate(PROMPTS[2], max_new_tokens=10)
    assert (got.tokens, got.accept_lengths) == (want.tokens, want.accept_lengths)


@pytest.mark.parametrize("strategy, n_nodes", [("ntp", 1), ("medusa", 6)])
def test_timing_graphed_steps(device, strategy, n_nodes):
    """The cost model's timed steps (``Decoder.run_step``) replay the captured step."""
    model = _model(strategy, device)
    tree = None if strategy == "ntp" else step_cost_tree(n_nodes, model.n_heads - 1)
    graphed = Decoder(model, strategy, tree=tree, kernels="eager", cuda_graph=True)
    plain = Decoder(model, strategy, tree=tree, kernels="eager")
    for prefix in (5, 9, 9):
        assert graphed.run_step(prefix) == plain.run_step(prefix)
    assert graphed.time_step(prefix_len=8, iters=2, warmup=1) > 0
    assert 0 < time_step(model, n_nodes, kernels="eager", cuda_graph=True, iters=2) < 60


# ----------------------------------------------------------------------------- BatchDecoder


def _graphed_and_plain(model, strategy: str, tree, max_batch: int, kernels: str = "fused", **kw):
    return (BatchDecoder(model, strategy, tree=tree, max_batch=max_batch, kernels=kernels, cuda_graph=True, **kw),
            BatchDecoder(model, strategy, tree=tree, max_batch=max_batch, kernels=kernels, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "3,2,1"), ("mtp", None)])
def test_graphed_batches_decode_as_without_graphs(device, strategy, tree):
    """B = 4 and 1 through one decoder (a capture per batch size, the second batch of 4
    replaying the first's), rows stopping at an EOS mid-batch, fused kernels (Triton's
    interpreter on the CPU) as on a GPU."""
    model = _model(strategy, device)
    graphed, plain = _graphed_and_plain(model, strategy, tree, 4)
    eos = plain.generate(PROMPTS[16:20], max_new_tokens=5)[1].tokens[2]  # a token some rows emit mid-way
    stopped = []
    for prompts in (PROMPTS[16:20], PROMPTS[:1], PROMPTS[4:8]):
        got = graphed.generate(prompts, max_new_tokens=5, eos_token_id=eos)
        _same_tokens(model, prompts, got, plain.generate(prompts, max_new_tokens=5, eos_token_id=eos))
        stopped += [len(r.tokens) < 5 for r in got]
    assert any(stopped) and not all(stopped)  # rows stopped at the EOS while others went on
    assert sorted(graphed._graphs) == [1, 4]
    if not ON_GPU:
        assert graphed._graphs[4].graph.replays >= 2 * 2  # both batches of 4 replayed the one capture
    graphed.reset_graphs()
    assert not graphed._graphs


@pytest.mark.parametrize("strategy, tree", [("medusa", "3,2,1"), ("mtp", None)])
def test_graphed_eager_batches_decode_as_without_graphs(device, strategy, tree):
    """Eager attention in a graphed batch: each row's mask is built on the device from its
    prefix length (``eager_tree_mask``), so the whole step is captured as with fused kernels."""
    model = _model(strategy, device)
    graphed, plain = _graphed_and_plain(model, strategy, tree, 3, kernels="eager")
    assert graphed.whole_step_graph
    for prompts in (PROMPTS[8:11], PROMPTS[2:5]):
        got = graphed.generate(prompts, max_new_tokens=6)
        _same_tokens(model, prompts, got, plain.generate(prompts, max_new_tokens=6))
    assert sorted(graphed._graphs) == [3]
    if not ON_GPU:
        assert graphed._graphs[3].graph.replays >= 2 * 2  # both batches replayed the one capture


@pytest.mark.slow
@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "2,1")])
def test_graphed_batch_of_16(device, strategy, tree):
    model = _model(strategy, device)
    graphed, plain = _graphed_and_plain(model, strategy, tree, 16)
    got = graphed.generate(PROMPTS[:16], max_new_tokens=3)
    _same_tokens(model, PROMPTS[:16], got, plain.generate(PROMPTS[:16], max_new_tokens=3))
    assert sorted(graphed._graphs) == [16]


@pytest.mark.slow
def test_graphed_sampled_batches_replay_the_forward(device):
    """Sampling steps draw on the host side of the step: only their forward pass is captured."""
    model = _model("medusa", device)
    graphed, plain = _graphed_and_plain(model, "medusa", "chain:2", 4, acceptance="rejection", temperature=0.8)
    for prompts in (PROMPTS[:4], PROMPTS[5:6]):
        gens = [[torch.Generator(device).manual_seed(9 + b) for b in range(len(prompts))] for _ in range(2)]
        got = graphed.generate(prompts, max_new_tokens=5, generator=gens[0])
        want = plain.generate(prompts, max_new_tokens=5, generator=gens[1])
        if not ON_GPU:
            assert [r.tokens for r in got] == [r.tokens for r in want]
    assert sorted(graphed.step.forward.graphs) == [1, 4] and not graphed._graphs


# ----------------------------------------------------------------------------- benchmarks


def _benchmark(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@fake_only
def test_fused_step_benchmark_times_graphed_steps(fake_graphs):
    """``benchmarks/bench_fused_step.py``'s step cases (graphed forward passes timed with the
    device's events), on the CPU under the fake: every case measures, none errors."""
    bench = _benchmark("bench_fused_step")
    report: dict = {"step": [], "speedup": {}}
    model = tiny_gpt2()
    with torch.inference_mode():
        bench.step_cases(model, ("eager+graph", "fused+graph"), (1, 4), 6, 2, report, None)
    assert [c["case"] for c in report["step"]] == ["eager+graph", "fused+graph"] * 2
    assert all("error" not in c and c["step_us"] > 0 for c in report["step"]), report["step"]
    assert set(report["speedup"]) == {"T=1", "T=4"}


@fake_only
def test_bench_times_its_graphed_cases(fake_graphs):
    """``mtpkern bench``'s graphed engine cases (CUDA only, until now untried off a GPU): each
    decodes what its ungraphed twin decodes, and is timed."""
    bench_mod = importlib.import_module("mtpkern.bench")
    models = {"ntp": tiny_gpt2(), "medusa": tiny_medusa()}
    cases = {name: (model, kw) for name, model, kw in bench_mod.engine_cases(models, CPU)}
    assert {"ntp/cuda_graph", "medusa/fused+cuda_graph"} <= set(cases)
    prompts = [torch.tensor([p]) for p in PROMPTS[:2]]
    for graphed, plain in (("ntp/cuda_graph", "ntp/eager"), ("medusa/fused+cuda_graph", "medusa/fused")):
        runs = {name: bench_mod.decoder_run(cases[name][0], max_new_tokens=5, **cases[name][1])
                for name in (graphed, plain)}
        assert runs[graphed](prompts[0]).tokens == runs[plain](prompts[0]).tokens
        assert bench_mod.time_case(runs[graphed], prompts, CPU)["tokens_per_second"] > 0


@fake_only
def test_calibration_times_graphed_steps(fake_graphs):
    """The cost model's timer with ``cuda_graph=True`` (what ``mtpkern calibrate`` runs on a GPU)."""
    model = tiny_medusa()
    for tree in (None, step_cost_tree(5, model.n_heads - 1)):
        assert 0 < time_tree_step(model, tree, prefix_len=8, kernels="eager", cuda_graph=True, min_time=0.01) < 60
