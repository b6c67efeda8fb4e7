"""A tap-backed virtio-net vhost-user back-end: the userspace twin of vhost-net.

:class:`NetDevice` serves queue pair *i* (RX ring ``2i``, TX ring ``2i+1``) with tap queue *i*:

* TX: each chain the driver queued is written to the tap with one ``writev`` straight from the
  guest-memory views, virtio-net header included (the tap is told the same header size, and
  takes the checksum/GSO fields from it): no copy.
* RX: a frame read from the tap (the tap prepends its virtio-net header) is written into the
  driver's receive buffers; with ``VIRTIO_NET_F_MRG_RXBUF`` a large frame spans several
  buffers and ``num_buffers`` says how many (without it, ``num_buffers`` is 1, as the spec
  asks of a device with a 12-byte header). A frame is only read from the tap when receive
  buffers are there; otherwise the worker stops watching the tap until the driver kicks.
  Frames are read in bursts of up to :data:`RX_BATCH`, back to back into a per-ring bounce
  arena (a tap read needs room for the largest frame before the device knows how many
  buffers it takes), then the burst's chains are popped together and the burst is completed
  together (one used-index update, at most one interrupt). A popped chain cannot be given
  back, so a burst never reads more frames than the ring is expected to have buffers for (see
  :meth:`NetDevice._read_burst`).
* Offloads: the guest-side offload features acked (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN,
  GUEST_UFO) become the tap's ``TUNSETOFFLOAD`` flags; the header size (10, or 12 with
  VERSION_1 or MRG_RXBUF) becomes ``TUNSETVNETHDRSZ``.
* A started but disabled TX ring is consumed and its frames dropped; a disabled RX ring gets
  nothing (the spec's "no side effects" rule for net).
* SEND_RARP writes a RARP announcement for the given MAC to the tap.
* Device state (``DEVICE_STATE``): a suspended device saves its config space (MAC, status,
  MTU), queue pairs, each ring's size, position and enabled state, and loads them on a
  destination (:mod:`vhostkit.user.backend.migration`).

Run it from the command line with ``vhostkit backend net`` (:mod:`vhostkit.cli.backend`;
``python3 -m vhostkit.devices.net`` is an alias).
"""

from __future__ import annotations

import logging
import os
import select
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import add, length_hint

import numpy as np

from vhostkit.errors import DeviceStateMismatch, InvalidOperation, InvalidParam, VhostError
from vhostkit.kernel.ioctls import TunFlags
from vhostkit.kernel.tap import Tap, offload_for_features
from vhostkit.types import VringState
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.user.backend.migration import MigratableRingDevice
from vhostkit.user.backend.ring_device import ActiveRing
from vhostkit.user.backend.state import BlkState, DeviceState, DeviceType, NetState
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.chain import FlatBatch
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.net import HDR_SIZE_LEGACY, HDR_SIZE_MRG, header_size
from vhostkit.virtio.packed import PackedDeviceQueue
from vhostkit.virtio.ring import Chain, ChainBatch

__all__ = ["DEFAULT_NET_FEATURES", "NetDevice", "TapQueues", "main", "net_config"]

log = logging.getLogger(__name__)

VF = VirtioFeature
NF = VirtioNetFeature

#: What the device offers by default.
DEFAULT_NET_FEATURES = int(
    VF.VERSION_1
    | VF.RING_EVENT_IDX
    | VF.RING_INDIRECT_DESC
    | VF.RING_PACKED
    | NF.CSUM
    | NF.GUEST_CSUM
    | NF.HOST_TSO4
    | NF.HOST_TSO6
    | NF.HOST_ECN
    | NF.GUEST_TSO4
    | NF.GUEST_TSO6
    | NF.GUEST_ECN
    | NF.MAC
    | NF.MTU
    | NF.MRG_RXBUF
    | NF.STATUS
)

#: Protocol features: everything generic, plus the net ones (MQ, MTU, RARP) and DEVICE_STATE.
#: CONFIG is left out: QEMU's virtio-net warns that it does not use it.
NET_PROTOCOL_FEATURES = int(
    (DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG)
    | ProtocolFeature.MQ
    | ProtocolFeature.MTU
    | ProtocolFeature.RARP
    | ProtocolFeature.DEVICE_STATE
)

