"""Guest memory: memfd-backed regions, address translation with bounds checks.

Two ways to get a :class:`GuestMemory`:

* **VMM side** (the guest's owner, or vhostkit's userspace driver):
  :meth:`GuestMemory.allocate` creates one sealed memfd, sizes it, and maps every region of the
  layout from its own offset in that file. :attr:`GuestMemory.regions` then lists
  :class:`~vhostkit.backend.MemoryRegion` values whose ``userspace_addr`` is the real address of
  the mapping in this process and whose ``fd`` is the memfd, ready for
  :meth:`~vhostkit.backend.VhostBackend.set_mem_table`. The memfd belongs to the
  :class:`GuestMemory` and is closed by :meth:`GuestMemory.close`.
* **Backend side** (a vhost-user backend): :meth:`GuestMemory.map_regions` maps each region's
  ``fd`` from its ``mmap_offset``. ``userspace_addr`` is then the *frontend's* address of the
  region, which :meth:`uva_view` / :meth:`uva_to_gpa` translate (vhost-user ring addresses are
  frontend addresses).

File descriptors given to :meth:`map_regions` / :meth:`add_region` are **borrowed**: the memory
is mapped and no copy of the fd is kept (a mapping outlives its fd). With ``take_fds=True`` the
call closes them itself, on success and on every error path, which is what a vhost-user server
wants for fds that arrived with a message.

Every translation is bounds-checked: an address or length outside the regions, crossing the end
of a region (into a hole), or overflowing 64 bits raises :class:`~vhostkit.errors.GuestMemoryError`
and never touches other memory.

Changing the table while in use (``ADD_MEM_REG`` / ``REM_MEM_REG``): the table is an immutable
snapshot replaced in one assignment, so a lookup sees either the old or the new table, never a
mix, even from another thread. :attr:`GuestMemory.generation` increases on every change so that
cached ring views can be re-resolved. Views handed out earlier stay valid: a removed region is
dropped from the table at once, but its mapping is reference-counted and unmapped only when the
last view, slice or ndarray into it is released (the same holds after :meth:`GuestMemory.close`).
Such a view then points at memory that is no longer guest memory for this process; it can
neither crash nor reach other memory. Mappings are made with libc ``mmap`` rather than
:class:`mmap.mmap`, which would keep a hidden ``dup`` of every fd.

NumPy arrays returned by :meth:`gpa_array` / :meth:`uva_array` are views of the mapping (no copy)
and follow the same rule.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import functools
import logging
import mmap
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Self

import numpy as np
import numpy.typing as npt

from vhostkit.errors import GuestMemoryError, InvalidParam
from vhostkit.types import MemoryRegion

__all__ = ["PAGE_SIZE", "GuestMemory", "MemoryTable"]

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
_U64 = (1 << 64) - 1


def _page_down(value: int) -> int:
    return value - value % PAGE_SIZE


def _page_up(value: int) -> int:
    return -(-value // PAGE_SIZE) * PAGE_SIZE


class _Mmap:
    """A shared mapping made with libc ``mmap``; unmapped when the last reference goes away.

    Python's :class:`mmap.mmap` keeps a private ``dup`` of the file descriptor for its whole
    life (until Python 3.13's ``trackfd``), which would break the one-owner-per-fd rule. This
    object holds no fd. It is referenced by the ctypes buffer behind every view, so it is
    unmapped only after the last view, ndarray or slice into it has been released: no view can
    ever point at unmapped memory.
    """

    __slots__ = ("_munmap", "addr", "length")

    def __init__(self, fd: int, length: int, offset: int) -> None:
        libc = _libc()
        addr = libc.mmap(
            None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, offset
        )
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr: int = addr
        self.length = length
        self._munmap = libc.munmap  # kept: module globals may be gone at interpreter exit

    def buffer(self) -> memoryview:
        """A writable byte view of the whole mapping that keeps this object alive."""
        arr = (ctypes.c_ubyte * self.length).from_address(self.addr)
        arr._vhostkit_owner = self  # type: ignore[attr-defined]
        return memoryview(arr).cast("B")

    def __del__(self) -> None:
        munmap = getattr(self, "_munmap", None)
        if munmap is not None:
            munmap(self.addr, self.length)


_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


@dataclass(frozen=True, slots=True, eq=False)
class _Mapping:
    """One mapped region and a view of exactly its bytes (the view keeps the mapping alive)."""

    region: MemoryRegion
    view: memoryview

    @property
    def address(self) -> int:
        """Where the region's first byte is mapped in this process."""
        return ctypes.addressof(ctypes.c_ubyte.from_buffer(self.view))


def _map_region(region: MemoryRegion) -> _Mapping:
    """mmap ``region.fd`` from ``region.mmap_offset`` (shared, read-write).

    The file must be long enough: touching a mapping past the end of a file is SIGBUS, so a
    region that does not fit in its file is refused here.
    """
    if region.fd is None:
        raise InvalidParam("a memory region needs an fd to be mapped")
    aligned = _page_down(region.mmap_offset)
    delta = region.mmap_offset - aligned
    length = region.memory_size + delta
    where = (
        f"region gpa={region.guest_phys_addr:#x} size={region.memory_size:#x} "
        f"offset={region.mmap_offset:#x}"
    )
    try:
        st = os.fstat(region.fd)
        if stat.S_ISREG(st.st_mode) and region.mmap_offset + region.memory_size > st.st_size:
            raise GuestMemoryError(f"{where} extends past the end of its file ({st.st_size:#x})")
        if length > sys.maxsize or aligned > (1 << 63) - 1:
            raise GuestMemoryError(f"{where} cannot be mapped")
        mapping = _Mmap(region.fd, length, aligned)
    except OSError as exc:
        raise GuestMemoryError(f"cannot map {where}: {exc}") from exc
    root = mapping.buffer()
    view = root[delta : delta + region.memory_size]
    root.release()
    # The fd was only borrowed to map: the stored region must not name it, or it would name a
    # closed fd (or whatever file reuses the number) once the caller closes it.
    return _Mapping(replace(region, fd=None), view)


def _unmap(mapping: _Mapping) -> None:
    """Drop our view; the mapping goes when no view handed out earlier references it."""
    try:
        mapping.view.release()
    except BufferError:  # an ndarray made from our own view is still alive
        pass


class _Space:
    """One address space (guest-physical or frontend-virtual): sorted, non-overlapping."""

    __slots__ = ("ends", "maps", "name", "np_ends", "np_starts", "starts")

    def __init__(self, name: str, maps: Sequence[_Mapping], key: str) -> None:
        self.name = name
        ordered = sorted(maps, key=lambda m: getattr(m.region, key))
        self.maps: tuple[_Mapping, ...] = tuple(ordered)
        self.starts: list[int] = [getattr(m.region, key) for m in ordered]
        self.ends: list[int] = [
            s + m.region.memory_size for s, m in zip(self.starts, ordered, strict=True)
        ]
        for i in range(1, len(ordered)):
            if self.starts[i] < self.ends[i - 1]:
                raise InvalidParam(f"memory regions overlap in {name} space at {self.starts[i]:#x}")
        self.np_starts = np.array(self.starts, dtype=np.uint64)
        # ends may be 2**64 exactly: keep them as Python ints and in a float-free uint64 minus 1
        self.np_ends = np.array([e - 1 for e in self.ends], dtype=np.uint64)

    def views(self, addr: int, length: int) -> list[memoryview]:
        """Views covering ``[addr, addr + length)``, one per region crossed (adjacent only)."""
        if addr < 0 or length < 0 or addr > _U64:
            raise GuestMemoryError(f"{self.name} address {addr:#x} length {length} invalid")
        if length == 0:
            return []
        if addr + length - 1 > _U64:
            raise GuestMemoryError(f"{self.name} range {addr:#x}+{length:#x} overflows 64 bits")
        i = bisect.bisect_right(self.starts, addr) - 1
        out: list[memoryview] = []
        cur, left = addr, length
        while left:
            if i < 0 or i >= len(self.maps) or not self.starts[i] <= cur < self.ends[i]:
                raise GuestMemoryError(
                    f"{self.name} range {addr:#x}+{length:#x} is not in guest memory (at {cur:#x})"
                )
            off = cur - self.starts[i]
            n = min(left, self.ends[i] - cur)
            out.append(self.maps[i].view[off : off + n])
            cur += n
            left -= n
            i += 1
        return out

    def view(self, addr: int, length: int) -> memoryview:
        views = self.views(addr, length)
        if not views:
            return memoryview(bytearray())
        if len(views) != 1:
            raise GuestMemoryError(
                f"{self.name} range {addr:#x}+{length:#x} crosses a region boundary"
            )
        return views[0]

    def find(self, addr: int) -> int:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.ends[i]:
            raise GuestMemoryError(f"{self.name} address {addr:#x} is not in guest memory")
        return i


class MemoryTable:
    """An immutable snapshot of the mapped regions. Obtain with :attr:`GuestMemory.table`.

    Queues take one snapshot per batch so that every address in the batch is translated against
    the same table.
    """

    __slots__ = ("gpa", "uva")

    def __init__(self, maps: Sequence[_Mapping]) -> None:
        self.gpa = _Space("guest-physical", maps, "guest_phys_addr")
        self.uva = _Space("user", maps, "userspace_addr")

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, in guest-physical order."""
        return tuple(m.region for m in self.gpa.maps)

    def lookup_gpa_batch(
        self, addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        """Translate many guest-physical ranges at once.

        Returns ``(region_index, offset)`` per range, where ``region_index`` indexes the
        regions in guest-physical order. A range that crosses into an adjacent region gets
        index ``-1`` (use :meth:`gpa_views` for it); a zero-length range gets index ``-2``
        (nothing to view). Any range outside guest memory raises :class:`GuestMemoryError`
        naming the first one.
        """
        addr = np.asarray(addr, dtype=np.uint64)
        length = np.asarray(length, dtype=np.uint64)
        space = self.gpa
        nreg = len(space.maps)
        if nreg:
            # fast path: every range non-empty and inside one region
            last = addr + (length - np.uint64(1))
            if nreg == 1:
                idx = np.zeros(addr.shape[0], dtype=np.intp)
                lo, hi = space.np_starts[0], space.np_ends[0]
            else:
                idx = np.searchsorted(space.np_starts, addr, side="right").astype(np.intp) - 1
                lo, hi = space.np_starts[idx], space.np_ends[idx]
            if ((addr >= lo) & (last >= addr) & (last <= hi)).all():
                return idx, addr - lo
        return self._lookup_gpa_slow(addr, length)

    def _lookup_gpa_slow(
        self, addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        n = addr.shape[0]
        region = np.full(n, -2, dtype=np.intp)
        offset = np.zeros(n, dtype=np.uint64)
        nonzero = length != 0
        if not nonzero.any():
            return region, offset
        space = self.gpa
        if not space.maps:
            bad = int(np.argmax(nonzero))
            raise GuestMemoryError(
                f"guest-physical range {int(addr[bad]):#x}+{int(length[bad]):#x}: no memory"
            )
        # last byte of each range; overflow when it wraps below addr
        last = addr + (length - np.uint64(1))
        overflow = nonzero & (last < addr)
        idx = np.searchsorted(space.np_starts, addr, side="right").astype(np.intp) - 1
        safe = np.clip(idx, 0, len(space.maps) - 1)
        inside = (idx >= 0) & (addr <= space.np_ends[safe]) & ~overflow
        within = inside & (last <= space.np_ends[safe])
        if not (inside | ~nonzero).all():
            bad = int(np.argmax(nonzero & ~inside))
            raise GuestMemoryError(
                f"guest-physical range {int(addr[bad]):#x}+{int(length[bad]):#x}"
                " is not in guest memory"
            )
        ok = nonzero & within
        region[ok] = safe[ok]
        offset[ok] = addr[ok] - space.np_starts[safe[ok]]
        crossing = nonzero & ~within
        if crossing.any():
            for j in np.flatnonzero(crossing).tolist():
                space.views(int(addr[j]), int(length[j]))  # raises unless adjacent regions
            region[crossing] = -1
        return region, offset

    def gpa_map_view(self, index: int) -> memoryview:
        """The whole view of the region at ``index`` in guest-physical order."""
        return self.gpa.maps[index].view


class GuestMemory:
    """Guest memory regions mapped into this process, with bounds-checked translation.

    Build with :meth:`allocate` (VMM side) or :meth:`map_regions` (backend side); an empty
    instance accepts :meth:`add_region`. Context manager; :meth:`close` is idempotent.
    """

    def __init__(self) -> None:
        self._table = MemoryTable(())
        self._owned_fds: list[int] = []
        self._generation = 0
        self._closed = False

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def allocate(cls, layout: Sequence[tuple[int, int]], *, name: str = "vhostkit-guest") -> Self:
        """Create guest memory for ``layout``, a sequence of ``(guest_phys_addr, size)``.

        All regions live in one memfd, one after the other at page-aligned file offsets (so the
        second region has a non-zero ``mmap_offset``, like QEMU's RAM above and below a PCI
        hole). The memfd is sealed against shrinking, so a peer cannot truncate it under a
        mapping (which would turn accesses into SIGBUS).
        """
        if not layout:
            raise InvalidParam("layout must list at least one region")
        offsets: list[int] = []
        total = 0
        for gpa, size in layout:
            if size <= 0:
                raise InvalidParam(f"region size {size} must be positive")
            if gpa < 0 or gpa + size - 1 > _U64:
                raise InvalidParam(f"region {gpa:#x}+{size:#x} outside the 64-bit space")
            offsets.append(total)
            total += _page_up(size)
        self = cls()
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        maps: list[_Mapping] = []
        try:
            os.ftruncate(fd, total)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            for (gpa, size), off in zip(layout, offsets, strict=True):
                mapping = _map_region(MemoryRegion(gpa, size, 0, off, fd))
                region = replace(mapping.region, userspace_addr=mapping.address, fd=fd)
                maps.append(_Mapping(region, mapping.view))
            self._table = MemoryTable(maps)
        except BaseException:
            for m in maps:
                _unmap(m)
            os.close(fd)
            raise
        self._owned_fds.append(fd)
        log.debug("allocated guest memory %s in memfd %d (%d bytes)", list(layout), fd, total)
        return self

    @classmethod
    def map_regions(cls, regions: Iterable[MemoryRegion], *, take_fds: bool = False) -> Self:
        """Map the regions of a memory table (``SET_MEM_TABLE``).

        ``take_fds=False``: the fds are borrowed (mapped, not kept, not closed).
        ``take_fds=True``: every region's fd is closed before returning, also on error.
        Either way the stored :attr:`regions` carry ``fd=None``: only memory made by
        :meth:`allocate` owns (and names) its file.
        """
        regions = list(regions)
        self = cls()
        maps: list[_Mapping] = []
        try:
            for region in regions:
                maps.append(_map_region(region))
            self._table = MemoryTable(maps)
        except BaseException:
            for m in maps:
                _unmap(m)
            raise
        finally:
            if take_fds:
                _close_fds(regions)
        return self

    # -- table changes ---------------------------------------------------------------------

    def add_region(self, region: MemoryRegion, *, take_fd: bool = False) -> None:
        """Map one more region (``ADD_MEM_REG``). Overlaps raise :class:`InvalidParam`."""
        try:
            self._check_open()
            mapping = _map_region(region)
            try:
                table = MemoryTable([*self._table.gpa.maps, mapping])
            except BaseException:
                _unmap(mapping)
                raise
            self._publish(table)
        finally:
            if take_fd:
                _close_fds([region])

    def remove_region(self, region: MemoryRegion) -> MemoryRegion:
        """Drop the region matching ``region`` (``REM_MEM_REG``) and return the stored one.

        Matching is on guest address, size and user address (the fd and offset in a
        ``REM_MEM_REG`` message need not match). See the module docstring for what happens to
        views into the region that are still alive.
        """
        self._check_open()
        maps = self._table.gpa.maps
        for m in maps:
            r = m.region
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
            ):
                self._publish(MemoryTable([x for x in maps if x is not m]))
                _unmap(m)
                return r
        raise InvalidParam(
            f"no region gpa={region.guest_phys_addr:#x} size={region.memory_size:#x}"
            f" uva={region.userspace_addr:#x}"
        )

    def _publish(self, table: MemoryTable) -> None:
        self._table = table
        self._generation += 1

    # -- properties ------------------------------------------------------------------------

    @property
    def table(self) -> MemoryTable:
        """The current immutable snapshot."""
        self._check_open()
        return self._table

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The mapped regions in guest-physical order (VMM side: with the memfd as ``fd``)."""
        return self._table.regions

    @property
    def generation(self) -> int:
        """Increases every time the table changes (and on close)."""
        return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    # -- translation -----------------------------------------------------------------------

    def gpa_views(self, addr: int, length: int) -> list[memoryview]:
        """Views of ``[addr, addr + length)`` in guest-physical space, split at region ends."""
        return self.table.gpa.views(addr, length)

    def gpa_view(self, addr: int, length: int) -> memoryview:
        """One writable view of a guest-physical range that lies within a single region."""
        return self.table.gpa.view(addr, length)

    def uva_views(self, addr: int, length: int) -> list[memoryview]:
        """Like :meth:`gpa_views` for user (frontend virtual) addresses."""
        return self.table.uva.views(addr, length)

    def uva_view(self, addr: int, length: int) -> memoryview:
        """Like :meth:`gpa_view` for user (frontend virtual) addresses."""
        return self.table.uva.view(addr, length)

    def gpa_to_uva(self, addr: int) -> int:
        """The user address of a guest-physical address."""
        space = self.table.gpa
        i = space.find(addr)
        return space.maps[i].region.userspace_addr + (addr - space.starts[i])

    def uva_to_gpa(self, addr: int) -> int:
        """The guest-physical address of a user (frontend virtual) address."""
        space = self.table.uva
        i = space.find(addr)
        return space.maps[i].region.guest_phys_addr + (addr - space.starts[i])

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest-physical ``addr`` (may span adjacent regions)."""
        return b"".join(self.gpa_views(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest-physical ``addr`` (may span adjacent regions)."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.gpa_views(addr, src.nbytes):
            view[:] = src[pos : pos + len(view)]
            pos += len(view)

    def read_uva(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes from user address ``addr``."""
        return b"".join(self.uva_views(addr, length))

    def write_uva(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to user address ``addr``."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.uva_views(addr, src.nbytes):
            view[:] = src[pos : pos + len(view)]
            pos += len(view)

    def gpa_array(self, addr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        """A writable NumPy array of ``count`` ``dtype`` items over guest-physical ``addr``."""
        dt = np.dtype(dtype)
        return np.frombuffer(self.gpa_view(addr, dt.itemsize * count), dtype=dt, count=count)

    def uva_array(self, addr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        """A writable NumPy array of ``count`` ``dtype`` items over user address ``addr``."""
        dt = np.dtype(dtype)
        return np.frombuffer(self.uva_view(addr, dt.itemsize * count), dtype=dt, count=count)

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    def close(self) -> None:
        """Unmap every region and close the memfd this object owns. Idempotent."""
        if self._closed:
            return
        self._closed = True
        maps = self._table.gpa.maps
        self._publish(MemoryTable(()))
        for m in maps:
            _unmap(m)
        fds, self._owned_fds = self._owned_fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        regions = ", ".join(
            f"{r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in self._table.regions
        )
        return f"<GuestMemory [{regions}]{' closed' if self._closed else ''}>"


def _close_fds(regions: Iterable[MemoryRegion]) -> None:
    seen: set[int] = set()
    for region in regions:
        if region.fd is not None and region.fd not in seen:
            seen.add(region.fd)
            try:
                os.close(region.fd)
            except OSError as exc:
                log.warning("closing region fd %d: %s", region.fd, exc)
