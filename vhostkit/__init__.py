"""vhostkit: drive Linux virtio data planes from Python.

Two kinds of data plane sit behind one interface, :class:`vhostkit.backend.VhostBackend`:

* the kernel's vhost devices (``/dev/vhost-net``, ``/dev/vhost-vsock``), in :mod:`vhostkit.kernel`;
* the vhost-user protocol over a Unix socket, both the frontend (the VMM side, formerly
  "master") and the backend (the device side, formerly "slave"), in :mod:`vhostkit.user`.
"""

from vhostkit.backend import VhostBackend
from vhostkit.errors import VhostError
from vhostkit.types import LogRegion, MemoryRegion, VringAddr, VringState

__version__ = "0.1.0"

__all__ = [
    "LogRegion",
    "MemoryRegion",
    "VhostBackend",
    "VhostError",
    "VringAddr",
    "VringState",
    "__version__",
]
