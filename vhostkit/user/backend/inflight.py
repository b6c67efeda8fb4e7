"""Inflight I/O tracking for split and packed virtqueues (vhost-user ``INFLIGHT_SHMFD``).

A back-end that may crash keeps, in a memory area it shares with the front-end
(``GET_INFLIGHT_FD`` / ``SET_INFLIGHT_FD``), which descriptor chains it has taken from the
ring but not yet completed. A restarted back-end gets the same area back and resubmits exactly
those chains, in the order it first took them. The layout and the algorithm are the spec's
("Inflight I/O tracking" in ``docs/interop/vhost-user.rst``):

per queue, a 16-byte header ``features u64, version u16, desc_num u16, last_batch_head u16,
used_idx u16`` and ``desc_num`` entries of ``inflight u8, padding[5], next u16, counter u64``.

:class:`SplitInflight` works in batches over a NumPy view of one queue's region. The calls a
device makes, in order:

* after popping chains: :meth:`SplitInflight.popped` (counters, inflight = 1);
* before writing used entries: :meth:`SplitInflight.completing` (links the batch);
* after the used index is published: :meth:`SplitInflight.completed` (inflight = 0,
  ``used_idx``);
* on (re)start: :meth:`SplitInflight.recover` with the used index found in the ring, which
  repairs an interrupted last batch and returns the heads to resubmit, oldest first.

:class:`PackedInflight` does the same for packed rings, whose region keeps a copy of every
descriptor in flight (the ring's slots are reused by used descriptors): see its docstring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidParam

log = logging.getLogger(__name__)

__all__ = [
    "PACKED_HEADER_DTYPE",
    "PACKED_STATE_DTYPE",
    "RING_DESC_DTYPE",
    "SPLIT_DESC_DTYPE",
    "SPLIT_HEADER_DTYPE",
    "PackedInflight",
    "PackedRecovery",
    "SplitInflight",
    "packed_queue_region_size",
    "split_queue_region_size",
]

SPLIT_HEADER_DTYPE = np.dtype(
    [
        ("features", "<u8"),
        ("version", "<u2"),
        ("desc_num", "<u2"),
        ("last_batch_head", "<u2"),
        ("used_idx", "<u2"),
    ]
)
SPLIT_DESC_DTYPE = np.dtype(
    [("inflight", "u1"), ("padding", "u1", (5,)), ("next", "<u2"), ("counter", "<u8")]
)
assert SPLIT_HEADER_DTYPE.itemsize == 16 and SPLIT_DESC_DTYPE.itemsize == 16

INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1


def split_queue_region_size(queue_size: int) -> int:
    """Bytes of one split queue's region, rounded up to 64 like the other implementations."""
    raw = SPLIT_HEADER_DTYPE.itemsize + SPLIT_DESC_DTYPE.itemsize * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


def packed_queue_region_size(queue_size: int) -> int:
    """Bytes of one packed queue's region: a 32-byte header and 32 bytes per descriptor."""
    raw = 32 + 32 * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


