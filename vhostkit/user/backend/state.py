"""The saved state of a vhostkit back-end device: a versioned, self-describing binary format.

What a source back-end writes on ``SET_DEVICE_STATE_FD`` (direction SAVE) and a destination
back-end reads on the same request (direction LOAD), see :mod:`vhostkit.user.backend.migration`.
The front-end carries the bytes without looking inside. Pure code: no I/O.

Layout (all numbers little-endian)::

    header (20 bytes)
      magic     4 bytes   b"VHKS"
      version   u16       FORMAT_VERSION (1)
      device    u16       the virtio device id (1 net, 2 blk)
      flags     u32       0 (reserved)
      length    u32       bytes of the body that follows
      crc32     u32       zlib.crc32 of the body
    body: records, one after the other
      tag       u16       what the record holds (bit 15: optional, a reader may skip it)
      length    u32       bytes of value
      value

Records of version 1 (each at most once, except RING):

* ``FEATURES`` u64: the virtio features the driver acked;
* ``CONFIG`` bytes: the device's config space;
* ``STATUS`` u32: the device status the front-end set (0 when it sent none);
* ``RING`` (once per ring the front-end set up): u16 index, u16 size, u32 position (the
  ``GET_VRING_BASE`` value: the next avail index, or a packed ring's avail and used positions),
  u8 flags (bit 0 enabled, bit 1 packed), u8 reserved (0), u16 count, then ``count`` u16
  heads of split-ring chains the device had taken and not completed (oldest first; they lie
  before the position, and the destination takes them again before anything new);
* ``NET`` (net only): u16 queue pairs, u16 MTU set with NET_SET_MTU (0: none);
* ``BLK`` (blk only): u64 capacity in 512-byte sectors, u32 logical block size, u8 read-only,
  then the GET_ID serial (at most 20 bytes).

:meth:`DeviceState.unpack` checks everything before it returns: a state that is truncated,
corrupt, of another format version, has an unknown mandatory record, a duplicate, a missing
one or a value out of range raises :class:`~vhostkit.errors.StateFormatError`; nothing is half
decoded. Whether the state fits the device that loads it (same device type, same disk, rings it
has) is the device's check (:class:`~vhostkit.errors.DeviceStateMismatch`).
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from vhostkit.errors import StateFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_STATE_SIZE",
    "BlkState",
    "DeviceState",
    "DeviceType",
    "NetState",
    "RingState",
    "Tag",
]

MAGIC = b"VHKS"
FORMAT_VERSION = 1
#: the largest state a reader accepts (a guard against a runaway writer, far above any device)
MAX_STATE_SIZE = 16 << 20
#: the largest config space vhost-user carries (VHOST_USER_MAX_CONFIG_SIZE in QEMU)
MAX_CONFIG_SIZE = 256
MAX_RINGS = 1024
MAX_RING_SIZE = 32768
SERIAL_BYTES = 20

_HEADER = struct.Struct("<4sHHIII")
_RECORD = struct.Struct("<HI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RING = struct.Struct("<HHIBBH")
_NET = struct.Struct("<HH")
_BLK = struct.Struct("<QIB")

#: bit 15 of a tag: a reader that does not know the record may skip it
OPTIONAL = 0x8000

_RING_ENABLED = 0x1
_RING_PACKED = 0x2


class DeviceType(enum.IntEnum):
    """Which device saved the state (virtio device ids)."""

    NET = 1
    BLK = 2


class Tag(enum.IntEnum):
    """The records of format version 1."""

    FEATURES = 1
    CONFIG = 2
    STATUS = 3
    RING = 4
    NET = 5
    BLK = 6


@dataclass(frozen=True, slots=True)
class RingState:
    """One ring as the source left it: stopped at ``base``, with ``inflight`` heads held."""

    index: int
    num: int
    base: int
    enabled: bool
    packed: bool = False
    inflight: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        r = f"ring {self.index}"
        if not 0 <= self.index < MAX_RINGS:
            raise StateFormatError(f"{r}: index out of range 0..{MAX_RINGS - 1}")
        if not 0 < self.num <= MAX_RING_SIZE:
            raise StateFormatError(f"{r}: size {self.num} out of range 1..{MAX_RING_SIZE}")
        if not 0 <= self.base <= 0xFFFFFFFF:
            raise StateFormatError(f"{r}: position {self.base:#x} does not fit 32 bits")
        if self.packed:
            avail, used = self.base & 0x7FFF, (self.base >> 16) & 0x7FFF
            if avail >= self.num or used >= self.num:
                raise StateFormatError(
                    f"{r}: packed position {self.base:#x} beyond the ring's {self.num} entries"
                )
            if self.inflight:
                raise StateFormatError(f"{r}: held chains of a packed ring are not in format 1")
        else:
            if self.num & (self.num - 1):
                raise StateFormatError(f"{r}: split ring size {self.num} is not a power of two")
            if self.base > 0xFFFF:
                raise StateFormatError(f"{r}: split ring position {self.base:#x} > 0xffff")
        if len(self.inflight) > self.num:
            raise StateFormatError(f"{r}: {len(self.inflight)} chains held in {self.num} entries")
        if any(not 0 <= h < self.num for h in self.inflight):
            raise StateFormatError(f"{r}: a held head is beyond the ring's {self.num} entries")
        if len(set(self.inflight)) != len(self.inflight):
            raise StateFormatError(f"{r}: the same head is held twice")

    def pack(self) -> bytes:
        flags = (_RING_ENABLED if self.enabled else 0) | (_RING_PACKED if self.packed else 0)
        head = _RING.pack(self.index, self.num, self.base, flags, 0, len(self.inflight))
        return head + struct.pack(f"<{len(self.inflight)}H", *self.inflight)

    @classmethod
    def unpack(cls, value: bytes) -> RingState:
        if len(value) < _RING.size:
            raise StateFormatError(f"RING record of {len(value)} bytes (at least {_RING.size})")
        index, num, base, flags, reserved, count = _RING.unpack_from(value)
        if flags & ~(_RING_ENABLED | _RING_PACKED) or reserved:
            raise StateFormatError(f"ring {index}: reserved bits set ({flags:#x}, {reserved:#x})")
        if len(value) != _RING.size + 2 * count:
            raise StateFormatError(
                f"ring {index}: {count} held heads need {_RING.size + 2 * count} bytes, "
                f"the record has {len(value)}"
            )
        heads = struct.unpack_from(f"<{count}H", value, _RING.size)
        return cls(index, num, base, bool(flags & _RING_ENABLED), bool(flags & _RING_PACKED), heads)


@dataclass(frozen=True, slots=True)
class NetState:
    """What only a net device has: its queue pairs and the MTU the front-end set."""

    queue_pairs: int
    mtu: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.queue_pairs <= MAX_RINGS // 2:
            raise StateFormatError(f"{self.queue_pairs} queue pairs out of range")
        if self.mtu and not 68 <= self.mtu <= 65535:
            raise StateFormatError(f"MTU {self.mtu} out of range 68..65535")

    def pack(self) -> bytes:
        return _NET.pack(self.queue_pairs, self.mtu)

    @classmethod
    def unpack(cls, value: bytes) -> NetState:
        if len(value) != _NET.size:
            raise StateFormatError(f"NET record of {len(value)} bytes (not {_NET.size})")
        return cls(*_NET.unpack(value))


@dataclass(frozen=True, slots=True)
class BlkState:
    """What only a blk device has: which disk it served, as the guest knows it."""

    capacity: int
    blk_size: int
    read_only: bool
    serial: bytes

    def __post_init__(self) -> None:
        if self.blk_size < 512 or self.blk_size & (self.blk_size - 1):
            raise StateFormatError(f"block size {self.blk_size} is not a power of two >= 512")
        if len(self.serial) > SERIAL_BYTES:
            raise StateFormatError(f"serial of {len(self.serial)} bytes (at most {SERIAL_BYTES})")

    def pack(self) -> bytes:
        return _BLK.pack(self.capacity, self.blk_size, int(self.read_only)) + self.serial

    @classmethod
    def unpack(cls, value: bytes) -> BlkState:
        if not _BLK.size <= len(value) <= _BLK.size + SERIAL_BYTES:
            raise StateFormatError(f"BLK record of {len(value)} bytes")
        capacity, blk_size, read_only = _BLK.unpack_from(value)
        if read_only > 1:
            raise StateFormatError(f"BLK read-only flag {read_only}")
        return cls(capacity, blk_size, bool(read_only), bytes(value[_BLK.size :]))


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Everything a destination back-end needs to go on where the source stopped."""

    device: DeviceType
    features: int
    config: bytes
    status: int = 0
    rings: tuple[RingState, ...] = ()
    net: NetState | None = None
    blk: BlkState | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.features < 1 << 64:
            raise StateFormatError(f"features {self.features:#x} do not fit 64 bits")
        if len(self.config) > MAX_CONFIG_SIZE:
            raise StateFormatError(f"config space of {len(self.config)} bytes")
        if not 0 <= self.status <= 0xFF:
            raise StateFormatError(f"device status {self.status:#x} is not a byte")
        if len(self.rings) > MAX_RINGS:
            raise StateFormatError(f"{len(self.rings)} rings")
        indices = [r.index for r in self.rings]
        if len(set(indices)) != len(indices):
            raise StateFormatError("the same ring is saved twice")
        want_net, want_blk = self.device is DeviceType.NET, self.device is DeviceType.BLK
        if (self.net is not None) != want_net or (self.blk is not None) != want_blk:
            raise StateFormatError(f"{self.device.name} state with the wrong device records")

    def ring(self, index: int) -> RingState | None:
        return next((r for r in self.rings if r.index == index), None)

    # -- encoding ---------------------------------------------------------------------------

    def pack(self) -> bytes:
        records = [
            _record(Tag.FEATURES, _U64.pack(self.features)),
            _record(Tag.CONFIG, bytes(self.config)),
            _record(Tag.STATUS, _U32.pack(self.status)),
            *(_record(Tag.RING, r.pack()) for r in sorted(self.rings, key=lambda r: r.index)),
        ]
        if self.net is not None:
            records.append(_record(Tag.NET, self.net.pack()))
        if self.blk is not None:
            records.append(_record(Tag.BLK, self.blk.pack()))
        body = b"".join(records)
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, self.device, 0, len(body), zlib.crc32(body) & 0xFFFFFFFF
        )
        return header + body

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> DeviceState:
        """Decode and check a saved state (see the module docs); never half-decodes."""
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise StateFormatError(f"device state truncated: {len(data)}-byte header")
        magic, version, device, flags, length, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise StateFormatError(f"not a vhostkit device state (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise StateFormatError(f"device state format {version}, this reader knows 1")
        try:
            kind = DeviceType(device)
        except ValueError:
            raise StateFormatError(f"unknown device type {device}") from None
        if flags:
            raise StateFormatError(f"reserved header flags {flags:#x} set")
        body = data[_HEADER.size :]
        if len(body) < length:
            raise StateFormatError(f"device state truncated: {len(body)} of {length} bytes")
        if len(body) > length:
            raise StateFormatError(f"{len(body) - length} bytes after the device state")
        if zlib.crc32(body) & 0xFFFFFFFF != crc:
            raise StateFormatError("device state corrupt (checksum mismatch)")
        fields: dict[Tag, bytes] = {}
        rings: list[RingState] = []
        pos = 0
        while pos < len(body):
            if len(body) - pos < _RECORD.size:
                raise StateFormatError(f"record header truncated at body offset {pos}")
            tag, size = _RECORD.unpack_from(body, pos)
            pos += _RECORD.size
            if size > len(body) - pos:
                raise StateFormatError(f"record {tag:#x} of {size} bytes overruns the state")
            value = body[pos : pos + size]
            pos += size
            try:
                known = Tag(tag)
            except ValueError:
                if tag & OPTIONAL:
                    continue  # a later writer's extra: skippable by its own say-so
                raise StateFormatError(f"unknown mandatory record {tag:#x}") from None
            if known is Tag.RING:
                rings.append(RingState.unpack(value))
            elif known in fields:
                raise StateFormatError(f"record {known.name} appears twice")
            else:
                fields[known] = value
        for required in (Tag.FEATURES, Tag.CONFIG, Tag.STATUS):
            if required not in fields:
                raise StateFormatError(f"record {required.name} is missing")
        return cls(
            device=kind,
            features=_exact(_U64, fields[Tag.FEATURES], Tag.FEATURES),
            config=fields[Tag.CONFIG],
            status=_exact(_U32, fields[Tag.STATUS], Tag.STATUS),
            rings=tuple(rings),
            net=NetState.unpack(fields[Tag.NET]) if Tag.NET in fields else None,
            blk=BlkState.unpack(fields[Tag.BLK]) if Tag.BLK in fields else None,
        )


def _record(tag: Tag, value: bytes) -> bytes:
    return _RECORD.pack(tag, len(value)) + value


def _exact(fmt: struct.Struct, value: bytes, tag: Tag) -> int:
    if len(value) != fmt.size:
        raise StateFormatError(f"{tag.name} record of {len(value)} bytes (not {fmt.size})")
    return int(fmt.unpack(value)[0])
