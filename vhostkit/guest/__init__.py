"""vhostkit playing the guest: userspace virtio drivers over any :class:`VhostBackend`.

They lay out rings in shared guest memory, post buffers, kick and reap, so tests and labs push
real traffic through kernel vhost or a vhost-user back-end without booting a guest.

* :mod:`~vhostkit.guest.rings`: :class:`VirtioGuest` and :class:`GuestRing`, the plumbing every
  driver shares (memory, feature negotiation, ring set-up, kicks and interrupts).
* :mod:`~vhostkit.guest.net`: :class:`VirtioNetDriver`, a virtual NIC.
* :mod:`~vhostkit.guest.vsock`: a virtio-vsock driver.
* :mod:`~vhostkit.guest.blk`: :class:`BlkDriver`, a virtio-blk driver over a vhost-user
  :class:`~vhostkit.user.Frontend` (one request at a time, for tests and labs).
"""

from vhostkit.guest.blk import BlkDriver
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.guest.rings import GuestRing, VirtioGuest

__all__ = ["BlkDriver", "GuestRing", "VirtioGuest", "VirtioNetDriver"]
