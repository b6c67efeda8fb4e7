"""The parts of the kernel-served net back-end that need no kernel vhost: the feature
intersection, the translation of ring addresses and memory tables to this process's mappings,
and the error when ``/dev/vhost-net`` is missing."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostkit.devices.net_kernel import (
    KERNEL_NET_PROTOCOL_FEATURES,
    KERNEL_RING_FEATURES,
    KernelNetDevice,
    kernel_memory_table,
    kernel_net_features,
    kernel_vring_addr,
)
from vhostkit.errors import DeviceUnavailable, GuestMemoryError, InvalidOperation, InvalidParam
from vhostkit.kernel.ioctls import TunOffload
from vhostkit.types import VHOST_VRING_F_LOG, MemoryRegion, VringAddr
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.memory import GuestMemory

#: what vhost-net offers on Debian's 6.1 kernel (protocol-facts.md)
DEBIAN_6_1 = 0x33D008000
ALL_TAP = TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO6 | TunOffload.TSO_ECN


# --- features -------------------------------------------------------------------------------------


def test_features_on_debian_kernel_with_a_full_tap() -> None:
    offered = kernel_net_features(DEBIAN_6_1, ALL_TAP)
    assert offered == int(
        VF.VERSION_1
        | VF.RING_EVENT_IDX
        | VF.RING_INDIRECT_DESC
        | NF.MRG_RXBUF
        | NF.MAC
        | NF.MTU
        | NF.STATUS
        | NF.CSUM
        | NF.HOST_TSO4
        | NF.HOST_TSO6
        | NF.HOST_ECN
        | NF.GUEST_CSUM
        | NF.GUEST_TSO4
        | NF.GUEST_TSO6
        | NF.GUEST_ECN
    )


@pytest.mark.parametrize(
    "bit",
    [
        VF.LOG_ALL,  # the kernel offers it; no dirty logging here
        VF.ANY_LAYOUT,  # the same bit as VHOST_NET_F_VIRTIO_NET_HDR
        VF.ACCESS_PLATFORM,  # no IOTLB
        VF.NOTIFY_ON_EMPTY,
        VF.RING_PACKED,
        VF.PROTOCOL_FEATURES,  # added by BackendDevice, not here
    ],
)
def test_kernel_bits_never_passed_on(bit: int) -> None:
    everything = (1 << 64) - 1
    assert not kernel_net_features(everything, ALL_TAP, wanted=everything) & bit


def test_ring_features_only_where_the_kernel_has_them() -> None:
    kernel = DEBIAN_6_1 & ~int(NF.MRG_RXBUF | VF.RING_EVENT_IDX)
    offered = kernel_net_features(kernel, ALL_TAP)
    assert not offered & (NF.MRG_RXBUF | VF.RING_EVENT_IDX)
    assert offered & VF.VERSION_1
    assert offered & KERNEL_RING_FEATURES & ~kernel == 0
    assert kernel_net_features(0, ALL_TAP) & KERNEL_RING_FEATURES == 0


@pytest.mark.parametrize(
    "tap,guest",
    [
        (ALL_TAP, NF.GUEST_CSUM | NF.GUEST_TSO4 | NF.GUEST_TSO6 | NF.GUEST_ECN),
        (TunOffload.CSUM | TunOffload.TSO6, NF.GUEST_CSUM | NF.GUEST_TSO6),
        (TunOffload.CSUM, NF.GUEST_CSUM),
        (TunOffload(0), 0),
        # segmentation without checksum offload is meaningless: nothing
        (TunOffload.TSO4 | TunOffload.TSO6, 0),
    ],
)
def test_guest_offloads_follow_what_the_tap_accepts(tap: TunOffload, guest: int) -> None:
    mask = int(NF.GUEST_CSUM | NF.GUEST_TSO4 | NF.GUEST_TSO6 | NF.GUEST_ECN)
    assert kernel_net_features(DEBIAN_6_1, tap) & mask == int(guest)


def test_offloads_keep_their_prerequisites() -> None:
    full = kernel_net_features(DEBIAN_6_1, ALL_TAP)
    no_csum = kernel_net_features(DEBIAN_6_1, ALL_TAP, wanted=full & ~int(NF.CSUM))
    assert not no_csum & (NF.HOST_TSO4 | NF.HOST_TSO6 | NF.HOST_ECN)
    no_tso = kernel_net_features(
        DEBIAN_6_1, ALL_TAP, wanted=full & ~int(NF.HOST_TSO4 | NF.HOST_TSO6)
    )
    assert no_tso & NF.CSUM and not no_tso & NF.HOST_ECN
    no_gcsum = kernel_net_features(DEBIAN_6_1, ALL_TAP, wanted=full & ~int(NF.GUEST_CSUM))
    assert not no_gcsum & (NF.GUEST_TSO4 | NF.GUEST_TSO6 | NF.GUEST_ECN)


def test_mq_only_with_several_pairs() -> None:
    assert not kernel_net_features(DEBIAN_6_1, ALL_TAP) & NF.MQ
    assert kernel_net_features(DEBIAN_6_1, ALL_TAP, queue_pairs=2) & NF.MQ


def test_protocol_features_leave_out_what_the_kernel_cannot_do() -> None:
    proto = ProtocolFeature(KERNEL_NET_PROTOCOL_FEATURES)
    for missing in (
        ProtocolFeature.LOG_SHMFD,
        ProtocolFeature.INFLIGHT_SHMFD,
        ProtocolFeature.INBAND_NOTIFICATIONS,
        ProtocolFeature.CONFIG,
    ):
        assert missing not in proto
    for present in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ProtocolFeature.RESET_DEVICE,
    ):
        assert present in proto


# --- addresses ------------------------------------------------------------------------------------

FRONTEND_UVA = 0x7F12_3400_0000  # where the front-end has the region: nothing here


@pytest.fixture
def mapped() -> Iterator[GuestMemory]:
    """Two regions of one memfd, mapped as a back-end maps a front-end's table: the
    front-end's addresses are not ours."""
    fd = os.memfd_create("vhk-unit-kernel-net", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x30000)
        regions = [
            MemoryRegion(0x0, 0x10000, FRONTEND_UVA, 0x0, fd),
            MemoryRegion(0x100000, 0x20000, FRONTEND_UVA + 0x100000, 0x10000, fd),
        ]
        memory = GuestMemory.map_regions(regions)
    finally:
        os.close(fd)
    with memory:
        yield memory


