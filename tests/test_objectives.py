"""The objectives of mtpkern.objectives beyond the first three: MEDUSA heads with their own
projections, MEDUSA-2 (joint training, heads' warmup, KL backbone loss) and their errors.
Every run is a tiny model for a few steps."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _tiny import assert_same_greedy_tokens, pattern_batch, random_prompts, tiny_gpt2, tiny_medusa
from mtpkern.generation import generate
from mtpkern.config import GPT2Config
from mtpkern.hf_io import load_model
from mtpkern.models import GPT2, MedusaModel
from mtpkern.objectives import OBJECTIVES, Medusa2, head_loss, kl_to_teacher, medusa2_loss
from mtpkern.train import TrainConfig, train
from test_train import make_base, tiny_run, train_losses


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def _labels(idx):
    labels = idx.clone()
    labels[:, :3] = -100  # a prompt
    labels[0, -2:] = -100  # padding
    return labels


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("proj", [False, True])
def test_medusa2_loss_is_backbone_plus_lambda_times_weighted_heads(proj):
    torch.manual_seed(0)
    base = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    model = MedusaModel.from_base(base, n_heads=3, proj=proj)
    for p in model.parameters():
        p.requires_grad_(True)
        p.data.add_(0.01 * torch.randn_like(p))  # heads away from the identity
    idx = torch.randint(0, 97, (2, 17))
    labels = _labels(idx)
    w = [1.0, 0.8]
    loss, per_head = medusa2_loss(model, idx, labels, w, heads_coefficient=0.2, fused=False)
    hidden = model(idx, logits=False).hidden
    ce = [head_loss(model, hidden[:, :, j], labels, j, fused=False) for j in range(3)]
    torch.testing.assert_close(per_head, torch.stack(ce).detach())
    torch.testing.assert_close(loss, ce[0] + 0.2 * (w[0] * ce[1] + w[1] * ce[2]))
    # the fused linear cross-entropy gives the same loss and gradients
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused, _ = medusa2_loss(model, idx, labels, w, heads_coefficient=0.2, fused=True)
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-6)
    fused.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_medusa2_heads_warmup_leaves_the_backbone_without_gradient():
    torch.manual_seed(0)
    model = MedusaModel.from_base(GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)),
                                  n_heads=3)
    for p in model.base.parameters():
        p.requires_grad_(True)
    idx = torch.randint(0, 97, (2, 17))
    labels = _labels(idx)
    loss, per_head = medusa2_loss(model, idx, labels, [1.0, 0.8], heads_coefficient=0.2, train_backbone=False)
    torch.testing.assert_close(loss, per_head[1] + 0.8 * per_head[2])  # MEDUSA-1's loss
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())  # the shared unembedding too
    assert all(p.grad is not None for p in model.medusa.parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_head_loss_drops_rows_without_a_target_and_keeps_loss_and_gradients(fused):
    """On the CPU head_loss computes logits only where a label is (target_rows): its loss and
    gradients equal cross-entropy over every position with the ignored ones masked."""
    from mtpkern.objectives import target_rows

    torch.manual_seed(0)
    model = MedusaModel.from_base(GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)),
                                  n_heads=3)
    idx = torch.randint(0, 97, (3, 12))
    labels = _labels(idx)
    hidden = torch.randn(3, 12, model.config.n_embd, requires_grad=True)
    for j in (0, 2):
        got = head_loss(model, hidden, labels, j, fused=fused)
        (g_got,) = torch.autograd.grad(got, hidden)
        target = labels[:, j + 1:].flatten()
        logits = hidden[:, : 12 - j - 1].flatten(0, 1) @ model.head_weight(j).T
        want = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
        (g_want,) = torch.autograd.grad(want, hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    rows, kept = target_rows(hidden.flatten(0, 1), labels.flatten())
    assert kept.tolist() == [t for t in labels.flatten().tolist() if t != -100] and rows.shape[0] == kept.numel()
    none = torch.full((4,), -100)
    assert target_rows(torch.randn(4, 2), none)[1] is none  # nothing to keep: every row stays, no empty matmul


def test_kl_to_the_model_itself_is_zero_and_positive_otherwise():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    idx = torch.randint(0, 97, (2, 17))
    labels = _labels(idx)
    with torch.no_grad():
        out = model(idx)
    kl = kl_to_teacher(model, out.hidden[:, :, 0], out.logits[:, :, 0], labels)
    assert abs(float(kl)) < 1e-5
    other = torch.randn_like(out.logits[:, :, 0])
    assert float(kl_to_teacher(model, out.hidden[:, :, 0], other, labels)) > 0.1


def test_medusa2_learning_rates_heads_first_then_the_backbone_ramps_up():
    cfg = TrainConfig(objective="medusa2", out="o", base="b", head_warmup=4, backbone_lr_ratio=0.25)
    objective = Medusa2(cfg)
    heads = [objective.lr_scale("heads", s, warmup=2) for s in range(8)]
    backbone = [objective.lr_scale("backbone", s, warmup=2) for s in range(8)]
    assert heads == [1.0] * 8
    assert backbone == [0.0] * 4 + [0.125, 0.25, 0.25, 0.25]
    assert set(OBJECTIVES) == {"ntp", "mtp", "medusa", "medusa2"}


# ----------------------------------------------------------------------------- training runs


def test_medusa_proj_trains_its_own_projections_and_round_trips(tmp_path, base_dir):
    result = train(tiny_run(tmp_path / "proj", "medusa", base_dir, n_heads=3, lr=1e-2, steps=4, medusa_proj=True))
    model = load_model(result.checkpoint)
    assert isinstance(model, MedusaModel) and model.config.medusa_proj
    base = load_model(base_dir)
    for head in model.medusa:
        assert head.proj is not None and not torch.equal(head.proj.weight, base.wte.weight)  # trained
    assert torch.equal(model.base.wte.weight, base.wte.weight)  # MEDUSA-1: the base is frozen
    saved = json.loads((tmp_path / "proj" / "train_config.json").read_text())
    assert saved["medusa_proj"] is True


def test_medusa2_trains_the_backbone_after_the_heads_warmup(tmp_path, base_dir):
    base = load_model(base_dir)
    held = train(tiny_run(tmp_path / "held", "medusa2", base_dir, n_heads=3, steps=3, head_warmup=3))
    for name, p in base.state_dict().items():  # the warmup covers the whole run
        assert torch.equal(held.model.base.state_dict()[name], p), name
    joined = train(tiny_run(tmp_path / "joined", "medusa2", base_dir, n_heads=3, steps=6, head_warmup=2))
    moved = [n for n, p in base.state_dict().items() if not torch.equal(joined.model.base.state_dict()[n], p)]
    assert "wte.weight" in moved and len(moved) == len(base.state_dict())
    losses = train_losses(joined.log_path)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    records = [json.loads(line) for line in Path(joined.log_path).read_text().splitlines()]
    assert len(records[0]["head_losses"]) == 3  # the backbone's loss, then each head's
    saved = json.loads((tmp_path / "joined" / "train_config.json").read_text())
    assert saved["objective"] == "medusa2" and saved["head_warmup"] == 2 and saved["heads_coefficient"] == 0.2
    default = TrainConfig(objective="medusa2", out="o", base="b")
    assert (default.lr, default.heads_coefficient, default.backbone_lr_ratio, default.n_heads) == (1e-3, 0.2, 0.25, 6)


def test_medusa2_heads_warm_up_for_a_quarter_of_the_run_by_default(tmp_path, base_dir):
    cfg = tiny_run(tmp_path / "run", "medusa2", base_dir, n_heads=3, steps=8)
    train(cfg)
    assert cfg.head_warmup is None  # the caller's config is not changed
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["head_warmup"] == 2
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["config"]["head_warmup"] == 2  # a resumed run keeps it, whatever its new length


@pytest.mark.parametrize("kw", [
    dict(objective="medusa", medusa_proj=True, lr=1e-2),
    dict(objective="medusa2", head_warmup=3),
    dict(objective="medusa2", head_warmup=2, backbone_loss="kl", loss="plain"),
], ids=["medusa-proj", "medusa2", "medusa2-kl-plain"])
def test_new_objectives_resume_with_the_same_loss_curve(tmp_path, base_dir, kw):
    kw = dict(kw)
    cfg = tiny_run(tmp_path / "full", kw.pop("objective"), base_dir, n_heads=3, steps=8, save_every=4, **kw)
    full = train(cfg)
    split = replace(cfg, out=str(tmp_path / "split"), stop_after=4)  # the interruption after the warmup
    assert train(split).steps == 4
    resumed = train(replace(split, stop_after=None, resume=True))
    assert resumed.steps == 8
    a, b = train_losses(full.log_path), train_losses(resumed.log_path)
    assert len(a) == len(b) == 8
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_medusa2_decodes_losslessly_against_its_own_ntp():
    """A MEDUSA-2 model (the tiny trained MEDUSA model, fine-tuned jointly) decodes greedily the
    tokens its own new backbone's ntp decodes, not the original base's."""
    model = MedusaModel.from_base(tiny_gpt2(), n_heads=4)
    model.load_state_dict(tiny_medusa().state_dict())
    for p in model.base.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(objective="medusa2", out="o", base="b", n_heads=4, head_warmup=0)
    objective = Medusa2(cfg, fused=False)
    opt = torch.optim.AdamW([g for g in objective.param_groups(model) if g["params"]], lr=3e-3)
    g = torch.Generator().manual_seed(5)
    model.train()
    for step in range(15):
        x = pattern_batch(8, 36, g)
        loss, _ = objective.loss(model, x, x, n_tokens=None, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    original = tiny_gpt2()
    assert not torch.equal(model.base.h[0].mlp.c_fc.weight, original.h[0].mlp.c_fc.weight)
    accepted, changed = [], 0
    for prompt in random_prompts(6, seed=3):
        ids = torch.tensor(prompt)
        ntp = generate(model, ids, max_new_tokens=24, strategy="ntp").tokens
        out = generate(model, ids, max_new_tokens=24, strategy="medusa", kernels="eager")
        assert_same_greedy_tokens(model, prompt, out.tokens, ntp)
        accepted.append(out.mean_accept_length)
        changed += ntp != generate(original, ids, max_new_tokens=24, strategy="ntp").tokens
    assert max(accepted) > 1.0  # the heads' drafts are accepted: the check is not vacuous
    assert changed > 0  # and the new backbone decodes differently from the original one


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, message", [
    (dict(objective="medusa2"), "objective 'medusa2' needs a trained base model"),
    (dict(objective="mtp", medusa_proj=True), "objective 'mtp' has no MEDUSA heads"),
    (dict(objective="ntp", medusa_proj=True), "objective 'ntp' has no MEDUSA heads"),
    (dict(objective="medusa", base="b", backbone_loss="kl"), "MEDUSA-2 setting"),
    (dict(objective="medusa2", base="b", backbone_loss="mse"), "unknown backbone_loss"),
    (dict(objective="medusa2", base="b", teacher="t"), "needs backbone_loss 'kl'"),
    (dict(objective="medusa2", base="b", heads_coefficient=0.0), "heads_coefficient"),
    (dict(objective="medusa2", base="b", backbone_lr_ratio=-1.0), "backbone_lr_ratio"),
    (dict(objective="medusa2", base="b", head_warmup=-1), "head_warmup"),
    (dict(objective="mtp", trunk_lr_ratio=0.0), "trunk_lr_ratio must be a finite number > 0"),
    (dict(objective="medusa", base="b", trunk_lr_ratio=0.1), "an MTP setting: objective 'medusa'"),
])
def test_bad_settings_are_one_line_value_errors(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(out="out", **kw)
    assert "\n" not in str(e.value)


def test_mtp_trunk_lr_ratio_slows_the_trunk_and_not_the_draft_heads(tmp_path, base_dir):
    """trunk_lr_ratio: the draft heads train at lr, the trunk, head 0 and the embedding at
    lr * ratio (here ~0: they stay as they were); the default trains every part at lr."""
    from mtpkern.models import MTPModel

    start = MTPModel.from_base(load_model(base_dir), n_heads=3)
    moved = {}
    for ratio in (1e-9, 1.0):
        model = train(tiny_run(tmp_path / str(ratio), "mtp", base_dir, n_heads=3, steps=3, trunk_lr_ratio=ratio)).model
        delta = {n: (p.detach() - dict(start.named_parameters())[n]).abs().max().item()
                 for n, p in model.named_parameters()}
        moved[ratio] = (max(d for n, d in delta.items() if not n.startswith(("heads.1.", "heads.2."))),
                        min(d for n, d in delta.items() if n.startswith(("heads.1.", "heads.2.")) and "weight" in n))
    assert moved[1e-9][0] < 1e-7 < 1e-4 < moved[1e-9][1]  # trunk still, draft heads trained
    assert moved[1.0][0] > 1e-4  # one rate: the trunk trains too


def test_a_kl_teacher_with_another_vocabulary_fails_before_training(tmp_path, base_dir):
    teacher = tmp_path / "teacher"
    GPT2(GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2)).save_pretrained(teacher)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="vocabulary of 300 tokens") as e:
        train(tiny_run(out, "medusa2", base_dir, n_heads=3, backbone_loss="kl", teacher=str(teacher)))
    assert "\n" not in str(e.value)
    assert not (out / "checkpoint").exists() and not (out / "log.jsonl").exists()
