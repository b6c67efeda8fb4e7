"""The split ring's layout, and what both roles of a split queue build on it.

Layout (all little-endian): the descriptor table (16 bytes per entry, 16-byte aligned), the
available ring (``flags, idx, ring[num], used_event``, 2-byte aligned) and the used ring
(``flags, idx, ring[num] of (id u32, len u32), avail_event``, 4-byte aligned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from vhostkit.errors import InvalidParam
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.ring import (
    SPLIT_DESC_DTYPE,
    RingBase,
    align_up,
    check_align,
    check_queue_size,
    u16_words,
)

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_F_NO_INTERRUPT",
    "DESC_ALIGN",
    "USED_ALIGN",
    "USED_ELEM_DTYPE",
    "USED_F_NO_NOTIFY",
    "SplitLayout",
    "SplitRing",
    "SplitViews",
    "avail_ring_size",
    "desc_table_size",
    "used_ring_size",
    "vring_size",
]

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

#: ``struct vring_used_elem``
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

#: ``VRING_AVAIL_F_NO_INTERRUPT`` / ``VRING_USED_F_NO_NOTIFY``
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


def desc_table_size(num: int) -> int:
    """Bytes of a descriptor table of ``num`` entries."""
    return 16 * num


def avail_ring_size(num: int) -> int:
    """Bytes of an available ring, including ``used_event``."""
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    """Bytes of a used ring, including ``avail_event``."""
    return 6 + 8 * num


def vring_size(num: int, align: int = 4096) -> int:
    """Bytes of a contiguous split ring (legacy ``vring_size``): used ring aligned to ``align``."""
    return align_up(desc_table_size(num) + avail_ring_size(num), align) + used_ring_size(num)


@dataclass(frozen=True, slots=True)
class SplitLayout:
    """Offsets of the three parts of a contiguous split ring."""

    num: int
    desc: int
    avail: int
    used: int
    size: int

    @classmethod
    def compute(cls, num: int, align: int = USED_ALIGN) -> SplitLayout:
        """The legacy contiguous layout (``align=4096``) or the compact virtio 1.x one (4)."""
        check_queue_size(num, power_of_two=True)
        if align < USED_ALIGN or align & (align - 1):
            raise InvalidParam(f"used ring alignment {align} must be a power of two >= 4")
        avail = desc_table_size(num)
        used = align_up(avail + avail_ring_size(num), align)
        return cls(num, 0, avail, used, used + used_ring_size(num))


class SplitViews:
    """NumPy views of the three parts of a split ring in one table snapshot.

    ``avail_w`` / ``used_w`` & co. are single-word views
    (:func:`~vhostkit.virtio.ring.u16_words`) for the index and flag words that the hot path
    reads or writes one at a time.
    """

    __slots__ = (
        "avail_event",
        "avail_event_w",
        "avail_hdr",
        "avail_ring",
        "avail_w",
        "desc",
        "empty",
        "table",
        "used_event",
        "used_event_w",
        "used_hdr",
        "used_ring",
        "used_w",
        "used_words",
    )

    def __init__(
        self,
        table: MemoryTable,
        space: Literal["gpa", "uva"],
        num: int,
        desc: int,
        avail: int,
        used: int,
    ) -> None:
        sp = table.gpa if space == "gpa" else table.uva
        self.table = table
        self.desc = np.frombuffer(sp.view(desc, desc_table_size(num)), SPLIT_DESC_DTYPE, num)
        av = sp.view(avail, avail_ring_size(num))
        self.avail_hdr = np.frombuffer(av, "<u2", 2)
        self.avail_ring = np.frombuffer(av, "<u2", num, 4)
        self.used_event = np.frombuffer(av, "<u2", 1, 4 + 2 * num)
        us = sp.view(used, used_ring_size(num))
        self.used_hdr = np.frombuffer(us, "<u2", 2)
        self.used_ring = np.frombuffer(us, USED_ELEM_DTYPE, num, 4)
        self.used_words = np.frombuffer(us, "<u4", 2 * num, 4).reshape(num, 2)
        self.avail_event = np.frombuffer(us, "<u2", 1, 4 + 8 * num)
        #: ``[flags, idx]`` of the avail ring, ``[flags, idx]`` of the used ring
        self.avail_w = u16_words(av, 0, 2)
        self.used_w = u16_words(us, 0, 2)
        self.used_event_w = u16_words(av, 4 + 2 * num, 1)
        self.avail_event_w = u16_words(us, 4 + 8 * num, 1)
        self.empty = ChainBatch.empty(table)


class SplitRing(RingBase):
    """What both roles of a split queue share: size and alignment checks, the ring views."""

    _views_type = SplitViews
    _desc_dtype = SPLIT_DESC_DTYPE
    _v: SplitViews

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc: int,
        avail: int,
        used: int,
        space: Literal["gpa", "uva"],
        features: int,
        index: int,
    ) -> None:
        check_queue_size(num, power_of_two=True)
        check_align("descriptor table", desc, DESC_ALIGN)
        check_align("available ring", avail, AVAIL_ALIGN)
        check_align("used ring", used, USED_ALIGN)
        self._mask = num - 1
        super().__init__(mem, num, (desc, avail, used), space, features, index)


# ----------------------------------------------------------------------------------------------
