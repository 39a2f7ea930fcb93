"""Load a model file for the CLI: ``MODEL.py`` or ``MODEL.py:factory``.

A model file is a plain Python file that defines

* ``model()`` (or the function named after the colon): returns the ``nn.Module`` to localize;
* ``example_inputs()``: returns a tuple of example input tensors (one batch);
* optionally ``dataset()``: returns ``(train, test)``, each an ``(inputs, targets)`` pair of tensors
  (``inputs`` may be a tuple of tensors) or an iterable of such batches such as a ``DataLoader``;
* optionally ``loss_fn(prediction, target)``: the loss (default: cross-entropy over the last dim).

Every way such a file can be wrong (missing, a syntax error, an import that raises, no ``model()``,
a factory that returns something else) becomes a :class:`~localize.errors.ConfigError` that names
the file and line and says what to do.

Example:
    >>> import pathlib, tempfile
    >>> from localize.compiler.model_file import load_model_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.py"
    >>> _ = path.write_text("import torch\\n"
    ...                     "def model(): return torch.nn.Linear(4, 2)\\n"
    ...                     "def example_inputs(): return (torch.zeros(3, 4),)\\n")
    >>> mf = load_model_file(str(path))
    >>> type(mf.build_model()).__name__, [tuple(x.shape) for x in mf.example_inputs()]
    ('Linear', [(3, 4)])
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from localize.errors import ConfigError

__all__ = ["ModelFile", "load_model_file", "localize_file", "split_spec", "training_options"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ModelFile:
    """A loaded model file: its module and the functions the CLI calls."""

    path: Path
    factory: str
    module: ModuleType

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        fn = getattr(self.module, "loss_fn", None)
        if fn is not None and not callable(fn):
            raise ConfigError(
                f"{self.path}: loss_fn is a {type(fn).__name__}, not a function (prediction, target) -> loss"
            )
        return fn

    @property
    def has_dataset(self) -> bool:
        return callable(getattr(self.module, "dataset", None))

    def build_model(self) -> nn.Module:
        model = self._call(self.factory)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{self.path}: {self.factory}() returned {type(model).__name__}, not a torch.nn.Module; "
                f"return the model instance (e.g. `return MyNet()`)"
            )
        return model

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        if not callable(getattr(self.module, "example_inputs", None)):
            raise ConfigError(
                f"{self.path} defines no example_inputs(): add `def example_inputs(): return (x,)` "
                f"returning one batch of example input tensors"
            )
        value = self._call("example_inputs")
        if isinstance(value, torch.Tensor):
            value = (value,)
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple) or not value or not all(isinstance(v, torch.Tensor) for v in value):
            raise ConfigError(
                f"{self.path}: example_inputs() returned {_describe(value)}; return a tuple of tensors, "
                f"e.g. `return (torch.randn(8, 3, 32, 32),)`"
            )
        return value

    def dataset(self) -> tuple[Any, Any] | None:
        """``(train, test)`` from the file's ``dataset()``, or None when it defines none."""
        if not self.has_dataset:
            return None
        value = self._call("dataset")
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise ConfigError(
                f"{self.path}: dataset() returned {_describe(value)}; return (train, test), each an "
                f"(inputs, targets) pair of tensors or a DataLoader"
            )
        for name, part in zip(("train", "test"), value):
            _check_split(self.path, name, part)
        return value[0], value[1]

    def _call(self, name: str) -> Any:
        fn = getattr(self.module, name)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - user code: report it in one line
            raise ConfigError(
                f"{self.path}: {name}() raised {_one_line(e)}{_where(e, self.path)}; fix {name}() and run again"
            ) from None


def split_spec(spec: str) -> tuple[str, str]:
    """``"net.py:build"`` -> ``("net.py", "build")``; ``"net.py"`` -> ``("net.py", "model")``."""
    path, sep, factory = spec.rpartition(":")
    if sep and path and _IDENT.match(factory):
        return path, factory
    return spec, "model"


def load_model_file(spec: str) -> ModelFile:
    """Import ``MODEL.py[:factory]`` and check that it defines the factory (default ``model``)."""
    raw, factory = split_spec(spec)
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{raw}: no such file; pass the path of a Python file that defines model() and example_inputs()"
        )
    if path.is_dir():
        raise ConfigError(
            f"{raw} is a directory; pass a Python file that defines model() and example_inputs()"
        )
    path = path.resolve()
    module = _import(path)
    fn = getattr(module, factory, None)
    if fn is None:
        hint = f"add `def {factory}():` returning the nn.Module"
        if factory == "model":
            hint += " (or name another function: FILE.py:FUNCTION)"
        raise ConfigError(f"{raw} defines no {factory}(): {hint}")
    if not callable(fn):
        raise ConfigError(
            f"{raw}: {factory} is a {type(fn).__name__}, not a function; define `def {factory}():`"
        )
    return ModelFile(path, factory, module)


def _import(path: Path) -> ModuleType:
    name = "localize_model_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as Python; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    # the file's folder on sys.path lets it import its neighbours, like `python MODEL.py` would
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}; fix the file and run again") from None
    except Exception as e:  # noqa: BLE001 - any failure while importing user code
        del sys.modules[name]
        raise ConfigError(
            f"importing {path} raised {_one_line(e)}{_where(e, path)}; fix the file (or install what it imports) "
            f"and run again"
        ) from None
    return module


