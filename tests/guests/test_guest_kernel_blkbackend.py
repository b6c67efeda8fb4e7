"""A real Linux guest kernel's virtio-blk driver drives vhostkit's file-backed blk back-end.

The other peers of :class:`~vhostkit.devices.blk.BlkDevice` (SeaBIOS reading a boot sector,
vhostkit's own driver, the comparison with qemu-storage-daemon) use one queue, direct
descriptors and small requests. Here Debian's kernel (:mod:`vhostkit.testing.kernel_vm`, QEMU
TCG) gets a virtio-blk disk whose data plane is a BlkDevice in this process, served over a
vhost-user socket (:func:`~vhostkit.testing.kernel_vm.vhost_user_blk_args`: ``vhost-user-blk``
on microvm, ``vhost-user-blk-pci`` on q35, two request queues, guest RAM in a shared memfd).
The image is a sparse 64 MiB file in which the host wrote known content in a few places.

Each test boots the VM once (split rings, packed rings, read-only) and runs
``tests/helpers/guest_blkcheck.py`` in the guest with a plan (JSON): it reports what sysfs
says about the disk, reads the known ranges, writes seeded pseudo-random data (1 MiB
``O_DIRECT`` calls over scattered buffers: multi-segment requests through indirect
descriptors), flushes with ``fsync``, reads back, discards a range (``BLKDISCARD``), zeroes
two (``BLKZEROOUT``: write-zeroes without UNMAP; ``fallocate`` PUNCH_HOLE on the disk:
write-zeroes with UNMAP), and writes from two threads pinned to the two vCPUs (blk-mq maps
each CPU to its own hardware queue, so both virtqueues carry requests). Each step prints a
JSON line, asserted on here.

After the VM is off, the host checks the image file itself against what it expects (the
written ranges hold the seeded data, the discarded and zeroed ranges zeroes, everything else
what it held before), and the back-end's side: both rings started and carried requests, every
request type the guest used was answered OK (none failed: QEMU asks for no reply to most
vhost-user requests, so :attr:`BackendListener.request_errors`, each connection's
:attr:`BackendReqServer.last_error`, is where a failure would show),
the listener had no error and rejected nobody. The read-only test serves the image with
``read_only=True`` and 4 KiB logical blocks: the guest sees a read-only disk, reads it, fails
to write, and the image stays byte-identical.

Quirks (QEMU 7.2, Linux 6.1, Debian 12):

* Quirk: ``virtio_blk`` is a module in Debian's kernel (``CONFIG_VIRTIO_BLK=m``):
  :data:`~vhostkit.testing.kernel_vm.GUEST_MODULES` loads it.
* Quirk: the virtio-mmio variant of the device is plain ``vhost-user-blk`` (there is no
  ``vhost-user-blk-device``); virtio-mmio must be made modern (``force-legacy=false``) as for
  virtio-net.
* Quirk: QEMU 7.2's virtio-mmio reports QueueNumMax = 1024 (VIRTQUEUE_MAX_SIZE) whatever the
  device's ``queue-size`` (128 by default), and Linux uses all of it, so on microvm the rings
  have 1024 descriptors; but vhost-user-blk sizes the inflight area (GET_INFLIGHT_FD) for
  ``queue-size``. vhostkit refused to start such a ring (the guest hung at boot, on its
  first read); it now runs it without inflight tracking (see
  :meth:`vhostkit.user.backend.ring_device.RingDevice._track_inflight`). On q35 both are 128.
* Quirk: unlike virtio-net, ``vhost-user-blk-pci`` on q35 under TCG does not crash QEMU 7.2
  with MSI-X enabled, so it keeps its vectors there (one per queue plus config).
* Quirk: with ``VIRTIO_BLK_F_RO`` Linux marks the disk read-only and refuses writes itself
  (``write(2)`` on the disk: EPERM), and BLKDISCARD finds no discard support (the device does
  not offer DISCARD when read-only): no write request reaches the device, whose own
  read-only checks (IOERR) a Linux guest cannot reach.
* Quirk: ``BLKZEROOUT`` sends write-zeroes with ``REQ_NOUNMAP`` (no UNMAP flag in the
  segment); ``fallocate(PUNCH_HOLE)`` on the block device sends write-zeroes with UNMAP.
* Quirk: ``/sys/block/vda/size`` is in 512-byte sectors whatever the logical block size.
* Quirk: Linux 6.1 caps a whole discard request, not each of its segments, at
  ``max_discard_sectors`` (the spec's limit is per segment), and merges discards into one
  multi-segment request only when several non-contiguous ones meet in one plug (a
  filesystem's online discard does that; ``BLKDISCARD`` never does): here every discard
  request has one segment, although the driver allows ``max_discard_seg`` (32).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.guest_output import HELPERS, KiB, MiB, guest_steps, seeded, sha

from vhostkit.devices.blk import (
    SECTOR_SIZE,
    BlkDevice,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
    DiscardFlag,
    _fallocate,
)
from vhostkit.testing import kernel_vm
from vhostkit.testing.peers import which_or_skip
from vhostkit.user import BackendListener
from vhostkit.virtio.features import VirtioFeature as VF

pytestmark = pytest.mark.peer

log = logging.getLogger(__name__)

GUEST_SCRIPT = HELPERS / "guest_blkcheck.py"
IMAGE_SIZE = 64 * MiB
QUEUES = 2
SERIAL = "vhostkit-guest-disk1"  # exactly 20 bytes: GET_ID without a NUL
T = BlkRequestType
S = BlkStatus

#: Host-written content the guest reads: (offset, length, seed).
KNOWN = [(0, MiB, 1), (40 * MiB, 512 * KiB, 2), (IMAGE_SIZE - 64 * KiB, 64 * KiB, 3)]
#: Content the guest discards or zeroes parts of (offset, length, seed).
PREFILLED = (8 * MiB, 10 * MiB, 4)
DISCARD = [(10 * MiB, 2 * MiB)]
ZEROOUT = [(14 * MiB, MiB)]
PUNCH = [(16 * MiB + 4 * KiB, 508 * KiB)]
#: The guest's single-threaded writes: (offset, length, seed); the second one is not aligned
#: to a page, the last one ends where the known tail begins.
WRITES = [
    (4 * MiB, 4 * MiB, 10),
    (20 * MiB + 1536, MiB + 2560, 11),
    (IMAGE_SIZE - 320 * KiB, 256 * KiB, 12),
]
#: The guest's parallel writes: (offset, length, seed, cpu).
PARALLEL = [(32 * MiB, 2 * MiB, 20, 0), (34 * MiB, 2 * MiB, 21, 1)]

#: The device's max_discard_sectors and max_write_zeroes_sectors: small, so that Linux splits
#: the 2 MiB discard into 16 requests and the zeroing ones into several.
DISCARD_SECTORS = 256
ZEROES_SECTORS = 512

#: Features Linux's virtio_blk driver must have acked (QEMU passes them on).
REQUIRED_FEATURES = int(
    VF.VERSION_1
    | VF.RING_INDIRECT_DESC
    | BlkFeature.SEG_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.FLUSH
    | BlkFeature.MQ
)
_SEGMENT = struct.Struct("<QII")


def punch_hole_works(directory: Path) -> bool:
    """Whether the filesystem under ``directory`` punches holes: BlkDevice's discard is a
    no-op where it does not (discarding is a hint), and the range keeps its data."""
    with tempfile.TemporaryFile(dir=directory) as f:
        f.write(b"\xff" * 8192)
        f.flush()
        try:
            _fallocate(f.fileno(), 0x03, 0, 4096)  # PUNCH_HOLE | KEEP_SIZE
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        return os.pread(f.fileno(), 4096, 0) == bytes(4096)


# --- the back-end, recording what the guest asked -------------------------------------------


@dataclass
class Seen:
    """What the back-end saw, by request."""

    by_ring: collections.Counter[int] = field(default_factory=collections.Counter)
    by_type: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    zeroes_flags: collections.Counter[int] = field(default_factory=collections.Counter)
    discard_segments: int = 0  # most segments in one discard / write-zeroes request
    data_views: int = 0  # most guest-memory pieces of data in one request
    data_bytes: int = 0  # largest data transfer in one request
    rings_started: dict[int, int] = field(default_factory=dict)  # ring -> descriptors
    feature_sets: list[int] = field(default_factory=list)


class RecordingBlk(BlkDevice):
    """A BlkDevice that counts requests by ring, type and status, and keeps the feature sets
    and ring starts (the device forgets them when QEMU disconnects at power-off)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen = Seen()
        self._seen_lock = threading.Lock()  # one worker thread per ring

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.seen.feature_sets.append(features)

    def ring_started(self, ring) -> None:  # type: ignore[no-untyped-def]
        super().ring_started(ring)
        with self._seen_lock:
            self.seen.rings_started[ring.index] = ring.num

    def _handle(self, ring_index, chain):  # type: ignore[no-untyped-def]
        views = len(chain.readable) + len(chain.writable) - 2  # less header and status
        nbytes = chain.readable_len + chain.writable_len - 17
        with self._seen_lock:
            seen = self.seen
            seen.by_ring[ring_index] += 1
            seen.data_views = max(seen.data_views, views)
            seen.data_bytes = max(seen.data_bytes, nbytes)
        return super()._handle(ring_index, chain)

    def _execute(self, rtype, sector, data_out, data_in):  # type: ignore[no-untyped-def]
        status, wrote = super()._execute(rtype, sector, data_out, data_in)
        with self._seen_lock:
            seen = self.seen
            seen.by_type[(rtype, int(status))] += 1
            if rtype in (T.DISCARD, T.WRITE_ZEROES):
                payload = b"".join(data_out)
                segments = list(_SEGMENT.iter_unpack(payload[: len(payload) // 16 * 16]))
                seen.discard_segments = max(seen.discard_segments, len(segments))
                if rtype == T.WRITE_ZEROES:
                    for _, _, flags in segments:
                        seen.zeroes_flags[flags] += 1
        return status, wrote


@dataclass
class GuestRun:
    """Everything one VM boot showed, gathered before any assertion."""

    result: kernel_vm.VmResult
    seconds: float
    steps: dict[str, list[dict[str, object]]]
    seen: Seen
    completed: dict[BlkStatus, int]
    listener_errors: list[BaseException]
    rejected: list[BaseException]
    #: requests the back-end failed (QEMU asks for no reply to most: only this shows them)
    request_errors: list[BaseException]

    @property
    def context(self) -> str:
        r = self.result
        return f"guest exit {r.returncode} on {r.machine}; output:\n{r.output}"


@contextmanager
def served(
    image: Path, sock: Path, **device_kw: object
) -> Iterator[tuple[RecordingBlk, BackendListener]]:
    with ExitStack() as stack:
        device = stack.enter_context(RecordingBlk(image, **device_kw))
        listener = BackendListener(str(sock), lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        yield device, listener


def run_guest_check(
    image: Path,
    sock_dir: Path,
    plan: dict[str, object],
    *,
    qemu_device_args: str = "",
    **device_kw: object,
) -> GuestRun:
    """Serve ``image`` (a :class:`RecordingBlk` with ``device_kw``), boot the VM once with
    the disk (``qemu_device_args`` added to QEMU's device), run the guest script with
    ``plan``; gather what both sides saw (the VM is off, the listener stopped)."""
    t0 = time.monotonic()
    sock = sock_dir / "blk.sock"
    with served(image, sock, num_queues=QUEUES, serial=SERIAL, **device_kw) as (dev, listener):
        result = kernel_vm.run_in_vm(
            ["python3", str(GUEST_SCRIPT), "--plan", json.dumps(plan)],
            timeout=60,
            memory_mb=512,
            extra_qemu_args=kernel_vm.vhost_user_blk_args(
                sock, num_queues=QUEUES, device_args=qemu_device_args
            ),
            shared_memory=True,
        )
        listener.stop()  # QEMU is gone: its connection ended
        run = GuestRun(
            result=result,
            seconds=0.0,
            steps=guest_steps(result.output),
            seen=dev.seen,
            completed=dict(dev.completed),
            listener_errors=list(listener.errors),
            rejected=list(listener.rejected),
            request_errors=list(listener.request_errors),  # stopped: all finished
        )
    run.seconds = time.monotonic() - t0
    log.debug("guest output:\n%s", result.output)
    log.info(
        "guest kernel blk check on %s: boot %.1f s, total %.1f s; rings %s, requests by ring "
        "%s, by (type, status) %s, largest request %d bytes in %d pieces, discard segments %d",
        result.machine,
        result.boot_seconds,
        run.seconds,
        run.seen.rings_started,
        dict(run.seen.by_ring),
        dict(run.seen.by_type),
        run.seen.data_bytes,
        run.seen.data_views,
        run.seen.discard_segments,
    )
    return run


def assert_backend_clean(run: GuestRun) -> None:
    assert not run.listener_errors, run.listener_errors
    assert not run.rejected, run.rejected
    assert not run.request_errors, run.request_errors
    failed = {k: n for k, n in run.seen.by_type.items() if k[1] != S.OK}
    assert not failed, f"requests answered with an error: {failed}"
    assert run.completed[S.IOERR] == run.completed[S.UNSUPP] == 0, run.completed
    # both rings started (the driver set up both queues) and the guest's features reached
    # the back-end
    assert sorted(run.seen.rings_started) == list(range(QUEUES)), run.seen.rings_started
    assert run.seen.feature_sets, "the device applied no SET_FEATURES"
    acked = run.seen.feature_sets[-1]
    missing = REQUIRED_FEATURES & ~acked
    assert not missing, f"guest did not ack {missing:#x} (acked {acked:#x})"


def make_image(path: Path, fills: list[tuple[int, int, int]]) -> bytearray:
    """A sparse image with seeded content at ``fills``; returns its content."""
    content = bytearray(IMAGE_SIZE)
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
        for offset, length, seed in fills:
            data = seeded(seed, length)
            f.seek(offset)
            f.write(data)
            content[offset : offset + length] = data
    return content


def check_disk(disk: dict[str, object], *, blk_size: int, ro: int) -> None:
    assert disk["sectors"] == IMAGE_SIZE // SECTOR_SIZE, disk  # always 512-byte units
    assert disk["logical_block_size"] == blk_size, disk
    assert disk["serial"] == SERIAL, disk
    assert disk["ro"] == ro, disk
    # one hardware queue per virtqueue, each mapped to one vCPU (the parallel writers' CPUs)
    assert disk["hw_queues"] == {str(q): str(q) for q in range(QUEUES)}, disk
    assert disk["max_segments"] == 126, disk  # the device's seg_max
    assert disk["write_cache"] == "write back", disk  # FLUSH offered


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_linux_guest_drives_blk_backend(fd_check, sock_dir, tmp_path, packed):
    which_or_skip("qemu-system-x86_64")
    image = tmp_path / "disk.img"
    expected = make_image(image, [*KNOWN, PREFILLED])
    punches = punch_hole_works(tmp_path)
    plan = {
        "known": [[o, n] for o, n, _ in KNOWN],
        "writes": [{"offset": o, "length": n, "seed": s} for o, n, s in WRITES],
        "discard": DISCARD,
        "zeroout": ZEROOUT,
        "punch": PUNCH,
        "parallel": [{"offset": o, "length": n, "seed": s, "cpu": c} for o, n, s, c in PARALLEL],
    }
    run = run_guest_check(
        image,
        sock_dir,
        plan,
        qemu_device_args="packed=on" if packed else "",
        max_discard_sectors=DISCARD_SECTORS,
        max_write_zeroes_sectors=ZEROES_SECTORS,
    )
    steps, context = run.steps, run.context
    assert run.result.returncode == 0, context

    # what the driver made of the config space and features
    (disk,) = steps["disk"]
    check_disk(disk, blk_size=SECTOR_SIZE, ro=0)
    assert disk["discard_max_bytes"] == DISCARD_SECTORS * SECTOR_SIZE, disk
    assert disk["write_zeroes_max_bytes"] == ZEROES_SECTORS * SECTOR_SIZE, disk
    assert disk["max_discard_segments"] == 32, disk
    assert disk["discard_granularity"] == SECTOR_SIZE, disk  # discard_sector_alignment

    # reads of what the host wrote
    assert [(r["offset"], r["length"], r["sha256"]) for r in steps["read"]] == [
        (o, n, sha(expected[o : o + n])) for o, n, _ in KNOWN
    ], context

    # writes, flush, read back
    assert len(steps["write"]) == len(WRITES), context
    for w, (offset, length, seed) in zip(steps["write"], WRITES, strict=True):
        data = seeded(seed, length)
        assert (w["offset"], w["length"]) == (offset, length), w
        assert w["sha256"] == w["readback_sha256"] == sha(data), w
        expected[offset : offset + length] = data
    for o, n, s, _ in PARALLEL:
        expected[o : o + n] = seeded(s, n)
    parallel = sorted(steps["parallel"], key=lambda p: p["offset"])
    assert [(p["offset"], p["sha256"], p["readback_sha256"], p["ran_on"]) for p in parallel] == [
        (o, sha(seeded(s, n)), sha(seeded(s, n)), [c]) for o, n, s, c in PARALLEL
    ], context

    # discard and write-zeroes: the range reads back as zeroes (a discard only where the
    # image's filesystem punches holes)
    for step, ranges in (("discard", DISCARD), ("zeroout", ZEROOUT), ("punch", PUNCH)):
        assert len(steps[step]) == len(ranges), context
        for got, (offset, length) in zip(steps[step], ranges, strict=True):
            assert "skipped" not in got, got
            if step != "discard" or punches:
                expected[offset : offset + length] = bytes(length)
            assert got["readback_sha256"] == sha(expected[offset : offset + length]), got

    # the image itself: written ranges, zeroed ranges, and everything else as it was
    content = image.read_bytes()
    assert len(content) == IMAGE_SIZE
    if content != expected:
        bad = [
            i for i in range(0, IMAGE_SIZE, 4096) if content[i : i + 4096] != expected[i : i + 4096]
        ]
        pytest.fail(
            f"image differs from the expected content in {len(bad)} pages, first at {bad[:8]}"
        )

    # the back-end's side: no request failed, both rings started and carried requests
    assert_backend_clean(run)
    seen = run.seen
    for ring in range(QUEUES):
        assert seen.by_ring[ring] > 0, seen.by_ring
    for rtype in (T.IN, T.OUT, T.FLUSH, T.GET_ID, T.DISCARD, T.WRITE_ZEROES):
        assert seen.by_type[(rtype, S.OK)] > 0, (rtype, seen.by_type)
    # BLKZEROOUT: write-zeroes without UNMAP; fallocate(PUNCH_HOLE): with UNMAP
    assert seen.zeroes_flags[0] > 0 and seen.zeroes_flags[DiscardFlag.UNMAP] > 0, seen
    # large, scattered requests reached the device; the discard was split by the device's
    # max_discard_sectors (one segment each, see the module docstring)
    assert seen.data_bytes >= 256 * KiB and seen.data_views > 8, seen
    assert seen.by_type[(T.DISCARD, S.OK)] >= DISCARD[0][1] // (DISCARD_SECTORS * SECTOR_SIZE)
    acked = seen.feature_sets[-1]
    assert bool(acked & VF.RING_PACKED) == packed, f"back-end acked {acked:#x}"


def test_linux_guest_on_read_only_blk_backend(fd_check, sock_dir, tmp_path):
    """``read_only=True`` (and a 4 KiB logical block): the guest sees a read-only disk, its
    reads work, its write fails, and the image is byte-identical afterwards."""
    which_or_skip("qemu-system-x86_64")
    image = tmp_path / "disk.img"
    expected = make_image(image, KNOWN)
    before = image.stat()
    plan = {"known": [[o, n] for o, n, _ in KNOWN], "read_only": True, "chunk": 256 * KiB}
    run = run_guest_check(image, sock_dir, plan, read_only=True, blk_size=4096)
    steps, context = run.steps, run.context
    assert run.result.returncode == 0, context

    (disk,) = steps["disk"]
    check_disk(disk, blk_size=4096, ro=1)
    assert disk["discard_max_bytes"] == disk["write_zeroes_max_bytes"] == 0, disk
    assert [(r["offset"], r["sha256"]) for r in steps["read"]] == [
        (o, sha(expected[o : o + n])) for o, n, _ in KNOWN
    ], context
    (denied,) = steps["write_denied"]
    assert denied["errno"] in ("EROFS", "EPERM", "EACCES", "EIO"), denied

    assert image.read_bytes() == expected
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert_backend_clean(run)
    seen = run.seen
    assert seen.by_type[(T.IN, S.OK)] > 0, seen.by_type
    writes = {k: n for k, n in seen.by_type.items() if k[0] in (T.OUT, T.DISCARD, T.WRITE_ZEROES)}
    assert not writes, f"write requests reached the read-only device: {writes}"
    acked = seen.feature_sets[-1]
    assert acked & BlkFeature.RO, f"back-end acked {acked:#x}"
