"""mtpkern.calibrate: head acceptance, the step-cost cache, the tree optimiser against brute force,
auto_tree, the calibrate command, the train hook and bad input."""

import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _tiny import random_prompts, save_random_medusa, tiny_gpt2, tiny_medusa, tiny_mtp

import mtpkern.autotree as autotree_mod
import mtpkern.costmodel as costmodel_mod
from mtpkern import GPT2, GPT2Config, MedusaModel, MTPModel, Tree, generate, load_model
from mtpkern.calibrate import (
    CALIBRATION_NAME,
    Calibration,
    CalibrationError,
    StepCost,
    auto_tree,
    best_first_nodes,
    calibrate,
    fingerprint,
    load_calibration,
    optimise_tree,
    optimise_tree_depths,
    plan_tree,
    simulate_steps,
    step_cost,
    time_tree_step,
    timing_tree,
)
from mtpkern.checkpoint import CheckpointError
from mtpkern.cli import main
from mtpkern.data import synthetic_records, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cost_cache(tmp_path, monkeypatch):
    """Every test measures into its own cache directory, through the documented variable."""
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def calibrations():
    """The tiny trained models' calibrations on 12 pattern prompts."""
    return {kind: calibrate(model, random_prompts(12, seed=1), max_new_tokens=40)
            for kind, model in (("mtp", tiny_mtp()), ("medusa", tiny_medusa()))}


def fake_timer(calls: list):
    """A step time that grows with the tree: 1 ms + 0.1 ms per token beyond 8."""
    def timer(model, tree, **kw):
        T = 1 if tree is None else len(tree)
        calls.append(T)
        return 1e-3 + 1e-4 * max(0, T - 8)

    return timer


# ----------------------------------------------------------------------------- the optimiser


def _closed_subsets(nodes, n):
    """Every prefix-closed set of n paths drawn from ``nodes``."""
    for subset in itertools.combinations(nodes, n):
        s = set(subset)
        if all(len(p) == 1 or p[:-1] in s for p in subset):
            yield subset


def _score(accept, path):
    return math.prod(accept[d][r] for d, r in enumerate(path))


@pytest.mark.parametrize("depth, topk, seed", [(2, 3, 0), (3, 2, 1), (2, 3, 2), (1, 4, 3), (3, 2, 4)])
def test_best_first_is_the_best_tree_of_every_size(depth, topk, seed):
    """Brute force over every prefix-closed tree of the small infinite tree: the greedy prefix
    of n nodes has the largest expected accepted length, for every n. Ranks are not sorted by
    probability, so the argument's independence from rank order is tested too."""
    rng = random.Random(seed)
    accept = [[rng.random() for _ in range(topk)] for _ in range(depth)]
    nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]
    order = best_first_nodes(accept, len(nodes))
    assert sorted(p for p, _ in order) == sorted(nodes)
    for n in range(1, min(len(nodes), 7) + 1):
        best = max(sum(_score(accept, p) for p in s) for s in _closed_subsets(nodes, n))
        greedy = [p for p, _ in order[:n]]
        assert all(len(p) == 1 or p[:-1] in greedy for p in greedy)  # a valid tree
        assert sum(_score(accept, p) for p in greedy) == pytest.approx(best, rel=1e-12)


