"""The sans-I/O codec: every request round-trips, and every kind of bad input is a typed error."""

from __future__ import annotations

import os
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.backend import MemoryRegion, VringAddr
from vhostkit.errors import (
    BadFlags,
    BadVersion,
    IncorrectFds,
    InvalidPayload,
    OversizedMessage,
    PayloadSizeError,
    ProtocolError,
    TooManyRegions,
    UnknownRequest,
    VhostError,
)
from vhostkit.user.codec import Channel, Message, MessageParser, decode, encode, parse_header
from vhostkit.user.message import (
    BACKEND_RULES,
    FRONTEND_RULES,
    HEADER,
    U64,
    VHOST_USER_VERSION,
    VRING_NOFD_MASK,
    BackendReq,
    ConfigPayload,
    DeviceStateParams,
    Empty,
    FdRule,
    FrontendReq,
    HeaderFlags,
    InflightDesc,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LogBaseReply,
    LogDesc,
    MemRegionMsg,
    MemTablePayload,
    MigrationPhase,
    ProtocolFeature,
    RawPayload,
    ReplyRule,
    SharedObject,
    TransferDirection,
    VringAddrPayload,
    VringAreaDesc,
    VringStatePayload,
    classify_log_base_reply,
)

R = FrontendReq
REGION = MemoryRegion(0x0, 0xA0000, 0x7F0000000000, 0)
OBJ = uuid.UUID("12345678-1234-5678-9abc-def012345678")

SAMPLES = {
    Empty: Empty(),
    U64: U64(0x1234_5678_9ABC),
    VringStatePayload: VringStatePayload(1, 256),
    VringAddrPayload: VringAddrPayload(VringAddr(1, 0x1000, 0x3000, 0x2000, 0x4000, 1)),
    MemTablePayload: MemTablePayload(
        (REGION, MemoryRegion(0xC0000, 0x1000, 0x7F00000C0000, 0xC0000))
    ),
    MemRegionMsg: MemRegionMsg(REGION),
    LogDesc: LogDesc(0x2000, 0x100),
    IotlbMsg: IotlbMsg(0x1000, 0x2000, 0x7F00, IotlbPerm.RW, IotlbType.UPDATE),
    ConfigPayload: ConfigPayload(0, 0, bytes(range(16))),
    VringAreaDesc: VringAreaDesc(2, 4096, 0),
    InflightDesc: InflightDesc(4096, 0, 2, 256),
    SharedObject: SharedObject(OBJ),
    DeviceStateParams: DeviceStateParams(TransferDirection.LOAD, MigrationPhase.STOPPED),
    RawPayload: RawPayload(b"\x01\x02\x03"),
}


def _fds_for(rule_fds: FdRule, payload) -> int:  # type: ignore[no-untyped-def]
    match rule_fds:
        case FdRule.ONE | FdRule.OPTIONAL:
            return 1
        case FdRule.PER_REGION:
            return len(payload.regions)
        case FdRule.VRING_FLAG:
            return 1
    return 0


