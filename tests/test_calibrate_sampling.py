"""Calibration for sampling (issue 26, part 3): the acceptance of sampled drafts per (depth,
child index) against an exact computation, the planner's sampled trees against brute force,
``tree="auto"`` with ``acceptance="rejection"`` planned from the table nearest the temperature,
old calibration files, and ``mtpkern calibrate --temperature``."""

import itertools
import json
import math
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _tiny import random_prompts, save_random_medusa, tiny_medusa, tiny_mtp

import mtpkern.steps as steps_mod
from mtpkern import Decoder, Tree, generate, load_model
from mtpkern.calibrate import (
    CalibrationError,
    StepCost,
    auto_tree,
    best_first_nodes,
    best_sampled_trees,
    calibrate,
    calibrate_sampling,
    load_calibration,
    optimise_tree,
    optimise_tree_depths,
    plan_tree,
    sampled_acceptance,
    step_cost,
    time_tree_step,
)
from mtpkern.cli import main
from mtpkern.sampling import sampling_probs

OLD = Path(__file__).parent / "data" / "old_runs"


@pytest.fixture(autouse=True)
def cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKERN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def flat_timer(model, tree, **kw):
    """1 ms per step up to 8 tree tokens, then 0.1 ms more per token (0.2 ms for sampling)."""
    T = 1 if tree is None else len(tree)
    return 1e-3 + (2e-4 if kw.get("sampling") else 1e-4) * max(0, T - 8)


# ----------------------------------------------------------------------------- exact acceptance


def exact_acceptance(q: list[float], r: list[float], width: int) -> list[float]:
    """P(child i accepted, children before it rejected) by enumerating every ordered draw
    without replacement from q and walking recursive rejection sampling against r."""
    keep = [y for y in range(len(q)) if q[y] > 0 or r[y] > 0]  # no other token is drawn or holds mass
    q, r = [q[y] for y in keep], [r[y] for y in keep]
    out = [0.0] * width

    def walk(i, removed, r, prob):
        left = [y for y in range(len(q)) if y not in removed and q[y] > 0]
        mass = sum(q[y] for y in left)
        if i == width or mass <= 0:
            return
        for y in left:
            qy = q[y] / mass
            accept = min(1.0, r[y] / qy)
            out[i] += prob * qy * accept
            if accept < 1:
                res = [max(0.0, r[z] - (q[z] / mass if z in left else 0.0)) for z in range(len(q))]
                walk(i + 1, removed | {y}, [x / sum(res) for x in res], prob * qy * (1 - accept))

    walk(0, frozenset(), r, 1.0)
    return out


@pytest.mark.parametrize("seed, top", [(0, 0), (1, 3), (2, 0)])
def test_sampled_acceptance_is_the_exact_acceptance(seed, top):
    """V = 6, four children: the first child's entry is exact in every row, the others average
    to the enumeration within 5 standard errors (and the rows sum to at most 1)."""
    g = torch.Generator().manual_seed(seed)
    q = sampling_probs(torch.randn(1, 6, generator=g) * 2, 1.0, top)[0]
    r = sampling_probs(torch.randn(1, 6, generator=g) * 2, 1.0, top)[0]
    want = exact_acceptance(q.tolist(), r.tolist(), 4)
    N = 40000
    got = sampled_acceptance(q.expand(N, 6), r.expand(N, 6), 4, g)
    assert torch.allclose(got[:, 0], torch.tensor(want[0], dtype=torch.float64), atol=1e-12)
    se = got.std(0) / math.sqrt(N)
    assert ((got.mean(0) - torch.tensor(want, dtype=torch.float64)).abs() <= 5 * se + 1e-9).all(), (got.mean(0), want)
    assert (got.sum(1) <= 1 + 1e-9).all()


def test_the_calibrated_table_is_the_exact_average_over_the_models_positions():
    """On a tiny MTP model at temperature 0.8 with top-k 4 (four tokens per distribution, so the
    enumeration is short): the table of one prompt equals the average, over the positions of
    the continuation the model samples, of the exact acceptance of head d's draws at t against
    the target at the depth-(d-1) node t + d."""
    model, prompt, T, k = tiny_mtp(), random_prompts(1, seed=4)[0], 0.8, 4
    table = calibrate_sampling(model, [prompt], temperature=T, top_k=k, max_new_tokens=24, samples=1500,
                               generator=torch.Generator().manual_seed(5))
    out = generate(model, torch.tensor(prompt), max_new_tokens=24, strategy="ntp", temperature=T, top_k=k,
                   generator=torch.Generator().manual_seed(5))  # the continuation calibrate_sampling drew
    seq = torch.tensor(prompt + out.tokens)
    P, L, D = len(prompt), seq.numel(), model.n_heads - 1
    with torch.no_grad():
        probs = sampling_probs(model(seq[None]).logits[0], T, k)  # [L, heads, V]
    for d in range(1, D + 1):
        rows = [exact_acceptance(probs[t, d].tolist(), probs[t + d, 0].tolist(), 10) for t in range(P - 1, L - d - 1)]
        assert table["positions"][d - 1] == len(rows)
        want = [sum(col) / len(rows) for col in zip(*rows)]
        assert table["accept"][d - 1][0] == pytest.approx(want[0], abs=1e-9)  # exact
        assert table["accept"][d - 1] == pytest.approx(want, abs=0.003)  # 1500 histories per position (a shift by one position: off by > 0.4)
        assert all(a == 0 for a in table["accept"][d - 1][k:])  # no fifth draw in a top-4 support


