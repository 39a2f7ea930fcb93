"""Local learning under ``transformers.Trainer``: a small GPT-2 on real text, character by character.

The text is the Python standard library's own source (on every machine, nothing to download). The
Trainer's arguments drive the run as usual (learning rate and schedule, accumulation, clipping,
logging, checkpoints); :class:`localize.integrations.hf.LocalTrainer` cuts the model into blocks at
the first batch and trains each with its own loss. ``save_model`` writes a plain GPT-2::

    python examples/integrations/hf_gpt2_text.py --steps 200

Needs ``pip install 'localize-learning[hf]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io

import torch


def text_dataset(seq: int = 64, vocab: int = 128) -> tuple[list[dict], list[dict]]:
    """Non-overlapping windows of ASCII characters of a few standard-library modules (90/10 split)."""
    import argparse as a
    import textwrap
    import typing

    text = "".join(inspect.getsource(m) for m in (a, textwrap, typing))
    codes = torch.tensor([min(ord(c), vocab - 1) for c in text])
    windows = codes[: len(codes) // seq * seq].view(-1, seq)
    data = [{"input_ids": w, "labels": w} for w in windows]
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:]


def main(argv: list[str] | None = None) -> dict[str, float]:
    import transformers

    from localize.integrations.hf import LocalTrainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--out", default="localize_out/hf_gpt2_text")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    train, test = text_dataset()
    targs = transformers.TrainingArguments(
        args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_steps=args.steps // 20,
        gradient_accumulation_steps=2,
        logging_steps=max(1, args.steps // 10),
        save_steps=args.steps // 2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = LocalTrainer(model=model, args=targs, train_dataset=train, eval_dataset=test, blocks=args.blocks)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict; we print a summary
        trainer.train()
        metrics = trainer.evaluate()
    for log in trainer.state.log_history:
        if "loss" in log:
            blocks = " ".join(f"{log[k]:.3f}" for k in sorted(log) if k.startswith("loss_block"))
            print(f"step {log['step']:4d}: loss {log['loss']:.3f}  blocks {blocks}")
    trainer.save_model(f"{args.out}/model")
    print(f"eval loss {metrics['eval_loss']:.3f}; the trained GPT-2 is in {args.out}/model")
    return metrics


if __name__ == "__main__":
    main()
