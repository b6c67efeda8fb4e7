"""The front-end's side of the back-end request channel.

:class:`FrontendReqHandler` is what a VMM implements to react to the back-end's requests
(config changed, in-band call/err, host notifier, IOTLB, shared objects); every method defaults
to :class:`Unsupported`. :class:`FrontendReqServer` receives those requests on the front-end's
end of the channel, validates them against the negotiated protocol features, dispatches, and
acks them when the back-end asked (``NEED_REPLY``).

Fds in a request are handed to the handler, which owns them once its method returns; if it
raises, the server closes them.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
import uuid

from vhostkit._frames import without_frames
from vhostkit.errors import (
    Disconnected,
    InvalidOperation,
    InvalidPayload,
    ProtocolError,
    TransportError,
    Unsupported,
    VhostError,
)
from vhostkit.user.codec import Channel, Message, close_fds
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    U64,
    BackendReq,
    IotlbMsg,
    ProtocolFeature,
    SharedObject,
    VringAreaDesc,
    VringStatePayload,
)
from vhostkit.user.negotiation import Negotiation, ReplyKind, Role

__all__ = ["FrontendReqHandler", "FrontendReqServer"]

log = logging.getLogger(__name__)
_B = BackendReq


class FrontendReqHandler:
    """Override the back-end requests the VMM handles."""

    def config_change(self) -> None:
        raise Unsupported("CONFIG_CHANGE_MSG")

    def vring_call(self, index: int) -> None:
        raise Unsupported("VRING_CALL")

    def vring_err(self, index: int) -> None:
        raise Unsupported("VRING_ERR")

    def host_notifier(self, area: VringAreaDesc, fd: int | None) -> None:
        """Map (``fd`` given) or unmap (``None``) ring ``area.index``'s notify area."""
        raise Unsupported("VRING_HOST_NOTIFIER_MSG")

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        raise Unsupported("IOTLB_MSG")

    def shared_object_add(self, object_id: uuid.UUID) -> None:
        raise Unsupported("SHARED_OBJECT_ADD")

    def shared_object_remove(self, object_id: uuid.UUID) -> None:
        raise Unsupported("SHARED_OBJECT_REMOVE")

    def shared_object_lookup(self, object_id: uuid.UUID) -> int:
        """Return a dma-buf fd (handed to the back-end, then closed here)."""
        raise Unsupported("SHARED_OBJECT_LOOKUP")


class FrontendReqServer:
    """Serves the back-end request channel for a front-end (owns the connection)."""

    def __init__(
        self, conn: Connection, handler: FrontendReqHandler, protocol_features: int
    ) -> None:
        if conn.channel is not Channel.BACKEND:
            raise InvalidOperation("FrontendReqServer needs a BACKEND-channel connection")
        self.conn = conn
        self.handler = handler
        #: the protocol features the main channel settled, and what they allow here
        self.negotiation = Negotiation.settled(Role.FRONTEND, protocol_features)
        self.last_error: VhostError | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def protocol_features(self) -> ProtocolFeature:
        """The protocol features this channel runs with."""
        return self.negotiation.acked_protocol_features

    @protocol_features.setter
    def protocol_features(self, features: int) -> None:
        self.negotiation = Negotiation.settled(Role.FRONTEND, features)

    def handle_request(self, timeout: float | None = None) -> Message:
        msg = self.conn.recv(timeout=timeout)
        if msg.is_reply:
            msg.close_fds()
            raise ProtocolError(f"back-end sent a reply ({msg.request.name}) as a request")
        owed = self.negotiation.reply_owed(msg.request, need_reply=msg.need_reply)
        reply_fds: tuple[int, ...] = ()
        status = 0
        try:
            self.negotiation.may_accept(msg.request, carries_fds=bool(msg.fds))
            reply_fds = self._dispatch(msg)
        except VhostError as exc:
            msg.close_fds()
            self.last_error = without_frames(exc)  # kept, without the frames
            status = exc.errno or _errno.EIO
            log.warning("back-end request %s failed: %s", msg.request.name, exc)
        except BaseException:
            msg.close_fds()
            raise
        try:
            if owed is ReplyKind.PAYLOAD:  # SHARED_OBJECT_LOOKUP: a status, and the fd
                self.conn.send(msg.reply(U64(status), reply_fds if not status else ()))
            elif owed is ReplyKind.ACK:
                self.conn.send(msg.reply(U64(status)))
        finally:
            close_fds(reply_fds)
        return msg

    def _dispatch(self, msg: Message) -> tuple[int, ...]:
        h = self.handler
        # Class patterns narrow the payload to the type the codec decoded for that request.
        match msg.request, msg.payload:
            case _B.CONFIG_CHANGE_MSG, _:
                h.config_change()
            case _B.VRING_CALL, VringStatePayload() as p:
                h.vring_call(p.index)
            case _B.VRING_ERR, VringStatePayload() as p:
                h.vring_err(p.index)
            case _B.VRING_HOST_NOTIFIER_MSG, VringAreaDesc() as area:
                h.host_notifier(area, msg.fds[0] if msg.fds else None)
            case _B.IOTLB_MSG, IotlbMsg() as iotlb:
                h.iotlb_msg(iotlb)
            case _B.SHARED_OBJECT_ADD, SharedObject() as obj:
                h.shared_object_add(obj.uuid)
            case _B.SHARED_OBJECT_REMOVE, SharedObject() as obj:
                h.shared_object_remove(obj.uuid)
            case _B.SHARED_OBJECT_LOOKUP, SharedObject() as obj:
                return (h.shared_object_lookup(obj.uuid),)
            case request, payload:
                raise InvalidPayload(f"{request.name} with a {type(payload).__name__} payload")
        return ()

    def serve(self) -> None:
        """Handle requests until the back-end closes the channel (or :meth:`close`)."""
        try:
            while True:
                try:
                    self.handle_request()
                except Disconnected:
                    return
                except TransportError:
                    if self._closing:
                        return  # closed from another thread mid-request
                    raise
        finally:
            self.conn.close()

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; :meth:`close` stops it."""
        self._thread = threading.Thread(
            target=self.serve, name="vhost-user-backend-req", daemon=True
        )
        self._thread.start()
        return self._thread

    def close(self) -> None:
        self._closing = True
        self.conn.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
