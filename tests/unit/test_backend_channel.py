"""The back-end request channel end to end, client socket mode, and in-band negotiation rules."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from vhostkit.errors import (
    Disconnected,
    IncorrectFds,
    ProtocolError,
    RequestFailed,
    SocketBroken,
)
from vhostkit.user import (
    BackendDevice,
    BackendListener,
    BackendReqServer,
    Frontend,
    FrontendReqHandler,
    FrontendReqServer,
    serve_client,
)
from vhostkit.user.connection import Connection, Listener
from vhostkit.user.message import (
    U64,
    FrontendReq,
    InflightDesc,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
    VringAreaDesc,
)

P = ProtocolFeature
CHANNEL_FEATURES = (
    P.REPLY_ACK
    | P.BACKEND_REQ
    | P.BACKEND_SEND_FD
    | P.CONFIG
    | P.HOST_NOTIFIER
    | P.INBAND_NOTIFICATIONS
    | P.SHARED_OBJECT
)
OBJ = uuid.UUID("0b1e2d3c-4a5b-6c7d-8e9f-a0b1c2d3e4f5")


class Recorder(FrontendReqHandler):
    """A VMM-side handler that records what the back-end asked."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.notifier_fds: list[int] = []
        self.objects: dict[uuid.UUID, int] = {}

    def config_change(self) -> None:
        self.events.append(("config",))

    def vring_call(self, index: int) -> None:
        self.events.append(("call", index))

    def vring_err(self, index: int) -> None:
        self.events.append(("err", index))

    def host_notifier(self, area: VringAreaDesc, fd: int | None) -> None:
        self.events.append(("notifier", area.index, area.size, fd is not None))
        if fd is not None:
            self.notifier_fds.append(fd)

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        self.events.append(("iotlb", msg.type, msg.iova))

    def shared_object_add(self, object_id: uuid.UUID) -> None:
        self.events.append(("add", object_id))

    def shared_object_remove(self, object_id: uuid.UUID) -> None:
        self.events.append(("remove", object_id))

    def shared_object_lookup(self, object_id: uuid.UUID) -> int:
        if object_id not in self.objects:
            raise RequestFailed("unknown object", errno=errno.ENOENT)
        return os.dup(self.objects[object_id])


@pytest.fixture
def channel(fd_check, sock_dir) -> Iterator[tuple[BackendDevice, Recorder]]:
    device = BackendDevice(features=1 << 32, protocol_features=CHANNEL_FEATURES)
    listener = BackendListener(str(sock_dir / "ch.sock"), lambda: device).start()
    fe = Frontend.connect(sock_dir / "ch.sock", timeout=5)
    recorder = Recorder()
    server = None
    try:
        fe.set_owner()
        fe.negotiate(1 << 32, CHANNEL_FEATURES)
        server = FrontendReqServer(fe.open_backend_channel(), recorder, fe.acked_protocol_features)
        server.start()
        yield device, recorder
    finally:
        fe.close()
        if server is not None:
            server.close()
        listener.stop()
        device.close()
        for fd in recorder.notifier_fds + list(recorder.objects.values()):
            os.close(fd)
        assert not listener.errors


def test_every_backend_request_reaches_the_frontend(channel) -> None:
    device, recorder = channel
    ch = device.backend_channel
    assert ch is not None
    ch.config_change()
    ch.vring_call(1)
    ch.vring_err(0)
    r, w = os.pipe()
    try:
        ch.set_host_notifier(1, r, 4096, 0)
    finally:
        os.close(r)
        os.close(w)
    ch.remove_host_notifier(1)
    ch.shared_object_add(OBJ)
    ch.shared_object_remove(OBJ)
    ch.iotlb_msg(IotlbMsg(0x1000, 0, 0, IotlbPerm.RO, IotlbType.MISS))
    # with REPLY_ACK every request above returned only once the front-end had handled it
    assert recorder.events == [
        ("config",),
        ("call", 1),
        ("err", 0),
        ("notifier", 1, 4096, True),
        ("notifier", 1, 0, False),
        ("add", OBJ),
        ("remove", OBJ),
        ("iotlb", IotlbType.MISS, 0x1000),
    ]


