"""The vhost-user front-end: the VMM side of the protocol ("master" in older texts).

:class:`Frontend` implements :class:`vhostkit.backend.VhostBackend` over a vhost-user socket,
plus every vhost-user-only request. It

* checks locally that a request's protocol feature was negotiated before sending it
  (:class:`FeatureNotNegotiated`), so a misuse never reaches the peer;
* sets ``NEED_REPLY`` on requests that do not otherwise reply once ``REPLY_ACK`` is negotiated,
  and turns a non-zero ack into :class:`RequestFailed`;
* (both of the above are answered by its :attr:`Frontend.negotiation`, a
  :class:`~vhostkit.user.negotiation.Negotiation` that records what was offered and acked);
* checks that every reply answers the request that was sent (:class:`UnexpectedReply`);
* serialises each request/reply exchange under a lock, so it is safe to call from several
  threads.

File descriptors passed in are borrowed (sent, never closed); fds received in replies are
handed to the caller, who owns them.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from vhostkit.backend import VhostBackend
from vhostkit.errors import (
    FeatureNotNegotiated,
    IncorrectFds,
    InvalidOperation,
    InvalidParam,
    RequestFailed,
    SocketRetry,
    UnexpectedReply,
)
from vhostkit.types import LogRegion, MemoryRegion, VringAddr
from vhostkit.user.codec import Channel, Message
from vhostkit.user.connection import Connection, Listener, connect
from vhostkit.user.message import (
    MAX_MEM_REGIONS,
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
    LogBaseReply,
    LogDesc,
    MemRegionMsg,
    MemTablePayload,
    MigrationPhase,
    Payload,
    ProtocolFeature,
    RawPayload,
    SharedObject,
    TransferDirection,
    VringAddrPayload,
    VringStatePayload,
    classify_log_base_reply,
)
from vhostkit.user.negotiation import Negotiation, ReplyKind, Role
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.features import VirtioFeature

__all__ = ["Frontend", "InflightRegion"]

log = logging.getLogger(__name__)

_R = FrontendReq


@dataclass(frozen=True, slots=True)
class InflightRegion:
    """The inflight tracking area a back-end returned: a shared fd and where the area lies in it.

    The caller owns ``fd``.
    """

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class Frontend(VhostBackend):
    """A vhost-user front-end on one connection.

    Make one with :meth:`connect` (the back-end listens), :meth:`accept` (the front-end
    listens), or from an existing :class:`Connection`.
    """

    def __init__(self, conn: Connection, *, reply_timeout: float | None = 30.0) -> None:
        self.conn = conn
        self.reply_timeout = reply_timeout
        self._lock = threading.RLock()
        #: what was offered and acked on this connection, and what that allows
        self.negotiation = Negotiation(Role.FRONTEND)
        #: the form of the last SET_LOG_BASE reply (peers differ; ``None``: none yet)
        self.log_base_reply: LogBaseReply | None = None
        self._closed = False

    # -- construction --

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 0.0) -> Frontend:
        """Connect to a back-end listening at ``path``; retry for ``timeout`` seconds."""
        return cls(connect(path, timeout=timeout))

    @classmethod
    def accept(cls, path: str | os.PathLike[str], *, timeout: float | None = None) -> Frontend:
        """Listen at ``path`` and wait for one back-end to connect (the socket is removed)."""
        with Listener(path) as listener:
            return cls(listener.accept(timeout))

    # -- negotiated state --

    @property
    def acked_features(self) -> int:
        return self.negotiation.acked_features

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        return self.negotiation.acked_protocol_features

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return self.negotiation.has(feature)

    # -- the exchange --

    def _request(
        self,
        request: FrontendReq,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
    ) -> Message | None:
        """Send a request; return the reply if one is expected (its fds are the caller's)."""
        if self._closed:
            raise InvalidOperation("the front-end is closed")
        exchange = self.negotiation.may_send(request)
        payload = Empty() if payload is None else payload
        msg = Message(request, payload, tuple(fds), exchange.flags)
        with self._lock:
            self.conn.send(msg)
            if exchange.reply is ReplyKind.NONE:
                return None
            reply = self.conn.recv(timeout=self.reply_timeout)
        if not reply.is_reply or reply.request != request:
            reply.close_fds()
            raise UnexpectedReply(
                f"sent {request.name}, got {reply.request.name}"
                f"{' reply' if reply.is_reply else ' request'}"
            )
        if exchange.reply is ReplyKind.SYNC:
            return reply  # its form is the caller's to judge (SET_LOG_BASE)
        if exchange.reply is ReplyKind.ACK:
            reply.close_fds()
            status = reply.payload.value if isinstance(reply.payload, U64) else None
            if status is None:
                raise UnexpectedReply(f"{request.name}: ack without a u64 payload")
            if status != 0:
                raise RequestFailed(
                    f"back-end failed {request.name} (status {status:#x})",
                    status=status,
                    errno=status if 0 < status < 4096 else None,
                )
            return None
        if isinstance(reply.payload, Empty) and msg.rule.reply_payload is not Empty:
            reply.close_fds()
            raise RequestFailed(f"back-end failed {request.name} (empty reply)", status=-1)
        return reply

    def _get_u64(self, request: FrontendReq) -> int:
        reply = self._request(request)
        assert reply is not None and isinstance(reply.payload, U64)
        reply.close_fds()
        return reply.payload.value

    def _u64(self, request: FrontendReq, value: int) -> None:
        self._request(request, U64(value))

    # -- VhostBackend --

    def set_owner(self) -> None:
        self._request(_R.SET_OWNER)

    def reset_owner(self) -> None:
        self._request(_R.RESET_OWNER)

    def get_features(self) -> int:
        offered = self._get_u64(_R.GET_FEATURES)
        self.negotiation.features_offered(offered)
        return offered

    def set_features(self, features: int) -> None:
        self.negotiation.check_features_ack(features)
        self._u64(_R.SET_FEATURES, features)
        self.negotiation.features_acked(features)

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        if len(regions) > MAX_MEM_REGIONS:
            raise InvalidParam(f"{len(regions)} regions, vhost-user takes {MAX_MEM_REGIONS}")
        fds = _region_fds(regions)
        self._request(_R.SET_MEM_TABLE, MemTablePayload(tuple(regions)), fds)

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """Hand the back-end the dirty log file (needs LOG_SHMFD; ``base`` is not used).

        The reply is accepted in each form real back-ends send (empty from DPDK, the size
        echoed by libvhost-user, a zero status from vhostkit and rust-vmm); a non-zero status
        raises :class:`RequestFailed`. :attr:`log_base_reply` records the form seen.
        """
        if region is None:
            raise InvalidParam("vhost-user shares the dirty log through a file: give a LogRegion")
        reply = self._request(_R.SET_LOG_BASE, LogDesc(region.size, region.offset), [region.fd])
        assert reply is not None
        reply.close_fds()
        form = classify_log_base_reply(reply.payload, region.size)
        if form is LogBaseReply.FAILED:
            status = reply.payload.value if isinstance(reply.payload, U64) else -1
            raise RequestFailed(
                f"back-end failed SET_LOG_BASE (status {status:#x})",
                status=status,
                errno=status if 0 < status < 4096 else None,
            )
        self.log_base_reply = form
        log.debug("SET_LOG_BASE of %d bytes: reply %s", region.size, form.value)

    # -- dirty logging (VhostBackend) --

    def check_dirty_log(self) -> None:
        """Raise :class:`FeatureNotNegotiated` unless the back-end offers VHOST_F_LOG_ALL and
        LOG_SHMFD was negotiated (nothing is sent but GET_FEATURES when the offer is not
        known yet)."""
        offered = self.negotiation.offered_features
        if offered is None:
            offered = self.get_features()
        if not offered & VirtioFeature.LOG_ALL:
            raise FeatureNotNegotiated(
                f"the back-end does not offer VHOST_F_LOG_ALL (features {offered:#x})"
            )
        if not self.has_protocol_feature(ProtocolFeature.LOG_SHMFD):
            offer = self.negotiation.offered_protocol_features
            why = (
                "the back-end does not offer it"
                if offer is not None and not offer & ProtocolFeature.LOG_SHMFD
                else "it was not acked (ask for it when negotiating)"
            )
            raise FeatureNotNegotiated(f"dirty logging needs protocol feature LOG_SHMFD: {why}")

    def set_dirty_log(self, log: DirtyLog) -> None:
        self.set_log_base(0, LogRegion(log.fd, log.size, 0))

    def set_log_fd(self, fd: int) -> None:
        self._request(_R.SET_LOG_FD, None, [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        self._request(_R.SET_VRING_NUM, VringStatePayload(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._request(_R.SET_VRING_ADDR, VringAddrPayload(addr))

    def set_vring_base(self, index: int, base: int) -> None:
        self._request(_R.SET_VRING_BASE, VringStatePayload(index, base))

    def get_vring_base(self, index: int) -> int:
        reply = self._request(_R.GET_VRING_BASE, VringStatePayload(index, 0))
        assert reply is not None and isinstance(reply.payload, VringStatePayload)
        reply.close_fds()
        if reply.payload.index != index:
            raise UnexpectedReply(
                f"GET_VRING_BASE for ring {index} answered for ring {reply.payload.index}"
            )
        return reply.payload.num

    def _vring_fd(self, request: FrontendReq, index: int, fd: int | None) -> None:
        if not 0 <= index <= VRING_IDX_MASK:
            raise InvalidParam(f"ring index {index} does not fit in 8 bits")
        value = index if fd is not None else index | VRING_NOFD_MASK
        self._request(request, U64(value), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(_R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(_R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(_R.SET_VRING_ERR, index, fd)

    # -- protocol features --

    def get_protocol_features(self) -> ProtocolFeature:
        value = self._get_u64(_R.GET_PROTOCOL_FEATURES)
        self.negotiation.protocol_features_offered(value)
        return ProtocolFeature(value)

    def set_protocol_features(self, features: int) -> None:
        self.negotiation.check_protocol_features_ack(features)
        self._u64(_R.SET_PROTOCOL_FEATURES, features)
        self.negotiation.protocol_features_acked(features)

    def negotiate(self, features: int, protocol_features: int = 0) -> tuple[int, ProtocolFeature]:
        """Offer-and-accept in one call: ack what both sides want; return what was acked.

        Protocol features are negotiated first (when the back-end offers them), then the
        virtio features; bit 30 is acked whenever the back-end offers it.
        """
        offered = self.get_features()
        protocol = ProtocolFeature(0)
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            protocol = ProtocolFeature(self.get_protocol_features() & protocol_features)
            self.set_protocol_features(protocol)
            features |= VHOST_USER_F_PROTOCOL_FEATURES
        acked = features & offered
        self.set_features(acked)
        return acked, protocol

    # -- vhost-user-only requests --

    def get_queue_num(self) -> int:
        return self._get_u64(_R.GET_QUEUE_NUM)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._request(_R.SET_VRING_ENABLE, VringStatePayload(index, int(enable)))

    def send_rarp(self, mac: bytes) -> None:
        if len(mac) != 6:
            raise InvalidParam("a MAC address is 6 bytes")
        self._u64(_R.SEND_RARP, int.from_bytes(mac + bytes(2), "little"))

    def net_set_mtu(self, mtu: int) -> None:
        self._u64(_R.NET_SET_MTU, mtu)

    def set_backend_req_fd(self, fd: int) -> None:
        """Hand the back-end a socket for its requests (see :meth:`open_backend_channel`)."""
        self._request(_R.SET_BACKEND_REQ_FD, None, [fd])

    def open_backend_channel(self) -> Connection:
        """Create the back-end request channel and return the front-end's end of it.

        Serve it with :class:`vhostkit.user.frontend_req_handler.FrontendReqServer`.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return Connection(ours, Channel.BACKEND)

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        self._request(_R.IOTLB_MSG, msg)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        self._request(_R.SET_VRING_ENDIAN, VringStatePayload(index, int(big_endian)))

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """Read ``size`` bytes of the device config space at ``offset``."""
        reply = self._request(_R.GET_CONFIG, ConfigPayload(offset, flags, bytes(size)))
        assert reply is not None and isinstance(reply.payload, ConfigPayload)
        reply.close_fds()
        got = reply.payload
        if got.offset != offset or got.size != size:
            raise UnexpectedReply(
                f"GET_CONFIG asked {size} bytes at {offset}, got {got.size} at {got.offset}"
            )
        return got.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._request(_R.SET_CONFIG, ConfigPayload(offset, flags, bytes(data)))

    def create_crypto_session(self, session: bytes) -> bytes:
        """Device-specific: the raw session layout in, the raw reply out."""
        reply = self._request(_R.CREATE_CRYPTO_SESSION, RawPayload(session))
        assert reply is not None and isinstance(reply.payload, RawPayload)
        reply.close_fds()
        return reply.payload.data

    def close_crypto_session(self, session_id: int) -> None:
        self._u64(_R.CLOSE_CRYPTO_SESSION, session_id)

    def postcopy_advise(self) -> int:
        """The back-end's userfaultfd (the caller owns it)."""
        reply = self._request(_R.POSTCOPY_ADVISE)
        assert reply is not None
        if len(reply.fds) != 1:
            reply.close_fds()
            raise IncorrectFds("POSTCOPY_ADVISE reply carried no userfaultfd")
        return reply.fds[0]

    def postcopy_listen(self) -> None:
        self._request(_R.POSTCOPY_LISTEN)

    def postcopy_end(self) -> None:
        self._request(_R.POSTCOPY_END)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightRegion:
        reply = self._request(_R.GET_INFLIGHT_FD, InflightDesc(0, 0, num_queues, queue_size))
        assert reply is not None and isinstance(reply.payload, InflightDesc)
        if len(reply.fds) != 1:
            reply.close_fds()
            raise IncorrectFds("GET_INFLIGHT_FD reply carried no fd")
        p = reply.payload
        return InflightRegion(reply.fds[0], p.mmap_size, p.mmap_offset, num_queues, queue_size)

    def set_inflight_fd(self, region: InflightRegion) -> None:
        desc = InflightDesc(
            region.mmap_size, region.mmap_offset, region.num_queues, region.queue_size
        )
        self._request(_R.SET_INFLIGHT_FD, desc, [region.fd])

    def gpu_set_socket(self, fd: int) -> None:
        self._request(_R.GPU_SET_SOCKET, None, [fd])

    def reset_device(self) -> None:
        self._request(_R.RESET_DEVICE)

    def vring_kick(self, index: int) -> None:
        """In-band kick (INBAND_NOTIFICATIONS)."""
        self._request(_R.VRING_KICK, VringStatePayload(index, 0))

    def get_max_mem_slots(self) -> int:
        return self._get_u64(_R.GET_MAX_MEM_SLOTS)

    def add_mem_region(self, region: MemoryRegion) -> None:
        self._request(_R.ADD_MEM_REG, MemRegionMsg(region), _region_fds([region]))

    def remove_mem_region(self, region: MemoryRegion) -> None:
        self._request(_R.REM_MEM_REG, MemRegionMsg(region))

    def set_status(self, status: int) -> None:
        self._u64(_R.SET_STATUS, status)

    def get_status(self) -> int:
        return self._get_u64(_R.GET_STATUS)

    def get_shared_object(self, object_id: uuid.UUID) -> int:
        """The dma-buf fd the back-end exports under ``object_id`` (the caller owns it)."""
        reply = self._request(_R.GET_SHARED_OBJECT, SharedObject(object_id))
        assert reply is not None
        status = reply.payload.value if isinstance(reply.payload, U64) else 0
        if status or len(reply.fds) != 1:
            reply.close_fds()
            raise RequestFailed(f"back-end has no shared object {object_id}", status=status)
        return reply.fds[0]

    def set_device_state_fd(
        self,
        direction: TransferDirection,
        fd: int,
        phase: MigrationPhase = MigrationPhase.STOPPED,
    ) -> int | None:
        """Start a state transfer over ``fd``; returns the back-end's own fd if it gave one."""
        reply = self._request(_R.SET_DEVICE_STATE_FD, DeviceStateParams(direction, phase), [fd])
        assert reply is not None and isinstance(reply.payload, U64)
        value = reply.payload.value
        if value & 0xFF:
            reply.close_fds()
            raise RequestFailed(
                f"back-end refused the device state transfer (status {value & 0xFF:#x})",
                status=value & 0xFF,
            )
        if value & VRING_NOFD_MASK:
            reply.close_fds()
            return None
        if len(reply.fds) != 1:
            reply.close_fds()
            raise IncorrectFds("SET_DEVICE_STATE_FD reply promised an fd and carried none")
        return reply.fds[0]

    def check_device_state(self) -> None:
        status = self._get_u64(_R.CHECK_DEVICE_STATE)
        if status:
            raise RequestFailed(
                f"back-end reports a failed state transfer ({status:#x})", status=status
            )

    def save_device_state(self, *, limit: int = 64 << 20) -> bytes:
        """The whole SAVE of the spec's "Migrating back-end state": the back-end (suspended:
        every ring stopped with GET_VRING_BASE) writes its state into a pipe, or into a
        channel of its own that it returns; it is read to end-of-file (at most ``limit``
        bytes), then CHECK_DEVICE_STATE must answer 0. Returns the state, opaque."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)  # ours; the back-end's end stays blocking
        try:
            theirs = self.set_device_state_fd(TransferDirection.SAVE, w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)  # the back-end has its own copy: end-of-file comes when it closes it
        if theirs is not None:
            os.close(r)
            r = theirs
        try:
            data = _read_to_eof(r, limit, self.reply_timeout)
        finally:
            os.close(r)
        self.check_device_state()
        return data

    def load_device_state(self, data: bytes) -> None:
        """The whole LOAD: ``data`` (from :meth:`save_device_state` on the source) is written
        into a pipe the back-end reads (or its own channel, if it returns one) and the channel
        closed; CHECK_DEVICE_STATE must then answer 0 (else :class:`RequestFailed`)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)  # ours; the back-end's end stays blocking
        try:
            theirs = self.set_device_state_fd(TransferDirection.LOAD, r)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        if theirs is not None:
            os.close(w)
            w = theirs
        try:
            _write_all(w, data, self.reply_timeout)
        finally:
            os.close(w)
        self.check_device_state()

    # -- lifetime --

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.conn.close()


def _wait_fd(fd: int, events: int, timeout: float | None, what: str) -> None:
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(None if timeout is None else int(timeout * 1000)):
        raise SocketRetry(f"device state transfer: the back-end did not {what} in {timeout}s")


def _read_to_eof(fd: int, limit: int, timeout: float | None) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        _wait_fd(fd, select.POLLIN, timeout, "write its state")
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise InvalidParam(f"device state larger than {limit} bytes")
        chunks.append(chunk)


def _write_all(fd: int, data: bytes, timeout: float | None) -> None:
    view = memoryview(data)
    while view:
        _wait_fd(fd, select.POLLOUT, timeout, "read the state")
        try:
            view = view[os.write(fd, view[: 1 << 16]) :]
        except BlockingIOError:
            continue


def _region_fds(regions: Sequence[MemoryRegion]) -> list[int]:
    fds = []
    for r in regions:
        if r.fd is None:
            raise InvalidParam(
                f"region at guest {r.guest_phys_addr:#x} has no fd: vhost-user shares memory "
                "through files (use memfd-backed guest memory)"
            )
        fds.append(r.fd)
    return fds
