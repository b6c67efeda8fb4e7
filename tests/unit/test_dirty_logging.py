"""Dirty logging in the back-end framework: SET_LOG_BASE / SET_LOG_FD handling, and QEMU's way
of turning logging on and off while rings run (SET_LOG_BASE, SET_FEATURES with LOG_ALL, then
SET_VRING_ADDR with VHOST_VRING_F_LOG on each running ring; the reverse to stop).

Everything goes through a real socket: vhostkit's Frontend -> BackendReqServer -> the device
(:class:`BlkDevice` on a file, with vhostkit's blk driver as the guest). Mappings and fds are
checked in ``/proc/self``.
"""

from __future__ import annotations

import errno
import os
import select
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vhostkit.backend import LogRegion
from vhostkit.devices.blk import BlkDevice
from vhostkit.errors import RequestFailed
from vhostkit.guest.blk import DRIVER_PROTOCOL, BlkDriver
from vhostkit.types import VHOST_VRING_F_LOG
from vhostkit.user import BackendListener, Frontend
from vhostkit.user.message import ProtocolFeature as P
from vhostkit.virtio.dirty_log import LOG_PAGE_SIZE, DirtyLog, log_size_for
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.split.layout import used_ring_size

LOG_ALL = int(VirtioFeature.LOG_ALL)


def mapped(name: str) -> int:
    """How many mappings of memfd ``name`` this process has."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def fds_to(name: str) -> int:
    """How many fds of this process are memfd ``name``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} "):
                n += 1
        except OSError:
            pass
    return n


