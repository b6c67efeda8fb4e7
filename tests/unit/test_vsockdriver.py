"""The sans-I/O virtio-vsock endpoint (vhostkit.guest.vsock.VsockEndpoint).

The kernel end-to-end tests are in ``tests/kernel/test_kernel_vsockdriver.py``; here every
protocol rule is checked packet by packet: the handshake, RST for strangers, echo, credit in
both directions, CREDIT_REQUEST, SHUTDOWN and RST.
"""

from __future__ import annotations

import pytest

from vhostkit.errors import InvalidParam
from vhostkit.guest.vsock import (
    HDR_SIZE,
    Connected,
    ConnectionClosed,
    DataReceived,
    PeerShutdown,
    ShutdownFlag,
    VsockEndpoint,
    VsockHdr,
    VsockOp,
    VsockPacket,
    VsockType,
)

GUEST, HOST = 3, 2
PORT, HOST_PORT = 1234, 40000
KEY = (HOST, HOST_PORT, PORT)


def from_host(
    op: VsockOp,
    payload: bytes = b"",
    *,
    flags: int = 0,
    buf_alloc: int = 1 << 20,
    fwd_cnt: int = 0,
    dst_port: int = PORT,
    type_: int = VsockType.STREAM,
    dst_cid: int = GUEST,
) -> VsockPacket:
    hdr = VsockHdr(
        HOST, dst_cid, HOST_PORT, dst_port, len(payload), type_, op, flags, buf_alloc, fwd_cnt
    )
    return VsockPacket(hdr, payload)


def connected(echo: bool = True, buf_alloc: int = 8192, peer_buf: int = 1 << 20) -> VsockEndpoint:
    ep = VsockEndpoint(GUEST, buf_alloc=buf_alloc, max_payload=1000)
    ep.listen(PORT, echo=echo)
    assert ep.receive(from_host(VsockOp.REQUEST, buf_alloc=peer_buf)) == [Connected(KEY)]
    (resp,) = ep.outgoing(10)
    assert resp.hdr.op == VsockOp.RESPONSE
    return ep


def test_header_layout() -> None:
    hdr = VsockHdr(1, 2, 3, 4, 5, 1, 5, 6, 7, 8)
    raw = hdr.pack()
    assert HDR_SIZE == len(raw) == 44
    assert raw[:8] == (1).to_bytes(8, "little") and raw[28:30] == (1).to_bytes(2, "little")
    assert raw[30:32] == (5).to_bytes(2, "little") and raw[40:44] == (8).to_bytes(4, "little")
    assert VsockHdr.unpack(raw) == hdr
    with pytest.raises(InvalidParam):
        VsockHdr.unpack(raw[:43])


def test_request_is_answered_with_response_advertising_buf_alloc() -> None:
    ep = VsockEndpoint(GUEST, buf_alloc=12345)
    ep.listen(PORT)
    assert ep.receive(from_host(VsockOp.REQUEST)) == [Connected(KEY)]
    (resp,) = ep.outgoing(10)
    h = resp.hdr
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (GUEST, HOST, PORT, HOST_PORT)
    assert (h.op, h.type, h.len, h.buf_alloc, h.fwd_cnt) == (VsockOp.RESPONSE, 1, 0, 12345, 0)
    assert ep.outgoing(10) == []


@pytest.mark.parametrize("op", [VsockOp.REQUEST, VsockOp.RW, VsockOp.SHUTDOWN])
def test_strangers_get_rst(op: VsockOp) -> None:
    ep = VsockEndpoint(GUEST)
    ep.listen(PORT)
    assert ep.receive(from_host(op, b"x" if op == VsockOp.RW else b"", dst_port=999)) == []
    (rst,) = ep.outgoing(10)
    h = rst.hdr
    assert h.op == VsockOp.RST
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (GUEST, HOST, 999, HOST_PORT)
    # an RST is never answered, a packet for another CID is dropped
    assert ep.receive(from_host(VsockOp.RST, dst_port=999)) == []
    assert ep.receive(from_host(VsockOp.REQUEST, dst_cid=4)) == []
    assert ep.outgoing(10) == []


def test_non_stream_request_is_reset() -> None:
    ep = VsockEndpoint(GUEST)
    ep.listen(PORT)
    assert ep.receive(from_host(VsockOp.REQUEST, type_=VsockType.SEQPACKET)) == []
    (rst,) = ep.outgoing(10)
    assert rst.hdr.op == VsockOp.RST and not ep.connections


def test_echo_in_chunks_with_fwd_cnt() -> None:
    ep = connected()
    data = bytes(range(256)) * 10
    assert ep.receive(from_host(VsockOp.RW, data)) == [DataReceived(KEY, data)]
    out = ep.outgoing(100)
    assert [p.hdr.op for p in out] == [VsockOp.RW] * 3
    assert [p.hdr.len for p in out] == [1000, 1000, 560]
    assert b"".join(p.payload for p in out) == data
    assert [p.hdr.fwd_cnt for p in out] == [1000, 2000, 2560]
    conn = ep.connections[KEY]
    assert conn.tx_cnt == conn.fwd_cnt == conn.rx_cnt == 2560


