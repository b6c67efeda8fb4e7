"""Property-based fuzzing of a restart over a hostile inflight area (INFLIGHT_SHMFD).

A restarted back-end trusts nothing the front-end hands back: the inflight area
(``SET_INFLIGHT_FD``) says which chains its predecessor had taken, and a hostile or corrupted
area can say anything. Hypothesis writes that area (valid headers with arbitrary entries:
chains that loop, heads outside the queue, counters that collide, used indices out of range;
packed descriptor copies with any address, length and flags) and the ring memory, then a real
:class:`SinkDevice` (a :class:`RingDevice`) is driven through the requests a front-end sends
after a crash: features with INFLIGHT_SHMFD, a memory table, the inflight fd, the ring; the
ring starts, recovers, resubmits and runs.

Properties: every request either succeeds or fails with a typed :class:`VhostError`; the ring
worker never logs an untyped exception; no chain view leaves the region (the guard bytes
around it are untouched although every resubmitted chain is completed); after the connection
is gone the process holds the fds and memfd mappings it held before.

:data:`EXAMPLES` inputs per ring format; ``VHOSTKIT_LONG=1`` runs :data:`LONG_EXAMPLES`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from vhostkit._frames import without_frames
from vhostkit.errors import VhostError
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.backend.inflight import packed_queue_region_size, split_queue_region_size
from vhostkit.user.backend.ring_device import SinkDevice
from vhostkit.user.message import InflightDesc, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature as VF

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: hypothesis inputs per ring format
EXAMPLES = 150
#: the same with VHOSTKIT_LONG=1
LONG_EXAMPLES = 10000
FUZZ = settings(
    max_examples=LONG_EXAMPLES if LONG else EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

PAGE = mmap.PAGESIZE
FILE_SIZE = 12 * PAGE
REGION_OFF = 4 * PAGE + 52
REGION_SIZE = 4 * PAGE - 100
GUARD = 0xA5
UVA = 0x7F00_0000_0000
DESC, AVAIL, USED = 0x100, 0x300, 0x500
U16 = st.integers(0, 0xFFFF)
U64 = st.integers(0, (1 << 64) - 1)


def memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def held() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), memfd_maps()


class Untyped(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not isinstance(record.exc_info[1], VhostError):
            self.found.append(self.format(record))


@contextlib.contextmanager
def untyped_errors() -> Iterator[Untyped]:
    handler = Untyped()
    logger = logging.getLogger("vhostkit")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@st.composite
def split_area(draw: st.DrawFn, num: int) -> bytes:
    """A split inflight region: a valid header (mostly), entries of any kind."""
    size = split_queue_region_size(num)
    desc_num = draw(st.sampled_from([num, num, num, 0, num + 1]))
    header = struct.pack(
        "<QHHHH",
        0,
        draw(st.sampled_from([1, 1, 1, 2])),
        desc_num,
        draw(st.one_of(st.integers(0, num), U16)),
        draw(st.one_of(st.integers(0, 2 * num), U16)),
    )
    entries = b"".join(
        struct.pack(
            "<B5xHQ",
            draw(st.sampled_from([0, 1, 1, 2, 0xFF])),
            draw(st.one_of(st.integers(0, num), U16)),
            draw(st.one_of(st.integers(0, 8), U64)),
        )
        for _ in range(num)
    )
    return (header + entries).ljust(size, b"\0")


@st.composite
def packed_area(draw: st.DrawFn, num: int) -> bytes:
    """A packed inflight region: a valid header (mostly), descriptor copies of any kind."""
    size = packed_queue_region_size(num)
    n = st.one_of(st.integers(0, num), U16)
    header = struct.pack(
        "<QHHHHHHBB10x",
        0,
        draw(st.sampled_from([1, 1, 1, 3])),
        draw(st.sampled_from([num, num, num, 0])),
        draw(n),
        draw(n),
        draw(n),
        draw(n),
        draw(st.integers(0, 2)),
        draw(st.integers(0, 2)),
    )
    entries = b"".join(
        struct.pack(
            "<BBHHHQHHIQ",
            draw(st.sampled_from([0, 1, 1, 2])),
            0,
            draw(n),
            draw(st.sampled_from([0, 1, 1, 7])),
            draw(st.one_of(st.integers(0, 3), U16)),
            draw(st.one_of(st.integers(0, 8), U64)),
            draw(n),
            draw(st.one_of(st.sampled_from([0, 1, 2, 4, 6, 0x80]), U16)),
            draw(st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF_FFFF))),
            draw(st.one_of(st.integers(0x1000, 0x2000), U64)),
        )
        for _ in range(num)
    )
    return (header + entries).ljust(size, b"\0")


@st.composite
def consistent_packed_area(draw: st.DrawFn, num: int) -> bytes:
    """A packed region as a crashed back-end leaves it (chains in flight, the rest on the
    free list), then a few fields overwritten: the recovery's deep paths, with hostile copies
    of descriptors (any address, length, flags) to resubmit."""
    lengths: list[int] = []
    while sum(lengths) < num and draw(st.booleans()):
        lengths.append(draw(st.integers(1, min(3, num - sum(lengths)))))
    entries = [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0] for _ in range(num)]
    e = 0
    for c, k in enumerate(lengths):
        for i in range(k):
            addr = draw(st.one_of(st.integers(0x1000, 0x2000), U64))
            length = draw(st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF_FFFF)))
            flags = draw(st.sampled_from([0, 2, 4, 6])) | (1 if i < k - 1 else 0)
            entries[e + i] = [0, 0, e + i + 1, 0, 0, 0, c, flags, length, addr]
        entries[e][0], entries[e][3], entries[e][4], entries[e][5] = 1, e + k - 1, k, c + 1
        e += k
    free = list(range(e, num))
    for a, b in zip(free, [*free[1:], num], strict=False):
        entries[a][2] = b
    free_head = free[0] if free else num
    used = draw(st.integers(0, num - 1))
    header = struct.pack("<QHHHHHHBB10x", 0, 1, num, free_head, free_head, used, used, 1, 1)
    body = bytearray(header + b"".join(struct.pack("<BBHHHQHHIQ", *x) for x in entries))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body) - 1))
        body[at] = draw(st.integers(0, 255))
    return bytes(body).ljust(packed_queue_region_size(num), b"\0")


@st.composite
def restarts(draw: st.DrawFn, packed: bool) -> tuple[int, bytes, bytes, int | None]:
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    if packed:
        area = draw(st.one_of(consistent_packed_area(num), packed_area(num)))
    else:
        area = draw(split_area(num))
    ring = draw(st.one_of(st.just(b""), st.binary(max_size=0x600)))
    base = draw(st.one_of(st.none(), st.just(0), st.integers(0, 2 * num), st.integers(0, 1 << 32)))
    return num, area, ring, base


def restart(packed: bool, num: int, area: bytes, ring: bytes, base: int | None) -> str:
    """Drive a fresh device through a front-end's restart sequence; return how it went."""
    guest = os.memfd_create("fuzz-inflight-guest", os.MFD_CLOEXEC)
    os.ftruncate(guest, FILE_SIZE)
    os.pwrite(guest, bytes([GUARD]) * FILE_SIZE, 0)
    os.pwrite(guest, bytes(REGION_SIZE), REGION_OFF)
    os.pwrite(guest, ring, REGION_OFF)
    inflight = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC)
    os.pwrite(inflight, area, 0)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    features = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | (VF.RING_PACKED if packed else 0))
    device = SinkDevice(features=features, num_queues=1)
    outcome = "ran"
    try:
        device.set_features(features)
        device.set_protocol_features(ProtocolFeature.INFLIGHT_SHMFD)
        device.set_mem_table((MemoryRegion(0, REGION_SIZE, UVA, REGION_OFF, os.dup(guest)),))
        fd = os.dup(inflight)
        try:
            device.set_inflight_fd(InflightDesc(len(area), 0, 1, num), fd)
        except BaseException:
            os.close(fd)  # refused: the server would close it
            raise
        device.set_vring_num(0, num)
        if base is not None:
            device.set_vring_base(0, base)
        device.set_vring_addr(VringAddr(0, UVA + DESC, UVA + USED, UVA + AVAIL))
        fd = os.dup(kick)
        try:
            device.set_vring_kick(0, fd)
        except BaseException:
            os.close(fd)
            raise
        device.set_vring_enable(0, True)
        os.eventfd_write(kick, 1)
        device.wait_for(lambda: device.chains[0] > 0 or not device.active, timeout=0.05)
    except VhostError as exc:
        # As BackendReqServer does with a failed request: the error (logged, and kept by
        # pytest's log capture) must not keep the frames, hence views of guest memory, alive.
        outcome = type(without_frames(exc)).__name__
    finally:
        device.disconnected()
        device.close()
        after = os.pread(guest, FILE_SIZE, 0)
        for fd in (guest, inflight, kick):
            os.close(fd)
    guards = after[:REGION_OFF] + after[REGION_OFF + REGION_SIZE :]
    assert set(guards) == {GUARD}, "a guard byte around the region changed"
    return outcome


def check(packed: bool, run: tuple[int, bytes, bytes, int | None]) -> None:
    before = held()
    with untyped_errors() as untyped:
        outcome = restart(packed, *run)
    assert not untyped.found, "\n".join(untyped.found)
    now = held()
    if now != before:
        gc.collect()
        now = held()
    assert now == before, f"(fds, memfd mappings): {before} before, {now} after"
    event(outcome)


@given(restarts(packed=False))
@FUZZ
def test_a_split_ring_restarts_over_any_inflight_area(run) -> None:  # type: ignore[no-untyped-def]
    check(False, run)


@given(restarts(packed=True))
@FUZZ
def test_a_packed_ring_restarts_over_any_inflight_area(run) -> None:  # type: ignore[no-untyped-def]
    check(True, run)
