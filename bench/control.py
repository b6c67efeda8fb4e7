"""Control-plane speed: how long a front-end takes from connect to running rings, and how many
request round trips per second a back-end answers.

* **connect to running**: vhostkit's guest NIC (:class:`~vhostkit.guest.net.VirtioNetDriver`,
  one queue pair: an RX and a TX ring) connects to the back-end's socket, does the whole
  set-up (SET_OWNER, features, SET_MEM_TABLE, each ring's NUM/BASE/ADDR/KICK/CALL, enable,
  SET_STATUS), and sends one 64-byte frame; the clock stops when that frame is used, which
  proves the TX ring runs (the RX ring is set up by then too: its buffers are posted before
  TX). Against the vhostkit net daemon (``python3 -m vhostkit backend net``, in its own
  process, on a tap) and against DPDK testpmd's vhost PMD (the reference). The guest memory
  is allocated inside the timed part (about 1 MiB).
* **round trips**: GET_FEATURES in a loop against the net daemon and testpmd; GET_CONFIG (60
  bytes) against the blk daemon and qemu-storage-daemon.

testpmd busy-polls a core while it runs, so the vhostkit figures are all measured first, with
no testpmd running, then testpmd's. Aims (issue 15): < 2 ms to running; > 50,000 round trips
per second.

Run: ``python3 bench/control.py [--reps 21] [--seconds 1]`` (root: the net daemon makes a
tap), or ``vhostkit bench --only control``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vhostkit.bench import Skipped, make_row
from vhostkit.bench.util import daemon, median, tmpfs_dir
from vhostkit.guest.blk import BlkDriver
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.user import Frontend

FRAME = bytes.fromhex("0200000000020200000000018801") + bytes(50)  # 64 bytes, no real type


def connect_to_running(sock: Path) -> float:
    """Seconds from connect to the first frame used on the TX ring."""
    t0 = time.perf_counter()
    fe = Frontend.connect(sock, timeout=10)
    try:
        with VirtioNetDriver(fe, queue_size=256).start() as nic:
            nic.send([FRAME])
            if not nic.wait_tx_done(5.0):
                raise TimeoutError("the frame was not used")
            t1 = time.perf_counter()
            nic.stop()
    finally:
        fe.close()
    return t1 - t0


def round_trips(call: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``call``."""
    for _ in range(200):
        call()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(100):
            call()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def features_rate(sock: Path, seconds: float, reps: int) -> list[float]:
    with Frontend.connect(sock, timeout=10) as fe:
        return [round_trips(fe.get_features, seconds) for _ in range(reps)]


def config_rate(sock: Path, seconds: float, reps: int) -> list[float]:
    with Frontend.connect(sock, timeout=10) as fe, BlkDriver(fe) as disk:
        disk.start()
        return [round_trips(lambda: fe.get_config(0, 60), seconds) for _ in range(reps)]


@contextlib.contextmanager
def blk_image(d: Path) -> Iterator[Path]:
    image = d / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    yield image


def measure(reps: int, seconds: float) -> dict[str, tuple[list[float], list[float]]]:
    """``{figure: (vhostkit values, reference values)}``."""
    from vhostkit.testing.peers import QemuStorageDaemon, Testpmd

    missing = [b for b in ("dpdk-testpmd", "qemu-storage-daemon") if shutil.which(b) is None]
    if missing:
        raise Skipped(f"{' and '.join(missing)} not installed")
    if os.geteuid() != 0:
        raise Skipped("the net daemon needs CAP_NET_ADMIN for its tap (run as root)")
    out: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vhk-bench-ctl-", dir=tmpfs_dir()) as tmp:
        d = Path(tmp)
        with daemon("net", d / "net.sock", ["--tap", "vhkbc%d"]):
            ours_connect = [connect_to_running(d / "net.sock") for _ in range(reps)]
            ours_features = features_rate(d / "net.sock", seconds, 3)
        with blk_image(d) as image:
            with daemon("blk", d / "blk.sock", ["--image", str(image)]):
                ours_config = config_rate(d / "blk.sock", seconds, 3)
            with QemuStorageDaemon(image, d / "qsd.sock"):
                ref_config = config_rate(d / "qsd.sock", seconds, 3)
        with Testpmd.vhost_backend(d / "pmd.sock", forward_mode="rxonly", interactive=False):
            ref_connect = [connect_to_running(d / "pmd.sock") for _ in range(reps)]
            ref_features = features_rate(d / "pmd.sock", seconds, 3)
    out["connect"] = (ours_connect, ref_connect)
    out["features"] = (ours_features, ref_features)
    out["config"] = (ours_config, ref_config)
    return out


def rows(results: dict[str, tuple[list[float], list[float]]]) -> list[dict[str, Any]]:
    (c_ours, c_ref) = results["connect"]
    (f_ours, f_ref) = results["features"]
    (g_ours, g_ref) = results["config"]
    return [
        make_row(
            "control",
            "connect -> 2 rings running (net daemon)",
            median(c_ours) * 1e3,
            "ms",
            "testpmd vhost PMD",
            median(c_ref) * 1e3,
            aim="< 2 ms",
            note=f"medians of {len(c_ours)}; from connect() to the first TX frame used",
        ),
        make_row(
            "control",
            "GET_FEATURES round trips (net daemon)",
            median(f_ours),
            "/s",
            "testpmd vhost PMD",
            median(f_ref),
            aim="> 50,000/s",
        ),
        make_row(
            "control",
            "GET_CONFIG round trips (blk daemon)",
            median(g_ours),
            "/s",
            "qemu-storage-daemon",
            median(g_ref),
            aim="> 50,000/s",
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    reps, seconds = (5, 0.2) if quick else (21, 1.0)
    return rows(measure(reps, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21, help="connects per back-end")
    parser.add_argument("--seconds", type=float, default=1.0, help="per round-trip run")
    args = parser.parse_args()
    for row in rows(measure(args.reps, args.seconds)):
        print(
            f"{row['figure']:42} {row['value']:12,.3f} {row['unit']:3} "
            f"({row['reference']}: {row['reference_value']:,.3f}; ratio {row['ratio']:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
