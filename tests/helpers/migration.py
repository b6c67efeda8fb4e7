"""The host side of the live-migration test (tests/guests/test_guest_migration.py).

* :func:`migration_initramfs`: the kernel VM's initramfs with ``guest_migrate_init.sh`` added
  as ``/migrate-init`` (a second cpio archive appended: the kernel unpacks both). The guest
  then runs from RAM alone, with no 9p share (QEMU will not migrate a guest that mounted one).
* :func:`guest_argv`: the QEMU command line of one side; source and destination differ only
  in ``-incoming`` and their socket paths.
* :class:`QemuGuest`: that QEMU, its serial console on stdio (the guest's lines are the
  process's output, the test types into its stdin), :class:`Qmp` on its QMP socket.
* :class:`Qmp`: a synchronous handle on ``qemu.qmp.QMPClient`` (its own event loop).
* :class:`Lan`: a namespace with a bridge, the guest's taps on it and a veth pair to a peer
  namespace holding the address the guest pings. Nothing leaves the machine.
* :func:`expected_block` and :func:`check_image`: the pattern the guest writes, and the check
  of an image against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from helpers.guest_output import HELPERS
from helpers.netns import NetNs, quiet_namespace
from qemu.qmp import QMPClient

from vhostkit.kernel.tap import Tap
from vhostkit.testing.kernel_vm import PreparedKernel
from vhostkit.testing.peers import PeerProcess, PeerTimeout
from vhostkit.testing.peers.process import is_socket

BLOCK = 4096
_MIGRATION_END = frozenset({"completed", "failed", "cancelled"})
GUEST_SCRIPT = HELPERS / "guest_migrate_init.sh"
#: the guest's modules, in the prepared kernel's load order (their dependencies included)
_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk",
)  # fmt: skip


def migration_initramfs(
    prepared: PreparedKernel, dest: Path, *, blocks: int, guest_ip: str, peer_ip: str
) -> Path:
    """``prepared``'s initramfs plus ``/migrate-init``, written to ``dest``."""
    modules = [m for m in prepared.modules if Path(m).stem in _MODULES]
    assert len(modules) == len(_MODULES), (modules, prepared.modules)
    script = GUEST_SCRIPT.read_text()
    for key, value in {
        "@BLOCKS@": str(blocks),
        "@MODULES@": " ".join(modules),
        "@VERSION@": prepared.version,
        "@GUEST_IP@": guest_ip,
        "@PEER_IP@": peer_ip,
    }.items():
        script = script.replace(key, value)
    with tempfile.TemporaryDirectory(prefix="mig-initramfs-") as tmp:
        (Path(tmp) / "migrate-init").write_text(script)
        (Path(tmp) / "migrate-init").chmod(0o755)
        extra = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
            input=b"migrate-init\n",
            cwd=tmp,
            capture_output=True,
            check=True,
        ).stdout
    with dest.open("wb") as out, prepared.initramfs.open("rb") as base:
        shutil.copyfileobj(base, out)
        out.write(extra)
    return dest


def guest_argv(
    prepared: PreparedKernel,
    initramfs: Path,
    qmp: Path,
    devices: Sequence[str],
    *,
    memory_mb: int,
    incoming: str | None = None,
) -> list[str]:
    """QEMU (q35, TCG, one vCPU) booting ``initramfs``'s ``/migrate-init``; guest RAM in a
    shared memfd (a vhost-user back-end maps it); the serial console on stdio; QMP at ``qmp``;
    ``devices`` last. ``incoming="defer"``: a destination waiting for ``migrate-incoming``."""
    # no_timer_check: under TCG on a loaded host the kernel sometimes finds the IO-APIC timer
    # "not connected" and panics at boot
    cmdline = "console=ttyS0 rdinit=/migrate-init panic=-1 mitigations=off nokaslr loglevel=4"
    cmdline += " no_timer_check"
    argv = [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-accel", "tcg", "-cpu", "max", "-smp", "1",
        "-M", "q35,memory-backend=mem0",
        "-object", f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
        "-m", f"{memory_mb}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(prepared.vmlinuz), "-initrd", str(initramfs), "-append", cmdline,
        "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        *devices,
    ]  # fmt: skip
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


