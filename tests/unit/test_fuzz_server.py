"""Property-based fuzzing of :class:`BackendReqServer` serving real devices.

Hypothesis writes whole vhost-user message streams onto one end of a real socketpair; the
other end is a :class:`BackendReqServer` in a thread, serving a real device:
:class:`BlkDevice` on a scratch image, :class:`EchoDevice` (virtio-net shaped) or
:class:`SinkDevice`. A stream is mostly a plausible set-up (owner, features, a memory table
backed by a real memfd, rings in it with real eventfds) with every message open to mutation:
wrong payload sizes and values, wrong or reserved flags and versions, unknown requests, a
header whose size lies, more or fewer fds than the request takes and fds of the wrong kind
(eventfds, memfds, pipes, sockets, /dev/null), kicks in between, and a truncated message at
the end. The guest memory holds arbitrary bytes where the rings are, so started rings are
served over garbage.

Properties, for every stream:

* the server ends (the stream ends with EOF) with nothing, or with a typed
  :class:`VhostError`; no ring worker logs an untyped exception and no thread dies;
* every reply the server sent decodes as a reply (the client parses them with the codec);
* it never hangs (every wait has a deadline);
* afterwards this process holds the same fds (the test closes its own; the server must have
  closed every one it received), the same memfd mappings and the same threads as before;
* the guard bytes around the guest region in its memfd are untouched;
* the device serves the next, well-behaved connection.

:data:`EXAMPLES` streams per device; ``VHOSTKIT_LONG=1`` runs :data:`LONG_EXAMPLES`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from vhostkit.devices.blk import BlkDevice
from vhostkit.devices.echo import EchoDevice
from vhostkit.errors import RequestFailed, SocketRetry, VhostError
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.backend.device import BackendDevice
from vhostkit.user.backend.ring_device import SinkDevice
from vhostkit.user.backend_req_handler import BackendReqServer
from vhostkit.user.connection import Connection
from vhostkit.user.frontend import Frontend
from vhostkit.user.message import (
    FRONTEND_RULES,
    HEADER,
    VRING_NOFD_MASK,
    FdRule,
    FrontendReq,
    ProtocolFeature,
)
from vhostkit.virtio.features import VirtioFeature as VF

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: hypothesis streams per device
EXAMPLES = 100
#: the same with VHOSTKIT_LONG=1
LONG_EXAMPLES = 5000
FUZZ = settings(
    max_examples=LONG_EXAMPLES if LONG else EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
#: the longest any wait may take before the test calls it a hang
HANG = 20.0

R = FrontendReq
P = ProtocolFeature
PAGE = mmap.PAGESIZE
FILE_SIZE = 24 * PAGE
REGION_OFF = 8 * PAGE + 52
REGION_SIZE = 8 * PAGE - 100
GUARD = 0xA5
UVA = 0x7F00_0000_0000
RING_AREA = 0x1000  # rings 0..3 at RING_AREA + 0x400 * i (desc, +0x100 avail, +0x200 used)


# -- the fds a stream may carry --------------------------------------------------------------

FD_KINDS = ("eventfd", "eventfd2", "guest", "memfd", "pipe_r", "pipe_w", "socket", "null")


class FdPool:
    """One fd of each kind, owned by the test (the server receives duplicates)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.extra: list[int] = []
        self.fds["eventfd"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds["eventfd2"] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        guest = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        self.fds["guest"] = guest
        os.ftruncate(guest, FILE_SIZE)
        os.pwrite(guest, bytes([GUARD]) * FILE_SIZE, 0)
        os.pwrite(guest, bytes(REGION_SIZE), REGION_OFF)
        memfd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
        os.ftruncate(memfd, 2 * PAGE)
        self.fds["memfd"] = memfd
        self.fds["pipe_r"], self.fds["pipe_w"] = os.pipe()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fds["socket"] = a.detach()
        self.extra.append(b.detach())
        self.fds["null"] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def guards_intact(self) -> bool:
        fd = self.fds["guest"]
        before = os.pread(fd, REGION_OFF, 0)
        after_off = REGION_OFF + REGION_SIZE
        after = os.pread(fd, FILE_SIZE - after_off, after_off)
        return set(before) == {GUARD} and set(after) == {GUARD}

    def close(self) -> None:
        for fd in [*self.fds.values(), *self.extra]:
            os.close(fd)


# -- one message on the wire -----------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """Bytes to send in one ``sendmsg`` with the fds of the named kinds (or a kick)."""

    data: bytes = b""
    fds: tuple[str, ...] = ()
    kick: str | None = None  # write this eventfd instead of sending


def header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request & 0xFFFF_FFFF, flags & 0xFFFF_FFFF, size & 0xFFFF_FFFF)


