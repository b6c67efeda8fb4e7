"""vhostkit's :class:`Frontend` against real vhost-user back-ends.

* DPDK ``dpdk-testpmd`` with the vhost PMD (``net_vhost0``): a virtio-net back-end.
* ``qemu-storage-daemon`` with a ``vhost-user-blk`` export: a virtio-blk back-end built on
  QEMU's libvhost-user.

Each test owns its peer (started and stopped inside the test) and checks that the test process
leaks no fds.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from helpers.dirty_pages import device_writes, pages, ring_parts, used_index, wait_used

from vhostkit.backend import VringAddr
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.testing.peers import QemuStorageDaemon, Testpmd, which_or_skip
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES, LogBaseReply
from vhostkit.virtio.dirty_log import DirtyLog, log_size_for
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue, SplitLayout
from vhostkit.vmm import VhostUserNetPlane, VirtioNetDevice

pytestmark = pytest.mark.peer

P = ProtocolFeature
VF = VirtioFeature
NF = VirtioNetFeature

#: What DPDK 22.11's vhost PMD offers (peers.md: features 0xd7c66e7cb, protocol 0x10cbf).
TESTPMD_FEATURES = 0xD7C66E7CB
TESTPMD_PROTOCOL = 0x10CBF

QUEUE_SIZE = 256
RX, TX = 0, 1
#: Where each ring lives in guest memory (guest-physical), and the position it starts at.
RING_GPA = {RX: 0x10000, TX: 0x20000}
RING_BASE = {RX: 0x10, TX: 0x123}


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    """Make eventfds with ``fds.append(eventfd())``; all are closed after the test."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def lay_out_split_ring(mem: GuestMemory, gpa: int, num: int, position: int) -> VringAddr:
    """Zero a compact split ring at ``gpa`` and put both indices at ``position``.

    The driver has then published ``position`` buffers and the device has used them all: the
    state of a ring moved from another data plane. A back-end started with
    ``SET_VRING_BASE position`` finds nothing to do (``avail->idx == last_avail_idx``), and the
    ring addresses are the front-end's (our) virtual addresses, as vhost-user wants.
    """
    layout = SplitLayout.compute(num)
    mem.write(gpa, bytes(layout.size))
    mem.write(gpa + layout.avail + 2, struct.pack("<H", position))
    mem.write(gpa + layout.used + 2, struct.pack("<H", position))
    return VringAddr(
        index=0,  # replaced by the caller
        desc=mem.gpa_to_uva(gpa + layout.desc),
        used=mem.gpa_to_uva(gpa + layout.used),
        avail=mem.gpa_to_uva(gpa + layout.avail),
    )


# --- dpdk-testpmd, vhost PMD ----------------------------------------------------------------


@pytest.mark.parametrize("testpmd_connects", [False, True], ids=["testpmd-listens", "client=1"])
def test_frontend_drives_testpmd_vhost_pmd(fd_check, sock_dir, eventfds, testpmd_connects):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "vhost-net.sock"
    with ExitStack() as stack:
        if testpmd_connects:
            # We listen, testpmd (client=1) connects: it retries in the background until we do.
            pmd = stack.enter_context(Testpmd.vhost_backend(path, client=True))
            fe = Frontend.accept(path, timeout=15)
        else:
            pmd = stack.enter_context(Testpmd.vhost_backend(path))
            fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        mem = stack.enter_context(GuestMemory.allocate([(0, 4 << 20)]))

        # -- negotiation --
        features = fe.get_features()
        must_have = (
            VF.VERSION_1
            | VF.PROTOCOL_FEATURES
            | VF.RING_EVENT_IDX
            | VF.RING_INDIRECT_DESC
            | VF.RING_PACKED
            | VF.LOG_ALL
            | NF.MRG_RXBUF
            | NF.MQ
            | NF.CTRL_VQ
        )
        assert features & must_have == must_have, f"testpmd offers {features:#x}"
        assert features == TESTPMD_FEATURES  # DPDK 22.11; relax if the installed DPDK moves
        protocol = fe.get_protocol_features()
        assert protocol & (P.MQ | P.REPLY_ACK | P.STATUS) == P.MQ | P.REPLY_ACK | P.STATUS
        assert not protocol & P.CONFIG  # a net back-end without config space messages
        assert protocol == TESTPMD_PROTOCOL
        fe.set_protocol_features(P.MQ | P.REPLY_ACK | P.STATUS)
        # REPLY_ACK is on from here: every request below is acknowledged, a refusal raises.
        fe.set_owner()
        acked = int(VF.VERSION_1 | NF.MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES)
        fe.set_features(acked)
        assert fe.acked_features == acked
        # Quirk: the vhost PMD answers GET_QUEUE_NUM with its maximum (128), not `queues=1`.
        assert fe.get_queue_num() == 128

        # -- memory and rings --
        fe.set_mem_table(mem.regions)
        for index in (RX, TX):
            kick, call = eventfd(), eventfd()
            eventfds += [kick, call]
            addr = lay_out_split_ring(mem, RING_GPA[index], QUEUE_SIZE, RING_BASE[index])
            fe.set_vring_num(index, QUEUE_SIZE)
            fe.set_vring_base(index, RING_BASE[index])
            fe.set_vring_addr(VringAddr(index, addr.desc, addr.used, addr.avail))
            fe.set_vring_kick(index, kick)
            fe.set_vring_call(index, call)
            fe.set_vring_enable(index, True)
        # With STATUS negotiated, DPDK's vhost library starts the device at DRIVER_OK.
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        status |= DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK
        fe.set_status(int(status))
        assert fe.get_status() == status

        # testpmd's own view: the vhost library says the device is ready, the vhost PMD
        # brings the port's link up.
        pmd.wait_for_line(re.escape(f"({path}) virtio is now ready for processing"), 10)
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        stats = pmd.port_stats(0)
        assert stats.rx_packets == stats.tx_packets == 0  # the rings hold no buffers

        # -- stop: GET_VRING_BASE returns where each ring stands, i.e. the base we gave --
        for index in (RX, TX):
            assert fe.get_vring_base(index) == RING_BASE[index]
        assert pmd.running
    assert pmd.returncode == 0


