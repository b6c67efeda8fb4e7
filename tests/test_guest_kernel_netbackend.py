"""A real Linux guest kernel's virtio-net driver drives vhostkit's tap-backed net back-end.

The other peers of :class:`~vhostkit.devices.net.NetDevice` (iPXE, DPDK testpmd, vhostkit's own
driver) use neither mergeable receive buffers the way Linux does, nor checksum offload, nor
TSO/GSO. Here Debian's kernel (:mod:`vhostkit.testing.kernel_vm`, QEMU TCG) gets a virtio-net
device whose data plane is a NetDevice in this process, served over a vhost-user socket
(``-netdev vhost-user``; ``virtio-net-device`` on microvm, ``virtio-net-pci`` on q35, guest
RAM in a shared memfd). The device's tap is up in a network namespace made for the test, with
``10.203.0.1/24``; nothing else is in that namespace, so nothing leaves the machine.

Each test boots the VM once (split rings, packed rings, and no checksum offload) and runs
``tests/helpers/guest_netcheck.py`` in the guest, which brings the virtio interface up as
``10.203.0.2/24`` and then:

* pings the tap's address (MTU-sized and small requests, every one answered);
* uploads 4 MiB over TCP to a listener in the namespace (sha256 checked on the host side);
* downloads 4 MiB over TCP from a sender in the namespace (sha256 checked in the guest).

Each step prints a JSON line, asserted on here. Meanwhile an AF_PACKET socket on the tap, in
the namespace, with ``PACKET_VNET_HDR`` sees every frame with its virtio-net header: frames
the guest sent must include TSO frames (``gso_type`` TCPV4, larger than the MTU) with a partial
checksum (``NEEDS_CSUM``), and frames toward the guest must include GSO frames, which the
device spreads over the guest's mergeable receive buffers. On the back-end side: the features
QEMU set (the guest's, filtered by QEMU) include VERSION_1, MRG_RXBUF and the offloads; the
device's frame counters moved; the listener saw no error and rejected nobody.

Quirks (QEMU 7.2, Linux 6.1, Debian 12):

* Quirk: QEMU's virtio-mmio transports (microvm) default to the legacy interface
  (``force-legacy=on``): the guest can then not ack VIRTIO_F_VERSION_1 and uses legacy
  headers. :func:`~vhostkit.testing.kernel_vm.vhost_user_net_args` turns it off.
* Quirk: on q35 under TCG, QEMU 7.2 segfaults in ``vhost_net_start`` ->
  ``msix_set_vector_notifiers`` (virtio-pci's vector unmask path for a vhost device without
  KVM irqfds) as soon as the Linux driver sets DRIVER_OK with MSI-X enabled. iPXE never
  enables MSI-X, so the iPXE test does not hit it. ``vectors=0`` (INTx) avoids it.
* Quirk: QEMU handles the control virtqueue itself (CTRL_VQ, CTRL_RX, ... are never sent to a
  vhost-user net back-end), so the guest acks more features than the back-end is told about.
* Quirk: Debian's root filesystem may have no ``ping`` (iputils): the guest uses the static
  busybox the VM harness needs anyway.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_net_backend_e2e import SO_RCVBUFFORCE, NetNs
from test_peers_netbackend import net_backend

from vhostkit.devices.net import NetDevice
from vhostkit.testing import kernel_vm
from vhostkit.testing.peers import which_or_skip
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.net import GsoType, NetHdrFlag, VirtioNetHdr

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(os.geteuid() != 0, reason="taps and namespaces need root"),
]

log = logging.getLogger(__name__)

GUEST_SCRIPT = Path(__file__).resolve().parent / "helpers" / "guest_netcheck.py"
HOST_IP = "10.203.0.1"
GUEST_IP = "10.203.0.2"
GUEST_MAC = "52:54:00:12:34:99"
UP_PORT = 5201
DOWN_PORT = 5202
TRANSFER = 4 << 20
SEED = 0x5EED
MTU_FRAME = 1514  # the largest Ethernet frame without GSO at MTU 1500
#: What the guest must have acked (QEMU passes them on to the back-end).
REQUIRED_FEATURES = int(
    VF.VERSION_1 | NF.MRG_RXBUF | NF.CSUM | NF.GUEST_CSUM | NF.HOST_TSO4 | NF.GUEST_TSO4
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
VNET_HDR = 10  # what PACKET_VNET_HDR prepends: struct virtio_net_hdr, no num_buffers


class RecordingNetDevice(NetDevice):
    """A NetDevice that keeps every feature set it applied (SET_FEATURES that succeeded): the
    device itself forgets them when QEMU disconnects, which it does when the VM powers off."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.feature_sets: list[int] = []

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.feature_sets.append(features)


