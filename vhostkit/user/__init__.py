"""The vhost-user protocol, both sides.

* :mod:`~vhostkit.user.message` and :mod:`~vhostkit.user.codec`: the sans-I/O codec.
* :mod:`~vhostkit.user.connection`: the Unix-socket transport (fds as SCM_RIGHTS).
* :class:`Frontend`: the VMM side ("master" in older texts), a :class:`VhostBackend`.
* :class:`BackendHandler`, :class:`BackendReqServer`, :class:`BackendListener`: the device side
  ("slave" in older texts); :class:`BackendDevice` is a complete generic back-end.
* :class:`BackendChannel` / :class:`FrontendReqServer`: the back-end request channel.
"""

from vhostkit.user.backend.device import BackendDevice, VringInfo
from vhostkit.user.backend.listener import BackendClient, BackendListener, serve_client
from vhostkit.user.backend_req import BackendChannel
from vhostkit.user.backend_req_handler import BackendHandler, BackendReqServer, InflightArea
from vhostkit.user.codec import Channel, Message, MessageParser, decode, encode, parse_header
from vhostkit.user.connection import Connection, Listener, connect
from vhostkit.user.frontend import Frontend, InflightRegion
from vhostkit.user.frontend_req_handler import FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import BackendReq, FrontendReq, ProtocolFeature

__all__ = [
    "BackendChannel",
    "BackendClient",
    "BackendDevice",
    "BackendHandler",
    "BackendListener",
    "BackendReq",
    "BackendReqServer",
    "Channel",
    "Connection",
    "Frontend",
    "FrontendReq",
    "FrontendReqHandler",
    "FrontendReqServer",
    "InflightArea",
    "InflightRegion",
    "Listener",
    "Message",
    "MessageParser",
    "ProtocolFeature",
    "VringInfo",
    "connect",
    "decode",
    "encode",
    "parse_header",
    "serve_client",
]
