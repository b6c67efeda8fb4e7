"""One back-end device served as a daemon: the process-level part every device shares.

:func:`run_daemon` serves one device (a :class:`~vhostkit.user.backend_req_handler.
BackendHandler`) on a vhost-user socket until SIGTERM or SIGINT:

* server mode: a :class:`~vhostkit.user.connection.Listener` with the socket mode, owner and
  group asked for (a live socket path or one that is not a socket is refused, see there);
  client mode: connect to a listening front-end, and with ``reconnect`` connect again when it
  goes away;
* readiness, so that scripts need not poll: once the socket listens (server mode) or the first
  connection is being made (client mode), the pid file is written (atomically) and
  ``READY=1\\n`` is written to ``ready_fd``, which is then closed;
* privileges: started as root, the daemon can drop to ``user`` after the device and the
  socket are open (they stay usable: the fds are open already);
* signals: SIGTERM and SIGINT stop serving, close the device, unlink the socket (only if it
  is still the one this daemon made) and the pid file; :func:`run_daemon` then returns 0.
  SIGHUP calls ``on_hangup`` (blk re-reads the image size) or is ignored.

Signals arrive through ``signal.set_wakeup_fd`` on a pipe the main thread blocks on
(:class:`SignalPipe`), so it does not matter which thread the kernel interrupts. Call
:func:`run_daemon` from the main thread.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.user.backend.listener import BackendClient, BackendListener
from vhostkit.user.backend_req_handler import BackendHandler
from vhostkit.user.connection import DEFAULT_SOCKET_MODE, Listener

__all__ = [
    "DaemonOptions",
    "SignalPipe",
    "daemon_signals",
    "drop_privileges",
    "lookup_group",
    "lookup_user",
    "run_daemon",
]

log = logging.getLogger(__name__)

#: The signals that stop a daemon.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: How long stopping waits for each serving thread.
STOP_TIMEOUT = 2.0
#: The byte :meth:`SignalPipe.interrupt` writes (no signal has number 0).
_INTERRUPT = b"\0"


@dataclass(frozen=True)
class DaemonOptions:
    """How a daemon serves its socket.

    ``socket_owner`` / ``socket_group`` are a uid / gid (``None``: leave as created);
    ``user`` a user name or uid to switch to once everything is open (``None``: stay).
    """

    socket: str
    client: bool = False
    reconnect: bool = True
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_owner: int | None = None
    socket_group: int | None = None
    ready_fd: int | None = None
    pidfile: str | None = None
    user: str | None = None


class SignalPipe:
    """Signals as bytes on a pipe (``signal.set_wakeup_fd``), read by the main thread.

    A signal may land on any thread (NumPy's BLAS threads exist before ``main`` runs, so
    blocking signals with ``pthread_sigmask`` + ``sigwait`` is not reliable); the C-level
    handler writes its number to the pipe whichever thread it interrupts. Enter it before
    opening anything, so that a signal during start-up is seen (and acted on) afterwards.
    """

    def __init__(self, sigs: Sequence[signal.Signals]) -> None:
        self.sigs = tuple(sigs)
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self._r, True)
        self._old_handlers: dict[signal.Signals, object] = {}
        self._old_wakeup = -1

    def __enter__(self) -> Self:
        try:
            self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
            for sig in self.sigs:
                self._old_handlers[sig] = signal.signal(sig, _ignore_signal)
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait(self) -> signal.Signals | None:
        """Block until one of the signals arrives (return it) or :meth:`interrupt` is called
        (return ``None``)."""
        wanted = {int(s) for s in self.sigs}
        while True:
            data = os.read(self._r, 1)
            if data == _INTERRUPT:
                return None
            if data and data[0] in wanted:
                return signal.Signals(data[0])

    def interrupt(self) -> None:
        """Wake :meth:`wait` from another thread."""
        with contextlib.suppress(OSError):
            os.write(self._w, _INTERRUPT)

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if self._r >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


def _ignore_signal(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup pipe carries the signal to :meth:`SignalPipe.wait`."""


# --- users and groups -----------------------------------------------------------------------


def lookup_user(name: str) -> pwd.struct_passwd:
    """A user by name or number; :class:`InvalidParam` if there is none."""
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise InvalidParam(f"no such user: {name!r}") from None


