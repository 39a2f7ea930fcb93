"""Which block falls behind, and why: ``localize.diagnose(lm, inputs, target)``.

For one batch it reports, per block:

* **cosine**: the cosine between the block's *local* gradient (what ``train_step`` would apply: the
  gradient of its own loss, through its aux head) and the *end-to-end* gradient of the same
  parameters (plain backprop of the model's loss through the whole model). 1 means the local loss
  pushes the block exactly where backprop would; near 0, the block learns something else. The last
  block's is 1 (its loss is the model's), and every block's is 1 at K=1.
* **local loss** against the **final loss**: the block's own loss on this batch (its aux head's
  prediction scored like the model's), and the model's.
* **probe**: the test accuracy of a linear classifier fitted on half the batch to the block's
  output (pooled over positions for one label per sample, per position for one per position) and
  scored on the other half; ``chance`` is the majority class's share of that half.

Nothing is trained and nothing changes: gradients, buffers (batch-norm statistics) and the random
state are restored, so ``diagnose`` can run between training steps. Both passes draw the same
dropout masks (the same seed), in the model's current mode.

Example:
    >>> import torch, localize
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
    ...                           torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 8),))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> report = localize.diagnose(lm, x, y)
    >>> len(report.blocks), round(report.blocks[-1].cosine, 4)  # the last block's loss is the model's
    (2, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from localize.compiler.traced import output_leaf
from localize.errors import ConfigError
from localize.runtime.ops import StepState, run_step

__all__ = ["BlockDiagnosis", "Diagnosis", "diagnose"]


@dataclass
class BlockDiagnosis:
    """One block's row of a :class:`Diagnosis`."""

    block: int
    params: int  # model parameters the block trains
    cosine: float | None  # local vs end-to-end gradient of those parameters (None: no gradient)
    local_loss: float
    probe_accuracy: float | None  # None: the target is not class indices


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured on one batch; ``str()`` is a table."""

    final_loss: float
    chance: float | None
    blocks: list[BlockDiagnosis]

    def __str__(self) -> str:
        lines = [f"{'block':>5}  {'params':>9}  {'grad cosine':>11}  {'local loss':>10}  {'probe acc':>9}"]
        for b in self.blocks:
            cos = f"{b.cosine:.3f}" if b.cosine is not None else "-"
            probe = f"{100 * b.probe_accuracy:.1f}%" if b.probe_accuracy is not None else "-"
            lines.append(f"{b.block:>5}  {b.params:>9,}  {cos:>11}  {b.local_loss:>10.4f}  {probe:>9}")
        chance = f", probe chance {100 * self.chance:.1f}%" if self.chance is not None else ""
        lines.append(f"final loss (end to end) {self.final_loss:.4f}{chance}")
        return "\n".join(lines)


def diagnose(lm: Any, inputs: Any, target: torch.Tensor, *, probe_steps: int = 200, seed: int = 0) -> Diagnosis:
    """Per block: gradient cosine with backprop, local vs final loss, linear-probe accuracy.

    Args:
        lm: a :class:`~localize.LocalModel`.
        inputs: one batch, as for ``lm.train_step`` (a tensor, a tuple, or a dict of keywords).
        target: its target. The probe needs class indices; with other targets it is skipped.
        probe_steps: full-batch optimisation steps of each linear probe.
        seed: seeds both passes' dropout (the caller's random state is restored).
    """
    flat = lm._flat_inputs(inputs)
    lm._check_devices(flat)
    lm._ensure_ready(flat)
    lm._ensure_optimizers()
    params = list(lm.parameters())
    saved_grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in lm.buffers()]
    devices = sorted({p.device.index for p in params if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            local, values, features = _local_pass(lm, flat, target)
            torch.manual_seed(seed)
            end_to_end, final = _end_to_end_pass(lm, inputs, flat, target)
            torch.manual_seed(seed)
            probes = [_probe(features[b.index], target, probe_steps) for b in lm.blocks]
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
    rows, chance = [], None
    for block in lm.blocks:
        mine = [p for p in block.params if p.requires_grad]
        cosine = _cosine([local.get(p) for p in mine], [end_to_end.get(p) for p in mine])
        probe, chance_b = probes[block.index]
        chance = chance if chance_b is None else chance_b
        rows.append(BlockDiagnosis(block.index, sum(p.numel() for p in mine), cosine, values[block.index], probe))
    return Diagnosis(final, chance, rows)


def _local_pass(lm: Any, flat: list[Any], target: torch.Tensor):
    """The step's losses and backward, with no optimizer: the local gradients, left in ``.grad``."""
    for p in lm.parameters():
        p.grad = None
    k = len(lm.blocks)
    state = StepState(lm.loss_fn, [None] * k, on_nan="skip", schedulers=[None] * k, scalers=[None] * k)
    features: dict[int, Any] = {}
    step = lm._step_for(None)
    hooks = [
        getattr(step, f"block_{b.index}").register_forward_hook(
            lambda _m, _a, out, i=b.index: features.__setitem__(i, out[lm._loss_slots[i]].detach())
        )
        for b in lm.blocks
    ]
    try:
        values = run_step(step, state, flat, target)
    finally:
        for h in hooks:
            h.remove()
    grads = {p: p.grad.detach().clone() for p in lm.parameters() if p.grad is not None}
    return grads, values, features


