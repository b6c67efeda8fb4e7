"""What benchmark modules share: the CPU other processes take during a window, medians,
interleaved repetitions, and a vhost-user back-end daemon in a process of its own."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from vhostkit.errors import DeviceUnavailable

__all__ = [
    "OthersLoad",
    "daemon",
    "interleaved",
    "median",
    "process_cpu",
    "process_tree",
    "tmpfs_dir",
]

T = TypeVar("T")

_HZ = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and every live process below it (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))  # field 4: ppid
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


class OthersLoad:
    """CPU taken over a window by processes outside this process's tree, in per cent of one
    CPU: ``start()`` ... ``stop()`` (also a context manager; then read :attr:`percent`).

    The machine's busy time comes from ``/proc/stat``; the tree's from ``/proc/PID/stat``
    (user, system, and the children it reaped), so a child that starts or ends inside the
    window is still counted as ours.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = os.getpid() if root is None else root
        self.percent = 0.0
        self._t0 = self._busy0 = self._ours0 = 0.0

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / _HZ

    def _ours(self) -> float:
        total = 0
        for pid in process_tree(self.root):
            fields = _stat_fields(pid)
            if fields is not None:  # utime stime cutime cstime
                total += sum(int(x) for x in fields[11:15])
        return total / _HZ

    def start(self) -> OthersLoad:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def stop(self) -> float:
        """The per cent of one CPU others took since :meth:`start` (also :attr:`percent`)."""
        wall = time.monotonic() - self._t0
        others = (self._busy() - self._busy0) - (self._ours() - self._ours0)
        self.percent = max(0.0, 100 * others / wall) if wall > 0 else 0.0
        return self.percent

    def __enter__(self) -> OthersLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` used so far; 0 when gone."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _HZ


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(fns: Sequence[Callable[[], T]], reps: int) -> list[list[T]]:
    """Call each of ``fns`` in turn, A B A B ..., ``reps`` times; the results per function.
    Interleaving keeps a drift in the machine's speed from favouring one side."""
    out: list[list[T]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            out[i].append(fn())
    return out


@contextlib.contextmanager
def daemon(
    device: str,
    socket: str | os.PathLike[str],
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python3 -m vhostkit backend DEVICE --socket SOCKET ARGS`` as users run it, until it
    says READY on its ``--ready-fd``; stopped with SIGTERM on leaving. ``env``: its whole
    environment (default this process's)."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "vhostkit", "backend", device, "--socket", os.fspath(socket)]
    argv += [*args, "--ready-fd", str(w), "--log-level", "warning"]
    # its banner on stdout would land in the middle of a --json document
    proc = subprocess.Popen(
        argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            got = ready.read()  # READY=1, then the daemon closes it; EOF if it died
        if got != b"READY=1\n":
            raise DeviceUnavailable(f"vhostkit backend {device} did not start: {' '.join(argv)}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tmpfs_dir() -> Path:
    """A tmpfs directory for images (``/dev/shm`` when it is one, else ``/tmp``)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/tmp")
