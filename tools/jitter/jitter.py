"""pytest plugin for hunting test races: random small delays around cross-thread hand-offs.

A test that asserts on state another thread (or process) produces must wait for exactly that
state; one that waits for something else (a signal that may be stale, a log line printed
before the file is written) passes almost always and fails in CI one run in a hundred. This
plugin widens those windows so that such tests fail often. It is a hunting tool, not part of
the suite: it patches private vhostkit methods, and CI never loads it.

Load, from a checkout (``PYTHONPATH`` first, so that subprocesses import this checkout too)::

    PYTHONPATH=$PWD:$PWD/tools/jitter JITTER_MODE=both JITTER_P=0.5 \
        python3 -m pytest -p jitter tests --ignore=tests/kernel

Env:
  JITTER_MODE   worker (default) | main | both | off
                worker: delay in non-main threads before/after the calls that make state
                        visible to another thread (eventfd_write, os.write, socket send*,
                        Event.set, Condition.notify*, vhostkit complete/publish/signal)
                main:   delay in the main thread right after waits return (select, poll,
                        eventfd_read, os.read, recv*, Event.wait, Condition.wait, join)
  JITTER_P      probability of a delay at each point (default 0.3)
  JITTER_MS     max delay in ms (default 3)
  JITTER_SEED   RNG seed (default: random; printed in the header)
  JITTER_SUBPROC=1  also install in Python subprocesses (via sitecustomize.py next to this file)
"""

from __future__ import annotations

import functools
import os
import random
import select
import socket
import threading
import time

_real_sleep = time.sleep
_main_ident = threading.main_thread().ident
_installed = False
STATS: dict[str, int] = {}

MODE = os.environ.get("JITTER_MODE", "worker")
P = float(os.environ.get("JITTER_P", "0.3"))
MAX = float(os.environ.get("JITTER_MS", "3")) / 1000.0
SEED = int(os.environ.get("JITTER_SEED", str(random.SystemRandom().randrange(1 << 30))))
_rng = random.Random(SEED)
_rng_lock = threading.Lock()


def _delay(tag: str) -> None:
    with _rng_lock:
        if _rng.random() >= P:
            return
        d = _rng.random() * MAX
    STATS[tag] = STATS.get(tag, 0) + 1
    _real_sleep(d)


def _in_worker() -> bool:
    # get_ident, not current_thread(): Thread._bootstrap_inner sets _started before the
    # thread is registered, and current_thread() would then build a _DummyThread (recursion)
    return threading.get_ident() != _main_ident


def _worker_wrap(fn, tag, before=True, after=True):
    @functools.wraps(fn)
    def w(*a, **k):
        if _in_worker():
            if before:
                _delay(tag)
            r = fn(*a, **k)
            if after:
                _delay(tag)
            return r
        return fn(*a, **k)

    return w


def _main_after_wrap(fn, tag):
    @functools.wraps(fn)
    def w(*a, **k):
        r = fn(*a, **k)
        if not _in_worker():
            _delay(tag)
        return r

    return w


class _PollWrap:
    def __init__(self, p):
        self._p = p

    def poll(self, *a):
        r = self._p.poll(*a)
        if not _in_worker():
            _delay("main:poll")
        return r

    def __getattr__(self, n):
        return getattr(self._p, n)


def install() -> None:
    global _installed
    if _installed or MODE == "off":
        return
    _installed = True
    worker = MODE in ("worker", "both")
    main = MODE in ("main", "both")
    if worker:
        os.eventfd_write = _worker_wrap(os.eventfd_write, "eventfd_write")
        os.write = _worker_wrap(os.write, "os.write")
        for name in ("send", "sendall", "sendmsg", "sendto"):
            setattr(socket.socket, name, _worker_wrap(getattr(socket.socket, name), "sock." + name))
        threading.Event.set = _worker_wrap(threading.Event.set, "Event.set")
        threading.Condition.notify = _worker_wrap(threading.Condition.notify, "Cond.notify")
        threading.Condition.notify_all = _worker_wrap(
            threading.Condition.notify_all, "Cond.notify_all"
        )
        _patch_vhostkit()
    if main:
        select.select = _main_after_wrap(select.select, "main:select")
        _poll = select.poll
        select.poll = lambda: _PollWrap(_poll())
        os.eventfd_read = _main_after_wrap(os.eventfd_read, "main:eventfd_read")
        os.read = _main_after_wrap(os.read, "main:os.read")
        for name in ("recv", "recvmsg", "recv_into", "recvfrom"):
            setattr(
                socket.socket, name, _main_after_wrap(getattr(socket.socket, name), "main:" + name)
            )
        threading.Event.wait = _main_after_wrap(threading.Event.wait, "main:Event.wait")
        threading.Condition.wait = _main_after_wrap(threading.Condition.wait, "main:Cond.wait")
        threading.Condition.wait_for = _main_after_wrap(
            threading.Condition.wait_for, "main:Cond.wait_for"
        )
        threading.Thread.join = _main_after_wrap(threading.Thread.join, "main:join")
        _patch_vhostkit_main()


def _patch_vhostkit() -> None:
    try:
        from vhostkit.user.backend import ring_device as daemon
        from vhostkit.virtio import packed, split
    except ImportError:
        return
    # delay between the used ring update and the signal / bookkeeping that follows it
    for cls in (split.SplitDeviceQueue, packed.PackedDeviceQueue):
        cls.complete = _worker_wrap(cls.complete, "dev.complete")
        cls.enable_notifications = _worker_wrap(cls.enable_notifications, "dev.enable_notif")
    for cls in (split.SplitDriverQueue, packed.PackedDriverQueue):
        cls.publish = _worker_wrap(cls.publish, "drv.publish")
    daemon.ActiveRing.signal = _worker_wrap(daemon.ActiveRing.signal, "ring.signal")
    daemon.ActiveRing.complete = _worker_wrap(daemon.ActiveRing.complete, "ring.complete")
    if hasattr(daemon.RingDevice, "notify_waiters"):
        daemon.RingDevice.notify_waiters = _worker_wrap(
            daemon.RingDevice.notify_waiters, "notify_waiters"
        )


def _patch_vhostkit_main() -> None:
    """Delay the driver (main thread) between reading the used index and what it does next
    (reap writes used_event after it: the lost-interrupt window of a reap-then-wait loop)."""
    try:
        from vhostkit.virtio import packed, split
    except ImportError:
        return
    split.SplitDriverQueue.pending_used = _main_after_wrap(
        split.SplitDriverQueue.pending_used, "main:pending_used"
    )
    packed.PackedDriverQueue._used_at_head = _main_after_wrap(
        packed.PackedDriverQueue._used_at_head, "main:used_at_head"
    )


# -- pytest hooks --


def pytest_configure(config):
    install()


def pytest_report_header(config):
    return f"jitter: mode={MODE} p={P} max={MAX * 1000:.1f}ms seed={SEED}"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"jitter seed={SEED} mode={MODE} delays: "
        + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
    )
