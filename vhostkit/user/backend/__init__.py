"""The vhost-user back-end framework: what a device process is built from.

The protocol files beside this package (:mod:`vhostkit.user.backend_req_handler` and friends)
speak vhost-user; this package turns them into a device that serves rings, the way rust-vmm
keeps ``vhost-user-backend`` apart from ``vhost``:

* :mod:`~vhostkit.user.backend.device`: :class:`BackendDevice`, the generic device state
  (features, memory table, vrings, inflight area) behind one connection.
* :mod:`~vhostkit.user.backend.ring_device`: :class:`RingDevice`, one worker thread per ring,
  woken by its kick eventfd; devices subclass it and implement ``process``.
* :mod:`~vhostkit.user.backend.listener`: :class:`BackendListener` (server socket mode, one
  device per frontend) and :class:`BackendClient` (client mode, with reconnect).
* :mod:`~vhostkit.user.backend.inflight`: inflight I/O tracking for restart.
* :mod:`~vhostkit.user.backend.state`, :mod:`~vhostkit.user.backend.migration`: device state
  (DEVICE_STATE): the saved format and :class:`MigratableRingDevice`'s transfer.
"""

from vhostkit.user.backend.device import BackendDevice, VringInfo
from vhostkit.user.backend.listener import BackendClient, BackendListener, serve_client
from vhostkit.user.backend.ring_device import ActiveRing, RingDevice

__all__ = [
    "ActiveRing",
    "BackendClient",
    "BackendDevice",
    "BackendListener",
    "RingDevice",
    "VringInfo",
    "serve_client",
]
