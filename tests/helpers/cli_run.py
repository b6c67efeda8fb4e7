"""Running the ``vhostkit`` command line in a subprocess, the way a user or a script does."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

#: ``python3 -m vhostkit``: the real entry point (``vhostkit`` the script runs the same main)
VHOSTKIT = (sys.executable, "-m", "vhostkit")


def vhostkit(
    *args: str, prefix: Sequence[str] = (), timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``[prefix...] python3 -m vhostkit ARGS`` to completion; output captured as text."""
    return subprocess.run(
        [*prefix, *VHOSTKIT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


class Daemon:
    """A daemon started with ``--ready-fd``; :meth:`wait_ready` blocks on that fd (no polling).

    ``argv`` is the whole command after the interpreter (``["-m", "vhostkit", ...]``). Output
    (stdout and stderr together) goes to a file, read by :meth:`stop`; with ``watch`` it
    goes through a pipe that a thread reads line by line instead, so that a test can wait
    for lines as they come (:meth:`wait_count`, woken by each line: no polling).
    """

    def __init__(
        self, argv: Sequence[str], *, ready: bool = True, watch: bool = False, **kwargs: Any
    ) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._lines: list[str] | None = [] if watch else None
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._ready_r = -1
        pass_fds: tuple[int, ...] = ()
        extra: list[str] = []
        if ready:
            self._ready_r, w = os.pipe2(os.O_CLOEXEC)
            pass_fds = (w,)
            extra = ["--ready-fd", str(w)]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *argv, *extra],
                stdout=subprocess.PIPE if watch else self._out,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                **kwargs,
            )
        finally:
            if ready:
                os.close(w)
        if watch:
            self._reader = threading.Thread(target=self._read, name="daemon-output", daemon=True)
            self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None and self._lines is not None
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                with self._cond:
                    self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def count(self, pattern: str) -> int:
        """Output lines so far that match ``pattern`` (``watch`` only)."""
        regex = re.compile(pattern)
        with self._cond:
            assert self._lines is not None, "started without watch"
            return sum(1 for line in self._lines if regex.search(line))

    def wait_count(self, pattern: str, n: int, timeout: float = 20.0) -> None:
        """Block until ``n`` output lines match ``pattern`` (``watch`` only)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen, looked = 0, 0
        with self._cond:
            assert self._lines is not None, "started without watch"
            while True:
                seen += sum(1 for line in self._lines[looked:] if regex.search(line))
                looked = len(self._lines)
                if seen >= n:
                    return
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise TimeoutError(f"{seen} of {n} lines matching {pattern!r}")
                self._cond.wait(left)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if self._lines is not None:
            with self._cond:
                return "\n".join(self._lines)
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the daemon writes READY=1 (fails if it exits or times out first)."""
        got = b""
        deadline = time.monotonic() + timeout
        while b"READY=1\n" not in got:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._ready_r], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"daemon not ready: {self.output()}")
            chunk = os.read(self._ready_r, 64)
            if not chunk:
                self.proc.wait(10)
                raise EOFError(f"daemon exited ({self.proc.returncode}): {self.output()}")
            got += chunk

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Signal the daemon and reap it; return its exit status and output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> tuple[int, str]:
        """Reap the daemon (killed if it outlives ``timeout``); return status and output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.close()
        return self.proc.returncode, self.output()

    def close(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        self._out.close()
