"""The tracing proxy with vhostkit on both sides, and with scripted raw peers.

* vhostkit :class:`Frontend` <-> :class:`TraceProxy` <-> :class:`BackendListener` with a
  :class:`BackendDevice`: a whole bring-up passes through (the device maps the memory whose
  fds went through the proxy), the log holds every request in the order sent with its reply
  paired, and the back-end channel is interposed (CONFIG_CHANGE_MSG and its ack are traced).
* Raw peers: a front-end or a back-end that vanishes in the middle of a message, malformed
  messages forwarded byte for byte with their fds, a stream that cannot be framed, a back-end
  that is not there. The proxy never crashes, closes every fd it took, and keeps listening.

The proxy runs in a thread of the test process, so ``fd_check`` covers its fds too.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhostkit.errors import Disconnected, InvalidOperation, PartialMessage, TransportError
from vhostkit.trace import RecordKind, TraceProxy, TraceRecord
from vhostkit.trace.format import format_text
from vhostkit.types import VringAddr
from vhostkit.user import BackendDevice, BackendListener, Frontend
from vhostkit.user.codec import Channel
from vhostkit.user.frontend_req_handler import FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import HEADER, FrontendReq, ProtocolFeature
from vhostkit.virtio.features import DeviceStatus, VirtioFeature
from vhostkit.virtio.memory import GuestMemory

P = ProtocolFeature
R = FrontendReq


class RecordLog:
    """The proxy's sink: keeps the records, wakes waiters on each one."""

    def __init__(self) -> None:
        self.records: list[TraceRecord] = []
        self._cond = threading.Condition()

    def __call__(self, rec: TraceRecord) -> None:
        with self._cond:
            self.records.append(rec)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[TraceRecord]], bool], timeout: float = 10) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self.records), timeout)
        assert ok, "\n".join(format_text(r) for r in self.records)

    def wait_event(self, text: str, timeout: float = 10) -> None:
        self.wait_for(
            lambda rs: any(r.kind is RecordKind.EVENT and text in r.summary for r in rs), timeout
        )

    def messages(self, session: int | None = None) -> list[TraceRecord]:
        with self._cond:
            return [
                r
                for r in self.records
                if r.kind is RecordKind.MESSAGE and session in (None, r.session)
            ]


@contextlib.contextmanager
def proxy_between(
    listen: Path, connect: Path, **kw: object
) -> Iterator[tuple[TraceProxy, RecordLog]]:
    log = RecordLog()
    proxy = TraceProxy(listen, connect, log, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=proxy.serve, name="trace-proxy", daemon=True)
    thread.start()
    try:
        yield proxy, log
    finally:
        proxy.stop()
        thread.join(10)
        assert not thread.is_alive(), "the proxy did not stop"
        proxy.close()
    assert not listen.exists(), "the proxy left its socket file"


def recv_exact(conn: socket.socket, n: int) -> tuple[bytes, list[int]]:
    """``n`` bytes (or fewer at EOF) and the fds that came with them."""
    data, fds = b"", []
    while len(data) < n:
        chunk, anc, _, _ = conn.recvmsg(n - len(data), socket.CMSG_SPACE(64 * 4))
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw[: len(raw) - len(raw) % 4])
                fds += list(arr)
        if not chunk:
            break
        data += chunk
    return data, fds


