"""The benchmark runner behind ``vhostkit bench``: what a benchmark module hands back, how the
runner finds and times the modules, and the table it prints. Benchmarks are not tests: nothing
here asserts a speed.

A **benchmark module** is a Python file in the tree's ``bench/`` directory (see
:data:`~vhostkit.bench.runner.BENCHMARKS`) exposing::

    def run(quick: bool) -> list[dict]: ...

Each dict is one figure (one :class:`~vhostkit.bench.row.Row`) with the keys ``bench`` (str),
``figure`` (str), ``value`` (float), ``unit`` (str), ``reference`` (str, what the value is
compared with, measured in the same run), ``reference_value`` (float, in the same unit),
``ratio`` (float, ``value / reference_value``), ``aim`` (str or ``None``), and optionally
``note`` (str) and ``others_cpu`` (float: per cent of one CPU that processes outside the
benchmark's own process tree took while this figure was measured; without it the runner
fills in the figure for the module's whole run). ``quick=True`` asks for a short run (a few
seconds); a module that has nothing useful to measure quickly may set ``SLOW = True`` and is
then skipped under ``--quick``. A module may raise :class:`Skipped` to say why it cannot run
here (a missing peer, no ``CAP_NET_ADMIN``); any other exception is reported as a failure of
that module and the runner goes on with the next.

The modules keep working as scripts (``python3 bench/NAME.py``); :mod:`vhostkit.bench.util`
has what they share (medians, the CPU other processes take, starting a back-end daemon).
"""

from __future__ import annotations

from vhostkit.bench.row import Row, Skipped, make_row
from vhostkit.bench.runner import BENCHMARKS, Benchmark, ModuleResult, bench_dir, run_benchmarks

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "ModuleResult",
    "Row",
    "Skipped",
    "bench_dir",
    "make_row",
    "run_benchmarks",
]
