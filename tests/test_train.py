"""Tests for mtpkern.train: losses and their offsets, the MTP backward order, the frozen MEDUSA
base, checkpoints, resume, signals and config errors. Every run is a tiny model for a few steps."""

import errno
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mtpkern.checkpoint import CheckpointError, run_lock
from mtpkern.data import IGNORE_INDEX, DataError, synthetic_records, train_tokenizer
from mtpkern.config import GPT2Config
from mtpkern.hf_io import load_model
from mtpkern.layers import ModelOutput
from mtpkern.models import GPT2, MedusaModel, MTPModel
from mtpkern.train import (
    TrainConfig,
    evaluate_heads,
    lr_at,
    medusa_loss,
    mtp_loss_and_backward,
    mtp_loss_naive,
    TrainingDiverged,
    train,
)


def make_base(directory: Path) -> Path:
    """A random 2-layer GPT-2 (n_embd 32) with a 512-token BPE tokenizer, saved as a base."""
    tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=512)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2(cfg).save_pretrained(directory, tokenizer=tok)
    return directory


def tiny_run(out: Path, objective: str, base: Path, **kw) -> TrainConfig:
    """A few-step run: 80 synthetic records, batch 4, up to 128 tokens, a log record every step.
    On the CPU in fp32 wherever the tests run: they compare losses and weights exactly, which a
    GPU's "auto" precision (bf16 autocast) and kernels would not reproduce."""
    args = dict(objective=objective, out=str(out), base=str(base), data_limit=80, steps=6, batch_size=4,
                max_len=128, lr=3e-3, val_fraction=0.1, eval_every=1000, eval_batches=2, save_every=1000,
                log_every=1, progress=False, device="cpu", precision="fp32")
    args.update(kw)
    return TrainConfig(**args)


