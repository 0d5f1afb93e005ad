"""DistributedDataParallel on the CPU (gloo), wherever the tests run: 2 processes x batch 4 follow
the same loss curve as 1 process x batch 8, for every objective (the explicit gradient
all-reduce of MTP and MEDUSA-2 included)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace

import pytest
import torch
import torch.distributed as dist

from mtpkern.hf_io import load_model
from mtpkern.train import train
from test_train import make_base, tiny_run, train_losses

_WORKER = textwrap.dedent("""
    import json, sys, torch
    from mtpkern.train import TrainConfig, train
    torch.set_num_threads(1)
    for cfg in json.loads(sys.argv[1]):
        train(TrainConfig(**cfg))
""")

def records(path):
    return [json.loads(line) for line in open(path)]


# run name: (objective, settings); medusa2's heads warm up for 2 of the 4 steps, so both of its
# phases (the backbone without gradients, then with) go through the hand-made all-reduce
OBJECTIVES = {"ntp": ("ntp", {}), "mtp": ("mtp", dict(n_heads=3)), "medusa": ("medusa", dict(n_heads=3, lr=1e-2)),
              "medusa-proj": ("medusa", dict(n_heads=3, lr=1e-2, medusa_proj=True)),
              "medusa2": ("medusa2", dict(n_heads=3, head_warmup=2)),
              "medusa2-kl": ("medusa2", dict(n_heads=3, head_warmup=1, backbone_loss="kl"))}


# The runs are pinned to the CPU (gloo), so a one-GPU machine never asks for cuda:1.
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not built")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two processes need two CPU cores")
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    base = make_base(tmp_path / "base")
    configs = {name: tiny_run(tmp_path / "ddp" / name, o, base, steps=4, batch_size=4, eval_every=4, eval_batches=1,
                              **kw)
               for name, (o, kw) in OBJECTIVES.items()}
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps([asdict(c) for c in configs.values()])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a session of its own, so that a timeout kills the launcher and its workers together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]

    for objective, cfg in configs.items():
        two = json.loads((tmp_path / "ddp" / objective / "summary.json").read_text())
        one = train(replace(cfg, out=str(tmp_path / "one" / objective), batch_size=8))
        assert two["steps"] == one.steps == 4
        a, b = train_losses(one.log_path), train_losses(two["log_path"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{objective}: {m}")
        # the gradient norm catches a wrong gradient scale, to which Adam's update is blind
        norms = [[r["grad_norm"] for r in records(path) if r["kind"] == "train"]
                 for path in (one.log_path, two["log_path"])]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-4, atol=0, msg=lambda m: f"{objective}: {m}")
        # the same weights after 4 steps (Adam turns float noise in near-zero gradients into
        # updates of up to lr, hence the absolute tolerance)
        ddp_model = load_model(two["checkpoint"])
        for (name, p), q in zip(one.model.state_dict().items(), ddp_model.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5, msg=lambda m: f"{objective} {name}: {m}")
        assert two["val_loss"] is not None  # rank 0 evaluated and shared the metrics
