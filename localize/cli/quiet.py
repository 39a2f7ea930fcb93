"""Keep torch's own output off the terminal while a model is compiled.

A model that torch.export cannot capture makes torch print warnings and whole graph dumps (some of it
from C++, straight to file descriptor 2) before localize's one-line error. :func:`torch_output_to`
sends file descriptors 1 and 2 to a temporary file while the compile step runs; when the step fails,
the text is kept at ``log`` and the error names it, so the terminal shows one line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from localize.errors import LocalizeError

__all__ = ["torch_output_to"]


@contextmanager
def torch_output_to(log: Path) -> Iterator[None]:
    """Capture stdout and stderr (Python's and the C++ ones); on a LocalizeError write them to ``log``."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        text = open(sink.fileno(), "w", closefd=False, buffering=1)  # noqa: SIM115 - closed below
        failed: LocalizeError | None = None
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with redirect_stdout(text), redirect_stderr(text):
                yield
        except LocalizeError as e:
            failed = e
            raise
        finally:
            text.flush()
            text.close()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            if failed is not None:
                sink.seek(0)
                captured = sink.read()
                if captured.strip():
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_bytes(captured)
                    failed.args = (f"{failed.args[0] if failed.args else failed} (torch's messages are in {log})",)
