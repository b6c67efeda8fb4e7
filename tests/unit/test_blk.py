"""The file-backed virtio-blk back-end (:class:`BlkDevice`) over a real vhost-user socket.

The vhostkit :class:`Frontend` plays the VMM and a driver-role split queue in memfd guest
memory plays the guest's virtio-blk driver (:class:`vhostkit.guest.blk.BlkDriver`, also used
against qemu-storage-daemon). Every request goes through the ring and
the device's worker thread, exactly as a guest's would.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.blk_driver import IMAGE_SIZE, pattern, wait_readable

from vhostkit.devices import blk
from vhostkit.devices.blk import (
    BLK_CONFIG_SIZE,
    ID_BYTES,
    SECTOR_SIZE,
    BlkConfig,
    BlkDevice,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
    DiscardFlag,
    main,
    request_header,
    segment,
)
from vhostkit.errors import RequestFailed
from vhostkit.guest.blk import DATA_BASE, DRIVER_PROTOCOL, QUEUE_SIZE, BlkDriver
from vhostkit.user import BackendListener, Frontend, FrontendReqHandler, FrontendReqServer
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature

P = ProtocolFeature
T = BlkRequestType
S = BlkStatus
BF = BlkFeature
VF = VirtioFeature


class ConfigWatcher(FrontendReqHandler):
    """The VMM's side of CONFIG_CHANGE_MSG, as QEMU does it: re-read the config space."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.capacities: list[int] = []
        self.changed = threading.Event()

    def config_change(self) -> None:
        self.capacities.append(BlkConfig.unpack(self.fe.get_config(0, BLK_CONFIG_SIZE)).capacity)
        self.changed.set()


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Rig:
    device: BlkDevice
    driver: BlkDriver
    image: Path


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def rig_factory(fd_check, sock_dir, tmp_path) -> Iterator:
    """Build ``(device, driver)`` pairs over a real socket; everything is torn down after."""
    stack: list = []

    def build(*, num_queues: int = 1, read_only: bool = False, **device_kw: object) -> Rig:
        image = tmp_path / f"disk{len(stack)}.img"
        if not image.exists():
            make_image(image)
            with image.open("r+b") as f:  # a recognisable first sector
                f.write(pattern(SECTOR_SIZE, 1))
        device = BlkDevice(image, read_only=read_only, num_queues=num_queues, **device_kw)
        stack.append(device.close)
        path = sock_dir / f"blk{len(stack)}.sock"
        listener = BackendListener(str(path), lambda: device, max_connections=1).start()
        stack.append(lambda: _stop_listener(listener))
        fe = Frontend.connect(path, timeout=5)
        stack.append(fe.close)
        driver = BlkDriver(fe, num_queues=num_queues)
        stack.append(driver.close)
        driver.start()
        return Rig(device, driver, image)

    try:
        yield build
    finally:
        for close in reversed(stack):
            close()


def _stop_listener(listener: BackendListener) -> None:
    listener.stop()
    assert not listener.errors, listener.errors


@pytest.fixture
def rig(rig_factory) -> Rig:
    return rig_factory()


# --- tests ----------------------------------------------------------------------------------


def test_config_space_and_features(rig: Rig) -> None:
    d = rig.driver
    cfg = d.config()
    assert cfg.capacity == IMAGE_SIZE // SECTOR_SIZE
    assert cfg.blk_size == SECTOR_SIZE
    assert cfg.num_queues == 1
    assert cfg.seg_max == 126
    assert cfg.max_discard_seg >= 1 and cfg.max_write_zeroes_seg >= 1
    assert cfg.write_zeroes_may_unmap == 1
    # QEMU 7.2's vhost-user-blk-pci reads 57 bytes (through write_zeroes_may_unmap)
    assert d.fe.get_config(0, 57) == cfg.pack()[:57]
    assert d.features & BF.FLUSH and d.features & BF.DISCARD and d.features & BF.WRITE_ZEROES
    assert not d.features & BF.RO
    offered = d.fe.get_protocol_features()
    assert offered & P.CONFIG and offered & P.MQ
    assert offered & P.INFLIGHT_SHMFD  # inflight I/O is tracked (tests/test_restart.py)
    assert offered & P.LOG_SHMFD  # writes to guest memory are logged (test_dirty_logging.py)
    assert d.fe.get_features() & VirtioFeature.LOG_ALL
    assert d.fe.get_queue_num() == 1
    # beyond the config space, and any write to it, are refused
    with pytest.raises(RequestFailed):
        d.fe.set_config(0, b"\0" * 8)
    with pytest.raises(RequestFailed, match="empty reply"):
        d.fe.get_config(0, BLK_CONFIG_SIZE + 4)


