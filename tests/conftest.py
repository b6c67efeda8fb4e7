"""Shared fixtures: fd-leak checks and scratch socket directories."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def open_fds() -> set[int]:
    """The fds this process has open right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


class FdLeakCheck:
    """Snapshot the open fds; :meth:`check` fails if any new fd is still open."""

    def __init__(self) -> None:
        gc.collect()
        self.before = open_fds()

    def leaked(self) -> set[int]:
        gc.collect()
        now = open_fds()
        # /proc/self/fd listing itself opens an fd that is gone by the time we look at it.
        return {fd for fd in now - self.before if _is_real(fd)}

    def check(self) -> None:
        leaked = self.leaked()
        if leaked:
            details = {fd: _describe(fd) for fd in sorted(leaked)}
            pytest.fail(f"leaked fds: {details}")


def _is_real(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def fd_check() -> Iterator[FdLeakCheck]:
    """Fails the test if it leaves fds open (checked after the test's own teardown)."""
    check = FdLeakCheck()
    yield check
    check.check()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short scratch directory for Unix sockets (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vhk-", dir="/tmp") as d:
        yield Path(d)
