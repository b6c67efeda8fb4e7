"""The tap-backed vhost-user net device with a real tap and a vhostkit driver on the rings.

TX: a frame the driver queues comes out of the tap (seen on an AF_PACKET socket bound to it).
RX: a frame sent into the tap from the kernel side lands in the driver's receive buffers with
a virtio-net header, spread over several buffers with mergeable receive buffers; frames
waiting in the tap are read and delivered in bursts, never more than the ring has buffers for.
The tap has no address and no bridge: nothing leaves this machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from vhostkit.kernel.tap import Tap
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.net import VirtioNetHdr
from vhostkit.virtio.packed import PackedDriverQueue, encode_base
from vhostkit.virtio.split import SplitDriverQueue

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating a tap needs root")

ETH_TYPE = 0x88B5  # IEEE local experimental: nothing on the host reacts to it
NUM = 64
RX, TX = 0, 1
BUFS = 0x100000


def devices_module():  # imported lazily so collection works without root
    from vhostkit.devices import net

    return net


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETH_TYPE) + payload


@dataclass
class Rig:
    fe: Frontend
    device: object
    tap: Tap
    mem: GuestMemory
    sniffer: socket.socket
    queues: dict[int, SplitDriverQueue | PackedDriverQueue] = field(default_factory=dict)
    kicks: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    hdr: int = 12

    def wait_call(self, index: int, timeout: float = 10.0) -> None:
        ready, _, _ = select.select([self.calls[index]], [], [], timeout)
        assert ready, f"no interrupt on ring {index}"
        os.eventfd_read(self.calls[index])

    def kick(self, index: int) -> None:
        if self.queues[index].publish():
            os.eventfd_write(self.kicks[index], 1)


@contextlib.contextmanager
def make_rig(
    sock_dir: Path, *, mergeable: bool, packed: bool = False, log: bool = False
) -> Iterator[Rig]:
    net = devices_module()
    tap = Tap("vhkt%d", nonblocking=True)
    tap.disable_ipv6()  # no MLD or neighbour discovery: only the tests' frames reach the rings
    tap.up()
    device = net.NetDevice(tap, mac=bytes.fromhex("525400aabbcc"))
    listener = BackendListener(str(sock_dir / "net.sock"), lambda: device).start()
    fe = Frontend.connect(sock_dir / "net.sock", timeout=5)
    mem = GuestMemory.allocate([(0, 0x400000)])
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
    sniffer.bind((tap.name, 0))
    sniffer.settimeout(10)
    rig = Rig(fe, device, tap, mem, sniffer)
    try:
        fe.set_owner()
        wanted = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MAC)
        if mergeable:
            wanted |= int(VirtioNetFeature.MRG_RXBUF)
        if packed:
            wanted |= int(VirtioFeature.RING_PACKED)
        protocol = ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.RARP
        if log:
            protocol |= ProtocolFeature.LOG_SHMFD
        fe.negotiate(wanted, protocol)
        assert tap.get_vnet_hdr_size() == 12
        fe.set_mem_table(mem.regions)
        for index in (RX, TX):
            q: SplitDriverQueue | PackedDriverQueue
            if packed:
                q = PackedDriverQueue(
                    mem, NUM, index * 0x8000, features=fe.acked_features, index=index
                )
            else:
                q = SplitDriverQueue(
                    mem, NUM, index * 0x8000, features=fe.acked_features, index=index
                )
            rig.queues[index] = q
            rig.kicks[index] = eventfd()
            rig.calls[index] = eventfd()
            fe.set_vring_num(index, NUM)
            fe.set_vring_base(index, encode_base(0, 1) if packed else 0)
            fe.set_vring_addr(q.vring_addr())
            fe.set_vring_call(index, rig.calls[index])
            fe.set_vring_kick(index, rig.kicks[index])
            fe.set_vring_enable(index, True)
        yield rig
    finally:
        fe.close()
        listener.stop()
        device.close()
        sniffer.close()
        tap.close()
        mem.close()
        for fd in [*rig.kicks.values(), *rig.calls.values()]:
            os.close(fd)
        assert not listener.errors


@pytest.fixture(params=[True, False], ids=["mrg_rxbuf", "no_mrg"])
def rig(request, fd_check, sock_dir) -> Iterator[Rig]:
    with make_rig(sock_dir, mergeable=request.param) as r:
        yield r


@pytest.fixture(params=[True, False], ids=["mrg_rxbuf", "no_mrg"])
def packed_rig(request, fd_check, sock_dir) -> Iterator[Rig]:
    with make_rig(sock_dir, mergeable=request.param, packed=True) as r:
        yield r


def test_tx_frames_come_out_of_the_tap(rig: Rig) -> None:
    q = rig.queues[TX]
    sent = []
    for i in range(20):
        data = frame(b"\x02" * 6, bytes.fromhex("525400aabbcc"), f"frame {i:03d}".encode() * 4)
        addr = BUFS + i * 0x800
        rig.mem.write(addr, bytes(rig.hdr) + data)  # a zero header: no offload
        q.add([(addr, rig.hdr + len(data))], token=i)
        sent.append(data)
    rig.kick(TX)
    got = [rig.sniffer.recv(2048) for _ in sent]
    assert got == sent
    # every chain came back to the driver
    reaped: list[object] = []
    while len(reaped) < len(sent):
        reaped += [t for t, _ in q.reap()]
        if len(reaped) < len(sent):
            rig.wait_call(TX)
    assert reaped == list(range(20))
    assert rig.device.tx_frames == 20


def test_rx_frames_land_in_receive_buffers(rig: Rig) -> None:
    q = rig.queues[RX]
    mergeable = bool(rig.fe.acked_features & VirtioNetFeature.MRG_RXBUF)
    # mergeable: small buffers so a frame spans several; otherwise big ones
    size = 256 if mergeable else 2048
    for i in range(NUM):
        q.add([], [(BUFS + i * 0x800, size)], token=i)
    rig.kick(RX)
    payload = bytes(range(256)) * 4  # 1024 bytes: 5 buffers of 256 with the header
    data = frame(bytes.fromhex("525400aabbcc"), b"\x02" * 6, payload)
    rig.sniffer.send(data)
    hdr, got = receive_ours(rig)
    assert hdr.num_buffers == (5 if mergeable else 1)
    assert got == data
    assert rig.device.rx_frames >= 1


def receive_ours(rig: Rig, timeout: float = 10.0) -> tuple[VirtioNetHdr, bytes]:
    """Reassemble received frames until one of our ethertype arrives (the kernel also sends
    IPv6 neighbour discovery and MLD frames out of a tap that comes up)."""
    q = rig.queues[RX]
    used: list[tuple[int, int]] = []
    while True:
        used += q.reap()
        while used:
            first = used[0][0]
            hdr = VirtioNetHdr.unpack(rig.mem.read(BUFS + first * 0x800, 12), 12)
            if len(used) < hdr.num_buffers:
                break
            parts, used = used[: hdr.num_buffers], used[hdr.num_buffers :]
            data = b"".join(rig.mem.read(BUFS + tok * 0x800, n) for tok, n in parts)[12:]
            if data[12:14] == struct.pack("!H", ETH_TYPE):
                return hdr, data
        rig.wait_call(RX, timeout)


def test_rx_without_buffers_waits_for_the_kick(rig: Rig) -> None:
    """No receive buffers: the device must not read (and lose) frames from the tap."""
    q = rig.queues[RX]
    data = frame(bytes.fromhex("525400aabbcc"), b"\x02" * 6, b"early bird")
    rig.sniffer.send(data)
    # the frame waits in the tap; now the driver posts buffers and kicks
    for i in range(4):
        q.add([], [(BUFS + i * 0x800, 2048)], token=i)
    rig.kick(RX)
    _, got = receive_ours(rig)
    assert got == data


# -- bursts: frames waiting in the tap --

GUEST_MAC = bytes.fromhex("525400aabbcc")


def numbered(i: int, payload_len: int = 64) -> bytes:
    """Frame ``i`` of a test, for the guest, its payload telling it from the others."""
    body = struct.pack("!I", i) + bytes((i + k) & 0xFF for k in range(payload_len - 4))
    return frame(GUEST_MAC, b"\x02" * 6, body)


@dataclass
class RxCalls:
    """What the device asked of its RX ring: ``(max_chains, chains got)`` per pop, and the
    number of chains of each completion."""

    pops: list[tuple[int | None, int]] = field(default_factory=list)
    completes: list[int] = field(default_factory=list)


def record_rx(rig: Rig, starve_after_burst: bool = False) -> RxCalls:
    """Watch the device's pops and completions on the RX ring. ``starve_after_burst``: the
    first pop of several chains gets only one, and every pop after it none (a ring that had
    fewer chains than ``pending()`` said)."""
    ring = rig.device.active[RX]
    calls = RxCalls()
    pop, complete = ring.pop_batch, ring.complete
    starved = False

    def pop_batch(max_chains: int | None = None, *, force: bool = False):  # type: ignore[no-untyped-def]
        nonlocal starved
        if starve_after_burst and (starved or (max_chains or 0) > 1):
            batch = pop(0 if starved else 1, force=force)
            starved = True
        else:
            batch = pop(max_chains, force=force)
        calls.pops.append((max_chains, len(batch)))
        return batch

    def complete_batch(ids, lengths) -> None:  # type: ignore[no-untyped-def]
        calls.completes.append(len(ids))
        complete(ids, lengths)

    ring.pop_batch = pop_batch
    ring.complete = complete_batch
    return calls


Layout = dict[int, list[tuple[int, int]]]


def post(rig: Rig, layout: Layout, tokens: range, bufs) -> None:  # type: ignore[no-untyped-def]
    """Give the device receive chains ``tokens``, ``bufs(token)`` their buffers; kick."""
    q = rig.queues[RX]
    for t in tokens:
        layout[t] = bufs(t)
        q.add([], layout[t], token=t)
    rig.kick(RX)


def read_chain(rig: Rig, bufs: list[tuple[int, int]], n: int) -> bytes:
    out = b""
    for addr, size in bufs:
        take = min(size, n - len(out))
        out += rig.mem.read(addr, take)
    return out


def collect(rig: Rig, count: int, layout: Layout) -> list[tuple[int, bytes, list[int]]]:
    """The next ``count`` frames the driver receives: ``(num_buffers, frame, chain tokens)``
    each. Every chain used must belong to one of them."""
    q = rig.queues[RX]
    used: list[tuple[int, int]] = []
    got: list[tuple[int, bytes, list[int]]] = []
    while True:
        used += q.reap()
        while used:
            first, n = used[0]
            assert n >= 12, f"chain {first} came back with {n} bytes"
            num_buffers = VirtioNetHdr.unpack(read_chain(rig, layout[first], 12), 12).num_buffers
            if len(used) < num_buffers:
                break
            parts, used = used[:num_buffers], used[num_buffers:]
            data = b"".join(read_chain(rig, layout[t], n) for t, n in parts)[12:]
            got.append((num_buffers, data, [t for t, _ in parts]))
        if len(got) >= count:
            assert len(got) == count and not used, "more came back than frames were sent"
            return got
        rig.wait_call(RX)


def test_rx_burst_pops_the_chains_of_waiting_frames_at_once(rig: Rig) -> None:
    """Frames waiting in the tap are read in one burst, their chains popped with one pop and
    completed together."""
    rig.device.rx_direct = False  # the bounce path
    mergeable = bool(rig.fe.acked_features & VirtioNetFeature.MRG_RXBUF)
    sent = [numbered(i) for i in range(20)]
    for data in sent:  # no buffers yet: they wait in the tap
        rig.sniffer.send(data)
    calls = record_rx(rig)
    layout: Layout = {}
    post(rig, layout, range(NUM), lambda t: [(BUFS + t * 0x800, 2048)])
    got = collect(rig, len(sent), layout)
    assert [d for _, d, _ in got] == sent
    assert [nb for nb, _, _ in got] == [1] * len(sent)
    assert [tokens for _, _, tokens in got] == [[t] for t in range(len(sent))]
    # with mergeable buffers the first burst is one frame: the device learns how big the
    # driver's buffers are before it guesses how many frames they hold
    assert calls.pops == ([(1, 1), (19, 19)] if mergeable else [(20, 20)])
    assert calls.completes == [20]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (20, 0)


@pytest.fixture
def mrg_rig(fd_check, sock_dir) -> Iterator[Rig]:
    with make_rig(sock_dir, mergeable=True) as r:
        yield r


def test_rx_mergeable_frames_span_chains_past_the_burst(mrg_rig: Rig) -> None:
    """A frame that needs several buffers takes the burst's next chains, and pops more one at
    a time when the burst's chains run out; the frames after it still get theirs."""
    rig = mrg_rig
    rig.device.rx_direct = False  # the bounce path
    # 12 + 78 bytes: one 256-byte buffer; 12 + 1038 bytes: five
    sent = [numbered(i, 1024 if i in (2, 4) else 64) for i in range(5)]
    for data in sent:
        rig.sniffer.send(data)
    calls = record_rx(rig)
    layout: Layout = {}
    post(rig, layout, range(NUM), lambda t: [(BUFS + t * 0x800, 256)])
    got = collect(rig, len(sent), layout)
    assert [d for _, d, _ in got] == sent
    assert [nb for nb, _, _ in got] == [1, 1, 5, 1, 5]
    assert [t for _, _, tokens in got for t in tokens] == list(range(13))  # in ring order
    # one frame alone (learning the buffer size), then the other four in one burst: their
    # four chains in one pop; the first big frame takes the last two of them and pops two
    # more, the small one after it and the last big one pop theirs one at a time
    assert calls.pops == [(1, 1), (4, 4)] + [(1, 1)] * 8
    assert calls.completes == [13]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (5, 0)


