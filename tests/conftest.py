"""Test configuration shared by every test module.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``localize.kernels`` is first imported, so it is set here at collection time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests that are not about kernels train with the torch path (the interpreter costs ~25 ms a
# step); the kernel tests select each backend explicitly with localize.kernels.use_backend.
os.environ.setdefault("LOCALIZE_KERNEL_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