def pages_of(gpa: int, n: int) -> set[int]:
    return set(range(gpa // LOG_PAGE_SIZE, (gpa + n - 1) // LOG_PAGE_SIZE + 1))


class Rig:
    """A BlkDevice served over a socket, and a started BlkDriver that may log."""

    def __init__(self, path: Path, image: Path) -> None:
        with image.open("wb") as f:
            f.truncate(1 << 20)
        self.device = BlkDevice(image)
        self.listener = BackendListener(str(path), lambda: self.device, max_connections=1)
        self.listener.start()
        self.fe = Frontend.connect(str(path), timeout=5)
        self.drv = BlkDriver(self.fe, protocol=DRIVER_PROTOCOL | P.LOG_SHMFD)
        self.drv.start()

    def close(self) -> None:
        self.drv.close()
        self.fe.close()
        self.listener.stop()
        self.device.close()
        assert not self.listener.errors

    def log_region(self, dlog: DirtyLog) -> LogRegion:
        return LogRegion(dlog.fd, dlog.size, 0)


@pytest.fixture
def rig(fd_check: object, sock_dir: Path, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(sock_dir / "blk.sock", tmp_path / "disk.img")
    yield r
    r.close()


def new_log(rig: Rig) -> tuple[DirtyLog, str]:
    name = f"vhk-log-{uuid.uuid4().hex[:8]}"
    return DirtyLog.allocate(log_size_for(rig.drv.mem.regions), name=name), name


# --- SET_LOG_BASE -----------------------------------------------------------------------------


def test_set_log_base_maps_the_log_and_keeps_no_fd(rig: Rig) -> None:
    dlog, name = new_log(rig)
    with dlog:
        assert mapped(name) == 1 and fds_to(name) == 1  # ours
        rig.fe.set_log_base(0, rig.log_region(dlog))
        assert rig.device.dirty_log is not None
        assert rig.device.dirty_log.pages == dlog.pages
        assert mapped(name) == 2  # ours and the device's
        assert fds_to(name) == 1  # the device closed the fd once it mapped it
        # the device's mapping is the VMM's log: a mark there is seen here
        rig.device.dirty_log.mark(5 * LOG_PAGE_SIZE, 1)
        assert dlog.collect().tolist() == [5]


@pytest.mark.parametrize(
    ("size", "offset", "why"),
    [
        (0, 0, "empty"),
        (1 << 30, 0, "beyond the file"),
        (None, 4096, "offset pushes it beyond the file"),
        (8, 0, "does not cover guest memory"),
        (None, -1, "offset overflows"),
    ],
)
def test_a_bad_log_is_refused_and_leaves_nothing(
    rig: Rig, size: int | None, offset: int, why: str
) -> None:
    good, good_name = new_log(rig)
    bad, bad_name = new_log(rig)
    with good, bad:
        rig.fe.set_log_base(0, rig.log_region(good))
        region = LogRegion(bad.fd, bad.size if size is None else size, offset % (1 << 64))
        with pytest.raises(RequestFailed) as info:
            rig.fe.set_log_base(0, region)
        assert info.value.errno == errno.EINVAL, why
        # nothing of the refused log is kept; the previous log stays in place
        assert mapped(bad_name) == 1 and fds_to(bad_name) == 1
        assert mapped(good_name) == 2
        assert rig.device.dirty_log is not None and rig.device.dirty_log.pages == good.pages


def test_a_log_fd_that_cannot_be_mapped_is_refused(rig: Rig) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(RequestFailed):
            rig.fe.set_log_base(0, LogRegion(efd, 4096, 0))
        assert rig.device.dirty_log is None
    finally:
        os.close(efd)


def test_a_new_log_replaces_the_old_which_is_unmapped(rig: Rig) -> None:
    first, first_name = new_log(rig)
    second, second_name = new_log(rig)
    with first, second:
        rig.fe.set_log_base(0, rig.log_region(first))
        rig.fe.set_log_base(0, rig.log_region(second))
        assert mapped(first_name) == 1 and mapped(second_name) == 2
        assert fds_to(first_name) == fds_to(second_name) == 1


def test_reset_and_disconnect_unmap_the_log(rig: Rig) -> None:
    dlog, name = new_log(rig)
    with dlog:
        rig.fe.set_log_base(0, rig.log_region(dlog))
        assert mapped(name) == 2
        rig.device.reset_device()  # what RESET_DEVICE / RESET_OWNER do
        assert mapped(name) == 1 and rig.device.dirty_log is None
        rig.fe.set_log_base(0, rig.log_region(dlog))
        assert mapped(name) == 2
        rig.fe.close()
        rig.device.wait_for(lambda: rig.device.dirty_log is None)
        assert mapped(name) == 1


# --- SET_LOG_FD -------------------------------------------------------------------------------


def eventfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return n


def test_set_log_fd_takes_an_eventfd_and_replaces_the_old_one(rig: Rig) -> None:
    base = eventfds()
    a = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        rig.fe.set_log_fd(a)
        assert eventfds() == base + 3  # ours and the device's copy
        rig.fe.set_log_fd(b)
        assert eventfds() == base + 3  # the first copy was closed
        memfd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
        try:
            with pytest.raises(RequestFailed):
                rig.fe.set_log_fd(memfd)
        finally:
            os.close(memfd)
        assert eventfds() == base + 3
    finally:
        os.close(a)
        os.close(b)


# --- logging while rings run -------------------------------------------------------------------


def start_logging(rig: Rig, dlog: DirtyLog, log_fd: int | None = None) -> None:
    """QEMU's sequence (vhost_dev_set_log): log base, LOG_ALL, then each ring's F_LOG."""
    fe, drv = rig.fe, rig.drv
    fe.set_log_base(0, rig.log_region(dlog))
    if log_fd is not None:
        fe.set_log_fd(log_fd)
    fe.set_features(drv.features | LOG_ALL)
    for q in drv.queues:
        fe.set_vring_addr(q.vring_addr(log=q.ring_gpas[2], flags=VHOST_VRING_F_LOG))


def stop_logging(rig: Rig) -> None:
    fe, drv = rig.fe, rig.drv
    fe.set_features(drv.features)
    for q in drv.queues:
        fe.set_vring_addr(q.vring_addr())


def test_logging_starts_and_stops_on_running_rings_with_requests_in_flight(rig: Rig) -> None:
    drv = rig.drv
    used_gpa = drv.queues[0].ring_gpas[2]
    ring_pages = pages_of(used_gpa, used_ring_size(drv.queue_size))
    data = os.urandom(3 * LOG_PAGE_SIZE)
    assert drv.write(8, data).status == 0
    dlog, _ = new_log(rig)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with dlog:
            # requests go in before logging starts and are answered while it does
            tokens = [drv.submit(*read_request(8, len(data))) for _ in range(4)]
            start_logging(rig, dlog, call)
            dev = rig.device
            dev.wait_for(lambda: all(a.queue.logs_ring for a in dev.active.values()))
            # the requests sent before are all answered (none lost, positions kept); their
            # data is marked if the device wrote it after logging started, so maybe
            maybe: set[int] = set()
            for token, bufs in tokens:
                assert drv.wait(token) == len(data) + 1
                for gpa, n in bufs:
                    maybe |= pages_of(gpa, n)
            dlog.collect()
            reply, bufs = read_with_buffers(drv, 8, len(data))
            assert reply == data
            written: set[int] = set()
            for gpa, n in bufs:
                written |= pages_of(gpa, n)
            marked = set(dlog.collect().tolist())
            assert written <= marked, sorted(written - marked)
            assert marked <= written | ring_pages, sorted(marked - written - ring_pages)
            assert marked & ring_pages  # the used ring's updates are logged too
            assert select.select([call], [], [], 5)[0]  # and the front-end is told
            os.eventfd_read(call)
            # the ring kept its place: a write and a read still go through
            assert drv.write(64, b"x" * 512).status == 0
            stop_logging(rig)
            dev.wait_for(lambda: not any(a.queue.logging for a in dev.active.values()))
            dlog.collect()
            os.eventfd_read(call)  # the write's signal, while logging
            assert drv.read(8, len(data)).data == data
            assert dlog.collect().tolist() == []  # nothing is logged once it stopped
            assert not select.select([call], [], [], 0)[0]
    finally:
        os.close(call)


def test_moving_a_running_ring_is_refused(rig: Rig) -> None:
    q = rig.drv.queues[0]
    with pytest.raises(RequestFailed):
        rig.fe.set_vring_addr(replace(q.vring_addr(), used=q.vring_addr().used + 64))
    assert rig.drv.write(0, b"y" * 512).status == 0  # the ring runs on, unchanged


# --- helpers ----------------------------------------------------------------------------------


def read_request(sector: int, nbytes: int) -> tuple[list[bytes], list[int]]:
    from vhostkit.virtio.blk import BlkRequestType, request_header

    return [request_header(BlkRequestType.IN, sector)], [nbytes, 1]


def read_with_buffers(drv: BlkDriver, sector: int, nbytes: int) -> tuple[bytes, list]:
    token, bufs = drv.submit(*read_request(sector, nbytes))
    drv.wait(token)
    gpa, n = bufs[0]
    return drv.mem.read(gpa, n), bufs


# --- the real daemon ---------------------------------------------------------------------------


def test_the_blk_daemon_logs_while_requests_flow(
    fd_check: object, sock_dir: Path, tmp_path: Path
) -> None:
    """``python3 -m vhostkit blk-backend``, driven by vhostkit's Frontend and blk driver: logging
    turned on with requests going, the log checked, turned off again."""
    from helpers.vhostkit_daemon import assert_clean_output, start_blk_daemon

    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.write(os.urandom(1 << 20))
    sock = sock_dir / "blk.sock"
    with start_blk_daemon(sock, image) as daemon:
        with Frontend.connect(sock, timeout=5) as fe:
            drive_logging(fe, image)
        _, output = daemon.stop()
    assert_clean_output(output)


def drive_logging(fe: Frontend, image: Path) -> None:
    """Logging on with requests in flight, the log checked each round, then off."""
    drv = BlkDriver(fe, protocol=DRIVER_PROTOCOL | P.LOG_SHMFD)
    try:
        drv.start()
        assert fe.get_features() & LOG_ALL
        q = drv.queues[0]
        ring_pages = pages_of(q.ring_gpas[2], used_ring_size(drv.queue_size))
        with DirtyLog.allocate(log_size_for(drv.mem.regions)) as dlog:
            pending = [drv.submit(*read_request(8 * i, 4096)) for i in range(8)]
            # QEMU's sequence, with requests in flight
            fe.set_log_base(0, LogRegion(dlog.fd, dlog.size, 0))
            fe.set_features(drv.features | LOG_ALL)
            fe.set_vring_addr(q.vring_addr(log=q.ring_gpas[2], flags=VHOST_VRING_F_LOG))
            for token, _ in pending:
                assert drv.wait(token) == 4097  # none lost
            for round_ in range(5):
                dlog.collect()
                sector = 16 * round_
                reply, bufs = read_with_buffers(drv, sector, 2 * LOG_PAGE_SIZE + 512)
                assert reply == image.read_bytes()[sector * 512 :][: len(reply)]
                written = set().union(*(pages_of(g, n) for g, n in bufs))
                marked = set(dlog.collect().tolist())
                assert written <= marked, sorted(written - marked)
                assert marked <= written | ring_pages
            # and off again: nothing more is logged, the ring goes on where it was
            fe.set_features(drv.features)
            fe.set_vring_addr(q.vring_addr())
            assert drv.write(0, b"z" * 512).status == 0
            dlog.collect()
            assert drv.read(0, 512).data == b"z" * 512
            assert dlog.collect().tolist() == []
        for index in range(drv.num_queues):
            fe.get_vring_base(index)
    finally:
        drv.close()


def test_blk_read_data_and_status_pages_are_marked(rig: Rig) -> None:
    """Arbitrary batches of requests (reads of any length split over buffers, writes,
    GET_ID): the pages of every writable byte the device changed are marked (the shadow, a copy
    of guest memory before each batch, tells which), and nothing but the pages of the chains'
    writable buffers and the used ring."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vhostkit.virtio.blk import BlkRequestType, request_header

    drv = rig.drv
    with DirtyLog.allocate(log_size_for(drv.mem.regions)) as dlog:
        start_logging(rig, dlog)
        q = drv.queues[0]
        ring_pages = pages_of(q.ring_gpas[2], used_ring_size(drv.queue_size))
        area = (drv.layout.data_base, drv.layout.data_area)

        request = st.one_of(
            st.tuples(st.just("read"), st.integers(0, 1000), st.integers(1, 24), st.integers(1, 3)),
            st.tuples(st.just("write"), st.integers(0, 1000), st.integers(1, 4), st.just(1)),
            st.tuples(st.just("id"), st.just(0), st.just(0), st.just(1)),
        )

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(request, min_size=1, max_size=6))
        def one_batch(batch: list[tuple[str, int, int, int]]) -> None:
            drv.mem.write(area[0], b"\xee" * area[1])  # the fill the driver gives buffers
            before = np.frombuffer(drv.mem.read(0, drv.layout.mem_size), np.uint8).copy()
            dlog.collect()
            sent = []
            for kind, sector, sectors, split in batch:
                if kind == "read":
                    n = sectors * 512
                    sizes = [n // split] * (split - 1) + [n - n // split * (split - 1)]
                    out = [request_header(BlkRequestType.IN, sector)]
                    sent.append(drv.submit(out, [*sizes, 1]))
                elif kind == "write":
                    out = [request_header(BlkRequestType.OUT, sector), b"\x11" * 512 * sectors]
                    sent.append(drv.submit(out, [1]))
                else:
                    sent.append(drv.submit([request_header(BlkRequestType.GET_ID)], [20, 1]))
            writable: list[tuple[int, int]] = []
            for token, bufs in sent:
                drv.wait(token)
                writable += bufs
            after = np.frombuffer(drv.mem.read(0, drv.layout.mem_size), np.uint8)
            changed: set[int] = set()
            for gpa, n in writable:
                diff = np.flatnonzero(before[gpa : gpa + n] != after[gpa : gpa + n])
                changed |= {(gpa + int(i)) // LOG_PAGE_SIZE for i in diff}
            marked = set(dlog.collect().tolist())
            allowed = set().union(*(pages_of(g, n) for g, n in writable)) | ring_pages
            assert changed <= marked, sorted(changed - marked)
            assert marked <= allowed, sorted(marked - allowed)

        one_batch()
