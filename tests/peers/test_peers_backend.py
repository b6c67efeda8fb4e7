"""vhostkit's back-end (:class:`BackendDevice`) driven by real vhost-user front-ends.

* DPDK ``dpdk-testpmd`` with the virtio_user PMD (``net_virtio_user0``) in ``txonly`` mode: it
  negotiates, maps nothing of ours (it hands us *its* memory), sets up both rings and starts
  filling the TX ring with 64-byte frames.
* ``qemu-system-x86_64`` with ``virtio-net-pci`` on ``-netdev vhost-user`` and no guest kernel:
  the iPXE option ROM drives the device to DRIVER_OK and sends DHCP frames through the TX ring.

Both are run in both connection directions: the back-end listens (:class:`BackendListener`)
and the peer connects, or the peer listens (testpmd ``server=1``, QEMU ``server=on``) and the
back-end connects (:func:`serve_client`).

The device has no ring worker: the tests look at the rings in the shared memory themselves.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from vhostkit.backend import MemoryRegion
from vhostkit.testing.peers import QemuVirtioNet, Testpmd, which_or_skip
from vhostkit.user import BackendDevice, BackendListener, ProtocolFeature, serve_client
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature

pytestmark = pytest.mark.peer

P = ProtocolFeature
VF = VirtioFeature
NF = VirtioNetFeature
RX, TX = 0, 1

#: virtio-net features our device offers: what a virtio_user / iPXE driver looks for.
NET_FEATURES = int(VF.VERSION_1 | NF.MAC | NF.MRG_RXBUF | NF.STATUS)
MAC = bytes.fromhex("525400123456")
#: struct virtio_net_config: mac, status (LINK_UP), max_virtqueue_pairs, mtu.
NET_CONFIG = MAC + struct.pack("<HHH", 1, 1, 1500)
DRIVER_OK_ALL = int(
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)


class NetDevice(BackendDevice):
    """A virtio-net shaped :class:`BackendDevice` that records how its memory table arrived."""

    def __init__(self, protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        super().__init__(
            features=NET_FEATURES,
            protocol_features=protocol_features,
            num_queues=2,
            config=NET_CONFIG,
        )
        self.memory_requests: list[str] = []

    def set_mem_table(self, regions: tuple[MemoryRegion, ...]) -> None:
        self.memory_requests.append(f"SET_MEM_TABLE x{len(regions)}")
        super().set_mem_table(regions)

    def add_mem_region(self, region: MemoryRegion) -> None:
        self.memory_requests.append("ADD_MEM_REG")
        super().add_mem_region(region)


def net_device(protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> NetDevice:
    return NetDevice(protocol_features)


def wait_avail(
    device: BackendDevice, index: int, done: Callable[[int], bool], timeout: float = 15.0
) -> int:
    """Wait until ``done(avail->idx)`` holds for the driver's avail index of ring ``index``.

    The avail index is written by the peer straight into shared memory: no vhost-user message
    and no device event says it moved (the kick eventfd does, but it belongs to the device).
    So this is a bounded polling loop with a deadline, sleeping on ``device.changed`` between
    reads (it also wakes early on any request the peer sends).
    """
    deadline = time.monotonic() + timeout
    while not done(idx := device.avail_idx(index)):
        if time.monotonic() > deadline:
            pytest.fail(f"ring {index}: avail idx stuck at {idx} for {timeout}s")
        with device.changed:
            device.changed.wait(0.02)
    return idx


class ClientThread:
    """:func:`serve_client` in a thread: the back-end connects to a listening front-end."""

    def __init__(self, path: Path, device: BackendDevice) -> None:
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(path, device), daemon=True)
        self.thread.start()

    def _run(self, path: Path, device: BackendDevice) -> None:
        try:
            serve_client(path, device, connect_timeout=10)
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        """Called once the front-end is gone (its disconnect ends :func:`serve_client`)."""
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_client did not return after the peer left"
        assert not self.errors, self.errors


def serve(
    stack: ExitStack, path: Path, device: BackendDevice, backend_listens: bool
) -> Callable[[], None]:
    """Serve ``device`` at ``path`` (listening, or connecting once the peer listens).

    Returns the function that starts the connecting side; with a listener it does nothing.
    Cleanup is registered on ``stack`` (runs after the peer, entered later, was stopped).
    """
    if backend_listens:
        listener = BackendListener(path, lambda: device, max_connections=1).start()

        def stop_listener() -> None:
            listener.stop()
            assert not listener.errors, listener.errors
            assert not listener.rejected, listener.rejected

        stack.callback(stop_listener)
        return lambda: None

    clients: list[ClientThread] = []

    def connect() -> None:
        clients.append(ClientThread(path, device))

    def join() -> None:
        for c in clients:
            c.join()

    stack.callback(join)
    return connect


# --- dpdk-testpmd, virtio_user --------------------------------------------------------------


@pytest.mark.parametrize("backend_listens", [True, False], ids=["backend-listens", "server=1"])
def test_testpmd_virtio_user_drives_backend(fd_check, sock_dir, backend_listens):
    which_or_skip("dpdk-testpmd")
    path = sock_dir / "be.sock"
    device = net_device()
    with ExitStack() as stack:
        stack.callback(device.close)
        connect = serve(stack, path, device, backend_listens)
        pmd = stack.enter_context(
            Testpmd.virtio_user_frontend(path, server=not backend_listens, forward_mode="txonly")
        )
        connect()
        pmd.wait_forwarding()
        # testpmd sends SET_STATUS 0xf last, after both rings are set and enabled.
        device.wait_for(lambda: device.status == DRIVER_OK_ALL, timeout=15)

        assert device.owner
        assert device.acked_features & VF.VERSION_1
        assert device.acked_features & VF.PROTOCOL_FEATURES
        # virtio_user (DPDK 22.11) acks only MQ, REPLY_ACK and STATUS of what we offer: no
        # CONFIG, so it never reads our MAC ("No valid MAC ... use random").
        assert device.acked_protocol_features == P.MQ | P.REPLY_ACK | P.STATUS
        # Its memory: one region of the EAL's 512 MiB (--no-huge -m 512), gpa == its uva.
        assert device.memory is not None
        (region,) = device.memory.regions
        assert region.guest_phys_addr == region.userspace_addr
        assert region.memory_size == 512 << 20
        for ring in device.vrings:
            assert ring.num == 256 and ring.addr is not None
            assert ring.started and ring.enabled and ring.kick_fd is not None
            assert ring.call_fd is not None
            # the ring addresses are testpmd's addresses, inside the memory it gave us
            device.memory.uva_view(ring.addr.desc, 16 * ring.num)
        # txonly: testpmd fills the TX ring (nothing consumes it: it stops at the ring size,
        # maybe before this looks, so compare with where the ring started, not a later read).
        base = device.vrings[TX].base
        after = wait_avail(device, TX, lambda idx: idx != base)
        assert 0 < (after - base) % 65536 <= 256
        stats = pmd.port_stats(0)
        assert stats.tx_packets > 0
        assert stats.rx_packets == 0
    # testpmd left cleanly on `quit`: rings disabled and stopped (GET_VRING_BASE), then closed
    assert pmd.returncode == 0


# --- QEMU, virtio-net-pci, iPXE -------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend_listens", "mem_slots"),
    [(True, True), (False, False)],
    ids=["backend-listens-add-mem-reg", "server=on-set-mem-table"],
)
def test_qemu_virtio_net_drives_backend(fd_check, sock_dir, backend_listens, mem_slots):
    """QEMU + iPXE against our back-end, in both connection directions.

    Quirk: QEMU 7.2 hands over guest memory with one ADD_MEM_REG per region when the back-end
    offers CONFIGURE_MEM_SLOTS, and with one SET_MEM_TABLE otherwise: both paths are covered.
    """
    which_or_skip("qemu-system-x86_64")
    path = sock_dir / "net.sock"
    # Quirk: QEMU's vhost-user virtio-net warns "vhost-user backend supports
    # VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not": a net back-end should not offer CONFIG.
    protocol = DEFAULT_PROTOCOL_FEATURES & ~P.CONFIG
    if not mem_slots:
        protocol &= ~P.CONFIGURE_MEM_SLOTS
    device = net_device(protocol)
    with ExitStack() as stack:
        stack.callback(device.close)
        connect = serve(stack, path, device, backend_listens)
        qemu = stack.enter_context(QemuVirtioNet(path, server=not backend_listens))
        connect()
        # iPXE brings the device to DRIVER_OK 2-3 s after start (TCG).
        device.wait_for(
            lambda: (
                bool(device.status & DeviceStatus.DRIVER_OK)
                and all(r.started and r.enabled for r in device.vrings)
            ),
            timeout=25,
        )
        assert qemu.qmp("query-status")["status"] == "running"  # type: ignore[index]

        assert device.acked_features & VF.VERSION_1
        assert not device.acked_protocol_features & P.CONFIG
        # QEMU's q35 RAM below 4 GiB as two regions of the same memfd, around the legacy VGA
        # and ROM hole: gpa 0 size 0xa0000, and gpa 0xc0000 at mmap_offset 0xc0000.
        assert device.memory is not None
        low, high = device.memory.regions
        if mem_slots:
            assert device.memory_requests == ["ADD_MEM_REG", "ADD_MEM_REG"]
        else:
            assert device.memory_requests == ["SET_MEM_TABLE x2"]
        assert (low.guest_phys_addr, low.memory_size, low.mmap_offset) == (0, 0xA0000, 0)
        assert (high.guest_phys_addr, high.mmap_offset) == (0xC0000, 0xC0000)
        assert high.guest_end == 256 << 20
        for ring in device.vrings:
            assert ring.num == 256 and ring.addr is not None and ring.kick_fd is not None
            # ring addresses are QEMU's virtual addresses of guest memory
            device.memory.uva_to_gpa(ring.addr.desc)
        # iPXE posts receive buffers, and queues DHCP frames on the TX ring.
        wait_avail(device, RX, lambda idx: idx > 0)
        wait_avail(device, TX, lambda idx: idx > 0)  # iPXE gives up sending after a while
        assert "PROTOCOL_F_CONFIG" not in qemu.output
    assert qemu.returncode == 0  # SIGINT: QEMU shuts down cleanly
