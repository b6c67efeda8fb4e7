"""Inflight tracking for split queues, following the spec's algorithm, including crashes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidParam
from vhostkit.user.backend.inflight import (
    PACKED_HEADER_DTYPE,
    PACKED_STATE_DTYPE,
    RING_DESC_DTYPE,
    PackedInflight,
    SplitInflight,
    packed_queue_region_size,
    split_queue_region_size,
)
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue, encode_base

N = 16


def region(n: int = N) -> bytearray:
    return bytearray(split_queue_region_size(n))


def test_a_new_region_is_initialised_and_an_old_one_kept() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    assert buf[8:10] == (1).to_bytes(2, "little")  # version
    assert buf[10:12] == N.to_bytes(2, "little")  # desc_num
    t.popped([3, 1])
    again = SplitInflight(buf, N)  # the restarted back-end
    assert again.inflight_heads() == [3, 1]
    again.popped([7])
    assert again.inflight_heads() == [3, 1, 7]  # the counter continues after the old ones


def test_region_size_is_64_byte_aligned() -> None:
    assert split_queue_region_size(256) == 4160
    assert split_queue_region_size(1) == 64


def test_complete_then_recover_returns_the_rest_oldest_first() -> None:
    t = SplitInflight(region(), N)
    t.popped([3, 1, 2])
    t.completing([1])
    t.completed([1], 1)
    assert t.recover(1) == [3, 2]


def test_crash_after_the_used_index_moved_repairs_the_last_batch() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    t.popped([5, 6, 7])
    t.completing([5, 6])
    # the used ring's idx became 2, then the back-end died before completed()
    again = SplitInflight(buf, N)  # the restarted back-end, same memory
    assert again.recover(2) == [7]
    assert again.used_idx == 2


def test_crash_before_the_used_index_moved_resubmits_the_batch() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    t.popped([5, 6, 7])
    t.completing([5, 6])
    assert SplitInflight(buf, N).recover(0) == [5, 6, 7]


def test_bad_regions_are_refused() -> None:
    with pytest.raises(InvalidParam):
        SplitInflight(bytearray(32), N)
    buf = region(32)
    SplitInflight(buf, 32)
    with pytest.raises(InvalidParam):
        SplitInflight(buf, 16)  # initialised for another queue size
    t = SplitInflight(region(), N)
    with pytest.raises(InvalidParam):
        t.recover(N + 5)  # the ring claims more completions than could be in flight


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_recovery_matches_a_model_whatever_the_crash_point(data: st.DataObject) -> None:
    buf = region()
    t = SplitInflight(buf, N)
    free = list(range(N))
    inflight: list[int] = []  # in pop order
    used_idx = 0
    for _ in range(data.draw(st.integers(0, 30))):
        if free and (not inflight or data.draw(st.booleans())):
            k = data.draw(st.integers(1, len(free)))
            heads = [free.pop(data.draw(st.integers(0, len(free) - 1))) for _ in range(k)]
            t.popped(heads)
            inflight += heads
        elif inflight:
            batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
            t.completing(batch)
            used_idx = (used_idx + len(batch)) & 0xFFFF
            t.completed(batch, used_idx)
            inflight = [h for h in inflight if h not in batch]
            free += batch
    # the crash: maybe in the middle of one more completion
    ring_used = used_idx
    expected = list(inflight)
    if inflight and data.draw(st.booleans()):
        batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
        t.completing(batch)
        if data.draw(st.booleans()):  # the used index was published before the crash
            ring_used = (used_idx + len(batch)) & 0xFFFF
            expected = [h for h in inflight if h not in batch]
    assert SplitInflight(buf, N).recover(ring_used) == expected


# ----------------------------------------------------------------------------------------------
# packed rings
# ----------------------------------------------------------------------------------------------

NEXT, WRITE, AVAIL, USED = 1, 2, 1 << 7, 1 << 15


def packed_region(n: int = N) -> bytearray:
    return bytearray(packed_queue_region_size(n))


def ring_descs(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(len(rows), RING_DESC_DTYPE)
    for i, (a, ln, bid, fl) in enumerate(rows):
        out[i] = (a, ln, bid, fl)
    return out


def test_packed_layout_and_initialisation() -> None:
    assert PACKED_HEADER_DTYPE.itemsize == 32 and PACKED_STATE_DTYPE.itemsize == 32
    assert PACKED_STATE_DTYPE.fields is not None
    offs = {k: v[1] for k, v in PACKED_STATE_DTYPE.fields.items()}
    assert offs == {
        "inflight": 0, "padding": 1, "next": 2, "last": 4, "num": 6,
        "counter": 8, "id": 16, "flags": 18, "len": 20, "addr": 24,
    }  # fmt: skip
    assert packed_queue_region_size(256) == 8256  # 32 + 32 * 256, 64-aligned
    assert packed_queue_region_size(1) == 64
    buf = packed_region()
    t = PackedInflight(buf, N)
    assert buf[8:10] == (1).to_bytes(2, "little")  # version
    assert buf[10:12] == N.to_bytes(2, "little")  # desc_num
    assert bytes(buf[12:20]) == bytes(8)  # free_head, old_free_head, used_idx, old_used_idx
    assert bytes(buf[20:22]) == b"\1\1"  # the wrap counters
    assert t.desc["next"].tolist() == list(range(1, N + 1))
    # entry 3 begins at 32 + 3 * 32: its next field (little-endian u16) is 4
    assert buf[32 + 96 + 2 : 32 + 96 + 4] == (4).to_bytes(2, "little")


def test_packed_pop_records_copies_off_the_free_list() -> None:
    buf = packed_region()
    t = PackedInflight(buf, N)
    t.popped(
        ring_descs([(0x1000, 10, 7, NEXT | AVAIL), (0x2000, 20, 7, WRITE | AVAIL)]),
        [2],
    )
    t.popped(ring_descs([(0x3000, 30, 4, AVAIL)]))
    d = t.desc
    assert d["inflight"][[0, 2]].tolist() == [1, 1]
    assert d["num"][[0, 2]].tolist() == [2, 1]
    assert d["last"][[0, 2]].tolist() == [1, 2]
    assert d["addr"][:3].tolist() == [0x1000, 0x2000, 0x3000]
    assert buf[12:14] == (3).to_bytes(2, "little")  # free_head
    assert buf[14:16] == (3).to_bytes(2, "little")  # old_free_head
    # complete id 7 (two ring descriptors): its entries go back on the free list
    t.completing([7])
    t.completed([7])
    assert (t.free_head, t.used_idx, t.used_wrap) == (0, 2, 1)
    assert d["next"][1] == 3  # the chain's last entry links to the old free head
    rec = PackedInflight(buf, N).recover(np.full(N, USED | AVAIL, np.uint16))
    assert rec.heads == [2]
    assert rec.descs.tolist() == [(0x3000, 30, 4, AVAIL)]
    assert rec.counts.tolist() == [1]
    assert (rec.used_idx, rec.used_wrap) == (2, 1)


def test_packed_bad_regions_are_refused() -> None:
    with pytest.raises(InvalidParam):
        PackedInflight(bytearray(32), N)
    buf = packed_region(32)
    PackedInflight(buf, 32)
    with pytest.raises(InvalidParam):
        PackedInflight(buf, 16)


class PackedModel:
    """A packed ring's flags plus what a device has popped and completed, per the spec."""

    def __init__(self, data: st.DataObject, n: int) -> None:
        self.data = data
        self.n = n
        self.flags = np.zeros(n, np.uint16)
        self.ids = np.zeros(n, np.uint16)  # the id fields of the ring's used descriptors
        self.avail = (0, 1)
        self.used = (0, 1)
        self.inflight: list[tuple[int, np.ndarray]] = []  # (id, ring descriptors), pop order
        self.free_ids = list(range(n))
        self.addr = 0x1000

    def step(self, pos: tuple[int, int], k: int) -> tuple[int, int]:
        i, w = pos[0] + k, pos[1]
        if i >= self.n:
            i, w = i - self.n, w ^ 1
        return i, w

    def outstanding(self) -> int:
        return sum(d.shape[0] for _, d in self.inflight)

    def make_chains(self) -> tuple[list[tuple[int, np.ndarray]], np.ndarray, list[int]]:
        draw = self.data.draw
        chains: list[tuple[int, np.ndarray]] = []
        room = self.n - self.outstanding()
        pos = self.avail
        for _ in range(draw(st.integers(1, 4))):
            if room == 0 or not self.free_ids:
                break
            c = draw(st.integers(1, min(3, room)))
            bid = self.free_ids.pop(draw(st.integers(0, len(self.free_ids) - 1)))
            rows = []
            for j in range(c):
                bits = AVAIL if pos[1] else USED
                fl = (NEXT if j < c - 1 else 0) | bits | (WRITE if draw(st.booleans()) else 0)
                rows.append((self.addr, draw(st.integers(0, 4096)), bid, fl))
                self.flags[pos[0]] = fl  # the driver makes it available
                self.addr += 0x1000
                pos = self.step(pos, 1)
            room -= c
            chains.append((bid, ring_descs(rows)))
        descs = np.concatenate([d for _, d in chains]) if chains else ring_descs([])
        return chains, descs, [d.shape[0] for _, d in chains]

    def write_used(self, batch: list[tuple[int, np.ndarray]], skip_first: bool = False) -> None:
        """The device writes the batch's used descriptors; the first one's flags last."""
        pos = self.used
        slots = []
        for _, d in batch:
            slots.append(pos)
            pos = self.step(pos, d.shape[0])
        for (i, w), (bid, _) in list(zip(slots, batch, strict=True))[1:]:
            self.ids[i] = bid
            self.flags[i] = AVAIL | USED if w else 0
        if not skip_first:
            i, w = slots[0]
            self.ids[i] = batch[0][0]
            self.flags[i] = AVAIL | USED if w else 0

    def driver_sees(self) -> list[int]:
        """The ids a driver would take from the used ring now, from its used position (it
        skips each used chain's descriptors); stops after the first one not in flight."""
        lengths = {b: d.shape[0] for b, d in self.inflight}
        pos, out = self.used, []
        while len(out) < len(lengths):
            i, w = pos
            if int(self.flags[i]) & (AVAIL | USED) != (AVAIL | USED if w else 0):
                break
            bid = int(self.ids[i])
            out.append(bid)
            if bid not in lengths or out.count(bid) > 1:
                break
            pos = self.step(pos, lengths[bid])
        return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_packed_recovery_matches_a_model_whatever_the_crash_point(data: st.DataObject) -> None:
    n = data.draw(st.sampled_from([1, 2, 5, 8]))
    buf = packed_region(n)
    m = PackedModel(data, n)
    t = PackedInflight(buf, n)
    for _life in range(data.draw(st.integers(1, 4))):
        for _ in range(data.draw(st.integers(0, 25))):
            if data.draw(st.booleans()) or not m.inflight:
                chains, descs, counts = m.make_chains()
                if chains:
                    t.popped(descs, counts)
                    m.inflight += chains
                    m.avail = m.step(m.avail, descs.shape[0])
            else:
                batch = data.draw(st.lists(st.sampled_from(m.inflight), min_size=1, unique_by=id))
                ids = [b for b, _ in batch]
                assert m.driver_sees() == []  # nothing used that the device did not complete
                t.completing(ids)
                m.write_used(batch)
                assert m.driver_sees() == ids  # the batch, and nothing else
                t.completed(ids)
                m.used = m.step(m.used, sum(d.shape[0] for _, d in batch))
                m.inflight = [c for c in m.inflight if c[0] not in ids]
                m.free_ids += ids
            assert t._free[::-1] == t.free_entries()  # the mirror follows the region
        # the crash, maybe in the middle of one more operation
        h = t._h.copy()
        crash = data.draw(st.sampled_from(["none", "pop", "pop-late", "complete"]))
        if crash.startswith("pop"):
            chains, descs, counts = m.make_chains()
            if chains:
                t.popped(descs, counts)
                # undo the header writes the crash prevented (the copies were written)
                t._h["old_free_head"] = h["old_free_head"]
                if crash == "pop":
                    t._h["free_head"] = h["free_head"]
                m.free_ids += [b for b, _ in chains]  # never recorded: popped again later
        elif crash == "complete" and m.inflight:
            batch = data.draw(st.lists(st.sampled_from(m.inflight), min_size=1, unique_by=id))
            ids = [b for b, _ in batch]
            point = data.draw(st.integers(0, 4))
            t.completing(ids)
            if point == 0:  # died before used_idx was written
                t._h["used_idx"] = h["used_idx"]
                t._h["used_wrap_counter"] = h["used_wrap_counter"]
            if point >= 2:
                m.write_used(batch, skip_first=point == 2)
            if point == 4:  # some inflight marks cleared, nothing committed
                heads = t._head_of_id[ids]
                t.desc["inflight"][heads[: data.draw(st.integers(0, len(ids)))]] = 0
            if point >= 3:  # the driver saw the batch
                m.used = m.step(m.used, sum(d.shape[0] for _, d in batch))
                m.inflight = [c for c in m.inflight if c[0] not in ids]
                m.free_ids += ids
        # the restarted back-end
        t = PackedInflight(buf, n)
        rec = t.recover(m.flags)
        assert [int(rec.descs["id"][e]) for e in np.cumsum(rec.counts) - 1] == [
            b for b, _ in m.inflight
        ]
        expected = np.concatenate([d for _, d in m.inflight]) if m.inflight else ring_descs([])
        assert rec.descs.tolist() == expected.tolist()
        assert (rec.used_idx, rec.used_wrap) == m.used
        assert m.driver_sees() == []
        m.avail = m.step(m.used, m.outstanding())
        # every entry is either free or in exactly one chain in flight
        free, e = [], t.free_head
        while e < n:
            free.append(e)
            e = int(t.desc["next"][e])
        in_chains = [e for hd in rec.heads for e in t.chain_entries(hd)]
        assert sorted(free + in_chains) == list(range(n))
        assert not t.desc["inflight"][free].any()


