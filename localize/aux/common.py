"""What the published strategies share: the model's repeated units, fresh copies of its modules, a
copy of its output head, shape adapters, reconstruction decoders and option checking.

*Units* are the model's repeated layers (residual blocks, transformer layers): the children of
``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` containers, outermost first, whose module
type occurs at least twice (so ``layer1.0`` ... ``layer3.1``, ``layers.3``, ``transformer.h.2``; a
lone ``classifier`` Sequential's parts are not units). They are ordered by first use in the graph.
The *output head* is what the model computes after its last unit (pooling + classifier, final
norm + LM head), taken as a slice of the flat graph so that functional ops such as ``x[:, 0]``
come along.

>>> import torch, localize
>>> from localize.zoo import ResNet1d
>>> from localize.aux.common import find_units
>>> lm = localize.transform(ResNet1d(1, 10, widths=(8, 16), blocks_per_stage=(2, 1)), blocks=2,
...                         example_inputs=(torch.randn(2, 1, 40),))
>>> [(u.path, u.output_shape[1:]) for u in find_units(lm.plan)]
[('layer1.0', (8, 40)), ('layer1.1', (8, 40)), ('layer2.0', (16, 20))]
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from localize.aux import AuxSpec
from localize.errors import ConfigError
from localize.tracer import lmeta

if TYPE_CHECKING:
    from localize.plan import Plan

__all__ = [
    "ReconstructionHead",
    "Option",
    "read_options",
    "require_plan",
    "Unit",
    "find_units",
    "last_unit_until",
    "first_unit_of",
    "fresh_copy",
    "FirstTensor",
    "layer_copy",
    "OutputHead",
    "output_head",
    "adapter",
    "Decoder",
    "reconstruction_decoder",
    "model_input",
    "input_layout",
    "interpolate",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One option of a strategy: its default, a check of a value, and the valid range in words."""

    default: Any
    check: Callable[[Any], bool]
    valid: str


def read_options(strategy: str, options: dict[str, Any], schema: dict[str, Option]) -> dict[str, Any]:
    """``options`` completed with defaults; a ConfigError names unknown options or bad values."""
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise ConfigError(f"aux={strategy!r} has no option(s) {unknown}; valid options are {sorted(schema)}")
    values = {}
    for name, opt in schema.items():
        value = options.get(name, opt.default)
        try:
            ok = bool(opt.check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"aux={strategy!r} option {name}={value!r} is out of range: valid values are {opt.valid} "
                f"(default {opt.default!r})"
            )
        values[name] = value
    return values


def is_int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def is_float(lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False):
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v > lo if open_lo else v >= lo
        below = v < hi if open_hi else v <= hi
        return above and below

    return check


