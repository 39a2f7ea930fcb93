"""What the CLI writes for a compiled model, and how it writes it.

Every artifact is a function of a :class:`~localize.LocalModel` (and the model file's options):

* ``plan.json`` (:func:`plan_document`): blocks, cuts, schedule, versions; schema in
  ``localize/codegen/plan.schema.json``;
* ``schedule.txt``: the schedule as compact actions (``B0:F B0:L B0:U ...``);
* ``block_<i>.py``, ``program.py``, ``weights.pt``: generated code (:mod:`localize.codegen.modules`),
  checked by running it against the blocks;
* ``graph.svg`` (``graph.dot`` without Graphviz's ``dot``): the graph, blocks coloured, cuts marked;
* ``block_<i>.onnx`` (:func:`export_onnx`): each block with its aux head, checked with
  ``onnx.checker`` and compared with torch in onnxruntime.

:func:`atomic_directory` writes them into a temporary directory beside the destination and moves
it into place in one rename, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import localize
from localize.codegen.blocks import block_source, generate
from localize.codegen.graph import write_graph
from localize.codegen.modules import CodegenError
from localize.codegen.onnx import ONNX_TOLERANCE, OnnxResult, export_onnx, other_batch_inputs
from localize.codegen.program import OptimizerSpec, program_source, program_weights
from localize.errors import ConfigError, VerificationError
from localize.extras import MissingExtra
from localize.passes.annotate_tensors import value_info
from localize.runtime.model import LocalModel
from localize.runtime.peak import estimate_peaks
from localize.runtime.schedule import parse_schedule

__all__ = [
    "ONNX_TOLERANCE",
    "OnnxResult",
    "SCHEMA_PATH",
    "atomic_directory",
    "block_inputs",
    "check_writable",
    "export_onnx",
    "plan_document",
    "write_artifacts",
    "write_graph",
]

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")
PLAN_FORMAT = "localize.plan/1"


# ------------------------------------------------------------------------------------- atomic output


def check_writable(final: Path) -> None:
    """Fail early, with what to do, when ``final`` cannot become a directory."""
    if final.exists() and not final.is_dir():
        raise ConfigError(f"--out {final} is a file, not a directory; choose another --out")
    ancestor = final
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"cannot create --out {final}: {ancestor} is a file, not a directory; choose another --out"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write --out {final}: {ancestor} is not writable; choose a writable --out")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it becomes ``final``.

    On any error (or Ctrl-C) the temporary directory, and any parent this call created, are
    removed and ``final`` is left as it was.
    """
    final = final.absolute()
    check_writable(final)
    created = []
    for parent in reversed(final.parents):
        if not parent.exists():
            created.append(parent)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    except OSError as e:
        _remove_empty(created)
        raise ConfigError(f"cannot write --out {final}: {e.strerror or e}; choose a writable --out") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_stale(final: Path) -> None:
    """Remove temporary directories of ``final`` left by runs that were killed (their pid is gone)."""
    for path in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = path.name[len(final.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


# ------------------------------------------------------------------------------------- all artifacts


@dataclass
class ModelInfo:
    """Where the model came from: plan.json records ``file`` as given, program.py imports ``path``."""

    name: str
    file: str
    factory: str
    path: str


def write_artifacts(
    out: Path,
    lm: LocalModel,
    *,
    model: ModelInfo,
    example_inputs: tuple[torch.Tensor, ...],
    options: dict[str, Any],
    optimizer: OptimizerSpec,
    batch_size: int,
    seed: int,
    onnx: bool = True,
) -> dict[str, Any]:
    """Write every artifact of ``lm`` into ``out``; return the plan.json document (also written)."""
    out = Path(out)
    flat = lm.plan.traced.bind(tuple(example_inputs), {})
    inputs = block_inputs(lm, flat)
    files: list[str] = []

    (out / "schedule.txt").write_text(str(lm.schedule) + "\n")
    if parse_schedule((out / "schedule.txt").read_text()) != lm.schedule:
        raise VerificationError("schedule.txt does not parse back into the schedule")
    files.append("schedule.txt")

    gen = generate(lm)
    code: list[dict[str, Any]] = []
    for block in lm.blocks:
        name = f"block_{block.index}.py"
        try:
            (out / name).write_text(block_source(lm, block.index, gen))
            files.append(name)
            error = gen.head_errors[block.index]
            code.append({"file": name, "status": "ok" if error is None else "partial", "error": error})
        except CodegenError as e:
            code.append({"file": None, "status": "failed", "error": str(e)})
    torch.save(program_weights(lm, gen), out / "weights.pt")
    files.append("weights.pt")

    program = _write_program(out, lm, gen, model, optimizer, batch_size, seed, example_inputs, inputs)
    if program["status"] == "ok":
        files.append("program.py")
    skipped: list[str] = []
    try:
        graph_file: str | None = write_graph(lm, out)
        files.append(graph_file)
    except MissingExtra as e:
        graph_file = None
        skipped.append(str(e))

    exports: list[OnnxResult] = []
    other = _other_batch(lm, flat) if onnx else {}
    for block in lm.blocks:
        if onnx:
            path = out / f"block_{block.index}.onnx"
            exports.append(export_onnx(lm, block.index, inputs[block.index], path, other.get(block.index)))
            if exports[-1].file:
                files.append(exports[-1].file)
        else:
            exports.append(OnnxResult(None, "skipped", None, "--no-onnx", 0.0))

    doc = plan_document(
        lm,
        model=model,
        example_inputs=example_inputs,
        options=options,
        onnx=exports,
        code=code,
        program=program,
        graph=graph_file,
    )
    skipped += dict.fromkeys(r.error for r in exports if r.status == "skipped" and r.error != "--no-onnx")
    files.insert(0, "plan.json")
    doc["files"] = sorted(files)
    doc["skipped"] = skipped  # outputs an uninstalled extra would add, each with the pip line
    (out / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _other_batch(lm: LocalModel, flat: list[Any]) -> dict[int, tuple]:
    """Each block's arguments at a second batch size ({} when the model cannot run at one)."""
    other = other_batch_inputs(flat)
    if other is None:
        return {}
    try:
        return block_inputs(lm, other)
    except Exception:  # noqa: BLE001 - a fixed-batch model: ONNX is checked at the example's batch only
        return {}


def block_inputs(lm: LocalModel, flat: list[Any]) -> dict[int, tuple]:
    """Each block's call arguments when the program runs on ``flat`` (eval mode, no grad)."""
    captured: dict[int, tuple] = {}

    class Capture(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if target.startswith("submod_"):
                captured[int(target.rsplit("_", 1)[1])] = tuple(args)
            return super().call_module(target, args, kwargs)

    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            Capture(lm.program).run(*flat)
    finally:
        lm.train(was_training)
    return captured


# ------------------------------------------------------------------------------------- program.py


def _write_program(
    out, lm, gen, model, optimizer, batch_size, seed, example_inputs, inputs
) -> dict[str, Any]:
    try:
        source = program_source(
            lm,
            model_file=model.path,
            optimizer=optimizer,
            batch_size=batch_size,
            seed=seed,
            example_inputs=example_inputs,
            gen=gen,
        )
    except CodegenError as e:
        return {"file": None, "status": "failed", "error": str(e), "max_abs_diff": None}
    (out / "program.py").write_text(source)
    try:
        max_diff = _check_program(out, lm, inputs)
    except Exception as e:  # noqa: BLE001 - a wrong program is reported, the other artifacts still count
        (out / "program.py").unlink()
        return {"file": None, "status": "failed", "error": f"{type(e).__name__}: {e}", "max_abs_diff": None}
    return {"file": "program.py", "status": "ok", "error": None, "max_abs_diff": max_diff}


def _check_program(out: Path, lm: LocalModel, inputs: dict[int, tuple]) -> float:
    """Import the generated program and run its blocks and heads against the real ones."""
    spec = importlib.util.spec_from_file_location(f"localize_program_{os.getpid()}", out / "program.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = module.build()
    blocks = [step.get_submodule(f"block_{b.index}") for b in lm.blocks]
    heads = [getattr(step, f"head_{b.index}", None) for b in lm.blocks]
    worst = 0.0
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for block in lm.blocks:
                args = inputs[block.index]
                want = block.module(*args)
                got = blocks[block.index].eval()(*args)
                pairs = list(zip(want, got))
                if block.aux is not None:
                    slot = block.plan.outputs.index(block.plan.primary)
                    pairs.append((block.aux(want[slot]), heads[block.index].eval()(want[slot])))
                for w, g in pairs:
                    if isinstance(w, torch.Tensor):
                        worst = max(worst, float((w.double() - g.double()).abs().max()) if w.numel() else 0.0)
    finally:
        lm.train(was_training)
    if worst > 0:
        raise VerificationError(f"generated blocks differ from the graph by {worst:.3g}")
    return worst


# ------------------------------------------------------------------------------------- graph picture













# ------------------------------------------------------------------------------------- ONNX












# ------------------------------------------------------------------------------------- plan.json


def plan_document(
    lm: LocalModel,
    *,
    model: ModelInfo,
    example_inputs: tuple[torch.Tensor, ...],
    options: dict[str, Any],
    onnx: list[OnnxResult] | None = None,
    code: list[dict[str, Any]] | None = None,
    program: dict[str, Any] | None = None,
    graph: str | None = None,
) -> dict[str, Any]:
    """The plan as JSON-ready data; ``localize/codegen/plan.schema.json`` describes it."""
    plan = lm.plan
    by_name = {n.name: n for n in plan.gm.graph.nodes}
    later_inputs = [set(bp.inputs) for bp in plan.blocks]
    optimizer = (options or {}).get("optimizer") or {}
    example_batch = example_inputs[0].shape[0] if example_inputs and example_inputs[0].dim() else 0
    scale = (options or {}).get("batch_size", example_batch) / example_batch if example_batch else 1.0
    peaks, backprop_peak = estimate_peaks(
        lm.model, lm.blocks, _STATE_PER_PARAM.get(optimizer.get("name"), 2), batch_scale=scale
    )
    blocks = []
    for i, bp in enumerate(plan.blocks):
        used_later = set().union(*later_inputs[i + 1 :]) if i + 1 < len(plan.blocks) else set()
        cut_later = {name for later in plan.blocks[i + 1 :] for name in later.cut_inputs}
        crossing = [
            _tensor(by_name.get(name), name) | {"gradient_cut": name in cut_later}
            for name in bp.outputs
            if name in used_later
        ]
        block = lm.blocks[i]
        aux = None
        if block.aux is not None:
            aux = {
                "strategy": plan.aux,
                "params": sum(p.numel() for p in block.aux.parameters()),
                "reads": bp.primary,
                "feature_shape": list(bp.feature_shape or ()),
                "feature_layout": bp.feature_layout,
            }
            if lm.chunking is not None:
                aux["chunked"] = lm.chunking.head(i) is not None
        entry: dict[str, Any] = {
            "index": bp.index,
            "nodes": list(bp.nodes),
            "inputs": list(bp.inputs),
            "outputs": list(bp.outputs),
            "params": bp.cost.params,
            "flops": bp.cost.flops,
            "activation_bytes": bp.cost.activation_bytes,
            "trained_params": sum(p.numel() for p in block.params if p.requires_grad),
            "peak_bytes": peaks[i],
            "crossing": crossing,
            "aux": aux,
        }
        if code is not None:
            entry["code"] = code[i]
        if onnx is not None:
            entry["onnx"] = asdict(onnx[i]) | {"seconds": round(onnx[i].seconds, 3)}
        blocks.append(entry)

    legal = {c.position: c for c in plan.legal_cuts}
    cuts = []
    for k, position in enumerate(plan.cut_positions):
        point = legal.get(position)
        names = list(point.crossing) if point is not None else []
        cuts.append(
            {
                "position": position,
                "after": point.after if point is not None else plan.blocks[k].nodes[-1],
                "between": [k, k + 1],
                "activations": list(point.activations) if point is not None else [],
                "crossing": [_tensor(by_name.get(n), n) for n in names],
            }
        )
    out_leaf = next(n for n in reversed(plan.gm.graph.nodes) if n.op == "output").args[0][plan.output_index]
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "model": {
            "name": model.name,
            "file": model.file,
            "factory": model.factory,
            "trace": plan.traced.method,
            "inputs": [
                {"name": n, "shape": list(x.shape), "dtype": _dtype(x.dtype)}
                for n, x in zip(plan.traced.input_names, example_inputs)
            ],
            "output": _tensor(
                out_leaf if isinstance(out_leaf, fx.Node) else None, getattr(out_leaf, "name", "output")
            )
            | {"index": plan.output_index, "layout": plan.output_layout},
            "params": sum(p.numel() for p in lm.model.parameters()),
        },
        "versions": {
            "localize": localize.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "options": options,
        "num_blocks": plan.num_blocks,
        "blocks": blocks,
        "cuts": cuts,
        "schedule": str(lm.schedule),
        "backprop_peak_bytes": backprop_peak,
        "timings": {k: round(v, 6) for k, v in plan.timings.items()},
    }
    if program is not None:
        doc["program"] = program
    if graph is not None:
        doc["graph"] = graph
    return doc


_STATE_PER_PARAM = {"sgd": 1, "adamw": 2}  # the optimizer state kept per trained tensor


def _tensor(node: fx.Node | None, name: str) -> dict[str, Any]:
    info = value_info(node) if node is not None else None
    if info is None or not info.is_tensor:
        return {"name": name, "shape": None, "dtype": None}
    return {"name": name, "shape": list(info.shape), "dtype": _dtype(info.dtype)}


def _dtype(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())