def train_losses(log_path) -> list[float]:
    return [r["loss"] for r in map(json.loads, Path(log_path).read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir):
    """One 30-step run per objective; MEDUSA's base is the ntp run's result, as in practice."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for objective in ("ntp", "mtp", "medusa"):
        base = out["ntp"].checkpoint if objective == "medusa" else base_dir
        kw = {"ntp": {}, "mtp": dict(n_heads=2), "medusa": dict(n_heads=3)}[objective]  # one draft head; two
        if objective == "medusa":
            kw["lr"] = 1e-2  # MEDUSA-1 trains small heads on a frozen base: a high rate is usual
        t0 = time.perf_counter()
        out[objective] = train(tiny_run(root / objective, objective, base, steps=30, eval_every=15, **kw))
        print(f"{objective}: 30 steps in {time.perf_counter() - t0:.1f} s")
    return out


# ----------------------------------------------------------------------------- losses


def _labels(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a "prompt"
    labels[0, -4:] = IGNORE_INDEX  # "padding"
    return labels


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mtp_memory_efficient_order_matches_naive_gradients(checkpointing):
    torch.manual_seed(0)
    model = MTPModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=2,
                                model_type="mtp", n_heads=3)).train()
    model.gradient_checkpointing = checkpointing
    idx = torch.randint(0, 97, (2, 19))
    labels = _labels(2, 19, 97, seed=1)

    naive = mtp_loss_naive(model, idx, labels)
    (2.5 * naive).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss, per_head = mtp_loss_and_backward(model, idx, labels, scale=2.5)
    assert per_head.shape == (3,)
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_head.mean(), loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


class Oracle(nn.Module):
    """A fake model whose head j at position t puts a large logit on truth[t + j + 1 + shift]:
    right by construction when shift = 0, always wrong otherwise (truth has no repeats)."""

    def __init__(self, truth, n_heads, shift=0):
        super().__init__()
        self.truth, self.n_heads, self.shift = truth, n_heads, shift
        self.register_buffer("eye", torch.eye(truth.max().item() + 1))

    def head_weight(self, j):
        return self.eye

    def head_logits(self, hidden, j):
        return (hidden @ self.head_weight(j).T).float()

    def forward(self, idx, logits=False):
        B, T = self.truth.shape
        hidden = torch.zeros(B, T, self.n_heads, self.eye.shape[0])
        hidden[..., 0] = 5.0  # where a head has no oracle token, predict 0, which is never a label
        for j in range(self.n_heads):
            ahead = j + 1 + self.shift
            hidden[:, : T - ahead, j] = 20.0 * self.eye[self.truth[:, ahead:]]
        return ModelOutput(hidden, None)


def _oracle_data(B=3, T=12):
    truth = torch.stack([torch.randperm(40)[:T] + 1 for _ in range(B)])  # no repeats in a row, no 0
    labels = truth.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    return truth, labels


def test_evaluate_heads_scores_each_head_at_its_true_offset():
    torch.manual_seed(0)
    truth, labels = _oracle_data()
    batch = [{"input_ids": truth, "labels": labels}]
    right = evaluate_heads(Oracle(truth, 3), batch, "cpu")
    assert right["acc_top1"] == [1.0, 1.0, 1.0]
    assert right["acc_top5"] == [1.0, 1.0, 1.0]
    assert right["loss"] < 1e-6 and right["ppl"] == pytest.approx(1.0)
    # head j scores labels[t + j + 1] for t + j + 1 < T: the -100s are never counted
    assert right["n_tokens"] == [int((labels[:, j + 1 :] != IGNORE_INDEX).sum()) for j in range(3)]
    wrong = evaluate_heads(Oracle(truth, 3, shift=1), batch, "cpu")
    assert wrong["acc_top1"] == [0.0, 0.0, 0.0]
    assert wrong["loss"] > 10


def test_medusa_loss_scores_medusa_head_k_against_t_plus_k_plus_2():
    torch.manual_seed(1)
    truth, labels = _oracle_data()
    loss, per_head = medusa_loss(Oracle(truth, 4), truth, labels, [1.0, 0.8, 0.64])
    assert per_head.shape == (3,) and per_head.max() < 1e-6
    _, wrong = medusa_loss(Oracle(truth, 4, shift=1), truth, labels, [1.0, 0.8, 0.64])
    assert wrong.min() > 10
    assert medusa_loss(Oracle(truth, 4, shift=1), truth, labels, [1.0, 0.0, 0.0])[0] == pytest.approx(float(wrong[0]))
    with pytest.raises(ValueError, match="head weights"):
        medusa_loss(Oracle(truth, 4), truth, labels, [1.0])


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, lr=1.0, warmup=4, total=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, lr=1.0, warmup=4, total=20) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("objective", ["ntp", "mtp", "medusa"])
def test_loss_decreases(runs, objective):
    losses = train_losses(runs[objective].log_path)
    assert len(losses) == 30
    # MEDUSA heads sit on a base trained for 30 steps only: they can learn much less
    factor = 0.95 if objective == "medusa" else 0.8
    assert sum(losses[-5:]) / 5 < factor * sum(losses[:5]) / 5, losses


def test_log_and_summary_fields(runs):
    result = runs["mtp"]
    records = [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    for key in ("step", "loss", "head_losses", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "elapsed_s"):
        assert key in train_rec[0], key
    assert [r["step"] for r in train_rec] == list(range(1, 31))
    assert len(train_rec[0]["head_losses"]) == 2
    assert train_rec[0]["loss"] == pytest.approx(sum(train_rec[0]["head_losses"]) / 2, rel=1e-5)
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in train_rec)
    assert [r["step"] for r in evals] == [15, 30]
    assert len(evals[-1]["val_acc_top1"]) == 2 and math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]))
    out = Path(result.checkpoint).parent
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and not summary["interrupted"]
    assert summary["val_loss"] == pytest.approx(evals[-1]["val_loss"]) == pytest.approx(result.val_loss)
    assert summary["head_acc"] == result.head_acc and summary["time_per_epoch_s"] > 0
    assert json.loads((out / "train_config.json").read_text())["n_heads"] == 2


def test_medusa_keeps_the_base_bit_identical(runs):
    base = load_model(runs["ntp"].checkpoint)
    trained = load_model(runs["medusa"].checkpoint)
    assert isinstance(trained, MedusaModel)
    for name, p in base.state_dict().items():
        assert torch.equal(trained.base.state_dict()[name], p), name
    assert any(head.blocks[0].linear.weight.abs().sum() > 0 for head in trained.medusa)  # heads trained
    # and no gradient ever reaches the base
    model = runs["medusa"].model.train()
    idx = torch.randint(0, 100, (2, 16))
    medusa_loss(model, idx, idx, [1.0, 0.8])[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is not None for p in model.medusa.parameters())


def test_checkpoint_round_trip(runs):
    for objective, result in runs.items():
        loaded = load_model(result.checkpoint)
        assert type(loaded) is type(result.model)
        idx = torch.randint(0, 100, (2, 20))
        torch.testing.assert_close(loaded(idx).logits, result.model.eval()(idx).logits, rtol=0, atol=0)
        state = torch.load(Path(result.checkpoint) / "trainer_state.pt", weights_only=True)
        assert state["step"] == 30 and state["config"]["objective"] == objective


def test_grad_accumulation_matches_one_big_batch(tmp_path, base_dir):
    """N_j counts the whole global batch, so 2 x 4 with accumulation = 1 x 8."""
    big = train(tiny_run(tmp_path / "big", "mtp", base_dir, n_heads=2, batch_size=8, steps=3))
    acc = train(tiny_run(tmp_path / "acc", "mtp", base_dir, n_heads=2, batch_size=4, grad_accum=2, steps=3))
    torch.testing.assert_close(train_losses(acc.log_path), train_losses(big.log_path), rtol=1e-5, atol=1e-6)


def test_resume_continues_the_same_loss_curve(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "full", "mtp", base_dir, n_heads=2, steps=8, save_every=4)
    full = train(cfg)
    cfg = replace(cfg, out=str(tmp_path / "split"), stop_after=4)
    first = train(cfg)
    assert first.interrupted and first.steps == 4
    resumed = train(replace(cfg, stop_after=None, resume=True))
    assert resumed.steps == 8 and not resumed.interrupted
    a, b = train_losses(full.log_path), train_losses(resumed.log_path)
    assert len(a) == len(b) == 8
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_resume_and_overwrite_errors(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "ntp", base_dir, steps=2)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(replace(cfg, resume=True))
    train(cfg)
    with pytest.raises(ValueError, match="already exists"):
        train(cfg)  # a fresh run never overwrites a checkpoint
    with pytest.raises(ValueError, match="objective 'ntp', not 'mtp'"):
        train(replace(cfg, objective="mtp", n_heads=2, resume=True))
    state = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(replace(cfg, resume=True, steps=4))
    state.unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        train(replace(cfg, resume=True, steps=4))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_writes_a_checkpoint_and_exits_non_zero(tmp_path, base_dir, sig, code):
    """The checkpoint is written, and the exit status tells a scheduler the run was interrupted."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MTPKERN_DEBUG", None)
    cmd = [sys.executable, "-m", "mtpkern.cli", "train", "ntp", "--out", str(out), "--base", str(base_dir),
           "--data-limit", "80", "--steps", "100000", "--batch-size", "4", "--max-len", "128",
           "--eval-every", "100000", "--save-every", "100000", "--no-progress", "--device", "cpu",
           "--precision", "fp32"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, output
    assert f"stopped by {signal.Signals(sig).name}" in output and "--resume" in output
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert 20 <= state["step"] < 100000  # a log record every 10 steps: two were written
    assert len(train_losses(log)) == state["step"] // 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == state["step"] and summary["signal"] == sig
    assert isinstance(load_model(out / "checkpoint"), GPT2)


def test_resume_after_the_tokenizer_is_lost_is_an_error(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "ntp", base_dir, steps=2)
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoint"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (ckpt / f).unlink(missing_ok=True)
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(DataError, match="has no tokenizer"):
        train(replace(cfg, resume=True, steps=4))
    assert (ckpt / "model.safetensors").read_bytes() == before  # nothing was trained or saved


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, base_dir):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite at step (\d+) .* keeps step") as e:
        train(tiny_run(out, "ntp", base_dir, lr=1e6, warmup=0, steps=6, save_every=1))
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == bad - 1  # saved every step until the loss went non-finite
    model = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "error" and records[-1]["step"] == bad


