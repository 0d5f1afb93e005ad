"""mtpkern.cpu_matmul: the CPU decode path's products in the layout measured fastest. Each layout
against an fp32 reference over awkward shapes, dtypes and addends; ``MTPKERN_CPU_MATMUL`` pinning
a layout (and refusing a bad value); the engines decoding losslessly in either layout, with the
copies kept where the layout keeps them and rebuilt after an in-place update."""

import pytest
import torch

from mtpkern import Decoder, MedusaModel
from mtpkern.config import LlamaConfig
from mtpkern.cpu_matmul import ENV, LAYOUTS, Matmul, choose, share_layout
from mtpkern.models import Llama

from _tiny import random_prompts

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own ``$MTPKERN_CACHE``: a layout timed by one test is not read by another."""
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["auto", *LAYOUTS])
def layout(request, monkeypatch):
    monkeypatch.setenv(ENV, request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, out, inner", [(1, 1, 1), (2, 7, 3), (3, 130, 17), (5, 966, 128), (64, 33, 200)])
@pytest.mark.parametrize("addend", [None, "bias", "residual"])
def test_every_layout_is_the_product(layout, dtype, rows, out, inner, addend):
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w, x = torch.randn(out, inner, generator=g), torch.randn(rows, inner, generator=g)
    add = {None: None, "bias": torch.randn(out, generator=g), "residual": torch.randn(rows, out, generator=g)}[addend]
    want = x @ w.T + (0 if add is None else add)
    cast = (lambda t: None if t is None else t.to(dtype))
    got = Matmul(cast(w))(cast(x), cast(add))
    assert got.shape == (rows, out) and got.dtype == dtype
    scale = float(want.abs().max()) + 1
    assert float((got.float() - want).abs().max()) <= TOL[dtype] * scale * inner ** 0.5


def test_a_pinned_layout_decides_where_the_copy_lives(monkeypatch):
    w, x = torch.randn(40, 24), torch.randn(3, 24)
    monkeypatch.setenv(ENV, "flip")
    m = Matmul(w)
    assert choose([w], 3) == "flip" and m.weight(3) is m.w and m.w.data_ptr() == w.data_ptr()
    m(x)
    assert m._copy is None  # flip multiplies the weight as stored
    monkeypatch.setenv(ENV, "copy")
    assert choose([w], 3) == "copy" and m.layout(3) == "flip"  # a Matmul keeps the layout it chose
    m = Matmul(w)
    kept = m.weight(3)
    assert kept.shape == w.shape and not kept.is_contiguous() and kept.t().is_contiguous()
    assert kept.data_ptr() != w.data_ptr() and torch.equal(kept, w)
    assert m._copy is not None and m.weight(5).data_ptr() == kept.data_ptr()  # made once, kept


def test_auto_times_a_kind_once_per_row_count_and_keeps_its_choice(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match=r"^share_layout: the matrices have different shapes \[\(4, 4\), \(5, 4\)\]$"):
        share_layout([Matmul(torch.randn(4, 4)), Matmul(torch.randn(5, 4))])
    group = [Matmul(torch.randn(77, 19)) for _ in range(3)]
    share_layout(group)
    assert all(m.group is group for m in group)
    first = group[0].layout(6)
    assert first in LAYOUTS and choose([m.w for m in group], 6) == first
    calls = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or torch.zeros(1))  # a new timing would call it
    assert [m.layout(6) for m in group] == [first] * 3 and choose([m.w for m in group], 6) == first and not calls


def test_the_decode_weights_share_a_layout_per_kind(medusa_model):
    weights = medusa_model.decode_weights()
    for kind in ("qkv", "o", "fc", "proj"):
        group = getattr(weights[0], kind).group
        assert len(group) == len(weights) > 1 and all(getattr(w, kind).group is group for w in weights)


@pytest.mark.parametrize("value", ["fast", "view", "copy,flip"])
def test_a_bad_setting_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=rf"^{ENV}='{value}' is not one of auto, copy, flip$"):
        Matmul(torch.randn(4, 4))(torch.randn(2, 4))


def test_off_the_cpu_a_matmul_is_the_plain_product(monkeypatch):
    monkeypatch.setenv(ENV, "copy")
    w = torch.randn(8, 5, device="meta")
    m = Matmul(w)
    assert m.layout(4) == "plain" and m.weight(4) is m.w
    assert m(torch.randn(4, 5, device="meta")).shape == (4, 8) and m._copy is None


def _llama_medusa():
    torch.manual_seed(3)
    base = Llama(LlamaConfig.tiny(vocab_size=256))
    model = MedusaModel.from_base(base, n_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # a peaked distribution: greedy far from ties
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_is_lossless_in_either_layout(layout, family, medusa_model):
    model = medusa_model if family == "gpt2" else _llama_medusa()
    prompts = random_prompts(3, seed=5, max_len=12)
    ntp = Decoder(model, "ntp")
    spec = Decoder(model, "medusa", tree="3,2,1")
    for p in prompts:
        want = ntp.generate(p, max_new_tokens=24).tokens
        assert spec.generate(p, max_new_tokens=24).tokens == want
    copies = [m._copy is not None for w in spec.decode_weights for m in w if isinstance(m, Matmul)]
    if layout == "copy":
        assert all(copies) and spec.logits.unembed is not None and spec.logits.unembed._copy is not None
    elif layout == "flip":
        assert not any(copies)


def test_an_in_place_update_rebuilds_the_copies(monkeypatch, medusa_model):
    import copy

    monkeypatch.setenv(ENV, "copy")
    model = copy.deepcopy(medusa_model)
    dec = Decoder(model, "medusa", tree="2,1", prefix_cache=False)
    p = random_prompts(1, seed=8)[0]
    dec.generate(p, max_new_tokens=16)
    kept = dec.decode_weights[0].fc
    with torch.no_grad():
        model.base.h[0].mlp.c_fc.weight.mul_(-1.5)  # same storage, new version
    out = dec.generate(p, max_new_tokens=16).tokens
    assert dec.decode_weights[0].fc is not kept
    assert out == Decoder(model, "ntp", prefix_cache=False).generate(p, max_new_tokens=16).tokens


def test_step_costs_are_measured_per_setting(monkeypatch, gpt2_model):
    from mtpkern.costmodel import cost_key

    keys = {}
    for value in ("auto", *LAYOUTS):
        monkeypatch.setenv(ENV, value)
        keys[value] = cost_key(gpt2_model, kernels="auto", cuda_graph=False)
    assert [k["cpu_matmul"] for k in keys.values()] == ["auto", *LAYOUTS]
    assert len({str(sorted(k.items())) for k in keys.values()}) == 3


@pytest.mark.parametrize("gain, layout", [(0.0, "flip"), (float("inf"), "copy")])
def test_auto_keeps_the_copy_unless_flip_gains_enough(monkeypatch, gain, layout):
    import mtpkern.cpu_matmul as cpu_matmul

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_matmul, "FLIP_GAIN", gain)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    w = torch.randn(31, 9)
    assert choose([w], 3) == layout


def test_a_prefill_is_a_plain_product_and_decode_rows_are_timed_in_powers_of_two(monkeypatch):
    import mtpkern.cpu_matmul as cpu_matmul

    monkeypatch.setenv(ENV, "copy")
    w, x = torch.randn(24, 16), torch.randn(cpu_matmul.TIMED_ROWS + 1, 16)
    m = Matmul(w)
    assert m.layout(x.shape[0]) == "plain" and torch.allclose(m(x), x @ w.T, atol=1e-5) and m._copy is None
    assert m.layout(cpu_matmul.TIMED_ROWS) == "copy"
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    choose([w], 5)
    assert list(cpu_matmul._chosen) == [((24, 16), 1, 8, torch.float32, torch.get_num_threads())]
    choose([w], 7)
    assert len(cpu_matmul._chosen) == 1  # 5 to 8 rows share one timing


def test_a_timed_layout_is_kept_on_disk_and_read_by_the_next_process(own_cache, monkeypatch):
    """``auto`` writes what it timed to ``$MTPKERN_CACHE/cpu_matmul.json``, keyed by what it was
    measured on; a process without it in memory reads the file instead of timing (and follows
    the file); another row count or thread count is timed and added beside it."""
    import json

    import mtpkern.cpu_matmul as cpu_matmul

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    w = torch.randn(29, 11)
    first = choose([w, w.clone()], 3)
    table = json.loads((own_cache / "cpu_matmul.json").read_text())
    assert table.pop("schema") == "mtpkern.cpu_matmul/1" and list(table.values()) == [first]
    key = next(iter(table))
    name = json.loads(key)
    assert name["shape"] == [29, 11] and name["matrices"] == 2 and name["rows"] == 4 and name["dtype"] == "float32"
    assert name["torch"] == torch.__version__ and name["cpu"].endswith(f"({torch.get_num_threads()} threads)")

    def no_timing(fn):
        raise AssertionError("timed again")

    monkeypatch.setattr(cpu_matmul, "_seconds", no_timing)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})  # a new process
    assert choose([w, w.clone()], 4) == first
    other = {"copy": "flip", "flip": "copy"}[first]
    (own_cache / "cpu_matmul.json").write_text(json.dumps({"schema": "mtpkern.cpu_matmul/1", key: other}))
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    assert choose([w, w.clone()], 3) == other  # the file decides, not a timing
    monkeypatch.undo()
    monkeypatch.setenv("MTPKERN_CACHE", str(own_cache))
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        choose([w, w.clone()], 3)
        choose([w, w.clone()], 9)
    finally:
        torch.set_num_threads(threads)
    table = json.loads((own_cache / "cpu_matmul.json").read_text())
    assert len(table) == 4 and table[key] == other  # the schema, the first entry and two more


@pytest.mark.parametrize("damage", ["not json {", '{"schema": "mtpkern.cpu_matmul/0"}', "bad value"])
def test_a_damaged_layout_cache_is_timed_again_and_replaced(own_cache, monkeypatch, damage):
    import json

    import mtpkern.cpu_matmul as cpu_matmul

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    w = torch.randn(13, 7)
    choose([w], 2)
    path = own_cache / "cpu_matmul.json"
    name = next(k for k in json.loads(path.read_text()) if k != "schema")
    path.write_text(json.dumps({"schema": "mtpkern.cpu_matmul/1", name: "diagonal"}) if damage == "bad value" else damage)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    timed = []
    seconds = cpu_matmul._seconds
    monkeypatch.setattr(cpu_matmul, "_seconds", lambda fn: timed.append(1) or seconds(fn))
    layout = choose([w], 2)
    assert layout in LAYOUTS and timed == [1, 1]  # both layouts timed again
    assert json.loads(path.read_text()) == {"schema": "mtpkern.cpu_matmul/1", name: layout}


def test_an_unwritable_layout_cache_warns_and_still_chooses(tmp_path, monkeypatch):
    import mtpkern.cpu_matmul as cpu_matmul

    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    monkeypatch.setenv("MTPKERN_CACHE", str(blocker / "cache"))  # a folder inside a file cannot be made
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_matmul, "_chosen", {})
    with pytest.warns(UserWarning, match=r"^could not write the CPU product layout cache .*a_file/cache/cpu_matmul\.json"):
        assert choose([torch.randn(9, 5)], 1) in LAYOUTS
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("heads", ["kept", "shared", "own"])
def test_sampling_distributions_are_the_heads_own(heads, medusa_model):
    """Logits.probs / heads_probs against sampling_probs of the model's own head logits: with the
    decoder's kept unembedding, without it, and for heads with their own unembeddings."""
    from mtpkern.core import Logits
    from mtpkern.sampling import sampling_probs
    from mtpkern.options import DecodeOptions

    if heads == "own":
        torch.manual_seed(2)
        medusa_model = MedusaModel.from_base(medusa_model.base, n_heads=medusa_model.n_heads, proj=True).eval()
        with torch.no_grad():
            for j in range(1, medusa_model.n_heads):
                medusa_model.head_weight(j).add_(0.1 * torch.randn_like(medusa_model.head_weight(j)))
    logits = Logits(medusa_model, fused=False)
    assert logits.shared == (heads != "own")
    if heads == "kept":
        logits.unembed = Matmul(medusa_model.unembed_weight.detach().float())
    g = torch.Generator().manual_seed(4)
    n = medusa_model.n_heads - 1  # draft heads
    d = torch.randn(3, n, medusa_model.config.n_embd, generator=g)
    for options in (DecodeOptions(temperature=0.7), DecodeOptions(temperature=1.0, top_k=5, top_p=0.9)):
        args = (options.temperature, options.top_k, options.top_p)
        got = logits.heads_probs(d, options)
        want = torch.stack([sampling_probs(medusa_model.head_logits(d[:, j - 1], j), *args) for j in range(1, n + 1)], 1)
        assert got.shape == want.shape == (3, n, medusa_model.config.vocab_size)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(logits.probs(d[:, 0], 0, options), sampling_probs(medusa_model.head_logits(d[:, 0], 0),
                                                                                   *args), atol=1e-6)


