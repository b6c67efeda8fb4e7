"""The virtio-blk back-end (:class:`BlkDevice`) against real peers.

* QEMU 7.2 as the front-end, ``-device vhost-user-blk-pci`` and no guest kernel: SeaBIOS
  reads the config space (GET_CONFIG, 57 bytes), drives the device through the ring, reads
  the boot sector from our back-end and runs it. The boot sector (hand-assembled here) writes
  a marker to QEMU's debug console (port 0x402), which is where SeaBIOS logs as well.
* qemu-storage-daemon as the reference back-end: the same requests through the vhostkit
  front-end and the same driver (:class:`vhostkit.guest.blk.BlkDriver`) against two copies
  of one image, one served by qemu-storage-daemon and one by vhostkit; what the spec fixes
  must match.
"""

from __future__ import annotations

import struct
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers.blk_driver import pattern

from vhostkit.devices.blk import (
    ID_BYTES,
    SECTOR_SIZE,
    BlkDevice,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
    segment,
)
from vhostkit.guest.blk import BlkDriver
from vhostkit.testing.peers import QemuStorageDaemon, QemuVirtioNet, which_or_skip
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.virtio.features import DeviceStatus

pytestmark = pytest.mark.peer

T = BlkRequestType
S = BlkStatus
P = ProtocolFeature

MARKER = b"VHOSTKIT-BLK-BOOT-OK"
IMAGE_SIZE = 8 << 20


def boot_sector(message: bytes) -> bytes:
    """A 512-byte MBR whose code writes ``message`` to I/O port 0x402 and halts.

    Real mode, loaded at 0:7C00::

        7C00  FA           cli
        7C01  31 C0        xor  ax, ax
        7C03  8E D8        mov  ds, ax
        7C05  FC           cld
        7C06  BE xx xx     mov  si, message
        7C09  BA 02 04     mov  dx, 0x402
        7C0C  AC           lodsb                 ; next:
        7C0D  84 C0        test al, al
        7C0F  74 03        jz   done
        7C11  EE           out  dx, al
        7C12  EB F8        jmp  next
        7C14  F4           hlt                   ; done:
        7C15  EB FD        jmp  done
        7C17  message, NUL
    """
    code = bytes.fromhex("fa31c08ed8fc")
    msg_at = 0x7C00 + len(code) + 3 + 3 + 11
    code += b"\xbe" + struct.pack("<H", msg_at)
    code += bytes.fromhex("ba0204ac84c07403eeebf8f4ebfd")
    assert 0x7C00 + len(code) == msg_at
    sector = code + message + b"\n\0"
    assert len(sector) <= 446  # leave the partition table area alone
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def wait_for_file_text(path: Path, needle: bytes, after: bytes, timeout: float) -> bytes:
    """Poll ``path`` (a QEMU chardev file: no notification exists) until ``needle`` appears
    after ``after``; return the whole content."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        at = data.find(after)
        if at >= 0 and data.find(needle, at) >= 0:
            return data
        if time.monotonic() >= deadline:
            raise AssertionError(f"{needle!r} not logged after {after!r} in {timeout}s: {data!r}")
        time.sleep(0.05)


class RecordingBlk(BlkDevice):
    """A :class:`BlkDevice` that remembers the GET_CONFIG reads."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.config_reads: list[tuple[int, int]] = []

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        self.config_reads.append((offset, size))
        return super().get_config(offset, size, flags)