def test_resume_keeps_the_saved_configuration(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "mtp", base_dir, n_heads=2, steps=2)
    train(cfg)
    for change, flag in [(dict(n_heads=3), "--n-heads 3"), (dict(batch_size=8), "--batch-size 8"),
                         (dict(lr=1e-3), "--lr 0.001"), (dict(data_limit=60), "--data-limit 60")]:
        with pytest.raises(ValueError, match=f"{flag} contradicts the run's saved .* only --steps, --epochs"):
            train(replace(cfg, resume=True, steps=4, **change))
    # flags left unset take the saved values; --steps may change, to extend the run
    result = train(TrainConfig(objective="mtp", out=str(tmp_path / "run"), resume=True, steps=4, progress=False))
    assert result.steps == 4 and result.model.n_heads == 2
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["n_heads"] == 2 and saved["batch_size"] == 4 and saved["lr"] == 3e-3 and saved["steps"] == 4


def test_a_second_training_into_the_same_out_fails_at_once(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "ntp", base_dir, steps=2)
    with run_lock(tmp_path / "run"):  # another training holds the run
        with pytest.raises(CheckpointError, match="in use by another training"):
            train(cfg)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "log.jsonl").exists()
    train(cfg)  # the lock is gone with its holder


def test_resume_recovers_an_interrupted_save_and_cleans_leftovers(tmp_path, base_dir):
    out = tmp_path / "run"
    cfg = tiny_run(out, "ntp", base_dir, steps=2)
    train(cfg)
    # a kill between the two renames of a save, after earlier kills mid-write
    os.replace(out / "checkpoint", out / ".checkpoint.old-424242")
    (out / ".checkpoint.tmp-k1ll3d").mkdir()
    with pytest.raises(ValueError, match=r"interrupted save .*\(--resume\)"):
        train(cfg)  # a fresh start must not throw the only copy away
    result = train(replace(cfg, resume=True, steps=4))
    assert result.steps == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []


