"""The tracer's sans-I/O half: framing a stream, decoding crafted messages into records, text and
JSON rendering (every request type, malformed headers and payloads, fd counts, reply pairing)."""

from __future__ import annotations

import struct
import uuid

import pytest

from vhostkit.errors import InvalidParam
from vhostkit.trace.decode import (
    FRAME_LIMIT,
    Direction,
    Framer,
    FramingError,
    RecordKind,
    TraceDecoder,
    human_size,
)
from vhostkit.trace.format import format_text, from_json, to_json
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.codec import Channel, Message, rule_for
from vhostkit.user.message import (
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
    LogDesc,
    MemRegionMsg,
    MemTablePayload,
    MigrationPhase,
    Payload,
    ProtocolFeature,
    RawPayload,
    SharedObject,
    TransferDirection,
    VringAddrPayload,
    VringAreaDesc,
    VringStatePayload,
)
from vhostkit.virtio.blk import BlkFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature

R = FrontendReq
B = BackendReq
TO_BE, TO_FE = Direction.TO_BACKEND, Direction.TO_FRONTEND
REGION = MemoryRegion(0x0, 0xA0000, 0x7F0000000000, 0)
REGION2 = MemoryRegion(0xC0000, 0xFF40000, 0x7F00000C0000, 0xC0000)

SAMPLES: dict[type[Payload], Payload] = {
    Empty: Empty(),
    U64: U64(3),
    VringStatePayload: VringStatePayload(1, 256),
    VringAddrPayload: VringAddrPayload(VringAddr(1, desc=0x1000, used=0x3000, avail=0x2000)),
    MemTablePayload: MemTablePayload((REGION, REGION2)),
    MemRegionMsg: MemRegionMsg(REGION),
    LogDesc: LogDesc(0x4000, 0),
    IotlbMsg: IotlbMsg(0x1000, 0x2000, 0x7F00, IotlbPerm.RW, IotlbType.UPDATE),
    ConfigPayload: ConfigPayload(0, 0, bytes(range(12))),
    InflightDesc: InflightDesc(0x2000, 0, 2, 128),
    VringAreaDesc: VringAreaDesc(1, 0x1000, 0),
    SharedObject: SharedObject(uuid.UUID(int=0x1234)),
    DeviceStateParams: DeviceStateParams(TransferDirection.SAVE, MigrationPhase.STOPPED),
    RawPayload: RawPayload(b"\x01\x02\x03"),
}


def nfds_for(rule: FdRule, payload: Payload) -> int:
    if rule is FdRule.PER_REGION:
        assert isinstance(payload, MemTablePayload)
        return len(payload.regions)
    if rule is FdRule.VRING_FLAG:
        return 1
    return 1 if rule is FdRule.ONE else 0


def wire(msg: Message) -> bytes:
    """The bytes of ``msg`` (packed directly: the fds travel apart, as counts)."""
    body = msg.payload.pack()
    return HEADER.pack(int(msg.request), msg.flags, len(body)) + body


def header(code: int, flags: int, size: int) -> bytes:
    return HEADER.pack(code, flags, size)


def check_renders(rec) -> str:
    text = format_text(rec)
    assert rec.request in text
    line = to_json(rec)
    assert "\n" not in line
    assert from_json(line) == rec
    return text


# --- every request type ---------------------------------------------------------------------


@pytest.mark.parametrize("channel", [Channel.MAIN, Channel.BACKEND], ids=["main", "backend"])
def test_every_request_and_reply_decodes_and_renders(channel):
    requests = list(FrontendReq) if channel is Channel.MAIN else list(BackendReq)
    sender = TO_BE if channel is Channel.MAIN else TO_FE
    dec = TraceDecoder()
    for req in requests:
        rule = rule_for(req)
        payload = SAMPLES[rule.payload]
        nfds = nfds_for(rule.fds, payload)
        rec = dec.decode(channel, sender, wire(Message(req, payload)), nfds, 1.0)
        assert rec.kind is RecordKind.MESSAGE
        assert rec.malformed is None, (req, rec.malformed)
        assert rec.request == req.name and rec.code == int(req)
        assert rec.fds == nfds and rec.direction is sender and rec.channel is channel
        assert not rec.is_reply
        check_renders(rec)
        reply_payload = SAMPLES[rule.reply_payload]
        reply_fds = 1 if rule.reply_fds is FdRule.OPTIONAL else 0
        reply = Message(req, payload).reply(reply_payload)
        rec = dec.decode(channel, sender.opposite, wire(reply), reply_fds, 1.5)
        assert rec.malformed is None or "no outstanding request" in rec.malformed, rec
        assert rec.is_reply and "[REPLY]" in check_renders(rec)


