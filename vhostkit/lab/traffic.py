"""Traffic a lab's namespaces send and count: numbered streams received on a UDP socket, and
ping from a raw ICMP socket."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from vhostkit.lab.iphost import STREAM_PORT, StreamCount, parse_stream_payload
from vhostkit.lab.network import LabNetwork

__all__ = ["NamespaceCounter", "icmp_ping", "udp_socket"]

log = logging.getLogger(__name__)

#: Step kinds, planes and guest kinds this runner carries out.


class NamespaceCounter:
    """A UDP socket on :data:`STREAM_PORT` inside a namespace, counting numbered streams."""

    def __init__(self, network: LabNetwork, netns: str) -> None:
        self.sock = network.call(lambda: udp_socket(), netns)
        self.counts: dict[int, StreamCount] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"count-{netns}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping:
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            numbered = parse_stream_payload(data)
            if numbered is not None:
                with self.lock:
                    self.counts.setdefault(numbered[0], StreamCount()).add(numbered[1])

    def count(self, ident: int) -> StreamCount:
        with self.lock:
            found = self.counts.get(ident, StreamCount())
            copy = StreamCount(found.received, found.duplicates, found.reordered, found.highest)
            copy.seen = set(found.seen)
            return copy

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.sock.close()


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", STREAM_PORT))
    sock.settimeout(0.2)
    return sock


def icmp_ping(
    target: ipaddress.IPv4Address, count: int, interval: float, timeout: float
) -> dict[str, Any]:
    """Ping ``target`` from the calling thread's namespace with a raw ICMP socket."""
    from vhostkit.testing.packets import checksum

    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(
        socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMP
    ) as s:
        for seq in range(1, count + 1):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(56)
            body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
            sent = time.monotonic()
            s.sendto(body, (str(target), 0))
            deadline = sent + (timeout if seq == count else max(interval, timeout))
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    packet, (source, _) = s.recvfrom(2048)
                except TimeoutError:
                    break
                ihl = (packet[0] & 0xF) * 4
                kind, _code, _c, rid, rseq = struct.unpack_from("!BBHHH", packet, ihl)
                if kind == 0 and rid == ident and rseq == seq and source == str(target):
                    rtts.append(round((time.monotonic() - sent) * 1000, 3))
                    break
            pause = sent + interval - time.monotonic()
            if pause > 0 and seq < count:
                time.sleep(pause)
    return {"sent": count, "received": len(rtts), "rtt_ms": rtts}
