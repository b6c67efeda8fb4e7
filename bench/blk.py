"""Blk IOPS and bandwidth: the vhostkit blk daemon against qemu-storage-daemon.

Both back-ends serve the same image on tmpfs (``/dev/shm``), each in its own process as users
run them (``python3 -m vhostkit backend blk --socket S --image I``; ``qemu-storage-daemon
--blockdev driver=file,... --export type=vhost-user-blk,...``), and both are driven by the same
front-end in this process: vhostkit's guest blk driver (:class:`~vhostkit.guest.blk.BlkDriver`
does the set-up; the request loop below keeps ``depth`` requests in flight on a 128-entry split
ring, each slot with its own header, data and status buffers, refilled as soon as it is used).

Workloads: 4 KiB random reads and writes (IOPS), 1 MiB sequential reads and writes (MiB/s),
at queue depth 1 and 32. Each figure is the median of several runs, the two back-ends taking
turns (A B A B ...). The aim (issue 15): at QD 32, at least half of qemu-storage-daemon's IOPS.

The front-end is Python too: at QD 32 its own cost per request bounds what either back-end
can show; ``others CPU`` and the ratio are the figures to read.

Run: ``python3 bench/blk.py [--seconds 2] [--runs 3] [--profile OUT]`` (``--profile``: record
the vhostkit daemon with py-spy under the 4 KiB QD 32 random-read load and print its top
functions), or ``vhostkit bench --only blk``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostkit.bench import Skipped, make_row
from vhostkit.bench.util import daemon, interleaved, median, process_cpu, tmpfs_dir
from vhostkit.guest.blk import BlkDriver, BlkLayout
from vhostkit.guest.rings import drain_eventfd, kick_eventfd, wait_readable
from vhostkit.user import Frontend
from vhostkit.virtio.blk import BlkRequestType

IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 128
MIB = 1 << 20
HEADER = struct.Struct("<IIQ")
#: (name, request size, random?, is a write)
WORKLOADS = (
    ("4K randread", 4096, True, False),
    ("4K randwrite", 4096, True, True),
    ("1M seqread", MIB, False, False),
    ("1M seqwrite", MIB, False, True),
)
DEPTHS = (1, 32)


@dataclass
class Slot:
    """One request's buffers in guest memory."""

    hdr: int
    data: int
    status: int


class Loop:
    """Keeps ``depth`` requests of one kind in flight on a started :class:`BlkDriver`."""

    def __init__(self, disk: BlkDriver, size: int, depth: int) -> None:
        self.disk = disk
        self.q = disk.queues[0]
        self.size = size
        stride = size + 4096
        base = disk.layout.data_base
        self.slots = [
            Slot(base + i * stride, base + i * stride + 4096, base + i * stride + 64)
            for i in range(depth)
        ]
        self.headers = [disk.mem.gpa_view(s.hdr, HEADER.size) for s in self.slots]
        self.statuses = [disk.mem.gpa_view(s.status, 1) for s in self.slots]
        #: every request completed, warm-up and drain included
        self.requests = 0

    def _add(self, i: int, write: bool, sector: int) -> None:
        s = self.slots[i]
        rtype = BlkRequestType.OUT if write else BlkRequestType.IN
        HEADER.pack_into(self.headers[i], 0, rtype, 0, sector)
        self.statuses[i][0] = 0xFF
        if write:
            self.q.add([(s.hdr, HEADER.size), (s.data, self.size)], [(s.status, 1)], token=i)
        else:
            self.q.add([(s.hdr, HEADER.size)], [(s.data, self.size), (s.status, 1)], token=i)

    def run(self, seconds: float, rand: bool, write: bool, seed: int = 1) -> float:
        """Requests completed per second over ``seconds`` (after a short warm-up)."""
        q, kick, call = self.q, self.disk.kicks[0], self.disk.calls[0]
        per = self.size // 512
        count = IMAGE_SIZE // self.size
        rng = random.Random(seed)
        pos = 0

        def next_sector() -> int:
            nonlocal pos
            pos += 1
            return (rng.randrange(count) if rand else pos % count) * per

        for i in range(len(self.slots)):
            self._add(i, write, next_sector())
        if q.publish():
            kick_eventfd(kick)
        done = 0
        t0 = time.perf_counter()
        start = t0 + min(0.1, seconds / 4)
        end = start + seconds
        counting = False
        while True:
            got = q.reap()
            if not got:
                if q.pending_used():
                    continue
                if not wait_readable((call,), 5.0):
                    raise TimeoutError(f"no completion in 5 s ({self.size}-byte requests)")
                drain_eventfd(call)
                continue
            now = time.perf_counter()
            if not counting:
                self.requests += len(got)
            if not counting and now >= start:
                counting, done, start = True, 0, now
            if counting and now >= end:
                break
            for token, _ in got:
                status = self.statuses[token][0]
                if status:
                    raise RuntimeError(f"request answered with status {status}")
                self._add(token, write, next_sector())
            done += len(got)
            self.requests += len(got)
            if q.publish():
                kick_eventfd(kick)
        elapsed = time.perf_counter() - start
        # let the requests still in flight finish, so that the ring is idle for the next run
        left = len(self.slots) - len(got)
        while left > 0:
            got = q.reap()
            left -= len(got)
            self.requests += len(got)
            if not got and not q.pending_used():
                if not wait_readable((call,), 5.0):
                    raise TimeoutError("requests in flight not completed")
                drain_eventfd(call)
        return done / elapsed


