"""What goes wrong with a lab: a broken lab file, a host that cannot run it, a failed set-up."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LabError", "LabFileError", "LabIssue", "LabSetupError"]


@dataclass(frozen=True, slots=True)
class LabIssue:
    """One mistake in a lab file: where it is (``line`` may be unknown) and what would be right."""

    path: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class LabError(Exception):
    """Base class of the errors a lab raises on purpose."""


class LabFileError(LabError):
    """The lab file is not a valid lab: every mistake found, each with its line."""

    def __init__(self, issues: list[LabIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class LabSetupError(LabError):
    """The host cannot build what the lab describes (a missing binary, device or permission).

    ``hint`` says how to fix it, e.g. the Debian package that provides a missing binary.
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)
