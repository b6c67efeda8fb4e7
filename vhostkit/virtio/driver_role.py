"""What the driver-role queues of both ring formats share.

:class:`DriverRole` is the base of :class:`~vhostkit.virtio.split.SplitDriverQueue` and
:class:`~vhostkit.virtio.packed.PackedDriverQueue`: the checks of ``add``'s and
``add_batch``'s arguments, the free chain ids and what the driver keeps per chain until the
device has used it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.virtio.ring import Buffer, RingBase, int_array

__all__ = ["DriverRole", "as_sequence_pairs", "batch_buffers"]

_count = np.count_nonzero


class DriverRole(RingBase):
    """What the driver-role queues (split and packed) share besides :class:`RingBase`: the
    free chain ids and what the driver keeps per chain in flight.

    A chain's *id* is what the device hands back when it has used the chain: the head
    descriptor's index in a split ring, the buffer id in a packed one; either way
    ``0 <= id < num``. Free ids go out first in first out (:meth:`_take_ids`,
    :meth:`_give_ids`): ids come back in used order and go out again in that order, so a
    device that uses buffers in order sees ids (and buffers indexed by id) in ascending runs,
    not scattered.

    Per chain the driver keeps its token and its device-writable bytes (the most the device
    may report as written). Chains from ``add`` keep them in lists (any token); chains from
    ``add_batch`` (one descriptor, an integer token) in NumPy arrays, so that ``reap_batch``
    handles a batch of them with a few array operations.
    """

    #: what a chain id is called in error messages
    _id_word = "id"
    #: descriptors per indirect table (0: no indirect descriptors)
    max_indirect: int

    def _init_chain_state(self, num: int) -> None:
        """What the driver keeps per chain id for ``num`` ids; every id is free."""
        # the free ids, first in first out: _n_free_ids of them in the ring _free_ids from
        # _free_pos on
        self._free_ids = np.arange(num, dtype=np.intp)
        self._free_pos = 0
        self._n_free_ids = num
        # chains added by add: any token, their writable bytes
        self._tokens: list[Any] = [None] * num
        self._capacity = [0] * num
        # chains added by add_batch: one descriptor each, an integer token, in NumPy arrays
        self._single = np.zeros(num, dtype=np.bool_)
        self._n_single = 0
        #: how many of those have a device-writable buffer
        self._n_single_w = 0
        #: whether the token of a chain from add_batch is its id (no token given)
        self._tok_is_id = np.zeros(num, dtype=np.bool_)
        self._tok_arr = np.zeros(num, dtype=np.int64)
        #: device-writable bytes of each chain from add_batch (0: nothing writable)
        self._cap_arr = np.zeros(num, dtype=np.int64)
        #: zero used lengths, for batches in which no chain has a device-writable buffer
        self._lens0 = np.zeros(num, dtype=np.int64)
        self._lens0.flags.writeable = False

    # -- free ids ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """How many descriptors an ``add`` may use now."""
        raise NotImplementedError

    def next_heads(self, n: int) -> npt.NDArray[np.intp]:
        """The chain ids (split: heads, packed: buffer ids) the next ``add_batch`` of ``n``
        chains will use; nothing is taken.

        Lets a driver whose buffer pool is indexed by id fill the buffers first.
        """
        if not 0 <= n <= self.num_free:
            raise InvalidOperation(f"queue full: {n} descriptors needed, {self.num_free} free")
        return self._peek_ids(n)

    def _peek_ids(self, n: int) -> npt.NDArray[np.intp]:
        """The next ``n`` free ids (a copy), ``n`` at most the free ones."""
        pos = self._free_pos
        end = pos + n
        if end <= self.num:
            return self._free_ids[pos:end].copy()
        return np.concatenate((self._free_ids[pos:], self._free_ids[: end - self.num]))

    def _take_ids(self, n: int) -> npt.NDArray[np.intp]:
        """Take the next ``n`` free ids (the caller has checked that there are as many)."""
        ids = self._peek_ids(n)
        pos = self._free_pos + n
        self._free_pos = pos - self.num if pos >= self.num else pos
        self._n_free_ids -= n
        return ids

    def _give_ids(self, ids: list[int] | npt.NDArray[np.intp]) -> None:
        """Put ``ids`` back at the end of the free ring."""
        k = len(ids)
        at = self._free_pos + self._n_free_ids
        if at >= self.num:
            at -= self.num
        end = at + k
        if end <= self.num:
            self._free_ids[at:end] = ids
        else:
            cut = self.num - at
            self._free_ids[at:] = ids[:cut]
            self._free_ids[: end - self.num] = ids[cut:]
        self._n_free_ids += k

    # -- adding -----------------------------------------------------------------------------

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

    def _record_chain(self, cid: int, token: Any, ins: list[Buffer]) -> None:
        """Keep what ``add`` owes chain ``cid``: its token, the bytes of its ``ins``."""
        self._tokens[cid] = token
        self._capacity[cid] = sum(n for _, n in ins)

    def _record_batch(
        self,
        at: slice | npt.NDArray[np.intp],
        n: int,
        tokens: np.ndarray | None,
        lens: np.ndarray,
        writable: bool,
    ) -> None:
        """Keep what ``add_batch`` owes its ``n`` chains, whose ids are ``at`` (an index array
        or, when they are consecutive, a slice): ``tokens`` (``None``: the ids) and, when
        ``writable``, the buffer lengths ``lens``."""
        self._single[at] = True
        self._n_single += n
        if tokens is None:
            self._tok_is_id[at] = True
        else:
            self._tok_is_id[at] = False
            self._tok_arr[at] = tokens
        if writable:
            self._cap_arr[at] = lens
            self._n_single_w += int(_count(lens))
        else:
            self._cap_arr[at] = 0

    # -- reaping ----------------------------------------------------------------------------

    def _reap_single(self, cid: int, length: int) -> tuple[int, int]:
        """Chain ``cid`` from ``add_batch`` is used, ``length`` bytes written:
        ``(token, length)``, its id freed. The length of a chain with nothing device-writable
        is 0 whatever the device wrote; one beyond the chain's writable bytes breaks the
        queue (nothing changed)."""
        cap = self._cap_arr[cid]
        if not cap:
            length = 0  # no device-writable buffer: the used length means nothing
        elif length > cap:
            self._fail(f"device wrote {length} bytes into a {int(cap)}-byte buffer")
        else:
            self._n_single_w -= 1
        token = cid if self._tok_is_id[cid] else int(self._tok_arr[cid])
        self._single[cid] = False
        self._n_single -= 1
        self._give_ids([cid])
        return token, length

    def _reap_chain(self, cid: int, length: int) -> tuple[Any, int]:
        """Chain ``cid`` from ``add`` is used: ``(token, length)`` as :meth:`_reap_single`;
        the caller frees its descriptors and id."""
        cap = self._capacity[cid]
        if not cap:
            length = 0  # no device-writable buffer: the used length means nothing
        elif length > cap:
            self._fail(f"device wrote {length} bytes into a {cap}-byte buffer")
        token = self._tokens[cid]
        self._tokens[cid] = None
        return token, length

    def _reap_singles(
        self,
        ids: npt.NDArray[np.intp],
        at: slice | npt.NDArray[np.intp],
        lens: npt.NDArray[np.int64] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``reap_batch`` of chains that all came from ``add_batch``: ``(tokens, lengths)``,
        their ids freed.

        ``ids`` are the used ids in used order, ``at`` the same as a slice when they are
        consecutive (else ``ids`` again), ``lens`` a copy of the used lengths (this changes
        it), ``None`` when no chain in flight has a device-writable buffer. The same id used
        twice, or a length beyond a chain's writable bytes, breaks the queue.
        """
        n = ids.shape[0]
        single = self._single
        single[at] = False
        count = int(_count(single))
        if count != self._n_single - n:
            single[ids] = True
            self._fail(f"device used the same {self._id_word} twice")
        if lens is None:  # no chain with a device-writable buffer: the used lengths mean nothing
            lens = self._lens0[:n]
        else:
            lens = self._checked_lengths(lens, self._cap_arr[at], ids, single)
        self._n_single = count
        is_id = self._tok_is_id[at]
        tokens = ids.astype(np.int64)
        if _count(is_id) != n:
            tokens = np.where(is_id, tokens, self._tok_arr[at])
        self._give_ids(ids)
        return tokens, lens

    @staticmethod
    def _item_arrays(
        items: list[tuple[Any, int]],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``reap``'s ``[(token, length), ...]`` as ``reap_batch``'s two arrays."""
        return (
            np.array([t for t, _ in items], dtype=np.int64),
            np.array([ln for _, ln in items], dtype=np.int64),
        )

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
        self._n_single_w -= int(_count(caps))
        return lens


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


def as_sequence_pairs(items: Sequence[Buffer]) -> list[Buffer]:
    """Validate ``(addr, length)`` pairs given by a driver-role caller."""
    out: list[Buffer] = []
    for addr, length in items:
        if not 0 <= addr <= (1 << 64) - 1 or not 0 <= length <= 0xFFFFFFFF:
            raise InvalidParam(f"buffer ({addr:#x}, {length}) out of range")
        out.append((int(addr), int(length)))
    return out
