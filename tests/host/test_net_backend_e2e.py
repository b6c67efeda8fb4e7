"""vhostkit on both sides of vhost-user: the guest driver, the Frontend, the NetDevice, a tap.

The "guest" is :class:`VirtioNetDriver` over :class:`Frontend`; the back-end is vhostkit's
tap-backed :class:`NetDevice` served by a :class:`BackendListener` in this process. The tap's
link lives in a network namespace made for the test (``ip netns add``) with IP
``10.201.0.1/24``; the device keeps the tap's fds, opened in the root namespace (moving a link
keeps its fds working). The namespace's kernel IP stack is the far end:

* ping: the driver answers ARP for ``10.201.0.2`` and sends ICMP echo requests; the kernel
  replies to each (:func:`ping_through`, written to work over any data plane the driver sits
  on: kernel vhost-net as well as a vhost-user back-end);
* multiqueue: two queue pairs on a two-queue tap; frames sent on both TX rings come out of the
  tap, frames of many UDP flows from the namespace land on both RX rings;
* offloads: a UDP datagram sent with NEEDS_CSUM and a partial checksum is accepted by a UDP
  socket in the namespace (the same bytes without NEEDS_CSUM are dropped for their bad
  checksum); a datagram from the namespace arrives with NEEDS_CSUM when GUEST_CSUM is
  negotiated; a TCP stream from the namespace arrives as GSO TCPv4 frames when GUEST_TSO4 is.

Nothing leaves the machine: the tap has no bridge, and its namespace has no other link.
The namespace helpers are :mod:`helpers.netns`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from helpers.netns import SO_RCVBUFFORCE, NetNs, add_neighbour, leftovers, quiet_namespace

from vhostkit.guest.net import VirtioNetDriver
from vhostkit.kernel.tap import Tap
from vhostkit.testing.packets import (
    ArpOp,
    IcmpEcho,
    IcmpType,
    arp_frame,
    checksum,
    icmp_echo_frame,
    ip_bytes,
    mac_bytes,
    parse_arp,
    parse_icmp_echo,
)
from vhostkit.user import BackendListener, Frontend
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.net import GsoType, NetHdrFlag, VirtioNetHdr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps and namespaces need root")

log = logging.getLogger(__name__)

GUEST_MAC = "02:00:00:c0:ff:ee"
GUEST_IP = "10.201.0.2"
HOST_IP = "10.201.0.1"
ETH_P_ALL = 0x0003
ETH_EXPERIMENTAL = 0x88B5
_T = TypeVar("_T")


# --- frames ---------------------------------------------------------------------------------
# vhostkit.testing.packets has Ethernet/ARP/ICMP; the UDP/TCP builders these tests need are here.

_IPV4 = struct.Struct("!BBHHHBBH4s4s")


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded (not complemented) IPv4 pseudo-header sum: what a partial checksum holds."""
    return ~checksum(src + dst + struct.pack("!BBH", 0, proto, length)) & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = _IPV4.pack(
        0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, ip_bytes(src), ip_bytes(dst)
    )
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def udp_frame(
    src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, data: bytes,
    *, csum: int,
) -> bytes:  # fmt: skip
    """Ethernet/IPv4/UDP with the UDP checksum field set to ``csum`` (as given)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), csum) + data
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ipv4(src, dst, 17, udp)


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether the UDP/TCP checksum of an Ethernet/IPv4 frame is right."""
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    seg = frame[14 + ihl : 14 + total]
    return checksum(frame[26:34] + struct.pack("!BBH", 0, frame[23], len(seg)) + seg) == 0


# --- the VMM-side end-to-end function: ARP + ICMP echo through any data plane ----------------


