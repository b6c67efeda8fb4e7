"""vhostkit's userspace virtio-vsock guest over kernel vhost-vsock, on a real kernel.

The virtual guest takes CID 3 and listens; a host ``AF_VSOCK`` socket connects to it, and
the guest answers the request, echoes what it receives (more than its advertised receive
buffer, so the host has to wait for credit updates) and shuts down once the host did; the host
reads back exactly what it wrote. A connect to a port nobody listens on is reset.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from vhostkit.guest.vsock import (
    Connected,
    ConnectionClosed,
    DataReceived,
    PeerShutdown,
    ShutdownFlag,
    VsockDriver,
    VsockEvent,
)
from vhostkit.kernel import VhostVsock

pytestmark = pytest.mark.kernel

GUEST_CID = 3
RX, TX = 0, 1


class Served:
    """A started VsockDriver serving in a thread; the events it saw."""

    def __init__(self, guest: VsockDriver) -> None:
        self.guest = guest
        self.events: list[VsockEvent] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=guest.serve, args=(self._on_event,), daemon=True)

    def _on_event(self, event: VsockEvent) -> None:
        self.events.append(event)
        if isinstance(event, ConnectionClosed):
            self.closed.set()


@pytest.fixture
def served() -> Iterator[Served]:
    with VhostVsock() as dev, VsockDriver(dev, GUEST_CID, buf_alloc=16 * 1024).start() as guest:
        s = Served(guest)
        s.thread.start()
        try:
            yield s
        finally:
            guest.stop_serving()
            s.thread.join(10)
            assert not s.thread.is_alive(), "the vsock guest did not stop serving"
            guest.stop()


def test_host_connects_and_the_guest_echoes(served: Served) -> None:
    port = 5000
    served.guest.listen(port, echo=True)
    data = os.urandom(48 * 1024)  # 3x the guest's buf_alloc, a dozen 4 KiB buffers
    back = bytearray()
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect((GUEST_CID, port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            back += chunk
    assert bytes(back) == data
    assert served.closed.wait(10), f"connection never closed: {served.events[-3:]}"
    kinds = [type(e) for e in served.events]
    assert kinds[0] is Connected
    got = b"".join(e.data for e in served.events if isinstance(e, DataReceived))
    assert got == data
    shut = [e for e in served.events if isinstance(e, PeerShutdown)]
    assert shut and shut[0].flags & ShutdownFlag.SEND
    assert not served.guest.endpoint.connections
    guest = served.guest
    # more than one buffer each way
    assert guest.rx_packets > len(data) // 4096 and guest.tx_packets > len(data) // 4052


def test_connect_to_a_port_nobody_listens_on_is_reset(served: Served) -> None:
    served.guest.listen(5000, echo=True)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        with pytest.raises(ConnectionResetError):
            sock.connect((GUEST_CID, 5001))
    assert served.guest.endpoint.resets_sent >= 1


def test_ring_positions_count_the_packets() -> None:
    with VhostVsock() as dev, VsockDriver(dev, GUEST_CID).start() as guest:
        guest.listen(7000, echo=True)
        s = Served(guest)
        s.thread.start()
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
                sock.settimeout(15)
                sock.connect((GUEST_CID, 7000))
                sock.sendall(b"ping")
                assert sock.recv(16) == b"ping"
            assert s.closed.wait(10)
        finally:
            guest.stop_serving()
            s.thread.join(10)
        # the last packet (the RST answering the host's shutdown) may still be queued: stop
        # only once the kernel took it, or its position would be one short
        assert guest.wait_tx_done(10)
        positions = guest.stop()
        assert positions == {RX: guest.rx_packets, TX: guest.tx_packets}