#: Largest frame a tap hands over with GSO: 64 KiB of payload plus headers.
MAX_RX_FRAME = 65536 + 256
#: Received frames read from the tap in one burst, and completed together (one used-index
#: update, at most one interrupt).
RX_BATCH = 64
#: A receive ring's bounce arena: a burst of MTU-sized frames, and room for the largest one
#: (a burst ends when less than :data:`MAX_RX_FRAME` is left).
RX_ARENA = MAX_RX_FRAME + RX_BATCH * 2048
_NUM_BUFFERS = struct.Struct("<H")
VIRTIO_NET_S_LINK_UP = 1


#: How long TX waits for a full tap to take frames again before it drops one. The tap's send
#: buffer fills when the kernel is slow to consume what was written (softirqs starved by busy
#: CPUs); like vhost-net, the device then waits instead of dropping.
TX_BACKPRESSURE_TIMEOUT = 5.0


def _write_guest(dst: memoryview, data: memoryview) -> None:
    """Copy ``data`` to the start of ``dst``, a view of guest memory (``dst`` is at least as
    long). Every byte this device puts into guest memory goes through here."""
    dst[: data.nbytes] = data


def _write_guest_u16(view: memoryview, offsets: list[int], field: int, value: int) -> None:
    """Store the little-endian 16-bit ``value`` at ``field`` bytes into each buffer at
    ``offsets`` of ``view``, a view of guest memory (one vectorised store for a whole batch;
    the other way this device writes guest memory, beside :func:`_write_guest`)."""
    mem = np.frombuffer(view, dtype=np.uint8)
    at = np.array(offsets, dtype=np.intp) + field
    mem[at] = value & 0xFF
    mem[at + 1] = value >> 8


def _rx_iovecs(flat: FlatBatch, spill: memoryview) -> list[tuple[memoryview, memoryview]]:
    """What ``readv`` fills for each receive buffer of ``flat``: the buffer, then ``spill``
    (built in C, no slicing per frame)."""
    view, offsets = flat.view, flat.offsets
    ends = map(add, offsets, flat.lengths)
    return list(zip(map(view.__getitem__, map(slice, offsets, ends)), repeat(spill)))


def _fill(chains: list[Chain], data: memoryview, size: int) -> list[int]:
    """Scatter ``data`` (the tap's virtio-net header, then the frame) over ``chains``, which
    together hold it; returns the bytes written to each.

    The header goes through as the tap wrote it (flags and GSO fields, already limited to the
    offloads the driver acked) except ``num_buffers``: the tap does not fill those two bytes
    of a 12-byte header (it leaves them 0, or skips them), and they must say how many buffers
    the frame spans (1 without MRG_RXBUF).
    """
    if size >= HDR_SIZE_MRG:
        _NUM_BUFFERS.pack_into(data, HDR_SIZE_LEGACY, len(chains))
    written: list[int] = []
    pos, end = 0, data.nbytes
    for chain in chains:
        start = pos
        for dst in chain.writable:
            n = min(dst.nbytes, end - pos)
            _write_guest(dst, data[pos : pos + n])
            pos += n
            if pos == end:
                break
        written.append(pos - start)
    return written


class TapQueues:
    """Which queues of a tap are attached (``TUNSETQUEUE``), for the data planes that use it.

    A multi-queue tap's queue is detached while nobody reads it, so that the tap steers no flow
    there; a single-queue tap is left alone. The planes that take turns on one tap (user and
    kernel, see :mod:`vhostkit.devices.net_swap`) share one record.
    """

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        #: tap queue i attached
        self.attached = [True] * len(tap.fds)

    def set(self, queue: int, attach: bool) -> None:
        """Attach or detach tap queue ``queue`` (multi-queue taps only; QEMU's own tap
        back-end does the same when the driver turns queue pairs on and off)."""
        tap = self.tap
        if tap.closed or TunFlags.MULTI_QUEUE not in tap.flags:
            return
        if self.attached[queue] != attach:
            try:
                tap.set_queue_enabled(queue, attach)
            except VhostError as exc:
                log.warning("tap queue %d: %s", queue, exc)
                return
            self.attached[queue] = attach


