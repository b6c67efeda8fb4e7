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

Each step prints one JSON line (``{"step": ...}``) on stdout; the host test asserts on them.
Any failure raises (a traceback and a non-zero exit code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

CHUNK = 1 << 20


def emit(step: str, **fields: object) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def find_virtio_nic() -> str:
    for link in sorted(Path("/sys/class/net").iterdir()):
        driver = link / "device" / "driver"
        if driver.is_symlink() and os.path.basename(os.readlink(driver)) == "virtio_net":
            return link.name
    raise SystemExit(f"no virtio_net interface among {os.listdir('/sys/class/net')}")


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


def upload(host: str, port: int, total: int, seed: int) -> None:
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
    )


def download(host: str, port: int) -> None:
    h = hashlib.sha256()
    got = 0
    buf = bytearray(CHUNK)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as s:
        while n := s.recv_into(buf):
            h.update(memoryview(buf)[:n])
            got += n
    emit("download", received=got, sha256=h.hexdigest(), seconds=round(time.monotonic() - t0, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="CIDR for the guest's interface")
    parser.add_argument("--host", required=True)
    parser.add_argument("--up-port", type=int, required=True)
    parser.add_argument("--down-port", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True, help="upload size")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()

    ifname = find_virtio_nic()
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
    )
    for count, size in ((3, 1472), (4, 56)):
        emit("ping", **ping(args.host, count, size))
    upload(args.host, args.up_port, args.bytes, args.seed)
    download(args.host, args.down_port)
    emit("stats", **stats(ifname))


if __name__ == "__main__":
    main()
