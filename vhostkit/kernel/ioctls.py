"""Kernel vhost and TUN ioctl numbers and the structs they take.

Pure data, no I/O. Numbers are built with ``ioctl_opt`` from the same direction, type, number
and argument type as ``include/uapi/linux/vhost.h`` and ``include/uapi/linux/if_tun.h``, so they
are right by construction; ``tests/test_kernel_ioctls.py`` checks a few against the values the
kernel headers produce.

Quirks kept on purpose, because the kernel defines them so:

* ``VHOST_GET_FEATURES`` and ``VHOST_SET_FEATURES`` share number 0x00 and differ only in
  direction, as do ``VHOST_SET_VRING_BASE``/``VHOST_GET_VRING_BASE`` (0x12). The full request
  codes differ, so :class:`VhostIoctl` (keyed by full code) keeps them apart.
* ``VHOST_GET_VRING_ENDIAN`` and ``VHOST_GET_VRING_BUSYLOOP_TIMEOUT`` are declared ``_IOW`` in the
  kernel although they read: the numbers must match the kernel's, not the semantics.
* ``TUNSETIFF`` and friends declare ``int`` as their argument size while taking a
  ``struct ifreq``.
"""

from __future__ import annotations

import ctypes
import enum

from ioctl_opt import IO, IOR, IOW, IOWR

__all__ = [
    "IFNAMSIZ",
    "TUN_TYPE",
    "VHOST_FILE_UNBIND",
    "VHOST_F_LOG_ALL",
    "VHOST_NET_F_VIRTIO_NET_HDR",
    "VHOST_VIRTIO",
    "IfReqFlags",
    "TunFlags",
    "TunIoctl",
    "TunOffload",
    "VhostBackendFeatures",
    "VhostIoctl",
    "VringEndian",
    "ifreq_flags",
    "make_vhost_memory",
    "vhost_memory",
    "vhost_memory_region",
    "vhost_vring_addr",
    "vhost_vring_file",
    "vhost_vring_state",
    "vhost_vring_worker",
    "vhost_worker_state",
]

#: The vhost ioctl type byte.
VHOST_VIRTIO = 0xAF
#: The TUN ioctl type byte (``'T'``).
TUN_TYPE = ord("T")
#: ``vhost_vring_file.fd`` value meaning "detach" (``VHOST_FILE_UNBIND``).
VHOST_FILE_UNBIND = -1
IFNAMSIZ = 16

#: vhost feature bits (vhost.h): the device can log dirty pages; vhost-net adds the vnet header.
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27


# --- structs (include/uapi/linux/vhost_types.h) ---------------------------------------------


class vhost_vring_state(ctypes.Structure):
    """``struct vhost_vring_state``: a ring index with a number (size or position)."""

    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    """``struct vhost_vring_file``: a ring index with an fd (-1 detaches)."""

    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    """``struct vhost_vring_addr``: where a ring's parts are, in the caller's addresses."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("desc_user_addr", ctypes.c_uint64),
        ("used_user_addr", ctypes.c_uint64),
        ("avail_user_addr", ctypes.c_uint64),
        ("log_guest_addr", ctypes.c_uint64),
    ]


class vhost_memory_region(ctypes.Structure):
    """``struct vhost_memory_region``: one region of the memory table."""

    _fields_ = [
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("flags_padding", ctypes.c_uint64),
    ]


class vhost_memory(ctypes.Structure):
    """The fixed header of ``struct vhost_memory``; regions follow (flexible array)."""

    _fields_ = [
        ("nregions", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("regions", vhost_memory_region * 0),
    ]


class vhost_worker_state(ctypes.Structure):
    """``struct vhost_worker_state``: a vhost worker thread's id (NEW/FREE_WORKER)."""

    _fields_ = [("worker_id", ctypes.c_uint)]


class vhost_vring_worker(ctypes.Structure):
    """``struct vhost_vring_worker``: which worker serves a ring."""

    _fields_ = [("index", ctypes.c_uint), ("worker_id", ctypes.c_uint)]