def test_optimise_tree_maximises_tokens_per_second_against_brute_force():
    accept = [[0.7, 0.2, 0.05], [0.6, 0.1, 0.1]]
    cost = StepCost([1, 2, 4, 8, 16], [1.0, 1.1, 1.25, 1.9, 3.0])
    nodes = [p for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
    best = max((1 + sum(_score(accept, p) for p in s)) / cost(n + 1)
               for n in range(1, len(nodes) + 1) for s in _closed_subsets(nodes, n))
    plan = optimise_tree(accept, cost, max_tokens=16)
    assert plan.tokens_per_second == pytest.approx(best)
    assert plan.expected_accept_length == pytest.approx(1 + sum(_score(accept, p) for p in plan.tree.choices))
    assert plan.ntp_tokens_per_second == pytest.approx(1.0)
    # a flat cost takes every useful node; a steep one takes the single best
    assert len(optimise_tree(accept, lambda T: 1.0, max_tokens=16).tree) == 1 + len(nodes)
    assert optimise_tree(accept, lambda T: float(T), max_tokens=16).tree == Tree([[0]])


def test_depth_aware_optimiser_against_brute_force():
    """With a step cost per tree depth (MTP runs one head block per depth), the best (tree,
    depth) over every prefix-closed tree."""
    accept = [[0.8, 0.15], [0.5, 0.3], [0.4, 0.2]]
    nodes = [p for d in (1, 2, 3) for p in itertools.product(range(2), repeat=d)]
    for slope in (0.05, 0.4, 2.0):  # cheap, moderate and expensive deeper heads
        costs = {d: StepCost([1, 2, 4, 8], [1.0, 1.0 + slope * d, 1.1 + slope * d, 1.5 + slope * d])
                 for d in (1, 2, 3)}
        best = max((1 + sum(_score(accept, p) for p in s)) / costs[max(map(len, s))](n + 1)
                   for n in range(1, 8) for s in _closed_subsets(nodes, n))
        plan = optimise_tree_depths(accept, costs, max_tokens=8)
        assert plan.tokens_per_second == pytest.approx(best)
        depth = plan.tree.max_depth
        assert plan.tokens_per_second == pytest.approx(plan.expected_accept_length / costs[depth](len(plan.tree)))


def test_optimiser_is_deterministic_and_breaks_ties_towards_small_shallow_trees():
    accept = [[0.5, 0.5], [1.0, 0.0]]  # (1,), (0,) and (0, 0) all score 0.5
    assert [p for p, _ in best_first_nodes(accept, 3)] == [(0,), (1,), (0, 0)]
    cost = {1: 1.0, 2: 1.5, 3: 2.0, 4: 3.0}.__getitem__  # 1 and 2 nodes tie at 1.0 token per second
    plans = [optimise_tree(accept, cost, max_tokens=4) for _ in range(3)]
    assert all(p.tree == plans[0].tree for p in plans) and plans[0].tree == Tree([[0]])


def test_optimiser_rejects_probabilities_outside_0_1():
    with pytest.raises(ValueError, match="must lie in"):
        best_first_nodes([[1.2, 0.1]], 3)


def test_step_cost_interpolates_and_refuses_to_extrapolate():
    cost = StepCost([1, 4, 8], [1.0, 2.5, 4.5])
    assert cost(1) == 1.0 and cost(2) == pytest.approx(1.5) and cost(6) == pytest.approx(3.5) and cost(8) == 4.5
    with pytest.raises(ValueError, match="1..8 tree tokens"):
        cost(9)


def test_timing_trees_have_the_size_and_depth_asked_for():
    for T, depth in [(2, 3), (4, 3), (5, 3), (16, 2), (128, 4), (11, 1)]:
        tree = timing_tree(T, depth)
        assert len(tree) == T and tree.max_depth == min(T - 1, depth)
    with pytest.raises(ValueError, match="no tree of 13 tokens"):
        timing_tree(13, 1)


# ----------------------------------------------------------------------------- calibration


def _reference_counts(model, prompt, max_new_tokens, topk=10):
    """counts / positions of one prompt, by the definition, one growing prefix at a time."""
    D = model.n_heads - 1
    out = generate(model, torch.tensor(prompt), max_new_tokens=max_new_tokens, strategy="ntp")
    seq = prompt + out.tokens
    counts, positions = [[0] * topk for _ in range(D)], [0] * D
    with torch.inference_mode():
        for t in range(len(prompt) - 1, len(seq) - 1):
            hidden = model(torch.tensor([seq[: t + 1]])).hidden[0, -1]  # [J, dim] at position t
            for d in range(1, D + 1):
                if t + d + 1 >= len(seq):
                    break
                top = model.head_logits(hidden[d], d).topk(topk).indices.tolist()
                positions[d - 1] += 1
                if seq[t + d + 1] not in top:
                    break  # deeper heads are unreachable from here
                counts[d - 1][top.index(seq[t + d + 1])] += 1
    return counts, positions


@pytest.mark.parametrize("make", [tiny_mtp, tiny_medusa])
def test_calibration_counts_match_the_definition(make):
    model = make()
    prompts = random_prompts(3, seed=4)
    cal = calibrate(model, prompts, max_new_tokens=24)
    counts = [[0] * 10 for _ in range(model.n_heads - 1)]
    positions = [0] * (model.n_heads - 1)
    for p in prompts:
        c, n = _reference_counts(model, p, 24)
        counts = [[a + b for a, b in zip(x, y)] for x, y in zip(counts, c)]
        positions = [a + b for a, b in zip(positions, n)]
    assert cal.counts == counts and cal.positions == positions
    assert cal.depth == model.n_heads - 1 and cal.source["n_prompts"] == 3
    assert all(0 < sum(row) <= 1 for row in cal.accept)


@pytest.mark.parametrize("kind", ["mtp", "medusa"])
def test_predicted_accept_length_is_close_to_the_measured_one(kind, calibrations):
    """On other prompts of the same pattern, the calibration predicts the accepted length of
    the chain and of the optimised tree within 20%."""
    model = {"mtp": tiny_mtp, "medusa": tiny_medusa}[kind]()
    accept = calibrations[kind].accept
    D = model.n_heads - 1
    for tree in (Tree.chain(D), optimise_tree(accept, lambda T: 1.0 + 0.05 * T, max_tokens=24).tree):
        predicted = 1 + sum(_score(accept, p) for p in tree.choices)
        steps = [a for p in random_prompts(12, seed=9)
                 for a in generate(model, torch.tensor(p), max_new_tokens=40, strategy=kind, tree=tree).accept_lengths]
        measured = sum(steps) / len(steps)
        assert abs(predicted - measured) < 0.2 * measured, (tree, predicted, measured)


@pytest.mark.parametrize("kind", ["mtp", "medusa"])
def test_replaying_the_calibration_is_decoding_step_for_step(kind):
    """On the calibrated prompts, the replay gives exactly the steps greedy decoding takes with
    any tree (but the last, which may accept drafts past the calibrated end)."""
    model = {"mtp": tiny_mtp, "medusa": tiny_medusa}[kind]()
    prompts = random_prompts(5, seed=11)
    cal = calibrate(model, prompts, max_new_tokens=30)
    for tree in (Tree.chain(1), Tree.chain(3), Tree.from_widths([3, 2, 1]), Tree([[1], [0], [1, 0], [1, 0, 2]])):
        replayed = simulate_steps(cal.ranks, tree)
        for p, steps in zip(prompts, replayed):
            out = generate(model, torch.tensor(p), max_new_tokens=30, strategy=kind, tree=tree)
            assert out.accept_lengths[:-1] == steps[: len(out.accept_lengths) - 1], tree
            assert sum(steps) == len(out.tokens) or out.tokens[-1] == model.config.eos_token_id


def test_calibration_refuses_a_model_without_draft_heads():
    with pytest.raises(ValueError, match="needs an MTP or MEDUSA model"):
        calibrate(tiny_gpt2(), [[1, 2, 3]])


def test_fingerprint_reads_tensors_past_float32s_integers():
    """SmolLM2's embedding (49,152 x 576 elements, past 2^24): float32 linspace rounds its last
    index up to the length; the fingerprint clamps it, so its model can be calibrated."""
    from types import SimpleNamespace

    big = SimpleNamespace(config=SimpleNamespace(model_type="llama", n_heads=2, vocab_size=49152, n_layer=1, n_embd=576,
                                                 n_head=9, medusa_layers=1),
                          state_dict=lambda: {"wte.weight": torch.arange(49152 * 576, dtype=torch.int32).view(49152, 576)})
    last = torch.linspace(0, 49152 * 576 - 1, 16).round().long()[-1]
    assert last == 49152 * 576  # what made it fail: one past the end
    assert len(fingerprint(big)["weights"]) == 16


def test_fingerprint_sees_weights_and_ignores_float16_casts():
    model = tiny_mtp()
    fp = fingerprint(model)
    assert fingerprint(MTPModel.from_base(tiny_gpt2(), n_heads=model.n_heads))["weights"] != fp["weights"]
    half = MTPModel(model.config)
    half.load_state_dict(model.state_dict())
    assert fingerprint(half.half()) == fp


# ----------------------------------------------------------------------------- files and bad input


@pytest.fixture()
def saved_mtp(tmp_path, calibrations):
    d = tmp_path / "mtp"
    tiny_mtp().save_pretrained(d)
    calibrations["mtp"].save(d)
    return d


def test_load_model_attaches_the_calibration(saved_mtp, calibrations):
    model = load_model(saved_mtp)
    assert isinstance(model.calibration, Calibration)
    assert model.calibration.accept == calibrations["mtp"].accept
    assert load_model(saved_mtp, dtype=torch.float16).calibration is not None  # fingerprint before the cast
    assert load_model(saved_mtp, calibration=False).calibration is None
    assert GPT2(tiny_gpt2().config).calibration is None


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_a_calibration_from_another_model_is_refused(saved_mtp, tmp_path):
    other = tmp_path / "other"
    MTPModel.from_base(tiny_gpt2(), n_heads=tiny_mtp().n_heads).save_pretrained(other)
    (other / CALIBRATION_NAME).write_text((saved_mtp / CALIBRATION_NAME).read_text())
    with pytest.raises(CheckpointError) as e:
        load_model(other)
    msg = _one_line(e)
    assert "calibration.json" in msg and "another model" in msg and "weights" in msg


def test_a_calibration_with_another_number_of_heads_is_refused(saved_mtp, tmp_path):
    other = tmp_path / "fewer"
    MTPModel.from_base(tiny_gpt2(), n_heads=2).save_pretrained(other)
    (other / CALIBRATION_NAME).write_text((saved_mtp / CALIBRATION_NAME).read_text())
    with pytest.raises(CalibrationError) as e:
        load_model(other)
    assert "with 4 heads" in _one_line(e) and "with 2" in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"schema": "mtpkern.calibration/1", "topk": 10', "corrupt"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema": "mtpkern.calibration/1", "topk": 10}', "not a valid calibration"),
    ('{"schema": "something/else"}', "not a valid calibration"),
])
def test_a_corrupt_calibration_is_a_one_line_error_naming_the_file(saved_mtp, text, message):
    (saved_mtp / CALIBRATION_NAME).write_text(text)
    with pytest.raises(CalibrationError) as e:
        load_calibration(saved_mtp, tiny_mtp())
    assert message in _one_line(e) and str(saved_mtp / CALIBRATION_NAME) in str(e.value)


