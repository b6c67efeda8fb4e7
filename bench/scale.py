"""Scale: many devices in one back-end process, and a memory table of 509 regions.

The ``vhostkit backend`` daemon serves one device on one socket per process; it cannot serve
64. What exists for many devices in one process is the library: this module runs a server
process of its own (``python3 bench/scale.py --serve N DIR IMAGE``) with N
:class:`~vhostkit.devices.blk.BlkDevice` on N sockets (one
:class:`~vhostkit.user.backend.BackendListener` each, every device with its own worker
thread once its ring starts), and measures against it:

* **set-up per device**: connect, the whole blk set-up (:meth:`BlkDriver.start`) and one
  4 KiB read, device after device, for 64 devices against 1 (the others stay connected);
* **per request with 64 devices**: 4 KiB reads at queue depth 1, each on the next device in
  turn, against the same on one device;
* **509-region memory table**: CONFIGURE_MEM_SLOTS: one ADD_MEM_REG per 64 KiB region
  (509 of them, the most the spec's 512-slot limit leaves with a few spare; the device is
  told to accept that many), against a table of one region; and 4 KiB reads at queue depth 1
  whose buffers move through every region in turn (each request's addresses are translated
  against the table), against one region.

Ratios are growth factors (1.0: no cost for the count). Not a test: nothing is asserted.

Run: ``python3 bench/scale.py [--devices 64] [--regions 509]``, or ``vhostkit bench --only
scale``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vhostkit.bench import make_row
from vhostkit.bench.util import median, tmpfs_dir
from vhostkit.guest.blk import DRIVER_PROTOCOL, BlkDriver, BlkLayout
from vhostkit.guest.rings import drain_eventfd, kick_eventfd, wait_readable
from vhostkit.user import Frontend
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.blk import BlkRequestType
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

HEADER = struct.Struct("<IIQ")
IMAGE_SIZE = 64 << 20
REGION = 0x10000
#: small guest memory per device: rings at 0, request buffers from 64 KiB
LAYOUT = BlkLayout(mem_size=0x200000, queue_size=64, data_base=0x10000, data_area=0x100000)


# --- the server process ---------------------------------------------------------------------


def serve(n: int, directory: Path, image: Path, slots: int) -> None:
    """N blk devices on DIR/blk{i}.sock until stdin closes; prints READY once listening."""
    from vhostkit.devices.blk import BlkDevice
    from vhostkit.user.backend import BackendListener

    with contextlib.ExitStack() as stack:
        for i in range(n):
            device = stack.enter_context(BlkDevice(image))
            device.max_mem_slots = slots
            listener = BackendListener(
                directory / f"blk{i}.sock", lambda d=device: d, max_connections=1
            )
            stack.callback(listener.stop)
            listener.start()
        print("READY", flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def server(n: int, d: Path, image: Path, slots: int) -> Iterator[list[Path]]:
    argv = [sys.executable, __file__, "--serve", str(n), str(d), str(image), str(slots)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the scale server did not start")
        yield [d / f"blk{i}.sock" for i in range(n)]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the front-end side ---------------------------------------------------------------------


def read_at(disk: BlkDriver, addr: int, sector: int) -> None:
    """One 4 KiB read at queue depth 1 with its buffers at ``addr`` (header, data, status)."""
    q = disk.queues[0]
    HEADER.pack_into(disk.mem.gpa_view(addr, HEADER.size), 0, BlkRequestType.IN, 0, sector)
    q.add([(addr, HEADER.size)], [(addr + 64, 4096), (addr + 64 + 4096, 1)], token=1)
    if q.publish():
        kick_eventfd(disk.kicks[0])
    call = disk.calls[0]
    while not q.reap():
        if q.pending_used():
            continue
        if not wait_readable((call,), 5.0):
            raise TimeoutError("read not completed")
        drain_eventfd(call)
    if disk.mem.gpa_view(addr + 64 + 4096, 1)[0]:
        raise RuntimeError("read answered with an error")


def per_request(disks: list[BlkDriver], addrs: list[int], seconds: float) -> float:
    """Seconds per 4 KiB read, request ``k`` on ``disks[k % len]`` at ``addrs[k % len]``."""
    n = 0
    sectors = IMAGE_SIZE // 4096
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(64):
            read_at(disks[n % len(disks)], addrs[n % len(addrs)], (n * 8 * 7919) % sectors * 8)
            n += 1
        now = time.perf_counter()
        if now >= end:
            return (now - t0) / n


def devices_case(socks: list[Path], seconds: float) -> tuple[float, float]:
    """(set-up seconds per device, seconds per request round-robin over all)."""
    with contextlib.ExitStack() as stack:
        disks = []
        t0 = time.perf_counter()
        for sock in socks:
            fe = stack.enter_context(Frontend.connect(sock, timeout=10))
            disk = stack.enter_context(BlkDriver(fe, layout=LAYOUT))
            disk.start()
            read_at(disk, LAYOUT.data_base, 0)
            disks.append(disk)
        setup = (time.perf_counter() - t0) / len(socks)
        return setup, per_request(disks, [LAYOUT.data_base], seconds)


class SlotsDriver(BlkDriver):
    """A BlkDriver whose memory is ``count`` regions of :data:`REGION` bytes, handed over with
    CONFIGURE_MEM_SLOTS (one ADD_MEM_REG each); :attr:`table_seconds` is how long that took."""

    def __init__(self, fe: Frontend, count: int) -> None:
        super().__init__(
            fe,
            protocol=DRIVER_PROTOCOL | ProtocolFeature.CONFIGURE_MEM_SLOTS,
            # (the layout only passes BlkDriver's checks: the memory is replaced below)
            layout=BlkLayout(
                mem_size=max(count, 2) * REGION, queue_size=64, data_base=REGION, data_area=REGION
            ),
        )
        self.mem.close()
        self.mem = GuestMemory.allocate([(i * REGION, REGION) for i in range(count)])
        self.table_seconds = 0.0

    def start(self) -> None:
        fe = self.fe
        fe.set_owner()
        self.features, self.protocol = fe.negotiate(self.wanted_features, self.wanted_protocol)
        if not self.protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            raise RuntimeError("the back-end does not offer CONFIGURE_MEM_SLOTS")
        if fe.get_max_mem_slots() < len(self.mem.regions):
            raise RuntimeError(f"the back-end takes fewer than {len(self.mem.regions)} regions")
        t0 = time.perf_counter()
        for region in self.mem.regions:
            fe.add_mem_region(region)
        self.table_seconds = time.perf_counter() - t0
        q = SplitDriverQueue(self.mem, 64, 0, features=self.features, index=0)
        self.queues.append(q)
        fe.set_vring_num(0, 64)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(q.vring_addr())
        fe.set_vring_call(0, self.calls[0])
        fe.set_vring_err(0, self.errs[0])
        fe.set_vring_kick(0, self.kicks[0])
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            fe.set_vring_enable(0, True)


def regions_case(sock: Path, count: int, seconds: float) -> tuple[float, float]:
    """(ADD_MEM_REG seconds for the whole table, seconds per request through every region)."""
    with Frontend.connect(sock, timeout=10) as fe, SlotsDriver(fe, count) as disk:
        disk.start()
        # region 0 holds the ring (below 0x8000); each request's buffers lie in the next
        # region in turn (in region 0 when it is the only one)
        addrs = [k * REGION + 0x9000 for k in range(count)]
        cost = per_request([disk], addrs, seconds)
        return disk.table_seconds, cost


def measure(devices: int, regions: int, seconds: float, reps: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {k: [] for k in ("s1", "sN", "r1", "rN", "t1", "tN", "m1", "mN")}
    with tempfile.TemporaryDirectory(prefix="vhk-bench-scale-", dir=tmpfs_dir()) as tmp:
        d = Path(tmp)
        image = d / "disk.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        with server(devices, d, image, max(regions, 32)) as socks:
            for _ in range(reps):
                # a fresh connection per repetition: the daemon serves one front-end per socket
                s, r = devices_case(socks[:1], seconds)
                out["s1"].append(s)
                out["r1"].append(r)
                s, r = devices_case(socks, seconds)
                out["sN"].append(s)
                out["rN"].append(r)
                t, m = regions_case(socks[0], 1, seconds)
                out["t1"].append(t)
                out["m1"].append(m)
                t, m = regions_case(socks[0], regions, seconds)
                out["tN"].append(t)
                out["mN"].append(m)
    return {k: median(v) for k, v in out.items()}


def rows(m: dict[str, Any], devices: int, regions: int, reps: int) -> list[dict[str, Any]]:
    note = "library: N BackendListeners in one process (the daemon serves one device)"
    return [
        make_row(
            "scale",
            f"set-up per device, {devices} devices",
            m["sN"] * 1e3,
            "ms",
            "1 device",
            m["s1"] * 1e3,
            note=note,
        ),
        make_row(
            "scale",
            f"4K read QD1 round-robin over {devices} devices",
            m["rN"] * 1e6,
            "us/req",
            "1 device",
            m["r1"] * 1e6,
        ),
        make_row(
            "scale",
            f"memory table, {regions} x ADD_MEM_REG",
            m["tN"] * 1e3,
            "ms",
            "1 region",
            m["t1"] * 1e3,
            note=f"{regions} regions of 64 KiB; {m['tN'] / regions * 1e6:.0f} us per region; "
            f"medians of {reps}",
        ),
        make_row(
            "scale",
            f"4K read QD1 through {regions} regions",
            m["mN"] * 1e6,
            "us/req",
            "1 region",
            m["m1"] * 1e6,
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, reps = (0.2, 1) if quick else (1.0, 3)
    return rows(measure(64, 509, seconds, reps), 64, 509, reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--regions", type=int, default=509)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--serve", nargs=4, metavar=("N", "DIR", "IMAGE", "SLOTS"))
    args = parser.parse_args()
    if args.serve:
        n, d, image, slots = args.serve
        serve(int(n), Path(d), Path(image), int(slots))
        return 0
    m = measure(args.devices, args.regions, args.seconds, args.reps)
    for row in rows(m, args.devices, args.regions, args.reps):
        print(
            f"{row['figure']:44} {row['value']:10,.3f} {row['unit']:6} "
            f"({row['reference']}: {row['reference_value']:,.3f}; ratio {row['ratio']:.2f})"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
