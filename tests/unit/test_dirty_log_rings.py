"""Dirty logging by the device-role queues: the log marks exactly the pages the device wrote.

A driver-role queue and a device-role queue share guest memory (two regions, the device's
mapped from the front-end's user addresses, as vhost-user gives them). Every buffer the driver
posts is filled with a byte the device never writes; the device writes a prefix of each
chain's writable buffers and completes in any order. Before each round of device work the
test copies guest memory (the shadow); after it, the pages that differ are exactly what the
device wrote. The log must hold each of them (no missing page), and nothing else but pages of
the ring's own structures (used ring, descriptor ring, event areas), which the device writes
with values that may equal what was there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidParam
from vhostkit.virtio.dirty_log import LOG_PAGE_SIZE, DirtyLog, log_size_for
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue
from vhostkit.virtio.split.layout import used_ring_size

BOUNDARY = 0x40000
LAYOUT = [(0, BOUNDARY), (BOUNDARY, BOUNDARY)]
#: rings that cross a page: the split used ring's index and its first entries on one page, the
#: later entries on the next; half the packed ring's slots on each page
RING_GPA = {False: 0x1F50, True: 0x1FC0}
NUM = 8
SLOTS = 2 * NUM
SLOT = 3 * LOG_PAGE_SIZE  # a chain's buffers: they cross pages
SLOT_BASE = BOUNDARY - SLOTS * SLOT // 2 + 100  # and the boundary between the regions
FILL = 0xA5
INK = 0x5A


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for gpa, n in ranges:
        if n > 0:
            out.update(range(gpa // LOG_PAGE_SIZE, (gpa + n - 1) // LOG_PAGE_SIZE + 1))
    return out


def changed_pages(before: np.ndarray, after: np.ndarray) -> set[int]:
    diff = np.flatnonzero(before != after)
    return set(np.unique(diff // LOG_PAGE_SIZE).tolist())


class Rig:
    def __init__(self, packed: bool, features: int) -> None:
        self.packed = packed
        self.vmm = GuestMemory.allocate(LAYOUT)
        self.dev_mem = GuestMemory.map_regions(self.vmm.regions)
        drv_cls: Any = PackedDriverQueue if packed else SplitDriverQueue
        self.drv = drv_cls(self.vmm, NUM, RING_GPA[packed], features=features, max_indirect=4)
        dev_cls: Any = PackedDeviceQueue if packed else SplitDeviceQueue
        self.dev = dev_cls.from_vring_addr(
            self.dev_mem, NUM, self.drv.vring_addr(), features=features
        )
        self.dlog = DirtyLog.allocate(log_size_for(self.vmm.regions))
        desc, _, used = self.drv.ring_gpas
        if packed:
            self.ring_ranges = [(desc, 16 * NUM + 8)]  # the ring and both event areas
        else:
            self.ring_ranges = [(used, used_ring_size(NUM))]
        self.used_gpa = used
        self.free = list(range(SLOTS))
        self.ins_of: dict[int, list[tuple[int, int]]] = {}
        #: chains popped and written, not completed: (id, used length, guest ranges written)
        self.held: list[tuple[int, int, list[tuple[int, int]]]] = []
        self.unpublished = 0

    def close(self) -> None:
        self.dlog.close()
        self.dev_mem.close()
        self.vmm.close()

    def memory(self) -> np.ndarray:
        return np.frombuffer(self.vmm.read(0, 2 * BOUNDARY), dtype=np.uint8).copy()

    def start(self, ring: bool) -> None:
        self.dev.start_logging(self.dlog, self.used_gpa if ring else None)

    # driver side (not logged: the shadow is taken after it)

    def post(self, data: st.DataObject) -> None:
        n_in = data.draw(st.integers(1, 3), label="n_in")
        n_out = data.draw(st.integers(0, 1), label="n_out")
        if not self.free or n_in + n_out > self.drv.num_free:
            return
        slot = self.free.pop(0)
        base = SLOT_BASE + slot * SLOT
        outs = [(base, 16)] if n_out else []
        ins = []
        pos = base + 16
        for _ in range(n_in):
            pos += data.draw(st.integers(0, 600), label="gap")
            size = data.draw(st.integers(1, LOG_PAGE_SIZE), label="size")
            if pos + size > base + SLOT:
                break
            ins.append((pos, size))
            pos += size
        if not ins:
            self.free.insert(0, slot)
            return
        for gpa, size in ins:
            self.vmm.write(gpa, bytes([FILL]) * size)
        indirect = bool(self.drv.features & F.RING_INDIRECT_DESC) and data.draw(
            st.booleans(), label="indirect"
        )
        cid = self.drv.add(outs, ins, slot, indirect=indirect and len(outs) + len(ins) > 1)
        self.ins_of[cid] = ins
        self.unpublished += 1

    def publish_and_reap(self) -> None:
        self.drv.publish()
        self.unpublished = 0
        for slot, _ in self.drv.reap():
            self.free.append(slot)

    # device side (logged)

    def pop(self, data: st.DataObject) -> list[tuple[int, int]]:
        """Pop, write a prefix of each chain; returns the guest ranges written."""
        limit = data.draw(st.none() | st.integers(1, 3), label="limit")
        batch = self.dev.pop_batch(limit)
        written: list[tuple[int, int]] = []
        for chain in batch:
            used = data.draw(st.integers(0, chain.writable_len), label="used")
            chain.write(bytes([INK]) * used)
            # where those bytes are, from the driver's own record of the buffers
            ranges = self._prefix(chain.id, used)
            self.held.append((chain.id, used, ranges))
            written += ranges
        return written

    def _prefix(self, cid: int, used: int) -> list[tuple[int, int]]:
        out, left = [], used
        for gpa, size in self.ins_of[cid]:
            n = min(size, left)
            out.append((gpa, n))
            left -= n
        return out

    def complete(self, data: st.DataObject) -> list[tuple[int, int]]:
        """Complete some held chains in any order; returns the ranges they had written."""
        if not self.held:
            return []
        order = data.draw(st.permutations(range(len(self.held))), label="order")
        k = data.draw(st.integers(1, len(self.held)), label="k")
        pick = [self.held[i] for i in order[:k]]
        self.held = [self.held[i] for i in order[k:]]
        self.dev.complete([c for c, _, _ in pick], [u for _, u, _ in pick])
        return [r for _, _, ranges in pick for r in ranges]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_log_marks_exactly_the_pages_the_device_wrote(packed: bool, data: Any) -> None:
    features = data.draw(
        st.sampled_from([0, F.RING_EVENT_IDX, F.RING_INDIRECT_DESC | F.RING_EVENT_IDX]),
        label="features",
    )
    rig = Rig(packed, int(features))
    try:
        start_at = data.draw(st.integers(0, 4), label="start_at")
        ring = data.draw(st.booleans(), label="log ring")
        logging = False
        ring_pages = pages_of(rig.ring_ranges)
        for step in range(data.draw(st.integers(1, 14), label="steps")):
            if step == start_at:
                rig.start(ring)  # chains may be in flight already: they are logged too
                logging = True
            for _ in range(data.draw(st.integers(0, 3), label="posts")):
                rig.post(data)
            rig.publish_and_reap()
            before = rig.memory()
            rig.dlog.collect()  # whatever the driver did is not the device's
            action = data.draw(st.sampled_from(["pop", "complete", "both", "notify"]))
            written: list[tuple[int, int]] = []
            completed: list[tuple[int, int]] = []
            if action in ("pop", "both"):
                written = rig.pop(data)
            if action in ("complete", "both"):
                completed = rig.complete(data)
            if action == "notify":
                rig.dev.disable_notifications()
                rig.dev.enable_notifications()
            after = rig.memory()
            marked = set(rig.dlog.collect().tolist())
            changed = changed_pages(before, after)
            # the shadow: the device changed exactly the data pages it wrote (every byte it
            # writes differs from the fill), and ring pages
            assert changed - ring_pages == pages_of(written) - ring_pages
            if not logging:
                assert not marked
                continue
            # a chain's data pages are marked when it completes (its used length says what it
            # wrote), exactly those: none missing, none extra
            assert marked - ring_pages == pages_of(completed) - ring_pages
            if ring:  # and every ring page the device changed
                assert changed & ring_pages <= marked
            else:
                assert not marked & ring_pages - pages_of(completed)
        # everything still out, completed now: marked too
        if logging and rig.held:
            rest = [r for _, _, ranges in rig.held for r in ranges]
            rig.dev.complete([c for c, _, _ in rig.held], [u for _, u, _ in rig.held])
            assert pages_of(rest) - ring_pages <= set(rig.dlog.collect().tolist())
    finally:
        rig.close()


def test_data_pages_are_marked_at_completion_whatever_the_order() -> None:
    rig = Rig(packed=True, features=0)
    try:
        rig.dev.start_logging(rig.dlog, rig.used_gpa)
        gpas = [SLOT_BASE + i * SLOT + 16 for i in range(3)]
        for g in gpas:
            rig.drv.add([], [(g, 2 * LOG_PAGE_SIZE)], g)
        rig.drv.publish()
        batch = rig.dev.pop_batch()
        assert len(batch) == 3
        rig.dlog.collect()
        # the last chain first: a packed used descriptor lands in the first chain's slot
        rig.dev.complete([batch.ids[2]], [LOG_PAGE_SIZE + 1])
        got = set(rig.dlog.collect().tolist())
        assert pages_of([(gpas[2], LOG_PAGE_SIZE + 1)]) <= got
        rig.dev.complete(batch.ids[:2], [0, 1])
        got = set(rig.dlog.collect().tolist())
        assert pages_of([(gpas[1], 1)]) <= got
        assert not pages_of([(gpas[0], 2 * LOG_PAGE_SIZE)]) - pages_of(rig.ring_ranges) & got
    finally:
        rig.close()


def test_ring_log_beyond_the_log_is_refused() -> None:
    rig = Rig(packed=False, features=0)
    try:
        with pytest.raises(InvalidParam):
            rig.dev.start_logging(rig.dlog, rig.dlog.pages * LOG_PAGE_SIZE - 8)
        assert not rig.dev.logging
    finally:
        rig.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_batch_marks_every_ring_page_it_wrote(packed: bool) -> None:
    rig = Rig(packed, features=0)
    try:
        rig.start(ring=True)
        for i in range(NUM):
            g = SLOT_BASE + i * SLOT
            rig.drv.add([], [(g, 8)], i)
            rig.ins_of[i] = [(g, 8)]
        rig.drv.publish()
        batch = rig.dev.pop_batch()
        rig.dlog.collect()
        before = rig.memory()
        rig.dev.complete(batch.ids, [8] * NUM)  # one batch over both ring pages
        changed = changed_pages(before, rig.memory())
        marked = set(rig.dlog.collect().tolist())
        ring_changed = changed & pages_of(rig.ring_ranges)
        assert len(ring_changed) == 2 and ring_changed <= marked
        rig.dev.stop_logging()
        assert not rig.dev.logging
    finally:
        rig.close()
