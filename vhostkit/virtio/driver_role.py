"""What the driver-role queues of both ring formats share.

:class:`DriverRole` is the base of :class:`~vhostkit.virtio.split.SplitDriverQueue` and
:class:`~vhostkit.virtio.packed.PackedDriverQueue`: the checks of ``add``'s and
``add_batch``'s arguments and what the driver keeps per chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostkit.errors import InvalidParam
from vhostkit.virtio.ring import Buffer, RingBase, int_array

__all__ = ["DriverRole", "as_sequence_pairs", "batch_buffers"]

_count = np.count_nonzero


class DriverRole(RingBase):
    """What the driver-role queues (split and packed) share besides :class:`RingBase`."""

    #: device-writable bytes of each chain, by buffer id (0: nothing writable)
    _cap_arr: np.ndarray
    #: single-descriptor chains in flight that have a device-writable buffer
    _n_single_w: int
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
