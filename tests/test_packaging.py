"""The package declares the torch versions it supports as a range; CI pins one inside it."""

from __future__ import annotations

from importlib.metadata import requires
from pathlib import Path

import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _torch_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torch")


def test_torch_is_a_range_not_a_pin():
    spec = _torch_requirement().specifier
    operators = {s.operator for s in spec}
    assert "==" not in operators and {">=", "<"} <= operators, str(spec)
    assert spec.contains("2.13.0") and spec.contains("2.15.0") and not spec.contains("2.12.1")


def test_the_constraints_ci_installs_lie_inside_the_range_and_match_this_torch():
    pins = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    torch_pin = next(r for r in pins if r.name == "torch")
    pinned = Version(next(iter(torch_pin.specifier)).version)
    assert _torch_requirement().specifier.contains(pinned)
    assert Version(torch.__version__).release == pinned.release  # the suite runs on the pinned torch


def test_the_installed_distribution_declares_the_same_range():
    declared = [Requirement(r) for r in requires("localize-learning") or [] if r.startswith("torch")]
    assert declared and declared[0].specifier == _torch_requirement().specifier