def test_memory_table_uses_our_own_mappings(mapped: GuestMemory) -> None:
    table = kernel_memory_table(mapped)
    assert [(r.guest_phys_addr, r.memory_size) for r in table] == [
        (0x0, 0x10000),
        (0x100000, 0x20000),
    ]
    for region in table:
        assert region.fd is None
        assert not FRONTEND_UVA <= region.userspace_addr < FRONTEND_UVA + 0x200000
        # what the kernel would read at that address is the guest's memory
        mapped.write(region.guest_phys_addr + 0x10, b"guest!")
        assert ctypes.string_at(region.userspace_addr + 0x10, 6) == b"guest!"


def test_ring_addresses_translated_to_our_mapping(mapped: GuestMemory) -> None:
    base = FRONTEND_UVA + 0x100000  # the second region, file offset 0x10000
    addr = VringAddr(3, desc=base, avail=base + 0x1000, used=base + 0x2000)
    local = kernel_vring_addr(mapped, addr, 256)
    assert local.index == 3 and local.log == 0 and local.flags == 0
    for uva, ours, gpa in (
        (addr.desc, local.desc, 0x100000),
        (addr.avail, local.avail, 0x101000),
        (addr.used, local.used, 0x102000),
    ):
        assert ours != uva
        mapped.write(gpa, uva.to_bytes(8, "little"))
        assert ctypes.string_at(ours, 8) == uva.to_bytes(8, "little")


@pytest.mark.parametrize(
    "desc,num",
    [
        (FRONTEND_UVA + 0x10000 - 16 * 8, 16),  # the table runs off the end of region 0
        (FRONTEND_UVA + 0x80000, 8),  # the hole between the regions
        (0x1000, 8),  # not the front-end's memory at all
    ],
)
def test_ring_outside_guest_memory_is_refused(mapped: GuestMemory, desc: int, num: int) -> None:
    addr = VringAddr(0, desc=desc, avail=FRONTEND_UVA + 0x1000, used=FRONTEND_UVA + 0x2000)
    with pytest.raises(GuestMemoryError, match="desc"):
        kernel_vring_addr(mapped, addr, num)


def test_used_ring_crossing_a_region_end_is_refused(mapped: GuestMemory) -> None:
    addr = VringAddr(
        1, desc=FRONTEND_UVA, avail=FRONTEND_UVA + 0x1000, used=FRONTEND_UVA + 0x10000 - 64
    )
    with pytest.raises(GuestMemoryError, match="used"):
        kernel_vring_addr(mapped, addr, 64)


def test_logging_and_missing_size_are_refused(mapped: GuestMemory) -> None:
    addr = VringAddr(0, desc=FRONTEND_UVA, avail=FRONTEND_UVA + 0x1000, used=FRONTEND_UVA + 0x2000)
    with pytest.raises(InvalidParam, match="logging"):
        kernel_vring_addr(
            mapped, VringAddr(0, addr.desc, addr.used, addr.avail, 0, VHOST_VRING_F_LOG), 8
        )
    with pytest.raises(InvalidOperation, match="SET_VRING_NUM"):
        kernel_vring_addr(mapped, addr, 0)


# --- no /dev/vhost-net ----------------------------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="a tap needs root"
)
def test_missing_vhost_net_names_the_module(fd_check, tmp_path: Path) -> None:
    from vhostkit.kernel.tap import Tap

    with Tap("vhkun%d", nonblocking=True) as tap:
        with pytest.raises(DeviceUnavailable, match=r"modprobe vhost_net") as info:
            KernelNetDevice(tap, vhost_net_path=tmp_path / "vhost-net")
        assert info.value.errno == errno.ENOENT
        assert not tap.closed  # the tap stays its owner's
