"""The part every peer launcher shares: :class:`PeerProcess`, the peer errors, and
:func:`which_or_skip` for tests.

:class:`PeerProcess` starts one external process in its own session, reads its output line by
line on a thread, waits for readiness on an event (an output line) or, where none exists, by
bounded polling of the file system; leaving its context stops it politely, then with signals,
and closes everything it opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self, TypeVar

__all__ = [
    "INSTALL_HINTS",
    "PathLike",
    "PeerError",
    "PeerExited",
    "PeerProcess",
    "PeerTimeout",
    "compile_pattern",
    "is_socket",
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
MAX_LINES = 50_000
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

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
                    if len(self._lines) > MAX_LINES:
                        drop = len(self._lines) - MAX_LINES
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
        regex = compile_pattern(pattern)
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
        start_re, end_re = compile_pattern(first), compile_pattern(last)

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


def compile_pattern(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    return re.compile(pattern) if isinstance(pattern, str) else pattern


def _first_match(regex: re.Pattern[str], lines: list[str]) -> tuple[int, re.Match[str]] | None:
    for i, line in enumerate(lines):
        m = regex.search(line)
        if m:
            return i, m
    return None


def is_socket(path: PathLike) -> bool:
    try:
        return Path(path).is_socket()
    except OSError:
        return False
