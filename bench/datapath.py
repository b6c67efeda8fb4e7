"""Packets per second of 64-byte frames through real peers, vhostkit on one side of the rings.

Three phases, each a few seconds, all on this machine (nothing leaves it):

* (a) vhostkit as the guest: :class:`VirtioNetDriver` through :class:`Frontend` sends into
  DPDK's vhost PMD in ``rxonly`` mode; the rate is testpmd's RX counter.
* (b) vhostkit as the device: DPDK's virtio_user in ``txonly`` mode fills the TX ring of a
  :class:`vhostkit.user.backend.ring_device.SinkDevice`; the rate is the frames the sink consumed.
* (c) the reference: testpmd's virtio_user (``txonly``) into testpmd's vhost PMD (``rxonly``).

It prints each rate and (a)/(c), (b)/(c). Not a test: nothing is asserted.

Set-up, the same for every phase so that the ratios compare like with like:

* one queue size everywhere (``--queue-size``, default 256: vhostkit's driver rings in (a),
  testpmd's virtio_user rings in (b) and (c));
* one busy-polling party per core: testpmd forwards on lcore 1 (its main lcore 0 only
  waits for commands), and vhostkit's threads are pinned to CPU 0 once testpmd runs (in (c)
  the two testpmds forward on lcores 1 and 0). Unpinned, the scheduler tends to wake
  vhostkit's ring worker on testpmd's busy core (wake-affine), and the two then take turns
  on one core; ``--no-pin`` shows that;
* the sink busy-polls its ring for ``--busy-poll-us`` before it re-enables kicks and sleeps
  (as vhost-net's ``busyloop_timeout``); testpmd polls all the time;
* testpmd runs non-interactively (``--stats-period 1``): in interactive mode the 22.11 main
  lcore spins at 100 % polling its command line, which takes the CPU vhostkit runs on (and in
  (c) puts four busy threads on two CPUs). testpmd's rates are its own per-second
  ``Rx-pps`` / ``Tx-pps`` figures, averaged over the reports that fall wholly inside the
  measurement window.

``--runs N`` repeats every phase N times and prints the medians (each run on its own line).
Each phase also says how much CPU other processes on the machine took during its window
("others"): on a shared machine a figure taken while others ran says little.

Run: ``python bench/datapath.py [--seconds 3] [--queue-size 256] [--packed] [--runs 3]``, or
``vhostkit bench --only testpmd`` (:func:`run`: (a) and (b) beside (c), split rings, medians of
3 runs; 2.5 s phases with ``--quick``, 3.5 s otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from vhostkit.bench.util import OthersLoad
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.testing.peers import Testpmd
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.user.backend.ring_device import SinkDevice
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature

log = logging.getLogger(__name__)

FRAME = bytes.fromhex("0200000000020200000000010800") + bytes(50)  # 64 bytes

#: the CPU vhostkit's threads run on; testpmd forwards on lcore 1 ("-l 0,1")
OUR_CPU = 0

_PPS = re.compile(r"\b(Rx|Tx)-pps:\s*(\d+)")


def report_pps(pmd: Testpmd, start: int, end: int, field: str = "Rx") -> float:
    """Mean of testpmd's per-second ``Rx-pps``/``Tx-pps`` between two output marks
    (``line_count`` values); the first report after ``start`` is skipped, since part of the
    second it covers lies before ``start``."""
    values = [
        int(m.group(2))
        for line in pmd.lines[start:end]
        if (m := _PPS.search(line)) is not None and m.group(1) == field
    ][1:]
    if not values:
        raise RuntimeError(f"no testpmd report inside the window: {pmd.tail(20)}")
    return statistics.fmean(values)


def pin_threads(cpus: set[int] | None) -> None:
    """Pin every thread of this process to ``cpus`` (``None``: every CPU); threads started
    later inherit the mask of the thread that starts them."""
    mask = cpus if cpus is not None else set(range(os.cpu_count() or 1))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mask)
        except (ProcessLookupError, OSError):
            pass  # the thread ended meanwhile


class Pinned:
    """``with Pinned(pin):`` pins this process's threads to :data:`OUR_CPU`, unpins after."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin

    def __enter__(self) -> None:
        if self.pin:
            pin_threads({OUR_CPU})

    def __exit__(self, *exc: object) -> None:
        if self.pin:
            pin_threads(None)


