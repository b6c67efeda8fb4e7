"""GuestMemory: allocation, mapping at offsets, translation, bounds, table changes, fds."""

from __future__ import annotations

import errno
import gc
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.backend import MemoryRegion
from vhostkit.errors import GuestMemoryError, InvalidParam
from vhostkit.virtio.memory import GuestMemory

PAGE = mmap.PAGESIZE
U64 = (1 << 64) - 1


def open_fds() -> set[int]:
    """This process's open fds, after collecting garbage (an earlier test's unreachable
    socket must not close in the middle of a comparison)."""
    gc.collect()
    listed = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if _is_open(fd)}  # not the one the listing itself used


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-mem", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    yield fd
    os.close(fd)


def test_allocate_two_regions_on_one_memfd() -> None:
    with GuestMemory.allocate([(0, 3 * PAGE), (1 << 32, 2 * PAGE)]) as mem:
        low, high = mem.regions
        assert low.fd == high.fd is not None
        assert (low.mmap_offset, high.mmap_offset) == (0, 3 * PAGE)
        assert high.guest_phys_addr == 1 << 32
        mem.write((1 << 32) + 10, b"high")
        # the bytes are in the memfd at the second region's offset
        assert os.pread(high.fd, 4, high.mmap_offset + 10) == b"high"
        # userspace_addr is a real address in this process: ctypes can read it
        import ctypes

        assert ctypes.string_at(high.userspace_addr + 10, 4) == b"high"
        assert mem.gpa_to_uva((1 << 32) + 10) == high.userspace_addr + 10
        assert mem.uva_to_gpa(low.userspace_addr + 5) == 5


def test_allocated_memfd_cannot_shrink() -> None:
    with GuestMemory.allocate([(0, PAGE)]) as mem:
        fd = mem.regions[0].fd
        assert fd is not None
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)


@pytest.mark.parametrize("offset", [3 * PAGE, 3 * PAGE + 100])
def test_map_regions_honours_mmap_offset(memfd: int, offset: int) -> None:
    os.pwrite(memfd, b"region starts here", offset)
    os.pwrite(memfd, b"X", offset - 1)
    uva = 0x7F12_3456_0000  # the frontend's address: need not be valid here
    region = MemoryRegion(0x10_0000, 2 * PAGE, uva, offset, memfd)
    with GuestMemory.map_regions([region]) as mem:
        assert mem.read(0x10_0000, 18) == b"region starts here"
        assert bytes(mem.uva_view(uva + 7, 6)) == b"starts"
        assert mem.uva_to_gpa(uva + 7) == 0x10_0007
        assert mem.gpa_to_uva(0x10_0007) == uva + 7
        mem.write(0x10_0000 + 2 * PAGE - 1, b"Z")
        assert os.pread(memfd, 1, offset + 2 * PAGE - 1) == b"Z"
        with pytest.raises(GuestMemoryError):
            mem.read(0x10_0000 - 1, 1)  # the "X" before the region is not reachable


def test_bounds(memfd: int) -> None:
    regions = [
        MemoryRegion(0, PAGE, 0x1000_0000, 0, memfd),
        MemoryRegion(PAGE, PAGE, 0x2000_0000, PAGE, memfd),  # adjacent in gpa
        MemoryRegion(8 * PAGE, PAGE, 0x3000_0000, 2 * PAGE, memfd),  # after a hole
    ]
    with GuestMemory.map_regions(regions) as mem:
        assert len(mem.gpa_view(PAGE - 8, 8)) == 8
        # spanning adjacent regions: a scatter list, but not a single view
        views = mem.gpa_views(PAGE - 8, 16)
        assert [len(v) for v in views] == [8, 8]
        with pytest.raises(GuestMemoryError):
            mem.gpa_view(PAGE - 8, 16)
        mem.write(PAGE - 2, b"abcd")
        assert mem.read(PAGE - 2, 4) == b"abcd"
        # into the hole, past the end, overflow, negative
        bad = [
            (2 * PAGE - 4, 8),
            (2 * PAGE, 1),
            (9 * PAGE - 1, 2),
            (9 * PAGE, 1),
            (U64, 2),
            (U64 + 1, 1),
            (-1, 1),
            (0, -1),
            (5 * PAGE, 1),
        ]
        for addr, length in bad:
            with pytest.raises(GuestMemoryError):
                mem.gpa_views(addr, length)
        with pytest.raises(GuestMemoryError):
            mem.uva_view(0x1000_0000 + PAGE - 1, 2)  # user space is not adjacent there
        with pytest.raises(GuestMemoryError):
            mem.uva_to_gpa(0x4000_0000)
        with pytest.raises(GuestMemoryError):
            mem.gpa_to_uva(3 * PAGE)
        assert mem.gpa_views(5 * PAGE, 0) == []