class FlagsRing:
    """A packed ring's descriptor flags as a driver and a device write them, one descriptor
    per chain: the device's used descriptors first to last, the first one's flags last."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.flags = np.zeros(n, np.uint16)
        self.avail = (0, 1)
        self.used = (0, 1)

    def _next(self, pos: tuple[int, int]) -> tuple[int, int]:
        return (pos[0] + 1, pos[1]) if pos[0] + 1 < self.n else (0, pos[1] ^ 1)

    def pop(self, t: PackedInflight, ids: list[int]) -> None:
        rows = []
        for bid in ids:
            i, w = self.avail
            self.flags[i] = AVAIL if w else USED
            rows.append((0x1000 * (bid + 1), 64, bid, int(self.flags[i])))
            self.avail = self._next(self.avail)
        t.popped(ring_descs(rows))

    def complete(self, t: PackedInflight, ids: list[int], written: int | None = None) -> None:
        """Complete ``ids``; ``written``: die after writing the last ``written`` of them."""
        t.completing(ids)
        slots = []
        for _ in ids:
            slots.append(self.used)
            self.used = self._next(self.used)
        keep = len(ids) if written is None else written
        for i, w in slots[len(ids) - keep :][::-1]:
            self.flags[i] = AVAIL | USED if w else 0
        if written is None:
            t.completed(ids)


def test_packed_rollback_unwrites_the_used_descriptors_a_dead_back_end_left() -> None:
    """The example hypothesis found for the test above, pinned (queue of 5). A back-end dies
    writing the used descriptors of [2, 3]: 3's is written, not 2's (whose flags publish the
    batch). The next one resubmits both, completes 2 alone, takes 4 and dies completing 3
    before writing anything to the ring: 3 and 4 are in flight. Before the fix the first
    recovery left 3's stale used descriptor in the ring: the driver took it as soon as 2's was
    written (3 completed before any back-end finished it), and the second recovery read it as
    the interrupted completion of 3 having reached the driver, and dropped 3."""
    n = 5
    buf = packed_region(n)
    r = FlagsRing(n)
    t = PackedInflight(buf, n)
    # a first lap and a half, all completed
    r.pop(t, [0, 1, 2])
    r.complete(t, [0, 1])
    r.complete(t, [2])
    for bid in (3, 4, 0, 1):
        r.pop(t, [bid])
        r.complete(t, [bid])
    r.pop(t, [2, 3, 4])
    r.complete(t, [2, 3])
    r.complete(t, [4])
    assert (r.avail, r.used) == ((0, 1), (0, 1))
    r.pop(t, [0, 1, 2])
    r.pop(t, [3])
    r.complete(t, [0, 1])
    r.complete(t, [2, 3], written=1)  # the crash: 3's used descriptor only
    t = PackedInflight(buf, n)
    rec = t.recover(r.flags)
    assert rec.descs["id"].tolist() == [2, 3]
    assert (rec.used_idx, rec.used_wrap) == (2, 1)
    assert r.flags[3] == AVAIL  # reads as it did before the dead back-end wrote it
    r.used, r.avail = (2, 1), (4, 1)
    r.complete(t, [2])
    assert r.flags[3] & (AVAIL | USED) == AVAIL  # the driver stops after 2
    r.pop(t, [4])
    r.complete(t, [3], written=0)  # the crash: used_idx advanced, nothing in the ring
    rec = PackedInflight(buf, n).recover(r.flags)
    assert rec.descs["id"].tolist() == [3, 4]
    assert (rec.used_idx, rec.used_wrap) == (3, 1)


def test_packed_restart_after_a_half_written_completion_hides_its_used_descriptors() -> None:
    """Real driver and device queues: the back-end dies in the middle of writing a batch of
    used descriptors (all but the first one's flags). The driver has seen none; after the
    restart it sees exactly the chains the new back-end completes, in any order."""
    features = int(F.RING_PACKED)
    num = 4
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv = PackedDriverQueue(mem, num, 0, features=features)
        for k, tok in enumerate("abc"):
            drv.add([], [(0x90000 + 16 * k, 8)], token=tok)  # one descriptor each
        drv.publish()
        buf = packed_region(num)
        dev = PackedDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)
        t = PackedInflight(buf, num)
        batch = dev.pop_batch()
        t.popped(*dev.last_popped)
        ids = batch.ids.tolist()
        head_flags = int(dev.ring_flags[0])
        t.completing(ids[:2])
        dev.complete(ids[:2], [8, 8])
        dev.ring_flags[0] = head_flags  # died before the write that publishes the batch
        assert drv.reap() == []
        dev2 = PackedDeviceQueue.from_gpa(
            mem, num, *drv.ring_gpas, features=features, base=encode_base(0, 1)
        )
        t2 = PackedInflight(buf, num)
        rec = t2.recover(dev2.ring_flags)
        again = dev2.resubmit(rec.descs, rec.counts, rec.used_idx, rec.used_wrap)
        assert again.ids.tolist() == ids
        t2.completing([ids[2]])  # c first: its used descriptor goes where a's was to go
        dev2.complete([ids[2]], [8])
        t2.completed([ids[2]])
        assert [tok for tok, _ in drv.reap()] == ["c"]  # not b's stale one after it
        t2.completing(ids[:2])
        dev2.complete(ids[:2], [8, 8])
        t2.completed(ids[:2])
        assert sorted(tok for tok, _ in drv.reap()) == ["a", "b"]
        assert drv.num_free == num
        assert PackedInflight(buf, num).recover(dev2.ring_flags).heads == []
        del batch, again


def test_packed_queue_resubmits_direct_and_indirect_chains_after_a_crash() -> None:
    """Device queue + tracker, a crash, a new queue: the chains come back from the region
    (the ring slots now hold used descriptors), then the ring goes on."""
    features = int(F.RING_PACKED | F.RING_INDIRECT_DESC)
    num = 8
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv = PackedDriverQueue(mem, num, 0, features=features, max_indirect=4)
        mem.gpa_view(0x80000, 0x1000)[:] = bytes(range(256)) * 16
        chains = {
            "a": ([(0x80000, 4), (0x80004, 4)], [(0x90000, 8)], False),  # 3 ring descriptors
            "b": ([(0x80010, 2)], [], False),
            "c": ([(0x80020, 3), (0x80030, 5)], [(0x90100, 16)], True),  # indirect
            "d": ([(0x80040, 1)], [(0x90200, 2)], False),
        }
        for tok, (out, in_, ind) in chains.items():
            drv.add(out, in_, token=tok, indirect=ind)
        drv.publish()
        buf = packed_region(num)
        dev = PackedDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)
        t = PackedInflight(buf, num)
        batch = dev.pop_batch()
        t.popped(*dev.last_popped)
        before = {int(c.id): (c.read_all(), [w.nbytes for w in c.writable]) for c in batch}
        ids = batch.ids.tolist()
        done = [ids[1], ids[3]]  # b and d: their used descriptors overwrite a's slots
        t.completing(done)
        dev.complete(done, [0, 2])
        t.completed(done)
        assert sorted(tok for tok, _ in drv.reap()) == ["b", "d"]
        # the crash; a new back-end, told only a stale base
        dev2 = PackedDeviceQueue.from_gpa(
            mem, num, *drv.ring_gpas, features=features, base=encode_base(0, 1)
        )
        t2 = PackedInflight(buf, num)
        rec = t2.recover(dev2.ring_flags)
        assert rec.counts.tolist() == [3, 1]  # a (three descriptors), c (one, indirect)
        again = dev2.resubmit(rec.descs, rec.counts, rec.used_idx, rec.used_wrap)
        assert again.ids.tolist() == [ids[0], ids[2]]
        for c in again:
            assert (c.read_all(), [w.nbytes for w in c.writable]) == before[int(c.id)]
        assert dev2.used_position == (3, 1)  # b (1) and d (2) were used
        assert dev2.avail_position == (7, 1)  # plus a (3) and c (1)
        assert sorted(dev2.inflight) == sorted([ids[0], ids[2]])
        # the ring goes on: new chains after the old ones, every chain used once
        drv.add([(0x80050, 1)], [], token="e")
        drv.add([(0x80060, 1)], [(0x90300, 4)], token="f")  # wraps around
        drv.publish()
        new = dev2.pop_batch()
        t2.popped(*dev2.last_popped)
        assert len(new) == 2
        rest = again.ids.tolist() + new.ids.tolist()
        t2.completing(rest)
        dev2.complete(rest, [0] * len(rest))
        t2.completed(rest)
        assert sorted(tok for tok, _ in drv.reap()) == ["a", "c", "e", "f"]
        assert drv.num_free == num
        assert PackedInflight(buf, num).recover(dev2.ring_flags).heads == []
        del batch, again, new
