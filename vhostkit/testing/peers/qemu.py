"""QEMU as a vhost-user front-end peer: :class:`QemuVirtioNet` (q35, TCG, no guest kernel)
and :func:`qmp_command`, a one-shot QMP client."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from vhostkit.testing.peers.process import PathLike, PeerError, PeerProcess, is_socket

__all__ = ["QemuVirtioNet", "QmpError", "qmp_command"]

# --- QEMU -----------------------------------------------------------------------------------


class QmpError(PeerError):
    """A QMP command failed."""


def qmp_command(
    path: PathLike,
    command: str,
    *,
    arguments: Mapping[str, object] | None = None,
    timeout: float = 10.0,
) -> object:
    """Run one QMP command on the QMP socket at ``path`` and return its ``return`` value.

    A minimal client (one connection per command): greeting, ``qmp_capabilities``, the
    command; events in between are skipped.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        with s.makefile("rwb") as f:

            def receive() -> dict[str, object]:
                while True:
                    line = f.readline()
                    if not line:
                        raise QmpError(f"QMP socket {os.fspath(path)} closed")
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg

            def execute(name: str, args: dict[str, object]) -> object:
                req: dict[str, object] = {"execute": name}
                if args:
                    req["arguments"] = args
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                reply = receive()
                if "error" in reply:
                    raise QmpError(f"QMP {name} failed: {reply['error']}")
                return reply.get("return")

            greeting = receive()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            execute("qmp_capabilities", {})
            return execute(command, dict(arguments or {}))


class QemuVirtioNet(PeerProcess):
    """``qemu-system-x86_64`` as a vhost-user front-end, without a guest kernel.

    A q35 machine with ``memory_mb`` of guest RAM in a shared memfd (``memory-backend-memfd``,
    ``share=on``: a vhost-user back-end must be able to map it), TCG, no display, serial or
    HMP monitor, and one vhost-user device on the chardev socket ``socket_path``:

    * ``device="virtio-net-pci"`` (the default) behind ``-netdev vhost-user``. The iPXE option
      ROM (package ipxe-qemu) drives it to DRIVER_OK 2-3 s after start and sends DHCP frames
      through the TX ring.
    * ``device="vhost-user-blk-pci"``: SeaBIOS reads the config space (GET_CONFIG) and the boot
      sector through the ring.

    QEMU connects to a listening back-end (``server=False``: the back-end must listen before
    QEMU starts, QEMU exits if nobody answers), or listens itself (``server=True``: QEMU blocks
    until a back-end connects; ready once it says it is waiting).

    ``qmp_path``: a QMP socket (``server=on,wait=off``); by default ``<socket_path>.qmp``, or
    ``False`` for none. In client mode QEMU is ready when QMP greets (without QMP: as soon as
    it started). :meth:`qmp` runs a command there. ``debugcon_log``: a file receiving the
    firmware's debug console (port 0x402; SeaBIOS logs there). Stopping sends SIGINT, which
    QEMU handles as a clean shutdown.

    Memory the back-end sees (QEMU 7.2, q35): two regions on the same memfd, gpa 0 size
    0xa0000 and gpa 0xc0000 at mmap_offset 0xc0000 (up to the end of RAM below 4 GiB); the hole
    is the legacy VGA window, so it needs the default VGA device (hence ``-nic none`` here
    rather than ``-nodefaults``, which merges them into one region). They arrive in one
    SET_MEM_TABLE, or as one ADD_MEM_REG each when the back-end offers CONFIGURE_MEM_SLOTS.
    """

    name = "qemu-system-x86_64"

    def __init__(
        self,
        socket_path: PathLike,
        *,
        server: bool = False,
        device: str = "virtio-net-pci",
        device_args: str = "",
        memory_mb: int = 256,
        qmp_path: PathLike | bool | None = None,
        debugcon_log: PathLike | None = None,
        extra_args: Sequence[str] = (),
        binary: str = "qemu-system-x86_64",
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: PathLike | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.server = server
        self.device = device
        if qmp_path is None or qmp_path is True:
            self.qmp_path: Path | None = Path(f"{os.fspath(socket_path)}.qmp")
        elif qmp_path is False:
            self.qmp_path = None
        else:
            self.qmp_path = Path(qmp_path)
        chardev = f"socket,id=vhu0,path={os.fspath(socket_path)}"
        if server:
            chardev += ",server=on,wait=on"
        argv = [
            binary,
            "-machine",
            "q35,memory-backend=mem0",
            "-object",
            f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
            "-m",
            f"{memory_mb}M",
            "-chardev",
            chardev,
        ]
        extra = f",{device_args}" if device_args else ""
        if device == "virtio-net-pci" or device.startswith("virtio-net"):
            argv += [
                "-netdev",
                "vhost-user,id=net0,chardev=vhu0",
                "-device",
                f"{device},netdev=net0{extra}",
            ]
        else:
            argv += ["-device", f"{device},chardev=vhu0{extra}"]
        argv += [
            "-display", "none", "-serial", "none", "-monitor", "none", "-parallel", "none",
            "-nic", "none", "-accel", "tcg",
        ]  # fmt: skip
        if self.qmp_path is not None:
            argv += ["-qmp", f"unix:{os.fspath(self.qmp_path)},server=on,wait=off"]
        if debugcon_log is not None:
            argv += [
                "-chardev", f"file,id=dbg0,path={os.fspath(debugcon_log)}",
                "-device", "isa-debugcon,iobase=0x402,chardev=dbg0",
            ]  # fmt: skip
        argv += list(extra_args)
        super().__init__(
            argv, ready_timeout=ready_timeout, stop_timeout=stop_timeout, log_path=log_path
        )

    def _wait_ready(self) -> None:
        if self.server:
            # Printed after listen(), before QEMU blocks in accept(): connecting now works.
            self.wait_for_line(r"QEMU waiting for connection on:", self.ready_timeout)
        elif self.qmp_path is not None:
            qmp = self.qmp_path
            self.wait_until(lambda: is_socket(qmp), f"QMP socket {qmp}")
            self.qmp("query-status")

    def qmp(self, command: str, **arguments: object) -> object:
        """Run a QMP command (needs a QMP socket)."""
        if self.qmp_path is None:
            raise RuntimeError("QEMU was started without a QMP socket")
        return qmp_command(self.qmp_path, command, arguments=arguments)

    def _cleanup(self) -> None:
        if self.qmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.qmp_path.unlink()
        if self.server:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
