"""vhostkit as the guest: a userspace virtio-net driver over any :class:`VhostBackend`.

:class:`VirtioNetDriver` is a "virtual guest NIC". It owns guest memory (one memfd region from
:meth:`GuestMemory.allocate`), lays out a receive ring and a transmit ring per queue pair (split
by default, packed on request), and hands everything to a data plane through the generic
:class:`~vhostkit.backend.VhostBackend` calls, so the same code drives

* kernel vhost-net (:class:`vhostkit.kernel.VhostNet`): packets go to and come from a tap, and
* a vhost-user back-end through :class:`vhostkit.user.Frontend` (DPDK's vhost PMD, vhostkit's
  own back-ends, ...).

Start-up order (:meth:`VirtioNetDriver.start`): ``set_owner``, ``negotiate`` (virtio features;
for vhost-user also protocol features: REPLY_ACK, MQ and STATUS are asked for, the kernel
ignores them), ``set_mem_table``, per ring ``set_vring_num`` / ``set_vring_base`` /
``set_vring_addr`` / ``set_vring_kick`` / ``set_vring_call``, receive buffers posted,
``set_vring_enable``, and for vhost-user with STATUS negotiated ``SET_STATUS`` DRIVER_OK.

**Kernel vhost-net**: attach the tap *after* :meth:`~VirtioNetDriver.start`, with
``VhostNet.set_backend(index, tap_fd)`` for every ring index in :attr:`ring_indices` (RX is
``2 * pair``, TX ``2 * pair + 1``); the receive buffers are already posted by then and the
kernel starts filling them as soon as the tap is attached. The tap's virtio-net header size
must match :attr:`header_size` (``TUNSETVNETHDRSZ``; 12 with VERSION_1).

Data path (the hot path works in batches over NumPy views of guest memory):

* :meth:`send` copies a batch of frames, each behind a virtio-net header, into transmit buffers
  from a pool (one vectorised copy when the frames have the same length), adds one
  single-buffer chain per frame with :meth:`SplitDriverQueue.add_batch`, publishes once and
  kicks only when the ring asks for it. Transmit completions are reaped in batches
  (:meth:`reap_batch`) whenever a send needs buffers; transmit interrupts stay off.
* :meth:`recv` reaps used receive buffers, parses the header (10 or 12 bytes by the
  negotiated features), joins mergeable receive buffers (``num_buffers``) when MRG_RXBUF is
  negotiated, reposts the buffers and, when nothing is there, enables receive interrupts and
  waits on the call eventfd (``select.poll``), never on a timer.

The driver borrows the backend: :meth:`close` closes the eventfds and guest memory the driver
made, not the backend.

Example (vhost-user)::

    with Frontend.connect(path, timeout=5) as fe, VirtioNetDriver(fe).start() as nic:
        nic.send([frame] * 32)
        frames = nic.recv(timeout=1.0)
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import numpy.typing as npt

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation, InvalidParam, Unsupported
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import PAGE_SIZE, GuestMemory
from vhostkit.virtio.net import VirtioNetHdr, header_size
from vhostkit.virtio.packed import PackedDriverQueue, encode_base
from vhostkit.virtio.split import SplitDriverQueue

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_PROTOCOL_FEATURES",
    "DriverStats",
    "VirtioNetDriver",
]

log = logging.getLogger(__name__)

#: Virtio features asked for by default (RING_PACKED is added with ``packed=True``).
DEFAULT_FEATURES = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF)

#: vhost-user protocol features asked for by default: REPLY_ACK | MQ | STATUS (bits 3, 0, 16).
#: Plain numbers so that this module does not depend on :mod:`vhostkit.user`.
DEFAULT_PROTOCOL_FEATURES = (1 << 3) | (1 << 0) | (1 << 16)
_PROTOCOL_STATUS = 1 << 16

_DRIVER_OK = int(
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)
_RING_ALIGN = 4096

DriverQueue = SplitDriverQueue | PackedDriverQueue


@dataclass(frozen=True, slots=True)
class DriverStats:
    """Counters of one queue pair."""

    tx_frames: int
    tx_kicks: int
    tx_completed: int
    rx_frames: int
    rx_kicks: int
    rx_waits: int


class _Pair:
    """One queue pair's rings, eventfds and buffer pools (internal, mutable)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.rx: DriverQueue | None = None
        self.tx: DriverQueue | None = None
        self.rx_kick = self.rx_call = self.tx_kick = self.tx_call = -1
        self.rx_base = self.tx_base = 0
        self.rx_pool: npt.NDArray[np.uint8] = np.zeros((0, 0), np.uint8)
        self.tx_pool: npt.NDArray[np.uint8] = np.zeros((0, 0), np.uint8)
        self.rx_flat: memoryview = memoryview(b"")
        self.tx_free: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self.tx_top = 0
        # a mergeable frame whose buffers did not all arrive in one reap
        self.partial: list[bytes] = []
        self.partial_hdr: VirtioNetHdr | None = None
        self.partial_left = 0
        self.tx_frames = self.tx_kicks = self.tx_completed = 0
        self.rx_frames = self.rx_kicks = self.rx_waits = 0

    def fds(self) -> list[int]:
        return [fd for fd in (self.rx_kick, self.rx_call, self.tx_kick, self.tx_call) if fd >= 0]


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _kick(fd: int) -> None:
    os.eventfd_write(fd, 1)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until ``fd`` is readable or ``timeout`` seconds passed; True when readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))


