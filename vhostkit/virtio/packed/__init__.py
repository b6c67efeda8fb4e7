"""Packed virtqueues (virtio 1.2 section 2.8), in the driver role and in the device role.

* :mod:`~vhostkit.virtio.packed.layout`: the descriptor ring and event areas, the encoding of
  ring positions for ``SET_VRING_BASE``, and the NumPy views both roles work on;
* :mod:`~vhostkit.virtio.packed.device`: :class:`PackedDeviceQueue`, the back-end's side;
* :mod:`~vhostkit.virtio.packed.driver`: :class:`PackedDriverQueue`, the guest's side.

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED bit
does not; used when both equal the device's used wrap counter. The driver publishes a batch by
writing the flags of the batch's first head last; the device completes a batch by writing the
flags of its first used descriptor last.

What both formats share is in :mod:`vhostkit.virtio.ring` (and, by role, in
:mod:`~vhostkit.virtio.device_role` / :mod:`~vhostkit.virtio.driver_role`). The error policy
is described in :mod:`vhostkit.virtio.ring`.
"""

from vhostkit.virtio.device_role import MAX_INDIRECT
from vhostkit.virtio.packed.device import PackedDeviceQueue
from vhostkit.virtio.packed.driver import PackedDriverQueue
from vhostkit.virtio.packed.layout import (
    EVENT_ALIGN,
    PACKED_DESC_DTYPE,
    PACKED_RING_ALIGN,
    decode_base,
    encode_base,
    packed_ring_size,
)

__all__ = [
    "EVENT_ALIGN",
    "MAX_INDIRECT",
    "PACKED_DESC_DTYPE",
    "PACKED_RING_ALIGN",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "decode_base",
    "encode_base",
    "packed_ring_size",
]
