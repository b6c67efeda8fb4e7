"""The driver (guest) role of a split virtqueue: lay out the ring, add chains, reap them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation
from vhostkit.virtio.driver_role import DriverRole, batch_buffers
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.ring import (
    SPLIT_DESC_DTYPE,
    Buffer,
    DescFlag,
    align_up,
    check_align,
    need_event,
)
from vhostkit.virtio.split.layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC_ALIGN,
    USED_ALIGN,
    USED_F_NO_NOTIFY,
    SplitLayout,
    SplitRing,
)

__all__ = ["SplitDriverQueue"]

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_or_reduce = np.bitwise_or.reduce
_count = np.count_nonzero


def _run(idx: npt.NDArray[np.intp], arange: npt.NDArray[np.intp]) -> slice | np.ndarray:
    """``idx`` as a slice when it is a run of consecutive values (``arange``: 0, 1, 2, ...
    at least as long as the largest value), else ``idx`` itself. Writes through a slice cost
    a fraction of a scatter."""
    lo = int(idx[0])
    hi = lo + idx.shape[0]
    if hi <= arange.shape[0] and not _count(idx != arange[lo:hi]):
        return slice(lo, hi)
    return idx


class SplitDriverQueue(DriverRole, SplitRing):
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
        self._indirect_gpa = gpa + align_up(layout.size, DESC_ALIGN)
        # chain ids are heads, and every free descriptor is a free id: the free ids are the
        # free descriptors (DriverRole)
        self._init_chain_state(num)
        self._arange = np.arange(num, dtype=np.intp)
        self._arange.flags.writeable = False
        #: the descriptors of each chain from add, by head
        self._chain: list[list[int] | None] = [None] * num
        self._shadow = 0
        self._published = 0
        self._last_used = 0
        self._irq = True

    @staticmethod
    def footprint(num: int, *, max_indirect: int = 0, align: int = USED_ALIGN) -> int:
        """Bytes of guest memory the queue occupies (ring plus indirect pool)."""
        size = SplitLayout.compute(num, align).size
        if max_indirect:
            size = align_up(size, DESC_ALIGN) + num * max_indirect * 16
        return size

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return self._n_free_ids

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
        if needed > self._n_free_ids:
            raise InvalidOperation(
                f"queue full: {needed} descriptors needed, {self._n_free_ids} free"
            )
        recs = np.zeros(total, SPLIT_DESC_DTYPE)
        bufs = outs + ins
        recs["addr"] = [a for a, _ in bufs]
        recs["len"] = [n for _, n in bufs]
        flags = np.array([0] * len(outs) + [_WRITE] * len(ins), dtype=np.uint16)
        flags[:-1] |= _NEXT
        recs["flags"] = flags
        if indirect:
            head = int(self._take_ids(1)[0])
            recs["next"] = np.arange(1, total + 1) % 0x10000
            recs["next"][-1] = 0
            table = self._indirect_gpa + head * self.max_indirect * 16
            self._mem.gpa_array(table, SPLIT_DESC_DTYPE, total)[:] = recs
            v.desc[head] = (table, total * 16, _INDIRECT, 0)
            chain = [head]
        else:
            chain = self._take_ids(total).tolist()
            nxt = [*chain[1:], 0]
            recs["next"] = nxt
            v.desc[chain] = recs
            head = chain[0]
        self._record_chain(head, token, ins)
        self._chain[head] = chain
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
        top = self._n_free_ids
        if n > top:
            raise InvalidOperation(f"queue full: {n} descriptors needed, {top} free")
        heads = self._take_ids(n)
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
        self._record_batch(at, n, tok_a, len_a, writable)
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
        in_flight = self.num - self._n_free_ids
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
                    out.append(self._reap_single(head, length))  # a chain from add_batch
                    continue
                if chain is None:
                    self._fail(f"device used id {head}, which is not in flight")
                out.append(self._reap_chain(head, length))
                self._chain[head] = None
                self._give_ids(chain[::-1])
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
        # ids from the ring are unsigned: OR-ing them shows any beyond the (power of 2) size
        fast = not int(_or_reduce(ids)) & ~self._mask
        if fast:
            at = _run(ids, self._arange)  # a slice when the ids are consecutive
            fast = _count(self._single[at]) == n
        if not fast:
            # multi-descriptor chains or a bad id: the checked slow path
            return self._item_arrays(self.reap(n))
        lens = entries[:, 1].astype(np.int64) if self._n_single_w else None
        tokens, lens = self._reap_singles(ids, at, lens)
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