class _RxRing:
    """A receive ring's bounce arena, and what the device learnt of the driver's buffers from
    the chains it last popped (to size the next burst)."""

    __slots__ = ("arena", "buf_len", "queue", "slots")

    def __init__(self) -> None:
        self.arena = memoryview(bytearray(RX_ARENA))
        #: the queue the figures below were learnt on (a restarted ring starts afresh); weak:
        #: the queue's views keep guest memory mapped
        self.queue: weakref.ref[object] | None = None
        #: fewest writable bytes of a chain in the last pop (0: not known yet)
        self.buf_len = 0
        #: most ring descriptors (the unit of a packed ring's ``pending()``) a chain of the
        #: last pop took; 1 on a split ring, whose ``pending()`` counts chains (0: not known)
        self.slots = 0


def _write_frame(fd: int, views: list[memoryview]) -> bool:
    """Write one frame (virtio-net header included) to the tap; wait while the tap is full.

    Returns False when the frame was dropped (the tap stayed full, or refused the frame).
    """
    deadline = None
    while True:
        try:
            os.writev(fd, views)
            return True
        except BlockingIOError:
            now = time.monotonic()
            if deadline is None:
                deadline = now + TX_BACKPRESSURE_TIMEOUT
            elif now >= deadline:
                log.warning("tap stayed full for %.1f s: frame dropped", TX_BACKPRESSURE_TIMEOUT)
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(int((deadline - now) * 1000) + 1)  # writable again: retry
        except OSError as exc:
            log.warning("tap write failed: %s", exc)
            return False


def _write_frames(fd: int, flat: FlatBatch) -> int:
    """Write the one-buffer frames of ``flat`` to the tap, one ``write`` each, straight from
    guest memory; returns how many were sent (the others were dropped).

    The loop runs in C (``map`` over the views, drained by a ``deque``): no bytecode per
    frame. A write that fails stops it; the offsets' iterator then tells which frame it
    was (the frame is retried once the tap is writable, or dropped), and the rest go on.
    """
    view = flat.view
    offsets = flat.offsets
    n = len(offsets)
    ends = list(map(add, offsets, flat.lengths))
    it = iter(offsets)
    ends_it = iter(ends)
    frames = map(view.__getitem__, map(slice, it, ends_it))
    write = os.write
    failed = 0
    while True:
        try:
            deque(map(write, repeat(fd), frames), maxlen=0)  # consumed in C, nothing kept
            return n - failed
        except OSError as exc:
            i = n - length_hint(it) - 1  # the offset of the frame that failed was taken
            frame = view[offsets[i] : ends[i]]
            if isinstance(exc, BlockingIOError):
                # the tap is full: wait for it, as writev does
                failed += not _write_frame(fd, [frame])
            else:
                log.warning("tap write failed: %s", exc)
                failed += 1


def _spin_tap(fd: int, ring: ActiveRing, budget: float) -> bool:
    """Poll the tap for up to ``budget`` seconds (the device's ``busy_poll``) before the worker
    sleeps on it; True when a frame came."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poll = poller.poll
    clock = time.perf_counter
    deadline = clock() + budget
    while not ring.interrupted:
        if poll(0):
            return True
        if clock() >= deadline:
            return False
    return False


def net_config(mac: bytes, queue_pairs: int, mtu: int) -> bytes:
    """``struct virtio_net_config``: mac, status, max_virtqueue_pairs, mtu."""
    if len(mac) != 6:
        raise InvalidParam("a MAC address is 6 bytes")
    return mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, queue_pairs, mtu)


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "reverse request" announcing ``mac`` (what QEMU sends after migration)."""
    return (
        b"\xff" * 6
        + mac
        + struct.pack("!HHHBBH", 0x8035, 1, 0x0800, 6, 4, 3)
        + mac
        + bytes(4)
        + mac
        + bytes(4)
    ).ljust(60, b"\0")


