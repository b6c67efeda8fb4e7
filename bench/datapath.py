"""Packets per second of 64-byte frames through real peers, vhostkit on one side of the rings.

Three phases, each a few seconds, all on this machine (nothing leaves it):

* (a) vhostkit as the guest: :class:`VirtioNetDriver` through :class:`Frontend` sends into
  DPDK's vhost PMD in ``rxonly`` mode; the rate is testpmd's RX counter.
* (b) vhostkit as the device: DPDK's virtio_user in ``txonly`` mode fills the TX ring of a
  :class:`vhostkit.user.daemon.SinkDevice`; the rate is the frames the sink consumed.
* (c) the reference: testpmd's virtio_user (``txonly``) into testpmd's vhost PMD (``rxonly``).

It prints each rate and (a)/(c), (b)/(c). Not a test: nothing is asserted.

Run: ``python bench/datapath.py [--seconds 3] [--queue-size 256] [--packed]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from vhostkit.testing.peers import Testpmd
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.user.daemon import SinkDevice
from vhostkit.user.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.netdriver import VirtioNetDriver

log = logging.getLogger(__name__)

FRAME = bytes.fromhex("0200000000020200000000010800") + bytes(50)  # 64 bytes


def phase_driver_to_vhost(
    d: Path, seconds: float, queue_size: int, packed: bool, batch: int
) -> tuple[float, float]:
    """(a): returns (testpmd RX pps, driver-side send pps)."""
    path = d / "a.sock"
    frames = [FRAME] * batch
    with ExitStack() as stack:
        pmd = stack.enter_context(Testpmd.vhost_backend(path, forward_mode="rxonly"))
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(VirtioNetDriver(fe, packed=packed, queue_size=queue_size).start())
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        for _ in range(100):  # warm-up
            nic.send(frames)
        before = pmd.port_stats(0).rx_packets
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
        after = pmd.port_stats(0).rx_packets
        nic.wait_tx_done(5.0)
        nic.stop()
    return (after - before) / elapsed, sent / elapsed


def phase_virtio_user_to_sink(d: Path, seconds: float, packed: bool) -> tuple[float, float]:
    """(b): returns (sink pps, testpmd TX pps)."""
    path = d / "b.sock"
    device = SinkDevice(
        features=int(
            VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF | VirtioFeature.RING_PACKED
        ),
        protocol_features=DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG,
        num_queues=2,
    )
    with ExitStack() as stack:
        stack.callback(device.close)
        listener = BackendListener(path, lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(path, forward_mode="txonly", packed_vq=packed)
        )
        settle = threading.Event()
        settle.wait(0.5)  # a measurement window, not synchronisation
        t0, c0 = time.perf_counter(), device.chains[1]
        s0 = pmd.port_stats(0).tx_packets
        settle.wait(seconds)
        t1, c1 = time.perf_counter(), device.chains[1]
        s1 = pmd.port_stats(0).tx_packets
    return (c1 - c0) / (t1 - t0), (s1 - s0) / (t1 - t0)


def phase_reference(d: Path, seconds: float, packed: bool) -> float:
    """(c): testpmd virtio_user txonly -> testpmd vhost PMD rxonly; returns RX pps."""
    path = d / "c.sock"
    with ExitStack() as stack:
        vhost = stack.enter_context(Testpmd.vhost_backend(path, forward_mode="rxonly"))
        # The two forwarding lcores must differ: the vhost PMD forwards on lcore 1, the
        # virtio_user one (main lcore 1) on lcore 0. Two busy-pollers on one core crawl.
        stack.enter_context(
            Testpmd.virtio_user_frontend(
                path, forward_mode="txonly", packed_vq=packed, eal_args=["--main-lcore", "1"]
            )
        )
        vhost.wait_for_line(r"Port 0: link state change event", 10)
        settle = threading.Event()
        settle.wait(0.5)
        t0 = time.perf_counter()
        r0 = vhost.port_stats(0).rx_packets
        settle.wait(seconds)
        r1 = vhost.port_stats(0).rx_packets
        t1 = time.perf_counter()
    return (r1 - r0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="frames per send() call")
    parser.add_argument("--packed", action="store_true", help="packed rings everywhere")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ring = "packed" if args.packed else "split"
    with tempfile.TemporaryDirectory(prefix="vhk-bench-", dir="/tmp") as tmp:
        d = Path(tmp)
        a, a_sent = phase_driver_to_vhost(d, args.seconds, args.queue_size, args.packed, args.batch)
        print(
            f"(a) vhostkit driver -> testpmd vhost PMD   : {a / 1e6:7.3f} Mpps "
            f"(driver queued {a_sent / 1e6:.3f} Mpps; {ring}, queue {args.queue_size})"
        )
        b, b_tx = phase_virtio_user_to_sink(d, args.seconds, args.packed)
        print(
            f"(b) testpmd virtio_user -> vhostkit sink   : {b / 1e6:7.3f} Mpps "
            f"(testpmd TX {b_tx / 1e6:.3f} Mpps)"
        )
        c = phase_reference(d, args.seconds, args.packed)
        print(f"(c) testpmd virtio_user -> testpmd vhost   : {c / 1e6:7.3f} Mpps (reference)")
        print(f"(a)/(c) = {a / c:.3f}   (b)/(c) = {b / c:.3f}")


if __name__ == "__main__":
    main()