def test_read_write_round_trip(rig: Rig) -> None:
    d = rig.driver
    first = d.read(0, SECTOR_SIZE)
    assert first.status == S.OK and first.data == pattern(SECTOR_SIZE, 1)
    assert first.used_len == SECTOR_SIZE + 1  # data and status
    data = pattern(64 * 1024, 5)
    w = d.write(100, data, split=3)
    assert w.status == S.OK and w.used_len == 1
    r = d.read(100, len(data), split=4)
    assert r.status == S.OK and r.data == data
    with rig.image.open("rb") as f:  # really in the image
        f.seek(100 * SECTOR_SIZE)
        assert f.read(len(data)) == data
    # the last sector is reachable
    last = IMAGE_SIZE // SECTOR_SIZE - 1
    assert d.write(last, pattern(SECTOR_SIZE, 9)).status == S.OK
    assert d.read(last, SECTOR_SIZE).data == pattern(SECTOR_SIZE, 9)
    assert rig.device.completed[S.OK] == 5


def test_header_and_data_in_one_buffer_and_status_after_data(rig: Rig) -> None:
    """VERSION_1 implies any layout: header+data share a descriptor; data+status too."""
    d = rig.driver
    data = pattern(2 * SECTOR_SIZE, 3)
    w = d.raw([request_header(T.OUT, 8) + data], [1])
    assert w.status == S.OK
    r = d.raw([request_header(T.IN, 8)], [len(data) + 1])
    assert r.status == S.OK and r.data == data and r.used_len == len(data) + 1


def test_flush_and_get_id(rig_factory) -> None:
    rig = rig_factory(serial="disk-0123")
    d = rig.driver
    assert d.write(0, pattern(SECTOR_SIZE, 2)).status == S.OK
    f = d.request(T.FLUSH)
    assert f.status == S.OK and f.used_len == 1
    ident = d.request(T.GET_ID, in_len=ID_BYTES)
    assert ident.status == S.OK
    assert ident.data == b"disk-0123\0" + b"\xee" * 10  # NUL-terminated, rest untouched
    # a 20-byte serial fills the buffer without a NUL; a short buffer gets a prefix
    short = d.request(T.GET_ID, in_len=4)
    assert short.status == S.OK and short.data == b"disk"


def test_get_id_of_a_full_length_serial(rig_factory) -> None:
    d = rig_factory(serial="A" * ID_BYTES).driver
    assert d.request(T.GET_ID, in_len=ID_BYTES).data == b"A" * ID_BYTES