# ----------------------------------------------------------------------------- the planner


def _sibling_closed(depth, width, n):
    """Every tree of n nodes where each node's children are 0..m-1 (the trees sampling draws)."""
    nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
    for subset in itertools.combinations(nodes, n):
        s = set(subset)
        if all((len(p) == 1 or p[:-1] in s) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in s) for p in subset):
            yield subset


def _score(accept, path):
    return math.prod(accept[d][i] for d, i in enumerate(path))


def _random_table(rng, depth, width):
    rows = []
    for _ in range(depth):
        row = [rng.random() for _ in range(width)]
        total = sum(row) * rng.uniform(1.0, 1.6)
        rows.append([a / total for a in row])
    return rows


@pytest.mark.parametrize("depth, width, seed", [(2, 3, 0), (3, 2, 1), (1, 4, 2), (2, 4, 3), (2, 3, 4)])
def test_sampled_trees_are_the_brute_force_best_of_every_size(depth, width, seed):
    """Rows that need not fall with the child index (as measured ones may not): the dynamic
    programme's n-node tree has the largest expected accepted length among every tree whose
    nodes have children 0..m-1, for every n."""
    accept = _random_table(random.Random(seed), depth, width)
    values, tree_of = best_sampled_trees(accept, 8)
    for n in range(1, min(len(values), 7) + 1):
        best = max(1 + sum(_score(accept, p) for p in s) for s in _sibling_closed(depth, width, n))
        tree = tree_of(n)
        assert len(tree) == n + 1
        assert all(p[-1] == 0 or p[:-1] + (p[-1] - 1,) in tree.choices for p in tree.choices)
        assert 1 + sum(_score(accept, p) for p in tree.choices) == pytest.approx(best, rel=1e-12)
        assert values[n - 1] == pytest.approx(best, rel=1e-12)


def test_best_first_would_be_wrong_for_sampled_drafts():
    """A table where the second child is worth more than the first (after a rejection the
    residual fits the head better): best-first takes rank 1 alone, which sampling would draw as
    the first child; the sampled planner takes child 0 to reach child 1."""
    accept = [[0.1, 0.6], [0.5, 0.1]]
    assert [p for p, _ in best_first_nodes(accept, 1)] == [(1,)]
    plan = optimise_tree(accept, lambda T: 1.0 if T <= 3 else 10.0, max_tokens=3, sampled=True)
    assert plan.tree == Tree([[0], [1]]) and plan.expected_accept_length == pytest.approx(1.7)


def test_sampled_planner_maximises_tokens_per_second_against_brute_force():
    accept = [[0.3, 0.35, 0.1], [0.5, 0.2, 0.2]]
    cost = StepCost([1, 2, 4, 8, 16], [1.0, 1.1, 1.25, 1.9, 3.0])
    best = max((1 + sum(_score(accept, p) for p in s)) / cost(n + 1)
               for n in range(1, 13) for s in _sibling_closed(2, 3, n))
    plan = optimise_tree(accept, cost, max_tokens=16, sampled=True)
    assert plan.tokens_per_second == pytest.approx(best)
    assert plan.expected_accept_length == pytest.approx(1 + sum(_score(accept, p) for p in plan.tree.choices))
    costs = {d: StepCost([1, 2, 4, 8], [1.0, 1.0 + 0.4 * d, 1.1 + 0.4 * d, 1.5 + 0.4 * d]) for d in (1, 2)}
    best = max((1 + sum(_score(accept, p) for p in s)) / costs[max(map(len, s))](n + 1)
               for n in range(1, 8) for s in _sibling_closed(2, 3, n))
    assert optimise_tree_depths(accept, costs, max_tokens=8, sampled=True).tokens_per_second == pytest.approx(best)