@contextlib.contextmanager
def driver(sock: Path) -> Iterator[BlkDriver]:
    layout = BlkLayout(mem_size=48 * MIB, queue_size=QUEUE_SIZE, data_base=MIB, data_area=40 * MIB)
    with Frontend.connect(sock, timeout=10) as fe, BlkDriver(fe, layout=layout) as disk:
        disk.start()
        yield disk


@contextlib.contextmanager
def backends(d: Path, ref_tree: Path | None = None) -> Iterator[dict[str, tuple[BlkDriver, int]]]:
    """Both back-ends serving one image: a started driver on each and the back-end's pid.
    With ``ref_tree`` the reference is the vhostkit daemon of that source tree instead of
    qemu-storage-daemon (to measure a change before/after, side by side)."""
    from vhostkit.testing.peers import QemuStorageDaemon

    if shutil.which("qemu-storage-daemon") is None:
        raise Skipped("qemu-storage-daemon not installed (qemu-system-common)")
    image = d / "disk.img"
    with image.open("wb") as f:  # written, not sparse: reads hit real pages
        block = os.urandom(MIB)
        for _ in range(IMAGE_SIZE // MIB):
            f.write(block)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(daemon("blk", d / "vhk.sock", ["--image", str(image)]))
        ref: int | None
        if ref_tree is None:
            ref = stack.enter_context(QemuStorageDaemon(image, d / "qsd.sock")).pid
        else:
            env = {**os.environ, "PYTHONPATH": os.fspath(ref_tree)}
            args = ["--image", str(image)]
            ref = stack.enter_context(daemon("blk", d / "qsd.sock", args, env=env)).pid
        assert ref is not None
        yield {
            "vhostkit": (stack.enter_context(driver(d / "vhk.sock")), ours.pid),
            "qsd": (stack.enter_context(driver(d / "qsd.sock")), ref),
        }


Figures = dict[tuple[str, int], tuple[float, float, float, float]]


def timed(loop: Loop, pid: int, seconds: float, rand: bool, write: bool) -> tuple[float, float]:
    """(requests per second, back-end CPU seconds per request) of one run."""
    cpu0, n0 = process_cpu(pid), loop.requests
    rate = loop.run(seconds, rand, write)
    return rate, (process_cpu(pid) - cpu0) / max(1, loop.requests - n0)


def measure(seconds: float, runs: int, only: str = "", ref_tree: Path | None = None) -> Figures:
    """``{(workload, depth): (vhostkit, qsd, vhostkit CPU, qsd CPU)}``: requests per second
    and the back-end's CPU seconds per request, medians of ``runs``."""
    out = {}
    with (
        tempfile.TemporaryDirectory(prefix="vhk-bench-blk-", dir=tmpfs_dir()) as tmp,
        backends(Path(tmp), ref_tree) as disks,
    ):
        for name, size, rand, write in WORKLOADS:
            if only not in name:
                continue
            for depth in DEPTHS:
                loops = [(Loop(disks[b][0], size, depth), disks[b][1]) for b in ("vhostkit", "qsd")]
                ours, ref = interleaved(
                    [
                        lambda lp=lp, pid=pid, r=rand, w=write: timed(lp, pid, seconds, r, w)
                        for lp, pid in loops
                    ],
                    runs,
                )
                out[(name, depth)] = (
                    median([x for x, _ in ours]),
                    median([x for x, _ in ref]),
                    median([c for _, c in ours]),
                    median([c for _, c in ref]),
                )
    return out


def rows(results: Figures, runs: int) -> list[dict[str, Any]]:
    table = []
    sizes = {name: size for name, size, _, _ in WORKLOADS}
    for (name, depth), (ours, ref, ours_cpu, ref_cpu) in results.items():
        size = sizes[name]
        scale, unit = (1.0, "IOPS") if size < MIB else (size / MIB, "MiB/s")
        aim = ">= 0.50" if depth == 32 and unit == "IOPS" else None
        table.append(
            make_row(
                "blk",
                f"{name} QD{depth}",
                ours * scale,
                unit,
                "qemu-storage-daemon",
                ref * scale,
                aim=aim,
                note=f"medians of {runs}; tmpfs image; Python front-end"
                if name == "4K randread" and depth == 1
                else "",
            )
        )
        if size < MIB and (depth == 32 or name == "4K randread"):
            table.append(
                make_row(
                    "blk",
                    f"{name} QD{depth} back-end CPU",
                    ours_cpu * 1e6,
                    "us/req",
                    "qemu-storage-daemon",
                    ref_cpu * 1e6,
                    note="the back-end process's CPU time per request (all its threads)"
                    if name == "4K randread"
                    else "",
                )
            )
    return table


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, runs = (0.3, 3) if quick else (2.0, 3)
    return rows(measure(seconds, runs), runs)


def profile(out: Path, seconds: float, depth: int = 32) -> None:
    """py-spy the vhostkit daemon while this process keeps 4 KiB random reads going."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install 'vhostkit[bench]')")
    with tempfile.TemporaryDirectory(prefix="vhk-bench-blk-", dir=tmpfs_dir()) as tmp:
        d = Path(tmp)
        image = d / "disk.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        with (
            daemon("blk", d / "vhk.sock", ["--image", str(image)]) as proc,
            driver(d / "vhk.sock") as disk,
        ):
            loop = Loop(disk, 4096, depth)
            loop.run(0.3, True, False)
            argv = [spy, "record", "-p", str(proc.pid), "-d", str(int(seconds))]
            argv += ["-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"]
            rec = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            rate = loop.run(seconds + 1, True, False)
            rec.wait(60)
    print(f"4K randread QD{depth} under the profiler: {rate:,.0f} IOPS; raw stacks in {out}")
    top_functions(out)


def top_functions(raw: Path, n: int = 25) -> None:
    """Print the functions with the most samples, self and total, from py-spy's raw output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        samples += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            total[f] = total.get(f, 0) + count
    print(f"{samples} samples; self time:")
    for f, c in sorted(own.items(), key=lambda x: -x[1])[:n]:
        print(f"  {100 * c / samples:5.1f}%  {f}")
    print("total time (with callees):")
    for f, c in sorted(total.items(), key=lambda x: -x[1])[:n]:
        print(f"  {100 * c / samples:5.1f}%  {f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=Path, metavar="OUT", help="py-spy the vhostkit daemon")
    parser.add_argument("--depth", type=int, default=32, help="queue depth under --profile")
    parser.add_argument("--only", default="", help="only the workloads whose name has this")
    parser.add_argument(
        "--ref-tree", type=Path, metavar="DIR", help="reference: the vhostkit daemon of DIR"
    )
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.seconds, args.depth)
        return 0
    ref = "qsd" if args.ref_tree is None else "ref"
    for row in rows(measure(args.seconds, args.runs, args.only, args.ref_tree), args.runs):
        print(
            f"{row['figure']:30} vhostkit {row['value']:12,.1f}  "
            f"{ref} {row['reference_value']:12,.1f} {row['unit']:6} ratio {row['ratio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