U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)
RING = st.one_of(st.integers(0, 2), st.integers(0, 0xFF), U32)

FEATURE_CHOICES = st.one_of(
    st.sampled_from(
        [
            0,
            int(VF.VERSION_1),
            int(VF.VERSION_1 | VF.PROTOCOL_FEATURES),
            int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC),
            int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_PACKED),
            int(VF.VERSION_1 | VF.RING_PACKED | VF.RING_EVENT_IDX),
        ]
    ),
    st.just(int(VF.VERSION_1 | VF.PROTOCOL_FEATURES)),
    st.just(int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_PACKED)),
    U64,
)
PROTOCOL_CHOICES = st.one_of(
    st.sampled_from(
        [
            0,
            int(P.REPLY_ACK),
            int(P.REPLY_ACK | P.CONFIG | P.MQ | P.INFLIGHT_SHMFD | P.BACKEND_REQ),
            int(P.REPLY_ACK | P.BACKEND_REQ | P.BACKEND_SEND_FD | P.CONFIGURE_MEM_SLOTS),
            int(P.REPLY_ACK | P.STATUS | P.RESET_DEVICE | P.LOG_SHMFD | P.INBAND_NOTIFICATIONS),
        ]
    ),
    st.just(int(P.REPLY_ACK | P.CONFIG | P.MQ | P.INFLIGHT_SHMFD | P.BACKEND_REQ)),
    U64,
)


@st.composite
def region_bytes(draw: st.DrawFn) -> bytes:
    """One ``VhostUserMemoryRegion``: mostly the real region, sometimes a hostile one."""
    good = (0, REGION_SIZE, UVA, REGION_OFF)
    gpa, size, uva, off = draw(
        st.one_of(
            st.just(good),
            st.just(good),
            st.just(good),
            st.just(good),
            st.just((0, FILE_SIZE * 4, UVA, REGION_OFF)),  # past the end of the file
            st.just((0, REGION_SIZE, UVA, 1 << 62)),  # offset beyond the file
            st.just((0, 0, UVA, 0)),  # empty
            st.just(((1 << 64) - PAGE, 2 * PAGE, UVA, 0)),  # wraps the guest space
            st.tuples(U64, U64, U64, U64),
        )
    )
    return struct.pack("<QQQQ", gpa, size, uva, off)


def ring_addr_bytes(draw: st.DrawFn, index: int) -> bytes:
    base = UVA + RING_AREA + 0x400 * (index & 3)
    desc, avail, used = draw(
        st.one_of(
            st.just((base, base + 0x100, base + 0x200)),
            st.just((base, base + 0x100, base + 0x200)),
            st.just((UVA + REGION_SIZE - 8, base + 0x100, base + 0x200)),  # crosses the end
            st.just((0x1000, 0x2000, 0x3000)),  # not user addresses of any region
            st.tuples(U64, U64, U64),
        )
    )
    flags = draw(st.sampled_from([0, 0, 1, 0xFFFF_FFFF]))
    return struct.pack("<IIQQQQ", index & 0xFFFF_FFFF, flags, desc, used, avail, 0)


