"""A peer that vanishes at any point: the side left gets a typed error, releases everything and
serves (or makes) the next connection.

The front-end vanishes: the real blk daemon (``python3 -m vhostkit blk-backend``) is served by
front-end *processes* (forked from the test, each a real :class:`~vhostkit.user.Frontend` and
:class:`~vhostkit.guest.blk.BlkDriver`) that are SIGKILLed in the middle of a message header,
in the middle of a payload that carries an fd, between a request and its reply, while the
rings run, and at random moments of a whole session (:data:`RANDOM_KILLS` times). Afterwards
the daemon holds as many fds, memfd mappings and threads as before, its log has a typed
error line per connection and no traceback, and it serves a good front-end.

The back-end vanishes: a back-end process (forked; it speaks raw vhost-user) is SIGKILLed
after it read a request, in the middle of its reply's header and in the middle of its reply's
payload, while :class:`Frontend` waits for the reply: the call raises
:class:`~vhostkit.errors.Disconnected` or :class:`~vhostkit.errors.PartialMessage` and the
test process holds no fd it did not hold before. (Killing the real daemon mid-stream, with
reconnect, is test_reliability_restart.py.)
"""

from __future__ import annotations

import array
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.vhostkit_daemon import (
    assert_clean_output,
    daemon_held,
    daemon_settled,
    good_connection,
    start_blk_daemon,
)

from vhostkit.errors import Disconnected, PartialMessage, TransportError
from vhostkit.guest.blk import BlkDriver
from vhostkit.user import Frontend
from vhostkit.user.message import HEADER_SIZE, FrontendReq

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: front-end processes killed at a random moment (default run; a fork costs milliseconds)
RANDOM_KILLS = 1000 if LONG else 100
#: kills per fixed moment (mid-header, mid-payload, before the reply, rings running)
FIXED_KILLS = 100 if LONG else 10
#: the longest random delay between a front-end's first connect and its SIGKILL; a whole
#: session (set-up, 20 writes and reads, stop) takes about this long on a quiet machine
RANDOM_SPAN = 0.03

VERSION = 0x1


def header(request: int, size: int, flags: int = VERSION) -> bytes:
    return struct.pack("<III", request, flags, size)


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


# --- forked peers -----------------------------------------------------------------------------


