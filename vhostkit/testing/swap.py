"""Streams of numbered frames across live data-plane swaps (for tests and labs).

:func:`tx_across_swaps` sends numbered frames from a :class:`~vhostkit.vmm.VirtioNetDevice`
and reads them off the tap while the device moves from data plane to data plane;
:func:`rx_across_swaps` writes numbered frames into the tap and receives them in the device.
Both return the sequence numbers in the order they arrived, so a caller checks "every frame
exactly once, in order" with one comparison.

:class:`~vhostkit.vmm.LocalNetPlane` (re-exported here) is the vhost-user data plane the
tests swap to: vhostkit's own NetDevice on the same tap, served in this process.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence

from vhostkit.vmm import LocalNetPlane, NetDataPlane, VirtioNetDevice

__all__ = [
    "ETHERTYPE",
    "LocalNetPlane",
    "frame_number",
    "numbered",
    "packet_socket",
    "rx_across_swaps",
    "tx_across_swaps",
]

#: IEEE local experimental ethertype: nothing else on the host sends it.
ETHERTYPE = 0x88B6
GUEST_MAC = bytes.fromhex("020000cc0001")
PEER_MAC = bytes.fromhex("020000cc0002")
#: SO_RCVBUFFORCE (not in Python's socket module): a burst must not overflow the sniffer.
SO_RCVBUFFORCE = 33

PlaneFactory = Callable[[], NetDataPlane]


def numbered(i: int, src: bytes = GUEST_MAC, dst: bytes = PEER_MAC) -> bytes:
    """A 64-byte frame carrying sequence number ``i``."""
    return (dst + src + struct.pack("!HI", ETHERTYPE, i)).ljust(64, b"\x5a")


def frame_number(frame: bytes | memoryview) -> int | None:
    """The sequence number of a :func:`numbered` frame, or ``None`` for anything else."""
    if len(frame) < 18 or bytes(frame[12:14]) != struct.pack("!H", ETHERTYPE):
        return None
    return int(struct.unpack_from("!I", frame, 14)[0])


@contextlib.contextmanager
def packet_socket(ifname: str) -> Iterator[socket.socket]:
    """An AF_PACKET socket on ``ifname`` for :data:`ETHERTYPE` frames, with a large buffer."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    try:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind((ifname, 0))
        yield s
    finally:
        s.close()


def _swap_points(total: int, chunk: int, swaps: int) -> set[int]:
    """Chunk starts after which to swap, spread evenly over the stream."""
    starts = list(range(0, total, chunk))
    return {starts[(k + 1) * len(starts) // (swaps + 1)] for k in range(swaps)}


def tx_across_swaps(
    device: VirtioNetDevice,
    sniffer: socket.socket,
    planes: Sequence[PlaneFactory],
    *,
    total: int = 300,
    chunk: int = 20,
    timeout: float = 30.0,
) -> list[int]:
    """Send ``total`` numbered frames; swap to each plane of ``planes`` in turn mid-stream.

    Each swap happens right after a chunk was queued, so frames are in the ring (not yet
    sent) when the data plane changes; and only once the current plane has sent at least one
    frame, so that every plane carries part of the stream. The old planes are closed. Returns
    the numbers read from ``sniffer`` (an :func:`packet_socket` on the tap), in arrival
    order.
    """
    points = _swap_points(total, chunk, len(planes))
    pending = list(planes)
    nic = device.nic
    completed_at_swap = nic.stats().tx_completed
    for start in range(0, total, chunk):
        if start in points:
            moved = nic.wait_tx_completed(completed_at_swap + 1, timeout)
            assert moved, f"the data plane sent nothing in {timeout}s"
        frames = [numbered(i) for i in range(start, min(start + chunk, total))]
        sent = nic.send_all(frames, timeout=timeout)
        assert sent == len(frames), f"only {sent} of {len(frames)} frames queued"
        if start in points:
            device.swap(pending.pop(0)()).close()
            nic.reap_tx()  # what the old plane completed counts for the old plane
            completed_at_swap = nic.stats().tx_completed
    return _read_numbers(sniffer, total, timeout)


def _read_numbers(sniffer: socket.socket, total: int, timeout: float) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < total:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sniffer.settimeout(left)
        try:
            data = sniffer.recv(4096)
        except TimeoutError:
            break
        n = frame_number(data)
        if n is not None:
            got.append(n)
    return got


def rx_across_swaps(
    device: VirtioNetDevice,
    sender: socket.socket,
    planes: Sequence[PlaneFactory],
    *,
    total: int = 300,
    chunk: int = 20,
    timeout: float = 30.0,
) -> list[int]:
    """Write ``total`` numbered frames into the tap (``sender``: a :func:`packet_socket` on
    it); swap to each plane of ``planes`` mid-stream, right after a chunk went into the tap and
    before the device received it. Returns the numbers the device received, in order."""
    points = _swap_points(total, chunk, len(planes))
    pending = list(planes)
    got: list[int] = []
    deadline = time.monotonic() + timeout
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        for i in range(start, end):
            sender.send(numbered(i, src=PEER_MAC, dst=GUEST_MAC))
        if start in points:
            device.swap(pending.pop(0)()).close()
        while len(got) < end and time.monotonic() < deadline:
            for frame in device.nic.recv(timeout=max(0.0, deadline - time.monotonic())):
                n = frame_number(frame)
                if n is not None:
                    got.append(n)
    return got
