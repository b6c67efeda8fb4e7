"""vhostkit's tap-backed net back-end (:class:`NetDevice`) driven by real vhost-user front-ends.

The tap's link lives in a network namespace made for the test; the device keeps the tap's fds,
opened in the root namespace (moving a link keeps its fds working). Nothing leaves the machine.

* QEMU's ``virtio-net-pci`` on ``-netdev vhost-user`` with no guest kernel: iPXE's DHCP
  requests go through the device onto the tap, where ``dnsmasq`` (run in the namespace, DHCP
  only) answers; the lease it hands to QEMU's MAC (DHCPACK) means frames went both ways.
* DPDK ``dpdk-testpmd`` with virtio_user: in ``txonly`` its frames come out of the tap
  (counted with an AF_PACKET socket in the namespace); in ``rxonly`` frames written into the
  tap from the namespace's side show up in testpmd's RX counters.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time

import pytest
from helpers.dnsmasq import Dnsmasq
from helpers.net_backend import net_backend

from vhostkit.testing.packets import mac_bytes
from vhostkit.testing.peers import QemuVirtioNet, Testpmd, which_or_skip

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(os.geteuid() != 0, reason="taps and namespaces need root"),
]

ETH_P_ALL = 0x0003
ETH_EXPERIMENTAL = 0x88B5


# --- 1. QEMU + iPXE: DHCP through the back-end, answered by dnsmasq --------------------------


def test_qemu_ipxe_gets_dhcp_lease_through_backend(fd_check, sock_dir):
    which_or_skip("qemu-system-x86_64")
    which_or_skip("dnsmasq")
    mac = "52:54:00:12:34:88"
    path = sock_dir / "net.sock"
    with net_backend(path, address="10.202.0.1") as rig, contextlib.ExitStack() as stack:
        dhcp = stack.enter_context(
            Dnsmasq(
                rig.ns.name,
                rig.tap.name,
                "10.202.0.50,10.202.0.99,255.255.255.0,1h",
                sock_dir / "leases",
            )
        )
        stack.enter_context(QemuVirtioNet(path, device_args=f"mac={mac}"))
        # iPXE: DISCOVER -> OFFER -> REQUEST -> ACK. Each line needs a frame through the
        # device's TX ring (to dnsmasq) and the answer through its RX ring (to iPXE).
        tap = re.escape(rig.tap.name)
        ack = dhcp.wait_for_line(rf"DHCPACK\({tap}\) (10\.202\.0\.\d+) {mac}", timeout=25)
        leased = ack.group(1)
        output = dhcp.output
        assert re.search(rf"DHCPDISCOVER\({tap}\) {mac}", output)
        assert re.search(rf"DHCPOFFER\({tap}\) {re.escape(leased)} {mac}", output)
        assert re.search(rf"DHCPREQUEST\({tap}\) {re.escape(leased)} {mac}", output)
        # dnsmasq logs DHCPACK while building the reply and rewrites the lease file just
        # after, before sending it: read the file only once dnsmasq has exited (its signal
        # handling runs after the packet in hand is finished).
        dhcp.stop()
        assert dhcp.returncode is not None
        assert f"{mac} {leased}" in (sock_dir / "leases").read_text()
        # DISCOVER and REQUEST went out through TX; OFFER and ACK came back through RX. The ACK
        # may still be in flight when its log line appears: wait for the device's counters.
        device = rig.device
        device.wait_for(  # type: ignore[attr-defined]
            lambda: device.tx_frames >= 2 and device.rx_frames >= 2,  # type: ignore[attr-defined]
            timeout=10,
        )


# --- 2. testpmd virtio_user: txonly out of the tap, rxonly from the tap ----------------------

TESTPMD_MAC = "02:00:00:cc:00:02"


def test_testpmd_txonly_frames_come_out_of_tap(fd_check, sock_dir):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "be.sock"
    want = 2000
    src = mac_bytes(TESTPMD_MAC)
    with net_backend(path) as rig, contextlib.ExitStack() as stack:
        sniffer = rig.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        stack.callback(sniffer.close)
        sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sniffer.bind((rig.tap.name, 0))
        sniffer.settimeout(15)
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(path, forward_mode="txonly", mac=TESTPMD_MAC)
        )
        seen = 0
        first = b""
        while seen < want:
            frame = sniffer.recv(2048)
            if frame[6:12] == src:
                seen += 1
                first = first or frame
        # testpmd 22.11 txonly: 64-byte Ethernet/IPv4/UDP, 198.18.0.1 -> 198.18.0.2, port 9
        assert len(first) == 64
        assert first[0:6] == bytes.fromhex("020000000000") and first[12:14] == b"\x08\x00"
        assert first[26:34] == bytes([198, 18, 0, 1, 198, 18, 0, 2])
        assert struct.unpack_from("!HH", first, 34) == (9, 9)
        stats = pmd.port_stats(0)
        assert stats.tx_packets >= want and stats.tx_errors == 0
        pmd.stop()
        # the device counts a batch after writing all of it: wait for the count
        device = rig.device
        device.wait_for(lambda: device.tx_frames >= want)  # type: ignore[attr-defined]
    assert pmd.returncode == 0


def test_testpmd_rxonly_receives_from_tap(fd_check, sock_dir):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "be.sock"
    count = 300
    with net_backend(path) as rig, contextlib.ExitStack() as stack:
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(path, forward_mode="rxonly", mac=TESTPMD_MAC)
        )
        device = rig.device
        # rings set up and enabled, RX buffers posted: then nothing written is lost
        device.wait_for(  # type: ignore[attr-defined]
            lambda: all(r.started and r.enabled for r in device.vrings),  # type: ignore[attr-defined]
            timeout=15,
        )
        sender = rig.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_EXPERIMENTAL))
        stack.callback(sender.close)
        sender.bind((rig.tap.name, 0))
        dst, src = mac_bytes(TESTPMD_MAC), mac_bytes("02:00:00:dd:00:01")
        for i in range(count):
            # paced by testpmd's receive ring (256 buffers): send at most a ring's worth
            # ahead of what the device delivered
            _wait_delivered(device, i - 200)
            sender.send(dst + src + struct.pack("!HI", ETH_EXPERIMENTAL, i) + bytes(50))
        _wait_delivered(device, count)
        # testpmd's counters catch up with its polling: ask until they show every frame
        # (no event says when; bounded by a deadline)
        deadline = time.monotonic() + 10
        while (stats := pmd.port_stats(0)).rx_packets < count:
            assert time.monotonic() < deadline, f"testpmd RX stuck: {stats}"
        assert stats.rx_packets == count  # no IPv6 chatter: the namespace has IPv6 off
        assert stats.rx_errors == 0 and stats.tx_packets == 0
        assert device.rx_dropped == 0  # type: ignore[attr-defined]
    assert pmd.returncode == 0


def _wait_delivered(device: object, n: int, timeout: float = 10.0) -> None:
    """Wait until the device put ``n`` frames in the receive ring (its ``changed`` condition
    is notified after each round of ring processing)."""
    if n <= 0:
        return
    device.wait_for(lambda: device.rx_frames >= n, timeout=timeout)  # type: ignore[attr-defined]