def test_shared_object_lookup_passes_an_fd_back(channel) -> None:
    device, recorder = channel
    fd = os.memfd_create("dmabuf-standin", os.MFD_CLOEXEC)
    os.write(fd, b"shared!")
    recorder.objects[OBJ] = fd
    got = device.backend_channel.shared_object_lookup(OBJ)
    try:
        assert os.pread(got, 7, 0) == b"shared!"
    finally:
        os.close(got)
    with pytest.raises(RequestFailed) as info:
        device.backend_channel.shared_object_lookup(uuid.uuid4())
    assert info.value.status == errno.ENOENT


def test_backend_client_mode_connects_to_a_listening_frontend(fd_check, sock_dir) -> None:
    """QEMU ``server=on`` / testpmd ``server=1`` style: the front-end listens."""
    path = sock_dir / "fe.sock"
    device = BackendDevice(features=1 << 32)
    stop = threading.Event()
    with Listener(path) as listener:
        t = threading.Thread(
            target=serve_client, args=(path, device), kwargs={"reconnect": True, "stop": stop}
        )
        t.start()
        try:
            for round_ in range(2):  # the back-end reconnects after the front-end leaves
                with Frontend(listener.accept(timeout=10)) as fe:
                    fe.set_owner()  # a fresh session each time: no "already owned"
                    acked, _ = fe.negotiate(1 << 32, P.REPLY_ACK)
                    assert acked & (1 << 32)
                    assert device.acked_features & (1 << 32), round_
                    if round_ == 1:
                        # before the front-end leaves: serve_client looks at ``stop`` between
                        # connections, and would otherwise reconnect to this listener first
                        stop.set()
        finally:
            stop.set()
            t.join(timeout=10)
    assert not t.is_alive()
    device.close()


def test_inband_notifications_without_backend_req_closes_the_connection(fd_check) -> None:
    a, b = Connection.pair()
    device = BackendDevice(features=1 << 32, protocol_features=CHANNEL_FEATURES)
    server = BackendReqServer(b, device)
    fe = Frontend(a)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve()
        except ProtocolError as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        fe.get_features()
        fe.get_protocol_features()
        fe.set_protocol_features(P.INBAND_NOTIFICATIONS)
        with pytest.raises(Disconnected):
            fe.conn.recv(timeout=5)
    finally:
        fe.close()
        t.join(timeout=5)
        device.close()
    assert errors and "INBAND" in str(errors[0])


def test_inflight_reply_without_fd_is_an_error(fd_check) -> None:
    """A back-end that answers GET_INFLIGHT_FD without an fd is reported, not crashed on."""
    a, b = Connection.pair()

    def scripted_backend() -> None:
        with b:
            answers = {
                FrontendReq.GET_FEATURES: U64(1 << 30),
                FrontendReq.GET_PROTOCOL_FEATURES: U64(int(P.INFLIGHT_SHMFD)),
                FrontendReq.GET_INFLIGHT_FD: InflightDesc(4096, 0, 1, 64),  # and no fd
            }
            while True:
                try:
                    msg = b.recv(timeout=5)
                except Disconnected:
                    return
                if msg.request in answers:
                    b.send(msg.reply(answers[msg.request]))

    t = threading.Thread(target=scripted_backend)
    t.start()
    with Frontend(a) as fe:
        fe.negotiate(0, P.INFLIGHT_SHMFD)
        with pytest.raises(IncorrectFds, match="no fd"):
            fe.get_inflight_fd(1, 64)
    t.join(timeout=5)


def test_backend_client_stop_ends_a_live_connection(fd_check, sock_dir) -> None:
    from vhostkit.user import BackendClient

    path = sock_dir / "live.sock"
    device = BackendDevice(features=1 << 32)
    with Listener(path) as listener:
        client = BackendClient(path, device, reconnect=True).start()
        fe = Frontend(listener.accept(timeout=10))
        try:
            fe.set_owner()
            device.wait_for(lambda: device.owner)  # the connection is being served
            client.stop()  # the front-end is still connected: the back-end hangs up
            with pytest.raises((Disconnected, SocketBroken)) as info:
                fe.conn.recv(timeout=5)
            assert info.value.should_reconnect()
        finally:
            fe.close()
    assert client.connections == 1 and not client.errors
    device.close()
