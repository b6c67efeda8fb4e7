"""What a device wrote into guest memory, read back from the rings, to check a dirty log.

The dirty-log tests against real data planes (kernel vhost-net, DPDK's vhost PMD) need to know
which guest pages the device wrote. They read it from guest memory the way a VMM could, not
from the driver's bookkeeping: each used entry of a split ring names a descriptor and how many
bytes the device wrote into its buffer; the descriptor table gives the buffer's address. Read
them *before* the driver reaps (and reposts, which rewrites descriptors).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

from vhostkit.guest.rings import GuestRing, drain_eventfd, wait_readable
from vhostkit.virtio.dirty_log import LOG_PAGE_SHIFT, LOG_PAGE_SIZE
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

_DESC = struct.Struct("<QIHH")
_ELEM = struct.Struct("<II")


def pages(ranges: Iterable[tuple[int, int]]) -> set[int]:
    """The 4 KiB guest pages that ``(gpa, length)`` writes touch."""
    out: set[int] = set()
    for gpa, length in ranges:
        if length > 0:
            out.update(range(gpa >> LOG_PAGE_SHIFT, ((gpa + length - 1) >> LOG_PAGE_SHIFT) + 1))
    return out


def span_pages(gpa: int, length: int) -> set[int]:
    return pages([(gpa, length)])


def used_index(mem: GuestMemory, q: SplitDriverQueue) -> int:
    """The used ring's idx as the device last wrote it."""
    used = q.ring_gpas[2]
    return int(struct.unpack("<H", mem.read(used + 2, 2))[0])


def device_writes(
    mem: GuestMemory, q: SplitDriverQueue, start: int, count: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(buffer writes, used-ring writes)`` of used entries ``start .. start + count``.

    Buffer writes are ``(buffer gpa, bytes written)``; used-ring writes are the entries' slots
    and the idx field, as ``(gpa, length)``.
    """
    desc, _, used = q.ring_gpas
    buffers: list[tuple[int, int]] = []
    ring: list[tuple[int, int]] = [(used + 2, 2)]
    for n in range(start, start + count):
        slot = used + 4 + 8 * (n % q.num)
        ident, length = _ELEM.unpack(mem.read(slot, 8))
        addr, _, _, _ = _DESC.unpack(mem.read(desc + 16 * ident, 16))
        buffers.append((addr, length))
        ring.append((slot, 8))
    return buffers, ring


def wait_used(mem: GuestMemory, ring: GuestRing, target: int, timeout: float) -> None:
    """Wait until the device's used idx reached ``target`` (a free-running u16 count), on the
    ring's call eventfd (interrupts on while waiting). The driver must not reap meanwhile."""
    q = ring.queue
    assert isinstance(q, SplitDriverQueue)
    deadline = time.monotonic() + timeout
    q.enable_interrupts()
    try:
        while (used_index(mem, q) - target) & 0x8000:  # not reached yet (u16 arithmetic)
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable((ring.call,), left):
                raise AssertionError(f"used idx {used_index(mem, q)} did not reach {target}")
            drain_eventfd(ring.call)
    finally:
        q.disable_interrupts()


def ring_parts(q: SplitDriverQueue) -> dict[str, set[int]]:
    """The pages of a split ring's descriptor table and of its used ring (with 256 entries or
    more, the table fills whole pages and shares none with the used ring)."""
    desc, _, used = q.ring_gpas
    return {
        "desc": span_pages(desc, 16 * q.num),
        "used": span_pages(used, 4 + 8 * q.num + 2),
    }


__all__ = [
    "LOG_PAGE_SIZE",
    "device_writes",
    "pages",
    "ring_parts",
    "span_pages",
    "used_index",
    "wait_used",
]
