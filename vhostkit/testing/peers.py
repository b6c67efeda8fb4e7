"""Launchers for the real vhost-user peers vhostkit is tested against.

Each launcher is a context manager around one external process:

* :class:`Testpmd`: DPDK's ``dpdk-testpmd``, either as a vhost-user **back-end** (the vhost PMD,
  ``net_vhost0,iface=...``: it tests our :class:`~vhostkit.user.Frontend`) or as a vhost-user
  **front-end** (``net_virtio_user0,path=...``: it tests our back-ends).
* :class:`QemuVirtioNet`: ``qemu-system-x86_64`` (q35, TCG, memfd guest RAM, no guest kernel) with
  a vhost-user device on a chardev socket: ``virtio-net-pci`` (iPXE drives it) or
  ``vhost-user-blk-pci`` (SeaBIOS drives it).
* :class:`QemuStorageDaemon`: ``qemu-storage-daemon`` exporting an image file as a vhost-user-blk
  back-end.

Entering the context starts the process and waits until it is *ready*, always on an event and
never on a fixed sleep: a line on the peer's output (testpmd starting to forward, QEMU "waiting
for connection"), a QMP greeting, or a file appearing (the listening socket, a pid file). Socket
and pid files have no notification, so those few waits poll the file system every 20 ms until a
deadline, checking on each round that the peer is still alive. If the peer exits or misses the
deadline, :class:`PeerExited` / :class:`PeerTimeout` is raised with the tail of its output.

Leaving the context stops the peer: a polite request first where the peer has one (``quit`` on
testpmd's command line), then SIGINT, SIGTERM and SIGKILL, each with a timeout; then the process
is reaped, its pipes closed, its reader thread joined and DPDK's runtime directory
(``/var/run/dpdk/<file-prefix>``) removed. Every peer runs in its own session, so a Ctrl-C in the
terminal that runs the tests reaches only the test runner, which then stops its peers in order.

:func:`which_or_skip` is for tests: it skips a test whose peer is not installed, except under CI
(``CI`` set in the environment), where a missing peer fails the test instead.

Quirks of the peers seen on Debian 12 (DPDK 22.11, QEMU 7.2) are documented where they matter; see
also ``tests/test_peers_*.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

__all__ = [
    "PeerError",
    "PeerExited",
    "PeerProcess",
    "PeerTimeout",
    "PortStats",
    "QemuStorageDaemon",
    "QemuVirtioNet",
    "QmpError",
    "Testpmd",
    "dpdk_runtime_dir",
    "qmp_command",
    "which_or_skip",
]

log = logging.getLogger(__name__)

#: Where each peer binary comes from on Debian/Ubuntu (for error messages).
INSTALL_HINTS = {
    "dpdk-testpmd": "apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23 "
    "librte-mempool-ring23",
    "qemu-system-x86_64": "apt-get install qemu-system-x86 ipxe-qemu",
    "qemu-storage-daemon": "apt-get install qemu-system-common",
}

_POLL_INTERVAL = 0.02
_MAX_LINES = 50_000
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_counter = itertools.count()

PathLike = str | os.PathLike[str]
_T = TypeVar("_T")


# --- errors ---------------------------------------------------------------------------------


class PeerError(RuntimeError):
    """A peer process failed to start, died, or did not do what was expected in time."""

    def __init__(self, message: str, *, output_tail: str = "", returncode: int | None = None):
        self.output_tail = output_tail
        self.returncode = returncode
        if output_tail:
            message = f"{message}\n--- last lines of the peer's output ---\n{output_tail}"
        super().__init__(message)


class PeerExited(PeerError):
    """The peer exited while we were waiting for it."""


class PeerTimeout(PeerError):
    """The peer did not reach the expected state before the deadline."""


# --- pytest helper --------------------------------------------------------------------------


def which_or_skip(binary: str) -> str:
    """The full path of ``binary``; skip the calling test if it is not installed.

    When the ``CI`` environment variable is set (to anything but an empty string), a missing
    binary *fails* the test instead: CI must not pass by silently skipping its peers.
    """
    import pytest  # only tests call this; the module itself does not need pytest

    path = shutil.which(binary)
    if path is not None:
        return path
    hint = INSTALL_HINTS.get(binary)
    reason = f"{binary} is not installed" + (f" ({hint})" if hint else "")
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so a missing peer is a failure, not a skip")
    pytest.skip(reason)


# --- the generic process wrapper ------------------------------------------------------------


class PeerProcess:
    """One external peer process, with its output captured line by line.

    ``argv`` is run with stdout and stderr merged into one pipe that a background thread reads
    (so the peer never blocks on a full pipe) and keeps as :attr:`lines`; ``log_path`` also
    tees it to a file. ``stdin_pipe`` keeps a pipe to the peer's stdin open (testpmd's command
    line), otherwise stdin is ``/dev/null``.

    Subclasses say when the peer is ready (:meth:`_wait_ready`), how to ask it to stop
    (:meth:`_request_stop`) and what to clean up afterwards (:meth:`_cleanup`).
    """

    #: Name used in messages and the reader thread's name.
    name = "peer"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin_pipe: bool = False,
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.stdin_pipe = stdin_pipe
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._dropped = 0
        self._eof = False
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stdin_lock = threading.Lock()

    # -- output --

    @property
    def lines(self) -> list[str]:
        """A copy of the output lines kept so far (ANSI escapes removed)."""
        with self._cond:
            return list(self._lines)

    @property
    def line_count(self) -> int:
        """Lines seen so far, including any dropped from the front of :attr:`lines`."""
        with self._cond:
            return self._dropped + len(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of output."""
        with self._cond:
            return "\n".join(self._lines[-n:])

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        logfile = self.log_path.open("a", encoding="utf-8") if self.log_path else None
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
                if logfile is not None:
                    logfile.write(line + "\n")
                    logfile.flush()
                with self._cond:
                    self._lines.append(line)
                    if len(self._lines) > _MAX_LINES:
                        drop = len(self._lines) - _MAX_LINES
                        del self._lines[:drop]
                        self._dropped += drop
                    self._cond.notify_all()
        except (OSError, ValueError):  # the pipe was closed under us during a forced stop
            pass
        finally:
            if logfile is not None:
                logfile.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """Block until an output line (number ``since`` or later) matches ``pattern``.

        Woken by every new line: no polling. Raises :class:`PeerExited` if the output ends
        (the peer exited) first, :class:`PeerTimeout` after ``timeout`` seconds.
        """
        regex = _compile(pattern)
        found = self._wait_lines(
            lambda lines: _first_match(regex, lines),
            timeout,
            since,
            f"a line matching {regex.pattern!r}",
        )
        return found[1]

    def wait_for_block(
        self,
        first: str | re.Pattern[str],
        last: str | re.Pattern[str],
        timeout: float = 10.0,
        *,
        since: int = 0,
    ) -> list[str]:
        """Block until a line matching ``first`` and then one matching ``last`` were printed
        (from line number ``since`` on); return the lines strictly between them."""
        start_re, end_re = _compile(first), _compile(last)

        def find(lines: list[str]) -> list[str] | None:
            head = _first_match(start_re, lines)
            if head is None:
                return None
            tail = _first_match(end_re, lines[head[0] + 1 :])
            if tail is None:
                return None
            return lines[head[0] + 1 : head[0] + 1 + tail[0]]

        return self._wait_lines(
            find, timeout, since, f"lines from {start_re.pattern!r} to {end_re.pattern!r}"
        )

    def _wait_lines(
        self, find: Callable[[list[str]], _T | None], timeout: float, since: int, what: str
    ) -> _T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = find(self._lines[max(since - self._dropped, 0) :])
                if found is not None:
                    return found
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(
                        f"{self.name}: no {what} within {timeout}s",
                        output_tail="\n".join(self._lines[-40:]),
                    )
                self._cond.wait(left)
        raise self._died(f"while waiting for {what}")

    def _died(self, doing: str) -> PeerExited:
        rc = self.proc.wait(5) if self.proc is not None else None
        self.returncode = rc
        return PeerExited(
            f"{self.name} exited with status {rc} {doing}", output_tail=self.tail(), returncode=rc
        )

    def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float | None = None
    ) -> None:
        """Poll ``predicate`` every 20 ms until true, failing early if the peer exits.

        For conditions that have no event to wait on (a file appearing); output lines should
        use :meth:`wait_for_line`.
        """
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not predicate():
            if self.proc is not None and self.proc.poll() is not None:
                # let the reader drain what the peer wrote before it died (it ends at the
                # pipe's EOF, at once unless a child of the peer still holds the pipe)
                self._join_reader(10.0)
                raise self._died(f"while waiting for {what}")
            if time.monotonic() >= deadline:
                raise PeerTimeout(
                    f"{self.name}: {what} not reached in time", output_tail=self.tail()
                )
            time.sleep(_POLL_INTERVAL)  # no event exists for this condition: bounded polling

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- lifetime --

    def start(self) -> Self:
        """Start the peer and wait until it is ready (stopping it again if it is not)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read_output, name=f"{self.name}-output-{self.proc.pid}", daemon=True
        )
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("%s (pid %d) is ready", self.name, self.proc.pid)
        return self

    def _wait_ready(self) -> None:
        """Block until the peer is ready; raise :class:`PeerError` if it is not."""

    def _request_stop(self) -> bool:
        """Ask the peer to exit in its own way; return True if something was asked."""
        return False

    def _cleanup(self) -> None:
        """Remove what the peer leaves behind (called after it was reaped)."""

    def send_input(self, text: str) -> None:
        """Write ``text`` to the peer's stdin (needs ``stdin_pipe``)."""
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"{self.name} has no stdin pipe")
        with self._stdin_lock:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()

    def _wait_exit(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def stop(self) -> int | None:
        """Stop the peer (polite request, SIGINT, SIGTERM, SIGKILL), reap it, clean up.

        Idempotent. Returns the exit status (negative: killed by that signal).
        """
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                asked = False
                with contextlib.suppress(OSError, ValueError):
                    asked = self._request_stop()
                if not (asked and self._wait_exit(self.stop_timeout)):
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        self._signal(sig)
                        if self._wait_exit(self.stop_timeout):
                            break
                        log.warning("%s (pid %d) ignored %s", self.name, proc.pid, sig.name)
                    else:
                        self._signal(signal.SIGKILL)
                        proc.wait()
            self.returncode = proc.wait()
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError), self._stdin_lock:
                    proc.stdin.close()
            # the reader sees EOF once the peer is gone; close the pipe only after it finished
            self._join_reader(5.0)
            if proc.stdout is not None:
                proc.stdout.close()
            self._cleanup()
        log.info("%s (pid %d) stopped with status %s", self.name, proc.pid, self.returncode)
        return self.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}"
        if self.returncode is not None:
            state += f", exited {self.returncode}"
        return f"<{type(self).__name__} {state}>"


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    return re.compile(pattern) if isinstance(pattern, str) else pattern


