"""The tap-backed vhost-user net device with a real tap and a vhostkit driver on the rings.

TX: a frame the driver queues comes out of the tap (seen on an AF_PACKET socket bound to it).
RX: a frame sent into the tap from the kernel side lands in the driver's receive buffers with
a virtio-net header, spread over several buffers with mergeable receive buffers.
The tap has no address and no bridge: nothing leaves this machine.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from vhostkit.kernel.tap import Tap
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.net import VirtioNetHdr
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
    queues: dict[int, SplitDriverQueue] = field(default_factory=dict)
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


@pytest.fixture(params=[True, False], ids=["mrg_rxbuf", "no_mrg"])
def rig(request, fd_check, sock_dir) -> Iterator[Rig]:
    net = devices_module()
    mergeable = request.param
    tap = Tap("vhkt%d", nonblocking=True)
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
        fe.negotiate(wanted, ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.RARP)
        assert tap.get_vnet_hdr_size() == 12
        fe.set_mem_table(mem.regions)
        for index in (RX, TX):
            q = SplitDriverQueue(mem, NUM, index * 0x8000, features=fe.acked_features, index=index)
            rig.queues[index] = q
            rig.kicks[index] = eventfd()
            rig.calls[index] = eventfd()
            fe.set_vring_num(index, NUM)
            fe.set_vring_base(index, 0)
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
