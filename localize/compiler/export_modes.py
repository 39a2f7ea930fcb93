"""Make an exported graph follow ``train()``: what changes between the eval- and train-mode exports.

``torch.export`` runs the model's Python once, in eval mode, so everything forward decides from
``self.training`` is frozen there. Dropout and batch-norm ops carry a ``training`` argument that
:mod:`localize.passes.bind_training_mode` rebinds; but attention dropout passed to
``scaled_dot_product_attention`` (``dropout_p=self.p if self.training else 0.0``, as Hugging Face
models do) is a plain number, and other branches change the graph itself.

:func:`train_mode_values` exports the model once more in train mode and lines the two graphs up
(copies such as ``contiguous`` aside). Where they differ only in attention dropout, the eval graph's
node is annotated (``meta["localize"]["mode_values"]``) and the pass makes its ``dropout_p`` follow
``train()``. Any other difference is returned as a one-line warning: localize never trains a graph
that differs silently from the model in train mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from localize.compiler.traced import lmeta
from localize.passes.bind_training_mode import MODE_ARGS

__all__ = ["reads_training", "train_mode_values"]

_aten = torch.ops.aten
_COPIES = {_aten.contiguous.default, _aten.clone.default, _aten.alias.default}
_SDPA = {_aten.scaled_dot_product_attention.default}


def reads_training(model: torch.nn.Module) -> bool:
    """Whether some module's own forward (outside torch.nn) reads ``self.training``."""
    seen: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or cls.__module__.startswith("torch."):
            continue
        seen.add(cls)
        try:
            if ".training" in inspect.getsource(cls.forward):
                return True
        except (OSError, TypeError):
            continue
    return False


def train_mode_values(eval_gm: fx.GraphModule, export_train: Callable[[], fx.GraphModule]) -> list[str]:
    """Annotate ``eval_gm``'s attention dropout with its train-mode value; return warnings for
    every other way the train-mode graph differs (empty when it follows ``train()`` exactly)."""
    try:
        train_gm = export_train()
    except Exception as e:  # noqa: BLE001 - cannot compare: say so rather than guess
        return [f"torch.export could not capture the model in train mode ({type(e).__name__}), so localize "
                f"could not check that train() behaves as traced in eval mode"]
    a, b = _compute_nodes(eval_gm), _compute_nodes(train_gm)
    ops_a, ops_b = [n.target for n in a], [n.target for n in b]
    if ops_a != ops_b:
        first = next((i for i, (x, y) in enumerate(zip(ops_a, ops_b)) if x != y), min(len(a), len(b)))
        where = lmeta(a[first]).get("module") if first < len(a) else "the end of forward"
        return [
            f"in train() the model runs other ops than in eval() (from {where or 'the top level'}: "
            f"{_name(ops_a, first)} in eval, {_name(ops_b, first)} in train), so the traced graph keeps the "
            f"eval-mode path in train() too; make that branch independent of self.training to train it as written"
        ]
    index_a, index_b = _positions(a), _positions(b)
    warnings: list[str] = []
    for x, y in zip(a, b):
        ax, ay = _normalised(x, index_a), _normalised(y, index_b)
        if ax == ay:
            continue
        if x.target in _SDPA:
            p_eval, p_train = _dropout_p(x), _dropout_p(y)
            if p_eval == 0.0 and _same_except_dropout(ax, ay):
                lmeta(x)["mode_values"] = {"dropout_p": p_train}
                continue
        flag = MODE_ARGS.get(x.target)  # a training flag the pass rebinds: not a difference
        if flag is not None and _same_except(ax, ay, flag):
            continue
        module = lmeta(x).get("module") or "the top level"
        warnings.append(
            f"in train() {module} calls {x.target} with other arguments than in eval() ({_short(ay)} vs "
            f"{_short(ax)}), which localize cannot make follow train(); it trains with the eval-mode values"
        )
    return warnings[:3]


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target not in _COPIES]


def _positions(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Each node's place; a copy stands for what it copies (it is left out of the line-up)."""
    return {n: i for i, n in enumerate(nodes)}


def _resolve(node: fx.Node, index: dict[fx.Node, int]) -> Any:
    while node not in index and node.op == "call_function" and node.target in _COPIES:
        node = node.args[0]
    return ("node", index[node]) if node in index else ("input", node.op, str(node.target))


def _normalised(node: fx.Node, index: dict[fx.Node, int]) -> tuple:
    args = fx.node.map_arg(node.args, lambda n: _resolve(n, index))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _resolve(n, index))
    return (tuple(args), tuple(sorted(kwargs.items())))


def _dropout_p(node: fx.Node) -> float:
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


def _same_except_dropout(a: tuple, b: tuple) -> bool:
    def strip(n: tuple) -> tuple:
        args, kwargs = n
        return (tuple(args[:4]) + tuple(args[5:]), tuple(kv for kv in kwargs if kv[0] != "dropout_p"))

    return strip(a) == strip(b)


def _same_except(a: tuple, b: tuple, position: int) -> bool:
    (args_a, kw_a), (args_b, kw_b) = a, b
    return kw_a == kw_b and len(args_a) == len(args_b) and all(
        i == position or x == y for i, (x, y) in enumerate(zip(args_a, args_b))
    )


def _name(targets: list[Any], i: int) -> str:
    return str(targets[i]) if i < len(targets) else "nothing"


def _short(normalised: tuple) -> str:
    args, kwargs = normalised
    plain = [a for a in args if not (isinstance(a, tuple) and a and a[0] in ("node", "input"))]
    return ", ".join(map(repr, plain + [f"{k}={v}" for k, v in kwargs]))[:80] or "()"
