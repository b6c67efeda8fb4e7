"""The vhost-user back-end: receive front-end requests, validate, dispatch, reply.

Two pieces:

* :class:`BackendHandler`: the device's side, one method per front-end request. Every method
  has a default that raises :class:`Unsupported`, so a device implements only what it offers.
  :class:`vhostkit.user.backend.device.BackendDevice` is a complete implementation of the generic
  parts a real device builds on.
* :class:`BackendReqServer`: the protocol engine for one connection. It receives a message,
  checks it against the negotiated state (a request whose protocol feature was not negotiated
  fails), calls the handler and sends the reply the spec asks for:

  - requests that always reply get their reply payload; when the handler fails, the reply is
    sent with an empty payload (the convention libvhost-user and QEMU use for "failed");
  - other requests carrying ``NEED_REPLY`` (``REPLY_ACK`` negotiated) get a u64 status: 0, or
    the errno of the failure;
  - without ``NEED_REPLY`` a failure cannot be reported on the wire: it is logged, and the
    error is kept in :attr:`BackendReqServer.last_error`.

Fds that arrive with a request are handed to the handler. If the handler method returns, they
are the handler's; if it raises, the server closes them (a handler must not keep an fd from a
call that fails).
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace

from vhostkit._frames import without_frames
from vhostkit.errors import (
    Disconnected,
    FeatureNotNegotiated,
    InvalidOperation,
    ProtocolError,
    Unsupported,
    VhostError,
)
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.codec import Channel, Message, close_fds
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigPayload,
    DeviceStateParams,
    Empty,
    FrontendReq,
    InflightDesc,
    IotlbMsg,
    LogDesc,
    MemoryTable,
    MemRegionMsg,
    MigrationPhase,
    Payload,
    ProtocolFeature,
    RawPayload,
    ReplyRule,
    SharedObject,
    TransferDirection,
    VringAddrPayload,
    VringStatePayload,
)

__all__ = ["BackendHandler", "BackendReqServer", "InflightArea"]

log = logging.getLogger(__name__)

_R = FrontendReq


class InflightArea:
    """What a handler returns for GET_INFLIGHT_FD: an fd (handed over) and the area in it."""

    __slots__ = ("fd", "mmap_offset", "mmap_size")

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        self.fd = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset


class BackendHandler:
    """The device side of vhost-user: override what the device supports.

    Methods that receive fds own them once they return (see the module docs). Raising a
    :class:`VhostError` reports failure to the front-end with that error's errno.
    """

    # -- session and features --

    def set_owner(self) -> None:
        raise Unsupported("SET_OWNER")

    def reset_owner(self) -> None:
        raise Unsupported("RESET_OWNER")

    def get_features(self) -> int:
        raise Unsupported("GET_FEATURES")

    def set_features(self, features: int) -> None:
        raise Unsupported("SET_FEATURES")

    def get_protocol_features(self) -> int:
        return 0

    def set_protocol_features(self, features: ProtocolFeature) -> None:
        """Called after the server has recorded the acked protocol features."""

    # -- memory and log --

    def set_mem_table(self, regions: tuple[MemoryRegion, ...]) -> None:
        raise Unsupported("SET_MEM_TABLE")

    def set_log_base(self, log: LogDesc, fd: int) -> None:
        raise Unsupported("SET_LOG_BASE")

    def set_log_fd(self, fd: int) -> None:
        raise Unsupported("SET_LOG_FD")

    def get_max_mem_slots(self) -> int:
        raise Unsupported("GET_MAX_MEM_SLOTS")

    def add_mem_region(self, region: MemoryRegion) -> None:
        raise Unsupported("ADD_MEM_REG")

    def remove_mem_region(self, region: MemoryRegion) -> None:
        raise Unsupported("REM_MEM_REG")

    # -- rings --

    def set_vring_num(self, index: int, num: int) -> None:
        raise Unsupported("SET_VRING_NUM")

    def set_vring_addr(self, addr: VringAddr) -> None:
        raise Unsupported("SET_VRING_ADDR")

    def set_vring_base(self, index: int, base: int) -> None:
        raise Unsupported("SET_VRING_BASE")

    def get_vring_base(self, index: int) -> int:
        raise Unsupported("GET_VRING_BASE")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_CALL")

    def set_vring_err(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_ERR")

    def set_vring_enable(self, index: int, enable: bool) -> None:
        raise Unsupported("SET_VRING_ENABLE")

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        raise Unsupported("SET_VRING_ENDIAN")

    def vring_kick(self, index: int) -> None:
        raise Unsupported("VRING_KICK")

    def get_queue_num(self) -> int:
        raise Unsupported("GET_QUEUE_NUM")

    # -- device --

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        raise Unsupported("GET_CONFIG")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise Unsupported("SET_CONFIG")

    def set_status(self, status: int) -> None:
        raise Unsupported("SET_STATUS")

    def get_status(self) -> int:
        raise Unsupported("GET_STATUS")

    def reset_device(self) -> None:
        raise Unsupported("RESET_DEVICE")

    def send_rarp(self, mac: bytes) -> None:
        raise Unsupported("SEND_RARP")

    def net_set_mtu(self, mtu: int) -> None:
        raise Unsupported("NET_SET_MTU")

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        raise Unsupported("IOTLB_MSG")

    def set_backend_req_fd(self, conn: Connection) -> None:
        """The back-end request channel (already wrapped); the handler owns it."""
        raise Unsupported("SET_BACKEND_REQ_FD")

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        raise Unsupported("GET_INFLIGHT_FD")

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        raise Unsupported("SET_INFLIGHT_FD")

    def gpu_set_socket(self, fd: int) -> None:
        raise Unsupported("GPU_SET_SOCKET")

    def create_crypto_session(self, data: bytes) -> bytes:
        raise Unsupported("CREATE_CRYPTO_SESSION")

    def close_crypto_session(self, session_id: int) -> None:
        raise Unsupported("CLOSE_CRYPTO_SESSION")

    def postcopy_advise(self) -> int:
        raise Unsupported("POSTCOPY_ADVISE")

    def postcopy_listen(self) -> None:
        raise Unsupported("POSTCOPY_LISTEN")

    def postcopy_end(self) -> None:
        raise Unsupported("POSTCOPY_END")

    def get_shared_object(self, object_id: uuid.UUID) -> int | None:
        raise Unsupported("GET_SHARED_OBJECT")

    def set_device_state_fd(
        self, direction: TransferDirection, phase: MigrationPhase, fd: int
    ) -> int | None:
        raise Unsupported("SET_DEVICE_STATE_FD")

    def check_device_state(self) -> None:
        raise Unsupported("CHECK_DEVICE_STATE")

    # -- connection lifetime --

    def disconnected(self) -> None:
        """The front-end went away; release per-connection resources."""


#: Requests whose reply is a status word: a failure is that word, not an empty reply.
_STATUS_REPLIES: dict[FrontendReq, Callable[[int], int]] = {
    _R.CHECK_DEVICE_STATE: lambda err: err,
    _R.SET_DEVICE_STATE_FD: lambda err: (err & 0xFF or 1) | VRING_NOFD_MASK,
    _R.GET_SHARED_OBJECT: lambda err: err,
}


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, VhostError) and exc.errno:
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


class BackendReqServer:
    """Serves one front-end connection with a :class:`BackendHandler`.

    Call :meth:`handle_request` per message, or :meth:`serve` to loop until the front-end
    disconnects. Negotiated state lives here: :attr:`acked_features`,
    :attr:`acked_protocol_features`.
    """

    def __init__(self, conn: Connection, handler: BackendHandler) -> None:
        if conn.channel is not Channel.MAIN:
            raise InvalidOperation("a back-end serves the main channel")
        self.conn = conn
        self.handler = handler
        self.acked_features = 0
        self.acked_protocol_features = ProtocolFeature(0)
        self.protocol_negotiated = False
        self.last_error: VhostError | None = None
        self.handled = 0
        self._stop = threading.Event()

    # -- gating --

    def _offered_features(self) -> int:
        return self.handler.get_features()

    def _check_allowed(self, msg: Message) -> None:
        rule = msg.rule
        if rule.feature is not None and not (
            self.protocol_negotiated and self.acked_protocol_features & rule.feature
        ):
            raise FeatureNotNegotiated(
                f"{msg.request.name} needs protocol feature {rule.feature.name}, not negotiated"
            )
        if rule.needs_protocol_features:
            if msg.request is _R.SET_VRING_ENABLE:
                ok = self.protocol_negotiated or bool(
                    self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES
                )
            else:
                ok = bool(self._offered_features() & VHOST_USER_F_PROTOCOL_FEATURES)
            if not ok:
                raise FeatureNotNegotiated(
                    f"{msg.request.name} needs VHOST_USER_F_PROTOCOL_FEATURES"
                )

    # -- serving --

    def serve(self) -> None:
        """Handle requests until the front-end disconnects or :meth:`stop` is called.

        A protocol violation closes the connection and is raised; a clean disconnect returns.
        """
        try:
            while not self._stop.is_set():
                try:
                    self.handle_request()
                except Disconnected:
                    log.info("front-end disconnected")
                    return
        except ProtocolError as exc:
            self.last_error = exc  # recorded before the connection closes
            raise
        finally:
            self.close()

    def stop(self) -> None:
        """Make :meth:`serve` return (from another thread)."""
        self._stop.set()
        self.conn.close()

    def close(self) -> None:
        try:
            self.handler.disconnected()
        finally:
            self.conn.close()

    def handle_request(self, timeout: float | None = None) -> Message:
        """Receive, validate, dispatch and answer one request; return it (fds consumed)."""
        msg = self.conn.recv(timeout=timeout)
        if msg.is_reply:
            msg.close_fds()
            raise ProtocolError(f"front-end sent a reply ({msg.request.name}) as a request")
        self.handled += 1
        rule = msg.rule
        try:
            self._check_allowed(msg)
            reply_payload, reply_fds = self._dispatch(msg)
        except VhostError as exc:
            msg.close_fds()
            self.last_error = without_frames(exc)  # kept, without the frames
            log.warning("%s failed: %s", msg.request.name, exc)
            if r := _STATUS_REPLIES.get(msg.request):
                self.conn.send(msg.reply(U64(r(_errno_of(exc)))))
            elif rule.reply is ReplyRule.ALWAYS:
                self.conn.send(msg.reply(Empty()))
            elif msg.need_reply or (rule.reply is ReplyRule.LOG_SHMFD):
                self.conn.send(msg.reply(U64(_errno_of(exc))))
            return msg
        except BaseException:
            msg.close_fds()
            raise
        try:
            if rule.reply is ReplyRule.ALWAYS:
                assert reply_payload is not None
                self.conn.send(msg.reply(reply_payload, reply_fds))
            elif msg.need_reply or rule.reply is ReplyRule.LOG_SHMFD:
                self.conn.send(msg.reply(U64(0)))
        finally:
            # Sent fds were duplicated into the peer by the kernel; ours are closed.
            close_fds(reply_fds)
        if msg.request is _R.SET_PROTOCOL_FEATURES:
            self._check_inband()
        return msg

    def _check_inband(self) -> None:
        need = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
        if (
            self.acked_protocol_features & ProtocolFeature.INBAND_NOTIFICATIONS
            and self.acked_protocol_features & need != need
        ):
            # The spec: the only way to signal this is to close the connection.
            self.conn.close()
            raise ProtocolError("INBAND_NOTIFICATIONS negotiated without BACKEND_REQ and REPLY_ACK")

    def _dispatch(self, msg: Message) -> tuple[Payload | None, tuple[int, ...]]:
        h = self.handler
        p = msg.payload
        fd = msg.fds[0] if msg.fds else None
        r = msg.request
        match r:
            case _R.GET_FEATURES:
                return U64(h.get_features()), ()
            case _R.SET_FEATURES:
                assert isinstance(p, U64)
                h.set_features(p.value)
                self.acked_features = p.value
            case _R.SET_OWNER:
                h.set_owner()
            case _R.RESET_OWNER:
                h.reset_owner()
            case _R.SET_MEM_TABLE:
                assert isinstance(p, MemoryTable)
                h.set_mem_table(p.regions)
            case _R.SET_LOG_BASE:
                assert isinstance(p, LogDesc) and fd is not None
                h.set_log_base(p, fd)
            case _R.SET_LOG_FD:
                assert fd is not None
                h.set_log_fd(fd)
            case _R.SET_VRING_NUM:
                assert isinstance(p, VringStatePayload)
                h.set_vring_num(p.index, p.num)
            case _R.SET_VRING_ADDR:
                assert isinstance(p, VringAddrPayload)
                h.set_vring_addr(p.addr)
            case _R.SET_VRING_BASE:
                assert isinstance(p, VringStatePayload)
                h.set_vring_base(p.index, p.num)
            case _R.GET_VRING_BASE:
                assert isinstance(p, VringStatePayload)
                return VringStatePayload(p.index, h.get_vring_base(p.index)), ()
            case _R.SET_VRING_KICK | _R.SET_VRING_CALL | _R.SET_VRING_ERR:
                assert isinstance(p, U64)
                if p.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
                    raise ProtocolError(f"{r.name}: reserved bits set in {p.value:#x}")
                index = p.value & VRING_IDX_MASK
                setter = {
                    _R.SET_VRING_KICK: h.set_vring_kick,
                    _R.SET_VRING_CALL: h.set_vring_call,
                    _R.SET_VRING_ERR: h.set_vring_err,
                }[r]
                setter(index, fd)
            case _R.GET_PROTOCOL_FEATURES:
                return U64(h.get_protocol_features()), ()
            case _R.SET_PROTOCOL_FEATURES:
                assert isinstance(p, U64)
                offered = h.get_protocol_features()
                if p.value & ~offered:
                    raise FeatureNotNegotiated(
                        f"protocol features {p.value & ~offered:#x} were not offered"
                    )
                self.acked_protocol_features = ProtocolFeature(p.value)
                self.protocol_negotiated = True
                h.set_protocol_features(self.acked_protocol_features)
            case _R.GET_QUEUE_NUM:
                return U64(h.get_queue_num()), ()
            case _R.SET_VRING_ENABLE:
                assert isinstance(p, VringStatePayload)
                if p.num > 1:
                    raise ProtocolError(f"SET_VRING_ENABLE with num={p.num}")
                h.set_vring_enable(p.index, bool(p.num))
            case _R.SEND_RARP:
                assert isinstance(p, U64)
                h.send_rarp(p.value.to_bytes(8, "little")[:6])
            case _R.NET_SET_MTU:
                assert isinstance(p, U64)
                h.net_set_mtu(p.value)
            case _R.SET_BACKEND_REQ_FD:
                assert fd is not None
                h.set_backend_req_fd(Connection.from_fd(fd, Channel.BACKEND))
            case _R.IOTLB_MSG:
                assert isinstance(p, IotlbMsg)
                h.iotlb_msg(p)
            case _R.SET_VRING_ENDIAN:
                assert isinstance(p, VringStatePayload)
                h.set_vring_endian(p.index, bool(p.num))
            case _R.GET_CONFIG:
                assert isinstance(p, ConfigPayload)
                data = h.get_config(p.offset, p.size, p.flags)
                if len(data) != p.size:
                    raise InvalidOperation(
                        f"GET_CONFIG: handler returned {len(data)} bytes for {p.size}"
                    )
                return ConfigPayload(p.offset, p.flags, bytes(data)), ()
            case _R.SET_CONFIG:
                assert isinstance(p, ConfigPayload)
                h.set_config(p.offset, p.data, p.flags)
            case _R.CREATE_CRYPTO_SESSION:
                assert isinstance(p, RawPayload)
                return RawPayload(h.create_crypto_session(p.data)), ()
            case _R.CLOSE_CRYPTO_SESSION:
                assert isinstance(p, U64)
                h.close_crypto_session(p.value)
            case _R.POSTCOPY_ADVISE:
                return Empty(), (h.postcopy_advise(),)
            case _R.POSTCOPY_LISTEN:
                h.postcopy_listen()
            case _R.POSTCOPY_END:
                h.postcopy_end()
            case _R.GET_INFLIGHT_FD:
                assert isinstance(p, InflightDesc)
                area = h.get_inflight_fd(p.num_queues, p.queue_size)
                desc = InflightDesc(area.mmap_size, area.mmap_offset, p.num_queues, p.queue_size)
                return desc, (area.fd,)
            case _R.SET_INFLIGHT_FD:
                assert isinstance(p, InflightDesc) and fd is not None
                h.set_inflight_fd(p, fd)
            case _R.GPU_SET_SOCKET:
                assert fd is not None
                h.gpu_set_socket(fd)
            case _R.RESET_DEVICE:
                h.reset_device()
            case _R.VRING_KICK:
                assert isinstance(p, VringStatePayload)
                h.vring_kick(p.index)
            case _R.GET_MAX_MEM_SLOTS:
                return U64(h.get_max_mem_slots()), ()
            case _R.ADD_MEM_REG:
                assert isinstance(p, MemRegionMsg) and fd is not None
                h.add_mem_region(replace(p.region, fd=fd))
            case _R.REM_MEM_REG:
                assert isinstance(p, MemRegionMsg)
                h.remove_mem_region(p.region)
            case _R.SET_STATUS:
                assert isinstance(p, U64)
                h.set_status(p.value)
            case _R.GET_STATUS:
                return U64(h.get_status()), ()
            case _R.GET_SHARED_OBJECT:
                assert isinstance(p, SharedObject)
                got = h.get_shared_object(p.uuid)
                return (U64(0), (got,)) if got is not None else (U64(1), ())
            case _R.SET_DEVICE_STATE_FD:
                assert isinstance(p, DeviceStateParams) and fd is not None
                theirs = h.set_device_state_fd(p.direction, p.phase, fd)
                if theirs is None:
                    return U64(VRING_NOFD_MASK), ()
                return U64(0), (theirs,)
            case _R.CHECK_DEVICE_STATE:
                h.check_device_state()
                return U64(0), ()
        return None, ()