def test_discard_and_write_zeroes(rig: Rig) -> None:
    d = rig.driver
    ones = b"\x11" * (64 * SECTOR_SIZE)
    assert d.write(0, ones).status == S.OK
    # discard: a hint; the sectors are deallocated (punched), reading them gives zeroes
    assert d.request(T.DISCARD, data=segment(0, 8)).status == S.OK
    # write zeroes with and without UNMAP, two segments in one request
    zw = d.request(T.WRITE_ZEROES, data=segment(16, 8) + segment(32, 8, DiscardFlag.UNMAP))
    assert zw.status == S.OK
    r = d.read(0, len(ones)).data
    for start, value in ((0, 0), (8, 0x11), (16, 0), (24, 0x11), (32, 0), (40, 0x11)):
        chunk = r[start * SECTOR_SIZE : (start + 8) * SECTOR_SIZE]
        assert chunk == bytes([value]) * len(chunk), f"sectors {start}..{start + 7}"
    # flags the spec forbids: UNMAP on a discard, unknown bits on either -> UNSUPP
    assert d.request(T.DISCARD, data=segment(0, 8, DiscardFlag.UNMAP)).status == S.UNSUPP
    assert d.request(T.WRITE_ZEROES, data=segment(0, 8, 0x10)).status == S.UNSUPP
    # out of range / malformed payloads -> IOERR
    cap = IMAGE_SIZE // SECTOR_SIZE
    assert d.request(T.DISCARD, data=segment(cap - 4, 8)).status == S.IOERR
    assert d.request(T.WRITE_ZEROES, data=segment(0, 8)[:12]).status == S.IOERR
    assert d.request(T.WRITE_ZEROES).status == S.IOERR  # no segment at all
    # more segments than max_write_zeroes_seg -> UNSUPP
    many = d.config().max_write_zeroes_seg + 1
    assert d.request(T.WRITE_ZEROES, data=segment(0, 1) * many).status == S.UNSUPP


def test_write_zeroes_where_fallocate_cannot(rig: Rig, monkeypatch) -> None:
    """No PUNCH_HOLE / ZERO_RANGE (an old file system): zeroes are written instead."""

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(blk, "_fallocate", unsupported)
    d = rig.driver
    assert d.write(0, b"\x55" * 16 * SECTOR_SIZE).status == S.OK
    assert d.request(T.DISCARD, data=segment(0, 4)).status == S.OK  # a hint: left alone
    zw = d.request(T.WRITE_ZEROES, data=segment(4, 4) + segment(8, 4, DiscardFlag.UNMAP))
    assert zw.status == S.OK
    r = d.read(0, 16 * SECTOR_SIZE).data
    assert r == b"\x55" * 4 * SECTOR_SIZE + bytes(8 * SECTOR_SIZE) + b"\x55" * 4 * SECTOR_SIZE


def test_out_of_range_and_misaligned_requests_fail_without_io(rig: Rig) -> None:
    d = rig.driver
    cap = IMAGE_SIZE // SECTOR_SIZE
    before = rig.image.read_bytes()
    r = d.read(cap, SECTOR_SIZE)
    assert r.status == S.IOERR
    assert r.data == b"\xee" * SECTOR_SIZE  # nothing written to the data buffer
    assert d.read(cap - 1, 2 * SECTOR_SIZE).status == S.IOERR
    assert d.read(1 << 60, SECTOR_SIZE).status == S.IOERR
    assert d.write(cap - 1, b"\x22" * 2 * SECTOR_SIZE).status == S.IOERR
    assert d.write(0, b"\x22" * 100).status == S.IOERR  # not a whole sector
    assert rig.image.read_bytes() == before


def test_block_size_alignment(rig_factory) -> None:
    d = rig_factory(blk_size=4096).driver
    assert d.config().blk_size == 4096
    assert d.write(8, pattern(4096, 4)).status == S.OK
    assert d.read(8, 4096).data == pattern(4096, 4)
    assert d.write(1, pattern(4096, 4)).status == S.IOERR  # not on a 4 KiB boundary
    assert d.read(8, SECTOR_SIZE).status == S.IOERR  # not a whole block


def test_unsupported_request_types(rig: Rig) -> None:
    d = rig.driver
    for rtype in (2, T.GET_LIFETIME, T.SECURE_ERASE, 0xFFFF):
        r = d.request(rtype, in_len=8)
        assert r.status == S.UNSUPP
        assert r.data == b"\xee" * 8


def test_read_only_refuses_writes(rig_factory) -> None:
    rig = rig_factory(read_only=True)
    d = rig.driver
    assert d.features & BF.RO
    assert not d.features & (BF.DISCARD | BF.WRITE_ZEROES)
    before = rig.image.read_bytes()
    assert d.write(0, b"\x33" * SECTOR_SIZE).status == S.IOERR
    assert d.request(T.WRITE_ZEROES, data=segment(0, 8)).status == S.IOERR
    assert d.request(T.DISCARD, data=segment(0, 8)).status == S.IOERR
    assert d.read(0, SECTOR_SIZE).data == pattern(SECTOR_SIZE, 1)
    assert d.request(T.FLUSH).status == S.OK
    assert rig.image.read_bytes() == before
    with pytest.raises(Exception, match="read-only"):
        rig.device.resize(1 << 20)


