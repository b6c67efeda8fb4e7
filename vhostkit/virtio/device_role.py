"""What the device-role queues of both ring formats share.

:class:`DeviceRole` is the base of :class:`~vhostkit.virtio.split.SplitDeviceQueue` and
:class:`~vhostkit.virtio.packed.PackedDeviceQueue`: their two ways of being made, the checks of
``complete``'s arguments and the reading of indirect tables. The functions below check the
buffers of popped chains (in guest memory, readable before writable) for both formats.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidParam
from vhostkit.types import VringAddr
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.memory import MemoryTable
from vhostkit.virtio.ring import BrokenState, DescFlag, RingBase, int_array

if TYPE_CHECKING:
    from vhostkit.virtio.memory import GuestMemory

__all__ = ["MAX_INDIRECT", "DeviceRole", "check_order", "locate_buffers", "lookup_buffers"]

#: Longest indirect table the device role accepts (the kernel's UIO_MAXIOV), unless the queue
#: itself is larger.
MAX_INDIRECT = 1024

_WRITE = int(DescFlag.WRITE)
_or_reduce = np.bitwise_or.reduce


class DeviceRole(RingBase):
    """What the device-role queues (split and packed) share besides :class:`RingBase`: their
    two ways of being made, the checks and the :class:`ChainBatch` of popped chains, the
    argument checks of ``complete`` and indirect tables.

    A subclass names its descriptor layout in :attr:`_desc_dtype`, sets
    :attr:`_max_indirect` and reads one indirect table in :meth:`_read_indirect`.
    """

    @classmethod
    def from_gpa(
        cls,
        mem: GuestMemory,
        num: int,
        desc: int,
        driver_area: int,
        device_area: int,
        *,
        features: int = 0,
        base: int | None = None,
        index: int = 0,
    ) -> Self:
        """A queue whose ring addresses are guest-physical (e.g. from a virtio transport).

        ``driver_area`` is the available ring (split) or driver event area (packed),
        ``device_area`` the used ring or device event area; ``base`` as for the constructor.
        """
        make: Callable[..., Self] = cls  # the subclass's constructor, not RingBase's
        return make(
            mem, num, desc, driver_area, device_area, space="gpa", features=features,
            base=base, index=index,
        )  # fmt: skip

    @classmethod
    def from_vring_addr(
        cls,
        mem: GuestMemory,
        num: int,
        addr: VringAddr,
        *,
        features: int = 0,
        base: int | None = None,
    ) -> Self:
        """A queue from a vhost-user ``SET_VRING_ADDR`` (frontend user addresses)."""
        make: Callable[..., Self] = cls
        return make(
            mem, num, addr.desc, addr.avail, addr.used, space="uva", features=features,
            base=base, index=addr.index,
        )  # fmt: skip

    def _init_device_state(self, num: int) -> None:
        """What both device queues keep besides their ring positions, for ``num`` entries."""
        #: whether the device wants kicks (``disable_notifications`` clears it)
        self._notify = True
        self._max_indirect = max(MAX_INDIRECT, num)
        #: 0, 1, 2, ...: the chain starts of a batch of single descriptors, slices of it
        self._arange = np.arange(num + 1, dtype=np.intp)
        self._arange.flags.writeable = False
        #: "not writable" for every descriptor of a batch with no device-writable one
        self._no_write = np.zeros(num, dtype=np.bool_)
        self._no_write.flags.writeable = False

    def _chain_batch(
        self,
        table: MemoryTable,
        rec: np.ndarray,
        flags: np.ndarray,
        ids: npt.NDArray[np.intp],
        starts: npt.NDArray[np.intp],
        flags_or: int,
        single: bool,
    ) -> ChainBatch:
        """The :class:`ChainBatch` of the chains ``rec[starts[i]:starts[i + 1]]`` (indirect
        tables expanded; ``flags`` is ``rec["flags"]``, ``flags_or`` at least their OR;
        ``single``: one descriptor per chain): the device-writable buffers must follow the
        readable ones in each chain, and every buffer lie in guest memory. Changes nothing:
        a bad chain fails before the caller marks the ids in flight."""
        m = rec.shape[0]
        if not flags_or & _WRITE:
            writable, wflags = (self._no_write[:m] if m <= self.num else np.zeros(m, np.bool_)), 0
        else:
            writable = (flags & _WRITE) != 0
            wflags = 2
            if not single:  # some chain has several descriptors
                check_order(self, writable, starts)
        addr = rec["addr"]
        length = rec["len"]
        region, offset, base = locate_buffers(self, table, addr, length)
        return ChainBatch(
            table,
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

    @staticmethod
    def _completion_arrays(
        ids: Sequence[int] | npt.NDArray[np.integer],
        lengths: Sequence[int] | npt.NDArray[np.integer],
        id_mask: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``complete``'s arguments as integer arrays, checked: the same count, ids within
        ``id_mask``, lengths that fit 32 bits. Raises :class:`InvalidParam` (the caller's
        mistake: the ring is not broken)."""
        ids_a = int_array(ids)
        lens_a = int_array(lengths)
        if lens_a.shape[0] != ids_a.shape[0]:
            raise InvalidParam("ids and lengths differ in length")
        # one reduction per check: OR-ing the values keeps a sign bit and any high bit
        if int(_or_reduce(ids_a)) & ~id_mask:
            raise InvalidParam("completed id out of range")
        wide = lens_a.dtype.itemsize > 4 or lens_a.dtype.kind != "u"
        if wide and int(_or_reduce(lens_a)) >> 32:
            raise InvalidParam("used length out of range")
        return ids_a, lens_a

    # -- indirect tables --------------------------------------------------------------------

    #: the 16-byte descriptor layout of the ring format
    _desc_dtype: Any
    _max_indirect: int

    def _read_indirect(self, table: MemoryTable, addr: int, length: int) -> np.ndarray:
        """The descriptors an indirect descriptor stands for, in chain order."""
        raise NotImplementedError

    def _indirect_table(self, table: MemoryTable, addr: int, length: int) -> np.ndarray:
        """Read an indirect table (size and bounds checked) as descriptors of this format."""
        if length == 0 or length % 16:
            self._fail(f"indirect table length {length} is not a positive multiple of 16")
        count = length // 16
        if count > self._max_indirect:
            self._fail(f"indirect table of {count} descriptors is too long")
        try:
            raw = b"".join(table.gpa.views(addr, length))
        except GuestMemoryError as exc:
            self._fail(f"indirect table outside guest memory: {exc}", exc)
        return np.frombuffer(raw, self._desc_dtype, count)

    def _expand_indirect(
        self,
        table: MemoryTable,
        rec: np.ndarray,
        starts: npt.NDArray[np.intp],
    ) -> tuple[np.ndarray, npt.NDArray[np.intp]]:
        """Replace each indirect descriptor by the chain in its table."""
        if not self.indirect:
            self._fail("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
        is_ind = (rec["flags"] & DescFlag.INDIRECT) != 0
        segments: list[np.ndarray] = []
        bounds = starts.tolist()
        for c in range(len(bounds) - 1):
            lo, hi = bounds[c], bounds[c + 1]
            if not is_ind[lo:hi].any():
                segments.append(rec[lo:hi])
                continue
            if hi - lo != 1:
                self._fail("indirect descriptor combined with NEXT in a chain")
            segments.append(self._read_indirect(table, int(rec["addr"][lo]), int(rec["len"][lo])))
        new_starts = np.zeros(len(segments) + 1, dtype=np.intp)
        np.cumsum([s.shape[0] for s in segments], out=new_starts[1:])
        return np.concatenate(segments), new_starts


def lookup_buffers(
    queue: BrokenState, table: MemoryTable, addr: np.ndarray, length: np.ndarray
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
    """Translate descriptor buffers, turning a bad address into a broken-queue error."""
    try:
        return table.lookup_gpa_batch(addr, length)
    except GuestMemoryError as exc:
        queue._fail(f"descriptor buffer outside guest memory: {exc}", exc)


_umin = np.minimum.reduce
_umax = np.maximum.reduce


def locate_buffers(
    queue: BrokenState, table: MemoryTable, addr: np.ndarray, length: np.ndarray
) -> tuple[npt.NDArray[np.intp] | int, npt.NDArray[np.uint64] | None, int]:
    """Bounds-check descriptor buffers: ``(region, offset, base)`` for :class:`ChainBatch`.

    The common case costs three reductions: when the smallest address and the largest
    address plus the longest length put every buffer inside one region (so each one, empty
    or not, is inside it), the result is that region's index, ``None`` and its start (offsets
    are computed when a chain is looked at). Anything else goes through the exact per-buffer
    translation (:meth:`MemoryTable.lookup_gpa_batch`); a bad address breaks the queue either
    way.
    """
    space = table.gpa
    starts = space.starts
    if addr.shape[0] and starts:
        low = int(_umin(addr))
        i = bisect_right(starts, low) - 1
        if i >= 0 and int(_umax(addr)) + int(_umax(length)) <= space.ends[i]:
            return i, None, starts[i]
    region, offset = lookup_buffers(queue, table, addr, length.astype(np.uint64))
    return region, offset, 0


def check_order(
    queue: BrokenState, writable: npt.NDArray[np.bool_], starts: npt.NDArray[np.intp]
) -> None:
    """Every device-readable descriptor must come before every writable one in a chain."""
    if writable.shape[0] < 2:
        return
    same_chain = np.ones(writable.shape[0] - 1, dtype=np.bool_)
    inner = starts[1:-1]
    same_chain[inner[inner > 0] - 1] = False
    bad = writable[:-1] & ~writable[1:] & same_chain
    if bad.any():
        queue._fail("device-readable descriptor after a device-writable one in a chain")
