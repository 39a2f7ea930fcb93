"""Real rank processes for the distributed tests: forked from the warm test process, with
torchrun's environment, one thread each; and the in-process reference they are compared with."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import localize
from localize.distributed import iter_batches, load_local_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(world: int, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        **extra,
    )
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


class Rank:
    """One rank forked from this (warm) process: it skips the seconds of importing torch and
    localize that a fresh interpreter pays, which keeps multi-process tests fast on 2 cores. The
    child runs ``python -m localize.distributed``'s ``main`` with torchrun's environment and its
    stdout/stderr (file descriptors 1 and 2, so C++ logs too) in files, like a separate process."""

    def __init__(self, module: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                os.environ.clear()
                os.environ.update(env)
                for fd, path in ((1, self.out), (2, self.err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                code = importlib.import_module(module).main(argv)
            except BaseException:  # noqa: BLE001 - report anything, then leave without pytest's cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, str]:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL

    def wait(self) -> int | None:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def launch(model: Path, world: int, *args: str, ranks: int | None = None, **extra: str) -> list[Rank]:
    """``python -m localize.distributed MODEL.py ARGS`` on the first ``ranks`` ranks of ``world``, one thread each."""
    return launch_module(
        "localize.distributed", [str(model), *args, "--threads", "1"], world, ranks, **extra
    )


def launch_module(
    module: str, argv: list[str], world: int, ranks: int | None = None, **extra: str
) -> list[Rank]:
    """``module.main(argv)`` on the first ``ranks`` ranks of ``world``, with torchrun's environment."""
    env = rank_env(world, **extra)
    logs = Path(tempfile.mkdtemp(prefix="ranks"))
    return [
        Rank(module, argv, dict(env, RANK=str(r), LOCAL_RANK=str(r)), logs / f"rank{r}")
        for r in range(world if ranks is None else ranks)
    ]


def wait_all(procs: list, timeout: float = 60) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def reference(model: Path, blocks: int, batch_size: int, **options) -> localize.LocalModel:
    """The same LocalModel trained in one process over the same batches, with one thread like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm, mf = load_local_model(str(model), blocks, **options)
        for x, y in iter_batches(mf.dataset()[0], batch_size):
            lm.train_step(x, y)
    finally:
        torch.set_num_threads(threads)
    return lm


def assert_same_state(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=0, msg=k)
