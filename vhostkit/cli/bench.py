"""``vhostkit bench [--quick] [--json] [--only NAME ...]``: run the benchmarks, print one table.

Each benchmark module (``bench/*.py`` in the source tree, see :mod:`vhostkit.bench`) measures
its figures beside a reference taken in the same run; the table shows both, their ratio, the
aim, and the CPU that other processes on the machine took meanwhile (a figure taken while
others ran says little). Progress goes to stderr; the table (or with ``--json`` one JSON
document) to stdout. Exit 0 when every module ran or was skipped, 1 when one failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vhostkit.cli.common import EXIT_FAILURE, EXIT_OK, add_json_option, print_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vhostkit.bench.runner import BENCHMARKS

    parser.add_argument(
        "--quick", action="store_true", help="short runs (seconds each); skips the slow ones"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=[b.name for b in BENCHMARKS],
        help=f"run only these ({', '.join(b.name for b in BENCHMARKS)})",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="where the benchmark modules are (default: the source tree's bench/)",
    )
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    from vhostkit.bench.runner import ModuleResult, run_benchmarks
    from vhostkit.bench.table import document, print_table

    def progress(result: ModuleResult) -> None:
        print(
            f"bench {result.name}: {result.status} in {result.seconds:.1f} s"
            + (f" ({result.note})" if result.note else ""),
            file=sys.stderr,
            flush=True,
        )

    results = run_benchmarks(
        quick=args.quick, only=args.only, directory=args.dir, progress=progress
    )
    if args.json:
        print_json(document(results, quick=args.quick))
    else:
        print_table(results, sys.stdout)
    return EXIT_FAILURE if any(r.status == "failed" for r in results) else EXIT_OK