def _pipes(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


ALL_REQUESTS = [(r, FRONTEND_RULES[r]) for r in FrontendReq] + [
    (r, BACKEND_RULES[r]) for r in BackendReq
]


@pytest.mark.parametrize(("request_", "rule"), ALL_REQUESTS, ids=lambda x: getattr(x, "name", ""))
@pytest.mark.parametrize("reply", [False, True], ids=["request", "reply"])
def test_every_request_and_reply_round_trips(fd_check, request_, rule, reply) -> None:
    ptype, frule = (rule.reply_payload, rule.reply_fds) if reply else (rule.payload, rule.fds)
    payload = SAMPLES[ptype]
    fds = _pipes(_fds_for(frule, payload))
    flags = VHOST_USER_VERSION | (HeaderFlags.REPLY if reply else 0)
    msg = Message(request_, payload, tuple(fds), flags)
    data, sent_fds = encode(msg)
    assert sent_fds == tuple(fds)
    channel = Channel.MAIN if isinstance(request_, FrontendReq) else Channel.BACKEND
    header = parse_header(data[:12], channel)
    assert header.request is request_ and header.is_reply == reply
    got = decode(header, data[12:], sent_fds)
    if isinstance(payload, MemTablePayload):
        assert [r.fd for r in got.payload.regions] == fds
        assert [
            (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in got.payload.regions
        ] == [
            (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in payload.regions
        ]
    else:
        assert got.payload == payload
    assert got.fds == tuple(fds)
    got.close_fds()


def test_wire_layouts_match_the_spec() -> None:
    # header: request, flags, size (u32 LE)
    data, _ = encode(Message(R.SET_FEATURES, U64(0x40000000)))
    assert data == struct.pack("<IIIQ", 2, 1, 8, 0x40000000)
    # vring address: index, flags, desc, used, avail, log
    data, _ = encode(Message(R.SET_VRING_ADDR, SAMPLES[VringAddrPayload]))
    assert data[12:] == struct.pack("<IIQQQQ", 1, 1, 0x1000, 0x3000, 0x2000, 0x4000)
    # memory table: num, padding, then (gpa, size, uaddr, offset) per region
    data, _ = encode(Message(R.SET_MEM_TABLE, MemTablePayload((REGION,)), (5,)))
    assert data[12:] == struct.pack("<IIQQQQ", 1, 0, 0, 0xA0000, 0x7F0000000000, 0)
    # single region: 8 bytes of padding first
    data, _ = encode(Message(R.ADD_MEM_REG, MemRegionMsg(REGION), (5,)))
    assert len(data) == 12 + 40 and data[12:20] == bytes(8)
    # inflight: 24 bytes like QEMU's sizeof(VhostUserInflight)
    data, _ = encode(Message(R.SET_INFLIGHT_FD, InflightDesc(1, 2, 3, 4), (5,)))
    assert data[12:] == struct.pack("<QQHH4x", 1, 2, 3, 4)
    # IOTLB: 32 bytes like struct vhost_iotlb_msg
    data, _ = encode(Message(R.IOTLB_MSG, SAMPLES[IotlbMsg]))
    assert len(data) == 12 + 32
    # config: offset, size, flags, data
    data, _ = encode(Message(R.SET_CONFIG, ConfigPayload(4, 1, b"ab")))
    assert data[12:] == struct.pack("<III", 4, 2, 1) + b"ab"


def test_protocol_feature_bits_follow_the_spec() -> None:
    assert ProtocolFeature.MQ == 1 << 0
    assert ProtocolFeature.REPLY_ACK == 1 << 3
    assert ProtocolFeature.BACKEND_REQ == 1 << 5
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert ProtocolFeature.DEVICE_STATE == 1 << 19
    assert len(ProtocolFeature) == 20
    assert max(FrontendReq) == 43 and len(FrontendReq) == 43
    assert len(BackendReq) == 8


def test_always_reply_requests_are_the_spec_list() -> None:
    always = {r for r, rule in FRONTEND_RULES.items() if rule.reply is ReplyRule.ALWAYS}
    for r in (
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.GET_VRING_BASE,
        R.GET_QUEUE_NUM,
        R.GET_CONFIG,
        R.GET_STATUS,
        R.GET_MAX_MEM_SLOTS,
        R.GET_INFLIGHT_FD,
        R.CHECK_DEVICE_STATE,
    ):
        assert r in always
    assert R.SET_FEATURES not in always
    assert FRONTEND_RULES[R.SET_LOG_BASE].reply is ReplyRule.LOG_SHMFD


# --- bad input ------------------------------------------------------------------------------


def header(req: int, flags: int, size: int) -> bytes:
    return HEADER.pack(req, flags, size)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (header(1, 0x0, 0), BadVersion),
        (header(1, 0x2, 0), BadVersion),
        (header(1, 0x11, 0), BadFlags),
        (header(99, 0x1, 0), UnknownRequest),
        (header(0, 0x1, 0), UnknownRequest),
        (header(44, 0x1, 0), UnknownRequest),
        (header(1, 0x1, 0x1001), OversizedMessage),
        (header(1, 0x1, 0xFFFFFFFF), OversizedMessage),
        (b"\x01\x00", PayloadSizeError),
    ],
)
def test_bad_headers_are_typed_errors(raw: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        parse_header(raw)


def test_backend_channel_knows_only_backend_requests() -> None:
    with pytest.raises(UnknownRequest):
        parse_header(header(9, 1, 0), Channel.BACKEND)
    assert parse_header(header(2, 1, 0), Channel.BACKEND).request is BackendReq.CONFIG_CHANGE_MSG


@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (R.SET_FEATURES, b"\x00" * 4),
        (R.SET_FEATURES, b"\x00" * 9),
        (R.SET_VRING_ADDR, b"\x00" * 39),
        (R.GET_FEATURES, b"\x00"),
        (R.SET_MEM_TABLE, b"\x00" * 7),
        (R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + bytes(31)),
        (R.SET_CONFIG, struct.pack("<III", 0, 10, 0) + bytes(9)),
        (R.ADD_MEM_REG, bytes(32)),
        (R.SET_INFLIGHT_FD, bytes(22)),
    ],
)
def test_payload_size_mismatch_is_an_error_and_closes_fds(req, payload, fd_check) -> None:
    fds = _pipes(1)
    h = parse_header(header(req, 1, len(payload)))
    with pytest.raises(PayloadSizeError):
        decode(h, payload, fds)
    # the fd that came with the bad message was closed
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_payload_shorter_than_the_header_says() -> None:
    h = parse_header(header(R.SET_FEATURES, 1, 8))
    with pytest.raises(PayloadSizeError):
        decode(h, b"\x00" * 4)