def ping_through(
    nic: VirtioNetDriver,
    *,
    mac: str,
    ip: str,
    peer_ip: str,
    count: int = 8,
    queue: int = 0,
    payload_size: int = 56,
    timeout: float = 10.0,
) -> list[IcmpEcho]:
    """Play a host at ``mac``/``ip`` on ``nic`` and ping ``peer_ip`` ``count`` times.

    Resolves the peer's MAC (ARP request, reply), answers the peer's ARP requests for ``ip``
    meanwhile, sends one echo request at a time (id 0x5648, seq 1..count, a payload that
    differs per seq) and waits for its reply. Returns the replies; raises ``AssertionError``
    when a reply is missing or does not match its request. Works over whatever data plane
    ``nic`` was started on (kernel vhost-net with a tap, a vhost-user back-end, ...).
    """
    own_mac, own_ip, peer = mac_bytes(mac), ip_bytes(ip), ip_bytes(peer_ip)
    deadline = time.monotonic() + timeout
    peer_mac: bytes | None = None

    def receive(want: Callable[[bytes], bool]) -> bytes:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no answer from the peer in time"
            for frame in nic.recv(timeout=left, queue=queue):
                arp = parse_arp(frame)
                if arp is not None and arp.op == ArpOp.REQUEST and arp.target_ip == own_ip:
                    reply = arp_frame(ArpOp.REPLY, own_mac, own_ip, arp.sender_mac, arp.sender_ip)
                    assert nic.send([reply], queue=queue) == 1
                if want(frame):
                    return frame

    def is_arp_reply(frame: bytes) -> bool:
        arp = parse_arp(frame)
        return arp is not None and arp.op == ArpOp.REPLY and arp.sender_ip == peer

    assert nic.send([arp_frame(ArpOp.REQUEST, own_mac, own_ip, bytes(6), peer)], queue=queue)
    answer = parse_arp(receive(is_arp_reply))
    assert answer is not None
    peer_mac = answer.sender_mac
    replies: list[IcmpEcho] = []
    ident = 0x5648
    for seq in range(1, count + 1):
        data = bytes((seq + i) & 0xFF for i in range(payload_size))
        request = icmp_echo_frame(own_mac, peer_mac, own_ip, peer, ident, seq, data)
        assert nic.send([request], queue=queue) == 1

        def is_reply(frame: bytes, seq: int = seq) -> bool:
            echo = parse_icmp_echo(frame)
            return (
                echo is not None
                and echo.type == IcmpType.ECHO_REPLY
                and echo.ident == ident
                and echo.seq == seq
            )

        echo = parse_icmp_echo(receive(is_reply))
        assert echo is not None
        assert echo.payload == data, f"seq {seq}: payload changed"
        assert (echo.src_ip, echo.dst_ip) == (peer, own_ip)
        assert (echo.src_mac, echo.dst_mac) == (peer_mac, own_mac)
        replies.append(echo)
    return replies


# --- the rig: driver -> Frontend -> NetDevice -> tap (in a namespace) ------------------------


@dataclass
class Rig:
    ns: NetNs
    tap: Tap
    device: object  # vhostkit.devices.net.NetDevice
    fe: Frontend
    nic: VirtioNetDriver


@contextlib.contextmanager
def backend_rig(
    sock_dir: Path,
    *,
    queue_pairs: int = 1,
    tap_queues: int | None = None,
    features: int | None = None,
    address: bool = True,
    device_type: type | None = None,
    **driver_args: object,
) -> Iterator[Rig]:
    """A running driver on a NetDevice (or ``device_type``, a subclass) whose tap (with
    ``tap_queues`` queues, by default one per pair) is up in a fresh namespace (cleaned up
    after, and checked: no namespace or tap left)."""
    from vhostkit.devices.net import NetDevice

    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNs())
        quiet_namespace(ns)
        tap = stack.enter_context(Tap("vhkb%d", queues=tap_queues or queue_pairs, nonblocking=True))
        tap_name = ns_name = ""
        tap_name, ns_name = tap.name, ns.name
        device = (device_type or NetDevice)(
            tap, mac=mac_bytes("52:54:00:00:b0:01"), queue_pairs=queue_pairs
        )
        stack.callback(device.close)
        tap.move_to_netns(ns.name)
        if address:
            tap.set_address(HOST_IP, 24)
        tap.up()
        listener = BackendListener(sock_dir / "net.sock", lambda: device, max_connections=1)
        listener.start()

        def stop_listener() -> None:
            listener.stop()
            assert not listener.errors, listener.errors
            assert not listener.rejected, listener.rejected

        stack.callback(stop_listener)
        fe = Frontend.connect(sock_dir / "net.sock", timeout=5)
        stack.callback(fe.close)
        nic = VirtioNetDriver(fe, queue_pairs=queue_pairs, features=features, **driver_args)  # type: ignore[arg-type]
        # closed after the Frontend (the back-end then stopped its rings) and before the
        # device: the driver's memory goes last from the data plane's point of view
        stack.callback(nic.close)
        nic.start()
        stack.callback(nic.stop)
        yield Rig(ns, tap, device, fe, nic)
    assert not leftovers(ns_name, tap_name)