def count_products(monkeypatch) -> list[tuple[int, int]]:
    """Every Matmul product from now on, as (which Matmul, rows)."""
    calls: list[tuple[int, int]] = []
    original = Matmul.__call__

    def counted(self, x, add=None):
        calls.append((id(self), x.shape[0]))
        return original(self, x, add)

    monkeypatch.setattr(Matmul, "__call__", counted)
    return calls


@pytest.mark.parametrize("strategy, tree", [("ntp", None), ("medusa", "chain:3"), ("medusa", "3,2,1")])
def test_sampling_steps_multiply_by_the_kept_unembedding(monkeypatch, medusa_model, strategy, tree):
    """Sampling (ntp, rejection on a chain and on a tree) takes its logits from the decoder's
    float32 unembedding in the layout timed fastest, every row of a step in one product, never
    from the model's own head product (x @ W.T, up to 6x slower at a few rows on a CPU)."""
    calls = count_products(monkeypatch)
    monkeypatch.setattr(type(medusa_model), "head_logits", lambda *a: pytest.fail("head_logits in a sampling step"))
    how = {} if strategy == "ntp" else dict(acceptance="rejection", tree=tree)
    dec = Decoder(medusa_model, strategy, temperature=1.0, prefix_cache=False, **how)
    out = dec.generate(random_prompts(1, seed=9)[0], max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 12
    rows = [r for who, r in calls if who == id(dec.logits.unembed)]
    T = dec.step.T
    assert rows.count(T) >= 2  # the target's distribution over every tree token, once per step
    if strategy != "ntp":  # the draft heads', all at once
        assert rows.count(dec.step.max_depth if tree != "chain:3" else 3) >= 2


@pytest.mark.parametrize("kept", [True, False])
def test_typical_statistics_are_the_logits_ops(kept, medusa_model):
    """Logits.typical, eager (with and without the kept unembedding) and fused, against the
    logits op's fp32 eager reference: head 0's argmax over every node, p(node | parent) and the
    parent's entropy at the temperature; the root gets 1 and 0; a NaN state has no argmax."""
    from mtpkern.core import Logits
    from mtpkern.ops.fused_logits import fused_logits

    W = medusa_model.head_weight(0)
    g = torch.Generator().manual_seed(5)
    B, T, D = 2, 6, medusa_model.config.n_embd
    h = torch.randn(B, T, D, generator=g)
    h[1, 3] = float("nan")
    tokens = torch.randint(0, medusa_model.config.vocab_size, (B, T), generator=g)
    parents = torch.tensor([-1, 0, 0, 1, 1, 3])
    eager, fused = Logits(medusa_model, fused=False), Logits(medusa_model, fused=True)
    if kept:
        eager.unembed = Matmul(W.detach().float())
    for temperature in (0.7, 1.0):
        ref = fused_logits(h[:, parents[1:]].reshape(-1, D), W, 1, tokens[:, 1:].reshape(-1),
                           scale=1 / temperature, backend="eager")
        want_prob = torch.cat([torch.ones(B, 1), (ref.target_logit - ref.lse).exp().view(B, -1)], 1)
        want_entropy = torch.cat([torch.zeros(B, 1), ref.entropy.view(B, -1)], 1)
        want_target = fused_logits(h.reshape(-1, D), W, 1, backend="eager").argmax.view(B, T)
        assert want_target[1, 3] == -1 and want_prob[1, 5].isnan()  # node 5's parent is the NaN state
        for logits in (eager, fused):
            target, prob, entropy = logits.typical(h, tokens, parents, temperature)
            assert torch.equal(target, want_target)
            assert torch.allclose(prob, want_prob, atol=1e-5, equal_nan=True)
            assert torch.allclose(entropy, want_entropy, atol=1e-4, equal_nan=True)


def test_typical_steps_multiply_by_the_kept_unembedding(monkeypatch, medusa_model):
    """Typical acceptance on a CPU reads one product of the kept unembedding over the tree's
    tokens per step (never the logits op's x @ W.T) and decodes what the fused kernel decodes."""
    import mtpkern.core

    prompt = random_prompts(1, seed=11)[0]
    how = dict(temperature=0.7, acceptance="typical", tree="3,2,1", prefix_cache=False)
    want = Decoder(medusa_model, "medusa", kernels="fused", **how).generate(prompt, max_new_tokens=16).tokens
    calls = count_products(monkeypatch)
    monkeypatch.setattr(mtpkern.core, "fused_logits", lambda *a, **k: pytest.fail("the logits op in an eager step"))
    dec = Decoder(medusa_model, "medusa", kernels="eager", **how)
    got = dec.generate(prompt, max_new_tokens=16).tokens
    rows = [r for who, r in calls if who == id(dec.logits.unembed)]
    assert rows.count(dec.step.T) >= 2 and got == want