def test_bring_up_lines_name_features_regions_and_rings():
    dec = TraceDecoder()
    features = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MAC | VirtioFeature.RING_PACKED)
    flow = [
        (TO_BE, Message(R.GET_FEATURES), 0),
        (TO_FE, Message(R.GET_FEATURES).reply(U64(features)), 0),
        (TO_BE, Message(R.SET_FEATURES, U64(features)), 0),
        (TO_BE, Message(R.SET_MEM_TABLE, MemTablePayload((REGION, REGION2))), 2),
        (TO_BE, Message(R.SET_VRING_NUM, VringStatePayload(0, 256)), 0),
        (TO_BE, Message(R.SET_VRING_BASE, VringStatePayload(0, 0x8005)), 0),
        (TO_BE, Message(R.SET_VRING_ADDR, SAMPLES[VringAddrPayload]), 0),
        (TO_BE, Message(R.SET_VRING_KICK, U64(1)), 1),
        (TO_BE, Message(R.SET_VRING_CALL, U64(1 | VRING_NOFD_MASK)), 0),
        (TO_BE, Message(R.SET_STATUS, U64(0xF)), 0),
    ]
    texts = []
    for direction, msg, nfds in flow:
        rec = dec.decode(Channel.MAIN, direction, wire(msg), nfds, 0.5)
        assert rec.malformed is None, rec
        texts.append(check_renders(rec))
    assert "features 0x500000020 <MAC|VERSION_1|RING_PACKED>" in texts[1]
    assert "(reply to #1," in texts[1]
    # the SET_MEM_TABLE line: both regions with their sizes, and the fd count
    assert "fds=2 2 regions (255.9 MiB): [0] gpa 0x0-0xa0000 (640 KiB)" in texts[3]
    assert "[1] gpa 0xc0000-0x10000000 (255.2 MiB) uva 0x7f00000c0000 off 0xc0000" in texts[3]
    assert texts[4].endswith("SET_VRING_NUM ring 0 num 256")
    assert "base 0x8005 (packed: idx 5 wrap 1)" in texts[5]  # RING_PACKED was acked
    assert "ring 1 desc 0x1000 avail 0x2000 used 0x3000" in texts[6]
    assert texts[7].endswith("SET_VRING_KICK fds=1 ring 1")
    assert texts[8].endswith("ring 1 no fd (polling)")
    assert "status 0xf <ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK>" in texts[9]


def test_device_table_names_device_bits():
    features = int(VirtioFeature.VERSION_1 | BlkFeature.FLUSH)
    msg = wire(Message(R.SET_FEATURES, U64(features)))
    blk = TraceDecoder(device=BlkFeature).decode(Channel.MAIN, TO_BE, msg, 0, 0.0)
    assert blk.field("features_names") == ("FLUSH", "VERSION_1")
    bare = TraceDecoder(device=None).decode(Channel.MAIN, TO_BE, msg, 0, 0.0)
    assert bare.field("features_names") == ("bit9", "VERSION_1")


def test_replies_pair_with_requests_in_order():
    dec = TraceDecoder()
    a = dec.decode(
        Channel.MAIN, TO_BE, wire(Message(R.GET_VRING_BASE, VringStatePayload(0, 0))), 0, 1.0
    )
    b = dec.decode(
        Channel.MAIN, TO_BE, wire(Message(R.GET_VRING_BASE, VringStatePayload(1, 0))), 0, 2.0
    )
    reply = Message(R.GET_VRING_BASE).reply(VringStatePayload(0, 7))
    ra = dec.decode(Channel.MAIN, TO_FE, wire(reply), 0, 2.5)
    rb = dec.decode(Channel.MAIN, TO_FE, wire(reply), 0, 4.0)
    assert (ra.reply_to, rb.reply_to) == (a.seq, b.seq)
    assert ra.rtt == pytest.approx(1.5) and rb.rtt == pytest.approx(2.0)
    assert "ring 0 base 7" in format_text(ra) and "(reply to #1, 1500.000 ms)" in format_text(ra)
    # a request without NEED_REPLY that never replies is not waited for; with it, it is
    dec.decode(Channel.MAIN, TO_BE, wire(Message(R.SET_OWNER)), 0, 5.0)
    ack = Message(R.SET_OWNER, flags=VHOST_USER_VERSION | HeaderFlags.NEED_REPLY)
    req = dec.decode(Channel.MAIN, TO_BE, wire(ack), 0, 5.0)
    assert "[NEED_REPLY]" in format_text(req)
    got = dec.decode(Channel.MAIN, TO_FE, wire(ack.reply(U64(22))), 0, 5.1)
    assert got.reply_to == req.seq and got.summary == "failed (22)" and got.malformed is None
    stray = dec.decode(Channel.MAIN, TO_FE, wire(ack.reply(U64(0))), 0, 6.0)
    assert stray.reply_to is None and "a reply to no outstanding request" in stray.malformed
    # the back-end channel pairs separately: the back-end asks, the front-end answers
    cc = Message(B.CONFIG_CHANGE_MSG, flags=VHOST_USER_VERSION | HeaderFlags.NEED_REPLY)
    q = dec.decode(Channel.BACKEND, TO_FE, wire(cc), 0, 7.0)
    r = dec.decode(Channel.BACKEND, TO_BE, wire(cc.reply(U64(0))), 0, 7.25)
    assert q.request == r.request == "CONFIG_CHANGE_MSG"
    assert r.reply_to == q.seq and r.rtt == pytest.approx(0.25) and r.summary == "ok"
    assert "bchan B>F CONFIG_CHANGE_MSG [NEED_REPLY]" in format_text(q)