# --- qemu-storage-daemon, vhost-user-blk ----------------------------------------------------


#: qemu-storage-daemon 7.2 (libvhost-user): CONFIG, CONFIGURE_MEM_SLOTS, REPLY_ACK and more.
QSD_PROTOCOL = 0x8F2B
IMAGE_SIZE = 64 << 20
SECTOR = 512


def test_frontend_drives_qemu_storage_daemon(fd_check, sock_dir):
    which_or_skip("qemu-storage-daemon")
    path = sock_dir / "blk.sock"
    with ExitStack() as stack:
        qsd = stack.enter_context(
            QemuStorageDaemon(sock_dir / "disk.img", path, create_size=IMAGE_SIZE)
        )
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)

        features = fe.get_features()
        assert features & VF.VERSION_1 and features & VF.PROTOCOL_FEATURES
        protocol = fe.get_protocol_features()
        wanted = P.MQ | P.CONFIG | P.CONFIGURE_MEM_SLOTS | P.REPLY_ACK
        assert protocol & wanted == wanted
        assert protocol == QSD_PROTOCOL
        fe.set_protocol_features(wanted)
        fe.set_owner()
        fe.set_features(int(VF.VERSION_1 | VF.PROTOCOL_FEATURES))
        assert fe.get_queue_num() == 1  # num-queues defaults to 1

        # struct virtio_blk_config: u64 capacity (in 512-byte sectors) first.
        config = fe.get_config(0, 60)
        (capacity,) = struct.unpack_from("<Q", config, 0)
        assert capacity == IMAGE_SIZE // SECTOR == 131072

        assert fe.get_max_mem_slots() == 32
        mem = stack.enter_context(GuestMemory.allocate([(0, 1 << 20), (0x100000, 1 << 20)]))
        low, high = mem.regions
        # REPLY_ACK negotiated: a refused ADD/REM_MEM_REG raises RequestFailed.
        fe.add_mem_region(low)
        fe.add_mem_region(high)
        fe.remove_mem_region(high)
        fe.remove_mem_region(low)
        # the connection is still in sync after the table changes
        assert fe.get_max_mem_slots() == 32
    assert qsd.returncode == 0


# --- dirty logging: a bitmap DPDK filled --------------------------------------------------------

OUR_MAC = bytes.fromhex("020000aa0001")
PEER_MAC = bytes.fromhex("020000bb0002")


def numbered_frame(i: int, size: int) -> bytes:
    head = PEER_MAC + OUR_MAC + b"\x88\xb5" + struct.pack(">I", i)
    return head + bytes((i * 7 + j) % 256 for j in range(size - len(head)))


def _echo_round(nic: VirtioNetDriver, frames: list[bytes]) -> list[bytes]:
    assert nic.send_all(frames, timeout=10) == len(frames)
    got: list[bytes] = []
    while len(got) < len(frames):
        more = nic.recv(timeout=5.0)
        assert more, f"macswap stalled: {len(got)} of {len(frames)} frames back"
        got += more
    return got