class SplitInflight:
    """One split queue's inflight region, over ``buf`` (a writable buffer of the shared area).

    A region whose version is 0 is new: it is initialised for ``queue_size`` descriptors. A
    region that was already in use keeps its contents (that is the point).
    """

    def __init__(self, buf: memoryview | bytearray, queue_size: int) -> None:
        need = split_queue_region_size(queue_size)
        view = memoryview(buf).cast("B")
        if view.nbytes < need:
            raise InvalidParam(f"inflight region of {view.nbytes} bytes, {need} needed")
        self._header = np.frombuffer(view, SPLIT_HEADER_DTYPE, 1, 0)
        self.desc = np.frombuffer(view, SPLIT_DESC_DTYPE, queue_size, SPLIT_HEADER_DTYPE.itemsize)
        self.queue_size = queue_size
        h = self._header[0]
        if int(h["version"]) == 0:
            self.desc[:] = np.zeros(queue_size, SPLIT_DESC_DTYPE)
            self._header["features"] = 0
            self._header["desc_num"] = queue_size
            self._header["last_batch_head"] = 0
            self._header["used_idx"] = 0
            self._header["version"] = INFLIGHT_VERSION  # last: marks the region valid
        elif int(h["desc_num"]) != queue_size:
            raise InvalidParam(
                f"inflight region tracks {int(h['desc_num'])} descriptors, queue has {queue_size}"
            )
        self._counter = int(self.desc["counter"].max()) + 1 if queue_size else 1

    @property
    def used_idx(self) -> int:
        return int(self._header["used_idx"][0])

    def inflight_heads(self) -> list[int]:
        """Heads marked inflight, oldest first (by counter)."""
        heads = np.flatnonzero(self.desc["inflight"])
        order = np.argsort(self.desc["counter"][heads], kind="stable")
        return heads[order].tolist()

    # -- the device's calls --

    def popped(self, heads: npt.ArrayLike) -> None:
        """Chains with these heads were taken from the avail ring, in this order."""
        h = np.asarray(heads, dtype=np.intp)
        n = h.shape[0]
        if not n:
            return
        self.desc["counter"][h] = np.arange(self._counter, self._counter + n, dtype=np.uint64)
        self._counter += n
        self.desc["inflight"][h] = 1

    def completing(self, heads: npt.ArrayLike) -> None:
        """About to put these heads in the used ring: link them as the last batch."""
        h = np.asarray(heads, dtype=np.intp)
        if not h.shape[0]:
            return
        desc = self.desc
        # desc[h0].next = last_batch_head; desc[h1].next = h0; ...; last_batch_head = h[-1]
        prev = np.empty_like(h)
        prev[0] = int(self._header["last_batch_head"][0])
        prev[1:] = h[:-1]
        desc["next"][h] = prev
        self._header["last_batch_head"] = int(h[-1])

    def completed(self, heads: npt.ArrayLike, used_idx: int) -> None:
        """The used index now includes these heads."""
        h = np.asarray(heads, dtype=np.intp)
        if h.shape[0]:
            self.desc["inflight"][h] = 0
        self._header["used_idx"] = used_idx & 0xFFFF

    def recover(self, ring_used_idx: int) -> list[int]:
        """After a restart: repair the last batch and return the heads to resubmit.

        If the back-end died after publishing a used index but before clearing the batch's
        inflight marks, ``used_idx`` in the region lags the ring's: the marks of the last
        ``ring_used_idx - used_idx`` heads of the batch list are cleared.
        """
        batch = (ring_used_idx - self.used_idx) & 0xFFFF
        if batch:
            if batch > self.queue_size:
                raise InvalidParam(
                    f"used index moved {batch} past the inflight record (queue {self.queue_size})"
                )
            head = int(self._header["last_batch_head"][0])
            done: list[int] = []
            for _ in range(batch):
                if head >= self.queue_size:  # the region is the front-end's to write
                    raise InvalidParam(f"the inflight batch list runs off the region at {head}")
                done.append(head)
                head = int(self.desc["next"][head])
            self.desc["inflight"][done] = 0
            self._header["used_idx"] = ring_used_idx & 0xFFFF
        return self.inflight_heads()


# ----------------------------------------------------------------------------------------------
# packed rings
# ----------------------------------------------------------------------------------------------

PACKED_HEADER_DTYPE = np.dtype(
    [
        ("features", "<u8"),
        ("version", "<u2"),
        ("desc_num", "<u2"),
        ("free_head", "<u2"),
        ("old_free_head", "<u2"),
        ("used_idx", "<u2"),
        ("old_used_idx", "<u2"),
        ("used_wrap_counter", "u1"),
        ("old_used_wrap_counter", "u1"),
        ("padding", "u1", (10,)),  # 7 in the spec, then 3 up to the 8-aligned descriptors
    ]
)
#: ``DescStatePacked``
PACKED_STATE_DTYPE = np.dtype(
    [
        ("inflight", "u1"),
        ("padding", "u1"),
        ("next", "<u2"),
        ("last", "<u2"),
        ("num", "<u2"),
        ("counter", "<u8"),
        ("id", "<u2"),
        ("flags", "<u2"),
        ("len", "<u4"),
        ("addr", "<u8"),
    ]
)
#: a ring descriptor (``struct vring_packed_desc``), as the resubmitted chains are returned
RING_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
assert PACKED_HEADER_DTYPE.itemsize == 32 and PACKED_STATE_DTYPE.itemsize == 32

_F_AVAIL = 1 << 7
_F_USED = 1 << 15


@dataclass(frozen=True)
class PackedRecovery:
    """What a restarted back-end resubmits: the chains in flight, oldest first.

    ``descs`` are the copies of their ring descriptors (``addr, len, id, flags``, chain after
    chain), ``counts`` the ring descriptors of each chain, ``heads`` the region entries of the
    chains; ``used_idx`` / ``used_wrap`` the used position the device resumes at (the avail
    position follows the resubmitted descriptors).
    """

    heads: list[int]
    descs: np.ndarray
    counts: npt.NDArray[np.intp]
    used_idx: int
    used_wrap: int


