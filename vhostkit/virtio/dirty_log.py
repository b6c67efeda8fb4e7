"""The dirty-page log of live migration: one bit per 4 KiB page of guest-physical memory.

While a VMM migrates a running guest it copies guest memory to the destination page by page and
copies again every page written since. Writes the guest's CPUs make, the VMM sees itself; writes
a vhost device makes (used rings, received frames, blk read data, status bytes) it learns from the
*log*: a bitmap shared between the VMM and the device, laid out the same way by the kernel's
vhost (``VHOST_SET_LOG_BASE``) and by vhost-user (``VHOST_USER_SET_LOG_BASE`` with LOG_SHMFD):

* bit ``p % 8`` of byte ``p // 8`` stands for the guest-physical page ``p`` (``gpa // 4096``),
  whatever the host's page size;
* the VMM sizes the log in 64-bit words to cover the highest guest-physical address;
* the device sets bits *after* the data is in guest memory; the VMM atomically exchanges each word
  with zero, so a bit set while it reads is either in what it read or stays set for its next pass
  (never lost).

Both sides use real atomic operations on the shared memory (``__atomic_fetch_or`` and
``__atomic_exchange`` from libatomic, lock-prefixed instructions on x86-64), so a device's threads,
a kernel vhost worker and the VMM can share one log safely.

:class:`DirtyLog` is one mapped log. A device maps the log it was given (:meth:`DirtyLog.map`)
and marks what it wrote (:meth:`~DirtyLog.mark`, :meth:`~DirtyLog.mark_ranges`); a VMM allocates
one (:meth:`DirtyLog.allocate`), hands :attr:`~DirtyLog.fd` to the device, and collects dirty
pages with :meth:`~DirtyLog.collect`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidParam, Unsupported
from vhostkit.types import MemoryRegion
from vhostkit.virtio.memory import PAGE_SIZE, _Mmap

__all__ = ["LOG_PAGE_SHIFT", "LOG_PAGE_SIZE", "DirtyLog", "DirtyLogError", "log_size_for"]

log = logging.getLogger(__name__)

#: The log's page: 4 KiB on every host (``VHOST_PAGE_SIZE``), not the host's page size.
LOG_PAGE_SHIFT = 12
LOG_PAGE_SIZE = 1 << LOG_PAGE_SHIFT
#: The log is sized in 64-bit words (QEMU's ``vhost_log_chunk_t``): 64 pages a word.
_WORD_BYTES = 8
_PAGES_PER_WORD = 64
_U64 = (1 << 64) - 1


class DirtyLogError(GuestMemoryError):
    """A write the device made lies beyond the log the VMM gave it (the log is too small)."""


def log_size_for(regions: Iterable[MemoryRegion] | int) -> int:
    """Bytes of log that cover ``regions`` (or guest-physical addresses below an end address).

    Rounded up to whole 64-bit words, as QEMU and the kernel's users size it; at least one word.
    """
    end = regions if isinstance(regions, int) else max((r.guest_end for r in regions), default=0)
    if end < 0 or end > _U64 + 1:
        raise InvalidParam(f"guest-physical end {end:#x} is outside 64 bits")
    pages = -(-end // LOG_PAGE_SIZE)
    words = max(1, -(-pages // _PAGES_PER_WORD))
    return words * _WORD_BYTES


@dataclass(frozen=True, slots=True)
class _Atomics:
    """libatomic's lock-free operations on shared memory (address, value, memory order)."""

    fetch_or_1: Any
    fetch_and_1: Any
    fetch_or_8: Any
    exchange_8: Any


@functools.cache
def _atomics() -> _Atomics:
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError as exc:  # pragma: no cover - libatomic1 ships with gcc on every Debian
        raise Unsupported("dirty logging needs libatomic.so.1 (Debian package libatomic1)") from exc

    def fn(name: str, width: type[ctypes._SimpleCData[int]]) -> Any:
        f = getattr(lib, name)
        f.restype = width
        f.argtypes = [ctypes.c_void_p, width, ctypes.c_int]
        return f

    return _Atomics(
        fetch_or_1=fn("__atomic_fetch_or_1", ctypes.c_uint8),
        fetch_and_1=fn("__atomic_fetch_and_1", ctypes.c_uint8),
        fetch_or_8=fn("__atomic_fetch_or_8", ctypes.c_uint64),
        exchange_8=fn("__atomic_exchange_8", ctypes.c_uint64),
    )


