"""Kernel ioctl numbers and structs, checked against values from the kernel headers (no VM)."""

from __future__ import annotations

import ctypes
import errno
import struct
from pathlib import Path

import pytest

from vhostkit.errors import DeviceUnavailable, InvalidParam
from vhostkit.kernel import VhostNet, VhostVsock
from vhostkit.kernel.ioctls import (
    TunFlags,
    TunIoctl,
    VhostIoctl,
    ifreq_flags,
    make_vhost_memory,
    vhost_memory,
    vhost_memory_region,
    vhost_vring_addr,
    vhost_vring_file,
    vhost_vring_state,
    vhost_vring_worker,
    vhost_worker_state,
)
from vhostkit.testing.kernel_vm import extract_vmlinux, has_pvh_note, resolve_module_order

# Values computed by the kernel's own _IO* macros (include/uapi/linux/vhost.h, if_tun.h).
KNOWN = {
    VhostIoctl.GET_FEATURES: 0x8008AF00,
    VhostIoctl.SET_FEATURES: 0x4008AF00,
    VhostIoctl.SET_OWNER: 0xAF01,
    VhostIoctl.RESET_OWNER: 0xAF02,
    VhostIoctl.SET_MEM_TABLE: 0x4008AF03,
    VhostIoctl.SET_LOG_BASE: 0x4008AF04,
    VhostIoctl.SET_LOG_FD: 0x4004AF07,
    VhostIoctl.NEW_WORKER: 0x8004AF08,
    VhostIoctl.FREE_WORKER: 0x4004AF09,
    VhostIoctl.SET_VRING_NUM: 0x4008AF10,
    VhostIoctl.SET_VRING_ADDR: 0x4028AF11,
    VhostIoctl.SET_VRING_BASE: 0x4008AF12,
    VhostIoctl.GET_VRING_BASE: 0xC008AF12,
    VhostIoctl.SET_VRING_ENDIAN: 0x4008AF13,
    VhostIoctl.GET_VRING_ENDIAN: 0x4008AF14,
    VhostIoctl.ATTACH_VRING_WORKER: 0x4008AF15,
    VhostIoctl.GET_VRING_WORKER: 0xC008AF16,
    VhostIoctl.SET_VRING_KICK: 0x4008AF20,
    VhostIoctl.SET_VRING_CALL: 0x4008AF21,
    VhostIoctl.SET_VRING_ERR: 0x4008AF22,
    VhostIoctl.SET_VRING_BUSYLOOP_TIMEOUT: 0x4008AF23,
    VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT: 0x4008AF24,
    VhostIoctl.SET_BACKEND_FEATURES: 0x4008AF25,
    VhostIoctl.GET_BACKEND_FEATURES: 0x8008AF26,
    VhostIoctl.NET_SET_BACKEND: 0x4008AF30,
    VhostIoctl.VSOCK_SET_GUEST_CID: 0x4008AF60,
    VhostIoctl.VSOCK_SET_RUNNING: 0x4004AF61,
    TunIoctl.TUNSETIFF: 0x400454CA,
    TunIoctl.TUNSETPERSIST: 0x400454CB,
    TunIoctl.TUNGETFEATURES: 0x800454CF,
    TunIoctl.TUNSETOFFLOAD: 0x400454D0,
    TunIoctl.TUNGETIFF: 0x800454D2,
    TunIoctl.TUNGETVNETHDRSZ: 0x800454D7,
    TunIoctl.TUNSETVNETHDRSZ: 0x400454D8,
    TunIoctl.TUNSETQUEUE: 0x400454D9,
}


@pytest.mark.parametrize("request_code,value", list(KNOWN.items()), ids=[k.name for k in KNOWN])
def test_known_numbers(request_code: int, value: int) -> None:
    assert request_code == value