def _check_split(path: Path, name: str, part: Any) -> None:
    if isinstance(part, (tuple, list)) and len(part) == 2:
        x, y = part
        xs = x if isinstance(x, (tuple, list)) else (x,)
        if all(isinstance(t, torch.Tensor) for t in xs) and isinstance(y, torch.Tensor):
            sizes = {len(t) for t in xs} | {len(y)}
            if len(sizes) != 1:
                raise ConfigError(
                    f"{path}: dataset()'s {name} inputs and targets have different lengths {sorted(sizes)}; "
                    f"give one target per sample"
                )
            if len(y) == 0:
                raise ConfigError(f"{path}: dataset()'s {name} split is empty; give it some samples")
            return
    if isinstance(part, Iterable) and not isinstance(part, (str, bytes, torch.Tensor, tuple, list)):
        return  # a DataLoader or any iterable of (inputs, targets) batches
    raise ConfigError(
        f"{path}: dataset()'s {name} split is {_describe(part)}; give an (inputs, targets) pair of tensors "
        f"or a DataLoader"
    )


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"a {type(value).__name__} of ({inner}{', ...' if len(value) > 4 else ''})"
    return f"a {type(value).__name__}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _where(e: BaseException, path: Path) -> str:
    """' (line 12)' for the innermost frame of the error that lies in the model file."""
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return f" (line {line})" if line is not None else ""


def localize_file(
    mf: ModelFile,
    *,
    blocks: int | None = None,
    aux: str = "dgl",
    balance: str | None = None,
    cuts: list[str] | None = None,
    max_frontier: int = 1,
    clip_grad_norm: float | None = None,
    optimizer: str = "adamw",
    lr: float | None = None,
    seed: int = 0,
    accumulate: int = 1,
    autocast: str | None = None,
    scheduler: Callable[[Any], Any] | None = None,
    chunk_size: int | None = None,
    chunk_keep: float = 1.0,
    recompute: bool = False,
    aux_options: dict[str, Any] | None = None,
) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The compile step of the CLI and the distributed launcher: seed, build the model, transform it.

    Returns (LocalModel, example inputs); the same seed gives the same model on every rank.
    """
    from localize.compiler.transform import transform  # here: loading a model file needs no compiler

    torch.manual_seed(seed)
    model = mf.build_model()
    example = mf.example_inputs()
    lm = transform(
        model,
        blocks=blocks,
        example_inputs=example,
        aux=aux,
        aux_options=aux_options,
        optimizer=optimizer,
        lr=lr,
        loss_fn=mf.loss_fn,
        balance=balance,
        cuts=cuts,
        max_frontier=max_frontier,
        clip_grad_norm=clip_grad_norm,
        accumulate=accumulate,
        autocast=autocast,
        scheduler=scheduler,
        chunk_size=chunk_size,
        chunk_keep=chunk_keep,
        recompute=recompute,
    )
    return lm, example


def parse_aux_option(text: str) -> tuple[str, Any]:
    """One ``--aux-option KEY=VALUE``: the value as a Python literal (``4``, ``0.9``, ``True``), else
    as the text itself. The strategy checks names and values (``transform`` raises ``ConfigError``).

    >>> parse_aux_option("depth=4"), parse_aux_option("follow=True"), parse_aux_option("kind=mlp")
    (('depth', 4), ('follow', True), ('kind', 'mlp'))
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ConfigError(f"--aux-option {text!r} is not KEY=VALUE; write e.g. --aux-option depth=4")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key, value


def aux_options(args: Any) -> dict[str, Any]:
    """The strategy options of a command line's repeated ``--aux-option KEY=VALUE`` (the CLI and the
    distributed launcher share them); a key given twice is an error, not a silent override."""
    options: dict[str, Any] = {}
    for text in getattr(args, "aux_option", None) or []:
        key, value = parse_aux_option(text)
        if key in options:
            raise ConfigError(f"--aux-option {key} is given twice ({options[key]!r} and {value!r}); give it once")
        options[key] = value
    return options


def training_options(args: Any, mf: ModelFile, train: Any = None) -> dict[str, Any]:
    """``transform``'s training-loop options from the command line's ``--clip``, ``--accumulate``,
    ``--amp``, ``--schedule``, ``--warmup``, ``--chunk-size``, ``--chunk-keep`` and ``--recompute``
    (the CLI and the distributed launcher share them).

    A schedule runs over every update of the run: ``--epochs`` times the training batches, divided
    by ``--accumulate``; ``train`` is the training split when the caller has it (else it is read).
    """
    from localize.data import RANDOM_TRAIN, num_batches
    from localize.runtime.schedulers import lr_schedule

    accumulate = getattr(args, "accumulate", 1) or 1
    kind, warmup = getattr(args, "schedule", "none") or "none", getattr(args, "warmup", 0) or 0
    scheduler = None
    if kind != "none" or warmup:
        if train is None:
            train = mf.dataset()[0] if mf.has_dataset else None
        batches = num_batches(train, args.batch_size) if train is not None else max(1, RANDOM_TRAIN // args.batch_size)
        if batches is None:
            raise ConfigError(
                f"--schedule {kind}: the training data has no length, so the number of updates is unknown; "
                f"give dataset() tensors or a sized DataLoader"
            )
        updates = -(-args.epochs * batches // accumulate)
        scheduler = lr_schedule(kind, updates, warmup)
    return {
        "clip_grad_norm": getattr(args, "clip", None),
        "accumulate": accumulate,
        "autocast": getattr(args, "amp", None),
        "scheduler": scheduler,
        "chunk_size": getattr(args, "chunk_size", None),
        "chunk_keep": getattr(args, "chunk_keep", 1.0),
        "recompute": bool(getattr(args, "recompute", False)),
    }
