"""Device-role throughput of the split and packed virtqueues (entries per second).

A driver fills a 256-entry ring with single-descriptor chains once; each round the device pops
every entry as one batch and completes them all (one used-index update), and the driver makes
the same entries available again with the cheapest possible refill (rewriting the avail index,
or the flags of the packed descriptors), so that the measured time is the device role's.

Three device-side workloads are timed:

* ``sink``: pop_batch + complete(batch.ids, batch.writable_len), no memoryview built;
* ``views``: also builds every chain's memoryviews (``batch.chains()``);
* ``struct``: a one-descriptor-at-a-time loop with ``struct.unpack_from`` (reference).

And the driver role: ``send`` times :meth:`VirtioNetDriver.send` of 64-byte frames, one
queue-full per call, over an in-process loopback data plane whose device role (not timed)
consumes every frame between two calls; each call reaps the previous call's frames first.

Run: ``python bench/ring_throughput.py [--seconds 2] [--num 256]``, or through
``vhostkit bench --only ring`` (:func:`run`: each workload's rate beside the ``struct`` loop
of the same ring format, measured in the same run; medians of 3 repetitions).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vhostkit.backend import LogRegion, MemoryRegion, VhostBackend, VringAddr
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PACKED_DESC_DTYPE, PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.ring import DescFlag
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

BUFS = 0x100000


def measure(round_fn: Callable[[], int], seconds: float) -> float:
    """Entries per second of ``round_fn`` (which returns the entries it handled)."""
    for _ in range(50):
        round_fn()
    entries = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            entries += round_fn()
        now = time.perf_counter()
        if now >= deadline:
            return entries / (now - start)


def split_setup(mem: GuestMemory, num: int) -> tuple[SplitDriverQueue, SplitDeviceQueue]:
    drv = SplitDriverQueue(mem, num, 0)
    for i in range(num):
        drv.add([], [(BUFS + i * 2048, 1514)], token=i)
    drv.publish()
    dev = SplitDeviceQueue.from_gpa(mem, num, *drv.ring_gpas)
    return drv, dev


def bench_split(mem: GuestMemory, num: int, seconds: float) -> dict[str, float]:
    drv, dev = split_setup(mem, num)
    avail_hdr = mem.gpa_array(drv.ring_gpas[1], "<u2", 2)

    def refill() -> None:
        # the driver re-offers the heads the device just used, in the same avail slots
        avail_hdr[1] = (int(avail_hdr[1]) + num) & 0xFFFF

    def sink() -> int:
        batch = dev.pop_batch()
        dev.complete(batch.ids, batch.writable_len)
        refill()
        return len(batch)

    def views() -> int:
        batch = dev.pop_batch()
        chains = batch.chains()
        dev.complete(batch.ids, [c.writable_len for c in chains])
        refill()
        return len(chains)

    d, a, u = drv.ring_gpas
    desc_v = mem.gpa_view(d, 16 * num)
    avail_v = mem.gpa_view(a, 6 + 2 * num)
    used_v = mem.gpa_view(u, 6 + 8 * num)
    state = {"last": dev.last_avail_idx, "used": dev.used_idx}

    def struct_loop() -> int:
        last = state["last"]
        (avail_idx,) = struct.unpack_from("<H", avail_v, 2)
        used = state["used"]
        n = 0
        while last != avail_idx:
            (head,) = struct.unpack_from("<H", avail_v, 4 + 2 * (last % num))
            addr, length, _flags, _nxt = struct.unpack_from("<QIHH", desc_v, 16 * head)
            mem.gpa_view(addr, length)  # bounds-checked translation
            struct.pack_into("<II", used_v, 4 + 8 * (used % num), head, length)
            last = (last + 1) & 0xFFFF
            used = (used + 1) & 0xFFFF
            n += 1
        struct.pack_into("<H", used_v, 2, used)
        state["last"], state["used"] = last, used
        refill()
        return n

    out = {"sink": measure(sink, seconds), "views": measure(views, seconds)}
    # struct loop continues from where the device queue stopped
    state["last"], state["used"] = dev.last_avail_idx, dev.used_idx
    out["struct"] = measure(struct_loop, seconds)
    return out


def bench_packed(mem: GuestMemory, num: int, seconds: float) -> dict[str, float]:
    drv = PackedDriverQueue(mem, num, 0)
    dev = PackedDeviceQueue.from_gpa(mem, num, *drv.ring_gpas)
    desc = mem.gpa_array(drv.ring_gpas[0], PACKED_DESC_DTYPE, num)
    desc["addr"] = BUFS + np.arange(num) * 2048
    desc["len"] = 1514
    desc["id"] = np.arange(num)
    lap = {"wrap": 1}

    def refill() -> None:
        # one full lap: every descriptor made available for the current wrap counter
        w = lap["wrap"]
        desc["flags"] = int(DescFlag.WRITE) | (int(DescFlag.AVAIL) if w else int(DescFlag.USED))
        lap["wrap"] = w ^ 1

    refill()

    def sink() -> int:
        batch = dev.pop_batch()
        dev.complete(batch.ids, batch.writable_len)
        refill()
        return len(batch)

    def views() -> int:
        batch = dev.pop_batch()
        chains = batch.chains()
        dev.complete(batch.ids, [c.writable_len for c in chains])
        refill()
        return len(chains)

    return {"sink": measure(sink, seconds), "views": measure(views, seconds)}


class Loopback(VhostBackend):
    """A data plane in this process: maps the driver's memory, serves the TX ring on demand."""

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.addrs: dict[int, VringAddr] = {}
        self.nums: dict[int, int] = {}
        self.features = 0

    def set_owner(self) -> None:
        pass

    def reset_owner(self) -> None:
        pass

    def get_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF | VirtioFeature.RING_PACKED)

    def set_features(self, features: int) -> None:
        self.features = features

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        self.mem = GuestMemory.map_regions(regions)

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        pass

    def set_dirty_log(self, log: Any) -> None:
        raise NotImplementedError("the loopback does not log")

    def set_log_fd(self, fd: int) -> None:
        pass

    def set_vring_num(self, index: int, num: int) -> None:
        self.nums[index] = num

    def set_vring_addr(self, addr: VringAddr) -> None:
        self.addrs[addr.index] = addr

    def set_vring_base(self, index: int, base: int) -> None:
        pass

    def get_vring_base(self, index: int) -> int:
        return 0

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        pass

    def set_vring_call(self, index: int, fd: int | None) -> None:
        pass

    def set_vring_err(self, index: int, fd: int | None) -> None:
        pass

    def device_queue(self, index: int) -> SplitDeviceQueue | PackedDeviceQueue:
        assert self.mem is not None
        cls = PackedDeviceQueue if self.features & VirtioFeature.RING_PACKED else SplitDeviceQueue
        return cls.from_vring_addr(
            self.mem, self.nums[index], self.addrs[index], features=self.features
        )

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def bench_send(packed: bool, num: int, seconds: float) -> float:
    """Frames per second of driver time in :meth:`VirtioNetDriver.send`."""
    frame = bytes(64)
    frames = [frame] * num
    with Loopback() as be, VirtioNetDriver(be, packed=packed, queue_size=num).start() as nic:
        dev = be.device_queue(1)
        zeros = np.zeros(num, dtype=np.uint32)
        clock = time.perf_counter
        spent = 0.0
        sent = 0
        end = clock() + seconds
        while clock() < end:
            for _ in range(50):
                t0 = clock()
                sent += nic.send(frames)
                spent += clock() - t0
                batch = dev.pop_batch()
                dev.complete(batch.ids, zeros[: len(batch)])
        return sent / spent


