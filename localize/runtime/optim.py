"""SGD and AdamW on localize's multi-tensor kernels, interchangeable with torch's own.

Both are ``torch.optim.Optimizer`` subclasses with torch's constructor arguments, param-group keys and
state keys (``"momentum_buffer"``; ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``), so a
``state_dict`` moves between ``localize.runtime.optim.SGD`` and ``torch.optim.SGD`` (and AdamW) both ways.
Each step updates a param group with one kernel launch per (device, dtype) group; the backend
(compiled Triton, interpreter, torch fused/foreach) is chosen by :func:`localize.kernels.backend`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch

from localize.errors import LocalizeError
from localize.kernels import adamw_step, sgd_step

__all__ = ["OPTIMIZERS", "SGD", "AdamW", "build_optimizer"]


def _scalar_dtype() -> torch.dtype:
    # Same rule as torch for the "step" counter, so state_dicts carry identical tensors.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_group(name: str, group: dict[str, Any], unsupported: dict[str, Any]) -> None:
    """Reject param-group settings torch supports but these kernels do not (e.g. from a loaded state)."""
    for key, allowed in unsupported.items():
        if key in group and group[key] != allowed and group[key] is not None:
            raise LocalizeError(
                f"localize.runtime.optim.{name} does not support {key}={group[key]!r} (only {allowed!r}); "
                f"use torch.optim.{name} for this setting"
            )


def _grads_of(name: str, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise LocalizeError(
                f"localize.runtime.optim.{name} got a sparse gradient (shape {tuple(p.shape)}); use a dense "
                "embedding (sparse=False) or torch.optim.SparseAdam"
            )
        params.append(p)
        grads.append(p.grad)
    return params, grads


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent with momentum; ``torch.optim.SGD`` math with ``dampening=0``.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lr: learning rate (default 1e-3, like torch).
        momentum: momentum factor (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        nesterov: Nesterov momentum (needs ``momentum > 0``).

    Example::

        >>> import torch
        >>> from localize.runtime.optim import SGD
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2)
        >>> opt.step()
        >>> w.data, opt.state[w]["momentum_buffer"]
        (tensor([0.9000, 0.9000]), tensor([1., 1.]))
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise LocalizeError(
                f"SGD: lr, momentum and weight_decay must be >= 0, got lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}"
            )
        if nesterov and momentum <= 0:
            raise LocalizeError(
                "SGD: nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False"
            )
        # torch's full set of group keys, fixed where the kernels do not vary, so torch.optim.SGD
        # can load this optimizer's state_dict and run it unchanged.
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=0.0,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=False,
            foreach=None,
            differentiable=False,
            fused=None,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            _check_group("SGD", group, {"dampening": 0, "maximize": False, "differentiable": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _grads_of("SGD", group)
            if not params:
                continue
            momentum = group["momentum"]
            buffers = []
            if momentum != 0:
                for p in params:
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        # Zeros + dampening 0 give torch's first-step buffer (= d_p) exactly.
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buffers.append(state["momentum_buffer"])
            sgd_step(
                params,
                grads,
                buffers,
                lr=group["lr"],
                momentum=momentum,
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
            )
        return loss


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay; ``torch.optim.AdamW`` math (amsgrad off).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lr: learning rate (default 1e-3).
        betas: decay rates of the first and second moment averages (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay, ``p *= 1 - lr * weight_decay`` (default 1e-2).

    Example::

        >>> import torch
        >>> from localize.runtime.optim import AdamW
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = AdamW([w], lr=0.1, weight_decay=0.0)
        >>> w.grad = torch.ones(2)
        >>> opt.step()
        >>> w.data, opt.state[w]["step"]
        (tensor([0.9000, 0.9000]), tensor(1.))
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise LocalizeError(
                f"AdamW: lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, weight_decay={weight_decay}"
            )
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise LocalizeError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(
            lr=lr,
            betas=(float(betas[0]), float(betas[1])),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=False,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            _check_group("AdamW", group, {"amsgrad": False, "maximize": False, "differentiable": False})
            # A state from torch's fused/capturable AdamW keeps "step" on the device; the kernels
            # read it on the host every step, so keep it there (as torch's default AdamW does).
            group["capturable"], group["fused"] = False, None
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                    self.state[p]["step"] = step.detach().to("cpu", _scalar_dtype())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _grads_of("AdamW", group)
            # Parameters that skipped steps (no grad) have their own count: one launch per count.
            by_step: dict[int, list[int]] = {}
            for i, p in enumerate(params):
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(int(state["step"].item()), []).append(i)
            for step, idx in by_step.items():
                adamw_step(
                    [params[i] for i in idx],
                    [grads[i] for i in idx],
                    [self.state[params[i]]["exp_avg"] for i in idx],
                    [self.state[params[i]]["exp_avg_sq"] for i in idx],
                    step=step,
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss


OPTIMIZERS = {
    "sgd": (SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (AdamW, {"lr": 1e-3}),
}


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer by name: ``"sgd"`` (defaults lr=0.05, momentum=0.9) or ``"adamw"`` (lr=1e-3).

    Other keyword arguments go to the constructor (:class:`SGD` / :class:`AdamW`).

    Example::

        >>> import torch
        >>> from localize.runtime.optim import build_optimizer
        >>> opt = build_optimizer("sgd", torch.nn.Linear(2, 2).parameters())
        >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["momentum"]
        ('SGD', 0.05, 0.9)
    """
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise LocalizeError(f"unknown optimizer {name!r}; valid names: {', '.join(map(repr, OPTIMIZERS))}")
    cls, defaults = OPTIMIZERS[name.lower()]
    valid = [n for n in inspect.signature(cls).parameters if n != "params"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise LocalizeError(
            f"build_optimizer({name!r}) got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    options = {**defaults, **kwargs}
    if lr is not None:
        options["lr"] = lr
    return cls(params, **options)
