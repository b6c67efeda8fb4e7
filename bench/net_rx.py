"""Receive rate of vhostkit's tap-backed net back-end: frames from a tap into a guest's rings.

A :class:`~vhostkit.devices.net.NetDevice` serves a tap over vhost-user; vhostkit's
:class:`~vhostkit.guest.net.VirtioNetDriver` plays the guest through
:class:`~vhostkit.user.Frontend` and keeps its receive ring full. A separate process writes
64-byte frames into the tap with an AF_PACKET socket as fast as it can (it has its own GIL);
the figure is what the driver received per second, and how many frames the device had to drop
(no receive buffer) or the tap's queue overflowed. Not a test: nothing is asserted.

The tap has no address, no IPv6, no bridge and no route: the frames reach only the device.

Run: ``python3 bench/net_rx.py [--seconds 3] [--queue-size 256] [--packed] [--runs 3]``
(as root: taps need CAP_NET_ADMIN), or ``vhostkit bench --only net_rx`` (:func:`run`: the
received rate against what the sender put into the tap, medians of 3). The device runs in
this process here; ``bench/net_tap.py`` measures the daemon in its own.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from vhostkit.devices.net import NetDevice
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.kernel.tap import Tap
from vhostkit.user import BackendListener, Frontend

GUEST_MAC = bytes.fromhex("020000000002")
#: destination: the guest's MAC; source: another made-up one; the IEEE "local experimental"
#: EtherType, so no stack takes it for anything
FRAME = GUEST_MAC + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(50)

_SENDER = """
import socket, sys, time
ifname, seconds, frame = sys.argv[1], float(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
send = s.send
sent = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for _ in range(256):
        try:
            send(frame)
            sent += 1
        except OSError:  # the tap's queue is full (ENOBUFS): the device is behind
            pass
print(sent, flush=True)
"""


def one_run(seconds: float, queue_size: int, packed: bool) -> tuple[float, float, int]:
    """Returns (received frames/s, sent frames/s, frames the device dropped)."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vhk-bench-")))
        tap = stack.enter_context(Tap("vhkbench%d", nonblocking=True))
        tap.disable_ipv6()
        tap.up()
        device = NetDevice(tap, mac=GUEST_MAC)
        stack.callback(device.close)
        listener = BackendListener(tmp / "net.sock", lambda: device).start()
        stack.callback(listener.stop)
        fe = Frontend.connect(tmp / "net.sock", timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(VirtioNetDriver(fe, packed=packed, queue_size=queue_size).start())
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER, tap.name, str(seconds), FRAME.hex()],
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(sender.kill)
        got = 0
        start = time.perf_counter()
        while sender.poll() is None:
            got += len(nic.recv(timeout=0.1))
        elapsed = time.perf_counter() - start
        # what was still in flight when the sender stopped
        while batch := nic.recv(timeout=0.2):
            got += len(batch)
        assert sender.stdout is not None
        sent = int(sender.stdout.read().strip() or 0)
        return got / elapsed, sent / elapsed, device.rx_dropped


def run(quick: bool) -> list[dict[str, Any]]:
    """``vhostkit bench`` rows: frames received per second against frames sent per second."""
    import os

    from vhostkit.bench import Skipped, make_row

    if os.geteuid() != 0:
        raise Skipped("taps need CAP_NET_ADMIN (run as root)")
    seconds, runs = (1.0 if quick else 3.0), 3
    got, sent, dropped = zip(*(one_run(seconds, 256, False) for _ in range(runs)), strict=True)
    return [
        make_row(
            "net_rx",
            "tap -> NetDevice -> driver, 64 B (one process)",
            statistics.median(got) / 1e3,
            "kfps",
            "AF_PACKET sender into the tap",
            statistics.median(sent) / 1e3,
            note=f"medians of {runs}; device dropped {statistics.median(dropped):.0f} per run",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    rings = "packed" if args.packed else "split"
    print(f"{rings} rings, queue size {args.queue_size}, 64-byte frames, {args.seconds} s per run")
    rates = []
    for _ in range(args.runs):
        got, sent, dropped = one_run(args.seconds, args.queue_size, args.packed)
        rates.append(got)
        print(
            f"tap -> NetDevice -> vhostkit driver: {got / 1e3:8.1f} kframes/s received "
            f"(sender {sent / 1e3:.1f} kframes/s; device dropped {dropped})"
        )
    if args.runs > 1:
        print(f"median of {args.runs}: {statistics.median(rates) / 1e3:.1f} kframes/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