# --- what crosses the tap, seen from the namespace --------------------------------------------


@dataclass
class Direction:
    """IPv4/TCP frames seen on the tap in one direction."""

    frames: int = 0
    largest: int = 0  # Ethernet frame length, virtio-net header not counted
    gso: collections.Counter[int] = field(default_factory=collections.Counter)
    needs_csum: int = 0


class TapSniffer:
    """An AF_PACKET socket on ``ifname`` in ``ns`` with ``PACKET_VNET_HDR``: every frame comes
    with the virtio-net header the kernel derives from its skb (GSO type and size, partial
    checksum). Only the first bytes are read (``MSG_TRUNC`` still tells the full length).

    ``from_guest``: frames the tap received (written by the device: the guest's TX);
    ``to_guest``: frames the namespace's stack sent into the tap (PACKET_OUTGOING).
    """

    def __init__(self, ns: NetNs, ifname: str) -> None:
        self.from_guest = Direction()
        self.to_guest = Direction()
        self.errors: list[BaseException] = []
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            # headers of ~10k frames may queue while this thread waits for the GIL
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            self.sock.bind((ifname, 0))
            self.sock.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self.sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="tap-sniffer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(VNET_HDR + 64)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                while True:  # drain what is queued, then see whether to stop
                    try:
                        n, addr = self.sock.recvfrom_into(buf, 0, socket.MSG_TRUNC)
                    except BlockingIOError:
                        break
                    self._count(buf, n, addr[2])
                if self._wake_r in events:
                    return
        except BaseException as exc:
            self.errors.append(exc)

    def _count(self, buf: bytearray, n: int, pkttype: int) -> None:
        eth = VNET_HDR
        if n < eth + 34 or buf[eth + 12 : eth + 14] != b"\x08\x00" or buf[eth + 23] != 6:
            return  # not IPv4/TCP
        hdr = VirtioNetHdr.unpack(buf, VNET_HDR)
        d = self.to_guest if pkttype == PACKET_OUTGOING else self.from_guest
        d.frames += 1
        d.largest = max(d.largest, n - VNET_HDR)
        d.gso[int(hdr.gso_type)] += 1
        if hdr.flags & NetHdrFlag.NEEDS_CSUM:
            d.needs_csum += 1

    def stop(self) -> None:
        """Count what is queued, then stop (idempotent)."""
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join(10)
            assert not self._thread.is_alive(), "the sniffer thread did not stop"

    def close(self) -> None:
        self.stop()
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> TapSniffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the guest's TCP peer in the namespace ----------------------------------------------------


class NamespaceTcpPeer:
    """Two TCP listeners at ``address`` in ``ns``, one connection each, served by threads:

    * ``up_port``: reads until EOF, answers ``<count> <sha256>\\n`` and closes (:attr:`upload`);
    * ``down_port``: writes ``download`` and closes (:attr:`download_sent`).

    :meth:`close` wakes a thread still waiting in ``accept`` (``shutdown`` of a listening
    socket makes Linux's accept fail) and joins both.
    """

    def __init__(
        self, ns: NetNs, address: str, up_port: int, down_port: int, download: bytes
    ) -> None:
        self.download = download
        self.upload: tuple[int, str] | None = None
        self.download_sent = 0
        self.errors: list[BaseException] = []
        self._closing = False
        self.listeners: list[socket.socket] = []
        try:
            for port in (up_port, down_port):
                s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.listeners.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                s.listen(1)
        except BaseException:
            for s in self.listeners:
                s.close()
            raise
        self._threads = [
            threading.Thread(target=self._serve, args=(s, fn), name=name, daemon=True)
            for s, fn, name in (
                (self.listeners[0], self._receive, "tcp-upload"),
                (self.listeners[1], self._send, "tcp-download"),
            )
        ]
        for t in self._threads:
            t.start()

    def _serve(self, listener: socket.socket, fn: Callable[[socket.socket], None]) -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                fn(conn)
        except OSError as exc:
            if not self._closing:
                self.errors.append(exc)

    def _receive(self, conn: socket.socket) -> None:
        h = hashlib.sha256()
        count = 0
        buf = bytearray(1 << 20)
        while n := conn.recv_into(buf):
            h.update(memoryview(buf)[:n])
            count += n
        self.upload = (count, h.hexdigest())
        conn.sendall(f"{count} {h.hexdigest()}\n".encode())

    def _send(self, conn: socket.socket) -> None:
        conn.sendall(self.download)
        self.download_sent = len(self.download)

    def join(self, timeout: float) -> None:
        """Wait for both connections to be served (the guest waited for both already)."""
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        self._closing = True
        for s in self.listeners:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)
        for s in self.listeners:
            s.close()
        assert not any(t.is_alive() for t in self._threads), "a TCP peer thread is stuck"

    def __enter__(self) -> NamespaceTcpPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the test ----------------------------------------------------------------------------------


