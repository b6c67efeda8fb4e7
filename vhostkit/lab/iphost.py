"""A tiny IPv4 host for a virtual guest's NIC, sans I/O: frames in, frames out.

:class:`IpHost` is what a ``virtual`` guest runs on its virtio-net driver. It answers ARP for
its address and ICMP echo requests, resolves its peers with ARP, sends echo requests and
records their replies, and sends and counts *numbered streams*: UDP datagrams to
:data:`STREAM_PORT` whose payload carries a stream id and a sequence number, so the receiver
can count what was lost, doubled or reordered. It never touches a socket or a ring; the guest
process moves the frames (:mod:`vhostkit.lab.guest`), and a namespace counts a stream with an
ordinary UDP socket and :func:`parse_stream_payload`.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vhostkit.testing.packets import (
    ArpOp,
    EtherType,
    IcmpType,
    arp_frame,
    checksum,
    icmp_echo_frame,
    parse_arp,
    parse_eth,
    parse_icmp_echo,
)

__all__ = [
    "STREAM_MAGIC",
    "STREAM_PORT",
    "IpHost",
    "StreamCount",
    "parse_stream_payload",
    "stream_payload",
]

#: The UDP port numbered streams are sent to.
STREAM_PORT = 7777
#: The first bytes of a stream datagram's payload.
STREAM_MAGIC = b"VHKS"
_STREAM = struct.Struct("!4sIQ")  # magic, stream id, sequence number
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_PROTO_UDP = 17
#: Frames waiting for an ARP answer, per peer; more are dropped (as a kernel would).
PENDING_MAX = 64


def stream_payload(stream: int, seq: int, size: int) -> bytes:
    """The payload of datagram ``seq`` of ``stream``, padded to ``size`` bytes."""
    return _STREAM.pack(STREAM_MAGIC, stream, seq).ljust(size, b"\x00")


def parse_stream_payload(payload: bytes) -> tuple[int, int] | None:
    """``(stream, seq)`` of a stream datagram's payload, or ``None`` if it is not one."""
    if len(payload) < _STREAM.size:
        return None
    magic, stream, seq = _STREAM.unpack_from(payload)
    return (stream, seq) if magic == STREAM_MAGIC else None


@dataclass
class StreamCount:
    """What a receiver saw of one numbered stream.

    ``reordered`` counts datagrams that arrived after a higher sequence number; ``lost`` needs
    the number sent (:meth:`lost`).
    """

    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    highest: int = -1
    seen: set[int] = field(default_factory=set)

    def add(self, seq: int) -> None:
        if seq in self.seen:
            self.duplicates += 1
            return
        self.seen.add(seq)
        self.received += 1
        if seq < self.highest:
            self.reordered += 1
        else:
            self.highest = seq

    def lost(self, sent: int) -> int:
        """How many of sequence numbers ``0 .. sent - 1`` never arrived."""
        return sent - len([s for s in self.seen if s < sent])

    def longest_gap(self, sent: int) -> int:
        """The longest run of consecutive sequence numbers of ``0 .. sent - 1`` that never
        arrived (an outage shows as one long gap; scattered drops as many short ones)."""
        longest = run = 0
        for seq in range(sent):
            run = 0 if seq in self.seen else run + 1
            longest = max(longest, run)
        return longest


