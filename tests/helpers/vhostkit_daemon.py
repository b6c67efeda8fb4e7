"""The real vhostkit daemons for the reliability tests: started with ``--ready-fd``, inspected
through ``/proc`` (:mod:`helpers.proc_usage`), driven by a well-behaved front-end at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.cli_run import Daemon
from helpers.proc_usage import Held, held, settled

from vhostkit.guest.blk import BlkDriver
from vhostkit.kernel import Tap
from vhostkit.user import Frontend


def start_blk_daemon(sock: Path, image: Path, *args: str) -> Daemon:
    """``python3 -m vhostkit blk-backend`` on ``image`` (created, 4 MiB, if missing)."""
    if not image.exists():
        with image.open("wb") as f:
            f.truncate(4 << 20)
    d = Daemon(
        ["-m", "vhostkit", "blk-backend", "--socket", str(sock), "--image", str(image), *args]
    )
    try:
        d.wait_ready()
    except BaseException:
        d.__exit__()
        raise
    return d


@contextmanager
def persistent_tap(name: str) -> Iterator[str]:
    """A persistent tap ``name``, up, with no IPv6 chatter (each daemon opens it by name);
    yields its name and deletes it afterwards."""
    with Tap(name) as t:
        t.set_persist(True)
        t.disable_ipv6()
        t.up()
        name = t.name
    try:
        yield name
    finally:
        with Tap(name) as t:
            t.set_persist(False)


def start_net_daemon(sock: Path, tap: str) -> subprocess.Popen[bytes]:
    """``python3 -m vhostkit backend net`` on the tap ``tap``, returned once it is ready."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
    r, w = os.pipe()
    proc = subprocess.Popen([*argv, "--tap", tap, "--ready-fd", str(w)], env=env, pass_fds=(w,))
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        assert ready.read() == b"READY=1\n"
    return proc


def daemon_held(d: Daemon) -> Held:
    return held(d.pid)


def daemon_settled(d: Daemon, baseline: Held) -> Held:
    return settled(d.pid, baseline)


def good_connection(sock: Path, queues: int = 1) -> None:
    """A well-behaved front-end: full set-up, a write and a read-back on every ring, stop."""
    with Frontend.connect(sock, timeout=5) as fe:
        drv = BlkDriver(fe, num_queues=queues)
        try:
            drv.start()
            for q in range(queues):
                data = bytes([q + 1]) * 512
                assert drv.write(q, data, queue=q).status == 0
                assert drv.read(q, 512, queue=q).data == data
            for q in range(queues):
                fe.get_vring_base(q)
        finally:
            drv.close()


def assert_clean_output(output: str) -> None:
    """No traceback and no unexpected failure in a daemon's output."""
    assert "Traceback" not in output, output[-6000:]
    assert "connection failed" not in output, output[-6000:]
