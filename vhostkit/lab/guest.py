"""A lab's ``virtual`` guest: vhostkit's virtio-net driver and a tiny IP host, in a process.

The runner starts one per virtual guest (``python3 -m vhostkit.lab.guest --nic ...``), inside
the lab's network namespace, and talks to it in JSON lines: one request per line on stdin, one
answer per line on stdout. Each NIC is a :class:`~vhostkit.vmm.VirtioNetDevice` on its data
plane:

* ``kernel``: kernel vhost-net on the NIC's tap (opened here, by name);
* ``vhostkit``: the vhostkit net back-end daemon the runner started on the tap, reached over
  its vhost-user socket.

Each NIC runs an :class:`~vhostkit.lab.iphost.IpHost` (ARP, ICMP echo, numbered streams).
One thread does all the I/O. It sleeps in one ``poll`` on a wake-up eventfd (requests), each
NIC's receive call eventfd with receive interrupts enabled (so a frame wakes it at once), its
transmit call eventfd while frames wait for room in the transmit ring, and, on the vhostkit
plane, its vhost-user connection; the timeout is the next stream frame or ping that is due.
Awake, it drains what fired, answers frames, queues and sends what is due, and runs requests.
Frames to send wait in a per-NIC backlog while the ring is full (receiving goes on meanwhile);
past :data:`BACKLOG_MAX` new ones are dropped and counted, as a full qdisc would.

When a NIC's back-end goes away (its daemon killed: the connection hangs up), the NIC keeps
its rings and backlog and the thread connects to the socket again every
:data:`RECONNECT_INTERVAL` seconds (nothing signals that a socket listens again) until a new
back-end answers, then carries on over it (:meth:`~vhostkit.vmm.VirtioNetDevice.reconnect`).
Frames that arrived on the tap while no back-end ran are lost; frames this guest queued
meanwhile are sent by the new back-end.

Requests (``{"op": ...}``) and their answers:

* ``ping`` ``nic``, ``to``, ``count``, ``interval``, ``timeout`` -> ``sent``, ``received``,
  ``rtt_ms`` (one per reply);
* ``stream`` ``nic``, ``to``, ``stream``, ``rate``, ``frames`` or ``duration``, ``size`` ->
  starts sending and answers at once; ``stream-stop`` ``stream`` -> ``sent``;
* ``count`` ``stream`` -> what this guest received of a stream: ``received``, ``duplicates``,
  ``reordered``, ``seen`` (the sequence numbers, for the sender's total);
* ``info`` -> each NIC's MAC, address, plane, ``connected``, ``reconnects`` and ``dropped``;
* ``wait-reconnect`` ``nic``, ``count``, ``timeout`` -> answers once the NIC has reconnected
  ``count`` times in all: ``reconnects``, ``outage`` (seconds from the hang-up it noticed to
  carrying on over the new back-end);
* ``quit``.

Errors come back as ``{"error": "..."}``; the process keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from typing import Any

from vhostkit.errors import VhostError
from vhostkit.guest.rings import drain_eventfd
from vhostkit.lab.iphost import IpHost

__all__ = ["BACKLOG_MAX", "RECONNECT_INTERVAL", "GuestNic", "VirtualGuest", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GuestNic:
    """How to bring up one NIC: its tap, plane, addresses and (vhostkit plane) socket."""

    tap: str
    plane: str
    mac: str
    address: str
    socket: str = ""
    queues: int = 1

    @classmethod
    def parse(cls, text: str) -> GuestNic:
        """``tap=T,plane=P,mac=M,address=A[,socket=S][,queues=N]``."""
        fields: dict[str, Any] = dict(part.split("=", 1) for part in text.split(","))
        if "queues" in fields:
            fields["queues"] = int(fields["queues"])
        return cls(**fields)


@dataclass
class _Stream:
    nic: int
    to: ipaddress.IPv4Address
    ident: int
    rate: float
    size: int
    frames: int | None
    until: float | None
    start: float
    sent: int = 0


#: Frames a NIC holds back while its transmit ring is full; more are dropped (and counted).
BACKLOG_MAX = 4096
#: Seconds between attempts to reach a NIC's back-end again after it went away.
RECONNECT_INTERVAL = 0.05
#: The longest sleep of the I/O thread when nothing is due (everything else wakes it).
_IDLE_MS = 1000


class _Nic:
    """One NIC of the guest: its device, IP host, back-end connection and transmit backlog
    (internal to the I/O thread)."""

    def __init__(self, spec: GuestNic, device: Any, host: IpHost, frontend: Any) -> None:
        self.spec = spec
        self.device = device
        self.host = host
        #: the vhost-user front-end (vhostkit plane), None on the kernel plane
        self.frontend = frontend
        self.backlog: deque[bytes] = deque()
        self.dropped = 0
        self.connected = True
        self.reconnects = 0
        self.down_since = 0.0
        self.outage = 0.0
        self.retry_at = 0.0
        #: ``wait-reconnect`` requests: (reconnect count wanted, deadline, answer)
        self.waiters: list[tuple[int, float, queue.Queue[dict[str, Any]]]] = []

    def conn_fd(self) -> int | None:
        """The vhost-user connection to watch for a hang-up (None: kernel plane or down)."""
        if self.frontend is None or not self.connected:
            return None
        return int(self.frontend.conn.fileno())


class VirtualGuest:
    """The NICs, their IP hosts and the I/O thread (see the module docstring)."""

    def __init__(self, nics: Sequence[GuestNic]) -> None:
        self.specs = list(nics)
        self.stack = ExitStack()
        self.nics: list[_Nic] = []
        self.streams: dict[int, _Stream] = {}
        self.requests: queue.Queue[tuple[dict[str, Any], queue.Queue[dict[str, Any]]]] = (
            queue.Queue()
        )
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stack.callback(os.close, self.wake)
        self.running = True
        self._pings: list[tuple[int, dict[str, Any], queue.Queue[dict[str, Any]]]] = []
        self._ping_ids = iter(range(0x4C00, 0x10000))  # a fresh echo id for every ping
        self.thread = threading.Thread(target=self._loop, name="guest-io", daemon=True)

    @property
    def devices(self) -> list[Any]:
        return [nic.device for nic in self.nics]

    @property
    def hosts(self) -> list[IpHost]:
        return [nic.host for nic in self.nics]

    def start(self) -> VirtualGuest:
        from vhostkit.kernel import Tap
        from vhostkit.testing.packets import mac_bytes
        from vhostkit.user import Frontend
        from vhostkit.vmm import KernelNetPlane, VhostUserNetPlane, VirtioNetDevice

        try:
            for spec in self.specs:
                frontend = None
                if spec.plane == "kernel":
                    tap = self.stack.enter_context(Tap(spec.tap, queues=spec.queues))
                    plane: Any = self.stack.enter_context(KernelNetPlane(tap))
                elif spec.plane == "vhostkit":
                    frontend = Frontend.connect(spec.socket, timeout=30)
                    plane = self.stack.enter_context(VhostUserNetPlane(frontend))
                else:
                    raise ValueError(f"plane {spec.plane!r} is not served by this guest")
                device = self.stack.enter_context(VirtioNetDevice(plane))
                device.start()
                host = IpHost(mac_bytes(spec.mac), ipaddress.IPv4Interface(spec.address))
                self.nics.append(_Nic(spec, device, host, frontend))
        except BaseException:
            self.stack.close()
            raise
        self.thread.start()
        return self

    # -- requests (any thread) --

    def request(self, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Hand ``req`` to the I/O thread and wait for its answer."""
        answer: queue.Queue[dict[str, Any]] = queue.Queue(1)
        self.requests.put((req, answer))
        os.eventfd_write(self.wake, 1)
        return answer.get(timeout=timeout)

    # -- the I/O thread --

    def _loop(self) -> None:
        while self.running:
            self._wait()
            self._serve_requests()
            for i, nic in enumerate(self.nics):
                if not nic.connected:
                    continue
                frames = nic.device.nic.recv(timeout=0)
                out = [answer for frame in frames for answer in nic.host.receive(frame)]
                if out:
                    self._send(i, out)
                self._flush(nic)
            self._send_streams()
            self._finish_pings()
            self._reconnect_due()
            self._answer_waiters()

    def _wait(self) -> None:
        """Sleep until an eventfd fires, a connection hangs up or something is due."""
        poller = select.poll()
        poller.register(self.wake, select.POLLIN)
        armed = []
        timeout_ms = self._next_due_ms()
        conns: dict[int, _Nic] = {}
        for nic in self.nics:
            fd = nic.conn_fd()
            if fd is not None:
                poller.register(fd, select.POLLIN | select.POLLRDHUP)
                conns[fd] = nic
            if not nic.connected:
                continue
            driver = nic.device.nic
            rings = [driver.ring(0)]  # receive: always wanted
            if nic.backlog:
                rings.append(driver.ring(1))  # transmit: only while frames wait for room
            for ring in rings:
                armed.append(ring)
                if ring.queue.enable_interrupts():
                    timeout_ms = 0  # used entries already there
                poller.register(ring.call, select.POLLIN)
        try:
            for fd, _ in poller.poll(timeout_ms):
                if fd in conns:
                    self._check_connection(conns[fd])
                else:
                    drain_eventfd(fd)
        finally:
            for ring in armed:
                ring.queue.disable_interrupts()

    def _next_due_ms(self) -> int:
        now = time.monotonic()
        due = [s.start + s.sent / s.rate for s in self.streams.values()]
        due += [p[1]["next"] for p in self._pings]
        due += [p[1]["deadline"] for p in self._pings if p[1]["next"] == float("inf")]
        due += [nic.retry_at for nic in self.nics if not nic.connected]
        due += [w[1] for nic in self.nics for w in nic.waiters]
        if not due:
            return _IDLE_MS
        return max(0, min(_IDLE_MS, int((min(due) - now) * 1000) + 1))

    def _send(self, index: int, frames: list[bytes]) -> None:
        """Queue ``frames`` on NIC ``index`` and send what the ring has room for; the rest
        waits in the backlog (the loop sends it as completions free buffers)."""
        nic = self.nics[index]
        room = BACKLOG_MAX - len(nic.backlog)
        if len(frames) > room:
            nic.dropped += len(frames) - max(room, 0)
            frames = frames[: max(room, 0)]
        nic.backlog.extend(frames)
        self._flush(nic)

    def _flush(self, nic: _Nic) -> None:
        backlog = nic.backlog
        driver = nic.device.nic
        while backlog:
            batch = list(islice(backlog, 0, driver.queue_size))
            sent = driver.send(batch)
            if not sent:
                return
            for _ in range(sent):
                backlog.popleft()

    # -- the back-end going away and coming back --

    def _check_connection(self, nic: _Nic) -> None:
        """The connection polled readable: the back-end hung up (or sent something)."""
        conn = nic.frontend.conn
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:  # a message nobody asked for: read and drop it
            with contextlib.suppress(VhostError):
                conn.recv(timeout=0).close_fds()
            return
        log.info("nic %s: the back-end went away; reconnecting", nic.spec.tap)
        nic.connected = False
        nic.down_since = nic.retry_at = time.monotonic()

    def _reconnect_due(self) -> None:
        from vhostkit.user import Frontend
        from vhostkit.vmm import VhostUserNetPlane

        now = time.monotonic()
        for nic in self.nics:
            if nic.connected or now < nic.retry_at:
                continue
            nic.retry_at = now + RECONNECT_INTERVAL
            try:
                frontend = Frontend.connect(nic.spec.socket)
            except VhostError:
                continue  # not listening (yet)
            plane = VhostUserNetPlane(frontend)
            try:
                old = nic.device.reconnect(plane)
            except VhostError as exc:
                log.info("nic %s: reconnect failed (%s); trying again", nic.spec.tap, exc)
                plane.close()
                continue
            self.stack.callback(plane.close)
            old.close()
            nic.frontend = frontend
            nic.connected = True
            nic.reconnects += 1
            nic.outage = time.monotonic() - nic.down_since
            log.info("nic %s: carried on over a new back-end", nic.spec.tap)

    def _answer_waiters(self) -> None:
        now = time.monotonic()
        for nic in self.nics:
            for entry in list(nic.waiters):
                count, deadline, answer = entry
                if nic.connected and nic.reconnects >= count:
                    answer.put({"reconnects": nic.reconnects, "outage": round(nic.outage, 3)})
                elif now >= deadline:
                    state = "connected" if nic.connected else "still down"
                    why = f"no reconnect {count} in time ({nic.reconnects} so far, {state})"
                    answer.put({"error": why})
                else:
                    continue
                nic.waiters.remove(entry)

    # -- requests --
    def _serve_requests(self) -> None:
        while True:
            try:
                req, answer = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                result = self._handle(req, answer)
            except Exception as exc:  # answered, the guest keeps serving
                log.exception("request %s failed", req)
                result = {"error": f"{type(exc).__name__}: {exc}"}
            if result is not None:
                answer.put(result)

    def _handle(
        self, req: dict[str, Any], answer: queue.Queue[dict[str, Any]]
    ) -> dict[str, Any] | None:
        op = req.get("op")
        if op == "info":
            return {
                "nics": [
                    {
                        "mac": nic.spec.mac,
                        "address": nic.spec.address,
                        "plane": nic.spec.plane,
                        "connected": nic.connected,
                        "reconnects": nic.reconnects,
                        "dropped": nic.dropped,
                    }
                    for nic in self.nics
                ]
            }
        if op == "wait-reconnect":
            target = self.nics[int(req.get("nic", 0))]
            if target.frontend is None:
                raise ValueError("a NIC on the kernel plane has no back-end to reconnect to")
            deadline = time.monotonic() + float(req.get("timeout", 30.0))
            target.waiters.append((int(req.get("count", 1)), deadline, answer))
            return None
        if op == "ping":
            nic = int(req.get("nic", 0))
            state = {
                "nic": nic,
                "to": ipaddress.IPv4Address(req["to"]),
                "count": int(req.get("count", 10)),
                "interval": float(req.get("interval", 0.1)),
                "timeout": float(req.get("timeout", 2.0)),
                "ident": next(self._ping_ids),
                "seq": 0,
                "next": time.monotonic(),
                "deadline": float("inf"),
            }
            self._pings.append((nic, state, answer))
            return None
        if op == "stream":
            ident = int(req["stream"])
            now = time.monotonic()
            duration = req.get("duration")
            self.streams[ident] = _Stream(
                nic=int(req.get("nic", 0)),
                to=ipaddress.IPv4Address(req["to"]),
                ident=ident,
                rate=float(req.get("rate", 1000)),
                size=int(req.get("size", 128)),
                frames=req.get("frames"),
                until=now + float(duration) if duration else None,
                start=now,
            )
            return {"started": ident}
        if op == "stream-stop":
            stream = self.streams.pop(int(req["stream"]), None)
            if stream is None:
                raise KeyError(f"no stream {req['stream']}")
            return {"sent": stream.sent}
        if op == "count":
            ident = int(req["stream"])
            counts = [h.streams[ident] for h in self.hosts if ident in h.streams]
            seen = sorted(set().union(*(c.seen for c in counts))) if counts else []
            return {
                "received": sum(c.received for c in counts),
                "duplicates": sum(c.duplicates for c in counts),
                "reordered": sum(c.reordered for c in counts),
                "seen": seen,
            }
        if op == "quit":
            self.running = False
            return {"bye": True}
        raise ValueError(f"unknown op {op!r}")

    def _send_streams(self) -> None:
        now = time.monotonic()
        for stream in self.streams.values():
            due = int((now - stream.start) * stream.rate) + 1 - stream.sent
            if stream.frames is not None:
                due = min(due, stream.frames - stream.sent)
            if stream.until is not None and now >= stream.until:
                due = 0
            if due <= 0:
                continue
            host = self.hosts[stream.nic]
            frames = []
            for seq in range(stream.sent, stream.sent + min(due, 256)):
                frames.extend(host.stream(stream.to, stream.ident, seq, stream.size))
            stream.sent += min(due, 256)
            self._send(stream.nic, frames)

    def _finish_pings(self) -> None:
        now = time.monotonic()
        done = []
        for entry in self._pings:
            nic, state, answer = entry
            host = self.hosts[nic]
            if state["seq"] < state["count"] and now >= state["next"]:
                state["seq"] += 1
                self._send(nic, host.ping(state["to"], state["ident"], state["seq"]))
                if state["seq"] == state["count"]:
                    state["next"] = float("inf")
                    state["deadline"] = now + state["timeout"]
                else:
                    state["next"] = now + state["interval"]
            keys = [(state["ident"], s) for s in range(1, state["count"] + 1)]
            got = [host.ping_rtt[k] for k in keys if k in host.ping_rtt]
            if len(got) == state["count"] or now >= state["deadline"]:
                answer.put(
                    {
                        "sent": state["seq"],
                        "received": len(got),
                        "rtt_ms": [round(r * 1000, 3) for r in got],
                    }
                )
                done.append(entry)
        for entry in done:
            self._pings.remove(entry)

    def close(self) -> None:
        self.running = False
        os.eventfd_write(self.wake, 1)
        if self.thread.is_alive():
            self.thread.join(10)
        self.stack.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m vhostkit.lab.guest",
        description="A lab's virtual guest: JSON requests on stdin, answers on stdout.",
    )
    parser.add_argument(
        "--nic",
        action="append",
        required=True,
        type=GuestNic.parse,
        help="tap=T,plane=kernel|vhostkit,mac=M,address=A/N[,socket=S][,queues=N] (repeat)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    guest = VirtualGuest(args.nic)
    try:
        guest.start()
    except Exception as exc:
        print(json.dumps({"error": f"start: {type(exc).__name__}: {exc}"}), flush=True)
        return 1
    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as exc:
                print(json.dumps({"error": f"not JSON: {exc}"}), flush=True)
                continue
            print(json.dumps(guest.request(req)), flush=True)
            if req.get("op") == "quit":
                break
    finally:
        guest.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
