"""Error paths of the kernel vhost devices, on a real kernel."""

from __future__ import annotations

import errno
import os

import pytest

from vhostkit.backend import MemoryRegion
from vhostkit.errors import DeviceUnavailable, InvalidOperation, InvalidParam, Unsupported
from vhostkit.kernel import Tap, VhostIoctl, VhostNet, VhostVsock
from vhostkit.kernel.ioctls import (
    VHOST_F_LOG_ALL,
    VHOST_NET_F_VIRTIO_NET_HDR,
    vhost_vring_state,
)

pytestmark = pytest.mark.kernel

VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


def _kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.mark.parametrize("cls,module", [(VhostNet, "vhost_net"), (VhostVsock, "vhost_vsock")])
def test_missing_device_node(cls: type, module: str, tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(DeviceUnavailable, match=f"modprobe {module}") as info:
        cls(path=os.path.join(tmp_path, "no-such-vhost"))
    assert info.value.errno == errno.ENOENT


def test_device_nodes_exist() -> None:
    for path in ("/dev/vhost-net", "/dev/vhost-vsock"):
        assert os.path.exists(path), f"{path} missing on a kernel test run"


def test_set_owner_twice() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(InvalidOperation, match="already owned") as info:
            dev.set_owner()
        assert info.value.errno == errno.EBUSY


def test_reset_owner_then_set_owner_again() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        dev.reset_owner()
        dev.set_owner()


def test_ioctl_before_set_owner_is_invalid_operation() -> None:
    with VhostNet() as dev, pytest.raises(InvalidOperation, match="set_owner first"):
        dev.set_vring_num(0, 256)


def test_bad_memory_table_kernel_address(guest_memory, make_ring, make_eventfds) -> None:  # type: ignore[no-untyped-def]
    # The kernel checks a table against the rings that have a backend (an idle ring is checked
    # when it starts): with a live ring, a region at a kernel address is refused.
    bad = MemoryRegion(
        guest_phys_addr=0, memory_size=guest_memory.size, userspace_addr=0xFFFF_8000_0000_0000
    )
    with VhostNet() as dev, Tap("vhkm%d") as tap:
        dev.set_owner()
        dev.set_features(0)
        tap.set_vnet_hdr_size(10)
        dev.set_mem_table([guest_memory.region])
        ring = make_ring(1)
        kick, call = make_eventfds(2)
        dev.set_vring_num(1, ring.num)
        dev.set_vring_addr(ring.vring_addr())
        dev.set_vring_kick(1, kick)
        dev.set_vring_call(1, call)
        dev.set_backend(1, tap.fd)
        with pytest.raises(InvalidParam, match="memory table") as info:
            dev.set_mem_table([bad])
        dev.set_backend(1, None)
    assert info.value.errno in (errno.EINVAL, errno.EFAULT)


def test_bad_memory_table_too_many_regions(guest_memory) -> None:  # type: ignore[no-untyped-def]
    page = 4096
    regions = [
        MemoryRegion(
            guest_phys_addr=i * page,
            memory_size=page,
            userspace_addr=guest_memory.addr + (i % 8) * page,
        )
        for i in range(65)
    ]
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(InvalidParam, match="max_mem_regions") as info:
            dev.set_mem_table(regions)
    assert info.value.errno in (errno.E2BIG, errno.EINVAL)


def test_bad_vring_num() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(InvalidParam) as info:
            dev.set_vring_num(0, 3)  # not a power of two
    assert info.value.errno == errno.EINVAL


def test_ring_index_out_of_range_is_checked_before_the_ioctl() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(InvalidParam, match="out of range"):
            dev.set_vring_num(2, 256)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32, -1])
def test_reserved_cid(cid: int) -> None:
    with VhostVsock() as dev:
        dev.set_owner()
        with pytest.raises(InvalidParam, match="reserved"):
            dev.set_guest_cid(cid)


def test_cid_in_use_by_second_device() -> None:
    with VhostVsock() as first, VhostVsock() as second:
        first.set_owner()
        second.set_owner()
        first.set_guest_cid(7)
        with pytest.raises(InvalidParam, match="already in use") as info:
            second.set_guest_cid(7)
        assert info.value.errno == errno.EADDRINUSE
        second.set_guest_cid(8)


def test_unknown_ioctl_is_unsupported() -> None:
    from ioctl_opt import IO

    with VhostNet() as dev:
        dev.set_owner()
        with pytest.raises(Unsupported) as info:
            # a vring-style argument with a valid ring index, so the kernel gets as far as
            # looking the request up (with no argument it fails reading the index: EFAULT)
            dev._ioctl(IO(0xAF, 0x7E), vhost_vring_state(0, 0), "a number no kernel defines")
    assert info.value.errno in (errno.ENOTTY, errno.EOPNOTSUPP, 515)


def test_worker_ioctls_probed_and_typed() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        supported = dev.supports(VhostIoctl.NEW_WORKER)
        if _kernel_version() < (6, 5):
            assert not supported  # worker ioctls arrived in Linux 6.5
        if supported:
            worker = dev.new_worker()
            dev.free_worker(worker)
        else:
            with pytest.raises(Unsupported, match="NEW_WORKER"):
                dev.new_worker()
            # cached: a second call does not reach the kernel and says the same
            with pytest.raises(Unsupported):
                dev.new_worker()
            assert dev.supports(VhostIoctl.ATTACH_VRING_WORKER) is False


def test_vring_endian_probe_matches_call() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        if dev.supports(VhostIoctl.GET_VRING_ENDIAN):
            dev.get_vring_endian(0)
        else:
            with pytest.raises(Unsupported):
                dev.get_vring_endian(0)


def test_busyloop_and_backend_features() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        assert dev.supports(VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT)
        dev.set_vring_busyloop_timeout(0, 50)
        assert dev.get_vring_busyloop_timeout(0) == 50
        assert dev.supports(VhostIoctl.GET_BACKEND_FEATURES)
        backend = dev.get_backend_features()
        dev.set_backend_features(backend)


def test_probe_needs_owner() -> None:
    with VhostNet() as dev, pytest.raises(InvalidOperation):
        dev.supports(VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT)


def test_vhost_net_features() -> None:
    with VhostNet() as dev:
        features = dev.get_features()
    for bit in (
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VHOST_F_LOG_ALL,
        VHOST_NET_F_VIRTIO_NET_HDR,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ):
        assert features & (1 << bit), f"bit {bit} missing from {features:#x}"


def test_vhost_vsock_features() -> None:
    with VhostVsock() as dev:
        features = dev.get_features()
    for bit in (VIRTIO_F_VERSION_1, VHOST_F_LOG_ALL, VIRTIO_RING_F_EVENT_IDX):
        assert features & (1 << bit), f"bit {bit} missing from {features:#x}"


def test_set_features_roundtrip_and_unknown_bits() -> None:
    with VhostNet() as dev:
        dev.set_owner()
        offered = dev.get_features()
        dev.set_features(offered & (1 << VIRTIO_F_VERSION_1))
        missing = next(b for b in range(63, 0, -1) if not offered & (1 << b))
        with pytest.raises(InvalidParam):
            dev.set_features(1 << missing)


def test_close_is_idempotent_and_later_calls_fail() -> None:
    dev = VhostVsock()
    fd = dev.fileno()
    dev.close()
    dev.close()
    assert dev.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(InvalidOperation, match="closed"):
        dev.get_features()