def test_rx_burst_reads_no_more_frames_than_the_ring_holds(rig: Rig) -> None:
    """Fewer buffers than frames waiting: the rest stay in the tap (a frame read without a
    buffer would be lost) and come once the driver gives more buffers. With mergeable buffers
    each frame takes two."""
    rig.device.rx_direct = False  # the bounce path
    mergeable = bool(rig.fe.acked_features & VirtioNetFeature.MRG_RXBUF)
    per_frame, size = (2, 256) if mergeable else (1, 2048)
    sent = [numbered(i, 400) for i in range(6)]  # 12 + 414 bytes: two 256-byte buffers
    for data in sent:
        rig.sniffer.send(data)
    layout: Layout = {}
    half = 3 * per_frame
    post(rig, layout, range(half), lambda t: [(BUFS + t * 0x800, size)])
    got = collect(rig, 3, layout)
    assert [d for _, d, _ in got] == sent[:3]
    # dropped frames are counted before the completion that ends their burst
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (3, 0)
    post(rig, layout, range(half, 2 * half), lambda t: [(BUFS + t * 0x800, size)])
    got = collect(rig, 3, layout)
    assert [d for _, d, _ in got] == sent[3:]
    assert [nb for nb, _, _ in got] == [per_frame] * 3
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (6, 0)


