"""The dirty-page log: layout, marking, collecting, and sharing between processes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import GuestMemoryError, InvalidParam
from vhostkit.types import MemoryRegion
from vhostkit.virtio.dirty_log import LOG_PAGE_SIZE, DirtyLog, DirtyLogError, log_size_for


def _pages(writes: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for gpa, length in writes:
        if length:
            out.update(range(gpa // LOG_PAGE_SIZE, (gpa + length - 1) // LOG_PAGE_SIZE + 1))
    return out


def test_size_covers_the_highest_address_in_whole_words() -> None:
    assert log_size_for(0) == 8
    assert log_size_for(1) == 8
    assert log_size_for(64 * LOG_PAGE_SIZE) == 8
    assert log_size_for(64 * LOG_PAGE_SIZE + 1) == 16
    regions = [
        MemoryRegion(guest_phys_addr=0, memory_size=0xA0000, userspace_addr=0),
        MemoryRegion(guest_phys_addr=0x100000, memory_size=256 << 20, userspace_addr=0),
    ]
    # 257 MiB of guest-physical space: 65,792 pages, 1,028 words.
    assert log_size_for(regions) == 1028 * 8


def test_layout_is_bit_p_mod_8_of_byte_p_div_8() -> None:
    with DirtyLog.allocate(64) as dlog:
        dlog.mark(9 * LOG_PAGE_SIZE + 100, 1)
        raw = os.pread(dlog.fd, 64, 0)
        assert raw[1] == 1 << 1 and sum(raw) == 2
        assert dlog.snapshot().tolist() == [9]


def test_a_write_across_pages_marks_each_and_collect_clears() -> None:
    with DirtyLog.allocate(64) as dlog:
        dlog.mark(LOG_PAGE_SIZE - 1, 2)
        dlog.mark(10 * LOG_PAGE_SIZE, 3 * LOG_PAGE_SIZE)
        dlog.mark(300 * LOG_PAGE_SIZE, 0)
        assert dlog.collect().tolist() == [0, 1, 10, 11, 12]
        assert dlog.collect().tolist() == []
        assert os.pread(dlog.fd, 64, 0) == bytes(64)


def test_a_write_beyond_the_log_is_refused_and_marks_nothing() -> None:
    with DirtyLog.allocate(8) as dlog:
        with pytest.raises(DirtyLogError) as info:
            dlog.mark(64 * LOG_PAGE_SIZE, 1)
        assert isinstance(info.value, GuestMemoryError)
        with pytest.raises(DirtyLogError):
            dlog.mark_ranges([0, 63 * LOG_PAGE_SIZE], [1, LOG_PAGE_SIZE + 1])
        assert dlog.snapshot().tolist() == []


@pytest.mark.parametrize("offset", [0, 8, 3, LOG_PAGE_SIZE + 24])
def test_a_log_mapped_from_a_peers_fd_at_an_offset(offset: int) -> None:
    size = 64
    with DirtyLog.allocate(-(-(offset + size) // 8) * 8) as owner:
        peer = DirtyLog.map(owner.fd, size, offset)
        try:
            peer.mark_ranges([0, 5 * LOG_PAGE_SIZE, 70 * LOG_PAGE_SIZE], [1, 2, LOG_PAGE_SIZE])
            peer.mark(size * 8 * LOG_PAGE_SIZE - 1, 1)
            raw = os.pread(owner.fd, size, offset)
            marked = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little"))
            assert marked.tolist() == [0, 5, 70, size * 8 - 1]
            assert peer.collect().tolist() == [0, 5, 70, size * 8 - 1]
            assert os.pread(owner.fd, size, offset) == bytes(size)
        finally:
            peer.close()
        with pytest.raises(InvalidParam):
            peer.mark(0, 1)


def test_bad_maps_are_refused() -> None:
    with DirtyLog.allocate(64) as owner:
        with pytest.raises(InvalidParam):
            DirtyLog.map(owner.fd, 0)
        with pytest.raises(InvalidParam):
            DirtyLog.map(owner.fd, 64, 8)  # beyond the end of the file
        with pytest.raises(InvalidParam):
            DirtyLog.map(owner.fd, 8, (1 << 64) - 4)
    with pytest.raises(InvalidParam):
        DirtyLog.map(-1, 8)
    with pytest.raises(InvalidParam):
        DirtyLog.allocate(12)


def test_close_releases_the_memfd() -> None:
    dlog = DirtyLog.allocate(64)
    fd = dlog.fd
    dlog.close()
    dlog.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert dlog.closed


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 512 * LOG_PAGE_SIZE - 1), st.integers(0, 5 * LOG_PAGE_SIZE)),
        max_size=40,
    )
)
def test_marks_exactly_the_pages_written(writes: list[tuple[int, int]]) -> None:
    writes = [(gpa, min(length, 512 * LOG_PAGE_SIZE - gpa)) for gpa, length in writes]
    with DirtyLog.allocate(log_size_for(512 * LOG_PAGE_SIZE)) as dlog:
        half = len(writes) // 2
        for gpa, length in writes[:half]:
            dlog.mark(gpa, length)
        dlog.mark_ranges([w[0] for w in writes[half:]], [w[1] for w in writes[half:]])
        assert set(dlog.collect().tolist()) == _pages(writes)
        assert dlog.snapshot().size == 0


def test_no_mark_is_lost_while_the_vmm_collects() -> None:
    """Writers in two threads and in a child process race a collector: every page arrives."""
    pages = 4096
    with DirtyLog.allocate(log_size_for(pages * LOG_PAGE_SIZE)) as dlog:
        seen: set[int] = set()
        done = threading.Event()

        def writer(first: int) -> None:
            for p in range(first, pages, 3):
                dlog.mark(p * LOG_PAGE_SIZE, 1)

        pid = os.fork()
        if pid == 0:  # the "device" in another process, on its own mapping
            try:
                peer = DirtyLog.map(dlog.fd, dlog.size)
                for p in range(2, pages, 3):
                    peer.mark_ranges([p * LOG_PAGE_SIZE], [1])
            finally:
                os._exit(0)
        threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()

        def collector() -> None:
            while not done.is_set():
                seen.update(dlog.collect().tolist())

        c = threading.Thread(target=collector)
        c.start()
        for t in threads:
            t.join()
        _, status = os.waitpid(pid, 0)
        done.set()
        c.join()
        seen.update(dlog.collect().tolist())
        assert os.waitstatus_to_exitcode(status) == 0
        assert seen == set(range(pages))