def _first_match(regex: re.Pattern[str], lines: list[str]) -> tuple[int, re.Match[str]] | None:
    for i, line in enumerate(lines):
        m = regex.search(line)
        if m:
            return i, m
    return None


def _is_socket(path: PathLike) -> bool:
    try:
        return Path(path).is_socket()
    except OSError:
        return False


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
        self.ready_pattern = _compile(ready_pattern)
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
            self.wait_until(lambda: _is_socket(path), f"socket {os.fspath(path)}")

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


# --- QEMU -----------------------------------------------------------------------------------


class QmpError(PeerError):
    """A QMP command failed."""


def qmp_command(path: PathLike, command: str, timeout: float = 10.0, **arguments: object) -> object:
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
            return execute(command, dict(arguments))


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
            self.wait_until(lambda: _is_socket(qmp), f"QMP socket {qmp}")
            self.qmp("query-status")

    def qmp(self, command: str, **arguments: object) -> object:
        """Run a QMP command (needs a QMP socket)."""
        if self.qmp_path is None:
            raise RuntimeError("QEMU was started without a QMP socket")
        return qmp_command(self.qmp_path, command, **arguments)

    def _cleanup(self) -> None:
        if self.qmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.qmp_path.unlink()
        if self.server:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()


class QemuStorageDaemon(PeerProcess):
    """``qemu-storage-daemon`` exporting ``image`` as a vhost-user-blk back-end at ``socket_path``.

    With ``create_size`` the image file is created (sparse) with that many bytes first. Ready
    when its pid file holds its pid: the daemon writes it after every export is listening and
    before it accepts connections (documented ordering).

    Quirks (QEMU 7.2): protocol features 0x8f2b (CONFIG, CONFIGURE_MEM_SLOTS, REPLY_ACK, ...),
    GET_MAX_MEM_SLOTS 32, GET_QUEUE_NUM 1 (``num_queues`` changes it), GET_CONFIG of up to 60
    bytes with the capacity in 512-byte sectors at offset 0. Accepts reconnects.
    """

    name = "qemu-storage-daemon"

    def __init__(
        self,
        image: PathLike,
        socket_path: PathLike,
        *,
        create_size: int | None = None,
        writable: bool = True,
        num_queues: int | None = None,
        logical_block_size: int | None = None,
        pidfile: PathLike | None = None,
        extra_args: Sequence[str] = (),
        binary: str = "qemu-storage-daemon",
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: PathLike | None = None,
    ) -> None:
        self.image = Path(image)
        self.socket_path = Path(socket_path)
        self.create_size = create_size
        self.pidfile = (
            Path(pidfile) if pidfile is not None else Path(f"{os.fspath(socket_path)}.pid")
        )
        export = (
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={os.fspath(socket_path)},writable={'on' if writable else 'off'}"
        )
        if num_queues is not None:
            export += f",num-queues={num_queues}"
        if logical_block_size is not None:
            export += f",logical-block-size={logical_block_size}"
        argv = [
            binary,
            "--blockdev",
            f"driver=file,node-name=file0,filename={os.fspath(image)}",
            "--export",
            export,
            "--pidfile",
            os.fspath(self.pidfile),
            *extra_args,
        ]
        super().__init__(
            argv, ready_timeout=ready_timeout, stop_timeout=stop_timeout, log_path=log_path
        )

    def start(self) -> Self:
        if self.create_size is not None:
            with self.image.open("wb") as f:
                f.truncate(self.create_size)
        return super().start()

    def _pidfile_ready(self) -> bool:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return False
        return self.proc is not None and text == str(self.proc.pid)

    def _wait_ready(self) -> None:
        self.wait_until(self._pidfile_ready, f"pid file {self.pidfile}")

    def _cleanup(self) -> None:
        # the daemon removes its socket and pid file on a clean exit; not after SIGKILL
        for path in (self.pidfile, self.socket_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
