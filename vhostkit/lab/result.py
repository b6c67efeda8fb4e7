"""What a lab run found: each step, each expectation, what teardown removed.

:class:`LabResult` is what :func:`vhostkit.lab.runner.run_lab` returns; it goes to JSON and back
(:meth:`LabResult.to_json`, :meth:`LabResult.from_json`), which is how a run inside the kernel
VM hands its result to the command line outside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LabResult", "Outcome", "StepResult"]

log = logging.getLogger(__name__)

#: Step kinds, planes and guest kinds this runner carries out.


@dataclass(frozen=True, slots=True)
class Outcome:
    """One expectation: what was measured against its limit."""

    step: str
    key: str
    value: float
    limit: float
    passed: bool


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step: when it ran, how long it took, what it measured (``values``)."""

    name: str
    kind: str
    started: float
    seconds: float
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class LabResult:
    """What a lab run did and found."""

    lab: str
    steps: tuple[StepResult, ...]
    outcomes: tuple[Outcome, ...]
    seconds: float
    setup_seconds: float
    removed: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    error: str = ""
    #: True when the error came while the lab was being set up (not a failed step)
    setup_failed: bool = False

    @property
    def passed(self) -> bool:
        """Every expectation held, every step ran, nothing was left behind."""
        return (
            not self.error
            and not self.leftovers
            and all(o.passed for o in self.outcomes)
            and not any(s.error for s in self.steps)
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabResult:
        """The result :meth:`to_json` wrote (e.g. by a run inside the kernel VM)."""
        return cls(
            lab=data["lab"],
            steps=tuple(
                StepResult(s["name"], s["do"], s["started"], s["seconds"], s["values"], s["error"])
                for s in data["steps"]
            ),
            outcomes=tuple(
                Outcome(o["step"], o["key"], o["value"], o["limit"], o["passed"])
                for o in data["expectations"]
            ),
            seconds=data["seconds"],
            setup_seconds=data["setup_seconds"],
            removed=tuple(data["removed"]),
            leftovers=tuple(data["leftovers"]),
            error=data["error"],
            setup_failed=data["setup_failed"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "passed": self.passed,
            "error": self.error,
            "setup_failed": self.setup_failed,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "steps": [
                {
                    "name": s.name,
                    "do": s.kind,
                    "started": round(s.started, 3),
                    "seconds": round(s.seconds, 3),
                    "values": s.values,
                    "error": s.error,
                }
                for s in self.steps
            ],
            "expectations": [
                {
                    "step": o.step,
                    "key": o.key,
                    "value": o.value,
                    "limit": o.limit,
                    "passed": o.passed,
                }
                for o in self.outcomes
            ],
            "removed": list(self.removed),
            "leftovers": list(self.leftovers),
        }
