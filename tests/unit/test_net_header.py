"""virtio-net header: sizes, pack/unpack round trip, mergeable receive buffers; feature names."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidParam
from vhostkit.virtio.features import (
    DeviceStatus,
    VirtioFeature,
    VirtioNetFeature,
    feature_bits,
    feature_names,
)
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.net import (
    GSO_ECN,
    GsoType,
    NetHdrFlag,
    VirtioNetHdr,
    fill_mergeable,
    header_size,
)
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue


def test_header_size() -> None:
    assert header_size(0) == 10
    assert header_size(int(VirtioFeature.VERSION_1)) == 12
    assert header_size(int(VirtioNetFeature.MRG_RXBUF)) == 12
    assert header_size(int(VirtioFeature.VERSION_1 | VirtioNetFeature.HASH_REPORT)) == 20


def test_wire_layout() -> None:
    hdr = VirtioNetHdr(NetHdrFlag.NEEDS_CSUM, GsoType.TCPV6, True, 54, 1448, 34, 16, num_buffers=3)
    raw = hdr.pack(12)
    assert raw == struct.pack("<BBHHHHH", 1, 4 | 0x80, 54, 1448, 34, 16, 3)
    assert hdr.pack(10) == raw[:10]
    assert hdr.pack(20) == raw + bytes(8)
    assert VirtioNetHdr.unpack(raw) == hdr
    assert VirtioNetHdr.unpack(raw[:10], 10).num_buffers == 0


@settings(max_examples=100, deadline=None)
@given(
    flags=st.sampled_from([0, 1, 2, 3, 4]),
    gso=st.sampled_from(list(GsoType)),
    ecn=st.booleans(),
    fields=st.lists(st.integers(0, 0xFFFF), min_size=5, max_size=5),
    size=st.sampled_from([10, 12, 20]),
)
def test_round_trip(flags: int, gso: GsoType, ecn: bool, fields: list[int], size: int) -> None:
    hdr = VirtioNetHdr(NetHdrFlag(flags), gso, ecn, *fields[:4], fields[4] if size > 10 else 0)
    assert VirtioNetHdr.unpack(hdr.pack(size), size) == hdr


def test_invalid_headers() -> None:
    with pytest.raises(InvalidParam):
        VirtioNetHdr.unpack(bytes([0, 2]) + bytes(10))  # gso_type 2 does not exist
    with pytest.raises(InvalidParam):
        VirtioNetHdr.unpack(bytes(11), 12)
    with pytest.raises(InvalidParam):
        VirtioNetHdr(hdr_len=0x10000)
    with pytest.raises(InvalidParam):
        VirtioNetHdr().pack(11)
    assert GSO_ECN == 0x80


def test_mergeable_rx_buffers() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = SplitDriverQueue(mem, 8, 0)
        dev = SplitDeviceQueue.from_gpa(mem, 8, *drv.ring_gpas)
        for i in range(4):
            drv.add([], [(0x4000 + i * 0x100, 64)], token=i)
        drv.publish()
        chains = dev.pop_batch().chains()
        frame = bytes(range(150))
        written = fill_mergeable(chains, frame, VirtioNetHdr(NetHdrFlag.DATA_VALID))
        assert written == [64, 64, 34]  # 12 + 150 bytes over three 64-byte buffers
        dev.complete([c.id for c in chains[: len(written)]], written)
        used = drv.reap()
        assert [t for t, _ in used] == [0, 1, 2]
        data = b"".join(mem.read(0x4000 + t * 0x100, n) for t, n in used)
        hdr = VirtioNetHdr.unpack(data)
        assert hdr.num_buffers == 3 and hdr.flags == NetHdrFlag.DATA_VALID
        assert data[12:] == frame
        assert VirtioNetHdr.from_views(chains[0].writable) == hdr
        with pytest.raises(InvalidParam):
            fill_mergeable(chains[3:], bytes(100), VirtioNetHdr())
        del chains


def test_feature_helpers() -> None:
    assert VirtioNetFeature.MRG_RXBUF == 1 << 15
    assert VirtioFeature.RING_PACKED == 1 << 34
    assert VirtioFeature.PROTOCOL_FEATURES == 1 << 30
    assert DeviceStatus.FEATURES_OK == 8
    assert feature_bits(0b1010) == [1, 3]
    assert feature_names(0x33D008000) == [
        "MRG_RXBUF",
        "NOTIFY_ON_EMPTY",
        "LOG_ALL",
        "ANY_LAYOUT",
        "RING_INDIRECT_DESC",
        "RING_EVENT_IDX",
        "VERSION_1",
        "ACCESS_PLATFORM",
    ]
    assert feature_names(1 << 4 | 1 << 41) == ["bit4", "bit41"]
    assert feature_names(1 << 15, device=None) == ["bit15"]
