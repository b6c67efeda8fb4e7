"""Nothing a front-end connection leaves behind may outlive it; every ring fd is closed once.

The real blk daemon (``python3 -m vhostkit blk-backend``) is driven by vhostkit's
:class:`Frontend` and the test reads the daemon's ``/proc/PID/fd``, ``/proc/PID/maps`` and
``/proc/PID/status``: after many connect / set-up / disconnect cycles, well-behaved or hostile
(bad ring numbers, addresses and bases, requests out of order, a kick fd replaced, a
disconnect in the middle of ``GET_VRING_BASE``), the daemon holds as many fds, guest-memory
(memfd) mappings and threads as before the first connection, its stderr has no traceback and
it still serves the next good connection.

In-process tests check the same at the library level: :class:`BackendListener` forgets
finished connections (their server, thread and handler), and a request that fails leaves no
frame (hence no mapping) behind in ``last_error``.

Each daemon test runs :data:`CYCLES` cycles (a few seconds);
``VHOSTKIT_LONG=1 python3 -m pytest -m reliability`` runs :data:`LONG_CYCLES` instead (a few
minutes). The well-behaved cycles also bound the daemon's RSS growth (:data:`RSS_SLACK_KB`).
"""

from __future__ import annotations

import gc
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.proc_usage import Held, held, settled

from vhostkit.errors import RequestFailed, Unsupported, VhostError
from vhostkit.guest.blk import QUEUE_AREA, QUEUE_SIZE, BlkDriver
from vhostkit.types import VringAddr
from vhostkit.user import BackendListener, Frontend, FrontendReqHandler, FrontendReqServer
from vhostkit.user.backend.device import BackendDevice
from vhostkit.user.backend.ring_device import SinkDevice
from vhostkit.user.backend_req import BackendChannel
from vhostkit.user.codec import Channel, Message
from vhostkit.user.connection import Connection
from vhostkit.user.message import FrontendReq, ProtocolFeature, VringStatePayload
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.split import SplitDriverQueue

pytestmark = pytest.mark.reliability
P = ProtocolFeature

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: connections per daemon test
CYCLES = 200
#: connections per daemon test with VHOSTKIT_LONG=1
LONG_CYCLES = 2000
N = LONG_CYCLES if LONG else CYCLES
#: the most the daemon's RSS may grow from the 20th cycle to the last (before the fix it grew
#: about 4.5 KiB per connection: 800 KiB over 200, 9 MiB over 2000; after it, tens of KiB)
RSS_SLACK_KB = 2048 if LONG else 384
#: how long the daemon gets to finish tearing down the last connection
SETTLE_TIMEOUT = 10.0
#: a split ring base out of range (a u16): the device refuses to start the ring after it
#: built its views of guest memory
BAD_BASE = 0x12345


# --- the daemon and what it holds ---------------------------------------------------------


