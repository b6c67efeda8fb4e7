"""Real traffic through real peers, with vhostkit on one side of the rings.

* vhostkit as the guest (:class:`VirtioNetDriver` through :class:`Frontend`) sends numbered
  frames to DPDK's vhost PMD in ``--forward-mode=macswap`` and gets every one back with the
  MAC addresses swapped, on split and on packed rings.
* DPDK's virtio_user in ``--forward-mode=txonly`` fills the TX ring of a vhostkit back-end
  (:class:`RingDevice`) whose device-role queue consumes and completes the chains: the frames
  are testpmd's txonly frames (64 bytes, Ethernet/IPv4/UDP with testpmd's fixed addresses).
* QEMU's ``virtio-net-pci`` with no guest kernel: the iPXE option ROM sends a DHCP DISCOVER
  through the TX ring of a vhostkit back-end, from the MAC address QEMU was given.
"""

from __future__ import annotations

import struct
import time
from contextlib import ExitStack

import numpy as np
import pytest

from vhostkit.guest.net import VirtioNetDriver
from vhostkit.testing.peers import QemuVirtioNet, Testpmd, which_or_skip
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.user.backend.ring_device import ActiveRing, RingDevice
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.net import VirtioNetHdr, header_size
from vhostkit.virtio.ring import Chain

pytestmark = pytest.mark.peer

RX, TX = 0, 1
OUR_MAC = bytes.fromhex("020000aa0001")
PEER_MAC = bytes.fromhex("020000bb0002")


def numbered(i: int, size: int = 64) -> bytes:
    """A frame from us to the peer MAC with ``i`` at the start of the payload."""
    head = PEER_MAC + OUR_MAC + b"\x88\xb5" + struct.pack(">I", i)
    return head + bytes((i * 7 + j) % 256 for j in range(size - len(head)))


# --- vhostkit driver -> testpmd vhost PMD (macswap) -> vhostkit driver ----------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_driver_through_testpmd_macswap(fd_check, sock_dir, packed):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "vhost.sock"
    total, chunk = 3000, 128
    frames = [numbered(i, 64 + (i % 3) * 100) for i in range(total)]
    with ExitStack() as stack:
        pmd = stack.enter_context(Testpmd.vhost_backend(path, forward_mode="macswap"))
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(VirtioNetDriver(fe, packed=packed).start())
        assert bool(nic.acked_features & VF.RING_PACKED) == packed
        assert nic.header_size == 12
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        got: list[bytes] = []
        for start in range(0, total, chunk):
            batch = frames[start : start + chunk]
            # at most one ring of receive buffers in flight: testpmd drops what has no buffer
            assert nic.send_all(batch, timeout=10) == len(batch)
            want = start + len(batch)
            while len(got) < want:
                more = nic.recv(timeout=5.0)
                assert more, f"macswap stalled: {len(got)} of {want} frames back"
                got += more
        assert len(got) == total
        for i, (sent, back) in enumerate(zip(frames, got, strict=True)):
            assert back[0:6] == OUR_MAC and back[6:12] == PEER_MAC, f"frame {i}"
            assert back[12:] == sent[12:], f"frame {i} payload"
        assert nic.recv(timeout=0.2) == []  # nothing extra
        assert nic.wait_tx_done(5.0)
        stats = pmd.port_stats(0)
        assert stats.rx_packets == stats.tx_packets == total
        assert stats.rx_errors == stats.tx_errors == 0
        # testpmd consumed exactly `total` receive and transmit descriptors on each ring
        wrap = 1 ^ (total // 256) & 1
        want = (total % 256 | wrap << 15) if packed else total % 65536
        assert nic.stop() == {RX: want, TX: want}
    assert pmd.returncode == 0


# --- testpmd virtio_user (txonly) -> vhostkit device-role sink ------------------------------


class TxCapture(RingDevice):
    """A net device that completes every TX chain (length 0) and keeps the first ``keep``
    frames and their headers (all with ``None``). It holds RX buffers without using them:
    it never receives, so the peer's RX ring stays empty."""

    def __init__(
        self,
        features: int,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG,
        config: bytes = b"",
        keep: int | None = None,
    ) -> None:
        super().__init__(
            features=features,
            protocol_features=protocol_features,
            num_queues=2,
            config=config,
        )
        self.keep = keep
        self.frames: list[bytes] = []
        self.headers: list[VirtioNetHdr] = []
        self.consumed = 0
        self.held: list[Chain] = []

    def process(self, ring: ActiveRing) -> None:
        q = ring.queue
        while len(batch := q.pop_batch()):
            if ring.index == RX:
                self.held += list(batch)  # never completed
                del batch
                continue
            room = len(batch) if self.keep is None else self.keep - len(self.frames)
            if room > 0:
                hs = header_size(self.acked_features)
                for chain in list(batch)[:room]:
                    data = chain.read_all()
                    self.headers.append(VirtioNetHdr.unpack(data, hs))
                    self.frames.append(data[hs:])
            # counted before completing: once the peer sees a completion, the count has it
            self.consumed += len(batch)
            ring.complete(batch.ids, np.zeros(len(batch), dtype=np.int64))
            del batch

    def _release(self) -> None:
        self.held.clear()
        super()._release()


def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_testpmd_txonly_into_vhostkit_sink(fd_check, sock_dir, packed):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "sink.sock"
    device = TxCapture(int(VF.VERSION_1 | NF.MRG_RXBUF | VF.RING_PACKED | NF.MAC), keep=4)
    mac = "02:00:00:cc:00:01"
    with ExitStack() as stack:
        stack.callback(device.close)
        listener = BackendListener(path, lambda: device, max_connections=1).start()

        def stop_listener() -> None:
            listener.stop()
            assert not listener.errors and not listener.rejected

        stack.callback(stop_listener)
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(path, forward_mode="txonly", packed_vq=packed, mac=mac)
        )
        device.wait_for(lambda: device.consumed > 0, timeout=15)  # a frame reached the sink
        assert bool(device.acked_features & VF.RING_PACKED) == packed
        # it keeps sending, many rings' worth, because the sink completes what it takes
        # (testpmd's counters lag at first: ask again until they pass ten rings)
        deadline = time.monotonic() + 10
        while (stats := pmd.port_stats(0)).tx_packets < 10 * 256:
            assert time.monotonic() < deadline, f"testpmd TX stuck: {stats}"
        assert stats.tx_errors == 0
        assert device.consumed >= 256

        # testpmd 22.11 txonly: 64-byte Ethernet/IPv4/UDP frames from the port's MAC to the
        # default peer address 02:00:00:00:00:00, 198.18.0.1 -> 198.18.0.2, UDP 9 -> 9.
        hdr, frame = device.headers[0], device.frames[0]
        assert hdr.gso_type == 0 and hdr.num_buffers == 0
        assert len(frame) == 64
        assert frame[0:6] == bytes.fromhex("020000000000")
        assert frame[6:12] == bytes.fromhex(mac.replace(":", ""))
        assert frame[12:14] == b"\x08\x00"
        ip = frame[14:34]
        ver_ihl, _tos, tot_len, _id, _frag, ttl, proto, _csum, src, dst = struct.unpack(
            ">BBHHHBBH4s4s", ip
        )
        assert ver_ihl == 0x45 and tot_len == 50 and proto == 17 and ttl == 64
        assert src == bytes([198, 18, 0, 1]) and dst == bytes([198, 18, 0, 2])
        assert ip_checksum(ip) == 0
        sport, dport, ulen, _ucsum = struct.unpack(">HHHH", frame[34:42])
        assert (sport, dport, ulen) == (9, 9, 30)
        assert all(f == frame for f in device.frames)
    assert pmd.returncode == 0


