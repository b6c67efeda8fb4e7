"""The vhost-user protocol, both sides.

The roles, one module each (as in rust-vmm's ``vhost`` crate):

* :class:`Frontend`: the VMM side ("master" in older texts), a
  :class:`~vhostkit.backend.VhostBackend` plus every vhost-user-only request;
* :class:`BackendReqServer` serving a :class:`BackendHandler`: the device side ("slave" in
  older texts), which validates each request and dispatches it to one handler method;
* :class:`BackendChannel` / :class:`FrontendReqServer` with a :class:`FrontendReqHandler`: the
  back-end request channel, both ends.

The back-end framework (:mod:`vhostkit.user.backend`): :class:`BackendDevice` (a complete
generic back-end), :class:`RingDevice` (one worker per ring), :class:`BackendListener` and
:class:`BackendClient` (server and client socket modes).

The layers below are modules of their own: :mod:`~vhostkit.user.message` and
:mod:`~vhostkit.user.codec` (the sans-I/O codec), :mod:`~vhostkit.user.negotiation` (feature
state and per-request gating), :mod:`~vhostkit.user.connection` (the Unix-socket transport;
:class:`Connection` is exported here for socket pairs).
"""

from vhostkit.user.backend.device import BackendDevice, VringInfo
from vhostkit.user.backend.listener import BackendClient, BackendListener, serve_client
from vhostkit.user.backend.ring_device import ActiveRing, RingDevice
from vhostkit.user.backend_req import BackendChannel
from vhostkit.user.backend_req_handler import BackendHandler, BackendReqServer, InflightArea
from vhostkit.user.connection import Connection
from vhostkit.user.frontend import Frontend, InflightRegion
from vhostkit.user.frontend_req_handler import FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import BackendReq, FrontendReq, ProtocolFeature

__all__ = [
    "ActiveRing",
    "BackendChannel",
    "BackendClient",
    "BackendDevice",
    "BackendHandler",
    "BackendListener",
    "BackendReq",
    "BackendReqServer",
    "Connection",
    "Frontend",
    "FrontendReq",
    "FrontendReqHandler",
    "FrontendReqServer",
    "InflightArea",
    "InflightRegion",
    "ProtocolFeature",
    "RingDevice",
    "VringInfo",
    "serve_client",
]
