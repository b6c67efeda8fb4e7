"""Runs INSIDE the kernel VM of ``tests/test_guest_kernel_blkbackend.py`` (as root, in a chroot
of the host's root filesystem): the Linux guest's side of the vhost-user blk back-end test.

It finds the disk bound to the ``virtio_blk`` driver and follows ``--plan`` (JSON, written by
the host test; offsets and lengths in bytes). All data I/O is ``O_DIRECT`` on the whole disk,
from page-aligned ``mmap`` buffers, so every read and write reaches the device (no page
cache), and each call is vectored over pieces placed out of order in the buffer and cut at
512-byte (not page) boundaries: the guest's driver builds multi-segment requests from them
(with indirect descriptors when acked). Pseudo-random data comes from ``random.Random(seed)``
so the host can compute the same bytes.

Steps, each reported as one JSON line (``{"step": ...}``) on stdout:

* ``disk``: what sysfs says about the disk (sectors, block sizes, serial, read-only flag,
  hardware queues and their CPUs, discard / write-zeroes limits, segments, write cache, the
  features the driver acked);
* ``read``: sha256 of each ``known`` range (content the host wrote before boot);
* ``write``: each ``writes`` range written in ``chunk``-sized calls, then one ``fsync`` (a
  FLUSH request), then read back: sha256 of what was written and of what came back;
* ``discard`` / ``zeroout`` / ``punch``: ``BLKDISCARD``, ``BLKZEROOUT`` (write-zeroes without
  UNMAP) and ``fallocate(PUNCH_HOLE)`` on the disk (write-zeroes with UNMAP) on each range,
  when sysfs says the driver can (``skipped`` otherwise), then the sha256 read back;
* ``parallel``: one thread per ``parallel`` range, each pinned to its CPU (blk-mq maps the
  submitting CPU to a hardware queue, so each thread uses its own virtqueue), writing its
  range and reading it back, all started together;
* ``write_denied`` (``--plan`` has ``read_only``): a write to the disk must fail; the errno.

Any failure raises (a traceback and a non-zero exit code).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import struct
import threading
from functools import partial
from pathlib import Path

from guest_common import emit, find_by_driver, pinned

BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def sysfs(disk: str, name: str) -> str:
    return Path("/sys/block", disk, name).read_text().strip()


def describe(disk: str) -> dict[str, object]:
    mq = Path("/sys/block", disk, "mq")
    queues = {q.name: (q / "cpu_list").read_text().strip() for q in sorted(mq.iterdir())}
    serial = Path("/sys/block", disk, "serial")
    return {
        "name": disk,
        "sectors": int(sysfs(disk, "size")),
        "logical_block_size": int(sysfs(disk, "queue/logical_block_size")),
        "physical_block_size": int(sysfs(disk, "queue/physical_block_size")),
        "serial": serial.read_text().strip() if serial.exists() else None,
        "ro": int(sysfs(disk, "ro")),
        "hw_queues": queues,
        "discard_max_bytes": int(sysfs(disk, "queue/discard_max_bytes")),
        "discard_granularity": int(sysfs(disk, "queue/discard_granularity")),
        "write_zeroes_max_bytes": int(sysfs(disk, "queue/write_zeroes_max_bytes")),
        "max_segments": int(sysfs(disk, "queue/max_segments")),
        "max_discard_segments": int(sysfs(disk, "queue/max_discard_segments")),
        "write_cache": sysfs(disk, "queue/write_cache"),
        "features": sysfs(disk, "device/features"),
        "msi_irqs": len(list(Path("/sys/block", disk, "device/../msi_irqs").glob("*")))
        if Path("/sys/block", disk, "device/../msi_irqs").exists()
        else 0,
    }


class DirectIo:
    """``O_DIRECT`` transfers of up to ``chunk`` bytes through one page-aligned buffer.

    Each transfer is one ``preadv``/``pwritev`` over pieces of the buffer taken back to front
    and cut at multiples of ``block`` that are not multiples of a page where the block allows:
    the guest's bios get segments that start inside a page and are not in memory order.
    """

    def __init__(self, fd: int, chunk: int, block: int) -> None:
        self.fd = fd
        self.chunk = chunk
        self.buf = mmap.mmap(-1, chunk)
        # O_DIRECT wants every piece a whole number of logical blocks (its address only
        # aligned to 512): 16.5 KiB pieces on a 512-byte-block disk, 20 KiB on a 4 KiB one
        self.unit = -(-512 * 33 // block) * block

    def _pieces(self, length: int) -> list[tuple[int, int]]:
        """(buffer offset, size) of each piece, in disk order, covering ``length`` bytes."""
        sizes: list[int] = []
        left = length
        unit = self.unit
        while left:
            n = min(left, unit * (len(sizes) % 4 + 1))
            sizes.append(n)
            left -= n
        pieces, end = [], length
        for n in sizes:  # first piece of the disk range at the end of the buffer
            end -= n
            pieces.append((end, n))
        return pieces

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(self.buf)
        for pos in range(0, len(data), self.chunk):
            part = data[pos : pos + self.chunk]
            pieces = self._pieces(len(part))
            at = 0
            for where, n in pieces:
                view[where : where + n] = part[at : at + n]
                at += n
            iov = [view[where : where + n] for where, n in pieces]
            done = os.pwritev(self.fd, iov, offset + pos)
            del iov
            if done != len(part):
                raise OSError(errno.EIO, f"short write at {offset + pos}: {done}")
        view.release()

    def read(self, offset: int, length: int) -> bytes:
        view = memoryview(self.buf)
        out = bytearray()
        for pos in range(0, length, self.chunk):
            n = min(self.chunk, length - pos)
            pieces = self._pieces(n)
            iov = [view[where : where + size] for where, size in pieces]
            done = os.preadv(self.fd, iov, offset + pos)
            del iov
            if done != n:
                raise OSError(errno.EIO, f"short read at {offset + pos}: {done}")
            for where, size in pieces:
                out += view[where : where + size]
        view.release()
        return bytes(out)

    def close(self) -> None:
        # a failed transfer's views of the buffer live on in its traceback
        with contextlib.suppress(BufferError):
            self.buf.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_for(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parallel(dev: str, ranges: list[dict[str, int]], chunk: int, block: int) -> None:
    results: list[dict[str, object]] = []
    barrier = threading.Barrier(len(ranges))

    def worker(r: dict[str, int]) -> None:
        try:
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            io = DirectIo(fd, chunk, block)
            try:
                data = data_for(r["seed"], r["length"])
                barrier.wait(timeout=60)
                io.write(r["offset"], data)
                back = io.read(r["offset"], r["length"])
                os.fsync(fd)
            finally:
                io.close()
                os.close(fd)
            results.append(
                {**r, "sha256": sha(data), "readback_sha256": sha(back)}
                | {"ran_on": sorted(os.sched_getaffinity(0))}
            )
        except BaseException:
            barrier.abort()  # the others stop waiting for this one
            raise

    pinned([(r["cpu"], partial(worker, r)) for r in ranges])
    for r in sorted(results, key=lambda r: r["offset"]):
        emit("parallel", **r)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True, help="JSON: what to read, write, discard")
    plan = json.loads(parser.parse_args().plan)
    chunk = plan.get("chunk", 1 << 20)

    disk = find_by_driver("/sys/block", "virtio_blk")
    info = describe(disk)
    emit("disk", **info)
    dev = f"/dev/{disk}"
    block = int(info["logical_block_size"])

    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    io = DirectIo(fd, chunk, block)
    try:
        for offset, length in plan.get("known", []):
            emit("read", offset=offset, length=length, sha256=sha(io.read(offset, length)))
    finally:
        io.close()
        os.close(fd)

    if plan.get("read_only"):
        try:
            wfd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
            try:
                wio = DirectIo(wfd, block, block)
                try:
                    wio.write(0, b"\xa5" * block)
                finally:
                    wio.close()
            finally:
                os.close(wfd)
        except OSError as exc:
            emit("write_denied", errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        else:
            raise SystemExit("a write to the read-only disk succeeded")
        return

    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    io = DirectIo(fd, chunk, block)
    try:
        writes = plan.get("writes", [])
        for w in writes:
            io.write(w["offset"], data_for(w["seed"], w["length"]))
        os.fsync(fd)  # the driver acked FLUSH: a flush request
        for w in writes:
            back = io.read(w["offset"], w["length"])
            emit(
                "write",
                **w,
                sha256=sha(data_for(w["seed"], w["length"])),
                readback_sha256=sha(back),
            )

        ops = (
            ("discard", "discard_max_bytes", lambda o, n: _ioctl_range(fd, BLKDISCARD, o, n)),
            ("zeroout", "write_zeroes_max_bytes", lambda o, n: _ioctl_range(fd, BLKZEROOUT, o, n)),
            (
                "punch",
                "write_zeroes_max_bytes",
                lambda o, n: _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o, n),
            ),
        )
        for step, limit, op in ops:
            for offset, length in plan.get(step, []):
                if not info[limit]:
                    emit(step, offset=offset, length=length, skipped=f"{limit} is 0")
                    continue
                op(offset, length)
                back = io.read(offset, length)
                emit(step, offset=offset, length=length, readback_sha256=sha(back))
        os.fsync(fd)
    finally:
        io.close()
        os.close(fd)

    if plan.get("parallel"):
        parallel(dev, plan["parallel"], plan.get("parallel_chunk", 128 << 10), block)


def _ioctl_range(fd: int, request: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length))


if __name__ == "__main__":
    main()
