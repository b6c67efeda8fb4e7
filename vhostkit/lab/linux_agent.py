"""The agent inside a lab's linux guest: sets up its NICs, then runs the runner's requests.

This file runs INSIDE the guest (Debian's kernel under QEMU, the host's root filesystem over
9p, see :mod:`vhostkit.testing.kernel_vm`), as the job of the one boot a lab gives each linux
guest, with the interpreter's ``-S``: it uses the standard library only, so that it starts in
well under a second under TCG. Its one argument is a directory on the job's 9p share, which
host and guest both see at the same path:

* ``config.json`` (written by the runner before the boot): the NICs (MAC, address or DHCP),
  the disks (serials), and the host's absolute paths of ``ip`` and ``busybox``;
* ``ready.json`` (written by the agent): what each NIC became (its name, ``eth<j>`` for the
  lab's NIC *j*, and its address, leased or given), and the disks' device names; or
  ``{"error": ...}`` when the set-up failed (the agent then exits);
* ``req-<n>.json`` / ``resp-<n>.json``: request *n* and its answer, numbered from 1. Each
  file is written under a temporary name and renamed, so the reader never sees half of one.

The share is mounted without caching (``cache=none``): a file the host creates is seen by the
guest's next lookup. Nothing else crosses between host and guest, so the agent polls for the
next request (every :data:`POLL` seconds); it ends on a ``quit`` request, and the job's end
powers the VM off.

Requests (``op``): ``run`` (a shell command, its exit code and output), ``ping`` (busybox
``ping``), ``tcp-send`` (connect, send zeros, half-close, wait for the receiver's reply),
``tcp-listen`` and ``tcp-result`` (receive one connection in the background, then report what
arrived and how long it took), ``quit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

POLL = 0.02
CHUNK = 1 << 20


def write_json(path: Path, data: object) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def sh(argv: list[str], timeout: float = 60.0) -> str:
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout.strip()}")
    return proc.stdout


def by_mac() -> dict[str, str]:
    found = {}
    for entry in Path("/sys/class/net").iterdir():
        with_address = entry / "address"
        if (entry / "device").exists() and with_address.exists():
            found[with_address.read_text().strip()] = entry.name
    return found


DHCP_SCRIPT = """#!/bin/sh
# busybox udhcpc calls this with the lease in its environment
case "$1" in
bound|renew)
    {ip} addr flush dev "$interface"
    {ip} addr add "$ip/$mask" dev "$interface"
    echo "$ip/$mask" > /tmp/vhk-lease-"$interface"
    ;;
esac
exit 0
"""


def set_up_nics(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Name NIC *j* ``eth<j>``, bring it up with its address or a DHCP lease."""
    ip, busybox = config["ip"], config["busybox"]
    macs = by_mac()
    nics = config["nics"]
    names = []
    for nic in nics:
        if nic["mac"] not in macs:
            raise RuntimeError(f"no interface with MAC {nic['mac']} (found {macs})")
        names.append(macs[nic["mac"]])
    # rename in two rounds, so that eth0 and eth1 may trade names
    for j, name in enumerate(names):
        sh([ip, "link", "set", "dev", name, "name", f"vhktmp{j}"])
    out: list[dict[str, Any]] = []
    script = Path("/tmp/vhk-udhcpc.sh")
    script.write_text(DHCP_SCRIPT.format(ip=ip))
    script.chmod(0o755)
    for j, nic in enumerate(nics):
        name = f"eth{j}"
        sh([ip, "link", "set", "dev", f"vhktmp{j}", "name", name])
        sh([ip, "link", "set", "dev", name, "up"])
        if nic.get("address"):
            sh([ip, "addr", "add", nic["address"], "dev", name])
            address = nic["address"]
        elif nic.get("dhcp"):
            t0 = time.monotonic()
            log = sh(
                [busybox, "udhcpc", "-i", name, "-f", "-q", "-n", "-t", "20", "-T", "1",
                 "-s", str(script)],
                timeout=60,
            )  # fmt: skip
            lease = Path(f"/tmp/vhk-lease-{name}")
            if not lease.exists():
                raise RuntimeError(f"{name}: udhcpc got no lease: {log.strip()}")
            address = lease.read_text().strip()
            out.append({"name": name, "address": address, "dhcp_seconds": time.monotonic() - t0})
            continue
        else:
            address = ""
        out.append({"name": name, "address": address})
    return out


