"""Pieces both ring formats and both roles share: flags, dtypes, index arithmetic, errors.

Where the rest lives:

* :mod:`~vhostkit.virtio.chain`: :class:`Chain` / :class:`ChainBatch`, the chains the device
  role pops (re-exported here);
* :mod:`~vhostkit.virtio.device_role` / :mod:`~vhostkit.virtio.driver_role`: what the device
  queues, and what the driver queues, of both formats have in common;
* :mod:`~vhostkit.virtio.split` / :mod:`~vhostkit.virtio.packed`: one package per ring format,
  each with its layout, its device-role queue and its driver-role queue.

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
from collections.abc import Sequence
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidOperation, InvalidParam, VirtqueueError
from vhostkit.types import VringAddr
from vhostkit.virtio.chain import Chain, ChainBatch
from vhostkit.virtio.features import VirtioFeature

if TYPE_CHECKING:
    from vhostkit.virtio.memory import GuestMemory

__all__ = [
    "MAX_QUEUE_SIZE",
    "SPLIT_DESC_DTYPE",
    "Buffer",
    "Chain",
    "ChainBatch",
    "DescFlag",
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


def int_array(values: Sequence[int] | npt.NDArray[np.integer]) -> np.ndarray:
    """``values`` as a flat integer array, without a copy when it already is one."""
    a = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=np.int64)
    if a.dtype.kind not in "iu":
        a = a.astype(np.int64)
    return a.ravel() if a.ndim != 1 else a


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return -(-value // align) * align


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


def require_open(closed: bool) -> None:
    if closed:
        raise InvalidOperation("queue is closed")