# --- 3. ping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_ping_through_vhostkit_backend(fd_check, sock_dir, packed):
    with backend_rig(sock_dir, packed=packed) as rig:
        assert rig.nic.header_size == 12
        replies = ping_through(rig.nic, mac=GUEST_MAC, ip=GUEST_IP, peer_ip=HOST_IP, count=10)
        assert [r.seq for r in replies] == list(range(1, 11))
        assert rig.nic.wait_tx_done(5)  # the device counts a batch before completing it
        assert rig.device.tx_frames >= 11 and rig.device.rx_frames >= 11  # type: ignore[attr-defined]
        assert rig.ns.snmp("Icmp")["OutEchoReps"] == 10


# --- 4. multiqueue ---------------------------------------------------------------------------


def test_multiqueue_two_pairs(fd_check, sock_dir):
    pairs = 2
    with backend_rig(sock_dir, queue_pairs=pairs) as rig:
        nic, fe = rig.nic, rig.fe
        assert nic.acked_features & NF.MQ
        assert fe.get_queue_num() == pairs  # queue pairs, as QEMU's vhost-user net reads it
        assert struct.unpack_from("<H", rig.device.config, 8)[0] == pairs  # type: ignore[attr-defined]

        # TX: frames on both TX rings come out of the tap (seen in the namespace)
        with rig.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_EXPERIMENTAL)) as s:
            s.bind((rig.tap.name, 0))
            s.settimeout(10)
            per_queue = 40
            sent = set()
            for q in range(pairs):
                frames = [
                    b"\x02" * 6 + mac_bytes(GUEST_MAC) + struct.pack("!HHH", ETH_EXPERIMENTAL, q, i)
                    + bytes(46)
                    for i in range(per_queue)
                ]  # fmt: skip
                sent |= set(frames)
                assert nic.send_all(frames, queue=q, timeout=10) == per_queue
            got = {s.recv(2048) for _ in range(pairs * per_queue)}
        assert got == sent
        for q in range(pairs):
            assert nic.wait_tx_done(10, queue=q)
            assert nic.stats(q).tx_completed == per_queue

        # RX: many UDP flows from the namespace spread over the tap's queues, so both RX rings
        # get frames (the tap picks the queue by flow hash)
        add_neighbour(rig.ns, rig.tap.name, GUEST_IP, GUEST_MAC)
        flows = 64
        with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for port in range(flows):
                u.sendto(b"flow %d" % port, (GUEST_IP, 20000 + port))
        seen: dict[int, set[int]] = {q: set() for q in range(pairs)}
        deadline = time.monotonic() + 10
        while sum(map(len, seen.values())) < flows:
            left = deadline - time.monotonic()
            assert left > 0, f"UDP flows missing: {seen}"
            for ring in nic.wait_any([2 * q for q in range(pairs)], left):
                q = ring // 2
                for frame in nic.recv(timeout=0, queue=q):
                    if frame[12:14] == b"\x08\x00" and frame[23] == 17:
                        seen[q].add(struct.unpack_from("!H", frame, 36)[0] - 20000)
        assert set().union(*seen.values()) == set(range(flows))
        assert all(seen.values()), f"one RX queue got nothing: {seen}"


