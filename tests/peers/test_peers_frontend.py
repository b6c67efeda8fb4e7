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

from vhostkit.backend import VringAddr
from vhostkit.testing.peers import QemuStorageDaemon, Testpmd, which_or_skip
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitLayout

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