def test_empty_reply_is_the_failure_answer():
    dec = TraceDecoder()
    dec.decode(Channel.MAIN, TO_BE, wire(Message(R.GET_CONFIG, SAMPLES[ConfigPayload])), 0, 0)
    rec = dec.decode(Channel.MAIN, TO_FE, wire(Message(R.GET_CONFIG).reply(Empty())), 0, 0)
    assert rec.malformed is None and "empty reply (the request failed)" in format_text(rec)


@pytest.mark.parametrize(
    ("reply", "summary"),
    [
        # Quirk "DPDK: empty SET_LOG_BASE reply": not the failure convention here
        (Empty(), "log mapped (empty reply, as DPDK sends it)"),
        # Quirk "libvhost-user: SET_LOG_BASE echoes the size"
        (U64(0x4000), "log mapped (size 16384 echoed, as libvhost-user does)"),
        (U64(0), "ok"),
        (U64(5), "failed (5)"),
    ],
    ids=["dpdk-empty", "libvhost-user-echo", "status-0", "status-5"],
)
def test_set_log_base_reply_forms_are_named(reply, summary):
    dec = TraceDecoder()
    dec.decode(
        Channel.MAIN,
        TO_BE,
        wire(Message(R.SET_PROTOCOL_FEATURES, U64(ProtocolFeature.LOG_SHMFD))),
        0,
        0,
    )
    req = dec.decode(Channel.MAIN, TO_BE, wire(Message(R.SET_LOG_BASE, LogDesc(0x4000, 0))), 1, 1)
    rec = dec.decode(Channel.MAIN, TO_FE, wire(Message(R.SET_LOG_BASE).reply(reply)), 0, 1.5)
    assert rec.malformed is None and rec.reply_to == req.seq
    assert rec.summary == summary
    check_renders(rec)


# --- malformed ------------------------------------------------------------------------------

