"""Split virtqueues (virtio 1.2 section 2.7), in the driver role and in the device role.

Layout (all little-endian): the descriptor table (16 bytes per entry, 16-byte aligned), the
available ring (``flags, idx, ring[num], used_event``, 2-byte aligned) and the used ring
(``flags, idx, ring[num] of (id u32, len u32), avail_event``, 4-byte aligned).

Both roles work on NumPy structured-array views of the mapped guest memory. The device role pops
every pending chain with a handful of array operations (gather the avail entries, walk all chains
one step at a time in parallel, translate every buffer at once), completes a batch with one
scatter into the used ring and a single index store, and builds memoryviews only for the chains
a caller looks at (:class:`~vhostkit.virtio.ring.ChainBatch`).

The error policy is described in :mod:`vhostkit.virtio.ring`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.ring import (
    SPLIT_DESC_DTYPE,
    Buffer,
    ChainBatch,
    DescFlag,
    DeviceRole,
    DriverRole,
    RingBase,
    batch_buffers,
    check_align,
    check_order,
    check_queue_size,
    locate_buffers,
    need_event,
    u16_words,
)

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "USED_ALIGN",
    "USED_ELEM_DTYPE",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "vring_size",
]

log = logging.getLogger(__name__)

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

#: ``struct vring_used_elem``
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

#: ``VRING_AVAIL_F_NO_INTERRUPT`` / ``VRING_USED_F_NO_NOTIFY``
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_CHAINED = _NEXT | _INDIRECT
_or_reduce = np.bitwise_or.reduce
_count = np.count_nonzero

#: Longest indirect table the device role accepts (the kernel's UIO_MAXIOV), unless the queue
#: itself is larger.
MAX_INDIRECT = 1024


def _run(idx: npt.NDArray[np.intp], arange: npt.NDArray[np.intp]) -> slice | np.ndarray:
    """``idx`` as a slice when it is a run of consecutive values (``arange``: 0, 1, 2, ...
    at least as long as the largest value), else ``idx`` itself. Writes through a slice cost
    a fraction of a scatter."""
    lo = int(idx[0])
    hi = lo + idx.shape[0]
    if hi <= arange.shape[0] and not _count(idx != arange[lo:hi]):
        return slice(lo, hi)
    return idx


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


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
    return _align_up(desc_table_size(num) + avail_ring_size(num), align) + used_ring_size(num)


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
        used = _align_up(avail + avail_ring_size(num), align)
        return cls(num, 0, avail, used, used + used_ring_size(num))


class _RingViews:
    """NumPy views of the three parts of a split ring in one table snapshot.

    ``avail_idx`` / ``used_idx`` & co. are single-word views (:func:`_u16`) for the index and
    flag words that the hot path reads or writes one at a time.
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


class _SplitBase(RingBase):
    _views_type = _RingViews
    _desc_dtype = SPLIT_DESC_DTYPE
    _v: _RingViews

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
# device role
# ----------------------------------------------------------------------------------------------


