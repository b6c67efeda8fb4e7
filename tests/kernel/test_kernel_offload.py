"""The vhost-user net back-end with its rings in kernel vhost-net (:class:`KernelNetDevice`).

Real front-ends on a real kernel: vhostkit's :class:`~vhostkit.user.Frontend` with its
:class:`~vhostkit.guest.net.VirtioNetDriver` (or a bare split queue, to place buffers in a
chosen memory region), and DPDK ``dpdk-testpmd``'s virtio_user. The far side is an AF_PACKET
socket in a network namespace of the test's own, where the tap lives (filtered by an
experimental ethertype; IPv6 is off there, so the kernel sends nothing of its own).

* frames both ways between the driver and the namespace, no Python on the data path;
* ADD_MEM_REG / REM_MEM_REG, before the ring starts and while it runs, and SET_MEM_TABLE
  while it runs: buffers in a region added while running go out of the tap, the ring follows
  its memory to new mappings; once a region is removed the kernel refuses a buffer in it (and
  says so on the ring's error eventfd); a ring whose own region goes is stopped;
* GET_VRING_BASE returns the positions and stops the ring: frames queued after it stay in
  the ring; :meth:`take_rings` / :meth:`give_rings` (for a later live swap) the same, and
  frames queued in between go out once the rings are given back;
* two queue pairs on a two-queue tap, both pairs carrying frames both ways;
* testpmd virtio_user in ``macswap``: frames from the namespace come back with the MAC
  addresses swapped, through both rings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.net_backend import TapRig, net_backend

from vhostkit.devices.net_kernel import KERNEL_RING_FEATURES, KernelNetDevice
from vhostkit.errors import RequestFailed
from vhostkit.guest.net import DEFAULT_PROTOCOL_FEATURES, VirtioNetDriver
from vhostkit.guest.rings import drain_eventfd, wait_readable
from vhostkit.kernel import VhostNet
from vhostkit.kernel.ioctls import TunOffload
from vhostkit.testing.dataplane import ETHERTYPE, GUEST_MAC, PEER_MAC, numbered_frame
from vhostkit.testing.peers import PeerProcess, Testpmd, which_or_skip
from vhostkit.types import VringState
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.user.backend.ring_device import RingDevice
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

pytestmark = pytest.mark.kernel

RX, TX = 0, 1
#: how long a negative check ("nothing came out") looks: there is no event for "never"
QUIET = 0.5
RESET_DEVICE = int(ProtocolFeature.RESET_DEVICE)


@contextlib.contextmanager
def rig(sock_dir: Path, queue_pairs: int = 1) -> Iterator[tuple[TapRig, socket.socket]]:
    """A KernelNetDevice on a tap in a fresh namespace, and a packet socket there."""
    with net_backend(
        sock_dir / "kn.sock", device_type=KernelNetDevice, queue_pairs=queue_pairs
    ) as r:
        sock = r.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            sock.bind((r.tap.name, ETHERTYPE))
            sock.settimeout(10)
            yield r, sock
        finally:
            sock.close()


def sniff(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    out: list[bytes] = []
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable((sock.fileno(),), left):
            break
        out.append(sock.recv(65536))
    return out


def receive(nic: VirtioNetDriver, count: int, queue: int = 0, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    out: list[bytes] = []
    while len(out) < count and (left := deadline - time.monotonic()) > 0:
        out += nic.recv(count - len(out), queue=queue, timeout=left)
    return out


def inbound(i: int, size: int = 64) -> bytes:
    """A numbered frame from the namespace to the driver."""
    return GUEST_MAC + PEER_MAC + numbered_frame(i, size)[12:]


def device_of(r: TapRig) -> KernelNetDevice:
    assert isinstance(r.device, KernelNetDevice)
    return r.device


# --- vhostkit's driver on the socket ------------------------------------------------------------


def test_frames_both_ways_through_kernel_rings(sock_dir: Path) -> None:
    sizes = (60, 333, 1000, 1514)
    out = [numbered_frame(i, sizes[i % 4]) for i in range(48)]
    back = [inbound(i, sizes[i % 4]) for i in range(32)]
    with rig(sock_dir) as (r, sock):
        device = device_of(r)
        assert not isinstance(device, RingDevice)  # no ring workers: the kernel serves
        with (
            Frontend.connect(r.listener.path, timeout=5) as fe,
            VirtioNetDriver(fe, queue_size=64).start() as nic,
        ):
            assert nic.header_size == 12 and r.tap.get_vnet_hdr_size() == 12
            device.wait_for(lambda: device.attached_rings == {RX, TX})
            assert nic.send(out) == len(out)
            assert nic.wait_tx_done(10)
            assert sniff(sock, len(out)) == out
            for frame in back:
                sock.send(frame)
            assert receive(nic, len(back)) == back
            assert nic.stop() == {RX: len(back), TX: len(out)}
            assert device.attached_rings == frozenset()
            assert vhost_net_fds("self") == 1  # one queue pair: one vhost-net device
        # the front-end left: the device closed its vhost-net fd
        device.wait_for(lambda: vhost_net_fds("self") == 0)


def test_get_vring_base_stops_the_ring(sock_dir: Path) -> None:
    with (
        rig(sock_dir) as (r, sock),
        Frontend.connect(r.listener.path, timeout=5) as fe,
        VirtioNetDriver(fe, queue_size=64).start() as nic,
    ):
        device = device_of(r)
        device.wait_for(lambda: device.attached_rings == {RX, TX})
        first = [numbered_frame(i) for i in range(10)]
        assert nic.send(first) == 10 and nic.wait_tx_done(10)
        assert sniff(sock, 10) == first
        sock.send(inbound(0))
        assert receive(nic, 1) == [inbound(0)]
        assert fe.get_vring_base(TX) == 10
        assert device.attached_rings == {RX}
        # queued and kicked after GET_VRING_BASE: the kernel must not take them
        assert nic.send([numbered_frame(100 + i) for i in range(5)]) == 5
        assert not wait_readable((sock.fileno(),), QUIET), "a frame left a stopped ring"
        _, tx_q = nic.queues()
        assert tx_q.pending_used() == 0 and nic.tx_in_flight == 5
        # RX is woken by the tap, not by kicks: only detaching stops it
        assert fe.get_vring_base(RX) == 1
        assert device.attached_rings == frozenset()
        sock.send(inbound(1))
        assert nic.recv(timeout=QUIET) == [], "a frame reached a stopped ring"


def test_take_and_give_rings_keep_positions(sock_dir: Path) -> None:
    with (
        rig(sock_dir) as (r, sock),
        Frontend.connect(r.listener.path, timeout=5) as fe,
        VirtioNetDriver(fe, queue_size=64).start() as nic,
    ):
        device = device_of(r)
        device.wait_for(lambda: device.attached_rings == {RX, TX})
        assert nic.send([numbered_frame(i) for i in range(7)]) == 7 and nic.wait_tx_done(10)
        assert len(sniff(sock, 7)) == 7
        sock.send(inbound(0))
        assert receive(nic, 1) == [inbound(0)]
        states = device.take_rings()
        assert states == (VringState(RX, 1), VringState(TX, 7))
        assert device.attached_rings == frozenset()
        later = [numbered_frame(50 + i) for i in range(4)]
        assert nic.send(later) == 4
        sock.send(inbound(1))  # waits in the tap's queue
        assert not wait_readable((sock.fileno(),), QUIET), "a frame left a taken ring"
        device.give_rings(states)
        assert device.attached_rings == {RX, TX}
        assert sniff(sock, 4) == later
        assert receive(nic, 1) == [inbound(1)]
        # the front-end's view never changed: its GET_VRING_BASE sees the kernel's positions
        assert nic.stop() == {RX: 2, TX: 11}


def test_reset_device_detaches_and_closes(sock_dir: Path) -> None:
    with (
        rig(sock_dir) as (r, sock),
        Frontend.connect(r.listener.path, timeout=5) as fe,
        VirtioNetDriver(
            fe, queue_size=64, protocol_features=DEFAULT_PROTOCOL_FEATURES | RESET_DEVICE
        ).start() as nic,
    ):
        device = device_of(r)
        device.wait_for(lambda: device.attached_rings == {RX, TX})
        assert nic.send([numbered_frame(0)]) == 1 and nic.wait_tx_done(10)
        assert sniff(sock, 1) == [numbered_frame(0)]
        fe.reset_device()
        assert device.attached_rings == frozenset() and vhost_net_fds("self") == 0
        assert nic.send([numbered_frame(1)]) == 1
        assert not wait_readable((sock.fileno(),), QUIET), "a frame left a reset device"


def test_two_queue_pairs_on_a_multi_queue_tap(sock_dir: Path) -> None:
    with (
        rig(sock_dir, queue_pairs=2) as (r, sock),
        Frontend.connect(r.listener.path, timeout=5) as fe,
        VirtioNetDriver(fe, queue_size=64, queue_pairs=2).start() as nic,
    ):
        device = device_of(r)
        assert fe.get_queue_num() == 2
        device.wait_for(lambda: device.attached_rings == {0, 1, 2, 3})
        for queue in (0, 1):
            frames = [numbered_frame(100 * queue + i) for i in range(6)]
            assert nic.send(frames, queue=queue) == 6
            assert nic.wait_tx_done(10, queue=queue)
            assert sniff(sock, 6) == frames
        # inbound: the tap steers by flow; the driver's MAC and many UDP flows reach both pairs
        frames = [udp_frame(GUEST_MAC, PEER_MAC, port) for port in range(1000, 1064)]
        sender = r.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # sends only
        try:
            sender.bind((r.tap.name, 0))
            for frame in frames:
                sender.send(frame)
        finally:
            sender.close()
        got: dict[int, list[bytes]] = {0: [], 1: []}
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < len(frames) and time.monotonic() < deadline:
            for queue in (0, 1):
                got[queue] += nic.recv(queue=queue, timeout=0.05)
        assert sorted(got[0] + got[1]) == sorted(frames)
        assert got[0] and got[1], {q: len(f) for q, f in got.items()}
        positions = nic.stop()
        assert positions == {0: len(got[0]), 1: 6, 2: len(got[1]), 3: 6}


def udp_frame(dst: bytes, src: bytes, port: int) -> bytes:
    """An Ethernet/IPv4/UDP frame (checksums left zero: only its flow matters here)."""
    payload = struct.pack("!I", port) + bytes(18)
    udp = struct.pack("!HHHH", port, 9, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([10, 9, 0, 1]),
        bytes([10, 9, 0, 2]),
    )  # fmt: skip
    return dst + src + b"\x08\x00" + ip + udp


# --- memory regions ------------------------------------------------------------------------------

HDR = bytes(12)  # a virtio-net header with nothing to do (VERSION_1: 12 bytes)


def put_frames(q: SplitDriverQueue, mem: GuestMemory, gpa: int, frames: list[bytes]) -> None:
    for i, frame in enumerate(frames):
        at = gpa + i * 0x800
        mem.write(at, HDR + frame)
        q.add([(at, len(HDR) + len(frame))], token=i)
    q.publish()


def test_memory_regions_follow_add_and_remove(sock_dir: Path) -> None:
    protocol = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
    low = GuestMemory.allocate([(0, 0x100000)])
    high = GuestMemory.allocate([(0x40000000, 0x100000)])
    extra = GuestMemory.allocate([(0x80000000, 0x10000)])
    kick, call, err = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3))
    try:
        with rig(sock_dir) as (r, sock), Frontend.connect(r.listener.path, timeout=5) as fe:
            device = device_of(r)
            fe.set_owner()
            fe.negotiate(int(VF.VERSION_1), protocol)
            fe.add_mem_region(low.regions[0])  # the only table: ADD_MEM_REG, ring stopped
            q = SplitDriverQueue(low, 64, 0, features=int(VF.VERSION_1), index=TX)
            fe.set_vring_num(TX, 64)
            fe.set_vring_base(TX, 0)
            fe.set_vring_addr(q.vring_addr())
            fe.set_vring_call(TX, call)
            fe.set_vring_err(TX, err)
            fe.set_vring_kick(TX, kick)
            fe.set_vring_enable(TX, True)
            assert device.attached_rings == {TX}

            frames = [numbered_frame(i) for i in range(4)]
            put_frames(q, low, 0x10000, frames)
            os.eventfd_write(kick, 1)
            assert sniff(sock, 4) == frames
            # added while running: the kernel finds buffers there
            fe.add_mem_region(high.regions[0])
            fe.add_mem_region(extra.regions[0])
            frames = [numbered_frame(10 + i) for i in range(4)]
            put_frames(q, high, 0x40000000, frames)
            os.eventfd_write(kick, 1)
            assert sniff(sock, 4) == frames
            # a region no buffer uses goes; the ring keeps running
            fe.remove_mem_region(extra.regions[0])
            frames = [numbered_frame(20 + i) for i in range(4)]
            put_frames(q, high, 0x40080000, frames)
            os.eventfd_write(kick, 1)
            assert sniff(sock, 4) == frames
            assert fe.get_vring_base(TX) == 12
            # stopped: a region comes back, the ring restarts from its position
            fe.add_mem_region(extra.regions[0])
            fe.set_vring_base(TX, 12)
            fe.set_vring_kick(TX, kick)
            frames = [numbered_frame(30 + i) for i in range(2)]
            put_frames(q, extra, 0x80000000, frames)
            os.eventfd_write(kick, 1)
            assert sniff(sock, 2) == frames
            # the whole table again while running: new mappings here, the ring follows them
            fe.set_mem_table([low.regions[0], high.regions[0], extra.regions[0]])
            frames = [numbered_frame(40 + i) for i in range(2)]
            put_frames(q, low, 0x20000, frames)
            os.eventfd_write(kick, 1)
            assert sniff(sock, 2) == frames
            # removed while running: the kernel no longer reaches it, and says so
            fe.remove_mem_region(high.regions[0])
            assert len(device.memory.regions) == 2  # type: ignore[union-attr]
            assert drain_eventfd(err) == 0  # no error so far
            put_frames(q, high, 0x40000000, [numbered_frame(99)])
            os.eventfd_write(kick, 1)
            assert wait_readable((err,), 10), "the kernel did not report the unmapped buffer"
            assert not wait_readable((sock.fileno(),), QUIET)
            drain_eventfd(err)
            # the ring's own region goes: the device stops the ring and says so
            assert device.attached_rings == {TX}
            fe.remove_mem_region(low.regions[0])
            assert device.attached_rings == frozenset()
            assert drain_eventfd(err) >= 1
            assert fe.get_vring_base(TX) == 16
    finally:
        for m in (low, high, extra):
            m.close()
        for fd in (kick, call, err):
            os.close(fd)


# --- DPDK testpmd's virtio_user as the front-end ----------------------------------------------

TESTPMD_MAC = bytes.fromhex("020000cc0002")


def test_testpmd_virtio_user_frames_both_ways(sock_dir: Path) -> None:
    which_or_skip("dpdk-testpmd")
    count = 32
    with rig(sock_dir) as (r, sock):
        device = device_of(r)
        with Testpmd.virtio_user_frontend(
            r.listener.path,
            forward_mode="macswap",
            mac=TESTPMD_MAC.hex(":"),
            # testpmd drops what its RX ring holds when forwarding starts, unless told not to:
            # frames that arrive before that wait in the ring
            app_args=("--no-flush-rx",),
            ready_timeout=60,
        ) as pmd:
            device.wait_for(lambda: device.attached_rings == {RX, TX}, timeout=30)
            sent = [TESTPMD_MAC + PEER_MAC + numbered_frame(i)[12:] for i in range(count)]
            for frame in sent:
                sock.send(frame)
            got = sniff(sock, count, timeout=20)
            # macswap: each frame back from the driver's TX ring, addresses swapped
            assert [f[6:12] + f[0:6] + f[12:] for f in got] == sent
            stats = pmd.port_stats(0)
            assert stats.rx_packets >= count and stats.tx_packets >= count
            assert stats.rx_errors == 0 and stats.tx_errors == 0
        # testpmd stopped its rings (GET_VRING_BASE) and left
        device.wait_for(lambda: not device.attached_rings, timeout=10)
    assert pmd.returncode == 0


# --- honest features, refused requests --------------------------------------------------------


def test_offered_features_are_what_kernel_and_tap_can_do(sock_dir: Path) -> None:
    with rig(sock_dir) as (r, _sock), VhostNet() as net:
        device = device_of(r)
        kernel = net.get_features()
        assert device.kernel_features == kernel
        offered = device.get_features()
        assert offered & KERNEL_RING_FEATURES & ~kernel == 0  # ring bits: the kernel's
        assert offered & VF.VERSION_1 and offered & NF.MRG_RXBUF  # Debian's kernel has both
        assert not offered & (VF.LOG_ALL | VF.ANY_LAYOUT | VF.RING_PACKED | VF.ACCESS_PLATFORM)
        # a real tap takes every checksum/TSO offload: all guest offloads are offered
        assert offered & NF.GUEST_TSO4 and offered & NF.GUEST_ECN
        assert device.tap_offloads & TunOffload.TSO4


def test_polling_mode_ring_is_refused(sock_dir: Path) -> None:
    mem = GuestMemory.allocate([(0, 0x100000)])
    try:
        with rig(sock_dir) as (r, _sock), Frontend.connect(r.listener.path, timeout=5) as fe:
            device = device_of(r)
            fe.set_owner()
            fe.negotiate(int(VF.VERSION_1), ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            q = SplitDriverQueue(mem, 64, 0, features=int(VF.VERSION_1), index=TX)
            fe.set_vring_num(TX, 64)
            fe.set_vring_addr(q.vring_addr())
            with pytest.raises(RequestFailed):
                fe.set_vring_kick(TX, None)  # no kick fd: the kernel could never be woken
            assert not device.vrings[TX].started and device.attached_rings == frozenset()
    finally:
        mem.close()


# --- the daemon: python3 -m vhostkit.devices.net --dataplane kernel ----------------------------


class NetDaemon(PeerProcess):
    """vhostkit's net back-end daemon, ready once it says where it serves."""

    name = "vhostkit-net"

    def _wait_ready(self) -> None:
        self.wait_for_line(r"vhostkit net backend: tap", self.ready_timeout)