def test_rx_burst_on_packed_ring_counts_chains_not_descriptors(packed_rig: Rig) -> None:
    """A packed ring's ``pending()`` counts descriptors: with two-descriptor chains, three
    chains are six descriptors, and a burst must not read six frames for them."""
    rig = packed_rig
    sent = [numbered(i) for i in range(8)]
    for data in sent:
        rig.sniffer.send(data)
    layout: Layout = {}

    def two_descriptors(t: int) -> list[tuple[int, int]]:
        return [(BUFS + t * 0x800, 12), (BUFS + t * 0x800 + 0x40, 2000)]

    post(rig, layout, range(3), two_descriptors)
    got = collect(rig, 3, layout)
    assert [d for _, d, _ in got] == sent[:3]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (3, 0)
    post(rig, layout, range(3, 8), two_descriptors)
    got = collect(rig, 5, layout)
    assert [d for _, d, _ in got] == sent[3:]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (8, 0)


def test_rx_frames_without_a_chain_are_dropped_and_counted(rig: Rig) -> None:
    """A ring that hands out fewer chains than ``pending()`` promised (a hostile or confused
    driver): the frames of the burst already read without a chain are dropped and counted;
    the ring goes on."""
    rig.device.rx_direct = False  # the bounce path
    mergeable = bool(rig.fe.acked_features & VirtioNetFeature.MRG_RXBUF)
    sent = [numbered(i) for i in range(5)]
    for data in sent:
        rig.sniffer.send(data)
    calls = record_rx(rig, starve_after_burst=True)
    layout: Layout = {}
    post(rig, layout, range(8), lambda t: [(BUFS + t * 0x800, 2048)])
    # the burst of five (four after one alone, with mergeable buffers) gets one chain
    delivered = 2 if mergeable else 1
    got = collect(rig, delivered, layout)
    assert [d for _, d, _ in got] == sent[:delivered]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (delivered, 5 - delivered)
    # the short pop, one more for the burst's other chains, one for each frame left
    burst = [(4, 1), (3, 0)] if mergeable else [(5, 1), (4, 0)]
    assert calls.pops == [(1, 1)] * (delivered - 1) + burst + [(1, 0)] * (5 - delivered)
    # the ring still works: the next frame gets the next chain
    ring = rig.device.active[RX]
    del ring.pop_batch, ring.complete  # the ActiveRing's own methods again
    rig.sniffer.send(sent[0])
    got = collect(rig, 1, layout)
    assert got == [(1, sent[0], [delivered])]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (delivered + 1, 5 - delivered)


