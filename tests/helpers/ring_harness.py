"""Driver role against device role in one process, with a reference model of notifications.

Used by ``test_split_ring.py`` and ``test_packed_ring.py``: a hypothesis ``data`` object drives
a random interleaving of add / publish / pop / complete / reap / suppression toggles / device
restart (GET_VRING_BASE then SET_VRING_BASE), and every step is checked:

* the device pops chains in the order the driver added them, with the right bytes;
* the driver reaps in the order the device completed, with the bytes the device wrote;
* every kick and signal decision equals what a simple model predicts from absolute counters
  (an event index fires when the window of positions just published/used contains a position
  congruent to it modulo 2**16 for split rings, modulo 2*num for packed rings);
* at the end, after draining, every buffer was delivered exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import event
from hypothesis import strategies as st

from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

BOUNDARY = 0x40000  # two adjacent regions meet here; some buffers straddle it
LAYOUT = [(0, BOUNDARY), (BOUNDARY, BOUNDARY)]
RING_GPA = 0x1000
SLOT = 512  # per in-flight token: 256 bytes of out buffers, 256 of in buffers
MAX_INDIRECT = 4


def out_pattern(token: int, n: int) -> bytes:
    return bytes((token * 13 + i) % 251 for i in range(n))


def in_pattern(token: int, n: int) -> bytes:
    return bytes((token * 31 + i * 7 + 1) % 256 for i in range(n))


def window_hits(event: int, old: int, new: int, modulus: int) -> bool:
    """Reference: does some absolute position k in [old, new) satisfy k = event (mod modulus)?"""
    return any(k % modulus == event % modulus for k in range(old, new))


@dataclass
class Pending:
    token: int
    gpa_out: list[tuple[int, int]]
    gpa_in: list[tuple[int, int]]
    descs: int
    slot: int


@dataclass
class Model:
    """What the rings should say, tracked from absolute counters only."""

    packed: bool
    event_idx: bool
    num: int
    # device -> driver (kick suppression): the state the ring holds
    dev_ring_state: str = "enable"  # enable | disable | desc
    dev_event: int = 0  # absolute position the device asked to be kicked at
    dev_notify: bool = True  # the device object's own view (restart resets it)
    # driver -> device (interrupt suppression)
    drv_ring_state: str = "enable"
    drv_event: int = 0
    drv_irq: bool = True
    published: int = 0  # chains (split) / descriptors (packed) made available, absolute
    popped: int = 0
    completed: int = 0
    reaped: int = 0
    modulus: int = field(init=False)

    def __post_init__(self) -> None:
        self.modulus = 2 * self.num if self.packed else 0x10000
        if self.event_idx:
            # split: both event fields start at 0 (zeroed memory) and are "armed" at 0
            self.dev_ring_state = "enable" if self.packed else "desc"
            self.drv_ring_state = "desc"

    def expect(self, state: str, event: int, old: int, new: int) -> bool:
        if state == "disable":
            return False
        if state == "enable":
            return True
        return window_hits(event, old, new, self.modulus)


class Harness:
    def __init__(self, packed: bool, num: int, features: int) -> None:
        self.packed = packed
        self.num = num
        self.features = features
        self.vmm = GuestMemory.allocate(LAYOUT)
        self.backend_mem = GuestMemory.map_regions(self.vmm.regions)
        drv_cls: Any = PackedDriverQueue if packed else SplitDriverQueue
        self.drv = drv_cls(self.vmm, num, RING_GPA, features=features, max_indirect=MAX_INDIRECT)
        self.dev = self._new_device(None)
        self.model = Model(packed, bool(features & VirtioFeature.RING_EVENT_IDX), num)
        self.free_slots = list(range(num))
        self.next_token = 0
        self.by_id: dict[int, Pending] = {}  # in flight, by chain id (head / buffer id)
        self.added: list[int] = []  # tokens in add order
        self.unpublished: list[Pending] = []
        self.published_q: list[Pending] = []  # published, not yet popped
        self.popped: list[tuple[int, int, Pending]] = []  # (id, written, pending)
        self.completed_q: list[Pending] = []  # completed, not yet reaped (used-ring order)
        self.completed_lens: dict[int, int] = {}
        self.delivered: list[int] = []
        self.slot_base = BOUNDARY - (num * SLOT) // 2 + 24

    def _new_device(self, base: int | None) -> Any:
        addr = self.drv.vring_addr()
        if self.packed:
            return PackedDeviceQueue.from_vring_addr(
                self.backend_mem, self.num, addr, features=self.features, base=base
            )
        return SplitDeviceQueue.from_vring_addr(
            self.backend_mem, self.num, addr, features=self.features, base=base or 0
        )

    def close(self) -> None:
        self.backend_mem.close()
        self.vmm.close()

    # -- operations -----------------------------------------------------------------------

    def add(self, data: st.DataObject) -> None:
        n_out = data.draw(st.integers(0, 2), label="n_out")
        n_in = data.draw(st.integers(0 if n_out else 1, 2), label="n_in")
        total = n_out + n_in
        indirect = False
        if self.features & VirtioFeature.RING_INDIRECT_DESC and total > 1:
            indirect = data.draw(st.booleans(), label="indirect")
        descs = 1 if indirect else total
        if not self.free_slots or descs > self.drv.num_free:
            return
        sizes_out = [data.draw(st.integers(0, 100), label="out") for _ in range(n_out)]
        sizes_in = [data.draw(st.integers(0, 100), label="in") for _ in range(n_in)]
        slot = self.free_slots.pop()
        base = self.slot_base + slot * SLOT
        token = self.next_token
        self.next_token += 1
        outs, pos = [], base
        payload = out_pattern(token, sum(sizes_out))
        for size in sizes_out:
            outs.append((pos, size))
            pos += size
        self.vmm.write(base, payload)
        ins, pos = [], base + 256
        for size in sizes_in:
            ins.append((pos, size))
            pos += size
        self.vmm.write(base + 256, bytes(sum(sizes_in)))
        cid = self.drv.add(outs, ins, token, indirect=indirect)
        assert cid not in self.by_id
        p = Pending(token, outs, ins, descs, slot)
        self.by_id[cid] = p
        self.added.append(token)
        self.unpublished.append(p)

    def publish(self) -> None:
        m = self.model
        unit = (lambda p: p.descs) if self.packed else (lambda p: 1)
        old = m.published
        new = old + sum(unit(p) for p in self.unpublished)
        kick = self.drv.publish()
        if new == old:
            assert kick is False
            return
        assert kick == m.expect(m.dev_ring_state, m.dev_event, old, new), (old, new, m)
        event(f"kick={kick}")
        m.published = new
        self.published_q.extend(self.unpublished)
        self.unpublished.clear()

    def pop(self, data: st.DataObject) -> None:
        limit = data.draw(st.none() | st.integers(1, 4), label="max_chains")
        batch = self.dev.pop_batch(limit)
        expected = self.published_q[: len(batch)]
        want = len(self.published_q) if limit is None else min(limit, len(self.published_q))
        assert len(batch) == want
        del self.published_q[: len(batch)]
        m = self.model
        for i, chain in enumerate(batch):
            p = self.by_id[chain.id]
            assert p is expected[i]
            assert chain.read_all() == out_pattern(p.token, sum(n for _, n in p.gpa_out))
            assert chain.writable_len == sum(n for _, n in p.gpa_in) == batch.writable_len[i]
            assert chain.readable_len == batch.readable_len[i]
            wlen = max(0, chain.writable_len - p.token % 3)
            assert chain.write(in_pattern(p.token, wlen)) == wlen
            self.popped.append((chain.id, wlen, p))
            m.popped += p.descs if self.packed else 1
        if len(batch) and m.event_idx and m.dev_notify:
            m.dev_ring_state, m.dev_event = "desc", m.popped

    def complete(self, data: st.DataObject) -> None:
        if not self.popped:
            return
        k = data.draw(st.integers(1, len(self.popped)), label="k")
        chosen = data.draw(st.permutations(range(len(self.popped))), label="order")[:k]
        items = [self.popped[i] for i in chosen]
        for i in sorted(chosen, reverse=True):
            del self.popped[i]
        m = self.model
        old = m.completed
        new = old + sum((p.descs if self.packed else 1) for _, _, p in items)
        signal = self.dev.complete([cid for cid, _, _ in items], [w for _, w, _ in items])
        assert signal == m.expect(m.drv_ring_state, m.drv_event, old, new), (old, new, m)
        event(f"signal={signal}")
        m.completed = new
        for _, w, p in items:
            self.completed_q.append(p)
            self.completed_lens[p.token] = w

    def reap(self, data: st.DataObject) -> None:
        limit = data.draw(st.none() | st.integers(1, 4), label="max_items")
        got = self.drv.reap(limit)
        m = self.model
        expected = self.completed_q[: len(got)]
        assert len(got) == (
            len(self.completed_q) if limit is None else min(limit, len(self.completed_q))
        )
        del self.completed_q[: len(got)]
        for (token, length), p in zip(got, expected, strict=True):
            assert token == p.token
            assert length == self.completed_lens[token]
            written = b"".join(self.vmm.read(a, n) for a, n in p.gpa_in)
            assert written[:length] == in_pattern(token, length)
            self.delivered.append(token)
            self.free_slots.append(p.slot)
            for cid, q in list(self.by_id.items()):
                if q is p:
                    del self.by_id[cid]
            m.reaped += p.descs if self.packed else 1
        if m.event_idx and m.drv_irq:
            m.drv_event = m.reaped

    def toggle_irq(self, data: st.DataObject) -> None:
        m = self.model
        if data.draw(st.booleans(), label="irq"):
            self.drv.enable_interrupts()
            m.drv_irq = True
            if m.event_idx:
                m.drv_ring_state, m.drv_event = "desc", m.reaped
            else:
                m.drv_ring_state = "enable"
        else:
            self.drv.disable_interrupts()
            m.drv_irq = False
            if self.packed or not m.event_idx:
                m.drv_ring_state = "disable"

    def toggle_notify(self, data: st.DataObject) -> None:
        m = self.model
        if data.draw(st.booleans(), label="notify"):
            pending = self.dev.enable_notifications()
            assert bool(pending) == bool(self.published_q)
            m.dev_notify = True
            if m.event_idx:
                m.dev_ring_state, m.dev_event = "desc", m.popped
            else:
                m.dev_ring_state = "enable"
        else:
            self.dev.disable_notifications()
            m.dev_notify = False
            if self.packed or not m.event_idx:
                m.dev_ring_state = "disable"

    def restart(self) -> None:
        """GET_VRING_BASE then a new device queue from SET_VRING_BASE (nothing in flight)."""
        if self.popped:
            return
        base = self.dev.get_base()
        event("restart")
        self.dev = self._new_device(base)
        self.model.dev_notify = True

    def step(self, data: st.DataObject) -> None:
        op = data.draw(
            st.sampled_from(
                [
                    "add",
                    "add",
                    "add",
                    "publish",
                    "pop",
                    "complete",
                    "reap",
                    "irq",
                    "notify",
                    "restart",
                ]
            ),
            label="op",
        )
        if op == "add":
            self.add(data)
        elif op == "publish":
            self.publish()
        elif op == "pop":
            self.pop(data)
        elif op == "complete":
            self.complete(data)
        elif op == "reap":
            self.reap(data)
        elif op == "irq":
            self.toggle_irq(data)
        elif op == "notify":
            self.toggle_notify(data)
        else:
            self.restart()

    def drain(self, data: st.DataObject) -> None:
        self.publish()
        for _ in range(4 * self.num + 4):
            self.pop(data)
            while self.popped:
                self.complete(data)
            self.reap(data)
            if not (self.published_q or self.popped or self.completed_q):
                break
        self.reap(data)
        assert not self.published_q and not self.popped and not self.completed_q
        assert sorted(self.delivered) == sorted(self.added) == list(range(self.next_token))
        assert len(set(self.delivered)) == len(self.delivered)


def run(packed: bool, num: int, features: int, data: st.DataObject, steps: int) -> None:
    h = Harness(packed, num, features)
    try:
        for _ in range(steps):
            h.step(data)
        h.drain(data)
    finally:
        h.close()