def is_pair(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(check(x) for x in v)


def require_plan(spec: AuxSpec, strategy: str) -> Plan:
    """The transform's Plan, which strategies that copy the model's layers read."""
    plan = spec.context
    if plan is None or not hasattr(plan, "gm") or not hasattr(plan, "model"):
        raise ConfigError(
            f"aux={strategy!r} reads the model's graph and layers: build it through localize.transform(...), "
            f"not build_aux() alone (spec.context must be the transform's Plan)"
        )
    return plan


# ----------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """One repeated layer of the model, as the flat graph runs it."""

    index: int
    path: str  # module path in the user's model
    nodes: frozenset[str]  # flat-graph compute nodes it owns
    input: str | None  # the activation it reads (None when it reads no float tensor)
    output: str  # the activation it hands on
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    input_layout: str | None
    output_layout: str
    blocks: tuple[int, ...]  # blocks its nodes lie in (one: cuts never split a unit)


def _unit_paths(model: nn.Module) -> list[str]:
    children = []
    for path, module in model.named_modules():
        if isinstance(module, _CONTAINERS):
            children += [f"{path}.{name}" if path else name for name, _ in module.named_children()]
    candidates = set(children)
    outer = [p for p in children if not any(p.startswith(q + ".") for q in candidates)]
    types = Counter(type(model.get_submodule(p)) for p in outer)
    return [p for p in outer if types[type(model.get_submodule(p))] >= 2]


def find_units(plan: Plan) -> list[Unit]:
    """The model's repeated units, ordered by first use in the flat graph (cached on the plan)."""
    cached = plan.__dict__.get("_localize_units")
    if cached is not None:
        return cached
    from localize.passes.annotate_tensors import value_info
    from localize.passes.insert_aux_heads import infer_layout

    paths = _unit_paths(plan.model)
    owner: dict[fx.Node, str] = {}
    first: dict[str, int] = {}
    compute = [n for n in plan.gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    order = {n: i for i, n in enumerate(plan.gm.graph.nodes)}
    by_prefix = sorted(paths, key=len, reverse=True)
    for node in compute:
        module = lmeta(node).get("module") or ""
        path = next((p for p in by_prefix if module == p or module.startswith(p + ".")), None)
        if path is not None:
            owner[node] = path
            first.setdefault(path, order[node])
    units = []
    for path in sorted(first, key=first.__getitem__):
        nodes = [n for n, p in owner.items() if p == path]
        names = {n.name for n in nodes}
        outside = [
            a for n in nodes for a in n.all_input_nodes if a.name not in names and a.op not in ("get_attr",)
        ]
        inp = _main_activation(outside, value_info)
        handed = [n for n in nodes if any(u.name not in names for u in n.users) and _is_float(n, value_info)]
        out = max(handed or nodes, key=order.__getitem__)
        out_info = value_info(out)
        if out_info is None or not out_info.is_tensor:
            continue
        blocks = tuple(sorted({lmeta(n).get("block", 0) for n in nodes}))
        units.append(
            Unit(
                index=len(units),
                path=path,
                nodes=frozenset(names),
                input=inp.name if inp is not None else None,
                output=out.name,
                input_shape=value_info(inp).shape if inp is not None else None,
                output_shape=out_info.shape,
                input_layout=infer_layout(plan.gm, inp) if inp is not None else None,
                output_layout=infer_layout(plan.gm, out),
                blocks=blocks,
            )
        )
    plan.__dict__["_localize_units"] = units
    return units


def _is_float(node: fx.Node, value_info) -> bool:
    info = value_info(node)
    return info is not None and info.is_tensor and info.floating


def _main_activation(nodes: list[fx.Node], value_info) -> fx.Node | None:
    floats = [n for n in dict.fromkeys(nodes) if _is_float(n, value_info)]
    if not floats:
        return None
    return max(floats, key=lambda n: (value_info(n).requires_grad, value_info(n).nbytes))


def last_unit_until(units: list[Unit], block: int) -> int:
    """Index of the last unit that lies entirely in blocks ``<= block`` (-1 when none does)."""
    done = [u.index for u in units if max(u.blocks) <= block]
    return max(done) if done else -1


def first_unit_of(units: list[Unit], block: int) -> Unit | None:
    """The first unit whose nodes lie in ``block``."""
    return next((u for u in units if block in u.blocks), None)


# ----------------------------------------------------------------------------------------------- copies


@torch.no_grad()
def reinitialise(module: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """Draw fresh weights: ``reset_parameters()`` where a module has it, then the model's own
    ``_init_weights`` (the Hugging Face convention) when it defines one."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    init = getattr(model, "_init_weights", None)
    if callable(init):
        module.apply(init)
    return module


def fresh_copy(module: nn.Module, model: nn.Module | None = None, reinit: bool = True) -> nn.Module:
    """A deep copy of ``module`` (same types and configuration, no shared storage), re-initialised."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(True)
    return reinitialise(clone, model) if reinit else clone


def first_tensor(value: Any) -> torch.Tensor:
    """A layer's main output: the tensor itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"layer returned {type(value).__name__} with no tensor in it")


class FirstTensor(nn.Module):
    """Calls ``layer`` on the hidden state alone and keeps its first tensor output (Hugging Face
    layers return tuples; with no mask they attend causally or fully, as the layer was built)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.layer(x))


def _runs_alone(
    layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], dtype, device
) -> bool:
    """Whether ``layer(x)`` works on the hidden state alone and gives the recorded output shape."""
    was = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            out = layer(torch.zeros((2, *in_shape[1:]), dtype=dtype, device=device))
        return tuple(out.shape[1:]) == tuple(out_shape[1:])
    except Exception:  # noqa: BLE001 - any failure means: needs more than the hidden state
        return False
    finally:
        layer.train(was)


def layer_copy(plan: Plan, unit: Unit, *, reinit: bool = True) -> nn.Module | None:
    """A copy of ``unit``'s module callable on its input alone (None if it needs more inputs)."""
    if unit.input_shape is None:
        return None
    layer = FirstTensor(fresh_copy(plan.model.get_submodule(unit.path), plan.model, reinit))
    dtype, device = _dtype_device(plan)
    if not _runs_alone(layer, unit.input_shape, unit.output_shape, dtype, device):
        return None
    return layer


def stand_in_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], layout: str) -> nn.Module:
    """A small layer of the unit's shapes, for units that cannot run on their input alone:
    conv-BN-ReLU (channels-first), pre-norm residual MLP (channels-last), linear-ReLU (flat)."""
    if layout == "channels_first" and 3 <= len(out_shape) <= 5:
        nd, c = len(out_shape) - 2, out_shape[1]
        return nn.Sequential(
            adapter(in_shape, layout, out_shape, layout) or nn.Identity(),
            _CONV[nd](c, c, 3, padding=1, bias=False),
            _BN[nd](c),
            nn.ReLU(),
        )
    if layout == "channels_last" and len(out_shape) >= 3:
        c = out_shape[-1]
        return nn.Sequential(
            adapter(in_shape, layout, out_shape, layout) or nn.Identity(), _Residual(_mlp(c, 2 * c, c))
        )
    return nn.Sequential(
        nn.Flatten(1),
        nn.Linear(math.prod(in_shape[1:]), math.prod(out_shape[1:])),
        nn.ReLU(),
        _Reshape(out_shape[1:]),
    )


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _mlp(c_in: int, width: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, width), nn.GELU(), nn.Linear(width, c_out))


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _dtype_device(plan: Plan) -> tuple[torch.dtype, torch.device]:
    for p in plan.model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


