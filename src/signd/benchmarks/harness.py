"""Timing, result shape, registry and reporting of the benchmarks."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from signd.errors import InvalidField


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One figure, its same-run baseline, and what the project aims for."""

    name: str
    unit: str
    value: float
    baseline_name: str
    baseline_value: float
    target: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """value / baseline for rates; baseline / value for times (so > 1 means faster)."""
        if self.higher_is_better:
            return self.value / self.baseline_value
        return self.baseline_value / self.value


def format_figure(value: float) -> str:
    """Thousands separators for big figures, three decimals for small ones (seconds, ms)."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def rate(fn: Callable[[], object], *, iterations: int, rounds: int = 5) -> float:
    """Best-of-``rounds`` calls per second of ``fn``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, time.perf_counter() - start)
    return iterations / best


def paired_rates(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    *,
    iterations: int,
    rounds: int = 7,
) -> tuple[float, float]:
    """Rates of two functions measured in alternating rounds, median of each."""
    ours_rates, base_rates = [], []
    for _ in range(rounds):
        ours_rates.append(rate(ours, iterations=iterations, rounds=1))
        base_rates.append(rate(baseline, iterations=iterations, rounds=1))
    return statistics.median(ours_rates), statistics.median(base_rates)


Benchmark = Callable[[bool], list[BenchResult]]
"""Takes ``quick`` and returns one or more results."""

REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    def register(fn: Benchmark) -> Benchmark:
        REGISTRY[name] = fn
        return fn

    return register


def _load_all() -> None:
    from signd.benchmarks import api, core, enclave, hsm, kms  # noqa: F401 - they register their benchmarks


def run_benchmarks(*, only: list[str] | None, quick: bool, as_json: bool) -> list[BenchResult]:
    """Run the chosen benchmarks and print a table (or JSON) of figures and ratios."""
    _load_all()
    names = only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise InvalidField(f"unknown benchmark(s) {unknown}; known: {list(REGISTRY)}", field="only")
    console = Console(stderr=True)
    results: list[BenchResult] = []
    for name in names:
        console.print(f"running {name} ...")
        results.extend(REGISTRY[name](quick))
    if as_json:
        rows = [asdict(r) | {"ratio": round(r.ratio, 3)} for r in results]
        sys.stdout.write(json.dumps({"results": rows}, indent=2) + "\n")
    else:
        table = Table("benchmark", "signd", "baseline", "ratio", "target")
        for r in results:
            table.add_row(
                r.name,
                f"{format_figure(r.value)} {r.unit}",
                f"{format_figure(r.baseline_value)} {r.unit} ({r.baseline_name})",
                f"{r.ratio:.2f}×",
                r.target,
            )
        Console(width=160).print(table)
    return results
