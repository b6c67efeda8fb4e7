"""The real vhostkit daemons for the reliability tests: started with ``--ready-fd``, inspected
through ``/proc`` (:mod:`helpers.proc_usage`), driven by a well-behaved front-end at the end."""

from __future__ import annotations

from pathlib import Path

from helpers.cli_run import Daemon
from helpers.proc_usage import Held, held, settled

from vhostkit.guest.blk import BlkDriver
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