def phase_driver_to_vhost(
    d: Path, seconds: float, queue_size: int, packed: bool, batch: int, pin: bool
) -> tuple[float, float, float]:
    """(a): returns (testpmd RX pps, driver-side send pps, others' CPU %)."""
    path = d / "a.sock"
    frames = [FRAME] * batch
    with ExitStack() as stack:
        pmd = stack.enter_context(
            Testpmd.vhost_backend(path, forward_mode="rxonly", interactive=False)
        )
        stack.enter_context(Pinned(pin))
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(VirtioNetDriver(fe, packed=packed, queue_size=queue_size).start())
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        for _ in range(100):  # warm-up
            nic.send(frames)
        mark = pmd.line_count
        load = OthersLoad()
        load.start()
        sent = 0
        start = time.perf_counter()
        deadline = start + seconds
        send = nic.send
        while True:
            for _ in range(64):
                sent += send(frames)
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        others = load.stop()
        rx = report_pps(pmd, mark, pmd.line_count)
        nic.wait_tx_done(5.0)
        nic.stop()
    return rx, sent / elapsed, others


def phase_virtio_user_to_sink(
    d: Path, seconds: float, queue_size: int, packed: bool, pin: bool, busy_poll_us: float
) -> tuple[float, float, float]:
    """(b): returns (sink pps, testpmd TX pps, others' CPU %)."""
    path = d / "b.sock"
    device = SinkDevice(
        features=int(
            VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF | VirtioFeature.RING_PACKED
        ),
        protocol_features=DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG,
        num_queues=2,
        **({"busy_poll": busy_poll_us * 1e-6} if busy_poll_us else {}),
    )
    with ExitStack() as stack:
        stack.callback(device.close)
        listener = BackendListener(path, lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(
                path,
                forward_mode="txonly",
                packed_vq=packed,
                queue_size=queue_size,
                interactive=False,
            )
        )
        stack.enter_context(Pinned(pin))  # the ring workers already run: pin them too
        settle = threading.Event()
        settle.wait(0.5)  # a measurement window, not synchronisation
        load = OthersLoad()
        load.start()
        t0, c0, mark = time.perf_counter(), device.chains[1], pmd.line_count
        settle.wait(seconds)
        t1, c1 = time.perf_counter(), device.chains[1]
        others = load.stop()
        tx = report_pps(pmd, mark, pmd.line_count, "Tx")
    return (c1 - c0) / (t1 - t0), tx, others


def phase_reference(d: Path, seconds: float, queue_size: int, packed: bool) -> tuple[float, float]:
    """(c): testpmd virtio_user txonly -> testpmd vhost PMD rxonly; returns (RX pps, others'
    CPU %)."""
    path = d / "c.sock"
    with ExitStack() as stack:
        vhost = stack.enter_context(
            Testpmd.vhost_backend(path, forward_mode="rxonly", interactive=False)
        )
        # The two forwarding lcores must differ: the vhost PMD forwards on lcore 1, the
        # virtio_user one (main lcore 1) on lcore 0. Two busy-pollers on one core crawl.
        stack.enter_context(
            Testpmd.virtio_user_frontend(
                path,
                forward_mode="txonly",
                packed_vq=packed,
                queue_size=queue_size,
                eal_args=["--main-lcore", "1"],
                interactive=False,
            )
        )
        vhost.wait_for_line(r"Port 0: link state change event", 10)
        settle = threading.Event()
        settle.wait(0.5)
        load = OthersLoad()
        load.start()
        mark = vhost.line_count
        settle.wait(seconds)
        others = load.stop()
        return report_pps(vhost, mark, vhost.line_count), others


