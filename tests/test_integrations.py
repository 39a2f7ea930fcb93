"""Trainers users already have: a real ``lightning.Trainer`` and a real ``transformers.Trainer``.

The references are independent of the integrations: the same batches through ``lm.train_step`` in a
plain loop (bit-identical parameters), an uninterrupted run (for resuming from the trainer's own
checkpoint), and the trainers' own counters and logs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import localize
from localize.runtime.schedulers import LRSchedule

lightning = pytest.importorskip("lightning")  # in the [dev] install; the base install says which extra


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )


def _data(n: int = 72):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # learnable: 3 classes from two signs
    return TensorDataset(x, y)


def _trainer(tmp_path, epochs: int, **kwargs):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=lightning.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


def _fit(lm, tmp_path, epochs: int, ckpt_path=None):
    from localize.integrations.lightning import LocalizeModule

    module = LocalizeModule(lm)
    trainer = _trainer(tmp_path, epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
        trainer.fit(
            module,
            DataLoader(_data(), batch_size=8),
            DataLoader(_data(24), batch_size=12),
            ckpt_path=ckpt_path,
        )
    return trainer


def _transform(**options):
    return localize.transform(_net(), blocks=3, example_inputs=(torch.randn(2, 6),), **options)


def test_lightning_trains_exactly_like_train_step_and_counts_each_block_update(tmp_path):
    lm = _transform(lr=0.01)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainer = _fit(lm, tmp_path, epochs=3)
    ref = _transform(lr=0.01)
    for _ in range(3):
        for x, y in DataLoader(_data(), batch_size=8):
            ref.train_step(x, y)
    for k, v in ref.state_dict().items():
        assert torch.equal(lm.state_dict()[k], v), k
    assert any(not torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert trainer.global_step == 3 * 9 * 3  # 9 batches an epoch, an update of each of 3 blocks per batch
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"loss/block_0", "loss/block_1", "loss/block_2", "loss", "val_loss", "val_acc"} <= set(header)
    losses = [float(r.split(",")[header.index("loss")]) for r in metrics[1:] if r.split(",")[header.index("loss")]]
    assert len(losses) == 27 and sum(losses[-9:]) < 0.8 * sum(losses[:9])  # it learns


def test_lightning_resumes_from_its_checkpoint_exactly(tmp_path):
    """Mid-cycle (9 batches, accumulate=2) with a schedule and fp16 scalers: the Trainer's checkpoint
    after epoch 1 resumes to the same parameters as an uninterrupted 2-epoch run."""
    options = dict(optimizer="sgd", lr=0.1, accumulate=2, autocast="fp16", scheduler=LRSchedule("cosine", 9, 1))
    whole = _transform(**options)
    _fit(whole, tmp_path / "whole", epochs=2)
    first = _transform(**options)
    _fit(first, tmp_path / "first", epochs=1)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*.ckpt")
    assert first.pending == 1  # the checkpoint holds half a cycle of gradients
    resumed = _transform(**options)
    _fit(resumed, tmp_path / "resumed", epochs=2, ckpt_path=str(ckpt))
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert [s.get_last_lr() for s in resumed.schedulers] == [s.get_last_lr() for s in whole.schedulers]
    assert resumed.step_count == whole.step_count == 18


# ----------------------------------------------------------------------------------------- transformers


def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=4, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _text(n: int, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of 32 ASCII characters of real text: the standard library's own sources."""
    import inspect
    import json

    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    codes = torch.tensor([min(ord(c), 127) for c in text[offset * 32 : (offset + n) * 32]])
    return [{"input_ids": x, "labels": x} for x in codes.view(n, 32)]


def _args(tmp_path, **kwargs):
    import transformers

    base = dict(
        per_device_train_batch_size=8, learning_rate=3e-3, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_steps=5, seed=0,
    )
    return transformers.TrainingArguments(str(tmp_path), **(base | kwargs))


def _quiet(fn, *args, **kwargs):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_transformers_trainer_trains_saves_and_evaluates_the_original_model(tmp_path):
    import transformers

    from localize.integrations.hf import LocalTrainer

    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = _args(tmp_path, max_steps=30)
    trainer = LocalTrainer(model=model, args=args, train_dataset=_text(96), eval_dataset=_text(16, 96), blocks=2)
    _quiet(trainer.train)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and {"loss_block_0", "loss_block_1"} <= set(logs[0])
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"] and logs[-1]["loss_block_0"] < logs[0]["loss_block_0"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(trainer.lm.blocks) == 2 and trainer.lm.model is model
    # save_model writes the original model, which loads back as a plain GPT-2
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # evaluation is the Trainer's own, unchanged
    plain = transformers.Trainer(model=model, args=args, eval_dataset=_text(16, 96))
    assert _quiet(trainer.evaluate)["eval_loss"] == pytest.approx(_quiet(plain.evaluate)["eval_loss"], rel=1e-6)


