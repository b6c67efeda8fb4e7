"""Pieces shared by the split and packed virtqueues: flags, dtypes, chains, batches, errors.

Error policy for both ring formats (device role and driver role alike):

* Anything malformed that the *peer* wrote into a ring (descriptor loop, index out of range,
  nested indirect table, a buffer address outside guest memory, ...) raises
  :class:`~vhostkit.errors.VirtqueueError`. When the cause is a bad address the
  :class:`~vhostkit.errors.GuestMemoryError` is chained as ``__cause__``. The queue is then
  *broken*: every later call raises the same error object. Other queues are unaffected.
* Misuse by the *caller* (completing an id that is not in flight, adding to a full queue)
  raises :class:`~vhostkit.errors.InvalidParam` / :class:`~vhostkit.errors.InvalidOperation`
  and leaves the queue usable.
* Ring addresses that do not translate when the queue is built raise
  :class:`~vhostkit.errors.GuestMemoryError`; misaligned ones :class:`InvalidParam`.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Self

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidOperation, InvalidParam, VirtqueueError
from vhostkit.types import VringAddr
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import MemoryTable

if TYPE_CHECKING:
    from vhostkit.virtio.memory import GuestMemory

__all__ = [
    "MAX_QUEUE_SIZE",
    "SPLIT_DESC_DTYPE",
    "Buffer",
    "Chain",
    "ChainBatch",
    "DescFlag",
    "DeviceRole",
    "DriverRole",
    "PackedEventFlag",
    "need_event",
]

#: Largest queue size either ring format allows.
MAX_QUEUE_SIZE = 32768

#: ``struct vring_desc`` (split) / the same 16 bytes as ``struct vring_packed_desc`` differ in
#: their last two fields; see :data:`vhostkit.virtio.packed.PACKED_DESC_DTYPE`.
SPLIT_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

#: A driver-side buffer: ``(guest_phys_addr, length)``.
Buffer = tuple[int, int]


class DescFlag(IntFlag):
    """Descriptor flags (``VRING_DESC_F_*``, ``VRING_PACKED_DESC_F_*``)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


