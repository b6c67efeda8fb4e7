"""Running the ``vhostkit`` command line in a subprocess, the way a user or a script does."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
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
    (stdout and stderr together) goes to a file, read by :meth:`stop`.
    """

    def __init__(self, argv: Sequence[str], *, ready: bool = True, **kwargs: Any) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
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
                stdout=self._out,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                **kwargs,
            )
        finally:
            if ready:
                os.close(w)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
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

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        self._out.close()
