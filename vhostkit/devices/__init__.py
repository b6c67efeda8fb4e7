"""vhost-user back-end devices built on :class:`vhostkit.user.backend.RingDevice`.

* :class:`NetDevice` (:mod:`vhostkit.devices.net`): tap-backed virtio-net, the userspace twin
  of vhost-net;
* :class:`BlkDevice` (:mod:`vhostkit.devices.blk`): file-backed virtio-blk;
* :class:`EchoDevice` (:mod:`vhostkit.devices.echo`): a virtio-net shaped device that sends
  every transmitted frame back (for tests and demos).

Serve one with :class:`vhostkit.user.BackendListener`, or run it as a daemon:
``vhostkit backend net --socket PATH --tap NAME`` / ``vhostkit backend blk --socket PATH
--image FILE``.
"""

from vhostkit.devices.blk import BlkDevice
from vhostkit.devices.echo import EchoDevice
from vhostkit.devices.net import NetDevice

__all__ = ["BlkDevice", "EchoDevice", "NetDevice"]
