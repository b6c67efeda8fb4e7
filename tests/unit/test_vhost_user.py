"""The vhostkit Frontend against the vhostkit BackendDevice over a real Unix socket.

Each request goes through the whole stack: Frontend -> codec -> sendmsg/SCM_RIGHTS -> listener
thread -> codec -> BackendReqServer -> BackendDevice, and the reply back.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator

import pytest

from vhostkit.backend import LogRegion, MemoryRegion, VringAddr
from vhostkit.errors import (
    Disconnected,
    FeatureNotNegotiated,
    InvalidParam,
    PartialMessage,
    RequestFailed,
    SocketBroken,
    SocketConnect,
    SocketError,
    SocketRetry,
    VhostError,
    error_from_errno,
)
from vhostkit.user import (
    BackendDevice,
    BackendListener,
    Connection,
    Frontend,
    FrontendReqHandler,
    FrontendReqServer,
)
from vhostkit.user.codec import Message, encode
from vhostkit.user.message import (
    FRONTEND_RULES,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    DeviceStateParams,
    Empty,
    FrontendReq,
    MigrationPhase,
    ProtocolFeature,
    ReplyRule,
    SharedObject,
    TransferDirection,
)
from vhostkit.virtio.memory import GuestMemory

P = ProtocolFeature
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
ALL_PROTOCOL = (
    P.MQ
    | P.LOG_SHMFD
    | P.REPLY_ACK
    | P.BACKEND_REQ
    | P.BACKEND_SEND_FD
    | P.CONFIG
    | P.INFLIGHT_SHMFD
    | P.RESET_DEVICE
    | P.CONFIGURE_MEM_SLOTS
    | P.STATUS
)


def make_device(**kw: object) -> BackendDevice:
    args: dict[str, object] = {
        "features": VERSION_1 | EVENT_IDX,
        "num_queues": 2,
        "config": bytes(range(64)),
    }
    args.update(kw)
    return BackendDevice(**args)  # type: ignore[arg-type]


class Peer:
    def __init__(self, path: str, device: BackendDevice) -> None:
        self.device = device
        self.listener = BackendListener(path, lambda: device, max_connections=1).start()
        self.fe = Frontend.connect(path, timeout=5)

    def close(self) -> None:
        self.fe.close()
        self.listener.stop()
        self.device.close()
        assert not self.listener.errors


@pytest.fixture
def peer(fd_check, sock_dir) -> Iterator[Peer]:
    p = Peer(str(sock_dir / "be.sock"), make_device())
    yield p
    p.close()


@pytest.fixture
def negotiated(peer: Peer) -> Peer:
    """Owner set, every protocol feature acked (REPLY_ACK: every request is acknowledged)."""
    peer.fe.set_owner()
    peer.fe.negotiate(VERSION_1 | EVENT_IDX, ALL_PROTOCOL)
    return peer


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


# --- negotiation ----------------------------------------------------------------------------


def test_feature_and_protocol_feature_negotiation(peer: Peer) -> None:
    fe, dev = peer.fe, peer.device
    offered = fe.get_features()
    assert offered == VERSION_1 | EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES
    assert fe.get_protocol_features() == ALL_PROTOCOL
    fe.set_protocol_features(P.MQ | P.REPLY_ACK | P.CONFIG)
    fe.set_features(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    # REPLY_ACK is negotiated, so set_features returned after the back-end acked it
    assert dev.acked_features == VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
    assert dev.acked_protocol_features == P.MQ | P.REPLY_ACK | P.CONFIG
    assert fe.acked_protocol_features == P.MQ | P.REPLY_ACK | P.CONFIG


def test_features_not_offered_are_refused_locally(peer: Peer) -> None:
    fe = peer.fe
    fe.get_features()
    with pytest.raises(InvalidParam):
        fe.set_features(1 << 5)
    fe.get_protocol_features()
    with pytest.raises(InvalidParam):
        fe.set_protocol_features(P.PAGEFAULT)


def test_protocol_features_without_bit_30(fd_check, sock_dir) -> None:
    p = Peer(str(sock_dir / "old.sock"), make_device(protocol_features=0))
    mem = GuestMemory.allocate([(0, 1 << 20)])
    try:
        assert not p.fe.get_features() & VHOST_USER_F_PROTOCOL_FEATURES
        with pytest.raises(FeatureNotNegotiated):
            p.fe.get_protocol_features()
        acked, protocol = p.fe.negotiate(VERSION_1)
        assert acked == VERSION_1 and protocol == 0
        # without protocol features a ring is enabled as soon as it starts
        p.fe.set_mem_table(mem.regions)
        base = mem.regions[0].userspace_addr
        p.fe.set_vring_num(0, 256)
        p.fe.set_vring_addr(VringAddr(0, base, base + 0x2000, base + 0x1000))
        kick = eventfd()
        p.fe.set_vring_kick(0, kick)  # no REPLY_ACK: nothing acks, wait for the state
        os.close(kick)
        p.device.wait_for(lambda: p.device.vrings[0].started)
        assert p.device.vrings[0].enabled
    finally:
        p.close()
        mem.close()


def test_requests_gated_by_protocol_features_are_refused(peer: Peer) -> None:
    fe = peer.fe
    fe.set_owner()
    fe.negotiate(VERSION_1, P.REPLY_ACK)  # MQ, CONFIG, STATUS ... not acked
    with pytest.raises(FeatureNotNegotiated, match="MQ"):
        fe.get_queue_num()
    with pytest.raises(FeatureNotNegotiated):
        fe.get_config(0, 4)
    with pytest.raises(FeatureNotNegotiated):
        fe.set_status(1)
    # The back-end enforces it too: bypass the front-end's own check.
    fe.conn.send(Message(FrontendReq.GET_QUEUE_NUM))
    reply = fe.conn.recv(timeout=5)
    assert reply.is_reply and isinstance(reply.payload, Empty)  # the "failed" reply
    fe.conn.send(Message(FrontendReq.SET_STATUS, U64(1), (), 0x1 | 0x8))
    reply = fe.conn.recv(timeout=5)
    assert reply.payload == U64(errno.EOPNOTSUPP)
    assert isinstance(peer.listener.servers[0].last_error, FeatureNotNegotiated)


def test_every_request_is_routed_with_the_payload_the_codec_decodes() -> None:
    from vhostkit.user.backend_req_handler import _ROUTES

    assert set(_ROUTES) == set(FrontendReq)
    for request, route in _ROUTES.items():
        rule = FRONTEND_RULES[request]
        assert route.payload is rule.payload, request.name
        if route.failure_status is not None:  # a status word is only where a reply always is
            assert rule.reply is ReplyRule.ALWAYS and rule.reply_payload is U64, request.name


# --- ownership, queues, config --------------------------------------------------------------


def test_owner_set_twice_is_an_error(negotiated: Peer) -> None:
    with pytest.raises(RequestFailed) as info:
        negotiated.fe.set_owner()
    assert info.value.errno == errno.EINVAL
    assert "SET_OWNER" in str(info.value)
    # the connection survives the refusal
    assert negotiated.fe.get_queue_num() == 2


def test_queue_num(negotiated: Peer) -> None:
    assert negotiated.fe.get_queue_num() == 2


def test_config_get_set_round_trip(negotiated: Peer) -> None:
    fe = negotiated.fe
    assert fe.get_config(0, 8) == bytes(range(8))
    fe.set_config(4, b"\xaa\xbb")
    assert fe.get_config(2, 6) == b"\x02\x03\xaa\xbb\x06\x07"
    with pytest.raises(RequestFailed):  # beyond the 64-byte config space: empty reply
        fe.get_config(60, 16)


def test_status_and_reset_device(negotiated: Peer) -> None:
    fe = negotiated.fe
    fe.set_status(0xF)
    assert fe.get_status() == 0xF
    fe.reset_device()
    assert fe.get_status() == 0


# --- memory ---------------------------------------------------------------------------------


def test_mem_table_maps_the_frontend_memory(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    with GuestMemory.allocate([(0, 0xA0000), (0xC0000, 0x40000)]) as mem:
        fe.set_mem_table(mem.regions)
        assert dev.memory is not None
        got = [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in dev.memory.regions]
        assert got == [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in mem.regions]
        # the second region sits at a non-zero offset of the memfd: the mapping honours it
        assert mem.regions[1].mmap_offset != 0
        mem.write(0xC0010, b"hello from the VMM")
        assert dev.memory.read(0xC0010, 18) == b"hello from the VMM"
        dev.memory.write(0x100, b"and back")
        assert mem.read(0x100, 8) == b"and back"


def test_mem_table_needs_fds(negotiated: Peer) -> None:
    with pytest.raises(InvalidParam, match="no fd"):
        negotiated.fe.set_mem_table([MemoryRegion(0, 4096, 0x1000)])


def test_max_mem_slots_add_and_remove_region(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    assert fe.get_max_mem_slots() == 32
    with GuestMemory.allocate([(0, 0x10000), (0x100000, 0x10000)]) as mem:
        low, high = mem.regions
        fe.add_mem_region(low)
        fe.add_mem_region(high)
        assert dev.memory is not None and len(dev.memory.regions) == 2
        mem.write(0x100000, b"slot")
        assert dev.memory.read(0x100000, 4) == b"slot"
        fe.remove_mem_region(high)
        assert [r.guest_phys_addr for r in dev.memory.regions] == [0]
        with pytest.raises(RequestFailed):  # removing it again
            fe.remove_mem_region(high)


def test_same_region_added_twice_is_counted(fd_check, negotiated: Peer) -> None:
    """QEMU 7.2 (and older) sends ADD_MEM_REG (and REM_MEM_REG) once per vhost_dev, and a
    multiqueue virtio-net has one per queue pair: the same region arrives once per pair. It
    is mapped once; it stays mapped until removed as many times as it was added."""
    fe, dev = negotiated.fe, negotiated.device
    with GuestMemory.allocate([(0, 0x10000)]) as mem:
        (region,) = mem.regions
        fe.add_mem_region(region)
        fe.add_mem_region(region)
        assert dev.memory is not None and len(dev.memory.regions) == 1
        fe.remove_mem_region(region)
        mem.write(0x100, b"still mapped")
        assert dev.memory.read(0x100, 12) == b"still mapped"
        fe.remove_mem_region(region)
        assert dev.memory.regions == ()
        with pytest.raises(RequestFailed):  # a third time: nothing left to remove
            fe.remove_mem_region(region)


def test_log_base_and_log_fd(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(log_fd, 8192)
    call = eventfd()
    try:
        fe.set_log_base(0, LogRegion(log_fd, 8192, 0))
        fe.set_log_fd(call)
        assert dev.log_desc is not None and dev.log_desc.mmap_size == 8192
        assert dev.dirty_log is not None and dev.dirty_log.pages == 8192 * 8
        assert dev.log_call_fd is not None
        with pytest.raises(InvalidParam):
            fe.set_log_base(0x1000)  # vhost-user needs a shared file
    finally:
        os.close(log_fd)
        os.close(call)


# --- rings ----------------------------------------------------------------------------------


def test_every_vring_setter(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        fe.set_mem_table(mem.regions)
        base = mem.regions[0].userspace_addr
        kick, call, err = eventfd(), eventfd(), eventfd()
        try:
            fe.set_vring_num(1, 256)
            fe.set_vring_base(1, 17)
            addr = VringAddr(1, desc=base, used=base + 0x2000, avail=base + 0x1000, log=0)
            fe.set_vring_addr(addr)
            fe.set_vring_call(1, call)
            fe.set_vring_err(1, err)
            ring = dev.vrings[1]
            assert (ring.num, ring.base, ring.addr) == (256, 17, addr)
            assert not ring.started
            fe.set_vring_kick(1, kick)
            assert ring.started and not ring.enabled  # protocol features: starts disabled
            fe.set_vring_enable(1, True)
            assert ring.enabled
            # the fds arrived: signalling the back-end's copy wakes ours
            assert ring.call_fd is not None
            os.eventfd_write(ring.call_fd, 1)
            assert os.eventfd_read(call) == 1
            # GET_VRING_BASE stops the ring and returns its position
            assert fe.get_vring_base(1) == 17
            assert not ring.started
            fe.set_vring_enable(1, False)
            assert not ring.enabled
            # no-fd mode: bit 8 set, the ring polls
            fe.set_vring_call(1, None)
            assert ring.call_fd is None
            fe.set_vring_kick(1, None)
            assert ring.polling and ring.started
            with pytest.raises(FeatureNotNegotiated):  # CROSS_ENDIAN is not offered
                fe.set_vring_endian(0, False)
        finally:
            for fd in (kick, call, err):
                os.close(fd)
    with pytest.raises(RequestFailed):  # a ring the device does not have
        fe.set_vring_num(5, 256)
    with pytest.raises(RequestFailed):  # a split ring size that is not a power of two
        fe.set_vring_num(0, 100)


def test_ring_index_must_fit_the_fd_message(negotiated: Peer) -> None:
    with pytest.raises(InvalidParam):
        negotiated.fe.set_vring_call(256, None)


def test_inflight_fd_get_and_set(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    region = fe.get_inflight_fd(2, 256)
    try:
        # 16-byte header + 16 bytes per descriptor, rounded up to 64 bytes, per queue
        assert region.mmap_size == 2 * 4160
        assert os.fstat(region.fd).st_size >= region.mmap_size
        # a restarted back-end gets the same area back
        fe.set_inflight_fd(region)
        assert dev.inflight_desc is not None
        assert (dev.inflight_desc.num_queues, dev.inflight_desc.queue_size) == (2, 256)
        assert dev.inflight_fd is not None
        assert os.fstat(dev.inflight_fd).st_ino == os.fstat(region.fd).st_ino
    finally:
        os.close(region.fd)
    with pytest.raises(RequestFailed):
        fe.get_inflight_fd(3, 256)  # more queues than the device has


def test_requests_the_device_does_not_implement_fail_cleanly(negotiated: Peer) -> None:
    fe = negotiated.fe
    fe.conn.send(Message(FrontendReq.GET_SHARED_OBJECT, SharedObject(uuid.uuid4())))
    reply = fe.conn.recv(timeout=5)
    assert reply.payload == U64(errno.EOPNOTSUPP) and reply.fds == ()
    r, w = os.pipe()
    try:
        params = DeviceStateParams(TransferDirection.SAVE, MigrationPhase.STOPPED)
        fe.conn.send(Message(FrontendReq.SET_DEVICE_STATE_FD, params, (w,)))
        reply = fe.conn.recv(timeout=5)
        assert isinstance(reply.payload, U64) and reply.payload.value & 0xFF
        assert reply.payload.value & 0x100  # no fd
    finally:
        os.close(r)
        os.close(w)
    assert fe.get_queue_num() == 2  # still in sync


# --- the back-end request channel -----------------------------------------------------------


class Recorder(FrontendReqHandler):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.seen = threading.Event()

    def config_change(self) -> None:
        self.events.append("config")
        self.seen.set()


def test_backend_request_fd_and_config_change(negotiated: Peer) -> None:
    fe, dev = negotiated.fe, negotiated.device
    conn = fe.open_backend_channel()
    recorder = Recorder()
    server = FrontendReqServer(conn, recorder, fe.acked_protocol_features)
    server.start()
    try:
        assert dev.backend_channel is not None
        dev.backend_channel.config_change()  # with REPLY_ACK: returns once acked
        assert recorder.events == ["config"]
        with pytest.raises(FeatureNotNegotiated, match="INBAND"):
            dev.backend_channel.vring_call(0)
        with pytest.raises(FeatureNotNegotiated, match="SHARED_OBJECT"):
            dev.backend_channel.shared_object_add(uuid.uuid4())
        # a request the front-end's handler does not implement is nacked with its errno
        dev.backend_channel.protocol_features |= P.HOST_NOTIFIER  # pretend, to reach the peer
        server.protocol_features |= P.HOST_NOTIFIER
        with pytest.raises(RequestFailed) as info:
            dev.backend_channel.remove_host_notifier(0)
        assert info.value.status == errno.EOPNOTSUPP
        assert recorder.events == ["config"]
    finally:
        server.close()


# --- errors, transport, threads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "cls", "retry", "reconnect"),
    [
        (errno.EAGAIN, SocketRetry, True, False),
        (errno.EINTR, SocketRetry, True, False),
        (errno.ENOBUFS, SocketRetry, True, False),
        (errno.ENOMEM, SocketRetry, True, False),
        (errno.ECONNRESET, SocketBroken, False, True),
        (errno.EPIPE, SocketBroken, False, True),
        (errno.EACCES, SocketConnect, True, False),
        (errno.EBADF, SocketError, False, False),
    ],
)
def test_errno_mapping(err: int, cls: type[VhostError], retry: bool, reconnect: bool) -> None:
    exc = error_from_errno(err, "vhost-user send")
    assert type(exc) is cls
    assert exc.errno == err
    assert exc.should_retry() is retry and exc.should_reconnect() is reconnect
    assert str(exc).startswith("vhost-user send: ") and os.strerror(err) in str(exc)


def test_disconnect_and_partial_message_are_told_apart(fd_check) -> None:
    a, b = Connection.pair()
    with a, b:
        b.sock.sendall(struct.pack("<III", 1, 1, 8) + b"\x00" * 3)
        b.close()
        with pytest.raises(PartialMessage) as info:
            a.recv(timeout=5)
        assert info.value.should_reconnect()
    a, b = Connection.pair()
    with a, b:
        b.close()
        with pytest.raises(Disconnected):
            a.recv(timeout=5)


def test_receive_timeout_is_a_retry(fd_check) -> None:
    a, b = Connection.pair()
    with a, b, pytest.raises(SocketRetry):
        a.recv(timeout=0.05)


def test_sending_to_a_closed_peer_is_broken(fd_check) -> None:
    a, b = Connection.pair()
    b.close()
    with a, pytest.raises(SocketBroken):
        for _ in range(100):
            a.send(Message(FrontendReq.SET_FEATURES, U64(0)))


def test_connect_to_nothing_is_a_connect_error(fd_check, sock_dir) -> None:
    with pytest.raises(SocketConnect):
        Frontend.connect(sock_dir / "nobody.sock")


def test_message_split_across_sends_and_fds_with_first_byte(fd_check) -> None:
    a, b = Connection.pair()
    with a, b:
        r, w = os.pipe()
        try:
            data, _ = encode(Message(FrontendReq.SET_LOG_FD, Empty(), (w,)))
            socket.send_fds(b.sock, [data[:3]], [w])
            b.sock.sendall(data[3:])
            msg = a.recv(timeout=5)
            assert msg.request is FrontendReq.SET_LOG_FD and len(msg.fds) == 1
            os.write(msg.fds[0], b"!")
            assert os.read(r, 1) == b"!"
            msg.close_fds()
        finally:
            os.close(r)
            os.close(w)


def test_a_malformed_message_drops_the_connection_not_the_listener(peer: Peer, sock_dir) -> None:
    peer.fe.conn.sock.sendall(struct.pack("<III", 1, 0x2, 0))  # version 2
    with pytest.raises(Disconnected):
        peer.fe.conn.recv(timeout=5)
    peer.fe.close()
    peer.listener.stop()  # joins the connection's thread: its error is recorded by then
    assert "version 2" in str(peer.listener.rejected[0])
    # a fresh listener on the same device keeps serving
    p2 = Peer(str(sock_dir / "again.sock"), peer.device)
    try:
        assert p2.fe.get_features() & VERSION_1
    finally:
        p2.close()


def test_frontend_is_safe_from_several_threads(negotiated: Peer) -> None:
    fe = negotiated.fe
    fe.set_vring_num(0, 256)
    fe.set_vring_base(0, 5)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                assert fe.get_queue_num() == 2
                assert fe.get_vring_base(0) == 5
                assert fe.get_config(0, 4) == bytes(range(4))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_backend_regions_do_not_name_closed_fds(negotiated: Peer) -> None:
    """The back-end closes the fds it mapped; its regions must not keep their numbers."""
    fe, dev = negotiated.fe, negotiated.device
    with GuestMemory.allocate([(0, 0x10000), (0x100000, 0x10000)]) as mem:
        fe.set_mem_table(mem.regions[:1])
        fe.add_mem_region(mem.regions[1])
        assert dev.memory is not None
        assert [r.fd for r in dev.memory.regions] == [None, None]
        # the front-end's own memory does own its memfd, and says so
        assert all(r.fd is not None for r in mem.regions)
