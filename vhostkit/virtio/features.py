"""Virtio feature bits and device status bits.

Values come from the virtio 1.2 specification and the kernel's uapi headers
(``include/uapi/linux/virtio_config.h``, ``virtio_ring.h``, ``virtio_net.h``, ``vhost.h``).
Every member's value is the *mask* (``1 << bit``), so members combine with ``|`` and test with
``&`` against the 64-bit feature words that :meth:`vhostkit.backend.VhostBackend.get_features`
returns.
"""

from __future__ import annotations

from enum import IntFlag

__all__ = [
    "DeviceStatus",
    "VirtioFeature",
    "VirtioNetFeature",
    "feature_bits",
    "feature_names",
    "has_feature",
]


class VirtioFeature(IntFlag):
    """Device-independent (transport and ring) feature bits, plus the vhost extensions."""

    NOTIFY_ON_EMPTY = 1 << 24
    #: vhost: log every write to guest memory (``VHOST_F_LOG_ALL``).
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    #: vhost-user: the backend speaks protocol features (``VHOST_USER_F_PROTOCOL_FEATURES``).
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


class VirtioNetFeature(IntFlag):
    """virtio-net device feature bits (``VIRTIO_NET_F_*``)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    #: legacy: device handles packets with any GSO type.
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    VQ_NOTF_COAL = 1 << 52
    NOTF_COAL = 1 << 53
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


class DeviceStatus(IntFlag):
    """The device status field (virtio 1.2, section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 64
    FAILED = 128


def has_feature(features: int, flag: int) -> bool:
    """True when every bit of ``flag`` is set in ``features``."""
    return features & int(flag) == int(flag)


def feature_bits(features: int) -> list[int]:
    """The bit numbers set in ``features``, ascending."""
    if features < 0:
        raise ValueError("feature word must be non-negative")
    return [bit for bit in range(features.bit_length()) if features >> bit & 1]


def feature_names(
    features: int,
    device: type[IntFlag] | None = VirtioNetFeature,
) -> list[str]:
    """Human-readable names of the bits set in ``features``, ascending by bit number.

    Transport bits are named from :class:`VirtioFeature`; the other bits from ``device``
    (virtio-net by default; ``None`` for transport names only). A bit no table knows is
    reported as ``"bit<N>"``.
    """
    names: list[str] = []
    for bit in feature_bits(features):
        mask = 1 << bit
        name: str | None = None
        for table in (VirtioFeature, device):
            if table is None:
                continue
            try:
                name = table(mask).name
            except ValueError:
                continue
            if name is not None:
                break
        names.append(name if name is not None else f"bit{bit}")
    return names
