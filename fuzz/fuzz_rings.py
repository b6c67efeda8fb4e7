"""atheris harness: the device-role queues (split and packed) over arbitrary ring memory.

The first input bytes pick the ring format, the queue size, the features, the base and how
the device behaves (pop sizes, completions); the rest is copied into guest memory where the
descriptor table, the driver area and the indirect tables lie. Guest memory is one region in
the middle of a guard-filled memfd. Findings (raised as exceptions):

* anything but :class:`VirtqueueError` / :class:`GuestMemoryError` (or :class:`InvalidParam`
  for a base the queue refuses up front, or for completing an id the device does not hold);
* a chain view outside the region;
* a guard byte changed (every writable buffer is filled, so a bounds bug shows).

Run: ``python3 fuzz/fuzz_rings.py -atheris_runs=200000`` (or ``-max_total_time=SECONDS``).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from _common import instrumented, run

with instrumented():
    from vhostkit.errors import GuestMemoryError, InvalidParam, VirtqueueError
    from vhostkit.types import MemoryRegion
    from vhostkit.virtio.features import VirtioFeature as F
    from vhostkit.virtio.memory import GuestMemory
    from vhostkit.virtio.packed import PackedDeviceQueue
    from vhostkit.virtio.split import SplitDeviceQueue

PAGE = os.sysconf("SC_PAGE_SIZE")
FILE_SIZE = 12 * PAGE
REGION_OFF = 4 * PAGE + 52
REGION_SIZE = 4 * PAGE - 100
GUARD = 0xA5
DESC, DRIVER, DEVICE = 0x100, 0x300, 0x500
FEATURES = [0, int(F.RING_INDIRECT_DESC), int(F.RING_EVENT_IDX)]
FEATURES.append(FEATURES[1] | FEATURES[2])

_fd = os.memfd_create("fuzz-rings", os.MFD_CLOEXEC)
os.ftruncate(_fd, FILE_SIZE)
_GUARDS = bytes([GUARD]) * FILE_SIZE
_mem = GuestMemory.map_regions([MemoryRegion(0, REGION_SIZE, 0x7F00_0000_0000, REGION_OFF, _fd)])
_probe = _mem.gpa_view(0, 1)
_BASE = np.frombuffer(_probe, dtype=np.uint8).ctypes.data
del _probe


def _inside(view: memoryview) -> bool:
    if view.nbytes == 0:
        return True
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
    return addr >= _BASE and addr + view.nbytes <= _BASE + REGION_SIZE


def _guards_intact() -> bool:
    before = os.pread(_fd, REGION_OFF, 0)
    after = os.pread(_fd, FILE_SIZE - REGION_OFF - REGION_SIZE, REGION_OFF + REGION_SIZE)
    return before == _GUARDS[:REGION_OFF] and after == _GUARDS[: len(after)]


def one_input(data: bytes) -> None:
    if len(data) < 8:
        return
    os.pwrite(_fd, _GUARDS, 0)
    os.pwrite(_fd, bytes(REGION_SIZE), REGION_OFF)
    packed = bool(data[0] & 1)
    num = 1 << (data[0] >> 1) % 5 if not packed else 1 + (data[0] >> 1) % 16
    features = FEATURES[data[1] % 4] | (int(F.RING_PACKED) if packed else 0)
    base = int.from_bytes(data[2:6], "little") if data[1] & 0x80 else None
    if not packed and base is not None:
        base &= 0xFFFF
    ops = data[6:8]
    _mem.write(DESC, data[8 : 8 + REGION_SIZE - DESC])
    cls = PackedDeviceQueue if packed else SplitDeviceQueue
    try:
        dev = cls.from_gpa(_mem, num, DESC, DRIVER, DEVICE, features=features, base=base)
    except InvalidParam:
        return
    try:
        for step in range(4):
            batch = dev.pop_batch(None if ops[0] >> step & 1 else 1 + ops[1] % 4)
            ids, lens = [], []
            for chain in batch:
                for view in (*chain.readable, *chain.writable):
                    if not _inside(view):
                        raise AssertionError(f"chain {chain.id} views memory outside the region")
                chain.read_all()
                for view in chain.writable:
                    view[:] = b"\x5a" * view.nbytes
                ids.append(chain.id)
                lens.append(chain.writable_len)
            if ids:
                dev.complete(ids, lens)
            if ops[1] >> step & 1:
                dev.enable_notifications()
            else:
                dev.disable_notifications()
            del batch
    except (VirtqueueError, GuestMemoryError):
        pass
    if not _guards_intact():
        raise AssertionError("a guard byte around the region changed")


if __name__ == "__main__":
    run(one_input)
    sys.exit(0)
