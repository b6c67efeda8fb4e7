"""vhostkit's front-end and virtio-net driver in a process of its own, driven over a pipe.

Run as a script (``python3 net_swap_driver.py SOCKET``), it connects a
:class:`~vhostkit.user.Frontend` to the vhost-user back-end at SOCKET, starts a
:class:`~vhostkit.guest.net.VirtioNetDriver` on it and answers one command a line on stdin,
one JSON line on stdout:

* ``send A B``: queue numbered frames ``A .. B-1`` (:func:`vhostkit.testing.swap.numbered`)
  -> ``{"sent": n}``;
* ``recv N T``: receive until ``N`` numbered frames came since the last ``recv``, or ``T``
  seconds passed -> ``{"numbers": [...]}`` (in arrival order);
* ``duplex RATE T``: receive until the frame numbered :data:`END` came, or ``T`` seconds
  passed, while sending numbered frames ``0, 1, ...`` at ``RATE`` a second, as a guest's I/O
  loop does (queue what is due, wait for room when the ring is full, reap what came) ->
  ``{"numbers": [...], "end": bool, "sent": n, "longest_send": s}`` (the numbers received
  before END, in arrival order; the longest wait for transmit room, in seconds);
* ``detach``: stop the rings on the back-end (GET_VRING_BASE), keep their positions and hang
  up -> ``{"positions": {ring: base}}``; the driver's rings, memory and eventfds stay as they
  are (the back-end can now be restarted);
* ``attach SOCKET``: connect to the (restarted) back-end at SOCKET and hand it the same
  memory, rings, eventfds and the positions kept -> ``{"positions": ...}``;
* ``stop``: stop the rings (GET_VRING_BASE) -> ``{"positions": {ring: base}}``, then exit.

Imported, :class:`DriverProcess` is the test's side of it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
#: The number of the frame that ends a stream into the driver (``duplex``).
END = 0xFFFFFFFF


class DriverProcess:
    """The driver script as a child process; :meth:`call` sends a command, returns the answer.

    ``DriverProcess(path)`` starts it at once; ``DriverProcess.deferred()`` makes one to
    :meth:`start` later (inside a ``with`` that closes it in any case)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: Any = None
        if socket_path is not None:
            self.start(socket_path)

    @classmethod
    def deferred(cls, timeout: float = 30.0) -> DriverProcess:
        return cls(None, timeout)

    def start(self, socket_path: str | os.PathLike[str]) -> None:
        """Start the process on the back-end at ``socket_path``; wait for its ready line."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), os.fspath(socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.ready = self._answer()

    def _answer(self, timeout: float | None = None) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        timeout = self.timeout if timeout is None else timeout
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the driver process said nothing in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver process exited ({self.proc.wait(5)})")
        return json.loads(line)

    def call(self, command: str) -> Any:
        """Send ``command``; wait for its answer."""
        self.begin(command)
        return self._answer()

    def begin(self, command: str) -> None:
        """Send ``command`` without waiting (the process works on it while the test goes on);
        :meth:`result` then waits for its answer."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def result(self, timeout: float | None = None) -> Any:
        """The answer to the command :meth:`begin` sent (waiting up to ``timeout`` seconds,
        the process's timeout by default)."""
        return self._answer(timeout)

    def close(self) -> int:
        """Wait for the process to end (killed if it does not); its exit code."""
        if self.proc is None:
            return 0
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def __enter__(self) -> DriverProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Gone:
    """The back-end that was hung up on: only the ring positions it returned."""

    def __init__(self, positions: dict[int, int]) -> None:
        self.positions = positions

    def get_vring_base(self, index: int) -> int:
        return self.positions[index]


def _serve(socket_path: str) -> int:
    import contextlib

    from vhostkit.guest.net import VirtioNetDriver
    from vhostkit.testing.swap import GUEST_MAC, PEER_MAC, frame_number, numbered
    from vhostkit.user import Frontend

    def say(data: object) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    with contextlib.ExitStack() as stack:
        fe = stack.enter_context(Frontend.connect(socket_path, timeout=10))
        nic = stack.enter_context(VirtioNetDriver(fe, queue_size=256).start())
        say({"ready": True, "header_size": nic.header_size})
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "send":
                a, b = int(args[0]), int(args[1])
                frames = [numbered(i, GUEST_MAC, PEER_MAC) for i in range(a, b)]
                say({"sent": nic.send_all(frames, timeout=20)})
            elif cmd == "recv":
                numbers: list[int] = []
                want, deadline = int(args[0]), time.monotonic() + float(args[1])
                while len(numbers) < want and (left := deadline - time.monotonic()) > 0:
                    for frame in nic.recv(timeout=left):
                        n = frame_number(frame)
                        if n is not None and frame[6:12] == PEER_MAC:
                            numbers.append(n)
                say({"numbers": numbers})
            elif cmd == "duplex":
                rate, deadline = float(args[0]), time.monotonic() + float(args[1])
                numbers, end, sent, longest = [], False, 0, 0.0
                start = time.monotonic()
                while not end and time.monotonic() < deadline:
                    due = int((time.monotonic() - start) * rate) - sent
                    frames = [numbered(i, GUEST_MAC, PEER_MAC) for i in range(sent, sent + due)]
                    began = time.monotonic()
                    while frames:
                        queued = nic.send(frames)
                        sent += queued
                        frames = frames[queued:]
                        if frames:
                            nic.wait_tx_done(timeout=1.0)
                    longest = max(longest, time.monotonic() - began)
                    for frame in nic.recv(timeout=0.002):
                        n = frame_number(frame)
                        if n is None or frame[6:12] != PEER_MAC:
                            continue
                        if n == END:
                            end = True
                            break
                        numbers.append(n)
                say({"numbers": numbers, "end": end, "sent": sent, "longest_send": longest})
            elif cmd == "detach":
                positions = {i: fe.get_vring_base(i) for i in nic.ring_indices}
                nic.backend = _Gone(positions)  # type: ignore[assignment]
                fe.close()
                say({"positions": {str(k): v for k, v in positions.items()}})
            elif cmd == "attach":
                fe = stack.enter_context(Frontend.connect(args[0], timeout=10))
                moved = nic.switch_backend(fe)
                say({"positions": {str(k): v for k, v in moved.items()}})
            elif cmd == "stop":
                say({"positions": {str(k): v for k, v in nic.stop().items()}})
                return 0
            else:
                say({"error": f"unknown command {cmd!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
