"""Runs INSIDE the kernel VM of ``tests/test_guest_kernel_netbackend.py`` (as root, in a chroot
of the host's root filesystem): the Linux guest's side of the vhost-user net back-end test.

It finds the interface bound to the ``virtio_net`` driver, brings it up with ``--address``,
then talks to ``--host`` (the tap's address, in the host test's network namespace):

* ``ping``: busybox ``ping`` (the host may have no iputils), one MTU-sized series and one
  small series; every request must be answered;
* ``upload``: a TCP connection to ``--up-port``, ``--bytes`` pseudo-random bytes (seeded by
  ``--seed``, so the host can compute the same sha256) written in large ``sendall`` calls
  (the guest's TCP stack then hands virtio-net 64 KiB TSO segments with a partial checksum),
  then half-close; the host answers ``<count> <sha256>`` of what it received;
* ``download``: a TCP connection to ``--down-port``; the host writes its data and closes; the
  guest reports the count and sha256 of what arrived (the host's stack hands the tap GSO
  frames, which reach the guest through mergeable receive buffers).

With ``--flows N`` (N > 1) the transfers run in parallel instead: N uploads (flow *i* sends
``--bytes`` seeded by ``--seed + i``) and N downloads at once, each in its own thread, thread
*i* of each kind pinned to the guest's CPU *i* mod the CPU count, so that with multiqueue
(XPS maps CPU *k* to TX queue *k*) every TX queue carries data. One ``upload`` and one
``download`` line per flow (with ``flow`` and ``cpu``).

With ``--echo-port``, before the transfers: on each CPU, a thread pinned to it sends
``--echo-rounds`` datagrams from one connected UDP socket to the host's echo server at that
port, each after the previous reply came back (an ``echo`` line per CPU).

Each step prints one JSON line (``{"step": ...}``) on stdout; the host test asserts on them.
Any failure raises (a traceback and a non-zero exit code).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from guest_common import emit, find_by_driver, pinned

CHUNK = 1 << 20


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def stats(ifname: str) -> dict[str, int]:
    base = Path("/sys/class/net", ifname, "statistics")
    names = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped")
    return {n: int((base / n).read_text()) for n in names}


def ping(host: str, count: int, size: int) -> dict[str, int]:
    busybox = shutil.which("busybox") or "/bin/busybox"
    # -A: the next request as soon as a reply came (no 1 s interval); -w: overall deadline
    out = run(busybox, "ping", "-A", "-c", str(count), "-s", str(size), "-w", "20", host)
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    if m is None:
        raise RuntimeError(f"unexpected ping output: {out}")
    return {"size": size, "sent": int(m.group(1)), "received": int(m.group(2))}


def queues(ifname: str) -> dict[str, object]:
    """The interface's active queues (``rx-N``, ``tx-N``: as many as the driver enabled)
    and each TX queue's XPS CPU mask."""
    base = Path("/sys/class/net", ifname, "queues")
    names = sorted(p.name for p in base.iterdir())
    xps = {}
    for name in names:
        if name.startswith("tx-"):
            with contextlib.suppress(OSError):  # no XPS in the kernel: no file
                xps[name] = (base / name / "xps_cpus").read_text().strip()
    return {"queues": names, "xps_cpus": xps}


def upload(host: str, port: int, total: int, seed: int, **extra: object) -> None:
    data = random.Random(seed).randbytes(total)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        view = memoryview(data)
        for off in range(0, total, CHUNK):
            s.sendall(view[off : off + CHUNK])
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(256):
            reply += chunk
    count, _, digest = reply.decode().strip().partition(" ")
    emit(
        "upload",
        sent=total,
        sent_sha256=hashlib.sha256(data).hexdigest(),
        host_received=int(count),
        host_sha256=digest,
        seconds=round(time.monotonic() - t0, 3),
        **extra,
    )


def download(host: str, port: int, **extra: object) -> None:
    h = hashlib.sha256()
    got = 0
    buf = bytearray(CHUNK)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        while n := s.recv_into(buf):
            h.update(memoryview(buf)[:n])
            got += n
    emit(
        "download",
        received=got,
        sha256=h.hexdigest(),
        seconds=round(time.monotonic() - t0, 3),
        **extra,
    )


def echo(host: str, port: int, rounds: int, cpu: int) -> None:
    """``rounds`` request/reply exchanges with the host's UDP echo server, one at a time."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        for i in range(rounds):
            data = f"echo cpu {cpu} round {i}".encode()
            s.send(data)
            reply = s.recv(256)
            if reply != data:
                raise RuntimeError(f"echo: sent {data!r}, got {reply!r}")
    emit("echo", cpu=cpu, rounds=rounds)


def parallel(args: argparse.Namespace, cpus: list[int]) -> None:
    """``--flows`` uploads and as many downloads at once, one thread each, pinned to CPUs."""
    jobs: list[tuple[int, Callable[[], None]]] = []
    for i in range(args.flows):
        cpu = cpus[i % len(cpus)]
        jobs += [
            (
                cpu,
                partial(
                    upload, args.host, args.up_port, args.bytes, args.seed + i, flow=i, cpu=cpu
                ),
            ),
            (cpu, partial(download, args.host, args.down_port, flow=i, cpu=cpu)),
        ]
    pinned(jobs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="CIDR for the guest's interface")
    parser.add_argument("--host", required=True)
    parser.add_argument("--up-port", type=int, required=True)
    parser.add_argument("--down-port", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True, help="upload size")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--flows", type=int, default=1, help="parallel flows each way")
    parser.add_argument("--echo-port", type=int, help="UDP echo from each CPU first")
    parser.add_argument("--echo-rounds", type=int, default=4)
    args = parser.parse_args()

    ifname = find_by_driver("/sys/class/net", "virtio_net")
    device = Path("/sys/class/net", ifname, "device")
    # no IPv6 (router solicitations, MLD): only the test's own frames cross the device
    Path("/proc/sys/net/ipv6/conf", ifname, "disable_ipv6").write_text("1")
    run("ip", "link", "set", ifname, "up")
    run("ip", "addr", "add", args.address, "dev", ifname)
    emit(
        "link",
        ifname=ifname,
        mac=Path("/sys/class/net", ifname, "address").read_text().strip(),
        mtu=int(Path("/sys/class/net", ifname, "mtu").read_text()),
        # the feature bits the guest driver acked, bit 0 first (virtio core's sysfs file)
        features=(device / "features").read_text().strip(),
        **queues(ifname),
    )
    for count, size in ((3, 1472), (4, 56)):
        emit("ping", **ping(args.host, count, size))
    cpus = sorted(os.sched_getaffinity(0))
    if args.echo_port is not None:
        pinned([(c, partial(echo, args.host, args.echo_port, args.echo_rounds, c)) for c in cpus])
    if args.flows > 1:
        parallel(args, cpus)
    else:
        upload(args.host, args.up_port, args.bytes, args.seed)
        download(args.host, args.down_port)
    emit("stats", **stats(ifname))


if __name__ == "__main__":
    main()
