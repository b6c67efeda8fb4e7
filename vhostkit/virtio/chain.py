"""Descriptor chains as the device role hands them out: :class:`Chain` and :class:`ChainBatch`.

Both ring formats pop chains into a :class:`ChainBatch` (NumPy arrays of every descriptor of
the batch, bounds-checked) and build a :class:`Chain` (memoryviews into guest memory) only for
a chain a caller looks at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vhostkit.virtio.memory import MemoryTable

__all__ = ["Chain", "ChainBatch"]


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

    def written_ranges(
        self, chains: npt.NDArray[np.intp], used: npt.NDArray[np.integer]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """Where the device wrote for chains ``chains`` (indices into this batch) given their
        used lengths: ``(guest-physical addresses, lengths)``.

        The used length counts bytes written to a chain's device-writable buffers from their
        start, in chain order (virtio 1.2 2.7.8.2, the rule kernel vhost's ``vhost_log_write``
        and libvhost-user's ``vu_log_queue_fill`` log by): the first ``used[i]`` writable
        bytes of chain ``chains[i]``. Empty ranges are left out.
        """
        z = np.zeros(0, dtype=np.uint64)
        if chains.shape[0] == 0 or self._wflags == 0:
            return z, z
        want = used.astype(np.int64)
        lens = self._length
        if self._single:
            addr = self._addr[chains]
            got = np.minimum(lens[chains].astype(np.int64), want)
            if self._wflags == 2:
                got = np.where(self._writable[chains], got, 0)
        else:
            first = self._starts[chains]
            counts = self._starts[chains + 1] - first
            total = int(counts.sum())
            owner = np.repeat(np.arange(chains.shape[0], dtype=np.intp), counts)
            base = np.cumsum(counts) - counts
            desc = np.repeat(first, counts) + (np.arange(total, dtype=np.intp) - base[owner])
            wl = lens[desc].astype(np.int64)
            if self._wflags == 2:
                wl = np.where(self._writable[desc], wl, 0)
            # writable bytes of the same chain before each descriptor
            run = np.cumsum(wl)
            before = run - wl - np.repeat(run[base] - wl[base], counts)
            got = np.clip(want[owner] - before, 0, wl)
            addr = self._addr[desc]
        keep = got > 0
        return addr[keep].astype(np.uint64), got[keep].astype(np.uint64)

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
