"""What the device-role queues of both ring formats share.

:class:`DeviceRole` is the base of :class:`~vhostkit.virtio.split.SplitDeviceQueue` and
:class:`~vhostkit.virtio.packed.PackedDeviceQueue`: their two ways of being made, the checks of
``complete``'s arguments and the reading of indirect tables. The functions below check the
buffers of popped chains (in guest memory, readable before writable) for both formats.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidParam
from vhostkit.types import VringAddr
from vhostkit.virtio.chain import ChainBatch
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.memory import MemoryTable
from vhostkit.virtio.ring import BrokenState, DescFlag, RingBase, int_array

if TYPE_CHECKING:
    from vhostkit.virtio.memory import GuestMemory

__all__ = ["MAX_INDIRECT", "DeviceRole", "check_order", "locate_buffers", "lookup_buffers"]

log = logging.getLogger(__name__)

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
        #: the dirty log while logging is on (:meth:`start_logging`), else None: the only
        #: thing the hot paths look at when logging is off
        self._dlog: DirtyLog | None = None
        #: guest-physical address the ring's own writes are logged from (None: not logged)
        self._ring_log: int | None = None
        #: logging: per chain id, the serial of the batch it was popped in (0: none) and its
        #: index there; per serial the batch and how many of its chains are still out
        self._log_owner = np.zeros(0, dtype=np.int64)
        self._log_index = np.zeros(0, dtype=np.intp)
        self._log_batches: dict[int, list[Any]] = {}
        self._log_serial = 0

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

    # -- dirty logging ----------------------------------------------------------------------
    #
    # While logging is on, every write the device makes to guest memory through this queue
    # is marked in the log: the data a completed chain's used length says was written (the
    # first ``len`` bytes of its device-writable buffers), and the ring's own writes. A
    # completed batch marks once (:meth:`DirtyLog.mark_ranges`). To know where a chain's
    # writable buffers are when it completes, the queue keeps each popped batch while
    # logging; chains already in flight when logging starts are found again
    # (:meth:`_log_recover`).

    #: ids a chain may have: one slot per id in the logging tables
    _id_space: int

    @property
    def logging(self) -> bool:
        """Whether writes are being logged."""
        return self._dlog is not None

    @property
    def logs_ring(self) -> bool:
        """Whether the ring's own writes (used ring, event areas) are logged."""
        return self._dlog is not None and self._ring_log is not None

    def start_logging(self, dlog: DirtyLog, ring_log: int | None = None) -> None:
        """Log every write from now on into ``dlog`` (borrowed: the caller keeps it mapped
        until :meth:`stop_logging` or a later :meth:`start_logging`).

        ``ring_log``: the ring's ``log_guest_addr`` when ``VHOST_VRING_F_LOG`` is set (the
        ring's own writes are logged only then, as the spec says); ``None`` logs only the
        data. Raises :class:`InvalidParam` when the ring's log range is beyond ``dlog``.
        Chains in flight keep being tracked, so those completed later are logged too.
        """
        self._check_broken()
        if ring_log is not None:
            ring_log = self._ring_log_base(dlog, ring_log)
        was = self._dlog is not None
        self._dlog, self._ring_log = dlog, ring_log
        if not was:
            self._log_owner = np.zeros(self._id_space, dtype=np.int64)
            self._log_index = np.zeros(self._id_space, dtype=np.intp)
            self._log_batches = {}
            recovered = self._log_recover()
            if recovered is not None:
                self._log_popped(recovered)

    def stop_logging(self) -> None:
        """Stop logging (the log is no longer touched; the caller may unmap it)."""
        self._dlog = None
        self._ring_log = None
        self._log_batches = {}
        self._log_owner = self._log_index = np.zeros(0, dtype=np.int64)

    def check_ring_log(self, dlog: DirtyLog, ring_log: int) -> None:
        """Raise :class:`InvalidParam` unless the ring's own writes, logged from
        ``ring_log`` (its ``log_guest_addr``), fall inside ``dlog``."""
        self._ring_log_base(dlog, ring_log)

    def _ring_log_base(self, dlog: DirtyLog, ring_log: int) -> int:
        """Where the ring's writes are logged from, given ``log_guest_addr`` (checked to
        fit ``dlog``: :class:`InvalidParam` if not)."""
        raise NotImplementedError

    @staticmethod
    def _check_log_range(dlog: DirtyLog, what: str, gpa: int, size: int) -> None:
        if gpa < 0 or gpa + size > dlog.pages << 12:
            raise InvalidParam(
                f"{what} logged at {gpa:#x}+{size:#x}: beyond the log's {dlog.pages:#x} pages"
            )

    def _log_recover(self) -> ChainBatch | None:
        """The chains in flight as logging starts (their writable buffers), or None."""
        raise NotImplementedError

    def _log_popped(self, batch: ChainBatch, only: npt.NDArray[np.bool_] | None = None) -> None:
        """Remember where the chains of ``batch`` (those in ``only``) may be written."""
        n = len(batch)
        if not n:
            return
        self._log_serial += 1
        serial = self._log_serial
        index = self._arange[:n] if n <= self.num else np.arange(n, dtype=np.intp)
        ids = batch.ids
        if only is not None:
            ids, index = ids[only], index[only]
        self._log_batches[serial] = [batch, ids.shape[0]]
        self._log_owner[ids] = serial
        self._log_index[ids] = index

    def _log_written(
        self,
        ids: np.ndarray,
        lens: np.ndarray,
        ring_at: Sequence[int] = (),
        ring_len: Sequence[int] = (),
    ) -> None:
        """Mark the data of completed chains ``ids`` (their used lengths ``lens``) and the
        ring writes ``ring_at``/``ring_len`` (offsets from the ring's log base), at once."""
        dlog = self._dlog
        assert dlog is not None
        owner = self._log_owner[ids]
        index = self._log_index[ids]
        self._log_owner[ids] = 0
        gpas: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        serials = np.unique(owner).tolist()
        for serial in serials:
            sel = None if len(serials) == 1 else owner == serial
            count = ids.shape[0] if sel is None else int(np.count_nonzero(sel))
            if serial == 0:
                # cannot happen: every chain out is tracked from the moment logging starts
                log.error("ring %d: chains completed while logging were never seen", self.index)
                continue
            entry = self._log_batches[serial]
            batch: ChainBatch = entry[0]
            g, n = batch.written_ranges(
                index if sel is None else index[sel], lens if sel is None else lens[sel]
            )
            gpas.append(g)
            lengths.append(n)
            entry[1] -= count
            if entry[1] <= 0:
                del self._log_batches[serial]
        if self._ring_log is not None and ring_at:
            gpas.append(np.asarray(ring_at, dtype=np.uint64) + np.uint64(self._ring_log))
            lengths.append(np.asarray(ring_len, dtype=np.uint64))
        if gpas:
            dlog.mark_ranges(np.concatenate(gpas), np.concatenate(lengths))

    def _log_ring(self, offset: int, length: int) -> None:
        """Mark one write of the ring's own (an index or flags word), when logged."""
        dlog, base = self._dlog, self._ring_log
        if dlog is not None and base is not None:
            dlog.mark(base + offset, length)

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
