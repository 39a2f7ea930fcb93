"""program.py runs the step LocalModel runs: same code, same losses, bit for bit.

The reference is ``LocalModel.train_step`` on the same batches from the same starting weights and
RNG state; the program is written to disk (``program_source`` + ``program_weights``), imported as a
file and run through its own ``build()`` and ``make_optimizers()``. Covered: every aux strategy,
fx and torch.export graphs, batch-norm and dropout, AdamW and SGD, every example model file and
every zoo architecture, and the ``on_nan`` policy.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import torch
from program_helpers import import_file, write_program
from zoo_models import ENTRIES

import localize
from localize.aux import available
from localize.cli.main import main
from localize.codegen import artifacts
from localize.compiler.model_file import load_model_file, localize_file
from localize.data import iterate_batches
from localize.runtime.ops import NonFiniteLossError, StepState, run_step

ROOT = Path(__file__).resolve().parents[1]

NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.fc(x))


    class Net(nn.Module):
        def __init__(self, shape_branch):
            super().__init__()
            self.shape_branch = shape_branch
            self.a = nn.Linear(6, 16)
            self.bn = nn.BatchNorm1d(16)
            self.drop = nn.Dropout(0.2)
            self.layers = nn.Sequential(Layer(), Layer(), Layer(), Layer())
            self.c = nn.Linear(16, 3)

        def forward(self, x):
            if self.shape_branch and x.shape[-1] == 6:  # only torch.export traces this
                x = x * 2
            h = self.drop(torch.relu(self.bn(self.a(x))))
            return self.c(self.layers(h))
    """
)


def run_program(program, lm, batches: list, seed: int) -> list[list[float]]:
    step = program.build().train()
    state = StepState(lm.loss_fn, program.make_optimizers(step), on_nan=lm.on_nan)
    torch.manual_seed(seed)
    return [run_step(step, state, lm._flat_inputs(x), y) for x, y in batches]


def run_local(lm, batches: list, seed: int) -> list[list[float]]:
    lm.train()
    torch.manual_seed(seed)
    return [lm.train_step(x, y) for x, y in batches]


@pytest.fixture(scope="module", autouse=True)
def _net_module(tmp_path_factory):
    """NET as an importable module: program.py imports the classes blocks and heads hold."""
    folder = tmp_path_factory.mktemp("netmod")
    (folder / "program_test_net.py").write_text(NET)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))


def _net(shape_branch: bool):
    from program_test_net import Net  # noqa: PLC0415 - written by the fixture

    torch.manual_seed(3)
    return Net(shape_branch)


def _batches(n: int = 3, batch: int = 8) -> list:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("aux", available())
@pytest.mark.parametrize("trace", ["fx", "export"])
def test_program_losses_equal_train_step_for_every_strategy(aux: str, trace: str, tmp_path: Path):
    optimizer = "sgd" if trace == "fx" else "adamw"
    example = (torch.randn(4, 6),)
    lm = localize.transform(_net(trace == "export"), blocks=3, example_inputs=example, aux=aux, optimizer=optimizer)
    assert lm.plan.traced.method == trace
    program = write_program(lm, example, tmp_path / "out", optimizer)
    batches = _batches()
    want = run_local(lm, batches, seed=5)
    got = run_program(program, lm, batches, seed=5)
    assert got == want and all(math.isfinite(v) for step in got for v in step)


def test_program_forward_is_the_step_code_lm_runs(tmp_path: Path):
    example = (torch.randn(4, 6),)
    lm = localize.transform(_net(False), blocks=2, example_inputs=example, aux="man")
    program = write_program(lm, example, tmp_path / "out")
    text = (tmp_path / "out" / "program.py").read_text()
    assert textwrap.indent(lm.step_program.code.strip(), "    ") in text
    step = program.build()
    assert step.forward.__doc__ is None and type(step).__name__ == "TrainStep"
    # the program imports the runtime ops and optimizers; it restates none of them
    for name in ("def backward", "class SGD", "class AdamW", "def cross_entropy", "zero_grad"):
        assert name not in text


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_program_losses_equal_train_step_for_every_zoo_family(name: str, tmp_path: Path):
    entry = ENTRIES[name]
    torch.manual_seed(0)
    model = entry.build()
    args, kwargs = entry.inputs(2), entry.kwargs(2)
    options = {"optimizer": "sgd", "lr": 0.01, **entry.options}
    lm = localize.transform(model, blocks=2, example_inputs=args, example_kwargs=kwargs or None, **options)
    program = write_program(lm, args, tmp_path / "out", options["optimizer"], lr=options["lr"])
    torch.manual_seed(1)
    batches = [({**dict(zip(lm.plan.traced.input_names, entry.inputs(3))), **entry.kwargs(3)}, entry.target(3))]
    batches.append(batches[0])
    batches.append(batches[0])
    want = run_local(lm, batches, seed=2)
    got = run_program(program, lm, batches, seed=2)
    assert got == want