class PackedInflight:
    """One packed queue's inflight region (the spec's ``QueueRegionPacked``), over ``buf``.

    The device's calls, in order:

    * after taking chains from the ring: :meth:`popped` with the ring descriptors taken (each
      one is copied into the region, chain by chain, off the free list);
    * before writing used descriptors: :meth:`completing` with the chains' buffer ids (links
      them back to the free list, advances ``used_idx``);
    * after the used descriptors are written: :meth:`completed` (inflight = 0, commit);
    * on (re)start: :meth:`recover` with the ring's descriptor flags (a writable view): commits
      or rolls back an interrupted update (a rolled-back completion's used descriptors are made
      available again in the ring) and returns the chains to resubmit, rebuilt from the region.

    The header fields are mirrored in attributes (this object is the region's only writer) and
    every change is written through, in the spec's order, so a crash at any point leaves a
    region :meth:`recover` can repair.
    """

    def __init__(self, buf: memoryview | bytearray, queue_size: int) -> None:
        need = packed_queue_region_size(queue_size)
        view = memoryview(buf).cast("B")
        if view.nbytes < need:
            raise InvalidParam(f"inflight region of {view.nbytes} bytes, {need} needed")
        if not 0 < queue_size < 0x8000:
            raise InvalidParam(f"packed queue size {queue_size} out of range")
        self._h = np.frombuffer(view, PACKED_HEADER_DTYPE, 1, 0)
        self.desc = np.frombuffer(
            view, PACKED_STATE_DTYPE, queue_size, PACKED_HEADER_DTYPE.itemsize
        )
        self.queue_size = queue_size
        h = self._h
        if int(h["version"][0]) == 0:
            d = np.zeros(queue_size, PACKED_STATE_DTYPE)
            d["next"] = np.arange(1, queue_size + 1)
            self.desc[:] = d
            for name in ("features", "free_head", "old_free_head", "used_idx", "old_used_idx"):
                h[name] = 0
            h["used_wrap_counter"] = 1
            h["old_used_wrap_counter"] = 1
            h["desc_num"] = queue_size
            h["version"] = INFLIGHT_VERSION  # last: marks the region valid
        elif int(h["desc_num"][0]) != queue_size:
            raise InvalidParam(
                f"inflight region tracks {int(h['desc_num'][0])} descriptors, "
                f"queue has {queue_size}"
            )
        self._load()
        self._counter = int(self.desc["counter"].max()) + 1
        #: buffer id -> head entry of the chain in flight with that id
        self._head_of_id = np.zeros(0x10000, dtype=np.intp)
        self._map_ids(self.inflight_heads())
        #: the free list, mirrored with its head last (so taking and giving back are list
        #: slices, not walks through the region)
        self._free = self.free_entries()[::-1]

    def _load(self) -> None:
        h = self._h[0]
        self.free_head = int(h["free_head"])
        self.old_free_head = int(h["old_free_head"])
        self.used_idx = int(h["used_idx"])
        self.old_used_idx = int(h["old_used_idx"])
        self.used_wrap = int(h["used_wrap_counter"])
        self.old_used_wrap = int(h["old_used_wrap_counter"])

    def _map_ids(self, heads: list[int]) -> None:
        if heads:
            h = np.asarray(heads, dtype=np.intp)
            last = self.desc["last"][h].astype(np.intp)
            if int(last.max()) >= self.queue_size:  # the region is the front-end's to write
                raise InvalidParam("an inflight chain's last entry lies outside the region")
            self._head_of_id[self.desc["id"][last]] = h

    def inflight_heads(self) -> list[int]:
        """Entries marked inflight, oldest first (by counter)."""
        heads = np.flatnonzero(self.desc["inflight"])
        order = np.argsort(self.desc["counter"][heads], kind="stable")
        return heads[order].tolist()

    def free_entries(self) -> list[int]:
        """The free list from ``free_head`` on (read from the region)."""
        nxt = self.desc["next"]
        size = self.queue_size
        out: list[int] = []
        e = self.free_head
        while e < size and len(out) < size:
            out.append(e)
            e = int(nxt[e])
        return out

    def chain_entries(self, head: int) -> list[int]:
        """The region entries of the chain whose head entry is ``head`` (``num`` of them)."""
        out = [head]
        nxt = self.desc["next"]
        e = head
        for _ in range(int(self.desc["num"][head]) - 1):
            e = int(nxt[e])
            if e >= self.queue_size:
                raise InvalidParam(f"inflight chain at entry {head} runs off the region")
            out.append(e)
        return out

    def set_used_position(self, used_idx: int, used_wrap: int) -> None:
        """Start tracking at this used position (a new region, nothing in flight)."""
        if not 0 <= used_idx < self.queue_size:
            raise InvalidParam(f"used index {used_idx} beyond queue size {self.queue_size}")
        h = self._h
        self.used_idx = self.old_used_idx = used_idx
        self.used_wrap = self.old_used_wrap = used_wrap & 1
        h["used_idx"] = used_idx
        h["used_wrap_counter"] = used_wrap & 1
        h["old_used_idx"] = used_idx
        h["old_used_wrap_counter"] = used_wrap & 1

    # -- the device's calls --

    def popped(self, descs: np.ndarray, counts: npt.ArrayLike | None = None) -> None:
        """These ring descriptors (``addr, len, id, flags`` fields) were taken, in ring order;
        ``counts`` are the descriptors of each chain (``None``: one each)."""
        m = descs.shape[0]
        if not m:
            return
        c = np.ones(m, dtype=np.intp) if counts is None else np.asarray(counts, dtype=np.intp)
        n = c.shape[0]
        if int(c.sum()) != m or (n and int(c.min()) < 1):
            raise InvalidParam("chain lengths do not add up to the descriptors taken")
        desc = self.desc
        free = self._free
        if m > len(free):
            raise InvalidParam(f"{m} descriptors taken, {len(free)} free inflight entries")
        # the free list's first m entries: where the copies go
        entries = np.array(free[: -m - 1 : -1], dtype=np.intp)
        del free[-m:]
        f = free[-1] if free else self.queue_size
        starts = np.zeros(n, dtype=np.intp)
        np.cumsum(c[:-1], out=starts[1:])
        heads = entries[starts]
        lasts = entries[starts + c - 1]
        # the copies, then each chain's head entry, inflight last
        desc["addr"][entries] = descs["addr"]
        desc["len"][entries] = descs["len"]
        desc["id"][entries] = descs["id"]
        desc["flags"][entries] = descs["flags"]
        desc["num"][heads] = c
        desc["last"][heads] = lasts
        desc["counter"][heads] = np.arange(self._counter, self._counter + n, dtype=np.uint64)
        self._counter += n
        desc["inflight"][heads] = 1
        # free_head, then old_free_head: the batch is recorded
        self.free_head = f
        self._h["free_head"] = f
        self.old_free_head = f
        self._h["old_free_head"] = f
        self._head_of_id[descs["id"][starts + c - 1].astype(np.intp)] = heads

    def completing(self, ids: npt.ArrayLike) -> None:
        """About to write these chains (buffer ids) as used: back on the free list, and
        ``used_idx`` advanced by their descriptors."""
        i = np.asarray(ids, dtype=np.intp)
        k = i.shape[0]
        if not k:
            return
        desc = self.desc
        heads = self._head_of_id[i]
        lasts = desc["last"][heads].astype(np.intp)
        if int(desc["inflight"][heads].min()) == 0 or (desc["id"][lasts] != i).any():
            raise InvalidParam("completing a buffer id the inflight region has not in flight")
        nums = desc["num"][heads]
        total = int(nums.sum())
        free = self._free
        if total == k:  # one entry per chain
            free.extend(heads.tolist())
        else:
            for hd in heads.tolist():
                free.extend(reversed(self.chain_entries(hd)))
        # desc[h0.last].next = free_head, free_head = h0; desc[h1.last].next = h0; ...
        prev = np.empty(k, dtype=np.intp)
        prev[0] = self.free_head
        prev[1:] = heads[:-1]
        desc["next"][lasts] = prev
        self.free_head = int(heads[-1])
        self._h["free_head"] = self.free_head
        u = self.used_idx + total
        if u >= self.queue_size:
            u -= self.queue_size
            self.used_wrap ^= 1
            self._h["used_wrap_counter"] = self.used_wrap
        self.used_idx = u
        self._h["used_idx"] = u

    def completed(self, ids: npt.ArrayLike) -> None:
        """The used descriptors of these chains are written: inflight = 0, then commit."""
        i = np.asarray(ids, dtype=np.intp)
        if i.shape[0]:
            self.desc["inflight"][self._head_of_id[i]] = 0
        self._commit()

    def _unwrite_used(self, ring_flags: npt.NDArray[np.uint16]) -> None:
        """Make the ring slots of the interrupted (unpublished) completion read as available."""
        size = self.queue_size
        span = self.used_idx - self.old_used_idx
        if self.used_wrap != self.old_used_wrap:
            span += size
        if not 0 < span <= size or self.used_idx >= size:
            raise InvalidParam(
                f"inflight used position {self.used_idx} (wrap {self.used_wrap}) is not after "
                f"the committed one {self.old_used_idx} (wrap {self.old_used_wrap})"
            )
        # slot old_used_idx + k, k in [1, span): its lap's wrap and the flags used/available
        # descriptors have there (AVAIL and USED both equal to the wrap counter: used)
        slots = self.old_used_idx + np.arange(1, span, dtype=np.intp)
        wrap = np.full(slots.shape[0], self.old_used_wrap, dtype=np.intp)
        crossed = slots >= size
        slots[crossed] -= size
        wrap[crossed] ^= 1
        both = _F_AVAIL | _F_USED
        used = np.where(wrap == 1, both, 0)
        f = ring_flags[slots].astype(np.intp)
        stale = (f & both) == used
        if stale.any():
            s = slots[stale]
            avail = np.where(wrap[stale] == 1, _F_AVAIL, _F_USED)
            ring_flags[s] = (f[stale] & ~both | avail).astype(np.uint16)
            log.info("inflight: %d unpublished used descriptors made available again", len(s))

    def _commit(self) -> None:
        h = self._h
        self.old_free_head = self.free_head
        h["old_free_head"] = self.free_head
        self.old_used_idx = self.used_idx
        h["old_used_idx"] = self.used_idx
        self.old_used_wrap = self.used_wrap
        h["old_used_wrap_counter"] = self.used_wrap

    def recover(self, ring_flags: npt.NDArray[np.uint16]) -> PackedRecovery:
        """After a restart: finish or undo an interrupted update, return what to resubmit.

        ``ring_flags`` are the flags of the ring's descriptors, writable (a live view of the
        ring). The one at ``old_used_idx`` is read: if it no longer reads as available with the
        old used wrap counter, the interrupted completion had reached the driver and is
        committed; anything else in progress is rolled back.

        Rolling back a completion also undoes its ring writes: a batch's used descriptors are
        written first one's flags last, so a back-end that died in between left used
        descriptors after ``old_used_idx`` that the driver has not seen yet, but will as soon
        as the slot before them is used, whichever chain the next back-end completes there.
        Those slots (the ones the interrupted batch covered, up to the region's ``used_idx``)
        are made to read as available again; the driver does not look at them before then and
        the chains they held are resubmitted from the region's copies.
        """
        size = self.queue_size
        h = self._h
        if (self.used_idx, self.used_wrap) != (self.old_used_idx, self.old_used_wrap):
            if self.old_used_idx >= size:
                raise InvalidParam(f"inflight old_used_idx {self.old_used_idx} out of range")
            f = int(ring_flags[self.old_used_idx]) & (_F_AVAIL | _F_USED)
            avail = _F_AVAIL if self.old_used_wrap else _F_USED
            if f != avail:  # the used descriptors were written before the crash
                self._commit()
            else:
                self._unwrite_used(ring_flags)
        # roll back whatever is still in progress
        self.free_head = self.old_free_head
        h["free_head"] = self.free_head
        self.used_idx = self.old_used_idx
        h["used_idx"] = self.used_idx
        self.used_wrap = self.old_used_wrap
        h["used_wrap_counter"] = self.used_wrap
        if self.used_idx >= size:
            raise InvalidParam(f"inflight used_idx {self.used_idx} out of range")
        # the free entries are not in flight
        desc = self.desc
        free = self.free_entries()
        self._free = free[::-1]
        if free:
            desc["inflight"][free] = 0
        heads = self.inflight_heads()
        chains = [self.chain_entries(hd) for hd in heads]
        entries = np.asarray([e for c in chains for e in c], dtype=np.intp)
        counts = np.asarray([len(c) for c in chains], dtype=np.intp)
        if entries.shape[0] + len(free) > size:
            raise InvalidParam("inflight region: chains and free list overlap")
        out = np.zeros(entries.shape[0], RING_DESC_DTYPE)
        for name in ("addr", "len", "id", "flags"):
            out[name] = desc[name][entries]
        self._head_of_id[:] = 0
        self._map_ids(heads)
        return PackedRecovery(heads, out, counts, self.used_idx, self.used_wrap)
