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
  kicks only when the ring asks for it. Transmit buffer ``i`` belongs to descriptor head (or
  packed buffer id) ``i``, so the ring's own free list is the pool's (no second one to keep).
  The all-zero default header is written to a buffer only when it held another one, and
  when the buffers are large enough (room for a 1514-byte frame left) the header is placed
  so that the frame starts on a 64-byte boundary: a 64-byte frame then dirties one cache
  line per buffer, not two (the device's core reads what this one just wrote).
  Transmit completions are reaped in batches (:meth:`reap_batch`) whenever a send needs
  buffers; transmit interrupts stay off.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest.rings import DriverQueue, GuestRing, VirtioGuest
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.net import VirtioNetHdr, header_size

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

#: An Ethernet frame without VLAN tag or FCS at the standard MTU.
_MAX_FRAME = 1514


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
    """One queue pair's rings and buffer pools (internal, mutable; the rings' eventfds belong
    to the :class:`VirtioGuest` base)."""

    def __init__(self, index: int, rx: GuestRing, tx: GuestRing) -> None:
        self.index = index
        self.rx_ring: GuestRing | None = rx
        self.tx_ring: GuestRing | None = tx
        self.rx: DriverQueue | None = rx.queue
        self.tx: DriverQueue | None = tx.queue
        self.rx_kick, self.rx_call = rx.kick, rx.call
        self.tx_kick, self.tx_call = tx.kick, tx.call
        self.rx_base = self.tx_base = 0
        self.rx_pool: npt.NDArray[np.uint8] = np.zeros((0, 0), np.uint8)
        self.tx_pool: npt.NDArray[np.uint8] = np.zeros((0, 0), np.uint8)
        self.rx_flat: memoryview = memoryview(b"")
        #: transmit buffers whose header is not the all-zero default, and how many
        self.tx_hdr_set: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)
        self.tx_n_hdr_set = 0
        #: where the header starts in a transmit buffer
        self.tx_off = 0
        #: 0, 1, 2, ... (to tell a run of slots) and a cache of equal transmit lengths
        self.tx_arange: npt.NDArray[np.intp] = np.zeros(0, np.intp)
        self.tx_lens: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)
        # a mergeable frame whose buffers did not all arrive in one reap
        self.partial: list[bytes] = []
        self.partial_hdr: VirtioNetHdr | None = None
        self.partial_left = 0
        self.tx_frames = self.tx_completed = 0
        self.rx_frames = 0

    @property
    def tx_kicks(self) -> int:
        return self.tx_ring.kicks if self.tx_ring is not None else 0

    @property
    def rx_kicks(self) -> int:
        return self.rx_ring.kicks if self.rx_ring is not None else 0

    @property
    def rx_waits(self) -> int:
        return self.rx_ring.interrupt_waits if self.rx_ring is not None else 0


