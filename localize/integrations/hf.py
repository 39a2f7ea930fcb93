"""Train a Hugging Face model with local learning under ``transformers.Trainer``.

:class:`LocalTrainer` is a ``Trainer`` subclass. When the Trainer builds its optimizer it transforms
``model`` from the first training batch (its keyword inputs; the labels are the target), and every
training step runs ``lm.train_step``: each block's forward, local loss, backward and update. What the
``TrainingArguments`` ask for maps onto the step:

* ``learning_rate``, ``weight_decay``, ``optim`` and the Adam settings: one optimizer per block,
  of the class and options the Trainer itself would use (``Trainer.get_optimizer_cls_and_kwargs``),
  with the same no-decay groups for biases and norms;
* ``lr_scheduler_type`` and the warmup: the Trainer's own scheduler, which sets the learning rate
  of every block's parameter groups (they are the groups of the optimizer it sees);
* ``gradient_accumulation_steps``: ``transform(accumulate=N)``, the updates on the Trainer's own
  boundaries (a short last cycle of an epoch updates early, averaging over N);
* ``max_grad_norm``: ``clip_grad_norm`` per block; ``bf16=True``: ``autocast="bf16"`` (for fp16,
  pass ``autocast="fp16"``, which scales per block, instead of ``fp16=True``).

The aux heads are initialised from ``args.seed`` (without touching the run's random state). The
model stays the Trainer's model, sharing its parameters with the blocks: ``save_model`` writes
the original model's weights, and evaluation and prediction run the model as before. Checkpoints
save the block optimizers, the aux heads and where the accumulation stands in ``optimizer.pt`` (the
heads are not part of the model), so ``train(resume_from_checkpoint=...)`` continues the run.
Training logs add ``loss_block_<i>``, each block's mean local loss since the last log.

Example:
    >>> import contextlib, io, tempfile, torch, transformers
    >>> from localize.integrations.hf import LocalTrainer
    >>> config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=2)
    >>> model = transformers.GPT2LMHeadModel(config)
    >>> ids = torch.randint(0, 64, (32, 16))
    >>> data = [{"input_ids": x, "labels": x} for x in ids]
    >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=8,
    ...                                       logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    >>> trainer = LocalTrainer(model=model, args=args, train_dataset=data, blocks=2)
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
    ...     _ = trainer.train()
    >>> [k for k in trainer.state.log_history[0] if k.startswith("loss")]
    ['loss', 'loss_block_0', 'loss_block_1']
"""

from __future__ import annotations

from typing import Any

import torch

from localize.errors import ConfigError
from localize.extras import require
from localize.runtime.checkpoint import loop_state, restore_loop_state

transformers = require("transformers", "hf", "localize.integrations.hf")

