"""Inflight I/O tracking for split virtqueues (vhost-user ``INFLIGHT_SHMFD``).

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
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidParam

__all__ = [
    "SPLIT_DESC_DTYPE",
    "SPLIT_HEADER_DTYPE",
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
            for _ in range(batch):
                self.desc["inflight"][head] = 0
                head = int(self.desc["next"][head])
            self._header["used_idx"] = ring_used_idx & 0xFFFF
        return self.inflight_heads()
