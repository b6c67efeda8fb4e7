"""The virtual guest's IP host, sans I/O: two of them wired back to back, frame by frame."""

from __future__ import annotations

import ipaddress

from vhostkit.lab.iphost import IpHost, StreamCount, parse_stream_payload, stream_payload
from vhostkit.testing.packets import ArpOp, arp_frame, icmp_echo_frame, parse_arp

A_MAC, B_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
A_IP, B_IP = ipaddress.IPv4Interface("10.77.0.2/24"), ipaddress.IPv4Interface("10.77.0.3/24")


def wire(a: IpHost, b: IpHost, frames: list[bytes], start: IpHost) -> int:
    """Deliver ``frames`` sent by ``start`` to the other host, and their answers back; count."""
    moved = 0
    queue = [(a if start is b else b, f) for f in frames]
    while queue:
        to, frame = queue.pop(0)
        moved += 1
        other = b if to is a else a
        queue.extend((other, answer) for answer in to.receive(frame))
    return moved


def test_ping_resolves_then_gets_replies_with_round_trip_times() -> None:
    now = [0.0]
    a, b = IpHost(A_MAC, A_IP, clock=lambda: now[0]), IpHost(B_MAC, B_IP)
    first = a.ping(B_IP.ip, ident=7, seq=1)
    assert len(first) == 1 and parse_arp(first[0]).op == ArpOp.REQUEST  # type: ignore[union-attr]
    now[0] = 1.0
    wire(a, b, first, a)
    assert a.neighbours[B_IP.ip.packed] == B_MAC and b.neighbours[A_IP.ip.packed] == A_MAC
    assert a.ping_rtt == {(7, 1): 0.0}  # the echo was built once the ARP reply came
    now[0] = 2.0
    frames = a.ping(B_IP.ip, ident=7, seq=2)
    now[0] = 2.5
    wire(a, b, frames, a)
    assert a.ping_rtt[(7, 2)] == 0.5


def test_frames_for_other_hosts_and_other_protocols_are_ignored() -> None:
    a = IpHost(A_MAC, A_IP)
    other = bytes.fromhex("020000000009")
    echo = icmp_echo_frame(B_MAC, other, B_IP.ip.packed, b"\x0a\x4d\x00\x09", 1, 1, b"x")
    assert a.receive(echo) == []
    ipv6 = A_MAC + B_MAC + b"\x86\xdd" + bytes(60)
    assert a.receive(ipv6) == [] and a.receive(b"short") == []
    assert a.counters["ignored"] == 3
    # an ARP request for another address teaches the sender but is not answered
    req = arp_frame(ArpOp.REQUEST, B_MAC, B_IP.ip.packed, bytes(6), b"\x0a\x4d\x00\x09")
    assert a.receive(req) == [] and a.neighbours[B_IP.ip.packed] == B_MAC


def test_streams_are_counted_with_duplicates_and_reordering() -> None:
    a, b = IpHost(A_MAC, A_IP), IpHost(B_MAC, B_IP)
    wire(a, b, a.resolve(B_IP.ip), a)
    frames = [f for seq in range(10) for f in a.stream(B_IP.ip, stream=3, seq=seq, size=64)]
    delivered = [*frames[:4], frames[5], frames[4], frames[5], *frames[7:]]  # 6 lost, 5 twice
    for frame in delivered:
        assert b.receive(frame) == []
    count = b.streams[3]
    assert (count.received, count.duplicates, count.reordered) == (9, 1, 1)
    assert count.lost(10) == 1
    assert count.longest_gap(10) == 1
    count.seen -= {1, 2, 3}  # a run of three gone, and frame 6
    assert count.longest_gap(10) == 3 and count.longest_gap(12) == 3
    assert count.longest_gap(20) == 20 - 10  # the ten after 9 never arrived


def test_pending_frames_wait_for_arp_and_are_bounded() -> None:
    a = IpHost(A_MAC, A_IP)
    out = [f for seq in range(100) for f in a.stream(B_IP.ip, 1, seq, 64)]
    assert len(out) == 1  # one ARP request, the rest wait
    assert a.counters["dropped"] == 100 - 64
    reply = arp_frame(ArpOp.REPLY, B_MAC, B_IP.ip.packed, A_MAC, A_IP.ip.packed)
    assert len(a.receive(reply)) == 64


def test_stream_payloads_round_trip() -> None:
    assert parse_stream_payload(stream_payload(5, 1 << 40, 100)) == (5, 1 << 40)
    assert parse_stream_payload(b"XXXX" + bytes(12)) is None
    assert parse_stream_payload(b"VHKS") is None
    assert StreamCount().lost(3) == 3
