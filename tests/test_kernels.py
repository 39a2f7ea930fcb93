"""localize.kernels against the plain-torch references, on the Triton-interpreter and torch paths."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import localize.kernels as K
from localize.errors import LocalizeError
from localize.kernels._backend import INTERPRETER
from localize.kernels.reference import adamw_step_reference, ema_update_reference, sgd_step_reference

BACKENDS = [
    pytest.param(
        "triton-interpret",
        marks=pytest.mark.skipif(not INTERPRETER, reason="needs triton and TRITON_INTERPRET=1 at import"),
    ),
    "torch",
]
# (dtype, atol, rtol): the interpreter matches the fp32-math reference to one rounding; the torch
# path (foreach in the param dtype for fp16/bf16 SGD on CPU) may round a few times more.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 2e-3, 4e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]
SIZES = [1, 7, 1023, 1025, 65537]
MIXED = [(4, 47, 31), (1,), (1025,), (7, 3)]


def _ids(dtypes):
    return [str(d[0]).removeprefix("torch.") for d in dtypes]


def _close(actual, expected, atol, rtol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)


def _state(shapes, dtype, kind):
    """Mid-training values: params, grads and state, each a list over ``shapes``."""
    if kind == "positive":
        return [(torch.rand(s) * 0.1).to(dtype) for s in shapes]
    return [torch.randn(s).to(dtype) for s in shapes]


def _clone(xs):
    return [x.clone() for x in xs]


# --- sgd_step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("size", SIZES)
def test_sgd_step_matches_reference(backend, dtype, atol, rtol, size):
    shapes = [(size,)]
    p, g, b = (_state(shapes, dtype, "normal") for _ in range(3))
    rp, rb = _clone(p), _clone(b)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    with K.use_backend(backend):
        K.sgd_step(p, g, b, **hyper)
    sgd_step_reference(rp, g, rb, **hyper)
    _close(p, rp, atol, rtol)
    _close(b, rb, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize(
    "momentum, weight_decay, nesterov",
    [(0.0, 0.0, False), (0.0, 0.05, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.05, False)],
)
def test_sgd_step_mixed_shapes(backend, dtype, atol, rtol, momentum, weight_decay, nesterov):
    p, g, b = (_state(MIXED, dtype, "normal") for _ in range(3))
    rp, rb = _clone(p), _clone(b)
    hyper = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    with K.use_backend(backend):
        K.sgd_step(p, g, b if momentum else None, **hyper)
    sgd_step_reference(rp, g, rb, **hyper)
    _close(p, rp, atol, rtol)
    if momentum:
        _close(b, rb, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_zero_buffers_reproduce_torch_first_step(backend, nesterov):
    p, g = _state(MIXED, torch.float32, "normal"), _state(MIXED, torch.float32, "normal")
    ref = [torch.nn.Parameter(x.clone()) for x in p]
    for r, gi in zip(ref, g):
        r.grad = gi.clone()
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    opt.step()  # first step: torch sets buf = clone(grad + weight_decay * p)
    bufs = [torch.zeros_like(x) for x in p]
    with K.use_backend(backend):
        K.sgd_step(p, g, bufs, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    for b, x, r in zip(bufs, p, ref):
        torch.testing.assert_close(b, opt.state[r]["momentum_buffer"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(x, r.detach(), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_step_groups_mixed_dtypes(backend):
    p = [torch.randn(33), torch.randn(5).bfloat16(), torch.randn(7, 2), torch.randn(3).half()]
    g = [torch.randn_like(x) for x in p]
    rp = _clone(p)
    with K.use_backend(backend):
        K.sgd_step(p, g, lr=0.1)
    sgd_step_reference(rp, g, lr=0.1)
    for a, e in zip(p, rp):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-2, rtol=1e-2)


# --- adamw_step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("size", SIZES)
def test_adamw_step_matches_reference(backend, dtype, atol, rtol, size):
    shapes = [(size,)]
    p, g, m = (_state(shapes, dtype, "normal") for _ in range(3))
    v = _state(shapes, dtype, "positive")
    rp, rm, rv = _clone(p), _clone(m), _clone(v)
    hyper = dict(step=3, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    with K.use_backend(backend):
        K.adamw_step(p, g, m, v, **hyper)
    adamw_step_reference(rp, g, rm, rv, **hyper)
    _close(m, rm, atol, rtol)
    _close(v, rv, atol, rtol)
    _close(p, rp, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("step", [1, 1000])
def test_adamw_step_mixed_shapes(backend, dtype, atol, rtol, step):
    p, g = _state(MIXED, dtype, "normal"), _state(MIXED, dtype, "normal")
    m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
    rp, rm, rv = _clone(p), _clone(m), _clone(v)
    with K.use_backend(backend):
        K.adamw_step(p, g, m, v, step=step, lr=1e-3)
    adamw_step_reference(rp, g, rm, rv, step=step, lr=1e-3)
    _close(p, rp, atol, rtol)
    _close(m, rm, atol, rtol)
    _close(v, rv, atol, rtol)


# --- ema_update ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("size", SIZES)
def test_ema_update_matches_reference(backend, dtype, atol, rtol, size):
    e, p = _state([(size,)], dtype, "normal"), _state([(size,)], dtype, "normal")
    re = _clone(e)
    with K.use_backend(backend):
        K.ema_update(e, p, decay=0.99)
    ema_update_reference(re, p, decay=0.99)
    _close(e, re, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=_ids(DTYPES))
def test_ema_update_mixed_shapes(backend, dtype, atol, rtol):
    e, p = _state(MIXED, dtype, "normal"), _state(MIXED, dtype, "normal")
    re = _clone(e)
    with K.use_backend(backend):
        K.ema_update(e, p, decay=0.9)
    ema_update_reference(re, p, decay=0.9)
    _close(e, re, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update_decay_bounds(backend):
    e, p = [torch.randn(9)], [torch.randn(9)]
    with K.use_backend(backend):
        K.ema_update(e, p, decay=1.0)
        assert not torch.equal(e[0], p[0])
        K.ema_update(e, p, decay=0.0)
    assert torch.equal(e[0], p[0])


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grads_are_handled(backend):
    p = [torch.randn(7, 3), torch.randn(4, 6)]
    g = [torch.randn(3, 7).t(), torch.randn(4, 12)[:, ::2]]  # transposed, strided
    assert not any(x.is_contiguous() for x in g)
    rp = _clone(p)
    with K.use_backend(backend):
        K.sgd_step(p, g, lr=0.1)
    sgd_step_reference(rp, g, lr=0.1)
    _close(p, rp, 1e-6, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_params_are_handled(backend):
    p = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    g = [torch.randn(2, 3, 4, 5)]  # contiguous: copied into the param's layout
    m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
    rp, rm, rv = _clone(p), _clone(m), _clone(v)
    with K.use_backend(backend):
        K.adamw_step(p, g, m, v, step=1, lr=0.1)
    adamw_step_reference(rp, g, rm, rv, step=1, lr=0.1)
    _close(p, rp, 1e-6, 1e-5)
    assert p[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_views_are_handled(backend):
    """Contiguous views at odd offsets: no 16-byte alignment, so the kernels must not assume it."""
    storage = torch.randn(3 * 1100)
    storage[2200:].abs_()  # the exp_avg_sq slice must be non-negative
    p, m, v = ([storage[k * 1100 + 1 + k : k * 1100 + 1 + k + 1025]] for k in range(3))
    g = [torch.randn(1025)]
    assert all(t[0].data_ptr() % 16 for t in (p, m, v))
    rp, rm, rv = _clone(p), _clone(m), _clone(v)
    with K.use_backend(backend):
        K.adamw_step(p, g, m, v, step=2, lr=0.1)
    adamw_step_reference(rp, g, rm, rv, step=2, lr=0.1)
    _close(p, rp, 1e-6, 1e-5)
    _close(m, rm, 1e-6, 1e-5)
    _close(v, rv, 1e-6, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_param_is_rejected(backend):
    base = torch.randn(5, 8)
    p, g = [base[:, :3]], [torch.randn(5, 3)]
    with K.use_backend(backend), pytest.raises(LocalizeError, match=r"params\[0\] is a non-contiguous view"):
        K.sgd_step(p, g, lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_layout_must_match_param(backend):
    p = [torch.randn(3, 4)]
    g = [torch.randn(3, 4)]
    m = [torch.zeros(4, 3).t()]  # dense, but transposed relative to p
    with K.use_backend(backend), pytest.raises(LocalizeError, match=r"exp_avgs\[0\] has stride \(1, 3\)"):
        K.adamw_step(p, g, m, [torch.zeros(3, 4)], step=1, lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists_and_empty_tensors(backend):
    with K.use_backend(backend):
        K.sgd_step([], [], lr=0.1)
        p, g = [torch.empty(0), torch.ones(3)], [torch.empty(0), torch.ones(3)]
        K.sgd_step(p, g, lr=0.5)
    assert torch.equal(p[1], torch.full((3,), 0.5))


def test_float64_takes_the_torch_path():
    p, g = [torch.randn(10, dtype=torch.float64)], [torch.randn(10, dtype=torch.float64)]
    rp = _clone(p)
    with K.use_backend("triton-interpret" if INTERPRETER else "torch"):
        K.sgd_step(p, g, lr=0.1)
    torch.testing.assert_close(p[0], rp[0] - 0.1 * g[0])


# --- errors -------------------------------------------------------------------------------------


def test_error_list_lengths():
    with pytest.raises(LocalizeError, match=r"sgd_step: got 2 params but 1 grads; pass exactly one entry"):
        K.sgd_step([torch.ones(2), torch.ones(2)], [torch.ones(2)], lr=0.1)


def test_error_shapes():
    with pytest.raises(LocalizeError, match=r"grads\[0\] has shape \(3,\) but params\[0\] has shape \(2,\)"):
        K.sgd_step([torch.ones(2)], [torch.ones(3)], lr=0.1)


def test_error_dtypes():
    with pytest.raises(LocalizeError, match=r"exp_avg_sqs\[0\] has dtype torch.float16 .* cast it"):
        K.adamw_step(
            [torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2).half()], step=1, lr=0.1
        )


def test_error_devices():
    with pytest.raises(LocalizeError, match=r"params\[0\] is on meta but ema_params\[0\] is on cpu"):
        K.ema_update([torch.ones(2)], [torch.ones(2, device="meta")], decay=0.9)


def test_error_integer_params():
    with pytest.raises(LocalizeError, match=r"params\[0\] has dtype torch.int64; supported dtypes are"):
        K.sgd_step([torch.ones(2, dtype=torch.long)], [torch.ones(2, dtype=torch.long)], lr=0.1)


def test_error_single_tensor_instead_of_list():
    with pytest.raises(LocalizeError, match=r"params must be a list of tensors, got a single tensor"):
        K.sgd_step(torch.ones(2), [torch.ones(2)], lr=0.1)


def test_error_hyperparameters():
    p, g = [torch.ones(2)], [torch.ones(2)]
    with pytest.raises(LocalizeError, match="nesterov=True needs momentum > 0"):
        K.sgd_step(p, g, lr=0.1, nesterov=True)
    with pytest.raises(LocalizeError, match="needs momentum_buffers, one per param"):
        K.sgd_step(p, g, lr=0.1, momentum=0.9)
    with pytest.raises(LocalizeError, match="lr, momentum and weight_decay must be >= 0"):
        K.sgd_step(p, g, lr=-1.0)
    with pytest.raises(LocalizeError, match=r"step must be an int >= 1 .* got 0"):
        K.adamw_step(p, g, [torch.zeros(2)], [torch.zeros(2)], step=0, lr=0.1)
    with pytest.raises(LocalizeError, match=r"0 <= beta < 1"):
        K.adamw_step(p, g, [torch.zeros(2)], [torch.zeros(2)], step=1, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(LocalizeError, match=r"decay must lie in \[0, 1\]"):
        K.ema_update(p, g, decay=1.5)


# --- backend selection --------------------------------------------------------------------------


def test_use_backend_nests_and_restores():
    outer = K.backend()
    with K.use_backend("torch"):
        assert K.backend() == "torch"
        if INTERPRETER:
            with K.use_backend("triton-interpret"):
                assert K.backend() == "triton-interpret"
            assert K.backend() == "torch"
    assert K.backend() == outer


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.backend() == "torch"
    monkeypatch.setenv(K.ENV_VAR, "cuda-magic")
    with pytest.raises(
        LocalizeError, match=r"unknown kernel backend 'cuda-magic' \(from \$LOCALIZE_KERNEL_BACKEND\)"
    ):
        K.backend()


def test_unknown_backend_name():
    with pytest.raises(LocalizeError, match=r"choose one of 'triton', 'triton-interpret', 'torch'"):
        with K.use_backend("gpu"):
            pass


@pytest.mark.skipif(not INTERPRETER, reason="only meaningful when the interpreter owns the process")
def test_compiled_backend_unavailable_under_interpreter():
    with pytest.raises(LocalizeError, match="TRITON_INTERPRET=1 was set when triton was imported"):
        with K.use_backend("triton"):
            pass


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def test_works_without_triton():
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch
        import localize.kernels as K
        assert not K.TRITON_AVAILABLE and K.backend() == "torch", K.backend()
        p, g = [torch.ones(3)], [torch.ones(3)]
        K.sgd_step(p, g, lr=0.25)
        assert torch.equal(p[0], torch.full((3,), 0.75))
        x = torch.randn(4, 5, requires_grad=True)
        K.cross_entropy(x, torch.tensor([0, 1, -100, 4])).backward()
        try:
            K.use_backend("triton-interpret").__enter__()
        except Exception as e:
            assert "needs the triton package" in str(e), e
        else:
            raise AssertionError("expected a LocalizeError")
        print("ok")
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(K.ENV_VAR, None)
    out = _run_python(code, env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not K.TRITON_AVAILABLE, reason="triton is not installed")
def test_kernels_compile_for_cuda():
    """The compiled path cannot run without a GPU, but each kernel must still compile to CUDA binary."""
    code = """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from localize.kernels import adamw, cross_entropy_loss, ema, sgd

        assert type(sgd._sgd_kernel).__name__ == "JITFunction"
        ptr = "*i64"
        multi = dict(numels=ptr, chunk_tensor=ptr, chunk_start=ptr)
        cases = [
            (sgd._sgd_kernel, dict(param_ptrs=ptr, grad_ptrs=ptr, buf_ptrs=ptr, **multi, lr="fp32",
                                   momentum="fp32", weight_decay="fp32"),
             dict(HAS_WEIGHT_DECAY=True, HAS_MOMENTUM=True, NESTEROV=True)),
            (adamw._adamw_kernel, dict(param_ptrs=ptr, grad_ptrs=ptr, exp_avg_ptrs=ptr, exp_avg_sq_ptrs=ptr,
                                       **multi, decay="fp32", beta1="fp32", beta2="fp32", eps="fp32",
                                       step_size="fp32", bias_correction2_sqrt="fp32"), {}),
            (ema._ema_kernel, dict(ema_ptrs=ptr, param_ptrs=ptr, **multi, weight="fp32"), {}),
        ]
        for kernel, sig, flags in cases:
            for dtype, aligned in [(tl.float32, True), (tl.bfloat16, True), (tl.float16, False)]:
                consts = dict(DTYPE=dtype, ALIGNED=aligned, BLOCK=1024, CHUNK=65536, **flags)
                src = ASTSource(kernel, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
                asm = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
                assert "cubin" in asm
                # full blocks of aligned tensors must use 128-bit accesses
                assert ("ld.global.v4" in asm["ptx"]) == aligned, (kernel, dtype)
        sig = dict(logits_ptr="*bf16", logits_row_stride="i64", target_ptr="*i64", loss_ptr="*fp32",
                   grad_ptr="*bf16", grad_row_stride="i64", n_valid_ptr="*i64", n_cols="i32",
                   ignore_index="i32", HAS_GRAD="constexpr", BLOCK="constexpr")
        src = ASTSource(cross_entropy_loss._cross_entropy_kernel, sig, constexprs=dict(HAS_GRAD=True, BLOCK=4096))
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
        print("ok")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = _run_python(code, env)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("triton's CUDA toolchain (ptxas) is not available")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --- cross_entropy ------------------------------------------------------------------------------

CE_DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]


