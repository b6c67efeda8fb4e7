"""The tracer's values and its framer: records of messages, and a byte stream cut into messages.

:class:`Framer` splits one direction of one channel into whole messages, carrying the fds along
as plain numbers; :class:`TraceRecord` is what :class:`~vhostkit.trace.decode.TraceDecoder`
makes of each. Sans-I/O: nothing here touches a socket or owns a file descriptor.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from vhostkit.errors import ProtocolError
from vhostkit.user.codec import Channel
from vhostkit.user.message import HEADER, HEADER_SIZE, HeaderFlags

__all__ = [
    "FRAME_LIMIT",
    "RAW_KEEP",
    "Direction",
    "Framer",
    "FramingError",
    "Group",
    "JsonValue",
    "RawMessage",
    "RecordKind",
    "TraceRecord",
]

#: The largest payload the framer accepts. Bigger than any valid message (the codec's bound is
#: :data:`~vhostkit.user.message.MAX_PAYLOAD_SIZE`, 4 KiB) so that a slightly oversized message
#: is still shown and forwarded; beyond it the stream is taken as out of step.
FRAME_LIMIT = 1 << 16

#: How many payload bytes of a malformed message are kept (hex) in its record.
RAW_KEEP = 64

JsonValue = None | bool | int | float | str | tuple["JsonValue", ...]


class Group(tuple):  # type: ignore[type-arg]
    """An object-valued field: a tuple of ``(name, value)`` pairs (a JSON object in ``--json``).

    A plain tuple value is a JSON array; this subclass tells the two apart and stays hashable.
    """

    __slots__ = ()

    def as_dict(self) -> dict[str, JsonValue]:
        return dict(self)


class Direction(enum.Enum):
    """Who sent a message: the front-end to the back-end, or the other way."""

    TO_BACKEND = "F>B"
    TO_FRONTEND = "B>F"

    @property
    def opposite(self) -> Direction:
        return Direction.TO_FRONTEND if self is Direction.TO_BACKEND else Direction.TO_BACKEND


class RecordKind(enum.Enum):
    """A record is a message, or an event of the proxy (connect, disconnect, interposing)."""

    MESSAGE = "message"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One line of a trace.

    ``t`` is seconds since the front-end connected (the session started). ``seq`` numbers the
    messages of a session from 1 (0 for events). ``request`` is the request's name (``"?"``
    when the header could not be read, ``"UNKNOWN(<n>)"`` for a number the channel does not
    define). ``fields`` holds the decoded payload as ``(name, value)`` pairs of JSON-able
    values, ``summary`` the same in words. A reply has ``reply_to`` (the ``seq`` of the request
    it answers) and ``rtt`` (seconds from that request). ``malformed`` says what is wrong with
    a message that is not valid vhost-user (``None`` when it is).
    """

    kind: RecordKind
    session: int
    seq: int
    t: float
    channel: Channel = Channel.MAIN
    direction: Direction | None = None
    request: str = ""
    code: int | None = None
    flags: int = 0
    size: int = 0
    fds: int = 0
    summary: str = ""
    fields: tuple[tuple[str, JsonValue], ...] = ()
    reply_to: int | None = None
    rtt: float | None = None
    malformed: str | None = None

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def flag_names(self) -> tuple[str, ...]:
        """Names of the flag bits besides the version (``REPLY``, ``NEED_REPLY``, ``bit<n>``)."""
        names = []
        if self.flags & HeaderFlags.REPLY:
            names.append("REPLY")
        if self.flags & HeaderFlags.NEED_REPLY:
            names.append("NEED_REPLY")
        rest = self.flags & ~0xF
        names += [f"bit{b}" for b in range(32) if rest >> b & 1]
        return tuple(names)

    def field(self, name: str, default: JsonValue = None) -> JsonValue:
        """The value of one decoded payload field."""
        for key, value in self.fields:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One framed message: its bytes exactly as received (header and payload) and the fds
    that came with it. ``late_fds``: some fds arrived after the message's first byte (a
    protocol violation; they are kept with the message so they can still be forwarded)."""

    data: bytes
    fds: tuple[int, ...] = ()
    late_fds: bool = False


class FramingError(ProtocolError):
    """The stream cannot be split into messages any more (a header announces an impossible
    payload size: the peers are out of step or it is not vhost-user)."""


class Framer:
    """Splits one direction of one channel into whole messages (sans-I/O).

    :meth:`feed` takes what one ``recvmsg`` returned, bytes and fds (plain numbers: the framer
    never closes or uses them), and returns the messages it completed. Read at most
    :attr:`bytes_needed` bytes at a time and the fds of each read are the fds of the message
    whose bytes it returned, as the kernel attaches them. After :class:`FramingError` the
    framer stays failed; :meth:`take_partial` hands back what it held (the caller closes the
    fds).
    """

    def __init__(self, limit: int = FRAME_LIMIT) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._fds: list[int] = []
        self._late = False
        self._need = HEADER_SIZE  # the header's length, then the whole message's
        self._size_known = False
        self._error: FramingError | None = None

    @property
    def idle(self) -> bool:
        """True between messages (nothing buffered)."""
        return not self._buf and not self._fds

    @property
    def bytes_needed(self) -> int:
        """How many more bytes complete the current header or message (at least 1)."""
        return max(self._need - len(self._buf), 1)

    @property
    def expected_size(self) -> int | None:
        """The whole length of the message being received, once its header is in."""
        return self._need if self._size_known else None

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> list[RawMessage]:
        if self._error is not None:
            raise self._error
        if fds and self._buf:
            self._late = True
        self._fds.extend(fds)
        self._buf += data
        out: list[RawMessage] = []
        while True:
            if not self._size_known:
                if len(self._buf) < HEADER_SIZE:
                    break
                _, _, size = HEADER.unpack_from(self._buf)
                if size > self.limit:
                    self._error = FramingError(
                        f"a header announces a {size}-byte payload (limit {self.limit}): "
                        "the stream is out of step"
                    )
                    raise self._error
                self._need = HEADER_SIZE + size
                self._size_known = True
            if len(self._buf) < self._need:
                break
            msg = RawMessage(bytes(self._buf[: self._need]), tuple(self._fds), self._late)
            del self._buf[: self._need]
            self._fds, self._late = [], False
            self._need, self._size_known = HEADER_SIZE, False
            out.append(msg)
        return out

    def take_partial(self) -> RawMessage:
        """What is buffered of an unfinished message (bytes and fds), and forget it."""
        msg = RawMessage(bytes(self._buf), tuple(self._fds), self._late)
        self._buf.clear()
        self._fds = []
        self._late = False
        self._need, self._size_known = HEADER_SIZE, False
        return msg