# ----------------------------------------------------------------------------------------------- output head


@dataclass
class OutputHead:
    """A fresh copy of what the model computes after its last unit, and the input it expects."""

    module: nn.Module
    input_shape: tuple[int, ...]
    input_layout: str


class _Unsupported(Exception):
    pass


def output_head(plan: Plan, units: list[Unit], *, reinit: bool = True) -> OutputHead | None:
    """Slice the flat graph from the last unit's output to the model output into a GraphModule of
    fresh module and parameter copies. None when that part reads more than the last unit's
    output (a skip from the model input, a mask computed from the inputs)."""
    from localize.passes.annotate_tensors import value_info
    from localize.passes.insert_aux_heads import infer_layout

    if not units or plan.output_shape is None:
        return None
    gm = plan.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    start = by_name[units[-1].output]
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaf = out.args[0][plan.output_index]
    unit_nodes = set().union(*(u.nodes for u in units))
    keep: set[fx.Node] = set()
    stack = [leaf]
    try:
        while stack:
            n = stack.pop()
            if n is start or n in keep:
                continue
            if n.op == "placeholder" or n.name in unit_nodes:
                raise _Unsupported(n.name)
            keep.add(n)
            stack.extend(n.all_input_nodes)
    except _Unsupported:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("feature")}
    root: dict[str, Any] = {}
    owners: dict[str, nn.Module] = {}
    for n in sorted(keep, key=order.__getitem__):
        if n.op == "call_module":
            root[n.target] = fresh_copy(gm.get_submodule(n.target), plan.model, reinit)
        elif n.op == "get_attr":
            root[n.target] = _fresh_attr(plan, gm, n.target, owners, reinit)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[leaf])
    module = fx.GraphModule(root, graph, "OutputHead")
    return OutputHead(module, value_info(start).shape, infer_layout(gm, start))


def _fresh_attr(plan: Plan, gm: fx.GraphModule, target: str, owners: dict[str, nn.Module], reinit: bool):
    owner_path, _, name = target.rpartition(".")
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    try:
        owner = plan.model.get_submodule(owner_path) if owner_path else None
    except AttributeError:
        owner = None
    if owner is not None and isinstance(getattr(owner, name, None), nn.Parameter) and owner_path:
        if owner_path not in owners:
            owners[owner_path] = fresh_copy(owner, plan.model, reinit)
        return getattr(owners[owner_path], name)
    clone = value.detach().clone()
    return nn.Parameter(clone, requires_grad=True) if isinstance(value, nn.Parameter) else clone


# ----------------------------------------------------------------------------------------------- adapters


class Resize(nn.Module):
    """Average-pool (shrink) or nearest-interpolate (grow) a channels-first map to ``size``."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.size:
            return x
        if all(a >= b for a, b in zip(x.shape[2:], self.size)):
            fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(self.size) - 1]
            return fn(x, self.size)
        return F.interpolate(x, size=self.size, mode="nearest")


def adapter(
    from_shape: tuple[int, ...], from_layout: str | None, to_shape: tuple[int, ...], to_layout: str | None
) -> nn.Module | None:
    """A module mapping activations of ``from_shape`` to ``to_shape`` (batch dims ignored), or None.

    Identity when they agree; channels-first maps are resized (pooling or nearest upsampling)
    and projected by a 1x1 conv + batch-norm; channels-last and flat tensors by a linear map
    over their last dim (their other dims must agree).
    """
    a, b = tuple(from_shape[1:]), tuple(to_shape[1:])
    if a == b:
        return nn.Identity()
    if len(a) != len(b):
        return None
    if from_layout == to_layout == "channels_first" and 2 <= len(a) <= 4:
        nd = len(a) - 1
        return nn.Sequential(Resize(b[1:]), _CONV[nd](a[0], b[0], 1, bias=False), _BN[nd](b[0]))
    if a[:-1] == b[:-1] and (len(a) == 1 or from_layout == to_layout):
        return nn.Linear(a[-1], b[-1])
    return None


def interpolate(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """InfoPro's bilinear (linear / trilinear for other ranks) resize with aligned corners."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