def find_disks(config: dict[str, Any]) -> list[str]:
    """The block device of each disk, found by its serial (``disk<j>``)."""
    serials = {}
    for entry in Path("/sys/block").iterdir():
        serial = entry / "serial"
        if serial.exists():
            serials[serial.read_text().strip()] = entry.name
    out = []
    for j in range(config["disks"]):
        if f"disk{j}" not in serials:
            raise RuntimeError(f"no block device with serial disk{j} (found {serials})")
        out.append(serials[f"disk{j}"])
    return out


# --- requests ---------------------------------------------------------------------------------


def op_run(req: dict[str, Any]) -> dict[str, Any]:
    """A shell command in a session of its own (on a time-out, all of it is killed)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", req["command"]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/tmp",
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=req["timeout"])
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return {
            "error": f"the command ran past its {req['timeout']} s timeout",
            "output": output.decode(errors="replace"),
        }
    return {
        "exit_code": proc.returncode,
        "output": output.decode(errors="replace"),
        "seconds": round(time.monotonic() - t0, 3),
    }


def op_ping(req: dict[str, Any], busybox: str) -> dict[str, Any]:
    argv = [busybox, "ping", "-c", str(req["count"]), "-i", str(req["interval"])]
    argv += ["-W", str(max(1, round(req["timeout"]))), req["to"]]
    deadline = req["count"] * req["interval"] + req["timeout"] + 10
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=deadline
    )
    rtts = [float(m) for m in re.findall(r"seq=\d+ ttl=\d+ time=([\d.]+) ms", proc.stdout)]
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", proc.stdout)
    if m is None:
        return {"error": f"unexpected ping output: {proc.stdout.strip()}"}
    return {"sent": int(m.group(1)), "received": int(m.group(2)), "rtt_ms": rtts}


def op_tcp_send(req: dict[str, Any]) -> dict[str, Any]:
    total = req["bytes"]
    data = memoryview(bytes(CHUNK))
    t0 = time.monotonic()
    with socket.create_connection((req["to"], req["port"]), timeout=60) as s:
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            s.sendall(data[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(256):
            reply += chunk
    return {"sent": sent, "seconds": round(time.monotonic() - t0, 6), "reply": reply.decode()}


class Receiver:
    """One TCP connection received in the background: bytes and seconds (first byte to EOF)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("0.0.0.0", port))
        self.sock.settimeout(120)
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                buf = bytearray(CHUNK)
                got = 0
                first = 0.0
                while n := conn.recv_into(buf):
                    if not got:
                        first = time.monotonic()
                    got += n
                seconds = time.monotonic() - first if got else 0.0
                conn.sendall(f"{got} {seconds:.6f}\n".encode())
            self.result = {"received": got, "seconds": round(seconds, 6)}
        except OSError as exc:
            self.result = {"error": f"receiving: {exc}"}
        finally:
            self.sock.close()


def serve(directory: Path, config: dict[str, Any]) -> None:
    receivers: dict[int, Receiver] = {}
    n = 1
    while True:
        req_path = directory / f"req-{n}.json"
        if not req_path.exists():
            time.sleep(POLL)
            continue
        req = json.loads(req_path.read_text())
        op = req.get("op")
        try:
            if op == "quit":
                write_json(directory / f"resp-{n}.json", {"ok": True})
                return
            if op == "run":
                answer = op_run(req)
            elif op == "ping":
                answer = op_ping(req, config["busybox"])
            elif op == "tcp-send":
                answer = op_tcp_send(req)
            elif op == "tcp-listen":
                receivers[req["port"]] = Receiver(req["port"])
                answer = {"ok": True}
            elif op == "tcp-result":
                receiver = receivers.pop(req["port"])
                receiver.thread.join(req.get("timeout", 60))
                answer = receiver.result or {"error": "no connection arrived"}
            else:
                answer = {"error": f"unknown request {op!r}"}
        except Exception as exc:  # reported to the runner, the agent goes on
            answer = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        write_json(directory / f"resp-{n}.json", answer)
        n += 1


def main() -> int:
    directory = Path(sys.argv[1])
    config = json.loads((directory / "config.json").read_text())
    try:
        ready = {"nics": set_up_nics(config), "disks": find_disks(config)}
    except Exception as exc:
        write_json(directory / "ready.json", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    write_json(directory / "ready.json", ready)
    serve(directory, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
