"""The device (back-end) role of a packed virtqueue: pop chains, complete them, suppress kicks.

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED bit
does not; used when both equal the device's used wrap counter. The device completes a batch
by writing the flags of its first used descriptor last.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.device_role import DeviceRole
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.packed.layout import (
    PACKED_DESC_DTYPE,
    WRAP_SHIFT,
    PackedRing,
    PackedViews,
    advance,
    decode_base,
    encode_base,
    event_due,
    lap_pattern,
)
from vhostkit.virtio.ring import DescFlag, PackedEventFlag, int_array

__all__ = ["PackedDeviceQueue"]

log = logging.getLogger(__name__)

#: batches kept for logging to find before the kept list is pruned to those still out
_RECENT_MAX = 64

_NEXT = int(DescFlag.NEXT)
_INDIRECT = int(DescFlag.INDIRECT)
_AVAIL = int(DescFlag.AVAIL)
_USED = int(DescFlag.USED)
_DISABLE = int(PackedEventFlag.DISABLE)
_DESC = int(PackedEventFlag.DESC)
_BOTH = _AVAIL | _USED
_CHAINED = _NEXT | _INDIRECT
_or_reduce = np.bitwise_or.reduce
_max = np.maximum.reduce
_count = np.count_nonzero


class PackedDeviceQueue(DeviceRole, PackedRing):
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
        self._id_space = 0x10000
        self._init_device_state(num)
        #: batches popped while chains of theirs may be in flight (logging off), newest last:
        #: where logging, once started, finds the chains already out (a packed ring's slots
        #: may hold used descriptors by then)
        self._recent: list[ChainBatch] = []
        #: logging: guest-physical addresses of the descriptor ring and the device event area
        #: and the memory generation they were translated in
        self._log_gpas: tuple[object, int, int, int] = (None, -1, 0, 0)
        #: the device event flags last written to the ring (None: not written yet)
        self._dev_flags_written: int | None = None
        # _avail_bits[wrap][last + i]: AVAIL/USED bits of an available descriptor i positions
        # after ``last``
        self._avail_bits = lap_pattern(num, _AVAIL, _USED)
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
        c = int_array(counts).astype(np.intp)
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
            chains = self._chain_batch(v.table, rec, flags, ids, starts, int(flags_or), single)
            if np.unique(ids).shape[0] != n:
                self._fail("the same buffer id resubmitted twice")
            self._inflight[ids] = True
            self._id_bound = max(self._id_bound, int(_max(ids)) + 1)
            self._n_ids = n
            multi = c > 1
            if _count(multi):
                self._ring_count[ids] = c
                self._n_multi = int(_count(multi))
            self._n_descs = total
            batch = chains
            self._note_popped(batch)
        self._used_idx, self._used_wrap = used_idx, used_wrap & 1
        nxt, wrap = advance(used_idx, used_wrap & 1, total, num)
        self._last_avail, self._avail_wrap = nxt, wrap
        if self.event_idx and self._notify:
            v.dev_evt[0] = nxt | wrap << WRAP_SHIFT
            self._log_event_area(2)
        return batch

    # -- popping ----------------------------------------------------------------------------

    def _count_available(self, v: PackedViews) -> int:
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
        batch = self._chain_batch(v.table, rec, flags, ids, starts, seen, single)

        # in flight: none of the ids may be, and none may appear twice
        inflight = self._inflight
        top = int(_max(ids)) + 1
        if top > self._id_bound:
            self._id_bound = top
        prev = inflight[ids]
        inflight[ids] = True
        n_ids = int(_count(inflight[: self._id_bound]))
        if n_ids != self._n_ids + n:
            if _count(prev):
                inflight[ids[~prev]] = False
                self._fail(f"buffer id {int(ids[prev][0])} is already in flight")
            inflight[ids] = False
            self._fail("the same buffer id is used twice")
        self._n_ids = n_ids
        if ring_count is not None and used != n:  # some chain has several descriptors
            self._ring_count[ids] = ring_count
            self._n_multi += int(_count(ring_count > 1))
        self._n_descs += used
        nxt, wrap = advance(last, self._avail_wrap, used, num)
        self._last_avail, self._avail_wrap = nxt, wrap
        if self._dlog is None:
            recent = self._recent
            recent.append(batch)
            if len(recent) > _RECENT_MAX:
                self._prune_recent()
        else:
            self._log_popped(batch)
        if self.event_idx and self._notify:
            v.dev_evt[0] = nxt | wrap << WRAP_SHIFT
            if self._dev_flags_written != _DESC:
                v.dev_evt[1] = _DESC
                self._dev_flags_written = _DESC
                self._log_event_area(4)
            else:
                self._log_event_area(2)
        return batch

    def _chains(
        self,
        v: PackedViews,
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
        n_ids = int(_count(inflight[: self._id_bound]))
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
            if self._dlog is not None:
                # bytes 8-15 of each slot (len, id, flags), one run or two when they wrap;
                # before the batch is published (see the split ring), its flags word after
                wrapped = np.arange(u, end) % num if end > num else None
                self._log_used_slots(ids_a, lens_a, wrapped, u, k)
            v.words[8 * u + 7] = first  # publishes the whole batch
            if self._dlog is not None:
                self._log_slot_flags(u)
        else:
            counts = self._ring_count[ids_a]
            self._n_multi -= int(_count(counts > 1))
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
            if self._dlog is not None:
                self._log_used_slots(ids_a, lens_a, pos, u, k)
            v.flags[pos[0]] = flags[0]  # publishes the whole batch
            if self._dlog is not None:
                self._log_slot_flags(int(pos[0]))
        self._n_descs -= total
        if not self._n_ids:
            self._recent.clear()
        self._used_idx, self._used_wrap = advance(u, w, total, num)
        return self._need_signal(v, total)

    def _need_signal(self, v: PackedViews, count: int) -> bool:
        flags = v.drv_evt[1]
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self.event_idx:
            return True
        return event_due(v.drv_evt[0], self._used_wrap, self._used_idx, count, self.num)

    # -- notification suppression -----------------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask for kicks again. Returns True when descriptors are already pending."""
        self._check_broken()
        v = self._refresh()
        self._notify = True
        if self.event_idx:
            v.dev_evt[0] = self._last_avail | self._avail_wrap << WRAP_SHIFT
            flags = _DESC
        else:
            flags = int(PackedEventFlag.ENABLE)
        if self._dev_flags_written != flags:
            v.dev_evt[1] = flags
            self._dev_flags_written = flags
            self._log_event_area(4)
        elif self.event_idx:
            self._log_event_area(2)
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
            self._log_event_area(4)

    # -- dirty logging ----------------------------------------------------------------------
    #
    # A packed ring's device writes go to the descriptor ring (used descriptors) and the
    # device event area. QEMU gives ``log_guest_addr`` = the device event area's address (its
    # ``used_phys``), which does not cover the descriptors written back, and the spec's rule
    # (offsets from ``log_guest_addr``) is about the split used ring. So with VHOST_VRING_F_LOG
    # a packed ring logs the guest-physical address each write actually went to: the
    # descriptor ring and the event area translated from the ring's addresses.

    def _ring_log_base(self, dlog: DirtyLog, ring_log: int) -> int:
        desc, _, dev = self._translate_log_gpas()
        self._check_log_range(dlog, f"descriptor ring {self.index}", desc, 16 * self.num)
        self._check_log_range(dlog, f"device event area {self.index}", dev, 4)
        return 0  # absolute addresses

    def _translate_log_gpas(self) -> tuple[int, int, int]:
        """``(memory generation, descriptor ring GPA, device event area GPA)``, translated
        again after the memory table changed."""
        mem, gen = self._mem, self._mem.generation
        cached = self._log_gpas
        if cached[0] is not mem or cached[1] != gen:
            if self._space == "gpa":
                desc, _, dev = self._addrs
            else:
                d, _, e = self._addrs
                desc, dev = mem.uva_to_gpa(d), mem.uva_to_gpa(e)
                # a ring split over two regions would not be contiguous in guest memory
                if mem.uva_to_gpa(d + 16 * self.num - 1) != desc + 16 * self.num - 1:
                    raise InvalidParam(f"descriptor ring {self.index} is not contiguous")
            cached = self._log_gpas = (mem, gen, desc, dev)
        return cached[1], cached[2], cached[3]

    def _log_used_slots(
        self, ids: np.ndarray, lens: np.ndarray, pos: np.ndarray | None, u: int, k: int
    ) -> None:
        """Mark the completed chains' data and the used descriptors just written (bytes 8-15
        of each slot: len, id, flags): slots ``pos``, or ``k`` slots from ``u``."""
        if self._ring_log is None:
            self._log_written(ids, lens)
            return
        _, desc, _ = self._translate_log_gpas()
        if pos is None:
            self._log_written(ids, lens, [desc + 16 * u + 8], [16 * (k - 1) + 8])
        else:
            at = (np.asarray(pos, dtype=np.int64) * 16 + desc + 8).tolist()
            self._log_written(ids, lens, at, [8] * len(at))

    def _log_slot_flags(self, slot: int) -> None:
        """Mark the flags word of ring slot ``slot`` (the one that publishes a batch)."""
        if self._dlog is not None and self._ring_log is not None:
            self._dlog.mark(self._translate_log_gpas()[1] + 16 * slot + 14, 2)

    def _log_event_area(self, length: int) -> None:
        """Mark a write of the device event area's first ``length`` bytes, when logged."""
        if self._dlog is not None and self._ring_log is not None:
            self._dlog.mark(self._translate_log_gpas()[2], length)

    def stop_logging(self) -> None:
        # the chains still out go back to the kept batches, for the next start
        self._recent = [entry[0] for entry in self._log_batches.values()]
        super().stop_logging()

    def _note_popped(self, batch: ChainBatch) -> None:
        if self._dlog is None:
            self._recent.append(batch)
            if len(self._recent) > _RECENT_MAX:
                self._prune_recent()
        else:
            self._log_popped(batch)

    def _prune_recent(self) -> None:
        """Keep only the batches holding chains still in flight (newest batch of each id)."""
        inflight = self._inflight
        claimed = np.zeros(self._id_space, dtype=np.bool_)
        keep: list[ChainBatch] = []
        for batch in reversed(self._recent):
            ids = batch.ids
            live = inflight[ids] & ~claimed[ids]
            if live.any():
                claimed[ids[live]] = True
                keep.append(batch)
        keep.reverse()
        self._recent = keep

    def _log_recover(self) -> ChainBatch | None:
        # The chains in flight, from the batches they were popped in (newest batch of an id
        # wins: an id is out once at most); as one batch per source batch, merged here.
        inflight = self._inflight
        claimed = np.zeros(self._id_space, dtype=np.bool_)
        for batch in reversed(self._recent):
            ids = batch.ids
            live = inflight[ids] & ~claimed[ids]
            if live.any():
                claimed[ids[live]] = True
                self._log_popped(batch, live)
        self._recent = []
        missing = inflight & ~claimed
        if missing.any():
            log.error(
                "ring %d: chains %s in flight are not known: not logged",
                self.index,
                np.flatnonzero(missing).tolist(),
            )
        return None
