"""vhost-user back-end devices built on :class:`vhostkit.user.backend.RingDevice`.

* :class:`NetDevice` (:mod:`vhostkit.devices.net`): tap-backed virtio-net, the userspace twin
  of vhost-net;
* :class:`BlkDevice` (:mod:`vhostkit.devices.blk`): file-backed virtio-blk;
* :class:`EchoDevice` (:mod:`vhostkit.devices.echo`): a virtio-net shaped device that sends
  every transmitted frame back (for tests and demos);
* :class:`KernelNetDevice` (:mod:`vhostkit.devices.net_kernel`): the vhost-user net device
  whose rings are served by kernel vhost-net (``--dataplane kernel``).

Serve one with :class:`vhostkit.user.BackendListener`, or run it as a daemon:
``vhostkit backend net --socket PATH --tap NAME`` / ``vhostkit backend blk --socket PATH
--image FILE``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhostkit.devices.blk import BlkDevice
    from vhostkit.devices.echo import EchoDevice
    from vhostkit.devices.net import NetDevice
    from vhostkit.devices.net_kernel import KernelNetDevice

__all__ = ["BlkDevice", "EchoDevice", "KernelNetDevice", "NetDevice"]

# Imported on first use, so that ``python3 -m vhostkit.devices.net`` does not find its own
# module already imported by this package.
_WHERE = {
    "BlkDevice": "vhostkit.devices.blk",
    "EchoDevice": "vhostkit.devices.echo",
    "KernelNetDevice": "vhostkit.devices.net_kernel",
    "NetDevice": "vhostkit.devices.net",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