def test_vmm_reads_the_dirty_log_testpmd_filled(fd_check, sock_dir):
    """vhostkit's VMM device on DPDK's vhost PMD (macswap): with logging on, the frames testpmd
    writes back into the guest's receive buffers and its used-ring updates are marked in the
    bitmap, in DPDK's own hand; pages it did not write since logging started are not.

    Quirk "DPDK: empty SET_LOG_BASE reply": the vhost library answers SET_LOG_BASE with no
    payload (a reply that would mean failure elsewhere).
    """
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "vhost.sock"
    with ExitStack() as stack:
        pmd = stack.enter_context(Testpmd.vhost_backend(path, forward_mode="macswap"))
        fe = Frontend.connect(path, timeout=5)
        plane = stack.enter_context(VhostUserNetPlane(fe))
        dev = stack.enter_context(VirtioNetDevice(plane, queue_size=QUEUE_SIZE)).start()
        nic = dev.nic
        assert nic.acked_protocol_features & P.LOG_SHMFD
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        mem = nic.memory
        assert mem is not None
        rx_q, tx_q = nic.queues()
        assert isinstance(rx_q, SplitDriverQueue) and isinstance(tx_q, SplitDriverQueue)

        # before logging: these frames' receive buffers are written, and must not show up
        warm = [numbered_frame(i, 1000) for i in range(8)]
        assert _echo_round(nic, warm)[0][:6] == OUR_MAC
        rx_start, tx_start = used_index(mem, rx_q), used_index(mem, tx_q)
        warm_pages = pages(device_writes(mem, rx_q, 0, rx_start)[0])

        dlog = dev.start_dirty_log()
        assert fe.log_base_reply is LogBaseReply.EMPTY  # the DPDK quirk
        count = 32
        frames = [numbered_frame(100 + i, 1000) for i in range(count)]
        assert nic.send_all(frames, timeout=10) == count
        wait_used(mem, nic.ring(RX), rx_start + count, 10)
        buffers, rx_ring = device_writes(mem, rx_q, rx_start, count)
        assert all(length == 12 + 1000 for _, length in buffers)
        got = nic.recv(timeout=5.0)
        while len(got) < count:
            more = nic.recv(timeout=5.0)
            assert more
            got += more
        assert [g[12:] for g in got] == [f[12:] for f in frames]
        assert nic.wait_tx_done(5.0)
        sent = device_writes(mem, tx_q, tx_start, count)[0]
        tx_buffers = pages((addr, 12 + 1000) for addr, _ in sent)
        running = dlog.collect()
        dev.stop()  # GET_VRING_BASE: DPDK stops; what it wrote until then is in the log
        marked = set(running.tolist()) | set(dev.collect_dirty().tolist())

        written = pages(buffers)
        rx_parts, tx_parts = ring_parts(rx_q), ring_parts(tx_q)
        # every page DPDK wrote since logging started is marked: receive data, used rings
        assert written <= marked, sorted(written - marked)
        assert pages(rx_ring) <= marked
        assert tx_parts["used"] & marked  # the TX used ring: testpmd completed our frames
        # ... and nothing else: no descriptor table, no transmit buffer, no receive buffer
        # written before logging started, no buffer it never wrote
        assert marked <= written | rx_parts["used"] | tx_parts["used"], sorted(
            marked - written - rx_parts["used"] - tx_parts["used"]
        )
        assert not marked & (rx_parts["desc"] | tx_parts["desc"])
        assert not marked & (warm_pages - written)
        assert tx_buffers and not marked & tx_buffers  # the device only read those
        dev.stop_dirty_log()
        assert pmd.running
    assert pmd.returncode == 0


def test_logging_stops_on_testpmd(fd_check, sock_dir):
    """After stop (SET_FEATURES without LOG_ALL, ring addresses without VHOST_VRING_F_LOG),
    DPDK writes the guest's buffers and marks nothing in the log it was given."""
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "vhost.sock"
    with ExitStack() as stack:
        pmd = stack.enter_context(Testpmd.vhost_backend(path, forward_mode="macswap"))
        fe = Frontend.connect(path, timeout=5)
        plane = stack.enter_context(VhostUserNetPlane(fe))
        nic = stack.enter_context(VirtioNetDevice(plane, queue_size=QUEUE_SIZE)).start().nic
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        assert nic.memory is not None
        dlog = stack.enter_context(DirtyLog.allocate(log_size_for(nic.memory.regions)))
        fe.start_dirty_log(dlog, nic.acked_features, nic.vring_addrs())
        _echo_round(nic, [numbered_frame(i, 200) for i in range(4)])
        assert nic.wait_tx_done(5.0)
        assert dlog.collect().size  # logging is on
        fe.stop_dirty_log(nic.acked_features, nic.vring_addrs())
        back = _echo_round(nic, [numbered_frame(10 + i, 200) for i in range(16)])
        assert len(back) == 16 and nic.wait_tx_done(5.0)
        assert dlog.snapshot().size == 0
        nic.stop()
    assert pmd.returncode == 0


def test_libvhost_user_echoes_the_log_size(fd_check, sock_dir):
    """qemu-storage-daemon (libvhost-user) maps the log and answers SET_LOG_BASE with the
    size it was sent. Quirk "libvhost-user: SET_LOG_BASE echoes the size": it replies in the
    request's own buffer, whose first u64 is the log size; a status reader would see failure.
    """
    which_or_skip("qemu-storage-daemon")
    path = sock_dir / "blk.sock"
    with ExitStack() as stack:
        stack.enter_context(QemuStorageDaemon(sock_dir / "disk.img", path, create_size=IMAGE_SIZE))
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        assert fe.get_features() & VF.LOG_ALL
        fe.negotiate(int(VF.VERSION_1), int(P.MQ | P.REPLY_ACK | P.LOG_SHMFD))
        fe.check_dirty_log()
        dlog = stack.enter_context(DirtyLog.allocate(log_size_for(256 << 20)))
        fe.set_dirty_log(dlog)
        assert fe.log_base_reply is LogBaseReply.SIZE_ECHOED
        assert fe.get_queue_num() == 1  # still in step after the reply
