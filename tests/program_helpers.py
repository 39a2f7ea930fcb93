"""Write a LocalModel's program.py and weights.pt and import it (tests of the generated program)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from localize.codegen.blocks import generate
from localize.codegen.program import OptimizerSpec, program_source, program_weights


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_program(lm, example: tuple, folder: Path, optimizer: str = "adamw", lr: float | None = None):
    """program.py and weights.pt for ``lm`` as it is now, imported as a module."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = generate(lm)
    spec = OptimizerSpec.build(optimizer, lr)
    text = program_source(
        lm, model_file="unused.py", optimizer=spec, batch_size=4, seed=0, example_inputs=example, gen=gen
    )
    (folder / "program.py").write_text(text)
    torch.save(program_weights(lm, gen), folder / "weights.pt")
    return import_file(folder / "program.py", f"program_{folder.name}_{id(lm)}")
