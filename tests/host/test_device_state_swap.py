"""A running virtio-net device migrated between two real ``vhostkit backend net`` processes.

Back-end A and back-end B each serve a tap of their own (the source and the destination
host's). vhostkit's VMM (:class:`~vhostkit.vmm.VirtioNetDevice`, with vhostkit's guest driver as
the guest) streams numbered frames; mid-stream :meth:`VirtioNetDevice.migrate` stops A's rings,
takes A's device state (SET_DEVICE_STATE_FD SAVE, CHECK_DEVICE_STATE), gives it to B (LOAD,
CHECK) and starts B at the same positions. Every frame arrives exactly once, in order: A's tap
carries the start of the stream, B's the rest. QEMU 7.2 does not use DEVICE_STATE for net, so
vhostkit's own VMM is the front-end of this proof.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from helpers.cli_run import Daemon
from helpers.vhostkit_daemon import assert_clean_output

from vhostkit.guest.net import DEFAULT_PROTOCOL_FEATURES
from vhostkit.testing.swap import (
    GUEST_MAC,
    PEER_MAC,
    _read_numbers,
    frame_number,
    numbered,
    packet_socket,
)
from vhostkit.user import Frontend
from vhostkit.user.backend.state import DeviceState, DeviceType
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.vmm import VhostUserNetPlane, VirtioNetDevice

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps need root")

FEATURES = int(VirtioFeature.VERSION_1 | VirtioNetFeature.MRG_RXBUF)
PROTOCOL = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.DEVICE_STATE
MAC = "02:00:00:cc:00:01"


class Host:
    """One back-end process and its tap."""

    def __init__(self, stack: ExitStack, sock_dir: Path, name: str) -> None:
        self.sock = sock_dir / f"{name}.sock"
        self.tap = f"vhkds{os.getpid() % 10000}{name}"
        argv = ["-m", "vhostkit", "backend", "net", "--socket", str(self.sock)]
        self.daemon = stack.enter_context(
            Daemon([*argv, "--tap", self.tap, "--mac", MAC, "--mtu", "1400"])
        )
        self.daemon.wait_ready()
        with open(f"/proc/sys/net/ipv6/conf/{self.tap}/disable_ipv6", "w") as f:
            f.write("1")  # no MLD/ND chatter from the kernel into the rings

    def plane(self) -> VhostUserNetPlane:
        return VhostUserNetPlane(Frontend.connect(self.sock, timeout=5))

    def stop(self) -> None:
        status, out = self.daemon.stop()
        assert status == 0, out[-3000:]
        assert_clean_output(out)


@pytest.fixture
def hosts(sock_dir: Path) -> Iterator[tuple[Host, Host]]:
    with ExitStack() as stack:
        yield Host(stack, sock_dir, "a"), Host(stack, sock_dir, "b")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_tx_stream_goes_on_on_the_destination(hosts: tuple[Host, Host], packed: bool) -> None:
    a, b = hosts
    total, chunk, at = 300, 20, 140
    with packet_socket(a.tap) as sniff_a, packet_socket(b.tap) as sniff_b:
        device = VirtioNetDevice(
            a.plane(), features=FEATURES, packed=packed, protocol_features=PROTOCOL
        ).start()
        try:
            nic = device.nic
            for start in range(0, total, chunk):
                frames = [numbered(i) for i in range(start, start + chunk)]
                assert nic.send_all(frames, timeout=30) == chunk
                if start == at:
                    # the chunk just queued is in the TX ring as A stops: B must send what
                    # A did not, and nothing twice
                    device.migrate(b.plane()).close()
            assert nic.wait_tx_completed(total, 30)
            got_a = _read_numbers(sniff_a, total, 2.0)
            got_b = _read_numbers(sniff_b, total - len(got_a), 30.0)
        finally:
            device.stop()
            device.close()
            device.plane.close()
    assert got_a + got_b == list(range(total))  # exactly once, in order, across the move
    assert got_a and got_b  # both carried part of the stream
    state = DeviceState.unpack(device.states[0])
    assert state.device is DeviceType.NET
    assert state.config[:6] == bytes.fromhex(MAC.replace(":", ""))
    assert {r.index: r.base for r in state.rings} == device.swaps[0]
    assert all(r.enabled and r.packed == packed and not r.inflight for r in state.rings)
    a.stop()
    b.stop()


def test_rx_stream_goes_on_on_the_destination(hosts: tuple[Host, Host]) -> None:
    """Frames into A's tap, then (after the move) into B's: the guest receives all of them, in
    order, B filling the receive buffers the guest posted while A served it."""
    a, b = hosts
    total, half = 200, 100
    device = VirtioNetDevice(a.plane(), features=FEATURES, protocol_features=PROTOCOL).start()
    got: list[int] = []
    try:
        with packet_socket(a.tap) as send_a, packet_socket(b.tap) as send_b:
            for i in range(total):
                if i == half:
                    _receive(device, got, half)
                    device.migrate(b.plane()).close()
                sender = send_a if i < half else send_b
                sender.send(numbered(i, src=PEER_MAC, dst=GUEST_MAC))
            _receive(device, got, total)
    finally:
        device.stop()
        device.close()
        device.plane.close()
    assert got == list(range(total))
    assert device.swaps[0][0] > 0  # the receive ring had moved on when A stopped
    a.stop()
    b.stop()


def _receive(device: VirtioNetDevice, got: list[int], until: int) -> None:
    for _ in range(600):
        if len(got) >= until:
            return
        for frame in device.nic.recv(timeout=0.05):
            n = frame_number(frame)
            if n is not None:
                got.append(n)
