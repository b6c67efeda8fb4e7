"""One benchmark figure (:class:`Row`), the dict form benchmark modules hand back, and
:class:`Skipped`, which a module raises when it cannot run on this machine."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vhostkit.errors import InvalidParam

__all__ = ["REQUIRED_KEYS", "Row", "Skipped", "make_row"]

#: The keys every dict from a module's ``run(quick)`` has, and their types.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "bench": str,
    "figure": str,
    "value": (int, float),
    "unit": str,
    "reference": str,
    "reference_value": (int, float),
    "ratio": (int, float),
    "aim": (str, type(None)),
}


class Skipped(Exception):
    """Raised by a benchmark module that cannot run here; the message says why."""


@dataclass(frozen=True, slots=True)
class Row:
    """One figure: ``value`` beside its ``reference_value`` measured in the same run.

    ``ratio`` is ``value / reference_value``; ``aim`` what the ratio or the value should be
    (``None``: no aim); ``others_cpu`` the per cent of one CPU that processes outside the
    benchmark's process tree took while it ran (``None``: not measured).
    """

    bench: str
    figure: str
    value: float
    unit: str
    reference: str
    reference_value: float
    ratio: float
    aim: str | None = None
    note: str = ""
    others_cpu: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        """A row from a module's dict; a missing key or a wrong type is
        :class:`~vhostkit.errors.InvalidParam`."""
        if not isinstance(data, Mapping):
            raise InvalidParam(f"a benchmark row must be a dict, not {type(data).__name__}")
        for key, kind in REQUIRED_KEYS.items():
            if key not in data:
                raise InvalidParam(f"benchmark row {dict(data)!r} has no {key!r}")
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvalidParam(
                    f"benchmark row key {key!r} is {type(value).__name__}: {value!r}"
                )
        note = data.get("note", "")
        if not isinstance(note, str):
            raise InvalidParam(f"benchmark row note is {type(note).__name__}, not str")
        others = data.get("others_cpu")
        if others is not None and (not isinstance(others, int | float) or isinstance(others, bool)):
            raise InvalidParam(f"benchmark row others_cpu is {others!r}, not a number")
        return cls(
            bench=data["bench"],
            figure=data["figure"],
            value=float(data["value"]),
            unit=data["unit"],
            reference=data["reference"],
            reference_value=float(data["reference_value"]),
            ratio=float(data["ratio"]),
            aim=data["aim"],
            note=note,
            others_cpu=None if others is None else float(others),
        )

    def to_dict(self) -> dict[str, Any]:
        """The module-contract dict (with ``others_cpu``); NaN and infinities become None."""

        def clean(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "bench": self.bench,
            "figure": self.figure,
            "value": clean(self.value),
            "unit": self.unit,
            "reference": self.reference,
            "reference_value": clean(self.reference_value),
            "ratio": clean(self.ratio),
            "aim": self.aim,
            "note": self.note,
            "others_cpu": clean(self.others_cpu),
        }


def make_row(
    bench: str,
    figure: str,
    value: float,
    unit: str,
    reference: str,
    reference_value: float,
    aim: str | None = None,
    note: str = "",
    others_cpu: float | None = None,
) -> dict[str, Any]:
    """A module-contract dict, the ratio computed (NaN when the reference is 0)."""
    ratio = value / reference_value if reference_value else math.nan
    row: dict[str, Any] = {
        "bench": bench,
        "figure": figure,
        "value": float(value),
        "unit": unit,
        "reference": reference,
        "reference_value": float(reference_value),
        "ratio": ratio,
        "aim": aim,
    }
    if note:
        row["note"] = note
    if others_cpu is not None:
        row["others_cpu"] = float(others_cpu)
    return row