@pytest.mark.parametrize("example", ["digits_cnn", "mnist1d_resnet", "vit_tiny", "charlm_gpt"])
def test_program_losses_equal_train_step_for_every_example(example: str, tmp_path: Path, capsys):
    model_file = ROOT / "examples" / f"{example}.py"
    out = tmp_path / "out"
    argv = [str(model_file), "--blocks", "2", "--out", str(out), "--no-onnx", "--batch-size", "8", "--seed", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "program.py").exists()
    program = import_file(out / "program.py", f"program_example_{example}")
    mf = load_model_file(str(model_file))
    lm, _ = localize_file(mf, blocks=2, seed=4)
    batches_from = iterate_batches(mf.dataset()[0], 8, 4)
    batches = [next(batches_from) for _ in range(3)]
    state = StepState(mf.loss_fn or lm.loss_fn, program.make_optimizers(step := program.build().train()))
    torch.manual_seed(4)
    got = [run_step(step, state, list(x), y) for x, y in batches]
    assert got == run_local(lm, batches, seed=4)


@pytest.mark.parametrize("on_nan", ["skip", "raise"])
def test_on_nan_is_the_same_in_process_and_in_program(on_nan: str, tmp_path: Path):
    example = (torch.randn(4, 6),)
    lm = localize.transform(_net(False), blocks=2, example_inputs=example, on_nan=on_nan)
    program = write_program(lm, example, tmp_path / "out")
    step = program.build().train()
    state = StepState(lm.loss_fn, program.make_optimizers(step), on_nan=program.ON_NAN)
    bad = torch.full((8, 6), math.nan), torch.zeros(8, dtype=torch.long)
    before = {k: v.clone() for k, v in step.state_dict().items() if "block_0" in k and "weight" in k}
    outcomes = []
    for run in (lambda: lm.train_step(*bad), lambda: run_step(step, state, [bad[0]], bad[1])):
        try:
            outcomes.append(("losses", [math.isnan(v) for v in run()]))
        except NonFiniteLossError as e:
            outcomes.append(("raised", str(e).split(" at step")[0]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == (("losses", [True, True]) if on_nan == "skip" else ("raised", "block 0 loss is nan"))
    after = {k: v for k, v in step.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a NaN loss


def test_a_leaf_from_outside_torch_nn_is_rebuilt_from_its_class(tmp_path: Path):
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "custom_leaf.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Scale(torch.nn.Module):
                def __init__(self, n, power):
                    super().__init__()
                    self.power = power
                    self.w = torch.nn.Parameter(torch.ones(n) * 1.5)
                    self.register_buffer("calls", torch.zeros(()), persistent=False)

                def forward(self, x):  # reads self.training: localize keeps it a leaf, like StochasticDepth
                    return x * self.w ** self.power if self.training else x * self.w
            """
        )
    )
    try:
        from custom_leaf import Scale  # noqa: PLC0415

        net = torch.nn.Sequential(torch.nn.Linear(6, 8), Scale(8, 2), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        lm = localize.transform(net, blocks=2, example_inputs=(torch.randn(4, 6),))
        program = write_program(lm, (torch.randn(4, 6),), tmp_path / "out")
        assert "restore(\n" in (tmp_path / "out" / "program.py").read_text()
        batches = _batches()
        assert run_program(program, lm, batches, seed=1) == run_local(lm, batches, seed=1)
    finally:
        sys.path.remove(str(tmp_path))


def test_program_for_a_model_holding_torch_transformer_layers(tmp_path: Path):
    from test_transform import _EncoderClassifier

    torch.manual_seed(0)
    example = (torch.randn(3, 6, 8),)
    lm = localize.transform(_EncoderClassifier(), blocks=3, example_inputs=example, optimizer="sgd")
    program = write_program(lm, example, tmp_path / "out", "sgd")
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 6, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    assert run_program(program, lm, batches, seed=3) == run_local(lm, batches, seed=3)


@pytest.mark.parametrize(("aux", "keep"), [("linear", "1.0"), ("linear", "0.5"), ("readout", "1.0")])
def test_program_runs_the_chunked_step_like_train_step(aux: str, keep: str, tmp_path: Path, capsys):
    """chunk_size= (SeCO) and chunk_keep= (SpaCO): program.py holds the chunk programs, sharing their
    block's layers (and a readout head's chunk program its head's), and trains bit for bit like the
    LocalModel (the SpaCO draws from the same seed)."""
    model_file = ROOT / "examples" / "charlm_gpt.py"
    out = tmp_path / "out"
    argv = [str(model_file), "--blocks", "2", "--aux", aux, "--out", str(out), "--no-onnx", "--batch-size", "4",
            "--seed", "4", "--chunk-size", "24", "--chunk-keep", keep]
    assert main(argv) == 0, capsys.readouterr().err
    chunked_head = aux == "readout"  # its copied layers attend across positions: a head program
    assert ("(chunked)" in capsys.readouterr().out) == chunked_head
    doc = json.loads((out / "plan.json").read_text())
    jsonschema.validate(doc, artifacts.load_schema())
    assert doc["blocks"][0]["aux"]["chunked"] == chunked_head
    program = import_file(out / "program.py", f"program_chunked_{aux}_{keep.replace('.', '_')}")
    mf = load_model_file(str(model_file))
    lm, _ = localize_file(mf, blocks=2, aux=aux, seed=4, chunk_size=24, chunk_keep=float(keep))
    batches_from = iterate_batches(mf.dataset()[0], 4, 4)
    batches = [next(batches_from) for _ in range(3)]
    step = program.build().train()
    assert [type(step.get_submodule(f"chunk_{i}")).__name__ for i in range(2)] == ["Chunk0", "Chunk1"]
    if aux == "readout":  # the head's chunk program runs the head's very layers
        head_chunk, head = step.get_submodule("head_chunk_0"), step.get_submodule("head_0")
        assert type(head_chunk).__name__ == "HeadChunk0"
        head_tensors = {id(t) for t in head.state_dict(keep_vars=True).values()}
        assert all(id(t) in head_tensors for t in head_chunk.state_dict(keep_vars=True).values())
    state = StepState(mf.loss_fn, program.make_optimizers(step))
    torch.manual_seed(4)
    got = [run_step(step, state, list(x), y) for x, y in batches]
    assert got == run_local(lm, batches, seed=4)


def test_program_runs_the_recomputed_step_like_train_step(tmp_path: Path, capsys):
    """--recompute: program.py's blocks are the recomputing versions (units under
    torch.utils.checkpoint) and train bit for bit like the LocalModel."""
    model_file = ROOT / "examples" / "mnist1d_resnet.py"
    out = tmp_path / "out"
    argv = [str(model_file), "--blocks", "2", "--out", str(out), "--no-onnx", "--batch-size", "8", "--recompute"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "units recomputed in backward" in capsys.readouterr().out
    program = import_file(out / "program.py", "program_recomputed")
    mf = load_model_file(str(model_file))
    lm, _ = localize_file(mf, blocks=2, seed=0, recompute=True)
    batches_from = iterate_batches(mf.dataset()[0], 8, 0)
    batches = [next(batches_from) for _ in range(3)]
    step = program.build().train()
    assert "restore(\n            'localize.passes.recompute_units:Recompute'" in (out / "program.py").read_text()
    state = StepState(lm.loss_fn, program.make_optimizers(step))
    torch.manual_seed(0)
    got = [run_step(step, state, list(x), y) for x, y in batches]
    assert got == run_local(lm, batches, seed=0)