def make_vhost_memory(regions: list[tuple[int, int, int]]) -> ctypes.Structure:
    """A ``struct vhost_memory`` with its regions: ``[(guest_phys, size, user_addr), ...]``."""

    class _VhostMemory(ctypes.Structure):
        _fields_ = [
            ("nregions", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("regions", vhost_memory_region * len(regions)),
        ]

    mem = _VhostMemory()
    mem.nregions = len(regions)
    for i, (gpa, size, uaddr) in enumerate(regions):
        mem.regions[i] = vhost_memory_region(gpa, size, uaddr, 0)
    return mem


# --- vhost ioctls (include/uapi/linux/vhost.h) ----------------------------------------------

_U64 = ctypes.c_uint64
_INT = ctypes.c_int
_UINT = ctypes.c_uint


class VhostIoctl(enum.IntEnum):
    """Full request codes of the vhost ioctls that concern vhost-net and vhost-vsock."""

    GET_FEATURES = IOR(VHOST_VIRTIO, 0x00, _U64)
    SET_FEATURES = IOW(VHOST_VIRTIO, 0x00, _U64)
    SET_OWNER = IO(VHOST_VIRTIO, 0x01)
    RESET_OWNER = IO(VHOST_VIRTIO, 0x02)
    SET_MEM_TABLE = IOW(VHOST_VIRTIO, 0x03, vhost_memory)
    SET_LOG_BASE = IOW(VHOST_VIRTIO, 0x04, _U64)
    SET_LOG_FD = IOW(VHOST_VIRTIO, 0x07, _INT)
    NEW_WORKER = IOR(VHOST_VIRTIO, 0x08, vhost_worker_state)
    FREE_WORKER = IOW(VHOST_VIRTIO, 0x09, vhost_worker_state)
    SET_VRING_NUM = IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
    SET_VRING_ADDR = IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
    SET_VRING_BASE = IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
    GET_VRING_BASE = IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
    SET_VRING_ENDIAN = IOW(VHOST_VIRTIO, 0x13, vhost_vring_state)
    GET_VRING_ENDIAN = IOW(VHOST_VIRTIO, 0x14, vhost_vring_state)  # sic: _IOW in the kernel
    ATTACH_VRING_WORKER = IOW(VHOST_VIRTIO, 0x15, vhost_vring_worker)
    GET_VRING_WORKER = IOWR(VHOST_VIRTIO, 0x16, vhost_vring_worker)
    SET_VRING_KICK = IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
    SET_VRING_CALL = IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
    SET_VRING_ERR = IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
    SET_VRING_BUSYLOOP_TIMEOUT = IOW(VHOST_VIRTIO, 0x23, vhost_vring_state)
    GET_VRING_BUSYLOOP_TIMEOUT = IOW(VHOST_VIRTIO, 0x24, vhost_vring_state)  # sic: _IOW
    SET_BACKEND_FEATURES = IOW(VHOST_VIRTIO, 0x25, _U64)
    GET_BACKEND_FEATURES = IOR(VHOST_VIRTIO, 0x26, _U64)
    NET_SET_BACKEND = IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)
    VSOCK_SET_GUEST_CID = IOW(VHOST_VIRTIO, 0x60, _U64)
    VSOCK_SET_RUNNING = IOW(VHOST_VIRTIO, 0x61, _INT)


class VringEndian(enum.IntEnum):
    """``vhost_vring_state.num`` values for SET/GET_VRING_ENDIAN (legacy cross-endian rings)."""

    LITTLE = 0
    BIG = 1


class VhostBackendFeatures(enum.IntFlag):
    """Bits of SET/GET_BACKEND_FEATURES (``VHOST_BACKEND_F_*``)."""

    IOTLB_MSG_V2 = 1 << 1
    IOTLB_BATCH = 1 << 2
    IOTLB_ASID = 1 << 3
    SUSPEND = 1 << 4
    RESUME = 1 << 5
    ENABLE_AFTER_DRIVER_OK = 1 << 6
    DESC_ASID = 1 << 7