__all__ = ["LocalTrainer", "causal_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Trainer's own causal-LM loss (labels shifted inside, ``-100`` ignored)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


class _BlockOptimizers(torch.optim.Optimizer):
    """The optimizer the Trainer sees: every block optimizer's parameter groups, shared.

    Its ``step`` does nothing (each block updated itself inside ``train_step``); its groups are the
    block optimizers' own dicts, so the Trainer's scheduler sets every block's learning rate; its
    state is the blocks' optimizer states plus the local-learning state the model does not hold.
    """

    def __init__(self, trainer: LocalTrainer) -> None:
        lm = trainer.lm
        self._trainer = trainer
        self._blocks = [o for o in lm.optimizers if o is not None]
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.param_groups = [g for o in self._blocks for g in o.param_groups]
        self.defaults = dict(self._blocks[0].defaults) if self._blocks else {}

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # each block zeroes its gradients where an accumulation cycle starts

    def state_dict(self) -> dict[str, Any]:
        lm = self._trainer.lm
        return {"blocks": [o.state_dict() for o in self._blocks], "aux": lm.aux.state_dict(), **loop_state(lm)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        lm = self._trainer.lm
        for optimizer, state in zip(self._blocks, state_dict["blocks"]):
            optimizer.load_state_dict(state)
        self.param_groups = [g for o in self._blocks for g in o.param_groups]  # load_state_dict made new ones
        lm.aux.load_state_dict(state_dict["aux"])
        restore_loop_state(lm, state_dict)


class LocalTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains ``model`` as ``blocks`` gradient-isolated blocks.

    Args:
        blocks: K, the number of blocks.
        **kwargs: the Trainer's own arguments (``model``, ``args``, ``train_dataset``, ...) and
            :func:`localize.transform`'s options (``aux``, ``loss_fn``, ``output``, ``cuts``, ...).
            The default loss is the Trainer's causal-LM loss for ``*ForCausalLM``/``*LMHeadModel``
            models and cross-entropy over the last dimension otherwise.

    After training starts, ``trainer.lm`` is the :class:`~localize.LocalModel`.
    """

    _TRANSFORM = {
        "aux", "aux_options", "loss_fn", "output", "balance", "cuts", "max_frontier", "on_nan", "autocast",
    }

    def __init__(self, *args: Any, blocks: int = 4, **kwargs: Any) -> None:
        self._options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._TRANSFORM}
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ConfigError(
                "LocalTrainer scales each block's loss itself: pass autocast='fp16' to LocalTrainer instead of "
                "TrainingArguments(fp16=True)"
            )
        self.blocks = blocks
        self.lm = None
        self._block_sums: list[float] = []
        self._block_count = 0

    # ------------------------------------------------------------------ the model, from the first batch

    def _labels_of(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        names = self.args.label_names or ["labels"]
        if len(names) != 1 or names[0] not in batch:
            raise ConfigError(
                f"LocalTrainer trains on one target: the batches must hold {names[0]!r} (they hold "
                f"{sorted(batch)}); set TrainingArguments(label_names=[...]) to the target's name"
            )
        inputs = {k: v for k, v in batch.items() if k != names[0]}
        return inputs, batch[names[0]]

    def _localize(self) -> None:
        batch = self._prepare_inputs(next(iter(self.get_train_dataloader())))
        inputs, _ = self._labels_of(batch)
        model = self.model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        decay_names = set(self.get_decay_parameter_names(model))
        decay = {id(p) for n, p in model.named_parameters() if n in decay_names}
        weight_decay = self.args.weight_decay

        def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            groups = [
                {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
            ]
            return cls([g for g in groups if g["params"]], **kwargs)

        options = dict(self._options)
        if "loss_fn" not in options and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            options["loss_fn"] = causal_lm_loss
        if self.args.bf16:
            options.setdefault("autocast", "bf16")
        clip = self.args.max_grad_norm
        with torch.random.fork_rng(devices=[]):  # the aux heads start from args.seed; the run's RNG is untouched
            torch.manual_seed(self.args.seed)
            self.lm = self._transform(model, inputs, factory, clip, options)
        self._block_sums = [0.0] * len(self.lm.blocks)

    def _transform(self, model: Any, inputs: dict[str, Any], factory: Any, clip: float, options: dict) -> Any:
        import localize

        return localize.transform(
            model,
            blocks=self.blocks,
            example_kwargs=inputs,
            optimizer=factory,
            clip_grad_norm=clip if clip and clip > 0 else None,
            accumulate=self.args.gradient_accumulation_steps,
            **options,
        )

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if self.lm is None:
                self._localize()
            self.optimizer = _BlockOptimizers(self)
        return self.optimizer

    # ------------------------------------------------------------------ the step

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        inputs, target = self._labels_of(self._prepare_inputs(inputs))
        self.lm.train()
        losses = self.lm.train_step(inputs, target, update=self.accelerator.sync_gradients)
        self._block_sums = [s + v for s, v in zip(self._block_sums, losses)]
        self._block_count += 1
        # the Trainer sums these over an update's micro-batches for its "loss"
        return torch.tensor(losses[-1] / self.current_gradient_accumulation_steps, device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._block_count:
            for i, s in enumerate(self._block_sums):
                logs[f"loss_block_{i}"] = round(s / self._block_count, 6)
            self._block_sums = [0.0] * len(self._block_sums)
            self._block_count = 0
        super().log(logs, start_time)
