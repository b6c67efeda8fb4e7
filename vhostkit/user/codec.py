"""The sans-I/O vhost-user codec: ``(bytes, fds)`` in, typed :class:`Message` out, and back.

Nothing here touches a socket. A transport hands the codec the bytes it read and the file
descriptors that arrived with them (SCM_RIGHTS ancillary data travels with the first bytes of a
message) and gets typed messages back; to send, it asks :func:`encode` for the bytes and fds.

Every violation is a :class:`vhostkit.errors.ProtocolError` subclass, never an exception from
:mod:`struct` or an index. When a message is rejected, every fd that came with it is closed;
fds beyond what a request takes are never handed on. After a :class:`MessageParser` has raised,
it stays in the error state (the stream can no longer be framed) and raises again.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from vhostkit.errors import (
    BadFlags,
    BadVersion,
    IncorrectFds,
    OversizedMessage,
    PayloadSizeError,
    ProtocolError,
    UnknownRequest,
)
from vhostkit.types import MemoryRegion
from vhostkit.user.message import (
    BACKEND_RULES,
    FRONTEND_RULES,
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    U64,
    VALID_FLAGS,
    VHOST_USER_VERSION,
    VRING_NOFD_MASK,
    BackendReq,
    Empty,
    FdRule,
    FrontendReq,
    HeaderFlags,
    MemTablePayload,
    Payload,
    RequestRule,
    VringAreaDesc,
)

__all__ = [
    "Channel",
    "Header",
    "Message",
    "MessageParser",
    "close_fds",
    "decode",
    "encode",
    "parse_header",
    "rule_for",
]

Request = FrontendReq | BackendReq


class Channel(enum.Enum):
    """Which of the two vhost-user channels a message travels on.

    ``MAIN`` carries front-end requests (and the back-end's replies); ``BACKEND`` is the socket
    handed over with ``SET_BACKEND_REQ_FD`` and carries back-end requests (and the front-end's
    replies).
    """

    MAIN = "main"
    BACKEND = "backend"

    @property
    def requests(self) -> type[FrontendReq] | type[BackendReq]:
        return FrontendReq if self is Channel.MAIN else BackendReq


def rule_for(request: Request) -> RequestRule:
    """The protocol rule for ``request``."""
    if isinstance(request, FrontendReq):
        return FRONTEND_RULES[request]
    return BACKEND_RULES[request]


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header."""

    request: Request
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message: a request or a reply, its payload and its fds.

    The fds belong to whoever holds the message: call :meth:`close_fds` for any you do not
    keep. ``payload`` is :class:`Empty` for a zero-length payload; a reply that is ``Empty``
    where the request's rule has a payload is the conventional "it failed" answer of several
    back-ends (libvhost-user, for GET_CONFIG).
    """

    request: Request
    payload: Payload = field(default_factory=Empty)
    fds: tuple[int, ...] = ()
    flags: int = VHOST_USER_VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def rule(self) -> RequestRule:
        return rule_for(self.request)

    def close_fds(self) -> None:
        close_fds(self.fds)

    def reply(self, payload: Payload, fds: Sequence[int] = ()) -> Message:
        """A reply to this request carrying ``payload``."""
        return Message(self.request, payload, tuple(fds), VHOST_USER_VERSION | HeaderFlags.REPLY)


def _fd_bounds(rule: FdRule, payload: Payload) -> tuple[int, int]:
    """Smallest and largest number of fds a message with this rule and payload may carry."""
    match rule:
        case FdRule.NONE:
            return 0, 0
        case FdRule.ONE:
            return 1, 1
        case FdRule.OPTIONAL | FdRule.IGNORED:
            return 0, 1
        case FdRule.PER_REGION:
            assert isinstance(payload, MemTablePayload)
            n = len(payload.regions)
            return n, n
        case FdRule.VRING_FLAG:
            value = payload.value if isinstance(payload, U64) else None
            if isinstance(payload, VringAreaDesc):
                value = payload.u64
            if value is None:
                return 0, 0
            return (0, 0) if value & VRING_NOFD_MASK else (1, 1)
    raise AssertionError(rule)  # pragma: no cover


def _rules(request: Request, is_reply: bool) -> tuple[type[Payload], FdRule]:
    rule = rule_for(request)
    if is_reply:
        return rule.reply_payload, rule.reply_fds
    return rule.payload, rule.fds


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """The bytes and fds to send for ``msg``; checks the payload type and fd count first."""
    payload_type, fd_rule = _rules(msg.request, msg.is_reply)
    if msg.is_reply and isinstance(msg.payload, Empty) and payload_type is not Empty:
        fd_rule = FdRule.NONE  # the "failed" reply
    elif not isinstance(msg.payload, payload_type):
        raise ProtocolError(
            f"{msg.request.name} {'reply' if msg.is_reply else 'request'} takes "
            f"{payload_type.__name__}, not {type(msg.payload).__name__}"
        )
    lo, hi = _fd_bounds(fd_rule, msg.payload)
    if not lo <= len(msg.fds) <= hi:
        raise IncorrectFds(
            f"{msg.request.name} carries {lo}..{hi} fds, {len(msg.fds)} given", errno=None
        )
    if msg.flags & ~VALID_FLAGS or msg.flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
        raise BadFlags(f"invalid header flags {msg.flags:#x}")
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise OversizedMessage(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return HEADER.pack(int(msg.request), msg.flags, len(body)) + body, tuple(msg.fds)


def parse_header(data: bytes | memoryview, channel: Channel = Channel.MAIN) -> Header:
    """Validate and decode a 12-byte header (what is needed to frame the message)."""
    if len(data) != HEADER_SIZE:
        raise PayloadSizeError(f"a header is {HEADER_SIZE} bytes, got {len(data)}")
    request_no, flags, size = HEADER.unpack(data)
    if flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
        raise BadVersion(f"protocol version {flags & HeaderFlags.VERSION_MASK}, expected 1")
    if flags & ~VALID_FLAGS:
        raise BadFlags(f"reserved header flag bits set: {flags:#x}")
    if size > MAX_PAYLOAD_SIZE:
        raise OversizedMessage(f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}")
    try:
        request = channel.requests(request_no)
    except ValueError:
        raise UnknownRequest(f"unknown {channel.value}-channel request {request_no}") from None
    return Header(request, flags, size)


def decode(header: Header, payload: bytes | memoryview, fds: Sequence[int] = ()) -> Message:
    """Build the typed message for ``header`` + ``payload`` with the fds that came with it.

    On any error every fd in ``fds`` is closed before the error is raised. Where the protocol
    tolerates an fd it does not use (REM_MEM_REG), that fd is closed and not handed on.
    """
    try:
        if len(payload) != header.size:
            raise PayloadSizeError(
                f"{header.request.name}: header says {header.size} bytes, got {len(payload)}"
            )
        payload_type, fd_rule = _rules(header.request, header.is_reply)
        data = bytes(payload)
        body: Payload
        if header.is_reply and not data and payload_type is not Empty:
            body, fd_rule = Empty(), FdRule.NONE
        else:
            if not payload_type.size_ok(len(data)):
                raise PayloadSizeError(
                    f"{header.request.name} {'reply' if header.is_reply else 'request'}: "
                    f"a {len(data)}-byte payload is not a valid {payload_type.__name__}"
                )
            body = payload_type.unpack(data)
        if len(fds) > MAX_FDS:
            raise IncorrectFds(f"{len(fds)} fds in one message, at most {MAX_FDS}")
        lo, hi = _fd_bounds(fd_rule, body)
        kept = tuple(fds)
        if fd_rule is FdRule.IGNORED:
            close_fds(kept)
            kept = ()
        elif not lo <= len(kept) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise IncorrectFds(f"{header.request.name} takes {want} fds, got {len(kept)}")
        if isinstance(body, MemTablePayload):
            body = MemTablePayload(
                tuple(_with_fd(r, fd) for r, fd in zip(body.regions, kept, strict=True))
            )
        return Message(header.request, body, kept, header.flags)
    except BaseException:
        close_fds(fds)
        raise


def _with_fd(region: MemoryRegion, fd: int) -> MemoryRegion:
    return replace(region, fd=fd)


class MessageParser:
    """Incremental decoder for one direction of one channel.

    Feed it whatever the socket returned, with the fds that arrived in the same ``recvmsg``;
    it yields each complete message. Fds are attributed to the message whose first byte they
    arrived with, as the kernel delivers them.
    """

    def __init__(self, channel: Channel = Channel.MAIN) -> None:
        self.channel = channel
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: Header | None = None
        self._error: ProtocolError | None = None

    @property
    def idle(self) -> bool:
        """True between messages (nothing buffered)."""
        return not self._buf and self._header is None and not self._fds

    @property
    def bytes_needed(self) -> int:
        """How many more bytes complete the current header or payload."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add bytes (and the fds that came with them); return the messages now complete."""
        if self._error is not None:
            close_fds(fds)
            raise self._error
        if fds and not self.idle:
            # fds belong to the first byte of a message: arriving mid-message is a violation.
            close_fds(fds)
            self._fail(IncorrectFds("file descriptors arrived in the middle of a message"))
        self._fds.extend(fds)
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                if self._header is None:
                    if len(self._buf) < HEADER_SIZE:
                        break
                    self._header = parse_header(bytes(self._buf[:HEADER_SIZE]), self.channel)
                    del self._buf[:HEADER_SIZE]
                if len(self._buf) < self._header.size:
                    break
                body = bytes(self._buf[: self._header.size])
                del self._buf[: self._header.size]
                fds_now, self._fds = self._fds, []
                header, self._header = self._header, None
                out.append(decode(header, body, fds_now))
        except ProtocolError as exc:
            for m in out:
                m.close_fds()
            self._fail(exc)
        return out

    def _fail(self, exc: ProtocolError) -> None:
        close_fds(self._fds)
        self._fds = []
        self._buf.clear()
        self._header = None
        self._error = exc
        raise exc

    def close(self) -> None:
        """Drop any partial message and close the fds it held."""
        close_fds(self._fds)
        self._fds = []
        self._buf.clear()
        self._header = None
