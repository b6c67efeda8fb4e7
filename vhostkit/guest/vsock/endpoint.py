"""The guest's side of the virtio-vsock stream protocol, sans I/O: :class:`VsockEndpoint`.

It takes received packets (:meth:`VsockEndpoint.receive`) and hands out the packets to send
(:meth:`VsockEndpoint.outgoing`), never touching a ring or a socket. It listens on ports,
answers OP_REQUEST with OP_RESPONSE (advertising its ``buf_alloc``), takes OP_RW data, honours
the peer's credit (``peer buf_alloc - (tx_cnt - peer fwd_cnt)``), sends CREDIT_UPDATE when the
peer would otherwise run out of credit, answers CREDIT_REQUEST, handles SHUTDOWN and RST, and
answers packets for unknown connections with RST. In echo mode a listener's connections send
back every byte they receive; once the peer shut down its sending side and everything was
echoed, the endpoint shuts down too. What it reports comes back as :data:`VsockEvent` values.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest.vsock.wire import (
    U32_MAX,
    ShutdownFlag,
    VsockHdr,
    VsockOp,
    VsockPacket,
    VsockType,
)

__all__ = [
    "ConnKey",
    "Connected",
    "ConnectionClosed",
    "DataReceived",
    "PeerShutdown",
    "VsockConnection",
    "VsockEndpoint",
    "VsockEvent",
]

log = logging.getLogger(__name__)

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
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32_MAX))

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
        if buf_alloc <= 0 or buf_alloc > U32_MAX:
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
        if not 0 <= port <= U32_MAX:
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