def test_too_many_regions_is_an_error(fd_check) -> None:
    body = struct.pack("<II", 9, 0) + bytes(32 * 9)
    fds = _pipes(9)
    with pytest.raises(TooManyRegions):
        decode(parse_header(header(R.SET_MEM_TABLE, 1, len(body))), body, fds)
    with pytest.raises(TooManyRegions):
        MemTablePayload(tuple([REGION] * 9))


@pytest.mark.parametrize(
    ("req", "payload", "nfds"),
    [
        (R.SET_OWNER, Empty(), 1),  # takes none
        (R.SET_LOG_FD, Empty(), 0),  # takes one
        (R.SET_LOG_FD, Empty(), 2),
        (R.SET_VRING_KICK, U64(0), 0),  # fd expected: no NOFD flag
        (R.SET_VRING_KICK, U64(VRING_NOFD_MASK), 1),  # NOFD flag but an fd came
        (R.SET_MEM_TABLE, MemTablePayload((REGION, REGION)), 1),  # one fd per region
        (R.GET_FEATURES, Empty(), 9),  # more than any message may carry
    ],
)
def test_wrong_fd_count_is_an_error_and_all_fds_are_closed(fd_check, req, payload, nfds) -> None:
    fds = _pipes(nfds)
    body = payload.pack()
    with pytest.raises(IncorrectFds):
        decode(parse_header(header(req, 1, len(body))), body, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_rem_mem_reg_tolerates_one_fd_and_closes_it(fd_check) -> None:
    (fd,) = _pipes(1)
    body = MemRegionMsg(REGION).pack()
    msg = decode(parse_header(header(R.REM_MEM_REG, 1, len(body))), body, [fd])
    assert msg.fds == ()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_encode_refuses_wrong_fds_and_wrong_payload_type() -> None:
    with pytest.raises(IncorrectFds):
        encode(Message(R.SET_LOG_FD, Empty(), ()))
    with pytest.raises(ProtocolError):
        encode(Message(R.SET_FEATURES, Empty()))
    with pytest.raises(BadFlags):
        encode(Message(R.GET_FEATURES, Empty(), (), 0x21))


@pytest.mark.parametrize(
    ("req", "body"),
    [
        (R.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 0, 0, 7, 2)),  # bad permission
        (R.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 0, 0, 1, 9)),  # bad type
        (R.SET_DEVICE_STATE_FD, struct.pack("<II", 5, 0)),  # bad direction
        (R.SET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(20)),  # config size field > 256
        (R.ADD_MEM_REG, bytes(8) + struct.pack("<QQQQ", 0, 0, 0, 0)),  # zero-size region
        (R.ADD_MEM_REG, bytes(8) + struct.pack("<QQQQ", 2**64 - 4096, 8192, 0, 0)),  # wraps
    ],
    ids=["iotlb-perm", "iotlb-type", "state-direction", "config-size", "zero-region", "wrap"],
)
def test_invalid_values_are_typed_errors(req, body) -> None:
    nfds = 1 if req in (R.SET_DEVICE_STATE_FD, R.ADD_MEM_REG) else 0
    fds = _pipes(nfds)
    with pytest.raises(InvalidPayload):
        decode(parse_header(header(req, 1, len(body))), body, fds)