class FakeBackend:
    """A raw listening socket; the n-th connection accepted runs the n-th script."""

    def __init__(self, path: Path, *scripts: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(os.fspath(path))
        self.sock.listen(4)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(scripts,), daemon=True)
        self.thread.start()

    def _run(self, scripts: tuple[Callable[[socket.socket], None], ...]) -> None:
        try:
            for script in scripts:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(10)
                    script(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.sock.close()
        self.path.unlink()
        assert not self.errors, self.errors

    def __enter__(self) -> FakeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header(code: int, flags: int, size: int) -> bytes:
    return HEADER.pack(code, flags, size)


# --- vhostkit on both sides -----------------------------------------------------------------


class ConfigWatcher(FrontendReqHandler):
    def __init__(self) -> None:
        self.changed = threading.Event()

    def config_change(self) -> None:
        self.changed.set()


def test_bring_up_through_the_proxy_is_traced_in_order(fd_check, sock_dir):
    device = BackendDevice(features=int(VirtioFeature.VERSION_1), num_queues=2, config=bytes(12))
    listener = BackendListener(sock_dir / "be.sock", lambda: device, max_connections=1).start()
    try:
        with (
            proxy_between(sock_dir / "fe.sock", sock_dir / "be.sock") as (_, log),
            GuestMemory.allocate([(0, 0xA0000), (0x100000, 0x100000)]) as mem,
            contextlib.ExitStack() as stack,
        ):
            fe = Frontend.connect(sock_dir / "fe.sock", timeout=5)
            stack.callback(fe.close)
            fe.set_owner()
            fe.negotiate(
                int(VirtioFeature.VERSION_1),
                P.MQ | P.REPLY_ACK | P.CONFIG | P.BACKEND_REQ | P.STATUS,
            )
            assert fe.get_queue_num() == 2
            assert fe.get_config(0, 12) == bytes(12)
            watcher = ConfigWatcher()
            server = FrontendReqServer(
                fe.open_backend_channel(), watcher, fe.acked_protocol_features
            )
            server.start()
            stack.callback(server.close)
            fe.set_mem_table(mem.regions)
            base = mem.regions[1].userspace_addr
            kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
            stack.callback(os.close, kick)
            stack.callback(os.close, call)
            fe.set_vring_num(0, 256)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(VringAddr(0, desc=base, avail=base + 0x1000, used=base + 0x2000))
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            fe.set_status(int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER))
            # the memfds went through the proxy: the device reads what we write
            mem.write(0x100000 + 0x1000 + 2, struct.pack("<H", 77))
            assert device.avail_idx(0) == 77
            # the back-end channel goes through the proxy too
            assert device.backend_channel is not None
            device.backend_channel.config_change()
            assert watcher.changed.wait(5)
            assert fe.get_vring_base(0) == 0
            log.wait_for(lambda rs: rs[-1].request == "GET_VRING_BASE" and rs[-1].is_reply)
    finally:
        listener.stop()
        device.close()
    assert not listener.errors and not listener.rejected

    main = [r for r in log.messages() if r.channel is Channel.MAIN]
    sent = [r.request for r in main if r.direction.value == "F>B"]
    assert sent == [
        "SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
        "SET_FEATURES", "GET_QUEUE_NUM", "GET_CONFIG", "SET_BACKEND_REQ_FD", "SET_MEM_TABLE",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_KICK",
        "SET_VRING_ENABLE", "SET_STATUS", "GET_VRING_BASE",
    ]  # fmt: skip
    assert all(r.malformed is None for r in log.messages()), log.messages()
    # every request that wanted an answer got exactly one, right after it
    by_seq = {r.seq: r for r in main}
    for r in main:
        if r.is_reply:
            assert by_seq[r.reply_to].request == r.request and r.reply_to == r.seq - 1
            assert r.rtt is not None and r.rtt >= 0
    waited = [r for r in main if not r.is_reply and (r.need_reply or r.request.startswith("GET"))]
    replies = [r for r in main if r.is_reply]
    assert [r.reply_to for r in replies] == [r.seq for r in waited]
    assert "SET_PROTOCOL_FEATURES" not in {r.request for r in replies}  # no NEED_REPLY yet
    memtable = next(r for r in main if r.request == "SET_MEM_TABLE")
    assert memtable.fds == 2 and "(640 KiB)" in memtable.summary and "(1 MiB)" in memtable.summary
    assert [r.seq for r in log.messages()] == list(range(1, len(log.messages()) + 1))
    # the back-end's request and the front-end's ack, on the back-end channel
    bchan = [r for r in log.messages() if r.channel is Channel.BACKEND]
    assert [(r.direction.value, r.request, r.is_reply) for r in bchan] == [
        ("B>F", "CONFIG_CHANGE_MSG", False),
        ("F>B", "CONFIG_CHANGE_MSG", True),
    ]
    assert bchan[0].need_reply and bchan[1].reply_to == bchan[0].seq
    events = [r.summary for r in log.records if r.kind is RecordKind.EVENT]
    assert any("back-end channel interposed" in e for e in events)


