"""The virtio-net packet header (``struct virtio_net_hdr`` / ``virtio_net_hdr_mrg_rxbuf``).

Every packet on a virtio-net queue starts with this header. Its size depends on the negotiated
features (:func:`header_size`): 10 bytes for a legacy device without mergeable receive buffers,
12 bytes (with ``num_buffers``) with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, 20 bytes with
VIRTIO_NET_F_HASH_REPORT (the hash fields are carried as zeros here).

:func:`fill_mergeable` is the device-role helper for mergeable receive buffers: it spreads one
frame over as many receive chains as needed and sets ``num_buffers``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag
from typing import Self

from vhostkit.errors import InvalidParam
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.ring import Chain

__all__ = [
    "GSO_ECN",
    "HDR_SIZE_HASH",
    "HDR_SIZE_LEGACY",
    "HDR_SIZE_MRG",
    "GsoType",
    "NetHdrFlag",
    "VirtioNetHdr",
    "fill_mergeable",
    "header_size",
]

HDR_SIZE_LEGACY = 10
HDR_SIZE_MRG = 12
HDR_SIZE_HASH = 20

#: ``VIRTIO_NET_HDR_GSO_ECN``: OR-ed into ``gso_type`` when the TCP segment has ECN set.
GSO_ECN = 0x80

_BASE = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_NUM_BUFFERS = struct.Struct("<H")


class NetHdrFlag(IntFlag):
    """``virtio_net_hdr.flags``."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(IntEnum):
    """``virtio_net_hdr.gso_type`` without the ECN bit."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


#: A header with no flag set.
NO_FLAGS = NetHdrFlag(0)


def header_size(features: int) -> int:
    """Size of the virtio-net header for the negotiated ``features``."""
    if features & VirtioNetFeature.HASH_REPORT:
        return HDR_SIZE_HASH
    if features & (VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF):
        return HDR_SIZE_MRG
    return HDR_SIZE_LEGACY


def _check_size(size: int) -> None:
    if size not in (HDR_SIZE_LEGACY, HDR_SIZE_MRG, HDR_SIZE_HASH):
        raise InvalidParam(f"virtio-net header size {size} is not 10, 12 or 20")


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    """A virtio-net header. ``num_buffers`` is only carried by 12- and 20-byte headers."""

    flags: NetHdrFlag = NO_FLAGS
    gso_type: GsoType = GsoType.NONE
    ecn: bool = False
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def __post_init__(self) -> None:
        if not 0 <= int(self.flags) <= 0xFF:
            raise InvalidParam(f"header flags {int(self.flags):#x} out of range")
        for name in ("hdr_len", "gso_size", "csum_start", "csum_offset", "num_buffers"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise InvalidParam(f"{name}={value} does not fit in 16 bits")

    def pack(self, size: int = HDR_SIZE_MRG) -> bytes:
        """The header as ``size`` bytes (10, 12 or 20)."""
        buf = bytearray(size)
        self.pack_into(buf, 0, size)
        return bytes(buf)

    def pack_into(
        self, buf: bytearray | memoryview, offset: int = 0, size: int = HDR_SIZE_MRG
    ) -> None:
        """Write the header into ``buf`` at ``offset``."""
        _check_size(size)
        gso = int(self.gso_type) | (GSO_ECN if self.ecn else 0)
        _BASE.pack_into(
            buf,
            offset,
            int(self.flags),
            gso,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )
        if size >= HDR_SIZE_MRG:
            _NUM_BUFFERS.pack_into(buf, offset + _BASE.size, self.num_buffers)
        if size == HDR_SIZE_HASH:
            buf[offset + HDR_SIZE_MRG : offset + HDR_SIZE_HASH] = bytes(8)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, size: int = HDR_SIZE_MRG) -> Self:
        """Parse the first ``size`` bytes of ``data``.

        Raises :class:`InvalidParam` when ``data`` is short or ``gso_type`` is unknown.
        """
        _check_size(size)
        if len(data) < size:
            raise InvalidParam(f"{len(data)} bytes is shorter than a {size}-byte header")
        flags, gso, hdr_len, gso_size, csum_start, csum_offset = _BASE.unpack_from(data, 0)
        try:
            gso_type = GsoType(gso & ~GSO_ECN)
        except ValueError:
            raise InvalidParam(f"unknown gso_type {gso:#x}") from None
        num_buffers = _NUM_BUFFERS.unpack_from(data, _BASE.size)[0] if size >= 12 else 0
        return cls(
            NetHdrFlag(flags),
            gso_type,
            bool(gso & GSO_ECN),
            hdr_len,
            gso_size,
            csum_start,
            csum_offset,
            num_buffers,
        )

    @classmethod
    def from_views(cls, views: Sequence[memoryview], size: int = HDR_SIZE_MRG) -> Self:
        """Parse a header that starts at the first view and may span several."""
        head = bytearray()
        for view in views:
            head += view[: size - len(head)]
            if len(head) == size:
                break
        return cls.unpack(head, size)

    @classmethod
    def from_chain(cls, chain: Chain, size: int = HDR_SIZE_MRG) -> Self:
        """Parse the header at the start of a transmit chain's readable buffers."""
        return cls.from_views(chain.readable, size)


def fill_mergeable(
    chains: Sequence[Chain],
    frame: bytes | bytearray | memoryview,
    hdr: VirtioNetHdr,
    size: int = HDR_SIZE_MRG,
) -> list[int]:
    """Write header + ``frame`` across receive chains, mergeable-buffer style (device role).

    Chains are filled in order; the header goes at the start of the first one with
    ``num_buffers`` set to the number of chains used. Returns the bytes written per used chain
    (complete exactly ``chains[:len(result)]`` with these lengths). Without mergeable buffers,
    pass a single chain. Raises :class:`InvalidParam` (nothing written) when the chains are
    too small.
    """
    _check_size(size)
    src = memoryview(frame).cast("B")
    need = size + src.nbytes
    caps: list[int] = []
    room = 0
    for chain in chains:
        if room >= need:
            break
        cap = chain.writable_len
        if not caps and cap < size:
            raise InvalidParam(f"first receive buffer ({cap} bytes) cannot hold the header")
        caps.append(cap)
        room += cap
    if room < need:
        raise InvalidParam(f"{need} bytes do not fit in {room} bytes of receive buffers")
    data = bytearray(need)
    replace(hdr, num_buffers=len(caps)).pack_into(data, 0, size)
    data[size:] = src
    written: list[int] = []
    pos = 0
    for chain, cap in zip(chains, caps, strict=False):
        n = chain.write(memoryview(data)[pos : pos + cap])
        written.append(n)
        pos += n
    return written
