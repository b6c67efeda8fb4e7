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
  Frames are completed in batches of up to :data:`RX_BATCH` (one used-index update, at most
  one interrupt). The frame passes through one bounce buffer (the tap's read needs room for
  the largest frame before the device knows how many buffers it takes).
* Offloads: the guest-side offload features acked (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN,
  GUEST_UFO) become the tap's ``TUNSETOFFLOAD`` flags; the header size (10, or 12 with
  VERSION_1 or MRG_RXBUF) becomes ``TUNSETVNETHDRSZ``.
* A started but disabled TX ring is consumed and its frames dropped; a disabled RX ring gets
  nothing (the spec's "no side effects" rule for net).
* SEND_RARP writes a RARP announcement for the given MAC to the tap.

Run it from the command line with ``python3 -m vhostkit.devices.net``.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from vhostkit.errors import InvalidParam, VhostError
from vhostkit.kernel.ioctls import TunFlags
from vhostkit.kernel.tap import Tap, offload_for_features
from vhostkit.user.daemon import ActiveRing, RingDevice
from vhostkit.user.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.net import HDR_SIZE_LEGACY, HDR_SIZE_MRG, header_size
from vhostkit.virtio.ring import Chain

__all__ = ["DEFAULT_NET_FEATURES", "NetDevice", "main", "net_config"]

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

#: Protocol features: everything generic, plus the net ones (MQ, MTU, RARP). CONFIG is left
#: out: QEMU's virtio-net warns that it does not use it.
NET_PROTOCOL_FEATURES = int(
    (DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG)
    | ProtocolFeature.MQ
    | ProtocolFeature.MTU
    | ProtocolFeature.RARP
)

#: Largest frame a tap hands over with GSO: 64 KiB of payload plus headers.
MAX_RX_FRAME = 65536 + 256
#: Received frames completed together (one used-index update, at most one interrupt).
RX_BATCH = 64
_NUM_BUFFERS = struct.Struct("<H")
VIRTIO_NET_S_LINK_UP = 1


#: How long TX waits for a full tap to take frames again before it drops one. The tap's send
#: buffer fills when the kernel is slow to consume what was written (softirqs starved by busy
#: CPUs); like vhost-net, the device then waits instead of dropping.
TX_BACKPRESSURE_TIMEOUT = 5.0


def _fill(chains: list[Chain], data: memoryview, size: int) -> list[int]:
    """Scatter ``data`` (the tap's virtio-net header, then the frame) over ``chains``, which
    together hold it; returns the bytes written to each.

    The header goes through as the tap wrote it (flags and GSO fields, already limited to the
    offloads the driver acked) except ``num_buffers``: the tap skips those two bytes of a
    12-byte header, and they must say how many buffers the frame spans (1 without
    MRG_RXBUF).
    """
    if size >= HDR_SIZE_MRG:
        _NUM_BUFFERS.pack_into(data, HDR_SIZE_LEGACY, len(chains))
    written: list[int] = []
    pos, end = 0, data.nbytes
    for chain in chains:
        start = pos
        for dst in chain.writable:
            n = min(dst.nbytes, end - pos)
            dst[:n] = data[pos : pos + n]
            pos += n
            if pos == end:
                break
        written.append(pos - start)
    return written


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


class NetDevice(RingDevice):
    """virtio-net over a tap. ``tap`` needs ``queue_pairs`` queues, a vnet header and
    non-blocking fds (``Tap(..., nonblocking=True)``); the device borrows it (the caller closes
    it). A multi-queue tap with more queues than ``queue_pairs`` has the extra ones detached
    while the device lives, so that the tap steers no flow to them; :meth:`close` attaches
    them again."""

    def __init__(
        self,
        tap: Tap,
        *,
        mac: bytes = bytes.fromhex("525400000001"),
        mtu: int = 1500,
        queue_pairs: int = 1,
        features: int = DEFAULT_NET_FEATURES,
        protocol_features: int = NET_PROTOCOL_FEATURES,
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
        self._rx_buf = bytearray(MAX_RX_FRAME)
        self._stats_lock = threading.Lock()
        #: tap queue i attached (TUNSETQUEUE); a multi-queue tap's queue is detached while
        #: both rings of pair i are disabled, so that the tap steers no flow to a queue
        #: nobody reads
        self._tap_attached = [True] * len(tap.fds)
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
        )

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

    def _attach_tap_queue(self, queue: int, attach: bool) -> None:
        """Attach or detach tap queue ``queue`` (multi-queue taps only; QEMU's own tap
        back-end does the same when the driver turns queue pairs on and off)."""
        tap = self.tap
        if tap.closed or TunFlags.MULTI_QUEUE not in tap.flags:
            return
        if self._tap_attached[queue] != attach:
            try:
                tap.set_queue_enabled(queue, attach)
            except VhostError as exc:
                log.warning("tap queue %d: %s", queue, exc)
                return
            self._tap_attached[queue] = attach

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
        while True:
            batch = ring.pop_batch()
            n = len(batch)
            if not n:
                return True
            sent = dropped = 0
            if send:
                for chain in batch:
                    if _write_frame(fd, chain.readable):
                        sent += 1
                    else:
                        dropped += 1
            else:
                dropped = n
            with self._stats_lock:
                self.tx_frames += sent
                self.tx_dropped += dropped
            ring.complete(batch.ids, np.zeros(n, dtype=np.int64))

    def _receive(self, ring: ActiveRing) -> bool:
        # Frames are completed in batches: one used-index update, and at most one interrupt,
        # for up to RX_BATCH frames (or fewer, when the tap or the ring runs dry first).
        done_ids: list[int] = []
        done_lens: list[int] = []
        try:
            return self._receive_frames(ring, done_ids, done_lens)
        finally:
            if done_ids:
                ring.complete(done_ids, done_lens)

    def _receive_frames(self, ring: ActiveRing, done_ids: list[int], done_lens: list[int]) -> bool:
        fd = self._tap_fd(ring)
        queue = ring.queue
        buf = self._rx_buf if ring.index == 0 else bytearray(MAX_RX_FRAME)
        view = memoryview(buf)
        size = self.hdr_size
        mergeable = self.mergeable
        while True:
            if ring.interrupted:
                return False  # let whoever waits for the ring in; the worker comes back
            if len(done_ids) >= RX_BATCH:
                ring.complete(done_ids, done_lens)
                done_ids.clear()
                done_lens.clear()
            if not queue.pending() and ring.resubmitted is None:
                ring.extra_wanted = False  # no buffers: wait for the driver's kick
                return True
            ring.extra_wanted = True
            try:
                got = os.readv(fd, [view])
            except BlockingIOError:
                return False
            if got < size:
                continue
            need = got
            chains = []
            room = 0
            # Pop chains one at a time until the frame fits (one without MRG_RXBUF).
            while room < need:
                # force: this frame is already read, finish it even if the ring is wanted
                one = ring.pop_batch(max_chains=1, force=True)
                if not len(one):
                    break
                chain = one[0]
                chains.append(chain)
                room += chain.writable_len
                if not mergeable:
                    break
            written: list[int] = []
            if room >= need and chains[0].writable_len >= size:
                written = _fill(chains, view[:got], size)
            if not written:
                # Too little buffer space for this frame: drop it. The buffers go back empty
                # (a driver discards a used buffer shorter than a header).
                with self._stats_lock:
                    self.rx_dropped += 1
                done_ids += [c.id for c in chains]
                done_lens += [0] * len(chains)
                continue
            # counted before the driver can see the frame: counters never lag behind it
            with self._stats_lock:
                self.rx_frames += 1
            done_ids += [c.id for c in chains]
            done_lens += written

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


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m vhostkit.devices.net --socket PATH --tap NAME``: serve until SIGINT/SIGTERM."""
    from vhostkit.user.listener import BackendClient, BackendListener

    parser = argparse.ArgumentParser(description="vhostkit tap-backed vhost-user net backend")
    parser.add_argument("--socket", required=True, help="vhost-user socket path")
    parser.add_argument("--tap", default="vhk%d", help="tap name (created if absent)")
    parser.add_argument("--mac", default="52:54:00:00:00:01")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--queues", type=int, default=1, help="queue pairs")
    parser.add_argument("--client", action="store_true", help="connect to a listening frontend")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mac = bytes.fromhex(args.mac.replace(":", ""))
    with Tap(args.tap, queues=args.queues, nonblocking=True) as tap:
        tap.up()
        device = NetDevice(tap, mac=mac, mtu=args.mtu, queue_pairs=args.queues)
        print(f"vhostkit net backend: tap {tap.name}, socket {args.socket}", flush=True)
        try:
            if args.client:
                with BackendClient(args.socket, device, reconnect=True).start():
                    stop.wait()
            else:
                with BackendListener(args.socket, lambda: device, max_connections=1).start():
                    stop.wait()
        finally:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
