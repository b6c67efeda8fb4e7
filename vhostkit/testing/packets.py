"""Small Ethernet / ARP / IPv4 / ICMP builders and parsers for tests and labs.

Just enough to hold a real conversation with a kernel IP stack from vhostkit's userspace guest
driver: answer ARP requests, resolve a neighbour, send ICMP echo requests and recognise the
replies. Frames are ``bytes``; parsed values are frozen dataclasses; a frame that is not what
a parser looks for gives ``None`` (never an exception), so a test can filter the kernel's own
chatter (IPv6 MLD, router solicitations) out of what it receives.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "BROADCAST",
    "ArpOp",
    "ArpPacket",
    "EthFrame",
    "EtherType",
    "IcmpEcho",
    "IcmpType",
    "arp_frame",
    "checksum",
    "icmp_echo_frame",
    "ip_bytes",
    "mac_bytes",
    "parse_arp",
    "parse_eth",
    "parse_icmp_echo",
]

BROADCAST = b"\xff" * 6
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ECHO = struct.Struct("!BBHHH")
_PROTO_ICMP = 1


class EtherType(enum.IntEnum):
    """Ethernet II ethertypes the test traffic uses."""

    IPV4 = 0x0800
    ARP = 0x0806
    IPV6 = 0x86DD
    LOCAL_EXPERIMENTAL = 0x88B5


class ArpOp(enum.IntEnum):
    """ARP operation codes."""

    REQUEST = 1
    REPLY = 2


class IcmpType(enum.IntEnum):
    """The ICMP types of echo."""

    ECHO_REPLY = 0
    ECHO_REQUEST = 8


def mac_bytes(mac: str | bytes) -> bytes:
    """``"02:00:00:00:00:01"`` (or 6 bytes) as 6 bytes."""
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return mac
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


def ip_bytes(address: str | bytes) -> bytes:
    """A dotted IPv4 address (or 4 bytes) as 4 bytes."""
    if isinstance(address, bytes):
        if len(address) != 4:
            raise ValueError("an IPv4 address has 4 bytes")
        return address
    return ipaddress.IPv4Address(address).packed


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True, slots=True)
class EthFrame:
    """An Ethernet II frame split into its header fields and payload."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes


def parse_eth(frame: bytes) -> EthFrame | None:
    """Split an Ethernet II frame (no VLAN tags); ``None`` when it is too short."""
    if len(frame) < _ETH.size:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    return EthFrame(dst, src, ethertype, bytes(frame[_ETH.size :]))


def _eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return (_ETH.pack(dst, src, ethertype) + payload).ljust(60, b"\x00")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """An Ethernet/IPv4 ARP packet."""

    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def arp_frame(
    op: ArpOp,
    sender_mac: str | bytes,
    sender_ip: str | bytes,
    target_mac: str | bytes,
    target_ip: str | bytes,
    *,
    dst: str | bytes | None = None,
) -> bytes:
    """An ARP frame; a request goes to broadcast, a reply to ``target_mac`` (or ``dst``)."""
    smac, tmac = mac_bytes(sender_mac), mac_bytes(target_mac)
    if dst is None:
        dst = BROADCAST if op == ArpOp.REQUEST else tmac
    body = _ARP.pack(
        1, EtherType.IPV4, 6, 4, op, smac, ip_bytes(sender_ip), tmac, ip_bytes(target_ip)
    )
    return _eth(mac_bytes(dst), smac, EtherType.ARP, body)


def parse_arp(frame: bytes) -> ArpPacket | None:
    """The ARP packet in ``frame``, or ``None``."""
    eth = parse_eth(frame)
    if eth is None or eth.ethertype != EtherType.ARP or len(eth.payload) < _ARP.size:
        return None
    htype, ptype, hlen, plen, op, smac, sip, tmac, tip = _ARP.unpack_from(eth.payload)
    if (htype, ptype, hlen, plen) != (1, EtherType.IPV4, 6, 4):
        return None
    return ArpPacket(op, smac, sip, tmac, tip)


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    """An ICMP echo request or reply inside IPv4, with the addresses it travelled between."""

    type: int
    ident: int
    seq: int
    payload: bytes
    src_ip: bytes
    dst_ip: bytes
    src_mac: bytes
    dst_mac: bytes
    ttl: int


def icmp_echo_frame(
    src_mac: str | bytes,
    dst_mac: str | bytes,
    src_ip: str | bytes,
    dst_ip: str | bytes,
    ident: int,
    seq: int,
    payload: bytes,
    *,
    reply: bool = False,
    ttl: int = 64,
) -> bytes:
    """An Ethernet/IPv4/ICMP echo request (or reply) with correct checksums."""
    kind = IcmpType.ECHO_REPLY if reply else IcmpType.ECHO_REQUEST
    icmp = _ICMP_ECHO.pack(kind, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    total = _IPV4.size + len(icmp)
    ip = _IPV4.pack(
        0x45,
        0,
        total,
        seq & 0xFFFF,
        0x4000,
        ttl,
        _PROTO_ICMP,
        0,
        ip_bytes(src_ip),
        ip_bytes(dst_ip),
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return _eth(mac_bytes(dst_mac), mac_bytes(src_mac), EtherType.IPV4, ip + icmp)


def parse_icmp_echo(frame: bytes) -> IcmpEcho | None:
    """The ICMP echo request/reply in ``frame`` (checksums verified), or ``None``."""
    eth = parse_eth(frame)
    if eth is None or eth.ethertype != EtherType.IPV4 or len(eth.payload) < _IPV4.size:
        return None
    ver_ihl, _tos, total, _id, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(eth.payload)
    ihl = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or proto != _PROTO_ICMP or frag & 0x3FFF or total > len(eth.payload):
        return None
    if checksum(eth.payload[:ihl]) != 0:
        return None
    icmp = eth.payload[ihl:total]
    if len(icmp) < _ICMP_ECHO.size or checksum(icmp) != 0:
        return None
    kind, code, _c, ident, seq = _ICMP_ECHO.unpack_from(icmp)
    if kind not in (IcmpType.ECHO_REPLY, IcmpType.ECHO_REQUEST) or code != 0:
        return None
    return IcmpEcho(kind, ident, seq, icmp[_ICMP_ECHO.size :], src, dst, eth.src, eth.dst, ttl)
