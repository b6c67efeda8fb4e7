"""Real peer processes SIGKILLed at random moments: the vhostkit side left gets a typed error
or simply the next connection, releases every fd and mapping, and the next connection works.

Pairings (each kill is a real process of the peer, at a random moment of its session):

* DPDK testpmd (virtio_user front-end, ``txonly``: it streams frames) against the real
  ``python3 -m vhostkit net-backend`` daemon on a tap of its own;
* QEMU (``vhost-user-blk-pci``, SeaBIOS reads the disk through the ring at boot) against the
  real ``python3 -m vhostkit blk-backend`` daemon;
* qemu-storage-daemon (back-end) under vhostkit's :class:`Frontend` and
  :class:`~vhostkit.guest.blk.BlkDriver` streaming writes: the next request raises a typed
  :class:`~vhostkit.errors.TransportError`, the test process keeps no fd, a new
  qemu-storage-daemon on the same socket path serves the next connection.

For the daemons the test reads ``/proc/PID`` before the first and after the last kill: the
same fds, memfd mappings and threads, no traceback in the log, and a good front-end after.

testpmd and QEMU cost one to two seconds per start (testpmd's EAL, QEMU's firmware), so the
default run kills each :data:`KILLS` times and ``VHOSTKIT_LONG=1`` :data:`LONG_KILLS` times;
qemu-storage-daemon starts in milliseconds and is killed :data:`QSD_KILLS` (100) times by
default. The vhostkit-to-vhostkit pairings are in tests/unit/test_reliability_vanish.py and
test_reliability_restart.py.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers.cli_run import Daemon
from helpers.vhostkit_daemon import (
    assert_clean_output,
    daemon_held,
    daemon_settled,
    good_connection,
    start_blk_daemon,
)

from vhostkit.errors import TransportError
from vhostkit.guest.blk import BlkDriver
from vhostkit.testing.peers import QemuStorageDaemon, QemuVirtioNet, Testpmd, which_or_skip
from vhostkit.user import Frontend

pytestmark = [pytest.mark.peer, pytest.mark.reliability]

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
KILLS = 5
LONG_KILLS = 100
N = LONG_KILLS if LONG else KILLS
#: qemu-storage-daemon starts in a few milliseconds: 100 kills fit the default run
QSD_KILLS = 1000 if LONG else 100


def sigkill(peer) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL a peer process and reap it (its launcher then only cleans up)."""
    assert peer.proc is not None and peer.proc.poll() is None, "the peer died before the kill"
    peer.proc.send_signal(signal.SIGKILL)
    peer.proc.wait()


def test_testpmd_killed_while_streaming_into_the_net_daemon(fd_check, sock_dir) -> None:
    which_or_skip("dpdk-testpmd")
    rng = random.Random()
    sock = sock_dir / "net.sock"
    argv = ["-m", "vhostkit", "net-backend", "--socket", str(sock), "--tap", "vhkr%d"]
    with Daemon(argv) as daemon:
        daemon.wait_ready()
        with Testpmd.virtio_user_frontend(sock, forward_mode="txonly"):
            pass  # warm: the first connection's one-time allocations
        baseline = daemon_held(daemon)
        for _ in range(N):
            with Testpmd.virtio_user_frontend(sock, forward_mode="txonly") as pmd:
                time.sleep(rng.uniform(0, 0.5))  # a random moment while it streams
                sigkill(pmd)
        held = daemon_settled(daemon, baseline)
        assert held.within(baseline), f"after {N} testpmd kills: {held} > {baseline}"
        with Testpmd.virtio_user_frontend(sock, forward_mode="txonly"):
            pass  # ready means the device was set up and testpmd forwards
        rc, output = daemon.stop()
    assert rc == 0, output[-3000:]
    assert_clean_output(output)


def test_qemu_killed_while_it_boots_from_the_blk_daemon(fd_check, sock_dir, tmp_path) -> None:
    which_or_skip("qemu-system-x86_64")
    rng = random.Random()
    sock = sock_dir / "blk.sock"
    with start_blk_daemon(sock, tmp_path / "disk.img") as daemon:
        good_connection(sock)
        baseline = daemon_held(daemon)
        for _ in range(N):
            with QemuVirtioNet(sock, device="vhost-user-blk-pci") as qemu:
                time.sleep(rng.uniform(0, 2.5))  # SeaBIOS drives the disk within ~2 s
                sigkill(qemu)
        held = daemon_settled(daemon, baseline)
        assert held.within(baseline), f"after {N} QEMU kills: {held} > {baseline}"
        good_connection(sock)
        rc, output = daemon.stop()
    assert rc == 0, output[-3000:]
    assert_clean_output(output)


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