def lookup_group(name: str) -> int:
    """A group id by name or number; :class:`InvalidParam` if there is none."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidParam(f"no such group: {name!r}") from None


def drop_privileges(user: str) -> None:
    """Become ``user`` (name or uid): its supplementary groups, its group, then its uid.

    Only root can do this for another user; :class:`InvalidOperation` otherwise. Open fds
    (the tap, the socket, an image) stay usable.
    """
    entry = lookup_user(user)
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return
        raise InvalidOperation(f"switching to user {entry.pw_name!r} needs root")
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("now running as %s (uid %d, gid %d)", entry.pw_name, entry.pw_uid, entry.pw_gid)


# --- pid file and readiness -----------------------------------------------------------------


def _write_pidfile(path: str) -> None:
    """Write this process's pid to ``path`` atomically (a reader never sees it half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".vhk-pid", dir=directory)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fchmod(fd, 0o644)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still holds this process's pid."""
    try:
        with open(path) as f:
            ours = f.read().strip() == str(os.getpid())
        if ours:
            os.unlink(path)
    except OSError as exc:
        log.warning("cannot remove the pid file %s: %s", path, exc)


def _notify_ready(fd: int) -> None:
    try:
        os.write(fd, b"READY=1\n")
    except OSError as exc:
        log.warning("cannot write to the ready fd %d: %s", fd, exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- the daemon -----------------------------------------------------------------------------


def run_daemon(
    device: BackendHandler,
    options: DaemonOptions,
    signals: SignalPipe,
    *,
    name: str,
    on_hangup: Callable[[], None] | None = None,
) -> int:
    """Serve ``device`` as ``options`` say until SIGTERM/SIGINT (seen through ``signals``,
    entered by the caller before it opened the device); return 0.

    ``name`` goes into the one line printed once serving (``vhostkit net backend: ...``,
    ``listening on PATH`` or ``connecting to PATH``). The caller owns and closes ``device``.
    Errors while starting (a socket path that is taken, a user that does not exist) are
    raised before anything is served; whatever was set up is undone.
    """
    if options.ready_fd is not None:
        try:
            os.fstat(options.ready_fd)
        except OSError:
            raise InvalidParam(f"--ready-fd {options.ready_fd} is not an open fd") from None
    failures: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        start: Callable[[], object]
        if options.client:
            client = BackendClient(options.socket, device, reconnect=options.reconnect)
            thread = threading.Thread(
                target=_serve_client, args=(client, signals, failures), name="vhost-user-client"
            )

            def stop_client() -> None:
                client.stop()
                if thread.ident is not None:
                    thread.join(STOP_TIMEOUT)

            stack.callback(stop_client)
            start = thread.start
            doing = f"connecting to {options.socket}"
        else:
            listener = Listener(
                options.socket,
                mode=options.socket_mode,
                owner=options.socket_owner,
                group=options.socket_group,
            )
            server = BackendListener(listener, lambda: device, max_connections=1)
            # also closes (and unlinks) the listener when start-up fails before serving
            stack.callback(server.stop, STOP_TIMEOUT)
            start = server.start
            doing = f"listening on {options.socket}"
        if options.pidfile is not None:
            _write_pidfile(options.pidfile)
            stack.callback(_remove_pidfile, options.pidfile)
        if options.user is not None:
            drop_privileges(options.user)
        start()
        print(f"vhostkit {name}, {doing}", flush=True)
        if options.ready_fd is not None:
            _notify_ready(options.ready_fd)
        _serve_signals(signals, on_hangup)
    if failures:
        raise failures[0]
    return 0


def _serve_client(
    client: BackendClient, signals: SignalPipe, failures: list[BaseException]
) -> None:
    """Client mode's thread: serve until the front-end is gone for good, then wake the main
    thread (without reconnect, the daemon ends with its front-end)."""
    try:
        client.run()
    except BaseException as exc:
        failures.append(exc)
    finally:
        signals.interrupt()


def _serve_signals(signals: SignalPipe, on_hangup: Callable[[], None] | None) -> None:
    while True:
        sig = signals.wait()
        if sig is None:
            log.info("the front-end went away: stopping")
            return
        if sig != signal.SIGHUP:
            log.info("stopping on %s", sig.name)
            return
        if on_hangup is None:
            log.info("SIGHUP: nothing to re-read")
            continue
        try:
            on_hangup()
        except Exception:
            log.exception("SIGHUP handler failed")


def daemon_signals() -> SignalPipe:
    """The :class:`SignalPipe` a daemon waits on: SIGTERM, SIGINT and SIGHUP."""
    return SignalPipe((*STOP_SIGNALS, signal.SIGHUP))
