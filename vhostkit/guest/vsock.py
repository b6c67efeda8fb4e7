"""vhostkit as the guest: a userspace virtio-vsock driver over kernel vhost-vsock.

Two layers:

* :class:`VsockEndpoint` is the guest's side of the virtio-vsock stream protocol, sans I/O: it
  takes received packets (:meth:`VsockEndpoint.receive`) and hands out the packets to send
  (:meth:`VsockEndpoint.outgoing`), never touching a ring or a socket. It listens on ports,
  answers OP_REQUEST with OP_RESPONSE (advertising its ``buf_alloc``), takes OP_RW data,
  honours the peer's credit (``peer buf_alloc - (tx_cnt - peer fwd_cnt)``), sends
  CREDIT_UPDATE when the peer would otherwise run out of credit, answers CREDIT_REQUEST,
  handles SHUTDOWN and RST, and answers packets for unknown connections with RST. In echo mode
  a listener's connections send back every byte they receive; once the peer shut down its
  sending side and everything was echoed, the endpoint shuts down too.
* :class:`VsockDriver` is a :class:`~vhostkit.guest.rings.VirtioGuest` with the two rings the
  kernel serves (RX 0, TX 1; the event queue stays with the VMM): it posts receive buffers,
  feeds what the device puts in them to the endpoint, and puts the endpoint's packets into
  transmit buffers. On :class:`~vhostkit.kernel.VhostVsock` it sets the guest CID and
  SET_RUNNING 1 once the rings are set up, and SET_RUNNING 0 in :meth:`VirtioGuest.stop`.

Packet layout (``struct virtio_vsock_hdr``, 44 bytes, little-endian): src_cid u64, dst_cid u64,
src_port u32, dst_port u32, len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32;
``len`` payload bytes follow in the same buffer.

Kernel quirks (Linux 6.1's vhost-vsock): a packet bigger than a receive buffer is split over
several buffers, each with its own header; the device drops transmitted packets whose source
CID is not the guest's or whose destination is not the host (CID 2), and whose buffer holds
fewer payload bytes than ``len`` says.

Script use (inside a machine with ``/dev/vhost-vsock``)::

    python3 -m vhostkit.guest.vsock --cid 3 --port 1234 --echo

then on the same machine ``socat - VSOCK-CONNECT:3:1234`` talks to it; SIGINT or SIGTERM
stops it (SET_RUNNING 0, rings stopped, everything closed).
"""

from __future__ import annotations

import argparse
import enum
import logging
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest.rings import (
    VirtioGuest,
    drain_eventfd,
    kick_eventfd,
    new_eventfd,
    wait_readable,
)
from vhostkit.virtio.features import VirtioFeature

__all__ = [
    "HDR_SIZE",
    "VMADDR_CID_HOST",
    "ConnKey",
    "Connected",
    "ConnectionClosed",
    "DataReceived",
    "PeerShutdown",
    "ShutdownFlag",
    "VsockConnection",
    "VsockDriver",
    "VsockEndpoint",
    "VsockEvent",
    "VsockHdr",
    "VsockOp",
    "VsockPacket",
    "VsockType",
    "main",
]

log = logging.getLogger(__name__)

_HDR = struct.Struct("<QQIIIHHIII")
#: ``sizeof(struct virtio_vsock_hdr)``.
HDR_SIZE = _HDR.size
#: The host's CID, where a guest's packets go.
VMADDR_CID_HOST = 2
#: Ring indices of a virtio-vsock device that the kernel serves.
RX, TX = 0, 1
_U32 = (1 << 32) - 1


class VsockType(enum.IntEnum):
    STREAM = 1
    SEQPACKET = 2