def fds_by_rule(draw: st.DrawFn, request: R, payload: bytes) -> tuple[str, ...]:
    """The fds a well-formed ``request`` carries, of the kind a front-end would send."""
    rule = FRONTEND_RULES[request].fds
    natural = {
        R.SET_MEM_TABLE: "guest",
        R.ADD_MEM_REG: "guest",
        R.SET_LOG_BASE: "memfd",
        R.SET_INFLIGHT_FD: "memfd",
        R.SET_BACKEND_REQ_FD: "socket",
        R.SET_DEVICE_STATE_FD: "pipe_w",
        R.GPU_SET_SOCKET: "socket",
    }.get(request, draw(st.sampled_from(["eventfd", "eventfd2"])))
    match rule:
        case FdRule.NONE | FdRule.IGNORED:
            return ()
        case FdRule.ONE:
            return (natural,)
        case FdRule.OPTIONAL:
            return (natural,) if draw(st.booleans()) else ()
        case FdRule.PER_REGION:
            n = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
            return (natural,) * min(n, 8)
        case FdRule.VRING_FLAG:
            value = struct.unpack_from("<Q", payload)[0] if len(payload) >= 8 else 0
            return () if value & VRING_NOFD_MASK else (natural,)
    raise AssertionError(rule)


@st.composite
def payload_for(draw: st.DrawFn, request: R) -> bytes:
    """A payload of the right size for ``request``, with plausible or hostile values."""
    rule = FRONTEND_RULES[request]
    match request:
        case R.SET_FEATURES:
            return struct.pack("<Q", draw(FEATURE_CHOICES))
        case R.SET_PROTOCOL_FEATURES:
            return struct.pack("<Q", draw(PROTOCOL_CHOICES))
        case R.SET_MEM_TABLE:
            n = draw(st.one_of(st.just(1), st.integers(0, 9)))
            regions = b"".join(draw(region_bytes()) for _ in range(min(n, 8)))
            return struct.pack("<II", n, 0) + regions
        case R.ADD_MEM_REG | R.REM_MEM_REG:
            return bytes(8) + draw(region_bytes())
        case R.SET_VRING_NUM:
            num = draw(st.one_of(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 32768, 65535]), U32))
            return struct.pack("<II", draw(RING), num)
        case R.SET_VRING_BASE | R.GET_VRING_BASE:
            base = draw(st.one_of(st.just(0), st.integers(0, 16), U32))
            return struct.pack("<II", draw(RING), base)
        case R.SET_VRING_ENABLE | R.SET_VRING_ENDIAN | R.VRING_KICK:
            return struct.pack("<II", draw(RING), draw(st.one_of(st.integers(0, 2), U32)))
        case R.SET_VRING_ADDR:
            return ring_addr_bytes(draw, draw(RING))
        case R.SET_VRING_KICK | R.SET_VRING_CALL | R.SET_VRING_ERR:
            value = draw(st.one_of(st.integers(0, 2), st.integers(0, 2).map(lambda i: i | 0x100)))
            return struct.pack("<Q", draw(st.one_of(st.just(value), U64)))
        case R.GET_CONFIG | R.SET_CONFIG:
            size = draw(st.one_of(st.integers(0, 64), st.integers(0, 0xFF4)))
            offset = draw(st.one_of(st.integers(0, 64), U32))
            flags = draw(st.one_of(st.just(0), U32))
            return struct.pack("<III", offset, size, flags) + bytes(size)
        case R.GET_INFLIGHT_FD | R.SET_INFLIGHT_FD:
            return struct.pack(
                "<QQHHI",
                draw(st.one_of(st.just(PAGE), U64)),
                draw(st.one_of(st.just(0), U64)),
                draw(st.one_of(st.integers(0, 3), U16)),
                draw(st.one_of(st.sampled_from([0, 1, 16, 128, 256, 32768]), U16)),
                0,
            )
        case R.SET_LOG_BASE:
            return struct.pack("<QQ", draw(st.one_of(st.just(PAGE), U64)), draw(U64))
        case R.NET_SET_MTU | R.SET_STATUS | R.SEND_RARP | R.CLOSE_CRYPTO_SESSION:
            return struct.pack("<Q", draw(st.one_of(st.integers(0, 0x10000), U64)))
    sizes = [n for n in range(300) if rule.payload.size_ok(n)][:6]
    n = draw(st.sampled_from(sizes))
    return draw(st.binary(min_size=n, max_size=n))


