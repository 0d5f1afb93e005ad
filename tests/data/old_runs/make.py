"""Make the run folders in this directory with the code of an older commit (see README.md).

    git worktree add OLD f0b7180
    cd tests/data/old_runs && PYTHONPATH=OLD python make.py

Run from this directory, with relative paths, so that the saved train_config.json names no
machine's folders. It writes a random 2-layer GPT-2 base (n_embd 8, a 512-token tokenizer;
removed at the end: the runs need only their own checkpoints), then trains a MEDUSA run with
``--n-heads 2`` (two MEDUSA heads, as that commit counts them) and an MTP run with
``--n-heads 3`` (three heads, the next-token head included) for 2 steps each: each run
folder holds its checkpoint, trainer state, log, summary, train_config.json and the
calibration.json that ``mtpkern train`` wrote after training. ``expected.json`` holds what
that commit's code computed with each checkpoint: every head's top-1 token at every position
of a fixed prompt, the first 32 logits of every head at its last position, and its greedy
continuation (the model's own next tokens).
"""

import json
import shutil
from pathlib import Path

import torch

from mtpkern.cli import main
from mtpkern.data import synthetic_records, train_tokenizer
from mtpkern.generate import generate
from mtpkern.model import GPT2, GPT2Config, load_model

here = Path(".")
for name in ("base", "medusa", "mtp"):
    shutil.rmtree(here / name, ignore_errors=True)
tok = train_tokenizer(synthetic_records(200, seed=7), vocab_size=512)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=8, n_layer=2, n_head=2,
                 bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
GPT2(cfg).save_pretrained("base", tokenizer=tok)
common = ["--base", "base", "--steps", "2", "--batch-size", "4", "--data-limit", "80", "--max-len", "128",
          "--lr", "3e-3", "--eval-every", "1000", "--save-every", "1000", "--precision", "fp32",
          "--device", "cpu", "--no-progress"]
assert main(["train", "medusa", "--out", "medusa", "--n-heads", "2", *common]) == 0
assert main(["train", "mtp", "--out", "mtp", "--n-heads", "3", *common]) == 0
shutil.rmtree("base")
PROMPT = [5, 17, 42, 99, 3, 250, 17, 42]
expected = {}
for run in ("medusa", "mtp"):
    ckpt = here / run / "checkpoint"
    model = load_model(ckpt)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]  # [T, every head, V]
    greedy = generate(model, torch.tensor(PROMPT), max_new_tokens=24, strategy="ntp")
    expected[run] = dict(prompt=PROMPT, head_top1=logits.argmax(-1).tolist(), greedy=greedy.tokens,
                         last_logits=[[round(x, 8) for x in row] for row in logits[-1, :, :32].tolist()])
    print(run, json.loads((ckpt / "config.json").read_text())["mtpkern"],
          (ckpt / "calibration.json").is_file(), sum(f.stat().st_size for f in (here / run).rglob("*") if f.is_file()))
(here / "expected.json").write_text(json.dumps(expected) + "\n")