class Daemon:
    """``python3 -m vhostkit blk-backend`` on a fresh image; stderr goes to a file."""

    def __init__(self, tmp: Path, sock: Path, *args: str) -> None:
        image = tmp / "disk.img"
        with image.open("wb") as f:
            f.truncate(4 << 20)
        self.sock = sock
        self.stderr_path = tmp / "daemon.stderr"
        argv = [sys.executable, "-m", "vhostkit", "blk-backend", "--socket", str(sock)]
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*argv, "--image", str(image), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout
        while b"listening on" not in out:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise TimeoutError(f"daemon not listening: {out!r} {self.stderr()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"daemon exited: {out!r} {self.stderr()}")
            out += chunk

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def held(self) -> Held:
        return held(self.proc.pid)

    def settled(self, baseline: Held) -> Held:
        """Wait until the daemon holds no more than ``baseline``; return what it holds."""
        return settled(self.proc.pid, baseline, SETTLE_TIMEOUT)

    def finish(self) -> str:
        """SIGTERM, reap, return stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.stderr()


@pytest.fixture
def daemon_factory(fd_check, sock_dir, tmp_path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = Daemon(tmp_path, sock_dir / f"blk{len(daemons)}.sock", *args)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.finish()


def good_connection(daemon: Daemon, queues: int = 1) -> None:
    """A well-behaved front-end: full set-up, a write and a read-back on every ring, stop."""
    with Frontend.connect(daemon.sock, timeout=5) as fe:
        drv = BlkDriver(fe, num_queues=queues)
        try:
            drv.start()
            for q in range(queues):
                data = bytes([q + 1]) * 512
                assert drv.write(q, data, queue=q).status == 0
                assert drv.read(q, 512, queue=q).data == data
            for q in range(queues):
                fe.get_vring_base(q)
        finally:
            drv.close()


def assert_flat(daemon: Daemon, baseline: Held, what: str) -> Held:
    held = daemon.settled(baseline)
    assert held.within(baseline), (
        f"after {N} {what}: the daemon holds {held}, it held {baseline} before"
    )
    return held


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-6000:]


# --- the front-ends ---------------------------------------------------------------------------


def negotiate_and_map(fe: Frontend, drv: BlkDriver) -> None:
    fe.set_owner()
    drv.features, drv.protocol = fe.negotiate(drv.wanted_features, drv.wanted_protocol)
    fe.set_mem_table(drv.mem.regions)


def ring_addr(drv: BlkDriver, index: int) -> VringAddr:
    """A well-formed ring ``index`` in the driver's memory (a driver queue lays it out)."""
    q = SplitDriverQueue(
        drv.mem, QUEUE_SIZE, index * QUEUE_AREA, features=drv.features, index=index
    )
    return q.vring_addr()


def start_ring(fe: Frontend, drv: BlkDriver, index: int) -> None:
    """Set up ring ``index`` as a VMM does (the driver then submits on ``drv.queues[index]``)."""
    q = SplitDriverQueue(
        drv.mem, QUEUE_SIZE, index * QUEUE_AREA, features=drv.features, index=index
    )
    while len(drv.queues) <= index:
        drv.queues.append(q)
    drv.queues[index] = q
    fe.set_vring_num(index, QUEUE_SIZE)
    fe.set_vring_base(index, 0)
    fe.set_vring_addr(q.vring_addr())
    fe.set_vring_call(index, drv.calls[index])
    fe.set_vring_err(index, drv.errs[index])
    fe.set_vring_kick(index, drv.kicks[index])
    if drv.features & VirtioFeature.PROTOCOL_FEATURES:
        fe.set_vring_enable(index, True)


def refused(call: Callable[[], object]) -> None:
    """The daemon answers ``call`` with a failure (REPLY_ACK is negotiated)."""
    with pytest.raises(RequestFailed):
        call()


def bad_base_then_leave(fe: Frontend, drv: BlkDriver) -> None:
    """A ring base out of range: the ring cannot start once its kick arrives."""
    negotiate_and_map(fe, drv)
    fe.set_vring_num(0, QUEUE_SIZE)
    fe.set_vring_base(0, BAD_BASE)
    fe.set_vring_addr(ring_addr(drv, 0))
    refused(lambda: fe.set_vring_kick(0, drv.kicks[0]))


def hostile_bad_base(fe: Frontend, drv: BlkDriver) -> None:
    """The same, then GET_VRING_BASE (which closed the refused kick fd a second time)."""
    bad_base_then_leave(fe, drv)
    fe.get_vring_base(0)


def hostile_bad_addresses(fe: Frontend, drv: BlkDriver) -> None:
    """Ring addresses outside guest memory, a kick replaced while the ring cannot start."""
    negotiate_and_map(fe, drv)
    fe.set_vring_num(0, QUEUE_SIZE)
    fe.set_vring_addr(VringAddr(0, desc=0x7FFF0000, used=0x7FFF2000, avail=0x7FFF1000))
    refused(lambda: fe.set_vring_kick(0, drv.kicks[0]))
    refused(lambda: fe.set_vring_kick(0, drv.calls[0]))  # replaced: refused again
    fe.get_vring_base(0)


def hostile_bad_ring_numbers(fe: Frontend, drv: BlkDriver) -> None:
    """Rings the device does not have, sizes it does not take."""
    negotiate_and_map(fe, drv)
    refused(lambda: fe.set_vring_num(9, QUEUE_SIZE))
    refused(lambda: fe.set_vring_num(0, 3))
    refused(lambda: fe.set_vring_num(0, 1 << 20))
    refused(lambda: fe.set_vring_call(9, drv.calls[0]))
    refused(lambda: fe.set_vring_kick(200, drv.kicks[0]))
    refused(lambda: fe.get_vring_base(9))


def hostile_out_of_order(fe: Frontend, drv: BlkDriver) -> None:
    """Kick before the memory table, GET_VRING_BASE before anything, base while running."""
    fe.set_owner()
    drv.features, drv.protocol = fe.negotiate(drv.wanted_features, drv.wanted_protocol)
    fe.get_vring_base(0)
    fe.set_vring_kick(0, drv.kicks[0])  # no memory, no addresses yet: taken, not started
    refused(lambda: fe.set_vring_addr(ring_addr(drv, 0)))  # no memory table: cannot start
    fe.set_mem_table(drv.mem.regions)
    start_ring(fe, drv, 0)
    refused(lambda: fe.set_vring_base(0, 5))  # the ring runs
    fe.set_mem_table(drv.mem.regions)  # again, while it runs
    assert drv.read(0, 512).status == 0
    fe.get_vring_base(0)
    fe.get_vring_base(0)


def hostile_bad_memory_table(fe: Frontend, drv: BlkDriver) -> None:
    """A region past the end of its memfd, an empty table, then a good table and a read."""
    fe.set_owner()
    drv.features, drv.protocol = fe.negotiate(drv.wanted_features, drv.wanted_protocol)
    (region,) = drv.mem.regions
    refused(lambda: fe.set_mem_table([replace(region, memory_size=region.memory_size * 4)]))
    fe.set_mem_table(drv.mem.regions)
    start_ring(fe, drv, 0)
    refused(lambda: fe.set_mem_table([replace(region, mmap_offset=region.memory_size)]))
    assert drv.read(0, 512).status == 0  # the old table stays


def hostile_kick_replaced(fe: Frontend, drv: BlkDriver) -> None:
    """A running ring's kick fd replaced, then a failed start's kick, then ring 1 set up.

    Before the fix the refused kick stayed in ring 0's state after the server had closed
    it; ring 1's call fd then got that number and GET_VRING_BASE(0) closed it: ring 1's
    interrupt was lost and its worker died on EBADF.
    """
    negotiate_and_map(fe, drv)
    start_ring(fe, drv, 0)
    new_kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    old, drv.kicks[0] = drv.kicks[0], new_kick
    os.close(old)
    fe.set_vring_kick(0, new_kick)
    assert drv.read(0, 512).status == 0
    fe.get_vring_base(0)
    fe.set_vring_base(0, BAD_BASE)
    refused(lambda: fe.set_vring_kick(0, drv.kicks[0]))
    start_ring(fe, drv, 1)
    fe.get_vring_base(0)
    assert drv.read(0, 512, queue=1).status == 0  # ring 1's interrupt arrives
    fe.get_vring_base(1)


def hostile_disconnect_in_get_vring_base(fe: Frontend, drv: BlkDriver) -> None:
    """A refused kick, ring 1 running, then GET_VRING_BASE sent and the connection dropped."""
    negotiate_and_map(fe, drv)
    fe.set_vring_num(0, QUEUE_SIZE)
    fe.set_vring_base(0, BAD_BASE)
    fe.set_vring_addr(ring_addr(drv, 0))
    refused(lambda: fe.set_vring_kick(0, drv.kicks[0]))
    start_ring(fe, drv, 1)
    drv.submit([b"\0" * 16], [1], queue=1)  # in flight while it stops
    fe.conn.send(Message(FrontendReq.GET_VRING_BASE, VringStatePayload(1, 0)))
    fe.conn.send(Message(FrontendReq.GET_VRING_BASE, VringStatePayload(0, 0)))
    # no wait for the replies: the connection closes when the caller's ``with`` ends


HOSTILE = [
    hostile_bad_base,
    hostile_bad_addresses,
    hostile_bad_ring_numbers,
    hostile_out_of_order,
    hostile_bad_memory_table,
    hostile_kick_replaced,
    hostile_disconnect_in_get_vring_base,
]


def run(daemon: Daemon, frontend: Callable[[Frontend, BlkDriver], None]) -> None:
    with Frontend.connect(daemon.sock, timeout=5) as fe:
        drv = BlkDriver(fe, num_queues=2)
        try:
            frontend(fe, drv)
        finally:
            drv.close()


# --- the daemon tests -----------------------------------------------------------------------


def test_connect_map_disconnect_cycles_leave_nothing_behind(daemon_factory) -> None:
    daemon = daemon_factory()
    baseline = daemon.held()
    rss_after_warmup = 0
    for i in range(N):
        with Frontend.connect(daemon.sock, timeout=5) as fe:
            drv = BlkDriver(fe)
            try:
                if i % 2:
                    negotiate_and_map(fe, drv)  # memory table only
                else:
                    drv.start()
                    assert drv.read(0, 512).status == 0
            finally:
                drv.close()
        if i == 20:
            rss_after_warmup = daemon.settled(baseline).rss_kb
    held = assert_flat(daemon, baseline, "connect/SET_MEM_TABLE/disconnect cycles")
    assert held.rss_kb - rss_after_warmup < RSS_SLACK_KB, (rss_after_warmup, held)
    good_connection(daemon)
    assert_no_traceback(daemon.finish())


def test_a_connection_that_failed_a_ring_start_leaves_no_mapping(daemon_factory) -> None:
    """The failure's traceback held the half-built ring views, hence the guest's memfd."""
    daemon = daemon_factory()
    baseline = daemon.held()
    for _ in range(N):
        run(daemon, bad_base_then_leave)
    assert_flat(daemon, baseline, "connections with a bad ring base")
    good_connection(daemon)
    assert_no_traceback(daemon.finish())


def test_hostile_front_ends_leave_nothing_behind_and_no_traceback(daemon_factory) -> None:
    daemon = daemon_factory("--queues", "2")
    baseline = daemon.held()
    for i in range(N):
        run(daemon, HOSTILE[i % len(HOSTILE)])
    assert_flat(daemon, baseline, "hostile connections")
    good_connection(daemon, queues=2)
    assert daemon.settled(baseline).within(baseline)
    assert_no_traceback(daemon.finish())


@pytest.mark.parametrize("frontend", HOSTILE, ids=lambda f: f.__name__.removeprefix("hostile_"))
def test_each_hostile_front_end_then_a_good_one(daemon_factory, frontend) -> None:
    daemon = daemon_factory("--queues", "2")
    baseline = daemon.held()
    for _ in range(3):
        run(daemon, frontend)
    good_connection(daemon, queues=2)
    held = daemon.settled(baseline)
    assert held.within(baseline), (held, baseline)
    assert_no_traceback(daemon.finish())


# --- in-process: the listener's bookkeeping and the servers' error records ------------------


def wait_served() -> None:
    """Wait until every connection thread has ended (each front-end has left)."""
    for t in threading.enumerate():
        if t.name.startswith("vhost-user-backend-"):
            t.join(10)
    gc.collect()


def test_the_listener_forgets_finished_connections(fd_check, sock_dir) -> None:
    devices: weakref.WeakSet[BackendDevice] = weakref.WeakSet()

    def factory() -> BackendDevice:
        dev = SinkDevice(features=int(VirtioFeature.VERSION_1), num_queues=2)
        devices.add(dev)
        return dev

    threads_before = threading.active_count()
    with BackendListener(sock_dir / "l.sock", factory).start() as listener:
        for _ in range(300):
            with Frontend.connect(listener.path, timeout=5) as fe:
                fe.set_owner()
                fe.get_features()
        wait_served()
        assert len(devices) == 0, "a finished connection's handler is still referenced"
        assert listener.servers == []
        assert threading.active_count() == threads_before + 1  # the accept thread
        assert listener.wait_idle(timeout=0)
        assert listener.connections == 300
        assert not listener.errors and not listener.rejected


def test_a_failed_request_keeps_an_error_but_no_frames(fd_check, sock_dir) -> None:
    """``last_error`` outlives the request: it must not hold the request's frames (here a
    half-built queue over the guest memory), nor must the listener once the connection ends."""
    devices: weakref.WeakSet[BackendDevice] = weakref.WeakSet()

    def factory() -> BackendDevice:
        dev = SinkDevice(features=int(VirtioFeature.VERSION_1), num_queues=2)
        devices.add(dev)
        return dev

    with BackendListener(sock_dir / "e.sock", factory).start() as listener:
        with Frontend.connect(listener.path, timeout=5) as fe:
            drv = BlkDriver(fe, features=int(VirtioFeature.VERSION_1))
            try:
                bad_base_then_leave(fe, drv)
                server = listener.servers[0]
                assert isinstance(server.last_error, VhostError)
                assert "base" in str(server.last_error)
                assert server.last_error.__traceback__ is None
            finally:
                drv.close()
        wait_served()
        assert listener.wait_idle(timeout=0)
        assert [type(e) for e in listener.request_errors] == [type(server.last_error)]
        assert all(e.__traceback__ is None for e in listener.request_errors)
        del server
        gc.collect()
        assert len(devices) == 0


def test_the_frontend_side_keeps_a_failed_backend_request_without_frames(fd_check) -> None:
    a, b = Connection.pair(Channel.BACKEND)
    server = FrontendReqServer(a, FrontendReqHandler(), int(P.CONFIG | P.REPLY_ACK))
    channel = BackendChannel(b, int(P.CONFIG | P.REPLY_ACK))
    server.start()
    try:
        with pytest.raises(RequestFailed):
            channel.config_change()  # the default handler refuses it
    finally:
        channel.close()
        server.close()
    assert isinstance(server.last_error, Unsupported)
    assert server.last_error.__traceback__ is None
