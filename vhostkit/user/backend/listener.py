"""Serving a back-end: listen for front-ends (server mode) or connect to one (client mode).

* :class:`BackendListener`: the back-end owns the socket path and accepts front-ends; each
  connection gets its own handler from a factory and is served in its own thread.
* :class:`BackendClient` / :func:`serve_client`: the front-end listens (QEMU ``server=on``,
  testpmd ``server=1``) and the back-end connects, optionally reconnecting when the front-end
  goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Self

from vhostkit._frames import without_frames
from vhostkit.errors import (
    ProtocolError,
    SocketConnect,
    TransportError,
    VhostError,
)
from vhostkit.user.backend_req_handler import BackendHandler, BackendReqServer
from vhostkit.user.connection import Connection, Listener, connect

__all__ = ["BackendClient", "BackendListener", "serve_client"]

log = logging.getLogger(__name__)

HandlerFactory = Callable[[], BackendHandler]
#: How often a client-mode back-end retries while the front-end's socket does not exist yet.
CONNECT_RETRY_INTERVAL = 0.05
#: How many errors a listener or client keeps (the newest): a hostile front-end that fails
#: requests on connection after connection must not grow the back-end's memory.
MAX_KEPT_ERRORS = 64


def _start_logged(
    target: Callable[[], None],
    name: str,
    stopping: threading.Event,
    errors: deque[BaseException],
) -> threading.Thread:
    """Run ``target`` in a daemon thread; a failure that is not part of stopping is logged and
    kept in ``errors`` (tests assert it stays empty), without its frames."""

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            if not stopping.is_set():
                log.exception("%s failed", name)
                errors.append(without_frames(exc))

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    return thread


class BackendListener:
    """Accept front-ends at ``path``; serve each with ``factory()`` in its own thread.

    ``max_connections`` bounds how many front-ends are served at once (a device that keeps
    one state, such as a tap-backed NIC, uses 1: a second front-end then waits until the first
    leaves).

    ``path`` may also be a :class:`~vhostkit.user.connection.Listener` already bound (with the
    socket mode and owner the caller chose); this object then owns and closes it.

    A connection that ends leaves nothing here but a count and, if it failed, its error
    without the frames it was raised in: its server, thread and handler are dropped, so
    nothing keeps its memory table, fds or stack alive.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Listener,
        factory: HandlerFactory,
        *,
        max_connections: int | None = None,
    ) -> None:
        self.listener = path if isinstance(path, Listener) else Listener(path)
        self.factory = factory
        #: the connections being served now
        self.servers: list[BackendReqServer] = []
        #: front-ends accepted so far
        self.connections = 0
        #: unexpected failures (bugs), newest last: a test asserts this stays empty
        self.errors: deque[BaseException] = deque(maxlen=MAX_KEPT_ERRORS)
        #: front-ends dropped for breaking the protocol, newest last
        self.rejected: deque[ProtocolError] = deque(maxlen=MAX_KEPT_ERRORS)
        #: :attr:`BackendReqServer.last_error` of each finished connection that had one
        #: (a request that failed), newest last
        self.request_errors: deque[VhostError] = deque(maxlen=MAX_KEPT_ERRORS)
        self._slots = threading.BoundedSemaphore(max_connections) if max_connections else None
        self._threads: dict[BackendReqServer, threading.Thread] = {}
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def path(self) -> str:
        return self.listener.path

    def serve_forever(self) -> None:
        """Accept and serve until :meth:`stop`."""
        while not self._stopping.is_set():
            if self._slots is not None:
                self._slots.acquire()
            try:
                conn = self.listener.accept()
            except VhostError:
                if self._slots is not None:
                    self._slots.release()
                if self._stopping.is_set():
                    return
                raise
            self._start_serving(conn)
            del conn  # closed once served: not kept while waiting for the next

    def _start_serving(self, conn: Connection) -> None:
        # A method of its own, so that no local of the accept loop keeps the last connection
        # (its server, handler, memory) alive while the loop waits for the next one.
        try:
            server = BackendReqServer(conn, self.factory())
        except BaseException:
            conn.close()
            if self._slots is not None:
                self._slots.release()
            raise
        with self._lock:
            self.connections += 1
            t = threading.Thread(
                target=self._serve_one,
                args=(server,),
                daemon=True,
                name=f"vhost-user-backend-{self.connections}",
            )
            self.servers.append(server)
            self._threads[server] = t
            t.start()  # under the lock: stop() never sees a thread it cannot join

    def _serve_one(self, server: BackendReqServer) -> None:
        try:
            server.serve()
        except TransportError as exc:
            log.info("front-end connection ended: %s", exc)
        except ProtocolError as exc:
            log.warning("dropped a front-end that broke the protocol: %s", exc)
            self.rejected.append(without_frames(exc))
        except BaseException as exc:
            log.exception("back-end connection failed")
            self.errors.append(without_frames(exc))
        finally:
            with self._lock:
                self.servers.remove(server)
                del self._threads[server]
                if server.last_error is not None:
                    self.request_errors.append(without_frames(server.last_error))
                self._idle.notify_all()
            if self._slots is not None:
                self._slots.release()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no connection is being served; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self.servers, timeout)

    def start(self) -> Self:
        """Serve in a background thread."""
        self._accept_thread = _start_logged(
            self.serve_forever, "vhost-user-listener", self._stopping, self.errors
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every front-end, wait for the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            servers = list(self.servers)
            threads = list(self._threads.values())
        for server in servers:
            server.stop()
        for t in [*threads, self._accept_thread]:
            if t is not None and t is not threading.current_thread():
                t.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class BackendClient:
    """Client mode: connect to a front-end listening at ``path`` and serve it with ``handler``.

    With ``reconnect``, connect again after the front-end goes away (the handler drops its
    per-connection state in :meth:`BackendHandler.disconnected` in between). :meth:`stop`
    ends a live connection too, from any thread; ``stop``, if given, is the event it sets
    (and that ends the reconnect loop when someone else sets it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: BackendHandler,
        *,
        connect_timeout: float = 10.0,
        reconnect: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.connections = 0
        #: unexpected failures, newest last (without their frames)
        self.errors: deque[BaseException] = deque(maxlen=MAX_KEPT_ERRORS)
        self._stop = stop if stop is not None else threading.Event()
        self._lock = threading.Lock()
        self._server: BackendReqServer | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until the front-end leaves (or, with reconnect, :meth:`stop`)."""
        while not self._stop.is_set():
            conn = self._connect()
            if conn is None:
                return
            server = BackendReqServer(conn, self.handler)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._server = server
                self.connections += 1
            try:
                server.serve()
            except TransportError as exc:
                log.info("front-end at %s went away: %s", self.path, exc)
            finally:
                with self._lock:
                    self._server = None
            if not self.reconnect:
                return

    def _connect(self) -> Connection | None:
        """Connect, retrying while the front-end is not listening yet; ``None`` once stopped."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                return connect(self.path)
            except SocketConnect:
                if time.monotonic() >= deadline and not self.reconnect:
                    raise
            # Nothing to wait on for a socket path to appear: retry shortly, but wake at once
            # when stopped.
            if self._stop.wait(CONNECT_RETRY_INTERVAL):
                return None

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread = _start_logged(self.run, "vhost-user-client", self._stop, self.errors)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the live connection (if any) and stop reconnecting."""
        self._stop.set()
        with self._lock:
            server = self._server
        if server is not None:
            server.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_client(
    path: str | os.PathLike[str],
    handler: BackendHandler,
    *,
    connect_timeout: float = 10.0,
    reconnect: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Connect to a front-end listening at ``path`` and serve it, in this thread.

    With ``reconnect``, connect again after the front-end disconnects, until ``stop`` is set
    (``stop`` is looked at between connections; to end a live connection from another thread
    use :class:`BackendClient` and its :meth:`~BackendClient.stop`).
    """
    BackendClient(
        path, handler, connect_timeout=connect_timeout, reconnect=reconnect, stop=stop
    ).run()
