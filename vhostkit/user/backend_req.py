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
    FeatureNotNegotiated,
    IncorrectFds,
    InvalidOperation,
    RequestFailed,
    UnexpectedReply,
)
from vhostkit.user.codec import Channel, Message
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    U64,
    VHOST_USER_VERSION,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    Empty,
    HeaderFlags,
    IotlbMsg,
    Payload,
    ProtocolFeature,
    ReplyRule,
    SharedObject,
    VringAreaDesc,
    VringStatePayload,
)

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
        self.protocol_features = ProtocolFeature(protocol_features)
        self.reply_timeout = reply_timeout
        self._lock = threading.Lock()

    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def _request(
        self, request: BackendReq, payload: Payload | None = None, fds: Sequence[int] = ()
    ) -> Message | None:
        rule = Message(request).rule
        if rule.feature is not None and not self._has(rule.feature):
            raise FeatureNotNegotiated(f"{request.name} needs {rule.feature.name}")
        if fds and not self._has(ProtocolFeature.BACKEND_SEND_FD):
            raise FeatureNotNegotiated(f"{request.name} with an fd needs BACKEND_SEND_FD")
        flags = VHOST_USER_VERSION
        always = rule.reply is ReplyRule.ALWAYS
        ack = not always and self._has(ProtocolFeature.REPLY_ACK)
        if ack:
            flags |= HeaderFlags.NEED_REPLY
        msg = Message(request, Empty() if payload is None else payload, tuple(fds), flags)
        with self._lock:
            self.conn.send(msg)
            if not (ack or always):
                return None
            reply = self.conn.recv(timeout=self.reply_timeout)
        if not reply.is_reply or reply.request != request:
            reply.close_fds()
            raise UnexpectedReply(f"sent {request.name}, got {reply.request.name}")
        if ack:
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
