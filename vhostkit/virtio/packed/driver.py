"""The driver (guest) role of a packed virtqueue: lay out the ring, add chains, reap them.

The driver publishes a batch by writing the flags of the batch's first head last. Buffer ids
come from a free list of ``num`` ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation
from vhostkit.virtio.driver_role import DriverRole, batch_buffers
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed.layout import (
    PACKED_DESC_DTYPE,
    PACKED_RING_ALIGN,
    WRAP_SHIFT,
    PackedRing,
    PackedViews,
    advance,
    event_due,
    lap_pattern,
    packed_ring_size,
)
from vhostkit.virtio.ring import (
    Buffer,
    DescFlag,
    PackedEventFlag,
    align_up,
    check_align,
    check_queue_size,
)

__all__ = ["PackedDriverQueue"]

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_AVAIL = int(DescFlag.AVAIL)
_USED = int(DescFlag.USED)
_DISABLE = int(PackedEventFlag.DISABLE)
_DESC = int(PackedEventFlag.DESC)
_BOTH = _AVAIL | _USED
_max = np.maximum.reduce
_count = np.count_nonzero


class PackedDriverQueue(DriverRole, PackedRing):
    """The driver (guest) side of a packed virtqueue, laid out by this object in guest memory.

    The descriptor ring starts at ``gpa`` (16-byte aligned), followed by the driver and device
    event areas, then (``max_indirect`` > 0) one indirect table per buffer id. The memory is
    zeroed. Buffer ids come from a free list of ``num`` ids.
    """

    _id_word = "buffer id"

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
        self._indirect_gpa = gpa + align_up(packed_ring_size(num), PACKED_RING_ALIGN)
        # chain ids are buffer ids (DriverRole); descriptor slots are counted apart
        self._init_chain_state(num)
        self._free_descs = num
        #: ring slots of each chain from add in flight, by buffer id (0: not in flight)
        self._count = [0] * num
        # _used_bits[wrap][next + i]: AVAIL/USED bits of a used descriptor i slots on
        self._used_bits = lap_pattern(num, _BOTH, 0)
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
            size = align_up(size, PACKED_RING_ALIGN) + num * max_indirect * 16
        return size

    @property
    def num_free(self) -> int:
        """Free descriptor slots."""
        return self._free_descs if self._n_free_ids else 0

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
            pos, wrap = advance(pos, wrap, 1, num)
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
        self._record_chain(bid, token, ins)
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
        self._next_avail, self._avail_wrap = advance(pos, self._avail_wrap, n, num)
        self._added += n
        self._free_descs -= n
        self._record_batch(bids, n, tok_a, len_a, writable)
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
        return event_due(int(v.dev_evt[0]), self._avail_wrap, self._next_avail, count, self.num)

    def _used_at_head(self, v: PackedViews) -> bool:
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
                out.append(self._reap_single(bid, length))
                cnt = 1
            else:
                if bid >= num or not self._count[bid]:
                    self._fail(f"device used buffer id {bid}, which is not in flight")
                out.append(self._reap_chain(bid, length))
                cnt = self._count[bid]
                self._count[bid] = 0
                self._give_ids([bid])
            self._free_descs += cnt
            self._next_used, self._used_wrap = advance(self._next_used, self._used_wrap, cnt, num)
        if self.event_idx and self._irq:
            v.drv_evt[0] = self._next_used | self._used_wrap << WRAP_SHIFT
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
            return self._item_arrays(self.reap(max_items))
        lens = None  # no chain with a device-writable buffer: the used lengths mean nothing
        if self._n_single_w:
            end = u + n
            lens_v = v.desc["len"]  # read after the flags
            if end <= num:
                lens = lens_v[u:end].astype(np.int64)
            else:
                lens = np.concatenate((lens_v[u:], lens_v[: end - num])).astype(np.int64)
        tokens, lens = self._reap_singles(ids, ids, lens)
        self._free_descs += n
        nxt, wrap = advance(u, self._used_wrap, n, num)
        self._next_used, self._used_wrap = nxt, wrap
        if self.event_idx and self._irq:
            v.drv_evt[0] = nxt | wrap << WRAP_SHIFT
        if cut and (max_items is None or n < max_items) and self._used_at_head(v):
            # the run stopped at a chain that add() made: the checked slow path for the rest
            # (buffers the device used meanwhile are left for the next call, as with split)
            items = self.reap(None if max_items is None else max_items - n)
            more_tokens, more_lens = self._item_arrays(items)
            tokens = np.concatenate((tokens, more_tokens))
            lens = np.concatenate((lens, more_lens))
        return tokens, lens

    def _write_irq_state(self, v: PackedViews) -> None:
        if not self._irq:
            v.drv_evt[1] = _DISABLE
        elif self.event_idx:
            v.drv_evt[0] = self._next_used | self._used_wrap << WRAP_SHIFT
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