class VirtioNetDriver:
    """A userspace virtio-net driver over any :class:`VhostBackend` (see the module docstring).

    Parameters: ``packed`` (packed rings, needs VIRTIO_F_RING_PACKED from the data plane),
    ``queue_size`` (entries per ring), ``queue_pairs`` (RX ring ``2 * i`` and TX ring
    ``2 * i + 1`` per pair; more than one asks for VIRTIO_NET_F_MQ), ``features`` (virtio
    features wanted; default :data:`DEFAULT_FEATURES`, plus RING_PACKED when packed),
    ``protocol_features`` (vhost-user only), ``buffer_size`` (bytes per TX buffer, header
    included, and per RX buffer unless ``rx_buffer_size`` is given: small receive buffers
    make a device spread frames over several with MRG_RXBUF), ``rx_buffers`` (receive
    buffers posted per pair; default the queue size), ``event_idx`` (also ask for
    VIRTIO_F_RING_EVENT_IDX), ``set_status`` (send SET_STATUS DRIVER_OK when the backend
    supports it).

    :meth:`start` sets everything up; the constructor does not touch the backend.
    """

    def __init__(
        self,
        backend: VhostBackend,
        *,
        packed: bool = False,
        queue_size: int = 256,
        queue_pairs: int = 1,
        features: int | None = None,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        buffer_size: int = 2048,
        rx_buffers: int | None = None,
        rx_buffer_size: int | None = None,
        event_idx: bool = False,
        set_status: bool = True,
        name: str = "vhostkit-netdriver",
    ) -> None:
        if queue_pairs < 1:
            raise InvalidParam("a NIC has at least one queue pair")
        rx_bs = buffer_size if rx_buffer_size is None else rx_buffer_size
        for size in (buffer_size, rx_bs):
            if size < 64 or size % 16:
                raise InvalidParam(f"buffer size {size} must be a multiple of 16, >= 64")
        if rx_buffers is not None and not 0 < rx_buffers <= queue_size:
            raise InvalidParam(f"rx_buffers {rx_buffers} out of range 1..{queue_size}")
        self.backend = backend
        self.packed = packed
        self.queue_size = queue_size
        self.queue_pairs = queue_pairs
        wanted = DEFAULT_FEATURES if features is None else features
        if packed:
            wanted |= VirtioFeature.RING_PACKED
        if event_idx:
            wanted |= VirtioFeature.RING_EVENT_IDX
        if queue_pairs > 1:
            wanted |= VirtioNetFeature.MQ
        self.wanted_features = int(wanted)
        self.wanted_protocol_features = protocol_features
        self.buffer_size = buffer_size
        self.rx_buffer_size = rx_bs
        self.rx_buffers = queue_size if rx_buffers is None else rx_buffers
        self.send_status = set_status
        self.name = name
        #: the features the data plane acked (valid after :meth:`start`)
        self.acked_features = 0
        #: the vhost-user protocol features acked (0 on the kernel)
        self.acked_protocol_features = 0
        #: the virtio-net header size for :attr:`acked_features`
        self.header_size = 0
        self.memory: GuestMemory | None = None
        self._pairs: list[_Pair] = []
        self._mrg = False
        self._started = False
        self._stopped = False
        self._closed = False

    # -- layout -----------------------------------------------------------------------------

    def _ring_footprint(self) -> int:
        if self.packed:
            size = PackedDriverQueue.footprint(self.queue_size)
        else:
            size = SplitDriverQueue.footprint(self.queue_size)
        return -(-size // _RING_ALIGN) * _RING_ALIGN

    def _memory_size(self) -> int:
        rings = 2 * self.queue_pairs * self._ring_footprint()
        pools = self.queue_pairs * (
            self.rx_buffers * self.rx_buffer_size + self.queue_size * self.buffer_size
        )
        total = rings + pools
        return -(-total // PAGE_SIZE) * PAGE_SIZE

    @property
    def ring_indices(self) -> list[int]:
        """Every ring index: RX ``2 * i`` and TX ``2 * i + 1`` for each queue pair ``i``."""
        return list(range(2 * self.queue_pairs))

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Set the data plane up and post the receive buffers (see the module docstring).

        On failure everything the driver opened is closed again and the error propagates.
        """
        if self._started or self._closed:
            raise InvalidOperation("the driver was already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        be = self.backend
        self.memory = mem = GuestMemory.allocate([(0, self._memory_size())], name=self.name)
        be.set_owner()
        acked, protocol = be.negotiate(self.wanted_features, self.wanted_protocol_features)
        self.acked_features, self.acked_protocol_features = int(acked), int(protocol)
        if self.packed and not acked & VirtioFeature.RING_PACKED:
            raise Unsupported("the data plane does not offer VIRTIO_F_RING_PACKED")
        self.header_size = header_size(self.acked_features)
        self._mrg = bool(self.acked_features & VirtioNetFeature.MRG_RXBUF)
        log.info(
            "features acked %#x (protocol %#x), header %d bytes",
            self.acked_features,
            self.acked_protocol_features,
            self.header_size,
        )
        be.set_mem_table(mem.regions)

        ring_size = self._ring_footprint()
        bs, rbs = self.buffer_size, self.rx_buffer_size
        gpa = 0
        ring_gpas: list[int] = []
        for _ in self.ring_indices:
            ring_gpas.append(gpa)
            gpa += ring_size
        for i in range(self.queue_pairs):
            p = _Pair(i)
            self._pairs.append(p)
            p.rx_base = gpa
            gpa += self.rx_buffers * rbs
            p.tx_base = gpa
            gpa += self.queue_size * bs
            p.rx_pool = mem.gpa_array(p.rx_base, np.uint8, self.rx_buffers * rbs).reshape(-1, rbs)
            p.tx_pool = mem.gpa_array(p.tx_base, np.uint8, self.queue_size * bs).reshape(-1, bs)
            p.rx_flat = mem.gpa_view(p.rx_base, self.rx_buffers * rbs)
            p.tx_free = np.arange(self.queue_size - 1, -1, -1, dtype=np.int64)
            p.tx_top = self.queue_size
            p.rx_kick, p.rx_call = _eventfd(), _eventfd()
            p.tx_kick, p.tx_call = _eventfd(), _eventfd()
            p.rx = self._setup_ring(2 * i, ring_gpas[2 * i], p.rx_kick, p.rx_call)
            p.tx = self._setup_ring(2 * i + 1, ring_gpas[2 * i + 1], p.tx_kick, p.tx_call)
            # interrupts are asked for only while waiting
            p.rx.disable_interrupts()
            p.tx.disable_interrupts()
            slots = np.arange(self.rx_buffers, dtype=np.int64)
            p.rx.add_batch(
                p.rx_base + slots * rbs, np.full(slots.shape[0], rbs), writable=True, tokens=slots
            )
            p.rx.publish()
        for index in self.ring_indices:
            be.set_vring_enable(index, True)
        if self.send_status and self.acked_protocol_features & _PROTOCOL_STATUS:
            set_status = getattr(be, "set_status", None)
            if set_status is not None:
                set_status(_DRIVER_OK)
        for p in self._pairs:
            _kick(p.rx_kick)  # tell a device that waits for kicks that buffers are there
            p.rx_kicks += 1

    def _setup_ring(self, index: int, gpa: int, kick: int, call: int) -> DriverQueue:
        be = self.backend
        assert self.memory is not None
        q: DriverQueue
        if self.packed:
            q = PackedDriverQueue(
                self.memory, self.queue_size, gpa, features=self.acked_features, index=index
            )
            base = encode_base(0, 1)
        else:
            q = SplitDriverQueue(
                self.memory, self.queue_size, gpa, features=self.acked_features, index=index
            )
            base = 0
        be.set_vring_num(index, self.queue_size)
        be.set_vring_base(index, base)
        be.set_vring_addr(q.vring_addr())
        be.set_vring_kick(index, kick)
        be.set_vring_call(index, call)
        return q

    def _pair(self, queue: int) -> _Pair:
        if not self._started or self._closed or self._stopped or not self._pairs:
            raise InvalidOperation("the driver is not running (start() it first)")
        try:
            return self._pairs[queue]
        except IndexError:
            raise InvalidParam(f"queue pair {queue} does not exist") from None

    # -- transmit ---------------------------------------------------------------------------

    def reap_tx(self, queue: int = 0) -> int:
        """Take completed transmit buffers back into the pool; returns how many."""
        p = self._pair(queue)
        assert p.tx is not None
        tokens, _ = p.tx.reap_batch()
        k = tokens.shape[0]
        if k:
            p.tx_free[p.tx_top : p.tx_top + k] = tokens
            p.tx_top += k
            p.tx_completed += k
        return k

    @property
    def tx_in_flight(self) -> int:
        """Transmit buffers of queue pair 0 the device has not completed yet."""
        return self.queue_size - self._pair(0).tx_top

    def send(
        self,
        frames: Sequence[bytes | bytearray | memoryview],
        *,
        queue: int = 0,
        hdr: VirtioNetHdr | None = None,
    ) -> int:
        """Queue as many of ``frames`` as there are free transmit buffers, in order.

        Each frame goes behind a virtio-net header (``hdr`` for every frame of the batch, all
        zeros by default). One publish for the batch, one kick if the ring asks for it.
        Returns how many frames were queued (the first ones); 0 when the ring is full.
        """
        p = self._pair(queue)
        tx = p.tx
        assert tx is not None
        n = len(frames)
        if n == 0:
            return 0
        hs, bs = self.header_size, self.buffer_size
        if p.tx_top < n:
            self.reap_tx(queue)
        k = min(n, p.tx_top)
        if k == 0:
            return 0
        batch = frames if k == n else frames[:k]
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=k)
        longest = int(lengths.max())
        if longest > bs - hs:
            raise InvalidParam(f"a {longest}-byte frame does not fit a {bs}-byte buffer")
        top = p.tx_top
        slots = p.tx_free[top - k : top].copy()
        pool = p.tx_pool
        if int(lengths.min()) == longest:
            data = np.frombuffer(b"".join(batch), np.uint8)
            pool[slots, hs : hs + longest] = data.reshape(k, longest)
        else:
            flat = memoryview(pool.reshape(-1))
            for s, f, ln in zip(slots.tolist(), batch, lengths.tolist(), strict=True):
                o = s * bs + hs
                flat[o : o + ln] = f
        if hdr is None:
            pool[slots, :hs] = 0
        else:
            pool[slots, :hs] = np.frombuffer(hdr.pack(hs), np.uint8)
        tx.add_batch(p.tx_base + slots * bs, lengths + hs, writable=False, tokens=slots)
        p.tx_top = top - k
        p.tx_frames += k
        if tx.publish():
            _kick(p.tx_kick)
            p.tx_kicks += 1
        return k

    def send_all(
        self,
        frames: Sequence[bytes | bytearray | memoryview],
        *,
        queue: int = 0,
        hdr: VirtioNetHdr | None = None,
        timeout: float | None = None,
    ) -> int:
        """Send every frame, waiting for transmit completions (call eventfd) when the ring is
        full. Returns how many were queued (fewer only when ``timeout`` ran out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < len(frames):
            done += self.send(frames[done:], queue=queue, hdr=hdr)
            if done < len(frames) and not self._wait_tx(queue, deadline):
                break
        return done

    def wait_tx_done(self, timeout: float | None = None, *, queue: int = 0) -> bool:
        """Wait until the device completed every queued frame; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        p = self._pair(queue)
        while True:
            self.reap_tx(queue)
            if p.tx_top == self.queue_size:
                return True
            if not self._wait_tx(queue, deadline):
                return False

    def _wait_tx(self, queue: int, deadline: float | None) -> bool:
        """Wait on the TX call eventfd for completions; False when ``deadline`` passed."""
        p = self._pair(queue)
        tx = p.tx
        assert tx is not None
        try:
            if tx.enable_interrupts():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if not _wait_fd(p.tx_call, left):
                return False
            _drain(p.tx_call)
            return True
        finally:
            tx.disable_interrupts()

    # -- receive ----------------------------------------------------------------------------

    def recv(
        self, max: int | None = None, timeout: float | None = None, *, queue: int = 0
    ) -> list[bytes]:
        """Received frames (without their headers), at most ``max``.

        Returns at once when frames are there; otherwise waits on the receive call eventfd
        for up to ``timeout`` seconds (``None``: forever, ``0``: do not wait) and returns
        ``[]`` when nothing came.
        """
        return [f for _, f in self._recv(max, timeout, queue, headers=False)]

    def recv_headers(
        self, max: int | None = None, timeout: float | None = None, *, queue: int = 0
    ) -> list[tuple[VirtioNetHdr, bytes]]:
        """Like :meth:`recv`, with each frame's parsed :class:`VirtioNetHdr`."""
        out: list[tuple[VirtioNetHdr, bytes]] = []
        for hdr, frame in self._recv(max, timeout, queue, headers=True):
            assert hdr is not None
            out.append((hdr, frame))
        return out

    def _recv(
        self, max_frames: int | None, timeout: float | None, queue: int, *, headers: bool
    ) -> list[tuple[VirtioNetHdr | None, bytes]]:
        p = self._pair(queue)
        rx = p.rx
        assert rx is not None
        if max_frames is not None and max_frames <= 0:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self._take(p, max_frames, headers)
            if out:
                return out
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            try:
                if rx.enable_interrupts():
                    continue
                p.rx_waits += 1
                if not _wait_fd(p.rx_call, left):
                    return []
                _drain(p.rx_call)
            finally:
                rx.disable_interrupts()

    def _take(
        self, p: _Pair, max_frames: int | None, headers: bool
    ) -> list[tuple[VirtioNetHdr | None, bytes]]:
        """Reap used receive buffers, turn them into frames, repost them."""
        rx = p.rx
        assert rx is not None
        tokens, lens = rx.reap_batch(max_frames)
        k = tokens.shape[0]
        if k == 0:
            return []
        hs, bs = self.header_size, self.rx_buffer_size
        flat = p.rx_flat
        offs = tokens * bs
        out: list[tuple[VirtioNetHdr | None, bytes]] = []
        simple = not self._mrg and not p.partial_left
        if self._mrg and not p.partial_left:
            pool = p.rx_pool
            nb = pool[tokens, 10].astype(np.int64) | pool[tokens, 11].astype(np.int64) << 8
            simple = bool((nb <= 1).all())
        if simple and int(lens.min()) < hs:
            raise InvalidOperation(f"device used {int(lens.min())} bytes, less than the header")
        if simple:
            if headers:
                for o, ln in zip(offs.tolist(), lens.tolist(), strict=True):
                    hdr = VirtioNetHdr.unpack(flat[o : o + hs], hs)
                    out.append((hdr, flat[o + hs : o + ln].tobytes()))
            else:
                out = [
                    (None, flat[o + hs : o + ln].tobytes())
                    for o, ln in zip(offs.tolist(), lens.tolist(), strict=True)
                ]
        else:
            for o, ln in zip(offs.tolist(), lens.tolist(), strict=True):
                if p.partial_left:
                    p.partial.append(flat[o : o + ln].tobytes())
                    p.partial_left -= 1
                else:
                    if ln < hs:
                        raise InvalidOperation(f"device used {ln} bytes, less than the header")
                    hdr = VirtioNetHdr.unpack(flat[o : o + hs], hs)
                    nbuf = hdr.num_buffers if self._mrg else 1
                    p.partial = [flat[o + hs : o + ln].tobytes()]
                    p.partial_hdr = hdr
                    p.partial_left = max(nbuf, 1) - 1
                if not p.partial_left:
                    out.append((p.partial_hdr if headers else None, b"".join(p.partial)))
                    p.partial = []
                    p.partial_hdr = None
        p.rx_frames += len(out)
        # repost the buffers (their contents were copied out above)
        rx.add_batch(p.rx_base + offs, np.full(k, bs), writable=True, tokens=tokens)
        if rx.publish():
            _kick(p.rx_kick)
            p.rx_kicks += 1
        return out

    # -- state ------------------------------------------------------------------------------

    def stats(self, queue: int = 0) -> DriverStats:
        """The counters of queue pair ``queue``."""
        p = self._pairs[queue]
        return DriverStats(
            p.tx_frames, p.tx_kicks, p.tx_completed, p.rx_frames, p.rx_kicks, p.rx_waits
        )

    def queues(self, queue: int = 0) -> tuple[DriverQueue, DriverQueue]:
        """The driver-role ``(rx, tx)`` queues of pair ``queue`` (for tests and tools)."""
        p = self._pair(queue)
        assert p.rx is not None and p.tx is not None
        return p.rx, p.tx

    def call_fds(self, queue: int = 0) -> tuple[int, int]:
        """The ``(rx, tx)`` call eventfds of pair ``queue`` (owned by the driver)."""
        p = self._pair(queue)
        return p.rx_call, p.tx_call

    # -- stop and close ---------------------------------------------------------------------

    def stop(self) -> dict[int, int]:
        """Stop every ring (``get_vring_base``); returns ``{ring index: position}``.

        Afterwards no more frames can be sent or received; :meth:`close` still must be called.
        """
        if not self._started or self._closed or self._stopped:
            raise InvalidOperation("the driver is not running")
        self._stopped = True
        return {index: self.backend.get_vring_base(index) for index in self.ring_indices}

    def close(self) -> None:
        """Close the eventfds and the guest memory the driver made. Idempotent.

        The backend is borrowed and stays open. Close the driver only after the data plane
        stopped using the rings (:meth:`stop`, or the backend closed), since the memory goes.
        """
        if self._closed:
            return
        self._closed = True
        pairs, self._pairs = self._pairs, []
        for p in pairs:
            for fd in p.fds():
                os.close(fd)
            p.rx = p.tx = None
            p.rx_flat.release()
        if self.memory is not None:
            self.memory.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        ring = "packed" if self.packed else "split"
        return f"<VirtioNetDriver {ring} x{self.queue_pairs} {state}>"
