"""`--checkpoint-every N` / `--resume PATH`: a training process killed with SIGKILL in the middle
of an epoch resumes from its last checkpoint and ends with bit-identical parameters (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from localize.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

# Dropout draws from the RNG and batch-norm keeps running statistics: both must resume exactly.
# TINY_SLEEP slows the killed run so the kill lands mid-epoch; it changes no number.
MODEL = textwrap.dedent(
    """
    import os
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn


    def model():
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                             nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


    def example_inputs():
        return (torch.randn(4, 6),)


    def dataset():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(56, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return (x[:40], y[:40]), (x[40:], y[40:])


    def loss_fn(pred, target):
        time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
        return F.cross_entropy(pred, target)
    """
)
EPOCHS, BATCH, STEPS_PER_EPOCH = 3, 8, 5  # 40 samples / 8
COMMON = [
    "--blocks",
    "2",
    "--train",
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    str(BATCH),
    "--no-onnx",
    "--optimizer",
    "adamw",
    "--seed",
    "3",
]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The final checkpoint of a one-epoch run."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.py").write_text(MODEL)
    assert main([str(folder / "tiny.py"), *COMMON, "--epochs", "1", "--out", str(folder / "a")]) == 0
    return folder / "a" / "checkpoint.pt"


def final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    return {f"model.{k}": v for k, v in ckpt["model"].items()} | {
        f"aux.{k}": v for k, v in ckpt["aux"].items()
    }


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_sigkill_mid_epoch_then_resume_is_bit_identical(model_file: Path, tmp_path: Path, capsys):
    # the reference: one uninterrupted run, in this process (no checkpoints written)
    assert main([str(model_file), *COMMON, "--out", str(tmp_path / "straight")]) == 0, capsys.readouterr().err

    killed_out = tmp_path / "killed"
    checkpoint = tmp_path / "killed.checkpoint.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINY_SLEEP="0.1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localize",
            str(model_file),
            *COMMON,
            "--checkpoint-every",
            "3",
            "--out",
            str(killed_out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while True:  # wait for a checkpoint from the second epoch (step 6: epoch 2, batch 1)
            assert proc.poll() is None, f"training ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["step"] >= 6:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed_out.exists()  # the output directory only appears when a run finishes

    saved = torch.load(checkpoint, weights_only=False)
    position = saved["data"]
    assert saved["step"] % 3 == 0 and saved["step"] < EPOCHS * STEPS_PER_EPOCH
    assert 0 < position["batch"] < STEPS_PER_EPOCH  # in the middle of an epoch
    assert position["epoch"] >= 1 and len(position["history"]["epochs"]) == position["epoch"]

    resumed_out = tmp_path / "resumed"
    code = main(
        [
            str(model_file),
            *COMMON,
            "--checkpoint-every",
            "3",
            "--resume",
            str(checkpoint),
            "--out",
            str(resumed_out),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"resuming at epoch {position['epoch'] + 1}, step {saved['step']}" in out

    assert_bit_identical(final_state(resumed_out), final_state(tmp_path / "straight"))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())["local"]
    resumed = json.loads((resumed_out / "metrics.json").read_text())["local"]
    assert resumed["step_losses"] == straight["step_losses"]  # the whole history, the killed part included
    assert [e["train_losses"] for e in resumed["epochs"]] == [e["train_losses"] for e in straight["epochs"]]
    assert [e["test_loss"] for e in resumed["epochs"]] == [e["test_loss"] for e in straight["epochs"]]
    assert not (tmp_path / "resumed.checkpoint.pt").exists()  # finished: OUT/checkpoint.pt supersedes it


def test_resume_final_checkpoint_with_more_epochs(model_file: Path, tmp_path: Path, capsys):
    one, two = [*COMMON, "--epochs", "1"], [*COMMON, "--epochs", "2"]  # the last --epochs counts
    assert main([str(model_file), *two, "--out", str(tmp_path / "two")]) == 0
    assert main([str(model_file), *one, "--out", str(tmp_path / "one")]) == 0
    assert (
        main(
            [
                str(model_file),
                *two,
                "--resume",
                str(tmp_path / "one" / "checkpoint.pt"),
                "--out",
                str(tmp_path / "one_plus_one"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert_bit_identical(final_state(tmp_path / "one_plus_one"), final_state(tmp_path / "two"))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--seed", "4"], "trained with --seed 3, this run has --seed 4"),
        (["--batch-size", "4"], "trained with --batch-size 8, this run has --batch-size 4"),
        (["--blocks", "3"], "checkpoint belongs to another model or plan"),
    ],
    ids=["seed", "batch-size", "blocks"],
)
def test_resume_refuses_a_different_run(
    change: list[str], message: str, trained: Path, model_file: Path, tmp_path: Path, capsys
):
    argv = [str(model_file), *COMMON, *change, "--resume", str(trained), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "b").exists()


def test_checkpoint_without_training_position_is_refused(model_file: Path, tmp_path: Path, capsys):
    import localize
    from localize.compiler.model_file import load_model_file, localize_file

    lm, _ = localize_file(load_model_file(str(model_file)), blocks=2, seed=3)
    lm.save(str(tmp_path / "api.pt"))  # a checkpoint from the API: no data position
    assert localize.load(str(tmp_path / "api.pt")).data == {}
    assert (
        main([str(model_file), *COMMON, "--resume", str(tmp_path / "api.pt"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "has no training position" in capsys.readouterr().err
