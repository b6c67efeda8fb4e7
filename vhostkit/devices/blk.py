"""A file-backed virtio-blk vhost-user back-end.

:class:`BlkDevice` serves a regular file or a block device as a virtio-blk disk on top of
:class:`~vhostkit.user.backend.RingDevice` (one worker thread per started ring; every ring is a
request queue, ``num_queues`` of them with ``VIRTIO_BLK_F_MQ``).

Requests (virtio 1.2 section 5.2.6): a chain is a 16-byte device-readable header
``(le32 type, le32 reserved, le64 sector)``, then the data, then one device-writable status
byte, the last writable byte of the chain.

* ``IN`` / ``OUT``: ``os.preadv`` / ``os.pwritev`` straight into / out of the chain's views of
  guest memory (no copies). The data must be a multiple of ``blk_size`` and start on a
  ``blk_size`` boundary, and lie inside the capacity; otherwise ``IOERR`` and no I/O.
* ``FLUSH``: ``os.fsync``. Without ``VIRTIO_BLK_F_FLUSH`` negotiated the device is
  write-through instead: every batch that wrote is ``fdatasync``-ed before it is completed.
* ``GET_ID``: the serial, at most 20 bytes, NUL-terminated when shorter (QEMU's convention).
* ``DISCARD`` / ``WRITE_ZEROES``: an array of 16-byte segments ``(le64 sector, le32
  num_sectors, le32 flags)``. Unknown flags, ``UNMAP`` on a discard, or more segments than
  ``max_*_seg`` give ``UNSUPP`` (QEMU answers too many segments the same way); a segment out
  of range, misaligned or larger than ``max_*_sectors`` gives ``IOERR``. Discard punches a
  hole (``fallocate(PUNCH_HOLE)``, a no-op where unsupported: discarding is a hint);
  write-zeroes with ``UNMAP`` punches a hole, without it zeroes in place (``ZERO_RANGE``,
  falling back to writing zeroes). Reads of the range return zeroes afterwards either way.
* Any other type: ``UNSUPP``. An ``OSError`` from the image: ``IOERR``.
* Read-only mode (``VIRTIO_BLK_F_RO`` offered, image opened ``O_RDONLY``): ``OUT``,
  ``DISCARD`` and ``WRITE_ZEROES`` get ``IOERR`` and write nothing.

Malformed chains, decided as follows:

* a chain whose readable part is shorter than the 16-byte header, but that has a status byte,
  is answered ``IOERR`` (the device can say so in-band; the ring keeps running);
* a chain with no device-writable byte has nowhere to put a status: the request cannot be
  answered, so it is a ring error, the vhost-user equivalent of QEMU's ``virtio_error()``
  (which sets ``DEVICE_NEEDS_RESET``): the chains before it in the batch are completed,
  :meth:`process` raises :class:`~vhostkit.errors.VirtqueueError`, the ring's worker stops and
  signals the ring's error eventfd. Other rings keep running.

The device never touches guest memory outside the chain's buffers: all I/O goes through the
views the ring layer built (already bounds-checked against the memory table), and the status
byte is the last byte of the last writable view.

The used length of every answered chain is the chain's whole writable length (data and
status), as QEMU reports it: the status byte is the last writable byte, so a shorter length
would not cover it.

Config space: ``struct virtio_blk_config`` up to ``write_zeroes_may_unmap`` and its padding
(60 bytes, :class:`BlkConfig`); QEMU 7.2's ``vhost-user-blk-pci`` reads 57 of them with
GET_CONFIG at realize time (and needs ``VHOST_USER_PROTOCOL_F_CONFIG``). The config space is
read-only (``CONFIG_WCE`` is not offered): SET_CONFIG is refused. :meth:`BlkDevice.resize`
updates the capacity and sends ``CONFIG_CHANGE_MSG`` on the back-end channel when the
front-end negotiated ``BACKEND_REQ`` and ``CONFIG``; QEMU then re-reads the config and
notifies the guest.

Protocol features: the generic set of :class:`~vhostkit.user.backend.device.BackendDevice`.
``LOG_SHMFD`` and ``VHOST_F_LOG_ALL`` are offered: while logging, the ring marks the pages of
what a request's used length covers (read data and the status byte: the whole writable part)
and of its own used-ring writes. ``INFLIGHT_SHMFD`` is offered: a restarted back-end
resubmits the requests its predecessor had taken and not completed
(:mod:`vhostkit.user.backend.inflight`, split and packed rings). A ring larger than the inflight
area allows runs untracked (QEMU's virtio-mmio makes such rings).

Daemon (``python3 -m vhostkit.devices.blk`` is an alias; ``--help`` lists every option)::

    vhostkit backend blk --socket PATH --image FILE [--read-only] [--queues N]
                         [--client] [--serial ID] [--blk-size N]

listens at ``PATH`` (or connects to a listening front-end with ``--client``, reconnecting when
it goes away), serves until SIGINT/SIGTERM, and on SIGHUP re-reads the image size (after
``truncate -s``, say) and tells the front-end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Self

import numpy as np

from vhostkit.errors import InvalidOperation, InvalidParam, VirtqueueError
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.user.backend.ring_device import ActiveRing, RingDevice
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.blk import (
    BLK_CONFIG_SIZE,
    CAPACITY_OFFSET,
    ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    SEGMENT,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
    DiscardFlag,
    request_header,
    segment,
)
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.ring import Chain

__all__ = [
    "BLK_CONFIG_SIZE",
    "BLK_PROTOCOL_FEATURES",
    "ID_BYTES",
    "SECTOR_SIZE",
    "BlkConfig",
    "BlkDevice",
    "BlkFeature",
    "BlkRequestType",
    "BlkStatus",
    "DiscardFlag",
    "blk_features",
    "main",
    "request_header",
    "segment",
]

log = logging.getLogger(__name__)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZEROES = bytes(1 << 20)


#: Protocol features the blk device offers (see the module docstring).
BLK_PROTOCOL_FEATURES = ProtocolFeature(DEFAULT_PROTOCOL_FEATURES)


def blk_features(*, read_only: bool = False, packed: bool = True) -> int:
    """The virtio feature bits :class:`BlkDevice` offers."""
    vf = VirtioFeature
    features = (
        vf.VERSION_1
        | vf.RING_INDIRECT_DESC
        | vf.RING_EVENT_IDX
        | BlkFeature.SEG_MAX
        | BlkFeature.BLK_SIZE
        | BlkFeature.FLUSH
        | BlkFeature.MQ
    )
    if packed:
        features |= vf.RING_PACKED
    features |= BlkFeature.RO if read_only else BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
    return int(features)


# --- fallocate ------------------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


def _load_fallocate() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate_fn = _load_fallocate()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (Python's ``os.posix_fallocate`` has none)."""
    if _fallocate_fn is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- scatter/gather helpers -----------------------------------------------------------------