def test_batch_lookup_matches_scalar(memfd: int) -> None:
    regions = [
        MemoryRegion(0, PAGE, 0x1000_0000, 0, memfd),
        MemoryRegion(PAGE, PAGE, 0x2000_0000, PAGE, memfd),
        MemoryRegion(8 * PAGE, PAGE, 0x3000_0000, 2 * PAGE, memfd),
    ]
    with GuestMemory.map_regions(regions) as mem:
        table = mem.table

        @settings(max_examples=200, deadline=None)
        @given(
            st.lists(
                st.tuples(
                    st.one_of(st.integers(0, 10 * PAGE), st.integers(U64 - PAGE, U64)),
                    st.integers(0, 2 * PAGE),
                ),
                min_size=1,
                max_size=6,
            )
        )
        def check(ranges: list[tuple[int, int]]) -> None:
            addr = np.array([a for a, _ in ranges], dtype=np.uint64)
            length = np.array([n for _, n in ranges], dtype=np.uint64)
            scalar_ok = True
            for a, n in ranges:
                try:
                    mem.gpa_views(a, n)
                except GuestMemoryError:
                    scalar_ok = False
            try:
                region, offset = table.lookup_gpa_batch(addr, length)
            except GuestMemoryError:
                assert not scalar_ok
                return
            assert scalar_ok
            for j, (a, n) in enumerate(ranges):
                if n == 0:
                    assert region[j] == -2
                elif region[j] >= 0:
                    start = table.gpa.starts[region[j]]
                    assert start + int(offset[j]) == a
                    assert a + n <= table.gpa.ends[region[j]]
                else:
                    assert len(mem.gpa_views(a, n)) > 1

        check()


def test_add_and_remove_region_while_in_use(memfd: int) -> None:
    r1 = MemoryRegion(0, PAGE, 0x1000_0000, 0, memfd)
    r2 = MemoryRegion(4 * PAGE, PAGE, 0x2000_0000, 5 * PAGE, memfd)
    with GuestMemory.map_regions([r1]) as mem:
        gen = mem.generation
        with pytest.raises(GuestMemoryError):
            mem.read(4 * PAGE, 1)
        mem.add_region(r2)
        assert mem.generation > gen
        mem.write(4 * PAGE, b"new")
        assert os.pread(memfd, 3, 5 * PAGE) == b"new"
        held = mem.gpa_view(4 * PAGE, 3)
        arr = mem.gpa_array(4 * PAGE, np.uint8, 3)
        with pytest.raises(InvalidParam):
            mem.add_region(MemoryRegion(4 * PAGE + 8, PAGE, 0x5000_0000, 0, memfd))  # overlap
        removed = mem.remove_region(MemoryRegion(4 * PAGE, PAGE, 0x2000_0000))
        assert removed.mmap_offset == 5 * PAGE
        with pytest.raises(GuestMemoryError):
            mem.read(4 * PAGE, 1)
        with pytest.raises(InvalidParam):
            mem.remove_region(r2)
        # views taken before the removal still point at mapped memory (no crash)
        assert bytes(held) == b"new"
        assert bytes(arr) == b"new"
        assert mem.read(0, 1) == b"\x00"


def test_map_beyond_file_end_is_an_error_not_sigbus(memfd: int) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory.map_regions([MemoryRegion(0, 32 * PAGE, 0x1000, 0, memfd)])
    with pytest.raises(GuestMemoryError):
        GuestMemory.map_regions([MemoryRegion(0, PAGE, 0x1000, 64 * PAGE, memfd)])


def test_take_fds_closes_on_success_and_error() -> None:
    before = open_fds()
    a = os.memfd_create("a")
    b = os.memfd_create("b")
    os.ftruncate(a, PAGE)
    os.ftruncate(b, PAGE)
    with GuestMemory.map_regions(
        [MemoryRegion(0, PAGE, 0x1000, 0, a), MemoryRegion(PAGE, PAGE, 0x9000, 0, b)],
        take_fds=True,
    ) as mem:
        assert mem.read(PAGE, 1) == b"\x00"
    assert open_fds() == before
    for fd in (a, b):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    c = os.memfd_create("c")
    os.ftruncate(c, PAGE)
    with pytest.raises(GuestMemoryError):  # second region does not fit the file
        GuestMemory.map_regions(
            [MemoryRegion(0, PAGE, 0x1000, 0, c), MemoryRegion(PAGE, 8 * PAGE, 0x9000, 0, c)],
            take_fds=True,
        )
    assert open_fds() == before


def test_fd_count_unchanged_after_close() -> None:
    before = open_fds()
    mem = GuestMemory.allocate([(0, 4 * PAGE), (1 << 20, 4 * PAGE)])
    memfd = mem.regions[0].fd
    assert memfd is not None and open_fds() == before | {memfd}
    backend = GuestMemory.map_regions(mem.regions)
    assert open_fds() == before | {memfd}  # borrowed: no copy kept
    view = backend.gpa_view(8, 8)  # outstanding export: close must still work
    backend.close()
    mem.close()
    mem.close()  # idempotent
    assert open_fds() == before
    assert len(view) == 8
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)
    with pytest.raises(GuestMemoryError):
        backend.gpa_view(0, 1)
    del view


def test_allocate_rejects_bad_layouts() -> None:
    for layout in ([], [(0, 0)], [(0, PAGE), (PAGE // 2, PAGE)], [(U64, 2)]):
        with pytest.raises(InvalidParam):
            GuestMemory.allocate(layout)
