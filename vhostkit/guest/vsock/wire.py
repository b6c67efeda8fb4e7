"""The virtio-vsock wire format: ``struct virtio_vsock_hdr`` and its numbers.

Packet layout (``struct virtio_vsock_hdr``, 44 bytes, little-endian): src_cid u64, dst_cid u64,
src_port u32, dst_port u32, len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32;
``len`` payload bytes follow in the same buffer.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Self

from vhostkit.errors import InvalidParam

__all__ = [
    "HDR_SIZE",
    "U32_MAX",
    "VMADDR_CID_HOST",
    "ShutdownFlag",
    "VsockHdr",
    "VsockOp",
    "VsockPacket",
    "VsockType",
]

_HDR = struct.Struct("<QQIIIHHIII")
#: ``sizeof(struct virtio_vsock_hdr)``.
HDR_SIZE = _HDR.size
#: The host's CID, where a guest's packets go.
VMADDR_CID_HOST = 2
#: Counters and credit fields are u32 and wrap: ``x & U32_MAX``.
U32_MAX = (1 << 32) - 1


class VsockType(enum.IntEnum):
    """The socket type in a header (``type``)."""

    STREAM = 1
    SEQPACKET = 2


class VsockOp(enum.IntEnum):
    """The operation of a packet (``op``)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(enum.IntFlag):
    """OP_SHUTDOWN flags: the sender will receive (RCV) / send (SEND) no more."""

    NONE = 0
    RCV = 1
    SEND = 2
    BOTH = 3


@dataclass(frozen=True, slots=True)
class VsockHdr:
    """``struct virtio_vsock_hdr``."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & U32_MAX,
            self.fwd_cnt & U32_MAX,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        if len(data) < HDR_SIZE:
            raise InvalidParam(f"a vsock header has {HDR_SIZE} bytes, got {len(data)}")
        return cls(*_HDR.unpack_from(data))

    def describe(self) -> str:
        try:
            op = VsockOp(self.op).name
        except ValueError:
            op = f"op {self.op}"
        return (
            f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"len {self.len} flags {self.flags:#x} buf_alloc {self.buf_alloc} fwd {self.fwd_cnt}"
        )


@dataclass(frozen=True, slots=True)
class VsockPacket:
    """A header and its payload."""

    hdr: VsockHdr
    payload: bytes = b""

    def pack(self) -> bytes:
        return self.hdr.pack() + self.payload


#: A connection's identity: ``(peer cid, peer port, local port)``.
