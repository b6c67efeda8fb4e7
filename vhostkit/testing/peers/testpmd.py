"""DPDK's ``dpdk-testpmd`` as a vhost-user peer: the vhost PMD (a back-end) or virtio-user
(a front-end), with its port statistics parsed from ``show port stats``."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vhostkit.testing.peers.process import (
    PathLike,
    PeerError,
    PeerProcess,
    compile_pattern,
    is_socket,
)

__all__ = ["PortStats", "Testpmd", "dpdk_runtime_dir"]

#: Makes default ``--file-prefix`` values unique within this process.
_counter = itertools.count()

# --- DPDK testpmd ---------------------------------------------------------------------------


def dpdk_runtime_dir(file_prefix: str) -> Path:
    """Where a DPDK process with ``--file-prefix=file_prefix`` keeps its runtime files.

    Same rule as DPDK's EAL: ``/var/run/dpdk`` for root, else ``$XDG_RUNTIME_DIR/dpdk`` or
    ``/tmp/dpdk``.
    """
    if os.getuid() == 0:
        base = Path("/var/run")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return base / "dpdk" / file_prefix


@dataclass(frozen=True, slots=True)
class PortStats:
    """One port's counters from testpmd's ``show port stats``."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


_STATS_FIELD = re.compile(
    r"\b(RX-packets|RX-missed|RX-bytes|RX-errors|RX-nombuf|TX-packets"
    r"|TX-errors|TX-bytes):\s*(\d+)"
)
_STATS_END = re.compile(r"^\s*#{20,}\s*$")
_FORWARDING = re.compile(r"[Ss]tart (automatic )?packet forwarding")


