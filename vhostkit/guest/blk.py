"""vhostkit as the guest: a minimal virtio-blk driver over a vhost-user :class:`Frontend`.

:class:`BlkDriver` plays a guest's virtio-blk driver against any vhost-user-blk back-end
(vhostkit's :class:`~vhostkit.devices.blk.BlkDevice`, qemu-storage-daemon, ...): it owns a
memfd guest memory and one kick, call and error eventfd per queue, does the set-up a VMM does
(:meth:`BlkDriver.start`: SET_OWNER, feature and protocol-feature negotiation, optionally the
inflight area, SET_MEM_TABLE, then each split ring), and submits requests one chain at a time
(:meth:`BlkDriver.request`, :meth:`BlkDriver.read`, :meth:`BlkDriver.write`, or
:meth:`BlkDriver.raw` for a chain laid out by hand). It is a test and lab tool, not a fast path:
every request waits for its completion on the call eventfd.

Guest memory is laid out by a :class:`BlkLayout`: the rings first (``queue_area`` bytes each,
from guest address 0), then each queue's request buffers (``data_area`` bytes each, from
``data_base``). The defaults are :data:`MEM_SIZE`, :data:`QUEUE_SIZE`, :data:`QUEUE_AREA`,
:data:`DATA_BASE` and :data:`DATA_AREA`.

Example::

    from vhostkit.guest.blk import BlkDriver
    from vhostkit.user import Frontend

    with Frontend.connect("/tmp/blk.sock") as fe, BlkDriver(fe) as disk:
        disk.start()
        print(disk.config().capacity, "sectors")
        assert disk.write(0, b"\\x55" * 512).status == 0  # BlkStatus.OK
        print(disk.read(0, 512).data[:4])

The front-end is borrowed: :meth:`BlkDriver.close` (or leaving the ``with`` block) closes the
driver's eventfds and guest memory, never the front-end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest.rings import drain_eventfd, kick_eventfd, new_eventfd, wait_readable
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.blk import (
    BLK_CONFIG_SIZE,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    request_header,
)
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

if TYPE_CHECKING:
    from vhostkit.user import Frontend

__all__ = [
    "DATA_AREA",
    "DATA_BASE",
    "DRIVER_FEATURES",
    "DRIVER_PROTOCOL",
    "MEM_SIZE",
    "QUEUE_AREA",
    "QUEUE_SIZE",
    "BlkDriver",
    "BlkLayout",
    "BlkReply",
]

log = logging.getLogger(__name__)

#: Default guest memory size (one memfd region at guest address 0).
MEM_SIZE = 16 << 20
#: Default descriptors per ring.
QUEUE_SIZE = 64
#: Default guest memory reserved for each ring, from guest address 0.
QUEUE_AREA = 0x8000
#: Default guest address of queue 0's request buffers.
DATA_BASE = 0x100000
#: Default request buffer space of each queue (queue ``i``'s starts at
#: ``DATA_BASE + i * DATA_AREA``).
DATA_AREA = 0x200000

#: The virtio features the driver asks for by default (each side acks what the other offers).
DRIVER_FEATURES = int(
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | BlkFeature.SEG_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.FLUSH
    | BlkFeature.MQ
    | BlkFeature.RO
    | BlkFeature.DISCARD
    | BlkFeature.WRITE_ZEROES
)
#: The vhost-user protocol features the driver asks for by default.
DRIVER_PROTOCOL = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.BACKEND_REQ
)

#: Buffers of one chain start on this boundary in the request area.
_BUFFER_ALIGN = 64
#: The largest split ring (virtio 1.x).
_MAX_QUEUE_SIZE = 32768


def _align(value: int) -> int:
    return (value + _BUFFER_ALIGN - 1) // _BUFFER_ALIGN * _BUFFER_ALIGN


@dataclass(frozen=True, slots=True)
class BlkLayout:
    """Where a :class:`BlkDriver` puts its rings and request buffers in guest memory.

    Ring ``i`` starts at ``i * queue_area``; queue ``i``'s request buffers take
    ``data_area`` bytes from ``data_base + i * data_area``; the guest memory is ``mem_size``
    bytes from guest address 0. :meth:`check` says whether ``num_queues`` queues fit.
    """

    mem_size: int = MEM_SIZE
    queue_size: int = QUEUE_SIZE
    queue_area: int = QUEUE_AREA
    data_base: int = DATA_BASE
    data_area: int = DATA_AREA

    def check(self, num_queues: int) -> None:
        """Raise :class:`~vhostkit.errors.InvalidParam` unless ``num_queues`` queues fit."""
        if num_queues < 1:
            raise InvalidParam(f"num_queues must be at least 1, not {num_queues}")
        n = self.queue_size
        if not 1 <= n <= _MAX_QUEUE_SIZE or n & (n - 1):
            raise InvalidParam(f"queue_size {n} is not a power of two up to {_MAX_QUEUE_SIZE}")
        if self.queue_area % 16:
            raise InvalidParam(f"queue_area {self.queue_area:#x} is not a multiple of 16")
        ring = SplitDriverQueue.footprint(n)
        if ring > self.queue_area:
            raise InvalidParam(
                f"a {n}-entry ring needs {ring:#x} bytes, queue_area is {self.queue_area:#x}"
            )
        if num_queues * self.queue_area > self.data_base:
            raise InvalidParam(
                f"{num_queues} rings of {self.queue_area:#x} bytes overlap the request buffers "
                f"at {self.data_base:#x}"
            )
        if self.data_area < _BUFFER_ALIGN:
            raise InvalidParam(f"data_area {self.data_area:#x} is smaller than one buffer")
        end = self.data_base + num_queues * self.data_area
        if end > self.mem_size:
            raise InvalidParam(
                f"{num_queues} request areas end at {end:#x}, past the guest memory "
                f"({self.mem_size:#x} bytes)"
            )

    def data_start(self, queue: int) -> int:
        """Guest address of queue ``queue``'s request buffers."""
        return self.data_base + queue * self.data_area


