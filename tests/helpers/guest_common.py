"""What the guest-side scripts of the real-guest tests share (they run INSIDE the kernel VM;
their own directory is first on ``sys.path``, so they import this as ``guest_common``)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

_emit_lock = threading.Lock()


def emit(step: str, **fields: object) -> None:
    """Print one JSON line ``{"step": step, ...}`` (whole, also from several threads)."""
    with _emit_lock:
        print(json.dumps({"step": step, **fields}), flush=True)


def find_by_driver(sys_dir: str, driver: str) -> str:
    """The name of the first entry of ``sys_dir`` (``/sys/class/net``, ``/sys/block``) whose
    device is bound to ``driver``."""
    for entry in sorted(Path(sys_dir).iterdir()):
        link = entry / "device" / "driver"
        if link.is_symlink() and os.path.basename(os.readlink(link)) == driver:
            return entry.name
    raise SystemExit(f"no {driver} device among {os.listdir(sys_dir)}")


def pinned(jobs: list[tuple[int, Callable[[], None]]]) -> None:
    """Run every ``(cpu, fn)`` at once, each in a thread pinned to its CPU; re-raise the
    first failure once all ended."""
    errors: list[BaseException] = []

    def run_on(cpu: int, fn: Callable[[], None]) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_on, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
