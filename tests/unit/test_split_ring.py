"""Split virtqueue: driver role against device role, property-tested, plus layout and API."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.ring_harness import run
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.ring import need_event
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue, SplitLayout, vring_size

FEATURE_SETS = [
    0,
    int(F.RING_EVENT_IDX),
    int(F.RING_INDIRECT_DESC),
    int(F.RING_EVENT_IDX | F.RING_INDIRECT_DESC | F.VERSION_1),
]


@pytest.mark.parametrize("features", FEATURE_SETS, ids=["plain", "event", "indirect", "both"])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), num=st.sampled_from([2, 4, 8]))
def test_interleavings_deliver_once(features: int, num: int, data: st.DataObject) -> None:
    run(False, num, features, data, steps=60)


def test_vring_size_matches_legacy_formula() -> None:
    # the kernel's vring_size(): desc + avail (with used_event), aligned, + used (avail_event)
    assert vring_size(256, 4096) == 4096 * 2 + 4096 + 6 + 8 * 256 - 4096  # 10246
    assert vring_size(256, 4096) == 10246
    layout = SplitLayout.compute(256)
    assert (layout.desc, layout.avail, layout.used) == (0, 4096, 4096 + 520)
    assert layout.size == 4096 + 520 + 6 + 8 * 256


def test_need_event_wraps() -> None:
    assert need_event(0, 1, 0)
    assert not need_event(1, 1, 0)
    assert need_event(0xFFFF, 2, 0xFFFE)
    assert not need_event(5, 2, 0xFFFE)


def test_bad_sizes_and_alignment() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        with pytest.raises(InvalidParam):
            SplitDriverQueue(mem, 6, 0)
        with pytest.raises(InvalidParam):
            SplitDriverQueue(mem, 8, 8)
        with pytest.raises(InvalidParam):
            SplitDeviceQueue.from_gpa(mem, 8, 0, 1, 0x100)


def test_queue_full_and_misuse() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = SplitDriverQueue(mem, 2, 0)
        dev = SplitDeviceQueue.from_gpa(mem, 2, *drv.ring_gpas)
        drv.add([(0x8000, 4)], [(0x9000, 4)])
        with pytest.raises(InvalidOperation):
            drv.add([(0x8000, 4)])
        assert drv.publish()
        batch = dev.pop_batch()
        with pytest.raises(InvalidParam):
            dev.complete([1], [0])  # not in flight
        with pytest.raises(InvalidParam):
            dev.complete([batch.ids[0], batch.ids[0]], [0, 0])
        assert dev.broken is None
        dev.complete(batch.ids, [4])
        assert drv.reap() == [(None, 4)]
        assert dev.get_base() == 1 and dev.used_idx == 1
        del batch


def test_ring_addresses_and_restart_from_base() -> None:
    with GuestMemory.allocate([(0, 1 << 16), (1 << 20, 1 << 16)]) as vmm:
        drv = SplitDriverQueue(vmm, 8, 1 << 20, features=int(F.RING_EVENT_IDX))
        addr = drv.vring_addr()
        assert addr.desc == vmm.gpa_to_uva(1 << 20)
        assert vmm.uva_to_gpa(addr.used) == drv.ring_gpas[2]
        with GuestMemory.map_regions(vmm.regions) as be:
            dev = SplitDeviceQueue.from_vring_addr(be, 8, addr, features=int(F.RING_EVENT_IDX))
            assert dev.ring_gpas == drv.ring_gpas
            for i in range(5):
                drv.add([(0x100 + i, 1)])
            drv.publish()
            b = dev.pop_batch(max_chains=3)
            dev.complete(b.ids, np.zeros(3, dtype=np.int64))
            base = dev.get_base()
            assert base == 3
            dev2 = SplitDeviceQueue.from_vring_addr(be, 8, addr, base=base)
            assert dev2.used_idx == 3
            b2 = dev2.pop_batch()
            assert len(b2) == 2
            assert [c.read_all() for c in b2] == [b"\x00", b"\x00"]
            dev2.complete(b2.ids[::-1], [0, 0])
            assert len(drv.reap()) == 5
            del b, b2


def test_chain_views_are_zero_copy() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = SplitDriverQueue(mem, 4, 0)
        dev = SplitDeviceQueue.from_gpa(mem, 4, *drv.ring_gpas)
        drv.add([(0x8000, 8)], [(0x9000, 8)])
        drv.publish()
        chain = dev.pop_batch()[0]
        mem.write(0x8000, b"ABCDEFGH")  # written after the pop: the view sees it
        assert bytes(chain.readable[0]) == b"ABCDEFGH"
        chain.writable[0][:] = b"12345678"
        assert mem.read(0x9000, 8) == b"12345678"
        del chain