class SplitDeviceQueue(DeviceRole, _SplitBase):
    """The device (backend) side of a split virtqueue.

    ``base`` is the ``SET_VRING_BASE`` value: the next avail index to process. The used index
    is read from the ring, as vhost does. :meth:`get_base` returns the position for
    ``GET_VRING_BASE``; chains popped but not completed at that point are lost, as with vhost.
    """

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc: int,
        avail: int,
        used: int,
        *,
        space: Literal["gpa", "uva"] = "gpa",
        features: int = 0,
        base: int | None = None,
        index: int = 0,
    ) -> None:
        super().__init__(mem, num, desc, avail, used, space, features, index)
        base = 0 if base is None else base
        if not 0 <= base <= 0xFFFF:
            raise InvalidParam(f"split ring base {base} out of range")
        self._last_avail = base
        self._used_idx = int(self._v.used_hdr[1])
        self._inflight = np.zeros(num, dtype=np.bool_)
        self._n_inflight = 0
        self._notify = True
        #: the notification state last written to the ring (None: not written yet)
        self._notify_written: bool | None = None
        self._max_indirect = max(MAX_INDIRECT, num)
        self._arange = np.arange(num + 1, dtype=np.intp)
        self._arange.flags.writeable = False
        self._no_write = np.zeros(num, dtype=np.bool_)
        self._no_write.flags.writeable = False
        self._all_write = np.ones(num, dtype=np.bool_)
        self._all_write.flags.writeable = False

    # -- position ---------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    def get_base(self) -> int:
        """The ``GET_VRING_BASE`` value: the next avail index the device would process."""
        return self._last_avail

    @property
    def inflight(self) -> list[int]:
        """Heads popped and not yet completed."""
        return np.flatnonzero(self._inflight).tolist()

    # -- popping ----------------------------------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available and the device has not popped."""
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        n = (v.avail_w[1] - self._last_avail) & 0xFFFF
        if n > self.num:
            self._fail(f"avail idx moved {n} entries ahead (queue size {self.num})")
        return n

    def pop_batch(self, max_chains: int | None = None) -> ChainBatch:
        """Pop every available chain (at most ``max_chains``) in one go."""
        n = self.pending()
        v = self._v
        if max_chains is not None:
            n = min(n, max_chains)
        if n <= 0:
            return v.empty
        num = self.num
        last = self._last_avail
        start = last & self._mask
        if start + n <= num:
            heads = v.avail_ring[start : start + n].astype(np.intp)  # a copy: read once
        else:
            heads = np.concatenate((v.avail_ring[start:], v.avail_ring[: start + n - num]))
            heads = heads.astype(np.intp)
        batch = self._chains_for(v, heads, checked=False)
        last = (last + n) & 0xFFFF
        self._last_avail = last
        if self.event_idx and self._notify:
            v.avail_event_w[0] = last
        return batch

    def resubmit(self, heads: Sequence[int], last_avail: int) -> ChainBatch:
        """Take chains back after a back-end restart (inflight tracking), then go on from there.

        ``heads`` are the chains the previous back-end had taken and not completed (oldest
        first); they are walked and marked in flight as if popped, and the next avail entry to
        pop becomes ``last_avail`` (the used index plus the number of chains resubmitted).
        """
        self._check_broken()
        v = self._refresh()
        if not 0 <= last_avail <= 0xFFFF:
            raise InvalidParam(f"avail index {last_avail} out of range")
        h = np.asarray(heads, dtype=np.intp)
        batch = self._chains_for(v, h, checked=True) if h.shape[0] else v.empty
        self._last_avail = last_avail
        if self.event_idx and self._notify:
            v.avail_event_w[0] = self._last_avail
        return batch

    def _chains_for(
        self, v: _RingViews, heads: npt.NDArray[np.intp], *, checked: bool
    ) -> ChainBatch:
        """Walk the chains starting at ``heads`` and mark them in flight.

        ``heads`` must be non-negative unless ``checked`` (then their range is tested first);
        an index beyond the table breaks the queue either way (``take`` raises).
        """
        n = heads.shape[0]
        num = self.num
        if checked and (int(heads.max()) >= num or int(heads.min()) < 0):
            self._fail(f"avail ring head {int(heads.max())} out of range (size {num})")
        try:
            rec = v.desc.take(heads)  # one copy of every head descriptor: read once
        except IndexError:
            self._fail(f"avail ring head {int(heads.max())} out of range (size {num})")

        # walk all chains one step at a time, in parallel
        flags = rec["flags"]
        seen = int(_or_reduce(flags))
        if seen & _CHAINED:
            if seen & _NEXT:
                rec, starts = self._walk(v, rec, (flags & _NEXT) != 0, n)
                flags = rec["flags"]
                seen = int(_or_reduce(flags))
            else:
                starts = self._arange[: n + 1]
            if seen & _INDIRECT:
                rec, starts = self._expand_indirect(v.table, rec, starts)
                flags = rec["flags"]
                seen = int(_or_reduce(flags))
            single = starts.shape[0] == rec.shape[0] + 1
        else:
            starts = self._arange[: n + 1]
            single = True
        m = rec.shape[0]
        if not seen & _WRITE:
            writable, wflags = (self._no_write[:m] if m <= num else np.zeros(m, np.bool_)), 0
        else:
            writable = (flags & _WRITE) != 0
            wflags = 2
            if not single:  # some chain has several descriptors
                check_order(self, writable, starts)
        addr = rec["addr"]
        length = rec["len"]
        region, offset, base = locate_buffers(self, v.table, addr, length)

        # in flight: none of the heads may be, and none may appear twice
        inflight = self._inflight
        prev = inflight[heads]
        inflight[heads] = True
        count = _count(inflight)
        if count != self._n_inflight + n:
            if _count(prev):
                inflight[heads[~prev]] = False
                self._fail(f"head {int(heads[prev][0])} is already in flight")
            inflight[heads] = False
            self._fail("the same head appears twice in the avail ring")
        self._n_inflight = count
        return ChainBatch(
            v.table,
            heads,
            starts,
            addr,
            length,
            writable,
            region,
            offset,
            base=base,
            single=single,
            wflags=wflags,
        )

    def _walk(
        self,
        v: _RingViews,
        first: np.ndarray,
        has_next: npt.NDArray[np.bool_],
        n: int,
    ) -> tuple[np.ndarray, npt.NDArray[np.intp]]:
        """Follow NEXT links of every chain in parallel; loops end at queue-size steps."""
        num = self.num
        recs = [first]
        owners = [np.arange(n, dtype=np.intp)]
        active = owners[0][has_next]
        cur = first["next"][has_next].astype(np.intp)
        steps = 1
        while active.shape[0]:
            if int(cur.max()) >= num:
                self._fail(f"descriptor next index {int(cur.max())} out of range (size {num})")
            steps += 1
            if steps > num:
                self._fail("descriptor chain longer than the queue size (loop?)")
            rec = v.desc[cur]
            recs.append(rec)
            owners.append(active)
            more = (rec["flags"] & _NEXT) != 0
            active = active[more]
            cur = rec["next"][more].astype(np.intp)
        owner = np.concatenate(owners)
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=n)
        starts = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(counts, out=starts[1:])
        return np.concatenate(recs)[order], starts

    def _read_indirect(self, table: MemoryTable, addr: int, length: int) -> np.ndarray:
        """An indirect table's chain: its entries in NEXT order from entry 0."""
        tab = self._indirect_table(table, addr, length)
        count = tab.shape[0]
        flags = tab["flags"].tolist()
        nxt = tab["next"].tolist()
        order: list[int] = []
        i = 0
        while True:
            if flags[i] & _INDIRECT:
                self._fail("indirect descriptor inside an indirect table")
            order.append(i)
            if not flags[i] & _NEXT:
                break
            i = nxt[i]
            if i >= count:
                self._fail(f"indirect next index {i} outside the table of {count}")
            if len(order) >= count:
                self._fail("loop in an indirect table")
        return tab[order]

    # -- completing -------------------------------------------------------------------------

    def complete(
        self,
        ids: Sequence[int] | npt.NDArray[np.integer],
        lengths: Sequence[int] | npt.NDArray[np.integer],
    ) -> bool:
        """Put a batch of chains in the used ring (one index update).

        ``lengths`` are the bytes written to each chain's writable buffers. Returns whether
        the driver wants an interrupt (``VRING_AVAIL_F_NO_INTERRUPT`` or ``used_event``).
        """
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        ids_a, lens_a = self._completion_arrays(ids, lengths, self._mask)
        k = ids_a.shape[0]
        if k == 0:
            return False
        inflight = self._inflight
        if _count(inflight[ids_a]) != k:
            raise InvalidParam("completing a chain that is not in flight")
        inflight[ids_a] = False
        count = _count(inflight)
        if count != self._n_inflight - k:
            inflight[ids_a] = True
            raise InvalidParam("the same id completed twice in one batch")
        self._n_inflight = count
        old = self._used_idx
        start = old & self._mask
        used = v.used_words
        if start + k <= self.num:
            used[start : start + k, 0] = ids_a
            used[start : start + k, 1] = lens_a
        else:
            pos = (start + self._arange[:k]) & self._mask
            used[pos, 0] = ids_a
            used[pos, 1] = lens_a
        new = (old + k) & 0xFFFF
        v.used_w[1] = new  # publish after the entries
        self._used_idx = new
        if self.event_idx:
            return need_event(v.used_event_w[0], new, old)
        return not v.avail_w[0] & AVAIL_F_NO_INTERRUPT

    def _need_signal(self, v: _RingViews, old: int, new: int) -> bool:
        if self.event_idx:
            return need_event(v.used_event_w[0], new, old)
        return not v.avail_w[0] & AVAIL_F_NO_INTERRUPT

    # -- notification suppression -----------------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask for kicks again. Returns True when chains are already pending (pop them)."""
        self._check_broken()
        v = self._refresh()
        self._notify = True
        if self.event_idx:
            v.avail_event_w[0] = self._last_avail
        elif self._notify_written is not True:
            v.used_w[0] = v.used_w[0] & ~USED_F_NO_NOTIFY
            self._notify_written = True
        return self.pending() > 0

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (a hint; without EVENT_IDX only).

        The flag word is written only when its state changes (a device loop that disables
        before every round does not store to the ring each time).
        """
        self._check_broken()
        v = self._refresh()
        self._notify = False
        if not self.event_idx and self._notify_written is not False:
            v.used_w[0] = v.used_w[0] | USED_F_NO_NOTIFY
            self._notify_written = False

    def has_pending(self) -> bool:
        """Cheap poll: has the driver made chains available? (No checks; see :meth:`pending`.)"""
        return self._v.avail_w[1] != self._last_avail


# ----------------------------------------------------------------------------------------------
# driver role
# ----------------------------------------------------------------------------------------------


class SplitDriverQueue(DriverRole, _SplitBase):
    """The driver (guest) side of a split virtqueue, laid out by this object in guest memory.

    The ring (compact virtio 1.x layout, or legacy with ``align=4096``) starts at guest address
    ``gpa`` (16-byte aligned); when ``max_indirect`` > 0 a pool of one indirect table of
    ``max_indirect`` descriptors per head follows it. :meth:`footprint` says how many bytes to
    reserve. The ring memory is zeroed.
    """

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        gpa: int,
        *,
        features: int = 0,
        index: int = 0,
        max_indirect: int = 0,
        align: int = USED_ALIGN,
    ) -> None:
        layout = SplitLayout.compute(num, align)
        check_align("ring", gpa, DESC_ALIGN)
        mem.gpa_view(gpa, self.footprint(num, max_indirect=max_indirect, align=align))[:] = bytes(
            self.footprint(num, max_indirect=max_indirect, align=align)
        )
        super().__init__(
            mem,
            num,
            gpa + layout.desc,
            gpa + layout.avail,
            gpa + layout.used,
            "gpa",
            features,
            index,
        )
        self.layout = layout
        self.max_indirect = max_indirect if self.indirect else 0
        self._indirect_gpa = gpa + _align_up(layout.size, DESC_ALIGN)
        # the free descriptors, first in first out: _n_free of them in the ring _free from
        # _free_pos on. Heads come back in used order and go out again in that order, so a
        # device that uses buffers in order sees heads (and buffers indexed by head) in
        # ascending runs, not scattered.
        self._free = np.arange(num, dtype=np.intp)
        self._free_pos = 0
        self._arange = np.arange(num, dtype=np.intp)
        self._arange.flags.writeable = False
        self._n_free = num
        self._chain: list[list[int] | None] = [None] * num
        self._init_chain_state(num)
        #: whether the token of a chain from add_batch is its head (no token given)
        self._tok_is_head = np.zeros(num, dtype=np.bool_)
        self._shadow = 0
        self._published = 0
        self._last_used = 0
        self._irq = True

    @staticmethod
    def footprint(num: int, *, max_indirect: int = 0, align: int = USED_ALIGN) -> int:
        """Bytes of guest memory the queue occupies (ring plus indirect pool)."""
        size = SplitLayout.compute(num, align).size
        if max_indirect:
            size = _align_up(size, DESC_ALIGN) + num * max_indirect * 16
        return size

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return self._n_free

    def next_heads(self, n: int) -> npt.NDArray[np.intp]:
        """The heads the next :meth:`add_batch` of ``n`` chains will use (nothing is taken).

        Lets a driver whose buffer pool is indexed by head fill the buffers first.
        """
        if not 0 <= n <= self._n_free:
            raise InvalidOperation(f"queue full: {n} descriptors needed, {self._n_free} free")
        pos = self._free_pos
        end = pos + n
        if end <= self.num:
            return self._free[pos:end].copy()
        return np.concatenate((self._free[pos:], self._free[: end - self.num]))

    def _take_heads(self, n: int) -> npt.NDArray[np.intp]:
        heads = self.next_heads(n)
        self._free_pos = (self._free_pos + n) & self._mask
        self._n_free -= n
        return heads

    def _take(self, n: int) -> list[int]:
        return self._take_heads(n).tolist()

    def _give(self, heads: list[int] | npt.NDArray[np.intp]) -> None:
        k = len(heads)
        at = (self._free_pos + self._n_free) & self._mask
        end = at + k
        if end <= self.num:
            self._free[at:end] = heads
        else:
            cut = self.num - at
            self._free[at:] = heads[:cut]
            self._free[: end - self.num] = heads[cut:]
        self._n_free += k

    @property
    def avail_idx(self) -> int:
        """The avail index published so far."""
        return self._published

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    def add(
        self,
        out: Sequence[Buffer],
        in_: Sequence[Buffer] = (),
        token: Any = None,
        *,
        indirect: bool | None = None,
    ) -> int:
        """Add a chain: device-readable ``out`` buffers then device-writable ``in_`` buffers.

        Buffers are ``(guest_phys_addr, length)``. ``indirect=None`` uses an indirect table
        when negotiated and the chain has more than one buffer. Not visible to the device until
        :meth:`publish`. Returns the head index; raises :class:`InvalidOperation` when there
        are not enough free descriptors.
        """
        self._check_broken()
        v = self._refresh()
        outs, ins, indirect, needed = self._plan_chain(out, in_, indirect)
        total = len(outs) + len(ins)
        if needed > self._n_free:
            raise InvalidOperation(f"queue full: {needed} descriptors needed, {self._n_free} free")
        recs = np.zeros(total, SPLIT_DESC_DTYPE)
        bufs = outs + ins
        recs["addr"] = [a for a, _ in bufs]
        recs["len"] = [n for _, n in bufs]
        flags = np.array([0] * len(outs) + [_WRITE] * len(ins), dtype=np.uint16)
        flags[:-1] |= _NEXT
        recs["flags"] = flags
        if indirect:
            (head,) = self._take(1)
            recs["next"] = np.arange(1, total + 1) % 0x10000
            recs["next"][-1] = 0
            table = self._indirect_gpa + head * self.max_indirect * 16
            self._mem.gpa_array(table, SPLIT_DESC_DTYPE, total)[:] = recs
            v.desc[head] = (table, total * 16, _INDIRECT, 0)
            chain = [head]
        else:
            chain = self._take(total)
            nxt = [*chain[1:], 0]
            recs["next"] = nxt
            v.desc[chain] = recs
            head = chain[0]
        self._tokens[head] = token
        self._chain[head] = chain
        self._capacity[head] = sum(n for _, n in ins)
        self._single[head] = False
        v.avail_ring[self._shadow & self._mask] = head
        self._shadow = (self._shadow + 1) & 0xFFFF
        return head

    def add_batch(
        self,
        addrs: Sequence[int] | npt.NDArray[np.integer],
        lens: Sequence[int] | npt.NDArray[np.integer],
        *,
        writable: bool,
        tokens: Sequence[int] | npt.NDArray[np.integer] | None = None,
    ) -> npt.NDArray[np.intp]:
        """Add ``len(addrs)`` single-buffer chains at once (a few NumPy operations).

        Chain ``i`` is one buffer ``(addrs[i], lens[i])``, device-writable when ``writable``.
        ``tokens`` are integers handed back by :meth:`reap` / :meth:`reap_batch` (default: the
        head index). The effect on the ring and on this object is exactly that of calling
        :meth:`add` once per chain in order. Not visible to the device until :meth:`publish`.
        Returns the heads; raises :class:`InvalidOperation` (nothing added) when fewer than
        ``len(addrs)`` descriptors are free.
        """
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        addr_a, len_a, tok_a = batch_buffers(addrs, lens, tokens)
        n = addr_a.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.intp)
        top = self._n_free
        if n > top:
            raise InvalidOperation(f"queue full: {n} descriptors needed, {top} free")
        heads = self._take_heads(n)
        at = _run(heads, self._arange)  # a slice when the heads are consecutive
        if isinstance(at, slice):  # field by field into the ring: no record array to build
            d = v.desc[at]
            d["addr"] = addr_a
            d["len"] = len_a
            d["flags"] = _WRITE if writable else 0
            d["next"] = 0
        else:
            recs = np.empty(n, SPLIT_DESC_DTYPE)
            recs["addr"] = addr_a
            recs["len"] = len_a
            recs["flags"] = _WRITE if writable else 0
            recs["next"] = 0
            v.desc[at] = recs
        self._single[at] = True
        self._n_single += n
        if tokens is None:
            self._tok_is_head[at] = True
        else:
            self._tok_is_head[at] = False
            self._tok_arr[at] = tok_a
        if writable:
            self._cap_arr[at] = len_a
            self._n_single_w += _count(len_a)
        else:
            self._cap_arr[at] = 0
        start = self._shadow & self._mask
        end = start + n
        if end <= self.num:
            v.avail_ring[start:end] = heads
        else:
            cut = self.num - start
            v.avail_ring[start:] = heads[:cut]
            v.avail_ring[: end - self.num] = heads[cut:]
        self._shadow = (self._shadow + n) & 0xFFFF
        return heads

    def publish(self) -> bool:
        """Make every added chain visible (one avail idx store). Returns whether to kick."""
        self._check_broken()
        v = self._refresh()
        old, new = self._published, self._shadow
        if old == new:
            return False
        v.avail_w[1] = new  # after the descriptors and ring entries
        self._published = new
        if self.event_idx:
            return need_event(v.avail_event_w[0], new, old)
        return not v.used_w[0] & USED_F_NO_NOTIFY

    def pending_used(self) -> int:
        """Used entries the device has published and the driver has not reaped."""
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        n = (v.used_w[1] - self._last_used) & 0xFFFF
        in_flight = self.num - self._n_free
        if n > in_flight:
            self._fail(f"used idx moved {n} entries ahead with {in_flight} descriptors out")
        return n

    def reap(self, max_items: int | None = None) -> list[tuple[Any, int]]:
        """Take every used chain back: ``[(token, written_length), ...]`` in used-ring order.

        A chain without device-writable buffers reports length 0 whatever the device wrote
        (DPDK's vhost writes the readable length there for packed rings); a length beyond a
        chain's writable bytes breaks the queue.
        """
        n = self.pending_used()
        v = self._v
        if max_items is not None:
            n = min(n, max_items)
        out: list[tuple[Any, int]] = []
        if n:
            pos = (self._last_used + np.arange(n)) & self._mask
            entries = v.used_ring[pos]
            for head, length in zip(entries["id"].tolist(), entries["len"].tolist(), strict=True):
                chain = self._chain[head] if head < self.num else None
                if chain is None and head < self.num and self._single[head]:
                    # a chain from add_batch
                    if not self._cap_arr[head]:
                        length = 0  # no device-writable buffer: the used length means nothing
                    elif length > self._cap_arr[head]:
                        self._fail(
                            f"device wrote {length} bytes into a "
                            f"{int(self._cap_arr[head])}-byte buffer"
                        )
                    else:
                        self._n_single_w -= 1
                    token = head if self._tok_is_head[head] else int(self._tok_arr[head])
                    out.append((token, length))
                    self._single[head] = False
                    self._n_single -= 1
                    self._give([head])
                    continue
                if chain is None:
                    self._fail(f"device used id {head}, which is not in flight")
                if not self._capacity[head]:
                    length = 0  # no device-writable buffer: the used length means nothing
                elif length > self._capacity[head]:
                    self._fail(
                        f"device wrote {length} bytes into a {self._capacity[head]}-byte buffer"
                    )
                out.append((self._tokens[head], length))
                self._tokens[head] = None
                self._chain[head] = None
                self._give(chain[::-1])
            self._last_used = (self._last_used + n) & 0xFFFF
        if self.event_idx and self._irq:
            v.used_event_w[0] = self._last_used
        return out

    def reap_batch(
        self, max_items: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Like :meth:`reap`, as two arrays ``(tokens, written_lengths)``, vectorised.

        Every token must be an integer (chains from :meth:`add_batch` always are). When every
        reaped chain came from :meth:`add_batch` the whole batch is handled with a few NumPy
        operations; otherwise this falls back to :meth:`reap`.
        """
        n = self.pending_used()
        v = self._v
        if max_items is not None:
            n = min(n, max_items)
        if n == 0:
            if self.event_idx and self._irq:
                v.used_event_w[0] = self._last_used
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        start = self._last_used & self._mask
        end = start + n
        used = v.used_words
        if end <= self.num:
            entries = used[start:end].astype(np.intp)  # a copy: read once
        else:
            entries = np.concatenate((used[start:], used[: end - self.num])).astype(np.intp)
        ids = entries[:, 0]
        single = self._single
        # ids from the ring are unsigned: OR-ing them shows any beyond the (power of 2) size
        if int(_or_reduce(ids)) & ~self._mask:
            ids = None
        else:
            at = _run(ids, self._arange)  # a slice when the ids are consecutive
            if _count(single[at]) != n:
                ids = None
        if ids is None:
            items = self.reap(n)  # multi-descriptor chains or a bad id: the checked slow path
            return (
                np.array([t for t, _ in items], dtype=np.int64),
                np.array([ln for _, ln in items], dtype=np.int64),
            )
        single[at] = False
        count = _count(single)
        if count != self._n_single - n:
            single[ids] = True
            self._fail("device used the same id twice")
        if self._n_single_w:
            lens = entries[:, 1].astype(np.int64)
            lens = self._checked_lengths(lens, self._cap_arr[at], ids, single)
        else:  # no chain with a device-writable buffer: the used lengths mean nothing
            lens = self._lens0[:n]
        self._n_single = count
        is_head = self._tok_is_head[at]
        tokens = ids.astype(np.int64)
        if _count(is_head) != n:
            tokens = np.where(is_head, tokens, self._tok_arr[at])
        self._give(ids)
        self._last_used = (self._last_used + n) & 0xFFFF
        if self.event_idx and self._irq:
            v.used_event_w[0] = self._last_used
        return tokens, lens

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications. Returns True when used entries are pending."""
        self._check_broken()
        v = self._refresh()
        self._irq = True
        if self.event_idx:
            v.used_event[0] = self._last_used
        else:
            v.avail_hdr[0] = int(v.avail_hdr[0]) & ~AVAIL_F_NO_INTERRUPT
        return self.pending_used() > 0

    def disable_interrupts(self) -> None:
        """Suppress used-buffer notifications (a hint; only the flag without EVENT_IDX)."""
        self._check_broken()
        v = self._refresh()
        self._irq = False
        if not self.event_idx:
            v.avail_hdr[0] = int(v.avail_hdr[0]) | AVAIL_F_NO_INTERRUPT
