"""One VMM-side check, any data plane: what every virtio-net data plane must do.

:func:`check_net_data_plane` drives a :class:`~vhostkit.guest.net.VirtioNetDriver`
through whatever :class:`~vhostkit.backend.VhostBackend` a :class:`NetPlane` adapter hands it
and checks the behaviour both kernel vhost-net and a vhost-user back-end must have:

* feature negotiation (VERSION_1 acked, so a 12-byte virtio-net header);
* ring set-up through the generic calls only;
* N numbered frames sent: the call eventfd fires once transmit interrupts are on, every
  transmit buffer comes back used, and the frames reach the far side unchanged and in order;
* GET_VRING_BASE: the TX position is N, the RX position is the number of receive buffers the
  data plane filled (what the driver reaped), and nothing else arrived.

Where the data planes legitimately differ, the adapter says so, never the shared check:

* :class:`TapPlane` (kernel vhost-net): the tap is attached with NET_SET_BACKEND after the
  rings are set up, frames are seen on the tap with an AF_PACKET socket (filtered by
  ethertype), the kernel sends nothing back (IPv6 is turned off on the tap so that it does not
  send MLD reports), and the backend is detached before the rings are stopped, because the
  kernel's GET_VRING_BASE reads the position without stopping the ring;
* :class:`TestpmdPlane` (vhost-user through :class:`~vhostkit.user.Frontend` to DPDK testpmd's
  vhost PMD in ``macswap`` mode): the frames come back on our RX ring with the MAC addresses
  swapped, and GET_VRING_BASE itself stops the rings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

from vhostkit.backend import VhostBackend
from vhostkit.guest.net import DriverStats, VirtioNetDriver
from vhostkit.guest.rings import wait_readable
from vhostkit.virtio.features import VirtioFeature

if TYPE_CHECKING:  # imported lazily: each adapter needs only its own data plane
    from vhostkit.kernel import Tap, VhostNet
    from vhostkit.testing.peers import Testpmd
    from vhostkit.user import Frontend

__all__ = [
    "ETHERTYPE",
    "GUEST_MAC",
    "PEER_MAC",
    "DataPlaneReport",
    "NetPlane",
    "TapPlane",
    "TestpmdPlane",
    "check_net_data_plane",
    "numbered_frame",
]

log = logging.getLogger(__name__)

#: IEEE "local experimental" ethertype: no kernel chatter uses it, so a filter on it is exact.
ETHERTYPE = 0x88B5
GUEST_MAC = bytes.fromhex("020000aa0001")
PEER_MAC = bytes.fromhex("020000bb0002")
RX, TX = 0, 1


def numbered_frame(i: int, size: int = 64) -> bytes:
    """A frame from :data:`GUEST_MAC` to :data:`PEER_MAC`, ethertype :data:`ETHERTYPE`, with
    ``i`` at the start of the payload and a pattern derived from ``i`` after it."""
    head = PEER_MAC + GUEST_MAC + struct.pack("!HI", ETHERTYPE, i)
    return head + bytes((i * 7 + j) % 256 for j in range(max(size, 60) - len(head)))


class NetPlane(Protocol):
    """A data plane under test, as the shared check sees it (the per-plane adapter)."""

    name: str

    @property
    def backend(self) -> VhostBackend:
        """The backend the driver drives (opened by the adapter, not owned by the driver)."""
        ...

    def attach(self, nic: VirtioNetDriver) -> None:
        """Connect the started driver's rings to the data plane's far side."""
        ...

    def delivered(self, nic: VirtioNetDriver, count: int, timeout: float) -> list[bytes]:
        """The next ``count`` frames as the far side got them, mapped back to what was sent."""
        ...

    def quiesce(self, nic: VirtioNetDriver) -> None:
        """Make the far side stop producing traffic, before the rings are stopped."""
        ...


@dataclass(frozen=True, slots=True)
class DataPlaneReport:
    """What :func:`check_net_data_plane` saw."""

    plane: str
    acked_features: int
    header_size: int
    sent: int
    positions: dict[int, int]
    stats: DriverStats
    seconds: float


def check_net_data_plane(
    plane: NetPlane,
    *,
    count: int = 64,
    sizes: tuple[int, ...] = (60, 128, 1000, 1514),
    queue_size: int = 256,
    timeout: float = 10.0,
) -> DataPlaneReport:
    """The shared check (see the module docstring); raises ``AssertionError`` on a failure."""
    if not 0 < count <= queue_size:
        raise ValueError("send at most one ring of frames (the far side may echo them)")
    t0 = time.monotonic()
    frames = [numbered_frame(i, sizes[i % len(sizes)]) for i in range(count)]
    with VirtioNetDriver(plane.backend, queue_size=queue_size).start() as nic:
        assert nic.acked_features & VirtioFeature.VERSION_1, f"{plane.name}: no VERSION_1"
        assert nic.header_size == 12, f"{plane.name}: header {nic.header_size} bytes"
        plane.attach(nic)

        _rx_q, tx_q = nic.queues()
        _rx_call, tx_call = nic.call_fds()
        tx_q.enable_interrupts()  # the driver keeps them off unless it waits
        sent = nic.send(frames)
        assert sent == count, f"{plane.name}: {sent} of {count} frames queued"
        assert wait_readable((tx_call,), timeout), f"{plane.name}: TX call eventfd never fired"
        assert tx_q.pending_used() >= 1, f"{plane.name}: call fired, used ring empty"
        tx_q.disable_interrupts()
        assert nic.wait_tx_done(timeout), f"{plane.name}: {nic.tx_in_flight} TX buffers not used"

        got = plane.delivered(nic, count, timeout)
        assert len(got) == count, f"{plane.name}: {len(got)} of {count} frames delivered"
        for i, (want, seen) in enumerate(zip(frames, got, strict=True)):
            assert seen == want, f"{plane.name}: frame {i} differs ({len(seen)}/{len(want)} B)"

        plane.quiesce(nic)
        extra = nic.recv(timeout=0)
        stats = nic.stats()
        assert stats.tx_frames == stats.tx_completed == count, f"{plane.name}: {stats}"
        positions = nic.stop()
        assert positions[TX] == count, f"{plane.name}: TX position {positions[TX]} != {count}"
        assert positions[RX] == stats.rx_frames, (
            f"{plane.name}: RX position {positions[RX]}, driver reaped {stats.rx_frames}"
        )
        assert not extra, f"{plane.name}: {len(extra)} unexpected frames on RX"
        return DataPlaneReport(
            plane.name,
            nic.acked_features,
            nic.header_size,
            count,
            positions,
            stats,
            time.monotonic() - t0,
        )


# --- kernel vhost-net + a tap ------------------------------------------------------------------


class TapPlane:
    """Kernel vhost-net with a tap; the far side is an AF_PACKET socket on the tap.

    A context manager: entering opens ``/dev/vhost-net``, a tap (IPv6 off, no offloads, up)
    and the packet socket; leaving closes all three.
    """

    name = "kernel vhost-net"

    def __init__(self, tap_name: str = "vhkdp%d") -> None:
        self._tap_name = tap_name
        self._stack = contextlib.ExitStack()
        self.net: VhostNet | None = None
        self.tap: Tap | None = None
        self.sock: socket.socket | None = None
        self._attached: list[int] = []

    def __enter__(self) -> Self:
        from vhostkit.kernel import Tap, VhostNet

        with contextlib.ExitStack() as stack:
            self.net = stack.enter_context(VhostNet())
            self.tap = tap = stack.enter_context(Tap(self._tap_name))
            tap.disable_ipv6()
            tap.set_offload(0)
            tap.up()
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
            stack.callback(sock.close)
            sock.bind((tap.name, ETHERTYPE))
            self.sock = sock
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def backend(self) -> VhostBackend:
        assert self.net is not None
        return self.net

    def attach(self, nic: VirtioNetDriver) -> None:
        assert self.net is not None and self.tap is not None
        self.tap.set_vnet_hdr_size(nic.header_size)
        for index in nic.ring_indices:
            self.net.set_backend(index, self.tap.fd)
            self._attached.append(index)

    def delivered(self, nic: VirtioNetDriver, count: int, timeout: float) -> list[bytes]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable((self.sock.fileno(),), left):
                break
            out.append(self.sock.recv(65536))
        return out

    def quiesce(self, nic: VirtioNetDriver) -> None:
        assert self.net is not None
        while self._attached:
            self.net.set_backend(self._attached.pop(), None)


# --- vhost-user: Frontend + DPDK testpmd's vhost PMD (macswap) -----------------------------------


class TestpmdPlane:
    """A vhost-user back-end: DPDK testpmd's vhost PMD in ``macswap`` mode, reached through
    vhostkit's :class:`~vhostkit.user.Frontend`; frames come back on our RX ring.

    A context manager: entering starts testpmd listening on ``socket_path`` and connects;
    leaving closes the connection and stops testpmd.
    """

    name = "vhost-user (testpmd macswap)"
    __test__ = False  # not a pytest test class despite its name

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.path = Path(socket_path)
        self._stack = contextlib.ExitStack()
        self.pmd: Testpmd | None = None
        self.frontend: Frontend | None = None

    def __enter__(self) -> Self:
        from vhostkit.testing.peers import Testpmd
        from vhostkit.user import Frontend

        with contextlib.ExitStack() as stack:
            self.pmd = stack.enter_context(Testpmd.vhost_backend(self.path, forward_mode="macswap"))
            self.frontend = Frontend.connect(self.path, timeout=5)
            stack.callback(self.frontend.close)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def backend(self) -> VhostBackend:
        assert self.frontend is not None
        return self.frontend

    def attach(self, nic: VirtioNetDriver) -> None:
        assert self.pmd is not None
        self.pmd.wait_for_line(r"Port 0: link state change event", 10)

    def delivered(self, nic: VirtioNetDriver, count: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            out += nic.recv(count - len(out), timeout=left)
        # macswap sent each frame back with the addresses swapped: swap them back
        return [f[6:12] + f[0:6] + f[12:] for f in out]

    def quiesce(self, nic: VirtioNetDriver) -> None:
        # Nothing to detach: every frame came back, and GET_VRING_BASE stops the rings.
        return None