def test_iotlb_and_inflight_accept_the_packed_sizes_other_peers_send() -> None:
    packed = struct.pack("<QQQBB", 1, 2, 3, 1, 2)  # rust-vmm's 26-byte layout
    msg = decode(parse_header(header(R.IOTLB_MSG, 1, 26)), packed)
    assert msg.payload == IotlbMsg(1, 2, 3, IotlbPerm.RO, IotlbType.UPDATE)
    body = struct.pack("<QQHH", 1, 2, 3, 4)
    (fd,) = _pipes(1)
    msg = decode(parse_header(header(R.SET_INFLIGHT_FD, 1, 20)), body, [fd])
    assert msg.payload == InflightDesc(1, 2, 3, 4)
    msg.close_fds()


def test_an_empty_reply_is_the_failure_convention() -> None:
    h = parse_header(header(R.GET_CONFIG, 0x5, 0))
    msg = decode(h, b"")
    assert msg.is_reply and isinstance(msg.payload, Empty)


@pytest.mark.parametrize(
    ("body", "form"),
    [
        # Quirk "DPDK: empty SET_LOG_BASE reply": DPDK's vhost library answers with no payload
        # (it says QEMU expects none); here that is not the "failed" convention.
        (b"", LogBaseReply.EMPTY),
        # Quirk "libvhost-user: SET_LOG_BASE echoes the size": it answers in the request's own
        # buffer, whose first u64 is the log size.
        (struct.pack("<Q", 0x2000), LogBaseReply.SIZE_ECHOED),
        # vhostkit's and rust-vmm's back-ends: a REPLY_ACK-style status
        (struct.pack("<Q", 0), LogBaseReply.OK),
        (struct.pack("<Q", 22), LogBaseReply.FAILED),
    ],
    ids=["dpdk-empty", "libvhost-user-echo", "status-0", "status-22"],
)
def test_set_log_base_reply_forms(body: bytes, form: LogBaseReply) -> None:
    msg = decode(parse_header(header(R.SET_LOG_BASE, 0x5, len(body))), body)
    assert msg.is_reply and msg.fds == ()
    assert classify_log_base_reply(msg.payload, 0x2000) is form


def test_set_log_base_reply_without_the_request_size() -> None:
    # a tracer that joined late: a non-zero u64 cannot be told from a status
    assert classify_log_base_reply(U64(0x2000), None) is LogBaseReply.FAILED
    assert classify_log_base_reply(Empty(), None) is LogBaseReply.EMPTY


# --- the streaming parser -------------------------------------------------------------------


def test_parser_reassembles_messages_split_anywhere(fd_check) -> None:
    msgs = [
        Message(R.SET_FEATURES, U64(7)),
        Message(R.SET_VRING_ADDR, SAMPLES[VringAddrPayload]),
        Message(R.SET_CONFIG, ConfigPayload(0, 0, b"xyz")),
    ]
    stream = b"".join(encode(m)[0] for m in msgs)
    for step in (1, 5, 12, 13, 64):
        parser = MessageParser()
        out = []
        for i in range(0, len(stream), step):
            out += parser.feed(stream[i : i + step])
        assert [m.payload for m in out] == [m.payload for m in msgs]
        assert parser.idle


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_raises_anything_but_protocol_errors(garbage: bytes) -> None:
    parser = MessageParser()
    try:
        parser.feed(garbage)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and stays in the error state
            parser.feed(b"")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_decode_of_any_header_and_payload_is_typed(req: int, flags: int, body: bytes) -> None:
    try:
        h = parse_header(header(req, flags, len(body)))
        decode(h, body)
    except VhostError:
        pass


def test_fds_in_the_middle_of_a_message_are_rejected_and_closed(fd_check) -> None:
    data, _ = encode(Message(R.SET_FEATURES, U64(7)))
    parser = MessageParser()
    parser.feed(data[:5])
    fds = _pipes(1)
    with pytest.raises(IncorrectFds):
        parser.feed(data[5:], fds)
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_parser_close_drops_partial_message_fds(fd_check) -> None:
    fds = _pipes(1)
    data, _ = encode(Message(R.SET_LOG_FD, Empty(), (fds[0],)))
    parser = MessageParser()
    assert parser.feed(data[:3], fds) == []
    parser.close()
    with pytest.raises(OSError):
        os.fstat(fds[0])