@dataclass(frozen=True, slots=True)
class BlkReply:
    """One answered request: the status byte, the data the device wrote, the used length.

    ``status`` is the last device-writable byte (a :class:`~vhostkit.virtio.blk.BlkStatus`
    value from a well-behaved device), or -1 when the chain had no writable byte; ``data`` is
    every writable byte before it.
    """

    status: int
    data: bytes
    used_len: int


class BlkDriver:
    """A minimal virtio-blk driver over a vhost-user :class:`Frontend` (split rings).

    ``features`` / ``protocol``: what to ask for (the acked sets are :attr:`features` and
    :attr:`protocol` after :meth:`start`). ``inflight=(num_queues, queue_size)`` asks for an
    inflight area of that shape and hands it back before the rings are set up, as QEMU's
    vhost-user-blk does (needs INFLIGHT_SHMFD). ``layout`` places the rings and buffers.

    Owns its guest memory (:attr:`mem`) and eventfds (:attr:`kicks`, :attr:`calls`,
    :attr:`errs`, one per queue) until :meth:`close`; borrows ``fe``. Not thread-safe: one
    caller at a time. Bad arguments raise :class:`~vhostkit.errors.InvalidParam`, calls in the
    wrong state :class:`~vhostkit.errors.InvalidOperation`, a request the device does not
    complete in time :class:`TimeoutError`; what the device answered is in the
    :class:`BlkReply`, never an exception.
    """

    def __init__(
        self,
        fe: Frontend,
        *,
        features: int = DRIVER_FEATURES,
        protocol: int = DRIVER_PROTOCOL,
        num_queues: int = 1,
        inflight: tuple[int, int] | None = None,
        layout: BlkLayout | None = None,
    ) -> None:
        layout = layout if layout is not None else BlkLayout()
        layout.check(num_queues)
        self.fe = fe
        self.layout = layout
        self.wanted_features = features
        self.wanted_protocol = protocol
        self.num_queues = num_queues
        #: (num_queues, queue_size) of an inflight area to ask for and hand back (as QEMU's
        #: vhost-user-blk does before it sets up the rings); needs INFLIGHT_SHMFD
        self.inflight = inflight
        self.queues: list[SplitDriverQueue] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        #: what :meth:`start` negotiated
        self.features = 0
        self.protocol = ProtocolFeature(0)
        self._token = 0
        #: per queue: tokens submitted and not yet waited for -> used length once completed
        self._outstanding: list[dict[int, int | None]] = [{} for _ in range(num_queues)]
        #: per queue: bytes of the request area the outstanding chains take
        self._area_used = [0] * num_queues
        self._closed = False
        self.mem = GuestMemory.allocate([(0, layout.mem_size)])
        try:
            for _ in range(num_queues):
                for fds in (self.kicks, self.calls, self.errs):
                    fds.append(new_eventfd())
        except BaseException:
            self.close()
            raise

    @property
    def queue_size(self) -> int:
        """Descriptors per ring."""
        return self.layout.queue_size

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidOperation("the blk driver is closed")

    def start(self) -> None:
        """The VMM's set-up: negotiate, hand over memory and rings, enable them."""
        self._check_open()
        if self.queues:
            raise InvalidOperation("the blk driver is already started")
        fe = self.fe
        fe.set_owner()
        self.features, self.protocol = fe.negotiate(self.wanted_features, self.wanted_protocol)
        if self.inflight is not None:
            region = fe.get_inflight_fd(*self.inflight)
            try:
                fe.set_inflight_fd(region)
            finally:
                os.close(region.fd)  # the back-end keeps its own
        fe.set_mem_table(self.mem.regions)
        size = self.layout.queue_size
        for index in range(self.num_queues):
            q = SplitDriverQueue(
                self.mem,
                size,
                index * self.layout.queue_area,
                features=self.features,
                index=index,
            )
            self.queues.append(q)
            fe.set_vring_num(index, size)
            fe.set_vring_base(index, 0)
            fe.set_vring_addr(q.vring_addr())
            fe.set_vring_call(index, self.calls[index])
            fe.set_vring_err(index, self.errs[index])
            fe.set_vring_kick(index, self.kicks[index])
            if self.features & VirtioFeature.PROTOCOL_FEATURES:
                fe.set_vring_enable(index, True)

    def switch_frontend(
        self,
        new: Frontend,
        *,
        handover: Callable[[Frontend, Frontend], None] | None = None,
    ) -> dict[int, int]:
        """Move the running rings to another back-end; returns the positions handed over.

        The old back-end's rings are stopped (GET_VRING_BASE; it stays open, the caller's to
        close). ``handover(old, new)`` runs once the new one has negotiated the same features,
        before it gets memory and rings (the moment to move device state: see
        :meth:`Frontend.save_device_state`). The new back-end then gets the same memory, rings,
        positions and eventfds, and every ring is kicked once: requests published meanwhile
        are served. Outstanding requests stay outstanding, to be :meth:`wait`-ed for as before.
        """
        self._check_open()
        if not self.queues:
            raise InvalidOperation("the blk driver is not started")
        old = self.fe
        positions = {index: old.get_vring_base(index) for index in range(self.num_queues)}
        new.set_owner()
        features, protocol = new.negotiate(self.features, self.wanted_protocol)
        if features != self.features:
            raise InvalidOperation(
                f"the new back-end acked {features:#x}, the driver runs {self.features:#x}"
            )
        if handover is not None:
            handover(old, new)
        new.set_mem_table(self.mem.regions)
        for index, q in enumerate(self.queues):
            new.set_vring_num(index, self.layout.queue_size)
            new.set_vring_base(index, positions[index])
            new.set_vring_addr(q.vring_addr())
            new.set_vring_call(index, self.calls[index])
            new.set_vring_err(index, self.errs[index])
            if features & VirtioFeature.PROTOCOL_FEATURES:
                new.set_vring_enable(index, True)
            new.set_vring_kick(index, self.kicks[index])
        self.fe, self.protocol = new, protocol
        for kick in self.kicks:
            kick_eventfd(kick)
        return positions

    def config(self, size: int = BLK_CONFIG_SIZE) -> BlkConfig:
        """The device's config space (GET_CONFIG of its first ``size`` bytes)."""
        self._check_open()
        return BlkConfig.unpack(self.fe.get_config(0, size))

    # -- requests --

    def _queue(self, queue: int) -> SplitDriverQueue:
        self._check_open()
        if not self.queues:
            raise InvalidOperation("the blk driver is not started")
        if not 0 <= queue < self.num_queues:
            raise InvalidParam(f"queue {queue} out of range (0..{self.num_queues - 1})")
        return self.queues[queue]

    def submit(
        self,
        out: Sequence[bytes],
        in_sizes: Sequence[int],
        queue: int = 0,
    ) -> tuple[int, list[tuple[int, int]]]:
        """Post one chain: readable buffers with ``out`` contents, then writable buffers of
        ``in_sizes`` bytes (filled with 0xEE first). Returns ``(token, writable buffers)``.

        The buffers go one after the other (64-byte aligned) into the queue's request area,
        after those of the chains not yet :meth:`wait`-ed for (the area is reused from its
        start once every chain of the queue was waited for). A chain larger than the area
        raises :class:`~vhostkit.errors.InvalidParam`; one that does not fit beside the
        chains outstanding :class:`~vhostkit.errors.InvalidOperation`.
        """
        q = self._queue(queue)
        if any(size < 0 for size in in_sizes):
            raise InvalidParam(f"negative writable buffer size in {list(in_sizes)}")
        need = sum(_align(len(d)) for d in out) + sum(_align(s) for s in in_sizes)
        if need > self.layout.data_area:
            raise InvalidParam(
                f"a chain of {need} bytes does not fit the {self.layout.data_area}-byte "
                f"request area of queue {queue}"
            )
        pending = self._outstanding[queue]
        if not pending:
            self._area_used[queue] = 0
        if self._area_used[queue] + need > self.layout.data_area:
            raise InvalidOperation(
                f"the request area of queue {queue} is full ({len(pending)} requests "
                f"outstanding): wait for them first"
            )
        addr = self.layout.data_start(queue) + self._area_used[queue]
        self._area_used[queue] += need
        outs: list[tuple[int, int]] = []
        for data in out:
            self.mem.write(addr, data)
            outs.append((addr, len(data)))
            addr += _align(len(data))
        ins: list[tuple[int, int]] = []
        for size in in_sizes:
            self.mem.write(addr, b"\xee" * size)
            ins.append((addr, size))
            addr += _align(size)
        self._token += 1
        token = self._token
        q.add(outs, ins, token=token)
        pending[token] = None
        if q.publish():
            kick_eventfd(self.kicks[queue])
        return token, ins

    def wait(self, token: int, queue: int = 0, timeout: float = 10.0) -> int:
        """Wait for chain ``token`` of ``queue`` to be used; return its used length.

        Chains of the queue the device completes meanwhile are kept for their own
        :meth:`wait` (a virtio-blk device may complete out of order). Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        q = self._queue(queue)
        pending = self._outstanding[queue]
        if token not in pending:
            raise InvalidParam(f"no request {token} outstanding on queue {queue}")
        deadline = time.monotonic() + timeout
        while True:
            for got, used in q.reap():
                if got in pending:
                    pending[got] = used
                else:  # a chain someone added to the queue directly
                    log.debug("queue %d: chain %r used (%d bytes), not ours", queue, got, used)
            length = pending[token]
            if length is not None:
                del pending[token]
                return length
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable((self.calls[queue],), left):
                raise TimeoutError(f"request {token} on queue {queue} not completed")
            drain_eventfd(self.calls[queue])

    def raw(self, out: Sequence[bytes], in_sizes: Sequence[int], queue: int = 0) -> BlkReply:
        """Submit a chain as given and wait; the status is the last writable byte."""
        token, ins = self.submit(out, in_sizes, queue)
        used = self.wait(token, queue)
        written = b"".join(self.mem.read(a, n) for a, n in ins)
        return BlkReply(written[-1] if written else -1, written[:-1], used)

    def request(
        self,
        rtype: int,
        sector: int = 0,
        data: bytes = b"",
        in_len: int = 0,
        *,
        queue: int = 0,
        split: int = 1,
    ) -> BlkReply:
        """One well-formed request: header, ``data`` (out) in ``split`` buffers, ``in_len``
        bytes to be written by the device in ``split`` buffers, the status byte."""
        if split < 1:
            raise InvalidParam(f"split must be at least 1, not {split}")
        if in_len < 0:
            raise InvalidParam(f"in_len must not be negative, not {in_len}")
        out = [request_header(rtype, sector), *_pieces(data, split)]
        ins = [len(p) for p in _pieces(b"\0" * in_len, split)]
        return self.raw(out, [*ins, 1], queue)

    def read(self, sector: int, nbytes: int, *, queue: int = 0, split: int = 1) -> BlkReply:
        """VIRTIO_BLK_T_IN: read ``nbytes`` from ``sector``."""
        return self.request(BlkRequestType.IN, sector, in_len=nbytes, queue=queue, split=split)

    def write(self, sector: int, data: bytes, *, queue: int = 0, split: int = 1) -> BlkReply:
        """VIRTIO_BLK_T_OUT: write ``data`` at ``sector``."""
        return self.request(BlkRequestType.OUT, sector, data, queue=queue, split=split)

    def close(self) -> None:
        """Close the eventfds and the guest memory (idempotent; the front-end stays open)."""
        fds, self.kicks, self.calls, self.errs = self.kicks + self.calls + self.errs, [], [], []
        self.queues = []
        self._closed = True
        for fd in fds:
            os.close(fd)
        self.mem.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self.queues else "new"
        return f"<BlkDriver {state} queues={self.num_queues} size={self.layout.queue_size}>"


def _pieces(data: bytes, n: int) -> list[bytes]:
    if not data:
        return []
    step = -(-len(data) // n)
    return [data[i : i + step] for i in range(0, len(data), step)]
