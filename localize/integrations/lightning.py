"""Train a :class:`~localize.LocalModel` under ``lightning.Trainer``.

:class:`LocalizeModule` is a ``LightningModule`` with manual optimization: each training batch runs
``lm.train_step`` (the generated step: every block's forward, local loss, backward and update), with
the block optimizers handed over as Lightning's own optimizer wrappers so the Trainer counts every
block's update in ``global_step``, profiles it and runs its precision plugin's step. The Trainer's
checkpoints hold the model and heads (``state_dict``), every block's optimizer and learning-rate
scheduler (they are what ``configure_optimizers`` returns) and the step count, the accumulation
position and its pending gradients, the ``GradScaler`` states (``on_save_checkpoint``), so
``trainer.fit(module, ckpt_path=...)`` resumes where the run stopped. Validation runs the model's own
forward and the transform's loss.

Use ``transform(autocast=...)``, not Lightning's ``precision="16-mixed"``, for mixed precision (it
scales per block); and ``transform(accumulate=N)`` rather than ``accumulate_grad_batches``, which
Lightning applies only to automatic optimization.

Example:
    >>> import torch, lightning, localize
    >>> from localize.integrations.lightning import LocalizeModule
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    >>> lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 8),))
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> trainer = lightning.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
    ...                             enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(LocalizeModule(lm), torch.utils.data.DataLoader(data, batch_size=8))
    >>> trainer.global_step  # 4 batches, an update of each of the 2 blocks per batch
    8
"""

from __future__ import annotations

from typing import Any

import torch

from localize.compiler.traced import output_leaf
from localize.extras import require
from localize.runtime.checkpoint import loop_state, restore_loop_state
from localize.runtime.model import LocalModel

L = require("lightning", "lightning", "localize.integrations.lightning")

__all__ = ["LocalizeModule"]


class LocalizeModule(L.LightningModule):
    """A ``LightningModule`` that trains ``lm`` with its local steps.

    Args:
        lm: the transformed model (from :func:`localize.transform`, with example inputs or after
            one call, so that its heads and optimizers exist).
        log_accuracy: also log the top-1 accuracy in validation (for class-index targets).

    A batch is ``(inputs, target)``, with ``inputs`` a tensor, a tuple of tensors or a dict of
    keyword tensors, as for ``lm.train_step``. Each training step logs ``loss`` (the last block's,
    the model's own loss) and ``loss/block_<i>`` for every block.
    """

    def __init__(self, lm: LocalModel, *, log_accuracy: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.log_accuracy = log_accuracy
        self.automatic_optimization = False  # the step graph updates each block itself

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        optimizers = [o for o in self.lm.optimizers if o is not None]
        schedulers = [
            {"scheduler": s, "interval": "step"} for s in self.lm.schedulers if s is not None
        ]
        return (optimizers, schedulers) if schedulers else optimizers

    def _wrapped(self) -> list[Any]:
        """The block optimizers as Lightning's wrappers, in block order (None where a block has none)."""
        wrapped = self.optimizers()
        wrapped = list(wrapped) if isinstance(wrapped, (list, tuple)) else [wrapped]
        by_id = {id(w.optimizer): w for w in wrapped}
        return [by_id.get(id(o)) if o is not None else None for o in self.lm.optimizers]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        losses = self.lm.train_step(inputs, target, optimizers=self._wrapped())
        batch_size = len(target)
        for i, value in enumerate(losses):
            self.log(f"loss/block_{i}", value, batch_size=batch_size)
        self.log("loss", losses[-1], prog_bar=True, batch_size=batch_size)
        return torch.tensor(losses[-1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = batch
        pred = self._prediction(inputs)
        batch_size = len(target)
        self.log("val_loss", float(self.lm.loss_fn(pred, target)), prog_bar=True, batch_size=batch_size)
        if self.log_accuracy and not target.is_floating_point() and pred.shape[:-1] == target.shape:
            accuracy = (pred.argmax(-1) == target).float().mean()
            self.log("val_acc", accuracy, prog_bar=True, batch_size=batch_size)

    def _prediction(self, inputs: Any) -> torch.Tensor:
        return output_leaf(self.lm(*self.lm._flat_inputs(inputs)), self.lm.plan.output_index)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["localize"] = loop_state(self.lm)  # step, accumulation, scalers, pending gradients

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "localize" in checkpoint:
            restore_loop_state(self.lm, checkpoint["localize"])
