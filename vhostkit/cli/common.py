"""What the ``vhostkit`` command modules share: option types, ``--json``, errors, exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from vhostkit.errors import InvalidParam, SocketInUse, SocketPathTaken, VhostError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "add_json_option",
    "checked",
    "exit_code",
    "format_error",
    "non_negative_int",
    "octal_mode",
    "positive_int",
    "print_json",
]

EXIT_OK = 0
#: The command ran and failed: a device is missing, no permission, an I/O error.
EXIT_FAILURE = 1
#: The command line cannot be used as given: bad arguments (argparse's own code), or a path
#: that must not be touched (a live socket, something that is not a socket).
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Mark ``parser``'s command as one whose output is data: ``--json`` prints it as JSON.

    Read it as ``args.json`` (``False`` when not given, also when given before the command).
    """
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the result as one JSON document",
    )


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def exit_code(exc: BaseException) -> int:
    """The exit code for an error a command raised."""
    if isinstance(exc, SocketInUse | SocketPathTaken | InvalidParam):
        return EXIT_USAGE
    return EXIT_FAILURE


def format_error(exc: BaseException) -> str:
    """One line saying what went wrong (an ``OSError`` names its file)."""
    if isinstance(exc, VhostError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc) or type(exc).__name__


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def octal_mode(text: str) -> int:
    """An argparse type: permission bits in octal (``0600``, ``660``, ``0o660``)."""
    digits = text[2:] if text.lower().startswith("0o") else text
    try:
        value = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0600") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a set of permission bits (0-0777)")
    return value


def checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``convert`` so that an :class:`InvalidParam` it raises is an argparse error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except InvalidParam as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse
