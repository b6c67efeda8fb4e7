"""The device (back-end) role of a split virtqueue: pop chains, complete them, suppress kicks.

The device pops every pending chain with a handful of array operations (gather the avail
entries, walk all chains one step at a time in parallel, translate every buffer at once),
completes a batch with one scatter into the used ring and a single index store, and builds
memoryviews only for the chains a caller looks at (:class:`~vhostkit.virtio.chain.ChainBatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidParam
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.device_role import DeviceRole
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.memory import GuestMemory, MemoryTable
from vhostkit.virtio.ring import DescFlag, need_event
from vhostkit.virtio.split.layout import (
    AVAIL_F_NO_INTERRUPT,
    USED_F_NO_NOTIFY,
    SplitRing,
    SplitViews,
    used_ring_size,
)

__all__ = ["SplitDeviceQueue"]

_NEXT = int(DescFlag.NEXT)
_INDIRECT = int(DescFlag.INDIRECT)
_CHAINED = _NEXT | _INDIRECT
_or_reduce = np.bitwise_or.reduce
_count = np.count_nonzero


class SplitDeviceQueue(DeviceRole, SplitRing):
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
        self._id_space = num
        self._init_device_state(num)
        #: the notification state last written to the ring (None: not written yet)
        self._notify_written: bool | None = None

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
            if self._dlog is not None:
                self._log_ring(4 + 8 * num, 2)
        if self._dlog is not None:
            self._log_popped(batch)
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
            self._log_ring(4 + 8 * self.num, 2)
        if self._dlog is not None:
            self._log_popped(batch)
        return batch

    def _chains_for(
        self, v: SplitViews, heads: npt.NDArray[np.intp], *, checked: bool
    ) -> ChainBatch:
        """Walk the chains starting at ``heads`` and mark them in flight.

        ``heads`` must be non-negative unless ``checked`` (then their range is tested first);
        an index beyond the table breaks the queue either way (``take`` raises).
        """
        batch = self._walk_heads(v, heads, checked=checked)
        n = heads.shape[0]

        # in flight: none of the heads may be, and none may appear twice
        inflight = self._inflight
        prev = inflight[heads]
        inflight[heads] = True
        count = int(_count(inflight))
        if count != self._n_inflight + n:
            if _count(prev):
                inflight[heads[~prev]] = False
                self._fail(f"head {int(heads[prev][0])} is already in flight")
            inflight[heads] = False
            self._fail("the same head appears twice in the avail ring")
        self._n_inflight = count
        return batch

    def _walk_heads(
        self, v: SplitViews, heads: npt.NDArray[np.intp], *, checked: bool
    ) -> ChainBatch:
        """The chains starting at ``heads``, walked and checked (nothing is marked)."""
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
        return self._chain_batch(v.table, rec, flags, heads, starts, seen, single)

    def _walk(
        self,
        v: SplitViews,
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
        count = int(_count(inflight))
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
        if self._dlog is not None:
            # As vhost does: the data and the entries (one run, or two when they wrap) are
            # marked before the index publishes them, so a driver that sees a completion sees
            # its pages marked; the index is marked after it is written (the log is marked
            # after each write: a mark before could be collected before the write lands).
            end = start + k
            if end <= self.num:
                at, size = [4 + 8 * start], [8 * k]
            else:
                at, size = [4 + 8 * start, 4], [8 * (self.num - start), 8 * (end - self.num)]
            self._log_written(ids_a, lens_a, at, size)
        v.used_w[1] = new  # publish after the entries
        self._used_idx = new
        if self._dlog is not None:
            self._log_ring(2, 2)
        if self.event_idx:
            return need_event(v.used_event_w[0], new, old)
        return not v.avail_w[0] & AVAIL_F_NO_INTERRUPT

    def _need_signal(self, v: SplitViews, old: int, new: int) -> bool:
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
            self._log_ring(4 + 8 * self.num, 2)
        elif self._notify_written is not True:
            v.used_w[0] = v.used_w[0] & ~USED_F_NO_NOTIFY
            self._notify_written = True
            self._log_ring(0, 2)
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
            self._log_ring(0, 2)

    def has_pending(self) -> bool:
        """Cheap poll: has the driver made chains available? (No checks; see :meth:`pending`.)"""
        return self._v.avail_w[1] != self._last_avail

    # -- dirty logging ----------------------------------------------------------------------

    def _ring_log_base(self, dlog: DirtyLog, ring_log: int) -> int:
        # the spec and kernel vhost: the used ring's first byte is logged at log_guest_addr
        self._check_log_range(dlog, f"used ring {self.index}", ring_log, used_ring_size(self.num))
        return ring_log

    def _log_recover(self) -> ChainBatch | None:
        # The driver may not touch an in-flight chain's descriptors (virtio 1.2 2.7.13): they
        # are in the table still, walk them again.
        heads = np.flatnonzero(self._inflight).astype(np.intp)
        if not heads.shape[0]:
            return None
        return self._walk_heads(self._refresh(), heads, checked=True)
