"""Tests for mtpkern.bench: the quick end-to-end benchmark on a tiny random model on CPU."""

import json

import pytest
import torch

from mtpkern.bench import bench_models, engine_cases, format_bench, run_bench
from mtpkern.decoder import Decoder


def test_cases_per_device(monkeypatch):
    models = bench_models(quick=True, device=torch.device("cpu"), dtype=torch.float32)
    names = [name for name, _, _ in engine_cases(models, torch.device("cpu"))]
    assert names == ["ntp/eager", "mtp/eager", "mtp/fused", "medusa/eager", "medusa/fused"]
    medusa = {name: kw for name, _, kw in engine_cases(models, torch.device("cpu"))}["medusa/eager"]
    assert medusa["tree"] is not None  # random heads: the small fixed tree
    monkeypatch.setattr("mtpkern.bench.has_calibration", lambda m: True)  # calibrated: its own auto tree
    assert "tree" not in {name: kw for name, _, kw in engine_cases(models, torch.device("cpu"))}["medusa/eager"]
    # One base under every strategy, so their speeds compare the engine and nothing else.
    assert torch.equal(models["mtp"].wte.weight, models["ntp"].wte.weight)
    assert torch.equal(models["medusa"].base.h[0].mlp.c_fc.weight, models["ntp"].h[0].mlp.c_fc.weight)


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    path = tmp_path / "bench.json"
    report = run_bench(device="cpu", json_path=path, max_new_tokens=5, prompts=2, prompt_len=8,
                       quick=True, progress=False)
    assert json.loads(path.read_text()) == report
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    cases = report["cases"]
    assert set(cases) == {"ntp/eager", "mtp/eager", "mtp/fused", "medusa/eager", "medusa/fused",
                          "hf/dynamic"}  # hf/static is opt-in
    failed = {name: c["error"] for name, c in cases.items() if "error" in c}
    assert not failed
    for name, c in cases.items():
        assert c["tokens_per_second"] > 0 and c["latency_s"] > 0, name
        if not name.startswith("hf/"):
            assert c["step_time_us"] > 0 and c["mean_accept_length"] >= 1, name
            # ntp: one forward per token plus nothing; speculative: never more than that.
            assert 0 < c["forward_passes_per_token"] <= 1, name
    assert cases["ntp/eager"]["mean_accept_length"] == 1
    for kernels in ("auto", "eager"):
        b = report["step_breakdown"][kernels]
        assert "error" not in b, b
        assert 0 < b["forward_us"] and 0 < b["logits_us"] and b["step_us"] > 0
        # timed directly (the step with its forward stubbed, less the draft heads), a share of the step
        assert 0 <= b["bookkeeping_us"] < b["step_us"]
        assert b["bookkeeping_share"] == pytest.approx(b["bookkeeping_us"] / b["step_us"])
        assert b["bookkeeping_share_beyond_lm_head"] <= b["bookkeeping_share"]
        assert 0 < b["in_decode_share"] < 1  # measured while decoding the bench's prompts
    from mtpkern.ops import _backend

    if _backend.HAS_CUDA_EXT:
        vc = report["verify_compact"]
        assert min(vc["verify_eager_us"], vc["verify_extension_us"], vc["kv_compact_eager_us"],
                   vc["kv_compact_extension_us"]) > 0, vc
    for name in ("medusa/auto", "mtp/auto"):
        curve = report["step_cost"][name]
        assert [p["T"] for p in curve] == [1, 2, 4, 8, 16] and all(p["step_us"] > 0 for p in curve), curve
    assert "Random weights" in report["weights"]
    # The speculative cases draft over the heads: the accepted length is bounded by depth + 1.
    assert cases["mtp/eager"]["mean_accept_length"] <= 4
    assert cases["medusa/eager"]["mean_accept_length"] <= 5