def test_counts_that_exceed_their_positions_are_refused(saved_mtp):
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    raw["counts"][0][0] = raw["positions"][0] + 1
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="exceed their positions"):
        load_model(saved_mtp)


def test_ranks_that_are_not_rank_strings_are_refused(saved_mtp):
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    assert raw["ranks"] and all(len(r) == 3 for prompt in raw["ranks"] for r in prompt)
    raw["ranks"][0][0] = "0q1"
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="ranks must be strings of 3 characters"):
        load_model(saved_mtp)


@pytest.mark.parametrize("max_nodes", [0, -3, 127, 10**6, 2.5, True])
def test_node_budgets_below_1_or_above_the_cache_are_refused(max_nodes, calibrations):
    model = tiny_mtp()  # context 128: at most 126 draft nodes
    with pytest.raises(ValueError, match=r"max_nodes \(draft nodes per step\) must be an int in 1..126"):
        plan_tree(model, calibration=calibrations["mtp"], max_nodes=max_nodes)
    with pytest.raises(ValueError, match="in 1..126"):
        auto_tree(model, max_nodes=max_nodes)


# ----------------------------------------------------------------------------- the cost model


def test_step_cost_is_measured_once_and_cached_under_MTPKERN_CACHE(cost_cache):
    model, calls = tiny_medusa(), []
    first = step_cost(model, timer=fake_timer(calls))
    assert calls == [1, 2, 4, 8, 16, 32, 64] * 2  # context 128: a 64-token prefix leaves room for 64; 2 rounds
    assert (cost_cache / "step_cost.json").is_file()
    again = step_cost(model, timer=fake_timer(calls))
    assert len(calls) == 14 and again.sizes == first.sizes and again.seconds == first.seconds
    step_cost(model, kernels="eager", timer=fake_timer(calls))  # another setting: measured
    assert len(calls) == 28
    step_cost(model, refresh=True, timer=fake_timer(calls))
    assert len(calls) == 42
    table = json.loads((cost_cache / "step_cost.json").read_text())
    keys = [json.loads(k) for k in table if k != "schema"]
    assert {k["kernels"] for k in keys} == {"auto", "eager"}
    assert all(k["dtype"] == "float32" and k["torch"] == torch.__version__ and k["cuda_graph"] is False and
               k["model"]["n_heads"] == 4 for k in keys)