def _split(views: Sequence[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split ``views`` after their first ``n`` bytes (no copies)."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    left = n
    for v in views:
        size = v.nbytes
        if left >= size:
            head.append(v)
            left -= size
        elif left > 0:
            head.append(v[:left])
            tail.append(v[left:])
            left = 0
        else:
            tail.append(v)
    return head, tail


def _gather(views: Sequence[memoryview]) -> bytes:
    return b"".join(views)


def _scatter(views: Sequence[memoryview], data: bytes) -> int:
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        k = min(v.nbytes, len(data) - pos)
        v[:k] = data[pos : pos + k]
        pos += k
    return pos


def _vectored(
    op: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: Sequence[memoryview],
    offset: int,
    *,
    what: str,
) -> None:
    """Run ``os.preadv``/``os.pwritev`` over all of ``views`` (IOV_MAX at a time, short
    transfers resumed); a transfer of 0 bytes (end of file) is an ``OSError(EIO)``."""
    pending = [v for v in views if v.nbytes]
    i = 0
    while i < len(pending):
        n = op(fd, pending[i : i + _IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"{what} at {offset} hit the end of the image")
        offset += n
        while n and i < len(pending):
            size = pending[i].nbytes
            if n >= size:
                n -= size
                i += 1
            else:
                pending[i] = pending[i][n:]
                n = 0


# --- the device -----------------------------------------------------------------------------


class BlkDevice(RingDevice):
    """A virtio-blk back-end serving ``image`` (a regular file or a block device).

    ``num_queues`` request queues; ``read_only`` opens the image ``O_RDONLY`` and offers
    ``VIRTIO_BLK_F_RO``; ``blk_size`` is the logical block size reported (a power of two,
    512 or more); ``serial`` the GET_ID string (20 bytes at most); ``seg_max`` the most data
    segments a request may have (126 by default, as QEMU and qemu-storage-daemon say: a
    driver without indirect descriptors must fit a request in the ring). The device owns the
    image fd: :meth:`close` (or leaving the ``with`` block) closes it.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        read_only: bool = False,
        num_queues: int = 1,
        blk_size: int = SECTOR_SIZE,
        serial: str | bytes = "vhostkit-blk",
        packed: bool = True,
        seg_max: int = 126,
        max_discard_sectors: int = 1 << 22,
        max_discard_seg: int = 32,
        max_write_zeroes_sectors: int = 1 << 22,
        max_write_zeroes_seg: int = 32,
        protocol_features: int = BLK_PROTOCOL_FEATURES,
        max_queue_size: int = 32768,
    ) -> None:
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise InvalidParam(f"block size {blk_size} is not a power of two >= 512")
        if not 1 <= num_queues <= 0xFFFF:
            raise InvalidParam(f"{num_queues} queues out of range 1..65535")
        serial_bytes = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(serial_bytes) > ID_BYTES:
            raise InvalidParam(f"serial {serial_bytes!r} is longer than {ID_BYTES} bytes")
        self.image = os.fspath(image)
        self.read_only = read_only
        self.blk_size = blk_size
        self.serial = serial_bytes
        self._sector_mask = blk_size // SECTOR_SIZE - 1
        self._config_lock = threading.Lock()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.image, flags)
        try:
            self.capacity = self._image_sectors()
            config = BlkConfig(
                capacity=self.capacity,
                seg_max=seg_max,
                blk_size=blk_size,
                writeback=1,  # there is a volatile cache (the page cache): FLUSH matters
                num_queues=num_queues,
                max_discard_sectors=max_discard_sectors,
                max_discard_seg=max_discard_seg,
                discard_sector_alignment=blk_size // SECTOR_SIZE,
                max_write_zeroes_sectors=max_write_zeroes_sectors,
                max_write_zeroes_seg=max_write_zeroes_seg,
                write_zeroes_may_unmap=1,
            )
            super().__init__(
                features=blk_features(read_only=read_only, packed=packed),
                protocol_features=protocol_features,
                num_queues=num_queues,
                config=config.pack(),
                max_queue_size=max_queue_size,
            )
        except BaseException:
            os.close(self.fd)
            raise
        #: requests answered, by status (for tests and statistics)
        self.completed = {s: 0 for s in BlkStatus}
        log.info(
            "blk device: %s, %d sectors, %s, %d queue(s)",
            self.image,
            self.capacity,
            "read-only" if read_only else "read-write",
            num_queues,
        )

    # -- image size and config --

    def _image_sectors(self) -> int:
        st = os.fstat(self.fd)
        size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        sectors = size // SECTOR_SIZE
        return sectors - sectors % (self.blk_size // SECTOR_SIZE)

    @property
    def blk_config(self) -> BlkConfig:
        """The current config space, decoded."""
        with self._config_lock:
            return BlkConfig.unpack(self.config)

    def resize(self, size: int | None = None) -> bool:
        """Change the capacity and tell the front-end (CONFIG_CHANGE_MSG).

        With ``size`` (bytes) the image file is truncated or extended to it first (not in
        read-only mode); without, the image's current size is read again (after an external
        resize). Returns whether the front-end was told: it must have negotiated
        ``BACKEND_REQ`` and ``CONFIG`` and opened the back-end channel.
        """
        if size is not None:
            if self.read_only:
                raise InvalidOperation("cannot resize a read-only image")
            if size < 0:
                raise InvalidParam(f"image size {size} is negative")
            os.ftruncate(self.fd, size)
        with self._config_lock:
            self.capacity = self._image_sectors()
            struct.pack_into("<Q", self.config, CAPACITY_OFFSET, self.capacity)
        log.info("%s: capacity now %d sectors", self.image, self.capacity)
        channel = self.backend_channel
        wanted = ProtocolFeature.BACKEND_REQ | ProtocolFeature.CONFIG
        if channel is None or self.acked_protocol_features & wanted != wanted:
            return False
        channel.config_change()
        return True

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        with self._config_lock:
            return super().get_config(offset, size, flags)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise InvalidParam("the virtio-blk config space is read-only (CONFIG_WCE not offered)")

    # -- request processing --

    def process(self, ring: ActiveRing) -> None:
        while True:
            batch = ring.pop_batch()
            n = len(batch)
            if not n:
                return
            lengths = np.zeros(n, dtype=np.int64)
            done = 0
            wrote = False
            try:
                for i, chain in enumerate(batch):
                    lengths[i], w = self._handle(ring.index, chain)
                    wrote |= w
                    done = i + 1
            finally:
                if wrote and not self.acked_features & BlkFeature.FLUSH:
                    self._write_through()
                if done:
                    ring.complete(batch.ids[:done], lengths[:done])

    def _write_through(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:  # the writes were answered OK already: say it loudly
            log.error("%s: write-through fdatasync failed: %s", self.image, exc)

    def _handle(self, ring_index: int, chain: Chain) -> tuple[int, bool]:
        """Answer one request; return ``(used length, whether it wrote to the image)``."""
        writable_len = chain.writable_len
        if writable_len < 1:
            raise VirtqueueError(
                f"virtio-blk ring {ring_index}: request {chain.id} has no device-writable "
                "byte for its status"
            )
        data_in, status_view = _split(chain.writable, writable_len - 1)
        if chain.readable_len < REQUEST_HEADER.size:
            log.warning(
                "ring %d: request %d: %d-byte header", ring_index, chain.id, chain.readable_len
            )
            status, wrote = BlkStatus.IOERR, False
        else:
            head, data_out = _split(chain.readable, REQUEST_HEADER.size)
            rtype, _, sector = REQUEST_HEADER.unpack(_gather(head))
            status, wrote = self._execute(rtype, sector, data_out, data_in)
        status_view[-1][-1] = status
        self.completed[status] += 1
        return writable_len, wrote

    def _in_range(self, sector: int, nbytes: int) -> bool:
        if sector & self._sector_mask or nbytes % self.blk_size:
            return False
        capacity = self.capacity
        return sector <= capacity and nbytes // SECTOR_SIZE <= capacity - sector

    def _execute(
        self,
        rtype: int,
        sector: int,
        data_out: list[memoryview],
        data_in: list[memoryview],
    ) -> tuple[BlkStatus, bool]:
        t = BlkRequestType
        try:
            if rtype == t.IN:
                nbytes = sum(v.nbytes for v in data_in)
                if not self._in_range(sector, nbytes):
                    return BlkStatus.IOERR, False
                _vectored(os.preadv, self.fd, data_in, sector * SECTOR_SIZE, what="read")
                return BlkStatus.OK, False
            if rtype == t.OUT:
                nbytes = sum(v.nbytes for v in data_out)
                if self.read_only or not self._in_range(sector, nbytes):
                    return BlkStatus.IOERR, False
                _vectored(os.pwritev, self.fd, data_out, sector * SECTOR_SIZE, what="write")
                return BlkStatus.OK, nbytes > 0
            if rtype == t.FLUSH:
                os.fsync(self.fd)
                return BlkStatus.OK, False
            if rtype == t.GET_ID:
                ident = self.serial if len(self.serial) == ID_BYTES else self.serial + b"\0"
                _scatter(data_in, ident)
                return BlkStatus.OK, False
            if rtype in (t.DISCARD, t.WRITE_ZEROES):
                return self._discard_or_zero(rtype == t.DISCARD, _gather(data_out))
        except OSError as exc:
            log.warning("%s: request type %d sector %d: %s", self.image, rtype, sector, exc)
            return BlkStatus.IOERR, False
        return BlkStatus.UNSUPP, False

    def _discard_or_zero(self, discard: bool, payload: bytes) -> tuple[BlkStatus, bool]:
        cfg = self.blk_config
        if discard:
            max_sectors, max_seg = cfg.max_discard_sectors, cfg.max_discard_seg
            allowed = 0
        else:
            max_sectors, max_seg = cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg
            allowed = int(DiscardFlag.UNMAP)  # plain ints: ~IntFlag stays inside the enum
        if not payload or len(payload) % SEGMENT.size:
            return BlkStatus.IOERR, False
        segments = [SEGMENT.unpack_from(payload, off) for off in range(0, len(payload), 16)]
        if len(segments) > max_seg or any(flags & ~allowed for _, _, flags in segments):
            return BlkStatus.UNSUPP, False
        if self.read_only:
            return BlkStatus.IOERR, False
        for sector, count, _ in segments:
            if count > max_sectors or not self._in_range(sector, count * SECTOR_SIZE):
                return BlkStatus.IOERR, False
        for sector, count, flags in segments:
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if not length:
                continue
            if discard:
                self._punch(offset, length, required=False)
            elif flags & DiscardFlag.UNMAP and cfg.write_zeroes_may_unmap:
                self._punch(offset, length, required=True)
            else:
                self._zero_in_place(offset, length)
        return BlkStatus.OK, True

    def _punch(self, offset: int, length: int, *, required: bool) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            if required:  # write-zeroes must leave zeroes behind
                self._zero_in_place(offset, length)

    def _zero_in_place(self, offset: int, length: int) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        zero = memoryview(_ZEROES)
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, zero[: min(len(_ZEROES), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, f"writing zeroes at {offset} failed")
            offset += n

    # -- lifetime --

    def close(self) -> None:
        """Stop the rings, drop the front-end's state, close the image."""
        try:
            super().close()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the daemon -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m vhostkit.devices.blk ARGS``: the same as ``vhostkit backend blk ARGS``
    (SIGINT/SIGTERM stop it, SIGHUP re-reads the image size)."""
    from vhostkit.cli import main as cli_main  # the command line sits above the devices

    return cli_main(["backend", "blk", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
