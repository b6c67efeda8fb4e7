"""``vhostkit demo``: the README's main job.

``vhostkit demo`` starts a vhostkit vhost-user back-end on a Unix socket, drives it with the
vhostkit front-end over that socket, and prints what the two sides negotiated and what the
back-end ended up holding (memory it mapped, ring state), then pushes frames through
vhost-user rings to an echo back-end and checks they all come back.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TextIO

from vhostkit.types import VringAddr
from vhostkit.user import BackendDevice, BackendListener, Frontend
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature, feature_names
from vhostkit.virtio.memory import GuestMemory

__all__ = ["add_arguments", "run", "run_demo"]

NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioNetFeature.MAC
    | VirtioNetFeature.MRG_RXBUF
    | VirtioNetFeature.STATUS
    | VirtioNetFeature.MTU
)

RING_SIZE = 256


def _names(bits: int, table: type[enum.IntFlag]) -> str:
    return ", ".join(f.name for f in table if f & bits and f.name) or "-"


def run_demo(out: TextIO = sys.stdout) -> int:
    """The demo behind ``vhostkit demo``; returns the exit code."""

    def say(text: str = "") -> None:
        print(text, file=out)

    mac = bytes.fromhex("525400123456")
    config = (
        mac + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (1500).to_bytes(2, "little")
    )
    with tempfile.TemporaryDirectory(prefix="vhostkit-demo-") as tmp:
        path = os.path.join(tmp, "net0.sock")
        device = BackendDevice(features=NET_FEATURES, num_queues=2, config=config)
        listener = BackendListener(path, lambda: device, max_connections=1).start()
        say(f"back-end   listening on {path} (vhostkit BackendDevice, 2 queues)")
        try:
            with (
                Frontend.connect(path, timeout=5) as fe,
                GuestMemory.allocate([(0, 0xA0000), (0x100000, 0x100000)]) as mem,
            ):
                say("front-end  connected")
                fe.set_owner()
                offered = fe.get_features()
                say(f"offered    features {offered:#x}: {', '.join(feature_names(offered))}")
                acked, protocol = fe.negotiate(
                    NET_FEATURES,
                    ProtocolFeature.MQ
                    | ProtocolFeature.REPLY_ACK
                    | ProtocolFeature.CONFIG
                    | ProtocolFeature.STATUS
                    | ProtocolFeature.CONFIGURE_MEM_SLOTS,
                )
                say(f"acked      features {acked:#x}: {', '.join(feature_names(acked))}")
                say(f"protocol   features {int(protocol):#x}: {_names(protocol, ProtocolFeature)}")
                say(f"queues     {fe.get_queue_num()} (GET_QUEUE_NUM)")
                say(f"mem slots  {fe.get_max_mem_slots()} (GET_MAX_MEM_SLOTS)")
                cfg = fe.get_config(0, len(config))
                say(
                    f"config     mac {cfg[:6].hex(':')} status {int.from_bytes(cfg[6:8], 'little')}"
                    f" max_queue_pairs {int.from_bytes(cfg[8:10], 'little')}"
                    f" mtu {int.from_bytes(cfg[10:12], 'little')}"
                )

                fe.set_mem_table(mem.regions)
                # Rings for RX (0) and TX (1) in the high region, split layout.
                kicks, calls = [], []
                high = mem.regions[1].userspace_addr
                for index in (0, 1):
                    base = high + index * 0x10000
                    fe.set_vring_num(index, RING_SIZE)
                    fe.set_vring_base(index, 0)
                    fe.set_vring_addr(
                        VringAddr(index, desc=base, avail=base + 0x1000, used=base + 0x2000)
                    )
                    kick = os.eventfd(0, os.EFD_CLOEXEC)
                    call = os.eventfd(0, os.EFD_CLOEXEC)
                    kicks.append(kick)
                    calls.append(call)
                    fe.set_vring_call(index, call)
                    fe.set_vring_kick(index, kick)
                    fe.set_vring_enable(index, True)
                status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                fe.set_status(status | DeviceStatus.DRIVER_OK)
                say(f"status     {fe.get_status():#x} (DRIVER_OK)")

                assert device.memory is not None
                say("back-end   mapped the memory table:")
                for r in device.memory.regions:
                    say(
                        f"           gpa {r.guest_phys_addr:#010x}-{r.guest_end:#010x}"
                        f"  front-end va {r.userspace_addr:#x}  file offset {r.mmap_offset:#x}"
                    )
                mem.write(0x100000 + 0x1000 + 2, (3).to_bytes(2, "little"))
                for ring in device.vrings:
                    say(
                        f"ring {ring.index}     size {ring.num} started={ring.started} "
                        f"enabled={ring.enabled} avail.idx={device.avail_idx(ring.index)}"
                    )
                for index in (0, 1):
                    say(f"ring {index}     GET_VRING_BASE -> {fe.get_vring_base(index)} (stopped)")
                for fd in kicks + calls:
                    os.close(fd)
        finally:
            listener.stop()
            device.close()
    _demo_traffic(say)
    say("done: front-end and back-end agreed over a real vhost-user socket")
    return 0


def _demo_traffic(say: Callable[[str], None], count: int = 2000) -> None:
    """A data path: the vhostkit guest NIC sends frames through vhost-user rings to an echo
    back-end and receives them back."""
    from vhostkit.devices.echo import ECHO_FEATURES, EchoDevice
    from vhostkit.guest.net import VirtioNetDriver

    say("")
    say(f"data path  {count} frames: vhostkit guest NIC -> vhost-user rings -> echo back-end")
    with tempfile.TemporaryDirectory(prefix="vhostkit-demo-") as tmp:
        path = os.path.join(tmp, "echo.sock")
        device = EchoDevice()
        listener = BackendListener(path, lambda: device, max_connections=1).start()
        try:
            with (
                Frontend.connect(path, timeout=5) as fe,
                VirtioNetDriver(
                    fe, features=ECHO_FEATURES & ~int(VirtioFeature.RING_PACKED)
                ).start() as nic,
            ):
                frames = [
                    bytes.fromhex("020000000002020000000001")
                    + b"\x88\xb5"
                    + i.to_bytes(4, "big")
                    + bytes(46)
                    for i in range(count)
                ]
                start = time.perf_counter()
                got: list[bytes] = []
                for i in range(0, count, 128):
                    nic.send_all(frames[i : i + 128], timeout=10)
                    while len(got) < min(i + 128, count):
                        got += nic.recv(timeout=10)
                elapsed = time.perf_counter() - start
                intact = sum(a == b for a, b in zip(frames, got, strict=False))
                say(
                    f"           header {nic.header_size} bytes, {len(got)} echoed back, "
                    f"{intact} byte-identical and in order, {count / elapsed:,.0f} frames/s "
                    "round trip"
                )
                positions = nic.stop()
                say(f"           ring positions at stop (GET_VRING_BASE): {positions}")
        finally:
            listener.stop()
            device.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vhostkit demo`` takes no options of its own."""


def run(args: argparse.Namespace) -> int:
    """Run the demo; its report goes to stdout."""
    return run_demo()