def test_short_header_is_ioerr_and_the_ring_keeps_going(rig: Rig) -> None:
    d = rig.driver
    r = d.raw([request_header(T.IN, 0)[:8]], [SECTOR_SIZE, 1])
    assert r.status == S.IOERR
    assert r.data == b"\xee" * SECTOR_SIZE
    assert d.read(0, SECTOR_SIZE).status == S.OK  # the ring still works


def test_a_chain_without_a_status_byte_breaks_only_its_ring(rig_factory) -> None:
    rig = rig_factory(num_queues=2)
    d, device = rig.driver, rig.device
    # a good request and then one with nowhere to put a status, in one batch
    q = d.queues[0]
    d.mem.write(DATA_BASE, request_header(T.IN, 0))
    q.add([(DATA_BASE, 16)], [(DATA_BASE + 0x1000, SECTOR_SIZE + 1)], token="good")
    d.mem.write(DATA_BASE + 0x2000, request_header(T.OUT, 0) + b"\x44" * SECTOR_SIZE)
    q.add([(DATA_BASE + 0x2000, 16 + SECTOR_SIZE)], [], token="bad")
    assert q.publish()
    os.eventfd_write(d.kicks[0], 1)
    assert wait_readable(d.errs[0], 10), "no ring error signalled"
    device.wait_for(lambda: device.active[0].error is not None)
    assert "no device-writable byte" in str(device.active[0].error)
    # the good request before it was answered; the bad one wrote nothing
    assert [token for token, _ in q.reap()] == ["good"]
    assert d.mem.read(DATA_BASE + 0x1000 + SECTOR_SIZE, 1) == bytes([S.OK])
    assert rig.image.read_bytes()[:SECTOR_SIZE] == pattern(SECTOR_SIZE, 1)
    # queue 1 is unaffected
    assert d.read(0, SECTOR_SIZE, queue=1).data == pattern(SECTOR_SIZE, 1)


def test_multiple_queues_in_parallel(rig_factory) -> None:
    rig = rig_factory(num_queues=3)
    d = rig.driver
    assert d.config().num_queues == 3 and d.fe.get_queue_num() == 3
    tokens = []
    for qi in range(3):  # post on all three before waiting on any
        data = pattern(8 * SECTOR_SIZE, qi)
        tokens.append(d.submit([request_header(T.OUT, qi * 64), data], [1], queue=qi)[0])
    for qi, token in enumerate(tokens):
        d.wait(token, qi)
    for qi in range(3):
        assert d.read(qi * 64, 8 * SECTOR_SIZE, queue=qi).data == pattern(8 * SECTOR_SIZE, qi)


