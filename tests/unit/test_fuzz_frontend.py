"""Property-based fuzzing of :class:`Frontend` fed arbitrary replies.

A scripted fake back-end (a unit test of one side: the front-end) sits on the other end of a
real socketpair. It parses each request the front-end sends and answers as hypothesis tells
it: a well-formed reply with arbitrary values, the empty "failed" reply, a reply for another
request, a request instead of a reply, bad flags or version, a lying size, a cut message,
garbage, too many or too few fds (memfds, eventfds, pipes), an unsolicited message first, or
it hangs up. The front-end runs a random sequence of its calls (valid arguments: the
front-end's caller is not the attacker here).

Properties, for every script:

* every call returns or raises a typed :class:`VhostError`; nothing else escapes;
* no call hangs (the fake never leaves the front-end waiting: it hangs up after anything
  that could leave a message half-read);
* every fd a call hands back is the caller's (the test closes them) and nothing else is left
  open: after closing the front-end, this process holds the fds it held before.

:data:`EXAMPLES` scripts; ``VHOSTKIT_LONG=1`` runs :data:`LONG_EXAMPLES`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from vhostkit.errors import SocketRetry, TransportError, VhostError
from vhostkit.types import LogRegion, MemoryRegion, VringAddr
from vhostkit.user.backend_req import BackendChannel
from vhostkit.user.codec import Channel, Message
from vhostkit.user.connection import Connection
from vhostkit.user.frontend import Frontend, InflightRegion
from vhostkit.user.frontend_req_handler import FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import (
    BACKEND_RULES,
    FRONTEND_RULES,
    HEADER,
    VRING_NOFD_MASK,
    BackendReq,
    FdRule,
    FrontendReq,
    IotlbMsg,
    MigrationPhase,
    ProtocolFeature,
    TransferDirection,
    VringAreaDesc,
)
from vhostkit.user.negotiation import Negotiation, ReplyKind, Role
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.features import VirtioFeature as VF

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: hypothesis scripts
EXAMPLES = 300
#: the same with VHOSTKIT_LONG=1
LONG_EXAMPLES = 10000
FUZZ = settings(
    max_examples=LONG_EXAMPLES if LONG else EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
HANG = 10.0
R = FrontendReq
P = ProtocolFeature
U64 = st.integers(0, (1 << 64) - 1)

# -- the fake back-end's answers -------------------------------------------------------------

KINDS = (
    "good",
    "good",
    "good",
    "good",
    "empty",
    "other_request",
    "not_reply",
    "bad_flags",
    "bad_size",
    "cut",
    "garbage",
    "extra_fds",
    "no_fds",
    "unsolicited",
    "hang_up",
)


@dataclass(frozen=True)
class Answer:
    """How the fake answers one request."""

    kind: str
    values: bytes  # payload bytes (reused as garbage / values)
    number: int  # another request number, flags or a size, as the kind needs


answers = st.builds(
    Answer,
    st.sampled_from(KINDS),
    st.binary(min_size=0, max_size=80),
    st.integers(0, 0xFFFF_FFFF),
)


def _reply_payload(request: R, answer: Answer) -> bytes:
    """A payload of a size valid for ``request``'s reply, made of the answer's bytes."""
    ptype = FRONTEND_RULES[request].reply_payload
    sizes = [n for n in range(0, 300) if ptype.size_ok(n)]
    want = sizes[answer.number % min(len(sizes), 4)]
    data = (answer.values * (want // max(len(answer.values), 1) + 1))[:want]
    data = data.ljust(want, b"\0")
    if request is R.GET_FEATURES and len(answer.values) % 2:
        offer = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.LOG_ALL)
        data = struct.pack("<Q", [offer, 0][answer.number % 2])
    if request is R.GET_PROTOCOL_FEATURES and len(answer.values) % 2:
        data = struct.pack(
            "<Q", int(P.REPLY_ACK | P.CONFIG | P.INFLIGHT_SHMFD | P.MQ | P.LOG_SHMFD)
        )
    return data


def _reply_fds(request: R, payload: bytes) -> int:
    rule = FRONTEND_RULES[request].reply_fds
    if rule in (FdRule.ONE, FdRule.OPTIONAL):
        return 1
    if rule is FdRule.VRING_FLAG:
        value = struct.unpack_from("<Q", payload)[0] if len(payload) >= 8 else 0
        return 0 if value & VRING_NOFD_MASK else 1
    return 0


class FakeBackend:
    """Parses the front-end's requests; answers as scripted; owns only what it creates."""

    def __init__(self, conn: Connection, script: list[Answer]) -> None:
        self.conn = conn
        self.script = list(script)
        self.negotiation = Negotiation(Role.BACKEND)
        self.thread = threading.Thread(target=self._run, name="fuzz-fake-backend")
        self.error: BaseException | None = None

    def _send(self, data: bytes, nfds: int) -> None:
        fds = [os.memfd_create("fuzz-reply", os.MFD_CLOEXEC) for _ in range(nfds)]
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            self.conn.sock.sendmsg([data], anc)
        finally:
            for fd in fds:
                os.close(fd)

    def _answer(self, msg: Message, answer: Answer, owed: ReplyKind) -> bool:
        """Send the answer; False when the fake hangs up after it."""
        request = msg.request
        assert isinstance(request, R)
        if owed is ReplyKind.ACK:
            payload = struct.pack("<Q", 0 if answer.number % 3 else answer.number)
        else:
            payload = _reply_payload(request, answer)
        nfds = _reply_fds(request, payload) if owed is ReplyKind.PAYLOAD else 0
        flags = 1 | 0x4
        number = int(request)
        match answer.kind:
            case "empty":
                payload, nfds = b"", 0
            case "other_request":
                number = answer.number % 0x30
            case "not_reply":
                flags = 1
            case "bad_flags":
                flags = answer.number
            case "bad_size":
                self._send(HEADER.pack(number, flags, answer.number & 0x1FFF) + payload, nfds)
                return False
            case "cut":
                data = HEADER.pack(number, flags, len(payload)) + payload
                self._send(data[: answer.number % max(len(data), 1)], nfds)
                return False
            case "garbage":
                self._send(answer.values, 0)
                return False
            case "extra_fds":
                nfds += 1 + answer.number % 9
            case "no_fds":
                nfds = 0
            case "unsolicited":
                other = R(sorted(FRONTEND_RULES)[answer.number % len(FRONTEND_RULES)])
                self._send(HEADER.pack(int(other), 1 | 0x4, 8) + bytes(8), 0)
            case "hang_up":
                return False
        if owed is ReplyKind.NONE and answer.kind in ("good", "empty", "no_fds"):
            return True  # nothing owed: stay silent
        self._send(
            HEADER.pack(number & 0xFFFF_FFFF, flags & 0xFFFF_FFFF, len(payload)) + payload, nfds
        )
        return True

    def _run(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv(timeout=HANG)
                except TransportError:
                    return  # the front-end left (with replies unread: a reset)
                msg.close_fds()
                assert not msg.is_reply
                assert isinstance(msg.request, R)
                owed = self.negotiation.reply_owed(msg.request, need_reply=msg.need_reply)
                answer = self.script.pop(0) if self.script else Answer("good", b"", 0)
                try:
                    if not self._answer(msg, answer, owed):
                        return
                except (BrokenPipeError, ConnectionResetError):
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()


# -- the front-end's calls -------------------------------------------------------------------


@dataclass
class Scratch:
    """The fds the front-end borrows for its calls (owned by the test)."""

    guest: int
    kick: int
    call: int

    @classmethod
    def make(cls) -> Scratch:
        guest = os.memfd_create("fuzz-fe-guest", os.MFD_CLOEXEC)
        os.ftruncate(guest, 1 << 16)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        return cls(guest, os.eventfd(0, flags), os.eventfd(0, flags))

    def close(self) -> None:
        for fd in (self.guest, self.kick, self.call):
            os.close(fd)


def _close_result(result: object) -> None:
    """Close whatever fd or connection a call handed back to its caller."""
    if isinstance(result, InflightRegion):
        os.close(result.fd)
    elif isinstance(result, Connection):
        result.close()


def _start_dirty_log(fe: Frontend) -> None:
    with DirtyLog.allocate(8) as dlog:
        fe.start_dirty_log(dlog, fe.acked_features, [VringAddr(0, 0x1000, 0x3000, 0x2000, 0x3000)])


def calls(s: Scratch) -> dict[str, Callable[[Frontend], object]]:
    region = MemoryRegion(0, 1 << 16, 0x7F00_0000_0000, 0, s.guest)
    return {
        "negotiate": lambda fe: fe.negotiate(
            int(VF.VERSION_1 | VF.RING_PACKED),
            int(P.REPLY_ACK | P.CONFIG | P.INFLIGHT_SHMFD | P.LOG_SHMFD),
        ),
        "set_log_base": lambda fe: fe.set_log_base(0, LogRegion(s.guest, 4096, 0)),
        "start_dirty_log": lambda fe: _start_dirty_log(fe),
        "get_features": lambda fe: fe.get_features(),
        "get_protocol_features": lambda fe: fe.get_protocol_features(),
        "set_owner": lambda fe: fe.set_owner(),
        "reset_owner": lambda fe: fe.reset_owner(),
        "set_mem_table": lambda fe: fe.set_mem_table([region]),
        "add_mem_region": lambda fe: fe.add_mem_region(region),
        "remove_mem_region": lambda fe: fe.remove_mem_region(region),
        "get_max_mem_slots": lambda fe: fe.get_max_mem_slots(),
        "set_vring_num": lambda fe: fe.set_vring_num(0, 256),
        "set_vring_base": lambda fe: fe.set_vring_base(0, 0),
        "set_vring_addr": lambda fe: fe.set_vring_addr(
            VringAddr(0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000)
        ),
        "set_vring_kick": lambda fe: fe.set_vring_kick(0, s.kick),
        "set_vring_call": lambda fe: fe.set_vring_call(0, s.call),
        "set_vring_err": lambda fe: fe.set_vring_err(0, None),
        "set_vring_enable": lambda fe: fe.set_vring_enable(0, True),
        "get_vring_base": lambda fe: fe.get_vring_base(0),
        "get_queue_num": lambda fe: fe.get_queue_num(),
        "get_config": lambda fe: fe.get_config(0, 16),
        "set_config": lambda fe: fe.set_config(0, b"\0" * 8),
        "get_inflight_fd": lambda fe: fe.get_inflight_fd(1, 128),
        "set_status": lambda fe: fe.set_status(0xF),
        "get_status": lambda fe: fe.get_status(),
        "reset_device": lambda fe: fe.reset_device(),
        "send_rarp": lambda fe: fe.send_rarp(b"\x02\0\0\0\0\x01"),
        "net_set_mtu": lambda fe: fe.net_set_mtu(1500),
        "open_backend_channel": lambda fe: fe.open_backend_channel(),
        "postcopy_advise": lambda fe: fe.postcopy_advise(),
        "get_shared_object": lambda fe: fe.get_shared_object(uuid.UUID(int=7)),
        "set_device_state_fd": lambda fe: fe.set_device_state_fd(
            TransferDirection.SAVE, s.call, MigrationPhase.STOPPED
        ),
        "check_device_state": lambda fe: fe.check_device_state(),
        "vring_kick": lambda fe: fe.vring_kick(0),
    }


#: calls whose int result is an fd the caller now owns
FD_RESULTS = {"postcopy_advise", "get_shared_object", "set_device_state_fd"}
CALL_NAMES = sorted(calls(Scratch(0, 0, 0)))


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@given(
    script=st.lists(answers, max_size=24),
    ops=st.lists(
        st.one_of(st.just("negotiate"), st.sampled_from(CALL_NAMES)), min_size=1, max_size=16
    ),
)
@FUZZ
def test_frontend_survives_any_reply(script: list[Answer], ops: list[str]) -> None:
    before = open_fds()
    scratch = Scratch.make()
    ours, theirs = Connection.pair()
    fake = FakeBackend(theirs, script)
    fake.thread.start()
    outcomes: list[str] = []
    try:
        with Frontend(ours, reply_timeout=HANG) as fe:
            table = calls(scratch)
            for name in ops:
                try:
                    result = table[name](fe)
                except VhostError as exc:
                    outcomes.append(type(exc).__name__)
                    continue
                except Exception as exc:
                    raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
                outcomes.append("ok")
                if name in FD_RESULTS and isinstance(result, int):
                    os.close(result)
                else:
                    _close_result(result)
    finally:
        fake.thread.join(HANG)
        scratch.close()
    assert not fake.thread.is_alive(), "the fake back-end still waits"
    assert fake.error is None, repr(fake.error)
    for o in set(outcomes):
        event(f"call: {o}")
    leaked = open_fds() - before
    assert not leaked, {fd: _describe(fd) for fd in leaked}


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# -- the back-end request channel: FrontendReqServer fed arbitrary requests ------------------


class AcceptingHandler(FrontendReqHandler):
    """A VMM that takes every back-end request (closes a host-notifier fd it is given)."""

    def config_change(self) -> None:
        pass

    def vring_call(self, index: int) -> None:
        pass

    def vring_err(self, index: int) -> None:
        pass

    def host_notifier(self, area: VringAreaDesc, fd: int | None) -> None:
        if fd is not None:
            os.close(fd)

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        pass

    def shared_object_add(self, object_id: uuid.UUID) -> None:
        pass

    def shared_object_remove(self, object_id: uuid.UUID) -> None:
        pass

    def shared_object_lookup(self, object_id: uuid.UUID) -> int:
        return os.memfd_create("fuzz-dmabuf", os.MFD_CLOEXEC)


@st.composite
def backend_requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """One back-end request (bytes, fds to attach): valid-sized payloads, sometimes mutated."""
    request = draw(st.sampled_from(sorted(BACKEND_RULES)))
    ptype = BACKEND_RULES[request].payload
    sizes = [n for n in range(64) if ptype.size_ok(n)][:4]
    n = draw(st.sampled_from(sizes))
    payload = draw(st.binary(min_size=n, max_size=n))
    if request is BackendReq.VRING_HOST_NOTIFIER_MSG and draw(st.booleans()):
        payload = struct.pack("<QQQ", draw(st.sampled_from([0, 1, 0x100, 0x1FF])), 4096, 0)
    flags = 1 | draw(st.sampled_from([0, 0x8]))
    nfds = 1 if request is BackendReq.VRING_HOST_NOTIFIER_MSG else 0
    number, size = int(request), len(payload)
    match draw(st.sampled_from(["none"] * 8 + ["flags", "size", "request", "fds"])):
        case "flags":
            flags = draw(st.integers(0, 0xFFFF_FFFF))
        case "size":
            size = draw(st.integers(0, 0x1001))
            return HEADER.pack(number, flags, size) + payload, nfds  # then the channel ends
        case "request":
            number = draw(st.integers(0, 64))
        case "fds":
            nfds = draw(st.integers(0, 10))
    return HEADER.pack(number, flags & 0xFFFF_FFFF, size) + payload, nfds


@given(
    requests=st.lists(backend_requests(), max_size=16),
    protocol=st.sampled_from(
        [0, int(P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG), (1 << 19) - 1, int(P.BACKEND_REQ)]
    ),
    accepting=st.booleans(),
)
@FUZZ
def test_frontend_req_server_survives_any_backend_request(
    requests: list[tuple[bytes, int]], protocol: int, accepting: bool
) -> None:
    before = open_fds()
    ours, theirs = Connection.pair(Channel.BACKEND)
    handler = AcceptingHandler() if accepting else FrontendReqHandler()
    server = FrontendReqServer(ours, handler, protocol)
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            server.serve()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=serve, name="fuzz-frontend-req-server")
    thread.start()
    try:
        for data, nfds in requests:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                theirs.sock.sendmsg([data], anc)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                for fd in fds:
                    os.close(fd)
        with contextlib.suppress(OSError):
            theirs.sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                reply = theirs.recv(timeout=HANG)
            except SocketRetry:
                raise AssertionError("the front-end neither answered nor closed") from None
            except TransportError:
                break
            except VhostError as exc:
                raise AssertionError(f"the front-end sent a malformed reply: {exc}") from exc
            reply.close_fds()
            assert reply.is_reply
        thread.join(HANG)
        assert not thread.is_alive(), "FrontendReqServer hangs after the back-end left"
    finally:
        theirs.close()
    (result,) = outcome
    assert result is None or isinstance(result, VhostError), repr(result)
    event("ended: " + (type(result).__name__ if result else "disconnect"))
    leaked = open_fds() - before
    assert not leaked, {fd: _describe(fd) for fd in leaked}