# -- the direct path: the tap read straight into the driver's buffers --


def test_rx_direct_reads_into_the_buffers_and_gives_back_the_rest(rig: Rig) -> None:
    """Frames waiting in the tap are read straight into the chains of one pop, completed
    together; the chains left when the tap runs dry go back to the ring (not used, not in
    flight) and take the next frames."""
    net = devices_module()
    sent = [numbered(i) for i in range(20)]
    for data in sent:
        rig.sniffer.send(data)
    calls = record_rx(rig)
    layout: Layout = {}
    post(rig, layout, range(NUM), lambda t: [(BUFS + t * 0x800, 2048)])
    got = collect(rig, len(sent), layout)
    assert [(nb, d, tokens) for nb, d, tokens in got] == [
        (1, data, [t]) for t, data in enumerate(sent)
    ]
    assert calls.pops[0] == (net.RX_BATCH, min(NUM, net.RX_BATCH))
    assert calls.completes == [20]
    ring = rig.device.active[RX]
    with ring.lock:
        assert ring.queue.inflight == []  # the 44 chains left were given back
    more = [numbered(i) for i in range(20, 23)]
    for data in more:
        rig.sniffer.send(data)
    got = collect(rig, 3, layout)
    assert [(d, tokens) for _, d, tokens in got] == [(d, [20 + k]) for k, d in enumerate(more)]
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (23, 0)


