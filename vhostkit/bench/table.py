"""The one table ``vhostkit bench`` prints: rich on a terminal, aligned plain text otherwise,
and the JSON document of ``--json``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import IO, Any

from vhostkit.bench.runner import ModuleResult

__all__ = ["COLUMNS", "document", "format_number", "plain_table", "print_table", "table_rows"]

#: The table's columns, in order.
COLUMNS = (
    "benchmark",
    "figure",
    "value",
    "unit",
    "reference",
    "ref value",
    "ratio",
    "aim",
    "others CPU %",
)


def format_number(x: float | None) -> str:
    """About four significant digits, thousands separated; ``-`` for none or NaN."""
    if x is None or not math.isfinite(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.2f}"
    if a >= 0.01 or a == 0:
        return f"{x:.3f}"
    return f"{x:.3g}"


def _percent(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.0f}"


def table_rows(results: Sequence[ModuleResult]) -> tuple[list[list[str]], list[str]]:
    """The table's cells, row by row, and the notes printed under it (``[n] ...``)."""
    cells: list[list[str]] = []
    notes: list[str] = []

    def mark(note: str) -> str:
        if note not in notes:  # the same note twice: one number
            notes.append(note)
        return f" [{notes.index(note) + 1}]"

    for result in results:
        if result.status != "ok" or not result.rows:
            others = _percent(result.others_cpu) if result.status == "failed" else "-"
            what = f"({result.status}){mark(result.note) if result.note else ''}"
            cells.append([result.name, what, "-", "", "", "-", "-", "", others])
            continue
        for row in result.rows:
            cells.append(
                [
                    row.bench,
                    row.figure + (mark(row.note) if row.note else ""),
                    format_number(row.value),
                    row.unit,
                    row.reference,
                    format_number(row.reference_value),
                    "-" if not math.isfinite(row.ratio) else f"{row.ratio:.2f}",
                    row.aim or "",
                    _percent(row.others_cpu),
                ]
            )
    return cells, notes


_RIGHT = frozenset({"value", "ref value", "ratio", "others CPU %"})


def plain_table(results: Sequence[ModuleResult]) -> str:
    """The table as aligned plain text, notes below."""
    cells, notes = table_rows(results)
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(COLUMNS)]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if name in _RIGHT else cell.ljust(w)
            for name, cell, w in zip(COLUMNS, row, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    out += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(out) + "\n"


def print_table(
    results: Sequence[ModuleResult],
    file: IO[str],
    *,
    tty: bool | None = None,
    width: int | None = None,
) -> None:
    """Print the table on ``file``: rich when ``tty`` (default: whether ``file`` is a
    terminal; ``width`` columns, default the terminal's), plain text otherwise."""
    if tty is None:
        tty = file.isatty()
    if not tty:
        file.write(plain_table(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in _RIGHT else "left")
    cells, notes = table_rows(results)
    for row in cells:
        table.add_row(*row)
    console = Console(file=file, width=width)
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}", markup=False, highlight=False)


def document(results: Sequence[ModuleResult], *, quick: bool) -> dict[str, Any]:
    """The ``--json`` document: the run's settings and every module with its rows."""
    load1, load5, load15 = os.getloadavg()
    return {
        "quick": quick,
        "cpus": os.cpu_count(),
        "loadavg": [load1, load5, load15],
        "modules": [r.to_dict() for r in results],
    }
