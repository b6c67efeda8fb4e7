"""vhost-user messages: request numbers, flags, payload layouts, and the per-request rules.

This module is pure: no sockets, no I/O. It knows, for every request of the current vhost-user
specification (``docs/interop/vhost-user.rst`` in QEMU):

* its number (:class:`FrontendReq` for front-end -> back-end, :class:`BackendReq` for the
  back-end's requests on the channel set up by ``SET_BACKEND_REQ_FD``);
* the payload it carries and the payload of its reply (:data:`FRONTEND_RULES`,
  :data:`BACKEND_RULES`);
* how many file descriptors travel with it;
* whether it always gets a reply, or only with ``NEED_REPLY`` once ``REPLY_ACK`` is negotiated;
* which protocol feature gates it, and what it needs of virtio bit 30
  (``VHOST_USER_F_PROTOCOL_FEATURES``).

The rules are data; :class:`vhostkit.user.negotiation.Negotiation` applies them to the state of
one connection.

Older texts call the front-end "master" and the back-end "slave"; the names here follow the
current specification.

All numbers are little-endian (the spec says "machine native", and every platform vhost-user
runs on in practice is little-endian; pinning it keeps the codec testable anywhere).
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass
from typing import ClassVar, Self

from vhostkit.errors import InvalidParam, InvalidPayload, PayloadSizeError, TooManyRegions
from vhostkit.types import MemoryRegion, VringAddr, VringState

__all__ = [
    "BACKEND_RULES",
    "FRONTEND_RULES",
    "HEADER",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "U64",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendReq",
    "ConfigFlags",
    "ConfigPayload",
    "DeviceStateParams",
    "Empty",
    "FdRule",
    "FrontendReq",
    "HeaderFlags",
    "InflightDesc",
    "IotlbMsg",
    "IotlbPerm",
    "IotlbType",
    "LogBaseReply",
    "LogDesc",
    "MemRegionMsg",
    "MemTablePayload",
    "MigrationPhase",
    "Payload",
    "ProtocolBitRule",
    "ProtocolFeature",
    "RawPayload",
    "ReplyRule",
    "RequestRule",
    "SharedObject",
    "TransferDirection",
    "VringAddrPayload",
    "VringAreaDesc",
    "VringStatePayload",
    "classify_log_base_reply",
]

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: The only protocol version there is; the low two bits of the flags field.
VHOST_USER_VERSION = 0x1
#: Virtio feature bit 30, reused by vhost-user to say "protocol features are supported".
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: The largest payload any valid message has (rust-vmm and DPDK use the same bound).
MAX_PAYLOAD_SIZE = 0x1000
#: Regions in one SET_MEM_TABLE (``VHOST_MEMORY_BASELINE_NREGIONS``).
MAX_MEM_REGIONS = 8
#: File descriptors accepted in one message (the most any request takes is 8).
MAX_FDS = 8
#: SET_VRING_KICK/CALL/ERR and the host notifier: bits 0-7 are the ring index ...
VRING_IDX_MASK = 0xFF
#: ... and bit 8 set means no file descriptor is attached.
VRING_NOFD_MASK = 1 << 8
#: The largest config space access (``VHOST_USER_MAX_CONFIG_SIZE`` in QEMU).
MAX_CONFIG_SIZE = 256


class FrontendReq(enum.IntEnum):
    """Requests the front-end (VMM) sends to the back-end (device)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    # 44 is claimed by more than one proposal (GET_SHMEM_CONFIG among them): not assigned.


class BackendReq(enum.IntEnum):
    """Requests the back-end sends to the front-end on the back-end request channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class HeaderFlags(enum.IntFlag):
    """The flags word of the header."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