class Qmp:
    """``qemu.qmp.QMPClient`` used synchronously: one event loop of its own, run per call."""

    def __init__(self, path: Path, name: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        try:
            self._run(self._client.connect(str(path)))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    def cmd(self, name: str, **arguments: object) -> Any:
        """Run a command; its ``return`` value (``qemu.qmp.ExecuteError`` if it failed)."""
        return self._run(self._client.execute(name, arguments or None))

    def event(
        self, name: str, timeout: float, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The next event ``name`` whose data satisfy ``match`` (others are dropped)."""

        async def wait() -> dict[str, Any]:
            while True:
                ev = await self._client.events.get()
                if ev["event"] == name and (match is None or match(dict(ev.get("data") or {}))):
                    return dict(ev)

        return self._run(wait(), timeout)  # type: ignore[no-any-return]

    def migration_end(self, timeout: float) -> str:
        """Wait for the migration to end (``events`` capability on); its final status."""
        ev = self.event("MIGRATION", timeout, lambda d: d["status"] in _MIGRATION_END)
        return str(ev["data"]["status"])

    def close(self) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._run(self._client.disconnect())
            self._loop.close()


class QemuGuest(PeerProcess):
    """One side of the migration: QEMU with the guest's console as its output."""

    def __init__(
        self, name: str, argv: list[str], qmp_path: Path, log_path: Path | None = None
    ) -> None:
        super().__init__(
            argv, stdin_pipe=True, ready_timeout=30, stop_timeout=10, log_path=log_path
        )
        self.name = name
        self.qmp_path = qmp_path
        self.qmp: Qmp | None = None

    def _wait_ready(self) -> None:
        self.wait_until(lambda: is_socket(self.qmp_path), f"QMP socket {self.qmp_path}")
        self.qmp = Qmp(self.qmp_path, self.name)
        # MIGRATION events on every state change
        self.qmp.cmd(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )

    def console(self, text: str) -> None:
        """Type ``text`` on the guest's serial console."""
        self.send_input(text)

    def _cleanup(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()


class Backend(PeerProcess):
    """``python3 -m vhostkit backend ...`` (in network namespace ``netns`` if given)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        netns: str | None = None,
        log_path: str | None = None,
    ) -> None:
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        super().__init__(
            argv,
            ready_timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            log_path=log_path,
        )
        self.name = name

    def _wait_ready(self) -> None:
        self.wait_for_line(r"listening on", timeout=self.ready_timeout)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {shlex.join(args)}: {proc.stderr.strip()}")


class Lan:
    """Namespace :attr:`bridge_ns`: bridge ``br0``, persistent taps ``taps`` on it and a veth
    to namespace :attr:`peer_ns`, where ``eth0`` has ``peer_cidr``."""

    def __init__(self, taps: Sequence[str], peer_cidr: str) -> None:
        self.bridge_ns = NetNs("vhkmig-br")
        try:
            self.peer_ns = NetNs("vhkmig-pc")
        except BaseException:
            self.bridge_ns.close()
            raise
        try:
            b, p = self.bridge_ns.name, self.peer_ns.name
            quiet_namespace(self.bridge_ns)
            quiet_namespace(self.peer_ns)
            _ip("-n", b, "link", "set", "lo", "up")
            _ip("-n", b, "link", "add", "br0", "type", "bridge")
            _ip("-n", b, "link", "set", "br0", "up")
            _ip("-n", b, "link", "add", "vpeer", "type", "veth", "peer", "name", "eth0", "netns", p)
            _ip("-n", b, "link", "set", "vpeer", "master", "br0", "up")
            _ip("-n", p, "link", "set", "lo", "up")
            _ip("-n", p, "addr", "add", peer_cidr, "dev", "eth0")
            _ip("-n", p, "link", "set", "eth0", "up")

            def make_taps() -> None:
                for name in taps:
                    with Tap(name) as tap:
                        tap.set_persist(True)
                        tap.attach_to_bridge("br0")
                        tap.up()

            self.bridge_ns.call(make_taps)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.peer_ns.close()
        self.bridge_ns.close()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the disk pattern --------------------------------------------------------------------------


def expected_block(block: int, generation: int) -> bytes:
    """Block ``block`` as pass ``generation`` of the guest's writer writes it."""
    line = f"vhostkit migration test: block {block:06d} pass {generation:06d} " + "~" * 13
    assert len(line) == 63
    return (line + "\n").encode() * (BLOCK // 64)


_BLOCK_LINE = re.compile(rb"vhostkit migration test: block (\d{6}) pass (\d{6}) ~{13}\n")


def block_generations(image: bytes) -> list[int]:
    """The pass each block of ``image`` was last written by (0: never written); raises
    AssertionError naming the first block that is neither zeros nor a whole pattern block."""
    gens = []
    for b in range(len(image) // BLOCK):
        data = image[b * BLOCK : (b + 1) * BLOCK]
        if data == bytes(BLOCK):
            gens.append(0)
            continue
        m = _BLOCK_LINE.match(data)
        assert m is not None, f"block {b} is not a pattern block: {data[:80]!r}"
        gen = int(m.group(2))
        assert int(m.group(1)) == b and data == expected_block(b, gen), (
            f"block {b} is corrupt (starts {data[:64]!r})"
        )
        gens.append(gen)
    return gens


def wait_console(guest: QemuGuest, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
    """``guest.wait_for_line`` with the console's tail in the failure."""
    try:
        return guest.wait_for_line(pattern, timeout=timeout, since=since)
    except PeerTimeout as exc:
        raise AssertionError(f"{guest.name}: no {pattern!r}:\n{guest.tail(40)}") from exc


_PING_REPLY = re.compile(r"bytes from [\d.]+: seq=(\d+) ")


def ping_seqs(lines: Sequence[str]) -> list[int]:
    """The sequence numbers of the ping replies among a console's ``lines``."""
    return [int(m.group(1)) for ln in lines if (m := _PING_REPLY.search(ln))]


def wait_pings(guest: QemuGuest, after: int, count: int, timeout: float) -> list[int]:
    """Wait until ``guest``'s console shows ``count`` ping replies numbered above ``after``
    (woken by each new line); their sequence numbers."""

    def enough(lines: list[str]) -> list[int] | None:
        seqs = [s for s in ping_seqs(lines) if s > after]
        return seqs if len(seqs) >= count else None

    try:
        # PeerProcess's own line wait, with a predicate over all lines
        return guest._wait_lines(enough, timeout, 0, f"{count} ping replies after {after}")
    except PeerTimeout as exc:
        raise AssertionError(f"{guest.name}: {exc}:\n{guest.tail(40)}") from exc