def test_peer_credit_is_honoured_and_asked_for() -> None:
    ep = connected(peer_buf=1500)
    ep.receive(from_host(VsockOp.RW, b"a" * 4000, buf_alloc=1500))
    out = ep.outgoing(100)
    assert [(p.hdr.op, p.hdr.len) for p in out] == [
        (VsockOp.RW, 1000),
        (VsockOp.RW, 500),
        (VsockOp.CREDIT_REQUEST, 0),
    ]
    assert ep.outgoing(100) == []  # asked once; wait for an update
    ep.receive(from_host(VsockOp.CREDIT_UPDATE, buf_alloc=1500, fwd_cnt=1500))
    out = ep.outgoing(100)
    assert [(p.hdr.op, p.hdr.len) for p in out] == [
        (VsockOp.RW, 1000),
        (VsockOp.RW, 500),
        (VsockOp.CREDIT_REQUEST, 0),
    ]
    # credit also comes with any packet, e.g. the peer's own data
    ep.receive(from_host(VsockOp.RW, b"b", buf_alloc=1500, fwd_cnt=3000))
    out = ep.outgoing(100)
    assert [p.hdr.len for p in out] == [1000, 1]
    assert ep.connections[KEY].tx_cnt == 4001


def test_outgoing_respects_the_limit() -> None:
    ep = connected()
    ep.receive(from_host(VsockOp.RW, b"z" * 3500))
    assert len(ep.outgoing(2)) == 2
    assert ep.has_output()
    assert [p.hdr.len for p in ep.outgoing(2)] == [1000, 500]
    assert not ep.has_output()


def test_credit_update_when_the_application_reads() -> None:
    ep = connected(echo=False, buf_alloc=8192)
    ep.receive(from_host(VsockOp.RW, b"q" * 3000))
    assert ep.outgoing(10) == []  # nothing consumed yet
    assert ep.recv(KEY, 1000) == b"q" * 1000
    assert ep.outgoing(10) == []  # 1000 unreported, data still buffered: no need yet
    assert ep.recv(KEY) == b"q" * 2000
    (upd,) = ep.outgoing(10)
    assert upd.hdr.op == VsockOp.CREDIT_UPDATE
    assert (upd.hdr.buf_alloc, upd.hdr.fwd_cnt) == (8192, 3000)


def test_credit_request_is_answered() -> None:
    ep = connected(echo=False)
    ep.receive(from_host(VsockOp.RW, b"r" * 10))
    ep.recv(KEY)
    ep.outgoing(10)
    assert ep.receive(from_host(VsockOp.CREDIT_REQUEST)) == []
    (upd,) = ep.outgoing(10)
    assert upd.hdr.op == VsockOp.CREDIT_UPDATE and upd.hdr.fwd_cnt == 10


def test_shutdown_send_in_echo_mode_drains_then_shuts_down() -> None:
    ep = connected()
    ep.receive(from_host(VsockOp.RW, b"e" * 1500))
    events = ep.receive(from_host(VsockOp.SHUTDOWN, flags=ShutdownFlag.SEND))
    assert events == [PeerShutdown(KEY, ShutdownFlag.SEND)]
    out = ep.outgoing(100)
    assert [(p.hdr.op, p.hdr.len, p.hdr.flags) for p in out] == [
        (VsockOp.RW, 1000, 0),
        (VsockOp.RW, 500, 0),
        (VsockOp.SHUTDOWN, 0, int(ShutdownFlag.BOTH)),
    ]
    assert ep.outgoing(100) == []
    assert ep.receive(from_host(VsockOp.RST)) == [ConnectionClosed(KEY, reset=True)]
    assert not ep.connections


def test_shutdown_both_is_answered_with_rst() -> None:
    ep = connected()
    events = ep.receive(from_host(VsockOp.SHUTDOWN, flags=ShutdownFlag.BOTH))
    assert events == [PeerShutdown(KEY, ShutdownFlag.BOTH), ConnectionClosed(KEY, reset=True)]
    (rst,) = ep.outgoing(10)
    assert rst.hdr.op == VsockOp.RST and rst.hdr.dst_port == HOST_PORT
    assert not ep.connections


def test_rst_closes() -> None:
    ep = connected()
    assert ep.receive(from_host(VsockOp.RST)) == [ConnectionClosed(KEY, reset=True)]
    assert ep.outgoing(10) == [] and not ep.connections


def test_local_shutdown_and_send() -> None:
    ep = connected(echo=False)
    ep.send(KEY, b"hello")
    ep.shutdown(KEY, ShutdownFlag.SEND)
    out = ep.outgoing(10)
    assert [(p.hdr.op, p.payload, p.hdr.flags) for p in out] == [
        (VsockOp.RW, b"hello", 0),
        (VsockOp.SHUTDOWN, b"", int(ShutdownFlag.SEND)),
    ]
    with pytest.raises(Exception, match="shut down"):
        ep.send(KEY, b"more")