def test_frontend_vanishing_mid_message_leaves_the_listener_serving(fd_check, sock_dir):
    device = BackendDevice(features=int(VirtioFeature.VERSION_1), num_queues=2)
    listener = BackendListener(sock_dir / "be.sock", lambda: device, max_connections=1).start()
    try:
        with proxy_between(sock_dir / "fe.sock", sock_dir / "be.sock") as (_, log):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(os.fspath(sock_dir / "fe.sock"))
                raw.sendall(header(R.SET_FEATURES, 1, 8) + bytes(4))
            log.wait_event("session 1: front-end closed the connection")
            (cut,) = log.messages(1)
            assert cut.request == "SET_FEATURES"
            assert cut.malformed == "peer closed mid-message: 4 of 8 payload bytes"
            assert "!! MALFORMED: peer closed mid-message" in format_text(cut)
            # the next front-end is served
            with Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe:
                assert fe.get_features() & VirtioFeature.VERSION_1
            log.wait_event("session 2: front-end closed the connection")
            assert [r.request for r in log.messages(2)] == ["GET_FEATURES", "GET_FEATURES"]
    finally:
        listener.stop()
        device.close()
    assert not listener.errors


def test_backend_vanishing_mid_reply(fd_check, sock_dir):
    def half_reply(conn: socket.socket) -> None:
        data, _ = recv_exact(conn, 12)
        assert HEADER.unpack(data)[0] == R.GET_FEATURES
        conn.sendall(header(R.GET_FEATURES, 5, 8) + b"\1\2\3")

    def whole_reply(conn: socket.socket) -> None:
        recv_exact(conn, 12)
        conn.sendall(header(R.GET_FEATURES, 5, 8) + struct.pack("<Q", 1 << 32))
        recv_exact(conn, 1)  # until the front-end leaves

    with (
        FakeBackend(sock_dir / "be.sock", half_reply, whole_reply),
        proxy_between(sock_dir / "fe.sock", sock_dir / "be.sock") as (_, log),
    ):
        with (
            Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe,
            pytest.raises((PartialMessage, Disconnected)),
        ):
            fe.get_features()
        log.wait_event("session 1: back-end closed the connection")
        request, cut = log.messages(1)
        assert request.request == "GET_FEATURES" and not request.is_reply
        assert cut.direction.value == "B>F" and cut.request == "GET_FEATURES" and cut.is_reply
        assert cut.malformed == "peer closed mid-message: 3 of 8 payload bytes"
        with Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe:
            assert fe.get_features() == 1 << 32
        log.wait_event("session 2: front-end closed the connection")
        reply = log.messages(2)[1]
        assert reply.reply_to == 1 and "VERSION_1" in reply.summary


def test_malformed_messages_are_forwarded_byte_for_byte_with_their_fds(fd_check, sock_dir):
    unknown = header(99, 1, 2) + b"hi"
    set_call = header(R.SET_VRING_CALL, 1, 8) + struct.pack("<Q", 0)
    odd_flags = header(R.SET_OWNER, 0x21, 0)
    got: dict[str, object] = {}

    def record(conn: socket.socket) -> None:
        got["unknown"] = recv_exact(conn, len(unknown))
        got["set_call"] = recv_exact(conn, len(set_call))
        got["odd_flags"] = recv_exact(conn, len(odd_flags))
        got["eof"] = recv_exact(conn, 1)

    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with (
            FakeBackend(sock_dir / "be.sock", record) as be,
            proxy_between(sock_dir / "fe.sock", sock_dir / "be.sock") as (_, log),
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(os.fspath(sock_dir / "fe.sock"))
                raw.sendall(unknown)
                raw.sendmsg(
                    [set_call], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [efd]))]
                )
                raw.sendall(odd_flags)
                log.wait_for(lambda rs: len([r for r in rs if r.kind is RecordKind.MESSAGE]) == 3)
            be.thread.join(10)
            assert got["unknown"] == (unknown, [])
            data, fds = got["set_call"]  # type: ignore[misc]
            assert data == set_call and len(fds) == 1
            try:
                os.eventfd_write(fds[0], 5)  # the very eventfd we sent
                assert os.eventfd_read(efd) == 5
            finally:
                os.close(fds[0])
            assert got["odd_flags"] == (odd_flags, [])
            assert got["eof"] == (b"", [])  # the front-end left: so did the back-end connection
            a, b, c = log.messages()
            assert a.request == "UNKNOWN(99)" and "unknown main-channel request 99" in a.malformed
            assert b.request == "SET_VRING_CALL" and b.fds == 1 and b.malformed is None
            assert c.request == "SET_OWNER" and "reserved header flag bits" in c.malformed
    finally:
        os.close(efd)


