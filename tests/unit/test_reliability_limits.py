"""Limits with clear errors, and a misbehaving guest that breaks only its own queue.

Every limit vhostkit enforces is sent past its edge to the real blk daemon
(``python3 -m vhostkit blk-backend --queues 2``, one daemon for the module): message size,
memory regions (SET_MEM_TABLE and ADD_MEM_REG), queues, queue size, chain length (a
descriptor loop, an indirect table past :data:`~vhostkit.virtio.device_role.MAX_INDIRECT`),
config size and fds per message. Each is refused either with a failure reply (the request is
well-formed, the value is not: :class:`~vhostkit.errors.RequestFailed` on our side) or, where
the message itself cannot be trusted (it cannot be framed or its fds do not match), with a
typed :class:`~vhostkit.errors.ProtocolError` that the daemon logs before it drops that
connection. Never a crash: after each case the daemon serves a good front-end, and at the end
it holds no more fds, memfd mappings or threads than before the first case and has logged no
traceback.

A guest that misbehaves (a descriptor loop, a table too long) breaks only the ring it did it
on: the daemon stops that ring and signals its error eventfd (SET_VRING_ERR), reports
``DEVICE_NEEDS_RESET`` in GET_STATUS and sends CONFIG_CHANGE_MSG on the back-end channel; the
other ring of the same connection keeps serving reads and writes, and so does another blk
daemon's device driven at the same time (its status stays clean).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.cli_run import Daemon
from helpers.proc_usage import Held
from helpers.vhostkit_daemon import (
    assert_clean_output,
    daemon_held,
    daemon_settled,
    good_connection,
    start_blk_daemon,
)

from vhostkit.errors import InvalidParam, RequestFailed, TransportError
from vhostkit.guest.blk import DRIVER_FEATURES, DRIVER_PROTOCOL, QUEUE_SIZE, BlkDriver
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.user.frontend_req_handler import FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import (
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    FrontendReq,
)
from vhostkit.virtio.device_role import MAX_INDIRECT
from vhostkit.virtio.features import DeviceStatus, VirtioFeature
from vhostkit.virtio.memory import GuestMemory

pytestmark = pytest.mark.reliability

#: the daemon's largest ring (BackendDevice's default)
MAX_QUEUE_SIZE = 32768
#: the daemon's memory slots (GET_MAX_MEM_SLOTS)
MAX_MEM_SLOTS = 32
#: how long a log line may take to appear in the daemon's output file
LOG_TIMEOUT = 10.0

VRING_DESC_F_NEXT = 1
VRING_DESC_F_INDIRECT = 4


class Env:
    def __init__(self, daemon: Daemon, sock: Path) -> None:
        self.daemon = daemon
        self.sock = sock
        self.baseline: Held | None = None

    def wait_logged(self, text: str) -> None:
        deadline = time.monotonic() + LOG_TIMEOUT
        while text not in self.daemon.output():
            assert time.monotonic() < deadline, f"not logged: {text!r}\n{self.daemon.output()}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="vhk-", dir="/tmp") as d:
        sock = Path(d) / "blk.sock"
        with start_blk_daemon(sock, Path(d) / "disk.img", "--queues", "2") as daemon:
            e = Env(daemon, sock)
            good_connection(sock, queues=2)
            e.baseline = daemon_held(daemon)
            yield e
            held = daemon_settled(daemon, e.baseline)
            rc, output = daemon.stop()
        assert held.within(e.baseline), (held, e.baseline)
        assert rc == 0
        assert_clean_output(output)


@pytest.fixture
def fe(env: Env, fd_check) -> Iterator[Frontend]:
    """A negotiated front-end (REPLY_ACK: failures come back as replies); a good front-end
    is served after the case."""
    with Frontend.connect(env.sock, timeout=5) as f:
        f.set_owner()
        f.negotiate(
            DRIVER_FEATURES,
            DRIVER_PROTOCOL | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.INFLIGHT_SHMFD,
        )
        yield f
    good_connection(env.sock, queues=2)


def send_raw(fe: Frontend, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    fe.conn.sock.sendmsg([data], anc)


def header(request: int, size: int, flags: int = 0x1 | 0x8) -> bytes:
    return struct.pack("<III", request, flags, size)


def assert_dropped(env: Env, fe: Frontend, logged: str) -> None:
    """The daemon logged the typed protocol error and closed this connection."""
    with pytest.raises(TransportError):
        fe.conn.recv(timeout=10)
    env.wait_logged(logged)


def memfds(n: int, size: int = 0x10000) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.memfd_create("limits", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


# --- message size -----------------------------------------------------------------------------


def test_message_size(env: Env, fe: Frontend) -> None:
    send_raw(fe, header(FrontendReq.SET_CONFIG, MAX_PAYLOAD_SIZE + 1))
    assert_dropped(env, fe, f"payload size {MAX_PAYLOAD_SIZE + 1} exceeds {MAX_PAYLOAD_SIZE}")


def test_message_size_huge_header_only(env: Env, fe: Frontend) -> None:
    send_raw(fe, header(FrontendReq.SET_MEM_TABLE, 0xFFFFFFFF))
    assert_dropped(env, fe, f"payload size {0xFFFFFFFF} exceeds {MAX_PAYLOAD_SIZE}")


# --- regions ----------------------------------------------------------------------------------


def test_regions_in_one_memory_table(env: Env, fe: Frontend) -> None:
    n = MAX_MEM_REGIONS + 1
    fds = memfds(MAX_FDS)  # one fd per region can not even travel: the most that can
    try:
        body = struct.pack("<II", n, 0) + b"".join(
            struct.pack("<QQQQ", i << 20, 0x10000, 0x7F00_0000_0000 + (i << 20), 0)
            for i in range(n)
        )
        send_raw(fe, header(FrontendReq.SET_MEM_TABLE, len(body)) + body, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert_dropped(env, fe, f"memory table lists {n} regions, at most {MAX_MEM_REGIONS}")


def test_memory_slots_added_one_by_one(fe: Frontend) -> None:
    assert fe.get_max_mem_slots() == MAX_MEM_SLOTS
    with GuestMemory.allocate([(i << 20, 0x10000) for i in range(MAX_MEM_SLOTS + 1)]) as mem:
        regions = mem.regions
        for r in regions[:MAX_MEM_SLOTS]:
            fe.add_mem_region(r)
        with pytest.raises(RequestFailed):
            fe.add_mem_region(regions[MAX_MEM_SLOTS])
        fe.remove_mem_region(regions[0])
        fe.add_mem_region(regions[MAX_MEM_SLOTS])  # a free slot again


# --- queues and queue size --------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda fe, fd: fe.set_vring_num(2, QUEUE_SIZE),
        lambda fe, fd: fe.set_vring_base(2, 0),
        lambda fe, fd: fe.set_vring_kick(255, fd),
        lambda fe, fd: fe.set_vring_call(2, fd),
        lambda fe, fd: fe.set_vring_err(2, fd),
        lambda fe, fd: fe.set_vring_enable(2, True),
        lambda fe, fd: fe.get_vring_base(2),
        lambda fe, fd: fe.get_inflight_fd(3, QUEUE_SIZE),
    ],
    ids=["num", "base", "kick", "call", "err", "enable", "get_base", "inflight"],
)
def test_queues(fe: Frontend, call: Callable[[Frontend, int], object]) -> None:
    assert fe.get_queue_num() == 2
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(RequestFailed):
            call(fe, fd)
    finally:
        os.close(fd)
    fe.get_features()  # the connection goes on


@pytest.mark.parametrize("num", [0, 3, 1000, MAX_QUEUE_SIZE * 2, 0xFFFFFFFF])
def test_queue_size(fe: Frontend, num: int) -> None:
    with pytest.raises(RequestFailed):
        fe.set_vring_num(0, num)
    fe.set_vring_num(0, MAX_QUEUE_SIZE)  # the largest is taken


def test_queue_size_of_an_inflight_area(fe: Frontend) -> None:
    with pytest.raises(RequestFailed):
        fe.get_inflight_fd(1, MAX_QUEUE_SIZE + 1)
    with pytest.raises(RequestFailed):
        fe.get_inflight_fd(1, 0)
    # past the u16 of the wire format: refused before anything is sent (it was a struct.error)
    with pytest.raises(InvalidParam):
        fe.get_inflight_fd(1, 1 << 16)
    with pytest.raises(InvalidParam):
        fe.get_inflight_fd(1 << 16, 64)
    fe.get_features()  # the connection goes on


# --- config size --------------------------------------------------------------------------------


def test_config_size_past_the_protocol_limit(env: Env, fe: Frontend) -> None:
    size = MAX_CONFIG_SIZE + 1
    body = struct.pack("<III", 0, size, 0) + bytes(size)
    send_raw(fe, header(FrontendReq.GET_CONFIG, len(body)) + body)
    assert_dropped(env, fe, "GET_CONFIG request: a 269-byte payload is not a valid ConfigPayload")


def test_config_size_field_past_the_protocol_limit(env: Env, fe: Frontend) -> None:
    size = MAX_CONFIG_SIZE + 1
    body = struct.pack("<III", 0, size, 0)  # the size field alone says too much
    send_raw(fe, header(FrontendReq.GET_CONFIG, len(body)) + body)
    assert_dropped(env, fe, f"config access of {size} bytes, at most {MAX_CONFIG_SIZE}")


def test_config_size_past_the_device_config(fe: Frontend) -> None:
    with pytest.raises(RequestFailed):
        fe.get_config(0, MAX_CONFIG_SIZE)
    with pytest.raises(RequestFailed):
        fe.set_config(MAX_CONFIG_SIZE - 8, bytes(16))
    assert len(fe.get_config(0, 8)) == 8


# --- fds per message ----------------------------------------------------------------------------


def test_more_fds_than_a_message_carries(env: Env, fe: Frontend) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS + 8)]
    try:
        send_raw(fe, header(FrontendReq.SET_VRING_KICK, 8) + struct.pack("<Q", 0), fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert_dropped(env, fe, f"more than {MAX_FDS} fds in one message")


def test_fds_a_request_does_not_take(env: Env, fe: Frontend) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    try:
        send_raw(fe, header(FrontendReq.SET_VRING_KICK, 8) + struct.pack("<Q", 0), fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert_dropped(env, fe, "SET_VRING_KICK takes 1 fds, got 3")


def test_an_fd_on_a_request_without_fds(env: Env, fe: Frontend) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        send_raw(fe, header(FrontendReq.GET_FEATURES, 0, 0x1), [fd])
    finally:
        os.close(fd)
    assert_dropped(env, fe, "GET_FEATURES takes 0 fds, got 1")


# --- chain length: the ring breaks, its neighbour does not --------------------------------------


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no error eventfd signal from the daemon"
    os.eventfd_read(fd)


def make_available(drv: BlkDriver, head: int) -> None:
    """Publish descriptor ``head`` on ring 0 behind the driver's back (what a hostile guest
    does); ring 0 is then the hostile ring, ring 1 is left as it is."""
    avail = drv.queues[0].ring_gpas[1]
    (idx,) = struct.unpack("<H", drv.mem.read(avail + 2, 2))
    drv.mem.write(avail + 4 + 2 * (idx % QUEUE_SIZE), struct.pack("<H", head))
    drv.mem.write(avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
    os.eventfd_write(drv.kicks[0], 1)


def desc(addr: int, length: int, flags: int, next_: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, next_)


def loop(drv: BlkDriver) -> None:
    table = drv.queues[0].ring_gpas[0]
    data = drv.layout.data_start(0)
    drv.mem.write(table, desc(data, 16, VRING_DESC_F_NEXT, 1) + desc(data, 16, 1, 0))
    make_available(drv, 0)


def longer_than_the_ring(drv: BlkDriver) -> None:
    """Every descriptor chained to the next, the last to the first: QUEUE_SIZE + 1 links."""
    table = drv.queues[0].ring_gpas[0]
    data = drv.layout.data_start(0)
    drv.mem.write(
        table,
        b"".join(
            desc(data, 16, VRING_DESC_F_NEXT, (i + 1) % QUEUE_SIZE) for i in range(QUEUE_SIZE)
        ),
    )
    make_available(drv, 0)


def indirect_too_long(drv: BlkDriver) -> None:
    n = MAX_INDIRECT + 1
    data = drv.layout.data_start(0)
    ind = data + 0x1000
    drv.mem.write(ind, b"".join(desc(data, 16, VRING_DESC_F_NEXT, i + 1) for i in range(n)))
    table = drv.queues[0].ring_gpas[0]
    drv.mem.write(table, desc(ind, n * 16, VRING_DESC_F_INDIRECT, 0))
    make_available(drv, 0)


class ConfigChanges(FrontendReqHandler):
    """The VMM's side of the back-end channel: counts CONFIG_CHANGE_MSG."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Event()

    def config_change(self) -> None:
        self.count += 1
        self.changed.set()