def test_a_damaged_cost_cache_is_measured_again(cost_cache):
    cost_cache.mkdir(parents=True)
    (cost_cache / "step_cost.json").write_text("{not json")
    calls = []
    cost = step_cost(tiny_medusa(), timer=fake_timer(calls))
    assert calls and cost.sizes == [1, 2, 4, 8, 16, 32, 64]
    assert json.loads((cost_cache / "step_cost.json").read_text())["schema"] == "mtpkern.step_cost/4"


def test_step_cost_keeps_the_faster_round_and_never_decreases():
    noisy = iter([3e-3, 1e-3, 9e-3, 1.5e-3, 4e-3, 5e-3, 6e-3] + [4e-3, 2e-3, 2e-3, 9e-3, 4e-3, 5e-3, 7e-3])
    cost = step_cost(tiny_medusa(), timer=lambda *a, **k: next(noisy))
    assert cost.seconds == [3e-3, 3e-3, 3e-3, 3e-3, 4e-3, 5e-3, 6e-3]


def test_step_cost_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown kernels"):
        step_cost(tiny_medusa(), kernels="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        step_cost(tiny_medusa(), cuda_graph=True)
    with pytest.raises(ValueError, match="needs a model with draft heads"):
        step_cost(tiny_gpt2())
    with pytest.raises(ValueError, match=r"depth must be an int in 1..3"):
        step_cost(tiny_medusa(), depth=4)


@pytest.mark.parametrize("tree", [None, Tree.chain(3), Tree.from_widths([3, 2])])
def test_time_tree_step_times_a_real_engine_step(tree):
    seconds = time_tree_step(tiny_medusa(), tree, prefix_len=40, min_time=0.01)
    assert 0 < seconds < 1


@pytest.mark.parametrize("acceptance, reads", [("greedy", "argmax0"), ("rejection", "heads_probs"),
                                               ("typical", "typical")])
def test_time_tree_step_times_the_step_of_each_acceptance(monkeypatch, acceptance, reads):
    """``acceptance`` times that rule's step (what each reads from the heads' logits is called);
    a rule that does not exist is a one-line error."""
    from mtpkern.core import Logits

    calls: list[str] = []
    for name in ("argmax0", "heads_probs", "typical"):
        original = getattr(Logits, name)
        monkeypatch.setattr(Logits, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    seconds = time_tree_step(tiny_medusa(), Tree.from_widths([3, 2]), prefix_len=40, min_time=0.01,
                             acceptance=acceptance)
    assert 0 < seconds < 1 and reads in calls
    assert acceptance != "rejection" or "argmax0" not in calls  # rejection samples every token
    with pytest.raises(ValueError, match="acceptance must be greedy, rejection or typical, got 'exact'"):
        time_tree_step(tiny_medusa(), None, prefix_len=40, acceptance="exact")


# ----------------------------------------------------------------------------- auto_tree


def test_auto_tree_without_calibration_falls_back_and_says_so_once(monkeypatch):
    monkeypatch.setattr(autotree_mod, "_warned_uncalibrated", False)
    model = MedusaModel.from_base(tiny_gpt2(), n_heads=3)
    with pytest.warns(UserWarning, match="has no calibration.*default tree"):
        assert auto_tree(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto_tree(model) is None


def test_auto_tree_is_the_plan_and_decodes_losslessly(saved_mtp, cost_cache):
    model = load_model(saved_mtp)
    calls = []
    for depth in (1, 2, 3):  # MTP: one curve per tree depth, cached; auto_tree reads them
        step_cost(model, depth=depth, timer=fake_timer(calls))
    assert calls == [1, 2, 4, 8] * 2 + [1, 2, 4, 8, 16, 32, 64] * 4  # depth 1 holds at most 10 nodes
    tree = auto_tree(model, device="cpu", dtype=torch.float32, kernels="auto")
    assert len(calls) == 36  # nothing measured again
    assert tree == plan_tree(model).tree and len(tree) > 2
    assert auto_tree(model) is tree  # planned once per model and setting
    best_two = Tree([list(p) for p, _ in best_first_nodes(model.calibration.accept, 2)])
    assert auto_tree(model, max_nodes=2) == best_two  # a flat cost up to 8 tokens: the budget is used
    for p in random_prompts(6, seed=3):
        ids = torch.tensor(p)
        ntp = generate(model, ids, max_new_tokens=30, strategy="ntp", eos_token_id=63)
        assert generate(model, ids, max_new_tokens=30, strategy="mtp", tree=tree, eos_token_id=63).tokens == ntp.tokens
    with pytest.raises(ValueError, match="the model is float32, not float16"):
        auto_tree(model, dtype="fp16")
    bf16 = load_model(saved_mtp, dtype=torch.bfloat16)  # the weight hash is float16's: checked by shape
    assert bf16.calibration is not None
    for depth in (1, 2, 3):
        step_cost(bf16, depth=depth, timer=fake_timer(calls))
    assert plan_tree(bf16, calibration=bf16.calibration, max_nodes=1).tree == Tree([[0]])


def test_plan_tree_refuses_a_calibration_of_another_model(calibrations):
    with pytest.raises(CalibrationError, match="measured on a mtp model with 4 heads"):
        plan_tree(tiny_medusa(), calibration=calibrations["mtp"])
    with pytest.raises(ValueError, match="has no calibration"):
        plan_tree(tiny_medusa())


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A random MEDUSA checkpoint with a tokenizer, and no run around it."""
    return save_random_medusa(tmp_path_factory.mktemp("bare") / "checkpoint", records=200, n_positions=256, n_layer=2)


def test_calibrate_command_writes_the_file_and_reports_prediction_and_measurement(bare_checkpoint, tmp_path,
                                                                                 capsys):
    report = tmp_path / "cal.json"
    code = main(["calibrate", str(bare_checkpoint), "--data", "synthetic", "--device", "cpu", "--max-samples", "3",
                 "--max-new-tokens", "8", "--max-nodes", "20", "--json", str(report)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| predicted |" in out.out and "| measured (3 held-out prompts) |" in out.out
    data = json.loads(report.read_text())
    assert data["plan"]["nodes"] <= 20 and data["measured"]["accept_length"] >= 1
    assert data["calibration"]["source"]["held_out"] is False  # a bare checkpoint: the description says so
    assert load_model(bare_checkpoint).calibration.counts == data["calibration"]["counts"]


@pytest.mark.parametrize("args, message", [
    (["--max-nodes", "0"], "max_nodes (draft nodes per step) must be an int in 1..254"),
    ([], "a bare checkpoint has no train_config.json"),
])
def test_calibrate_command_errors_are_one_line(bare_checkpoint, args, message, capsys):
    extra = [] if not args else ["--data", "synthetic"]
    code = main(["calibrate", str(bare_checkpoint), "--device", "cpu", *extra, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_calibrate_command_refuses_a_model_without_heads(tmp_path, capsys):
    tok = train_tokenizer(synthetic_records(50, seed=0), vocab_size=300)
    GPT2(GPT2Config.tiny(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "ntp", tokenizer=tok)
    code = main(["calibrate", str(tmp_path / "ntp"), "--data", "synthetic", "--device", "cpu"])
    assert code == 2 and "calibration needs MTP or MEDUSA heads" in capsys.readouterr().err


def test_training_writes_a_calibration_and_eval_shows_it(tmp_path):
    from mtpkern.eval import evaluate_checkpoint, format_table
    from mtpkern.commands import train_and_calibrate as train  # `mtpkern train`: the run, then calibration
    from mtpkern.train import TrainConfig

    base = tmp_path / "base"
    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=512)
    torch.manual_seed(0)
    GPT2(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base, tokenizer=tok)
    train(TrainConfig(objective="medusa", out=str(tmp_path / "run"), base=str(base), data_limit=80, steps=3,
                      batch_size=4, max_len=128, n_heads=3, val_fraction=0.1, eval_every=1000, eval_batches=1,
                      progress=False))
    model = load_model(tmp_path / "run" / "checkpoint")
    assert model.calibration is not None and model.calibration.depth == 2
    assert model.calibration.source["held_out"] is True
    entry = evaluate_checkpoint(tmp_path / "run", device=torch.device("cpu"), dtype=torch.float32, max_samples=1,
                                max_new_tokens=4, max_batches=1, hf_baseline=False, progress=False)
    assert entry["calibration"]["accept"] == model.calibration.accept
    report = dict(device=dict(name="cpu", type="cpu", dtype="float32", torch="x", transformers="y"), models=[entry])
    assert f"run calibration: {model.calibration.summary()}" in format_table(report)


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Trees that fit the hardware", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.slow
def test_the_readme_commands_work(tmp_path, monkeypatch):
    """The README section's commands as written, in an empty directory, with fewer training
    steps and samples (the flags shrink, nothing else changes)."""
    commands = _readme_commands()
    assert commands and all(c.startswith("mtpkern ") for c in commands)
    shrink = {"--steps": "3", "--max-samples": "2", "--max-new-tokens": "8"}
    for command in commands:
        args = shlex.split(command)[1:]
        for i, a in enumerate(args[:-1]):
            if a in shrink:
                args[i + 1] = shrink[a]
        args += ["--device", "cpu"] if "--device" not in args else []
        if args[0] == "train":
            args += ["--data-limit", "80", "--batch-size", "4", "--no-progress"]
        r = subprocess.run([sys.executable, "-m", "mtpkern.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, (command, r.stderr[-2000:])
    assert (tmp_path / "runs" / "mtp-tiny" / "checkpoint" / CALIBRATION_NAME).is_file()
    assert json.loads((tmp_path / "runs" / "mtp-tiny" / "calibrate.json").read_text())["plan"]["nodes"] <= 32


# ----------------------------------------------------------------------------- dynamic trees


def _dynamic_paths(parents, ranks):
    """The paths of ranks of a dynamic tree's nodes, from its parents and ranks."""
    paths = [()]
    for i in range(1, parents.numel()):
        paths.append(paths[int(parents[i])] + (int(ranks[i - 1]),))
    return paths[1:]


@pytest.mark.parametrize("depth, k, n, seed", [(3, 4, 10, 0), (2, 10, 30, 1), (4, 3, 1, 2), (1, 5, 5, 3),
                                               (3, 2, 14, 4)])
def test_dynamic_tree_picks_the_optimisers_best_first_nodes(depth, k, n, seed):
    """The decoder's per-step dynamic tree (EAGLE-2) is the static optimiser's best-first set
    for the step's own draft probabilities, and a valid tree in topological order."""
    from mtpkern.core import dynamic_tree, level_sizes
    from mtpkern.ops.tree_mask import tree_buffers_ref

    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(depth, 50, generator=g) * 2, -1).sort(-1, descending=True).values[:, :k]
    ranks = torch.arange(k).expand(depth, k)  # token id = rank, so the tokens name the paths
    parents, tokens = dynamic_tree(probs.log(), ranks, n, level_sizes(n, k, depth))
    expected = best_first_nodes(probs.tolist(), n)
    assert sorted(_dynamic_paths(parents, tokens)) == sorted(p for p, _ in expected)
    tree_buffers_ref(parents, depth)  # raises unless every parent comes before its children


# ----------------------------------------------------------------------------- hand-edited files (issue 22)


def _damage_cost_cache(cost_cache, edit) -> None:
    """Apply ``edit(entry)`` to every entry of the step-cost cache."""
    path = cost_cache / "step_cost.json"
    table = json.loads(path.read_text())
    for key, entry in table.items():
        if key != "schema":
            edit(entry)
    path.write_text(json.dumps(table))


@pytest.mark.parametrize("edit", [
    lambda e: e.update(seconds=e["seconds"][:3]),  # fewer timings than sizes (issue 22 item 6)
    lambda e: e.update(seconds=e["seconds"] + [1.0]),  # more timings than sizes
    lambda e: e.update(seconds=[-1.4e-3] + e["seconds"][1:]),  # negative
    lambda e: e.update(seconds=[math.nan] * len(e["seconds"])),  # NaN
    lambda e: e.update(seconds=[math.inf] + e["seconds"][1:]),
    lambda e: e.update(seconds=[0.0] * len(e["seconds"])),
    lambda e: e.update(seconds=["fast"] * len(e["seconds"])),
    lambda e: e.update(seconds=None),
    lambda e: e.update(sizes=[1, 3, 4, 8, 16, 32, 64]),  # not the sizes this setting times
    lambda e: e.update(sizes=[1, 2, 2, 8, 16, 32, 64]),
    lambda e: e.pop("sizes"),
], ids=["short", "long", "negative", "nan", "inf", "zero", "strings", "none", "other-sizes", "repeated-size",
        "no-sizes"])
def test_a_damaged_step_cost_entry_is_measured_again_with_a_warning(cost_cache, edit):
    model, calls = tiny_medusa(), []
    good = step_cost(model, timer=fake_timer(calls))
    _damage_cost_cache(cost_cache, edit)
    with pytest.warns(UserWarning, match=r"step_cost\.json.*measuring it again") as w:
        again = step_cost(model, timer=fake_timer(calls))
    assert "\n" not in str(w[0].message)
    assert len(calls) == 28 and again.sizes == good.sizes and again.seconds == good.seconds
    assert again(64) == good(64)  # the short entry raised IndexError here
    with warnings.catch_warnings():  # the cache now holds the new measurement
        warnings.simplefilter("error")
        assert step_cost(model, timer=fake_timer(calls)).seconds == good.seconds and len(calls) == 28


def test_a_decreasing_step_cost_entry_is_smoothed_as_the_planner_smooths_it(cost_cache):
    model, calls = tiny_medusa(), []
    step_cost(model, timer=fake_timer(calls))
    _damage_cost_cache(cost_cache, lambda e: e.update(seconds=[3e-3, 2e-3, 2e-3, 4e-3, 1e-3, 5e-3, 6e-3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = step_cost(model, timer=fake_timer(calls))
    assert len(calls) == 14 and cost.seconds == [3e-3, 3e-3, 3e-3, 4e-3, 4e-3, 5e-3, 6e-3]


@pytest.mark.parametrize("bad", [-1.4e-3, math.nan])
def test_negative_or_nan_timings_never_choose_the_tree(cost_cache, calibrations, monkeypatch, bad):
    """Issue 22 item 7: a NaN or negative cost made the planner pick a one-node tree."""
    model = tiny_mtp()
    monkeypatch.setattr(costmodel_mod, "time_tree_step", fake_timer([]))  # where step_cost looks it up
    want = plan_tree(model, calibration=calibrations["mtp"])
    assert len(want.tree) > 2
    _damage_cost_cache(cost_cache, lambda e: e.update(seconds=[bad] * len(e["seconds"])))
    with pytest.warns(UserWarning, match="measuring it again"):
        got = plan_tree(model, calibration=calibrations["mtp"])
    assert got.tree == want.tree and got.tokens_per_second == want.tokens_per_second


@pytest.mark.parametrize("bad", [-1e-3, 0.0, math.nan, math.inf])
def test_the_optimiser_and_the_cost_curve_refuse_timings_that_are_not_positive(bad):
    with pytest.raises(ValueError, match=r"cost\(2\) must be a finite number of seconds > 0"):
        optimise_tree([[0.9, 0.05]], lambda T: bad if T == 2 else 1e-3, max_tokens=3)
    with pytest.raises(ValueError, match="step cost timings must be finite numbers of seconds > 0"):
        StepCost([1, 2], [1e-3, bad])
    with pytest.raises(ValueError, match="the timer returned"):
        step_cost(tiny_medusa(), timer=lambda model, tree, **kw: bad if tree is not None else 1e-3)


@pytest.mark.parametrize("sizes, seconds, message", [
    ([1, 4, 8], [1.0, 2.0], "3 sizes but 2 timings"),
    ([2, 4], [1.0, 2.0], "sizes must start at 1"),
    ([1, 4, 4], [1.0, 2.0, 3.0], "strictly increasing"),
    ([1, 4, 2], [1.0, 2.0, 3.0], "strictly increasing"),
])
def test_a_step_cost_curve_is_checked(sizes, seconds, message):
    with pytest.raises(ValueError, match=message):
        StepCost(sizes, seconds)


@pytest.mark.parametrize("field", ["fingerprint", "topk", "counts", "positions", "schema"])
def test_a_calibration_without_a_field_names_the_field(saved_mtp, field):
    """Issue 22 item 12: the error read "is not a valid calibration: 'fingerprint'"."""
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    del raw[field]
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError) as e:
        load_model(saved_mtp)
    msg = _one_line(e)
    assert str(saved_mtp / CALIBRATION_NAME) in msg and f"the field {field!r} is missing" in msg


def test_a_calibration_with_fewer_heads_than_the_model_names_both_counts(saved_mtp):
    """Issue 22 item 12: cutting the file to one draft head read "ranks must be strings of 1
    characters from .0123456789x"."""
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    raw["counts"], raw["positions"] = raw["counts"][:1], raw["positions"][:1]
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError) as e:
        load_model(saved_mtp)
    msg = _one_line(e)
    assert str(saved_mtp / CALIBRATION_NAME) in msg
    assert "counts for 1 draft head(s), but the model has 3" in msg and "rerun `mtpkern calibrate`" in msg


def test_a_calibration_whose_fingerprint_disagrees_with_its_counts_is_refused(saved_mtp):
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    raw["fingerprint"]["n_heads"] = 3
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError) as e:  # against the model: its head count and the file's
        load_model(saved_mtp)
    msg = _one_line(e)
    assert "with 3 heads" in msg and "with 4" in msg and str(saved_mtp / CALIBRATION_NAME) in msg
    with pytest.raises(CalibrationError) as e:  # alone: its counts and its fingerprint
        Calibration.from_dict(raw, "cal.json")
    assert _one_line(e) == ("cal.json holds acceptance counts for 3 draft head(s), but its fingerprint is of a "
                            "model with 2; rerun `mtpkern calibrate`")


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.update(topk="ten"), "'topk' must be an int"),
    (lambda raw: raw.update(fingerprint=[1, 2]), "'fingerprint' must be an object"),
    (lambda raw: raw.update(counts=5), "'counts' must be a list"),
    (lambda raw: raw["ranks"][0].__setitem__(0, "01"), "strings of 3 characters (one per draft head)"),
])
def test_a_calibration_with_a_field_of_the_wrong_kind_says_which(saved_mtp, edit, message):
    raw = json.loads((saved_mtp / CALIBRATION_NAME).read_text())
    edit(raw)
    (saved_mtp / CALIBRATION_NAME).write_text(json.dumps(raw))
    with pytest.raises(CalibrationError) as e:
        load_model(saved_mtp)
    assert message in _one_line(e) and str(saved_mtp / CALIBRATION_NAME) in str(e.value)


