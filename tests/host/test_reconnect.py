"""A virtio-net device carries on after its vhost-user back-end is SIGKILLed and restarted.

The back-end is the real ``vhostkit backend net`` daemon on a persistent tap. The device
(:class:`~vhostkit.vmm.VirtioNetDevice`, vhostkit's driver playing the guest) sends numbered
frames through it; the daemon is killed; frames queued while it is gone wait in the ring; a new
daemon starts on the same socket and tap and :meth:`VirtioNetDevice.reconnect` hands it the
rings at the used indices. Every frame arrives exactly once, in order, and frames written into
the tap reach the device again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.vhostkit_daemon import persistent_tap, start_net_daemon

from vhostkit.errors import Unsupported
from vhostkit.testing.swap import frame_number, numbered, packet_socket
from vhostkit.user import Frontend
from vhostkit.vmm import VhostUserNetPlane, VirtioNetDevice

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps need root")

GUEST_MAC = bytes.fromhex("020000cc0001")
PEER_MAC = bytes.fromhex("020000cc0002")


@pytest.fixture
def tap() -> Iterator[str]:
    with persistent_tap(f"vhkrc{os.getpid() % 10000}") as name:
        yield name


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def read_numbers(sniffer, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    got: list[int] = []
    sniffer.settimeout(10)
    while len(got) < count:
        n = frame_number(sniffer.recv(4096))
        if n is not None:
            got.append(n)
    return got


def test_the_device_carries_on_over_a_restarted_back_end(tap: str, sock_dir: Path) -> None:
    sock = sock_dir / "net.sock"
    daemons = [start_net_daemon(sock, tap)]
    device = VirtioNetDevice(VhostUserNetPlane(Frontend.connect(sock, timeout=10))).start()
    nic = device.nic
    try:
        with packet_socket(tap) as sniffer, packet_socket(tap) as sender:
            assert nic.send_all([numbered(i) for i in range(100)], timeout=10) == 100
            assert read_numbers(sniffer, 100) == list(range(100))
            assert nic.wait_tx_done(timeout=10)
            kill(daemons[0])
            # queued while no back-end runs: they wait in the ring
            assert nic.send([numbered(i) for i in range(100, 150)]) == 50
            daemons.append(start_net_daemon(sock, tap))
            new = VhostUserNetPlane(Frontend.connect(sock, timeout=10))
            device.reconnect(new).close()
            assert device.plane is new
            assert device.reconnects == [{0: 0, 1: 100}]  # RX: nothing used yet; TX: 100
            assert nic.send_all([numbered(i) for i in range(150, 200)], timeout=10) == 50
            assert read_numbers(sniffer, 100) == list(range(100, 200))
            # and the other way: frames written into the tap reach the device again
            for i in range(20):
                sender.send(numbered(i, src=PEER_MAC, dst=GUEST_MAC))
            got: list[int] = []
            while len(got) < 20:
                frames = nic.recv(timeout=10)
                assert frames, f"only {got} arrived"
                got += [n for f in frames if (n := frame_number(f)) is not None]
            assert got == list(range(20))
    finally:
        device.close()
        device.plane.close()
        for proc in daemons:
            kill(proc)


def test_packed_rings_are_not_reconnected(tap: str, sock_dir: Path) -> None:
    """Packed rings keep no used index to restart from: refused, the device left as it was."""
    sock = sock_dir / "net.sock"
    daemons = [start_net_daemon(sock, tap)]
    device = VirtioNetDevice(
        VhostUserNetPlane(Frontend.connect(sock, timeout=10)), packed=True
    ).start()
    try:
        kill(daemons[0])
        daemons.append(start_net_daemon(sock, tap))
        new = VhostUserNetPlane(Frontend.connect(sock, timeout=10))
        with new, pytest.raises(Unsupported, match="split rings only"):
            device.reconnect(new)
        assert device.reconnects == []
    finally:
        device.close()
        device.plane.close()
        for proc in daemons:
            kill(proc)
