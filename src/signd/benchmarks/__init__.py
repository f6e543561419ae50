"""Benchmarks: every figure is measured next to a baseline in the same run, on the same machine.

Machines here are noisy, so an absolute rate alone means little; the ratio to a baseline run
interleaved with it is the figure to track. ``python bench/run.py`` and ``signd bench`` both run
:func:`run_benchmarks`.
"""

from signd.benchmarks.harness import BenchResult, run_benchmarks

__all__ = ["BenchResult", "run_benchmarks"]