def guest_steps(output: str) -> dict[str, list[dict[str, object]]]:
    """The guest script's JSON lines, by step."""
    steps: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            steps[record.pop("step")].append(record)
    return steps


@dataclass
class GuestRun:
    """Everything one VM boot showed, gathered before any assertion."""

    result: kernel_vm.VmResult
    seconds: float
    steps: dict[str, list[dict[str, object]]]
    feature_sets: list[int]
    tx_frames: int
    rx_frames: int
    tx_dropped: int
    rx_dropped: int
    from_guest: Direction
    to_guest: Direction
    sniffer_errors: list[BaseException]
    upload: tuple[int, str] | None
    download_sent: int
    peer_errors: list[BaseException]
    #: requests the back-end failed (QEMU asks for no reply to most: only this shows them)
    request_errors: list[BaseException]


def run_guest_check(
    sock_dir: Path, download: bytes, *, machine: str | None = None, device_args: str = ""
) -> GuestRun:
    """Boot the VM once with the device on a fresh back-end, run the guest script, gather.

    Leaving :func:`net_backend` checks that the listener had no error and rejected no
    front-end, and that no namespace or tap is left behind.
    """
    t0 = time.monotonic()
    sock = sock_dir / "net.sock"
    with (
        net_backend(sock, address=HOST_IP, mac=GUEST_MAC, device_type=RecordingNetDevice) as rig,
        contextlib.ExitStack() as stack,
    ):
        sniffer = stack.enter_context(TapSniffer(rig.ns, rig.tap.name))
        peer = stack.enter_context(NamespaceTcpPeer(rig.ns, HOST_IP, UP_PORT, DOWN_PORT, download))
        guest_argv = [
            "python3", str(GUEST_SCRIPT), "--address", f"{GUEST_IP}/24", "--host", HOST_IP,
            "--up-port", str(UP_PORT), "--down-port", str(DOWN_PORT),
            "--bytes", str(TRANSFER), "--seed", str(SEED),
        ]  # fmt: skip
        result = kernel_vm.run_in_vm(
            guest_argv,
            timeout=60,
            machine=machine,
            memory_mb=512,
            extra_qemu_args=kernel_vm.vhost_user_net_args(
                sock, mac=GUEST_MAC, device_args=device_args
            ),
            shared_memory=True,
        )
        # The guest waited for both transfers, and the VM is off: nothing is in flight. (A
        # guest that failed may never have connected: closing the peer wakes its threads.)
        if result.returncode == 0:
            peer.join(10)
        sniffer.stop()
        device: RecordingNetDevice = rig.device  # type: ignore[assignment]
        run = GuestRun(
            result=result,
            seconds=0.0,
            steps=guest_steps(result.output),
            feature_sets=list(device.feature_sets),
            tx_frames=device.tx_frames,
            rx_frames=device.rx_frames,
            tx_dropped=device.tx_dropped,
            rx_dropped=device.rx_dropped,
            from_guest=sniffer.from_guest,
            to_guest=sniffer.to_guest,
            sniffer_errors=sniffer.errors,
            upload=peer.upload,
            download_sent=peer.download_sent,
            peer_errors=peer.errors,
            request_errors=[s.last_error for s in rig.listener.servers if s.last_error],
        )
    run.seconds = time.monotonic() - t0
    log.info(
        "guest kernel net check on %s: boot %.1f s, total %.1f s; from guest %s, to guest %s; "
        "device tx %d rx %d",
        result.machine,
        result.boot_seconds,
        run.seconds,
        run.from_guest,
        run.to_guest,
        run.tx_frames,
        run.rx_frames,
    )
    return run


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_linux_guest_drives_net_backend(fd_check, sock_dir, packed):
    which_or_skip("qemu-system-x86_64")
    download = random.Random(SEED + 1).randbytes(TRANSFER)
    upload_sha = hashlib.sha256(random.Random(SEED).randbytes(TRANSFER)).hexdigest()
    run = run_guest_check(sock_dir, download, device_args="packed=on" if packed else "")
    result, steps = run.result, run.steps
    context = f"guest exit {result.returncode} on {result.machine}; output:\n{result.output}"
    assert result.returncode == 0, context

    # the link: the virtio_net interface with QEMU's MAC, modern, offloads acked
    (link,) = steps["link"]
    assert link["mac"] == GUEST_MAC, context
    guest_features = sum(1 << i for i, bit in enumerate(str(link["features"])) if bit == "1")
    missing = REQUIRED_FEATURES & ~guest_features
    assert not missing, f"guest did not ack {missing:#x}\n{context}"

    # the back-end was told the same (QEMU passes on the data-plane features) and applied
    # it (header size, tap offloads); no request failed, also none QEMU wanted no reply to
    assert not run.request_errors, run.request_errors
    assert run.feature_sets, "the device applied no SET_FEATURES"
    acked = run.feature_sets[-1]
    assert acked & REQUIRED_FEATURES == REQUIRED_FEATURES, f"back-end acked {acked:#x}"
    assert bool(acked & VF.RING_PACKED) == packed, f"back-end acked {acked:#x}"

    # ping: every request answered, MTU-sized ones included
    assert [p["size"] for p in steps["ping"]] == [1472, 56], context
    for p in steps["ping"]:
        assert p["received"] == p["sent"] > 0, context

    # TCP both ways: byte counts and sha256 on the receiving side
    (up,) = steps["upload"]
    assert up["sent"] == TRANSFER and up["sent_sha256"] == upload_sha, context
    assert (up["host_received"], up["host_sha256"]) == (TRANSFER, upload_sha), context
    assert run.upload == (TRANSFER, upload_sha)
    (down,) = steps["download"]
    assert run.download_sent == TRANSFER
    assert down["received"] == TRANSFER, context
    assert down["sha256"] == hashlib.sha256(download).hexdigest(), context
    assert not run.peer_errors, run.peer_errors

    # offloads: the guest's TX used TSO with a partial checksum; its RX got GSO frames
    assert not run.sniffer_errors, run.sniffer_errors
    out, into = run.from_guest, run.to_guest
    summary = f"from guest {out}, to guest {into}"
    assert out.gso[GsoType.TCPV4] > 0 and out.largest > MTU_FRAME, summary
    assert out.needs_csum > 0, summary
    assert into.gso[GsoType.TCPV4] > 0 and into.largest > MTU_FRAME, summary

    # the device moved the frames itself, and dropped none. Toward the guest, compare with
    # the GSO frames only: they carried the download, which the guest got whole before it
    # powered off, while a last bare ACK or FIN from the namespace may reach the tap after
    # QEMU left (then the device never reads it).
    assert run.tx_frames >= out.frames > 0, (run.tx_frames, out)
    assert run.rx_frames >= into.gso[GsoType.TCPV4] > 0, (run.rx_frames, into)
    assert run.tx_dropped == 0 and run.rx_dropped == 0, (run.tx_dropped, run.rx_dropped)
    (guest_stats,) = steps["stats"]
    assert guest_stats["rx_dropped"] == 0 and guest_stats["tx_dropped"] == 0, guest_stats