def _ce_pair(backend, logits, target, ignore_index=-100, scale=1.0):
    """(loss, grad) from localize under ``backend`` and from F.cross_entropy in fp32."""
    x = logits.clone().requires_grad_()
    with K.use_backend(backend):
        loss = K.cross_entropy(x, target, ignore_index=ignore_index)
    (loss * scale).backward()
    ref_x = logits.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_x, target, ignore_index=ignore_index)
    (ref * scale).backward()
    return loss, x.grad, ref, ref_x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", CE_DTYPES, ids=_ids(CE_DTYPES))
@pytest.mark.parametrize("rows, vocab", [(5, 1), (6, 7), (4, 1025), (3, 50257)])
def test_cross_entropy_matches_torch(backend, dtype, atol, rtol, rows, vocab):
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    target[1] = -100
    loss, grad, ref, ref_grad = _ce_pair(backend, logits, target)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), ref_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_custom_ignore_index_and_grad_scale(backend):
    logits, target = torch.randn(8, 33), torch.randint(0, 33, (8,))
    target[::3] = 7  # class 7 is "ignored" here
    loss, grad, ref, ref_grad = _ce_pair(backend, logits, target, ignore_index=7, scale=2.5)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_non_contiguous_logits(backend):
    wide = torch.randn(6, 40)
    for logits in (wide[:, :17], torch.randn(17, 6).t()):  # strided rows; transposed
        target = torch.randint(0, 17, (6,))
        x = logits.detach().requires_grad_()  # still the strided view
        assert not x.is_contiguous()
        with K.use_backend(backend):
            loss = K.cross_entropy(x, target)
        loss.backward()
        ref_x = logits.detach().clone().requires_grad_()
        F.cross_entropy(ref_x, target).backward()
        torch.testing.assert_close(loss, F.cross_entropy(logits, target))
        torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_all_ignored_is_nan_with_zero_grad(backend):
    logits = torch.randn(3, 5)
    loss, grad, ref, ref_grad = _ce_pair(backend, logits, torch.full((3,), -100))
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_without_grad(backend):
    logits, target = torch.randn(4, 9), torch.tensor([0, 8, 3, -100])
    with K.use_backend(backend), torch.no_grad():
        loss = K.cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_errors(backend):
    with K.use_backend(backend):
        with pytest.raises(LocalizeError, match=r"target 9 is out of range for 5 classes"):
            K.cross_entropy(torch.randn(2, 5), torch.tensor([1, 9]))
        with pytest.raises(LocalizeError, match=r"logits must be 2-D \(rows, vocab\).*reshape\(-1"):
            K.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(LocalizeError, match=r"one class index per row of logits \(2\)"):
            K.cross_entropy(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
        with pytest.raises(LocalizeError, match=r"integer class indices, got dtype torch.float32"):
            K.cross_entropy(torch.randn(2, 5), torch.zeros(2))


# --- first-use verification -------------------------------------------------------------------

_needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs triton and TRITON_INTERPRET=1 at import")


@pytest.fixture
def fresh_checks():
    from localize.kernels._verify import forget_checks

    forget_checks()
    yield
    forget_checks()


@_needs_interpreter
def test_a_kernel_that_matches_its_reference_is_used_without_a_word(fresh_checks, recwarn):
    import localize.kernels.sgd as sgd_module
    from localize.kernels._verify import verified_path

    launches = []
    real = sgd_module._launch_sgd
    with K.use_backend("triton-interpret"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sgd_module, "_launch_sgd", lambda *a, **k: (launches.append(a[0]), real(*a, **k)))
            K.sgd_step([torch.ones(5)], [torch.ones(5)], lr=0.1)
        assert verified_path("sgd_step", torch.device("cpu"), torch.float32) == "triton-interpret"
    assert launches == ["triton-interpret", "triton-interpret"]  # the check, then the step itself
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@_needs_interpreter
def test_a_miscompiled_kernel_falls_back_to_torch_with_one_warning(fresh_checks, monkeypatch):
    import localize.kernels.sgd as sgd_module

    real = sgd_module._launch_sgd

    def wrong(path, params, *args, **kwargs):  # what a miscompiled kernel does: a wrong update
        real(path, params, *args, **kwargs)
        torch._foreach_add_(params, 1e-2)

    monkeypatch.setattr(sgd_module, "_launch_sgd", wrong)
    p, g = [torch.randn(1025)], [torch.randn(1025)]
    want = _clone(p)
    sgd_step_reference(want, g, lr=0.1)
    with K.use_backend("triton-interpret"):
        with pytest.warns(RuntimeWarning, match=r"triton-interpret sgd_step kernel on cpu float32 differs from the torch reference by 0\.01; that combination uses torch's fused path"):
            K.sgd_step(p, g, lr=0.1)
        torch.testing.assert_close(p[0], want[0])  # the step itself took the torch path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            K.sgd_step(p, g, lr=0.1)  # decided once: no second warning


@_needs_interpreter
def test_a_kernel_that_fails_to_compile_falls_back_to_torch(fresh_checks, monkeypatch):
    import localize.kernels.ema as ema_module

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed\nmore detail")

    monkeypatch.setattr(ema_module, "_launch_ema", broken)
    e, p = [torch.zeros(7)], [torch.ones(7)]
    with K.use_backend("triton-interpret"):
        with pytest.warns(RuntimeWarning, match=r"ema_update kernel on cpu float32 failed \(RuntimeError: PTX assembly failed\)"):
            K.ema_update(e, p, decay=0.9)
    torch.testing.assert_close(e[0], torch.full((7,), 0.1))


@_needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_ids(DTYPES))
def test_every_kernel_passes_its_own_check_on_the_interpreter(dtype, fresh_checks):
    from localize.kernels._verify import _CHECKS

    assert set(_CHECKS) == {"sgd_step", "adamw_step", "ema_update", "cross_entropy"}
    with K.use_backend("triton-interpret"):
        for name, check in _CHECKS.items():
            assert check("triton-interpret", torch.device("cpu"), dtype) <= {torch.float32: 1e-4}.get(dtype, 5e-2), name