def fork_peer(body: Callable[[Callable[[], None]], None]) -> tuple[int, int]:
    """Fork a child that runs ``body(ready)`` and then waits to be killed.

    ``ready()`` tells the parent (one byte on a pipe) that the child reached the moment to be
    killed at. Returns ``(pid, read end of the pipe)``. The child never returns into pytest.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(r)
            body(lambda: os.write(w, b"r"))
            threading.Event().wait()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def wait_ready_byte(r: int, timeout: float = 10.0) -> bool:
    """True once the child said ready; False if it died first."""
    import select

    ready, _, _ = select.select([r], [], [], timeout)
    assert ready, "the forked peer neither got ready nor died"
    return os.read(r, 1) == b"r"


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"the peer exited by itself ({status:#x}) before the kill"


# --- the front-end vanishes: the blk daemon must not notice beyond a log line ---------------


def fe_mid_header(sock_path: Path) -> Callable[[Callable[[], None]], None]:
    def body(ready: Callable[[], None]) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(sock_path))
        s.sendall(header(FrontendReq.GET_FEATURES, 0)[:5])
        ready()

    return body


def fe_mid_payload(sock_path: Path) -> Callable[[Callable[[], None]], None]:
    """SET_MEM_TABLE header, an fd, half the payload: the daemon holds the fd until it sees
    the connection die; it must close it then."""

    def body(ready: Callable[[], None]) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(sock_path))
        s.sendall(header(FrontendReq.SET_OWNER, 0))
        memfd = os.memfd_create("vanish", os.MFD_CLOEXEC)
        os.ftruncate(memfd, 1 << 20)
        payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, 0x7F0000000000, 0)
        send_with_fds(s, header(FrontendReq.SET_MEM_TABLE, len(payload)) + payload[:12], [memfd])
        ready()

    return body


def fe_before_reply(sock_path: Path) -> Callable[[Callable[[], None]], None]:
    """Requests that get replies, sent without reading them: the daemon replies to a peer
    that is gone (or going)."""

    def body(ready: Callable[[], None]) -> None:
        fe = Frontend.connect(sock_path, timeout=5)
        fe.set_owner()
        for _ in range(64):
            fe.conn.sock.sendall(header(FrontendReq.GET_FEATURES, 0))
        ready()

    return body


def fe_rings_running(sock_path: Path) -> Callable[[Callable[[], None]], None]:
    def body(ready: Callable[[], None]) -> None:
        fe = Frontend.connect(sock_path, timeout=5)
        drv = BlkDriver(fe, num_queues=2)
        drv.start()
        drv.write(0, b"\1" * 4096)
        ready()
        i = 0
        while True:  # both rings busy until the kill
            drv.submit([b"\0" * 16], [4096, 1], queue=i % 2)
            drv.write(i % 64, bytes([i % 256]) * 512, queue=(i + 1) % 2)
            i += 1

    return body


def fe_whole_session(sock_path: Path) -> Callable[[Callable[[], None]], None]:
    """Sessions one after the other (connect, set-up, 20 writes and reads, stop, close) until
    the kill, which so lands anywhere in one: ready once the first socket connects."""

    def body(ready: Callable[[], None]) -> None:
        first = True
        while True:
            fe = Frontend.connect(sock_path, timeout=5)
            if first:
                ready()
                first = False
            drv = BlkDriver(fe, num_queues=2)
            drv.start()
            for i in range(20):
                drv.write(i, bytes([i]) * 512, queue=i % 2)
                drv.read(i, 512, queue=(i + 1) % 2)
            for q in range(2):
                fe.get_vring_base(q)
            drv.close()
            fe.close()

    return body


FIXED = {
    "mid_header": fe_mid_header,
    "mid_payload": fe_mid_payload,
    "before_reply": fe_before_reply,
    "rings_running": fe_rings_running,
}


@pytest.fixture
def blk_daemon(sock_dir, tmp_path) -> Iterator[tuple[Path, object]]:
    sock = sock_dir / "blk.sock"
    with start_blk_daemon(sock, tmp_path / "disk.img", "--queues", "2", "--log-level", "info") as d:
        yield sock, d


def ended_lines(output: str) -> int:
    """The daemon's log lines for connections that ended: a clean disconnect, a typed
    transport error (``PartialMessage``, ``SocketBroken``) or a protocol error."""
    return sum(
        output.count(line)
        for line in ("front-end disconnected", "front-end connection ended", "dropped a front-end")
    )


def test_front_ends_killed_at_fixed_moments_leave_the_daemon_as_it_was(
    fd_check, blk_daemon
) -> None:
    sock, daemon = blk_daemon
    good_connection(sock, queues=2)  # warm: the first connection's one-time allocations
    baseline = daemon_held(daemon)
    for name, make in FIXED.items():
        for _ in range(FIXED_KILLS):
            pid, r = fork_peer(make(sock))
            try:
                assert wait_ready_byte(r), f"{name}: the front-end died before its moment"
            finally:
                os.close(r)
                kill(pid)
        held = daemon_settled(daemon, baseline)
        assert held.within(baseline), f"after {FIXED_KILLS} kills {name}: {held} > {baseline}"
        good_connection(sock, queues=2)
    rc, output = daemon.stop()
    assert rc == 0
    assert_clean_output(output)
    # one line per killed front-end and per good one (the last good one's line may race the
    # SIGTERM: not counted)
    assert ended_lines(output) >= FIXED_KILLS * len(FIXED) + len(FIXED), output[-3000:]


def test_front_ends_killed_at_random_moments_leave_the_daemon_as_it_was(
    fd_check, blk_daemon
) -> None:
    sock, daemon = blk_daemon
    good_connection(sock, queues=2)
    baseline = daemon_held(daemon)
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(int(os.environ.get("VHOSTKIT_SEED", seed)))
    failed = 0
    for _ in range(RANDOM_KILLS):
        pid, r = fork_peer(fe_whole_session(sock))
        try:
            assert wait_ready_byte(r)
        finally:
            os.close(r)
        time.sleep(rng.uniform(0, RANDOM_SPAN))  # a random moment, not a synchronisation
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        failed += not os.WIFSIGNALED(status)  # a session that failed exits the child
    held = daemon_settled(daemon, baseline)
    assert held.within(baseline), f"after {RANDOM_KILLS} random kills: {held} > {baseline}"
    good_connection(sock, queues=2)
    rc, output = daemon.stop()
    assert rc == 0, output[-3000:]
    assert_clean_output(output)
    assert ended_lines(output) >= RANDOM_KILLS + 1  # the last good one's line may race SIGTERM
    assert failed == 0, f"seed {seed}: {failed} front-ends failed before their kill"


# --- the back-end vanishes: the front-end's call raises a typed error ------------------------


def be_after_request(listen: socket.socket, reply: bytes) -> Callable[[Callable[[], None]], None]:
    """Accept, read the request header, send ``reply`` (part of one), say ready."""

    def body(ready: Callable[[], None]) -> None:
        conn, _ = listen.accept()
        got = b""
        while len(got) < HEADER_SIZE:
            got += conn.recv(HEADER_SIZE - len(got))
        if reply:
            conn.sendall(reply)
        ready()

    return body


FEATURES_REPLY = header(FrontendReq.GET_FEATURES, 8, VERSION | 0x4) + struct.pack("<Q", 1 << 32)
BACKEND_CUTS = {
    "after_request": (b"", Disconnected),
    "mid_reply_header": (FEATURES_REPLY[:7], PartialMessage),
    "mid_reply_payload": (FEATURES_REPLY[: HEADER_SIZE + 3], PartialMessage),
}


@pytest.mark.parametrize("cut", BACKEND_CUTS)
def test_a_back_end_killed_while_the_front_end_waits_gives_a_typed_error(
    fd_check, sock_dir, cut
) -> None:
    reply, expected = BACKEND_CUTS[cut]
    path = sock_dir / "be.sock"
    for _ in range(FIXED_KILLS):
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listen.bind(os.fspath(path))
            listen.listen(1)
            pid, r = fork_peer(be_after_request(listen, reply))
        finally:
            listen.close()
        killed = threading.Event()

        def killer(pid: int = pid, r: int = r, killed: threading.Event = killed) -> None:
            try:
                wait_ready_byte(r)
            finally:
                os.close(r)
                kill(pid)
                killed.set()

        t = threading.Thread(target=killer)
        t.start()
        try:
            with Frontend.connect(path, timeout=5) as fe:
                with pytest.raises(expected):
                    fe.get_features()
                with pytest.raises(TransportError):  # the connection stays failed
                    fe.get_features()
        finally:
            # the killer always kills (once the child is ready, or after its wait): a kill from
            # here as well raced it (the child already killed and reaped: ESRCH)
            t.join()
            assert killed.is_set()
            os.unlink(path)
