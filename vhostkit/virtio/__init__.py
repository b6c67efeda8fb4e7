"""Virtio pieces shared by the kernel and vhost-user halves: features, memory, rings, net header.

* :mod:`~vhostkit.virtio.features`: feature and device status bits.
* :mod:`~vhostkit.virtio.memory`: :class:`GuestMemory`, memfd regions and address translation.
* :mod:`~vhostkit.virtio.split` / :mod:`~vhostkit.virtio.packed`: virtqueues in the driver
  and device roles, one package per ring format (``layout``, ``device``, ``driver``);
  :mod:`~vhostkit.virtio.ring` (flags, index arithmetic, error policy),
  :mod:`~vhostkit.virtio.chain` (the chains the device role pops),
  :mod:`~vhostkit.virtio.device_role` / :mod:`~vhostkit.virtio.driver_role` (what each role
  shares across the two formats).
* :mod:`~vhostkit.virtio.net`: the virtio-net header.
"""

from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature, feature_names
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.ring import Chain, ChainBatch, DescFlag
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

__all__ = [
    "Chain",
    "ChainBatch",
    "DescFlag",
    "DeviceStatus",
    "GuestMemory",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "SplitDeviceQueue",
    "SplitDriverQueue",
    "VirtioFeature",
    "VirtioNetFeature",
    "feature_names",
]
