"""Property-based fuzzing of the device-role queues over arbitrary ring memory.

Hypothesis writes whole rings by hand (descriptor tables, available rings, packed
descriptors, indirect tables, event-suppression areas) with values biased to the hostile
ones: loops, chains longer than the queue, addresses outside the one region and across its
end, zero lengths, indirect inside indirect, any flags, any indices. The device queue then
pops, reads every readable buffer, fills every writable one, completes (with good and bad
ids) and flips notifications, for a few rounds with the ring rewritten in between.

Properties, for every input:

* the only exceptions are :class:`VirtqueueError` and :class:`GuestMemoryError`; after a
  :class:`VirtqueueError` the queue stays broken with that same error;
* every view a chain hands out lies inside the mapped region;
* the guard bytes around the region (same memfd, same mappings' pages) are untouched, although
  every writable buffer is filled.

:data:`EXAMPLES` inputs per ring format; ``VHOSTKIT_LONG=1`` runs :data:`LONG_EXAMPLES`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from vhostkit.errors import GuestMemoryError, InvalidParam, VirtqueueError
from vhostkit.types import MemoryRegion
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PACKED_DESC_DTYPE, PackedDeviceQueue
from vhostkit.virtio.ring import SPLIT_DESC_DTYPE, DescFlag
from vhostkit.virtio.split import SplitDeviceQueue

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: hypothesis inputs per ring format
EXAMPLES = 250
#: the same with VHOSTKIT_LONG=1
LONG_EXAMPLES = 20000
FUZZ = settings(
    max_examples=LONG_EXAMPLES if LONG else EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

PAGE = mmap.PAGESIZE
FILE_SIZE = 40 * PAGE
#: the region starts at an unaligned offset in the memfd: guard bytes share its first page
REGION_OFF = 16 * PAGE + 52
REGION_SIZE = 16 * PAGE - 100
GUARD = 0xA5
FILL = 0x5A
DESC = 0x1000
DRIVER = 0x1200  # split: available ring; packed: driver event suppression
DEVICE = 0x1400  # split: used ring; packed: device event suppression
TABLES = (0x6000, 0x6400, REGION_SIZE - 40)  # indirect tables (the last one crosses the end)
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
TYPED = (VirtqueueError, GuestMemoryError)


@dataclass
class Env:
    """One region in the middle of a guard-filled memfd."""

    fd: int
    mem: GuestMemory
    base: int  # the address of the region's first byte in this process

    def guards_intact(self) -> bool:
        before = os.pread(self.fd, REGION_OFF, 0)
        after_off = REGION_OFF + REGION_SIZE
        after = os.pread(self.fd, FILE_SIZE - after_off, after_off)
        return set(before) == {GUARD} and set(after) == {GUARD}

    def inside(self, view: memoryview) -> bool:
        if view.nbytes == 0:
            return True
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        return self.base <= addr and addr + view.nbytes <= self.base + REGION_SIZE


@contextmanager
def guarded_memory() -> Iterator[Env]:
    fd = os.memfd_create("fuzz-rings", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, bytes([GUARD]) * FILE_SIZE, 0)
        os.pwrite(fd, bytes(REGION_SIZE), REGION_OFF)
        region = MemoryRegion(0, REGION_SIZE, 0x7F00_0000_0000, REGION_OFF, fd)
        with GuestMemory.map_regions([region]) as mem:
            first = mem.gpa_view(0, 1)
            base = np.frombuffer(first, dtype=np.uint8).ctypes.data
            del first
            yield Env(fd, mem, base)
    finally:
        os.close(fd)


# -- strategies ------------------------------------------------------------------------------

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)

addresses = st.one_of(
    st.integers(0x2000, 0x5F00).map(lambda a: a & ~7),  # data inside the region
    st.sampled_from([*TABLES, 0, DESC, DRIVER, REGION_SIZE - 1, REGION_SIZE, REGION_SIZE + 8]),
    st.sampled_from([1 << 32, 1 << 63, (1 << 64) - 8, (1 << 64) - 1]),
    U64,
)
lengths = st.one_of(
    st.integers(0, 64),
    st.sampled_from([0, 16, 32, 48, 24, REGION_SIZE, 1 << 31, 0xFFFF_FFFF]),
    U32,
)
flag_bits = st.one_of(
    st.sets(st.sampled_from([NEXT, WRITE, INDIRECT])).map(sum),
    U16,
)


def ring_index(num: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, num + 1), U16)


sane_addresses = st.integers(0x2000, 0x5F00).map(lambda a: a & ~7)
sane_lengths = st.integers(1, 64)
sane_flags = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, INDIRECT])


def split_desc(num: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """A descriptor: mostly well-formed (so chains are served), else anything."""
    sane = st.tuples(sane_addresses, sane_lengths, sane_flags, st.integers(0, num - 1))
    hostile = st.tuples(addresses, lengths, flag_bits, ring_index(num))
    return st.one_of(sane, sane, hostile)


@st.composite
def tables(draw: st.DrawFn, packed: bool) -> list[tuple[int, bytes]]:
    """Indirect tables at the fixed table addresses (entries of the ring's layout)."""
    out = []
    for gpa in draw(st.lists(st.sampled_from(TABLES), max_size=2, unique=True)):
        n = draw(st.integers(0, 6))
        if packed:
            rows = [(draw(addresses), draw(lengths), draw(U16), draw(flag_bits)) for _ in range(n)]
            arr = np.array(rows, dtype=PACKED_DESC_DTYPE)
        else:
            rows = [
                (draw(addresses), draw(lengths), draw(flag_bits), draw(ring_index(n)))
                for _ in range(n)
            ]
            arr = np.array(rows, dtype=SPLIT_DESC_DTYPE)
        data = arr.tobytes()
        if gpa + len(data) > REGION_SIZE:
            data = data[: REGION_SIZE - gpa]
        out.append((gpa, data))
    return out


@dataclass(frozen=True)
class SplitPicture:
    """What a hostile driver wrote into a split ring."""

    descs: list[tuple[int, int, int, int]]
    avail_flags: int
    avail_idx: int
    avail_ring: list[int]
    used_event: int
    tables: list[tuple[int, bytes]]


@st.composite
def split_pictures(draw: st.DrawFn, num: int, base: int) -> SplitPicture:
    if draw(st.booleans()):
        # a well-formed ring (single descriptors, distinct heads) with a few hostile spots
        descs = [
            (draw(sane_addresses), draw(sane_lengths), draw(st.sampled_from([0, WRITE])), 0)
            for _ in range(num)
        ]
        for _ in range(draw(st.integers(0, 2))):
            descs[draw(st.integers(0, num - 1))] = draw(split_desc(num))
        ring = draw(st.permutations(range(num)))
        delta = draw(st.integers(0, num))
    else:
        descs = [draw(split_desc(num)) for _ in range(num)]
        ring = [draw(st.one_of(st.integers(0, num - 1), ring_index(num))) for _ in range(num)]
        delta = draw(st.one_of(st.integers(0, num), st.integers(0, 2 * num + 1), U16))
    return SplitPicture(
        descs=descs,
        avail_flags=draw(st.sampled_from([0, 1, 0xFFFF])),
        avail_idx=(base + delta) & 0xFFFF,
        avail_ring=list(ring),
        used_event=draw(U16),
        tables=draw(tables(packed=False)),
    )


def write_split(mem: GuestMemory, num: int, pic: SplitPicture) -> None:
    mem.write(DESC, np.array(pic.descs, dtype=SPLIT_DESC_DTYPE).tobytes())
    avail = np.array([pic.avail_flags, pic.avail_idx, *pic.avail_ring, pic.used_event], "<u2")
    mem.write(DRIVER, avail.tobytes())
    for gpa, data in pic.tables:
        mem.write(gpa, data)


@dataclass(frozen=True)
class PackedPicture:
    """What a hostile driver wrote into a packed ring."""

    descs: list[tuple[int, int, int, int]]
    driver_event: tuple[int, int]
    tables: list[tuple[int, bytes]]


packed_flags = st.one_of(
    st.tuples(
        st.sets(st.sampled_from([NEXT, WRITE, INDIRECT])).map(sum),
        st.sampled_from([AVAIL, AVAIL, AVAIL | USED, 0, USED]),
    ).map(sum),
    U16,
)


@st.composite
def packed_pictures(draw: st.DrawFn, num: int) -> PackedPicture:
    sane = st.tuples(
        sane_addresses, sane_lengths, st.integers(0, num - 1),
        sane_flags.map(lambda f: f | AVAIL),
    )  # fmt: skip
    hostile = st.tuples(addresses, lengths, st.one_of(st.integers(0, num + 1), U16), packed_flags)
    descs = [draw(st.one_of(sane, sane, hostile)) for _ in range(num)]
    return PackedPicture(descs, (draw(U16), draw(U16)), draw(tables(packed=True)))


def write_packed(mem: GuestMemory, num: int, pic: PackedPicture) -> None:
    mem.write(DESC, np.array(pic.descs, dtype=PACKED_DESC_DTYPE).tobytes())
    mem.write(DRIVER, np.array(pic.driver_event, "<u2").tobytes())
    for gpa, data in pic.tables:
        mem.write(gpa, data)


#: what the device does between ring rewrites
steps = st.lists(
    st.one_of(
        st.tuples(st.just("pop"), st.one_of(st.none(), st.integers(0, 17))),
        st.tuples(st.just("complete_bogus"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("enable"), st.none()),
        st.tuples(st.just("disable"), st.none()),
        st.tuples(st.just("pending"), st.none()),
    ),
    min_size=1,
    max_size=6,
)


# -- the driver of one run -------------------------------------------------------------------


def exercise(env: Env, dev: SplitDeviceQueue | PackedDeviceQueue, rounds, rewrite) -> int:  # type: ignore[no-untyped-def]
    """Run the device steps; return how many chains it handed out. Raises only TYPED."""
    handed = 0
    held: list[tuple[int, int]] = []  # (id, written) of popped, not completed chains
    for picture, ops in rounds:
        if picture is not None:
            rewrite(picture)
        for op, arg in ops:
            if op == "pop":
                batch = dev.pop_batch(arg)
                for chain in batch:
                    handed += 1
                    for view in (*chain.readable, *chain.writable):
                        assert env.inside(view), f"chain {chain.id} views memory outside the region"
                    chain.read_all()
                    written = 0
                    for view in chain.writable:
                        view[:] = bytes([FILL]) * view.nbytes
                        written += view.nbytes
                    held.append((chain.id, written))
                if held and len(held) % 2 == 0:
                    ids, lens = zip(*held, strict=True)
                    dev.complete(list(ids), list(lens))
                    held.clear()
            elif op == "complete_bogus":
                if any(arg == i for i, _ in held):
                    continue  # the device holds it: not bogus
                try:
                    dev.complete([arg], [0])
                except InvalidParam:
                    pass  # a device completing an id it does not hold: the caller's error
            elif op == "enable":
                dev.enable_notifications()
            elif op == "disable":
                dev.disable_notifications()
            else:
                dev.has_pending()
    if held:
        ids, lens = zip(*held, strict=True)
        dev.complete(list(ids), list(lens))
    return handed


def check_typed(dev: SplitDeviceQueue | PackedDeviceQueue, exc: BaseException) -> None:
    assert isinstance(exc, TYPED), f"{type(exc).__name__}: {exc}"
    if isinstance(exc, VirtqueueError) and dev.broken is not None:
        with pytest.raises(VirtqueueError) as again:
            dev.pop_batch()
        assert again.value is dev.broken


def outcome(env: Env, dev: SplitDeviceQueue | PackedDeviceQueue, rounds, rewrite) -> None:  # type: ignore[no-untyped-def]
    """Run :func:`exercise`; check what it raised; tell hypothesis what happened."""
    try:
        handed = exercise(env, dev, rounds, rewrite)
    except Exception as exc:
        check_typed(dev, exc)
        cause = type(exc.__cause__).__name__ if exc.__cause__ else ""
        event(f"refused: {type(exc).__name__} {cause}".strip())
    else:
        event("served " + ("no chain" if not handed else "chains"))


FEATURE_SETS = st.sampled_from(
    [
        0,
        int(F.RING_INDIRECT_DESC),
        int(F.RING_EVENT_IDX),
        int(F.RING_INDIRECT_DESC | F.RING_EVENT_IDX),
    ]
)


@st.composite
def split_runs(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    features = draw(FEATURE_SETS)
    base = draw(st.one_of(st.just(0), st.integers(0, 2 * num), U16))
    used_idx = draw(st.one_of(st.just(base), U16))
    first = draw(split_pictures(num, base))
    rounds = [(first, draw(steps))]
    for _ in range(draw(st.integers(0, 3))):
        rounds.append((draw(st.one_of(st.none(), split_pictures(num, base))), draw(steps)))
    return num, features, base, used_idx, rounds


@given(split_runs())
@FUZZ
def test_split_device_queue_survives_any_ring(run) -> None:  # type: ignore[no-untyped-def]
    num, features, base, used_idx, rounds = run
    with guarded_memory() as env:
        env.mem.write(DEVICE + 2, used_idx.to_bytes(2, "little"))
        dev = SplitDeviceQueue.from_gpa(
            env.mem, num, DESC, DRIVER, DEVICE, features=features, base=base
        )
        outcome(env, dev, rounds, lambda pic: write_split(env.mem, num, pic))
        assert env.guards_intact()
        del dev


@st.composite
def packed_runs(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    num = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16]))
    features = draw(FEATURE_SETS) | int(F.RING_PACKED)
    base = draw(st.one_of(st.none(), st.just(0x8000 | 0x8000 << 16), st.integers(0, 1 << 32)))
    if base is not None and draw(st.booleans()):  # a position inside the queue
        base = base & 0x8000_8000 | (base % num) | (base >> 16) % num << 16
    first = draw(packed_pictures(num))
    rounds = [(first, draw(steps))]
    for _ in range(draw(st.integers(0, 3))):
        rounds.append((draw(st.one_of(st.none(), packed_pictures(num))), draw(steps)))
    return num, features, base, rounds


@given(packed_runs())
@FUZZ
def test_packed_device_queue_survives_any_ring(run) -> None:  # type: ignore[no-untyped-def]
    num, features, base, rounds = run
    with guarded_memory() as env:
        try:
            dev = PackedDeviceQueue.from_gpa(
                env.mem, num, DESC, DRIVER, DEVICE, features=features, base=base
            )
        except Exception as exc:  # a base beyond the queue: refused up front
            assert isinstance(exc, InvalidParam), exc
            event("refused: base")
            return
        outcome(env, dev, rounds, lambda pic: write_packed(env.mem, num, pic))
        assert env.guards_intact()
        del dev


def test_the_guard_check_sees_a_write_past_the_region() -> None:
    """The property above could fail: a write one byte past the region shows in the guards."""
    with guarded_memory() as env:
        assert env.guards_intact()
        os.pwrite(env.fd, b"\0", REGION_OFF + REGION_SIZE)
        assert not env.guards_intact()
        view = env.mem.gpa_view(REGION_SIZE - 8, 8)
        assert env.inside(view)
        assert not env.inside(memoryview(bytearray(8)))
        del view