def test_a_failing_case_is_recorded_and_the_json_kept_case_by_case(tmp_path, monkeypatch):
    import mtpkern.bench as bench

    path = tmp_path / "bench.json"
    real, seen = bench.time_case, []

    def time_case(run, prompts, device, warmup=1):
        if path.exists():  # what was measured before this case is on disk already
            seen.append(set(json.loads(path.read_text())["cases"]))
        if len(seen) == 2:
            raise RuntimeError("boom\nsecond line")
        return real(run, prompts, device, warmup=warmup)

    monkeypatch.setattr(bench, "time_case", time_case)
    monkeypatch.setattr(bench, "STEP_COST_T", (1, 2))
    report = run_bench(device="cpu", json_path=path, max_new_tokens=3, prompts=1, prompt_len=4, quick=True,
                       progress=False)
    assert seen[0] == {"ntp/eager"} and len(seen[-1]) == len(report["cases"]) - 1
    failed = [name for name, c in report["cases"].items() if "error" in c]
    assert failed == ["mtp/fused"] and report["cases"]["mtp/fused"]["error"] == "RuntimeError: boom"
    assert report["cases"]["hf/dynamic"]["tokens_per_second"] > 0  # the cases after it still ran
    assert json.loads(path.read_text()) == report


def test_format_bench_shows_failures():
    report = {"device": {"name": "X", "type": "cpu", "dtype": "float32", "torch": "t", "transformers": "t"},
              "settings": {"max_new_tokens": 4, "prompts": 1}, "weights": "",
              "cases": {"ntp/eager": {"tokens_per_second": 10.0, "latency_s": 0.4, "step_time_us": 100.0,
                                      "mean_accept_length": 1.0, "forward_passes_per_token": 1.0},
                        "mtp/fused": {"error": "RuntimeError: boom"}},
              "step_breakdown": {}}
    table = format_bench(report)
    assert "| mtp/fused | failed: RuntimeError: boom |" in table
    assert "| ntp/eager | 10.0 | 0.400 | 100 | 1.00 | 1.00 | 1.00x |" in table


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        run_bench(device="cpu", quick=True, prompts=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        run_bench(device="cpu", quick=True, dtype="float99")


def test_bench_heads_quick_runs_every_variant(tmp_path):
    """benchmarks/bench_heads.py --quick, shrunk further: every variant trains, decodes losslessly
    and is measured, and the JSON holds the figures the table shows."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_heads.py"
    bench = runpy.run_path(str(script))
    threads = torch.get_num_threads()
    try:
        report = bench["main"](["--quick", "--corpus", "90", "--base-steps", "3", "--head-steps", "2",
                                "--head-records", "24", "--eval-prompts", "2", "--max-new-tokens", "6",
                                "--json", str(tmp_path / "heads.json"), "--out", str(tmp_path / "runs")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "heads.json").read_text()) == json.loads(json.dumps(report))
    assert report["sizes"]["head_steps"] == 2 and report["sizes"]["base_steps"] == 3
    assert len(report["variants"]) == 6 and report["distilled_records"] > 0
    for name, r in report["variants"].items():
        assert r["lossless"] == 1.0, name
        assert r["accept_length"] >= 1 and len(r["corpus_top1"]) == len(r["own_top1"]) == 3, name
        assert all(0 <= a <= 1 for a in r["corpus_top1"] + r["own_top1"]), name
    # MEDUSA-1 never changes its base: the base's perplexity; MEDUSA-2 trains it
    v = report["variants"]
    assert v["medusa1 shared (base: all kinds)"]["ppl"] == pytest.approx(report["bases"]["base: all kinds"]["ppl"])
    assert v["medusa2 ce (base: all kinds)"]["ppl"] != pytest.approx(report["bases"]["base: all kinds"]["ppl"])
    assert (tmp_path / "runs" / "heads_distilled.jsonl").is_file()


def _agreement_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "greedy_agreement.py"
    spec = importlib.util.spec_from_file_location("greedy_agreement", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_tells_near_ties_from_real_disagreements():
    """A divergence is judged in fp32: two tokens whose logits are equal (a tie that half
    precision may break either way) against a token far below the argmax (a bug)."""
    from mtpkern.config import GPT2Config
    from mtpkern.models import GPT2

    script = _agreement_script()
    torch.manual_seed(0)
    model = GPT2(GPT2Config.tiny(vocab_size=64, n_layer=1)).eval()
    prompt = torch.tensor([3, 9, 4])
    with torch.no_grad():
        z = model(prompt[None]).logits[0, -1, 0]
        a, low = int(z.argmax()), int(z.argmin())
        b = next(t for t in range(64) if t not in (a, 3, 9, 4))  # not in the prompt: its embedding may change
        model.unembed_weight[b] = model.unembed_weight[a]  # b's logit is a's, exactly
        tie = script.divergence(model, prompt, [a, 5], [b, 5], torch.float16)
        real = script.divergence(model, prompt, [a, 5], [low, 5], torch.float16)
    assert tie["position"] == 0 and tie["tie"] and tie["fp32_gap"] == 0.0, tie
    assert not real["tie"] and real["fp32_gap"] > 0, real
    assert script.divergence(model, prompt, [a, 5], [a, 5], torch.float16) is None
    assert script.divergence(model, prompt, [a, 5], [a], torch.float16) == {"position": 1, "tie": False,
                                                                         "why": "lengths differ"}


def test_decode_layer_sweep_dry_run(tmp_path):
    """The GPU block-size sweep, run in the interpreter on tiny shapes: every configuration it
    would time computes the reference's result, so a GPU run spends its time on timing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "sweep.json"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "sweep_decode_layer.py"), "--dry-run", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(x["op"], x["rows"]) for x in results} == {(op, m) for op in ("ln_qkv", "ln_fc_gelu", "linear_residual")
                                                      for m in (1, 32)}
    assert all("error" not in x and x["rel_err"] < 1e-5 for x in results), [x for x in results if "error" in x]
    assert any(isinstance(x["config"], dict) and x["config"]["SPLIT_K"] == 4 for x in results)
    gemv = [x for x in results if isinstance(x["config"], dict) and not x["config"]["DOT"]]
    assert {(x["op"], x["rows"]) for x in gemv} == {(op, 1) for op in ("ln_qkv", "ln_fc_gelu", "linear_residual")}


