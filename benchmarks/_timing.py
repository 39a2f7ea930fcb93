"""Shared by the step-time benchmarks: time ``train_step`` calls round-robin, print the ratios."""

from __future__ import annotations

import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table


def round_robin(models: dict[str, Any], batch: tuple, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of ``lm.train_step(*batch)`` per model, each step of each model in turn (so
    that machine drift hits all alike), after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, lm in models.items():
            t0 = time.perf_counter()
            lm.train_step(*batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_ratios(title: str, medians: dict[str, float], base: str, what: str) -> None:
    """A table of milliseconds and ratios against ``medians[base]``."""
    table = Table(title=title)
    table.add_column(what)
    table.add_column("ms per call", justify="right")
    table.add_column(f"vs {base}", justify="right")
    for name, seconds in medians.items():
        table.add_row(name, f"{1000 * seconds:.1f}", f"{seconds / medians[base]:.2f}x")
    Console().print(table)