class NetDevice(MigratableRingDevice):
    """virtio-net over a tap. ``tap`` needs ``queue_pairs`` queues, a vnet header and
    non-blocking fds (``Tap(..., nonblocking=True)``); the device borrows it (the caller closes
    it). A multi-queue tap with more queues than ``queue_pairs`` has the extra ones detached
    while the device lives, so that the tap steers no flow to them; :meth:`close` attaches
    them again."""

    #: receive with the tap read straight into the driver's buffers where the ring allows it
    #: (:meth:`_receive_direct`); False: always through the bounce arena
    rx_direct = True

    def __init__(
        self,
        tap: Tap,
        *,
        mac: bytes = bytes.fromhex("525400000001"),
        mtu: int = 1500,
        queue_pairs: int = 1,
        features: int = DEFAULT_NET_FEATURES,
        protocol_features: int = NET_PROTOCOL_FEATURES,
        busy_poll: float = 0.0,
    ) -> None:
        if len(tap.fds) < queue_pairs:
            raise InvalidParam(f"{queue_pairs} queue pairs need a tap with as many queues")
        if os.get_blocking(tap.fds[0]):
            raise InvalidParam("the tap's fds must be non-blocking (Tap(nonblocking=True))")
        self.tap = tap
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.hdr_size = 12
        self.tx_frames = 0
        self.tx_dropped = 0
        self.rx_frames = 0
        self.rx_dropped = 0
        #: per receive ring (by index), made by its worker when it first receives
        self._rx_rings: dict[int, _RxRing] = {}
        self._stats_lock = threading.Lock()
        #: a multi-queue tap's queue i is detached while both rings of pair i are disabled
        self.tap_queues = TapQueues(tap)
        # tap queues beyond the pairs would get flows nobody reads: detached until close()
        for queue in range(queue_pairs, len(tap.fds)):
            self._attach_tap_queue(queue, False)
        if queue_pairs > 1:
            # without VIRTIO_NET_F_MQ offered, a front-end (QEMU) hides the extra pairs
            features |= int(NF.MQ)
        super().__init__(
            features=features,
            protocol_features=protocol_features,
            num_queues=2 * queue_pairs,
            config=net_config(mac, queue_pairs, mtu),
            busy_poll=busy_poll,
        )

    device_type = DeviceType.NET

    # -- features --

    def set_features(self, features: int) -> None:
        super().set_features(features)
        version_1 = bool(features & VF.VERSION_1)
        mrg = bool(features & NF.MRG_RXBUF)
        self.hdr_size = header_size(features) if (version_1 or mrg) else 10
        offload = offload_for_features(features)
        self.tap.set_vnet_hdr_size(self.hdr_size)
        self.tap.set_offload(offload)
        log.info("net: header %d bytes, tap offloads %s", self.hdr_size, offload)

    @property
    def mergeable(self) -> bool:
        return bool(self.acked_features & NF.MRG_RXBUF)

    # -- rings --

    def _tap_fd(self, ring: ActiveRing) -> int:
        return self.tap.fds[ring.index // 2]

    def wake_fds(self, ring: ActiveRing) -> list[int]:
        return [self._tap_fd(ring)] if ring.index % 2 == 0 else []

    def process(self, ring: ActiveRing) -> bool | None:
        if ring.index % 2:
            return self._transmit(ring, send=True)
        return self._receive(ring)

    def process_disabled(self, ring: ActiveRing) -> None:
        if ring.index % 2:
            self._transmit(ring, send=False)
        else:
            # nothing may be delivered: stop watching the tap (its fd stays readable, and the
            # worker would spin) until SET_VRING_ENABLE wakes the worker
            ring.extra_wanted = False

    def set_vring_enable(self, index: int, enable: bool) -> None:
        super().set_vring_enable(index, enable)
        pair = index // 2
        if pair < self.queue_pairs:
            rx, tx = self.vrings[2 * pair], self.vrings[2 * pair + 1]
            self._attach_tap_queue(pair, rx.enabled or tx.enabled)

    # -- handing the rings to another data plane --

    def take_rings(self) -> tuple[VringState, ...]:
        """Stop the worker of every running ring; return the rings' positions.

        The rings stay started as far as the front-end is concerned (addresses, memory, kick
        and call eventfds are kept), so another data plane can serve them from these
        positions, or :meth:`give_rings` can restart them here. A worker ends its round
        before it stops: every chain it popped is completed (a received frame already read
        from the tap is delivered), so nothing is held back. A ring whose worker failed is
        left out (it stays stopped).
        """
        states = []
        for index in sorted(self.active):
            ring = self.vrings[index]
            active = self._retire(index)
            if active is None or active.error is not None:
                log.warning("ring %d is broken: not handed over", index)
                continue
            held = active.queue.inflight
            if held:
                # cannot happen with this device's processing (it completes what it pops);
                # the position would hand these chains over as not yet taken
                log.error("ring %d: chains %s popped and not completed", index, held)
            ring.base = active.queue.get_base()
            states.append(VringState(index, ring.base))
        self._changed()
        return tuple(states)

    def give_rings(self, states: Sequence[VringState]) -> None:
        """Start workers again, from the given positions, on rings stopped by
        :meth:`take_rings` (or served by another data plane since). A worker looks at its
        ring once as it starts: what the driver queued meanwhile is served without a kick."""
        for state in states:
            ring = self._ring(state.index)
            if state.index in self.active:
                raise InvalidOperation(f"ring {state.index} is already running here")
            if not ring.started or ring.addr is None:
                raise InvalidOperation(f"ring {state.index} is not started by the front-end")
            ring.base = state.num
            self.ring_started(ring)
        self._changed()

    @property
    def _tap_attached(self) -> list[bool]:
        return self.tap_queues.attached

    def _attach_tap_queue(self, queue: int, attach: bool) -> None:
        self.tap_queues.set(queue, attach)

    def _release(self) -> None:
        super()._release()
        # the next front-end gets every pair's tap queue attached, as at the start
        for queue in range(self.queue_pairs):
            self._attach_tap_queue(queue, True)

    def close(self) -> None:
        """Release the front-end's resources and give the tap back with every queue attached
        (as it was made), for whatever uses it next (another data plane, after a swap)."""
        super().close()
        for queue in range(self.queue_pairs, len(self._tap_attached)):
            self._attach_tap_queue(queue, True)

    def _transmit(self, ring: ActiveRing, *, send: bool) -> bool:
        fd = self._tap_fd(ring)
        zeros = np.zeros(ring.queue.num, dtype=np.uint32)  # used lengths: nothing written
        while True:
            batch = ring.pop_batch()
            n = len(batch)
            if not n:
                return True
            sent = 0
            if send:
                # the common shape (one buffer per frame, one region): no per-chain objects
                flat = batch.flat(writable=False)
                if flat is not None:
                    sent = _write_frames(fd, flat)
                else:
                    for chain in batch:
                        sent += _write_frame(fd, chain.readable)
            with self._stats_lock:
                self.tx_frames += sent
                self.tx_dropped += n - sent
            if zeros.shape[0] < n:
                zeros = np.zeros(n, dtype=np.uint32)
            ring.complete(batch.ids, zeros[:n])

    def _receive(self, ring: ActiveRing) -> bool:
        # Frames are completed in batches: one used-index update, and at most one interrupt,
        # for up to RX_BATCH frames (or fewer, when the tap or the ring runs dry first).
        done_ids: list[int] = []
        done_lens: list[int] = []
        try:
            # While dirty logging, the bounce path: it writes exactly what a chain's used
            # length reports (what the ring logs), where the direct path may read part of a
            # frame into a buffer it then gives back or drops.
            if self.rx_direct and ring.can_unpop and not self.logging:
                direct = self._receive_direct(ring, done_ids, done_lens)
                if direct is not None:
                    return direct
            return self._receive_frames(ring, done_ids, done_lens)
        finally:
            if done_ids:
                ring.complete(done_ids, done_lens)

    def _receive_direct(
        self, ring: ActiveRing, done_ids: list[int], done_lens: list[int]
    ) -> bool | None:
        """Receive with the tap read straight into the driver's buffers: pop up to
        :data:`RX_BATCH` chains, ``readv`` one frame into each (the buffer, then the ring's
        arena for what does not fit), give back the chains left when the tap runs dry
        (:meth:`ActiveRing.unpop`). A frame longer than its buffer spreads over the next
        ones with MRG_RXBUF (its tail copied from the arena) and is dropped without.

        Returns ``None`` (having given back what it popped) when the driver's buffers are
        not one descriptor each in one region, or shorter than a header: the bounce path
        (:meth:`_receive_frames`) serves those.
        """
        fd = self._tap_fd(ring)
        queue = ring.queue
        spill = self._rx_state(ring).arena  # at least MAX_RX_FRAME: any frame's tail fits
        size = self.hdr_size
        mergeable = self.mergeable
        mrg_hdr = size >= HDR_SIZE_MRG
        readv = os.readv
        frames = dropped = 0

        def flush() -> None:
            # counted before the driver can see the frames: counters never lag behind them
            nonlocal frames, dropped
            with self._stats_lock:
                self.rx_frames += frames
                self.rx_dropped += dropped
            frames = dropped = 0
            if done_ids:
                ring.complete(done_ids, done_lens)
                done_ids.clear()
                done_lens.clear()

        try:
            while True:
                flush()
                if ring.interrupted:
                    return False  # let whoever waits for the ring in; the worker comes back
                if not queue.pending():
                    ring.extra_wanted = False  # no buffers: wait for the driver's kick
                    return True
                ring.extra_wanted = True
                batch = ring.pop_batch(max_chains=RX_BATCH)
                n = len(batch)
                if not n:
                    return False
                flat = batch.flat(writable=True)
                if flat is None or min(flat.lengths) < size:
                    ring.unpop(n)
                    return None
                ids, view, offsets, sizes = flat.ids, flat.view, flat.offsets, flat.lengths
                iovs = _rx_iovecs(flat, spill)
                ones: list[int] = []  # where num_buffers = 1 goes (stored for the batch at once)
                i = 0
                empty = False
                while i < n:
                    try:
                        got = readv(fd, iovs[i])
                    except BlockingIOError:
                        empty = True
                        break
                    room = sizes[i]
                    if got <= room:
                        if got < size:
                            continue  # not even a header: nothing to deliver, buffer reused
                        ones.append(offsets[i])
                        done_ids.append(ids[i])
                        done_lens.append(got)
                        frames += 1
                        i += 1
                        continue
                    if not mergeable:
                        dropped += 1  # longer than the buffer: dropped, the buffer reused
                        continue
                    # spread the tail over the next buffers of the batch
                    left = got - room
                    pos = 0
                    j = i + 1
                    taken = [room]
                    while True:
                        while left and j < n:
                            take = min(sizes[j], left)
                            o = offsets[j]
                            _write_guest(view[o : o + take], spill[pos : pos + take])
                            taken.append(take)
                            pos += take
                            left -= take
                            j += 1
                        if not left:
                            break
                        # The batch ran out: give back the chains from this frame's first on
                        # and pop them again with more (the same buffers come first: what is
                        # in them stays, the spreading goes on after them).
                        held = n - i
                        if mrg_hdr and ones:  # the frames before this one, in this view
                            _write_guest_u16(view, ones, HDR_SIZE_LEGACY, 1)
                            ones = []
                        ring.unpop(held)
                        want = max(RX_BATCH, held + -(-left // max(1, min(sizes))))
                        batch = ring.pop_batch(max_chains=want, force=True)
                        flat = batch.flat(writable=True)
                        if len(batch) <= held or flat is None or min(flat.lengths) < size:
                            ring.unpop(len(batch))  # no more buffers: the frame is dropped
                            break
                        ids, offsets, sizes = flat.ids, flat.offsets, flat.lengths
                        view = flat.view
                        iovs = _rx_iovecs(flat, spill)
                        j -= i
                        i = 0
                        n = len(batch)
                    if left:
                        dropped += 1
                        if flat is None:
                            return None
                        i = n = 0  # everything was given back
                        break
                    off = offsets[i]  # the frame's first buffer (renumbered after a pop)
                    _write_guest(
                        view[off + HDR_SIZE_LEGACY : off + size],
                        memoryview(_NUM_BUFFERS.pack(len(taken))),
                    )
                    done_ids += ids[i:j]
                    done_lens += taken
                    frames += 1
                    i = j
                if mrg_hdr and ones:
                    _write_guest_u16(view, ones, HDR_SIZE_LEGACY, 1)
                if i < n:
                    ring.unpop(n - i)
                if empty:
                    flush()
                    if not (self.busy_poll > 0 and _spin_tap(fd, ring, self.busy_poll)):
                        return False  # the tap is empty
        finally:
            with self._stats_lock:
                self.rx_frames += frames
                self.rx_dropped += dropped

    def _rx_state(self, ring: ActiveRing) -> _RxRing:
        """The receive ring's arena and what the device learnt of its buffers."""
        queue = ring.queue
        rx = self._rx_rings.get(ring.index)
        if rx is None:
            rx = self._rx_rings[ring.index] = _RxRing()
        if rx.queue is None or rx.queue() is not queue:
            rx.queue = weakref.ref(queue)
            rx.buf_len = 0
            rx.slots = 0 if isinstance(queue, PackedDeviceQueue) else 1
        return rx

    def _receive_frames(self, ring: ActiveRing, done_ids: list[int], done_lens: list[int]) -> bool:
        fd = self._tap_fd(ring)
        queue = ring.queue
        rx = self._rx_state(ring)
        size = self.hdr_size
        mergeable = self.mergeable
        lens: list[int] = []
        while True:
            if ring.interrupted:
                return False  # let whoever waits for the ring in; the worker comes back
            if len(done_ids) >= RX_BATCH:
                ring.complete(done_ids, done_lens)
                done_ids.clear()
                done_lens.clear()
            pending = queue.pending()
            resubmitted = ring.resubmitted
            if not pending and resubmitted is None:
                ring.extra_wanted = False  # no buffers: wait for the driver's kick
                return True
            ring.extra_wanted = True
            lens.clear()
            more = self._read_burst(fd, rx, pending, resubmitted, mergeable, size, lens)
            if lens:
                self._deliver(ring, rx, lens, mergeable, size, done_ids, done_lens)
            if not more and not (self.busy_poll > 0 and _spin_tap(fd, ring, self.busy_poll)):
                return False  # the tap is empty

    def _read_burst(
        self,
        fd: int,
        rx: _RxRing,
        pending: int,
        resubmitted: ChainBatch | None,
        mergeable: bool,
        size: int,
        lens: list[int],
    ) -> bool:
        """Read frames from the tap back to back into ``rx.arena``, their lengths into
        ``lens``; False when the tap ran empty.

        Popped chains cannot be given back, so the chains are popped after the frames are
        read, and a burst reads no more frames than the ring is expected to have buffers for:
        ``pending()`` counts chains on a split ring, but descriptors on a packed one (divided
        by the longest chain of the last pop), and a mergeable frame is expected to take as
        many buffers as the smallest of the last pop would give. Until the device has popped
        once (or after a pop that taught it nothing usable) a burst is one frame, as each
        frame was before bursts: read when a buffer is there, dropped when the ring has too
        few. A wrong guess (a driver that changes its buffers) costs that drop too, for the
        frames the ring turns out not to have room for.
        """
        slots = rx.slots
        buf_len = rx.buf_len
        if not slots or (mergeable and buf_len <= 0):
            budget = 1
        else:
            # a packed ring's pending descriptors are at least one chain
            budget = (pending // slots or 1) if pending else 0
            if resubmitted is not None:
                budget += len(resubmitted)
            budget = min(budget, RX_BATCH)
        arena = rx.arena
        readv = os.readv
        off = 0
        need = 0
        last = RX_ARENA - MAX_RX_FRAME  # a read starting beyond cannot take the largest frame
        while True:
            try:
                got = readv(fd, [arena[off:]])
            except BlockingIOError:
                return False
            if got < size:
                continue  # not even a header: nothing to deliver
            lens.append(got)
            off += got
            need += -(-got // buf_len) if mergeable and got > buf_len > 0 else 1
            if need >= budget or off > last:
                return True

    def _pop_batches(self, ring: ActiveRing, rx: _RxRing, count: int) -> list[ChainBatch]:
        """Pop up to ``count`` chains, as few pops as the ring allows, learning the driver's
        buffers from them (see :meth:`_read_burst`)."""
        batches: list[ChainBatch] = []
        have = 0
        while have < count:
            fresh = ring.resubmitted is None  # else the first chains come from the restart
            # force: the frames are already read, finish them even if the ring is wanted
            batch = ring.pop_batch(max_chains=count - have, force=True)
            n = len(batch)
            if not n:
                break
            batches.append(batch)
            have += n
            rx.buf_len = int(batch.writable_len.min())
            queue = ring.queue
            if fresh and isinstance(queue, PackedDeviceQueue):
                per_chain = queue.last_popped[1]
                rx.slots = 1 if per_chain is None else int(per_chain.max())
        return batches

    def _deliver(
        self,
        ring: ActiveRing,
        rx: _RxRing,
        lens: list[int],
        mergeable: bool,
        size: int,
        done_ids: list[int],
        done_lens: list[int],
    ) -> None:
        """Put the frames of a burst (in ``rx.arena``, back to back) into the driver's
        buffers: one chain each, popped together; a mergeable frame that needs more takes the
        next ones, and pops more one at a time when the burst's run out."""
        arena = rx.arena
        batches = self._pop_batches(ring, rx, len(lens))
        frames = dropped = 0
        off = 0
        first = 0  # frames delivered by the fast path
        try:
            flat = batches[0].flat(writable=True) if len(batches) == 1 else None
            if flat is not None:
                # The common shape: one buffer per chain, all in one region. Each frame that
                # fits its chain's buffer is copied there from the arena; no per-chain objects.
                view, offsets, sizes, ids = flat.view, flat.offsets, flat.lengths, flat.ids
                n = min(len(ids), len(lens))
                mrg_hdr = size >= HDR_SIZE_MRG
                pack = _NUM_BUFFERS.pack_into
                while first < n:
                    got = lens[first]
                    if got > sizes[first]:
                        break  # needs more buffers, or is dropped: the general path below
                    if mrg_hdr:
                        pack(arena, off + HDR_SIZE_LEGACY, 1)
                    dst = offsets[first]
                    _write_guest(view[dst : dst + got], arena[off : off + got])
                    off += got
                    first += 1
                done_ids += ids[:first]
                done_lens += lens[:first]
                frames = first
                chains = [batches[0][i] for i in range(first, len(ids))]
            else:
                chains = [c for batch in batches for c in batch.chains()]
            n_chains = len(chains)
            ci = 0
            for got in lens[first:]:
                data = arena[off : off + got]
                off += got
                if ci < n_chains:
                    chain = chains[ci]
                    ci += 1
                    views = chain.writable
                    if len(views) == 1 and views[0].nbytes >= got:
                        # the common case: the frame fits the chain's one buffer
                        if size >= HDR_SIZE_MRG:
                            _NUM_BUFFERS.pack_into(data, HDR_SIZE_LEGACY, 1)
                        _write_guest(views[0], data)
                        done_ids.append(chain.id)
                        done_lens.append(got)
                        frames += 1
                        continue
                    taken = [chain]
                    room = chain.writable_len
                else:
                    taken = []
                    room = 0
                # Take chains until the frame fits (one without MRG_RXBUF).
                while room < got and (mergeable or not taken):
                    if ci < n_chains:
                        chain = chains[ci]
                        ci += 1
                    else:
                        # force: this frame is already read, finish it even if the ring is wanted
                        one = ring.pop_batch(max_chains=1, force=True)
                        if not len(one):
                            break
                        chain = one[0]
                    taken.append(chain)
                    room += chain.writable_len
                written: list[int] = []
                if room >= got and taken[0].writable_len >= size:
                    written = _fill(taken, data, size)
                done_ids += [c.id for c in taken]
                if written:
                    done_lens += written
                    frames += 1
                else:
                    # Too little buffer space for this frame (or none at all): drop it. The
                    # buffers go back empty (a driver discards a used buffer shorter than a
                    # header).
                    done_lens += [0] * len(taken)
                    dropped += 1
        finally:
            # counted before the driver can see the frames (completed after this, also when
            # a pop fails halfway): counters never lag behind them
            with self._stats_lock:
                self.rx_frames += frames
                self.rx_dropped += dropped

    # -- net requests --

    def get_queue_num(self) -> int:
        # For net, GET_QUEUE_NUM counts queue *pairs*: QEMU compares it with its ``queues=``
        # (pairs) and DPDK's vhost answers its maximum of pairs.
        return self.queue_pairs

    def send_rarp(self, mac: bytes) -> None:
        super().send_rarp(mac)
        frame = bytes(self.hdr_size) + rarp_frame(mac)
        os.write(self.tap.fds[0], frame)

    def net_set_mtu(self, mtu: int) -> None:
        super().net_set_mtu(mtu)
        self.config[10:12] = struct.pack("<H", mtu)

    # -- device state --

    def device_records(self) -> tuple[NetState | None, BlkState | None]:
        return NetState(self.queue_pairs, self.mtu or 0), None

    def check_state(self, state: DeviceState) -> None:
        assert state.net is not None  # a NET state always has the record
        if state.net.queue_pairs > self.queue_pairs:
            raise DeviceStateMismatch(
                f"the source served {state.net.queue_pairs} queue pairs, this device "
                f"{self.queue_pairs}"
            )

    def apply_state(self, state: DeviceState) -> None:
        assert state.net is not None
        self.config[:] = state.config  # the guest keeps its MAC, link status and MTU
        self.mac = bytes(state.config[:6])
        self.mtu = state.net.mtu or None


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m vhostkit.devices.net ARGS``: the same as ``vhostkit backend net ARGS``."""
    from vhostkit.cli import main as cli_main  # the command line sits above the devices

    return cli_main(["backend", "net", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
