"""Serving a back-end: listen for front-ends (server mode) or connect to one (client mode).

* :class:`BackendListener`: the back-end owns the socket path and accepts front-ends; each
  connection gets its own handler from a factory and is served in its own thread.
* :func:`serve_client`: the front-end listens (QEMU ``server=on``, testpmd ``server=1``) and the
  back-end connects, optionally reconnecting when the front-end goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Self

from vhostkit.errors import (
    Disconnected,
    ProtocolError,
    SocketConnect,
    TransportError,
    VhostError,
)
from vhostkit.user.backend_req_handler import BackendHandler, BackendReqServer
from vhostkit.user.connection import Listener, connect

__all__ = ["BackendListener", "serve_client"]

log = logging.getLogger(__name__)

HandlerFactory = Callable[[], BackendHandler]


class BackendListener:
    """Accept front-ends at ``path``; serve each with ``factory()`` in its own thread.

    ``max_connections`` bounds how many front-ends are served at once (a device that keeps
    one state, such as a tap-backed NIC, uses 1: a second front-end then waits until the first
    leaves).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        factory: HandlerFactory,
        *,
        max_connections: int | None = None,
    ) -> None:
        self.listener = Listener(path)
        self.factory = factory
        self.servers: list[BackendReqServer] = []
        #: unexpected failures (bugs): a test asserts this stays empty
        self.errors: list[BaseException] = []
        #: front-ends dropped for breaking the protocol
        self.rejected: list[ProtocolError] = []
        self._slots = threading.BoundedSemaphore(max_connections) if max_connections else None
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

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
            server = BackendReqServer(conn, self.factory())
            with self._lock:
                self.servers.append(server)
            t = threading.Thread(
                target=self._serve_one,
                args=(server,),
                daemon=True,
                name=f"vhost-user-backend-{len(self.servers)}",
            )
            self._threads.append(t)
            t.start()

    def _serve_one(self, server: BackendReqServer) -> None:
        try:
            server.serve()
        except TransportError as exc:
            log.info("front-end connection ended: %s", exc)
        except ProtocolError as exc:
            log.warning("dropped a front-end that broke the protocol: %s", exc)
            self.rejected.append(exc)
        except BaseException as exc:
            log.exception("back-end connection failed")
            self.errors.append(exc)
        finally:
            if self._slots is not None:
                self._slots.release()

    def start(self) -> Self:
        """Serve in a background thread."""
        self._accept_thread = threading.Thread(
            target=self._accept_loop, daemon=True, name="vhost-user-listener"
        )
        self._accept_thread.start()
        return self

    def _accept_loop(self) -> None:
        try:
            self.serve_forever()
        except BaseException as exc:
            if not self._stopping.is_set():
                log.exception("listener failed")
                self.errors.append(exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every front-end, wait for the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            servers = list(self.servers)
        for server in servers:
            server.stop()
        for t in [*self._threads, self._accept_thread]:
            if t is not None and t is not threading.current_thread():
                t.join(timeout)

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
    """Connect to a front-end listening at ``path`` and serve it.

    With ``reconnect``, connect again after the front-end disconnects, until ``stop`` is set
    (the handler's per-connection state is dropped in between by
    :meth:`BackendHandler.disconnected`).
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            conn = connect(path, timeout=connect_timeout)
        except SocketConnect:
            if reconnect and not stop.is_set():
                continue
            raise
        try:
            BackendReqServer(conn, handler).serve()
        except (Disconnected, TransportError) as exc:
            log.info("front-end at %s went away: %s", path, exc)
        if not reconnect:
            return
