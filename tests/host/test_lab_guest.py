"""The lab's virtual guest (:mod:`vhostkit.lab.guest`) in this process, on a real back-end.

Its NIC is on the ``vhostkit backend net`` daemon over a persistent tap; the far end is an
AF_PACKET socket on the tap that asks the guest for its MAC (ARP). The guest's idle sleep is
set to ten minutes, so an answer within the test's time shows the guest woke on its receive
interrupt, not on a timer. Then the daemon is SIGKILLed and another started on the same socket
and tap: the guest notices by itself, reconnects, and answers again.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.vhostkit_daemon import persistent_tap, start_net_daemon

import vhostkit.lab.guest as guest_mod
from vhostkit.lab.guest import GuestNic, VirtualGuest
from vhostkit.testing.packets import ArpOp, arp_frame, parse_arp

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="taps need root")

GUEST_MAC, GUEST_IP = "02:00:00:c0:00:02", "10.99.0.2"
PEER_MAC, PEER_IP = "02:00:00:c0:00:01", "10.99.0.1"
ETH_P_ARP = 0x0806


@pytest.fixture
def tap() -> Iterator[str]:
    with persistent_tap(f"vhklg{os.getpid() % 10000}") as name:
        yield name


def arp_answered(sock: socket.socket, timeout: float = 30.0) -> bool:
    """Ask the guest for its MAC; True once its reply comes back."""
    sock.send(arp_frame(ArpOp.REQUEST, PEER_MAC, PEER_IP, "00:00:00:00:00:00", GUEST_IP))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            arp = parse_arp(sock.recv(2048))
        except TimeoutError:
            return False
        if (
            arp is not None
            and arp.op == ArpOp.REPLY
            and arp.sender_mac == bytes.fromhex(GUEST_MAC.replace(":", ""))
        ):
            return True
    return False


def test_the_guest_wakes_on_frames_and_reconnects_after_a_sigkill(
    tap: str, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_mod, "_IDLE_MS", 600_000)  # no timer would wake it in time
    sock = sock_dir / "net.sock"
    daemons = [start_net_daemon(sock, tap)]
    nic = GuestNic(tap, "vhostkit", GUEST_MAC, f"{GUEST_IP}/24", str(sock))
    guest = VirtualGuest([nic]).start()
    peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        peer.bind((tap, 0))
        assert arp_answered(peer)
        info = guest.request({"op": "info"}, timeout=10)["nics"][0]
        assert info["connected"] and info["reconnects"] == 0
        daemons[0].send_signal(signal.SIGKILL)
        daemons[0].wait(10)
        daemons.append(start_net_daemon(sock, tap))
        back = guest.request({"op": "wait-reconnect", "count": 1, "timeout": 30}, timeout=40)
        assert back["reconnects"] == 1 and back["outage"] > 0, back
        assert arp_answered(peer)  # over the new daemon
        info = guest.request({"op": "info"}, timeout=10)["nics"][0]
        assert info["connected"] and info["reconnects"] == 1 and info["dropped"] == 0
    finally:
        peer.close()
        guest.close()
        for proc in daemons:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
