"""The socket pump of the tracer: a transparent vhost-user proxy that reports every message.

:class:`TraceProxy` listens at one path (where the front-end connects) and, for each front-end
that connects, connects to the back-end at another path. It then forwards every message both
ways, byte for byte, with the fds that came with it (SCM_RIGHTS), and hands each message to a
:class:`~vhostkit.trace.decode.TraceDecoder`; the records go to a ``sink`` callable.

Forwarding works per message: a message is read whole (header, then exactly the payload it
announces, so the fds of a read are the fds of that message) and sent on in one ``sendmsg``
with its fds; the proxy then closes its own copies of them. One exception:
``SET_BACKEND_REQ_FD`` carries the front-end's end of the back-end request channel; the proxy
keeps it and gives the back-end one end of a socketpair of its own instead, so the back-end's
requests (CONFIG_CHANGE_MSG, ...) and the front-end's replies on that channel pass through the
proxy and are traced too.

Malformed messages are reported (``malformed`` in the record) and forwarded anyway: the peer
that receives them decides. A stream that cannot be framed (see
:class:`~vhostkit.trace.decode.FramingError`) ends the proxy: :meth:`TraceProxy.serve` returns
with :attr:`TraceProxy.failure` set, after reporting it. A peer that closes the connection,
even in the middle of a message, ends only that session: what it had sent of the unfinished
message is reported (and forwarded), both connections are closed and the listener accepts the
next front-end. One session at a time: a second front-end waits in the listen backlog until
the first is gone.

Everything runs in the thread that calls :meth:`serve` (a ``selectors`` loop); :meth:`stop`
may be called from any thread or a signal handler (it writes to a wakeup socket, which can also
be given to :func:`signal.set_wakeup_fd`: see :attr:`TraceProxy.wakeup_fd`). Sends block: a
peer that stops reading stalls the proxy (as it would stall its real peer).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Self

from vhostkit.errors import InvalidOperation, SocketConnect, error_from_errno
from vhostkit.trace.decode import (
    Direction,
    Framer,
    FramingError,
    RawMessage,
    TraceDecoder,
    TraceRecord,
)
from vhostkit.user.codec import Channel, close_fds
from vhostkit.user.message import HEADER, HEADER_SIZE, FrontendReq, HeaderFlags
from vhostkit.virtio.features import VirtioNetFeature

__all__ = ["TraceProxy"]

log = logging.getLogger(__name__)

#: Room for this many fds per read (more than any valid message has: extras are still relayed).
RELAY_FDS = 32
_CMSG_SPACE = socket.CMSG_SPACE(RELAY_FDS * array.array("i").itemsize)

Sink = Callable[[TraceRecord], None]


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _is_stream_socket(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        with socket.socket(fileno=os.dup(fd)) as s:
            return s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
    except OSError:
        return False


@dataclass(slots=True)
class _Stream:
    """One direction of one channel: read from ``src``, forward to ``dst``."""

    src: socket.socket
    dst: socket.socket
    channel: Channel
    direction: Direction
    framer: Framer


class _PeerGone(Exception):
    """A socket of the session failed or reached EOF (``channel`` says which)."""

    def __init__(self, channel: Channel, why: str) -> None:
        super().__init__(why)
        self.channel = channel


class _Session:
    """One front-end connection and the back-end connection made for it (owns both, and the
    back-end channel's two sockets once interposed)."""

    def __init__(
        self,
        number: int,
        fe: socket.socket,
        be: socket.socket,
        device: type[IntFlag] | None,
    ) -> None:
        self.number = number
        self.t0 = time.monotonic()
        self.decoder = TraceDecoder(number, device)
        self.fe = fe
        self.be = be
        self.main = [
            _Stream(fe, be, Channel.MAIN, Direction.TO_BACKEND, Framer()),
            _Stream(be, fe, Channel.MAIN, Direction.TO_FRONTEND, Framer()),
        ]
        self.bchan: list[_Stream] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def streams(self) -> list[_Stream]:
        return self.main + self.bchan

    def close_bchan(self) -> list[_Stream]:
        old, self.bchan = self.bchan, []
        for s in old:
            close_fds(s.framer.take_partial().fds)
        for s in old[:1]:
            s.src.close()  # the back-end-side socket of the pair
            s.dst.close()  # the front-end's end of its channel
        return old

    def close(self) -> None:
        self.close_bchan()
        for s in self.main:
            close_fds(s.framer.take_partial().fds)
        self.fe.close()
        self.be.close()


class TraceProxy:
    """A tracing vhost-user proxy: listens at ``listen``, connects to ``connect``.

    ``sink`` receives every record (messages and events) in the order the proxy saw them.
    ``device`` names device-specific feature bits (see :class:`TraceDecoder`).
    ``connect_timeout``: how long to keep trying to reach the back-end when a front-end
    connects (it may still be starting). ``max_sessions``: stop after that many front-end
    connections ended (``None``: serve until :meth:`stop`).

    The listening socket is made in the constructor (a stale socket file is replaced, any
    other file is refused) and removed by :meth:`close`.
    """

    def __init__(
        self,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        sink: Sink,
        *,
        device: type[IntFlag] | None = VirtioNetFeature,
        connect_timeout: float = 5.0,
        max_sessions: int | None = None,
    ) -> None:
        self.listen_path = os.fspath(listen)
        self.connect_path = os.fspath(connect)
        self.sink = sink
        self.device = device
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        #: Why :meth:`serve` gave up (a stream it could not frame), or ``None``.
        self.failure: str | None = None
        #: The signal that stopped the proxy, when :attr:`wakeup_fd` carried one.
        self.stop_signal: signal.Signals | None = None
        self.sessions = 0
        self._session: _Session | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False
        try:
            self._listener = self._bind(self.listen_path)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            self._sel.close()
            raise

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise InvalidOperation(f"{path} exists and is not a socket")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise error_from_errno(exc.errno or 0, f"listen on {path}") from exc
        return sock

    @property
    def wakeup_fd(self) -> int:
        """A non-blocking fd whose being written to stops :meth:`serve` (for
        :func:`signal.set_wakeup_fd`: the signal number written is kept in
        :attr:`stop_signal`)."""
        return self._wake_w.fileno()

    def stop(self) -> None:
        """Ask :meth:`serve` to return (safe from any thread or a signal handler)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the loop --

    def serve(self) -> None:
        """Forward and trace until :meth:`stop`, a signal on :attr:`wakeup_fd`,
        ``max_sessions``, or a stream that cannot be framed (:attr:`failure`)."""
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        try:
            while True:
                for key, _ in self._sel.select():
                    what = key.data
                    if what == "wake":
                        self._woken()
                        return
                    if what == "listen":
                        self._accept()
                    elif self._session is not None:
                        self._pump(what)
                    if self.failure is not None:
                        return
                    if (
                        self.max_sessions is not None
                        and self.sessions >= self.max_sessions
                        and self._session is None
                    ):
                        return
                    break  # the selector map may have changed: select again
        finally:
            self._end_session(None)
            for obj in (self._wake_r, self._listener):
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(obj)

    def _woken(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            data = self._wake_r.recv(64)
        sig = next((b for b in data if b), None)
        if sig is not None:
            with contextlib.suppress(ValueError):
                self.stop_signal = signal.Signals(sig)
        t = self._session.now() if self._session is not None else 0.0
        why = f"on {self.stop_signal.name}" if self.stop_signal is not None else "on request"
        self._emit(self._decoder().event(t, f"proxy stopping {why}"))

    def _decoder(self) -> TraceDecoder:
        if self._session is not None:
            return self._session.decoder
        return TraceDecoder(self.sessions, self.device)

    def _emit(self, rec: TraceRecord) -> None:
        try:
            self.sink(rec)
        except Exception:  # a broken sink must not take the peers' connection down
            log.exception("trace sink failed")

    # -- sessions --

    def _accept(self) -> None:
        try:
            fe, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        fe.set_inheritable(False)
        self.sessions += 1
        number = self.sessions
        try:
            be = self._connect_backend()
        except (OSError, SocketConnect) as exc:
            rec = TraceDecoder(number, self.device).event(
                0.0, f"session {number}: cannot reach the back-end at {self.connect_path}: {exc}"
            )
            self._emit(rec)
            fe.close()
            return
        session = _Session(number, fe, be, self.device)
        self._session = session
        self._sel.unregister(self._listener)  # one session at a time: the next one waits
        for s in session.main:
            self._sel.register(s.src, selectors.EVENT_READ, s)
        self._emit(
            session.decoder.event(
                0.0,
                f"session {number}: front-end connected to {self.listen_path}, "
                f"proxying to {self.connect_path}",
            )
        )

    def _connect_backend(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.connect_path)
                return sock
            except OSError as exc:
                sock.close()
                retry = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
                if not retry or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)  # the back-end's socket does not exist yet: nothing to wait on

    def _end_session(self, why: str | None, channel: Channel = Channel.MAIN) -> None:
        session = self._session
        if session is None:
            return
        for s in session.streams:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s.src)
        if why is not None:
            self._emit(session.decoder.event(session.now(), why, channel=channel))
        session.close()
        self._session = None
        if not self._closed and self.failure is None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.register(self._listener, selectors.EVENT_READ, "listen")

    def _end_bchan(self, session: _Session, why: str) -> None:
        for s in session.bchan:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s.src)
        self._emit(session.decoder.event(session.now(), why, channel=Channel.BACKEND))
        session.close_bchan()

    # -- forwarding --

    def _pump(self, stream: _Stream) -> None:
        session = self._session
        assert session is not None
        try:
            self._read(session, stream)
        except _PeerGone as gone:
            if gone.channel is Channel.MAIN:
                self._end_session(f"session {session.number}: {gone}; session closed")
            else:
                self._end_bchan(session, f"back-end channel: {gone}; channel closed")

    def _side(self, direction: Direction) -> str:
        return "front-end" if direction is Direction.TO_BACKEND else "back-end"

    def _read(self, session: _Session, stream: _Stream) -> None:
        sender = self._side(stream.direction)
        try:
            data, anc, flags, _ = stream.src.recvmsg(
                stream.framer.bytes_needed, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _PeerGone(stream.channel, f"{sender} socket failed: {exc}") from None
        fds = _fds_from_ancillary(anc)
        if flags & socket.MSG_CTRUNC:
            self._emit(
                session.decoder.event(
                    session.now(),
                    f"the {sender} sent more than {RELAY_FDS} fds in one message: the kernel "
                    "dropped the rest (the message is forwarded with the fds that arrived)",
                    channel=stream.channel,
                )
            )
        if not data:
            close_fds(fds)
            partial = stream.framer.take_partial()
            if partial.data or partial.fds:
                self._emit(
                    session.decoder.truncated(
                        stream.channel,
                        stream.direction,
                        partial.data,
                        len(partial.fds),
                        session.now(),
                    )
                )
                with contextlib.suppress(OSError):
                    self._send(stream.dst, partial.data, partial.fds)
                close_fds(partial.fds)
            raise _PeerGone(stream.channel, f"{sender} closed the connection")
        try:
            messages = stream.framer.feed(data, fds)
        except FramingError as exc:
            partial = stream.framer.take_partial()
            close_fds(partial.fds)
            self.failure = (
                f"cannot frame the {sender}'s {_channel_words(stream.channel)} stream: {exc}"
            )
            self._emit(
                session.decoder.unframeable(
                    stream.channel,
                    stream.direction,
                    partial.data,
                    len(partial.fds),
                    session.now(),
                    str(exc),
                )
            )
            self._end_session(f"session {session.number}: {self.failure}; proxy stopping")
            return
        for msg in messages:
            self._forward(session, stream, msg)

    def _forward(self, session: _Session, stream: _Stream, msg: RawMessage) -> None:
        rec = session.decoder.decode(
            stream.channel,
            stream.direction,
            msg.data,
            len(msg.fds),
            session.now(),
            late_fds=msg.late_fds,
        )
        self._emit(rec)
        out_fds = msg.fds
        keep: set[int] = set()
        pair_end: socket.socket | None = None
        if (
            stream.channel is Channel.MAIN
            and stream.direction is Direction.TO_BACKEND
            and _is_set_backend_req_fd(msg.data)
            and len(msg.fds) == 1
            and _is_stream_socket(msg.fds[0])
        ):
            pair_end = self._interpose(session, msg.fds[0])
            keep.add(msg.fds[0])
            out_fds = (pair_end.fileno(),)
        try:
            self._send(stream.dst, msg.data, out_fds)
        except OSError as exc:
            receiver = self._side(stream.direction.opposite)
            raise _PeerGone(stream.channel, f"sending to the {receiver} failed: {exc}") from None
        finally:
            close_fds(fd for fd in msg.fds if fd not in keep)
            if pair_end is not None:
                pair_end.close()

    def _interpose(self, session: _Session, fe_fd: int) -> socket.socket:
        """Put the proxy in the middle of the back-end channel; returns the socket end to
        hand to the back-end (the caller closes it once sent)."""
        if session.bchan:
            self._end_bchan(session, "back-end channel replaced by a new SET_BACKEND_REQ_FD")
        fe_end = socket.socket(fileno=fe_fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        session.bchan = [
            _Stream(ours, fe_end, Channel.BACKEND, Direction.TO_FRONTEND, Framer()),
            _Stream(fe_end, ours, Channel.BACKEND, Direction.TO_BACKEND, Framer()),
        ]
        for s in session.bchan:
            self._sel.register(s.src, selectors.EVENT_READ, s)
        self._emit(
            session.decoder.event(
                session.now(),
                "back-end channel interposed: the back-end gets the proxy's socket",
                channel=Channel.BACKEND,
            )
        )
        return theirs

    @staticmethod
    def _send(sock: socket.socket, data: bytes, fds: tuple[int, ...]) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if not view and anc:
            return  # fds without a byte cannot be sent; nothing to forward
        while view:
            try:
                sent = sock.sendmsg([view], anc)
            except InterruptedError:
                continue
            anc = []  # fds travel with the first bytes only
            view = view[sent:]

    # -- lifetime --

    def close(self) -> None:
        """Close every socket (the listening socket's file is removed). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._end_session(None)
        self._sel.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_set_backend_req_fd(data: bytes) -> bool:
    code, flags, _ = HEADER.unpack_from(data) if len(data) >= HEADER_SIZE else (0, 0, 0)
    return code == FrontendReq.SET_BACKEND_REQ_FD and not flags & HeaderFlags.REPLY


def _channel_words(channel: Channel) -> str:
    return "main-channel" if channel is Channel.MAIN else "back-end-channel"
