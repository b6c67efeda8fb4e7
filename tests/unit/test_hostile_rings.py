"""Malformed rings from a hostile peer: typed errors, broken queue, neighbours unaffected.

The guest memory is one region at an unaligned offset inside a memfd filled with guard bytes,
so the pages mapped around the region hold guard bytes a bounds bug could reach; every test
checks they are still intact.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from vhostkit.backend import MemoryRegion
from vhostkit.errors import GuestMemoryError, VirtqueueError
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PACKED_DESC_DTYPE, PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.ring import SPLIT_DESC_DTYPE, DescFlag
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

PAGE = mmap.PAGESIZE
FILE_SIZE = 40 * PAGE
REGION_OFF = 16 * PAGE + 52
REGION_SIZE = 16 * PAGE - 100
GUARD = 0xA5
FAKE_UVA = 0x7F00_0000_0000
NUM = 4
RING_A = 0x1000
RING_B = 0x3000
DATA = 0x8000
TABLE = 0x6000
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
FEATURES = int(F.RING_INDIRECT_DESC | F.RING_EVENT_IDX)


@dataclass
class Env:
    fd: int
    mem: GuestMemory

    def guards_intact(self) -> bool:
        before = os.pread(self.fd, REGION_OFF, 0)
        after_off = REGION_OFF + REGION_SIZE
        after = os.pread(self.fd, FILE_SIZE - after_off, after_off)
        return set(before) == {GUARD} and set(after) == {GUARD}


@pytest.fixture
def env() -> Iterator[Env]:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, bytes([GUARD]) * FILE_SIZE, 0)
        region = MemoryRegion(0, REGION_SIZE, FAKE_UVA, REGION_OFF, fd)
        with GuestMemory.map_regions([region]) as mem:
            e = Env(fd, mem)
            yield e
            assert e.guards_intact()
    finally:
        os.close(fd)


# -- split rings ---------------------------------------------------------------------------


class RawSplit:
    """A split ring laid out by the real driver class, then written by hand."""

    def __init__(self, mem: GuestMemory, gpa: int, features: int = FEATURES) -> None:
        self.drv = SplitDriverQueue(mem, NUM, gpa, features=features)
        d, a, u = self.drv.ring_gpas
        self.desc = mem.gpa_array(d, SPLIT_DESC_DTYPE, NUM)
        self.avail = mem.gpa_array(a, "<u2", 2 + NUM)
        self.used = mem.gpa_array(u, "<u2", 2)
        self.used_ring = mem.gpa_array(u + 4, [("id", "<u4"), ("len", "<u4")], NUM)
        self.dev = SplitDeviceQueue.from_vring_addr(
            mem, NUM, self.drv.vring_addr(), features=features
        )

    def post(self, heads: list[int]) -> None:
        for i, h in enumerate(heads):
            self.avail[2 + i] = h
        self.avail[1] = len(heads)


def check_neighbour_works(mem: GuestMemory) -> None:
    drv = SplitDriverQueue(mem, NUM, RING_B, features=FEATURES, max_indirect=2)
    dev = SplitDeviceQueue.from_gpa(mem, NUM, *drv.ring_gpas, features=FEATURES)
    mem.write(DATA + 0x100, b"ok")
    drv.add([(DATA + 0x100, 2)], [(DATA + 0x200, 4)], token="t")
    drv.publish()
    batch = dev.pop_batch()
    assert batch[0].read_all() == b"ok"
    dev.complete(batch.ids, [batch[0].write(b"fine")])
    assert drv.reap() == [("t", 4)]
    assert mem.read(DATA + 0x200, 4) == b"fine"


def _desc(ring: RawSplit, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    ring.desc[i] = (addr, length, flags, nxt)


def _table(mem: GuestMemory, entries: list[tuple[int, int, int, int]]) -> None:
    arr = np.array(entries, dtype=SPLIT_DESC_DTYPE)
    mem.write(TABLE, arr.tobytes())


def split_loop(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, DATA, 8, NEXT, 1)
    _desc(r, 1, DATA, 8, NEXT, 0)
    r.post([0])


def split_self_loop(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 2, DATA, 8, NEXT, 2)
    r.post([2])


def split_head_out_of_range(r: RawSplit, mem: GuestMemory) -> None:
    r.post([NUM])


def split_next_out_of_range(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, DATA, 8, NEXT, 9)
    r.post([0])


def split_avail_jump(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, DATA, 8, 0, 0)
    r.avail[1] = NUM + 1


def split_nested_indirect(r: RawSplit, mem: GuestMemory) -> None:
    _table(mem, [(DATA, 8, NEXT, 1), (TABLE, 32, INDIRECT, 0)])
    _desc(r, 0, TABLE, 32, INDIRECT, 0)
    r.post([0])


def split_indirect_len_not_multiple(r: RawSplit, mem: GuestMemory) -> None:
    _table(mem, [(DATA, 8, 0, 0), (DATA, 8, 0, 0)])
    _desc(r, 0, TABLE, 24, INDIRECT, 0)
    r.post([0])


def split_indirect_len_zero(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, TABLE, 0, INDIRECT, 0)
    r.post([0])


def split_indirect_next_outside(r: RawSplit, mem: GuestMemory) -> None:
    _table(mem, [(DATA, 8, NEXT, 5), (DATA, 8, 0, 0)])
    _desc(r, 0, TABLE, 32, INDIRECT, 0)
    r.post([0])


def split_indirect_loop(r: RawSplit, mem: GuestMemory) -> None:
    _table(mem, [(DATA, 8, NEXT, 1), (DATA, 8, NEXT, 0)])
    _desc(r, 0, TABLE, 32, INDIRECT, 0)
    r.post([0])


def split_indirect_with_next(r: RawSplit, mem: GuestMemory) -> None:
    _table(mem, [(DATA, 8, 0, 0)])
    _desc(r, 0, TABLE, 16, INDIRECT | NEXT, 1)
    _desc(r, 1, DATA, 8, 0, 0)
    r.post([0])


def split_indirect_table_outside(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, REGION_SIZE - 16, 32, INDIRECT, 0)
    r.post([0])


def split_buffer_outside(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, REGION_SIZE + 8, 8, WRITE, 0)
    r.post([0])


def split_buffer_crosses_end(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, REGION_SIZE - 4, 16, WRITE, 0)
    r.post([0])


def split_buffer_overflows(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, (1 << 64) - 8, 0xFFFF_FFFF, 0, 0)
    r.post([0])


def split_readable_after_writable(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, DATA, 8, WRITE | NEXT, 1)
    _desc(r, 1, DATA, 8, 0, 0)
    r.post([0])


def split_duplicate_head(r: RawSplit, mem: GuestMemory) -> None:
    _desc(r, 0, DATA, 8, 0, 0)
    r.post([0, 0])


SPLIT_CASES: dict[str, Callable[[RawSplit, GuestMemory], None]] = {
    f.__name__: f
    for f in (
        split_loop,
        split_self_loop,
        split_head_out_of_range,
        split_next_out_of_range,
        split_avail_jump,
        split_nested_indirect,
        split_indirect_len_not_multiple,
        split_indirect_len_zero,
        split_indirect_next_outside,
        split_indirect_loop,
        split_indirect_with_next,
        split_indirect_table_outside,
        split_buffer_outside,
        split_buffer_crosses_end,
        split_buffer_overflows,
        split_readable_after_writable,
        split_duplicate_head,
    )
}

ADDRESS_CASES = {
    "split_indirect_table_outside",
    "split_buffer_outside",
    "split_buffer_crosses_end",
    "split_buffer_overflows",
    "packed_buffer_outside",
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_device_rejects(env: Env, case: str) -> None:
    ring = RawSplit(env.mem, RING_A)
    SPLIT_CASES[case](ring, env.mem)
    with pytest.raises(VirtqueueError) as info:
        ring.dev.pop_batch()
    err = info.value
    if case in ADDRESS_CASES:
        assert isinstance(err.__cause__, GuestMemoryError)
    assert ring.dev.broken is err
    # broken: every later call raises the same error
    calls = (ring.dev.pop_batch, ring.dev.enable_notifications, lambda: ring.dev.complete([0], [0]))
    for call in calls:
        with pytest.raises(VirtqueueError) as again:
            call()
        assert again.value is err
    assert ring.dev.last_avail_idx == 0  # nothing was consumed
    check_neighbour_works(env.mem)


def test_indirect_without_feature(env: Env) -> None:
    ring = RawSplit(env.mem, RING_A, features=0)
    _table(env.mem, [(DATA, 8, 0, 0)])
    _desc(ring, 0, TABLE, 16, INDIRECT, 0)
    ring.post([0])
    with pytest.raises(VirtqueueError, match="INDIRECT"):
        ring.dev.pop_batch()
    check_neighbour_works(env.mem)


def test_split_driver_rejects_hostile_device(env: Env) -> None:
    ring = RawSplit(env.mem, RING_A)
    ring.drv.add([(DATA, 4)], [(DATA + 64, 4)], token=1)
    ring.drv.publish()
    ring.used_ring[0] = (3, 0)  # id not in flight
    ring.used[1] = 1
    with pytest.raises(VirtqueueError):
        ring.drv.reap()
    with pytest.raises(VirtqueueError):
        ring.drv.add([(DATA, 4)])
    ring2 = RawSplit(env.mem, RING_B)
    ring2.drv.add([(DATA, 4)], [(DATA + 64, 4)], token=1)
    ring2.drv.publish()
    ring2.used_ring[0] = (ring2.avail[2], 400)  # longer than the buffer
    ring2.used[1] = 1
    with pytest.raises(VirtqueueError, match="bytes into"):
        ring2.drv.reap()
    ring3 = RawSplit(env.mem, 0x5000)
    ring3.used[1] = 7  # used idx far ahead
    with pytest.raises(VirtqueueError):
        ring3.drv.reap()


# -- packed rings --------------------------------------------------------------------------


class RawPacked:
    def __init__(self, mem: GuestMemory, gpa: int, features: int = FEATURES) -> None:
        self.drv = PackedDriverQueue(mem, NUM, gpa, features=features)
        self.desc = mem.gpa_array(gpa, PACKED_DESC_DTYPE, NUM)
        self.dev = PackedDeviceQueue.from_vring_addr(
            mem, NUM, self.drv.vring_addr(), features=features
        )

    def put(self, i: int, addr: int, length: int, bid: int, flags: int, avail: bool = True) -> None:
        # first lap: available = AVAIL set, USED clear
        self.desc[i] = (addr, length, bid, flags | (AVAIL if avail else 0))


def packed_chain_too_long(r: RawPacked, mem: GuestMemory) -> None:
    for i in range(NUM):
        r.put(i, DATA, 8, 0, NEXT)


def packed_chain_into_unavailable(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, DATA, 8, 0, NEXT)
    r.put(1, DATA, 8, 0, 0, avail=False)


def packed_indirect_len_bad(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, TABLE, 20, 0, INDIRECT)


def packed_indirect_len_zero(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, TABLE, 0, 0, INDIRECT)


def packed_nested_indirect(r: RawPacked, mem: GuestMemory) -> None:
    tab = np.array([(DATA, 8, 0, 0), (TABLE, 32, 0, INDIRECT)], dtype=PACKED_DESC_DTYPE)
    mem.write(TABLE, tab.tobytes())
    r.put(0, TABLE, 32, 0, INDIRECT)


def packed_indirect_with_next(r: RawPacked, mem: GuestMemory) -> None:
    tab = np.array([(DATA, 8, 0, 0)], dtype=PACKED_DESC_DTYPE)
    mem.write(TABLE, tab.tobytes())
    r.put(0, TABLE, 16, 0, INDIRECT | NEXT)
    r.put(1, DATA, 8, 0, 0)


def packed_buffer_outside(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, REGION_SIZE, 1, 0, WRITE)


def packed_duplicate_id(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, DATA, 8, 2, 0)
    r.put(1, DATA, 8, 2, 0)


def packed_readable_after_writable(r: RawPacked, mem: GuestMemory) -> None:
    r.put(0, DATA, 8, 0, WRITE | NEXT)
    r.put(1, DATA, 8, 0, 0)


PACKED_CASES: dict[str, Callable[[RawPacked, GuestMemory], None]] = {
    f.__name__: f
    for f in (
        packed_chain_too_long,
        packed_chain_into_unavailable,
        packed_indirect_len_bad,
        packed_indirect_len_zero,
        packed_nested_indirect,
        packed_indirect_with_next,
        packed_buffer_outside,
        packed_duplicate_id,
        packed_readable_after_writable,
    )
}


@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_packed_device_rejects(env: Env, case: str) -> None:
    ring = RawPacked(env.mem, RING_A)
    PACKED_CASES[case](ring, env.mem)
    with pytest.raises(VirtqueueError) as info:
        ring.dev.pop_batch()
    err = info.value
    if case in ADDRESS_CASES:
        assert isinstance(err.__cause__, GuestMemoryError)
    with pytest.raises(VirtqueueError) as again:
        ring.dev.pop_batch()
    assert again.value is err
    check_neighbour_works(env.mem)


def test_packed_rejects_more_available_than_free(env: Env) -> None:
    """The driver flips an in-flight descriptor back to available."""
    ring = RawPacked(env.mem, RING_A)
    for i in range(NUM):
        ring.put(i, DATA, 8, i, 0)
    assert len(ring.dev.pop_batch()) == NUM
    # second lap expects AVAIL clear / USED set; fake one while all four are in flight
    ring.desc[0] = (DATA, 8, 9, USED)
    with pytest.raises(VirtqueueError):
        ring.dev.pop_batch()
    check_neighbour_works(env.mem)


def test_packed_driver_rejects_unknown_id(env: Env) -> None:
    ring = RawPacked(env.mem, RING_A)
    ring.drv.add([(DATA, 4)], token=1)
    ring.drv.publish()
    ring.desc[0] = (DATA, 0, 3, AVAIL | USED)  # used, but id 3 was never given out
    with pytest.raises(VirtqueueError):
        ring.drv.reap()
    check_neighbour_works(env.mem)


def test_ring_outside_memory_is_guest_memory_error(env: Env) -> None:
    with pytest.raises(GuestMemoryError):
        SplitDeviceQueue.from_gpa(env.mem, NUM, 0xFF80, 0x2000, 0x2100)
    with pytest.raises(GuestMemoryError):
        PackedDeviceQueue.from_gpa(env.mem, NUM, 0x1000, 0x2000, REGION_SIZE)
    with pytest.raises(GuestMemoryError):
        SplitDeviceQueue(env.mem, NUM, 0x1000, 0x2000, 0x3000, space="uva")