_SEQ_CST = 5  # __ATOMIC_SEQ_CST


class DirtyLog:
    """One mapped dirty-page log.

    The mapping is owned here and unmapped by :meth:`close`. A log made by :meth:`allocate`
    also owns its memfd (:attr:`fd`, closed by :meth:`close`); a log made by :meth:`map` keeps
    no fd (the caller closes the one it mapped, which a mapping outlives).
    """

    def __init__(self, mapping: _LogMapping, size: int, fd: int | None) -> None:
        self._mapping: _LogMapping | None = mapping
        self._size = size
        self._fd = fd
        self._bytes: npt.NDArray[np.uint8] = np.frombuffer(mapping.view, dtype=np.uint8)[:size]
        self._base = mapping.addr + mapping.skip
        self._word_aligned = self._base % _WORD_BYTES == 0

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def map(cls, fd: int, size: int, offset: int = 0) -> Self:
        """Map ``size`` bytes of log from ``offset`` in ``fd`` (borrowed: not closed here)."""
        if size <= 0:
            raise InvalidParam(f"log size {size} must be positive")
        if offset < 0 or offset > _U64 - size:
            raise InvalidParam(f"log offset {offset:#x} with size {size:#x} overflows")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise InvalidParam(f"log fd {fd}: {exc.strerror}") from exc
        # a shared file mapped beyond its end would fault (SIGBUS) at the first mark
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            raise InvalidParam(
                f"log of {size:#x} bytes at offset {offset:#x} is beyond the end of its file "
                f"({st.st_size:#x} bytes)"
            )
        return cls(_LogMapping.create(fd, size, offset), size, None)

    @classmethod
    def allocate(cls, size: int, *, name: str = "vhostkit-dirty-log") -> Self:
        """A new zeroed log in a memfd of its own, ready to hand to a device."""
        if size <= 0 or size % _WORD_BYTES:
            raise InvalidParam(f"log size {size} must be a positive multiple of 8")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = _LogMapping.create(fd, size, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(mapping, size, fd)

    # -- properties ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of log."""
        return self._size

    @property
    def fd(self) -> int:
        """The memfd of a log made by :meth:`allocate` (to send to the device)."""
        if self._fd is None:
            raise InvalidParam("a log mapped from a peer's fd has no fd of its own")
        return self._fd

    @property
    def pages(self) -> int:
        """How many 4 KiB guest pages the log covers."""
        return self._size * 8

    @property
    def closed(self) -> bool:
        return self._mapping is None

    # -- the device side ----------------------------------------------------------------------

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page that ``length`` bytes written at ``gpa`` touched."""
        if length <= 0:
            return
        first = gpa >> LOG_PAGE_SHIFT
        last = (gpa + length - 1) >> LOG_PAGE_SHIFT
        self._mark_pages(first, last)

    def mark_ranges(self, gpas: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        """Mark the pages of many writes at once (one atomic OR per touched word)."""
        addr = np.asarray(gpas, dtype=np.uint64)
        size = np.asarray(lengths, dtype=np.uint64)
        keep = size > 0
        if not keep.all():
            addr, size = addr[keep], size[keep]
        if addr.size == 0:
            return
        first = addr >> np.uint64(LOG_PAGE_SHIFT)
        last = (addr + size - np.uint64(1)) >> np.uint64(LOG_PAGE_SHIFT)
        if int(last.max()) >= self.pages:
            raise DirtyLogError(
                f"a write up to page {int(last.max()):#x} is beyond the log's {self.pages:#x} pages"
            )
        counts = (last - first + np.uint64(1)).astype(np.int64)
        if int(counts.max()) == 1:
            pages = first.astype(np.int64)
        else:
            total = int(counts.sum())
            starts = np.repeat(first.astype(np.int64), counts)
            offsets = np.arange(total, dtype=np.int64) - np.repeat(
                np.cumsum(counts) - counts, counts
            )
            pages = starts + offsets
        self._or_pages(np.unique(pages))

    def _mark_pages(self, first: int, last: int) -> None:
        if last >= self.pages:
            raise DirtyLogError(
                f"a write up to page {last:#x} is beyond the log's {self.pages:#x} pages"
            )
        if first == last:
            self._or_byte(first >> 3, 1 << (first & 7))
            return
        self._or_pages(np.arange(first, last + 1, dtype=np.int64))

    def _or_pages(self, pages: npt.NDArray[np.int64]) -> None:
        """OR the bits of sorted, unique page numbers into the log, one atomic op a word."""
        self._check_open()
        unit = 6 if self._word_aligned else 3
        words = pages >> unit
        bits = np.left_shift(np.uint64(1), (pages & ((1 << unit) - 1)).astype(np.uint64))
        starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
        masks = np.bitwise_or.reduceat(bits, starts)
        lib = _atomics()
        if unit == 6:
            op, step = lib.fetch_or_8, _WORD_BYTES
        else:
            op, step = lib.fetch_or_1, 1
        base = self._base
        for word, mask in zip(words[starts].tolist(), masks.tolist(), strict=True):
            op(base + word * step, mask, _SEQ_CST)

    def _or_byte(self, index: int, mask: int) -> None:
        self._check_open()
        _atomics().fetch_or_1(self._base + index, mask, _SEQ_CST)

    # -- the VMM side -------------------------------------------------------------------------

    def collect(self) -> npt.NDArray[np.int64]:
        """Take every dirty page: their numbers (sorted), each bit cleared as it is read.

        Each non-zero word is exchanged with zero atomically, so a page the device marks
        meanwhile is either returned now or stays marked for the next call.
        """
        self._check_open()
        whole = self._size - self._size % _WORD_BYTES if self._word_aligned else 0
        taken = np.zeros(self._size, dtype=np.uint8)
        lib = _atomics()
        if whole:
            as_words = self._bytes[:whole].view(np.uint64)
            out_words = taken[:whole].view(np.uint64)
            for i in np.flatnonzero(as_words).tolist():
                out_words[i] = lib.exchange_8(self._base + i * _WORD_BYTES, 0, _SEQ_CST)
        for i in np.flatnonzero(self._bytes[whole:]).tolist():
            j = whole + i
            # No byte-wide exchange in the library: take the bits seen and clear exactly those.
            seen = int(self._bytes[j])
            taken[j] = seen
            lib.fetch_and_1(self._base + j, ~seen & 0xFF, _SEQ_CST)
        return np.flatnonzero(np.unpackbits(taken, bitorder="little")).astype(np.int64)

    def snapshot(self) -> npt.NDArray[np.int64]:
        """The dirty pages now, without clearing them."""
        self._check_open()
        return np.flatnonzero(np.unpackbits(self._bytes.copy(), bitorder="little")).astype(np.int64)

    def clear(self) -> None:
        """Clear the whole log (before logging starts; not safe while a device writes)."""
        self._check_open()
        self._bytes[:] = 0

    # -- life ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._mapping is None:
            raise InvalidParam("the dirty log is closed")

    def close(self) -> None:
        """Unmap the log (and close its memfd if it owns one). Idempotent."""
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        self._bytes = np.zeros(0, dtype=np.uint8)
        mapping.release()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.pages} pages"
        return f"<DirtyLog {self._size} bytes, {state}>"


class _LogMapping:
    """A shared mapping of a log, page-aligned from the start of its file page.

    The mapping itself is a :class:`~vhostkit.virtio.memory._Mmap`, unmapped only when the last
    view or array into it is gone, so no array of the log can outlive its memory.
    """

    __slots__ = ("addr", "skip", "view")

    def __init__(self, addr: int, skip: int, view: memoryview) -> None:
        self.addr = addr
        self.skip = skip
        self.view = view

    @classmethod
    def create(cls, fd: int, size: int, offset: int) -> _LogMapping:
        start = offset - offset % PAGE_SIZE
        skip = offset - start
        try:
            mapping = _Mmap(fd, skip + size, start)
        except OSError as exc:
            raise InvalidParam(
                f"cannot map the dirty log: {exc.strerror}", errno=exc.errno
            ) from exc
        return cls(mapping.addr, skip, mapping.buffer()[skip:])

    def release(self) -> None:
        self.view = memoryview(b"")