# ----------------------------------------------------------------------------------------------- reconstruction


def model_input(plan: Plan, name: str | None, strategy: str) -> tuple[int, fx.Node, int | None]:
    """(index among the model's inputs, placeholder, vocabulary size for token ids or None).

    ``name=None`` picks the first float input, else the first integer input read by an embedding.
    """
    from localize.passes.annotate_tensors import value_info

    placeholders = [n for n in plan.gm.graph.nodes if n.op == "placeholder"]
    names = [n.target for n in placeholders]
    if name is not None:
        if name not in names:
            raise ConfigError(
                f"aux={strategy!r} option input={name!r} is not a model input; valid inputs are {names}"
            )
        candidates = [placeholders[names.index(name)]]
    else:
        floats = [n for n in placeholders if _is_float(n, value_info)]
        tokens = [n for n in placeholders if _vocab(plan, n) is not None]
        candidates = floats[:1] or tokens[:1]
    if not candidates:
        raise ConfigError(
            f"aux={strategy!r} reconstructs a model input, but the model has no float input and no token ids "
            f"read by an embedding (inputs {names}); pick one with aux_options={{'input': ...}} or use aux='dgl'"
        )
    node = candidates[0]
    info = value_info(node)
    if info is None or not info.is_tensor:
        raise ConfigError(f"aux={strategy!r}: model input {node.target!r} is not a tensor")
    vocab = None if info.floating else _vocab(plan, node)
    if not info.floating and vocab is None:
        raise ConfigError(
            f"aux={strategy!r}: integer input {node.target!r} is not read by an embedding, so there is nothing "
            f"to reconstruct; choose a float input with aux_options={{'input': ...}}"
        )
    return placeholders.index(node), node, vocab


def input_layout(plan: Plan, node: fx.Node) -> str:
    """Layout of a model input, read from the first op after it that fixes one (a conv reads
    channels-first, a linear channels-last); by rank when none does."""
    from localize.passes.annotate_tensors import value_info
    from localize.passes.insert_aux_heads import _FIRST, _LAST, _op_name

    info = value_info(node)
    ndim = len(info.shape) if info is not None and info.is_tensor else 0
    if ndim <= 2:
        return "flat"
    seen, frontier = set(), list(node.users)
    while frontier and len(seen) <= 64:
        n = frontier.pop(0)
        if n in seen or n.op not in ("call_module", "call_function", "call_method"):
            continue
        seen.add(n)
        name = _op_name(plan.gm, n)
        if any(k in name for k in _FIRST):
            return "channels_first"
        if any(k in name for k in _LAST):
            return "channels_last"
        frontier.extend(n.users)
    return "channels_first" if ndim >= 4 else "channels_last"


def _vocab(plan: Plan, node: fx.Node) -> int | None:
    """Rows of the embedding that reads token ids ``node`` (through views), if any."""
    from localize.passes.annotate_tensors import value_info

    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in seen or len(seen) > 32:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "call_module":
                mod = plan.gm.get_submodule(user.target)
                if isinstance(mod, nn.Embedding):
                    return mod.num_embeddings
            name = getattr(user.target, "__name__", str(user.target))
            if "embedding" in name and user.args and isinstance(user.args[0], fx.Node):
                weight = user.args[0]
                while weight.op in ("call_method", "call_function") and "detach" in str(weight.target):
                    weight = weight.args[0]  # a tied weight is read through a detach
                if weight.op == "get_attr":
                    value = plan.gm
                    for part in weight.target.split("."):
                        value = getattr(value, part)
                    return int(value.shape[0])
                info = value_info(weight)
                if info is not None and info.is_tensor and len(info.shape) == 2:
                    return int(info.shape[0])
            if "view" in name or "reshape" in name or name in ("to", "long", "int", "contiguous"):
                frontier.append(user)
    return None


