"""Test configuration shared by every test module.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``localize.kernels`` is first imported, so it is set here at collection time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests that are not about kernels train with the torch path (the interpreter costs ~25 ms a
# step); the kernel tests select each backend explicitly with localize.kernels.use_backend.
os.environ.setdefault("LOCALIZE_KERNEL_BACKEND", "torch")
# One intra-op thread, in this process and in every subprocess a test starts (the CLI, program.py,
# distributed ranks): results are then bit-comparable across them, since the thread count changes
# the order of float reductions.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import localize  # noqa: E402, F401 - first: a checkout's kernels/ folder must not shadow PyPI's `kernels` (localize._checkout)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's models are tiny: one intra-op thread is faster than two on a 2-core machine,
    # and does not collapse when the cores are shared (CI, or several test runs at once).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
