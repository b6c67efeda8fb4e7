"""Live swap on a real kernel: kernel vhost-net -> vhostkit's NetDevice -> kernel vhost-net.

A :class:`~vhostkit.vmm.VirtioNetDevice` streams numbered frames through a tap; mid-stream
its rings move from ``/dev/vhost-net`` to vhostkit's userspace NetDevice (same tap, same guest
memory, same ring positions, kick and call eventfds) and back to a fresh ``/dev/vhost-net``.
The receiver sees every frame exactly once, in order. The same for the receive direction.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vhostkit.kernel import Tap
from vhostkit.testing.swap import packet_socket, rx_across_swaps, tx_across_swaps
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.vmm import KernelNetPlane, LocalNetPlane, VirtioNetDevice

pytestmark = pytest.mark.kernel

FEATURES = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF)
TOTAL = 240


@pytest.fixture
def tap(fd_check) -> Iterator[Tap]:
    with Tap("vhkks%d", nonblocking=True) as t:
        t.disable_ipv6()  # no MLD/ND frames from the kernel into the rings
        t.up()
        yield t


def test_tx_stream_kernel_to_vhostkit_and_back(tap: Tap) -> None:
    device = VirtioNetDevice(KernelNetPlane(tap), features=FEATURES).start()
    try:
        with packet_socket(tap.name) as sniffer:
            got = tx_across_swaps(
                device,
                sniffer,
                [lambda: LocalNetPlane(tap), lambda: KernelNetPlane(tap)],
                total=TOTAL,
            )
        assert got == list(range(TOTAL))  # every frame exactly once, in order
        assert [type(p).__name__ for p in (device.plane,)] == ["KernelNetPlane"]
        assert len(device.swaps) == 2
        assert 0 < device.swaps[0][1] < device.swaps[1][1] < TOTAL
    finally:
        device.stop()
        device.close()
        device.plane.close()


def test_rx_stream_kernel_to_vhostkit_and_back(tap: Tap) -> None:
    device = VirtioNetDevice(KernelNetPlane(tap), features=FEATURES).start()
    try:
        with packet_socket(tap.name) as sender:
            got = rx_across_swaps(
                device,
                sender,
                [lambda: LocalNetPlane(tap), lambda: KernelNetPlane(tap)],
                total=TOTAL,
            )
        assert got == list(range(TOTAL))
        assert len(device.swaps) == 2
    finally:
        device.stop()
        device.close()
        device.plane.close()
