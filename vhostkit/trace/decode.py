"""Sans-I/O half of the tracer: framing a byte stream and decoding each message into a record.

Nothing here touches a socket or owns a file descriptor. The proxy (:mod:`vhostkit.trace.proxy`)
reads bytes and fds, hands them to a :class:`Framer` (which splits one direction of one channel
into whole messages, carrying the fds along as plain numbers), and gives each whole message to a
:class:`TraceDecoder`, which turns it into a frozen :class:`TraceRecord`: who sent it, on which
channel, the request, its flags, its payload in human terms, how many fds came with it and, for
a reply, which request it answers and after how long.

Decoding uses the project's codec (:func:`vhostkit.user.codec.parse_header` and
:func:`~vhostkit.user.codec.decode`) so the tracer and the real peers agree on what is valid.
The codec closes the fds of a message it rejects; the decoder never gives it real fds, only
placeholders (``-1``, which closing ignores), so a trace cannot close a descriptor the proxy
still has to forward.

A message the codec rejects is still a record: ``malformed`` says why, ``fields`` holds what was
readable (the raw header numbers, the first bytes of the payload). Only a stream that cannot be
*framed* (a header announcing more than :data:`FRAME_LIMIT` bytes: the two sides are out of
step, or it is not vhost-user at all) stops a :class:`Framer`, with :class:`FramingError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntFlag

from vhostkit.errors import ProtocolError
from vhostkit.trace.records import (
    FRAME_LIMIT,
    RAW_KEEP,
    Direction,
    Framer,
    FramingError,
    Group,
    JsonValue,
    RawMessage,
    RecordKind,
    TraceRecord,
)
from vhostkit.types import VHOST_VRING_F_LOG, MemoryRegion
from vhostkit.user.codec import Channel, Message, decode, parse_header, rule_for
from vhostkit.user.message import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    U64,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    ConfigPayload,
    DeviceStateParams,
    Empty,
    FrontendReq,
    HeaderFlags,
    InflightDesc,
    IotlbMsg,
    LogBaseReply,
    LogDesc,
    MemRegionMsg,
    MemTablePayload,
    Payload,
    ProtocolFeature,
    RawPayload,
    ReplyRule,
    SharedObject,
    VringAddrPayload,
    VringAreaDesc,
    VringStatePayload,
    classify_log_base_reply,
)
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature, feature_names

__all__ = [
    "FRAME_LIMIT",
    "Direction",
    "Framer",
    "FramingError",
    "Group",
    "RawMessage",
    "RecordKind",
    "TraceDecoder",
    "TraceRecord",
    "human_size",
]

# --- human terms ----------------------------------------------------------------------------

_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def human_size(n: int) -> str:
    """``655360`` -> ``"640 KiB"``; exact where it divides, one decimal otherwise."""
    for unit, name in _UNITS:
        if n >= unit:
            return f"{n // unit} {name}" if n % unit == 0 else f"{n / unit:.1f} {name}"
    return f"{n} B"


def _flag_names(value: int, table: type[IntFlag]) -> list[str]:
    names = []
    for bit in range(max(value.bit_length(), 1)):
        if value >> bit & 1:
            try:
                name = table(1 << bit).name
            except ValueError:
                name = None
            names.append(name or f"bit{bit}")
    return names


def _names_text(names: Sequence[str]) -> str:
    return "<" + "|".join(names) + ">" if names else "<>"


class _Described:
    """Builds the fields and the summary of one payload."""

    def __init__(self) -> None:
        self.fields: list[tuple[str, JsonValue]] = []
        self.words: list[str] = []

    def add(self, name: str, value: JsonValue, text: str | None = None) -> None:
        self.fields.append((name, value))
        if text is not None:
            self.words.append(text)


def _region_fields(d: _Described, r: MemoryRegion, prefix: str = "") -> None:
    d.add(
        f"{prefix}region",
        Group(
            (
                ("gpa", r.guest_phys_addr),
                ("size", r.memory_size),
                ("uva", r.userspace_addr),
                ("mmap_offset", r.mmap_offset),
            )
        ),
        f"gpa {r.guest_phys_addr:#x}-{r.guest_end:#x} ({human_size(r.memory_size)}) "
        f"uva {r.userspace_addr:#x} off {r.mmap_offset:#x}",
    )


# --- the decoder ----------------------------------------------------------------------------

_F = FrontendReq
_B = BackendReq
_U64_REPLY_MEANING = {
    _F.GET_FEATURES: "features",
    _F.GET_PROTOCOL_FEATURES: "protocol_features",
    _F.GET_QUEUE_NUM: "queues",
    _F.GET_MAX_MEM_SLOTS: "mem_slots",
    _F.GET_STATUS: "status",
}


@dataclass(slots=True)
class _Pending:
    seq: int
    t: float


@dataclass(slots=True)
class _SessionState:
    acked_features: int = 0
    protocol_features: int = 0
    #: the size in the last SET_LOG_BASE request (its reply may echo it)
    log_size: int | None = None
    pending: dict[tuple[Channel, Direction, int], deque[_Pending]] = field(default_factory=dict)


class TraceDecoder:
    """Decodes the messages of one session (one front-end connection) into records.

    It numbers the messages, pairs each reply with the oldest unanswered request of the same
    number on the same channel, and follows the negotiation (acked features, protocol
    features) to name what it sees. ``device``: the table naming device-specific feature bits
    (virtio-net by default; :class:`vhostkit.virtio.blk.BlkFeature` for a disk; ``None`` for
    transport bits only). Not thread-safe: one decoder per session, fed by one pump.
    """

    #: Unanswered requests kept per (channel, direction, request): bounds memory on a peer
    #: that never answers.
    MAX_PENDING = 64

    def __init__(self, session: int = 1, device: type[IntFlag] | None = VirtioNetFeature) -> None:
        self.session = session
        self.device = device
        self._seq = 0
        self._state = _SessionState()

    def event(self, t: float, text: str, *, channel: Channel = Channel.MAIN) -> TraceRecord:
        """A record for something the proxy did or saw (not a message)."""
        return TraceRecord(RecordKind.EVENT, self.session, 0, t, channel, summary=text)

    def decode(
        self,
        channel: Channel,
        direction: Direction,
        data: bytes,
        nfds: int,
        t: float,
        *,
        late_fds: bool = False,
    ) -> TraceRecord:
        """The record of one whole message (``data`` = header + payload, as framed)."""
        self._seq += 1
        seq = self._seq
        if len(data) < HEADER_SIZE:
            return self._malformed(
                channel, direction, seq, t, data, nfds, f"{len(data)}-byte message, no header"
            )
        code, flags, size = HEADER.unpack_from(data)
        payload = data[HEADER_SIZE:]
        name = _request_name(channel, code)
        problems: list[str] = []
        if late_fds:
            problems.append("file descriptors arrived after the message's first byte")
        msg: Message | None = None
        try:
            header = parse_header(data[:HEADER_SIZE], channel)
            msg = decode(header, payload, (-1,) * nfds)  # placeholders: nothing real to close
        except ProtocolError as exc:
            problems.insert(0, str(exc))
        if msg is not None:
            problems += self._direction_problems(channel, direction, msg)
        d = _Described()
        if msg is not None:
            try:
                self._describe(d, channel, msg)
            except (ValueError, KeyError) as exc:  # a value the naming tables cannot render
                problems.append(f"payload not describable: {exc}")
        else:
            d.add("raw", payload[:RAW_KEEP].hex(), _raw_text(payload))
        reply_to = rtt = None
        if flags & HeaderFlags.REPLY:
            pending = self._state.pending.get((channel, direction.opposite, code))
            if pending:
                req = pending.popleft()
                reply_to, rtt = req.seq, t - req.t
            else:
                problems.append("a reply to no outstanding request")
        elif self._expects_reply(channel, code, flags):
            queue = self._state.pending.setdefault((channel, direction, code), deque())
            queue.append(_Pending(seq, t))
            while len(queue) > self.MAX_PENDING:
                queue.popleft()
        return TraceRecord(
            RecordKind.MESSAGE,
            self.session,
            seq,
            t,
            channel,
            direction,
            name,
            code,
            flags,
            size,
            nfds,
            " ".join(d.words),
            tuple(d.fields),
            reply_to,
            rtt,
            "; ".join(problems) or None,
        )

    def truncated(
        self, channel: Channel, direction: Direction, data: bytes, nfds: int, t: float
    ) -> TraceRecord:
        """The record of a message the peer stopped sending halfway (it closed the socket)."""
        self._seq += 1
        if len(data) >= HEADER_SIZE:
            _, _, size = HEADER.unpack_from(data)
            why = f"peer closed mid-message: {len(data) - HEADER_SIZE} of {size} payload bytes"
        else:
            why = f"peer closed mid-message: {len(data)} of {HEADER_SIZE} header bytes"
        return self._malformed(channel, direction, self._seq, t, data, nfds, why)

    def unframeable(
        self, channel: Channel, direction: Direction, data: bytes, nfds: int, t: float, why: str
    ) -> TraceRecord:
        """The record of the header that made the stream unframeable."""
        self._seq += 1
        return self._malformed(channel, direction, self._seq, t, data, nfds, why)

    # -- internals --

    def _malformed(
        self,
        channel: Channel,
        direction: Direction,
        seq: int,
        t: float,
        data: bytes,
        nfds: int,
        why: str,
    ) -> TraceRecord:
        code = flags = size = None
        d = _Described()
        if len(data) >= HEADER_SIZE:
            code, flags, size = HEADER.unpack_from(data)
            data = data[HEADER_SIZE:]
        else:
            d.add("header", data.hex())
        d.add("raw", data[:RAW_KEEP].hex(), _raw_text(data) if data else None)
        return TraceRecord(
            RecordKind.MESSAGE,
            self.session,
            seq,
            t,
            channel,
            direction,
            "?" if code is None else _request_name(channel, code),
            code,
            flags or 0,
            size or 0,
            nfds,
            " ".join(d.words),
            tuple(d.fields),
            malformed=why,
        )

    @staticmethod
    def _direction_problems(channel: Channel, direction: Direction, msg: Message) -> list[str]:
        requester = Direction.TO_BACKEND if channel is Channel.MAIN else Direction.TO_FRONTEND
        if msg.is_reply and direction is requester:
            return ["a reply sent by the side that makes the requests on this channel"]
        if not msg.is_reply and direction is not requester:
            return ["a request sent by the side that answers on this channel"]
        return []

    def _expects_reply(self, channel: Channel, code: int, flags: int) -> bool:
        if flags & HeaderFlags.NEED_REPLY:
            return True
        try:
            request = channel.requests(code)
        except ValueError:
            return False
        rule = rule_for(request)
        if rule.reply is ReplyRule.ALWAYS:
            return True
        return rule.reply is ReplyRule.LOG_SHMFD and bool(
            self._state.protocol_features & ProtocolFeature.LOG_SHMFD
        )

    def _features(self, d: _Described, name: str, value: int) -> None:
        names = feature_names(value, self.device)
        d.add(name, value)
        d.add(f"{name}_names", tuple(names), f"{name} {value:#x} {_names_text(names)}")

    def _protocol(self, d: _Described, name: str, value: int) -> None:
        names = _flag_names(value, ProtocolFeature) if value else []
        d.add(name, value)
        d.add(f"{name}_names", tuple(names), f"{name} {value:#x} {_names_text(names)}")

    def _status(self, d: _Described, value: int) -> None:
        names = _flag_names(value, DeviceStatus) if value else []
        d.add("status", value)
        d.add("status_names", tuple(names), f"status {value:#x} {_names_text(names)}")

    def _vring_base(self, d: _Described, num: int) -> None:
        if self._state.acked_features & VirtioFeature.RING_PACKED:
            idx, wrap = num & 0x7FFF, num >> 15 & 1
            d.add("base", num, f"base {num:#x} (packed: idx {idx} wrap {wrap})")
        else:
            d.add("base", num, f"base {num}")

    def _describe(self, d: _Described, channel: Channel, msg: Message) -> None:
        p: Payload = msg.payload
        req = msg.request
        reply = msg.is_reply
        if reply and req is _F.SET_LOG_BASE:
            self._log_base_reply(d, p)
            return
        if isinstance(p, Empty):
            if reply and msg.rule.reply_payload is not Empty:
                d.add("empty_reply", True, "empty reply (the request failed)")
            return
        if isinstance(p, U64):
            self._describe_u64(d, req, reply, p.value)
        elif isinstance(p, VringStatePayload):
            d.add("ring", p.index, f"ring {p.index}")
            if req is _F.SET_VRING_NUM:
                d.add("num", p.num, f"num {p.num}")
            elif req in (_F.SET_VRING_BASE,) or (req is _F.GET_VRING_BASE and reply):
                self._vring_base(d, p.num)
            elif req is _F.SET_VRING_ENABLE:
                d.add("enable", p.num, "enable" if p.num == 1 else f"disable ({p.num})")
            elif req is _F.SET_VRING_ENDIAN:
                endian = {0: "little-endian", 1: "big-endian"}.get(p.num, f"endian {p.num}")
                d.add("endian", p.num, endian)
            elif req in (_F.VRING_KICK,) or (req is _F.GET_VRING_BASE and not reply):
                if p.num:
                    d.add("num", p.num, f"num {p.num}")
            else:
                d.add("num", p.num, f"num {p.num}")
        elif isinstance(p, VringAddrPayload):
            a = p.addr
            d.add("ring", a.index, f"ring {a.index}")
            d.add("desc", a.desc, f"desc {a.desc:#x}")
            d.add("avail", a.avail, f"avail {a.avail:#x}")
            d.add("used", a.used, f"used {a.used:#x}")
            d.add("log", a.log, f"log {a.log:#x}" if a.log or a.flags & VHOST_VRING_F_LOG else None)
            d.add("flags", a.flags, ("flags LOG" if a.flags == 1 else f"flags {a.flags:#x}")
                  if a.flags else None)  # fmt: skip
        elif isinstance(p, MemTablePayload):
            total = sum(r.memory_size for r in p.regions)
            n = len(p.regions)
            d.add("nregions", n, f"{n} region{'s' if n != 1 else ''} ({human_size(total)}):")
            regions = []
            for i, r in enumerate(p.regions):
                sub = _Described()
                _region_fields(sub, r)
                regions.append(sub.fields[0][1])
                d.words.append(f"[{i}] {sub.words[0]}" + (";" if i + 1 < len(p.regions) else ""))
            d.fields.append(("regions", tuple(regions)))
        elif isinstance(p, MemRegionMsg):
            _region_fields(d, p.region)
        elif isinstance(p, LogDesc):
            self._state.log_size = p.mmap_size
            d.add("mmap_size", p.mmap_size, f"log {human_size(p.mmap_size)}")
            d.add("mmap_offset", p.mmap_offset, f"at offset {p.mmap_offset:#x}")
        elif isinstance(p, IotlbMsg):
            d.add("type", p.type.name, p.type.name)
            d.add("iova", p.iova, f"iova {p.iova:#x}")
            d.add("size", p.size, f"size {human_size(p.size)}")
            d.add("uaddr", p.uaddr, f"uaddr {p.uaddr:#x}")
            d.add("perm", p.perm.name, f"perm {p.perm.name}")
        elif isinstance(p, ConfigPayload):
            d.add("offset", p.offset, f"offset {p.offset}")
            d.add("size", p.size, f"size {p.size}")
            d.add("flags", p.flags, f"flags {p.flags:#x}" if p.flags else None)
            if req is _F.SET_CONFIG or reply:
                d.add("data", p.data.hex(), f"data {_hex_text(p.data)}")
        elif isinstance(p, InflightDesc):
            d.add("mmap_size", p.mmap_size, f"mmap {human_size(p.mmap_size)}" if p.mmap_size
                  else "mmap 0")  # fmt: skip
            d.add("mmap_offset", p.mmap_offset, f"offset {p.mmap_offset:#x}")
            d.add("num_queues", p.num_queues, f"queues {p.num_queues}")
            d.add("queue_size", p.queue_size, f"queue size {p.queue_size}")
        elif isinstance(p, VringAreaDesc):
            d.add("ring", p.index, f"ring {p.index}" + ("" if p.has_fd else " (no fd: unmap)"))
            d.add("size", p.size, f"size {human_size(p.size)}")
            d.add("offset", p.offset, f"offset {p.offset:#x}")
        elif isinstance(p, SharedObject):
            d.add("uuid", str(p.uuid), f"uuid {p.uuid}")
        elif isinstance(p, DeviceStateParams):
            d.add("direction", p.direction.name, f"direction {p.direction.name}")
            d.add("phase", p.phase.name, f"phase {p.phase.name}")
        elif isinstance(p, RawPayload):
            d.add("raw", p.data[:RAW_KEEP].hex(), _raw_text(p.data))
        else:  # pragma: no cover - every payload type of message.py is handled above
            d.add("payload", type(p).__name__, type(p).__name__)

    def _log_base_reply(self, d: _Described, p: Payload) -> None:
        """SET_LOG_BASE's reply comes in several forms, all meaning "mapped" but one."""
        form = classify_log_base_reply(p, self._state.log_size)
        value = p.value if isinstance(p, U64) else None
        text = {
            LogBaseReply.EMPTY: "log mapped (empty reply, as DPDK sends it)",
            LogBaseReply.SIZE_ECHOED: f"log mapped (size {value} echoed, as libvhost-user does)",
            LogBaseReply.OK: "ok",
            LogBaseReply.FAILED: f"failed ({value})",
        }[form]
        d.add("log_base_reply", form.value, text)
        if value is not None:
            d.add("u64", value)

    def _describe_u64(
        self, d: _Described, req: FrontendReq | BackendReq, reply: bool, value: int
    ) -> None:
        if isinstance(req, FrontendReq) and not reply:
            match req:
                case _F.SET_FEATURES:
                    self._state.acked_features = value
                    self._features(d, "features", value)
                case _F.SET_PROTOCOL_FEATURES:
                    self._state.protocol_features = value
                    self._protocol(d, "protocol_features", value)
                case _F.SET_VRING_KICK | _F.SET_VRING_CALL | _F.SET_VRING_ERR:
                    index, nofd = value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK)
                    d.add("ring", index, f"ring {index}")
                    d.add("nofd", nofd, "no fd (polling)" if nofd else None)
                    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
                        d.add("u64", value, f"u64 {value:#x}")
                case _F.SEND_RARP:
                    mac = value.to_bytes(8, "little")[:6]
                    d.add("mac", mac.hex(":"), f"mac {mac.hex(':')}")
                case _F.NET_SET_MTU:
                    d.add("mtu", value, f"mtu {value}")
                case _F.SET_STATUS:
                    self._status(d, value)
                case _F.CLOSE_CRYPTO_SESSION:
                    d.add("session_id", value, f"session {value}")
                case _:
                    d.add("u64", value, f"u64 {value:#x}")
            return
        if reply and req in _U64_REPLY_MEANING:
            meaning = _U64_REPLY_MEANING[req]  # type: ignore[index]
            if meaning == "features":
                self._features(d, "features", value)
            elif meaning == "protocol_features":
                self._protocol(d, "protocol_features", value)
            elif meaning == "status":
                self._status(d, value)
            else:
                d.add(meaning, value, f"{meaning.replace('_', ' ')} {value}")
            return
        if reply and req is _F.SET_DEVICE_STATE_FD:
            code, nofd = value & 0xFF, bool(value & VRING_NOFD_MASK)
            d.add("result", code, "ok" if not code else f"failed ({code})")
            d.add("invalid_fd", nofd, "no fd back: use the front-end's" if nofd else None)
            return
        if reply:  # a REPLY_ACK status, CHECK_DEVICE_STATE, a back-end request's ack
            d.add("status", value, "ok" if value == 0 else f"failed ({value})")
            return
        d.add("u64", value, f"u64 {value:#x}")  # pragma: no cover - no BackendReq sends a u64


def _request_name(channel: Channel, code: int) -> str:
    try:
        return channel.requests(code).name
    except ValueError:
        return f"UNKNOWN({code})"


def _hex_text(data: bytes, keep: int = 16) -> str:
    text = data[:keep].hex()
    return text + ("..." if len(data) > keep else "") if data else "-"


def _raw_text(data: bytes) -> str:
    return f"{len(data)} bytes {_hex_text(data)}"


assert FRAME_LIMIT > MAX_PAYLOAD_SIZE