class Testpmd(PeerProcess):
    """``dpdk-testpmd`` with one virtual device, forwarding with ``forward_mode``.

    Build one with :meth:`vhost_backend` or :meth:`virtio_user_frontend`. It runs without
    hugepages (``--no-huge -m 512 --total-num-mbufs=16384``: the defaults want more mbufs than
    512 MiB of plain memory holds) and with its own ``--file-prefix`` (each DPDK process needs
    one; its runtime directory is removed on stop).

    By default testpmd runs *interactively* (``-i --auto-start``) on a stdin pipe that stays
    open: forwarding starts at once, :meth:`port_stats` asks for counters on demand and stop
    sends ``quit``. (Without ``-i`` testpmd exits when stdin closes; with
    ``interactive=False`` a ``stats_period`` is given and it is stopped with SIGINT, as
    testpmd documents; :meth:`port_stats` then waits for the next periodic report.)

    testpmd's stdout is a pipe here, which would make its ``printf`` output block-buffered
    (lines arrive late and out of order with the prompt): it is run under ``stdbuf -oL`` when
    ``stdbuf`` exists.
    """

    name = "dpdk-testpmd"
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        vdev: str,
        *,
        forward_mode: str = "io",
        ready_pattern: str | re.Pattern[str] = _FORWARDING,
        wait_socket: PathLike | None = None,
        interactive: bool = True,
        stats_period: int = 1,
        nb_cores: int = 1,
        lcores: str = "0,1",
        memory_mb: int = 512,
        total_num_mbufs: int = 16384,
        file_prefix: str | None = None,
        eal_args: Sequence[str] = (),
        app_args: Sequence[str] = (),
        binary: str = "dpdk-testpmd",
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: PathLike | None = None,
    ) -> None:
        self.vdev = vdev
        self.forward_mode = forward_mode
        self.interactive = interactive
        self.file_prefix = file_prefix or f"vhk{os.getpid()}-{next(_counter)}"
        self.ready_pattern = compile_pattern(ready_pattern)
        self.wait_socket = wait_socket
        self._stats_lock = threading.Lock()
        argv: list[str] = []
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
            argv += [stdbuf, "-oL", "-eL"]
        argv += [
            binary,
            "--no-huge",
            "-m",
            str(memory_mb),
            "--no-pci",
            f"--file-prefix={self.file_prefix}",
            "-l",
            lcores,
            "--vdev",
            vdev,
            *eal_args,
            "--",
        ]
        if interactive:
            argv += ["-i", "--auto-start"]
        else:
            argv += [f"--stats-period={stats_period}"]
        argv += [
            f"--nb-cores={nb_cores}",
            f"--total-num-mbufs={total_num_mbufs}",
            f"--forward-mode={forward_mode}",
            *app_args,
        ]
        # Non-interactive testpmd keeps stdin open too: it exits as soon as stdin closes.
        super().__init__(
            argv,
            stdin_pipe=True,
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
            log_path=log_path,
        )

    @classmethod
    def vhost_backend(
        cls, iface: PathLike, *, client: bool = False, queues: int = 1, **kwargs: object
    ) -> Testpmd:
        """testpmd as a vhost-user back-end (vhost PMD) on socket ``iface``.

        It listens there (ready once forwarding started: the socket is listening by then), or
        with ``client=True`` connects to a front-end listening there (and keeps retrying in the
        background until one does).

        Quirks: it offers features 0xd7c66e7cb and protocol features 0x10cbf, answers
        GET_QUEUE_NUM with 128 whatever ``queues`` says, and accepts reconnects.
        """
        vdev = f"net_vhost0,iface={os.fspath(iface)},queues={queues}"
        if client:
            vdev += ",client=1"
        else:
            kwargs.setdefault("wait_socket", iface)
        return cls(vdev, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def virtio_user_frontend(
        cls,
        path: PathLike,
        *,
        server: bool = False,
        packed_vq: bool = False,
        queues: int = 1,
        queue_size: int | None = None,
        mac: str | None = None,
        **kwargs: object,
    ) -> Testpmd:
        """testpmd as a vhost-user front-end (virtio_user PMD) on socket ``path``.

        Without ``server`` it connects to a back-end that must already listen there (ready
        once forwarding started). With ``server=True`` it listens, and its EAL blocks in
        ``accept()`` until a back-end connects: it is ready when it says it is waiting for the
        client (forwarding starts later, once the back-end connected: use
        :meth:`wait_forwarding`).
        """
        vdev = f"net_virtio_user0,path={os.fspath(path)},queues={queues}"
        if server:
            vdev += ",server=1"
            kwargs.setdefault("ready_pattern", r"waiting for client connection")
        if packed_vq:
            vdev += ",packed_vq=1"
        if queue_size is not None:
            vdev += f",queue_size={queue_size}"
        if mac is not None:
            vdev += f",mac={mac}"
        return cls(vdev, **kwargs)  # type: ignore[arg-type]

    def _wait_ready(self) -> None:
        self.wait_for_line(self.ready_pattern, self.ready_timeout)
        if self.wait_socket is not None:
            path = self.wait_socket
            self.wait_until(lambda: is_socket(path), f"socket {os.fspath(path)}")

    def wait_forwarding(self, timeout: float = 20.0) -> None:
        """Block until testpmd says it started forwarding."""
        self.wait_for_line(_FORWARDING, timeout)

    def command(self, line: str) -> int:
        """Send one command line (interactive mode); return the output line number before it."""
        if not self.interactive:
            raise RuntimeError("testpmd runs without -i: it takes no commands")
        since = self.line_count
        self.send_input(line.rstrip("\n") + "\n")
        return since

    def port_stats(self, port: int = 0, timeout: float = 10.0) -> PortStats:
        """The port's counters: ``show port stats`` (interactive), or the next periodic report."""
        with self._stats_lock:
            since = self.command(f"show port stats {port}") if self.interactive else self.line_count
            block = self.wait_for_block(
                rf"NIC statistics for port {port}\b", _STATS_END, timeout, since=since
            )
        values = {
            name.lower().replace("-", "_"): int(num)
            for line in block
            for name, num in _STATS_FIELD.findall(line)
        }
        try:
            return PortStats(**values)
        except TypeError as exc:
            raise PeerError(
                f"cannot parse testpmd's port statistics: {values}", output_tail="\n".join(block)
            ) from exc

    def _request_stop(self) -> bool:
        if not self.interactive:
            return False  # stopped by SIGINT, which non-interactive testpmd handles cleanly
        self.send_input("quit\n")
        return True

    def _cleanup(self) -> None:
        shutil.rmtree(dpdk_runtime_dir(self.file_prefix), ignore_errors=True)
