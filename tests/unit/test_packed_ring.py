"""Packed virtqueue: driver role against device role, property-tested, plus base encoding."""

from __future__ import annotations

import pytest
from helpers.ring_harness import run
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidParam
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import (
    PackedDeviceQueue,
    PackedDriverQueue,
    decode_base,
    encode_base,
    packed_ring_size,
)

FEATURE_SETS = [
    int(F.RING_PACKED),
    int(F.RING_PACKED | F.RING_EVENT_IDX),
    int(F.RING_PACKED | F.RING_INDIRECT_DESC),
    int(F.RING_PACKED | F.RING_EVENT_IDX | F.RING_INDIRECT_DESC | F.VERSION_1),
]


@pytest.mark.parametrize("features", FEATURE_SETS, ids=["plain", "event", "indirect", "both"])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), num=st.sampled_from([1, 3, 4, 7]))
def test_interleavings_deliver_once(features: int, num: int, data: st.DataObject) -> None:
    run(True, num, features, data, steps=60)


def test_base_encoding() -> None:
    assert encode_base(0, 1) == 0x80008000
    assert decode_base(0x8000) == (0, 1, 0, 1)  # vhost-user: low half only
    assert decode_base(0x00020005) == (5, 0, 2, 0)
    assert decode_base(0x00028005) == (5, 1, 2, 0)
    assert decode_base(encode_base(7, 0, 3, 1)) == (7, 0, 3, 1)
    with pytest.raises(InvalidParam):
        encode_base(0x8000, 0)
    with pytest.raises(InvalidParam):
        decode_base(1 << 32)


def test_ring_size_and_alignment() -> None:
    assert packed_ring_size(256) == 4096 + 8
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        with pytest.raises(InvalidParam):
            PackedDriverQueue(mem, 4, 8)
        with pytest.raises(InvalidParam):
            PackedDeviceQueue.from_gpa(mem, 4, 0, 0x42, 0x80)
        with pytest.raises(InvalidParam):
            PackedDeviceQueue.from_gpa(mem, 4, 0, 0x40, 0x80, base=encode_base(5, 1))


def test_wraparound_and_restart_keep_order() -> None:
    """Many laps of a 3-entry ring, restarting the device from its base every few chains."""
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = PackedDriverQueue(mem, 3, 0)
        dev = PackedDeviceQueue.from_gpa(mem, 3, *drv.ring_gpas)
        for i in range(50):
            mem.write(0x8000 + i, bytes([i]))
            bid = drv.add([(0x8000 + i, 1)], [(0x9000, 2)], token=i)
            assert drv.publish()
            batch = dev.pop_batch()
            assert list(batch.ids) == [bid]
            assert batch[0].read_all() == bytes([i])
            dev.complete(batch.ids, [2])
            assert drv.reap() == [(i, 2)]
            if i % 4 == 3:
                dev = PackedDeviceQueue.from_gpa(mem, 3, *drv.ring_gpas, base=dev.get_base())
            del batch
        a_idx, a_wrap, u_idx, u_wrap = decode_base(dev.get_base())
        # 50 chains of two descriptors: 100 positions
        assert (a_idx, u_idx) == (100 % 3, 100 % 3)
        assert a_wrap == u_wrap == 1 ^ (100 // 3) % 2


def test_multi_descriptor_chains_out_of_order() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = PackedDriverQueue(mem, 5, 0)
        dev = PackedDeviceQueue.from_gpa(mem, 5, *drv.ring_gpas)
        a = drv.add([(0x8000, 1), (0x8001, 1)], [(0x9000, 3)], token="a")
        b = drv.add([(0x8002, 2)], [], token="b")
        drv.publish()
        batch = dev.pop_batch()
        assert list(batch.ids) == [a, b]
        assert list(batch.readable_len) == [2, 2] and list(batch.writable_len) == [3, 0]
        dev.complete([b], [0])
        assert drv.reap() == [("b", 0)]
        assert drv.num_free == 2  # chain "a" still holds three slots
        dev.complete([a], [3])
        assert drv.reap() == [("a", 3)]
        assert drv.num_free == 5
        del batch