@pytest.mark.parametrize("call, kind, message", [
    (lambda m: calibrate(m, ["hello"]), TypeError, "prompt 0 must be token ids"),
    (lambda m: calibrate(m, [[1, 2], ["a", "b"]]), TypeError, "prompt 1 must be token ids"),
    (lambda m: calibrate(m, "hello"), TypeError, "prompts must be a list of token-id sequences"),
    (lambda m: calibrate(m, None), TypeError, "prompts must be a list of token-id sequences"),
    (lambda m: calibrate(m, [[1.5, 2.0, 3.0]]), TypeError, "prompt 0 must hold integer token ids"),
    (lambda m: calibrate(m, [[1, 2, 3]], topk=0), ValueError, "topk must be an int in 1..10"),
    (lambda m: calibrate(m, [[1, 2, 3]], topk="3"), ValueError, "topk must be an int in 1..10"),
    (lambda m: auto_tree(m, device="gpu"), ValueError, "auto_tree: unknown device 'gpu'"),
    (lambda m: optimise_tree([[0.5]], lambda T: 1e-3, max_tokens="8"), ValueError, "max_tokens must be an int >= 2"),
    (lambda m: Calibration.from_dict(None), CalibrationError, "expected a JSON object"),
])
def test_calibration_api_arguments_of_the_wrong_kind_are_named(call, kind, message):
    """The same class as issue 22 item 13 in this module: text prompts read "new(): invalid
    data type 'str'", float ids were truncated silently, topk=0 read an IndexError."""
    with pytest.raises(kind) as e:
        call(tiny_medusa())
    assert message in _one_line(e)