def measure_all(num: int, seconds: float) -> dict[str, dict[str, float]]:
    """Every workload once: ``{ring: {workload: entries per second}}``."""
    with GuestMemory.allocate([(0, 0x100000 + num * 2048)]) as mem:
        results = {
            "split": bench_split(mem, num, seconds),
            "packed": bench_packed(mem, num, seconds),
        }
    results["split"]["send"] = bench_send(False, num, seconds)
    results["packed"]["send"] = bench_send(True, num, seconds)
    return results


def run(quick: bool) -> list[dict[str, Any]]:
    """``vhostkit bench`` rows: each workload against the one-descriptor ``struct`` loop of
    the split ring (the reference, timed in every repetition), medians of 3."""
    from vhostkit.bench import make_row

    num, seconds, reps = 256, (0.15 if quick else 1.0), 3
    runs = [measure_all(num, seconds) for _ in range(reps)]
    ref = statistics.median(r["split"]["struct"] for r in runs)
    rows = []
    for ring in ("split", "packed"):
        for workload in ("sink", "views", "send"):
            value = statistics.median(r[ring][workload] for r in runs)
            rows.append(
                make_row(
                    "ring",
                    f"{ring} {workload}, {num}-entry batches",
                    value / 1e6,
                    "M entries/s",
                    "split struct loop",
                    ref / 1e6,
                    note="in-process; 'views' builds every chain's memoryviews"
                    if ring == "split" and workload == "views"
                    else "",
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--num", type=int, default=256)
    args = parser.parse_args()
    results = measure_all(args.num, args.seconds)
    for ring, figures in results.items():
        for workload, rate in figures.items():
            print(
                f"{ring:6} {workload:6} {args.num:4}-entry batches: {rate / 1e6:6.2f} M entries/s"
            )


if __name__ == "__main__":
    main()