def test_resume_drops_a_half_written_last_log_line(tmp_path, base_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_run(out, "ntp", base_dir, steps=2)
    train(cfg)
    n_lines = len((out / "log.jsonl").read_text().splitlines())
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')
    train(replace(cfg, resume=True, steps=3))
    assert f"log.jsonl:{n_lines + 1}: dropped a half-written last line" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kw, message", [
    (dict(objective="ppo"), "unknown objective"),
    (dict(steps=10, epochs=1.0), "not both"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=-1e-3), "lr must be a finite number > 0"),
    (dict(lr=math.inf), "lr must be a finite number > 0, got inf"),
    (dict(lr=math.nan), "lr must be a finite number > 0, got nan"),
    (dict(steps=None, epochs=math.inf), "epochs must be a finite number > 0, got inf"),
    (dict(out=""), "--out\\) is empty"),
    (dict(seed=2**64), "seed must be an integer from 0 to 2\\*\\*63 - 1"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(objective="mtp", n_heads=1), "objective 'mtp' needs n_heads >= 2"),
    (dict(objective="medusa", base=None), "needs a trained base"),
    (dict(device="tpu"), "device"),
    (dict(device="gpu0"), "unknown device"),
    (dict(precision="fp8"), "unknown precision"),
    (dict(objective="medusa", base="b", n_heads=3, head_weights=[1.0]),
     r"head_weights has 1 entries, but n_heads=3 makes 2 MEDUSA heads: one weight per MEDUSA head \(n_heads - 1\)"),
    (dict(objective="medusa", base="b", n_heads=1), "objective 'medusa' needs n_heads >= 2"),
    (dict(objective="medusa2", base="b", n_heads=1), "objective 'medusa2' needs n_heads >= 2"),
    (dict(batch_size=0), "batch_size"),
    (dict(config="llama"), "unknown model config"),
    (dict(objective="mtp", n_heads=64, max_len=64), r"n_heads \(--n-heads\) 64 .* below the sequence length, "
                                                    r"max_len \(--max-len\) 64"),
    (dict(objective="medusa", base="b", n_heads=64, max_len=64), r"n_heads \(--n-heads\) 64 must be below the "
                                                                 r"sequence length"),
    (dict(objective="medusa2", base="b", steps=10, head_warmup=11), r"head_warmup \(--head-warmup\) 11 is longer "
                                                                    r"than the run's 10 steps"),
])
def test_bad_config_raises_one_line_value_error(kw, message):
    args = dict(objective="ntp", out="out")
    args.update(kw)
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(**args)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainConfig(objective="ntp", out="out", device="cuda")
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(objective="ntp", out="out", precision="fp16")