def test_linux_guest_without_checksum_offload(fd_check, sock_dir):
    """``csum=off,guest_csum=off``: QEMU 7.2 still offers GUEST_TSO4/6 and GUEST_ECN and Linux
    acks them, but without GUEST_CSUM the tap must not be given any offload (it refuses TSO
    without CSUM, and the spec forbids partial checksums toward such a driver). SET_FEATURES
    succeeds, no frame crosses the tap with GSO or NEEDS_CSUM, and the data still arrives."""
    which_or_skip("qemu-system-x86_64")
    download = random.Random(SEED + 1).randbytes(TRANSFER)
    run = run_guest_check(sock_dir, download, device_args="csum=off,guest_csum=off")
    result, steps = run.result, run.steps
    context = f"guest exit {result.returncode} on {result.machine}; output:\n{result.output}"
    assert result.returncode == 0, context
    assert not run.request_errors, run.request_errors  # SET_FEATURES failed here before
    acked = run.feature_sets[-1]
    assert not acked & (NF.CSUM | NF.GUEST_CSUM), f"back-end acked {acked:#x}"
    (down,) = steps["download"]
    assert down["received"] == TRANSFER, context
    assert down["sha256"] == hashlib.sha256(download).hexdigest(), context
    (up,) = steps["upload"]
    assert (up["host_received"], up["host_sha256"]) == (TRANSFER, up["sent_sha256"]), context
    for direction in (run.from_guest, run.to_guest):
        assert direction.frames > 0 and direction.needs_csum == 0, direction
        assert set(direction.gso) == {GsoType.NONE}, direction
        assert direction.largest <= MTU_FRAME, direction
    assert run.tx_dropped == 0 and run.rx_dropped == 0, (run.tx_dropped, run.rx_dropped)
