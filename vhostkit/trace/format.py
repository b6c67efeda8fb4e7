"""Rendering trace records: one text line each, or one JSON object each (and back).

Text (what ``vhostkit trace`` prints by default)::

    <t> #<seq> <channel> <dir> <REQUEST> [FLAGS] fds=<n> <payload in words> (reply to #<k>, <rtt>)

``t`` is seconds since the front-end connected; ``channel`` is ``main`` (the socket the
front-end connected to) or ``bchan`` (the back-end request channel set up by
``SET_BACKEND_REQ_FD``); ``dir`` is ``F>B`` (front-end to back-end) or ``B>F``. A malformed
message ends with ``!! MALFORMED: <why>``. Events of the proxy (connections, the back-end
channel being interposed, a stop) are lines with ``--`` in place of the message columns.

JSON (``--json``, and every line of a ``--save`` file): one object per record with the keys
``kind`` (``message``/``event``), ``session``, ``seq``, ``t``, ``channel``, ``dir``,
``request``, ``code``, ``flags``, ``flag_names``, ``size``, ``fds``, ``summary``, ``fields``
(the decoded payload: an object), ``reply_to``, ``rtt`` and ``malformed``. :func:`from_json`
reads such a line back into the same :class:`~vhostkit.trace.decode.TraceRecord`.
"""

from __future__ import annotations

import json
from typing import Any

from vhostkit.errors import InvalidParam
from vhostkit.trace.records import Direction, Group, JsonValue, RecordKind, TraceRecord
from vhostkit.user.codec import Channel

__all__ = ["format_text", "from_json", "to_dict", "to_json"]

_CHANNEL_TEXT = {Channel.MAIN: "main", Channel.BACKEND: "bchan"}


def format_text(rec: TraceRecord) -> str:
    """One human-readable line for ``rec``."""
    head = f"{rec.t:10.6f}"
    if rec.kind is RecordKind.EVENT:
        return f"{head} {'--':<5} {_CHANNEL_TEXT[rec.channel]:<5} --  {rec.summary}"
    parts = [
        head,
        f"#{rec.seq:<4}",
        f"{_CHANNEL_TEXT[rec.channel]:<5}",
        rec.direction.value if rec.direction is not None else "?",
        rec.request,
    ]
    if rec.flag_names:
        parts.append("[" + ",".join(rec.flag_names) + "]")
    if rec.fds:
        parts.append(f"fds={rec.fds}")
    if rec.summary:
        parts.append(rec.summary)
    if rec.reply_to is not None:
        rtt = "" if rec.rtt is None else f", {rec.rtt * 1000:.3f} ms"
        parts.append(f"(reply to #{rec.reply_to}{rtt})")
    if rec.malformed:
        parts.append(f"!! MALFORMED: {rec.malformed}")
    return " ".join(parts)


def _to_plain(value: JsonValue) -> Any:
    if isinstance(value, Group):
        return {k: _to_plain(v) for k, v in value}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(value: Any) -> JsonValue:
    if isinstance(value, dict):
        return Group((str(k), _from_plain(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_from_plain(v) for v in value)
    return value  # type: ignore[no-any-return]


def to_dict(rec: TraceRecord) -> dict[str, Any]:
    """``rec`` as a JSON-able dict."""
    return {
        "kind": rec.kind.value,
        "session": rec.session,
        "seq": rec.seq,
        "t": round(rec.t, 9),
        "channel": rec.channel.value,
        "dir": rec.direction.value if rec.direction is not None else None,
        "request": rec.request,
        "code": rec.code,
        "flags": rec.flags,
        "flag_names": list(rec.flag_names),
        "size": rec.size,
        "fds": rec.fds,
        "summary": rec.summary,
        "fields": {k: _to_plain(v) for k, v in rec.fields},
        "reply_to": rec.reply_to,
        "rtt": None if rec.rtt is None else round(rec.rtt, 9),
        "malformed": rec.malformed,
    }


def to_json(rec: TraceRecord) -> str:
    """``rec`` as one line of JSON (no newline)."""
    return json.dumps(to_dict(rec), separators=(",", ":"))


def from_json(line: str) -> TraceRecord:
    """Read back a line written by :func:`to_json`; :class:`InvalidParam` if it is not one."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise TypeError("not a JSON object")
        direction = obj.get("dir")
        return TraceRecord(
            kind=RecordKind(obj["kind"]),
            session=int(obj["session"]),
            seq=int(obj["seq"]),
            t=float(obj["t"]),
            channel=Channel(obj.get("channel", "main")),
            direction=None if direction is None else Direction(direction),
            request=str(obj.get("request", "")),
            code=obj.get("code"),
            flags=int(obj.get("flags", 0)),
            size=int(obj.get("size", 0)),
            fds=int(obj.get("fds", 0)),
            summary=str(obj.get("summary", "")),
            fields=tuple((str(k), _from_plain(v)) for k, v in obj.get("fields", {}).items()),
            reply_to=obj.get("reply_to"),
            rtt=obj.get("rtt"),
            malformed=obj.get("malformed"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidParam(f"not a trace record: {exc}: {line[:80]!r}") from None