def test_rx_direct_mergeable_frames_spread_over_the_next_buffers(mrg_rig: Rig, monkeypatch) -> None:
    """With MRG_RXBUF a frame longer than its buffer goes on in the next ones (its tail read
    into the arena, then copied); when the pop's chains run out they are given back and popped
    again with more, so no frame is lost to where it fell in a batch."""
    net = devices_module()
    monkeypatch.setattr(net, "RX_BATCH", 4)
    rig = mrg_rig
    # 12 + 78 bytes: one 256-byte buffer; 12 + 1038 bytes: five
    sent = [numbered(i, 1024 if i in (1, 3) else 64) for i in range(5)]
    for data in sent:
        rig.sniffer.send(data)
    layout: Layout = {}
    post(rig, layout, range(NUM), lambda t: [(BUFS + t * 0x800, 256)])
    got = collect(rig, len(sent), layout)
    assert [d for _, d, _ in got] == sent
    assert [nb for nb, _, _ in got] == [1, 5, 1, 5, 1]
    assert [t for _, _, tokens in got for t in tokens] == list(range(13))  # in ring order
    assert (rig.device.rx_frames, rig.device.rx_dropped) == (5, 0)
    ring = rig.device.active[RX]
    with ring.lock:
        assert ring.queue.inflight == []