def vhost_net_fds(pid: int | str) -> int:
    """How many fds on /dev/vhost-net process ``pid`` has open."""
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for fd in fds if _readlink(f"/proc/{pid}/fd/{fd}") == "/dev/vhost-net")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


@contextlib.contextmanager
def ipv6_off_for_new_links() -> Iterator[None]:
    """The daemon's tap comes up without IPv6 (no MLD reports into the rings)."""
    knob = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6")
    old = knob.read_text()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(old)


def test_net_daemon_with_kernel_dataplane(sock_dir: Path) -> None:
    path = sock_dir / "daemon.sock"
    tap_name = f"vhkd{os.getpid() % 10000}"
    argv = [sys.executable, "-m", "vhostkit.devices.net", "--socket", path, "--tap", tap_name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with (
        ipv6_off_for_new_links(),
        NetDaemon([*argv, "--dataplane", "kernel"], env=env, ready_timeout=30) as daemon,
    ):
        assert daemon.pid is not None
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            sock.bind((tap_name, ETHERTYPE))
            for session in range(2):  # the second front-end gets fresh kernel devices
                with (
                    Frontend.connect(path, timeout=10) as fe,
                    VirtioNetDriver(fe, queue_size=64).start() as nic,
                ):
                    frames = [numbered_frame(10 * session + i) for i in range(8)]
                    assert nic.send(frames) == 8 and nic.wait_tx_done(10)
                    assert sniff(sock, 8) == frames
                    sock.send(inbound(session))
                    assert receive(nic, 1) == [inbound(session)]
                    # the rings are the kernel's: the daemon holds vhost-net fds
                    assert vhost_net_fds(daemon.pid) >= 1
                    assert nic.stop() == {RX: 1, TX: 8}
        finally:
            sock.close()
    assert daemon.returncode == 0