@st.composite
def messages(draw: st.DrawFn, request: R | None = None, rate: int = 20) -> Wire:
    """One request, well-formed or (``rate`` percent of the time) mutated."""
    if request is None:
        request = draw(st.sampled_from(list(FrontendReq)))
    payload = draw(payload_for(request))
    fds = fds_by_rule(draw, request, payload)
    flags = 1 | draw(st.sampled_from([0, 0, 0x8]))
    number = int(request)
    size = len(payload)
    mutation = "none"
    if draw(st.integers(0, 99)) < rate:
        mutation = draw(st.sampled_from(["flags", "size", "payload", "fds", "request", "kinds"]))
    match mutation:
        case "flags":
            flags = draw(st.one_of(st.sampled_from([0, 2, 3, 1 | 0x4, 1 | 0x10, 0x8]), U32))
        case "size":
            size = draw(st.one_of(st.integers(0, size + 16), st.integers(0, 0x1001), U32))
        case "payload":
            payload = draw(st.one_of(st.binary(max_size=64), st.just(payload[: len(payload) // 2])))
            size = len(payload)
        case "fds":
            fds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), max_size=10)))
        case "request":
            number = draw(st.one_of(st.integers(0, 120), U32))
        case "kinds":
            fds = tuple(draw(st.sampled_from(FD_KINDS)) for _ in fds)
    return Wire(header(number, flags, size) + payload, fds)


PLAUSIBLE = [
    R.SET_OWNER,
    R.GET_FEATURES,
    R.GET_PROTOCOL_FEATURES,
    R.SET_PROTOCOL_FEATURES,
    R.SET_FEATURES,
    R.SET_MEM_TABLE,
    R.SET_VRING_NUM,
    R.SET_VRING_BASE,
    R.SET_VRING_ADDR,
    R.SET_VRING_CALL,
    R.SET_VRING_ERR,
    R.SET_VRING_KICK,
    R.SET_VRING_ENABLE,
]


@st.composite
def ring_setup(draw: st.DrawFn, index: int, rate: int) -> list[Wire]:
    """The messages that start ring ``index`` in the real region (each open to mutation)."""
    base = UVA + RING_AREA + 0x400 * index
    state = struct.pack("<II", index, draw(st.sampled_from([4, 8, 16, 3])))
    addr = struct.pack("<IIQQQQ", index, 0, base, base + 0x200, base + 0x100, 0)
    wires = [
        Wire(header(R.SET_VRING_NUM, 1, 8) + state),
        Wire(header(R.SET_VRING_BASE, 1, 8) + struct.pack("<II", index, 0)),
        Wire(header(R.SET_VRING_ADDR, 1, 40) + addr),
        Wire(header(R.SET_VRING_CALL, 1, 8) + struct.pack("<Q", index), (draw(kinds("eventfd2")),)),
        Wire(header(R.SET_VRING_ERR, 1, 8) + struct.pack("<Q", index), (draw(kinds("eventfd2")),)),
        Wire(header(R.SET_VRING_KICK, 1, 8) + struct.pack("<Q", index), (draw(kinds("eventfd")),)),
        Wire(header(R.SET_VRING_ENABLE, 1, 8) + struct.pack("<II", index, 1)),
        Wire(kick="eventfd"),
    ]
    return [
        draw(messages(w_request(w), 100)) if w.data and draw(st.integers(0, 99)) < rate else w
        for w in wires
    ]


def kinds(natural: str) -> st.SearchStrategy[str]:
    """Mostly the fd a front-end would send, sometimes a file of any other kind."""
    return st.sampled_from([natural] * len(FD_KINDS) + list(FD_KINDS))


def w_request(w: Wire) -> R:
    return R(HEADER.unpack_from(w.data)[0])


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Wire], bytes]:
    """A whole stream: an optional plausible set-up, arbitrary requests, maybe a cut end."""
    wires: list[Wire] = []
    rate = draw(st.sampled_from([0, 0, 3, 10, 40]))  # percent of messages mutated
    if draw(st.integers(0, 4)):  # mostly a set-up first
        for request in PLAUSIBLE[:6]:
            wires.append(draw(messages(request, rate)))
        for index in range(draw(st.sampled_from([1, 1, 2, 0]))):
            wires.extend(draw(ring_setup(index, rate)))
    tail = st.one_of(
        messages(rate=rate),
        st.sampled_from(PLAUSIBLE).flatmap(lambda r: messages(r, rate)),
        st.just(Wire(kick="eventfd")),
    )
    wires.extend(draw(st.lists(tail, max_size=12)))
    if draw(st.booleans()):
        cut = draw(messages())
        wires.append(Wire(cut.data[: draw(st.integers(1, max(1, len(cut.data) - 1)))], cut.fds))
    ring_memory = draw(st.binary(max_size=0x400 * 3))
    return wires, ring_memory


