"""A lab's ``virtual`` guest: vhostkit's virtio-net driver and a tiny IP host, in a process.

The runner starts one per virtual guest (``python3 -m vhostkit.lab.guest --nic ...``), inside
the lab's network namespace, and talks to it in JSON lines: one request per line on stdin, one
answer per line on stdout. Each NIC is a :class:`~vhostkit.vmm.VirtioNetDevice` on its data
plane:

* ``kernel``: kernel vhost-net on the NIC's tap (opened here, by name);
* ``vhostkit``: the vhostkit net back-end daemon the runner started on the tap, reached over
  its vhost-user socket.

Each NIC runs an :class:`~vhostkit.lab.iphost.IpHost` (ARP, ICMP echo, numbered streams).
One thread does all the I/O: it waits on the NICs' receive interrupts and a wake-up eventfd,
answers frames, sends stream frames when they are due, and runs requests between batches.

Requests (``{"op": ...}``) and their answers:

* ``ping`` ``nic``, ``to``, ``count``, ``interval``, ``timeout`` -> ``sent``, ``received``,
  ``rtt_ms`` (one per reply);
* ``stream`` ``nic``, ``to``, ``stream``, ``rate``, ``frames`` or ``duration``, ``size`` ->
  starts sending and answers at once; ``stream-stop`` ``stream`` -> ``sent``;
* ``count`` ``stream`` -> what this guest received of a stream: ``received``, ``duplicates``,
  ``reordered``, ``seen`` (the sequence numbers, for the sender's total);
* ``info`` -> each NIC's MAC, address and plane; ``quit``.

Errors come back as ``{"error": "..."}``; the process keeps serving.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from vhostkit.lab.iphost import IpHost

__all__ = ["GuestNic", "VirtualGuest", "main"]

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


class VirtualGuest:
    """The NICs, their IP hosts and the I/O thread (see the module docstring)."""

    def __init__(self, nics: Sequence[GuestNic]) -> None:
        self.specs = list(nics)
        self.stack = ExitStack()
        self.devices: list[Any] = []
        self.hosts: list[IpHost] = []
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

    def start(self) -> VirtualGuest:
        from vhostkit.kernel import Tap
        from vhostkit.testing.packets import mac_bytes
        from vhostkit.user import Frontend
        from vhostkit.vmm import KernelNetPlane, VhostUserNetPlane, VirtioNetDevice

        try:
            for spec in self.specs:
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
                self.devices.append(device)
                self.hosts.append(
                    IpHost(mac_bytes(spec.mac), ipaddress.IPv4Interface(spec.address))
                )
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
        poller = select.poll()
        poller.register(self.wake, select.POLLIN)
        fds = {}
        for i, device in enumerate(self.devices):
            rx_call, _tx_call = device.nic.call_fds()
            poller.register(rx_call, select.POLLIN)
            fds[rx_call] = i
        while self.running:
            timeout_ms = self._next_due_ms()
            for fd, _ in poller.poll(timeout_ms):
                if fd == self.wake:
                    os.eventfd_read(self.wake)
            self._serve_requests()
            for i, device in enumerate(self.devices):
                frames = device.nic.recv(timeout=0)
                out = [answer for frame in frames for answer in self.hosts[i].receive(frame)]
                if out:
                    self._send(i, out)
            self._send_streams()
            self._finish_pings()

    def _next_due_ms(self) -> int:
        now = time.monotonic()
        due = [s.start + s.sent / s.rate for s in self.streams.values()]
        due += [p[1]["next"] for p in self._pings]
        due += [p[1]["deadline"] for p in self._pings if p[1]["next"] == float("inf")]
        if not due:
            return 50
        return max(0, min(50, int((min(due) - now) * 1000) + 1))

    def _send(self, nic: int, frames: list[bytes]) -> None:
        device = self.devices[nic]
        while frames:
            sent = device.nic.send(frames)
            frames = frames[sent:]
            if frames:
                device.nic.wait_tx_done(timeout=1.0)

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
                "nics": [{"mac": s.mac, "address": s.address, "plane": s.plane} for s in self.specs]
            }
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