def run(quick: bool) -> list[dict[str, Any]]:
    """``vhostkit bench`` rows: (a) and (b) against (c), each with the others' CPU."""
    import shutil

    from vhostkit.bench import Skipped, make_row

    if shutil.which("dpdk-testpmd") is None:
        raise Skipped("dpdk-testpmd not installed (dpdk-dev)")
    # testpmd reports once a second and the first report in a window is dropped: >= 2.5 s
    seconds, runs, qs = (2.5 if quick else 3.5), 3, 256
    a_runs: list[tuple[float, float]] = []
    b_runs: list[tuple[float, float]] = []
    c_runs: list[tuple[float, float]] = []
    logging.getLogger("vhostkit").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="vhk-bench-", dir="/tmp") as tmp:
        d = Path(tmp)
        for _ in range(runs):
            a, _sent, a_load = phase_driver_to_vhost(d, seconds, qs, False, qs, True)
            a_runs.append((a, a_load))
            b, _tx, b_load = phase_virtio_user_to_sink(d, seconds, qs, False, True, 50.0)
            b_runs.append((b, b_load))
            c_runs.append(phase_reference(d, seconds, qs, False))
    c = statistics.median(x for x, _ in c_runs)
    c_load = max(load for _, load in c_runs)
    rows = []
    for label, runs_ in (
        ("(a) vhostkit driver -> testpmd vhost PMD", a_runs),
        ("(b) testpmd virtio_user -> vhostkit sink", b_runs),
    ):
        rows.append(
            make_row(
                "testpmd",
                label,
                statistics.median(x for x, _ in runs_) / 1e6,
                "Mpps",
                "testpmd -> testpmd",
                c / 1e6,
                aim=">= 0.50",
                note=f"64 B frames, split rings of {qs}, medians of {runs}; others' CPU: the "
                f"most in any phase (reference phase {c_load:.0f}%)"
                if label.startswith("(a)")
                else "",
                others_cpu=max(max(load for _, load in runs_), c_load),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.5)
    parser.add_argument("--queue-size", type=int, default=256, help="entries per ring, all phases")
    parser.add_argument(
        "--batch", type=int, default=None, help="frames per send() call (default: queue size)"
    )
    parser.add_argument("--packed", action="store_true", help="packed rings everywhere")
    parser.add_argument("--runs", type=int, default=1, help="repeat each phase, print medians")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin threads")
    parser.add_argument("--busy-poll-us", type=float, default=50.0, help="sink busy-poll budget")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ring = "packed" if args.packed else "split"
    qs = args.queue_size
    batch = args.batch or qs
    a_runs: list[float] = []
    b_runs: list[float] = []
    c_runs: list[float] = []
    print(
        f"{ring} rings, queue size {qs}, {batch} frames per send, "
        f"{f'pinned to CPU {OUR_CPU}' if args.pin else 'not pinned'}, "
        f"sink busy-poll {args.busy_poll_us:g} us, {args.seconds:g} s per phase"
    )
    with tempfile.TemporaryDirectory(prefix="vhk-bench-", dir="/tmp") as tmp:
        d = Path(tmp)
        for _ in range(args.runs):
            a, a_sent, a_load = phase_driver_to_vhost(
                d, args.seconds, qs, args.packed, batch, args.pin
            )
            a_runs.append(a)
            print(
                f"(a) vhostkit driver -> testpmd vhost PMD   : {a / 1e6:7.3f} Mpps "
                f"(driver queued {a_sent / 1e6:.3f} Mpps; others {a_load:.0f}% CPU)"
            )
            b, b_tx, b_load = phase_virtio_user_to_sink(
                d, args.seconds, qs, args.packed, args.pin, args.busy_poll_us
            )
            b_runs.append(b)
            print(
                f"(b) testpmd virtio_user -> vhostkit sink   : {b / 1e6:7.3f} Mpps "
                f"(testpmd TX {b_tx / 1e6:.3f} Mpps; others {b_load:.0f}% CPU)"
            )
            c, c_load = phase_reference(d, args.seconds, qs, args.packed)
            c_runs.append(c)
            print(
                f"(c) testpmd virtio_user -> testpmd vhost   : {c / 1e6:7.3f} Mpps "
                f"(reference; others {c_load:.0f}% CPU)"
            )
            print(f"(a)/(c) = {a / c:.3f}   (b)/(c) = {b / c:.3f}")
    if args.runs > 1:
        a, b, c = (statistics.median(r) for r in (a_runs, b_runs, c_runs))
        print(
            f"median of {args.runs}: (a) {a / 1e6:.3f}  (b) {b / 1e6:.3f}  (c) {c / 1e6:.3f} Mpps"
            f"   (a)/(c) = {a / c:.3f}   (b)/(c) = {b / c:.3f}"
        )


if __name__ == "__main__":
    main()