#: Every flag bit that may be set; anything else is reserved.
VALID_FLAGS = 0xF


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (``VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class ConfigFlags(enum.IntFlag):
    """``flags`` of a config space access."""

    WRITABLE = 0
    MIGRATION = 1


class IotlbPerm(enum.IntEnum):
    """IOTLB access permissions (``VHOST_ACCESS_*``)."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class IotlbType(enum.IntEnum):
    """IOTLB message types (``VHOST_IOTLB_*``)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class TransferDirection(enum.IntEnum):
    """Direction of a device state transfer (SET_DEVICE_STATE_FD)."""

    SAVE = 0
    LOAD = 1


class MigrationPhase(enum.IntEnum):
    """Migration phase of a device state transfer (SET_DEVICE_STATE_FD)."""

    STOPPED = 0


# --- payloads -------------------------------------------------------------------------------


class Payload:
    """Base of the payload layouts. Each knows how to pack itself and to unpack from bytes."""

    __slots__ = ()

    def pack(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        raise NotImplementedError

    @classmethod
    def size_ok(cls, size: int) -> bool:
        raise NotImplementedError


def _fixed(cls_struct: struct.Struct, data: bytes, name: str) -> tuple[int, ...]:
    if len(data) != cls_struct.size:
        raise PayloadSizeError(f"{name} payload is {len(data)} bytes, expected {cls_struct.size}")
    return cls_struct.unpack(data)


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload."""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        if data:
            raise PayloadSizeError(f"expected no payload, got {len(data)} bytes")
        return cls()

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == 0

    def pack(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single 64-bit integer."""

    value: int
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        if not 0 <= self.value < 1 << 64:
            raise InvalidParam(f"u64 value {self.value} out of range")

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        return cls(*_fixed(cls._S, data, "u64"))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        return self._S.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringStatePayload(Payload):
    """A vring state description: ring index and a number."""

    index: int
    num: int
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        VringState(self.index, self.num)  # range check

    @classmethod
    def unpack(cls, data: bytes) -> VringStatePayload:
        return cls(*_fixed(cls._S, data, "vring state"))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    def to_state(self) -> VringState:
        return VringState(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddrPayload(Payload):
    """A vring address description (index, flags, descriptor, used, available, log)."""

    addr: VringAddr
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    @classmethod
    def unpack(cls, data: bytes) -> VringAddrPayload:
        index, flags, desc, used, avail, log = _fixed(cls._S, data, "vring address")
        return cls(VringAddr(index=index, flags=flags, desc=desc, used=used, avail=avail, log=log))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        a = self.addr
        return self._S.pack(a.index, a.flags, a.desc, a.used, a.avail, a.log)


_REGION = struct.Struct("<QQQQ")


def _unpack_region(data: bytes, offset: int) -> MemoryRegion:
    gpa, size, uaddr, mmap_offset = _REGION.unpack_from(data, offset)
    try:
        return MemoryRegion(gpa, size, uaddr, mmap_offset)
    except InvalidParam as exc:
        raise InvalidPayload(f"memory region: {exc}") from None


def _pack_region(region: MemoryRegion) -> bytes:
    return _REGION.pack(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    )


@dataclass(frozen=True, slots=True)
class MemTablePayload(Payload):
    """The SET_MEM_TABLE payload: up to :data:`MAX_MEM_REGIONS` regions, one fd each.

    Decoded regions carry their fd in :attr:`MemoryRegion.fd` (attached by the codec). This is
    the wire layout only; the table that translates addresses in mapped guest memory is
    :class:`vhostkit.virtio.memory.MemoryTable`.
    """

    regions: tuple[MemoryRegion, ...]
    _H: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise TooManyRegions(
                f"{len(self.regions)} regions in a memory table, at most {MAX_MEM_REGIONS}"
            )

    @classmethod
    def unpack(cls, data: bytes) -> MemTablePayload:
        if len(data) < cls._H.size:
            raise PayloadSizeError(f"memory table payload is {len(data)} bytes, too short")
        num, _padding = cls._H.unpack_from(data)
        if num > MAX_MEM_REGIONS:
            raise TooManyRegions(f"memory table lists {num} regions, at most {MAX_MEM_REGIONS}")
        expected = cls._H.size + num * _REGION.size
        if len(data) != expected:
            raise PayloadSizeError(
                f"memory table with {num} regions must be {expected} bytes, got {len(data)}"
            )
        regions = tuple(_unpack_region(data, cls._H.size + i * _REGION.size) for i in range(num))
        return cls(regions)

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size >= cls._H.size and (size - cls._H.size) % _REGION.size == 0

    def pack(self) -> bytes:
        return self._H.pack(len(self.regions), 0) + b"".join(map(_pack_region, self.regions))


@dataclass(frozen=True, slots=True)
class MemRegionMsg(Payload):
    """Single memory region description (ADD_MEM_REG, REM_MEM_REG): 8 bytes padding + region."""

    region: MemoryRegion
    SIZE: ClassVar[int] = 8 + _REGION.size

    @classmethod
    def unpack(cls, data: bytes) -> MemRegionMsg:
        if len(data) != cls.SIZE:
            raise PayloadSizeError(f"memory region payload is {len(data)} bytes, expected 40")
        return cls(_unpack_region(data, 8))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls.SIZE

    def pack(self) -> bytes:
        return bytes(8) + _pack_region(self.region)


@dataclass(frozen=True, slots=True)
class LogDesc(Payload):
    """Log description: size of the dirty log and its offset in the shared file."""

    mmap_size: int
    mmap_offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")

    @classmethod
    def unpack(cls, data: bytes) -> LogDesc:
        return cls(*_fixed(cls._S, data, "log"))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class IotlbMsg(Payload):
    """``struct vhost_iotlb_msg``: iova, size, user address, permissions, type.

    The C struct is 32 bytes (26 of fields, padded to 8-byte alignment); QEMU and DPDK send 32.
    rust-vmm packs it to 26 bytes: both sizes are accepted, 32 is sent.
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")
    _PACKED: ClassVar[struct.Struct] = struct.Struct("<QQQBB")

    @classmethod
    def unpack(cls, data: bytes) -> IotlbMsg:
        if len(data) == cls._S.size:
            fields = cls._S.unpack(data)
        elif len(data) == cls._PACKED.size:
            fields = cls._PACKED.unpack(data)
        else:
            raise PayloadSizeError(f"IOTLB payload is {len(data)} bytes, expected 32 (or 26)")
        iova, size, uaddr, perm, typ = fields
        try:
            return cls(iova, size, uaddr, IotlbPerm(perm), IotlbType(typ))
        except ValueError as exc:
            raise InvalidPayload(f"IOTLB message: {exc}") from None

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size in (cls._S.size, cls._PACKED.size)

    def pack(self) -> bytes:
        return self._S.pack(self.iova, self.size, self.uaddr, self.perm, self.type)


@dataclass(frozen=True, slots=True)
class ConfigPayload(Payload):
    """Virtio device config space access: offset, size, flags, then ``size`` bytes."""

    offset: int
    flags: int
    data: bytes
    _H: ClassVar[struct.Struct] = struct.Struct("<III")

    def __post_init__(self) -> None:
        if len(self.data) > MAX_CONFIG_SIZE:
            raise InvalidParam(f"config access of {len(self.data)} bytes, at most 256")
        if not 0 <= self.offset < 1 << 32:
            raise InvalidParam(f"config offset {self.offset} out of range")

    @property
    def size(self) -> int:
        return len(self.data)

    @classmethod
    def unpack(cls, data: bytes) -> ConfigPayload:
        if len(data) < cls._H.size:
            raise PayloadSizeError(f"config payload is {len(data)} bytes, too short")
        offset, size, flags = cls._H.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise InvalidPayload(f"config access of {size} bytes, at most {MAX_CONFIG_SIZE}")
        if len(data) != cls._H.size + size:
            raise PayloadSizeError(
                f"config payload says {size} bytes of data but carries {len(data) - cls._H.size}"
            )
        return cls(offset, flags, bytes(data[cls._H.size :]))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return cls._H.size <= size <= cls._H.size + MAX_CONFIG_SIZE

    def pack(self) -> bytes:
        return self._H.pack(self.offset, len(self.data), self.flags) + self.data


@dataclass(frozen=True, slots=True)
class VringAreaDesc(Payload):
    """Vring area description (host notifier): u64 (index | flags), size, offset."""

    u64: int
    size: int
    offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def has_fd(self) -> bool:
        return not self.u64 & VRING_NOFD_MASK

    @classmethod
    def unpack(cls, data: bytes) -> VringAreaDesc:
        return cls(*_fixed(cls._S, data, "vring area"))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        return self._S.pack(self.u64, self.size, self.offset)


@dataclass(frozen=True, slots=True)
class InflightDesc(Payload):
    """Inflight description: mmap size, mmap offset, number of queues, queue size.

    QEMU and DPDK send ``sizeof`` of the unpacked C struct, 24 bytes (4 of them padding); the
    fields alone are 20. Both are accepted; 24 is sent.
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")
    _PACKED: ClassVar[struct.Struct] = struct.Struct("<QQHH")

    def __post_init__(self) -> None:
        for name in ("mmap_size", "mmap_offset"):
            if not 0 <= getattr(self, name) < 1 << 64:
                raise InvalidParam(f"inflight {name} {getattr(self, name)} out of range")
        for name in ("num_queues", "queue_size"):  # u16 on the wire
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise InvalidParam(f"inflight {name} {getattr(self, name)} out of range 0..65535")

    @classmethod
    def unpack(cls, data: bytes) -> InflightDesc:
        if len(data) == cls._S.size:
            return cls(*cls._S.unpack(data))
        if len(data) == cls._PACKED.size:
            return cls(*cls._PACKED.unpack(data))
        raise PayloadSizeError(f"inflight payload is {len(data)} bytes, expected 24 (or 20)")

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size in (cls._S.size, cls._PACKED.size)

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """``VhostUserShared``: a 16-byte UUID (first three components big-endian: RFC 4122)."""

    uuid: uuid.UUID

    @classmethod
    def unpack(cls, data: bytes) -> SharedObject:
        if len(data) != 16:
            raise PayloadSizeError(f"shared object payload is {len(data)} bytes, expected 16")
        return cls(uuid.UUID(bytes=bytes(data)))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == 16

    def pack(self) -> bytes:
        return self.uuid.bytes


@dataclass(frozen=True, slots=True)
class DeviceStateParams(Payload):
    """Device state transfer parameters: direction and migration phase."""

    direction: TransferDirection
    phase: MigrationPhase
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def unpack(cls, data: bytes) -> DeviceStateParams:
        direction, phase = _fixed(cls._S, data, "device state")
        try:
            return cls(TransferDirection(direction), MigrationPhase(phase))
        except ValueError as exc:
            raise InvalidPayload(f"device state transfer: {exc}") from None

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls._S.size

    def pack(self) -> bytes:
        return self._S.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class RawPayload(Payload):
    """Bytes the codec does not interpret (crypto sessions: device-specific layouts)."""

    data: bytes

    @classmethod
    def unpack(cls, data: bytes) -> RawPayload:
        return cls(bytes(data))

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return 0 <= size <= MAX_PAYLOAD_SIZE

    def pack(self) -> bytes:
        return self.data


# --- per-request rules ----------------------------------------------------------------------


class FdRule(enum.Enum):
    """How many file descriptors a message carries."""

    NONE = "none"  #: exactly 0
    ONE = "one"  #: exactly 1
    PER_REGION = "per-region"  #: one per memory region of the table
    VRING_FLAG = "vring-flag"  #: 1, or 0 when bit 8 of the u64 (VRING_NOFD_MASK) is set
    OPTIONAL = "optional"  #: 0 or 1
    IGNORED = "ignored"  #: 0 expected; 1 tolerated and closed (REM_MEM_REG)


class ReplyRule(enum.Enum):
    """When the receiver of a request answers it."""

    ALWAYS = "always"  #: a reply with the reply payload, whatever the flags
    ACK = "ack"  #: a u64 status only when NEED_REPLY is set (REPLY_ACK negotiated)
    #: SET_LOG_BASE: a reply when LOG_SHMFD is negotiated. The spec gives it no payload that
    #: means anything, and peers differ (see :func:`classify_log_base_reply`).
    LOG_SHMFD = "log-shmfd"


class LogBaseReply(enum.Enum):
    """The forms of the SET_LOG_BASE reply (LOG_SHMFD) that real back-ends send.

    The spec says the back-end replies once the log is mapped, and says nothing about the
    payload; QEMU reads the reply and ignores what is in it. So all of these mean "mapped":

    * ``EMPTY``: no payload (DPDK's vhost library, quirk "DPDK: empty SET_LOG_BASE reply");
    * ``SIZE_ECHOED``: the u64 log size sent back (libvhost-user: it answers in the same
      buffer, whose first u64 is the size; quirk "libvhost-user: SET_LOG_BASE echoes the size");
    * ``OK``: a u64 status 0 (vhostkit's and rust-vmm's back-ends ack it like REPLY_ACK).

    ``FAILED``: any other u64, a non-zero status from a back-end of the last kind.
    """

    EMPTY = "empty"
    SIZE_ECHOED = "size-echoed"
    OK = "ok"
    FAILED = "failed"


def classify_log_base_reply(payload: Payload, mmap_size: int | None) -> LogBaseReply:
    """Which form of the SET_LOG_BASE reply ``payload`` is, for a request of ``mmap_size``
    (``None``: the size is not known, as for a tracer that missed the request)."""
    if isinstance(payload, Empty):
        return LogBaseReply.EMPTY
    if not isinstance(payload, U64):
        return LogBaseReply.FAILED
    if payload.value == 0:
        return LogBaseReply.OK
    if mmap_size is not None and payload.value == mmap_size:
        return LogBaseReply.SIZE_ECHOED
    return LogBaseReply.FAILED


class ProtocolBitRule(enum.Enum):
    """What a request needs of virtio bit 30, ``VHOST_USER_F_PROTOCOL_FEATURES``."""

    NONE = "none"  #: nothing
    #: the back-end offered bit 30 (GET/SET_PROTOCOL_FEATURES: protocol features exist at all)
    OFFERED = "offered"
    #: bit 30 acked, or protocol features negotiated (SET_VRING_ENABLE; the spec allows
    #: protocol features to be negotiated before SET_FEATURES)
    ACKED = "acked"


@dataclass(frozen=True, slots=True)
class RequestRule:
    """What the protocol says about one request."""

    payload: type[Payload]
    fds: FdRule = FdRule.NONE
    reply: ReplyRule = ReplyRule.ACK
    reply_payload: type[Payload] = U64
    reply_fds: FdRule = FdRule.NONE
    feature: ProtocolFeature | None = None
    protocol_bit: ProtocolBitRule = ProtocolBitRule.NONE


_F = FrontendReq
_P = ProtocolFeature
_A = ReplyRule.ALWAYS
_OFFERED = ProtocolBitRule.OFFERED

FRONTEND_RULES: dict[FrontendReq, RequestRule] = {
    _F.GET_FEATURES: RequestRule(Empty, reply=_A),
    _F.SET_FEATURES: RequestRule(U64),
    _F.SET_OWNER: RequestRule(Empty),
    _F.RESET_OWNER: RequestRule(Empty),
    _F.SET_MEM_TABLE: RequestRule(MemTablePayload, fds=FdRule.PER_REGION),
    _F.SET_LOG_BASE: RequestRule(
        LogDesc, fds=FdRule.ONE, reply=ReplyRule.LOG_SHMFD, feature=_P.LOG_SHMFD
    ),
    _F.SET_LOG_FD: RequestRule(Empty, fds=FdRule.ONE),
    _F.SET_VRING_NUM: RequestRule(VringStatePayload),
    _F.SET_VRING_ADDR: RequestRule(VringAddrPayload),
    _F.SET_VRING_BASE: RequestRule(VringStatePayload),
    _F.GET_VRING_BASE: RequestRule(VringStatePayload, reply=_A, reply_payload=VringStatePayload),
    _F.SET_VRING_KICK: RequestRule(U64, fds=FdRule.VRING_FLAG),
    _F.SET_VRING_CALL: RequestRule(U64, fds=FdRule.VRING_FLAG),
    _F.SET_VRING_ERR: RequestRule(U64, fds=FdRule.VRING_FLAG),
    _F.GET_PROTOCOL_FEATURES: RequestRule(Empty, reply=_A, protocol_bit=_OFFERED),
    _F.SET_PROTOCOL_FEATURES: RequestRule(U64, protocol_bit=_OFFERED),
    _F.GET_QUEUE_NUM: RequestRule(Empty, reply=_A, feature=_P.MQ),
    _F.SET_VRING_ENABLE: RequestRule(VringStatePayload, protocol_bit=ProtocolBitRule.ACKED),
    _F.SEND_RARP: RequestRule(U64, feature=_P.RARP),
    _F.NET_SET_MTU: RequestRule(U64, feature=_P.MTU),
    _F.SET_BACKEND_REQ_FD: RequestRule(Empty, fds=FdRule.ONE, feature=_P.BACKEND_REQ),
    _F.IOTLB_MSG: RequestRule(IotlbMsg),
    _F.SET_VRING_ENDIAN: RequestRule(VringStatePayload, feature=_P.CROSS_ENDIAN),
    _F.GET_CONFIG: RequestRule(
        ConfigPayload, reply=_A, reply_payload=ConfigPayload, feature=_P.CONFIG
    ),
    _F.SET_CONFIG: RequestRule(ConfigPayload, feature=_P.CONFIG),
    _F.CREATE_CRYPTO_SESSION: RequestRule(
        RawPayload, reply=_A, reply_payload=RawPayload, feature=_P.CRYPTO_SESSION
    ),
    _F.CLOSE_CRYPTO_SESSION: RequestRule(U64, feature=_P.CRYPTO_SESSION),
    _F.POSTCOPY_ADVISE: RequestRule(
        Empty, reply=_A, reply_payload=Empty, reply_fds=FdRule.OPTIONAL, feature=_P.PAGEFAULT
    ),
    _F.POSTCOPY_LISTEN: RequestRule(Empty, feature=_P.PAGEFAULT),
    _F.POSTCOPY_END: RequestRule(Empty, feature=_P.PAGEFAULT),
    _F.GET_INFLIGHT_FD: RequestRule(
        InflightDesc,
        reply=_A,
        reply_payload=InflightDesc,
        reply_fds=FdRule.OPTIONAL,
        feature=_P.INFLIGHT_SHMFD,
    ),
    _F.SET_INFLIGHT_FD: RequestRule(InflightDesc, fds=FdRule.ONE, feature=_P.INFLIGHT_SHMFD),
    _F.GPU_SET_SOCKET: RequestRule(Empty, fds=FdRule.ONE),
    _F.RESET_DEVICE: RequestRule(Empty, feature=_P.RESET_DEVICE),
    _F.VRING_KICK: RequestRule(VringStatePayload, feature=_P.INBAND_NOTIFICATIONS),
    _F.GET_MAX_MEM_SLOTS: RequestRule(Empty, reply=_A, feature=_P.CONFIGURE_MEM_SLOTS),
    _F.ADD_MEM_REG: RequestRule(MemRegionMsg, fds=FdRule.ONE, feature=_P.CONFIGURE_MEM_SLOTS),
    _F.REM_MEM_REG: RequestRule(MemRegionMsg, fds=FdRule.IGNORED, feature=_P.CONFIGURE_MEM_SLOTS),
    _F.SET_STATUS: RequestRule(U64, feature=_P.STATUS),
    _F.GET_STATUS: RequestRule(Empty, reply=_A, feature=_P.STATUS),
    _F.GET_SHARED_OBJECT: RequestRule(
        SharedObject, reply=_A, reply_fds=FdRule.OPTIONAL, feature=_P.SHARED_OBJECT
    ),
    _F.SET_DEVICE_STATE_FD: RequestRule(
        DeviceStateParams,
        fds=FdRule.ONE,
        reply=_A,
        reply_fds=FdRule.OPTIONAL,
        feature=_P.DEVICE_STATE,
    ),
    _F.CHECK_DEVICE_STATE: RequestRule(Empty, reply=_A, feature=_P.DEVICE_STATE),
}

_B = BackendReq
BACKEND_RULES: dict[BackendReq, RequestRule] = {
    _B.IOTLB_MSG: RequestRule(IotlbMsg, feature=_P.BACKEND_REQ),
    _B.CONFIG_CHANGE_MSG: RequestRule(Empty, feature=_P.CONFIG),
    _B.VRING_HOST_NOTIFIER_MSG: RequestRule(
        VringAreaDesc, fds=FdRule.VRING_FLAG, feature=_P.HOST_NOTIFIER
    ),
    _B.VRING_CALL: RequestRule(VringStatePayload, feature=_P.INBAND_NOTIFICATIONS),
    _B.VRING_ERR: RequestRule(VringStatePayload, feature=_P.INBAND_NOTIFICATIONS),
    _B.SHARED_OBJECT_ADD: RequestRule(SharedObject, feature=_P.SHARED_OBJECT),
    _B.SHARED_OBJECT_REMOVE: RequestRule(SharedObject, feature=_P.SHARED_OBJECT),
    _B.SHARED_OBJECT_LOOKUP: RequestRule(
        SharedObject, reply=_A, reply_fds=FdRule.OPTIONAL, feature=_P.SHARED_OBJECT
    ),
}

assert set(FRONTEND_RULES) == set(FrontendReq)
assert set(BACKEND_RULES) == set(BackendReq)
