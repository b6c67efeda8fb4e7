"""The packed ring's layout, ring positions, and what both roles of a packed queue build on it.

Layout: a ring of ``num`` 16-byte descriptors (``addr u64, len u32, id u16, flags u16``,
16-byte aligned), the driver event suppression area and the device event suppression area
(``off_wrap u16, flags u16`` each, 4-byte aligned). In a :class:`~vhostkit.backend.VringAddr`
they are ``desc``, ``avail`` and ``used``.

Ring positions for ``SET_VRING_BASE`` / ``GET_VRING_BASE`` are encoded as in Linux vhost:
bits 0-14 the last avail index, bit 15 the avail wrap counter; bits 16-30 and 31 the same for
the used side. vhost-user peers (QEMU, DPDK) send only the low 16 bits: when the high 16 bits
are zero the used position is taken equal to the avail position (no buffers in flight). The
one ambiguous case, used index 0 with wrap counter 0 and a different avail position, cannot be
expressed; vhost has the same limit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from vhostkit.errors import InvalidParam
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.ring import RingBase, check_align, check_queue_size, need_event, u16_words

__all__ = [
    "EVENT_ALIGN",
    "PACKED_DESC_DTYPE",
    "PACKED_RING_ALIGN",
    "WRAP_SHIFT",
    "PackedRing",
    "PackedViews",
    "advance",
    "decode_base",
    "encode_base",
    "event_due",
    "lap_pattern",
    "packed_ring_size",
]

PACKED_RING_ALIGN = 16
EVENT_ALIGN = 4

#: ``struct vring_packed_desc``
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])

#: bit of an event area's ``off_wrap`` word (and of a ring position) that holds the wrap
#: counter
WRAP_SHIFT = 15


def lap_pattern(num: int, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
    """Per wrap counter ``w``: ``2 * num`` u16 values, ``first``/``second`` (for ``w == 1``)
    on the first lap and the other one on the second (positions past the ring's end)."""
    lap = np.arange(2 * num) >= num
    one = np.where(lap, second, first).astype(np.uint16)
    zero = np.where(lap, first, second).astype(np.uint16)
    for a in (one, zero):
        a.flags.writeable = False
    return zero, one


def advance(pos: int, wrap: int, count: int, num: int) -> tuple[int, int]:
    """The ring position ``count`` slots (at most ``num``) after ``pos`` whose wrap counter is
    ``wrap``, in a ring of ``num``: ``(position, wrap counter)``; the counter flips when the
    position passes the ring's end."""
    pos += count
    if pos >= num:
        return pos - num, wrap ^ 1
    return pos, wrap


def packed_ring_size(num: int) -> int:
    """Bytes of a contiguous packed ring: descriptors plus the two event areas."""
    return 16 * num + 8


def encode_base(
    avail_idx: int, avail_wrap: int, used_idx: int | None = None, used_wrap: int | None = None
) -> int:
    """A ring position as ``SET_VRING_BASE`` carries it (see the module docstring)."""
    if used_idx is None:
        used_idx = avail_idx
    if used_wrap is None:
        used_wrap = avail_wrap
    for idx in (avail_idx, used_idx):
        if not 0 <= idx < 0x8000:
            raise InvalidParam(f"packed ring index {idx} out of range")
    return (avail_idx | (avail_wrap & 1) << 15) | (used_idx | (used_wrap & 1) << 15) << 16


def decode_base(base: int) -> tuple[int, int, int, int]:
    """``(avail_idx, avail_wrap, used_idx, used_wrap)`` from a ``SET_VRING_BASE`` value."""
    if not 0 <= base <= 0xFFFFFFFF:
        raise InvalidParam(f"packed ring base {base:#x} out of range")
    lo, hi = base & 0xFFFF, base >> 16
    if hi == 0:
        hi = lo
    return lo & 0x7FFF, lo >> 15, hi & 0x7FFF, hi >> 15


def event_due(off_wrap: int, wrap: int, new: int, count: int, num: int) -> bool:
    """Did the last ``count`` positions up to ``new`` (current wrap ``wrap``) pass the event?"""
    off = off_wrap & 0x7FFF
    if off_wrap >> WRAP_SHIFT != wrap:
        off -= num
    return need_event(off, new, new - count)


class PackedViews:
    """NumPy views of a packed ring's descriptors and event areas in one table snapshot."""

    __slots__ = ("desc", "dev_evt", "drv_evt", "empty", "flags", "table", "words")

    def __init__(
        self,
        table: MemoryTable,
        space: Literal["gpa", "uva"],
        num: int,
        desc: int,
        driver_event: int,
        device_event: int,
    ) -> None:
        sp = table.gpa if space == "gpa" else table.uva
        self.table = table
        self.desc = np.frombuffer(sp.view(desc, 16 * num), PACKED_DESC_DTYPE, num)
        self.drv_evt = u16_words(sp.view(driver_event, 4), 0, 2)
        self.dev_evt = u16_words(sp.view(device_event, 4), 0, 2)
        #: the flags of every descriptor (a strided view), and the ring as u16 words (the
        #: flags of descriptor ``i`` are word ``8 * i + 7``)
        self.flags = self.desc["flags"]
        self.words = u16_words(sp.view(desc, 16 * num), 0, 8 * num)
        self.empty = ChainBatch.empty(table)


class PackedRing(RingBase):
    """What both roles of a packed queue share: size and alignment checks, the ring views."""

    _views_type = PackedViews
    _desc_dtype = PACKED_DESC_DTYPE
    _v: PackedViews

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc: int,
        driver_event: int,
        device_event: int,
        space: Literal["gpa", "uva"],
        features: int,
        index: int,
    ) -> None:
        check_queue_size(num, power_of_two=False)
        check_align("descriptor ring", desc, PACKED_RING_ALIGN)
        check_align("driver event area", driver_event, EVENT_ALIGN)
        check_align("device event area", device_event, EVENT_ALIGN)
        super().__init__(mem, num, (desc, driver_event, device_event), space, features, index)


# ----------------------------------------------------------------------------------------------