def test_defaults_resolve_per_objective():
    assert TrainConfig(objective="mtp", out="o").n_heads == 4
    cfg = TrainConfig(objective="medusa", out="o", base="b")
    assert cfg.n_heads == 6 and cfg.lr == 1e-3 and cfg.steps == 200  # MEDUSA's 5 heads and the next-token head
    assert cfg.head_weights == pytest.approx([1.0, 0.8, 0.64, 0.512, 0.4096])  # one per MEDUSA head


def test_model_shapes_from_scratch():
    """`--config tiny|demo|gpt2`: demo is the tiny family at 6 layers (the demo's models)."""
    from mtpkern.cli import build_parser
    from mtpkern.train import model_shape

    ids = dict(vocab_size=100, eos_token_id=0, bos_token_id=0)
    tiny, demo, gpt2 = (model_shape(n, **ids) for n in ("tiny", "demo", "gpt2"))
    assert (tiny.n_layer, tiny.n_embd) == (4, 128) and (demo.n_layer, demo.n_embd) == (6, 128)
    assert (gpt2.n_layer, gpt2.n_embd) == (12, 768)
    assert build_parser().parse_args(["train", "ntp", "--out", "o", "--config", "demo"]).config == "demo"


# ----------------------------------------------------------------------------- refusals that keep what is there