@pytest.fixture(scope="module")
def other_daemon() -> Iterator[Path]:
    """A second blk daemon (another device, another process): its socket path."""
    with tempfile.TemporaryDirectory(prefix="vhk-", dir="/tmp") as d:
        sock = Path(d) / "other.sock"
        with start_blk_daemon(sock, Path(d) / "other.img") as daemon:
            yield sock
            rc, output = daemon.stop()
        assert rc == 0
        assert_clean_output(output)


@pytest.mark.parametrize("hostile", [loop, longer_than_the_ring, indirect_too_long])
def test_chain_length_breaks_only_that_ring(
    env: Env, other_daemon: Path, fd_check, hostile: Callable[[BlkDriver], None]
) -> None:
    protocol = DRIVER_PROTOCOL | ProtocolFeature.STATUS
    features = DRIVER_FEATURES | VirtioFeature.RING_INDIRECT_DESC
    with (
        Frontend.connect(env.sock, timeout=5) as fe,
        Frontend.connect(other_daemon, timeout=5) as other_fe,
        BlkDriver(fe, num_queues=2, features=features, protocol=protocol) as drv,
        BlkDriver(other_fe, protocol=protocol) as other,  # another device of the daemon
    ):
        drv.start()
        other.start()
        assert drv.features & VirtioFeature.RING_INDIRECT_DESC
        watcher = ConfigChanges()
        server = FrontendReqServer(fe.open_backend_channel(), watcher, drv.protocol)
        server.start()
        try:
            assert drv.write(1, b"\x11" * 512, queue=0).status == 0
            assert fe.get_status() & DeviceStatus.NEEDS_RESET == 0
            hostile(drv)
            wait_readable(drv.errs[0])  # ring 0 reported broken (its SET_VRING_ERR fd)
            assert watcher.changed.wait(10), "no CONFIG_CHANGE_MSG from the daemon"
            assert fe.get_status() & DeviceStatus.NEEDS_RESET
            for i in range(8):  # ring 1 goes on, and so does the other device
                data = bytes([i + 1]) * 512
                assert drv.write(8 + i, data, queue=1).status == 0
                assert drv.read(8 + i, 512, queue=1).data == data
                assert other.write(16 + i, data).status == 0
                assert other.read(16 + i, 512).data == data
            assert drv.read(1, 512, queue=1).data == b"\x11" * 512
            assert other_fe.get_status() & DeviceStatus.NEEDS_RESET == 0
            assert watcher.count == 1
            fe.get_vring_base(0)  # stopping the broken ring is fine
            fe.get_vring_base(1)
            other_fe.get_vring_base(0)
            fe.set_status(0)  # the driver resets the device: NEEDS_RESET is gone
            assert fe.get_status() == 0
        finally:
            fe.close()
            server.close()
    env.wait_logged("ring 0 is broken")
    good_connection(env.sock, queues=2)  # a new connection gets working rings again


def test_the_daemon_is_flat_after_every_limit(env: Env) -> None:
    assert env.baseline is not None
    held = daemon_settled(env.daemon, env.baseline)
    assert held.within(env.baseline), (held, env.baseline)
