"""Frames per second through the net daemon's two data planes, and through kernel vhost-net
driven directly, in the same (kernel) VM. Only the ratios mean anything.

Three phases, the same driver in each (vhostkit's :class:`VirtioNetDriver`, in this process,
sending 64-byte frames in batches of 64 on a 256-entry TX ring into a tap that nobody reads):

* **kernel plane**: ``vhostkit backend net --control PATH --dataplane kernel`` in a process of
  its own; the driver reaches it through :class:`Frontend`, the daemon hands the rings to
  ``/dev/vhost-net``;
* **user plane**: the same daemon after ``swap(PATH, "user")`` (its NetDevice serves the
  rings, in Python);
* **direct vhost-net**: vhostkit's VMM (:class:`vhostkit.vmm.VirtioNetDevice` with a
  :class:`~vhostkit.vmm.KernelNetPlane`): the driver's rings go to ``/dev/vhost-net``
  without any vhost-user socket.

The issue's aim: the kernel plane within 10 % of direct vhost-net (both have no Python per
packet on the device side; the difference is the vhost-user set-up, which costs nothing
per frame).

Run: ``python3 bench/net_planes.py [--seconds 3] [--runs 3]``. Where ``/dev/vhost-net`` is
missing it runs itself inside the kernel VM (:mod:`vhostkit.testing.kernel_vm`) and prints
what it printed there. Not a test: nothing is asserted. ``vhostkit bench --only planes``
runs it through :func:`run` (not with ``--quick``: booting the VM and the emulated runs take
minutes): the kernel plane against direct vhost-net, and the user plane against the kernel
plane, medians of 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vhostkit.guest.net import VirtioNetDriver
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature

#: ``vhostkit bench`` skips this module under ``--quick``
SLOW = True
#: the line ``--json`` prints its figures on (the VM's output has the boot log around it)
JSON_MARK = "NET-PLANES-JSON "

FRAME = bytes.fromhex("0200000000020200000000018801") + bytes(50)  # 64 bytes
BATCH = 64
QUEUE_SIZE = 256
FEATURES = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF)


def pump(nic: VirtioNetDriver, seconds: float) -> float:
    """Send frames for ``seconds``; completed frames per second."""
    frames = [FRAME] * BATCH
    start_done = nic.stats().tx_completed
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if not nic.send(frames):
            nic.wait_tx_completed(nic.stats().tx_completed + 1, 1.0)
    nic.wait_tx_done(10)
    elapsed = time.perf_counter() - t0
    return (nic.stats().tx_completed - start_done) / elapsed


@contextlib.contextmanager
def daemon(d: Path, tap: str) -> Iterator[tuple[Path, Path]]:
    sock, ctl = d / "net.sock", d / "net.ctl"
    r, w = os.pipe()
    argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
    argv += ["--tap", tap, "--control", str(ctl), "--dataplane", "kernel"]
    argv += ["--ready-fd", str(w), "--log-level", "warning"]
    proc = subprocess.Popen(argv, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            if ready.read() != b"READY=1\n":
                raise RuntimeError("the daemon did not start")
        yield sock, ctl
    finally:
        proc.terminate()
        proc.wait(20)


def phase_daemon(seconds: float, runs: int) -> tuple[list[float], list[float], list[float]]:
    """(kernel plane rates, user plane rates, swap pauses in ms)."""
    from vhostkit.devices.net_swap import swap
    from vhostkit.user import Frontend

    kernel: list[float] = []
    user: list[float] = []
    pauses: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="vhk-bench-") as tmp,
        daemon(Path(tmp), "vhkbd%d") as (sock, ctl),
        Frontend.connect(sock, timeout=10) as fe,
        VirtioNetDriver(fe, queue_size=QUEUE_SIZE, features=FEATURES).start() as nic,
    ):
        for _ in range(runs):
            kernel.append(pump(nic, seconds))
            pauses.append(swap(ctl, "user").pause_ms)
            user.append(pump(nic, seconds))
            pauses.append(swap(ctl, "kernel").pause_ms)
        nic.stop()
    return kernel, user, pauses


def phase_direct(seconds: float, runs: int) -> list[float]:
    from vhostkit.kernel import Tap
    from vhostkit.vmm import KernelNetPlane, VirtioNetDevice

    rates = []
    with Tap("vhkbv%d", nonblocking=True) as tap:
        tap.up()
        device = VirtioNetDevice(KernelNetPlane(tap), features=FEATURES, queue_size=QUEUE_SIZE)
        device.start()
        try:
            for _ in range(runs):
                rates.append(pump(device.nic, seconds))
        finally:
            device.stop()
            device.close()
            device.plane.close()
    return rates


def run(quick: bool) -> list[dict[str, Any]]:
    """``vhostkit bench`` rows (the ratios; the VM is emulated, so absolute rates say little)."""
    from vhostkit.bench import Skipped, make_row

    seconds, runs = 3.0, 3
    argv = ["python3", __file__, "--seconds", str(seconds), "--runs", str(runs), "--json"]
    if os.path.exists("/dev/vhost-net"):
        output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    else:
        from vhostkit.testing.kernel_vm import run_in_vm

        try:
            result = run_in_vm(argv, timeout=900)
        except Exception as exc:  # no kernel image, no QEMU: say why
            raise Skipped(f"no /dev/vhost-net and no kernel VM: {exc}") from exc
        if result.returncode != 0:
            raise RuntimeError(f"net_planes in the VM exited {result.returncode}")
        output = result.output
    line = next(x for x in output.splitlines() if x.startswith(JSON_MARK))
    m = json.loads(line[len(JSON_MARK) :])
    d, k, u = (statistics.median(m[x]) for x in ("direct", "kernel", "user"))
    note = f"in the kernel VM (TCG); 64 B frames; medians of {runs}; only the ratios count"
    return [
        make_row("planes", "kernel-offload plane", k, "fps", "direct vhost-net", d, note=note),
        make_row("planes", "user plane", u, "fps", "kernel-offload plane", k),
        make_row("planes", "user plane (vs vhost-net)", u, "fps", "direct vhost-net", d),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if not os.path.exists("/dev/vhost-net"):
        from vhostkit.testing.kernel_vm import run_in_vm

        print("no /dev/vhost-net here: running in the kernel VM", flush=True)
        argv = ["python3", __file__, "--seconds", str(args.seconds), "--runs", str(args.runs)]
        result = run_in_vm([*argv, *(["--json"] if args.json else [])], timeout=600)
        print(result.output, end="")
        sys.exit(result.returncode)
    for knob in ("/proc/sys/net/ipv6/conf/default/disable_ipv6",):
        with contextlib.suppress(OSError):
            Path(knob).write_text("1")
    direct = phase_direct(args.seconds, args.runs)
    kernel, user, pauses = phase_daemon(args.seconds, args.runs)
    for i in range(args.runs):
        print(
            f"run {i + 1}: direct vhost-net {direct[i]:,.0f} fps, kernel plane "
            f"{kernel[i]:,.0f} fps, user plane {user[i]:,.0f} fps"
        )
    d, k, u = (statistics.median(x) for x in (direct, kernel, user))
    print(f"median: direct vhost-net {d:,.0f} fps, kernel plane {k:,.0f}, user plane {u:,.0f}")
    print(f"kernel plane / direct vhost-net: {k / d:.2f}")
    print(f"user plane / kernel plane: {u / k:.2f}")
    print(f"swap pauses: {', '.join(f'{p:.2f}' for p in pauses)} ms")
    if args.json:
        figures = {"direct": direct, "kernel": kernel, "user": user, "pauses_ms": pauses}
        print(JSON_MARK + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
