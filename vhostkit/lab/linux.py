"""A lab's ``linux`` guests: Debian's kernel under QEMU (TCG), on vhostkit back-end daemons.

Each linux guest is booted once per lab with the kernel VM harness the tests use
(:mod:`vhostkit.testing.kernel_vm`: the host's root filesystem over 9p, guest RAM in a shared
memfd). Its devices are vhost-user devices on back-end daemons the lab starts:

* NIC *j* (plane ``vhostkit``): ``vhostkit backend net`` on the NIC's tap, in the lab
  namespace; QEMU's ``-netdev vhost-user``. ``offloads = false`` turns checksum offload off
  in QEMU's device, and TSO and GSO both ways. In the
  guest the NIC is ``eth<j>``, with its address or a lease busybox ``udhcpc`` got.
* disk *j*: ``vhostkit backend blk`` on an image file in the lab's work directory (sparse,
  ``size`` bytes; ``read_only`` serves it read-only), with inflight tracking, and QEMU's
  chardev reconnecting every second, so that a ``restart-backend`` step can kill the daemon
  and start another on the same socket and image while the guest's I/O waits. In the guest
  it is ``/dev/vd<a+j>`` (serial ``disk<j>``). A guest with disks boots on ``q35``, since on
  ``microvm`` QEMU 7.2 sizes the rings past the inflight area (see
  ``tests/guests/test_guest_kernel_blk_restart.py``).

The guest's job is :mod:`vhostkit.lab.linux_agent`, which sets the NICs up, says it is ready
and then carries out the runner's requests (commands, pings, TCP transfers), so that every
step of the lab runs in the one boot. Host and agent talk through files on the job's 9p share.

:class:`NamespaceDhcp` runs ``dnsmasq`` (DHCP only) on a namespace link with ``dhcp = ...``;
:class:`TcpReceiver` and :func:`tcp_send` are the namespace ends of a ``tcp`` step.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhostkit.lab.errors import LabError, LabSetupError
from vhostkit.lab.network import LabNetwork
from vhostkit.lab.spec import Guest, GuestKind, Lab, Link

__all__ = [
    "TOOLS",
    "LinuxGuest",
    "NamespaceDhcp",
    "TcpReceiver",
    "missing_tools",
    "tcp_send",
]

log = logging.getLogger(__name__)

#: The programs a lab with linux guests runs, and the Debian package that provides each.
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "ip": "iproute2",
}
#: ... and the one a namespace that serves DHCP runs.
DHCP_TOOLS = {"dnsmasq": "dnsmasq-base"}

_AGENT = Path(__file__).with_name("linux_agent.py")
_READY_TIMEOUT = 30.0
#: The boot, up to the agent's ready file: TCG on a loaded machine, and a DHCP exchange
_BOOT_TIMEOUT = 300.0
_POLL = 0.02
#: QEMU device options of a NIC with ``offloads = false``: no checksum offload and no
#: segmentation offload, either way (QEMU 7.2 offers the TSO bits even without CSUM)
_NO_OFFLOADS = ",".join(
    f"{feature}=off"
    for feature in (
        "csum", "guest_csum", "host_tso4", "host_tso6", "host_ecn", "host_ufo",
        "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo",
    )
)  # fmt: skip


def missing_tools(lab: Lab) -> list[str]:
    """What ``lab`` needs that this host lacks, each with the package to install."""
    needed: dict[str, str] = {}
    if lab.needs_qemu:
        needed.update(TOOLS)
    if any(link.dhcp for ns in lab.namespaces for link in ns.links):
        needed.update(DHCP_TOOLS)
    return [
        f"{tool} is missing: apt-get install {package}"
        for tool, package in needed.items()
        if _which(tool) is None
    ]


def _which(tool: str) -> str | None:
    return shutil.which(tool)


# --- child processes ---------------------------------------------------------------------------


class Child:
    """A daemon the lab started, its output collected line by line by a thread."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str] | None:
        """The first line from ``start`` on matching ``pattern`` (None: time-out or exit)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return None
                self._cond.wait(left)

    def output(self, last: int = 20) -> str:
        with self._cond:
            return "\n".join(self.lines[-last:])

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; close its pipe."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(2)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()


def spawn(
    network: LabNetwork,
    name: str,
    argv: list[str],
    *,
    netns: str | None = None,
    ready_fd: bool = False,
) -> Child:
    """Start ``argv`` in ``netns`` (default: the lab namespace).

    ``ready_fd``: append ``--ready-fd N`` (a vhostkit daemon) and wait until it says it
    serves; a daemon that exits or stays silent for :data:`_READY_TIMEOUT` raises
    :class:`LabSetupError` with its last output.
    """
    r = w = -1
    if ready_fd:
        r, w = os.pipe()
        argv = [*argv, "--ready-fd", str(w)]

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=(w,) if ready_fd else (),
            start_new_session=True,  # a ^C at the terminal reaches the runner only
        )

    try:
        child = Child(name, network.call(start, netns))
    finally:
        if w >= 0:
            os.close(w)
    if not ready_fd:
        return child
    try:
        ready, _, _ = select.select([r], [], [], _READY_TIMEOUT)
        said = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
    if b"READY=1" not in said:
        child.stop()
        raise LabSetupError(f"{name} did not start: {child.output() or 'no output'}")
    return child


# --- DHCP in a namespace ----------------------------------------------------------------------


class NamespaceDhcp:
    """``dnsmasq`` serving DHCP (no DNS) on link ``index`` of a lab namespace."""

    def __init__(
        self, network: LabNetwork, namespace: str, index: int, link: Link, workdir: Path
    ) -> None:
        assert link.dhcp is not None and link.address is not None
        start, end = link.dhcp
        netmask = link.address.network.netmask
        self.name = f"dnsmasq {namespace}"
        dnsmasq = _which("dnsmasq") or "dnsmasq"
        argv = [
            dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-resolv",
            "--no-hosts", f"--interface=eth{index}", "--bind-interfaces",
            f"--dhcp-range={start},{end},{netmask},1h",
            f"--dhcp-leasefile={workdir / f'{namespace}-{index}.leases'}",
            "--log-dhcp", "--log-facility=-", "--pid-file=", "--user=root",
        ]  # fmt: skip
        self.child = spawn(network, self.name, argv, netns=network.host_ns(namespace))
        # dnsmasq logs its range once its DHCP socket is set up
        if self.child.wait_for(r"DHCP, IP range", _READY_TIMEOUT) is None:
            self.child.stop()
            raise LabSetupError(f"{self.name} did not start: {self.child.output()}")

    def leases(self) -> list[str]:
        """The addresses dnsmasq handed out (from its log)."""
        return [
            m.group(1)
            for line in list(self.child.lines)
            if (m := re.search(r"DHCPACK\(\S+\) (\S+)", line))
        ]


# --- TCP between a namespace and a guest ------------------------------------------------------


class TcpReceiver:
    """One TCP connection received on ``port`` inside ``netns``, in a thread of its own.

    It counts the bytes until the sender half-closes, answers ``<bytes> <seconds>``, and
    :meth:`result` gives what arrived and how long it took from the first byte to the end.
    """

    def __init__(self, network: LabNetwork, netns: str, port: int) -> None:
        self.sock = network.call(lambda: socket.create_server(("0.0.0.0", port)), netns)
        self.sock.settimeout(120)
        self.values: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._serve, name=f"tcp-{netns}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                buf = bytearray(1 << 20)
                got, first = 0, 0.0
                while n := conn.recv_into(buf):
                    if not got:
                        first = time.monotonic()
                    got += n
                seconds = time.monotonic() - first if got else 0.0
                conn.sendall(f"{got} {seconds:.6f}\n".encode())
            self.values = {"received": got, "seconds": round(seconds, 6)}
        except OSError as exc:
            self.values = {"error": f"receiving: {exc}"}

    def result(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        self.close()
        self.thread.join(2)
        if not self.values:
            return {"error": "no connection arrived"}
        return self.values

    def close(self) -> None:
        self.sock.close()


def tcp_send(
    network: LabNetwork, netns: str, target: ipaddress.IPv4Address, port: int, total: int
) -> dict[str, Any]:
    """Send ``total`` zero bytes to ``target:port`` from ``netns``, then half-close."""

    def send() -> dict[str, Any]:
        data = memoryview(bytes(1 << 20))
        with socket.create_connection((str(target), port), timeout=60) as s:
            sent = 0
            while sent < total:
                n = min(len(data), total - sent)
                s.sendall(data[:n])
                sent += n
            s.shutdown(socket.SHUT_WR)
            while s.recv(256):
                pass
        return {"sent": sent}

    try:
        return network.call(send, netns)
    except OSError as exc:
        raise LabError(f"sending to {target}:{port}: {exc}") from exc


# --- the guest --------------------------------------------------------------------------------


def mac_for(guest: str, nic: int) -> str:
    """The MAC of a linux guest's NIC that gives none (02:..., made from the name)."""
    digest = sum(guest.encode()) * 31 + len(guest)
    return f"02:76:6c:{digest >> 8 & 0xFF:02x}:{digest & 0xFF:02x}:{nic:02x}"


