"""Kernel vhost data planes: vhost-net and vhost-vsock ioctls, and taps for vhost-net."""

from __future__ import annotations

from vhostkit.kernel.device import KernelVhostDevice
from vhostkit.kernel.ioctls import (
    TunFlags,
    TunIoctl,
    TunOffload,
    VhostBackendFeatures,
    VhostIoctl,
    VringEndian,
)
from vhostkit.kernel.net import VhostNet, VhostNetQueue
from vhostkit.kernel.tap import Tap
from vhostkit.kernel.vsock import VhostVsock, VhostVsockQueue

__all__ = [
    "KernelVhostDevice",
    "Tap",
    "TunFlags",
    "TunIoctl",
    "TunOffload",
    "VhostBackendFeatures",
    "VhostIoctl",
    "VhostNet",
    "VhostNetQueue",
    "VhostVsock",
    "VhostVsockQueue",
    "VringEndian",
]