class VirtioNetDriver(VirtioGuest):
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

    :meth:`start` sets everything up; the constructor does not touch the backend. The ring
    plumbing (memory, eventfds, start-up order, :meth:`stop`, :meth:`close`) is
    :class:`~vhostkit.guest.rings.VirtioGuest`'s.
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
        wanted = DEFAULT_FEATURES if features is None else features
        if event_idx:
            wanted |= VirtioFeature.RING_EVENT_IDX
        if queue_pairs > 1:
            wanted |= VirtioNetFeature.MQ
        super().__init__(
            backend,
            num_rings=2 * queue_pairs,
            queue_size=queue_size,
            packed=packed,
            features=int(wanted),
            protocol_features=protocol_features,
            set_status=set_status,
            name=name,
        )
        self.queue_pairs = queue_pairs
        self.buffer_size = buffer_size
        self.rx_buffer_size = rx_bs
        self.rx_buffers = queue_size if rx_buffers is None else rx_buffers
        #: the virtio-net header size for :attr:`acked_features`
        self.header_size = 0
        self._pairs: list[_Pair] = []
        self._mrg = False

    # -- layout and start-up hooks -----------------------------------------------------------

    def _buffer_bytes(self) -> int:
        return self.queue_pairs * (
            self.rx_buffers * self.rx_buffer_size + self.queue_size * self.buffer_size
        )

    def _on_negotiated(self) -> None:
        self.header_size = header_size(self.acked_features)
        self._mrg = bool(self.acked_features & VirtioNetFeature.MRG_RXBUF)
        log.info("virtio-net header %d bytes, mergeable rx %s", self.header_size, self._mrg)

    def _setup_buffers(self) -> None:
        mem = self.memory
        assert mem is not None
        bs, rbs = self.buffer_size, self.rx_buffer_size
        for i in range(self.queue_pairs):
            p = _Pair(i, self._rings[2 * i], self._rings[2 * i + 1])
            self._pairs.append(p)
            p.rx_base = self._carve(self.rx_buffers * rbs)
            p.tx_base = self._carve(self.queue_size * bs)
            p.rx_pool = mem.gpa_array(p.rx_base, np.uint8, self.rx_buffers * rbs).reshape(-1, rbs)
            p.tx_pool = mem.gpa_array(p.tx_base, np.uint8, self.queue_size * bs).reshape(-1, bs)
            p.rx_flat = mem.gpa_view(p.rx_base, self.rx_buffers * rbs)
            p.tx_hdr_set = np.zeros(self.queue_size, np.bool_)
            p.tx_arange = np.arange(self.queue_size, dtype=np.intp)
            off = -self.header_size % 64
            if bs % 64 == 0 and bs - off - self.header_size >= _MAX_FRAME:
                p.tx_off = off
            assert p.rx is not None
            slots = np.arange(self.rx_buffers, dtype=np.int64)
            p.rx.add_batch(
                p.rx_base + slots * rbs, np.full(slots.shape[0], rbs), writable=True, tokens=slots
            )
            p.rx.publish()

    def _on_enabled(self) -> None:
        for p in self._pairs:
            assert p.rx_ring is not None
            p.rx_ring.notify()  # tell a device that waits for kicks that buffers are there

    def _on_reconnect(self) -> None:
        # A mergeable frame the old device had started and not finished: when nothing it
        # used is left to reap, the rest of that frame died with it.
        for p in self._pairs:
            assert p.rx is not None
            if p.partial_left and not p.rx.pending_used():
                log.info("%s: dropping a frame the old device left half written", self.name)
                p.partial, p.partial_hdr, p.partial_left = [], None, 0

    def _release(self) -> None:
        pairs, self._pairs = self._pairs, []
        for p in pairs:
            p.rx = p.tx = None
            p.rx_ring = p.tx_ring = None
            p.rx_flat.release()

    def _pair(self, queue: int) -> _Pair:
        if not self.running or not self._pairs:
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
        k = p.tx.reap_batch()[0].shape[0]
        p.tx_completed += k
        return k

    @property
    def tx_in_flight(self) -> int:
        """Transmit buffers of queue pair 0 the device has not completed yet."""
        tx = self._pair(0).tx
        assert tx is not None
        return self.queue_size - tx.num_free

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
        off = p.tx_off
        free = tx.num_free
        if not free and not tx.pending_used():
            return 0  # full, and nothing to reap
        # The frames are measured (and joined) before completions are reaped, not after:
        # the device then has that much longer to finish the previous batch, and the reap
        # frees more buffers for this one.
        head = frames if n <= self.queue_size else frames[: self.queue_size]
        lens = list(map(len, head))
        first = lens[0]
        uniform = lens.count(first) == len(lens)
        joined = b"".join(head) if uniform else b""
        if free < n:
            self.reap_tx(queue)
            free = tx.num_free
        k = min(n, free)
        if k == 0:
            return 0
        batch = frames if k == n else frames[:k]
        if k < len(lens):
            del lens[k:]
        longest = first if uniform else max(lens)
        if longest > bs - off - hs:
            raise InvalidParam(f"a {longest}-byte frame does not fit a {bs}-byte buffer")
        # transmit buffer i goes with head (buffer id) i: fill the ones add_batch will use
        slots = tx.next_heads(k)
        pool = p.tx_pool
        start = off + hs
        if uniform:
            data = np.frombuffer(joined, np.uint8, k * first)
            s0 = int(slots[0])
            run = s0 + k <= p.tx_arange.shape[0]
            if run and not np.count_nonzero(slots != p.tx_arange[s0 : s0 + k]):
                rows: slice | npt.NDArray[np.intp] = slice(s0, s0 + k)  # a run: no scatter
            else:
                rows = slots
            pool[rows, start : start + first] = data.reshape(k, first)
            lengths = p.tx_lens
            if lengths.shape[0] < k or int(lengths[0]) != first + hs:
                p.tx_lens = lengths = np.full(self.queue_size, first + hs, dtype=np.uint32)
                lengths.flags.writeable = False
            lengths = lengths[:k]
        else:
            flat = pool.reshape(-1).data
            for s, f, ln in zip(slots.tolist(), batch, lens, strict=True):
                o = s * bs + start
                flat[o : o + ln] = f
            lengths = np.array(lens, dtype=np.uint32) + hs
        if hdr is not None:
            pool[slots, off:start] = np.frombuffer(hdr.pack(hs), np.uint8)
            p.tx_hdr_set[slots] = True
            p.tx_n_hdr_set = int(np.count_nonzero(p.tx_hdr_set))
        elif p.tx_n_hdr_set:  # buffers that held another header get the default back
            pool[slots, off:start] = 0
            p.tx_hdr_set[slots] = False
            p.tx_n_hdr_set = int(np.count_nonzero(p.tx_hdr_set))
        tx.add_batch(p.tx_base + off + slots * bs, lengths, writable=False)
        p.tx_frames += k
        assert p.tx_ring is not None
        p.tx_ring.publish()
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
        tx = self._pair(queue).tx
        assert tx is not None
        return self._wait_tx_until(queue, lambda: tx.num_free == self.queue_size, timeout)

    def wait_tx_completed(
        self, count: int, timeout: float | None = None, *, queue: int = 0
    ) -> bool:
        """Wait until the device has completed at least ``count`` frames of queue pair
        ``queue`` in all (:attr:`DriverStats.tx_completed`); False on timeout."""
        p = self._pair(queue)
        return self._wait_tx_until(queue, lambda: p.tx_completed >= count, timeout)

    def _wait_tx_until(self, queue: int, done: Callable[[], bool], timeout: float | None) -> bool:
        """Reap transmit completions until ``done()``, waiting on the TX call eventfd in
        between; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.reap_tx(queue)
            if done():
                return True
            if not self._wait_tx(queue, deadline):
                return False

    def _wait_tx(self, queue: int, deadline: float | None) -> bool:
        """Wait on the TX call eventfd for completions; False when ``deadline`` passed."""
        ring = self._pair(queue).tx_ring
        assert ring is not None
        left = None if deadline is None else deadline - time.monotonic()
        return ring.wait_used(left)

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
            assert p.rx_ring is not None
            if not p.rx_ring.wait_used(left):
                return []

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
        assert p.rx_ring is not None
        p.rx_ring.publish()
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

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        ring = "packed" if self.packed else "split"
        return f"<VirtioNetDriver {ring} x{self.queue_pairs} {state}>"