def test_rx_direct_drops_a_frame_longer_than_the_buffer_without_mrg(fd_check, sock_dir) -> None:
    """Without MRG_RXBUF a frame that does not fit its (one) buffer is dropped and counted;
    the buffer takes the next frame."""
    with make_rig(sock_dir, mergeable=False) as rig:
        sent = [numbered(0), numbered(1, 1024), numbered(2)]
        for data in sent:
            rig.sniffer.send(data)
        layout: Layout = {}
        post(rig, layout, range(8), lambda t: [(BUFS + t * 0x800, 256)])
        got = collect(rig, 2, layout)
        assert [(d, tokens) for _, d, tokens in got] == [(sent[0], [0]), (sent[2], [1])]
        assert (rig.device.rx_frames, rig.device.rx_dropped) == (2, 1)


def test_send_rarp_announces_the_mac_on_the_tap(rig: Rig) -> None:
    """SEND_RARP (after a migration) makes the back-end announce the guest's MAC."""
    mac = bytes.fromhex("525400aabbcc")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035)) as rarp:
        rarp.bind((rig.tap.name, 0))
        rarp.settimeout(10)
        rig.fe.send_rarp(mac)  # acked (REPLY_ACK) once the frame was written
        frame = rarp.recv(2048)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert struct.unpack("!HHHBBH", frame[12:22]) == (0x8035, 1, 0x0800, 6, 4, 3)
    assert frame[22:28] == mac and frame[32:38] == mac  # sender and target hardware address
    assert rig.device.rarp_macs == [mac]


def test_tx_waits_for_a_full_tap_instead_of_dropping(monkeypatch) -> None:
    """A full tap (EAGAIN) makes TX wait until it is writable, then send: no frame lost."""
    import threading

    from vhostkit.devices import net

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:  # fill the pipe: the next write gets a real EAGAIN
            try:
                os.write(w, b"\0" * 4096)
            except BlockingIOError:
                break
        refused = threading.Event()
        real_writev = os.writev

        def writev(fd: int, views: list) -> int:  # type: ignore[type-arg]
            try:
                return real_writev(fd, views)
            except BlockingIOError:
                refused.set()
                raise

        monkeypatch.setattr(net.os, "writev", writev)

        def drain() -> None:
            refused.wait(10)
            while os.read(r, 65536):
                if not select.select([r], [], [], 0)[0]:
                    break

        t = threading.Thread(target=drain)
        t.start()
        assert net._write_frame(w, [memoryview(b"frame")])  # sent after the wait
        t.join(10)
        assert refused.is_set()
        # a tap that stays full: the frame is dropped after the timeout, not waited on forever
        monkeypatch.setattr(net, "TX_BACKPRESSURE_TIMEOUT", 0.05)
        while True:
            try:
                os.write(w, b"\0" * 4096)
            except BlockingIOError:
                break
        assert not net._write_frame(w, [memoryview(b"frame")])
    finally:
        os.close(r)
        os.close(w)


