"""A blk back-end killed with SIGKILL again and again while a front-end streams writes.

The back-end is the real daemon (``vhostkit blk-backend``, the real command line, started
with ``--ready-fd``), forked from a :class:`~helpers.zygote.Zygote` that imported vhostkit once:
a daemon start costs milliseconds instead of a fresh interpreter's 0.3-0.7 s, so 100 kills
fit the default run. The front-end (:class:`helpers.blk_stream.BlkStream`) keeps up to 32
numbered writes in flight. Each daemon is killed at one of two kinds of moments, chosen at
in turn (every other kill is signalled):

* **random**: after a random number of completions, then a random delay after a kick, so
  that the kill lands while the daemon is idle, in the middle of a batch or in its own
  recovery;
* **signalled**: the daemon itself says when its ring has popped a random number of chains
  (``pause_after``: its worker writes a byte to a probe pipe and holds the chains it just
  took). The kill lands with requests in flight, by construction: the next daemon must
  resubmit them from the inflight area, and the test checks that it said so.

The front-end's next request must fail with a typed :class:`~vhostkit.errors.TransportError`;
it closes that connection, starts a new daemon on the same socket path and image, hands it
the inflight area and goes on. At the end every request has completed exactly once with
status OK, every block on the image holds what was written to it, and the test process holds
no fd it did not hold before.

:data:`KILLS` kills run by default; ``VHOSTKIT_LONG=1`` runs :data:`LONG_KILLS`.
``VHOSTKIT_SEED=N`` repeats the moments of a failed run.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.blk_stream import SECTOR, WINDOW, BlkStream
from helpers.zygote import ForkedDaemon, Zygote

from vhostkit.errors import TransportError
from vhostkit.user import Frontend

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: daemon kills in the default run
KILLS = 100
#: daemon kills with VHOSTKIT_LONG=1
LONG_KILLS = 1000
N = LONG_KILLS if LONG else KILLS
#: requests per kill, on average
PER_KILL = 12
#: every SIGNALLED-th kill is at a moment the daemon signals (requests in flight)
SIGNALLED = 2


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    with Zygote() as z:
        yield z


def start_daemon(
    zygote: Zygote, sock: Path, image: Path, pause_after: int | None = None
) -> ForkedDaemon:
    d = zygote.daemon(
        ["blk-backend", "--socket", str(sock), "--image", str(image)], pause_after=pause_after
    )
    try:
        d.wait_ready()
    except BaseException:
        d.__exit__()
        raise
    return d


def test_blk_backend_killed_mid_stream_every_request_completes_once(
    zygote, fd_check, sock_dir, tmp_path
) -> None:
    rng = random.Random(int(os.environ.get("VHOSTKIT_SEED", "0")) or None)
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    # room for every kill's requests: a quiet daemon completes the whole window (32) before
    # a random kill lands, so a kill can take up to 2 * PER_KILL + WINDOW of them
    total = N * (PER_KILL + 2 * WINDOW)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(total * SECTOR))
    sock = sock_dir / "blk.sock"
    stream = BlkStream(total)
    errors: list[str] = []
    signalled = 0
    #: per signalled kill: did the next daemon resubmit what the killed one held?
    missed: list[int] = []
    resubmitted = 0
    expect_resubmit = False
    try:
        for kill in range(N + 1):
            pause = None
            if kill < N and kill % SIGNALLED == 0:
                pause = rng.randrange(1, 2 * PER_KILL + 1)
                if total - stream.completed < pause + WINDOW:
                    pause = None  # too few requests left to reach it
            with start_daemon(zygote, sock, image, pause) as daemon:
                with Frontend.connect(sock, timeout=5) as fe:
                    stream.attach(fe)  # the ring starts: a new daemon resubmits here
                    said = daemon.output().count("resubmitting")
                    resubmitted += bool(said)
                    if expect_resubmit and not said:
                        missed.append(kill - 1)
                    if kill == N:  # the last daemon finishes the stream
                        stream.run(total)
                        break
                    if pause is not None:
                        stream.run_until(daemon.probe)  # the daemon holds popped chains
                    else:
                        stream.run(rng.randrange(PER_KILL * 2 + 1))
                        stream.fill()
                        time.sleep(rng.uniform(0, 0.004))  # a random moment, not a sync
                    daemon.proc.send_signal(signal.SIGKILL)
                    daemon.proc.wait()
                    with pytest.raises(TransportError) as err:
                        fe.get_vring_base(0)
                    errors.append(type(err.value).__name__)
                stream.reap()  # what the daemon completed before it died
                daemon.wait()
            signalled += pause is not None
            expect_resubmit = pause is not None
        assert stream.finished
        stream.check(image)
    except BaseException:
        sys.stderr.write(f"seed {seed} (VHOSTKIT_SEED={seed} repeats it)\n")
        raise
    finally:
        stream.close()
    assert len(errors) == N
    sys.stderr.write(
        f"{N} kills ({signalled} signalled), {total} requests, {resubmitted} daemons resubmitted\n"
    )
    # a known share of the kills landed with requests in flight, and each of those was
    # followed by a daemon that resubmitted them (the stream's check: each exactly once)
    assert signalled == N // SIGNALLED, f"only {signalled} of {N} kills were signalled"
    assert not missed, f"kills with requests in flight whose next daemon resubmitted none: {missed}"
    assert resubmitted >= signalled
