"""The back-end's requests to the front-end ("slave requests" in older texts).

After ``SET_BACKEND_REQ_FD`` the back-end holds one end of a socket on which *it* is the one
asking: :class:`BackendChannel` sends CONFIG_CHANGE_MSG, VRING_CALL / VRING_ERR (in-band
notifications), host notifiers, IOTLB misses and shared-object requests. With ``REPLY_ACK``
negotiated each request carries ``NEED_REPLY`` and waits for the front-end's u64 status; a
non-zero status is :class:`RequestFailed`. The channel is safe to use from several threads
(ring workers signalling at once).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

from vhostkit.errors import (
    IncorrectFds,
    InvalidOperation,
    RequestFailed,
    UnexpectedReply,
)
from vhostkit.user.codec import Channel, Message
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    U64,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    Empty,
    IotlbMsg,
    Payload,
    ProtocolFeature,
    SharedObject,
    VringAreaDesc,
    VringStatePayload,
)
from vhostkit.user.negotiation import Negotiation, ReplyKind, Role

__all__ = ["BackendChannel"]

_B = BackendReq


class BackendChannel:
    """The back-end's end of the back-end request channel (owns the connection)."""

    def __init__(
        self,
        conn: Connection,
        protocol_features: int,
        *,
        reply_timeout: float | None = 30.0,
    ) -> None:
        if conn.channel is not Channel.BACKEND:
            raise InvalidOperation("BackendChannel needs a BACKEND-channel connection")
        self.conn = conn
        #: the protocol features the main channel settled, and what they allow here
        self.negotiation = Negotiation.settled(Role.BACKEND, protocol_features)
        self.reply_timeout = reply_timeout
        self._lock = threading.Lock()

    @property
    def protocol_features(self) -> ProtocolFeature:
        """The protocol features this channel runs with."""
        return self.negotiation.acked_protocol_features

    @protocol_features.setter
    def protocol_features(self, features: int) -> None:
        self.negotiation = Negotiation.settled(Role.BACKEND, features)

    def _request(
        self, request: BackendReq, payload: Payload | None = None, fds: Sequence[int] = ()
    ) -> Message | None:
        exchange = self.negotiation.may_send(request, carries_fds=bool(fds))
        payload = Empty() if payload is None else payload
        msg = Message(request, payload, tuple(fds), exchange.flags)
        with self._lock:
            self.conn.send(msg)
            if exchange.reply is ReplyKind.NONE:
                return None
            reply = self.conn.recv(timeout=self.reply_timeout)
        if not reply.is_reply or reply.request != request:
            reply.close_fds()
            raise UnexpectedReply(f"sent {request.name}, got {reply.request.name}")
        if exchange.reply is ReplyKind.ACK:
            reply.close_fds()
            status = reply.payload.value if isinstance(reply.payload, U64) else None
            if status != 0:
                raise RequestFailed(
                    f"front-end failed {request.name} (status {status})", status=status or -1
                )
            return None
        return reply

    def config_change(self) -> None:
        """Tell the front-end the device config space changed (CONFIG)."""
        self._request(_B.CONFIG_CHANGE_MSG)

    def vring_call(self, index: int) -> None:
        """In-band "used buffers" notification (INBAND_NOTIFICATIONS)."""
        self._request(_B.VRING_CALL, VringStatePayload(index, 0))

    def vring_err(self, index: int) -> None:
        """In-band error notification (INBAND_NOTIFICATIONS)."""
        self._request(_B.VRING_ERR, VringStatePayload(index, 0))

    def set_host_notifier(self, index: int, fd: int, size: int, offset: int = 0) -> None:
        """Map ``size`` bytes of ``fd`` at ``offset`` as ring ``index``'s notify area."""
        self._request(
            _B.VRING_HOST_NOTIFIER_MSG, VringAreaDesc(index & VRING_IDX_MASK, size, offset), [fd]
        )

    def remove_host_notifier(self, index: int) -> None:
        self._request(
            _B.VRING_HOST_NOTIFIER_MSG,
            VringAreaDesc((index & VRING_IDX_MASK) | VRING_NOFD_MASK, 0, 0),
        )

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """Report an IOTLB miss or access failure."""
        self._request(_B.IOTLB_MSG, msg)

    def shared_object_add(self, object_id: uuid.UUID) -> None:
        self._request(_B.SHARED_OBJECT_ADD, SharedObject(object_id))

    def shared_object_remove(self, object_id: uuid.UUID) -> None:
        self._request(_B.SHARED_OBJECT_REMOVE, SharedObject(object_id))

    def shared_object_lookup(self, object_id: uuid.UUID) -> int:
        """The dma-buf fd the front-end knows under ``object_id`` (the caller owns it)."""
        reply = self._request(_B.SHARED_OBJECT_LOOKUP, SharedObject(object_id))
        assert reply is not None
        status = reply.payload.value if isinstance(reply.payload, U64) else -1
        if status != 0:
            reply.close_fds()
            raise RequestFailed(f"front-end has no shared object {object_id}", status=status)
        if len(reply.fds) != 1:
            reply.close_fds()
            raise IncorrectFds("SHARED_OBJECT_LOOKUP succeeded without an fd")
        return reply.fds[0]

    def close(self) -> None:
        self.conn.close()
