"""Test configuration and the fixtures shared by the test modules.

Triton's interpreter must be switched on before any kernel module is imported, so this
runs first. On a machine with a GPU the kernels run compiled instead.

Fixtures: ``gpt2_model``, ``medusa_model`` and ``mtp_model`` (the trained tiny models of
``_tiny.py``, built once per session) and ``single_thread`` (every module runs on one thread).
Test modules import plain helpers from ``_tiny.py``, never fixtures.

Measured step costs (``$MTPKERN_CACHE``) go to a temporary folder of the session unless the
variable is set, never into the user's ``~/.cache/mtpkern``.

Markers (``pytest.ini``): ``slow`` marks tests that take more than about ten seconds on a
2-core CPU; nothing deselects them by default, so ``python -m pytest -q`` (and CI) runs
everything, and ``python -m pytest -q -m "not slow"`` skips them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MTPKERN_CACHE" not in os.environ:  # measured step costs go to a folder of this session, not the user's
    import atexit
    import shutil
    import tempfile

    os.environ["MTPKERN_CACHE"] = tempfile.mkdtemp(prefix="mtpkern-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MTPKERN_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one thread is faster than two and never oversubscribes a shared 2-core machine
# (the DDP test runs two processes).
torch.set_num_threads(1)

from _tiny import tiny_gpt2, tiny_medusa, tiny_mtp  # noqa: E402 - after the environment above


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Every module runs on one thread, and gets back the count it started with. Tiny models
    decode several times faster on one thread, and on a shared 2-core machine OpenMP's barriers
    between two threads can make a training step a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def medusa_model():
    return tiny_medusa()


@pytest.fixture(scope="session")
def mtp_model():
    return tiny_mtp()