def _counting_net_device() -> type:
    from vhostkit.devices.net import NetDevice

    class CountingNetDevice(NetDevice):
        """Counts the rounds each ring's worker spent on the ring while it was disabled."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.disabled_rounds: collections.Counter[int] = collections.Counter()

        def process_disabled(self, ring) -> None:  # type: ignore[no-untyped-def]
            self.disabled_rounds[ring.index] += 1
            super().process_disabled(ring)

    return CountingNetDevice


def receive_udp_flows(rig: Rig, flows: int, queues: list[int]) -> dict[int, set[int]]:
    """Send one UDP datagram per flow from the namespace to the guest; the flows each RX
    queue of ``queues`` received (fails after 10 s if any is missing)."""
    add_neighbour(rig.ns, rig.tap.name, GUEST_IP, GUEST_MAC)
    nic = rig.nic
    with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        for port in range(flows):
            u.sendto(b"flow %d" % port, (GUEST_IP, 20000 + port))
    seen: dict[int, set[int]] = {q: set() for q in queues}
    deadline = time.monotonic() + 10
    while sum(map(len, seen.values())) < flows:
        left = deadline - time.monotonic()
        assert left > 0, f"UDP flows missing: {seen}"
        for ring in nic.wait_any([2 * q for q in queues], left):
            q = ring // 2
            for frame in nic.recv(timeout=0, queue=q):
                if frame[12:14] == b"\x08\x00" and frame[23] == 17:
                    seen[q].add(struct.unpack_from("!H", frame, 36)[0] - 20000)
    return seen


def test_multiqueue_pair_turned_off_gets_no_flows(fd_check, sock_dir):
    """A driver that uses fewer pairs than offered (Linux with one CPU on a two-pair device)
    disables the rest. The pair's tap queue is detached, as QEMU's tap back-end does:
    otherwise the tap keeps steering flows to a queue nobody reads, and they are lost. Its
    disabled RX ring does not spin on the tap either. Turned back on, the queue is attached
    again."""
    with backend_rig(sock_dir, queue_pairs=2, device_type=_counting_net_device()) as rig:
        fe, device = rig.fe, rig.device
        fe.set_vring_enable(2, False)
        fe.set_vring_enable(3, False)
        assert device._tap_attached == [True, False]  # type: ignore[attr-defined]
        rounds = device.disabled_rounds[2]  # type: ignore[attr-defined]
        seen = receive_udp_flows(rig, 64, [0])
        assert seen[0] == set(range(64))  # all on pair 0: none went to the detached queue
        # nothing woke ring 2's worker: no frame reached its tap queue
        assert device.disabled_rounds[2] == rounds, device.disabled_rounds  # type: ignore[attr-defined]
        fe.set_vring_enable(2, True)
        fe.set_vring_enable(3, True)
        assert device._tap_attached == [True, True]  # type: ignore[attr-defined]


def test_tap_queues_beyond_the_pairs_are_detached_while_the_device_lives(fd_check, sock_dir):
    """A one-pair device on a two-queue tap: the tap would steer about half the flows to its
    second queue, which no ring reads. The device detaches it, so every flow reaches pair 0;
    closing the device attaches it again (the tap is handed back as it was made)."""
    with backend_rig(sock_dir, queue_pairs=1, tap_queues=2) as rig:
        device = rig.device
        assert receive_udp_flows(rig, 64, [0])[0] == set(range(64))
        assert device._tap_attached == [True, False]  # type: ignore[attr-defined]
        device.close()
        assert device._tap_attached == [True, True]  # type: ignore[attr-defined]


def test_disabled_rx_ring_does_not_spin_on_a_readable_tap(fd_check, sock_dir):
    """Frames wait in the tap while the RX ring is disabled (TX still enabled keeps the tap
    queue attached): the worker stops watching the tap until the ring is enabled, and then
    delivers them all."""
    with backend_rig(sock_dir, device_type=_counting_net_device()) as rig:
        fe, device, nic = rig.fe, rig.device, rig.nic
        fe.set_vring_enable(0, False)
        add_neighbour(rig.ns, rig.tap.name, GUEST_IP, GUEST_MAC)
        rounds = device.disabled_rounds[0]  # type: ignore[attr-defined]
        with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for port in range(8):
                u.sendto(b"waiting %d" % port, (GUEST_IP, 20000 + port))
        ready, _, _ = select.select([rig.tap.fds[0]], [], [], 10)
        assert ready, "the frames did not reach the tap"  # they wait there, readable
        for _ in range(20):  # round trips through the back-end: time a spinning worker uses
            fe.get_features()
        # a worker still watching the readable tap would have run round after round
        assert device.disabled_rounds[0] <= rounds + 1, device.disabled_rounds  # type: ignore[attr-defined]
        fe.set_vring_enable(0, True)
        got = 0
        while got < 8:
            frames = nic.recv(timeout=10)
            assert frames, f"only {got} of 8 waiting frames arrived"
            got += sum(1 for f in frames if f[12:14] == b"\x08\x00" and f[23] == 17)


# --- 5. offloads -----------------------------------------------------------------------------

OFFLOAD_FEATURES = int(VF.VERSION_1 | NF.MRG_RXBUF | NF.CSUM | NF.GUEST_CSUM | NF.GUEST_TSO4)


def test_tx_partial_checksum_is_completed(fd_check, sock_dir):
    """NEEDS_CSUM from the driver reaches the namespace's stack as CHECKSUM_PARTIAL: the UDP
    socket gets the datagram; the same bytes without the flag fail the checksum check."""
    with backend_rig(sock_dir, features=OFFLOAD_FEATURES) as rig:
        nic = rig.nic
        assert nic.acked_features & NF.CSUM
        port = 4789
        tap_mac = rig.tap.get_mac()
        with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST_IP, port))
            u.settimeout(10)
            before = rig.ns.snmp("Udp")

            def partial(data: bytes) -> bytes:
                part = pseudo_sum(ip_bytes(GUEST_IP), ip_bytes(HOST_IP), 17, 8 + len(data))
                return udp_frame(GUEST_MAC, tap_mac, GUEST_IP, HOST_IP, 5555, port, data, csum=part)

            needs_csum = VirtioNetHdr(NetHdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=6)
            bad = partial(b"no offload flag: dropped")
            good = partial(b"finished by the kernel")
            assert not l4_checksum_ok(good)
            assert nic.send([bad]) == 1  # a plain header: the partial sum is a bad checksum
            assert nic.send([good], hdr=needs_csum) == 1
            data, addr = u.recvfrom(2048)
            assert data == b"finished by the kernel"
            assert addr == (GUEST_IP, 5555)
            after = rig.ns.snmp("Udp")
        assert after["InCsumErrors"] == before["InCsumErrors"] + 1
        assert after["InDatagrams"] == before["InDatagrams"] + 1


@pytest.mark.parametrize("guest_csum", [True, False], ids=["guest_csum", "no_offload"])
def test_rx_checksum_offload(fd_check, sock_dir, guest_csum):
    """A datagram from the namespace: with GUEST_CSUM the tap hands it over unfinished
    (NEEDS_CSUM, csum_start/csum_offset); without, with a full checksum and no flags."""
    features = OFFLOAD_FEATURES if guest_csum else int(VF.VERSION_1 | NF.MRG_RXBUF)
    with backend_rig(sock_dir, features=features) as rig:
        add_neighbour(rig.ns, rig.tap.name, GUEST_IP, GUEST_MAC)
        with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"x" * 1000, (GUEST_IP, 7777))
        hdr, frame = receive_matching(rig.nic, lambda f: f[23:24] == b"\x11")
        assert len(frame) == 14 + 20 + 8 + 1000
        if guest_csum:
            assert hdr.flags & NetHdrFlag.NEEDS_CSUM
            assert (hdr.csum_start, hdr.csum_offset) == (34, 6)
            # the field holds the pseudo-header sum; finishing the sum gives a right checksum
            field = struct.unpack_from("!H", frame, 40)[0]
            assert field == pseudo_sum(ip_bytes(HOST_IP), ip_bytes(GUEST_IP), 17, 1008)
            done = bytearray(frame)
            struct.pack_into("!H", done, 40, checksum(bytes(frame[34:])))
            assert l4_checksum_ok(bytes(done))
        else:
            assert hdr.flags == 0 and hdr.gso_type == GsoType.NONE
            assert l4_checksum_ok(frame)


def receive_matching(
    nic: VirtioNetDriver, want: Callable[[bytes], bool], timeout: float = 10.0, queue: int = 0
) -> tuple[VirtioNetHdr, bytes]:
    """The first received IPv4 frame (with its header) for which ``want`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the frame did not arrive"
        for hdr, frame in nic.recv_headers(timeout=left, queue=queue):
            if frame[12:14] == b"\x08\x00" and want(frame):
                return hdr, frame


# --- TSO: a TCP stream from the namespace as GSO frames --------------------------------------


def tcp_segment(
    src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
    *, options: bytes = b"", window: int = 65535,
) -> bytes:  # fmt: skip
    """An IPv4/TCP segment (no payload) with a correct checksum."""
    off = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    tcp += options
    csum = checksum(ip_bytes(src) + ip_bytes(dst) + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return ipv4(src, dst, 6, tcp)


def test_rx_tso_from_namespace(fd_check, sock_dir):
    """A TCP sender in the namespace, a minimal TCP receiver in the driver (SYN-ACK, then
    ACKs): with GUEST_TSO4 the tap hands over segments larger than the MTU, with gso_type
    TCPV4 and gso_size the MSS, spread over several receive buffers (MRG_RXBUF)."""
    syn, ack_flag, syn_ack = 0x02, 0x10, 0x12
    with backend_rig(sock_dir, features=OFFLOAD_FEATURES) as rig:
        nic = rig.nic
        assert nic.acked_features & NF.GUEST_TSO4
        add_neighbour(rig.ns, rig.tap.name, GUEST_IP, GUEST_MAC)
        tap_mac = mac_bytes(rig.tap.get_mac())
        eth = tap_mac + mac_bytes(GUEST_MAC) + b"\x08\x00"
        port = 8080
        blob = bytes(i & 0xFF for i in range(200_000))
        tcp_sock = rig.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        with tcp_sock:
            tcp_sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                tcp_sock.connect((GUEST_IP, port))
            _, frame = receive_matching(nic, lambda f: f[23] == 6 and f[47] & syn)
            sport = struct.unpack_from("!H", frame, 34)[0]
            their_seq = struct.unpack_from("!I", frame, 38)[0]
            ours = 1000

            def segment(seq: int, ack: int, flags: int, options: bytes = b"") -> bytes:
                tcp = tcp_segment(GUEST_IP, HOST_IP, port, sport, seq, ack, flags, options=options)
                return eth + tcp

            mss = struct.pack("!BBH", 2, 4, 1460)
            assert nic.send([segment(ours, their_seq + 1, syn_ack, mss)]) == 1
            expected = their_seq + 1
            received = 0
            gso_frames: list[tuple[VirtioNetHdr, int]] = []
            sender = threading.Thread(target=_send_all, args=(tcp_sock, blob), daemon=True)
            sender.start()
            try:
                deadline = time.monotonic() + 15
                while received < len(blob):
                    assert time.monotonic() < deadline, f"got {received} of {len(blob)} bytes"
                    for hdr, f in nic.recv_headers(timeout=1.0):
                        if f[12:14] != b"\x08\x00" or f[23] != 6:
                            continue
                        ihl = (f[14] & 0xF) * 4
                        total = struct.unpack_from("!H", f, 16)[0]
                        tcp = f[14 + ihl : 14 + total]
                        doff = (tcp[12] >> 4) * 4
                        seq = struct.unpack_from("!I", tcp, 4)[0]
                        data = tcp[doff:]
                        if data and seq == expected:
                            assert data == blob[received : received + len(data)]
                            received += len(data)
                            expected = (expected + len(data)) & 0xFFFFFFFF
                            if hdr.gso_type != GsoType.NONE:
                                gso_frames.append((hdr, len(f)))
                        assert nic.send([segment(ours + 1, expected, ack_flag)]) == 1
            finally:
                # wakes the sender's poll if the test failed half-way (POLLHUP)
                with contextlib.suppress(OSError):
                    tcp_sock.shutdown(socket.SHUT_RDWR)
                sender.join(10)
        assert gso_frames, "no frame larger than the MSS arrived: the tap segmented everything"
        for hdr, length in gso_frames:
            assert hdr.gso_type == GsoType.TCPV4
            assert hdr.gso_size == 1460
            assert hdr.flags & NetHdrFlag.NEEDS_CSUM
            # a GSO frame only carries more than gso_size bytes: one of up to ~1.35 MSS (the
            # sender's window or the stream's timing decides) still fits in one 2 KiB buffer
            spans = -(-(nic.header_size + length) // nic.rx_buffer_size)
            assert hdr.num_buffers == spans, (length, hdr)
        # and the big ones were spread over several receive buffers (MRG_RXBUF)
        assert any(hdr.num_buffers > 1 for hdr, _ in gso_frames)


def _send_all(sock: socket.socket, blob: bytes) -> None:
    """Write ``blob`` to a non-blocking connecting TCP socket (waits with ``poll``)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    view = memoryview(blob)
    try:
        while view:
            if not poller.poll(10_000):
                return
            try:
                n = sock.send(view)
            except BlockingIOError:
                continue
            view = view[n:]
    except OSError as exc:  # the test ended (socket closed) or the peer reset
        log.debug("sender stopped: %s", exc)


# --- the shared data-plane check (vhostkit.testing.dataplane) on Frontend + NetDevice --------


class NetDevicePlane:
    """:class:`~vhostkit.testing.dataplane.NetPlane` adapter: vhostkit's Frontend to its own
    NetDevice; the far side is an AF_PACKET socket on the tap inside the namespace (IPv6 off
    and no address there: the kernel sends nothing back). GET_VRING_BASE stops the rings."""

    name = "vhost-user (vhostkit NetDevice + tap)"

    def __init__(self, fe: Frontend, ns: NetNs, tap: Tap) -> None:
        from vhostkit.testing.dataplane import ETHERTYPE

        self.fe = fe
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            # the check reads only after every frame was sent: room for all of them
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            self.sock.bind((tap.name, ETHERTYPE))
        except BaseException:
            self.sock.close()
            raise

    @property
    def backend(self) -> Frontend:
        return self.fe

    def attach(self, nic: VirtioNetDriver) -> None:
        return None  # the device serves the tap as soon as the rings are enabled

    def delivered(self, nic: VirtioNetDriver, count: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            out.append(self.sock.recv(65536))
        return out

    def quiesce(self, nic: VirtioNetDriver) -> None:
        return None

    def close(self) -> None:
        self.sock.close()


def test_shared_check_on_vhostkit_net_backend(fd_check, sock_dir):
    from vhostkit.devices.net import NetDevice
    from vhostkit.testing.dataplane import check_net_data_plane

    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNs())
        quiet_namespace(ns)
        tap = stack.enter_context(Tap("vhkb%d", nonblocking=True))
        device = NetDevice(tap)
        stack.callback(device.close)
        tap.move_to_netns(ns.name)
        tap.up()
        listener = BackendListener(sock_dir / "net.sock", lambda: device, max_connections=1)
        stack.enter_context(listener.start())
        fe = Frontend.connect(sock_dir / "net.sock", timeout=5)
        stack.callback(fe.close)
        plane = NetDevicePlane(fe, ns, tap)
        stack.callback(plane.close)
        report = check_net_data_plane(plane, count=200)
        assert report.positions == {0: 0, 1: 200}
        assert not listener.errors and not listener.rejected
