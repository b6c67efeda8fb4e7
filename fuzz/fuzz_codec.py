"""atheris harness: the sans-I/O codec (:class:`MessageParser`, :func:`encode`).

The input is a byte stream fed to a parser in chunks whose sizes come from the input, with
pipe fds arriving with some chunks. Findings (raised as exceptions):

* anything but a :class:`ProtocolError` out of ``feed``; a parser that accepts input after
  it has failed;
* an fd that is neither in a returned message nor closed by the parser;
* a decoded message that does not encode back to the bytes it came from.

Run: ``python3 fuzz/fuzz_codec.py -atheris_runs=100000`` (or ``-max_total_time=SECONDS``).
"""

from __future__ import annotations

import os
import sys

from _common import closed, instrumented, run

with instrumented():
    from vhostkit.errors import ProtocolError
    from vhostkit.user.codec import Channel, Message, MessageParser, encode


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    channel = Channel.BACKEND if data[0] & 1 else Channel.MAIN
    chunk = 1 + (data[0] >> 1)  # 1..128 bytes per feed
    fd_every = data[1]  # attach a pipe fd to every n-th chunk (0: never)
    stream = data[2:]
    parser = MessageParser(channel)
    given: list[int] = []
    pos = 0
    n = 0
    try:
        while pos < len(stream):
            fds: list[int] = []
            if fd_every and n % fd_every == 0:
                r, w = os.pipe()
                os.close(w)
                fds.append(r)
                given.append(r)
            piece = stream[pos : pos + chunk]
            pos += chunk
            n += 1
            for msg in parser.feed(piece, fds):
                try:
                    check_round_trip(channel, msg)
                finally:
                    msg.close_fds()
    except ProtocolError:
        try:
            parser.feed(b"\0", ())
        except ProtocolError:
            pass
        else:
            raise AssertionError("the parser took input after it failed") from None
    finally:
        parser.close()
    left = [fd for fd in given if not closed(fd)]
    for fd in left:
        os.close(fd)
    if left:
        raise AssertionError(f"fds {left} were neither handed on nor closed")


def check_round_trip(channel: Channel, msg: Message) -> None:
    """What the codec decoded, it encodes; and that decodes to the same message."""
    wire, sent = encode(msg)
    assert sent == msg.fds
    if msg.fds:
        return  # re-decoding would need the fds twice
    (again,) = MessageParser(channel).feed(wire, ())
    assert (again.request, again.flags, again.payload) == (msg.request, msg.flags, msg.payload)


if __name__ == "__main__":
    run(one_input)
    sys.exit(0)
