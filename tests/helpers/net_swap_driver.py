"""vhostkit's front-end and virtio-net driver in a process of its own, driven over a pipe.

Run as a script (``python3 net_swap_driver.py SOCKET``), it connects a
:class:`~vhostkit.user.Frontend` to the vhost-user back-end at SOCKET, starts a
:class:`~vhostkit.guest.net.VirtioNetDriver` on it and answers one command a line on stdin,
one JSON line on stdout:

* ``send A B``: queue numbered frames ``A .. B-1`` (:func:`vhostkit.testing.swap.numbered`)
  -> ``{"sent": n}``;
* ``recv N T``: receive until ``N`` numbered frames came in all, or ``T`` seconds passed ->
  ``{"numbers": [...]}`` (every number received so far, in arrival order);
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


class DriverProcess:
    """The driver script as a child process; :meth:`call` sends a command, returns the answer."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), os.fspath(socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.ready = self._answer()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"the driver process said nothing in {self.timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver process exited ({self.proc.wait(5)})")
        return json.loads(line)

    def call(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> int:
        """Wait for the process to end (killed if it does not); its exit code."""
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


def _serve(socket_path: str) -> int:
    from vhostkit.guest.net import VirtioNetDriver
    from vhostkit.testing.swap import GUEST_MAC, PEER_MAC, frame_number, numbered
    from vhostkit.user import Frontend

    def say(data: object) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    numbers: list[int] = []
    with (
        Frontend.connect(socket_path, timeout=10) as fe,
        VirtioNetDriver(fe, queue_size=256).start() as nic,
    ):
        say({"ready": True, "header_size": nic.header_size})
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "send":
                a, b = int(args[0]), int(args[1])
                frames = [numbered(i, GUEST_MAC, PEER_MAC) for i in range(a, b)]
                say({"sent": nic.send_all(frames, timeout=20)})
            elif cmd == "recv":
                want, deadline = int(args[0]), time.monotonic() + float(args[1])
                while len(numbers) < want and (left := deadline - time.monotonic()) > 0:
                    for frame in nic.recv(timeout=left):
                        n = frame_number(frame)
                        if n is not None and frame[6:12] == PEER_MAC:
                            numbers.append(n)
                say({"numbers": numbers})
            elif cmd == "stop":
                say({"positions": {str(k): v for k, v in nic.stop().items()}})
                return 0
            else:
                say({"error": f"unknown command {cmd!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