# --- TUN/TAP (include/uapi/linux/if_tun.h) --------------------------------------------------


class TunIoctl(enum.IntEnum):
    """TUN/TAP ioctl request codes."""

    TUNSETNOCSUM = IOW(TUN_TYPE, 200, _INT)
    TUNSETDEBUG = IOW(TUN_TYPE, 201, _INT)
    TUNSETIFF = IOW(TUN_TYPE, 202, _INT)
    TUNSETPERSIST = IOW(TUN_TYPE, 203, _INT)
    TUNSETOWNER = IOW(TUN_TYPE, 204, _INT)
    TUNSETLINK = IOW(TUN_TYPE, 205, _INT)
    TUNSETGROUP = IOW(TUN_TYPE, 206, _INT)
    TUNGETFEATURES = IOR(TUN_TYPE, 207, _UINT)
    TUNSETOFFLOAD = IOW(TUN_TYPE, 208, _UINT)
    TUNSETTXFILTER = IOW(TUN_TYPE, 209, _UINT)
    TUNGETIFF = IOR(TUN_TYPE, 210, _UINT)
    TUNGETSNDBUF = IOR(TUN_TYPE, 211, _INT)
    TUNSETSNDBUF = IOW(TUN_TYPE, 212, _INT)
    TUNGETVNETHDRSZ = IOR(TUN_TYPE, 215, _INT)
    TUNSETVNETHDRSZ = IOW(TUN_TYPE, 216, _INT)
    TUNSETQUEUE = IOW(TUN_TYPE, 217, _INT)
    TUNSETIFINDEX = IOW(TUN_TYPE, 218, _UINT)
    TUNSETVNETLE = IOW(TUN_TYPE, 220, _INT)
    TUNGETVNETLE = IOR(TUN_TYPE, 221, _INT)
    TUNSETVNETBE = IOW(TUN_TYPE, 222, _INT)
    TUNGETVNETBE = IOR(TUN_TYPE, 223, _INT)
    TUNSETCARRIER = IOW(TUN_TYPE, 226, _INT)
    TUNGETDEVNETNS = IO(TUN_TYPE, 227)


class TunFlags(enum.IntFlag):
    """``ifr_flags`` for TUNSETIFF / TUNSETQUEUE (``IFF_*`` in if_tun.h)."""

    TUN = 0x0001
    TAP = 0x0002
    NAPI = 0x0010
    NAPI_FRAGS = 0x0020
    NO_CARRIER = 0x0040
    MULTI_QUEUE = 0x0100
    ATTACH_QUEUE = 0x0200
    DETACH_QUEUE = 0x0400
    PERSIST = 0x0800
    NO_PI = 0x1000
    ONE_QUEUE = 0x2000
    VNET_HDR = 0x4000
    TUN_EXCL = 0x8000


class TunOffload(enum.IntFlag):
    """TUNSETOFFLOAD bits (``TUN_F_*``)."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10
    USO4 = 0x20
    USO6 = 0x40


class IfReqFlags(enum.IntFlag):
    """Interface flags (``IFF_UP`` ...) from net/if.h, for reference."""

    UP = 0x1
    BROADCAST = 0x2
    RUNNING = 0x40
    PROMISC = 0x100


class _IfReqFlagsStruct(ctypes.Structure):
    _fields_ = [
        ("ifr_name", ctypes.c_char * IFNAMSIZ),
        ("ifr_flags", ctypes.c_short),
        ("_pad", ctypes.c_char * 22),
    ]


def ifreq_flags(name: str = "", flags: int = 0) -> ctypes.Structure:
    """A 40-byte ``struct ifreq`` with ``ifr_name`` and ``ifr_flags`` set."""
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ - 1} bytes")
    req = _IfReqFlagsStruct()
    req.ifr_name = raw
    # ifr_flags is a C short: wrap flags above 0x7fff (IFF_TUN_EXCL) into its signed range.
    req.ifr_flags = ctypes.c_short(flags & 0xFFFF).value
    return req
