"""The C++ extension: registered when built; the package works (eager) when it is absent."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtpkern.ops import _backend, kv_compact, tree_mask, verify, verify_sampled

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {
    "tree_buffers": tree_mask.SCHEMA,
    "verify_greedy": verify.GREEDY_SCHEMA,
    "verify_typical": verify.TYPICAL_SCHEMA,
    "kv_compact_": kv_compact.SCHEMA,
    "accept_greedy": verify.ACCEPT_SCHEMA,  # its CUDA kernel is the eager reference (mtpkern/ops/verify.py)
    "verify_rejection": verify_sampled.SCHEMA,
}


@pytest.mark.skipif(not _backend.HAS_CUDA_EXT, reason="the C++ extension mtpkern._C is not built")
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_extension_registers_its_ops(name):
    op = getattr(torch.ops.mtpkern, name).default
    # The C++ schema is the one the Python fallback defines when the extension is absent.
    assert str(op._schema) == f"mtpkern::{name}{SCHEMAS[name]}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtpkern::{name}", key), f"no {key} kernel for {name}"


HIDDEN = r'''
import importlib.abc, sys

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mtpkern._C":
            raise ImportError("mtpkern._C hidden by the test")
        return None

sys.meta_path.insert(0, HideExtension())

import torch
from mtpkern.ops import _backend
from mtpkern.ops.kv_compact import kv_compact_
from mtpkern.ops.tree_mask import tree_buffers
from mtpkern.ops.verify import accept_greedy, verify_greedy, verify_typical
from mtpkern.ops.verify_sampled import verify_rejection

assert not _backend.HAS_CUDA_EXT
buf = tree_buffers(torch.tensor([-1, 0, 0, 1]), 2)
assert buf.depth.tolist() == [0, 1, 1, 2] and buf.mask.view(-1).tolist() == [1, 3, 5, 11], buf
assert torch.equal(torch.ops.mtpkern.tree_buffers(torch.tensor([-1, 0, 0, 1]), 2)[2], buf.retrieve)

tokens, argmax = torch.tensor([5, 6, 7, 8]), torch.tensor([6, 8, 0, 9])
for r in (verify_greedy(tokens, argmax, buf.retrieve), torch.ops.mtpkern.verify_greedy(tokens, argmax, buf.retrieve)):
    assert [int(r[0]), int(r[1]), int(r[2]), r[3].tolist()] == [2, 3, 3, [6, 8, 9]], r
r = verify_typical(tokens, argmax, torch.ones(4), torch.zeros(4), buf.retrieve)
assert int(r.accept_len) == 2 and r.tokens.tolist() == [6, 8, 9], r
hidden = torch.nn.functional.one_hot(argmax, 10).float()  # node i's argmax is argmax[i]
for r in (accept_greedy(hidden, torch.eye(10), tokens, buf.retrieve),
          torch.ops.mtpkern.accept_greedy(hidden, torch.eye(10), tokens, buf.retrieve)):
    assert r[0].tolist() == [3, 6, 8, 9] and r[1].tolist() == [9] and int(r[2]) == 3, r

# root -> {1, 2}: token 1 has no target mass (rejected), token 2 all of it (accepted), then u_0 draws token 0
p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
args = (torch.tensor([9, 1, 2]), p, torch.full((1, 3), 1 / 3), torch.zeros(3, dtype=torch.long),
        torch.tensor([-1, 0, 0]), torch.tensor([0.5, 0.5, 0.5]), 1)
for r in (verify_rejection(*args[:5], 1, uniforms=args[5]), torch.ops.mtpkern.verify_rejection(*args)):
    assert [int(r[0]), int(r[1]), r[2].tolist(), r[3].tolist()] == [1, 2, [0, 2], [2, 0]], r

k = torch.arange(8.0).view(1, 1, 1, 8, 1)
v = -k
kv_compact_(k, v, torch.tensor([0, 2, 3]), torch.tensor(1), torch.tensor(3))
assert k.view(-1).tolist() == [0, 1, 3, 4, 4, 5, 6, 7] and v.view(-1).tolist() == [-x for x in k.view(-1).tolist()]
torch.ops.mtpkern.kv_compact_(k, v, torch.tensor([0, 2]), torch.tensor(0), torch.tensor(2))
assert k.view(-1).tolist()[:2] == [0, 3]

try:
    tree_buffers(torch.tensor([-1, 0]), 1, backend="cuda")
except RuntimeError as e:
    assert "needs the built extension" in str(e)
else:
    raise AssertionError("backend='cuda' without the extension must raise")
print("eager fallbacks OK")
'''


def test_package_works_with_the_extension_hidden():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MTPKERN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", HIDDEN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eager fallbacks OK" in proc.stdout


def test_setup_skip_switch_builds_nothing():
    env = {**os.environ, "MTPKERN_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not building the CUDA extension" in proc.stdout and "0.1.0" in proc.stdout


def test_setup_force_switch_makes_a_missing_toolkit_an_error(tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}  # an empty folder: no bin/nvcc
    env.pop("MTPKERN_SKIP_CUDA_BUILD", None)
    env.pop("MTPKERN_FORCE_CUDA_BUILD", None)  # CI sets it for the real build
    quiet = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0 and "building without the CUDA extension: its C++ CPU kernels only" in quiet.stdout, quiet.stderr[-3000:]
    env["MTPKERN_FORCE_CUDA_BUILD"] = "1"
    forced = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert forced.returncode != 0 and "MTPKERN_FORCE_CUDA_BUILD=1 but no CUDA toolkit found" in forced.stderr


CPU_ONLY_CHECK = r'''
import sys
import torch

torch.ops.load_library(sys.argv[1])  # registers the mtpkern ops of the CPU-only build
for name in ("tree_buffers", "verify_greedy", "verify_typical", "kv_compact_", "accept_greedy", "verify_rejection"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtpkern::{name}", "CPU"), name
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"mtpkern::{name}", "CUDA"), name
mask, depth, retrieve, is_leaf = torch.ops.mtpkern.tree_buffers(torch.tensor([-1, 0, 0, 1]), 2)
assert depth.tolist() == [0, 1, 1, 2] and mask.view(-1).tolist() == [1, 3, 5, 11]
r = torch.ops.mtpkern.verify_greedy(torch.tensor([5, 6, 7, 8]), torch.tensor([6, 8, 0, 9]), retrieve)
assert [int(r[0]), int(r[1]), int(r[2]), r[3].tolist()] == [2, 3, 3, [6, 8, 9]], r
hidden = torch.nn.functional.one_hot(torch.tensor([6, 8, 0, 9]), 10).float()
r = torch.ops.mtpkern.accept_greedy(hidden, torch.eye(10), torch.tensor([5, 6, 7, 8]), retrieve)
assert r[0].tolist() == [3, 6, 8, 9] and r[1].tolist() == [9], r
p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
r = torch.ops.mtpkern.verify_rejection(torch.tensor([9, 1, 2]), p, torch.full((1, 3), 1 / 3),
                                       torch.zeros(3, dtype=torch.long), torch.tensor([-1, 0, 0]),
                                       torch.tensor([0.5, 0.5, 0.5]), 1)
assert [int(r[0]), r[3].tolist()] == [1, [2, 0]], r
k = torch.arange(8.0).view(1, 1, 1, 8, 1)
v = -k
torch.ops.mtpkern.kv_compact_(k, v, torch.tensor([0, 2, 3]), torch.tensor(1), torch.tensor(3))
assert k.view(-1).tolist() == [0, 1, 3, 4, 4, 5, 6, 7]
try:
    torch.ops.mtpkern.kv_compact_(k, v, torch.tensor([0, 9]), torch.tensor(0), torch.tensor(2))
except ValueError as e:
    assert "outside the cache" in str(e)
else:
    raise AssertionError("a move outside the cache must raise")
print("cpu extension OK")
'''


@pytest.mark.slow
def test_cpu_only_build_has_the_cpu_kernels(tmp_path):
    """Without a CUDA toolkit (forced here by MTPKERN_CPU_EXTENSION=1) setup.py builds the C++
    extension as a plain CppExtension: every CPU user gets the C++ kernels."""
    env = {**os.environ, "MTPKERN_CPU_EXTENSION": "1", "MAX_JOBS": "2"}
    env.pop("MTPKERN_SKIP_CUDA_BUILD", None)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "building the C++ extension without CUDA" in build.stdout
    built = list((tmp_path / "lib" / "mtpkern").glob("_C*.so"))
    assert len(built) == 1, list((tmp_path / "lib").rglob("*"))
    check = subprocess.run([sys.executable, "-c", CPU_ONLY_CHECK, str(built[0])], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "cpu extension OK" in check.stdout


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return found if found and os.path.exists(found) else None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc (CUDA toolkit) on this machine")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_sources_compile_for_a100_and_h100(arch, tmp_path):
    """Every csrc/cuda/*.cu compiles for sm_80 (A100) and sm_90 (H100) on its own (they include
    only kernels.h, no torch headers), without warnings, and ptxas spills nothing."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert any(s.name == "verify_rejection.cu" for s in sources), sources
    for src in sources:
        proc = subprocess.run([_nvcc(), "-c", "-O3", "-DNDEBUG", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                               "-Xptxas", "-v", "-I", str(ROOT / "csrc"), str(src), "-o", str(tmp_path / "k.o")],
                              capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{src.name} for sm_{arch}:\n{log[-3000:]}"
        assert "warning" not in log.lower(), f"{src.name} for sm_{arch}:\n{log[-3000:]}"
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
        assert spills and max(spills) == 0, f"{src.name} for sm_{arch} spills: {log[-3000:]}"
