"""The virtio-blk device type as the spec defines it (virtio 1.x, section 5.2).

Feature bits, request types and status codes, the config space layout, and the request
header and discard / write-zeroes segment formats. Both sides use it: the back-end device
(:mod:`vhostkit.devices.blk`) and the guest driver (:mod:`vhostkit.guest.blk`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag

__all__ = [
    "BLK_CONFIG_SIZE",
    "CAPACITY_OFFSET",
    "ID_BYTES",
    "REQUEST_HEADER",
    "SECTOR_SIZE",
    "SEGMENT",
    "BlkConfig",
    "BlkFeature",
    "BlkRequestType",
    "BlkStatus",
    "DiscardFlag",
    "request_header",
    "segment",
]

#: virtio-blk addresses the disk in 512-byte sectors, whatever the block size.
SECTOR_SIZE = 512
#: Length of the GET_ID string.
ID_BYTES = 20

#: ``struct virtio_blk_outhdr``: type, ioprio, sector.
REQUEST_HEADER = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: sector, num_sectors, flags.
SEGMENT = struct.Struct("<QII")


class BlkFeature(IntFlag):
    """virtio-blk device feature bits (``VIRTIO_BLK_F_*``), as masks."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14
    LIFETIME = 1 << 15
    SECURE_ERASE = 1 << 16


class BlkRequestType(IntEnum):
    """``VIRTIO_BLK_T_*``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(IntEnum):
    """``VIRTIO_BLK_S_*``: the request's status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class DiscardFlag(IntFlag):
    """Flags of a discard / write-zeroes segment."""

    UNMAP = 1


#: struct virtio_blk_config, through write_zeroes_may_unmap and its 3 padding bytes.
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
#: Bytes of the config space the device exposes.
BLK_CONFIG_SIZE = _CONFIG.size  # 60
#: Offset of ``capacity`` in the config space.
CAPACITY_OFFSET = 0


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """``struct virtio_blk_config`` (little-endian, virtio 1.x), the fields this device uses.

    ``capacity`` is in 512-byte sectors; ``blk_size`` in bytes; the discard / write-zeroes
    limits in sectors and segments.
    """

    capacity: int
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def pack(self) -> bytes:
        """The config space bytes (:data:`BLK_CONFIG_SIZE` of them)."""
        return _CONFIG.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BlkConfig:
        """Decode a config space; shorter reads (QEMU 7.2 reads 57 bytes) are zero-padded."""
        raw = bytes(data[: _CONFIG.size]).ljust(_CONFIG.size, b"\0")
        return cls(*_CONFIG.unpack(raw))


def request_header(rtype: int, sector: int = 0) -> bytes:
    """The 16-byte request header a driver puts first in a chain."""
    return REQUEST_HEADER.pack(rtype, 0, sector)


def segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """One 16-byte discard / write-zeroes segment."""
    return SEGMENT.pack(sector, num_sectors, flags)