def test_seabios_boots_from_the_vhostkit_blk_backend(fd_check, sock_dir, tmp_path) -> None:
    which_or_skip("qemu-system-x86_64")
    image = tmp_path / "boot.img"
    image.write_bytes(boot_sector(MARKER).ljust(IMAGE_SIZE, b"\0"))
    log = tmp_path / "debugcon.log"
    path = sock_dir / "blk.sock"
    with ExitStack() as stack:
        device = stack.enter_context(RecordingBlk(image, serial="boot-disk"))
        listener = BackendListener(str(path), lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        qemu = stack.enter_context(
            QemuVirtioNet(
                path,
                device="vhost-user-blk-pci",
                device_args="bootindex=1",
                debugcon_log=log,
                extra_args=["-boot", "strict=on"],
            )
        )
        text = wait_for_file_text(log, MARKER, b"Booting from Hard Disk", timeout=25)
        assert qemu.running
        # What QEMU 7.2 and SeaBIOS did with the device on the way there: QEMU read 57
        # config bytes at realize time (through write_zeroes_may_unmap), needs CONFIG; SeaBIOS
        # acked VERSION_1, SEG_MAX and BLK_SIZE only, and drove one split ring.
        assert device.config_reads[0] == (0, 57)
        assert device.acked_protocol_features & P.CONFIG
        assert device.acked_features & ~(1 << 30) == (1 << 32) | BlkFeature.SEG_MAX | (
            BlkFeature.BLK_SIZE
        )
        assert device.status & DeviceStatus.DRIVER_OK
        assert device.completed[S.OK] >= 1  # at least the boot sector
        assert not device.acked_features & BlkFeature.RO
        assert text.index(MARKER) > text.index(b"Booting from Hard Disk")
    assert not listener.errors, listener.errors
    assert qemu.returncode == 0


# --- against qemu-storage-daemon ------------------------------------------------------------


def _ops(d: BlkDriver) -> dict[str, object]:
    """The same requests on a fresh connection; what each back-end answered."""
    cfg = d.config(57)  # what QEMU 7.2's vhost-user-blk-pci reads
    res: dict[str, object] = {
        "capacity": cfg.capacity,
        "blk_size": cfg.blk_size if d.features & BlkFeature.BLK_SIZE else SECTOR_SIZE,
        "num_queues": cfg.num_queues,
        "queue_num": d.fe.get_queue_num(),
        "version_1": bool(d.features & (1 << 32)),
    }
    head = d.read(0, 4 * SECTOR_SIZE)
    res["read_head"] = (head.status, head.data)
    w = d.write(16, pattern(32 * SECTOR_SIZE, 3), split=3)
    res["write"] = w.status
    res["read_back"] = d.read(8, 48 * SECTOR_SIZE, split=5).data
    res["flush"] = d.request(T.FLUSH).status
    res["last_sector"] = d.write(cfg.capacity - 1, pattern(SECTOR_SIZE, 4)).status
    res["beyond_end_read"] = d.read(cfg.capacity, SECTOR_SIZE).status
    res["straddling_write"] = d.write(cfg.capacity - 1, b"\1" * 2 * SECTOR_SIZE).status
    res["unknown_type"] = d.request(0x7F, in_len=8).status
    if d.features & BlkFeature.WRITE_ZEROES:
        res["write_zeroes"] = d.request(T.WRITE_ZEROES, data=segment(20, 4)).status
        res["after_zeroes"] = d.read(16, 16 * SECTOR_SIZE).data
    ident = d.request(T.GET_ID, in_len=ID_BYTES)
    res["get_id"] = (ident.status, ident.data)
    return res


def test_same_answers_as_qemu_storage_daemon(fd_check, sock_dir, tmp_path) -> None:
    which_or_skip("qemu-storage-daemon")
    content = pattern(IMAGE_SIZE, 11)
    ours_img, theirs_img = tmp_path / "ours.img", tmp_path / "theirs.img"
    ours_img.write_bytes(content)
    theirs_img.write_bytes(content)
    results = {}
    with ExitStack() as stack:
        qsd_path = sock_dir / "qsd.sock"
        stack.enter_context(QemuStorageDaemon(theirs_img, qsd_path))
        device = stack.enter_context(BlkDevice(ours_img))
        ours_path = sock_dir / "ours.sock"
        listener = BackendListener(str(ours_path), lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        for name, path in (("qsd", qsd_path), ("vhostkit", ours_path)):
            with ExitStack() as conn:
                fe = Frontend.connect(path, timeout=5)
                conn.callback(fe.close)
                driver = BlkDriver(fe)
                conn.callback(driver.close)
                driver.start()
                results[name] = _ops(driver)
                results[name + "_features"] = driver.features
    assert not listener.errors, listener.errors
    # the driver asks for the same features; both back-ends offer all of them
    assert results["qsd_features"] == results["vhostkit_features"]
    qsd, ours = results["qsd"], results["vhostkit"]
    # GET_ID is the one answer that may differ: each back-end has its own serial
    # (qemu-storage-daemon 7.2 answers "vhost_user_blk"); both answer OK.
    assert qsd.pop("get_id")[0] == ours.pop("get_id")[0] == S.OK
    # Write-zeroes: only compared when both offer it.
    if "write_zeroes" not in qsd or "write_zeroes" not in ours:
        for r in (qsd, ours):
            r.pop("write_zeroes", None)
            r.pop("after_zeroes", None)
    for key in qsd:
        assert qsd[key] == ours[key], f"{key}: qsd {qsd[key]!r} != vhostkit {ours[key]!r}"
    # the images themselves ended up identical
    assert ours_img.read_bytes() == theirs_img.read_bytes()
