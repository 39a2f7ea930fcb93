"""What `localize MODEL.py` writes: plan.json against its schema, ONNX exports checked in
onnxruntime, the graph picture, schedule.txt, and the atomic output directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime
import pydot
import pytest
import torch

import localize
from localize.cli.main import main, problems, summary_table
from localize.codegen import artifacts
from localize.codegen.program import OptimizerSpec
from localize.errors import ConfigError
from localize.runtime.schedule import parse_schedule

TINY = """
import torch
from torch import nn


def model():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def example_inputs():
    return (torch.randn(4, 6),)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny model compiled once, with ONNX export (the slow part: a few seconds per block)."""
    folder = tmp_path_factory.mktemp("artifacts")
    (folder / "tiny.py").write_text(TINY)
    out = folder / "out"
    assert main([str(folder / "tiny.py"), "--blocks", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "plan.json").read_text())


def test_plan_json_matches_its_schema(compiled):
    out, doc = compiled
    schema = artifacts.load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    # the schema is not vacuous: a wrong type, a missing key and an unknown key are each rejected
    for broken in (
        doc | {"num_blocks": "two"},
        {k: v for k, v in doc.items() if k != "blocks"},
        doc | {"surprise": 1},
        doc | {"blocks": [doc["blocks"][0] | {"params": -1}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_plan_json_describes_the_blocks(compiled):
    out, doc = compiled
    assert doc["format"] == "localize.plan/1"
    assert (
        doc["versions"]["localize"] == localize.__version__ and doc["versions"]["torch"] == torch.__version__
    )
    assert doc["model"]["name"] == "Sequential" and doc["model"]["inputs"][0]["shape"] == [4, 6]
    first, last = doc["blocks"]
    assert first["aux"]["strategy"] == "dgl" and first["aux"]["params"] > 0 and last["aux"] is None
    # params counted independently: the model's parameters split over the blocks
    assert first["params"] + last["params"] == sum(p.numel() for p in _tiny_model().parameters())
    assert first["crossing"] and all(c["gradient_cut"] for c in first["crossing"])
    assert doc["cuts"][0]["between"] == [0, 1]
    assert doc["cuts"][0]["activations"] == [c["name"] for c in first["crossing"]]
    assert sorted(doc["files"]) == sorted(p.name for p in out.iterdir())


def _tiny_model():
    namespace: dict = {}
    exec(TINY, namespace)  # noqa: S102 - our own test source
    return namespace["model"]()


def test_schedule_txt_parses_back(compiled):
    out, doc = compiled
    schedule = parse_schedule((out / "schedule.txt").read_text())
    assert [str(a) for a in schedule] == ["B0:F", "B0:L", "B0:U", "B1:F", "B1:L", "B1:U"]
    assert str(schedule) == doc["schedule"]


def test_onnx_blocks_pass_the_checker_and_match_torch(compiled):
    out, doc = compiled
    # rebuild the same LocalModel (same seed) as the reference for the exported blocks
    torch.manual_seed(doc["options"]["seed"])
    lm = localize.transform(_tiny_model(), blocks=2, example_inputs=(torch.randn(4, 6),))
    lm.eval()
    x = torch.randn(5, 6)  # another batch size than the export's: the batch dim is dynamic
    with torch.no_grad():
        flat = lm.plan.traced.bind((x,), {})
        inputs = artifacts.block_inputs(lm, flat)
    for block in doc["blocks"]:
        i = block["index"]
        assert block["onnx"]["status"] == "ok", block["onnx"]
        assert block["onnx"]["max_abs_diff"] <= 1e-4
        model = onnx.load(str(out / f"block_{i}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        session = onnxruntime.InferenceSession(
            str(out / f"block_{i}.onnx"), providers=["CPUExecutionProvider"]
        )
        args = inputs[i]
        feeds = {inp.name: a.numpy() for inp, a in zip(session.get_inputs(), args)}
        got = session.run(None, feeds)
        with torch.no_grad():
            want = list(lm.blocks[i].module(*args))
            if lm.blocks[i].aux is not None:
                want.append(
                    lm.blocks[i].aux(want[lm.blocks[i].plan.outputs.index(lm.blocks[i].plan.primary)])
                )
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)


def test_onnx_failure_is_reported_in_the_summary(tmp_path: Path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    lm = localize.transform(_tiny_model(), blocks=2, example_inputs=(torch.randn(4, 6),))
    doc = artifacts.write_artifacts(
        tmp_path,
        lm,
        model=artifacts.ModelInfo("Sequential", "tiny.py", "model", str(tmp_path / "tiny.py")),
        example_inputs=(torch.randn(4, 6),),
        options=_options(),
        optimizer=OptimizerSpec.build("adamw", None),
        batch_size=8,
        seed=0,
        onnx=True,
    )
    assert [b["onnx"]["status"] for b in doc["blocks"]] == ["failed", "failed"]
    assert not list(tmp_path.glob("*.onnx"))
    lines = problems(doc)
    assert len(lines) == 2 and all("aten::frobnicate" in line for line in lines)
    rendered = _render(summary_table(doc))
    assert "FAILED" in rendered
    jsonschema.validate(doc, artifacts.load_schema())


def _options() -> dict:
    return {
        "blocks": 2,
        "aux": "dgl",
        "balance": "flops",
        "cuts": None,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "batch_size": 8,
        "seed": 0,
    }


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's parser on newer pyparsing
def test_graph_colours_blocks_and_marks_cuts(compiled):
    out, doc = compiled
    graph = pydot.graph_from_dot_file(str(out / "graph.dot"))[0] if doc["graph"] == "graph.dot" else None
    if graph is None:  # Graphviz is installed: the SVG is written; check the dot source it came from
        assert (out / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        lm = localize.transform(_tiny_model(), blocks=2, example_inputs=(torch.randn(4, 6),))
        folder = out.parent / "dot_only"
        folder.mkdir(exist_ok=True)
        old = shutil.which
        try:
            shutil.which = lambda name: None  # type: ignore[assignment]
            assert artifacts.write_graph(lm, folder) == "graph.dot"
        finally:
            shutil.which = old
        graph = pydot.graph_from_dot_file(str(folder / "graph.dot"))[0]
    clusters = graph.get_subgraphs()
    assert len(clusters) == doc["num_blocks"]
    for cluster, block in zip(clusters, doc["blocks"]):
        names = {n.get_name().strip('"') for n in cluster.get_nodes()}
        assert names == set(block["nodes"])
    cut_edges = [e for e in graph.get_edges() if e.get("color") == "red"]
    crossing = {c["name"] for c in doc["blocks"][0]["crossing"]}
    assert cut_edges and {e.get_source().strip('"') for e in cut_edges} == crossing


def test_graph_svg_when_graphviz_is_installed(compiled):
    out, doc = compiled
    expected = "graph.svg" if shutil.which("dot") else "graph.dot"
    assert doc["graph"] == expected and (out / expected).is_file()


# ------------------------------------------------------------------------------------- atomic output


def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path):
    final = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), artifacts.atomic_directory(final) as tmp:
        (tmp / "plan.json").write_text("{}")
        raise RuntimeError("compile failed")
    assert list(tmp_path.iterdir()) == []  # not even the parents it created


def test_atomic_directory_replaces_only_on_success(tmp_path: Path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), artifacts.atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with artifacts.atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporary_directories_of_killed_runs_are_removed(tmp_path: Path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".out.{dead.stdout.strip()}.abc123.tmp"
    stale.mkdir()
    live = tmp_path / f".out.{os.getpid()}.xyz.tmp"  # this process is alive: a concurrent run, kept
    live.mkdir()
    with artifacts.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_check_writable_names_the_problem(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        artifacts.check_writable(tmp_path / "file")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        artifacts.check_writable(tmp_path / "file" / "sub" / "out")
    artifacts.check_writable(tmp_path / "new" / "out")  # missing parents are fine


def test_onnx_blocks_are_ok_only_if_they_also_run_at_another_batch_size(tmp_path):
    """GPT-2's later blocks receive the batch size as a constant: at batch 2 onnxruntime matches torch,
    at batch 3 it fails. Each block is checked at a second batch size before it is reported ok, and
    its inputs are named after the graph values (not args_0)."""
    import onnxruntime
    from zoo_models import ENTRIES

    from localize.codegen.onnx import export_onnx, other_batch_inputs

    entry = ENTRIES["hf_gpt2"]
    lm = localize.transform(entry.build(), blocks=4, example_inputs=entry.inputs(2), **entry.options)
    flat = lm.plan.traced.bind(entry.inputs(2), {})
    args, other = artifacts.block_inputs(lm, flat), artifacts.block_inputs(lm, other_batch_inputs(flat))
    lm.eval()
    statuses = []
    for block in lm.blocks:
        result = export_onnx(lm, block.index, args[block.index], tmp_path / f"b{block.index}.onnx", other[block.index])
        statuses.append(result.status)
        if result.status != "ok":
            assert result.status == "failed" and "at batch size 3" in result.error
            continue
        session = onnxruntime.InferenceSession(str(tmp_path / result.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [
            n for n, a in zip(block.plan.inputs, args[block.index]) if isinstance(a, torch.Tensor)
        ]
        tensors = [a for a in other[block.index] if isinstance(a, torch.Tensor)]
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)})
        with torch.no_grad():
            want = block.module(*other[block.index])
        for g, w in zip(got, want):  # the independent check: torch's own block at batch 3
            if isinstance(w, torch.Tensor):
                torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-4, rtol=1e-4)
    assert statuses[0] == "ok" and "failed" in statuses  # block 0 exports fully; a later one is caught
