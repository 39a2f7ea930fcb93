"""The package declares the torch versions it supports as a range; CI tests both of its ends."""

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


def _pinned(name: str) -> Version:
    lines = (ROOT / name).read_text().splitlines()
    pin = next(r for r in (Requirement(x) for x in lines if x and x[0] != "#") if r.name == "torch")
    return Version(next(iter(pin.specifier)).version)


def test_ci_tests_both_ends_of_the_range_and_this_torch_lies_inside_it():
    """constraints.txt pins the lowest minor release the range admits, constraints-upper.txt the
    highest; .ci/run runs the suite on each."""
    spec = _torch_requirement().specifier
    low, high = _pinned("constraints.txt"), _pinned("constraints-upper.txt")
    assert spec.contains(low) and spec.contains(high)
    floor = Version(next(s.version for s in spec if s.operator == ">="))
    ceiling = Version(next(s.version for s in spec if s.operator == "<"))
    assert low.release[:2] == floor.release[:2]
    assert (high.major, high.minor + 1) == (ceiling.major, ceiling.minor)
    assert spec.contains(Version(torch.__version__).base_version)  # any torch of the range runs the suite
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci and "PIP_CONSTRAINT=constraints-upper.txt" in ci


def test_the_installed_distribution_declares_the_same_range():
    declared = [Requirement(r) for r in requires("localize-learning") or [] if r.startswith("torch")]
    assert declared and declared[0].specifier == _torch_requirement().specifier
