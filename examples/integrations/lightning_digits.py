"""Local learning under ``lightning.Trainer``: a small CNN on scikit-learn's 8x8 digits.

The model is cut into 3 gradient-isolated blocks; :class:`localize.integrations.lightning.LocalizeModule`
trains them with Lightning's loop, logging every block's loss, validating with the model's own forward
and checkpointing through the Trainer (resume with ``--resume PATH.ckpt``)::

    python examples/integrations/lightning_digits.py --epochs 5

Needs ``pip install 'localize-learning[lightning,data]'``.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import localize
from localize.data import digits
from localize.integrations.lightning import LocalizeModule
from localize.runtime.schedulers import LRSchedule
from localize.zoo import SmallCNN


def main(argv: list[str] | None = None) -> dict[str, float]:
    import lightning

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="localize_out/lightning_digits")
    p.add_argument("--resume", default=None, help="a checkpoint the Trainer wrote")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    (x, y), (x_test, y_test) = digits(test_fraction=0.2, seed=0)
    train = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    updates = args.epochs * len(train)
    lm = localize.transform(
        SmallCNN(in_channels=1, num_classes=10),
        blocks=args.blocks,
        example_inputs=(x[:8],),
        lr=3e-3,
        clip_grad_norm=1.0,
        scheduler=LRSchedule("cosine", total=updates, warmup=updates // 20),
    )
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        default_root_dir=args.out,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(LocalizeModule(lm), train, test, ckpt_path=args.resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"validation accuracy {100 * metrics['val_acc']:.1f}% after {args.epochs} epochs "
          f"({trainer.global_step} block updates); checkpoints in {trainer.checkpoint_callback.dirpath}")
    return metrics


if __name__ == "__main__":
    main()