class Decoder(nn.Module):
    """Maps a feature to a reconstruction of a target and scores it (``loss(feature, target)``)."""

    def __init__(self, body: nn.Module, kind: str, loss: str, size: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.body, self.kind, self.loss_name, self.size = body, kind, loss, tuple(size)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            feature = interpolate(feature, self.size)
        return self.body(feature)

    def loss(self, feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        recon = self(feature)
        if self.kind == "tokens":
            return F.cross_entropy(recon.reshape(-1, recon.shape[-1]), target.reshape(-1).long())
        target = target.to(recon.dtype)
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(recon, target)
        return F.mse_loss(recon, target)


class ReconstructionHead(nn.Module):
    """Shared by InfoPro and FeatRecon: ``forward`` predicts with the classifier; ``local_loss`` is
    ``w_recon * decoder.loss(feature, reconstruction_target(ctx)) + w_cls * loss_fn(prediction, target)``."""

    def __init__(self, decoder: nn.Module, classifier: nn.Module, weights: tuple[float, float]) -> None:
        super().__init__()
        self.decoder, self.classifier = decoder, classifier
        self.weights = weights  # (reconstruction weight, classification weight)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature)

    def reconstruction_target(self, ctx) -> torch.Tensor:
        raise NotImplementedError

    def local_loss(self, feature: torch.Tensor, target: torch.Tensor, ctx) -> torch.Tensor:
        lam_recon, lam_cls = self.weights
        loss = lam_cls * ctx.loss_fn(self.classifier(feature), target)
        if lam_recon:
            loss = loss + lam_recon * self.decoder.loss(feature, self.reconstruction_target(ctx))
        return loss


def reconstruction_decoder(
    feature_shape: tuple[int, ...],
    feature_layout: str,
    target_shape: tuple[int, ...],
    target_layout: str,
    *,
    vocab: int | None,
    width: int,
    loss: str = "mse",
) -> Decoder:
    """The decoder a feature needs to reconstruct a target:

    * token ids (B, T) from a (B, T, C) feature: LayerNorm + linear to the vocabulary, scored by
      cross-entropy (predict the input tokens);
    * a channels-first target from a channels-first feature of the same rank: InfoPro's decoder,
      (bi)linear resize to the target's size, conv3x3-BN-ReLU, conv3x3 to the target's channels;
    * a channels-last target from a channels-last feature with the same token dims: a per-token MLP
      (LayerNorm, linear, GELU, linear);
    * otherwise: global mean pooling over the feature's positions, an MLP to every target value.

    Float targets are scored by MSE, or by BCE on logits (``loss="bce"``, targets in [0, 1]).
    """
    f, t = tuple(feature_shape), tuple(target_shape)
    if vocab is not None:
        if feature_layout == "channels_last" and len(f) == len(t) + 1 and f[1:-1] == t[1:]:
            return Decoder(nn.Sequential(nn.LayerNorm(f[-1]), nn.Linear(f[-1], vocab)), "tokens", "ce")
        pooled, channels = _pool_all(f, feature_layout)
        body = nn.Sequential(
            pooled, _mlp_plain(channels, width, math.prod(t[1:]) * vocab), _Reshape((*t[1:], vocab))
        )
        return Decoder(body, "tokens", "ce")
    if (
        feature_layout == "channels_first"
        and target_layout == "channels_first"
        and len(f) == len(t)
        and 3 <= len(f) <= 5
    ):
        nd = len(f) - 2
        body = nn.Sequential(
            _CONV[nd](f[1], width, 3, padding=1, bias=False),
            _BN[nd](width),
            nn.ReLU(),
            _CONV[nd](width, t[1], 3, padding=1),
        )
        return Decoder(body, "conv", loss, t[2:])
    if (
        feature_layout == "channels_last"
        and target_layout == "channels_last"
        and len(f) == len(t)
        and f[1:-1] == t[1:-1]
    ):
        return Decoder(_mlp(f[-1], width, t[-1]), "tokens_dense", loss)
    pooled, channels = _pool_all(f, feature_layout)
    body = nn.Sequential(pooled, _mlp_plain(channels, width, math.prod(t[1:])), _Reshape(t[1:]))
    return Decoder(body, "generic", loss)


def _mlp_plain(c_in: int, width: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, width), nn.GELU(), nn.Linear(width, c_out))


class _MeanOver(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims) if self.dims else x


def _pool_all(shape: tuple[int, ...], layout: str) -> tuple[nn.Module, int]:
    """Global mean over positions: (module, channels left)."""
    if len(shape) <= 2:
        return nn.Flatten(1), math.prod(shape[1:])
    if layout == "channels_first":
        return _MeanOver(tuple(range(2, len(shape)))), shape[1]
    return _MeanOver(tuple(range(1, len(shape) - 1))), shape[-1]