# --- QEMU + iPXE -> vhostkit device: a DHCP DISCOVER ----------------------------------------


def dhcp_message_type(frame: bytes) -> int | None:
    """The DHCP message type (option 53) of a BOOTREQUEST in ``frame``, UDP 68 -> 67."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0xF) * 4
    if frame[14 + 9] != 17:
        return None
    udp = 14 + ihl
    sport, dport = struct.unpack(">HH", frame[udp : udp + 4])
    if (sport, dport) != (68, 67):
        return None
    bootp = frame[udp + 8 :]
    if bootp[0] != 1 or bootp[236:240] != b"\x63\x82\x53\x63":
        return None
    i = 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        code, length = bootp[i], bootp[i + 1]
        if code == 53:
            return bootp[i + 2]
        i += 2 + length
    return None


def test_qemu_ipxe_sends_dhcp_discover(fd_check, sock_dir):
    which_or_skip("qemu-system-x86_64")
    path = sock_dir / "net.sock"
    mac = "52:54:00:12:34:77"
    # no CONFIG (QEMU 7.2 warns about a net back-end that offers it) and no
    # CONFIGURE_MEM_SLOTS: memory comes in one SET_MEM_TABLE here (test_peers_backend.py
    # covers QEMU's ADD_MEM_REG path)
    device = TxCapture(
        int(VF.VERSION_1 | NF.MAC | NF.MRG_RXBUF | NF.STATUS),
        protocol_features=DEFAULT_PROTOCOL_FEATURES
        & ~ProtocolFeature.CONFIG
        & ~ProtocolFeature.CONFIGURE_MEM_SLOTS,
        config=bytes.fromhex("525400000000") + struct.pack("<HHH", 1, 1, 1500),
    )
    with ExitStack() as stack:
        stack.callback(device.close)
        listener = BackendListener(path, lambda: device, max_connections=1).start()
        stack.callback(listener.stop)
        stack.enter_context(QemuVirtioNet(path, device_args=f"mac={mac}"))
        device.wait_for(
            lambda: any(dhcp_message_type(f) == 1 for f in device.frames), timeout=25
        )  # a DHCP DISCOVER
        frame = next(f for f in device.frames if dhcp_message_type(f) == 1)
        want_mac = bytes.fromhex(mac.replace(":", ""))
        assert frame[0:6] == b"\xff" * 6  # broadcast
        assert frame[6:12] == want_mac
        udp = 14 + (frame[14] & 0xF) * 4
        bootp = frame[udp + 8 :]
        assert bootp[0] == 1  # BOOTREQUEST
        assert bootp[28:34] == want_mac  # chaddr
    assert not listener.errors and not listener.rejected
