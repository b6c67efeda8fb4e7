"""A userspace virtio-vsock guest over kernel vhost-vsock: :class:`VsockDriver`, and the
``python3 -m vhostkit.guest.vsock`` script (:func:`main`).

:class:`VsockDriver` is a :class:`~vhostkit.guest.rings.VirtioGuest` with the two rings the
kernel serves (RX 0, TX 1; the event queue stays with the VMM): it posts receive buffers, feeds
what the device puts in them to a :class:`~vhostkit.guest.vsock.endpoint.VsockEndpoint`, and
puts the endpoint's packets into transmit buffers. On :class:`~vhostkit.kernel.VhostVsock` it
sets the guest CID and SET_RUNNING 1 once the rings are set up, and SET_RUNNING 0 in
:meth:`VirtioGuest.stop`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidParam
from vhostkit.guest.rings import (
    VirtioGuest,
    drain_eventfd,
    kick_eventfd,
    new_eventfd,
    wait_readable,
)
from vhostkit.guest.vsock.endpoint import ConnKey, DataReceived, VsockEndpoint, VsockEvent
from vhostkit.guest.vsock.wire import HDR_SIZE, VsockHdr, VsockPacket
from vhostkit.virtio.features import VirtioFeature

__all__ = ["RX", "TX", "VsockDriver", "main"]

log = logging.getLogger(__name__)

#: Ring indices of a virtio-vsock device that the kernel serves.
RX, TX = 0, 1


class VsockDriver(VirtioGuest):
    """A userspace virtio-vsock guest over a vhost-vsock data plane (see the module docstring).

    ``guest_cid`` is the CID the guest takes (set on the kernel device at start);
    ``queue_size`` entries per ring; ``rx_buffer_size`` / ``tx_buffer_size`` bytes per buffer,
    header included; ``buf_alloc`` the receive buffer every connection advertises.

    Single-threaded use: call :meth:`poll` in a loop; or run :meth:`serve` in one thread and
    stop it from another with :meth:`stop_serving`. Nothing else may touch the driver while
    :meth:`serve` runs.
    """

    def __init__(
        self,
        backend: VhostBackend,
        guest_cid: int,
        *,
        queue_size: int = 128,
        rx_buffer_size: int = 4096,
        tx_buffer_size: int = 4096,
        buf_alloc: int = 256 * 1024,
        features: int = int(VirtioFeature.VERSION_1),
        name: str = "vhostkit-vsock",
    ) -> None:
        for size in (rx_buffer_size, tx_buffer_size):
            if size <= HDR_SIZE or size % 16:
                raise InvalidParam(f"buffer size {size} must be a multiple of 16 above {HDR_SIZE}")
        super().__init__(
            backend,
            num_rings=2,
            queue_size=queue_size,
            features=features,
            protocol_features=0,
            set_status=False,
            name=name,
        )
        self.guest_cid = guest_cid
        self.rx_buffer_size = rx_buffer_size
        self.tx_buffer_size = tx_buffer_size
        self.endpoint = VsockEndpoint(
            guest_cid, buf_alloc=buf_alloc, max_payload=tx_buffer_size - HDR_SIZE
        )
        self._rx_base = self._tx_base = 0
        self._tx_free: list[int] = []
        self._wake = -1
        self._stop_serving = threading.Event()
        self._running_set = False
        self.rx_packets = self.tx_packets = 0

    # -- VirtioGuest hooks ---------------------------------------------------------------------

    def _buffer_bytes(self) -> int:
        return self.queue_size * (self.rx_buffer_size + self.tx_buffer_size)

    def _setup_buffers(self) -> None:
        self._wake = new_eventfd()
        self._fds.append(self._wake)
        self._rx_base = self._carve(self.queue_size * self.rx_buffer_size, 4096)
        self._tx_base = self._carve(self.queue_size * self.tx_buffer_size, 4096)
        self._tx_free = list(range(self.queue_size - 1, -1, -1))
        rx = self._rings[RX].queue
        slots = np.arange(self.queue_size, dtype=np.int64)
        rx.add_batch(
            self._rx_base + slots * self.rx_buffer_size,
            np.full(self.queue_size, self.rx_buffer_size),
            writable=True,
            tokens=slots,
        )
        rx.publish()

    def _on_enabled(self) -> None:
        be = self.backend
        set_cid = getattr(be, "set_guest_cid", None)
        set_running = getattr(be, "set_running", None)
        if set_cid is None or set_running is None:
            log.warning("%r has no guest CID / SET_RUNNING: assuming it runs already", be)
        else:
            set_cid(self.guest_cid)
            set_running(True)
            self._running_set = True
        self._rings[RX].notify()

    def _quiesce(self) -> None:
        if self._running_set:
            self._running_set = False
            self.backend.set_running(False)  # type: ignore[attr-defined]

    # -- API -----------------------------------------------------------------------------------

    def listen(self, port: int, *, echo: bool = False) -> None:
        """Accept connections on ``port`` (see :meth:`VsockEndpoint.listen`)."""
        self.endpoint.listen(port, echo=echo)

    def send(self, key: ConnKey, data: bytes) -> None:
        """Queue data on a connection; it leaves on the next :meth:`poll`."""
        self.endpoint.send(key, data)

    def poll(self, timeout: float | None = 0.0) -> list[VsockEvent]:
        """Handle received packets and transmit what can go; returns the events.

        When nothing happened, waits (call eventfds, and the wake eventfd of
        :meth:`stop_serving`) up to ``timeout`` seconds (``None``: until something happens).
        """
        self._check_running()
        rx, tx = self._rings[RX], self._rings[TX]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = self._service()
            if events:
                return events
            fds = [rx.call, self._wake]
            try:
                pending = rx.queue.enable_interrupts()
                if self.endpoint.has_output() and not self._tx_free:
                    # blocked on a full transmit ring: wait for completions too
                    pending = tx.queue.enable_interrupts() or pending
                    fds.append(tx.call)
                if pending:
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                rx.interrupt_waits += 1
                fired = wait_readable(fds, left)
                for fd in fired:
                    drain_eventfd(fd)
                if not fired or self._wake in fired:
                    return []  # timed out, or woken by stop_serving()
            finally:
                rx.queue.disable_interrupts()
                tx.queue.disable_interrupts()

    def serve(self, on_event: Callable[[VsockEvent], None] | None = None) -> None:
        """Run :meth:`poll` until :meth:`stop_serving` is called (from another thread).

        ``on_event``, when given, is called with each event (in this thread).
        """
        while not self._stop_serving.is_set():
            for event in self.poll(None):
                if on_event is not None:
                    on_event(event)
        self._stop_serving.clear()

    def wait_tx_done(self, timeout: float | None = None) -> bool:
        """Wait until the device has used every transmit buffer: all that was queued left.
        False after ``timeout`` seconds. Not while :meth:`serve` runs in another thread."""
        self._check_running()
        ring = self._rings[TX]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._reap_tx()
            if len(self._tx_free) == self.queue_size:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not ring.wait_used(left):
                return False

    def stop_serving(self) -> None:
        """Make :meth:`serve` (or a waiting :meth:`poll`) return soon; thread-safe."""
        self._stop_serving.set()
        if self._wake >= 0 and not self._closed:
            kick_eventfd(self._wake)

    # -- the rings -----------------------------------------------------------------------------

    def _service(self) -> list[VsockEvent]:
        events = self._take_rx()
        self._reap_tx()
        self._transmit()
        return events

    def _take_rx(self) -> list[VsockEvent]:
        ring = self._rings[RX]
        q = ring.queue
        tokens, lens = q.reap_batch()
        if not tokens.shape[0]:
            return []
        assert self.memory is not None
        bs = self.rx_buffer_size
        events: list[VsockEvent] = []
        for slot, used in zip(tokens.tolist(), lens.tolist(), strict=True):
            gpa = self._rx_base + slot * bs
            if used < HDR_SIZE:
                log.warning("RX buffer %d used for %d bytes, less than a header", slot, used)
                continue
            raw = self.memory.read(gpa, used)
            hdr = VsockHdr.unpack(raw)
            if HDR_SIZE + hdr.len > used:
                log.warning("RX packet says %d payload bytes, %d arrived", hdr.len, used - HDR_SIZE)
                continue
            self.rx_packets += 1
            pkt = VsockPacket(hdr, raw[HDR_SIZE : HDR_SIZE + hdr.len])
            log.debug("rx %s", hdr.describe())
            events += self.endpoint.receive(pkt)
        q.add_batch(
            self._rx_base + tokens * bs, np.full(tokens.shape[0], bs), writable=True, tokens=tokens
        )
        ring.publish()
        return events

    def _reap_tx(self) -> None:
        tokens, _ = self._rings[TX].queue.reap_batch()
        self._tx_free += tokens.tolist()

    def _transmit(self) -> None:
        if not self._tx_free:
            return
        pkts = self.endpoint.outgoing(len(self._tx_free))
        if not pkts:
            return
        assert self.memory is not None
        bs = self.tx_buffer_size
        slots = [self._tx_free.pop() for _ in pkts]
        lens = []
        for slot, pkt in zip(slots, pkts, strict=True):
            data = pkt.pack()
            self.memory.write(self._tx_base + slot * bs, data)
            lens.append(len(data))
            log.debug("tx %s", pkt.hdr.describe())
        slot_a = np.array(slots, dtype=np.int64)
        ring = self._rings[TX]
        ring.queue.add_batch(self._tx_base + slot_a * bs, lens, writable=False, tokens=slot_a)
        ring.publish()
        self.tx_packets += len(pkts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m vhostkit.guest.vsock``: a vsock guest on /dev/vhost-vsock."""
    from vhostkit.kernel import VhostVsock

    description = "vhostkit as the guest: a userspace virtio-vsock driver over kernel vhost-vsock."
    parser = argparse.ArgumentParser(
        prog="python3 -m vhostkit.guest.vsock", description=description
    )
    parser.add_argument("--cid", type=int, default=3, help="the guest CID (default 3)")
    parser.add_argument("--port", type=int, action="append", required=True, help="listen here")
    parser.add_argument("--echo", action="store_true", help="send back what arrives")
    parser.add_argument("--device", default=VhostVsock.DEVICE_PATH)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    with VhostVsock(args.device) as dev, VsockDriver(dev, args.cid).start() as guest:
        for port in args.port:
            guest.listen(port, echo=args.echo)

        def on_event(event: VsockEvent) -> None:
            print(event, flush=True)
            if isinstance(event, DataReceived) and not args.echo:
                guest.endpoint.recv(event.key)

        def on_signal(signum: int, frame: object) -> None:
            guest.stop_serving()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            print(f"CID {args.cid} listening on {args.port}", flush=True)
            guest.serve(on_event)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        guest.stop()
    return 0