class PackedEventFlag(IntEnum):
    """Packed ring event suppression flags (``VRING_PACKED_EVENT_FLAG_*``)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


_LITTLE = sys.byteorder == "little"


def u16_words(buf: memoryview, offset: int, count: int) -> Any:
    """``count`` little-endian u16 at ``offset`` of ``buf``, indexable like a list.

    On a little-endian host this is a ``memoryview`` cast (an item read or store costs a third
    of a NumPy scalar access); elsewhere a NumPy ``<u2`` view. Either way ``x[i]`` reads one
    word and ``x[i] = v`` stores one.
    """
    if _LITTLE:
        return buf[offset : offset + 2 * count].cast("H")
    return np.frombuffer(buf, "<u2", count, offset)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event``: did moving an index from ``old_idx`` to ``new_idx`` pass ``event_idx``?

    All arithmetic is modulo 2**16, exactly as in ``virtio_ring.h``.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


@dataclass(frozen=True, slots=True)
class Chain:
    """One descriptor chain as the device sees it: views into guest memory, no copies.

    ``id`` is what the device hands back on completion: the head descriptor index (split) or
    the buffer id (packed). ``readable`` are the device-readable (driver "out") buffers,
    ``writable`` the device-writable ("in") ones; a descriptor that spans two adjacent regions
    contributes two views and a zero-length descriptor none.
    """

    id: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(v.nbytes for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(v.nbytes for v in self.writable)

    def read_all(self) -> bytes:
        """The readable buffers concatenated (a copy)."""
        return b"".join(self.readable)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Scatter ``data`` into the writable buffers; returns the number of bytes written."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.writable:
            if pos >= src.nbytes:
                break
            n = min(view.nbytes, src.nbytes - pos)
            view[:n] = src[pos : pos + n]
            pos += n
        return pos


class ChainBatch:
    """All chains popped in one go, kept as NumPy arrays until a chain is looked at.

    A sink that only completes can use :attr:`ids` and :attr:`writable_len` (or
    :meth:`readable_total`) without building a single memoryview. ``batch[i]`` / iteration
    build :class:`Chain` objects on demand.

    ``region`` is either an array (the region index of every descriptor, ``-1`` for one that
    crosses into the next region, ``-2`` for an empty one, with ``offset`` the offsets) or a
    plain int: every descriptor lies inside that region, which starts at guest address
    ``base`` (empty ones included); the offsets are then computed only when a chain is looked
    at.
    ``single`` says that every chain is one descriptor; ``wflags`` is 0 when no descriptor is
    device-writable, 1 when all are, 2 when mixed (or unknown).
    """

    __slots__ = (
        "_addr",
        "_base",
        "_cache",
        "_length",
        "_lens",
        "_offset",
        "_region",
        "_single",
        "_starts",
        "_table",
        "_wflags",
        "_writable",
        "ids",
    )

    def __init__(
        self,
        table: MemoryTable,
        ids: npt.NDArray[np.integer],
        starts: npt.NDArray[np.intp],
        addr: npt.NDArray[np.uint64],
        length: npt.NDArray[np.integer],
        writable: npt.NDArray[np.bool_],
        region: npt.NDArray[np.intp] | int,
        offset: npt.NDArray[np.uint64] | None,
        *,
        base: int = 0,
        single: bool | None = None,
        wflags: int = 2,
    ) -> None:
        self._table = table
        #: chain ids (head index or buffer id), in ring order
        self.ids = ids
        self._starts = starts
        self._addr = addr
        self._length = length
        self._writable = writable
        self._region = region
        self._offset = offset
        self._base = base
        self._single = length.shape[0] == ids.shape[0] if single is None else single
        self._wflags = wflags
        self._cache: tuple[list[int], ...] | None = None
        self._lens: tuple[np.ndarray, np.ndarray] | None = None

    def _regions(self) -> npt.NDArray[np.intp]:
        r = self._region
        if isinstance(r, int):
            return np.where(self._length == 0, -2, r).astype(np.intp)
        return r

    def _offsets(self) -> npt.NDArray[np.uint64]:
        if self._offset is None:
            self._offset = self._addr - np.uint64(self._base)
        return self._offset

    def _chain_lens(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lens is None:
            n = self.ids.shape[0]
            lens = self._length.astype(np.int64)
            if n == 0:
                w = r = np.zeros(0, dtype=np.int64)
            elif self._wflags == 0:
                w, r = np.zeros(lens.shape[0], dtype=np.int64), lens
            elif self._wflags == 1:
                w, r = lens, np.zeros(lens.shape[0], dtype=np.int64)
            else:
                w = np.where(self._writable, lens, 0)
                r = lens - w
            if n and not self._single:  # some chain has several descriptors
                seg = self._starts[:-1]
                w = np.add.reduceat(w, seg)
                r = np.add.reduceat(r, seg)
            self._lens = (w, r)
        return self._lens

    @property
    def writable_len(self) -> np.ndarray:
        """Total device-writable bytes per chain (int64)."""
        return self._chain_lens()[0]

    @property
    def readable_len(self) -> np.ndarray:
        """Total device-readable bytes per chain (int64)."""
        return self._chain_lens()[1]

    def readable_total(self) -> int:
        """Device-readable bytes of the whole batch (one reduction when nothing is writable)."""
        if self._wflags == 0:
            return int(np.add.reduce(self._length, dtype=np.uint64))
        if self._wflags == 1:
            return 0
        return int(np.add.reduce(self._length[~self._writable], dtype=np.uint64))

    @classmethod
    def empty(cls, table: MemoryTable) -> ChainBatch:
        z64 = np.zeros(0, dtype=np.uint64)
        zi = np.zeros(0, dtype=np.intp)
        return cls(
            table,
            zi,
            np.zeros(1, np.intp),
            z64,
            z64,
            np.zeros(0, np.bool_),
            zi,
            z64,
            single=True,
            wflags=0,
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def split(self, k: int) -> tuple[ChainBatch, ChainBatch]:
        """The first ``k`` chains and the rest, as two batches (no memory is touched)."""
        n = len(self)
        k = max(0, min(k, n))
        cut = int(self._starts[k])
        region = self._region
        offset = self._offset
        head = ChainBatch(
            self._table,
            self.ids[:k],
            self._starts[: k + 1],
            self._addr[:cut],
            self._length[:cut],
            self._writable[:cut],
            region if isinstance(region, int) else region[:cut],
            None if offset is None else offset[:cut],
            base=self._base,
            single=self._single,
            wflags=self._wflags,
        )
        tail = ChainBatch(
            self._table,
            self.ids[k:],
            self._starts[k:] - cut,
            self._addr[cut:],
            self._length[cut:],
            self._writable[cut:],
            region if isinstance(region, int) else region[cut:],
            None if offset is None else offset[cut:],
            base=self._base,
            single=self._single,
            wflags=self._wflags,
        )
        return head, tail

    def __getitem__(self, i: int) -> Chain:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        if self._cache is None:
            self._cache = (
                self._starts.tolist(),
                self._addr.tolist(),
                self._length.tolist(),
                self._writable.tolist(),
                self._regions().tolist(),
                self._offsets().tolist(),
            )
        starts, addr, length, writable, region, offset = self._cache
        readable_views: list[memoryview] = []
        writable_views: list[memoryview] = []
        maps = self._table.gpa.maps
        for j in range(starts[i], starts[i + 1]):
            r = region[j]
            if r == -2:
                continue
            target = writable_views if writable[j] else readable_views
            if r >= 0:
                off = offset[j]
                target.append(maps[r].view[off : off + length[j]])
            else:
                target.extend(self._table.gpa.views(addr[j], length[j]))
        return Chain(int(self.ids[i]), readable_views, writable_views)

    def __iter__(self) -> Iterator[Chain]:
        for i in range(len(self)):
            yield self[i]

    def chains(self) -> list[Chain]:
        """Every chain of the batch as a :class:`Chain`."""
        n = len(self)
        if not n:
            return []
        region = self._region
        if not self._single or (not isinstance(region, int) and (region < 0).any()):
            return list(self)
        # one descriptor per chain, each inside one region: the common case, one tight loop
        views = [m.view for m in self._table.gpa.maps]
        ids = self.ids.tolist()
        offs = self._offsets().tolist()
        lens = self._length.tolist()
        if isinstance(region, int):
            view = views[region]
            if self._wflags != 2:
                if self._wflags:
                    return [
                        Chain(cid, [], [view[o : o + ln]] if ln else [])
                        for cid, o, ln in zip(ids, offs, lens, strict=True)
                    ]
                return [
                    Chain(cid, [view[o : o + ln]] if ln else [], [])
                    for cid, o, ln in zip(ids, offs, lens, strict=True)
                ]
            regions = [region] * n
        else:
            regions = region.tolist()
        out: list[Chain] = []
        for cid, r, off, ln, w in zip(
            ids, regions, offs, lens, self._writable.tolist(), strict=True
        ):
            if not ln:
                out.append(Chain(cid, [], []))
                continue
            view = views[r][off : off + ln]
            out.append(Chain(cid, [], [view]) if w else Chain(cid, [view], []))
        return out


class BrokenState:
    """Mixin: a queue that a malformed ring has broken keeps raising the same error."""

    _broken: VirtqueueError | None = None

    @property
    def broken(self) -> VirtqueueError | None:
        """The error that broke the queue, or ``None``."""
        return self._broken

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _fail(self, message: str, cause: BaseException | None = None) -> NoReturn:
        err = VirtqueueError(f"{self._describe()}: {message}")
        if cause is not None:
            err.__cause__ = cause
        self._broken = err
        raise err

    def _describe(self) -> str:
        return type(self).__name__


class RingBase(BrokenState):
    """What split and packed queues share: where the ring's three parts live, and views of
    them that follow memory-table changes.

    ``addrs`` are the three parts (descriptors, then the driver area / available ring, then
    the device area / used ring) in ``space``: guest-physical (``"gpa"``) or the front-end's
    user addresses (``"uva"``, as vhost-user's SET_VRING_ADDR gives them). Subclasses check
    size and alignment first and name their views class in :attr:`_views_type`.
    """

    #: builds the ring views: ``(table, space, num, *addrs)``
    _views_type: Any

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        addrs: tuple[int, int, int],
        space: Literal["gpa", "uva"],
        features: int,
        index: int,
    ) -> None:
        self._mem = mem
        self.num = num
        self.index = index
        self.features = features
        self.event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self.indirect = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        self._space: Literal["gpa", "uva"] = space
        self._addrs = addrs
        self._gen = -1
        self._v = self._refresh()

    def _refresh(self) -> Any:
        """Re-resolve the ring views when the memory table changed."""
        gen = self._mem.generation
        if gen != self._gen:
            self._v = self._views_type(self._mem.table, self._space, self.num, *self._addrs)
            self._gen = gen
        return self._v

    def _describe(self) -> str:
        return f"{type(self).__name__}[{self.index}]"

    def rebind(self, mem: GuestMemory) -> None:
        """Move the ring to another :class:`GuestMemory` (a new memory table) and keep all
        queue state: positions, wrap counters, the chains in flight and what they are owed.

        The ring's addresses stay as they were given and are resolved in ``mem``; if a part of
        the ring is not in it, the queue is broken (:class:`~vhostkit.errors.VirtqueueError`).
        """
        self._mem = mem
        self._gen = -1
        try:
            self._refresh()
        except GuestMemoryError as exc:
            self._fail(f"ring not in the new memory table: {exc}", exc)

    # -- indirect tables (device role; ``_max_indirect`` is set by the device queues) ---------

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

    @property
    def ring_gpas(self) -> tuple[int, int, int]:
        """Guest-physical addresses of (descriptors, driver area, device area)."""
        if self._space == "gpa":
            return self._addrs
        d, a, u = self._addrs
        return self._mem.uva_to_gpa(d), self._mem.uva_to_gpa(a), self._mem.uva_to_gpa(u)

    @property
    def ring_uvas(self) -> tuple[int, int, int]:
        """User addresses of (descriptors, driver area, device area)."""
        if self._space == "uva":
            return self._addrs
        d, a, u = self._addrs
        return self._mem.gpa_to_uva(d), self._mem.gpa_to_uva(a), self._mem.gpa_to_uva(u)

    def vring_addr(self, log: int = 0, flags: int = 0) -> VringAddr:
        """A :class:`VringAddr` with user addresses, for ``set_vring_addr`` (avail = driver
        area, used = device area)."""
        d, a, u = self.ring_uvas
        return VringAddr(self.index, desc=d, used=u, avail=a, log=log, flags=flags)


_or_reduce = np.bitwise_or.reduce
_count = np.count_nonzero


class DeviceRole:
    """What the device-role queues (split and packed) share besides :class:`RingBase`: their
    two ways of being made and the argument checks of ``complete``."""

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
        return cls(  # type: ignore[call-arg]
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
        return cls(  # type: ignore[call-arg]
            mem, num, addr.desc, addr.avail, addr.used, space="uva", features=features,
            base=base, index=addr.index,
        )  # fmt: skip

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


class DriverRole:
    """What the driver-role queues (split and packed) share besides :class:`RingBase`."""

    #: device-writable bytes of each chain, by buffer id (0: nothing writable)
    _cap_arr: np.ndarray
    #: single-descriptor chains in flight that have a device-writable buffer
    _n_single_w: int
    _fail: Any  # from BrokenState
    #: descriptors per indirect table (0: no indirect descriptors)
    max_indirect: int

    def _init_chain_state(self, num: int) -> None:
        """What the driver keeps per chain (by head or buffer id) for ``num`` entries."""
        self._tokens: list[Any] = [None] * num
        self._capacity = [0] * num
        # chains added by add_batch: one descriptor each, an integer token, in NumPy arrays
        self._single = np.zeros(num, dtype=np.bool_)
        self._n_single = 0
        #: how many of those have a device-writable buffer
        self._n_single_w = 0
        self._tok_arr = np.zeros(num, dtype=np.int64)
        self._cap_arr = np.zeros(num, dtype=np.int64)
        #: zero used lengths, for batches in which no chain has a device-writable buffer
        self._lens0 = np.zeros(num, dtype=np.int64)
        self._lens0.flags.writeable = False

    def _plan_chain(
        self, out: Sequence[Buffer], in_: Sequence[Buffer], indirect: bool | None
    ) -> tuple[list[Buffer], list[Buffer], bool, int]:
        """Check ``add``'s arguments: ``(out, in_, indirect, descriptors the ring needs)``.

        ``indirect=None`` picks an indirect table when there is one and the chain has more
        than one buffer.
        """
        outs = as_sequence_pairs(out)
        ins = as_sequence_pairs(in_)
        total = len(outs) + len(ins)
        if total == 0:
            raise InvalidParam("a chain needs at least one buffer")
        if indirect is None:
            indirect = self.max_indirect > 0 and 1 < total <= self.max_indirect
        if indirect and not 0 < total <= self.max_indirect:
            raise InvalidParam(
                f"{total} buffers do not fit an indirect table of {self.max_indirect}"
            )
        return outs, ins, indirect, 1 if indirect else total

    def _checked_lengths(
        self,
        lens: npt.NDArray[np.int64],
        caps: np.ndarray,
        ids: np.ndarray,
        single: npt.NDArray[np.bool_],
    ) -> npt.NDArray[np.int64]:
        """The used lengths ``lens`` (a copy this may change) of reaped single-descriptor
        chains ``ids`` whose writable capacities are ``caps``: 0 for a chain with nothing
        device-writable (the length means nothing then). A length beyond its chain's
        capacity breaks the queue; the chains are marked in flight again first."""
        lens[caps == 0] = 0
        over = lens > caps
        if _count(over):
            single[ids] = True
            j = int(np.argmax(over))
            self._fail(f"device wrote {int(lens[j])} bytes into a {int(caps[j])}-byte buffer")
        self._n_single_w -= _count(caps)
        return lens


def int_array(values: Sequence[int] | npt.NDArray[np.integer]) -> np.ndarray:
    """``values`` as a flat integer array, without a copy when it already is one."""
    a = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=np.int64)
    if a.dtype.kind not in "iu":
        a = a.astype(np.int64)
    return a.ravel() if a.ndim != 1 else a


def batch_buffers(
    addrs: Sequence[int] | npt.NDArray[np.integer],
    lens: Sequence[int] | npt.NDArray[np.integer],
    tokens: Sequence[int] | npt.NDArray[np.integer] | None,
) -> tuple[npt.NDArray[np.uint64], np.ndarray, np.ndarray | None]:
    """The checked arrays of a driver's ``add_batch``: addresses, lengths, tokens.

    Addresses and lengths must pair up, every length fit in 32 bits and the tokens (when
    given) match the buffers one for one; an empty batch is returned before those last checks.
    """
    addr_a = np.asarray(addrs, dtype=np.uint64)
    if addr_a.ndim != 1:
        addr_a = addr_a.ravel()
    n = addr_a.shape[0]
    len_a = int_array(lens)
    if len_a.shape[0] != n:
        raise InvalidParam("addrs and lens differ in length")
    if n == 0:
        return addr_a, len_a, None
    wide = len_a.dtype.itemsize > 4 or len_a.dtype.kind != "u"
    if wide and int(np.bitwise_or.reduce(len_a)) >> 32:
        raise InvalidParam("buffer length out of range")
    tok_a = None
    if tokens is not None:
        tok_a = int_array(tokens)
        if tok_a.shape[0] != n:
            raise InvalidParam("addrs and tokens differ in length")
    return addr_a, len_a, tok_a


def check_queue_size(num: int, *, power_of_two: bool) -> None:
    """Validate a queue size (split rings need a power of two)."""
    if not 1 <= num <= MAX_QUEUE_SIZE:
        raise InvalidParam(f"queue size {num} out of range 1..{MAX_QUEUE_SIZE}")
    if power_of_two and num & (num - 1):
        raise InvalidParam(f"split queue size {num} is not a power of two")


def check_align(name: str, addr: int, align: int) -> None:
    """Raise :class:`InvalidParam` unless ``addr`` is a multiple of ``align``."""
    if addr % align:
        raise InvalidParam(f"{name} address {addr:#x} is not {align}-byte aligned")


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


def require_open(closed: bool) -> None:
    if closed:
        raise InvalidOperation("queue is closed")


def as_sequence_pairs(items: Sequence[Buffer]) -> list[Buffer]:
    """Validate ``(addr, length)`` pairs given by a driver-role caller."""
    out: list[Buffer] = []
    for addr, length in items:
        if not 0 <= addr <= (1 << 64) - 1 or not 0 <= length <= 0xFFFFFFFF:
            raise InvalidParam(f"buffer ({addr:#x}, {length}) out of range")
        out.append((int(addr), int(length)))
    return out
