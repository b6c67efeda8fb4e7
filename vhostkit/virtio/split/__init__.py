"""Split virtqueues (virtio 1.2 section 2.7), in the driver role and in the device role.

* :mod:`~vhostkit.virtio.split.layout`: the ring's three parts, their sizes and alignment,
  and the NumPy views both roles work on;
* :mod:`~vhostkit.virtio.split.device`: :class:`SplitDeviceQueue`, the back-end's side;
* :mod:`~vhostkit.virtio.split.driver`: :class:`SplitDriverQueue`, the guest's side.

Both roles work on NumPy structured-array views of the mapped guest memory. What they share
with the packed format is in :mod:`vhostkit.virtio.ring` (and, by role, in
:mod:`~vhostkit.virtio.device_role` / :mod:`~vhostkit.virtio.driver_role`). The error policy
is described in :mod:`vhostkit.virtio.ring`.
"""

from vhostkit.virtio.device_role import MAX_INDIRECT
from vhostkit.virtio.split.device import SplitDeviceQueue
from vhostkit.virtio.split.driver import SplitDriverQueue
from vhostkit.virtio.split.layout import (
    AVAIL_ALIGN,
    AVAIL_F_NO_INTERRUPT,
    DESC_ALIGN,
    USED_ALIGN,
    USED_ELEM_DTYPE,
    USED_F_NO_NOTIFY,
    SplitLayout,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_size,
)

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_F_NO_INTERRUPT",
    "DESC_ALIGN",
    "MAX_INDIRECT",
    "USED_ALIGN",
    "USED_ELEM_DTYPE",
    "USED_F_NO_NOTIFY",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "SplitLayout",
    "avail_ring_size",
    "desc_table_size",
    "used_ring_size",
    "vring_size",
]
