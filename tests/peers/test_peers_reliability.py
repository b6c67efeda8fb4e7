"""Real peer processes SIGKILLed at random moments: the vhostkit side left gets a typed error
or simply the next connection, releases every fd and mapping, and the next connection works.

Pairings (each kill is a real process of the peer, at a random moment of its session):

* DPDK testpmd (virtio_user front-end, ``txonly``: it streams frames) against the real
  ``python3 -m vhostkit net-backend`` daemon on a tap of its own;
* QEMU (``vhost-user-blk-pci``, no guest kernel: SeaBIOS sets the device up and reads the disk
  through the ring) against the real ``python3 -m vhostkit blk-backend`` daemon;
* qemu-storage-daemon (back-end) under vhostkit's :class:`Frontend` and
  :class:`~vhostkit.guest.blk.BlkDriver` streaming writes: the next request raises a typed
  :class:`~vhostkit.errors.TransportError`, the test process keeps no fd, a new
  qemu-storage-daemon on the same socket path serves the next connection.

The moments of the testpmd and QEMU kills come from the real protocol as well as from random
delays: the daemon runs with ``--log-level debug`` and logs every message it receives; the
test reads that log as it comes (:meth:`~helpers.cli_run.Daemon.wait_count`) and, for half
of the kills, kills the peer right after the daemon received message ``k`` of the session
(``k`` uniform over the messages of a whole set-up, counted in a first session); the other
half land at a random delay once the peer runs (testpmd forwarding frames into the daemon,
QEMU's firmware reading the disk or idling after it). Each peer starts in 0.1-0.2 s here
(testpmd with 64 MiB and 2048 mbufs instead of 512 MiB; QEMU without QMP and with 32 MiB),
so :data:`KILLS` (100) of each fit the default run; ``VHOSTKIT_LONG=1`` runs
:data:`LONG_KILLS`.

For the daemons the test reads ``/proc/PID`` before the first and after the last kill: the
same fds, memfd mappings and threads, no traceback in the log, and a good front-end after.
The vhostkit-to-vhostkit pairings are in tests/unit/test_reliability_vanish.py and
test_reliability_restart.py.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.cli_run import Daemon
from helpers.vhostkit_daemon import (
    assert_clean_output,
    daemon_held,
    daemon_settled,
    good_connection,
)

from vhostkit.errors import TransportError
from vhostkit.guest.blk import BlkDriver
from vhostkit.testing.peers import QemuStorageDaemon, QemuVirtioNet, Testpmd, which_or_skip
from vhostkit.testing.peers.process import PeerProcess
from vhostkit.user import Frontend

pytestmark = [pytest.mark.peer, pytest.mark.reliability]

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
KILLS = 100
LONG_KILLS = 1000
N = LONG_KILLS if LONG else KILLS
#: qemu-storage-daemon starts in a few milliseconds
QSD_KILLS = 1000 if LONG else 100
#: a message the daemon received, as it logs it at debug level
RECEIVED = r"vhostkit\.user\.connection: received "
#: the longest random delay after a peer runs (testpmd forwards, QEMU's firmware is done
#: with the disk within about 0.1 s of the start)
DELAY = 0.25


def sigkill(peer: PeerProcess) -> None:
    """SIGKILL a peer process and reap it (its launcher then only cleans up)."""
    assert peer.proc is not None and peer.proc.poll() is None, "the peer died before the kill"
    peer.proc.send_signal(signal.SIGKILL)
    peer.proc.wait()


def kill_at_random_moments(
    daemon: Daemon, make_peer: Callable[[bool], PeerProcess], rng: random.Random
) -> tuple[int, list[int], list[float]]:
    """Start the peer N times and kill it: after message ``k`` or after a random delay.

    ``make_peer(wait)`` builds a peer that, started, returns at once (``wait=False``) or once
    it runs (``wait=True``). Returns the messages of one whole set-up, the ``k`` of the
    protocol kills and each peer's start time (to the first message the daemon got).
    """
    base = daemon.count(RECEIVED)
    with make_peer(True):  # one session: how many messages its set-up sends (not its stop)
        messages = daemon.count(RECEIVED) - base
    assert messages > 10, daemon.output()[-3000:]
    moments: list[int] = []
    starts: list[float] = []
    for kill in range(N):
        base = daemon.count(RECEIVED)
        t0 = time.monotonic()
        if kill % 2 == 0:  # a moment of the protocol
            k = rng.randrange(1, messages + 1)
            with make_peer(False) as peer:
                daemon.wait_count(RECEIVED, base + 1)
                starts.append(time.monotonic() - t0)
                daemon.wait_count(RECEIVED, base + k)
                sigkill(peer)
            moments.append(k)
        else:  # a random moment once it runs
            with make_peer(True) as peer:
                starts.append(time.monotonic() - t0)
                time.sleep(rng.uniform(0, DELAY))  # a random moment, not a synchronisation
                sigkill(peer)
    return messages, moments, starts


def report(name: str, messages: int, moments: list[int], starts: list[float]) -> None:
    starts = sorted(starts)
    sys.stderr.write(
        f"{name}: {N} kills, {len(moments)} after message k of {messages} "
        f"(k from {min(moments)} to {max(moments)}, {len(set(moments))} distinct); start "
        f"median {starts[len(starts) // 2]:.3f} s, max {starts[-1]:.3f} s\n"
    )


def test_testpmd_killed_while_streaming_into_the_net_daemon(fd_check, sock_dir) -> None:
    which_or_skip("dpdk-testpmd")
    rng = random.Random()
    sock = sock_dir / "net.sock"
    argv = ["-m", "vhostkit", "net-backend", "--socket", str(sock), "--tap", "vhkr%d"]

    def testpmd(wait: bool) -> Testpmd:
        kwargs: dict[str, object] = {} if wait else {"ready_pattern": r"EAL|testpmd"}
        return Testpmd.virtio_user_frontend(
            sock, forward_mode="txonly", memory_mb=64, total_num_mbufs=2048, **kwargs
        )

    with Daemon([*argv, "--log-level", "debug"], watch=True) as daemon:
        daemon.wait_ready()
        with testpmd(True):
            pass  # warm: the first connection's one-time allocations
        baseline = daemon_held(daemon)
        messages, moments, starts = kill_at_random_moments(daemon, testpmd, rng)
        held = daemon_settled(daemon, baseline)
        assert held.within(baseline), f"after {N} testpmd kills: {held} > {baseline}"
        with testpmd(True) as pmd:  # ready means the device was set up and testpmd forwards
            assert pmd.port_stats().tx_packets > 0
        rc, output = daemon.stop()
    assert rc == 0, output[-3000:]
    assert_clean_output(output)
    report("testpmd", messages, moments, starts)


def test_qemu_killed_while_it_sets_up_and_reads_the_blk_daemon(
    fd_check, sock_dir, tmp_path
) -> None:
    which_or_skip("qemu-system-x86_64")
    rng = random.Random()
    sock = sock_dir / "blk.sock"
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    argv = ["-m", "vhostkit", "blk-backend", "--socket", str(sock), "--image", str(image)]

    def qemu(wait: bool) -> QemuVirtioNet:
        # no QMP: QEMU is "ready" at once, it connects to the daemon within ~30 ms
        peer = QemuVirtioNet(sock, device="vhost-user-blk-pci", memory_mb=32, qmp_path=False)
        if wait:
            peer._wait_ready = lambda: daemon.wait_count(  # type: ignore[method-assign]
                r"received SET_VRING_KICK", daemon.count(r"received SET_VRING_KICK") + 1
            )
        return peer

    with Daemon([*argv, "--log-level", "debug"], watch=True) as daemon:
        daemon.wait_ready()
        good_connection(Path(sock))
        baseline = daemon_held(daemon)
        messages, moments, starts = kill_at_random_moments(daemon, qemu, rng)
        held = daemon_settled(daemon, baseline)
        assert held.within(baseline), f"after {N} QEMU kills: {held} > {baseline}"
        good_connection(Path(sock))
        rc, output = daemon.stop()
    assert rc == 0, output[-3000:]
    assert_clean_output(output)
    report("QEMU", messages, moments, starts)


def test_qemu_storage_daemon_killed_under_a_streaming_front_end(
    fd_check, sock_dir, tmp_path
) -> None:
    which_or_skip("qemu-storage-daemon")
    rng = random.Random()
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    sock = sock_dir / "qsd.sock"
    errors: set[str] = set()
    for kill in range(QSD_KILLS + 1):
        with (
            QemuStorageDaemon(image, sock, pidfile=tmp_path / "qsd.pid") as qsd,
            Frontend.connect(sock, timeout=5) as fe,
        ):
            drv = BlkDriver(fe)
            try:
                drv.start()
                if kill > 0:  # what the previous connection wrote before its peer died
                    assert drv.read(kill - 1, 512).data == bytes([kill]) * 512
                if kill == QSD_KILLS:
                    break
                for _ in range(rng.randrange(1, 16)):
                    assert drv.write(kill, bytes([kill + 1]) * 512).status == 0
                for _ in range(rng.randrange(4)):
                    drv.submit([b"\0" * 16], [4096, 1])  # reads in flight at the kill
                time.sleep(rng.uniform(0, 0.005))  # a random moment
                sigkill(qsd)
                with pytest.raises(TransportError) as err:
                    fe.get_features()
                errors.add(type(err.value).__name__)
            finally:
                drv.close()
    assert errors <= {"Disconnected", "PartialMessage", "SocketBroken"}, errors