class VsockOp(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(enum.IntFlag):
    """OP_SHUTDOWN flags: the sender will receive (RCV) / send (SEND) no more."""

    NONE = 0
    RCV = 1
    SEND = 2
    BOTH = 3


@dataclass(frozen=True, slots=True)
class VsockHdr:
    """``struct virtio_vsock_hdr``."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & _U32,
            self.fwd_cnt & _U32,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        if len(data) < HDR_SIZE:
            raise InvalidParam(f"a vsock header has {HDR_SIZE} bytes, got {len(data)}")
        return cls(*_HDR.unpack_from(data))

    def describe(self) -> str:
        try:
            op = VsockOp(self.op).name
        except ValueError:
            op = f"op {self.op}"
        return (
            f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"len {self.len} flags {self.flags:#x} buf_alloc {self.buf_alloc} fwd {self.fwd_cnt}"
        )


@dataclass(frozen=True, slots=True)
class VsockPacket:
    """A header and its payload."""

    hdr: VsockHdr
    payload: bytes = b""

    def pack(self) -> bytes:
        return self.hdr.pack() + self.payload


#: A connection's identity: ``(peer cid, peer port, local port)``.
ConnKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Connected:
    """A peer connected to a listening port (the endpoint answered OP_RESPONSE)."""

    key: ConnKey


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes arrived on a connection (in echo mode they are also queued to go back)."""

    key: ConnKey
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerShutdown:
    """The peer shut down receiving and/or sending."""

    key: ConnKey
    flags: ShutdownFlag


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is gone: reset by the peer or by us, or closed after both shut down."""

    key: ConnKey
    reset: bool


VsockEvent = Connected | DataReceived | PeerShutdown | ConnectionClosed


class VsockConnection:
    """One stream connection's state and counters (owned by a :class:`VsockEndpoint`)."""

    def __init__(self, key: ConnKey, buf_alloc: int, echo: bool) -> None:
        self.key = key
        self.echo = echo
        #: what we advertise, what we consumed, what we last told the peer we consumed
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.last_fwd_cnt = 0
        #: bytes the peer sent us
        self.rx_cnt = 0
        #: the peer's receive buffer and its consumed count, from its latest header
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        #: bytes we sent
        self.tx_cnt = 0
        self.rx_data = bytearray()
        self.tx_pending = bytearray()
        self.peer_shutdown = ShutdownFlag.NONE
        #: shutdown flags asked for (by us) and those already put in an OP_SHUTDOWN
        self.shutdown_sent = ShutdownFlag.NONE
        self.shutdown_emitted = ShutdownFlag.NONE
        self.credit_requested = False

    @property
    def peer_cid(self) -> int:
        return self.key[0]

    @property
    def peer_port(self) -> int:
        return self.key[1]

    @property
    def local_port(self) -> int:
        return self.key[2]

    @property
    def peer_credit(self) -> int:
        """Bytes we may send before the peer's receive buffer is full."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))

    def __repr__(self) -> str:
        return (
            f"<VsockConnection {self.key} rx {self.rx_cnt} fwd {self.fwd_cnt} tx {self.tx_cnt} "
            f"credit {self.peer_credit} pending {len(self.tx_pending)}>"
        )


class VsockEndpoint:
    """The guest's side of virtio-vsock stream sockets, sans I/O (see the module docstring).

    ``cid`` is the guest's CID; ``buf_alloc`` the receive buffer each connection advertises;
    ``max_payload`` the largest OP_RW payload to produce (a transmit buffer minus the header).
    """

    def __init__(self, cid: int, *, buf_alloc: int = 256 * 1024, max_payload: int = 4052) -> None:
        if buf_alloc <= 0 or buf_alloc > _U32:
            raise InvalidParam(f"buf_alloc {buf_alloc} out of range")
        if max_payload <= 0:
            raise InvalidParam("max_payload must be positive")
        self.cid = cid
        self.buf_alloc = buf_alloc
        self.max_payload = max_payload
        self.listeners: dict[int, bool] = {}
        self.connections: dict[ConnKey, VsockConnection] = {}
        self._control: deque[VsockPacket] = deque()
        self.resets_sent = 0

    # -- API ---------------------------------------------------------------------------------

    def listen(self, port: int, *, echo: bool = False) -> None:
        """Accept connections to ``port``; in ``echo`` mode they send back what they get."""
        if not 0 <= port <= _U32:
            raise InvalidParam(f"port {port} out of range")
        self.listeners[port] = echo

    def unlisten(self, port: int) -> None:
        self.listeners.pop(port, None)

    def send(self, key: ConnKey, data: bytes) -> None:
        """Queue ``data`` on a connection (it leaves as the peer's credit allows)."""
        conn = self._conn(key)
        if conn.shutdown_sent & ShutdownFlag.SEND:
            raise InvalidOperation(f"connection {key} was shut down for sending")
        conn.tx_pending += data

    def recv(self, key: ConnKey, max_bytes: int | None = None) -> bytes:
        """Take received bytes of a (non-echo) connection; may queue a CREDIT_UPDATE."""
        conn = self._conn(key)
        n = len(conn.rx_data) if max_bytes is None else min(max_bytes, len(conn.rx_data))
        data = bytes(conn.rx_data[:n])
        del conn.rx_data[:n]
        self._consumed(conn, n)
        return data

    def shutdown(self, key: ConnKey, flags: ShutdownFlag = ShutdownFlag.BOTH) -> None:
        """Send OP_SHUTDOWN (after the data already queued, when SEND is among ``flags``)."""
        conn = self._conn(key)
        conn.shutdown_sent |= ShutdownFlag(flags)
        # outgoing() sends the OP_SHUTDOWN once the data queued before it has left

    def reset(self, key: ConnKey) -> ConnectionClosed:
        """Send OP_RST and forget the connection."""
        conn = self._conn(key)
        self._control.append(self._packet(conn, VsockOp.RST))
        self.resets_sent += 1
        del self.connections[key]
        return ConnectionClosed(key, reset=True)

    def _conn(self, key: ConnKey) -> VsockConnection:
        try:
            return self.connections[key]
        except KeyError:
            raise InvalidParam(f"no connection {key}") from None

    # -- packets in ----------------------------------------------------------------------------

    def receive(self, pkt: VsockPacket) -> list[VsockEvent]:
        """Handle one packet from the device; returns what happened."""
        h = pkt.hdr
        if h.dst_cid != self.cid:
            log.warning(
                "dropping a packet for CID %d (we are %d): %s", h.dst_cid, self.cid, h.describe()
            )
            return []
        if len(pkt.payload) != h.len:
            log.warning(
                "dropping a packet whose payload is %d bytes: %s", len(pkt.payload), h.describe()
            )
            return []
        key = (h.src_cid, h.src_port, h.dst_port)
        conn = self.connections.get(key)
        if h.type != VsockType.STREAM:
            if h.op != VsockOp.RST:
                self._reset_unknown(h)
            return []
        if conn is None:
            if h.op == VsockOp.REQUEST and h.dst_port in self.listeners:
                return self._accept(h, key)
            if h.op != VsockOp.RST:
                self._reset_unknown(h)
            return []
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        op = h.op
        if op == VsockOp.RW:
            return self._data(conn, pkt.payload)
        if op == VsockOp.CREDIT_UPDATE:
            conn.credit_requested = False
            return []
        if op == VsockOp.CREDIT_REQUEST:
            self._control.append(self._packet(conn, VsockOp.CREDIT_UPDATE))
            conn.last_fwd_cnt = conn.fwd_cnt
            return []
        if op == VsockOp.SHUTDOWN:
            return self._peer_shutdown(conn, ShutdownFlag(h.flags & ShutdownFlag.BOTH))
        if op == VsockOp.RST:
            del self.connections[key]
            return [ConnectionClosed(key, reset=True)]
        if op == VsockOp.REQUEST:  # a second request on a live connection: start over
            log.warning("duplicate REQUEST on %s: resetting", key)
            return [self.reset(key)]
        # RESPONSE (we never connect) or an unknown op
        log.warning("unexpected %s on %s: resetting", h.describe(), key)
        return [self.reset(key)]

    def _accept(self, h: VsockHdr, key: ConnKey) -> list[VsockEvent]:
        conn = VsockConnection(key, self.buf_alloc, self.listeners[h.dst_port])
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        self.connections[key] = conn
        self._control.append(self._packet(conn, VsockOp.RESPONSE))
        log.debug("accepted %s (peer buf_alloc %d)", key, h.buf_alloc)
        return [Connected(key)]

    def _data(self, conn: VsockConnection, payload: bytes) -> list[VsockEvent]:
        n = len(payload)
        if not n:
            return []
        if conn.peer_shutdown & ShutdownFlag.SEND:
            log.warning("%s: data after the peer's SHUTDOWN(SEND): resetting", conn.key)
            return [self.reset(conn.key)]
        held = (conn.rx_cnt - conn.fwd_cnt) + n
        if held > conn.buf_alloc:
            log.warning(
                "%s: the peer overran its credit (%d > %d bytes)", conn.key, held, conn.buf_alloc
            )
        conn.rx_cnt += n
        if conn.echo:
            conn.tx_pending += payload  # consumed (fwd_cnt) once it has gone back out
        else:
            conn.rx_data += payload
        return [DataReceived(conn.key, payload)]

    def _peer_shutdown(self, conn: VsockConnection, flags: ShutdownFlag) -> list[VsockEvent]:
        conn.peer_shutdown |= flags
        events: list[VsockEvent] = [PeerShutdown(conn.key, flags)]
        if conn.peer_shutdown == ShutdownFlag.BOTH:
            # as Linux does: the peer is gone for good, answer RST and close
            events.append(self.reset(conn.key))
        elif conn.echo and conn.peer_shutdown & ShutdownFlag.SEND:
            self.shutdown(conn.key, ShutdownFlag.BOTH)  # after the echo drained
        return events

    def _consumed(self, conn: VsockConnection, n: int) -> None:
        if not n:
            return
        conn.fwd_cnt += n
        unreported = conn.fwd_cnt - conn.last_fwd_cnt
        if unreported >= conn.buf_alloc // 2 or (not conn.rx_data and not conn.echo):
            self._control.append(self._packet(conn, VsockOp.CREDIT_UPDATE))
            conn.last_fwd_cnt = conn.fwd_cnt

    def _reset_unknown(self, h: VsockHdr) -> None:
        rst = VsockHdr(
            src_cid=self.cid,
            dst_cid=h.src_cid,
            src_port=h.dst_port,
            dst_port=h.src_port,
            len=0,
            type=h.type,
            op=VsockOp.RST,
        )
        self._control.append(VsockPacket(rst))
        self.resets_sent += 1
        log.debug("RST for %s", h.describe())

    def _packet(
        self, conn: VsockConnection, op: VsockOp, payload: bytes = b"", flags: int = 0
    ) -> VsockPacket:
        hdr = VsockHdr(
            src_cid=self.cid,
            dst_cid=conn.peer_cid,
            src_port=conn.local_port,
            dst_port=conn.peer_port,
            len=len(payload),
            type=VsockType.STREAM,
            op=op,
            flags=flags,
            buf_alloc=conn.buf_alloc,
            fwd_cnt=conn.fwd_cnt,
        )
        return VsockPacket(hdr, payload)

    # -- packets out ---------------------------------------------------------------------------

    def has_output(self) -> bool:
        """Whether :meth:`outgoing` would return something now."""
        if self._control:
            return True
        return any(
            (c.tx_pending and (c.peer_credit or not c.credit_requested))
            or (not c.tx_pending and c.shutdown_sent & ~c.shutdown_emitted)
            for c in self.connections.values()
        )

    def outgoing(self, limit: int) -> list[VsockPacket]:
        """Up to ``limit`` packets to transmit now: control packets first, then data as the
        peers' credit allows (an out-of-credit connection asks once with CREDIT_REQUEST)."""
        out: list[VsockPacket] = []
        while self._control and len(out) < limit:
            out.append(self._control.popleft())
        for conn in list(self.connections.values()):
            if len(out) >= limit:
                break
            self._flush_data(conn, out, limit)
        return out

    def _flush_data(self, conn: VsockConnection, out: list[VsockPacket], limit: int) -> None:
        while conn.tx_pending and len(out) < limit:
            n = min(len(conn.tx_pending), conn.peer_credit, self.max_payload)
            if n == 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    out.append(self._packet(conn, VsockOp.CREDIT_REQUEST))
                return
            chunk = bytes(conn.tx_pending[:n])
            del conn.tx_pending[:n]
            conn.tx_cnt += n
            if conn.echo:
                conn.fwd_cnt += n  # the echoed bytes leave our receive buffer now
            out.append(self._packet(conn, VsockOp.RW, chunk))
            conn.last_fwd_cnt = conn.fwd_cnt
        new = conn.shutdown_sent & ~conn.shutdown_emitted
        if not conn.tx_pending and new and len(out) < limit:
            conn.shutdown_emitted |= new
            out.append(self._packet(conn, VsockOp.SHUTDOWN, flags=int(conn.shutdown_emitted)))


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

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    raise SystemExit(main())