def test_transformers_trainer_steps_equal_a_train_step_loop(tmp_path):
    """Sequential batches, a constant rate, 2 batches per update, clipping at 1: the Trainer's run
    equals ``lm.train_step`` over the same batches with the Trainer's own optimizer class."""
    import localize
    from localize.integrations.hf import LocalTrainer, causal_lm_loss

    args = _args(
        tmp_path, max_steps=4, gradient_accumulation_steps=2, lr_scheduler_type="constant", max_grad_norm=1.0,
        train_sampling_strategy="sequential",
    )
    data = _text(64)
    trainer = LocalTrainer(model=_gpt2(), args=args, train_dataset=data, blocks=2)
    _quiet(trainer.train)
    cls, kwargs = LocalTrainer.get_optimizer_cls_and_kwargs(args)
    batches = [{k: torch.stack([d[k] for d in data[i : i + 8]]) for k in ("input_ids", "labels")} for i in range(0, 64, 8)]
    model = _gpt2()
    torch.manual_seed(args.seed)  # the trainer builds the aux heads from args.seed
    ref = localize.transform(
        model, blocks=2, example_kwargs={"input_ids": batches[0]["input_ids"]},
        optimizer=lambda params: cls(params, weight_decay=args.weight_decay, **kwargs), loss_fn=causal_lm_loss,
        accumulate=2, clip_grad_norm=1.0,
    )
    for batch in batches:
        ref.train_step({"input_ids": batch["input_ids"]}, batch["labels"])
    # to float rounding: the Trainer's groups (decay / no decay) order the clipping norm's sum
    # differently; an update more or less, or a wrong scale, moves parameters by ~lr = 3e-3
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(trainer.lm.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert trainer.state.global_step == 4 and ref.step_count == 8


def test_transformers_trainer_resumes_from_its_checkpoint(tmp_path):
    """A 6-update run (linear decay, 2 batches per update, 2 epochs) stopped after update 3 and
    resumed from the Trainer's checkpoint ends where the uninterrupted run ends."""
    import transformers

    from localize.integrations.hf import LocalTrainer

    class StopAt3(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(out, stop=False, resume=None):
        args = _args(out, max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
        callbacks = [StopAt3()] if stop else []
        trainer = LocalTrainer(model=_gpt2(), args=args, train_dataset=_text(64), blocks=2, callbacks=callbacks)
        _quiet(trainer.train, resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "first", stop=True)
    assert first.state.global_step == 3
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "first" / "checkpoint-3"))
    for k, v in whole.lm.state_dict().items():  # model and aux heads
        torch.testing.assert_close(resumed.lm.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert resumed.lm.step_count == whole.lm.step_count == 12


def test_transformers_trainer_without_labels_says_what_to_set(tmp_path):
    from localize.errors import ConfigError
    from localize.integrations.hf import LocalTrainer

    data = [{"input_ids": d["input_ids"]} for d in _text(16)]
    trainer = LocalTrainer(model=_gpt2(), args=_args(tmp_path, max_steps=1), train_dataset=data, blocks=2)
    with pytest.raises(ConfigError, match=r"must hold 'labels' .*label_names"):
        _quiet(trainer.train)


# ----------------------------------------------------------------------------------------- docs and examples


def test_integration_doctests():
    import doctest

    import localize.integrations.hf
    import localize.integrations.lightning

    for module in (localize.integrations.lightning, localize.integrations.hf):
        result = _quiet(doctest.testmod, module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "integrations" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lightning_example_learns_the_digits(tmp_path):
    metrics = _quiet(_example("lightning_digits").main, ["--epochs", "2", "--out", str(tmp_path)])
    assert metrics["val_acc"] > 0.5  # 10 classes: chance is 0.1


def test_the_transformers_example_trains_and_saves_a_plain_gpt2(tmp_path):
    import transformers

    metrics = _quiet(_example("hf_gpt2_text").main, ["--steps", "12", "--out", str(tmp_path)])
    assert metrics["eval_loss"] < 4.85  # below the uniform guess over 128 characters, ln 128
    assert isinstance(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "model")), torch.nn.Module)
