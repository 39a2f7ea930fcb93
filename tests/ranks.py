"""Real rank processes for the distributed tests: forked from a warm fork server, with torchrun's
environment, one thread each; and the in-process reference they are compared with."""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.context
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def _rank_main(module: str, argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """A rank's body, in the forked child: torchrun's environment, stdout/stderr (file descriptors
    1 and 2, so C++ logs too) in files, then ``module.main(argv)``'s exit code."""
    code = 3
    try:
        os.environ.clear()
        os.environ.update(env)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        code = importlib.import_module(module).main(argv)
    except BaseException:  # noqa: BLE001 - report anything, then leave without cleanup
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_SERVER: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    """Ranks are forked from a fork server, a clean process that imported torch and localize once:
    a rank skips the seconds a fresh interpreter pays, and it is not forked from the test process,
    which has run autograd (after a ``FakeTensorMode`` run, as ``transform`` does, torch >= 2.14 refuses
    autograd in a child forked from a process that has run backward)."""
    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload([
            "torch._dynamo", "torch._inductor", "torch.export._trace", "torch.onnx",  # what ranks import lazily
            "localize.distributed", "localize.cli.main", "rank_warmup",
        ])
    return _SERVER


class Rank:
    """One rank, a process forked from the fork server (:func:`_server`), running ``module.main(argv)``
    with torchrun's environment and its output in files, like a separate process."""

    def __init__(self, module: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.returncode: int | None = None
        self.process = _server().Process(
            target=_rank_main, args=(module, argv, env, str(self.out), str(self.err)), daemon=True
        )
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        if self.returncode is None and self.process.exitcode is not None:
            self.returncode = self.process.exitcode
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
        return self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.poll() is None:
            self.process.kill()
            self.process.join()
            self.returncode = -signal.SIGKILL

    def wait(self) -> int | None:
        self.process.join()
        return self.poll()


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
