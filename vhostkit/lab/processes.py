"""The processes a lab starts (back-end daemons, virtual guests) and how it talks to them."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
import subprocess
import threading
from typing import IO, Any

from vhostkit.lab.errors import LabError, LabSetupError

__all__ = ["GuestProcess", "LabProcess", "read_line", "read_ready"]

log = logging.getLogger(__name__)

#: Step kinds, planes and guest kinds this runner carries out.


class LabProcess:
    """A child process the lab started: its name, its Popen, how to stop it."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class GuestProcess(LabProcess):
    """A virtual guest (:mod:`vhostkit.lab.guest`), talked to in JSON lines."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        super().__init__(name, popen)
        self.lock = threading.Lock()
        self.addresses: list[ipaddress.IPv4Interface] = []

    def wait_ready(self, timeout: float) -> None:
        line = read_line(self.popen.stdout, timeout)
        if line is None:
            raise LabSetupError(f"guest {self.name} did not start: {self._stderr_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise LabSetupError(f"guest {self.name} did not start: {answer['error']}")

    def request(self, op: str, *, wait: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send request ``op`` with ``params``; its answer (``wait`` seconds at most)."""
        req = {"op": op, **params}
        with self.lock:
            assert self.popen.stdin is not None
            try:
                self.popen.stdin.write(json.dumps(req) + "\n")
                self.popen.stdin.flush()
            except BrokenPipeError:
                raise LabError(f"guest {self.name} is gone: {self._stderr_tail()}") from None
            line = read_line(self.popen.stdout, wait)
        if line is None:
            raise LabError(f"guest {self.name} did not answer {op}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise LabError(f"guest {self.name}: {answer['error']}")
        return answer

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(LabError, OSError, ValueError):
                self.request("quit", wait=timeout)
        super().stop(timeout)

    def _stderr_tail(self) -> str:
        if self.popen.poll() is None or self.popen.stderr is None:
            return "still running"
        return self.popen.stderr.read()[-2000:].strip() or f"exit code {self.popen.returncode}"


def read_ready(stream: IO[bytes], timeout: float) -> bytes:
    """What a daemon wrote to its ready pipe within ``timeout`` (b"" at EOF or time-out)."""
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.read(64) or b"" if ready else b""


def read_line(stream: IO[str] | None, timeout: float) -> str | None:
    """One line from a child's stdout within ``timeout`` (None at EOF or time-out)."""
    import select

    if stream is None:
        return None
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return None
    line = stream.readline()
    return line or None