MALFORMED = {
    "bad version": (header(R.GET_FEATURES, 0x2, 0), 0, "protocol version 2"),
    "reserved flags": (header(R.GET_FEATURES, 0x11, 0), 0, "reserved header flag bits"),
    "unknown request": (header(99, 1, 2) + b"ab", 0, "unknown main-channel request 99"),
    "oversized": (header(R.SET_FEATURES, 1, 5000) + bytes(5000), 0, "exceeds 4096"),
    "short payload": (header(R.SET_FEATURES, 1, 4) + bytes(4), 0, "not a valid U64"),
    "missing fd": (header(R.SET_VRING_KICK, 1, 8) + bytes(8), 0, "takes 1 fds, got 0"),
    "extra fds": (header(R.SET_FEATURES, 1, 8) + bytes(8), 3, "takes 0 fds, got 3"),
    "too many regions": (
        header(R.SET_MEM_TABLE, 1, 8 + 9 * 32) + struct.pack("<II", 9, 0) + bytes(9 * 32),
        9,
        "9 regions",
    ),
    "zero-size region": (
        header(R.ADD_MEM_REG, 1, 40) + bytes(40),
        1,
        "memory_size=0 must be positive",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_messages_are_shown_as_such(case):
    data, nfds, why = MALFORMED[case]
    rec = TraceDecoder().decode(Channel.MAIN, TO_BE, data, nfds, 0.25)
    assert rec.malformed is not None and why in rec.malformed, rec.malformed
    assert rec.fds == nfds and rec.size == struct.unpack_from("<I", data, 8)[0]
    text = check_renders(rec)
    assert f"!! MALFORMED: {rec.malformed}" in text
    if nfds:
        assert f"fds={nfds}" in text


def test_wrong_side_and_late_fds_are_flagged():
    dec = TraceDecoder()
    rec = dec.decode(Channel.MAIN, TO_FE, wire(Message(R.GET_FEATURES)), 0, 0)
    assert "a request sent by the side that answers" in rec.malformed
    rec = dec.decode(Channel.MAIN, TO_BE, wire(Message(R.SET_OWNER).reply(U64(0))), 0, 0)
    assert "a reply sent by the side that makes the requests" in rec.malformed
    rec = dec.decode(Channel.MAIN, TO_BE, wire(Message(R.SET_LOG_FD)), 1, 0, late_fds=True)
    assert rec.malformed == "file descriptors arrived after the message's first byte"


def test_truncated_and_headerless_records():
    dec = TraceDecoder()
    data = wire(Message(R.SET_FEATURES, U64(1)))
    rec = dec.truncated(Channel.MAIN, TO_BE, data[:16], 0, 1.0)
    assert rec.request == "SET_FEATURES" and rec.size == 8
    assert rec.malformed == "peer closed mid-message: 4 of 8 payload bytes"
    rec = dec.truncated(Channel.MAIN, TO_BE, data[:5], 0, 1.0)
    assert rec.request == "?" and rec.malformed == "peer closed mid-message: 5 of 12 header bytes"
    check_renders(rec)
    rec = dec.decode(Channel.MAIN, TO_BE, data[:3], 0, 1.0)
    assert rec.malformed == "3-byte message, no header"


# --- the framer -----------------------------------------------------------------------------


def test_framer_reassembles_byte_by_byte_and_keeps_fds_with_their_message():
    first = wire(Message(R.SET_VRING_KICK, U64(0)))
    second = wire(Message(R.GET_FEATURES))
    framer = Framer()
    out = []
    stream = first + second
    for i in range(len(stream)):
        assert framer.bytes_needed >= 1
        fds = (41,) if i == 0 else ()
        out += framer.feed(stream[i : i + 1], fds)
    assert [m.data for m in out] == [first, second]
    assert out[0].fds == (41,) and out[1].fds == () and not out[0].late_fds
    assert framer.idle
    # fds that come after a message's first byte stay with it, flagged
    framer.feed(first[:3])
    (late,) = framer.feed(first[3:], (7, 8))
    assert late.fds == (7, 8) and late.late_fds


def test_framer_reads_exactly_up_to_each_boundary():
    framer = Framer()
    assert framer.bytes_needed == 12
    framer.feed(header(R.SET_FEATURES, 1, 8))
    assert framer.bytes_needed == 8 and framer.expected_size == 20
    framer.feed(bytes(3), (5,))
    partial = framer.take_partial()
    assert partial.data == header(R.SET_FEATURES, 1, 8) + bytes(3) and partial.fds == (5,)
    assert framer.idle and framer.bytes_needed == 12


def test_framer_gives_up_on_an_impossible_size_and_stays_failed():
    framer = Framer()
    framer.feed(b"", (9,))
    with pytest.raises(FramingError, match="out of step"):
        framer.feed(header(R.GET_FEATURES, 1, FRAME_LIMIT + 1))
    with pytest.raises(FramingError):
        framer.feed(b"x")
    assert framer.take_partial().fds == (9,)  # handed back for the caller to close
    # just over the codec's bound is still framed (and shown as malformed)
    (msg,) = Framer().feed(header(R.GET_FEATURES, 1, 5000) + bytes(5000))
    assert len(msg.data) == 5012


# --- formats --------------------------------------------------------------------------------


def test_event_records_and_bad_json():
    rec = TraceDecoder(session=3).event(0.5, "session 3: front-end connected")
    assert "--" in format_text(rec) and "session 3: front-end connected" in format_text(rec)
    assert from_json(to_json(rec)) == rec
    for bad in ("", "[1]", '{"kind": "message"}', '{"kind": "nope", "session": 1}'):
        with pytest.raises(InvalidParam, match="not a trace record"):
            from_json(bad)


def test_human_size():
    assert human_size(512) == "512 B"
    assert human_size(640 << 10) == "640 KiB"
    assert human_size(3 << 30) == "3 GiB"
    assert human_size((1 << 20) + (1 << 19)) == "1.5 MiB"
