"""Running a lab: build its network, start its guests and back-ends, run its steps, tear down.

:func:`run_lab` does the whole thing for a checked :class:`~vhostkit.lab.spec.Lab` and returns
a :class:`LabResult`: every expectation with its measured value, the steps' timings, and what
teardown removed. Teardown always happens (on success, a failed step, an exception, or
:class:`KeyboardInterrupt`, which the command line raises for SIGINT and SIGTERM), and the
runner then checks that none of the namespaces, processes or socket files it made is left.

What this runner can do today is in :data:`SUPPORTED`; a lab that needs more is refused with
:class:`~vhostkit.lab.errors.LabSetupError` before anything is built.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vhostkit.lab import linux
from vhostkit.lab.errors import LabError, LabSetupError
from vhostkit.lab.iphost import StreamCount
from vhostkit.lab.network import LabNetwork, leftover_namespaces
from vhostkit.lab.processes import GuestProcess, LabProcess, read_ready
from vhostkit.lab.result import LabResult, Outcome, StepResult
from vhostkit.lab.spec import Guest, GuestKind, Lab, Plane, Step, StepKind, parse_size
from vhostkit.lab.traffic import NamespaceCounter, icmp_ping
from vhostkit.testing.kernel_vm.common import GUEST_ENV_VAR

__all__ = [
    "SUPPORTED",
    "LabResult",
    "Outcome",
    "StepResult",
    "run_lab",
    "runs_in_vm",
    "unsupported",
]

log = logging.getLogger(__name__)

#: Step kinds, planes and guest kinds this runner carries out.
SUPPORTED = {
    "steps": frozenset(
        {
            StepKind.PING,
            StepKind.STREAM,
            StepKind.STOP,
            StepKind.LINK,
            StepKind.WAIT,
            StepKind.SWAP,
        }
        | {StepKind.RUN, StepKind.TCP, StepKind.RESTART_BACKEND}  # linux guests
    ),
    "planes": frozenset({Plane.KERNEL, Plane.VHOSTKIT, Plane.OFFLOAD}),
    "guests": frozenset({GuestKind.VIRTUAL, GuestKind.LINUX}),
}
_START_TIMEOUT = 30.0
VHOST_NET = "/dev/vhost-net"


def unsupported(lab: Lab, *, vm: str = "auto") -> list[str]:
    """What ``lab`` asks for that this runner cannot do yet, or not where it would run
    (``vm``: ``vhostkit lab run --vm``); empty when it can run it."""
    found = []
    for guest in lab.guests:
        if guest.kind not in SUPPORTED["guests"]:
            found.append(f"guest {guest.name}: {guest.kind.value} guests")
        for j, nic in enumerate(guest.nics):
            if nic.plane not in SUPPORTED["planes"]:
                found.append(f"guest {guest.name} nic {j}: the {nic.plane.value} plane")
            if nic.queues != 1:
                found.append(f"guest {guest.name} nic {j}: more than one queue pair")
    for step in lab.steps:
        if step.kind not in SUPPORTED["steps"]:
            found.append(f"step {step.name}: '{step.kind.value}' steps")
    found += _linux_unsupported(lab, vm)
    return found


def runs_in_vm(lab: Lab, vm: str = "auto") -> str:
    """Why ``lab`` would run inside the kernel VM with ``--vm vm`` ("" when it would not)."""
    if os.environ.get(GUEST_ENV_VAR) == "1":
        return "it is inside the kernel VM already"
    if vm == "always":
        return "--vm always"
    if vm == "auto" and lab.needs_kernel_vhost and not Path(VHOST_NET).exists():
        users = _kernel_users(lab)
        return f"it needs kernel vhost-net for {', '.join(users)}, and this host has no {VHOST_NET}"
    return ""


def _kernel_users(lab: Lab) -> list[str]:
    """Which NICs use kernel vhost-net (their plane, or a swap to it)."""
    kernel = {Plane.KERNEL, Plane.OFFLOAD}
    users = [
        f"{guest.name}.nic{j} on plane {nic.plane.value}"
        for guest in lab.guests
        for j, nic in enumerate(guest.nics)
        if nic.plane in kernel
    ]
    users += [
        f"{step.params['guest']}.nic{step.params['nic']} in step {step.name}"
        for step in lab.steps
        if step.kind is StepKind.SWAP and Plane(step.params["to"]) in kernel
    ]
    return users


def _linux_unsupported(lab: Lab, vm: str) -> list[str]:
    """What of the linux guests' part of ``lab`` this runner cannot do yet, or not here."""
    found = []
    kinds = {guest.name: guest.kind for guest in lab.guests}
    why = runs_in_vm(lab, vm)
    if lab.needs_qemu and why:
        names = ", ".join(g.name for g in lab.guests if g.kind is GuestKind.LINUX)
        fix = (
            "--vm auto or never"
            if vm == "always"
            else f"a host with {VHOST_NET} (modprobe vhost_net), or the linux guests in a lab "
            "of their own with their NICs on plane vhostkit"
        )
        found.append(
            f"linux guests in a lab that runs inside the kernel VM ({why}): linux guest(s) "
            f"{names} would be QEMU under the VM's own software emulation, which does not "
            f"boot a guest in useful time; what would work: {fix}"
        )
    for guest in lab.guests:
        for j, nic in enumerate(guest.nics):
            if guest.kind is GuestKind.LINUX and nic.plane is not Plane.VHOSTKIT:
                kernel = nic.plane is Plane.KERNEL
                how = "QEMU's vhost=on" if kernel else "its daemon's kernel rings"
                found.append(
                    f"guest {guest.name} nic {j}: the {nic.plane.value} plane for a linux guest "
                    f"({how})"
                )
    for step in lab.steps:
        p = step.params
        if step.kind is StepKind.SWAP and kinds.get(p["guest"]) is GuestKind.LINUX:
            found.append(f"step {step.name}: swapping a linux guest's NIC")
        linux_nic = p.get("nic") is not None and kinds.get(p["guest"]) is GuestKind.LINUX
        if step.kind is StepKind.RESTART_BACKEND and linux_nic:
            found.append(f"step {step.name}: restarting a linux guest NIC's back-end")
        if step.kind is StepKind.TCP and kinds.get(p["to"]) is GuestKind.VIRTUAL:
            found.append(f"step {step.name}: TCP to a virtual guest (it has no TCP stack)")
        if step.kind is StepKind.STREAM and kinds.get(p["to"]) is GuestKind.LINUX:
            found.append(f"step {step.name}: a stream to a linux guest (use 'tcp')")
    return found