# -- and the other way: BackendChannel fed arbitrary replies by a fake front-end -------------


class FakeFrontend(threading.Thread):
    """Answers the back-end's requests on the back-end channel as scripted."""

    def __init__(self, conn: Connection, script: list[Answer]) -> None:
        super().__init__(name="fuzz-fake-frontend")
        self.conn = conn
        self.script = list(script)
        self.error: BaseException | None = None

    def _send(self, data: bytes, nfds: int) -> None:
        fds = [os.memfd_create("fuzz-dmabuf", os.MFD_CLOEXEC) for _ in range(nfds)]
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            self.conn.sock.sendmsg([data], anc)
        finally:
            for fd in fds:
                os.close(fd)

    def run(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv(timeout=HANG)
                except TransportError:
                    return
                msg.close_fds()
                answer = self.script.pop(0) if self.script else Answer("good", b"", 0)
                lookup = msg.request is BackendReq.SHARED_OBJECT_LOOKUP
                if not (msg.need_reply or lookup) and answer.kind != "unsolicited":
                    continue  # nothing owed
                status = 0 if answer.number % 3 else answer.number
                payload = struct.pack("<Q", status)
                nfds = 1 if lookup and answer.number % 2 else 0
                flags, number = 1 | 0x4, int(msg.request)
                match answer.kind:
                    case "empty":
                        payload = b""
                    case "other_request":
                        number = answer.number % 12
                    case "not_reply":
                        flags = 1
                    case "bad_flags":
                        flags = answer.number
                    case "bad_size" | "cut" | "garbage" | "hang_up":
                        data = HEADER.pack(number, flags, answer.number & 0x1FFF) + payload
                        self._send(data[: answer.number % (len(data) + 1)], 0)
                        return
                    case "extra_fds":
                        nfds += 1 + answer.number % 9
                    case "no_fds":
                        nfds = 0
                self._send(HEADER.pack(number, flags & 0xFFFF_FFFF, len(payload)) + payload, nfds)
        except (BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()


CHANNEL_CALLS: dict[str, Callable[[BackendChannel], object]] = {
    "config_change": lambda ch: ch.config_change(),
    "vring_call": lambda ch: ch.vring_call(0),
    "vring_err": lambda ch: ch.vring_err(1),
    "remove_host_notifier": lambda ch: ch.remove_host_notifier(0),
    "shared_object_add": lambda ch: ch.shared_object_add(uuid.UUID(int=1)),
    "shared_object_remove": lambda ch: ch.shared_object_remove(uuid.UUID(int=1)),
    "shared_object_lookup": lambda ch: ch.shared_object_lookup(uuid.UUID(int=1)),
}


@given(
    script=st.lists(answers, max_size=16),
    ops=st.lists(st.sampled_from(sorted(CHANNEL_CALLS)), min_size=1, max_size=12),
    protocol=st.sampled_from(
        [
            int(P.BACKEND_REQ | P.REPLY_ACK | P.CONFIG | P.INBAND_NOTIFICATIONS | P.SHARED_OBJECT),
            int(P.BACKEND_REQ | P.CONFIG | P.SHARED_OBJECT | P.INBAND_NOTIFICATIONS),
            int(P.BACKEND_REQ),
        ]
    ),
)
@FUZZ
def test_backend_channel_survives_any_reply(
    script: list[Answer], ops: list[str], protocol: int
) -> None:
    before = open_fds()
    ours, theirs = Connection.pair(Channel.BACKEND)
    fake = FakeFrontend(theirs, script)
    fake.start()
    channel = BackendChannel(ours, protocol, reply_timeout=HANG)
    outcomes: set[str] = set()
    try:
        for name in ops:
            try:
                result = CHANNEL_CALLS[name](channel)
            except VhostError as exc:
                outcomes.add(type(exc).__name__)
                continue
            except Exception as exc:
                raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
            outcomes.add("ok")
            if name == "shared_object_lookup":
                assert isinstance(result, int)
                os.close(result)
    finally:
        channel.close()
        fake.join(HANG)
    assert not fake.is_alive(), "the fake front-end still waits"
    assert fake.error is None, repr(fake.error)
    for o in outcomes:
        event(f"call: {o}")
    leaked = open_fds() - before
    assert not leaked, {fd: _describe(fd) for fd in leaked}
