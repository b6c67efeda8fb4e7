"""What a process holds, read from ``/proc/PID``: open fds, memfd mappings, threads, RSS.

The reliability tests compare a daemon's holdings before and after many connections, kills of
its peers or memory-table changes (:func:`held`, :func:`settled`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

#: how long :func:`settled` waits for a process to release what it held
SETTLE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Held:
    """What a process holds right now."""

    fds: int
    memfd_maps: int
    threads: int
    rss_kb: int

    def within(self, other: Held) -> bool:
        """No more fds, memfd mappings or threads than ``other``."""
        return (
            self.fds <= other.fds
            and self.memfd_maps <= other.memfd_maps
            and self.threads <= other.threads
        )


def held(pid: int) -> Held:
    """Read ``/proc/PID/fd``, ``/proc/PID/maps`` and ``/proc/PID/status``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        memfd_maps = sum("/memfd:" in line for line in f)
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return Held(fds, memfd_maps, int(status["Threads"]), int(status["VmRSS"].split()[0]))


def settled(pid: int, baseline: Held, timeout: float = SETTLE_TIMEOUT) -> Held:
    """Wait until ``pid`` holds no more than ``baseline``; return what it holds then.

    A thread's exit or an unmap in another process sends no event this process could wait on,
    so /proc is read again every 20 ms until the deadline; a leak never settles and the
    caller's assertion shows it.
    """
    deadline = time.monotonic() + timeout
    while True:
        now = held(pid)
        if now.within(baseline) or time.monotonic() >= deadline:
            return now
        time.sleep(0.02)
