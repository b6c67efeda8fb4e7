"""A vhost-user net back-end whose rings move live between two data planes.

:class:`SwappableNetDevice` is the one device a daemon's vhost-user server talks to. Behind it
are two planes on the same tap:

* the **user** plane, :class:`~vhostkit.devices.net.NetDevice`: ring workers in this process;
* the **kernel** plane, :class:`~vhostkit.devices.net_kernel.KernelNetDevice`: the rings in
  kernel vhost-net, no Python per packet.

Exactly one plane holds the connection's state at a time: the memory table mappings, the ring
configurations and the front-end's kick, call and err eventfds (owned, as always, by the
rings' :class:`~vhostkit.user.backend.device.VringInfo`). Every front-end request goes to
that plane. :meth:`SwappableNetDevice.swap` moves the device to the other plane:

1. the old plane stops its rings and returns their positions (``take_rings``: the kernel is
   detached from the tap and asked for ``GET_VRING_BASE``; the user plane's workers end
   their round, completing every chain they popped, a received frame they already read
   included), the rings staying started for the front-end;
2. the connection's state (the same mappings, ring addresses, eventfds) moves to the new
   plane: ownership moves with it, nothing is copied, reopened or closed;
3. the new plane starts the rings at those positions (``give_rings``) and looks at each ring
   once, so what the driver queued during the pause is served without a kick.

The front-end sees nothing: no message, no reset, no missed interrupt. Frames that reach the
tap during the pause wait in the tap's queue. The pause (stop to start) is measured and
returned. Front-end requests wait while a swap runs (one lock). Without a front-end, or before
its rings start, a swap only chooses the plane the next rings start on.

The features offered are those *both* planes serve (no packed rings, no dirty logging, no
inflight tracking: see :mod:`vhostkit.devices.net_kernel`), so that a connection can move at
any time. Where ``/dev/vhost-net`` is missing the device still serves on the user plane, and a
swap to the kernel fails with :class:`~vhostkit.errors.DeviceUnavailable`, leaving the device
where it was.

:class:`ControlServer` serves swaps on a Unix socket (mode 0600), one JSON object a line:

* ``{"op": "swap", "to": "kernel"|"user"}`` ->
  ``{"ok": true, "from": ..., "to": ..., "pause_ms": ..., "positions": {"0": base, ...}}``;
* ``{"op": "status"}`` -> ``{"ok": true, "plane": ..., "connected": ..., "rings": {...}}``;
* any failure -> ``{"ok": false, "error": "...", "type": "<vhostkit.errors class>"}``.

:func:`swap` and :func:`status` are the client side (``vhostkit swap PATH --to ...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from vhostkit import errors
from vhostkit.errors import (
    DeviceUnavailable,
    InvalidOperation,
    InvalidParam,
    SocketConnect,
    SocketRetry,
    Unsupported,
    VhostError,
)
from vhostkit.kernel.tap import Tap, offload_for_features
from vhostkit.types import VringState
from vhostkit.user.backend.device import BackendDevice
from vhostkit.user.backend_req_handler import BackendHandler
from vhostkit.user.connection import check_socket_path
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES
from vhostkit.virtio.features import VirtioFeature

__all__ = [
    "SWAP_PROTOCOL_FEATURES",
    "ControlServer",
    "Plane",
    "SwapResult",
    "SwappableNetDevice",
    "status",
    "swap",
]

log = logging.getLogger(__name__)

_PROTOCOL_BIT = int(VHOST_USER_F_PROTOCOL_FEATURES)
#: Longest control request line accepted.
MAX_REQUEST = 4096
#: How many swaps :attr:`SwappableNetDevice.swaps` keeps.
MAX_KEPT_SWAPS = 100
#: How long a control connection may stay silent before it is dropped.
CONTROL_IDLE_TIMEOUT = 60.0


class Plane(StrEnum):
    """Who serves the rings."""

    USER = "user"
    KERNEL = "kernel"


def _protocol_features() -> int:
    from vhostkit.devices.net import NET_PROTOCOL_FEATURES
    from vhostkit.devices.net_kernel import KERNEL_NET_PROTOCOL_FEATURES

    return NET_PROTOCOL_FEATURES & KERNEL_NET_PROTOCOL_FEATURES


#: What both planes implement (the kernel's set: no LOG_SHMFD, no INFLIGHT_SHMFD).
SWAP_PROTOCOL_FEATURES = _protocol_features()


@dataclass(frozen=True)
class SwapResult:
    """What a swap did: the planes, the pause (stop to start, in milliseconds) and the ring
    positions handed over (ring index -> avail index; empty when no ring was running)."""

    from_plane: Plane
    to_plane: Plane
    pause_ms: float
    positions: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The control protocol's answer."""
        return {
            "ok": True,
            "from": str(self.from_plane),
            "to": str(self.to_plane),
            "pause_ms": round(self.pause_ms, 3),
            "positions": {str(k): v for k, v in sorted(self.positions.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SwapResult:
        """Read a control answer (raises :class:`InvalidParam` if it is not one)."""
        try:
            return cls(
                Plane(data["from"]),
                Plane(data["to"]),
                float(data["pause_ms"]),
                {int(k): int(v) for k, v in dict(data["positions"]).items()},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidParam(f"not a swap answer: {data!r} ({exc})") from None


# --- the state that moves -----------------------------------------------------------------------

#: BackendDevice attributes that make up one connection's state (see BackendDevice._reset_state),
#: plus the net planes' own header size (the tap's). Which tap queues are attached is one list
#: both planes share (made so in SwappableNetDevice).
_CONNECTION_STATE = (
    "owner",
    "acked_features",
    "acked_protocol_features",
    "protocol_negotiated",
    "memory",
    "mem_region_dups",
    "vrings",
    "status",
    "dirty_log",
    "log_desc",
    "log_call_fd",
    "backend_channel",
    "inflight_fd",
    "inflight_desc",
    "mtu",
    "rarp_macs",
    "config",
    "hdr_size",
)


def _move_state(src: BackendDevice, dst: BackendDevice) -> None:
    """Hand the connection's state (mappings, rings and their fds) from ``src`` to ``dst``:
    ``dst`` owns it afterwards, ``src`` is left as if no front-end had come (nothing closed)."""
    for name in _CONNECTION_STATE:
        setattr(dst, name, getattr(src, name))
    config = src.config
    src._reset_state()
    src.config = bytearray(config)


# --- the device -----------------------------------------------------------------------------------


def _forward(name: str) -> Callable[..., Any]:
    def forwarded(self: SwappableNetDevice, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return getattr(self._current, name)(*args, **kwargs)

    forwarded.__name__ = name
    forwarded.__qualname__ = f"SwappableNetDevice.{name}"
    forwarded.__doc__ = f"``{name}`` on the plane that serves now."
    return forwarded


class SwappableNetDevice(BackendHandler):
    """A virtio-net vhost-user back-end on ``tap`` whose rings move between the user and the
    kernel data plane (see the module docstring).

    ``plane``: where rings start. ``vhost_net_path`` overrides ``/dev/vhost-net``. The tap
    is borrowed (non-blocking, with a vnet header: ``Tap(..., nonblocking=True)``); close the
    device before the tap. Starting on the kernel plane without vhost-net raises
    :class:`~vhostkit.errors.DeviceUnavailable`.
    """

    def __init__(
        self,
        tap: Tap,
        *,
        mac: bytes = bytes.fromhex("525400000001"),
        mtu: int = 1500,
        queue_pairs: int = 1,
        plane: Plane | str = Plane.USER,
        vhost_net_path: str | os.PathLike[str] | None = None,
    ) -> None:
        from vhostkit.devices.net import DEFAULT_NET_FEATURES, NetDevice
        from vhostkit.devices.net_kernel import (
            KERNEL_RING_FEATURES,
            WANTED_KERNEL_NET_FEATURES,
            kernel_net_features,
            probe_tap_offloads,
        )

        plane = Plane(plane)
        self.tap = tap
        self.mac = mac
        self.mtu = mtu
        self.queue_pairs = queue_pairs
        self.vhost_net_path = vhost_net_path
        self._wanted = WANTED_KERNEL_NET_FEATURES & DEFAULT_NET_FEATURES
        self._lock = threading.RLock()
        self.changed = threading.Condition()
        #: the last swaps done, oldest first
        self.swaps: deque[SwapResult] = deque(maxlen=MAX_KEPT_SWAPS)
        self.kernel: Any = None  # KernelNetDevice, made when vhost-net is there
        try:
            self.kernel = self._make_kernel_plane()
        except DeviceUnavailable as exc:
            if plane is Plane.KERNEL:
                raise
            log.info("kernel plane unavailable (swaps to it will fail): %s", exc)
        if self.kernel is not None:
            features = self.kernel.offered_features & ~_PROTOCOL_BIT
        else:
            # what the kernel plane would offer with a kernel that has every ring feature
            features = kernel_net_features(
                KERNEL_RING_FEATURES,
                probe_tap_offloads(tap),
                wanted=self._wanted,
                queue_pairs=queue_pairs,
            )
        try:
            self.user = NetDevice(
                tap,
                mac=mac,
                mtu=mtu,
                queue_pairs=queue_pairs,
                features=features,
                protocol_features=SWAP_PROTOCOL_FEATURES,
            )
        except BaseException:
            if self.kernel is not None:
                self.kernel.close()
            raise
        self.user.changed = self.changed
        if self.kernel is not None:
            # one view of which tap queues are attached, for both planes (the kernel plane's,
            # made first: it has the queues beyond the pairs detached already)
            self.user.tap_queues = self.kernel.tap_queues
        self._current: BackendDevice = self.kernel if plane is Plane.KERNEL else self.user
        self._plane = plane

    def _make_kernel_plane(self) -> Any:
        from vhostkit.devices.net_kernel import KernelNetDevice

        kernel = KernelNetDevice(
            self.tap,
            mac=self.mac,
            mtu=self.mtu,
            queue_pairs=self.queue_pairs,
            features=self._wanted,
            protocol_features=SWAP_PROTOCOL_FEATURES,
            vhost_net_path=self.vhost_net_path,
        )
        kernel.changed = self.changed
        return kernel

    # -- what callers look at --

    @property
    def plane(self) -> Plane:
        """The plane that serves now (or that the next rings start on)."""
        return self._plane

    @property
    def device(self) -> BackendDevice:
        """The plane's device object (it holds the connection's state now)."""
        return self._current

    @property
    def vrings(self) -> list[Any]:
        """The connection's rings (:class:`VringInfo`), wherever they are served."""
        return self._current.vrings

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true (checked after every request, every round of
        ring work and every swap)."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise SocketRetry(f"device state did not reach the condition in {timeout}s")

    def status(self) -> dict[str, Any]:
        """The control protocol's status answer."""
        with self._lock:
            device = self._current
            rings = {
                str(r.index): {"started": r.started, "enabled": r.enabled, "num": r.num}
                for r in device.vrings
            }
            return {
                "ok": True,
                "plane": str(self._plane),
                "connected": bool(device.owner),
                "kernel_available": self.kernel is not None,
                "rings": rings,
            }

    # -- what is offered: fixed for the device's life, whichever plane serves --

    def get_features(self) -> int:
        """The virtio features both planes serve (the same on either plane)."""
        return int(self.user.offered_features)

    def get_protocol_features(self) -> int:
        """The protocol features both planes implement."""
        return int(self.user.offered_protocol_features)

    # -- the swap --

    def _check_kernel_can_serve(self, kernel: Any) -> None:
        device = self._current
        acked = device.acked_features
        if acked & ~kernel.offered_features & ~_PROTOCOL_BIT:
            raise Unsupported(
                f"features {acked & ~kernel.offered_features:#x} acked by the front-end are "
                "not served by this kernel's vhost-net"
            )
        if acked & VirtioFeature.RING_PACKED:
            raise Unsupported("packed rings are not served by kernel vhost-net")
        for ring in device.vrings:
            if ring.started and ring.kick_fd is None:
                raise Unsupported(
                    f"ring {ring.index} runs in polling mode (no kick eventfd): kernel "
                    "vhost-net cannot serve it"
                )

    def swap(self, to: Plane | str) -> SwapResult:
        """Move the device to plane ``to``; return what was done (see the module docstring).

        Errors (typed, the device stays where it was): :class:`DeviceUnavailable` (no
        vhost-net), :class:`Unsupported` (the connection uses something the kernel cannot
        serve), :class:`InvalidParam` (no such plane).
        """
        try:
            target = Plane(to)
        except ValueError:
            raise InvalidParam(f"no data plane {to!r} (user or kernel)") from None
        with self._lock:
            source = self._plane
            if target is source:
                return SwapResult(source, target, 0.0, {})
            old = self._current
            if target is Plane.KERNEL:
                if self.kernel is None:
                    self.kernel = self._make_kernel_plane()  # DeviceUnavailable: stays
                    self.kernel.tap_queues = self.user.tap_queues
                    # making it probed the tap's offloads (and left none): set them again
                    if old.acked_features:
                        self.tap.set_offload(offload_for_features(old.acked_features))
                self._check_kernel_can_serve(self.kernel)
                new: BackendDevice = self.kernel
            else:
                new = self.user
            start = time.perf_counter()
            states = old.take_rings()  # type: ignore[attr-defined]
            _move_state(old, new)
            try:
                new.give_rings(states)  # type: ignore[attr-defined]
            except BaseException:
                self._roll_back(new, old, states)
                raise
            pause = (time.perf_counter() - start) * 1000.0
            self._current, self._plane = new, target
            if old is self.kernel:
                old._close_nets()  # type: ignore[attr-defined]
            result = SwapResult(source, target, pause, {s.index: s.num for s in states})
            self.swaps.append(result)
        log.info(
            "swapped %s -> %s in %.3f ms, positions %s",
            source,
            target,
            pause,
            dict(result.positions) or "(no ring running)",
        )
        with self.changed:
            self.changed.notify_all()
        return result

    def _roll_back(
        self, new: BackendDevice, old: BackendDevice, states: tuple[VringState, ...]
    ) -> None:
        """The new plane could not start every ring: put them all back on the old one."""
        log.error("swap failed: the rings go back to the plane they came from", exc_info=True)
        positions = {s.index: s.num for s in states}
        for s in new.take_rings():  # type: ignore[attr-defined]
            positions[s.index] = s.num  # it ran them a little
        _move_state(new, old)
        if new is self.kernel:
            new._close_nets()  # type: ignore[attr-defined]
        back = tuple(VringState(i, n) for i, n in sorted(positions.items()))
        try:
            old.give_rings(back)  # type: ignore[attr-defined]
        except VhostError:
            log.exception("the rings could not be restarted: telling the front-end")
            for ring in old.vrings:
                if ring.err_fd is not None:
                    os.eventfd_write(ring.err_fd, 1)

    # -- lifetime --

    def disconnected(self) -> None:
        """The front-end left: the plane that serves drops its state."""
        with self._lock:
            self._current.disconnected()

    def close(self) -> None:
        """Close both planes (the one that serves first: it holds the fds)."""
        with self._lock:
            self._current.close()
            for plane in (self.user, self.kernel):
                if plane is not None and plane is not self._current:
                    plane.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


for _name in dir(BackendHandler):
    if _name.startswith("_") or _name in vars(SwappableNetDevice):
        continue
    if callable(getattr(BackendHandler, _name)):
        setattr(SwappableNetDevice, _name, _forward(_name))
del _name


# --- the control socket ---------------------------------------------------------------------------


def _error_answer(exc: BaseException) -> dict[str, Any]:
    kind = type(exc).__name__ if isinstance(exc, VhostError) else "VhostError"
    return {"ok": False, "error": str(exc) or kind, "type": kind}


def handle_request(device: SwappableNetDevice, line: bytes) -> dict[str, Any]:
    """Answer one control request line (never raises: failures are ``ok: false``)."""
    try:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidParam(f"not a JSON request: {exc}") from None
        if not isinstance(request, dict):
            raise InvalidParam("a request is a JSON object")
        op = request.get("op")
        if op == "status":
            return device.status()
        if op == "swap":
            to = request.get("to")
            if to not in tuple(Plane):
                raise InvalidParam(f'swap needs "to": "user" or "kernel", not {to!r}')
            return device.swap(to).to_json()
        raise InvalidParam(f"unknown op {op!r} (swap, status)")
    except VhostError as exc:
        return _error_answer(exc)
    except Exception as exc:  # a bug must not end the daemon's control socket
        log.exception("control request failed")
        return _error_answer(VhostError(f"{type(exc).__name__}: {exc}"))


class ControlServer:
    """The control socket of a :class:`SwappableNetDevice`: JSON lines on a Unix socket at
    ``path`` (created with ``mode``, 0600 by default; a live socket or a path that is not a
    socket is refused). :meth:`start` serves in a thread; :meth:`close` stops, closes every
    connection and removes the socket."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: SwappableNetDevice,
        *,
        mode: int = 0o600,
        owner: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.device = device
        check_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            try:
                os.chmod(self.path, mode)  # before listen(): nobody can connect yet
                if owner is not None:
                    os.chown(self.path, owner, -1)
                sock.listen(4)
            except BaseException:
                os.unlink(self.path)
                raise
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ino = os.stat(self.path).st_ino
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._closed = False

    def start(self) -> Self:
        """Serve in a thread of its own."""
        self._thread = threading.Thread(target=self._serve, name="vhostkit-control", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop in events:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                log.warning("control socket accept: %s", exc)
                continue
            with self._conn_lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve_conn, args=(conn,), name="vhostkit-control-conn", daemon=True
            ).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CONTROL_IDLE_TIMEOUT)
            buf = b""
            while True:
                try:
                    data = conn.recv(MAX_REQUEST)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        answer = handle_request(self.device, line)
                        conn.sendall(json.dumps(answer).encode() + b"\n")
                if len(buf) > MAX_REQUEST:
                    answer = _error_answer(InvalidParam(f"request over {MAX_REQUEST} bytes"))
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                    return
        except OSError as exc:
            log.info("control connection ended: %s", exc)
        finally:
            with self._conn_lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop serving; close the connections and the socket; remove the socket file (if it
        is still this server's)."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._stop, 1)
        if self._thread is not None:
            self._thread.join(5)
        with self._conn_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        os.close(self._stop)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the client -----------------------------------------------------------------------------------


def _error_type(name: object) -> type[VhostError]:
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, VhostError):
        return cls
    return VhostError


def request(path: str | os.PathLike[str], body: Mapping[str, Any], timeout: float = 30.0) -> Any:
    """Send one control request to the daemon at ``path``; return its (``ok``) answer.

    A failure the daemon reports is raised as the :mod:`vhostkit.errors` type it names; no
    daemon at ``path`` raises :class:`~vhostkit.errors.SocketConnect`.
    """
    path = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise SocketConnect(
                f"no control socket at {path}: {exc.strerror or exc}", errno=exc.errno
            ) from None
        try:
            sock.sendall(json.dumps(dict(body)).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise InvalidOperation(f"the daemon at {path} closed without an answer")
                buf += data
        except TimeoutError:
            raise SocketRetry(f"no answer from {path} in {timeout}s") from None
    try:
        answer = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as exc:
        raise InvalidParam(f"the daemon at {path} answered something not JSON: {exc}") from None
    if not isinstance(answer, dict):
        raise InvalidParam(f"the daemon at {path} answered {answer!r}")
    if not answer.get("ok"):
        raise _error_type(answer.get("type"))(str(answer.get("error", "failed")))
    return answer


def swap(path: str | os.PathLike[str], to: Plane | str, timeout: float = 30.0) -> SwapResult:
    """Ask the daemon with control socket ``path`` to move its device to plane ``to``."""
    target = str(Plane(to)) if to in tuple(Plane) else str(to)
    return SwapResult.from_json(request(path, {"op": "swap", "to": target}, timeout))


def status(path: str | os.PathLike[str], timeout: float = 30.0) -> dict[str, Any]:
    """The daemon's status: ``plane``, ``connected``, ``kernel_available``, ``rings``."""
    answer: dict[str, Any] = request(path, {"op": "status"}, timeout)
    return answer