class LinuxGuest:
    """One linux guest of a lab: its back-end daemons, its QEMU, its agent.

    :meth:`start` starts the daemons and boots the VM (in a thread: the harness's
    :meth:`~vhostkit.testing.kernel_vm.KernelVm.run` returns when the VM powers off) and
    waits for the agent; :meth:`request` sends it a request; :meth:`stop` ends it all.
    """

    def __init__(
        self,
        guest: Guest,
        network: LabNetwork,
        workdir: Path,
        timeout: float,
        progress: Callable[[str], None],
    ) -> None:
        assert guest.kind is GuestKind.LINUX
        self.guest = guest
        self.name = guest.name
        self.network = network
        self.progress = progress
        self.timeout = timeout
        self.share = workdir / f"{guest.name}-vm"
        self.agent_dir = self.share / "agent"
        self.pidfile = workdir / f"{guest.name}-qemu.pid"
        self.workdir = workdir
        self.nic_backends: list[Child] = []
        self.disk_backends: list[Child] = []
        self.disk_argv: list[list[str]] = []
        self.macs = [nic.mac or mac_for(guest.name, j) for j, nic in enumerate(guest.nics)]
        self.addresses: list[ipaddress.IPv4Interface | None] = []
        self.disk_names: list[str] = []
        self.thread: threading.Thread | None = None
        self.vm_result: Any = None
        self.vm_error: BaseException | None = None
        self.qemu_pid: int | None = None
        self.machine = ""
        self._next = 1
        self._pending = False
        self._ready = False
        self._lock = threading.Lock()

    # -- start --

    def start(self) -> None:
        """Start the daemons, boot the VM, wait until the agent set the NICs up."""
        from vhostkit.testing import kernel_vm

        try:
            prepared = kernel_vm.prepare()
        except kernel_vm.VmError as exc:
            raise LabSetupError(
                f"guest {self.name}: the kernel VM image is not ready: {exc}",
                hint="tools/setup.sh, or python3 -m vhostkit.testing.kernel_vm prepare",
            ) from exc
        self.agent_dir.mkdir(parents=True)
        device_args: list[Callable[[str], list[str]]] = []
        for j, nic in enumerate(self.guest.nics):
            sock = self.workdir / f"{self.name}-{j}.sock"
            tap = self.network.tap_name(self.name, j)
            argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
            argv += ["--tap", tap, "--log-level", "info"]
            self.nic_backends.append(
                spawn(self.network, f"back-end {self.name}.nic{j}", argv, ready_fd=True)
            )
            extra = "" if nic.offloads else _NO_OFFLOADS
            device_args.append(
                kernel_vm.vhost_user_net_args(
                    sock, mac=self.macs[j], netdev_id=f"net{j}", device_args=extra
                )
            )
        for j, disk in enumerate(self.guest.disks):
            image = self.workdir / f"{self.name}-disk{j}.img"
            with image.open("wb") as f:
                f.truncate(disk.size)
            sock = self.workdir / f"{self.name}-disk{j}.sock"
            argv = [sys.executable, "-m", "vhostkit", "backend", "blk", "--socket", str(sock)]
            argv += ["--image", str(image), "--serial", f"disk{j}", "--log-level", "info"]
            if disk.read_only:
                argv.append("--read-only")
            self.disk_argv.append(argv)
            self.disk_backends.append(
                spawn(self.network, f"back-end {self.name}.disk{j}", argv, ready_fd=True)
            )
            device_args.append(
                kernel_vm.vhost_user_blk_args(sock, chardev_id=f"disk{j}", reconnect=1)
            )
        config = {
            "nics": [
                {
                    "mac": self.macs[j],
                    "address": str(nic.address) if nic.address else "",
                    "dhcp": nic.dhcp,
                }
                for j, nic in enumerate(self.guest.nics)
            ],
            "disks": len(self.guest.disks),
            "ip": _which("ip"),
            "busybox": _which("busybox"),
        }
        (self.agent_dir / "config.json").write_text(json.dumps(config))
        pidfile = str(self.pidfile)

        def qemu_args(machine: str) -> list[str]:
            # each device builder adds the same -global on microvm: give it once
            flag = ["-global", "virtio-mmio.force-legacy=false"]
            out: list[str] = []
            for make in device_args:
                args = make(machine)
                if args[:2] == flag:
                    args = args[2:]
                    if out[:2] != flag:
                        out = [*flag, *out]
                out += args
            return [*out, "-pidfile", pidfile]

        vm = kernel_vm.KernelVm(
            prepared,
            machine="q35" if self.guest.disks else None,
            memory_mb=max(128, self.guest.memory >> 20),
            cpus=1,
            boot_timeout=_BOOT_TIMEOUT,
        )
        self.machine = vm.machine

        def boot() -> None:
            try:
                self.vm_result = vm.run(
                    [sys.executable, "-S", str(_AGENT), str(self.agent_dir)],
                    cwd="/tmp",
                    timeout=self.timeout,
                    share=self.share,
                    extra_qemu_args=qemu_args,
                    shared_memory=True,
                )
            except BaseException as exc:  # reported by whoever waits for the guest
                self.vm_error = exc

        t0 = time.monotonic()
        self.thread = threading.Thread(target=boot, name=f"vm-{self.name}", daemon=True)
        self.thread.start()
        self.progress(f"guest {self.name}: booting Linux ({vm.machine}, TCG)")
        ready = self._wait_file(self.agent_dir / "ready.json", _BOOT_TIMEOUT + 60, "boot")
        if "error" in ready:
            raise LabSetupError(f"guest {self.name}: setting up failed: {ready['error']}")
        for j, nic in enumerate(ready["nics"]):
            address = ipaddress.IPv4Interface(nic["address"]) if nic["address"] else None
            self.addresses.append(address)
            how = "by DHCP" if self.guest.nics[j].dhcp else ""
            self.progress(f"guest {self.name}: {nic['name']} {address or 'no address'} {how}")
        self.disk_names = list(ready["disks"])
        self._ready = True
        self.progress(f"guest {self.name}: ready in {time.monotonic() - t0:.1f} s")

    def _vm_story(self) -> str:
        if self.vm_error is not None:
            return str(self.vm_error)
        if self.vm_result is not None:
            return f"exit {self.vm_result.returncode}: {self.vm_result.output[-2000:].strip()}"
        return "still running"

    def _wait_file(self, path: Path, timeout: float, what: str) -> dict[str, Any]:
        """The JSON in ``path`` once it appears (the agent renames it into place)."""
        assert self.thread is not None
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.thread.is_alive():
                if path.exists():
                    break
                raise LabError(f"guest {self.name} ended during {what}: {self._vm_story()}")
            if time.monotonic() > deadline:
                raise LabError(f"guest {self.name}: no answer to {what} within {timeout:.0f} s")
            time.sleep(_POLL)
        answer: dict[str, Any] = json.loads(path.read_text())
        return answer

    # -- requests --

    def request(self, op: str, *, wait: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send the agent request ``op`` and return its answer (``LabError`` on an error)."""
        with self._lock:
            n = self._next
            self._next += 1
            req = self.agent_dir / f"req-{n}.json"
            tmp = req.with_name(req.name + ".tmp")
            tmp.write_text(json.dumps({"op": op, **params}))
            os.replace(tmp, req)
            self._pending = True  # until answered: a stop meanwhile cannot ask the agent
            answer = self._wait_file(self.agent_dir / f"resp-{n}.json", wait, op)
            self._pending = False
        if "error" in answer:
            out = answer.get("output", "")
            raise LabError(f"guest {self.name}: {answer['error']}" + (f": {out}" if out else ""))
        return answer

    def address(self, near: list[ipaddress.IPv4Interface] | None = None) -> ipaddress.IPv4Address:
        """The guest's address (given or leased) on a network of ``near`` if it has one
        there, else its first."""
        mine = [a for a in self.addresses if a is not None]
        for address in mine:
            if any(address.network == other.network for other in near or []):
                return address.ip
        if mine:
            return mine[0].ip
        raise LabError(f"guest {self.name} has no address to reach")

    def run(self, command: str, timeout: float) -> dict[str, Any]:
        """A shell command in the guest: its exit code and output."""
        answer = self.request("run", wait=timeout + 30, command=command, timeout=timeout)
        return {
            "exit_code": answer["exit_code"],
            "output": answer["output"],
            "seconds": answer["seconds"],
        }

    def restart_disk(self, index: int, signame: str) -> dict[str, Any]:
        """Kill disk ``index``'s back-end with ``signame`` and start another on its socket.

        QEMU's chardev connects again within a second and sets the device up on the new
        back-end, handing it the inflight area: the new one resubmits what was in flight.
        """
        old = self.disk_backends[index]
        t0 = time.monotonic()
        old.popen.send_signal(signal.Signals[f"SIG{signame}"])
        try:
            old.popen.wait(10)
        except subprocess.TimeoutExpired:
            old.popen.kill()
            old.popen.wait()
        old.stop()
        new = spawn(
            self.network,
            f"back-end {self.name}.disk{index}",
            self.disk_argv[index],
            ready_fd=True,
        )
        self.disk_backends[index] = new
        ready = time.monotonic()
        # back in service once a read from the guest completes: QEMU connected again and
        # started the ring on the new back-end (which first resubmits what was in flight)
        probe = f"dd if=/dev/{self.disk_names[index]} of=/dev/null bs=4k count=1 iflag=direct"
        answer = self.run(probe, _READY_TIMEOUT)
        if answer["exit_code"] != 0:
            raise LabError(f"guest {self.name}: disk {index} fails after the restart: {answer}")
        # logged before the read was served: in the pipe already, if it happened
        resubmitted = new.wait_for(r"resubmitting (\d+) inflight", 1.0)
        return {
            "signal": signame,
            "old_pid": old.popen.pid,
            "pid": new.popen.pid,
            "resubmitted": int(resubmitted.group(1)) if resubmitted else 0,
            "listening_seconds": round(ready - t0, 3),
            "seconds": round(time.monotonic() - t0, 3),
        }

    # -- stop --

    def stop(self) -> list[str]:
        """Power the VM off (the agent's ``quit``; QEMU killed if that fails), stop the
        daemons; what was still running."""
        removed = []
        if self.thread is not None and self.thread.is_alive():
            pid = self._qemu_pid()
            if self._ready and not self._pending:  # the agent is free to take its quit
                with contextlib.suppress(LabError, OSError, ValueError):
                    self.request("quit", wait=10)
                self.thread.join(20)
            for sig in (signal.SIGTERM, signal.SIGKILL):  # QEMU exits on SIGTERM
                end = time.monotonic() + 10
                # interrupted during the boot: QEMU writes its pid file as it starts
                while self.thread.is_alive() and pid is None and time.monotonic() < end:
                    self.thread.join(0.1)
                    pid = self._qemu_pid()
                if not self.thread.is_alive() or pid is None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                self.thread.join(10)
            removed.append(f"process qemu {self.name}" + (f" (pid {pid})" if pid else ""))
        for child in [*self.disk_backends, *self.nic_backends]:
            if child.alive:
                removed.append(f"process {child.name} (pid {child.popen.pid})")
            child.stop()
        return removed

    def _qemu_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            self.qemu_pid = int(self.pidfile.read_text().strip())
        return self.qemu_pid

    def leftovers(self) -> list[str]:
        """What of this guest is still running (nothing after :meth:`stop`)."""
        left = [f"process {c.name}" for c in [*self.disk_backends, *self.nic_backends] if c.alive]
        if self.thread is not None and self.thread.is_alive():
            left.append(f"process qemu {self.name}")
        return left
