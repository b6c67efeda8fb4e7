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

Each request's handling is one small method of :class:`BackendReqServer`, registered for its
request number with the payload type the codec decodes it to (``@_route``); the server checks
the request against its :class:`~vhostkit.user.negotiation.Negotiation`, looks up the route and
calls it with the payload already typed.

Fds that arrive with a request are handed to the handler. If the handler method returns, they
are the handler's; if it raises, the server closes them (a handler must not keep an fd from a
call that fails).
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeAlias, TypeVar

from vhostkit._frames import without_frames
from vhostkit.errors import (
    Disconnected,
    IncorrectFds,
    InvalidOperation,
    InvalidParam,
    InvalidPayload,
    ProtocolError,
    Unsupported,
    VhostError,
)
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.codec import Channel, Message, close_fds
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    U64,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigPayload,
    DeviceStateParams,
    Empty,
    FrontendReq,
    InflightDesc,
    IotlbMsg,
    LogDesc,
    MemRegionMsg,
    MemTablePayload,
    MigrationPhase,
    Payload,
    ProtocolBitRule,
    ProtocolFeature,
    RawPayload,
    SharedObject,
    TransferDirection,
    VringAddrPayload,
    VringStatePayload,
)
from vhostkit.user.negotiation import Negotiation, ReplyKind, Role

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


_Fds = tuple[int, ...]
#: What a request's handling returns: the reply payload and the fds to send with it, or
#: ``None`` for a request that is only ever acknowledged (status 0, when an ack is owed).
_Answer = tuple[Payload, _Fds] | None
_P = TypeVar("_P", bound=Payload)
_Handling: TypeAlias = Callable[["BackendReqServer", _P, _Fds], _Answer]


@dataclass(frozen=True, slots=True)
class _Route(Generic[_P]):
    """How the server handles one request: its payload type, and the method that handles it."""

    payload: type[_P]
    handling: _Handling[_P]
    #: for requests whose reply is a status word: the word that reports a failure with this
    #: errno (instead of the usual empty reply)
    failure_status: Callable[[int], int] | None = None

    def __call__(self, server: BackendReqServer, msg: Message) -> _Answer:
        payload = msg.payload
        if not isinstance(payload, self.payload):  # the codec decodes with the same rules
            raise InvalidPayload(f"{msg.request.name} with a {type(payload).__name__} payload")
        return self.handling(server, payload, msg.fds)


#: Every front-end request, and how :class:`BackendReqServer` handles it (filled by @_route).
_ROUTES: dict[FrontendReq, _Route[Any]] = {}


def _route(
    request: FrontendReq,
    payload: type[_P],
    *,
    failure_status: Callable[[int], int] | None = None,
) -> Callable[[_Handling[_P]], _Handling[_P]]:
    """Make the decorated :class:`BackendReqServer` method the handling of ``request``."""

    def register(handling: _Handling[_P]) -> _Handling[_P]:
        assert request not in _ROUTES, f"{request.name} routed twice"
        _ROUTES[request] = _Route(payload, handling, failure_status)
        return handling

    return register


def _one_fd(request: FrontendReq, fds: _Fds) -> int:
    if len(fds) != 1:  # the codec already checked; a hand-built message may not be
        raise IncorrectFds(f"{request.name} takes one fd, got {len(fds)}")
    return fds[0]


def _optional_fd(fds: _Fds) -> int | None:
    return fds[0] if fds else None


def _vring_eventfd(request: FrontendReq, fds: _Fds) -> int | None:
    """The fd of SET_VRING_KICK/CALL/ERR, if any: it must be an eventfd.

    A ring worker polls and reads the kick and writes the call and err fds as eventfds; any
    other file (a pipe, a memfd, /dev/null) would fail there, in a worker, with an untyped
    ``OSError``. The request is refused instead, as kernel vhost refuses it (EINVAL).
    """
    fd = _optional_fd(fds)
    if fd is not None and not _is_eventfd(fd):
        raise InvalidParam(f"{request.name}: fd {fd} is not an eventfd")
    return fd


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return not os.path.isdir("/proc/self/fd")  # no /proc to ask: cannot tell, take it


def _vring_index(request: FrontendReq, value: U64) -> int:
    """The ring index of SET_VRING_KICK/CALL/ERR (bit 8, no fd, is the codec's business)."""
    if value.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{request.name}: reserved bits set in {value.value:#x}")
    return value.value & VRING_IDX_MASK


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, VhostError) and exc.errno:
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