def test_bench_decode_batch_study(tmp_path):
    """``bench_decode.py --batch``: tokens/s of each model's ntp and speculative strategy per
    batch size, the table's speed-up columns, and the plot."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_decode.py"), "--device", "cpu", "--threads", "1",
                        "--prompts", "3", "--max-new-tokens", "6", "--batch", "1,2", "--json", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    batch = json.loads(out.read_text())["batch"]
    assert set(batch) == {"medusa", "mtp"}
    for family, strategies in batch.items():
        assert set(strategies) == {"ntp", family}
        for by_b in strategies.values():
            assert set(by_b) == {"1", "2"} and all(v["tokens_per_second"] > 0 for v in by_b.values())
        assert strategies[family]["1"]["mean_accept_length"] > 1
    assert "| medusa: medusa |" in r.stdout and "speed-up kept" in r.stdout
    assert png.stat().st_size > 1000


def test_graphed_batch_cases_compare_with_graphed_ntp(tmp_path):
    """On CUDA the batch study adds ``<strategy>+graph`` cases: the table, the plot and
    ``mtpkern bench``'s summary hold each against ntp with the same CUDA-graph setting."""
    from mtpkern.plots import ntp_of, plot_batch

    def case(tps):
        return {str(b): dict(tokens_per_second=t, mean_accept_length=2.0) for b, t in zip((1, 4), tps)}

    batched = {"medusa": {"ntp": case((100.0, 300.0)), "medusa": case((150.0, 330.0)),
                          "ntp+graph": case((400.0, 800.0)), "medusa+graph": case((1000.0, 1200.0))}}
    assert [ntp_of(s) for s in batched["medusa"]] == ["ntp", "ntp", "ntp+graph", "ntp+graph"]
    report = {"device": {"name": "X", "type": "cuda", "dtype": "float16", "torch": "t", "transformers": "t"},
              "settings": {"max_new_tokens": 4, "prompts": 1}, "weights": "", "cases": {}, "step_breakdown": {},
              "batched": batched}
    text = format_bench(report)
    assert "medusa+graph, tokens/s): B=1 1000.0 (2.50x its ntp), B=4 1200.0 (1.50x its ntp)" in text
    assert "medusa, tokens/s): B=1 150.0 (1.50x its ntp), B=4 330.0 (1.10x its ntp)" in text
    assert "ntp+graph, tokens/s): B=1 400.0, B=4 800.0\n" in text
    assert plot_batch(batched, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 1000


def test_step_parts_and_pass_hooks_are_the_engines_public_profiling_hooks(gpt2_model, medusa_model):
    """``step_parts`` (what step_breakdown times) refuses an engine without a tree step, and its
    ``rest`` restores the verification pass; ``hooked_passes`` sees every pass and restores them."""
    with pytest.raises(TypeError, match="step_parts profiles a tree step; this engine runs _NTPStep"):
        Decoder(gpt2_model, "ntp").step_parts(8)
    dec = Decoder(medusa_model, "medusa", tree=[[0], [1], [0, 0]], kernels="eager")
    verify = dec.step.forward
    with torch.inference_mode():
        parts = dec.step_parts(8)
        n = parts["rest"]()[0]
    assert dec.step.forward is verify and 1 <= n <= 3
    assert parts["draft_heads"] is not None and parts["draft_heads"]().shape[:2] == (1, dec.tree.max_depth)
    seen = []

    def hook(fn):
        def call(*args):
            seen.append(type(fn).__name__)
            return fn(*args)
        return call

    prompt = [1, 2, 3, 4]
    plain = dec.generate(prompt, max_new_tokens=6).tokens
    with dec.hooked_passes(hook):
        hooked = dec.generate(prompt, max_new_tokens=6)
    assert hooked.tokens == plain and "_Forward" in seen and "_Drafts" in seen
    assert dec.step.forward is verify and type(dec.step.drafter).__name__ == "_Drafts"


def test_bench_decode_sampling_study(tmp_path):
    """``bench_decode.py --sampling``: per speculative model, ntp sampling, rejection sampling on
    a chain, a tree and ``dynamic``, typical acceptance on the trees, at each temperature, and
    greedy on the same shapes at temperature 0; every case measured, both tables printed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_decode.py"), "--device", "cpu", "--threads", "1",
                        "--prompts", "2", "--max-new-tokens", "5", "--sampling", "0.7,1.0", "--json", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    study = report["sampling"]
    assert set(study) == {"medusa", "mtp"} and report["seed"] == 0
    trees = {"medusa": "default tree (61 drafts)", "mtp": "3,2,1"}
    for family, by_t in study.items():
        assert set(by_t) == {"0.0", "0.7", "1.0"}
        shapes = ["chain:3", trees[family], "dynamic"]
        assert set(by_t["0.0"]) == {"ntp"} | {f"greedy {s}" for s in shapes}
        for T in ("0.7", "1.0"):
            assert set(by_t[T]) == ({"ntp"} | {f"rejection {s}" for s in shapes}
                                    | {f"typical {s}" for s in shapes[1:]}), by_t[T]
        for T, cases in by_t.items():
            for name, c in cases.items():
                assert "error" not in c, (family, T, name, c)
                assert c["tokens_per_second"] > 0 and c["speedup_vs_ntp"] > 0, (family, T, name)
                assert 1 <= c["mean_accept_length"] <= 4, (family, T, name)  # 3 draft heads
            assert cases["ntp"]["mean_accept_length"] == 1 and cases["ntp"]["speedup_vs_ntp"] == 1
    assert "| mtp: rejection 3,2,1 | 0.7 |" in r.stdout and "| medusa: ntp | 1.0 |" in r.stdout
    assert "| mtp: 3,2,1 | " in r.stdout and "rejection, sampled drafts, T=1.0" in r.stdout


def test_sampling_runs_repeat_themselves_from_their_seed(medusa_model):
    """A sampling case draws from its own seeded generator: the same seed gives the same tokens,
    another seed (almost surely) others."""
    from mtpkern.bench import sampling_cases, sampling_run

    options = dict(sampling_cases(medusa_model, "medusa", 1.0))["rejection chain:" + str(medusa_model.n_heads - 1)]
    prompt = torch.tensor([1, 2, 3, 4])

    def tokens(seed):
        return sampling_run(medusa_model, options, max_new_tokens=12, eos_token_id=None, seed=seed)(prompt).tokens

    with torch.inference_mode():
        assert tokens(0) == tokens(0)
        assert any(tokens(0) != tokens(s) for s in (1, 2, 3))
