"""Distributed checkpoints and resumption: a pipeline killed with SIGKILL mid-epoch and relaunched
with ``--resume auto`` ends bit-identical to an uninterrupted run (ranks from a fork server, and cold processes
under ``torchrun --max-restarts 1``); a checkpoint resumes on another replica count; it loads into
one process; files that would run code, or belong to another model, are refused.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import free_port, launch, rank_env, wait_all

from localize.distributed import load_checkpoint
from localize.distributed.checkpoint import find_latest, load_state, read_keys, restore_stage
from localize.distributed.launch import load_local_model
from localize.runtime.checkpoint import CheckpointError

# 3 epochs of 12 batches; stage 0 kills its own process (SIGKILL) before it reads its $KILL_AT-th
# batch, on the first attempt only (torchrun counts restarts in TORCHELASTIC_RESTART_COUNT).
MODEL = """
import os, signal, torch
from localize.zoo import MLP

def model():
    return MLP(16, 32, 4, 5)

def example_inputs():
    return (torch.randn(4, 16),)

class Batches:
    # the same 12 batches every epoch; counts the batches this process has read

    read = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        kill = os.environ.get("KILL_AT")
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        for i in range(12):
            if kill is not None and first and Batches.read == int(kill):
                os.kill(os.getpid(), signal.SIGKILL)
            Batches.read += 1
            yield torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g)

def dataset():
    return Batches(), Batches()
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "killed.py"
    path.write_text(MODEL)
    return path


def _states_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run(model_file: Path, out: Path, *args: str, world: int = 2, **env: str) -> list:
    argv = ["--blocks", "2", "--epochs", "3", "--checkpoint", str(out), "--timeout", "5", "--startup-timeout", "30", *args]
    return wait_all(launch(model_file, world, *argv, **env), timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(model_file, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    results = _run(model_file, out)
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    return load_checkpoint(out)


def test_killed_mid_epoch_and_resumed_auto_ends_bit_identical(model_file, uninterrupted, tmp_path):
    out = tmp_path / "out"
    killed = _run(model_file, out, "--checkpoint-every", "5", "--resume", "auto", KILL_AT="19")
    assert killed[0][0] == -9 and killed[1][0] == 1, [r[2][-800:] for r in killed]  # rank 1 lost rank 0
    latest = find_latest(out.with_name("out.checkpoint"))
    assert latest is not None and latest.name == "step-00000015"  # 12 + 7 read: 19 started, 15 saved
    resumed = _run(model_file, out, "--checkpoint-every", "5", "--resume", "auto")
    assert [r[0] for r in resumed] == [0, 0], [r[2][-1500:] for r in resumed]
    assert "resumed from" in resumed[0][1] and "at microbatch 15 (epoch 2, batch 3)" in resumed[0][1]
    assert "trained 21 microbatches" in resumed[0][1]  # 36 - 15
    _states_equal(load_checkpoint(out), uninterrupted)
    assert not out.with_name("out.checkpoint").exists()  # the finished run removes its periodic ones


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_bit_identical(model_file, uninterrupted, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "localize.distributed", str(model_file), "--blocks", "2", "--epochs", "3", "--threads", "1",
        "--checkpoint", str(out), "--checkpoint-every", "4", "--resume", "auto", "--timeout", "5",
    ]
    env = dict(rank_env(2), KILL_AT="14")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("at microbatch 12 (epoch 1, batch 12)") == 1, proc.stdout[-2000:]  # rank 0 says it
    _states_equal(load_checkpoint(out), uninterrupted)


def test_a_checkpoint_resumes_on_another_replica_count_and_loads_in_one_process(model_file, uninterrupted, tmp_path):
    """Written by 2 stages x 1 replica, resumed by 2 x 2 (each replica half of every batch, DDP):
    the same training within float rounding; and its shards read back in this one process."""
    out = tmp_path / "out"
    killed = _run(model_file, out, "--checkpoint-every", "6", KILL_AT="19")
    assert killed[0][0] == -9
    periodic = out.with_name("out.checkpoint")
    saved = load_checkpoint(periodic)  # the latest, step 18, in one process
    lm, _ = load_local_model(str(model_file), 2)
    lm.load_state_dict(saved)  # every entry of the LocalModel is in it
    assert find_latest(periodic).name == "step-00000018"
    resumed = _run(model_file, out, "--resume", str(periodic), world=4)
    assert [r[0] for r in resumed] == [0, 0, 0, 0], [r[2][-1500:] for r in resumed]
    assert "2 stages x 2 replicas" in resumed[0][1]
    got = load_checkpoint(out)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0, msg=k)


def test_files_that_would_run_code_or_belong_to_another_model_are_refused(model_file, tmp_path):
    out = tmp_path / "out"
    results = _run(model_file, out, "--epochs", "1")
    assert [r[0] for r in results] == [0, 0]
    [folder] = (out / "checkpoint").iterdir()
    other, _ = load_local_model(str(model_file), 2, aux="featrecon")  # the run used dgl heads
    with pytest.raises(CheckpointError, match="belongs to another model or plan: aux: checkpoint has 'dgl'"):
        restore_stage(other, 0, [], 0, folder)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="never runs code"):
        read_keys(folder)
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(out / "checkpoint")
    assert not marker.exists()


def test_resuming_another_plans_checkpoint_is_one_line_and_exit_2(model_file, tmp_path):
    out = tmp_path / "out"
    assert [r[0] for r in _run(model_file, out, "--epochs", "1")] == [0, 0]
    results = _run(model_file, tmp_path / "other", "--aux", "featrecon", "--resume", str(out / "checkpoint"))
    assert [r[0] for r in results] == [2, 2], [r[2][-800:] for r in results]
    lines = results[0][2].strip().splitlines()
    assert len(lines) == 1 and "belongs to another model or plan: aux: checkpoint has 'dgl'" in lines[0], lines
    assert not results[1][2].strip()  # rank 0 says it once


def test_plain_data_entries_are_read_without_running_code(tmp_path):
    """A crafted plain-data entry (stored as torch.save bytes) is refused by weights_only."""
    import io

    from localize.distributed.checkpoint import save_state

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    crafted = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    folder = save_state({"meta~plain": crafted, "lm/x": torch.ones(2)}, tmp_path / "ck", step=1)
    assert torch.equal(load_state(folder, ["lm/x"])["lm/x"], torch.ones(2))
    with pytest.raises(CheckpointError, match="more than tensors and plain data"):
        load_state(folder, ["meta"])
    assert not marker.exists()