class BackendReqServer:
    """Serves one front-end connection with a :class:`BackendHandler`.

    Call :meth:`handle_request` per message, or :meth:`serve` to loop until the front-end
    disconnects. Negotiated state lives in :attr:`negotiation` (a
    :class:`~vhostkit.user.negotiation.Negotiation`); :attr:`acked_features`,
    :attr:`acked_protocol_features` and :attr:`protocol_negotiated` read it.
    """

    def __init__(self, conn: Connection, handler: BackendHandler) -> None:
        if conn.channel is not Channel.MAIN:
            raise InvalidOperation("a back-end serves the main channel")
        self.conn = conn
        self.handler = handler
        #: what was offered and acked on this connection, and what that allows
        self.negotiation = Negotiation(Role.BACKEND)
        self.last_error: VhostError | None = None
        self.handled = 0
        self._stop = threading.Event()

    # -- negotiated state --

    @property
    def acked_features(self) -> int:
        return self.negotiation.acked_features

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        return self.negotiation.acked_protocol_features

    @property
    def protocol_negotiated(self) -> bool:
        return self.negotiation.protocol_negotiated

    def _check_allowed(self, msg: Message) -> None:
        if msg.rule.protocol_bit is ProtocolBitRule.OFFERED:
            # The back-end's offer is whatever its handler offers, asked when it matters.
            self.negotiation.features_offered(self.handler.get_features())
        self.negotiation.may_accept(msg.request)

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
        request = msg.request
        if not isinstance(request, FrontendReq):  # the main channel's parser decodes no other
            msg.close_fds()
            raise ProtocolError(f"back-end request {request.name} on the main channel")
        route = _ROUTES[request]
        owed = self.negotiation.reply_owed(request, need_reply=msg.need_reply)
        try:
            self._check_allowed(msg)
            answer = route(self, msg)
        except VhostError as exc:
            msg.close_fds()
            self.last_error = without_frames(exc)  # kept, without the frames
            log.warning("%s failed: %s", msg.request.name, exc)
            if route.failure_status is not None:
                self.conn.send(msg.reply(U64(route.failure_status(_errno_of(exc)))))
            elif owed is ReplyKind.PAYLOAD:
                self.conn.send(msg.reply(Empty()))
            elif owed is ReplyKind.ACK:
                self.conn.send(msg.reply(U64(_errno_of(exc))))
            return msg
        except BaseException:
            msg.close_fds()
            raise
        reply_payload, reply_fds = answer if answer is not None else (U64(0), ())
        try:
            if owed is ReplyKind.PAYLOAD:
                self.conn.send(msg.reply(reply_payload, reply_fds))
            elif owed is ReplyKind.ACK:
                self.conn.send(msg.reply(U64(0)))
        finally:
            # Sent fds were duplicated into the peer by the kernel; ours are closed.
            close_fds(reply_fds)
        if msg.request is _R.SET_PROTOCOL_FEATURES:
            self._check_consistent()
        return msg

    def _check_consistent(self) -> None:
        try:
            self.negotiation.check_consistent()
        except ProtocolError:
            self.conn.close()  # the spec: the only way to signal this is to close the connection
            raise

    # -- the handling of each request (see _route) --

    @_route(_R.GET_FEATURES, Empty)
    def _get_features(self, _: Empty, fds: _Fds) -> _Answer:
        offered = self.handler.get_features()
        self.negotiation.features_offered(offered)
        return U64(offered), ()

    @_route(_R.SET_FEATURES, U64)
    def _set_features(self, p: U64, fds: _Fds) -> None:
        self.handler.set_features(p.value)
        self.negotiation.features_acked(p.value)

    @_route(_R.SET_OWNER, Empty)
    def _set_owner(self, _: Empty, fds: _Fds) -> None:
        self.handler.set_owner()

    @_route(_R.RESET_OWNER, Empty)
    def _reset_owner(self, _: Empty, fds: _Fds) -> None:
        self.handler.reset_owner()

    @_route(_R.GET_PROTOCOL_FEATURES, Empty)
    def _get_protocol_features(self, _: Empty, fds: _Fds) -> _Answer:
        offered = self.handler.get_protocol_features()
        self.negotiation.protocol_features_offered(offered)
        return U64(offered), ()

    @_route(_R.SET_PROTOCOL_FEATURES, U64)
    def _set_protocol_features(self, p: U64, fds: _Fds) -> None:
        # The offer is what the handler offers now (a front-end may skip the GET).
        self.negotiation.protocol_features_offered(self.handler.get_protocol_features())
        self.negotiation.check_protocol_features_ack(p.value)
        self.handler.set_protocol_features(self.negotiation.protocol_features_acked(p.value))

    # memory and log

    @_route(_R.SET_MEM_TABLE, MemTablePayload)
    def _set_mem_table(self, p: MemTablePayload, fds: _Fds) -> None:
        self.handler.set_mem_table(p.regions)  # the codec put each region's fd in it

    @_route(_R.SET_LOG_BASE, LogDesc)
    def _set_log_base(self, p: LogDesc, fds: _Fds) -> None:
        self.handler.set_log_base(p, _one_fd(_R.SET_LOG_BASE, fds))

    @_route(_R.SET_LOG_FD, Empty)
    def _set_log_fd(self, _: Empty, fds: _Fds) -> None:
        self.handler.set_log_fd(_one_fd(_R.SET_LOG_FD, fds))

    @_route(_R.GET_MAX_MEM_SLOTS, Empty)
    def _get_max_mem_slots(self, _: Empty, fds: _Fds) -> _Answer:
        return U64(self.handler.get_max_mem_slots()), ()

    @_route(_R.ADD_MEM_REG, MemRegionMsg)
    def _add_mem_reg(self, p: MemRegionMsg, fds: _Fds) -> None:
        self.handler.add_mem_region(replace(p.region, fd=_one_fd(_R.ADD_MEM_REG, fds)))

    @_route(_R.REM_MEM_REG, MemRegionMsg)
    def _rem_mem_reg(self, p: MemRegionMsg, fds: _Fds) -> None:
        self.handler.remove_mem_region(p.region)

    # rings

    @_route(_R.SET_VRING_NUM, VringStatePayload)
    def _set_vring_num(self, p: VringStatePayload, fds: _Fds) -> None:
        self.handler.set_vring_num(p.index, p.num)

    @_route(_R.SET_VRING_ADDR, VringAddrPayload)
    def _set_vring_addr(self, p: VringAddrPayload, fds: _Fds) -> None:
        self.handler.set_vring_addr(p.addr)

    @_route(_R.SET_VRING_BASE, VringStatePayload)
    def _set_vring_base(self, p: VringStatePayload, fds: _Fds) -> None:
        self.handler.set_vring_base(p.index, p.num)

    @_route(_R.GET_VRING_BASE, VringStatePayload)
    def _get_vring_base(self, p: VringStatePayload, fds: _Fds) -> _Answer:
        return VringStatePayload(p.index, self.handler.get_vring_base(p.index)), ()

    @_route(_R.SET_VRING_KICK, U64)
    def _set_vring_kick(self, p: U64, fds: _Fds) -> None:
        index = _vring_index(_R.SET_VRING_KICK, p)
        self.handler.set_vring_kick(index, _vring_eventfd(_R.SET_VRING_KICK, fds))

    @_route(_R.SET_VRING_CALL, U64)
    def _set_vring_call(self, p: U64, fds: _Fds) -> None:
        index = _vring_index(_R.SET_VRING_CALL, p)
        self.handler.set_vring_call(index, _vring_eventfd(_R.SET_VRING_CALL, fds))

    @_route(_R.SET_VRING_ERR, U64)
    def _set_vring_err(self, p: U64, fds: _Fds) -> None:
        index = _vring_index(_R.SET_VRING_ERR, p)
        self.handler.set_vring_err(index, _vring_eventfd(_R.SET_VRING_ERR, fds))

    @_route(_R.SET_VRING_ENABLE, VringStatePayload)
    def _set_vring_enable(self, p: VringStatePayload, fds: _Fds) -> None:
        if p.num > 1:
            raise ProtocolError(f"SET_VRING_ENABLE with num={p.num}")
        self.handler.set_vring_enable(p.index, bool(p.num))

    @_route(_R.SET_VRING_ENDIAN, VringStatePayload)
    def _set_vring_endian(self, p: VringStatePayload, fds: _Fds) -> None:
        self.handler.set_vring_endian(p.index, bool(p.num))

    @_route(_R.VRING_KICK, VringStatePayload)
    def _vring_kick(self, p: VringStatePayload, fds: _Fds) -> None:
        self.handler.vring_kick(p.index)

    @_route(_R.GET_QUEUE_NUM, Empty)
    def _get_queue_num(self, _: Empty, fds: _Fds) -> _Answer:
        return U64(self.handler.get_queue_num()), ()

    # device

    @_route(_R.GET_CONFIG, ConfigPayload)
    def _get_config(self, p: ConfigPayload, fds: _Fds) -> _Answer:
        data = self.handler.get_config(p.offset, p.size, p.flags)
        if len(data) != p.size:
            raise InvalidOperation(f"GET_CONFIG: handler returned {len(data)} bytes for {p.size}")
        return ConfigPayload(p.offset, p.flags, bytes(data)), ()

    @_route(_R.SET_CONFIG, ConfigPayload)
    def _set_config(self, p: ConfigPayload, fds: _Fds) -> None:
        self.handler.set_config(p.offset, p.data, p.flags)

    @_route(_R.SET_STATUS, U64)
    def _set_status(self, p: U64, fds: _Fds) -> None:
        self.handler.set_status(p.value)

    @_route(_R.GET_STATUS, Empty)
    def _get_status(self, _: Empty, fds: _Fds) -> _Answer:
        return U64(self.handler.get_status()), ()

    @_route(_R.RESET_DEVICE, Empty)
    def _reset_device(self, _: Empty, fds: _Fds) -> None:
        self.handler.reset_device()

    @_route(_R.SEND_RARP, U64)
    def _send_rarp(self, p: U64, fds: _Fds) -> None:
        self.handler.send_rarp(p.value.to_bytes(8, "little")[:6])

    @_route(_R.NET_SET_MTU, U64)
    def _net_set_mtu(self, p: U64, fds: _Fds) -> None:
        self.handler.net_set_mtu(p.value)

    @_route(_R.IOTLB_MSG, IotlbMsg)
    def _iotlb_msg(self, p: IotlbMsg, fds: _Fds) -> None:
        self.handler.iotlb_msg(p)

    @_route(_R.SET_BACKEND_REQ_FD, Empty)
    def _set_backend_req_fd(self, _: Empty, fds: _Fds) -> None:
        fd = _one_fd(_R.SET_BACKEND_REQ_FD, fds)
        self.handler.set_backend_req_fd(Connection.from_fd(fd, Channel.BACKEND))

    @_route(_R.GET_INFLIGHT_FD, InflightDesc)
    def _get_inflight_fd(self, p: InflightDesc, fds: _Fds) -> _Answer:
        area = self.handler.get_inflight_fd(p.num_queues, p.queue_size)
        return InflightDesc(area.mmap_size, area.mmap_offset, p.num_queues, p.queue_size), (
            area.fd,
        )

    @_route(_R.SET_INFLIGHT_FD, InflightDesc)
    def _set_inflight_fd(self, p: InflightDesc, fds: _Fds) -> None:
        self.handler.set_inflight_fd(p, _one_fd(_R.SET_INFLIGHT_FD, fds))

    @_route(_R.GPU_SET_SOCKET, Empty)
    def _gpu_set_socket(self, _: Empty, fds: _Fds) -> None:
        self.handler.gpu_set_socket(_one_fd(_R.GPU_SET_SOCKET, fds))

    @_route(_R.CREATE_CRYPTO_SESSION, RawPayload)
    def _create_crypto_session(self, p: RawPayload, fds: _Fds) -> _Answer:
        return RawPayload(self.handler.create_crypto_session(p.data)), ()

    @_route(_R.CLOSE_CRYPTO_SESSION, U64)
    def _close_crypto_session(self, p: U64, fds: _Fds) -> None:
        self.handler.close_crypto_session(p.value)

    @_route(_R.POSTCOPY_ADVISE, Empty)
    def _postcopy_advise(self, _: Empty, fds: _Fds) -> _Answer:
        return Empty(), (self.handler.postcopy_advise(),)

    @_route(_R.POSTCOPY_LISTEN, Empty)
    def _postcopy_listen(self, _: Empty, fds: _Fds) -> None:
        self.handler.postcopy_listen()

    @_route(_R.POSTCOPY_END, Empty)
    def _postcopy_end(self, _: Empty, fds: _Fds) -> None:
        self.handler.postcopy_end()

    @_route(_R.GET_SHARED_OBJECT, SharedObject, failure_status=lambda err: err)
    def _get_shared_object(self, p: SharedObject, fds: _Fds) -> _Answer:
        got = self.handler.get_shared_object(p.uuid)
        return (U64(0), (got,)) if got is not None else (U64(1), ())

    @_route(
        _R.SET_DEVICE_STATE_FD,
        DeviceStateParams,
        failure_status=lambda err: (err & 0xFF or 1) | VRING_NOFD_MASK,
    )
    def _set_device_state_fd(self, p: DeviceStateParams, fds: _Fds) -> _Answer:
        fd = _one_fd(_R.SET_DEVICE_STATE_FD, fds)
        theirs = self.handler.set_device_state_fd(p.direction, p.phase, fd)
        if theirs is None:
            return U64(VRING_NOFD_MASK), ()
        return U64(0), (theirs,)

    @_route(_R.CHECK_DEVICE_STATE, Empty, failure_status=lambda err: err)
    def _check_device_state(self, _: Empty, fds: _Fds) -> _Answer:
        self.handler.check_device_state()
        return U64(0), ()


assert set(_ROUTES) == set(FrontendReq), set(FrontendReq) - set(_ROUTES)
