"""A fork server for the vhostkit daemons: one interpreter imports vhostkit (NumPy, the CLI,
the devices) once; each daemon is then a ``fork()`` of it running the real command line
(:func:`vhostkit.cli.main`), in milliseconds instead of the 0.3-0.7 s of a fresh interpreter.

The zygote is a separate process (``python3 tests/helpers/zygote.py``) that holds nothing but
its control socket: a forked daemon inherits no fd of the test (no client socket of the test
kept alive in the daemon, no pytest capture file). A request carries the daemon's argv and,
as SCM_RIGHTS, its output fd (stdout and stderr), its ``--ready-fd`` pipe, a status pipe (the
zygote, the daemon's parent, writes the wait status there when it reaps it) and optionally a
probe pipe for :data:`PAUSE` (below). The test side (:class:`ForkedProc`) signals the daemon
through a pidfd (no pid reuse race) and waits on the status pipe, like ``subprocess.Popen``.

``pause_after=N`` (test-only, in the forked daemon): once its rings have popped ``N`` chains
(counted in :meth:`ActiveRing.pop_batch`), the ring worker writes one byte to the probe fd and
blocks, holding the chains it took and did not complete, until the daemon is killed. A kill
after that byte is a kill with requests in flight, by construction.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helpers.cli_run import Daemon

_MAX_FDS = 4
#: tests/ (where ``helpers`` is imported from)
_TESTS = Path(__file__).resolve().parent.parent
_CMSG_SPACE = socket.CMSG_SPACE(_MAX_FDS * 4)


# --- the server side (runs in the zygote process) -------------------------------------------


def _child(
    argv: list[str], out: int, ready: int, probe: int | None, pause_after: int | None
) -> None:
    """In the forked daemon: become ``python3 -m vhostkit ARGV`` and never return."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        if probe is not None and pause_after is not None:
            _install_pause(probe, pause_after)
        from vhostkit.cli import main

        argv = [a.replace("{ready_fd}", str(ready)) for a in argv]
        sys.argv = ["vhostkit", *argv]
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _install_pause(probe: int, after: int) -> None:
    from vhostkit.user.backend.ring_device import ActiveRing

    pop = ActiveRing.pop_batch
    popped = [0]
    lock = threading.Lock()
    never = threading.Event()

    def pop_batch(self: ActiveRing, *args: Any, **kwargs: Any) -> Any:
        batch = pop(self, *args, **kwargs)
        if len(batch):
            with lock:
                popped[0] += len(batch)
                reached = popped[0] >= after
            if reached:
                os.write(probe, b"p")
                never.wait()  # hold the chains just taken until SIGKILL
        return batch

    ActiveRing.pop_batch = pop_batch  # type: ignore[method-assign]


def serve(sock: socket.socket) -> None:
    """The zygote's loop: fork a daemon per request, reap them, report their status."""
    import importlib

    import vhostkit.cli
    import vhostkit.devices.blk
    import vhostkit.devices.net  # imported once here: the point of the zygote

    for command in vhostkit.cli.COMMANDS:  # what build_parser imports, every time
        importlib.import_module(command.module)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status_fds: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            while status_fds:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                fd = status_fds.pop(pid, None)
                if fd is not None:
                    os.write(fd, struct.pack("<i", status))
                    os.close(fd)
        if sock not in ready:
            continue
        try:
            data, anc, _, _ = sock.recvmsg(65536, _CMSG_SPACE)
        except InterruptedError:
            continue
        if not data:
            return  # the test closed its end
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        req = json.loads(data)
        out, ready_w, status_w, *rest = list(fds)
        probe = rest[0] if rest else None
        pid = os.fork()
        if pid == 0:
            sock.close()
            os.close(wake_r)
            os.close(wake_w)
            os.close(status_w)
            for fd in status_fds.values():
                os.close(fd)
            _child(req["argv"], out, ready_w, probe, req.get("pause_after"))
        for fd in (out, ready_w, *rest):
            os.close(fd)
        status_fds[pid] = status_w
        sock.send(struct.pack("<i", pid))


def serve_fd(fd: int) -> None:
    """The zygote process's entry point: serve the control socket ``fd``."""
    serve(socket.socket(fileno=fd))


# --- the test side ------------------------------------------------------------------------------


class ForkedProc:
    """The part of :class:`subprocess.Popen` the daemon tests use, for a zygote's child."""

    def __init__(self, pid: int, status_r: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status_r = status_r
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and reaped): its status is on the way
            self._pidfd = -1

    def _collect(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._status_r], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._status_r, 4)
        status = struct.unpack("<i", data)[0] if len(data) == 4 else 0
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._status_r)
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._status_r = self._pidfd = -1
        return True

    def poll(self) -> int | None:
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._collect(timeout):
            raise subprocess.TimeoutExpired(f"daemon {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The fork server (a context manager): :meth:`daemon` starts a vhostkit daemon."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(_TESTS)!r}); "
                    f"from helpers.zygote import serve_fd; serve_fd({theirs.fileno()})",
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self._lock = threading.Lock()

    def spawn(
        self,
        argv: Sequence[str],
        fds: Sequence[int],
        pause_after: int | None = None,
    ) -> int:
        """Fork a daemon running ``vhostkit ARGV`` with ``fds`` (out, ready, status[, probe]);
        return its pid. ``{ready_fd}`` in ``argv`` becomes the ready fd's number."""
        req = json.dumps({"argv": list(argv), "pause_after": pause_after}).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        with self._lock:
            self.sock.sendmsg([req], anc)
            self.sock.settimeout(20)
            data = self.sock.recv(4)
        if len(data) != 4:
            raise RuntimeError("the zygote died")
        return int(struct.unpack("<i", data)[0])

    def daemon(self, argv: Sequence[str], *, pause_after: int | None = None) -> ForkedDaemon:
        """A :class:`ForkedDaemon` running ``vhostkit ARGV --ready-fd N``, not yet ready."""
        return ForkedDaemon(self, argv, pause_after=pause_after)

    def close(self) -> None:
        self.sock.close()  # the zygote ends at EOF
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ForkedDaemon(Daemon):
    """A :class:`~helpers.cli_run.Daemon` forked by a :class:`Zygote` (same interface).

    With ``pause_after``, :attr:`probe` is readable once the daemon has popped that many
    chains and holds them (see the module docstring).
    """

    def __init__(
        self, zygote: Zygote, argv: Sequence[str], *, pause_after: int | None = None
    ) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._lines = None  # output to the file, not watched
        self._cond = threading.Condition()
        self._eof = False
        self._reader = None
        self.probe = -1
        fds: list[int] = []
        try:
            self._ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            fds.append(ready_w)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            fds.append(status_w)
            probe_w = None
            if pause_after is not None:
                self.probe, probe_w = os.pipe2(os.O_CLOEXEC)
                fds.append(probe_w)
            send = [self._out.fileno(), ready_w, status_w] + ([probe_w] if probe_w else [])
            pid = zygote.spawn([*argv, "--ready-fd", "{ready_fd}"], send, pause_after)
            self.proc = ForkedProc(pid, status_r)  # type: ignore[assignment]
        except BaseException:
            self._out.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        super().close()
        if self.probe >= 0:
            os.close(self.probe)
            self.probe = -1