# -- what the process holds ------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


@dataclass
class Snapshot:
    fds: set[int]
    maps: int
    threads: int

    @classmethod
    def take(cls) -> Snapshot:
        return cls(open_fds(), memfd_maps(), threading.active_count())

    def settled(self) -> Snapshot:
        """What is held now; if more than this, again after a full collection (a cycle may
        still hold a mapping or a socket object)."""
        now = Snapshot.take()
        if now.fds - self.fds or now.maps != self.maps or now.threads != self.threads:
            gc.collect()
            now = Snapshot.take()
        return now


@dataclass
class UntypedErrors(logging.Handler):
    """Collects log records that carry an exception other than a :class:`VhostError`."""

    records: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not isinstance(record.exc_info[1], VhostError):
            self.records.append(self.format(record))

    __hash__ = logging.Handler.__hash__


class RingStarts(logging.Handler):
    """Counts the rings the device started (its debug log says so)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.started = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("ring") and "started" in record.getMessage():
            self.started += 1


@contextlib.contextmanager
def watching() -> Iterator[tuple[UntypedErrors, list[str]]]:
    """Untyped exceptions logged anywhere in vhostkit, and exceptions that end a thread."""
    handler = UntypedErrors()
    logger = logging.getLogger("vhostkit")
    logger.addHandler(handler)
    starts = RingStarts()
    device_log = logging.getLogger("vhostkit.user.backend.device")
    old_level = device_log.level
    device_log.setLevel(logging.DEBUG)
    device_log.addHandler(starts)
    died: list[str] = []
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        died.append(f"{args.thread}: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    try:
        yield handler, died
    finally:
        threading.excepthook = old_hook
        logger.removeHandler(handler)
        device_log.removeHandler(starts)
        device_log.setLevel(old_level)
        if currently_in_test_context():
            event("rings started: " + ("some" if starts.started else "none"))


# -- one run ---------------------------------------------------------------------------------


def send(sock: socket.socket, pool: FdPool, wire: Wire) -> bool:
    """Send one wire; False once the server has gone (it may close on a violation)."""
    if wire.kick is not None:
        os.eventfd_write(pool.fds[wire.kick], 1)
        return True
    fds = [pool.fds[k] for k in wire.fds]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sock.sendmsg([wire.data], anc)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def drain_replies(conn: Connection) -> int:
    """Read every reply until the server closes; each must decode as a reply."""
    n = 0
    while True:
        try:
            msg = conn.recv(timeout=HANG)
        except SocketRetry:
            raise AssertionError(f"the server neither replied nor closed in {HANG}s") from None
        except VhostError as exc:
            if type(exc).__name__ in ("Disconnected", "SocketBroken"):
                return n
            raise AssertionError(f"the server sent something that is not a message: {exc}") from exc
        msg.close_fds()
        assert msg.is_reply, f"the server sent a request {msg.request.name}"
        n += 1


def run_stream(device: BackendDevice, wires: list[Wire], ring_memory: bytes) -> None:
    pool = FdPool()
    try:
        os.pwrite(pool.fds["guest"], ring_memory, REGION_OFF + RING_AREA)
        client, server_end = Connection.pair()
        server = BackendReqServer(server_end, device)
        outcome: list[BaseException | None] = []

        def serve() -> None:
            try:
                server.serve()
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=serve, name="fuzz-backend-server")
        thread.start()
        for wire in wires:
            if not send(client.sock, pool, wire):
                break
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        replies = drain_replies(client)
        client.close()
        thread.join(HANG)
        assert not thread.is_alive(), "the server hangs after the front-end left"
        (result,) = outcome
        assert result is None or isinstance(result, VhostError), repr(result)
        event("server ended: " + (type(result).__name__ if result else "disconnect"))
        event(f"replies: {'some' if replies else 'none'}")
        assert pool.guards_intact(), "guest memory outside the region was written"
    finally:
        pool.close()


def check_serves(device: BackendDevice) -> None:
    """A well-behaved front-end on a fresh connection gets answers."""
    client, server_end = Connection.pair()
    server = BackendReqServer(server_end, device)
    thread = threading.Thread(target=server.serve, name="fuzz-backend-good")
    thread.start()
    with Frontend(client, reply_timeout=HANG) as fe:
        fe.set_owner()
        assert fe.get_features() == device.offered_features
    thread.join(HANG)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "disk.img"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    return path


DEVICES: dict[str, Callable[[Path], BackendDevice]] = {
    "blk": lambda image: BlkDevice(image, num_queues=2, max_queue_size=256),
    "echo": lambda image: EchoDevice(),
    "sink": lambda image: SinkDevice(features=int(VF.VERSION_1 | VF.RING_PACKED), num_queues=3),
}


def fuzz_device(kind: str, image: Path, stream: tuple[list[Wire], bytes]) -> None:
    wires, ring_memory = stream
    before = Snapshot.take()
    with watching() as (untyped, died):
        device = DEVICES[kind](image)
        try:
            run_stream(device, wires, ring_memory)
            check_serves(device)
        finally:
            device.close()
    after = before.settled()
    assert not died, died
    assert not untyped.records, "\n".join(untyped.records)
    leaked = {fd: _describe(fd) for fd in after.fds - before.fds}
    assert not leaked, f"fds left open: {leaked}"
    assert after.maps == before.maps, f"memfd mappings: {before.maps} before, {after.maps} after"
    assert after.threads == before.threads, "a thread outlived the connection"


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.mark.parametrize("kind", sorted(DEVICES))
@given(stream=streams())
@FUZZ
def test_backend_server_survives_any_stream(kind: str, image: Path, stream) -> None:  # type: ignore[no-untyped-def]
    fuzz_device(kind, image, stream)


# -- what the fuzzing found ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["kick", "call", "err"])
@pytest.mark.parametrize("kind", ["null", "memfd", "pipe_r", "pipe_w", "socket"])
def test_a_ring_fd_that_is_not_an_eventfd_is_refused(fd_check, which: str, kind: str) -> None:
    """Found by the stream fuzz: a kick fd on /dev/null (or a call/err fd on a pipe) was taken;
    the ring's worker then died of an untyped ``OSError`` reading or writing it."""
    pool = FdPool()
    device = SinkDevice(features=int(VF.VERSION_1), num_queues=1)
    client, server_end = Connection.pair()
    server = BackendReqServer(server_end, device)
    thread = threading.Thread(target=server.serve, name="fuzz-eventfd-check")
    thread.start()
    try:
        with watching() as (untyped, died), Frontend(client, reply_timeout=HANG) as fe:
            fe.set_owner()
            fe.negotiate(int(VF.VERSION_1), int(P.REPLY_ACK))
            region = MemoryRegion(0, REGION_SIZE, UVA, REGION_OFF, pool.fds["guest"])
            fe.set_mem_table([region])
            base = UVA + RING_AREA
            fe.set_vring_num(0, 8)
            fe.set_vring_addr(VringAddr(0, base, base + 0x200, base + 0x100))
            setter = getattr(fe, f"set_vring_{which}")
            with pytest.raises(RequestFailed) as refused:
                setter(0, pool.fds[kind])
            assert refused.value.errno == errno.EINVAL
            ring = device.vrings[0]
            assert getattr(ring, f"{which}_fd") is None and not ring.started
            setter(0, pool.fds["eventfd"])  # an eventfd is taken
            if which != "kick":
                fe.set_vring_kick(0, pool.fds["eventfd2"])
            assert ring.started
            os.eventfd_write(pool.fds["eventfd" if which == "kick" else "eventfd2"], 1)
            fe.get_vring_base(0)
        thread.join(HANG)
        assert not untyped.records and not died, (untyped.records, died)
    finally:
        device.close()
        pool.close()