@pytest.mark.parametrize("make, T", [(tiny_mtp, 0.7), (tiny_medusa, 1.0)])
def test_predicted_accept_length_of_sampling_is_close_to_the_measured_one(make, T):
    """The table's prediction for the planned 8-node tree against rejection decoding with it on
    other prompts (the independence model misses that heads err together: within 15%)."""
    model = make()
    table = calibrate_sampling(model, random_prompts(12, seed=1), temperature=T, max_new_tokens=40,
                               generator=torch.Generator().manual_seed(0))
    plan = optimise_tree(table["accept"], lambda n: 1.0, max_tokens=9, sampled=True)
    g, steps = torch.Generator().manual_seed(1), []
    for p in random_prompts(12, seed=9):
        out = generate(model, torch.tensor(p), max_new_tokens=40, strategy=model.config.model_type, tree=plan.tree,
                       acceptance="rejection", temperature=T, generator=g)
        steps += out.accept_lengths
    assert sum(steps) / len(steps) == pytest.approx(plan.expected_accept_length, rel=0.15)


# ----------------------------------------------------------------------------- auto with rejection


@pytest.fixture(scope="module")
def sampled_calibration():
    """The tiny MTP model's greedy calibration with sampled tables at temperatures 0.5 and 1.5."""
    model, prompts = tiny_mtp(), random_prompts(8, seed=1)
    cal = calibrate(model, prompts, max_new_tokens=30)
    for T in (0.5, 1.5):
        cal.add_sampling(calibrate_sampling(model, prompts, temperature=T, max_new_tokens=30,
                                            generator=torch.Generator().manual_seed(0)))
    return cal


@pytest.fixture()
def saved_mtp(tmp_path, sampled_calibration):
    d = tmp_path / "mtp"
    tiny_mtp().save_pretrained(d)
    sampled_calibration.save(d)
    return d


def test_a_sampling_table_round_trips_and_the_nearest_temperature_is_chosen(saved_mtp, sampled_calibration):
    cal = load_model(saved_mtp).calibration
    assert cal.sampling == sampled_calibration.sampling and sorted(cal.sampling) == ["0.5", "1.5"]
    assert cal.sampling_table(0.7)["temperature"] == 0.5
    assert cal.sampling_table(1.2)["temperature"] == 1.5
    assert cal.sampling_table(1.0)["temperature"] == 0.5  # a tie goes to the lower temperature
    hot = cal.sampling["1.5"]["accept"]
    cold = cal.sampling["0.5"]["accept"]
    assert cold[0][0] > hot[0][0]  # a sharper target and head agree more on the first draw


def test_auto_with_rejection_decodes_with_the_tree_planned_for_the_temperature(saved_mtp, monkeypatch):
    model = load_model(saved_mtp)
    for depth in (1, 2, 3):
        step_cost(model, depth=depth, timer=flat_timer)
        step_cost(model, depth=depth, timer=flat_timer, sampling=True)  # sampling steps: a curve of their own
    costs = {d: step_cost(model, depth=d, sampling=True) for d in (1, 2, 3)}
    assert costs[3](64) > step_cost(model, depth=3)(64)
    for T, measured in ((0.6, 0.5), (1.4, 1.5)):
        want = plan_tree(model, temperature=measured).tree
        assert want == optimise_tree_depths(model.calibration.sampling_table(T)["accept"], costs, max_tokens=127,
                                            sampled=True).tree
        assert auto_tree(model, temperature=T) == want
        dec = Decoder(model, "mtp", tree="auto", acceptance="rejection", temperature=T)
        assert dec.tree == want
        seen = []
        original = steps_mod.StepEngine.__init__

        def spy(self, model, options, *a, **kw):
            seen.append(options.tree)
            original(self, model, options, *a, **kw)

        monkeypatch.setattr(steps_mod.StepEngine, "__init__", spy)
        out = generate(model, torch.tensor(random_prompts(1, seed=7)[0]), max_new_tokens=12, strategy="mtp",
                       tree="auto", acceptance="rejection", temperature=T, generator=torch.Generator().manual_seed(1))
        monkeypatch.setattr(steps_mod.StepEngine, "__init__", original)
        assert seen == [want] and len(out.tokens) == 12
    # the greedy plan reads the greedy table (the trees may coincide: their predictions differ)
    sampled, greedy = plan_tree(model, temperature=0.5), plan_tree(model)
    assert sampled.expected_accept_length != pytest.approx(greedy.expected_accept_length, rel=1e-3)


