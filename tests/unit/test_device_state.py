"""Device state (protocol feature DEVICE_STATE): the format, and SAVE/LOAD/CHECK over a socket.

The format tests build states, round-trip them and corrupt them every way a transfer can: every
truncation, every single-bit flip, trailing bytes, and well-checksummed bodies that are wrong
in each field. The transfer tests run vhostkit's blk device behind a real socket, with
vhostkit's Frontend and blk driver as the VMM and the guest; the net daemons are moved in
tests/host/test_device_state_swap.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from helpers.blk_driver import IMAGE_SIZE, pattern

from vhostkit.devices.blk import SECTOR_SIZE, BlkDevice, BlkRequestType, BlkStatus
from vhostkit.devices.net import NET_PROTOCOL_FEATURES
from vhostkit.devices.net_kernel import KERNEL_NET_PROTOCOL_FEATURES
from vhostkit.devices.net_swap import SWAP_PROTOCOL_FEATURES
from vhostkit.errors import DeviceStateMismatch, RequestFailed, StateFormatError
from vhostkit.guest.blk import DRIVER_PROTOCOL, BlkDriver
from vhostkit.user import BackendListener, Frontend
from vhostkit.user.backend.ring_device import ActiveRing
from vhostkit.user.backend.state import (
    MAGIC,
    BlkState,
    DeviceState,
    DeviceType,
    NetState,
    RingState,
    Tag,
)
from vhostkit.user.message import ProtocolFeature, TransferDirection

P = ProtocolFeature
PROTOCOL = DRIVER_PROTOCOL | P.DEVICE_STATE


def net_state() -> DeviceState:
    return DeviceState(
        device=DeviceType.NET,
        features=0x1_3000_0000 | (1 << 34),
        config=bytes.fromhex("525400000001") + struct.pack("<HHH", 1, 2, 1500),
        status=0xF,
        rings=(
            RingState(0, 256, 0x8000 | 17 | (17 << 16) | (1 << 31), True, packed=True),
            RingState(1, 256, 0x8000 | 3 | (3 << 16) | (1 << 31), False, packed=True),
        ),
        net=NetState(2, 9000),
    )


def blk_state() -> DeviceState:
    return DeviceState(
        device=DeviceType.BLK,
        features=0x1_0000_0044,
        config=bytes(range(60)),
        status=0xF,
        rings=(RingState(0, 128, 0xFFF0, True, inflight=(5, 0, 127)), RingState(3, 64, 0, True)),
        blk=BlkState(8192, 4096, False, b"disk-1"),
    )


def frame(body: bytes, *, device: int = 2, version: int = 1, flags: int = 0) -> bytes:
    header = struct.pack(
        "<4sHHIII", MAGIC, version, device, flags, len(body), zlib.crc32(body) & 0xFFFFFFFF
    )
    return header + body


def rec(tag: int, value: bytes) -> bytes:
    return struct.pack("<HI", tag, len(value)) + value


def ring_value(index=0, num=128, base=0, flags=1, reserved=0, heads=(), count=None) -> bytes:  # type: ignore[no-untyped-def]
    n = len(heads) if count is None else count
    return struct.pack("<HHIBBH", index, num, base, flags, reserved, n) + struct.pack(
        f"<{len(heads)}H", *heads
    )


BLK_RECORD = struct.pack("<QIB", 8192, 512, 0) + b"x"


def blk_body(*extra: bytes, ring: bytes | None = None, skip: Tag | None = None) -> bytes:
    parts = {
        Tag.FEATURES: rec(Tag.FEATURES, struct.pack("<Q", 0x44)),
        Tag.CONFIG: rec(Tag.CONFIG, bytes(60)),
        Tag.STATUS: rec(Tag.STATUS, struct.pack("<I", 0xF)),
        Tag.RING: rec(Tag.RING, ring if ring is not None else ring_value()),
        Tag.BLK: rec(Tag.BLK, BLK_RECORD),
    }
    return b"".join(v for k, v in parts.items() if k is not skip) + b"".join(extra)


# -- the format -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [net_state, blk_state], ids=["net", "blk"])
def test_round_trip(make: Callable[[], DeviceState]) -> None:
    state = make()
    data = state.pack()
    assert data[:4] == MAGIC
    assert DeviceState.unpack(data) == state
    assert DeviceState.unpack(memoryview(data)) == state


def test_minimal_state_round_trips() -> None:
    state = DeviceState(DeviceType.NET, 0, b"", net=NetState(1))
    assert DeviceState.unpack(state.pack()) == state


@pytest.mark.parametrize("make", [net_state, blk_state], ids=["net", "blk"])
def test_every_truncation_is_refused(make: Callable[[], DeviceState]) -> None:
    data = make().pack()
    for n in range(len(data)):
        with pytest.raises(StateFormatError):
            DeviceState.unpack(data[:n])


@pytest.mark.parametrize("make", [net_state, blk_state], ids=["net", "blk"])
def test_every_bit_flip_is_refused(make: Callable[[], DeviceState]) -> None:
    data = bytearray(make().pack())
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            with pytest.raises(StateFormatError):
                DeviceState.unpack(data)
            data[i] ^= 1 << bit
    assert DeviceState.unpack(data) == make()  # put back, it reads again


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(StateFormatError, match="after the device state"):
        DeviceState.unpack(blk_state().pack() + b"\0")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"XXXX" + frame(blk_body())[4:], "magic"),
        (frame(blk_body(), version=2), "format 2"),
        (frame(blk_body(), device=9), "unknown device type"),
        (frame(blk_body(), flags=1), "reserved header flags"),
        (frame(blk_body(rec(0x77, b"?"))), "unknown mandatory record"),
        (frame(blk_body(rec(Tag.STATUS, struct.pack("<I", 1)))), "record STATUS appears twice"),
        (frame(blk_body(skip=Tag.CONFIG)), "record CONFIG is missing"),
        (frame(blk_body(skip=Tag.BLK)), "wrong device records"),
        (frame(blk_body(rec(Tag.NET, struct.pack("<HH", 1, 0)))), "wrong device records"),
        (frame(blk_body(ring=ring_value(num=96))), "not a power of two"),
        (frame(blk_body(ring=ring_value(num=0))), "size 0"),
        (frame(blk_body(ring=ring_value(base=0x10000))), "0xffff"),
        (frame(blk_body(ring=ring_value(heads=(128,)))), "beyond the ring"),
        (frame(blk_body(ring=ring_value(heads=(3, 3)))), "held twice"),
        (frame(blk_body(ring=ring_value(flags=4))), "reserved bits"),
        (frame(blk_body(ring=ring_value(reserved=1))), "reserved bits"),
        (frame(blk_body(ring=ring_value(heads=(1,), count=2))), "need"),
        (frame(blk_body(ring=ring_value(flags=3, base=200))), "beyond the ring"),
        (frame(blk_body(ring=ring_value(flags=3, heads=(1,)))), "packed ring"),
        (frame(blk_body(rec(Tag.RING, ring_value()))), "saved twice"),
        (frame(blk_body()[:-3]), "overruns"),
        (frame(blk_body() + b"\x01"), "truncated"),
        (frame(blk_body(rec(Tag.FEATURES, b"\0" * 4), skip=Tag.FEATURES)), "FEATURES record"),
        (frame(blk_body(rec(Tag.CONFIG, bytes(257)), skip=Tag.CONFIG)), "config space"),
        (frame(blk_body(rec(Tag.STATUS, struct.pack("<I", 256)), skip=Tag.STATUS)), "status"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_well_checksummed_but_wrong_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        DeviceState.unpack(data)


def test_optional_records_of_a_later_writer_are_skipped() -> None:
    state = DeviceState.unpack(frame(blk_body(rec(0x8001, b"later"))))
    assert state.blk == BlkState(8192, 512, False, b"x")
    assert state.rings == (RingState(0, 128, 0, True),)


def test_device_state_is_offered_only_where_it_is_implemented() -> None:
    assert NET_PROTOCOL_FEATURES & P.DEVICE_STATE
    assert not KERNEL_NET_PROTOCOL_FEATURES & P.DEVICE_STATE  # the kernel holds those rings
    assert not SWAP_PROTOCOL_FEATURES & P.DEVICE_STATE


# -- transfers over a socket ----------------------------------------------------------------


class HoldingBlk(BlkDevice):
    """A blk device that completes the first request of every batch and holds the rest (as a
    device with asynchronous I/O does while the I/O is under way)."""

    def process(self, ring: ActiveRing) -> None:
        while len(batch := ring.pop_batch()):
            first = batch[0]
            length, _ = self._handle(ring.index, first)
            ring.complete([first.id], np.array([length]))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def serve(sock_dir: Path, fd_check) -> Iterator[Callable[[BlkDevice], Frontend]]:  # type: ignore[no-untyped-def]
    with ExitStack() as stack:

        def start(device: BlkDevice) -> Frontend:
            stack.callback(device.close)
            path = sock_dir / f"blk{id(device)}.sock"
            listener = BackendListener(str(path), lambda: device, max_connections=1).start()
            stack.callback(listener.stop)
            fe = Frontend.connect(path, timeout=5)
            stack.callback(fe.close)
            return fe

        yield start


def driver_on(fe: Frontend, stack: ExitStack) -> BlkDriver:
    drv = BlkDriver(fe, protocol=PROTOCOL)
    stack.callback(drv.close)
    drv.start()
    assert drv.protocol & P.DEVICE_STATE
    return drv


def move(drv: BlkDriver, fe_b: Frontend) -> dict[int, int]:
    return drv.switch_frontend(
        fe_b, handover=lambda a, b: b.load_device_state(a.save_device_state())
    )


def test_state_moves_and_writes_go_on_on_the_destination(serve, image: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = BlkDevice(image), BlkDevice(image)
    fe_a, fe_b = serve(a), serve(b)
    with ExitStack() as stack:
        drv = driver_on(fe_a, stack)
        assert drv.write(0, pattern(4096, 1)).status == BlkStatus.OK
        positions = move(drv, fe_b)
        assert positions == {0: 1}
        assert b.loaded_state is not None and b.loaded_state.rings[0].base == 1
        assert b.loaded_state.blk == BlkState(a.capacity, 512, False, b"vhostkit-blk")
        assert drv.write(8, pattern(4096, 2)).status == BlkStatus.OK
        assert drv.read(0, 4096).data == pattern(4096, 1)
        assert drv.queues[0].last_used_idx == 3  # three requests, each used once
        assert b.completed[BlkStatus.OK] == 2 and a.completed[BlkStatus.OK] == 1
    assert image.read_bytes()[8 * SECTOR_SIZE : 8 * SECTOR_SIZE + 4096] == pattern(4096, 2)


def test_requests_held_at_the_stop_complete_once_on_the_destination(serve, image: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = HoldingBlk(image), BlkDevice(image)
    fe_a, fe_b = serve(a), serve(b)
    with ExitStack() as stack:
        drv = driver_on(fe_a, stack)
        q = drv.queues[0]
        # eight writes published together, one kick: A completes one and holds seven
        _publish_writes(drv, 8)
        a.wait_for(lambda: a.completed[BlkStatus.OK] == 1)
        positions = move(drv, fe_b)
        assert positions == {0: 8}  # all eight were taken by A
        assert b.loaded_state is not None
        assert len(b.loaded_state.rings[0].inflight) == 7
        b.wait_for(lambda: b.completed[BlkStatus.OK] == 7)
        got = sorted(token for token, _ in _reap_all(drv, 8))
        assert got == list(range(200, 208))  # every request used exactly once
        assert q.last_used_idx == 8
    disk = image.read_bytes()
    for i in range(8):
        assert disk[8 * i * SECTOR_SIZE : 8 * i * SECTOR_SIZE + 512] == pattern(512, i)


def _publish_writes(drv: BlkDriver, n: int) -> None:
    """Publish ``n`` OUT requests of 512 bytes (pattern i at sector 8*i) with one kick."""
    q = drv.queues[0]
    base = drv.layout.data_start(0)
    while q.reap():
        pass
    for i in range(n):
        hdr, data, status = base + i * 8192, base + i * 8192 + 64, base + i * 8192 + 1024
        drv.mem.write(hdr, struct.pack("<IIQ", BlkRequestType.OUT, 0, 8 * i))
        drv.mem.write(data, pattern(512, i))
        q.add([(hdr, 16), (data, 512)], [(status, 1)], token=200 + i)
    q.publish()
    from vhostkit.guest.rings import kick_eventfd

    kick_eventfd(drv.kicks[0])


def _reap_all(drv: BlkDriver, n: int) -> list[tuple[int, int]]:
    from vhostkit.guest.rings import wait_readable

    got: list[tuple[int, int]] = []
    q = drv.queues[0]
    for _ in range(200):
        got += [(t, u) for t, u in q.reap() if isinstance(t, int) and t >= 200]
        if len(got) >= n:
            return got
        wait_readable((drv.calls[0],), 0.05)
    return got


def test_a_state_is_taken_only_from_a_stopped_device(serve, image: Path) -> None:  # type: ignore[no-untyped-def]
    fe = serve(BlkDevice(image))
    with ExitStack() as stack:
        driver_on(fe, stack)
        with pytest.raises(RequestFailed, match="refused"):
            fe.save_device_state()  # ring 0 runs
        with pytest.raises(RequestFailed):
            fe.check_device_state()  # nothing to check
        fe.get_vring_base(0)
        assert DeviceState.unpack(fe.save_device_state()).rings[0].base == 0


@pytest.mark.parametrize(
    "bad",
    ["corrupt", "truncated", "net", "other disk", "empty"],
)
def test_a_bad_state_fails_the_check_and_changes_nothing(serve, image: Path, bad: str) -> None:  # type: ignore[no-untyped-def]
    source = BlkDevice(image)
    fe_a = serve(source)
    other = image.with_name("other.img")
    with other.open("wb") as f:
        f.truncate(2 * IMAGE_SIZE)
    dest = BlkDevice(image)
    fe_b = serve(dest)
    with ExitStack() as stack:
        drv = driver_on(fe_a, stack)
        fe_a.get_vring_base(0)
        good = fe_a.save_device_state()
        data = {
            "corrupt": good[:30] + bytes([good[30] ^ 0x40]) + good[31:],
            "truncated": good[:-1],
            "net": net_state().pack(),
            "other disk": _state_of(BlkDevice(other), drv),
            "empty": b"",
        }[bad]
        fe_b.set_owner()
        fe_b.negotiate(drv.features, PROTOCOL)
        with pytest.raises(RequestFailed, match="failed state transfer"):
            fe_b.load_device_state(data)
        assert dest.loaded_state is None and dest.status == 0
        assert not any(r.num for r in dest.vrings)
        fe_b.load_device_state(good)  # the same device takes a good state afterwards
        assert dest.loaded_state == DeviceState.unpack(good)


def _state_of(device: BlkDevice, drv: BlkDriver) -> bytes:
    try:
        device.acked_features = drv.features
        device.vrings[0].num = 128
        return device.save_state().pack()
    finally:
        device.close()


def test_the_mismatch_is_typed(image: Path) -> None:
    with BlkDevice(image) as device:
        with pytest.raises(DeviceStateMismatch, match="NET state"):
            device.load_state(net_state())
        state = DeviceState(
            DeviceType.BLK, 0, bytes(device.config), blk=BlkState(1, 512, False, b"")
        )
        with pytest.raises(DeviceStateMismatch, match="another disk"):
            device.load_state(state)


def test_save_transfer_returns_the_back_ends_own_channel(serve, image: Path) -> None:  # type: ignore[no-untyped-def]
    import os

    fe = serve(BlkDevice(image))
    with ExitStack() as stack:
        driver_on(fe, stack)
        fe.get_vring_base(0)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            theirs = fe.set_device_state_fd(TransferDirection.SAVE, w)
            assert theirs is not None  # a memfd holding the whole state
            try:
                data = os.read(theirs, 1 << 20)
                assert os.read(theirs, 1) == b""
            finally:
                os.close(theirs)
        finally:
            os.close(r)
            os.close(w)
        fe.check_device_state()
        assert DeviceState.unpack(data).device is DeviceType.BLK


# -- the real daemons ---------------------------------------------------------------------


def test_blk_daemons_requests_in_flight_at_the_stop_complete_once_on_the_destination(
    sock_dir: Path, image: Path
) -> None:
    """Two ``vhostkit backend blk`` processes on one image (shared storage): the guest's
    writes published while A is stopped (in flight at the stop) are done by B, once each.
    QEMU 7.2 does not use DEVICE_STATE for blk: vhostkit's own front-end is the VMM here."""
    from helpers.vhostkit_daemon import assert_clean_output, start_blk_daemon

    with ExitStack() as stack:
        da = stack.enter_context(start_blk_daemon(sock_dir / "a.sock", image))
        db = stack.enter_context(start_blk_daemon(sock_dir / "b.sock", image))
        fe_a = stack.enter_context(Frontend.connect(sock_dir / "a.sock", timeout=5))
        fe_b = stack.enter_context(Frontend.connect(sock_dir / "b.sock", timeout=5))
        drv = driver_on(fe_a, stack)
        tokens = [drv.submit(*_write(i))[0] for i in range(10)]  # A serves these

        def handover(a: Frontend, b: Frontend) -> None:
            # A's ring is stopped: these stay in the avail ring, in flight at the stop
            tokens.extend(drv.submit(*_write(i))[0] for i in range(10, 20))
            b.load_device_state(a.save_device_state())

        positions = drv.switch_frontend(fe_b, handover=handover)
        assert positions[0] <= 10  # what A had taken; the rest is B's
        for token in tokens:
            assert drv.wait(token) == 1  # the status byte
        assert drv.queues[0].last_used_idx == 20  # 20 requests, each used exactly once
        for i in range(20):
            assert drv.read(8 * i, 512).data == pattern(512, i)
        assert fe_b.get_vring_base(0) == 20 + 20
        for d in (da, db):
            status, out = d.stop()
            assert status == 0
            assert_clean_output(out)
    disk = image.read_bytes()
    for i in range(20):
        assert disk[8 * i * SECTOR_SIZE : 8 * i * SECTOR_SIZE + 512] == pattern(512, i)


def _write(i: int) -> tuple[list[bytes], list[int]]:
    from vhostkit.devices.blk import request_header

    return [request_header(BlkRequestType.OUT, 8 * i), pattern(512, i)], [1]