def test_every_vhost_ioctl_is_listed_and_none_alias() -> None:
    # An IntEnum with equal values would silently alias members (GET/SET_FEATURES share nr 0).
    assert len(VhostIoctl) == 27
    assert len({int(m) for m in VhostIoctl}) == len(VhostIoctl)
    assert VhostIoctl.GET_FEATURES != VhostIoctl.SET_FEATURES
    assert VhostIoctl.GET_FEATURES & 0xFF == VhostIoctl.SET_FEATURES & 0xFF == 0
    assert len({int(m) for m in TunIoctl}) == len(TunIoctl)


def test_struct_layouts() -> None:
    assert ctypes.sizeof(vhost_vring_state) == 8
    assert ctypes.sizeof(vhost_vring_file) == 8
    assert ctypes.sizeof(vhost_vring_addr) == 40
    assert vhost_vring_addr.desc_user_addr.offset == 8
    assert ctypes.sizeof(vhost_memory_region) == 32
    assert ctypes.sizeof(vhost_memory) == 8
    assert ctypes.sizeof(vhost_worker_state) == 4
    assert ctypes.sizeof(vhost_vring_worker) == 8
    mem = make_vhost_memory([(0, 0x1000, 0x7F0000000000), (0x1000, 0x2000, 0x7F0000100000)])
    raw = bytes(mem)
    assert len(raw) == 8 + 2 * 32
    assert struct.unpack_from("<II", raw) == (2, 0)
    assert struct.unpack_from("<QQQQ", raw, 40) == (0x1000, 0x2000, 0x7F0000100000, 0)
    req = ifreq_flags("tap0", int(TunFlags.TAP | TunFlags.NO_PI | TunFlags.VNET_HDR))
    assert ctypes.sizeof(req) == 40
    assert bytes(req)[:5] == b"tap0\x00"
    assert struct.unpack_from("<H", bytes(req), 16)[0] == 0x5002
    with pytest.raises(ValueError):
        ifreq_flags("x" * 16)


@pytest.mark.parametrize("cls,module", [(VhostNet, "vhost_net"), (VhostVsock, "vhost_vsock")])
def test_missing_device_node(cls: type, module: str, tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match=f"modprobe {module}") as info:
        cls(path=tmp_path / "nope")
    assert info.value.errno == errno.ENOENT


def test_reserved_cid_checked_before_the_ioctl(tmp_path: Path) -> None:
    # /dev/null accepts the open; the CID check must fire before any ioctl reaches it.
    with VhostVsock(path="/dev/null") as dev:
        for cid in (0, 1, 2, 0xFFFFFFFF):
            with pytest.raises(InvalidParam, match="reserved"):
                dev.set_guest_cid(cid)


def test_resolve_module_order() -> None:
    dep = (
        "kernel/a/vhost_net.ko: kernel/a/tun.ko kernel/a/vhost.ko kernel/a/vhost_iotlb.ko\n"
        "kernel/a/vhost.ko: kernel/a/vhost_iotlb.ko\n"
        "kernel/a/vhost_iotlb.ko:\n"
        "kernel/a/tun.ko:\n"
        "kernel/b/9p.ko: kernel/b/9pnet.ko kernel/b/netfs.ko\n"
        "kernel/b/9pnet.ko:\n"
        "kernel/b/netfs.ko:\n"
    )
    order = resolve_module_order(dep, ["vhost-net", "9p"])
    assert order.index("kernel/a/vhost_iotlb.ko") < order.index("kernel/a/vhost.ko")
    assert order.index("kernel/a/vhost.ko") < order.index("kernel/a/vhost_net.ko")
    assert order.index("kernel/a/tun.ko") < order.index("kernel/a/vhost_net.ko")
    assert order[-1] == "kernel/b/9p.ko"
    assert len(order) == len(set(order)) == 7


def test_extract_vmlinux_from_synthetic_bzimage() -> None:
    import lzma

    elf = b"\x7fELF" + bytes(60) + b"kernel body" * 100
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf))
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 0x40, len(payload))
    image += bytes(0x40) + payload
    assert extract_vmlinux(bytes(image)) == elf
    assert not has_pvh_note(elf)