@pytest.mark.parametrize(
    ("inflight", "tracked"),
    [
        ((2, QUEUE_SIZE), [True, True]),
        # QEMU 7.2's vhost-user-blk on virtio-mmio: the area is sized for the device's
        # queue-size (128) but the rings have the 1024 descriptors virtio-mmio offered
        ((2, QUEUE_SIZE // 4), [False, False]),
        ((1, QUEUE_SIZE), [True, False]),  # no region at all for ring 1
    ],
    ids=["fits", "rings-larger", "fewer-queues"],
)
def test_rings_that_do_not_fit_the_inflight_area_run_untracked(
    fd_check, sock_dir, tmp_path, caplog, inflight, tracked
) -> None:
    """A ring whose descriptors the inflight area has no room for (vhost-user spec, "Inflight
    I/O tracking": the area holds GET_INFLIGHT_FD's num_queues x queue_size) still starts
    and serves requests, untracked. It used to fail to start (SET_VRING_KICK answered with
    an error, no worker), which left a Linux guest on QEMU's microvm hanging at its first
    read (tests/test_guest_kernel_blkbackend.py)."""
    image = make_image(tmp_path / "disk.img")
    path = sock_dir / "blk.sock"
    with ExitStack() as stack:
        device = stack.enter_context(BlkDevice(image, num_queues=2))
        listener = BackendListener(str(path), lambda: device, max_connections=1).start()
        stack.callback(_stop_listener, listener)
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        driver = BlkDriver(
            fe, num_queues=2, protocol=DRIVER_PROTOCOL | P.INFLIGHT_SHMFD, inflight=inflight
        )
        stack.callback(driver.close)
        driver.start()
        for q in range(2):
            data = pattern(8 * SECTOR_SIZE, q)
            assert driver.write(8 * q, data, queue=q).status == S.OK
            assert driver.read(8 * q, len(data), queue=q).data == data
        assert [device.active[q].inflight is not None for q in range(2)] == tracked
    assert ("does not fit the inflight area" in caplog.text) == (not all(tracked))


def test_a_large_scattered_request(rig: Rig) -> None:
    """Many data descriptors in one chain (more than fit one preadv would be IOV_MAX)."""
    d = rig.driver
    data = pattern(40 * SECTOR_SIZE, 8)
    assert d.write(200, data, split=40).status == S.OK
    assert d.read(200, len(data), split=40).data == data


def test_resize_sends_config_change(fd_check, sock_dir, tmp_path) -> None:
    image = make_image(tmp_path / "disk.img")
    with BlkDevice(image) as device:
        path = sock_dir / "blk.sock"
        listener = BackendListener(str(path), lambda: device, max_connections=1).start()
        fe = Frontend.connect(path, timeout=5)
        driver = BlkDriver(fe)
        server = None
        try:
            driver.start()
            watcher = ConfigWatcher(fe)
            server = FrontendReqServer(fe.open_backend_channel(), watcher, driver.protocol)
            server.start()
            device.wait_for(lambda: device.backend_channel is not None)
            assert device.resize(2 * IMAGE_SIZE) is True
            # REPLY_ACK: resize() returned after the front-end handled it
            assert watcher.changed.is_set()
            assert watcher.capacities == [2 * IMAGE_SIZE // SECTOR_SIZE]
            assert os.path.getsize(image) == 2 * IMAGE_SIZE
            # the new sectors are usable at once
            top = 2 * IMAGE_SIZE // SECTOR_SIZE - 1
            assert driver.write(top, pattern(SECTOR_SIZE, 6)).status == S.OK
            # shrinking: an external truncate, then resize() re-reads the size
            os.truncate(image, IMAGE_SIZE // 2)
            watcher.changed.clear()
            assert device.resize() is True and watcher.changed.is_set()
            assert watcher.capacities[-1] == IMAGE_SIZE // 2 // SECTOR_SIZE
            assert driver.read(top, SECTOR_SIZE).status == S.IOERR
        finally:
            fe.close()
            if server is not None:
                server.close()
            _stop_listener(listener)
            driver.close()


def test_resize_without_a_backend_channel_only_updates_the_config(rig: Rig) -> None:
    assert rig.device.resize(IMAGE_SIZE * 2) is False
    assert rig.driver.config().capacity == 2 * IMAGE_SIZE // SECTOR_SIZE


def test_write_through_without_flush(rig_factory, monkeypatch) -> None:
    """Without FLUSH negotiated every batch that wrote is synced before it completes."""
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    rig = rig_factory()
    d = rig.driver
    assert d.features & BF.FLUSH
    assert d.write(0, pattern(SECTOR_SIZE, 1)).status == S.OK
    assert synced == []  # FLUSH negotiated: writeback, the driver flushes
    rig.device.acked_features &= ~int(BF.FLUSH)  # as if the driver had not acked it
    assert d.write(0, pattern(SECTOR_SIZE, 1)).status == S.OK
    assert synced == [rig.device.fd]


def test_bad_arguments(tmp_path) -> None:
    image = make_image(tmp_path / "d.img")
    with pytest.raises(ValueError):
        BlkDevice(image, blk_size=1000)
    with pytest.raises(ValueError):
        BlkDevice(image, serial="x" * 21)
    with pytest.raises(FileNotFoundError):
        BlkDevice(tmp_path / "missing.img")


def test_config_layout() -> None:
    cfg = BlkConfig(capacity=0x1122334455667788, blk_size=4096, num_queues=3, seg_max=5)
    raw = cfg.pack()
    assert len(raw) == 60
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x1122334455667788
    assert struct.unpack_from("<I", raw, 12)[0] == 5  # seg_max
    assert struct.unpack_from("<I", raw, 20)[0] == 4096  # blk_size
    assert struct.unpack_from("<H", raw, 34)[0] == 3  # num_queues
    assert BlkConfig.unpack(raw) == cfg
    assert BlkConfig.unpack(raw[:57]) == cfg


# --- the standalone daemon ------------------------------------------------------------------


class Daemon:
    """``python3 -m vhostkit.devices.blk`` in a subprocess, its output waited on by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostkit.devices.blk", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = b""

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        """Read the daemon's output until ``text`` shows up (select with a deadline)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"daemon did not print {text!r}: {self.output!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"daemon exited before printing {text!r}: {self.output!r}")
            self.output += chunk

    def finish(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal the daemon, reap it; return its status and whole output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, (self.output + out).decode(errors="replace")


def test_daemon_server_mode_with_resize_on_sighup(fd_check, sock_dir, tmp_path) -> None:
    image = make_image(tmp_path / "disk.img")
    with image.open("r+b") as f:
        f.write(pattern(SECTOR_SIZE, 1))
    path = sock_dir / "d.sock"
    daemon = Daemon("--socket", str(path), "--image", str(image), "--serial", "daemon-1")
    try:
        daemon.wait_for("listening on")
        fe = Frontend.connect(path)
        driver = BlkDriver(fe)
        server = None
        try:
            driver.start()
            assert driver.read(0, SECTOR_SIZE).data == pattern(SECTOR_SIZE, 1)
            assert driver.request(T.GET_ID, in_len=ID_BYTES).data.startswith(b"daemon-1\0")
            watcher = ConfigWatcher(fe)
            server = FrontendReqServer(fe.open_backend_channel(), watcher, driver.protocol)
            server.start()
            os.truncate(image, 2 * IMAGE_SIZE)
            daemon.proc.send_signal(signal.SIGHUP)
            # logged once our ack reached the daemon (closing the channel earlier would cut
            # the ack off mid-send)
            daemon.wait_for("front-end told: True")
            assert watcher.changed.is_set()
            assert watcher.capacities == [2 * IMAGE_SIZE // SECTOR_SIZE]
        finally:
            fe.close()
            if server is not None:
                server.close()
            driver.close()
    finally:
        rc, out = daemon.finish()
    assert rc == 0, out
    assert "stopping on SIGTERM" in out


def test_daemon_client_mode(fd_check, sock_dir, tmp_path) -> None:
    image = make_image(tmp_path / "disk.img")
    path = sock_dir / "c.sock"
    daemon = Daemon("--socket", str(path), "--image", str(image), "--client", "--read-only")
    try:
        fe = Frontend.accept(path, timeout=15)
        driver = BlkDriver(fe)
        try:
            driver.start()
            assert driver.features & BF.RO
            assert driver.write(0, b"\1" * SECTOR_SIZE).status == S.IOERR
            assert driver.read(0, SECTOR_SIZE).data == bytes(SECTOR_SIZE)
        finally:
            fe.close()
            driver.close()
        # it reconnects when the front-end goes away
        fe = Frontend.accept(path, timeout=15)
        try:
            assert fe.get_features() & BF.RO
        finally:
            fe.close()
    finally:
        rc, out = daemon.finish(signal.SIGINT)
    assert rc == 0, out
    assert "stopping on SIGINT" in out


def test_main_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--socket", "/tmp/x.sock"])
    assert "--image" in capsys.readouterr().err