def test_a_sampling_step_cost_times_rejection_steps(cost_cache):
    """The default timer times the engine's sampling step (drafts drawn, verify_rejection),
    cached under its own key beside the greedy curve."""
    model = tiny_mtp()
    calls = []

    def timer(model, tree, **kw):
        calls.append(kw.get("sampling", False))
        return time_tree_step(model, tree, min_time=0.0, **kw)

    step_cost(model, depth=1, timer=timer, sampling=True)
    step_cost(model, depth=1, timer=flat_timer)
    assert calls and all(calls)
    table = json.loads((cost_cache / "step_cost.json").read_text())
    assert sorted(json.loads(k).get("sampling", False) for k in table if k != "schema") == [False, True]


def test_auto_with_rejection_and_no_sampling_table_warns_and_uses_the_default_tree(tmp_path):
    """An old calibration (schema 1, no sampling table) still loads; ``auto`` with rejection then
    says how to measure one, once per model, and decodes with the default tree (a chain)."""
    shutil.copytree(OLD / "mtp", tmp_path / "mtp")
    model = load_model(tmp_path / "mtp" / "checkpoint")
    assert model.calibration is not None and model.calibration.sampling == {}
    with pytest.warns(UserWarning, match=r"no table of sampled drafts.*calibrate --temperature.*default tree"):
        dec = Decoder(model, "mtp", tree="auto", acceptance="rejection", temperature=0.7)
    assert dec.tree == Tree.chain(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto_tree(model, temperature=1.0) is None
    with pytest.raises(ValueError, match="no table of sampled drafts"):
        plan_tree(model, temperature=0.7)


def test_an_old_calibration_gains_a_sampling_table_and_loads_again(tmp_path):
    shutil.copytree(OLD / "medusa", tmp_path / "medusa")
    ckpt = tmp_path / "medusa" / "checkpoint"
    model = load_model(ckpt)
    cal = model.calibration
    cal.add_sampling(calibrate_sampling(model, random_prompts(3, seed=2), temperature=0.9, max_new_tokens=8))
    cal.save(ckpt)
    again = load_calibration(ckpt, model)
    assert again.counts == cal.counts and again.sampling["0.9"]["accept"] == cal.sampling["0.9"]["accept"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(accept=[[0.9, 0.9] + [0.0] * 8] * 3), "summing to at most 1"),
    (lambda t: t.pop("temperature"), "lacks the field 'temperature'"),
    (lambda t: t.update(temperature=0), "temperature must be a number > 0"),
    (lambda t: t.update(positions=[1]), "positions must be 3 ints"),
])
def test_a_damaged_sampling_table_is_a_one_line_error(saved_mtp, edit, message):
    path = saved_mtp / "calibration.json"
    raw = json.loads(path.read_text())
    edit(raw["sampling"]["0.5"])
    path.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match=re.escape(message)) as e:
        load_model(saved_mtp)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    return save_random_medusa(tmp_path_factory.mktemp("bare") / "checkpoint", records=200, n_positions=256, n_layer=2)


def test_calibrate_command_measures_each_temperature_and_keeps_earlier_ones(bare_checkpoint, tmp_path, capsys):
    args = ["calibrate", str(bare_checkpoint), "--data", "synthetic", "--device", "cpu", "--max-samples", "2",
            "--max-new-tokens", "8", "--max-nodes", "12"]
    report = tmp_path / "cal.json"
    assert main([*args, "--temperature", "0.7", "--temperature", "1", "--top-k", "20", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "temperature 0.7 (top-k 20, top-p 1)" in out and "temperature 1 (top-k 20, top-p 1)" in out
    assert len(re.findall(r"measured \(\d+ held-out prompts, rejection sampling\): accepted length", out)) == 2
    data = json.loads(report.read_text())
    assert sorted(data["sampling_plans"]) == ["0.7", "1"] and data["sampling_plans"]["0.7"]["nodes"] <= 12
    assert data["sampling_plans"]["1"]["measured"]["accept_length"] >= 1
    assert main([*args, "--no-measure", "--temperature", "1.3"]) == 0
    capsys.readouterr()
    cal = load_model(bare_checkpoint).calibration
    assert sorted(cal.sampling) == ["0.7", "1", "1.3"] and cal.sampling["0.7"]["top_k"] == 20


def test_calibrate_command_refuses_bad_sampling_settings_before_any_work(bare_checkpoint, capsys):
    args = ["calibrate", str(bare_checkpoint), "--data", "synthetic", "--device", "cpu"]
    with pytest.raises(SystemExit):
        main([*args, "--temperature", "0"])
    assert "--temperature: expected a finite positive number, got 0.0" in capsys.readouterr().err
    saved = bare_checkpoint / "calibration.json"
    before = saved.read_text() if saved.exists() else None
    assert main([*args, "--temperature", "0.7", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1], got 1.5" in err and len(err.strip().splitlines()) == 1
    assert (saved.read_text() if saved.exists() else None) == before  # refused before calibrating
