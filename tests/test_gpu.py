"""On a CUDA device: the compiled Triton kernels against their torch references, and a training step.

Skipped without CUDA (CI has none). ``benchmarks/gpu_check.sh`` runs this file with compiled kernels
(``TRITON_INTERPRET=0``) on the first machine that has a GPU.
"""

from __future__ import annotations

import pytest
import torch

import localize
import localize.kernels as K
from localize.kernels._backend import INTERPRETER, TRITON_AVAILABLE
from localize.kernels.reference import (
    adamw_step_reference,
    cross_entropy_reference,
    ema_update_reference,
    sgd_step_reference,
)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and TRITON_AVAILABLE and not INTERPRETER),
    reason="needs a CUDA device and compiled triton (TRITON_INTERPRET unset: benchmarks/gpu_check.sh)",
)
CUDA = torch.device("cuda")
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 4e-3), (torch.bfloat16, 2e-2, 2e-2)]
SHAPES = [(4, 47, 31), (1,), (1025,), (65537,), (7, 3)]


def _rand(dtype, kind="normal"):
    g = torch.Generator().manual_seed(len(kind))
    if kind == "positive":
        return [(torch.rand(s, generator=g) * 0.1).to(CUDA, dtype) for s in SHAPES]
    return [torch.randn(s, generator=g).to(CUDA, dtype) for s in SHAPES]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda d: str(d))
def test_optimizer_kernels_match_their_references_on_cuda(dtype, atol, rtol):
    with K.use_backend("triton"):
        p, g, b = _rand(dtype), _rand(dtype, "grad"), _rand(dtype, "buf")
        want_p, want_b = [x.clone() for x in p], [x.clone() for x in b]
        K.sgd_step(p, g, b, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        sgd_step_reference(want_p, g, want_b, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
        for a, e in zip(p + b, want_p + want_b):
            torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)
        m, v = _rand(dtype, "m"), _rand(dtype, "positive")
        want = [[x.clone() for x in xs] for xs in (p, m, v)]
        K.adamw_step(p, g, m, v, step=5, lr=1e-2, weight_decay=0.01)
        adamw_step_reference(want[0], g, want[1], want[2], step=5, lr=1e-2, weight_decay=0.01)
        for a, e in zip(p + m + v, want[0] + want[1] + want[2]):
            torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)
        e, want_e = _rand(dtype, "ema"), None
        want_e = [x.clone() for x in e]
        K.ema_update(e, p, decay=0.99)
        ema_update_reference(want_e, p, decay=0.99)
        for a, w in zip(e, want_e):
            torch.testing.assert_close(a.float(), w.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda d: str(d))
@pytest.mark.parametrize("rows, cols", [(1, 2), (37, 1000), (8, 50257)])
def test_cross_entropy_kernel_matches_its_reference_on_cuda(dtype, atol, rtol, rows, cols):
    logits = torch.randn(rows, cols, device=CUDA).to(dtype).requires_grad_(True)
    target = torch.randint(0, cols, (rows,), device=CUDA)
    target[0] = -100 if rows > 1 else target[0]
    ref = logits.detach().clone().requires_grad_(True)
    with K.use_backend("triton"):
        loss = K.cross_entropy(logits, target)
    want = cross_entropy_reference(ref, target)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.float(), want.float(), atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(logits.grad.float(), ref.grad.float(), atol=atol, rtol=rtol)


def test_every_kernel_passes_its_first_use_check_on_this_gpu():
    from localize.kernels._verify import _CHECKS, forget_checks, verified_path

    forget_checks()
    with K.use_backend("triton"):
        for name in _CHECKS:
            for dtype, *_ in DTYPES:
                assert verified_path(name, CUDA, dtype) == "triton", (name, dtype)


def test_a_training_step_on_cuda_matches_the_torch_path():
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 10)).to(CUDA)
        return localize.transform(net, blocks=2, example_inputs=(torch.randn(8, 32, device=CUDA),), optimizer="adamw")

    x, y = torch.randn(16, 32, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    runs = []
    for backend in ("triton", "torch"):
        lm = build()
        with K.use_backend(backend):
            losses = [lm.train_step(x, y) for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in lm.parameters()]))
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_on_cuda_trains_with_fp32_master_weights(dtype):
    """autocast on the inputs' device (cuda); fp16 scales each block with a GradScaler on cuda."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 4)).to(CUDA)
    x, y = torch.randn(32, 16, device=CUDA), torch.randint(0, 4, (32,), device=CUDA)
    lm = localize.transform(net, blocks=2, example_inputs=(x,), autocast=dtype)
    first = lm.train_step(x, y)
    for _ in range(20):
        last = lm.train_step(x, y)
    assert last[-1] < first[-1]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in lm.parameters())
    if dtype == "fp16":
        assert all(s is not None and s._device == "cuda" for s in lm.scalers)