def test_a_stream_that_cannot_be_framed_stops_the_proxy_cleanly(fd_check, sock_dir):
    def wait_eof(conn: socket.socket) -> None:
        assert recv_exact(conn, 1) == (b"", [])

    log = RecordLog()
    with FakeBackend(sock_dir / "be.sock", wait_eof):
        proxy = TraceProxy(sock_dir / "fe.sock", sock_dir / "be.sock", log)
        thread = threading.Thread(target=proxy.serve, daemon=True)
        thread.start()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(os.fspath(sock_dir / "fe.sock"))
                raw.sendall(header(R.GET_FEATURES, 1, 0x7FFF0000) + b"garbage")
                thread.join(10)
                assert not thread.is_alive()
                # the proxy closed the front-end's connection (reset: it left bytes unread)
                with contextlib.suppress(ConnectionResetError):
                    assert raw.recv(1) == b""
        finally:
            proxy.close()
    assert not (sock_dir / "fe.sock").exists()
    assert proxy.failure is not None and "cannot frame the front-end's" in proxy.failure
    (bad,) = log.messages()
    assert bad.request == "GET_FEATURES" and "out of step" in bad.malformed


def test_missing_backend_and_bad_listen_path(fd_check, sock_dir):
    blocker = sock_dir / "file"
    blocker.write_text("not a socket")
    with pytest.raises(InvalidOperation, match="not a socket"):
        TraceProxy(blocker, sock_dir / "be.sock", lambda rec: None)
    with proxy_between(sock_dir / "fe.sock", sock_dir / "nobody.sock", connect_timeout=0.1) as (
        _,
        log,
    ):
        with (
            Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe,
            pytest.raises(TransportError),
        ):
            fe.get_features()
        log.wait_event("cannot reach the back-end")
        # still listening
        with Frontend.connect(sock_dir / "fe.sock", timeout=5):
            log.wait_event("session 2: cannot reach the back-end")


def test_max_sessions_ends_serve(fd_check, sock_dir):
    device = BackendDevice(features=int(VirtioFeature.VERSION_1), num_queues=2)
    listener = BackendListener(sock_dir / "be.sock", lambda: device).start()
    log = RecordLog()
    try:
        with TraceProxy(sock_dir / "fe.sock", sock_dir / "be.sock", log, max_sessions=1) as proxy:
            thread = threading.Thread(target=proxy.serve, daemon=True)
            thread.start()
            with Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe:
                fe.get_features()
            thread.join(10)
            assert not thread.is_alive()
    finally:
        listener.stop()
        device.close()
    assert not (sock_dir / "fe.sock").exists()


def test_more_fds_than_the_proxy_takes(fd_check, sock_dir):
    msg = header(R.SET_LOG_FD, 1, 0)
    got: list[tuple[bytes, list[int]]] = []

    def record(conn: socket.socket) -> None:
        got.append(recv_exact(conn, len(msg)))
        recv_exact(conn, 1)

    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(40)]
    try:
        with (
            FakeBackend(sock_dir / "be.sock", record) as be,
            proxy_between(sock_dir / "fe.sock", sock_dir / "be.sock") as (_, log),
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(os.fspath(sock_dir / "fe.sock"))
                raw.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                log.wait_for(lambda rs: any(r.kind is RecordKind.MESSAGE for r in rs))
            be.thread.join(10)
        data, relayed = got[0]
        for fd in relayed:
            os.close(fd)
        assert data == msg and len(relayed) == 32
        (rec,) = log.messages()
        assert rec.fds == 32 and "32 fds in one message, at most 8" in rec.malformed
        events = [r.summary for r in log.records if r.kind is RecordKind.EVENT]
        assert any("more than 32 fds in one message" in e for e in events)
    finally:
        for fd in fds:
            os.close(fd)
