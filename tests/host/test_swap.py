"""Live data-plane swap on the host: vhostkit NetDevice -> another NetDevice -> a third one.

The kernel vhost-net <-> vhostkit swap runs in the real-kernel VM
(tests/kernel/test_kernel_swap.py); this test exercises the same machinery where no kernel
vhost is needed: every ring position, memory table, kick and call fd moves to a new vhost-user
back-end twice mid-stream, and every frame arrives exactly once, in order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vhostkit.kernel.tap import Tap
from vhostkit.testing.swap import (
    frame_number,
    numbered,
    packet_socket,
    rx_across_swaps,
    tx_across_swaps,
)
from vhostkit.user import BackendListener, Frontend
from vhostkit.user.backend.ring_device import RingDevice
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.vmm import LocalNetPlane, VhostUserNetPlane, VirtioNetDevice

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps need root")

FEATURES = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF)


@pytest.fixture
def tap(fd_check) -> Iterator[Tap]:
    with Tap("vhksw%d", nonblocking=True) as t:
        t.disable_ipv6()  # no MLD/ND chatter from the kernel into the rings
        t.up()
        yield t


class Planes:
    """Makes the data planes to swap to, and closes whichever one the device ends on."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.made: list[LocalNetPlane] = []

    def new(self) -> LocalNetPlane:
        self.made.append(LocalNetPlane(self.tap))
        return self.made[-1]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_tx_stream_across_two_swaps(tap: Tap, packed: bool) -> None:
    planes = Planes(tap)
    device = VirtioNetDevice(planes.new(), features=FEATURES, packed=packed).start()
    try:
        with packet_socket(tap.name) as sniffer:
            got = tx_across_swaps(device, sniffer, [planes.new, planes.new])
        assert got == list(range(300))  # every frame exactly once, in order
        assert len(device.swaps) == 2
        # the TX position handed over moved on between the two swaps
        assert device.swaps[0][1] != device.swaps[1][1]
    finally:
        device.stop()
        device.close()
        device.plane.close()


def test_rx_stream_across_two_swaps(tap: Tap) -> None:
    planes = Planes(tap)
    device = VirtioNetDevice(planes.new(), features=FEATURES).start()
    try:
        with packet_socket(tap.name) as sender:
            got = rx_across_swaps(device, sender, [planes.new, planes.new])
        assert got == list(range(300))
        assert len(device.swaps) == 2
    finally:
        device.stop()
        device.close()
        device.plane.close()


class Idle(RingDevice):
    """A data plane that takes nothing from its rings: frames stay queued in the guest's ring."""

    def process(self, ring) -> bool:  # type: ignore[no-untyped-def]
        return True


def test_frames_queued_at_the_swap_are_sent_by_the_new_plane(tap: Tap, sock_dir) -> None:
    """Everything the guest queued before the move is still in the TX ring; the new back-end
    must send it, not start the ring disabled and discard it (the spec's rule for a disabled
    net TX ring)."""
    idle = Idle(features=FEATURES | int(VirtioFeature.RING_EVENT_IDX), num_queues=2)
    listener = BackendListener(str(sock_dir / "idle.sock"), lambda: idle).start()
    device = VirtioNetDevice(
        VhostUserNetPlane(Frontend.connect(sock_dir / "idle.sock", timeout=5)), features=FEATURES
    ).start()
    try:
        frames = [numbered(i) for i in range(50)]
        assert device.nic.send(frames) == 50
        with packet_socket(tap.name) as sniffer:
            sniffer.settimeout(10)  # a discarded frame must fail the test, not hang it
            device.swap(LocalNetPlane(tap)).close()
            got = [frame_number(sniffer.recv(4096)) for _ in range(50)]
        assert got == list(range(50))
        assert device.swaps[0][1] == 0  # the idle plane had taken nothing
    finally:
        device.stop()
        device.close()
        device.plane.close()
        listener.stop()
        idle.close()
