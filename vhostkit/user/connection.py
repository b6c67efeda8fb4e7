"""The vhost-user transport: messages with fds over a Unix stream socket.

:class:`Connection` sends a message with all its fds in one ``sendmsg`` (continuing without fds
if the kernel takes only part of the bytes) and receives header, payload and fds even when the
kernel hands them over in pieces. Framing and validation are the codec's
(:mod:`vhostkit.user.codec`); this module only moves bytes and fds and maps socket errors onto
the :mod:`vhostkit.errors` taxonomy.

:class:`Listener` is the server side of a socket path (bind with a given mode, listen, accept,
unlink on close; a live or foreign path is refused, never taken over);
:func:`connect` the client side, with retries while the peer is not listening yet.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from typing import Self

from vhostkit.errors import (
    Disconnected,
    IncorrectFds,
    InvalidOperation,
    InvalidParam,
    PartialMessage,
    SocketConnect,
    SocketInUse,
    SocketPathTaken,
    SocketRetry,
    VhostError,
    error_from_errno,
)
from vhostkit.user.codec import Channel, Message, MessageParser, close_fds, encode
from vhostkit.user.message import HEADER_SIZE, MAX_FDS

__all__ = ["DEFAULT_SOCKET_MODE", "Connection", "Listener", "check_socket_path", "connect"]

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: Permission bits of a listening socket unless told otherwise: only its owner may connect.
DEFAULT_SOCKET_MODE = 0o600
#: ``sizeof(sun_path)``: a bound path must be shorter (room for the NUL).
_SUN_PATH_MAX = 108


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


class Connection:
    """One end of a vhost-user channel.

    ``channel`` says which requests travel on it (:class:`Channel.MAIN` for front-end
    requests, :class:`Channel.BACKEND` for the back-end request channel). The connection owns
    the socket and closes it on :meth:`close`. ``send`` and ``recv`` each take their own lock,
    so one thread may send while another receives.
    """

    def __init__(self, sock: socket.socket, channel: Channel = Channel.MAIN) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise InvalidOperation("vhost-user runs over AF_UNIX stream sockets")
        self.sock = sock
        self.channel = channel
        self._parser = MessageParser(channel)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False

    @classmethod
    def pair(cls, channel: Channel = Channel.MAIN) -> tuple[Connection, Connection]:
        """Two connected ends (for tests and in-process peers)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a, channel), cls(b, channel)

    @classmethod
    def from_fd(cls, fd: int, channel: Channel) -> Connection:
        """Wrap a socket fd received from the peer (takes ownership of ``fd``)."""
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISSOCK(mode):
                raise IncorrectFds(f"fd {fd} is not a socket")
            sock = socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(sock, channel)
        except BaseException:
            sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending --

    def send(self, msg: Message) -> None:
        """Send ``msg`` and its fds (the fds stay open: the caller still owns them)."""
        data, fds = encode(msg)
        with self._send_lock:
            self._sendall(data, fds)
        log.debug(
            "sent %s%s size=%d fds=%d",
            msg.request.name,
            " reply" if msg.is_reply else "",
            len(data) - HEADER_SIZE,
            len(fds),
        )

    def _sendall(self, data: bytes, fds: tuple[int, ...]) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                sent = self.sock.sendmsg([view], anc)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno is None:
                    raise
                raise error_from_errno(exc.errno, "vhost-user send") from exc
            anc = []  # fds travel with the first bytes only
            view = view[sent:]

    # -- receiving --

    def recv(self, timeout: float | None = None) -> Message:
        """Receive one whole message.

        Raises :class:`Disconnected` if the peer closed between messages,
        :class:`PartialMessage` if it closed in the middle of one, :class:`SocketRetry` on a
        timeout, and a :class:`ProtocolError` subclass for anything malformed (the connection
        should then be closed).
        """
        with self._recv_lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                need = self._parser.bytes_needed
                chunk, fds = self._recv_some(max(need, 1), deadline)
                if not chunk:
                    close_fds(fds)
                    if self._parser.idle:
                        raise Disconnected("vhost-user peer closed the connection")
                    self._parser.close()
                    raise PartialMessage("vhost-user peer closed the connection mid-message")
                msgs = self._parser.feed(chunk, fds)
                if msgs:
                    # We read at most what the current message needs, so at most one completes.
                    assert len(msgs) == 1
                    msg = msgs[0]
                    log.debug(
                        "received %s%s fds=%d",
                        msg.request.name,
                        " reply" if msg.is_reply else "",
                        len(msg.fds),
                    )
                    return msg

    def _recv_some(self, n: int, deadline: float | None) -> tuple[bytes, list[int]]:
        while True:
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SocketRetry("timed out waiting for a vhost-user message")
            try:
                self.sock.settimeout(remaining)
                data, anc, flags, _ = self.sock.recvmsg(n, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:
                continue
            except TimeoutError:
                raise SocketRetry("timed out waiting for a vhost-user message") from None
            except OSError as exc:
                if self._closed:
                    raise Disconnected("the connection was closed locally") from None
                if exc.errno is None:
                    raise
                raise error_from_errno(exc.errno, "vhost-user receive") from exc
            fds = _fds_from_ancillary(anc)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                self._parser.close()
                raise IncorrectFds(f"more than {MAX_FDS} fds in one message: truncated")
            return data, fds

    # -- lifetime --

    def close(self) -> None:
        """Close the socket and drop any partial message. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._parser.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Listener:
    """A listening Unix socket at ``path`` that accepts vhost-user connections.

    What is at ``path`` decides what happens:

    * nothing: the socket is created there;
    * a socket nobody listens on (left by a dead process): it is replaced;
    * a socket a live peer listens on: :class:`~vhostkit.errors.SocketInUse`, nothing touched;
    * anything else (a regular file, a directory, a symlink, a fifo):
      :class:`~vhostkit.errors.SocketPathTaken`, nothing touched.

    The socket file gets permission bits ``mode`` (default ``0o600``: only its owner may
    connect) and, if given, the ``owner`` uid and ``group`` gid *before* it appears at
    ``path``: it is bound and chmod-ed inside a private (``0700``) directory next to ``path``
    and then hard-linked into place, which also fails rather than replace a path someone
    created in between. (When that private name would not fit ``sun_path``, the socket is
    bound at ``path`` directly under a umask that yields ``mode``; the umask is per process, so
    a file another thread creates in that instant gets it too.)

    :meth:`close` unlinks ``path`` only if it is still the socket this listener created (same
    device and inode): a path another process has taken over since is left alone.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backlog: int = 8,
        *,
        mode: int = DEFAULT_SOCKET_MODE,
        owner: int | None = None,
        group: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._closed = True
        if not 0 <= mode <= 0o777:
            raise InvalidParam(f"socket mode {mode:#o} is not a set of permission bits (0-0777)")
        self.mode = mode
        stale = check_socket_path(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._identity = self._bind(backlog, stale, owner, group)
        except BaseException:
            self.sock.close()
            raise
        self._closed = False

    def _bind(
        self, backlog: int, stale: tuple[int, int] | None, owner: int | None, group: int | None
    ) -> tuple[int, int]:
        """Create the socket file; return its (device, inode)."""
        directory = os.path.dirname(self.path) or "."
        try:
            private = tempfile.mkdtemp(prefix=".vhk", dir=directory)
        except OSError as exc:
            raise error_from_errno(
                exc.errno or 0, f"listen on {self.path}: cannot create a file in {directory}"
            ) from exc
        staged = os.path.join(private, "s")
        try:
            if len(os.fsencode(staged)) < _SUN_PATH_MAX:
                self._bind_at(staged, backlog, owner, group, umask=False)
                identity = _identity(os.lstat(staged))
                _replace_stale(self.path, stale)
                try:
                    os.link(staged, self.path)
                except FileExistsError:
                    raise SocketInUse(
                        f"{self.path} was created by someone else while this socket was being "
                        "set up: left alone"
                    ) from None
                except OSError as exc:
                    raise error_from_errno(exc.errno or 0, f"listen on {self.path}") from exc
                return identity
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            with contextlib.suppress(OSError):
                os.rmdir(private)
        # The private name is too long for sun_path: bind in place, the mode set by the umask.
        _replace_stale(self.path, stale)
        self._bind_at(self.path, backlog, owner, group, umask=True)
        return _identity(os.lstat(self.path))

    def _bind_at(
        self, where: str, backlog: int, owner: int | None, group: int | None, *, umask: bool
    ) -> None:
        old = os.umask(0o777 & ~self.mode) if umask else None
        try:
            self.sock.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUse(f"{self.path} was created by someone else meanwhile") from None
            raise error_from_errno(exc.errno or 0, f"listen on {self.path}") from exc
        finally:
            if old is not None:
                os.umask(old)
        try:
            os.chmod(where, self.mode)
            if owner is not None or group is not None:
                os.chown(where, -1 if owner is None else owner, -1 if group is None else group)
            self.sock.listen(backlog)
        except OSError as exc:
            if umask:
                with contextlib.suppress(OSError):
                    os.unlink(where)
            raise error_from_errno(exc.errno or 0, f"set up the socket {self.path}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None, channel: Channel = Channel.MAIN) -> Connection:
        """Wait for one peer; :class:`SocketRetry` if ``timeout`` passes first."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise SocketRetry(f"no vhost-user peer connected to {self.path}") from None
        except OSError as exc:
            if exc.errno is None:
                raise
            raise error_from_errno(exc.errno, f"accept on {self.path}") from exc
        conn.set_inheritable(False)
        try:
            return Connection(conn, channel)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        _unlink_if(self.path, self._identity)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "not a socket"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def check_socket_path(path: str) -> tuple[int, int] | None:
    """Decide whether a socket may be created at ``path`` (what :class:`Listener` does first;
    a program may call it before it opens anything else, to fail early).

    Returns ``None`` if nothing is there, the (device, inode) of a stale socket that may be
    replaced, or raises :class:`SocketInUse` / :class:`SocketPathTaken`.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error_from_errno(exc.errno or 0, f"look at {path}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathTaken(
            f"{path} exists and is {_kind(st.st_mode)}: not replacing it "
            "(remove it or choose another socket path)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return _identity(st)  # nobody listening: stale
    except BlockingIOError:
        # EAGAIN: the listener's backlog is full, so someone is listening
        raise SocketInUse(f"{path} is in use: a peer is listening on it") from None
    except OSError as exc:
        raise SocketPathTaken(
            f"{path} is a socket this process cannot probe ({os.strerror(exc.errno or 0)}): "
            "not replacing it"
        ) from None
    finally:
        probe.close()
    raise SocketInUse(
        f"{path} is in use: a peer is listening on it (another daemon?); not taking it over"
    )


def _replace_stale(path: str, stale: tuple[int, int] | None) -> None:
    """Unlink the stale socket found at ``path`` if it is still that same socket."""
    if stale is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if _identity(st) != stale:
        raise SocketInUse(f"{path} was replaced by someone else while starting: left alone")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise error_from_errno(exc.errno or 0, f"remove the stale socket {path}") from exc
    log.info("replaced the stale socket %s", path)


def _unlink_if(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the file ``identity`` names; log why not otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot look at %s to remove it: %s", path, exc)
        return
    if _identity(st) != identity:
        log.warning("%s is no longer the socket this process created: left alone", path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the socket %s: %s", path, exc)


def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float = 0.0,
    interval: float = 0.05,
    channel: Channel = Channel.MAIN,
) -> Connection:
    """Connect to a listening peer at ``path``.

    With ``timeout`` > 0, keep trying while the socket does not exist yet or refuses
    connections (the peer is still starting) until ``timeout`` seconds have passed.
    """
    target = os.fspath(path)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            err = error_from_errno(exc.errno or 0, f"connect to {target}")
            if isinstance(err, SocketConnect) and time.monotonic() < deadline:
                time.sleep(interval)  # polling a path that does not exist yet: no event to wait on
                continue
            raise err from exc
        try:
            return Connection(sock, channel)
        except VhostError:
            sock.close()
            raise