# --- the run --------------------------------------------------------------------------------


class _Run:
    def __init__(self, lab: Lab, progress: Callable[[str], None], keep_going: bool) -> None:
        self.lab = lab
        self.progress = progress
        self.keep_going = keep_going
        self.prefix = f"vhk{os.getpid()}"
        self.workdir = Path(tempfile.mkdtemp(prefix="vhk-lab-", dir="/tmp"))
        self.network = LabNetwork(lab, self.prefix)
        self.processes: list[LabProcess] = []
        #: the control socket of each (guest, nic) whose back-end a swap step moves
        self.controls: dict[tuple[str, int], Path] = {}
        #: the back-end daemon of each (guest, nic) of a virtual guest not on plane kernel,
        #: and the plane it serves now (a swap moves it)
        self.backends: dict[tuple[str, int], LabProcess] = {}
        self.planes: dict[tuple[str, int], Plane] = {}
        self.guests: dict[str, GuestProcess] = {}
        self.linux: dict[str, linux.LinuxGuest] = {}
        self.dhcp: list[linux.NamespaceDhcp] = []
        self.receivers: dict[str, NamespaceCounter] = {}
        self.background: dict[str, tuple[Step, str, int]] = {}
        self.steps: list[StepResult] = []
        self.outcomes: list[Outcome] = []
        self.t0 = time.monotonic()
        self.stream_ids = iter(range(1, 1 << 30))

    # -- set-up --

    def setup(self) -> None:
        self.progress(f"network: {len(self.lab.bridges)} bridge(s), "
                      f"{len(self.lab.namespaces)} namespace(s)")  # fmt: skip
        self.network.build()
        self._start_dhcp()
        for guest in self.lab.guests:
            if guest.kind is GuestKind.LINUX:
                self._start_linux(guest)
                continue
            self.progress(f"guest {guest.name}: starting")
            nics = []
            for j, nic in enumerate(guest.nics):
                tap = self.network.tap_name(guest.name, j)
                mac = nic.mac or _mac_for(guest.name, j)
                address = str(nic.address) if nic.address else ""
                if nic.plane is Plane.KERNEL:
                    spec = f"tap={tap},plane=kernel,mac={mac},address={address}"
                else:  # the vhostkit back-end daemon, on either of its planes
                    sock = self._start_backend(guest.name, j, tap, nic.plane)
                    spec = f"tap={tap},plane=vhostkit,mac={mac},address={address},socket={sock}"
                nics.append(spec)
            argv = [sys.executable, "-m", "vhostkit.lab.guest"]
            for spec in nics:
                argv += ["--nic", spec]
            proc = GuestProcess(guest.name, self._spawn(argv, stdin=True))
            self.processes.append(proc)
            proc.addresses = [n.address for n in guest.nics if n.address]
            proc.wait_ready(_START_TIMEOUT)
            self.guests[guest.name] = proc

    def _start_dhcp(self) -> None:
        for ns in self.lab.namespaces:
            for j, link in enumerate(ns.links):
                if link.dhcp:
                    self.progress(f"namespace {ns.name}: DHCP on eth{j} ({link.dhcp[0]}-...)")
                    server = linux.NamespaceDhcp(self.network, ns.name, j, link, self.workdir)
                    self.dhcp.append(server)

    def _start_linux(self, guest: Guest) -> None:
        vm = linux.LinuxGuest(
            guest, self.network, self.workdir, self.lab.timeout + 60, self.progress
        )
        self.linux[guest.name] = vm
        vm.start()

    def _spawn(
        self,
        argv: list[str],
        *,
        stdin: bool = False,
        keep: tuple[int, ...] = (),
        log: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` inside the lab namespace: talked to over pipes (``stdin``), or with
        its output in the file ``log``."""

        def start() -> subprocess.Popen[str]:
            with contextlib.ExitStack() as stack:
                out: Any = subprocess.PIPE
                err: Any = subprocess.PIPE
                if log is not None:
                    out = err = stack.enter_context(log.open("w"))
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    text=True,
                    pass_fds=keep,
                    start_new_session=True,  # a ^C at the terminal reaches the runner only
                )

        return self.network.call(start)

    def _start_backend(self, guest: str, nic: int, tap: str, plane: Plane) -> Path:
        """Start the vhostkit net back-end daemon of a NIC; its socket, once it serves."""
        sock = self.workdir / f"{guest}-{nic}.sock"
        control = self.workdir / f"{guest}-{nic}.ctl"
        argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
        argv += ["--tap", tap, "--dataplane", "kernel" if plane is Plane.OFFLOAD else "user"]
        if any(
            s.kind is StepKind.SWAP and s.params["guest"] == guest and s.params["nic"] == nic
            for s in self.lab.steps
        ):
            argv += ["--control", str(control)]
            self.controls[(guest, nic)] = control
        ready_r, ready_w = os.pipe()
        try:
            argv += ["--ready-fd", str(ready_w)]
            log = self.workdir / f"{guest}-{nic}.log"
            popen = self._spawn(argv, keep=(ready_w,), log=log)
            proc = LabProcess(f"back-end {guest}.nic{nic}", popen)
            self.processes.append(proc)
            self.backends[(guest, nic)] = proc
            self.planes[(guest, nic)] = plane
            os.close(ready_w)
            ready_w = -1
            with os.fdopen(ready_r, "rb", buffering=0) as ready:
                ready_r = -1
                line = read_ready(ready, _START_TIMEOUT)
            if line != b"READY=1\n":
                tail = log.read_text().strip()[-1500:] or "no ready message in time"
                raise LabSetupError(f"the back-end of {guest}.nic{nic} did not start: {tail}")
        finally:
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
        return sock

    # -- steps --

    def run_steps(self) -> None:
        for step in self.lab.steps:
            if step.at is not None:
                delay = self.t0 + step.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.progress(f"step {step.name}: {step.kind.value}")
            started = time.monotonic()
            values: dict[str, Any] = {}
            error = ""
            try:
                values = self._do(step)
            except LabError as exc:
                error = str(exc)
            self.steps.append(
                StepResult(
                    step.name,
                    step.kind.value,
                    started - self.t0,
                    time.monotonic() - started,
                    values,
                    error,
                )
            )
            if not error:
                self._judge(step, values)
            failed = error or any(not o.passed for o in self.outcomes if o.step == step.name)
            if failed and not self.keep_going:
                self.progress(f"step {step.name}: failed, stopping (--keep-going goes on)")
                return

    def _judge(self, step: Step, values: dict[str, Any]) -> None:
        for key, limit in step.expect.items():
            if key in ("exit_code", "output_matches"):
                self.outcomes.append(_judge_run(step.name, key, limit, values))
                continue
            if key.endswith("_max"):
                measured = float(values[key.removesuffix("_max")])
                passed = measured <= limit
            elif key.endswith("_min"):
                measured = float(values[key.removesuffix("_min")])
                passed = measured >= limit
            else:
                continue
            self.outcomes.append(Outcome(step.name, key, measured, float(limit), passed))

    def _do(self, step: Step) -> dict[str, Any]:
        p = step.params
        linux_values = self._do_linux(step)
        if linux_values is not None:
            return linux_values
        if step.kind is StepKind.PING:
            return self._ping(p["from"], p["to"], p["count"], p["interval"], p["timeout"])
        if step.kind is StepKind.STREAM:
            return self._stream(step)
        if step.kind is StepKind.STOP:
            return self._stop(p["step"])
        if step.kind is StepKind.WAIT:
            time.sleep(p["seconds"])
            return {"seconds": p["seconds"]}
        if step.kind is StepKind.SWAP:
            return self._swap(p["guest"], p["nic"], Plane(p["to"]))
        if step.kind is StepKind.RESTART_BACKEND and p.get("nic") is not None:
            return self._restart_nic(p["guest"], p["nic"], p["signal"])
        if step.kind is StepKind.LINK:
            up = p["state"] == "up"
            if p.get("guest"):
                self.network.set_link(self.network.tap_name(p["guest"], p["nic"]), up)
            else:
                self.network.set_link(p["bridge"], up)
            return {"state": p["state"]}
        raise LabSetupError(f"'{step.kind.value}' steps are not supported by this runner yet")

    def _swap(self, guest: str, nic: int, to: Plane) -> dict[str, Any]:
        """Move a NIC between the back-end's planes through its control socket; the pause.

        The same request as ``vhostkit swap``, made from here: a command's own start-up (a
        Python process, seconds under the kernel VM's emulation) would stretch the time the
        NIC spends on the plane it leaves.
        """
        from vhostkit.devices import net_swap
        from vhostkit.errors import VhostError

        control = self.controls[(guest, nic)]
        try:
            done = net_swap.swap(control, "kernel" if to is Plane.OFFLOAD else "user")
        except VhostError as exc:
            raise LabError(f"swap of {guest}.nic{nic} to {to.value} failed: {exc}") from exc
        self.planes[(guest, nic)] = to
        return {
            "from": str(done.from_plane),
            "to": str(done.to_plane),
            "pause": round(done.pause_ms, 3),
        }

    def _restart_nic(self, guest: str, nic: int, signame: str) -> dict[str, Any]:
        """Send ``signame`` to a virtual guest NIC's back-end, start another on the same
        socket, tap and plane, and wait until the guest has carried on over it.

        The guest notices the hang-up of its vhost-user connection and connects again by
        itself (:mod:`vhostkit.lab.guest`); the step ends once it says so. Frames sent to the
        guest meanwhile are lost on the tap, which has no reader; a stream running across
        the restart measures them.
        """
        key = (guest, nic)
        old = self.backends[key]
        before = self.guests[guest].request("info")["nics"][nic]["reconnects"]
        t0 = time.monotonic()
        old.popen.send_signal(signal.Signals[f"SIG{signame}"])
        try:
            old.popen.wait(10)
        except subprocess.TimeoutExpired:
            old.popen.kill()
            old.popen.wait()
        old.stop()
        if key in self.controls:  # the dead one's control socket is stale
            self.controls[key].unlink(missing_ok=True)
        tap = self.network.tap_name(guest, nic)
        self.progress(f"back-end {guest}.nic{nic}: pid {old.popen.pid} gone ({signame}); "
                      "starting another")  # fmt: skip
        self._start_backend(guest, nic, tap, self.planes[key])
        listening = time.monotonic()
        answer = self.guests[guest].request(
            "wait-reconnect", wait=_START_TIMEOUT + 5, nic=nic, count=before + 1,
            timeout=_START_TIMEOUT,
        )  # fmt: skip
        return {
            "signal": signame,
            "old_pid": old.popen.pid,
            "pid": self.backends[key].popen.pid,
            "listening_seconds": round(listening - t0, 3),
            "outage": answer["outage"],
            "seconds": round(time.monotonic() - t0, 3),
        }

    def _do_linux(self, step: Step) -> dict[str, Any] | None:
        """Carry out a step that involves a linux guest (None: not one of those)."""
        p = step.params
        if step.kind is StepKind.RUN:
            values = self.linux[p["guest"]].run(p["command"], p["timeout"])
            values["output"] = values["output"][-4000:]
            return values
        if step.kind is StepKind.RESTART_BACKEND and p["guest"] in self.linux:
            return self.linux[p["guest"]].restart_disk(p["disk"], p["signal"])
        if step.kind is StepKind.TCP:
            return self._tcp(p["from"], p["to"], p["port"], parse_size(p["bytes"]))
        if step.kind is StepKind.PING and p["from"] in self.linux:
            target = self._address_of(p["to"], p["from"])
            answer = self.linux[p["from"]].request(
                "ping", wait=p["count"] * p["interval"] + p["timeout"] + 30, to=str(target),
                count=p["count"], interval=p["interval"], timeout=p["timeout"],
            )  # fmt: skip
            return _ping_values(answer)
        return None

    def _tcp(self, src: str, dst: str, port: int, total: int) -> dict[str, Any]:
        """``total`` bytes over one TCP connection from ``src`` to ``dst``, timed where
        they arrive (first byte to the sender's half-close)."""
        target = self._address_of(dst, src)
        wait = 60.0 + total / 1e6  # a generous 1 MB/s at the very least
        receiver = None
        if dst in self.linux:
            self.linux[dst].request("tcp-listen", port=port)
        elif dst not in self.guests:
            netns = self.network.host_ns(dst) if dst in self._namespaces() else None
            receiver = linux.TcpReceiver(self.network, netns or self.network.main, port)
        try:
            if src in self.linux:
                sent = self.linux[src].request(
                    "tcp-send", wait=wait, to=str(target), port=port, bytes=total
                )["sent"]
            else:
                sent = linux.tcp_send(self.network, self.network.host_ns(src), target, port, total)[
                    "sent"
                ]
            if receiver is not None:
                got = receiver.result(wait)
            else:
                got = self.linux[dst].request("tcp-result", wait=wait, port=port, timeout=wait)
        finally:
            if receiver is not None:
                receiver.close()
        if "error" in got:
            raise LabError(f"tcp {src} -> {dst}: {got['error']}")
        seconds = got["seconds"]
        return {
            "sent": sent,
            "received": got["received"],
            "seconds": seconds,
            "throughput": round(got["received"] * 8 / seconds / 1e6, 1) if seconds else 0.0,
        }

    def _interfaces_of(self, name: str) -> list[ipaddress.IPv4Interface]:
        """The addresses of a guest or namespace (to pick a linux guest's address near it)."""
        if name in self.linux:
            return [a for a in self.linux[name].addresses if a is not None]
        for guest in self.lab.guests:
            if guest.name == name:
                return [nic.address for nic in guest.nics if nic.address]
        for ns in self.lab.namespaces:
            if ns.name == name:
                return [link.address for link in ns.links if link.address]
        return []

    def _namespaces(self) -> set[str]:
        return {ns.name for ns in self.lab.namespaces}

    def _address_of(self, name: str, source: str) -> ipaddress.IPv4Address:
        if name in self.linux:
            return self.linux[name].address(self._interfaces_of(source))
        if name in self.guests:
            guest = self.lab.guest(name)
            for nic in guest.nics:
                if nic.address is not None:
                    return nic.address.ip
            raise LabError(f"guest {name} has no address to reach")
        for ns in self.lab.namespaces:
            if ns.name == name:
                for link in ns.links:
                    if link.address is not None:
                        return link.address.ip
                raise LabError(f"namespace {name} has no address to reach")
        return ipaddress.IPv4Address(name)

    def _ping(
        self, src: str, dst: str, count: int, interval: float, timeout: float
    ) -> dict[str, Any]:
        target = self._address_of(dst, src)
        if src in self.guests:
            answer = self.guests[src].request(
                "ping", wait=count * interval + timeout + 30, to=str(target),
                count=count, interval=interval, timeout=timeout,
            )  # fmt: skip
        else:
            answer = self.network.call(
                lambda: icmp_ping(target, count, interval, timeout),
                self.network.host_ns(src),
            )
        sent, received = answer["sent"], answer["received"]
        rtts = answer["rtt_ms"]
        return {
            "sent": sent,
            "received": received,
            "loss": round(100.0 * (sent - received) / sent, 3) if sent else 100.0,
            "rtt_ms_avg": round(sum(rtts) / len(rtts), 3) if rtts else None,
        }

    def _stream(self, step: Step) -> dict[str, Any]:
        p = step.params
        ident = next(self.stream_ids)
        target = self._address_of(p["to"], p["from"])
        if p["to"] not in self.guests and p["to"] not in self.receivers:
            counter = NamespaceCounter(self.network, self.network.host_ns(p["to"]))
            self.receivers[p["to"]] = counter
        self.guests[p["from"]].request(
            "stream", to=str(target), stream=ident, rate=p["rate"], frames=p["frames"],
            duration=p["duration"], size=p["size"],
        )  # fmt: skip
        self.background[step.name] = (step, p["to"], ident)
        if step.background:
            return {"stream": ident}
        if p["frames"] is None and p["duration"] is None:
            raise LabError("a stream in the foreground needs 'frames' or 'duration'")
        length = p["duration"] or p["frames"] / p["rate"]
        time.sleep(length)
        return self._stop(step.name)

    def _stop(self, name: str) -> dict[str, Any]:
        step, receiver, ident = self.background.pop(name)
        sent = self.guests[step.params["from"]].request("stream-stop", stream=ident)["sent"]
        deadline = time.monotonic() + 2.0
        while True:  # frames still in flight: wait until all arrived, or 2 s
            count = self._count(receiver, ident)
            if count.received >= sent or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return {
            "sent": sent,
            "received": count.received,
            "lost": count.lost(sent),
            "longest_gap": count.longest_gap(sent),
            "duplicates": count.duplicates,
            "reordered": count.reordered,
        }

    def _count(self, receiver: str, ident: int) -> StreamCount:
        if receiver in self.guests:
            answer = self.guests[receiver].request("count", stream=ident)
            count = StreamCount(answer["received"], answer["duplicates"], answer["reordered"])
            count.seen = set(answer["seen"])
            return count
        return self.receivers[receiver].count(ident)

    # -- teardown --

    def teardown(self) -> tuple[list[str], list[str]]:
        removed: list[str] = []
        for counter in self.receivers.values():
            counter.close()
        for vm in reversed(list(self.linux.values())):
            removed += vm.stop()
        for server in self.dhcp:
            if server.child.alive:
                removed.append(f"process {server.name} (pid {server.child.popen.pid})")
            server.child.stop()
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                removed.append(f"process {proc.name} (pid {proc.popen.pid})")
            proc.stop()
        removed += self.network.close()
        sockets = sorted(self.workdir.glob("*.sock"))
        removed += [f"socket {s}" for s in sockets]
        shutil.rmtree(self.workdir, ignore_errors=True)
        left = [f"netns {n}" for n in leftover_namespaces(self.prefix)]
        left += [f"process {p.name}" for p in self.processes if p.popen.poll() is None]
        left += [item for vm in self.linux.values() for item in vm.leftovers()]
        left += [f"process {d.name}" for d in self.dhcp if d.child.alive]
        if self.workdir.exists():
            left.append(f"directory {self.workdir}")
        return removed, left


def _judge_run(step: str, key: str, limit: Any, values: dict[str, Any]) -> Outcome:
    """A ``run`` step's expectation: ``exit_code`` is exact; ``output_matches`` is a
    regular expression searched in the output (value 1 when found, 0 when not; limit 1)."""
    if key == "exit_code":
        code = float(values["exit_code"])
        return Outcome(step, key, code, float(limit), code == float(limit))
    found = 1.0 if re.search(str(limit), values["output"], re.MULTILINE) else 0.0
    return Outcome(step, key, found, 1.0, found == 1.0)


def _ping_values(answer: dict[str, Any]) -> dict[str, Any]:
    sent, received = answer["sent"], answer["received"]
    rtts = answer["rtt_ms"]
    return {
        "sent": sent,
        "received": received,
        "loss": round(100.0 * (sent - received) / sent, 3) if sent else 100.0,
        "rtt_ms_avg": round(sum(rtts) / len(rtts), 3) if rtts else None,
    }


def _mac_for(guest: str, nic: int) -> str:
    digest = sum(guest.encode()) * 31 + len(guest)
    return f"02:76:68:{digest >> 8 & 0xFF:02x}:{digest & 0xFF:02x}:{nic:02x}"


def run_lab(
    lab: Lab,
    *,
    progress: Callable[[str], None] | None = None,
    keep_going: bool = False,
) -> LabResult:
    """Run ``lab`` on this host (it must have what the lab needs) and return what happened."""
    missing = unsupported(lab)
    if missing:
        raise LabSetupError("this lab needs what the runner cannot do yet: " + "; ".join(missing))
    _check_host(lab)
    say = progress or (lambda text: None)
    run = _Run(lab, say, keep_going)
    error = ""
    setup_seconds = 0.0
    in_setup = True
    try:
        run.setup()
        setup_seconds = time.monotonic() - run.t0
        in_setup = False
        run.run_steps()
    except (LabError, OSError) as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        say("teardown")
        removed, left = run.teardown()
    return LabResult(
        lab.name,
        tuple(run.steps),
        tuple(run.outcomes),
        time.monotonic() - run.t0,
        setup_seconds,
        tuple(removed),
        tuple(left),
        error,
        bool(error) and in_setup,
    )


def _check_host(lab: Lab) -> None:
    if os.geteuid() != 0:
        raise LabSetupError("a lab builds namespaces and taps", hint="run it as root")
    missing = linux.missing_tools(lab)
    if missing:
        raise LabSetupError("this lab needs programs this host lacks: " + "; ".join(missing))
    if not Path("/dev/net/tun").exists():
        raise LabSetupError("/dev/net/tun is missing", hint="modprobe tun")
    if lab.needs_kernel_vhost and not Path("/dev/vhost-net").exists():
        raise LabSetupError(
            "this lab needs kernel vhost-net and /dev/vhost-net is missing",
            hint="modprobe vhost_net, or run the lab in the kernel VM (--vm auto)",
        )


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`KeyboardInterrupt` while a lab runs (SIGINT already is)."""

    owner = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # a forked helper (pyroute2 forks to make namespaces) must not unwind our stack
            os._exit(128 + signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
