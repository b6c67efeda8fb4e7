"""What the atheris harnesses share: running under atheris, and what the process holds.

Each harness defines ``one_input(data: bytes) -> None`` (raise to report a finding) and calls
:func:`run` from its ``__main__``. Without atheris installed the harnesses still import (the
test suite replays inputs through ``one_input``); :func:`run` then says how to get it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None


def instrumented() -> Any:
    """A ``with`` block whose vhostkit imports get coverage instrumentation (under atheris;
    without it, a block that does nothing). Only vhostkit: instrumenting every loaded module
    (NumPy's Python parts included) costs a minute at start-up."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["vhostkit"])


def run(one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``one_input`` with libFuzzer's arguments from the command line."""
    if atheris is None:
        sys.exit("atheris is not installed (pip install atheris)")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def fd_count() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def memfd_maps() -> int:
    """How many memfd mappings this process has."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def closed(fd: int) -> bool:
    """True when ``fd`` is not open (the harness checks fds it knows were handed over)."""
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False