class IpHost:
    """One IPv4 address on one Ethernet NIC, answering and counting (see the module doc)."""

    def __init__(
        self,
        mac: bytes,
        address: ipaddress.IPv4Interface,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mac = mac
        self.address = address
        self.ip = address.ip.packed
        self.clock = clock
        self.neighbours: dict[bytes, bytes] = {}
        self.pending: dict[bytes, deque[Callable[[bytes], bytes]]] = {}
        #: (ident, seq) of echo requests sent -> time sent; replies -> round-trip time
        self.ping_sent: dict[tuple[int, int], float] = {}
        self.ping_rtt: dict[tuple[int, int], float] = {}
        self.streams: dict[int, StreamCount] = {}
        self.counters = {"rx": 0, "tx": 0, "ignored": 0, "dropped": 0}

    # -- receiving --

    def receive(self, frame: bytes) -> list[bytes]:
        """Handle one frame from the NIC; the frames to send in answer."""
        self.counters["rx"] += 1
        eth = parse_eth(frame)
        if eth is None or (eth.dst != self.mac and eth.dst != b"\xff" * 6):
            self.counters["ignored"] += 1
            return []
        if eth.ethertype == EtherType.ARP:
            return self._arp(frame)
        if eth.ethertype != EtherType.IPV4:
            self.counters["ignored"] += 1
            return []
        echo = parse_icmp_echo(frame)
        if echo is not None and echo.dst_ip == self.ip:
            if echo.type == IcmpType.ECHO_REQUEST:
                self.neighbours.setdefault(echo.src_ip, echo.src_mac)
                reply = icmp_echo_frame(
                    self.mac, echo.src_mac, self.ip, echo.src_ip, echo.ident, echo.seq,
                    echo.payload, reply=True,
                )  # fmt: skip
                return self._out([reply])
            key = (echo.ident, echo.seq)
            if key in self.ping_sent and key not in self.ping_rtt:
                self.ping_rtt[key] = self.clock() - self.ping_sent[key]
            return []
        udp = _parse_udp(eth.payload)
        if udp is not None and udp[0] == self.ip and udp[1] == STREAM_PORT:
            numbered = parse_stream_payload(udp[2])
            if numbered is not None:
                self.streams.setdefault(numbered[0], StreamCount()).add(numbered[1])
                return []
        self.counters["ignored"] += 1
        return []

    def _arp(self, frame: bytes) -> list[bytes]:
        arp = parse_arp(frame)
        if arp is None:
            self.counters["ignored"] += 1
            return []
        out: list[bytes] = []
        if arp.sender_ip != bytes(4):
            self.neighbours[arp.sender_ip] = arp.sender_mac
            waiting = self.pending.pop(arp.sender_ip, deque())
            out.extend(build(arp.sender_mac) for build in waiting)
        if arp.op == ArpOp.REQUEST and arp.target_ip == self.ip:
            out.append(arp_frame(ArpOp.REPLY, self.mac, self.ip, arp.sender_mac, arp.sender_ip))
        return self._out(out)

    # -- sending --

    def send_to(self, dst: ipaddress.IPv4Address, build: Callable[[bytes], bytes]) -> list[bytes]:
        """The frames that get ``build(dst_mac)`` to ``dst``: it, or an ARP request first."""
        key = dst.packed
        if key in self.neighbours:
            return self._out([build(self.neighbours[key])])
        queue = self.pending.setdefault(key, deque())
        first = not queue
        if len(queue) >= PENDING_MAX:
            self.counters["dropped"] += 1
        else:
            queue.append(build)
        if not first:
            return []
        return self._out([arp_frame(ArpOp.REQUEST, self.mac, self.ip, bytes(6), key)])

    def resolve(self, dst: ipaddress.IPv4Address) -> list[bytes]:
        """An ARP request for ``dst`` (again, even when it is known)."""
        return self._out([arp_frame(ArpOp.REQUEST, self.mac, self.ip, bytes(6), dst.packed)])

    def ping(self, dst: ipaddress.IPv4Address, ident: int, seq: int, size: int = 56) -> list[bytes]:
        """Send echo request ``seq``; its reply is recorded in :attr:`ping_rtt`."""
        payload = bytes((seq + i) & 0xFF for i in range(size))

        def build(mac: bytes) -> bytes:
            self.ping_sent[(ident, seq)] = self.clock()
            return icmp_echo_frame(self.mac, mac, self.ip, dst.packed, ident, seq, payload)

        return self.send_to(dst, build)

    def stream(self, dst: ipaddress.IPv4Address, stream: int, seq: int, size: int) -> list[bytes]:
        """Datagram ``seq`` of numbered ``stream`` to ``dst`` (``size`` bytes of payload)."""
        payload = stream_payload(stream, seq, size)
        return self.send_to(dst, lambda mac: self._udp(mac, dst.packed, payload, seq))

    def _udp(self, mac: bytes, dst: bytes, payload: bytes, ident: int) -> bytes:
        udp = _UDP.pack(STREAM_PORT, STREAM_PORT, _UDP.size + len(payload), 0) + payload
        total = _IPV4.size + len(udp)
        ip = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, 64, _PROTO_UDP, 0, self.ip, dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        eth = mac + self.mac + struct.pack("!H", EtherType.IPV4)
        return (eth + ip + udp).ljust(60, b"\x00")

    def _out(self, frames: list[bytes]) -> list[bytes]:
        self.counters["tx"] += len(frames)
        return frames


def _parse_udp(packet: bytes) -> tuple[bytes, int, bytes] | None:
    """``(dst ip, dst port, payload)`` of an unfragmented IPv4/UDP packet, else ``None``."""
    if len(packet) < _IPV4.size:
        return None
    ver_ihl, _tos, total, _id, frag, _ttl, proto, _csum, _src, dst = _IPV4.unpack_from(packet)
    ihl = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or proto != _PROTO_UDP or frag & 0x3FFF or total > len(packet):
        return None
    if len(packet) < ihl + _UDP.size:
        return None
    _sport, dport, length, _c = _UDP.unpack_from(packet, ihl)
    return dst, dport, bytes(packet[ihl + _UDP.size : ihl + min(length, total - ihl)])