# --- dirty logging ------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg_rxbuf", "no_mrg"])
def test_rx_writes_are_logged_page_for_page(fd_check, sock_dir, packed, mergeable) -> None:  # type: ignore[no-untyped-def]
    """While logging, every page a received frame lands on is marked, and no other page but
    the ring's: rounds of arbitrary receive buffers and frames, guest memory copied before each
    round (the shadow) and compared after it."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vhostkit.backend import LogRegion
    from vhostkit.types import VHOST_VRING_F_LOG
    from vhostkit.virtio.dirty_log import LOG_PAGE_SIZE, DirtyLog, log_size_for

    page = LOG_PAGE_SIZE
    slot = 3 * page  # one chain's buffer, somewhere in 3 pages
    with (
        make_rig(sock_dir, mergeable=mergeable, packed=packed, log=True) as rig,
        DirtyLog.allocate(log_size_for(rig.mem.regions)) as dlog,
    ):
        fe, q, dev = rig.fe, rig.queues[RX], rig.device
        fe.set_log_base(0, LogRegion(dlog.fd, dlog.size, 0))
        fe.set_features(fe.acked_features | VirtioFeature.LOG_ALL)
        for ring in rig.queues.values():
            fe.set_vring_addr(ring.vring_addr(log=ring.ring_gpas[2], flags=VHOST_VRING_F_LOG))
        ring_pages = set(range(0, 0x10000 // page))  # the RX and TX rings' areas (both logged)
        free = list(range(NUM))
        posted: dict[int, list[tuple[int, int]]] = {}

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            bufs=st.lists(st.tuples(st.integers(0, page), st.integers(64, 2 * page)), max_size=6),
            frames=st.lists(st.integers(46, 1500), min_size=1, max_size=5),
        )
        def one_round(bufs: list[tuple[int, int]], frames: list[int]) -> None:
            # arbitrary buffers, and enough that fit a frame each for the frames to come
            for off, size in [*bufs, *[(0, 2048)] * len(frames)]:
                if not free:
                    break
                t = free.pop(0)
                gpa = BUFS + t * slot + off
                rig.mem.write(gpa, b"\xa5" * size)
                posted[t] = [(gpa, size)]
                q.add([], posted[t], token=t)
            rig.kick(RX)
            before = rig.mem.read(0, 0x400000)
            dlog.collect()
            target = dev.rx_frames + dev.rx_dropped + len(frames)
            for i, n in enumerate(frames):
                rig.sniffer.send(frame(bytes.fromhex("525400aabbcc"), b"\x02" * 6, bytes([i]) * n))
            dev.wait_for(lambda: dev.rx_frames + dev.rx_dropped >= target)
            with dev.active[RX].lock:  # the worker's round, completions included, is over
                pass
            after = rig.mem.read(0, 0x400000)
            marked = set(dlog.collect().tolist())
            diff = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
            changed = set((diff // page).tolist())
            assert changed - ring_pages <= marked, sorted(changed - ring_pages - marked)
            assert changed & ring_pages <= marked
            # nothing else is marked but what the used lengths say was written (a frame the
            # kernel sent on its own may have been written just before the shadow was taken)
            reported: set[int] = set()
            for t, n in q.reap():
                free.append(t)
                gpa = posted[t][0][0]
                if n:
                    reported.update(range(gpa // page, (gpa + n - 1) // page + 1))
            assert marked - ring_pages <= changed | reported, sorted(marked - changed - reported)

        one_round()


def test_tx_batch_write_retries_a_full_tap_and_skips_a_refused_frame(monkeypatch) -> None:
    """The TX batch loop (in C, ``map`` over the frames): a frame the full tap refused
    (EAGAIN) is retried once it is writable, one the tap rejects is dropped, and the frames
    after either still go out, in order."""
    from vhostkit.devices import net
    from vhostkit.virtio.chain import FlatBatch

    buf = bytearray(b"a.bb.ccc.dddd")
    flat = FlatBatch([0, 1, 2, 3], memoryview(buf), 0x1000, [0, 2, 5, 9], [1, 2, 3, 4])
    out: list[bytes] = []
    refused: set[bytes] = set()

    def write(fd: int, data: memoryview) -> int:
        frame = bytes(data)
        if frame == b"bb" and frame not in refused:
            refused.add(frame)
            raise BlockingIOError
        if frame == b"ccc":
            raise OSError(22, "Invalid argument")
        out.append(frame)
        return len(frame)

    def writev(fd: int, views: list) -> int:  # type: ignore[type-arg]
        return write(fd, views[0])

    monkeypatch.setattr(net.os, "write", write)
    monkeypatch.setattr(net.os, "writev", writev)
    assert net._write_frames(-1, flat) == 3
    assert out == [b"a", b"bb", b"dddd"]
