"""Tracing a vhost-user connection: a transparent proxy that decodes every message.

Put the proxy between a real front-end and a real back-end::

    vhostkit net-backend --socket /tmp/be.sock --tap vm0          # the back-end listens here
    vhostkit trace --listen /tmp/fe.sock --connect /tmp/be.sock    # the proxy listens here
    qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/fe.sock -netdev vhost-user,...

Each message, both ways, is forwarded unchanged with its fds and printed as one line: time
since the front-end connected, message number, channel (``main``, or ``bchan`` for the
back-end request channel, which the proxy interposes on at ``SET_BACKEND_REQ_FD``), direction
(``F>B``/``B>F``), request, flags, fd count, payload in human terms (features by name, memory
regions with sizes, ring addresses and states) and, for a reply, the request it answers and the
round-trip time::

      0.003978 #17   main  F>B SET_VRING_NUM [NEED_REPLY] ring 0 num 256
      0.004140 #18   main  B>F SET_VRING_NUM [REPLY] ok (reply to #17, 0.162 ms)

``--json`` prints one JSON object per line instead; ``--save FILE`` writes the JSON lines to a
file, and ``vhostkit trace show FILE [--filter REQ]`` prints them again. Malformed messages are
marked ``!! MALFORMED: <why>`` and forwarded; a stream that cannot be framed stops the proxy
with a message (exit status 1). SIGINT/SIGTERM stop it cleanly and remove its socket file.

The pieces: :mod:`vhostkit.trace.decode` (sans-I/O framing and decoding into
:class:`TraceRecord`), :mod:`vhostkit.trace.proxy` (:class:`TraceProxy`, the socket pump),
:mod:`vhostkit.trace.format` (text and JSON), :mod:`vhostkit.trace.cli` (the command line).
"""

from vhostkit.trace.decode import (
    Direction,
    Framer,
    FramingError,
    RecordKind,
    TraceDecoder,
    TraceRecord,
)
from vhostkit.trace.format import format_text, from_json, to_json
from vhostkit.trace.proxy import TraceProxy

__all__ = [
    "Direction",
    "Framer",
    "FramingError",
    "RecordKind",
    "TraceDecoder",
    "TraceProxy",
    "TraceRecord",
    "format_text",
    "from_json",
    "to_json",
]
