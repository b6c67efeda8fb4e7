"""The library's virtio-blk guest driver (:class:`vhostkit.guest.blk.BlkDriver`) itself.

tests/unit/test_blk.py uses the driver to test the back-end; here the back-end (vhostkit's
:class:`BlkDevice` over a real vhost-user socket) is the fixed point and the driver's own
behaviour is under test: its layout (defaults and a custom one, as the back-end sees it), the
typed errors for bad arguments and wrong states, out-of-order waits, and that it owns and
closes its fds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers.blk_driver import IMAGE_SIZE, pattern

from vhostkit.devices.blk import SECTOR_SIZE, BlkDevice, BlkRequestType, BlkStatus, request_header
from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest import BlkDriver as ExportedBlkDriver
from vhostkit.guest.blk import (
    DATA_AREA,
    DATA_BASE,
    MEM_SIZE,
    QUEUE_AREA,
    QUEUE_SIZE,
    BlkDriver,
    BlkLayout,
)
from vhostkit.user import BackendListener, Frontend

Connect = Callable[..., tuple[BlkDevice, Frontend]]


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def connect(fd_check, sock_dir: Path, tmp_path: Path) -> Iterator[Connect]:
    """``connect(num_queues=1)``: a fresh image, a BlkDevice serving it on a real socket and a
    Frontend connected to it; all closed after the test (the driver is the test's own)."""
    with ExitStack() as stack:
        count = iter(range(1000))

        def connect(num_queues: int = 1) -> tuple[BlkDevice, Frontend]:
            n = next(count)
            image = tmp_path / f"disk{n}.img"
            with image.open("wb") as f:
                f.truncate(IMAGE_SIZE)
            device = stack.enter_context(BlkDevice(image, num_queues=num_queues))
            path = sock_dir / f"blk{n}.sock"
            listener = BackendListener(str(path), lambda: device, max_connections=1).start()
            stack.callback(_stop, listener)
            fe = Frontend.connect(path, timeout=5)
            stack.callback(fe.close)
            return device, fe

        yield connect


def _stop(listener: BackendListener) -> None:
    listener.stop()
    assert not listener.errors, listener.errors


def test_exported_from_vhostkit_guest() -> None:
    assert ExportedBlkDriver is BlkDriver


def test_default_layout_is_the_documented_one(connect: Connect) -> None:
    device, fe = connect(num_queues=2)
    assert BlkLayout() == BlkLayout(MEM_SIZE, QUEUE_SIZE, QUEUE_AREA, DATA_BASE, DATA_AREA)
    with BlkDriver(fe, num_queues=2) as d:
        d.start()
        assert d.mem.regions[0].guest_phys_addr == 0
        assert d.mem.regions[0].memory_size == MEM_SIZE
        for q in range(2):
            info = device.active[q].info
            assert info.num == QUEUE_SIZE
            assert info.addr is not None and info.addr.desc == d.mem.gpa_to_uva(q * QUEUE_AREA)
            token, ins = d.submit([request_header(BlkRequestType.IN, 0)], [SECTOR_SIZE, 1], queue=q)
            assert ins[0][0] == DATA_BASE + q * DATA_AREA + 64  # after the 16-byte header
            assert d.wait(token, q) == SECTOR_SIZE + 1


def test_a_custom_layout_is_what_the_back_end_gets(connect: Connect) -> None:
    device, fe = connect(num_queues=2)
    layout = BlkLayout(
        mem_size=8 << 20, queue_size=256, queue_area=0x4000, data_base=0x10000, data_area=0x80000
    )
    with BlkDriver(fe, num_queues=2, layout=layout) as d:
        assert d.queue_size == 256
        d.start()
        assert d.mem.regions[0].memory_size == 8 << 20
        for q in range(2):
            info = device.active[q].info
            assert info.num == 256
            assert info.addr is not None and info.addr.desc == d.mem.gpa_to_uva(q * 0x4000)
            data = pattern(8 * SECTOR_SIZE, q)
            assert d.write(16 * q, data, queue=q).status == BlkStatus.OK
            reply = d.read(16 * q, len(data), queue=q)
            assert reply.status == BlkStatus.OK and reply.data == data
            # the data went through the queue's own request area
            start = layout.data_start(q)
            assert start == 0x10000 + q * 0x80000
            assert d.mem.read(start + 64, len(data)) == data


@pytest.mark.parametrize(
    ("layout", "num_queues", "words"),
    [
        (BlkLayout(queue_size=48), 1, "power of two"),
        (BlkLayout(queue_size=0), 1, "power of two"),
        (BlkLayout(queue_size=65536), 1, "power of two"),
        (BlkLayout(queue_area=0x1008), 1, "multiple of 16"),
        (BlkLayout(queue_size=1024, queue_area=0x1000), 1, "queue_area"),
        (BlkLayout(queue_area=0x8000, data_base=0x10000), 3, "overlap"),
        (BlkLayout(data_area=32), 1, "smaller than one buffer"),
        (BlkLayout(mem_size=4 << 20), 2, "past the guest memory"),
        (BlkLayout(), 0, "num_queues"),
    ],
    ids=[
        "queue-size-48",
        "queue-size-0",
        "queue-size-too-big",
        "queue-area-unaligned",
        "ring-larger-than-its-area",
        "rings-overlap-data",
        "tiny-data-area",
        "data-past-memory",
        "no-queues",
    ],
)
def test_a_layout_that_does_not_fit_is_refused_before_anything_is_opened(
    fd_check, layout: BlkLayout, num_queues: int, words: str
) -> None:
    before = open_fds()
    with pytest.raises(InvalidParam, match=words):
        BlkDriver(None, num_queues=num_queues, layout=layout)  # type: ignore[arg-type]
    assert open_fds() == before


def test_close_closes_every_fd_it_owns_and_is_idempotent(connect: Connect) -> None:
    _, fe = connect(num_queues=2)
    before = open_fds()
    d = BlkDriver(fe, num_queues=2)
    owned = {*d.kicks, *d.calls, *d.errs}
    assert len(owned) == 6 and not owned & before
    d.start()
    d.close()
    assert d.closed and d.mem.closed
    assert not owned & open_fds()
    d.close()  # a second close does nothing (in particular, closes no one else's fds)
    assert fe.get_queue_num() == 2  # the borrowed front-end is still open


def test_leaving_the_with_block_closes(connect: Connect) -> None:
    _, fe = connect()
    with pytest.raises(RuntimeError, match="boom"), BlkDriver(fe) as d:
        d.start()
        raise RuntimeError("boom")
    assert d.closed


def test_wrong_states_are_invalid_operations(connect: Connect) -> None:
    _, fe = connect()
    d = BlkDriver(fe)
    with pytest.raises(InvalidOperation, match="not started"):
        d.read(0, SECTOR_SIZE)
    d.start()
    with pytest.raises(InvalidOperation, match="already started"):
        d.start()
    assert d.read(0, SECTOR_SIZE).status == BlkStatus.OK
    d.close()
    for call in (d.start, d.config, lambda: d.read(0, SECTOR_SIZE)):
        with pytest.raises(InvalidOperation, match="closed"):
            call()


def test_bad_request_arguments_are_invalid_params_and_post_nothing(connect: Connect) -> None:
    device, fe = connect(num_queues=2)
    with BlkDriver(fe, num_queues=2) as d:
        d.start()
        q = d.queues[0]
        with pytest.raises(InvalidParam, match="queue 2 out of range"):
            d.read(0, SECTOR_SIZE, queue=2)
        with pytest.raises(InvalidParam, match="does not fit"):
            d.read(0, DATA_AREA)  # the data and the status byte are one byte too many
        with pytest.raises(InvalidParam, match="split"):
            d.write(0, b"\0" * SECTOR_SIZE, split=0)
        with pytest.raises(InvalidParam, match="negative"):
            d.submit([request_header(BlkRequestType.IN, 0)], [-1, 1])
        with pytest.raises(InvalidParam, match="no request 99"):
            d.wait(99)
        assert q.num_free == QUEUE_SIZE and q.avail_idx == 0  # nothing was posted
        # a chain that fills most of the area still goes through
        big = DATA_AREA - 2 * SECTOR_SIZE
        reply = d.read(0, big)
        assert reply.status == BlkStatus.OK and len(reply.data) == big
        assert device.completed[BlkStatus.OK] == 1


def test_waits_may_come_in_any_order(connect: Connect) -> None:
    """A virtio-blk device may complete requests out of order; whichever the driver waits for
    first, each wait gets its own chain's used length."""
    _, fe = connect()
    with BlkDriver(fe) as d:
        d.start()
        first, ins1 = d.submit([request_header(BlkRequestType.IN, 0)], [SECTOR_SIZE, 1])
        second, ins2 = d.submit([request_header(BlkRequestType.GET_ID, 0)], [20, 1])
        # the second chain's buffers go after the first's in the request area
        assert ins2[0][0] > ins1[-1][0]
        assert d.wait(second) == 21
        assert d.wait(first) == SECTOR_SIZE + 1
        with pytest.raises(InvalidParam, match=f"no request {first}"):
            d.wait(first)  # each completion is handed out once
        # with nothing outstanding the area is reused from its start
        third, ins3 = d.submit([request_header(BlkRequestType.IN, 0)], [SECTOR_SIZE, 1])
        assert ins3 == ins1
        assert d.wait(third) == SECTOR_SIZE + 1


def test_a_full_request_area_is_an_invalid_operation(connect: Connect) -> None:
    _, fe = connect()
    with BlkDriver(fe) as d:
        d.start()
        half = DATA_AREA // 2
        token, _ = d.submit([request_header(BlkRequestType.IN, 0)], [half, 1])
        with pytest.raises(InvalidOperation, match="full"):
            d.submit([request_header(BlkRequestType.IN, 0)], [half, 1])
        assert d.wait(token) == half + 1
        assert d.read(0, half).status == BlkStatus.OK  # room again


def test_a_request_the_device_never_completes_times_out(connect: Connect) -> None:
    _, fe = connect()
    with BlkDriver(fe) as d:
        d.start()
        fe.get_vring_base(0)  # the back-end stops the ring: the kick finds nobody
        token, _ = d.submit([request_header(BlkRequestType.IN, 0)], [SECTOR_SIZE, 1])
        with pytest.raises(TimeoutError, match=f"request {token} on queue 0"):
            d.wait(token, timeout=0.2)