def _end_to_end_pass(lm: Any, inputs: Any, flat: list[Any], target: torch.Tensor):
    """Plain backprop of the model's loss through the original model."""
    for p in lm.parameters():
        p.grad = None
    with torch.enable_grad():
        if isinstance(inputs, dict):
            out = lm.plan.traced.call_model(lm.model, (), inputs)
        else:
            args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            out = lm.plan.traced.call_model(lm.model, args)
        pred = output_leaf(out, lm.plan.output_index)
        loss = lm.loss_fn(pred, target)
        loss.backward()
    grads = {p: p.grad.detach().clone() for p in lm.parameters() if p.grad is not None}
    return grads, float(loss.detach())


def _cosine(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None or y is not None]
    if not pairs:
        return None
    u = torch.cat([(x if x is not None else torch.zeros_like(y)).double().flatten() for x, y in pairs])
    v = torch.cat([(y if y is not None else torch.zeros_like(x)).double().flatten() for x, y in pairs])
    denom = float(u.norm() * v.norm())
    return float(u @ v) / denom if denom > 0 else None


def _probe(feature: Any, target: torch.Tensor, steps: int) -> tuple[float | None, float | None]:
    """Linear probe: fit on the first half of the samples, accuracy and chance on the second."""
    if not isinstance(feature, torch.Tensor) or target.is_floating_point() or target.dim() == 0:
        return None, None
    x = feature.detach().float()
    y = target.detach()
    if tuple(x.shape[: y.dim()]) == tuple(y.shape) and x.dim() > y.dim():  # one label per position
        n, positions = y.shape[0], y.numel() // max(1, y.shape[0])
        x, y = x.reshape(y.numel(), -1), y.reshape(-1)
        half = (n // 2) * positions  # rows are sample-major: the first half of the samples
    elif x.shape[0] == y.shape[0] and y.dim() == 1:  # one label per sample: pool over positions
        x = x.flatten(2).mean(-1) if x.dim() > 2 else x.reshape(x.shape[0], -1)
        half = y.shape[0] // 2
    else:
        raise ConfigError(
            f"diagnose: a block output of shape {tuple(feature.shape)} does not match targets "
            f"{tuple(target.shape)}; pass one label per sample or per position"
        )
    keep = y >= 0  # ignore_index (-100) positions carry no label
    train, test = torch.zeros_like(keep), torch.zeros_like(keep)
    train[:half], test[half:] = True, True
    train, test = train & keep, test & keep
    if int(train.sum()) < 2 or int(test.sum()) < 1:
        return None, None
    classes = int(y[keep].max()) + 1
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    with torch.enable_grad():
        probe = torch.nn.Linear(x.shape[1], classes).to(x.device)
        opt = torch.optim.Adam(probe.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[train]), y[train]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((probe(x[test]).argmax(-1) == y[test]).float().mean())
    counts = torch.bincount(y[test], minlength=classes)
    chance = float(counts.max()) / max(1, int(test.sum()))
    return accuracy, chance
