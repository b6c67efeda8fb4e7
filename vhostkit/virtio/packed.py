"""Packed virtqueues (virtio 1.2 section 2.8), in the driver role and in the device role.

Layout: a ring of ``num`` 16-byte descriptors (``addr u64, len u32, id u16, flags u16``,
16-byte aligned), the driver event suppression area and the device event suppression area
(``off_wrap u16, flags u16`` each, 4-byte aligned). In a :class:`~vhostkit.backend.VringAddr`
they are ``desc``, ``avail`` and ``used``.

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED bit
does not; used when both equal the device's used wrap counter. The driver publishes a batch by
writing the flags of the batch's first head last; the device completes a batch by writing the
flags of its first used descriptor last.

Ring positions for ``SET_VRING_BASE`` / ``GET_VRING_BASE`` are encoded as in Linux vhost:
bits 0-14 the last avail index, bit 15 the avail wrap counter; bits 16-30 and 31 the same for
the used side. vhost-user peers (QEMU, DPDK) send only the low 16 bits: when the high 16 bits
are zero the used position is taken equal to the avail position (no buffers in flight). The
one ambiguous case, used index 0 with wrap counter 0 and a different avail position, cannot be
expressed; vhost has the same limit.

The error policy is described in :mod:`vhostkit.virtio.ring`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.ring import (
    Buffer,
    ChainBatch,
    DescFlag,
    DeviceRole,
    DriverRole,
    PackedEventFlag,
    RingBase,
    batch_buffers,
    check_align,
    check_order,
    check_queue_size,
    locate_buffers,
    need_event,
    u16_words,
)
from vhostkit.virtio.ring import (
    int_array as _int_array,
)

__all__ = [
    "EVENT_ALIGN",
    "PACKED_DESC_DTYPE",
    "PACKED_RING_ALIGN",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "decode_base",
    "encode_base",
    "packed_ring_size",
]

log = logging.getLogger(__name__)

PACKED_RING_ALIGN = 16
EVENT_ALIGN = 4

#: ``struct vring_packed_desc``
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_AVAIL = int(DescFlag.AVAIL)
_USED = int(DescFlag.USED)
_WRAP_SHIFT = 15
_DISABLE = int(PackedEventFlag.DISABLE)
_DESC = int(PackedEventFlag.DESC)
_BOTH = _AVAIL | _USED
_CHAINED = _NEXT | _INDIRECT
_or_reduce = np.bitwise_or.reduce
_max = np.maximum.reduce
_count = np.count_nonzero


def _lap_pattern(num: int, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
    """Per wrap counter ``w``: ``2 * num`` u16 values, ``first``/``second`` (for ``w == 1``)
    on the first lap and the other one on the second (positions past the ring's end)."""
    lap = np.arange(2 * num) >= num
    one = np.where(lap, second, first).astype(np.uint16)
    zero = np.where(lap, first, second).astype(np.uint16)
    for a in (one, zero):
        a.flags.writeable = False
    return zero, one


MAX_INDIRECT = 1024


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


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


def _event_due(off_wrap: int, wrap: int, new: int, count: int, num: int) -> bool:
    """Did the last ``count`` positions up to ``new`` (current wrap ``wrap``) pass the event?"""
    off = off_wrap & 0x7FFF
    if off_wrap >> _WRAP_SHIFT != wrap:
        off -= num
    return need_event(off, new, new - count)


class _PackedViews:
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


class _PackedBase(RingBase):
    _views_type = _PackedViews
    _desc_dtype = PACKED_DESC_DTYPE
    _v: _PackedViews

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
# device role
# ----------------------------------------------------------------------------------------------


class PackedDeviceQueue(DeviceRole, _PackedBase):
    """The device (backend) side of a packed virtqueue.

    ``base`` is a ``SET_VRING_BASE`` value (see :func:`encode_base`); ``None`` is a fresh ring
    (index 0, wrap counters 1).
    """

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc: int,
        driver_event: int,
        device_event: int,
        *,
        space: Literal["gpa", "uva"] = "gpa",
        features: int = 0,
        base: int | None = None,
        index: int = 0,
    ) -> None:
        super().__init__(mem, num, desc, driver_event, device_event, space, features, index)
        a_idx, a_wrap, u_idx, u_wrap = decode_base(0x8000 if base is None else base)
        if a_idx >= num or u_idx >= num:
            raise InvalidParam(f"packed ring base {base:#x} beyond queue size {num}")
        self._last_avail, self._avail_wrap = a_idx, a_wrap
        self._used_idx, self._used_wrap = u_idx, u_wrap
        self._inflight = np.zeros(0x10000, dtype=np.bool_)
        #: ids below this bound were ever in flight (the in-flight count looks only there)
        self._id_bound = 0
        #: descriptors per chain in flight; 1 for every id not in flight as a longer chain
        self._ring_count = np.ones(0x10000, dtype=np.int64)
        #: chains of several descriptors in flight
        self._n_multi = 0
        self._n_ids = 0
        self._n_descs = 0
        self._notify = True
        self._dev_flags_written: int | None = None
        self._max_indirect = max(MAX_INDIRECT, num)
        # _avail_bits[wrap][last + i]: AVAIL/USED bits of an available descriptor i positions
        # after ``last``
        self._avail_bits = _lap_pattern(num, _AVAIL, _USED)
        self._arange = np.arange(num + 1, dtype=np.intp)
        self._arange.flags.writeable = False
        self._no_write = np.zeros(num, dtype=np.bool_)
        self._no_write.flags.writeable = False
        #: the ring descriptors the last non-empty :meth:`pop_batch` took (copies, in ring
        #: order) and the descriptors of each chain (``None``: one each); for inflight tracking
        self.last_popped: tuple[np.ndarray, npt.NDArray[np.intp] | None] = (
            np.zeros(0, PACKED_DESC_DTYPE),
            None,
        )

    # -- position ---------------------------------------------------------------------------

    def get_base(self) -> int:
        """The ``GET_VRING_BASE`` value (avail position low, used position high)."""
        return encode_base(self._last_avail, self._avail_wrap, self._used_idx, self._used_wrap)

    @property
    def used_position(self) -> tuple[int, int]:
        """``(used index, used wrap counter)``: where the next used descriptor goes."""
        return self._used_idx, self._used_wrap

    @property
    def avail_position(self) -> tuple[int, int]:
        """``(avail index, avail wrap counter)``: the next descriptor to take."""
        return self._last_avail, self._avail_wrap

    @property
    def ring_flags(self) -> npt.NDArray[np.uint16]:
        """The flags of every ring descriptor (a live view of the ring)."""
        return self._refresh().flags

    @property
    def inflight(self) -> list[int]:
        """Buffer ids popped and not yet completed."""
        return np.flatnonzero(self._inflight).tolist()

    def resubmit(
        self,
        descs: np.ndarray,
        counts: Sequence[int] | npt.NDArray[np.integer],
        used_idx: int,
        used_wrap: int,
    ) -> ChainBatch:
        """Take chains back after a back-end restart (inflight tracking), then go on from there.

        ``descs`` are copies of the ring descriptors the previous back-end had taken and not
        completed (``addr, len, id, flags`` fields, chain after chain, oldest chain first),
        ``counts`` the ring descriptors of each chain. The chains are built from the copies, not
        from the ring (whose slots may hold used descriptors by now; indirect tables are read
        from guest memory, the driver keeps them until the chain is used) and their ids marked
        in flight. The used position becomes ``(used_idx, used_wrap)``, the avail position that
        plus every resubmitted descriptor. Only on a queue with nothing in flight.
        """
        self._check_broken()
        v = self._refresh()
        num = self.num
        if self._n_ids or self._n_descs:
            raise InvalidOperation("resubmitting on a queue with chains in flight")
        if not 0 <= used_idx < num:
            raise InvalidParam(f"used index {used_idx} beyond queue size {num}")
        c = _int_array(counts).astype(np.intp)
        n = c.shape[0]
        total = int(c.sum()) if n else 0
        if descs.shape[0] != total or (n and int(c.min()) < 1):
            raise InvalidParam("chain lengths do not add up to the descriptors given")
        if total > num:
            raise InvalidParam(f"{total} descriptors resubmitted to a ring of {num}")
        batch = v.empty
        if n:
            rec = np.empty(total, PACKED_DESC_DTYPE)
            for name in ("addr", "len", "id", "flags"):
                rec[name] = descs[name]
            starts = np.zeros(n + 1, dtype=np.intp)
            np.cumsum(c, out=starts[1:])
            ends = starts[1:] - 1
            flags = rec["flags"]
            not_last = np.ones(total, dtype=np.bool_)
            not_last[ends] = False
            if ((flags & _NEXT) != 0).tolist() != not_last.tolist():
                self._fail("resubmitted chain with NEXT flags that do not match its length")
            ids = rec["id"][ends].astype(np.intp)
            if int(flags_or := _or_reduce(flags)) & _INDIRECT:
                rec, starts = self._expand_indirect(v.table, rec, starts)
                flags = rec["flags"]
                flags_or = _or_reduce(flags)
            single = starts.shape[0] == rec.shape[0] + 1
            chains = self._chain_batch(v, rec, ids, starts, int(flags_or), single)
            if np.unique(ids).shape[0] != n:
                self._fail("the same buffer id resubmitted twice")
            self._inflight[ids] = True
            self._id_bound = max(self._id_bound, int(_max(ids)) + 1)
            self._n_ids = n
            multi = c > 1
            if _count(multi):
                self._ring_count[ids] = c
                self._n_multi = _count(multi)
            self._n_descs = total
            batch = chains
        self._used_idx, self._used_wrap = used_idx, used_wrap & 1
        nxt, wrap = used_idx + total, used_wrap & 1
        if nxt >= num:
            nxt -= num
            wrap ^= 1
        self._last_avail, self._avail_wrap = nxt, wrap
        if self.event_idx and self._notify:
            v.dev_evt[0] = nxt | wrap << _WRAP_SHIFT
        return batch

    # -- popping ----------------------------------------------------------------------------

    def _count_available(self, v: _PackedViews) -> int:
        """How many descriptors from the next avail position on are available.

        Only the flags are read (the descriptors themselves are read after, as the spec's
        memory ordering wants), and only as far as descriptors can be available: the ones
        not in flight.
        """
        num = self.num
        last = self._last_avail
        room = num - self._n_descs
        look = room + 1 if room < num else num  # one more: a driver overrunning the ring
        end = last + look
        flags = v.flags
        f = flags[last:end] if end <= num else np.concatenate((flags[last:], flags[: end - num]))
        bad = (f & _BOTH) != self._avail_bits[self._avail_wrap][last:end]
        first = int(bad.argmax())
        count = first if bad[first] else look
        if count > room:
            self._fail(f"{count} descriptors available with {self._n_descs} of {num} in flight")
        return count

    def pending(self) -> int:
        """Descriptors (not chains) the driver has made available and the device not popped."""
        self._check_broken()
        return self._count_available(self._refresh())

    def pop_batch(self, max_chains: int | None = None) -> ChainBatch:
        """Pop every available chain (at most ``max_chains``) in one go."""
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        count = self._count_available(v)
        if count == 0 or max_chains == 0:
            return v.empty
        num = self.num
        last = self._last_avail
        end = last + count
        # one copy of the available descriptors, read after their flags
        desc = v.desc
        if end <= num:
            rows = desc[last:end].copy()
        else:
            rows = np.concatenate((desc[last:], desc[: end - num]))
        flags = rows["flags"]
        seen = int(_or_reduce(flags))
        ring_count = None
        if seen & _CHAINED:
            rec, ids, starts, ring_count = self._chains(v, rows, flags, count, max_chains)
            used = int(ring_count.sum())
            self.last_popped = (rows[:used], ring_count)
            flags = rec["flags"]
            seen = int(_or_reduce(flags))
            single = starts.shape[0] == rec.shape[0] + 1
        else:
            n = count if max_chains is None else min(count, max_chains)
            rec = rows if n == count else rows[:n]
            flags = rec["flags"]
            ids = rec["id"].astype(np.intp)
            starts = self._arange[: n + 1]
            used = n
            single = True
            self.last_popped = (rec, None)
        n = ids.shape[0]
        batch = self._chain_batch(v, rec, ids, starts, seen, single)

        # in flight: none of the ids may be, and none may appear twice
        inflight = self._inflight
        top = int(_max(ids)) + 1
        if top > self._id_bound:
            self._id_bound = top
        prev = inflight[ids]
        inflight[ids] = True
        n_ids = _count(inflight[: self._id_bound])
        if n_ids != self._n_ids + n:
            if _count(prev):
                inflight[ids[~prev]] = False
                self._fail(f"buffer id {int(ids[prev][0])} is already in flight")
            inflight[ids] = False
            self._fail("the same buffer id is used twice")
        self._n_ids = n_ids
        if ring_count is not None and used != n:  # some chain has several descriptors
            self._ring_count[ids] = ring_count
            self._n_multi += _count(ring_count > 1)
        self._n_descs += used
        nxt = last + used
        if nxt >= num:
            nxt -= num
            self._avail_wrap ^= 1
        self._last_avail = nxt
        if self.event_idx and self._notify:
            v.dev_evt[0] = nxt | self._avail_wrap << _WRAP_SHIFT
            if self._dev_flags_written != _DESC:
                v.dev_evt[1] = _DESC
                self._dev_flags_written = _DESC
        return batch

    def _chain_batch(
        self,
        v: _PackedViews,
        rec: np.ndarray,
        ids: npt.NDArray[np.intp],
        starts: npt.NDArray[np.intp],
        flags_or: int,
        single: bool,
    ) -> ChainBatch:
        """The :class:`ChainBatch` of the chains ``rec[starts[i]:starts[i + 1]]`` (indirect
        tables expanded; ``flags_or``: at least the OR of their flags): the device-writable
        buffers must follow the readable ones in each chain, and every buffer lie in guest
        memory. Changes nothing: a bad chain fails before the caller takes the ids."""
        m = rec.shape[0]
        if not flags_or & _WRITE:
            writable, wflags = (self._no_write[:m] if m <= self.num else np.zeros(m, np.bool_)), 0
        else:
            writable = (rec["flags"] & _WRITE) != 0
            wflags = 2
            if not single:
                check_order(self, writable, starts)
        addr = rec["addr"]
        length = rec["len"]
        region, offset, base = locate_buffers(self, v.table, addr, length)
        return ChainBatch(
            v.table,
            ids,
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

    def _chains(
        self,
        v: _PackedViews,
        rows: np.ndarray,
        flags: np.ndarray,
        count: int,
        max_chains: int | None,
    ) -> tuple[np.ndarray, npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Chains with NEXT or INDIRECT: ``(descriptors, ids, starts, ring slots per chain)``."""
        last_mask = (flags & _NEXT) == 0
        ends = np.flatnonzero(last_mask)
        if not last_mask[count - 1]:
            if count == self.num:
                self._fail("descriptor chain longer than the queue size")
            self._fail("chain continues into a descriptor that is not available")
        if max_chains is not None:
            ends = ends[:max_chains]
        n = ends.shape[0]
        used = int(ends[-1]) + 1
        starts = np.zeros(n + 1, dtype=np.intp)
        starts[1:] = ends + 1
        ring_count = np.diff(starts)
        ids = rows["id"][ends].astype(np.intp)
        rec = rows[:used]
        if (rec["flags"] & _INDIRECT).any():
            rec, starts = self._expand_indirect(v.table, rec, starts)
        return rec, ids, starts, ring_count

    def _read_indirect(self, table: MemoryTable, addr: int, length: int) -> np.ndarray:
        """An indirect table: every entry in order (NEXT and ids are ignored, per the spec)."""
        tab = self._indirect_table(table, addr, length)
        if (tab["flags"] & _INDIRECT).any():
            self._fail("indirect descriptor inside an indirect table")
        return tab

    # -- completing -------------------------------------------------------------------------

    def complete(
        self,
        ids: Sequence[int] | npt.NDArray[np.integer],
        lengths: Sequence[int] | npt.NDArray[np.integer],
    ) -> bool:
        """Write a batch of used descriptors (first one's flags last). Returns whether to signal."""
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        ids_a, lens_a = self._completion_arrays(ids, lengths, 0xFFFF)
        k = ids_a.shape[0]
        if k == 0:
            return False
        inflight = self._inflight
        if _count(inflight[ids_a]) != k:
            raise InvalidParam("completing a buffer id that is not in flight")
        inflight[ids_a] = False
        n_ids = _count(inflight[: self._id_bound])
        if n_ids != self._n_ids - k:
            inflight[ids_a] = True
            raise InvalidParam("the same id completed twice in one batch")
        self._n_ids = n_ids
        num = self.num
        u = self._used_idx
        w = self._used_wrap
        desc = v.desc
        if self._n_multi == 0 or _count(self._ring_count[ids_a] > 1) == 0:
            # one descriptor per chain: the used descriptors are the next k slots
            total = k
            first = _BOTH if w else 0
            end = u + k
            if end <= num:
                desc["id"][u:end] = ids_a
                desc["len"][u:end] = lens_a
                v.flags[u + 1 : end] = first
            else:
                cut = num - u
                desc["id"][u:] = ids_a[:cut]
                desc["len"][u:] = lens_a[:cut]
                desc["id"][: end - num] = ids_a[cut:]
                desc["len"][: end - num] = lens_a[cut:]
                v.flags[u + 1 :] = first
                v.flags[: end - num] = first ^ _BOTH
            v.words[8 * u + 7] = first  # publishes the whole batch
        else:
            counts = self._ring_count[ids_a]
            self._n_multi -= _count(counts > 1)
            self._ring_count[ids_a] = 1
            offs = np.zeros(k, dtype=np.int64)
            np.cumsum(counts[:-1], out=offs[1:])
            total = int(offs[-1] + counts[-1])
            pos = u + offs
            crossed = pos >= num
            pos[crossed] -= num
            wrap = crossed ^ bool(w)
            flags = np.where(wrap, _BOTH, 0).astype(np.uint16)
            desc["id"][pos] = ids_a
            desc["len"][pos] = lens_a
            if k > 1:
                v.flags[pos[1:]] = flags[1:]
            v.flags[pos[0]] = flags[0]  # publishes the whole batch
        self._n_descs -= total
        nxt = u + total
        if nxt >= num:
            nxt -= num
            self._used_wrap ^= 1
        self._used_idx = nxt
        return self._need_signal(v, total)

    def _need_signal(self, v: _PackedViews, count: int) -> bool:
        flags = v.drv_evt[1]
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self.event_idx:
            return True
        return _event_due(v.drv_evt[0], self._used_wrap, self._used_idx, count, self.num)

    # -- notification suppression -----------------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask for kicks again. Returns True when descriptors are already pending."""
        self._check_broken()
        v = self._refresh()
        self._notify = True
        if self.event_idx:
            v.dev_evt[0] = self._last_avail | self._avail_wrap << _WRAP_SHIFT
            flags = _DESC
        else:
            flags = int(PackedEventFlag.ENABLE)
        if self._dev_flags_written != flags:
            v.dev_evt[1] = flags
            self._dev_flags_written = flags
        return self.pending() > 0

    def has_pending(self) -> bool:
        """Cheap poll: is the next descriptor available? (No checks; see :meth:`pending`.)"""
        f = self._v.words[8 * self._last_avail + 7] & _BOTH
        return f == (_AVAIL if self._avail_wrap else _USED)

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (the flags are stored only when they change)."""
        self._check_broken()
        v = self._refresh()
        self._notify = False
        if self._dev_flags_written != _DISABLE:
            v.dev_evt[1] = _DISABLE
            self._dev_flags_written = _DISABLE


# ----------------------------------------------------------------------------------------------
# driver role
# ----------------------------------------------------------------------------------------------


class PackedDriverQueue(DriverRole, _PackedBase):
    """The driver (guest) side of a packed virtqueue, laid out by this object in guest memory.

    The descriptor ring starts at ``gpa`` (16-byte aligned), followed by the driver and device
    event areas, then (``max_indirect`` > 0) one indirect table per buffer id. The memory is
    zeroed. Buffer ids come from a free list of ``num`` ids.
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
    ) -> None:
        check_queue_size(num, power_of_two=False)
        check_align("ring", gpa, PACKED_RING_ALIGN)
        size = self.footprint(num, max_indirect=max_indirect)
        mem.gpa_view(gpa, size)[:] = bytes(size)
        super().__init__(mem, num, gpa, gpa + 16 * num, gpa + 16 * num + 4, "gpa", features, index)
        self.max_indirect = max_indirect if self.indirect else 0
        self._indirect_gpa = gpa + _align_up(packed_ring_size(num), PACKED_RING_ALIGN)
        # the free buffer ids, first in first out: _n_free_ids of them in the ring _free_ids
        # from _free_pos on (ids, and buffers indexed by id, go out in the order they came
        # back)
        self._free_ids = np.arange(num, dtype=np.intp)
        self._free_pos = 0
        self._n_free_ids = num
        self._free_descs = num
        self._count = [0] * num
        self._init_chain_state(num)
        #: whether the token of a chain from add_batch is its buffer id (no token given)
        self._tok_is_id = np.zeros(num, dtype=np.bool_)
        # _used_bits[wrap][next + i]: AVAIL/USED bits of a used descriptor i slots on
        self._used_bits = _lap_pattern(num, _BOTH, 0)
        self._next_avail, self._avail_wrap = 0, 1
        self._next_used, self._used_wrap = 0, 1
        self._deferred: tuple[int, int] | None = None
        self._added = 0
        self._irq = True
        self._write_irq_state(self._v)

    @staticmethod
    def footprint(num: int, *, max_indirect: int = 0) -> int:
        """Bytes of guest memory the queue occupies (ring, event areas, indirect pool)."""
        size = packed_ring_size(num)
        if max_indirect:
            size = _align_up(size, PACKED_RING_ALIGN) + num * max_indirect * 16
        return size

    @property
    def num_free(self) -> int:
        """Free descriptor slots."""
        return self._free_descs if self._n_free_ids else 0

    def next_heads(self, n: int) -> npt.NDArray[np.intp]:
        """The buffer ids the next :meth:`add_batch` of ``n`` chains will use (nothing is
        taken); lets a driver whose buffer pool is indexed by id fill the buffers first."""
        if not 0 <= n <= min(self._free_descs, self._n_free_ids):
            raise InvalidOperation(f"queue full: {n} descriptors needed, {self.num_free} free")
        return self._peek_ids(n)

    def _peek_ids(self, n: int) -> npt.NDArray[np.intp]:
        pos = self._free_pos
        end = pos + n
        if end <= self.num:
            return self._free_ids[pos:end].copy()
        return np.concatenate((self._free_ids[pos:], self._free_ids[: end - self.num]))

    def _take_ids(self, n: int) -> npt.NDArray[np.intp]:
        ids = self._peek_ids(n)
        pos = self._free_pos + n
        self._free_pos = pos - self.num if pos >= self.num else pos
        self._n_free_ids -= n
        return ids

    def _give_ids(self, ids: list[int] | npt.NDArray[np.intp]) -> None:
        k = len(ids)
        at = self._free_pos + self._n_free_ids
        if at >= self.num:
            at -= self.num
        end = at + k
        if end <= self.num:
            self._free_ids[at:end] = ids
        else:
            cut = self.num - at
            self._free_ids[at:] = ids[:cut]
            self._free_ids[: end - self.num] = ids[cut:]
        self._n_free_ids += k

    def add(
        self,
        out: Sequence[Buffer],
        in_: Sequence[Buffer] = (),
        token: Any = None,
        *,
        indirect: bool | None = None,
    ) -> int:
        """Add a chain (``out`` buffers then ``in_`` buffers); returns its buffer id.

        Visible to the device only after :meth:`publish`.
        """
        self._check_broken()
        v = self._refresh()
        outs, ins, indirect, needed = self._plan_chain(out, in_, indirect)
        total = len(outs) + len(ins)
        if needed > self._free_descs or not self._n_free_ids:
            raise InvalidOperation(
                f"queue full: {needed} descriptors needed, {self._free_descs} free"
            )
        bid = int(self._take_ids(1)[0])
        bufs = outs + ins
        wflags = [0] * len(outs) + [_WRITE] * len(ins)
        if indirect:
            tab = np.zeros(total, PACKED_DESC_DTYPE)
            tab["addr"] = [a for a, _ in bufs]
            tab["len"] = [n for _, n in bufs]
            tab["flags"] = wflags
            table = self._indirect_gpa + bid * self.max_indirect * 16
            self._mem.gpa_array(table, PACKED_DESC_DTYPE, total)[:] = tab
            bufs = [(table, total * 16)]
            wflags = [_INDIRECT]
        num = self.num
        pos, wrap = self._next_avail, self._avail_wrap
        positions: list[int] = []
        flag_values: list[int] = []
        for i, wf in enumerate(wflags):
            f = wf | (_NEXT if i < needed - 1 else 0)
            flag_values.append(f | (_AVAIL if wrap else _USED))
            positions.append(pos)
            pos += 1
            if pos == num:
                pos, wrap = 0, wrap ^ 1
        # never write the flags with the body: a zero there could read as "used"
        desc = v.desc
        desc["addr"][positions] = [a for a, _ in bufs]
        desc["len"][positions] = [n for _, n in bufs]
        desc["id"][positions] = bid
        if needed > 1:
            desc["flags"][positions[1:]] = flag_values[1:]
        head = (positions[0], flag_values[0])
        if self._deferred is None:
            self._deferred = head  # the batch's first head: published by publish()
        else:
            v.desc["flags"][head[0]] = head[1]
        self._next_avail, self._avail_wrap = pos, wrap
        self._added += needed
        self._free_descs -= needed
        self._count[bid] = needed
        self._tokens[bid] = token
        self._capacity[bid] = sum(n for _, n in ins)
        return bid

    def add_batch(
        self,
        addrs: Sequence[int] | npt.NDArray[np.integer],
        lens: Sequence[int] | npt.NDArray[np.integer],
        *,
        writable: bool,
        tokens: Sequence[int] | npt.NDArray[np.integer] | None = None,
    ) -> npt.NDArray[np.intp]:
        """Add ``len(addrs)`` single-buffer chains at once (a few NumPy operations).

        Same contract as :meth:`SplitDriverQueue.add_batch`: exactly the effect of one
        :meth:`add` per chain, in order; integer ``tokens`` (default: the buffer id). Returns
        the buffer ids.
        """
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        addr_a, len_a, tok_a = batch_buffers(addrs, lens, tokens)
        n = addr_a.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.intp)
        top = self._n_free_ids
        if n > self._free_descs or n > top:
            raise InvalidOperation(
                f"queue full: {n} descriptors needed, {min(self._free_descs, top)} free"
            )
        bids = self._take_ids(n)
        num = self.num
        base = _WRITE if writable else 0
        first = base | (_AVAIL if self._avail_wrap else _USED)
        desc = v.desc
        pos = self._next_avail
        end = pos + n
        # never write the flags with the body; the batch's first head goes last (publish)
        if end <= num:
            desc["addr"][pos:end] = addr_a
            desc["len"][pos:end] = len_a
            desc["id"][pos:end] = bids
            if self._deferred is None:
                v.flags[pos + 1 : end] = first
                self._deferred = (pos, first)
            else:
                v.flags[pos:end] = first
        else:
            cut = num - pos
            desc["addr"][pos:] = addr_a[:cut]
            desc["len"][pos:] = len_a[:cut]
            desc["id"][pos:] = bids[:cut]
            desc["addr"][: end - num] = addr_a[cut:]
            desc["len"][: end - num] = len_a[cut:]
            desc["id"][: end - num] = bids[cut:]
            v.flags[: end - num] = first ^ _BOTH  # the next lap: the other wrap counter
            if self._deferred is None:
                v.flags[pos + 1 :] = first
                self._deferred = (pos, first)
            else:
                v.flags[pos:] = first
        if end >= num:
            end -= num
            self._avail_wrap ^= 1
        self._next_avail = end
        self._added += n
        self._free_descs -= n
        self._single[bids] = True
        self._n_single += n
        if tokens is None:
            self._tok_is_id[bids] = True
        else:
            self._tok_is_id[bids] = False
            self._tok_arr[bids] = tok_a
        if writable:
            self._cap_arr[bids] = len_a
            self._n_single_w += _count(len_a)
        else:
            self._cap_arr[bids] = 0
        return bids

    def publish(self) -> bool:
        """Make the batch visible (its first head's flags written last). Returns whether to kick."""
        self._check_broken()
        v = self._refresh()
        if self._deferred is None:
            return False
        pos, f = self._deferred
        v.desc["flags"][pos] = f
        count = self._added
        self._deferred = None
        self._added = 0
        flags = int(v.dev_evt[1])
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self.event_idx:
            return True
        return _event_due(int(v.dev_evt[0]), self._avail_wrap, self._next_avail, count, self.num)

    def _used_at_head(self, v: _PackedViews) -> bool:
        f = v.words[8 * self._next_used + 7] & _BOTH
        return f == (_BOTH if self._used_wrap else 0)

    def pending_used(self) -> bool:
        """True when the device has used the next buffer in ring order."""
        self._check_broken()
        return self._used_at_head(self._refresh())

    def reap(self, max_items: int | None = None) -> list[tuple[Any, int]]:
        """Take used buffers back: ``[(token, written_length), ...]`` in ring order.

        A chain without device-writable buffers reports length 0 whatever the device wrote
        (DPDK's vhost writes the readable length there); a length beyond a chain's writable
        bytes breaks the queue.
        """
        self._check_broken()
        v = self._refresh()
        num = self.num
        out: list[tuple[Any, int]] = []
        while (max_items is None or len(out) < max_items) and self._used_at_head(v):
            row = v.desc[self._next_used]
            bid, length = int(row["id"]), int(row["len"])
            if bid < num and self._single[bid]:  # a chain from add_batch
                if not self._cap_arr[bid]:
                    length = 0  # no device-writable buffer: the used length means nothing
                elif length > self._cap_arr[bid]:
                    self._fail(
                        f"device wrote {length} bytes into a {int(self._cap_arr[bid])}-byte buffer"
                    )
                else:
                    self._n_single_w -= 1
                token = bid if self._tok_is_id[bid] else int(self._tok_arr[bid])
                out.append((token, length))
                self._single[bid] = False
                self._n_single -= 1
                self._give_ids([bid])
                self._free_descs += 1
                nxt = self._next_used + 1
                if nxt >= num:
                    nxt -= num
                    self._used_wrap ^= 1
                self._next_used = nxt
                continue
            if bid >= num or not self._count[bid]:
                self._fail(f"device used buffer id {bid}, which is not in flight")
            if not self._capacity[bid]:
                length = 0  # no device-writable buffer: the used length means nothing
            elif length > self._capacity[bid]:
                self._fail(f"device wrote {length} bytes into a {self._capacity[bid]}-byte buffer")
            out.append((self._tokens[bid], length))
            cnt = self._count[bid]
            self._count[bid] = 0
            self._tokens[bid] = None
            self._give_ids([bid])
            self._free_descs += cnt
            nxt = self._next_used + cnt
            if nxt >= num:
                nxt -= num
                self._used_wrap ^= 1
            self._next_used = nxt
        if self.event_idx and self._irq:
            v.drv_evt[0] = self._next_used | self._used_wrap << _WRAP_SHIFT
        return out

    def reap_batch(
        self, max_items: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Like :meth:`reap`, as two arrays ``(tokens, written_lengths)``, vectorised.

        Every token must be an integer. A run of used chains that all came from
        :meth:`add_batch` (one descriptor each, so their used descriptors are adjacent) is
        handled with a few NumPy operations; anything else falls back to :meth:`reap`.
        """
        if self._broken is not None:
            raise self._broken
        v = self._v if self._mem.generation == self._gen else self._refresh()
        num = self.num
        k = num - self._free_descs
        if max_items is not None:
            k = min(k, max_items)
        n = 0
        cut = False  # the run stopped at a chain that add() made
        u = self._next_used
        if k > 0:
            end = u + k
            flags = v.flags
            f = flags[u:end] if end <= num else np.concatenate((flags[u:], flags[: end - num]))
            bad = (f & _BOTH) != self._used_bits[self._used_wrap][u:end]
            first = int(bad.argmax())
            n = first if bad[first] else k
            if n:
                end = u + n
                ids_v = v.desc["id"]
                if end <= num:  # read after the flags
                    ids = ids_v[u:end].astype(np.intp)
                else:
                    ids = np.concatenate((ids_v[u:], ids_v[: end - num])).astype(np.intp)
                if int(_max(ids)) >= num or _count(self._single[ids]) != n:
                    ok = (ids < num) & self._single[np.minimum(ids, num - 1)]
                    n = int(np.argmin(ok))
                    ids = ids[:n]
                    cut = True
        if n == 0:
            items = self.reap(max_items)
            return (
                np.array([t for t, _ in items], dtype=np.int64),
                np.array([ln for _, ln in items], dtype=np.int64),
            )
        single = self._single
        single[ids] = False
        count = _count(single)
        if count != self._n_single - n:
            single[ids] = True
            self._fail("device used the same buffer id twice")
        if self._n_single_w:
            end = u + n
            lens_v = v.desc["len"]
            if end <= num:
                lens = lens_v[u:end].astype(np.int64)
            else:
                lens = np.concatenate((lens_v[u:], lens_v[: end - num])).astype(np.int64)
            lens = self._checked_lengths(lens, self._cap_arr[ids], ids, single)
        else:  # no chain with a device-writable buffer: the used lengths mean nothing
            lens = self._lens0[:n]
        self._n_single = count
        is_id = self._tok_is_id[ids]
        tokens = ids.astype(np.int64)
        if _count(is_id) != n:
            tokens = np.where(is_id, tokens, self._tok_arr[ids])
        self._give_ids(ids)
        self._free_descs += n
        nxt = u + n
        if nxt >= num:
            nxt -= num
            self._used_wrap ^= 1
        self._next_used = nxt
        if self.event_idx and self._irq:
            v.drv_evt[0] = nxt | self._used_wrap << _WRAP_SHIFT
        if cut and (max_items is None or n < max_items) and self._used_at_head(v):
            # the run stopped at a chain that add() made: the checked slow path for the rest
            # (buffers the device used meanwhile are left for the next call, as with split)
            items = self.reap(None if max_items is None else max_items - n)
            tokens = np.concatenate((tokens, np.array([t for t, _ in items], dtype=np.int64)))
            lens = np.concatenate((lens, np.array([ln for _, ln in items], dtype=np.int64)))
        return tokens, lens

    def _write_irq_state(self, v: _PackedViews) -> None:
        if not self._irq:
            v.drv_evt[1] = _DISABLE
        elif self.event_idx:
            v.drv_evt[0] = self._next_used | self._used_wrap << _WRAP_SHIFT
            v.drv_evt[1] = _DESC
        else:
            v.drv_evt[1] = int(PackedEventFlag.ENABLE)

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications. Returns True when used buffers are pending."""
        self._check_broken()
        v = self._refresh()
        self._irq = True
        self._write_irq_state(v)
        return self._used_at_head(v)

    def disable_interrupts(self) -> None:
        """Suppress used-buffer notifications (``VRING_PACKED_EVENT_FLAG_DISABLE``)."""
        self._check_broken()
        v = self._refresh()
        self._irq = False
        self._write_irq_state(v)