def _files(directory: Path) -> dict:
    """Every file under ``directory`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", [
    {"log.jsonl": '{"my": "data"}\n', "summary.json": '{"mine": 1}\n'},
    {"notes.txt": "mine"},
    {"train_config.json": '{"my": "settings"}'},
])
def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, base_dir, content):
    out = tmp_path / "u"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match=r"is not empty and is not an mtpkern run .* choose an empty or new") as e:
        train(tiny_run(out, "ntp", base_dir, steps=2))
    assert "\n" not in str(e.value)
    with pytest.raises((ValueError, CheckpointError)):
        train(tiny_run(out, "ntp", base_dir, steps=2, resume=True))
    assert _files(out) == {k: v.encode() for k, v in content.items()}  # not even a .lock


def test_a_fresh_run_may_use_an_empty_folder_a_marked_one_or_the_one_holding_its_data(tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    train(tiny_run(tmp_path / "empty", "ntp", base_dir, steps=1))
    demo = tmp_path / "demo"  # `mtpkern demo` marks its run folders before training into them
    demo.mkdir()
    (demo / ".mtpkern-demo").write_text("written by `mtpkern demo`\n")
    train(tiny_run(demo, "ntp", base_dir, steps=1))
    med = tmp_path / "med"  # distilled answers kept in the run's folder, as the demo does
    med.mkdir()
    data = med / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(40, seed=3)))
    train(tiny_run(med, "ntp", base_dir, steps=1, data=str(data), data_limit=None))
    # a run killed before its first checkpoint is still a run: a fresh start may replace it
    shutil.rmtree(med / "checkpoint")
    train(tiny_run(med, "ntp", base_dir, steps=1, data=str(data), data_limit=None))
    assert data.read_text().count("\n") == 40


@pytest.mark.parametrize("steps", [2, 4, None])
def test_resume_with_no_steps_left_is_refused_and_keeps_the_run(tmp_path, base_dir, steps):
    out = tmp_path / "run"
    cfg = tiny_run(out, "ntp", base_dir, steps=4, eval_every=4)
    train(cfg)
    before = _files(out)
    again = TrainConfig(objective="ntp", out=str(out), resume=True, steps=steps, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"already at step 4: .* nothing to train; .*--steps.* above 4") as e:
        train(again)
    assert "\n" not in str(e.value)
    assert _files(out) == before
    assert json.loads((out / "summary.json").read_text())["val_loss"] is not None


def test_one_record_is_refused_in_one_line(tmp_path, base_dir):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"query": "what is 2 + 2?", "response": "The answer is: 4"}) + "\n")
    with pytest.raises(DataError, match=r"one.jsonl holds 1 record: training needs at least 2"):
        train(tiny_run(tmp_path / "run", "ntp", base_dir, data=str(data), data_limit=None, batch_size=1))
    with pytest.raises(DataError, match="training needs at least 2"):
        train(tiny_run(tmp_path / "run", "ntp", base_dir, data_limit=1, batch_size=1))
    assert not (tmp_path / "run").exists()  # no folder, no lock file


def test_a_validation_split_that_fits_nothing_is_reported(tmp_path, base_dir):
    from mtpkern.data import split_records

    records = [{"query": f"what is {i} + 1?", "response": f"The answer is: {i + 1}"} for i in range(12)]
    _, val = split_records(records, 0.1, 0)
    for r in val:
        r["query"] = "a very long question " * 40  # its prompt alone fills max_len
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="no validation record fits max_len=128: the run reports no validation"):
        train(tiny_run(tmp_path / "run", "ntp", base_dir, data=str(data), data_limit=None, steps=1, batch_size=2))


def test_more_heads_than_the_sequences_are_long_is_refused_before_anything_is_written(tmp_path, base_dir):
    with pytest.raises(ValueError, match=r"n_heads .* 100 .* below the sequence length.* 64"):
        train(tiny_run(tmp_path / "run", "mtp", base_dir, n_heads=100, max_len=64))
    # below max_len, but longer than every training sequence
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {i}", "response": "a"}) + "\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"100 .* longest training sequence has \d+ tokens") as e:
        train(tiny_run(tmp_path / "run", "mtp", base_dir, n_heads=100, data=str(data), data_limit=None))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_heads_beyond_a_batch_s_length_train_without_targets(tmp_path, base_dir):
    """Heads that reach past every sequence of a batch (but not of the data) get no targets in
    it: a loss of 0, not a shape error."""
    records = [{"query": f"q {i}", "response": "a"} for i in range(30)]
    records += [{"query": "q", "response": " ".join(["b"] * 80)} for _ in range(2)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = train(tiny_run(tmp_path / "run", "mtp", base_dir, n_heads=60, data=str(data), data_limit=None,
                            batch_size=2, steps=3, eval_every=3))
    assert result.steps == 3 and result.val_loss is not None


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_at_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, base_dir, monkeypatch, error):
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kw):  # the disk fills up during the second save
        calls.append(f)
        if len(calls) == 2:
            raise error
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"disk is full .*checkpoint keeps the previous checkpoint") as e:
        train(tiny_run(out, "ntp", base_dir, steps=4, save_every=2))
    assert "inline_container" not in str(e.value) and str(out / "checkpoint") in str(e.value)
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []


def test_checkpoints_take_the_umask_s_modes(tmp_path, base_dir):
    old = os.umask(0o022)
    try:
        train(tiny_run(tmp_path / "run", "ntp", base_dir, steps=1))
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoint"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {0o644}


def test_errors_name_the_flag_and_the_argument(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "ntp", base_dir, steps=1)
    train(cfg)
    with pytest.raises(ValueError, match=r"already exists: pass resume=True \(--resume\) to continue it"):
        train(cfg)


def test_a_head_warmup_longer_than_the_run_is_refused(tmp_path, base_dir):
    with pytest.raises(ValueError, match=r"head_warmup \(--head-warmup\) 8 is longer than the run's 6 steps"):
        tiny_run(tmp_path / "run", "medusa2", base_dir, n_heads=2, head_warmup=8)
    # in epochs the length is known once the data is: refused then, before anything is written
    with pytest.raises(ValueError, match=r"head_warmup \(--head-warmup\) 1000 is longer than the run's \d+ steps"):
        train(tiny_run(tmp_path / "run", "medusa2", base_dir, n_heads=2, head_warmup=1000, steps=None, epochs=1.0))
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_trained_from_scratch_says_so(tmp_path, capsys):
    train(TrainConfig(objective="ntp", out=str(tmp_path / "run"), data_limit=40, steps=1, batch_size=4,
                      vocab_size=400, device="cpu", progress=True))
    assert "training a 400-token tokenizer on 38 records" in capsys.readouterr().err


def test_auto_precision_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch):
    """``precision="auto"`` on CUDA: bf16 on a GPU that has it, else fp16 (with the loss scaler),
    never bf16 that torch would only emulate (torch's own check says yes to emulation by default)."""
    from mtpkern.train import _amp_dtype

    asked = []

    def supported(native: bool):
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return native or including_emulation
        return is_bf16_supported

    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(True))
    assert _amp_dtype("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(False))
    assert _amp_dtype("auto", gpu) is torch.float16
    assert asked == [False, False] and _amp_dtype("auto", torch.device("cpu")) is None


# ----------------------------------------------------------------------------- layers: training below the commands


def _mtpkern_imports(module: str) -> set[str]:
    """The mtpkern modules that ``module``'s source imports, function-local imports included."""
    import ast

    import mtpkern

    path = Path(mtpkern.__file__).parent / (module.split(".", 1)[1].replace(".", "/") + ".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtpkern"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("mtpkern")}
    return names


COMMANDS = {"mtpkern.calibrate", "mtpkern.commands", "mtpkern.eval", "mtpkern.bench", "mtpkern.distill",
            "mtpkern.demo", "mtpkern.cli"}


@pytest.mark.parametrize("module", ["mtpkern.train", "mtpkern.metrics", "mtpkern.rundir"])
def test_training_its_metrics_and_its_run_files_import_no_command(module):
    """The trainer, the metrics it shares with eval and the run directory's I/O sit below the
    commands: none imports calibrate, eval or any other command, not even inside a function."""
    imported = _mtpkern_imports(module)
    assert imported and not imported & COMMANDS, imported


def test_train_does_not_calibrate_but_the_train_command_does(tmp_path, base_dir):
    """``train()`` hands a finished run to ``after`` and writes no calibration; ``mtpkern train``
    (``train_and_calibrate``) ends by writing the heads' calibration.json, as before."""
    from mtpkern.cli import main
    from mtpkern.train import FinishedRun

    finished: list[FinishedRun] = []
    result = train(tiny_run(tmp_path / "api", "mtp", base_dir, steps=2, n_heads=2), after=finished.append)
    assert not (Path(result.checkpoint) / "calibration.json").exists()
    [run] = finished
    assert run.checkpoint == Path(result.checkpoint) and run.model is result.model
    assert run.config.objective == "mtp" and run.config.steps == 2 and len(run.val_records) == 8
    assert len(run.tokenizer) == result.model.config.vocab_size
    stopped = train(tiny_run(tmp_path / "stopped", "mtp", base_dir, steps=4, n_heads=2, stop_after=1),
                    after=finished.append)
    assert stopped.interrupted and len(finished) == 1  # a run stopped early is not finished
    out = tmp_path / "cli"
    assert main(["train", "mtp", "--out", str(out), "--base", str(base_dir), "--steps", "2", "--n-heads", "2",
                 "--data-limit", "80", "--batch-size", "4", "--max-len", "128", "--device", "cpu",
                 "--precision", "fp32", "--no-progress"]) == 0
    assert load_model(out / "checkpoint").calibration is not None
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
