"""Test configuration.

Triton's interpreter must be switched on before any kernel module is imported, so this
runs first. On a machine with a GPU the kernels run compiled instead.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one thread is faster than two and never oversubscribes a shared 2-core machine
# (the DDP test runs two processes).
torch.set_num_threads(1)
