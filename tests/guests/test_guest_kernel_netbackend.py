"""A real Linux guest kernel's virtio-net driver drives vhostkit's tap-backed net back-end.

The other peers of :class:`~vhostkit.devices.net.NetDevice` (iPXE, DPDK testpmd, vhostkit's own
driver) use neither mergeable receive buffers the way Linux does, nor checksum offload, nor
TSO/GSO. Here Debian's kernel (:mod:`vhostkit.testing.kernel_vm`, QEMU TCG) gets a virtio-net
device whose data plane is a NetDevice in this process, served over a vhost-user socket
(``-netdev vhost-user``; ``virtio-net-device`` on microvm, ``virtio-net-pci`` on q35, guest
RAM in a shared memfd). The device's tap is up in a network namespace made for the test, with
``10.203.0.1/24``; nothing else is in that namespace, so nothing leaves the machine.

Each test boots the VM once (split rings, packed rings, no checksum offload, and two queue
pairs) and runs ``tests/helpers/guest_netcheck.py`` in the guest, which brings the virtio
interface up as ``10.203.0.2/24`` and then:

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

Multiqueue (:func:`test_linux_guest_uses_two_queue_pairs`): ``NetDevice(queue_pairs=2)`` on a
two-queue tap, ``queues=2`` and ``mq=on`` in QEMU; the guest (2 vCPUs) runs a UDP echo from
each CPU, then 4 TCP uploads and 4 downloads at once from threads pinned to its CPUs, and
every one of the four rings must carry frames (see the test for why that is deterministic).

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
* Quirk: with multiqueue, QEMU 7.2 has one vhost_dev per queue pair on the one vhost-user
  connection, and each sends ADD_MEM_REG for the same guest RAM (later QEMU sends it once): the
  back-end must map it once and count it, or the second pair fails to start.
* Quirk: Debian's root filesystem may have no ``ping`` (iputils): the guest uses the static
  busybox the VM harness needs anyway.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
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
from helpers.guest_output import HELPERS, guest_steps
from helpers.net_backend import net_backend
from helpers.netns import SO_RCVBUFFORCE, NetNs

from vhostkit.devices.net import NetDevice
from vhostkit.testing import kernel_vm
from vhostkit.testing.peers import which_or_skip
from vhostkit.user.backend.device import VringInfo
from vhostkit.user.backend.ring_device import ActiveRing
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.net import GsoType, NetHdrFlag, VirtioNetHdr

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(os.geteuid() != 0, reason="taps and namespaces need root"),
]

log = logging.getLogger(__name__)

GUEST_SCRIPT = HELPERS / "guest_netcheck.py"
HOST_IP = "10.203.0.1"
GUEST_IP = "10.203.0.2"
GUEST_MAC = "52:54:00:12:34:99"
UP_PORT = 5201
DOWN_PORT = 5202
ECHO_PORT = 5203
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
    """A NetDevice that keeps what the device itself forgets when QEMU disconnects (which it
    does when the VM powers off):

    * :attr:`feature_sets`: every feature set it applied (SET_FEATURES that succeeded);
    * :attr:`events`: the ring life cycle, in order: ``("start", ring, enabled)`` when a ring
      starts (its worker runs), ``("enable", ring, bool)`` for each SET_VRING_ENABLE,
      ``("stop", ring, None)`` for GET_VRING_BASE of a started ring, and
      ``("queue_num", None, answer)`` for GET_QUEUE_NUM;
    * :attr:`ring_frames`: frames per ring index (TX: written to the tap; RX: put in the
      driver's buffers). NetDevice only has device-wide counters; each ring has its own worker
      thread, so an increment is credited to the ring whose :meth:`process` runs in the
      incrementing thread.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._tx_total = self._rx_total = 0
        self._current = threading.local()
        self.ring_frames: collections.Counter[int] = collections.Counter()
        self.feature_sets: list[int] = []
        self.events: list[tuple[str, int | None, object]] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.feature_sets.append(features)

    def get_queue_num(self) -> int:
        answer = super().get_queue_num()
        self.events.append(("queue_num", None, answer))
        return answer

    def ring_started(self, ring: VringInfo) -> None:
        self.events.append(("start", ring.index, ring.enabled))
        super().ring_started(ring)

    def ring_stopped(self, ring: VringInfo) -> int:
        if ring.index in self.active:
            self.events.append(("stop", ring.index, None))
        return super().ring_stopped(ring)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.events.append(("enable", index, enable))
        super().set_vring_enable(index, enable)

    def process(self, ring: ActiveRing) -> bool | None:
        self._current.ring = ring.index
        try:
            return super().process(ring)
        finally:
            self._current.ring = None

    def _credit(self, frames: int) -> None:
        ring = getattr(self._current, "ring", None)
        if ring is not None and frames > 0:
            self.ring_frames[ring] += frames

    # NetDevice counts with ``self.tx_frames += n`` (under its stats lock) in the ring's worker

    @property
    def tx_frames(self) -> int:
        return self._tx_total

    @tx_frames.setter
    def tx_frames(self, value: int) -> None:
        self._credit(value - self._tx_total)
        self._tx_total = value

    @property
    def rx_frames(self) -> int:
        return self._rx_total

    @rx_frames.setter
    def rx_frames(self, value: int) -> None:
        self._credit(value - self._rx_total)
        self._rx_total = value


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
    """Two TCP listeners at ``address`` in ``ns``, ``len(downloads)`` connections each, every
    connection served by a thread of its own (parallel flows move data at once):

    * ``up_port``: reads until EOF, answers ``<count> <sha256>\\n`` and closes (:attr:`uploads`
      gets ``(count, sha256)``);
    * ``down_port``: the *k*-th connection accepted gets ``downloads[k]``, then the peer closes
      it (:attr:`downloads_sent` gets its size).

    :meth:`close` wakes a thread still waiting in ``accept`` (``shutdown`` of a listening
    socket makes Linux's accept fail) or on a connection (shut down too: a guest that
    powered off never closes its end), and joins them all.
    """

    def __init__(
        self, ns: NetNs, address: str, up_port: int, down_port: int, downloads: list[bytes]
    ) -> None:
        self.downloads = downloads
        self.uploads: list[tuple[int, str]] = []
        self.downloads_sent: list[int] = []
        self.errors: list[BaseException] = []
        self._closing = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._servers: list[threading.Thread] = []
        self.listeners: list[socket.socket] = []
        try:
            for port in (up_port, down_port):
                s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.listeners.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                s.listen(len(downloads))
        except BaseException:
            for s in self.listeners:
                s.close()
            raise
        self._acceptors = [
            threading.Thread(target=self._accept, args=(s, fn), name=name, daemon=True)
            for s, fn, name in (
                (self.listeners[0], self._receive, "tcp-upload"),
                (self.listeners[1], self._send, "tcp-download"),
            )
        ]
        for t in self._acceptors:
            t.start()

    def _accept(self, listener: socket.socket, fn: Callable[[socket.socket, int], None]) -> None:
        try:
            for k in range(len(self.downloads)):
                conn, _ = listener.accept()
                with self._lock:
                    if self._closing:
                        conn.close()
                        return
                    self._conns.append(conn)
                    t = threading.Thread(
                        target=self._serve,
                        args=(conn, fn, k),
                        name=f"{fn.__name__}-{k}",
                        daemon=True,
                    )
                    self._servers.append(t)
                t.start()
        except OSError as exc:
            if not self._closing:
                self.errors.append(exc)

    def _serve(self, conn: socket.socket, fn: Callable[[socket.socket, int], None], k: int) -> None:
        try:
            with conn:
                conn.settimeout(60)
                fn(conn, k)
        except OSError as exc:
            if not self._closing:
                self.errors.append(exc)

    def _receive(self, conn: socket.socket, k: int) -> None:
        h = hashlib.sha256()
        count = 0
        buf = bytearray(1 << 20)
        while n := conn.recv_into(buf):
            h.update(memoryview(buf)[:n])
            count += n
        self.uploads.append((count, h.hexdigest()))
        conn.sendall(f"{count} {h.hexdigest()}\n".encode())

    def _send(self, conn: socket.socket, k: int) -> None:
        conn.sendall(self.downloads[k])
        self.downloads_sent.append(len(self.downloads[k]))

    def join(self, timeout: float) -> None:
        """Wait for every connection to be served (the guest waited for all of them)."""
        for t in self._acceptors:
            t.join(timeout)
        with self._lock:
            servers = list(self._servers)
        for t in servers:
            t.join(timeout)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            conns, servers = list(self._conns), list(self._servers)
        for s in [*self.listeners, *conns]:
            with contextlib.suppress(OSError):  # also: already closed by its thread
                s.shutdown(socket.SHUT_RDWR)
        for t in [*self._acceptors, *servers]:
            t.join(10)
        for s in self.listeners:
            s.close()
        stuck = [t.name for t in [*self._acceptors, *servers] if t.is_alive()]
        assert not stuck, f"TCP peer threads stuck: {stuck}"

    def __enter__(self) -> NamespaceTcpPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NamespaceUdpEcho:
    """A UDP echo server at ``address:port`` in ``ns``, served by a thread: every datagram
    goes back to its sender (:attr:`echoed` counts them). :meth:`close` wakes the thread
    through a pipe, joins it and closes the socket."""

    def __init__(self, ns: NetNs, address: str, port: int) -> None:
        self.echoed = 0
        self.errors: list[BaseException] = []
        self.sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((address, port))
            self.sock.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self.sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="udp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while self._wake_r not in dict(poller.poll()):
                while True:
                    try:
                        data, addr = self.sock.recvfrom(2048)
                    except BlockingIOError:
                        break
                    self.sock.sendto(data, addr)
                    self.echoed += 1
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        assert not self._thread.is_alive(), "the UDP echo thread is stuck"

    def __enter__(self) -> NamespaceUdpEcho:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the test ----------------------------------------------------------------------------------


@dataclass
class GuestRun:
    """Everything one VM boot showed, gathered before any assertion."""

    result: kernel_vm.VmResult
    seconds: float
    steps: dict[str, list[dict[str, object]]]
    feature_sets: list[int]
    events: list[tuple[str, int | None, object]]
    ring_frames: dict[int, int]
    tx_frames: int
    rx_frames: int
    tx_dropped: int
    rx_dropped: int
    from_guest: Direction
    to_guest: Direction
    sniffer_errors: list[BaseException]
    uploads: list[tuple[int, str]]
    downloads_sent: list[int]
    peer_errors: list[BaseException]
    echoed: int
    #: requests the back-end failed (QEMU asks for no reply to most: only this shows them)
    request_errors: list[BaseException]


def run_guest_check(
    sock_dir: Path,
    downloads: list[bytes],
    *,
    machine: str | None = None,
    device_args: str = "",
    queue_pairs: int = 1,
    upload_bytes: int = TRANSFER,
    echo_rounds: int = 0,
) -> GuestRun:
    """Boot the VM once with the device on a fresh back-end, run the guest script, gather.

    One download per item of ``downloads``: more than one runs that many flows each way in
    parallel (``--flows``; upload *i* is ``upload_bytes`` seeded by ``SEED + i``).
    ``queue_pairs``: the device's, the tap's and QEMU's (``queues=``, ``mq=on``).
    ``echo_rounds``: the guest first exchanges that many datagrams, from each of its CPUs,
    with a UDP echo server in the namespace.

    Leaving :func:`net_backend` checks that the listener had no error and rejected no
    front-end, and that no namespace or tap is left behind.
    """
    t0 = time.monotonic()
    sock = sock_dir / "net.sock"
    with (
        net_backend(
            sock,
            address=HOST_IP,
            mac=GUEST_MAC,
            device_type=RecordingNetDevice,
            queue_pairs=queue_pairs,
        ) as rig,
        contextlib.ExitStack() as stack,
    ):
        sniffer = stack.enter_context(TapSniffer(rig.ns, rig.tap.name))
        peer = stack.enter_context(NamespaceTcpPeer(rig.ns, HOST_IP, UP_PORT, DOWN_PORT, downloads))
        echo = stack.enter_context(NamespaceUdpEcho(rig.ns, HOST_IP, ECHO_PORT))
        guest_argv = [
            "python3", str(GUEST_SCRIPT), "--address", f"{GUEST_IP}/24", "--host", HOST_IP,
            "--up-port", str(UP_PORT), "--down-port", str(DOWN_PORT),
            "--bytes", str(upload_bytes), "--seed", str(SEED), "--flows", str(len(downloads)),
        ]  # fmt: skip
        if echo_rounds:
            guest_argv += ["--echo-port", str(ECHO_PORT), "--echo-rounds", str(echo_rounds)]
        result = kernel_vm.run_in_vm(
            guest_argv,
            timeout=60,
            machine=machine,
            memory_mb=512,
            extra_qemu_args=kernel_vm.vhost_user_net_args(
                sock, mac=GUEST_MAC, device_args=device_args, queue_pairs=queue_pairs
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
            events=list(device.events),
            ring_frames=dict(device.ring_frames),
            tx_frames=device.tx_frames,
            rx_frames=device.rx_frames,
            tx_dropped=device.tx_dropped,
            rx_dropped=device.rx_dropped,
            from_guest=sniffer.from_guest,
            to_guest=sniffer.to_guest,
            sniffer_errors=sniffer.errors,
            uploads=list(peer.uploads),
            downloads_sent=list(peer.downloads_sent),
            peer_errors=[*peer.errors, *echo.errors],
            echoed=echo.echoed,
            # live connections first: one that finishes meanwhile is then in request_errors
            request_errors=[
                *(s.last_error for s in list(rig.listener.servers) if s.last_error),
                *rig.listener.request_errors,
            ],
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
    run = run_guest_check(sock_dir, [download], device_args="packed=on" if packed else "")
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
    assert run.uploads == [(TRANSFER, upload_sha)]
    (down,) = steps["download"]
    assert run.downloads_sent == [TRANSFER]
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
    run = run_guest_check(sock_dir, [download], device_args="csum=off,guest_csum=off")
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


#: The multiqueue test: parallel TCP flows each way, the bytes of each, UDP echo rounds per CPU.
MQ_FLOWS = 4
MQ_FLOW_BYTES = 2 << 20
ECHO_ROUNDS = 4


def enabled_while_started(events: list[tuple[str, int | None, object]]) -> set[int]:
    """The rings that were, at some point, both started and enabled (so served)."""
    started: set[int] = set()
    enabled: set[int] = set()
    served: set[int] = set()
    for what, ring, value in events:
        if ring is None:
            continue
        if what == "start":
            started.add(ring)
            if value:
                enabled.add(ring)
        elif what == "stop":
            started.discard(ring)
        elif what == "enable":
            (enabled.add if value else enabled.discard)(ring)
        if ring in started and ring in enabled:
            served.add(ring)
    return served


def test_linux_guest_uses_two_queue_pairs(fd_check, sock_dir):
    """Multiqueue: ``NetDevice(tap, queue_pairs=2)`` on a two-queue tap, QEMU told
    ``queues=2`` on the netdev and ``mq=on`` on the device. The guest has 2 vCPUs, so Linux
    enables both pairs (min(max_virtqueue_pairs, online CPUs)).

    What the back-end sees (QEMU 7.2, Linux 6.1): GET_QUEUE_NUM (2 pairs; QEMU refuses to
    start with fewer than ``queues=``); SET_VRING_ENABLE for all four rings before any
    starts (pair 0 on, pair 1 off: QEMU's current pair count is 1 until the driver says
    otherwise); at DRIVER_OK all four rings start, pair 1 still disabled; then the driver's
    VIRTIO_NET_CTRL_MQ command (QEMU handles the control queue itself) makes QEMU send
    SET_VRING_ENABLE(on) for all four. At power-off GET_VRING_BASE stops all four. QEMU 7.2
    has one vhost_dev per queue pair on the one connection, and each sends ADD_MEM_REG for
    the same guest RAM (the back-end maps it once and counts it).

    Traffic: the guest first exchanges :data:`ECHO_ROUNDS` UDP datagrams with an echo server
    in the namespace from each CPU (a thread pinned to it), then runs :data:`MQ_FLOWS` TCP
    uploads and as many downloads at once, thread *i* pinned to CPU *i* mod 2. Every ring
    must carry frames, and here is why that is deterministic:

    * TX: virtio_net maps CPU *k* to TX queue *k* (XPS; the guest reports the masks), so the
      echo datagrams of CPU *k* leave through TX ring ``2k+1``: at least ECHO_ROUNDS frames.
    * RX: the tap steers a frame toward the guest to the queue its flow was last seen
      coming *from* (tun's flow table, learned from the frames the device writes into tap
      queue *k*), and an unknown flow by its hash. The tap learns a frame's flow only after
      handing it to the namespace's stack, so an answer sent at once (the first echo reply,
      a SYN-ACK) may still go by hash; every later echo reply of CPU *k* goes to tap queue
      *k*, which RX ring ``2k`` reads: at least ECHO_ROUNDS - 1 frames.

    The TCP flows spread over both pairs too, but not in a fixed way: Linux sends ACKs, and
    data when ACKs open the window, from the softirq of the CPU that took the interrupt,
    re-picking the TX queue whenever nothing is in flight, and the tap follows. So most of
    the data goes through one pair (pair 0 on q35, whose INTx lands on CPU 0; pair 1 on
    microvm): not asserted. The transfers' sha256 are, as in the single-queue test.
    """
    which_or_skip("qemu-system-x86_64")
    pairs = 2
    downloads = [random.Random(SEED + 100 + i).randbytes(MQ_FLOW_BYTES) for i in range(MQ_FLOWS)]
    upload_shas = [
        hashlib.sha256(random.Random(SEED + i).randbytes(MQ_FLOW_BYTES)).hexdigest()
        for i in range(MQ_FLOWS)
    ]
    run = run_guest_check(
        sock_dir,
        downloads,
        queue_pairs=pairs,
        upload_bytes=MQ_FLOW_BYTES,
        echo_rounds=ECHO_ROUNDS,
    )
    result, steps = run.result, run.steps
    context = f"guest exit {result.returncode} on {result.machine}; output:\n{result.output}"
    assert result.returncode == 0, context

    # the guest: MQ (and the control queue it needs) acked, both pairs in use, XPS CPU k -> k
    (link,) = steps["link"]
    guest_features = sum(1 << i for i, bit in enumerate(str(link["features"])) if bit == "1")
    assert guest_features & NF.MQ and guest_features & NF.CTRL_VQ, context
    assert link["queues"] == ["rx-0", "rx-1", "tx-0", "tx-1"], context
    assert link["xps_cpus"] == {f"tx-{k}": f"{1 << k:x}" for k in range(pairs)}, context

    # the back-end: no request failed (ADD_MEM_REG of the second pair's vhost_dev did
    # before), MQ acked, GET_QUEUE_NUM answered in pairs, all four rings started and enabled
    assert not run.request_errors, run.request_errors
    acked = run.feature_sets[-1]
    assert acked & NF.MQ and acked & REQUIRED_FEATURES == REQUIRED_FEATURES, f"{acked:#x}"
    assert ("queue_num", None, pairs) in run.events, run.events
    assert {r for what, r, _ in run.events if what == "start"} == set(range(2 * pairs))
    assert enabled_while_started(run.events) == set(range(2 * pairs)), run.events

    # ping, then the echo from each CPU: every request answered
    assert [p["size"] for p in steps["ping"]] == [1472, 56], context
    for p in steps["ping"]:
        assert p["received"] == p["sent"] > 0, context
    assert sorted(e["cpu"] for e in steps["echo"]) == list(range(pairs)), context
    assert run.echoed == pairs * ECHO_ROUNDS

    # every flow's data, both ways, checked by sha256 on the receiving side
    ups = sorted(steps["upload"], key=lambda u: int(u["flow"]))  # type: ignore[call-overload]
    assert [u["flow"] for u in ups] == list(range(MQ_FLOWS)), context
    assert [u["cpu"] for u in ups] == [i % pairs for i in range(MQ_FLOWS)], context
    for u, sha in zip(ups, upload_shas, strict=True):
        assert u["sent"] == MQ_FLOW_BYTES and u["sent_sha256"] == sha, context
        assert (u["host_received"], u["host_sha256"]) == (MQ_FLOW_BYTES, sha), context
    assert sorted(run.uploads) == sorted((MQ_FLOW_BYTES, sha) for sha in upload_shas)
    downs = steps["download"]
    assert run.downloads_sent == [MQ_FLOW_BYTES] * MQ_FLOWS
    assert all(d["received"] == MQ_FLOW_BYTES for d in downs), context
    assert sorted(str(d["sha256"]) for d in downs) == sorted(
        hashlib.sha256(d).hexdigest() for d in downloads
    ), context
    assert not run.peer_errors, run.peer_errors

    # every ring moved frames (the per-ring counts add up to the device's counters), and
    # none was dropped
    frames = {r: run.ring_frames.get(r, 0) for r in range(2 * pairs)}
    summary = f"frames per ring {frames}"
    for k in range(pairs):
        assert frames[2 * k + 1] >= ECHO_ROUNDS, summary
        assert frames[2 * k] >= ECHO_ROUNDS - 1, summary
    assert sum(frames[2 * k + 1] for k in range(pairs)) == run.tx_frames, summary
    assert sum(frames[2 * k] for k in range(pairs)) == run.rx_frames, summary
    assert not run.sniffer_errors, run.sniffer_errors
    assert run.tx_frames >= run.from_guest.frames > 0, (run.tx_frames, run.from_guest)
    assert run.tx_dropped == 0 and run.rx_dropped == 0, (run.tx_dropped, run.rx_dropped)
    (guest_stats,) = steps["stats"]
    assert guest_stats["rx_dropped"] == 0 and guest_stats["tx_dropped"] == 0, guest_stats
    log.info("multiqueue on %s: %s", result.machine, summary)
