"""Generated code: block_<i>.py rebuilds each block and head; program.py trains like LocalModel.

The references are independent of the generated code: each block's ``fx.GraphModule`` and aux
head for outputs, and ``LocalModel.train_step`` (same seed, same batches) for program.py's losses.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import localize
import localize.codegen.blocks
import localize.codegen.modules
from localize.cli.main import main
from localize.codegen.artifacts import block_inputs
from localize.codegen.restore import load_tensors
from localize.compiler.model_file import load_model_file, localize_file
from localize.data import iterate_batches, random_dataset
from localize.zoo import ResNet2d

ROOT = Path(__file__).resolve().parents[1]

# batch-norm (running statistics), dropout (RNG) and a shape-reading branch that only
# torch.export traces: the program must reproduce all three
NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 16)
            self.bn = nn.BatchNorm1d(16)
            self.drop = nn.Dropout(0.2)
            self.b = nn.Linear(16, 16)
            self.c = nn.Linear(16, 3)

        def forward(self, x):
            if x.shape[-1] == 6:
                x = x * 2
            h = self.drop(torch.relu(self.bn(self.a(x))))
            return self.c(torch.relu(self.b(h)))


    def model():
        return Net()


    def example_inputs():
        return (torch.randn(4, 6),)
    """
)

DATASET = textwrap.dedent(
    """

    def dataset():
        g = torch.Generator().manual_seed(5)
        x = torch.randn(80, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 2] > 0).long()
        return (x[:64], y[:64]), (x[64:], y[64:])


    def loss_fn(pred, target):
        return torch.nn.functional.cross_entropy(pred, target, label_smoothing=0.1)
    """
)


def reference_losses(
    model_file: Path, steps: int, *, blocks: int, optimizer: str, batch_size: int, seed: int
):
    """LocalModel.train_step on the batches `localize --train` would draw."""
    mf = load_model_file(str(model_file))
    lm, example = localize_file(mf, blocks=blocks, optimizer=optimizer, seed=seed)
    data = mf.dataset()
    if data is None:
        inputs = [
            (n, tuple(x.shape[1:]), str(x.dtype).removeprefix("torch."), None)
            for n, x in zip(lm.plan.traced.input_names, example)
        ]
        data = random_dataset(inputs, tuple(lm.plan.output_shape), seed=seed)
    lm.train()
    torch.manual_seed(seed)
    batches = iterate_batches(data[0], batch_size, seed)
    losses = []
    for _ in range(steps):
        inputs, target = next(batches)
        losses.append(lm.train_step(inputs, target))
    return lm, losses


def program_losses(out: Path, steps: int) -> list[list[float]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(out / "program.py"), "--steps", str(steps)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    return [[float(v) for v in line.split(":", 1)[1].split()] for line in lines]


@pytest.mark.parametrize(
    "with_dataset, optimizer, blocks",
    [(True, "adamw", 3), (False, "sgd", 2)],
    ids=["dataset-adamw", "random-data-sgd"],
)
def test_program_py_losses_equal_train_step(
    with_dataset: bool, optimizer: str, blocks: int, tmp_path: Path, capsys
):
    path = tmp_path / "net.py"
    path.write_text(NET + (DATASET if with_dataset else ""))
    out = tmp_path / "out"
    argv = [
        str(path),
        "--blocks",
        str(blocks),
        "--out",
        str(out),
        "--no-onnx",
        "--optimizer",
        optimizer,
        "--batch-size",
        "16",
        "--seed",
        "7",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    steps = 6  # more than one epoch of the 64 training samples: the epoch-to-epoch order too
    got = program_losses(out, steps)
    _, want = reference_losses(path, steps, blocks=blocks, optimizer=optimizer, batch_size=16, seed=7)
    assert len(got) == steps and all(len(s) == blocks for s in got)
    assert got == want  # exactly: same ops, same order, same RNG draws


def test_program_py_imports_only_torch_localize_and_stdlib(tmp_path: Path, capsys):
    path = tmp_path / "net.py"
    path.write_text(NET)
    out = tmp_path / "out"
    assert main([str(path), "--blocks", "2", "--out", str(out), "--no-onnx"]) == 0, capsys.readouterr().err
    tree = ast.parse((out / "program.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
    assert {m.split(".")[0] for m in third_party} == {"torch", "localize"}
    assert "localize.runtime.ops" in third_party and "localize.runtime.optim" in third_party


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_files_rebuild_blocks_and_heads_of_a_resnet(tmp_path: Path):
    model = ResNet2d(in_channels=3, num_classes=5, widths=(8, 16), blocks_per_stage=(1, 1))
    example = (torch.randn(2, 3, 16, 16),)
    lm = localize.transform(model, blocks=4, example_inputs=example)
    gen = localize.codegen.blocks.generate(lm)
    weights = gen.weights(lm)
    args = block_inputs(lm, lm.plan.traced.bind(example, {}))
    lm.eval()
    for block in lm.blocks:
        path = tmp_path / f"block_{block.index}.py"
        path.write_text(localize.codegen.blocks.block_source(lm, block.index, gen))
        module = _import_file(path)
        rebuilt = getattr(module, f"Block{block.index}")()
        load_tensors(rebuilt, weights["blocks"][block.index])
        with torch.no_grad():
            want, got = block.module(*args[block.index]), rebuilt.eval()(*args[block.index])
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            if block.aux is not None:
                head = getattr(module, f"Head{block.index}")()
                load_tensors(head, weights["heads"][block.index])
                feature = want[block.plan.outputs.index(block.plan.primary)]
                torch.testing.assert_close(head.eval()(feature), block.aux(feature), rtol=0, atol=0)
            else:
                assert not hasattr(module, f"Head{block.index}")


def test_readable_head_names_layers_after_their_type():
    lm = localize.transform(
        ResNet2d(in_channels=3, num_classes=5, widths=(8, 16), blocks_per_stage=(1, 1)),
        blocks=2,
        example_inputs=(torch.randn(2, 3, 16, 16),),
    )
    head = lm.blocks[0].aux
    gm = localize.codegen.blocks.readable_head(head)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["feature"]
    names = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert any(n.startswith("conv2d_") for n in names) and any(n.startswith("linear_") for n in names)
    x = torch.randn(2, *lm.blocks[0].plan.feature_shape[1:])
    head.eval()
    gm.eval()
    torch.testing.assert_close(gm(x), head(x), rtol=0, atol=0)


def test_module_of_a_class_generated_code_cannot_import_is_a_codegen_error():
    class Custom(torch.nn.Module):  # defined in a function: generated code could not import it
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    class Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Custom) or super().is_leaf_module(m, qualname)

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Custom())
    gm = torch.fx.GraphModule(net, Leafy().trace(net))
    with pytest.raises(localize.codegen.modules.CodegenError, match=r"module '1' is a .*Custom.* cannot import"):
        localize.codegen.modules.module_code(gm, "Block0", "doc")
    # a torch.nn leaf is written as its constructor and rebuilds an equal module
    code = localize.codegen.modules.module_code(
        torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2))), "B", "d"
    )
    assert "nn.Linear(in_features=4, out_features=2, bias=True)" in code.source


def test_codegen_doctests():
    import localize.cli.train
    import localize.codegen.program
    import localize.codegen.restore
    import localize.compiler.model_file

    for module in (
        localize.codegen.blocks,
        localize.codegen.program,
        localize.codegen.restore,
        localize.cli.train,
        localize.compiler.model_file,
    ):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
