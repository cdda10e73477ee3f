"""Test-wide settings: one torch thread.

The suite runs on two shared cores; with several OpenMP threads per test process a busy
machine slows small convolutions by orders of magnitude, and one thread also makes CPU results
independent of the machine's core count.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
