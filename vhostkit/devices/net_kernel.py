"""A vhost-user net back-end whose rings are served by kernel vhost-net, not by Python.

:class:`KernelNetDevice` speaks vhost-user to any front-end (QEMU, cloud-hypervisor, DPDK
virtio_user, vhostkit's own :class:`~vhostkit.user.Frontend`) like
:class:`~vhostkit.devices.net.NetDevice`, but instead of ring workers it hands the rings to
``/dev/vhost-net``, one vhost-net fd per queue pair, each attached to one queue of the tap:

* memory: the front-end's regions are mapped by :class:`BackendDevice` as usual; the kernel's
  memory table maps the same guest-physical ranges to *this process's* mappings
  (:func:`kernel_memory_table`). Every change (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) is
  pushed to the kernel, and the ring addresses are set again, before the old mappings may go
  away (they are pinned until then), so the kernel never sees an address that is not guest
  memory;
* rings: the front-end sends ring addresses in *its* address space; they are translated to
  this process's mapping (:func:`kernel_vring_addr`, bounds-checked). Size, position,
  addresses, and the front-end's kick, call and error eventfds are given to the kernel
  unchanged (the kernel takes its own reference; the device keeps and closes its copies);
* enable: a ring is attached to its tap queue (``VHOST_NET_SET_BACKEND``) while it is started
  and enabled, and detached otherwise. Detaching is what stops the kernel (its
  ``GET_VRING_BASE`` alone does not), so ``GET_VRING_BASE`` detaches, then reads the position;
* features: what the kernel offers (``VHOST_GET_FEATURES``, queried when the device is made)
  for the ring, intersected with what the device can honestly do, plus the net offloads the
  tap accepts (:func:`kernel_net_features`). The header is the tap's (``TUNSETVNETHDRSZ`` 10,
  or 12 with VERSION_1 or MRG_RXBUF); ``VHOST_NET_F_VIRTIO_NET_HDR`` is never asked of the
  kernel. The tap's offloads follow the guest offloads acked, as for NetDevice;
* multi-queue: pair *i* is vhost-net fd *i* on tap queue *i*; a tap queue is detached from the
  tap (TUNSETQUEUE) while both rings of its pair are disabled.

No Python runs per packet. Not offered: dirty logging (LOG_ALL, LOG_SHMFD), inflight tracking,
packed rings, polling-mode kicks (the kernel needs a kick eventfd).

For a live swap to another data plane (:mod:`vhostkit.devices.net_swap`),
:meth:`KernelNetDevice.take_rings` stops the kernel and returns every running ring's position,
the rings staying started for the front-end; :meth:`KernelNetDevice.give_rings` hands
positions back and restarts them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Iterable, Sequence

from vhostkit.devices.net import TapQueues
from vhostkit.errors import (
    GuestMemoryError,
    InvalidOperation,
    InvalidParam,
    Unsupported,
    VhostError,
)
from vhostkit.kernel.ioctls import TunFlags, TunOffload
from vhostkit.kernel.net import VhostNet
from vhostkit.kernel.tap import Tap, offload_for_features
from vhostkit.types import VHOST_VRING_F_LOG, MemoryRegion, VringAddr, VringState
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES, BackendDevice, VringInfo
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.net import header_size

__all__ = [
    "KERNEL_NET_PROTOCOL_FEATURES",
    "KERNEL_RING_FEATURES",
    "WANTED_KERNEL_NET_FEATURES",
    "KernelNetDevice",
    "kernel_memory_table",
    "kernel_net_features",
    "kernel_vring_addr",
    "probe_tap_offloads",
]

log = logging.getLogger(__name__)

VF = VirtioFeature
NF = VirtioNetFeature

#: Ring and transport features passed through to the kernel when it offers them. Not here:
#: LOG_ALL (no dirty logging), ACCESS_PLATFORM (no IOTLB), ANY_LAYOUT (the same bit as
#: VHOST_NET_F_VIRTIO_NET_HDR: the tap provides the header), RING_PACKED (not served here),
#: NOTIFY_ON_EMPTY (legacy).
KERNEL_RING_FEATURES = int(VF.VERSION_1 | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC | NF.MRG_RXBUF)

#: Served by the back-end itself (config space): no kernel support needed.
_CONFIG_FEATURES = int(NF.MAC | NF.MTU | NF.STATUS)
#: Guest to tap: a tap with a vnet header takes partial checksums and GSO frames.
_HOST_OFFLOADS = int(NF.CSUM | NF.HOST_TSO4 | NF.HOST_TSO6 | NF.HOST_ECN)
#: Tap to guest: each needs the tap to accept the matching TUNSETOFFLOAD flags.
_GUEST_OFFLOADS = (
    (int(NF.GUEST_CSUM), TunOffload.CSUM),
    (int(NF.GUEST_TSO4), TunOffload.CSUM | TunOffload.TSO4),
    (int(NF.GUEST_TSO6), TunOffload.CSUM | TunOffload.TSO6),
    (int(NF.GUEST_ECN), TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO_ECN),
)

#: What the device offers at most (then cut down to the kernel's and the tap's abilities).
WANTED_KERNEL_NET_FEATURES = (
    KERNEL_RING_FEATURES
    | _CONFIG_FEATURES
    | _HOST_OFFLOADS
    | int(NF.GUEST_CSUM | NF.GUEST_TSO4 | NF.GUEST_TSO6 | NF.GUEST_ECN)
)

#: The generic protocol features minus what the kernel cannot do here (LOG_SHMFD: no dirty
#: logging; INFLIGHT_SHMFD: the kernel keeps no inflight record; CONFIG: as NetDevice), plus
#: the net ones.
KERNEL_NET_PROTOCOL_FEATURES = int(
    (
        DEFAULT_PROTOCOL_FEATURES
        & ~ProtocolFeature.CONFIG
        & ~ProtocolFeature.LOG_SHMFD
        & ~ProtocolFeature.INFLIGHT_SHMFD
    )
    | ProtocolFeature.MQ
    | ProtocolFeature.MTU
    | ProtocolFeature.RARP
)

_PROTOCOL_FEATURES_BIT = int(VHOST_USER_F_PROTOCOL_FEATURES)


# --- the pure parts: features, addresses --------------------------------------------------------


def kernel_net_features(
    kernel_features: int,
    tap_offloads: TunOffload,
    *,
    wanted: int = WANTED_KERNEL_NET_FEATURES,
    queue_pairs: int = 1,
) -> int:
    """The virtio features a kernel-served net device may offer.

    ``kernel_features``: what ``/dev/vhost-net`` offers (``VHOST_GET_FEATURES``);
    ``tap_offloads``: the ``TUNSETOFFLOAD`` flags the tap accepts (:func:`probe_tap_offloads`);
    ``wanted``: the most the caller wants offered. Ring features come only from the kernel;
    config-space features from the device; guest-bound offloads only where the tap can hand
    them over, and only with their prerequisites (GUEST_TSO4/6 need GUEST_CSUM, GUEST_ECN a
    GUEST_TSO; HOST_TSO4/6 need CSUM, HOST_ECN a HOST_TSO). MQ with more than one pair.
    """
    offered = wanted & kernel_features & KERNEL_RING_FEATURES
    offered |= wanted & _CONFIG_FEATURES
    host = wanted & _HOST_OFFLOADS
    if not host & NF.CSUM:
        host = 0
    elif not host & (NF.HOST_TSO4 | NF.HOST_TSO6):
        host &= ~int(NF.HOST_ECN)
    offered |= host
    guest = 0
    for bit, needs in _GUEST_OFFLOADS:
        if wanted & bit and needs & tap_offloads == needs:
            guest |= bit
    if not guest & NF.GUEST_CSUM:
        guest = 0
    elif not guest & (NF.GUEST_TSO4 | NF.GUEST_TSO6):
        guest &= ~int(NF.GUEST_ECN)
    offered |= guest
    if queue_pairs > 1:
        offered |= int(NF.MQ)
    return offered


def probe_tap_offloads(tap: Tap) -> TunOffload:
    """The guest-bound offload flags ``tap`` accepts (``TUNSETOFFLOAD`` tried one set at a time;
    the tun driver answers EINVAL to what it does not know). Leaves the tap with none."""
    accepted = TunOffload(0)
    for flags in (
        TunOffload.CSUM,
        TunOffload.CSUM | TunOffload.TSO4,
        TunOffload.CSUM | TunOffload.TSO6,
        TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO_ECN,
    ):
        try:
            tap.set_offload(flags)
        except InvalidParam:
            continue
        accepted |= flags
    tap.set_offload(0)
    return accepted


def _address_of(view: memoryview) -> int:
    """Where the first byte of ``view`` (a writable view of a mapping) is in this process."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def kernel_memory_table(memory: GuestMemory) -> list[MemoryRegion]:
    """The kernel's memory table for ``memory`` (mapped from a front-end's table): the same
    guest-physical ranges, with ``userspace_addr`` this process's mapping of each."""
    table: list[MemoryRegion] = []
    for region in memory.regions:
        view = memory.gpa_view(region.guest_phys_addr, region.memory_size)
        table.append(MemoryRegion(region.guest_phys_addr, region.memory_size, _address_of(view)))
    return table


def split_ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, avail ring and used ring (with event idx)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


def kernel_vring_addr(memory: GuestMemory, addr: VringAddr, num: int) -> VringAddr:
    """``addr`` (front-end virtual addresses, as vhost-user sends them) translated to this
    process's mapping of the same guest memory, each part of a ``num``-entry split ring checked
    to lie inside one region. Raises :class:`GuestMemoryError` otherwise."""
    if addr.flags & VHOST_VRING_F_LOG:
        raise InvalidParam(f"ring {addr.index}: used-ring logging asked for, but not offered")
    if num <= 0:
        raise InvalidOperation(f"ring {addr.index}: no ring size yet (SET_VRING_NUM first)")
    local: dict[str, int] = {}
    desc_len, avail_len, used_len = split_ring_sizes(num)
    for part, uva, length in (
        ("desc", addr.desc, desc_len),
        ("avail", addr.avail, avail_len),
        ("used", addr.used, used_len),
    ):
        try:
            view = memory.uva_view(uva, length)
        except GuestMemoryError as exc:
            raise GuestMemoryError(
                f"ring {addr.index} {part} {uva:#x}+{length:#x} is not in guest memory: {exc}"
            ) from None
        local[part] = _address_of(view)
    return VringAddr(addr.index, local["desc"], local["used"], local["avail"], 0, 0)


# --- the device -----------------------------------------------------------------------------------


class KernelNetDevice(BackendDevice):
    """A vhost-user virtio-net back-end served by kernel vhost-net (see the module docstring).

    ``tap`` needs ``queue_pairs`` queues and a vnet header (``Tap(..., vnet_hdr=True)``, the
    default); it is borrowed (the caller closes it, after this device). ``vhost_net_path``
    overrides ``/dev/vhost-net``. Construction queries the kernel's features once; a missing
    ``/dev/vhost-net`` raises :class:`~vhostkit.errors.DeviceUnavailable` naming the module.
    The vhost-net fds are opened when a front-end sets the device up and closed on reset,
    disconnect and :meth:`close`.
    """

    def __init__(
        self,
        tap: Tap,
        *,
        mac: bytes = bytes.fromhex("525400000001"),
        mtu: int = 1500,
        queue_pairs: int = 1,
        features: int = WANTED_KERNEL_NET_FEATURES,
        protocol_features: int = KERNEL_NET_PROTOCOL_FEATURES,
        vhost_net_path: str | os.PathLike[str] | None = None,
    ) -> None:
        from vhostkit.devices.net import net_config

        if queue_pairs < 1:
            raise InvalidParam("a net device has at least one queue pair")
        self.vhost_net_path = vhost_net_path
        with VhostNet(vhost_net_path) as probe:  # DeviceUnavailable, with the module, if absent
            self.kernel_features = probe.get_features()
        if tap.closed:
            raise InvalidParam("the tap is closed")
        if len(tap.fds) < queue_pairs:
            raise InvalidParam(f"{queue_pairs} queue pairs need a tap with as many queues")
        if TunFlags.VNET_HDR not in tap.flags:
            raise InvalidParam("kernel vhost-net needs a tap with a vnet header (IFF_VNET_HDR)")
        self.tap = tap
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.tap_offloads = probe_tap_offloads(tap)
        self.hdr_size = 10
        self._lock = threading.RLock()
        #: one vhost-net device per queue pair, opened when first needed
        self._nets: list[VhostNet | None] = [None] * queue_pairs
        #: ring indices whose size, position, addresses and kick the kernel has
        self._programmed: set[int] = set()
        #: ring indices attached to their tap queue (NET_SET_BACKEND)
        self._attached: set[int] = set()
        #: a multi-queue tap's queue i is detached while pair i is not served
        self.tap_queues = TapQueues(tap)
        for queue in range(queue_pairs, len(tap.fds)):
            self._attach_tap_queue(queue, False)
        offered = kernel_net_features(
            self.kernel_features, self.tap_offloads, wanted=features, queue_pairs=queue_pairs
        )
        log.info(
            "kernel net: vhost-net offers %#x, tap offloads %s: offering %#x",
            self.kernel_features,
            self.tap_offloads,
            offered,
        )
        super().__init__(
            features=offered,
            protocol_features=protocol_features,
            num_queues=2 * queue_pairs,
            config=net_config(mac, queue_pairs, mtu),
        )

    # -- the kernel devices --

    @property
    def kernel_acked_features(self) -> int:
        """The acked features the kernel is told (ring and header ones only)."""
        return self.acked_features & self.kernel_features & KERNEL_RING_FEATURES

    def _net(self, pair: int) -> VhostNet:
        net = self._nets[pair]
        if net is None:
            net = VhostNet(self.vhost_net_path)
            try:
                net.set_owner()
                net.set_features(self.kernel_acked_features)
                if self.memory is not None:
                    net.set_mem_table(kernel_memory_table(self.memory))
            except BaseException:
                net.close()
                raise
            self._nets[pair] = net
            log.debug("queue pair %d: opened %r", pair, net)
        return net

    def _open_nets(self) -> Iterable[tuple[int, VhostNet]]:
        return [(pair, net) for pair, net in enumerate(self._nets) if net is not None]

    def _close_nets(self) -> None:
        """Detach every ring, close every vhost-net fd (the kernel forgets the rings)."""
        for index in sorted(self._attached):
            self._detach(index, quiet=True)
        self._programmed.clear()
        nets, self._nets = self._nets, [None] * self.queue_pairs
        for net in nets:
            if net is not None:
                net.close()

    # -- features --

    def set_features(self, features: int) -> None:
        with self._lock:
            super().set_features(features)
            version_1 = bool(features & VF.VERSION_1)
            mrg = bool(features & NF.MRG_RXBUF)
            self.hdr_size = header_size(features) if (version_1 or mrg) else 10
            offload = offload_for_features(features)
            self.tap.set_vnet_hdr_size(self.hdr_size)
            self.tap.set_offload(offload)
            for _, net in self._open_nets():
                net.set_features(self.kernel_acked_features)
            log.info(
                "kernel net: features %#x (kernel %#x), header %d bytes, tap offloads %s",
                features,
                self.kernel_acked_features,
                self.hdr_size,
                offload,
            )

    # -- memory --

    def _pin_memory(self) -> list[memoryview]:
        """Views that keep today's mappings alive while the kernel may still use them."""
        if self.memory is None or self.memory.closed:
            return []
        return [self.memory.gpa_view(r.guest_phys_addr, r.memory_size) for r in self.memory.regions]

    def set_mem_table(self, regions: tuple[MemoryRegion, ...]) -> None:
        with self._lock:
            pins = self._pin_memory()
            try:
                super().set_mem_table(regions)
            finally:
                _release(pins)

    def add_mem_region(self, region: MemoryRegion) -> None:
        with self._lock:
            super().add_mem_region(region)

    def remove_mem_region(self, region: MemoryRegion) -> None:
        with self._lock:
            pins = self._pin_memory()
            try:
                super().remove_mem_region(region)
            finally:
                _release(pins)

    def memory_changed(self) -> None:
        """Give the kernel the new table and the rings' new addresses (before the old mappings
        are released). Never raises: the fds of the request are already taken; a ring whose
        addresses left guest memory is stopped, and everything is stopped if the kernel
        refuses the table."""
        memory = self.memory
        if memory is None:
            return
        # Rings first: one whose addresses left guest memory is stopped before the kernel
        # gets a table without them.
        moved: list[tuple[int, VringAddr]] = []
        for index in sorted(self._programmed):
            ring = self.vrings[index]
            assert ring.addr is not None
            try:
                moved.append((index, kernel_vring_addr(memory, ring.addr, ring.num)))
            except VhostError as exc:
                self._fail_ring(ring, exc)
        table = kernel_memory_table(memory)
        for pair, net in self._open_nets():
            try:
                net.set_mem_table(table)
            except VhostError as exc:
                # The kernel keeps its old table, whose mappings are about to go: stop the
                # pair and drop its device; the next use opens one with the current table.
                log.error("queue pair %d: kernel refused the memory table: %s", pair, exc)
                for index in (2 * pair, 2 * pair + 1):
                    self._fail_ring(self.vrings[index], exc)
                self._nets[pair] = None
                net.close()
        for index, local in moved:
            if index not in self._programmed:
                continue
            try:
                self._net(index // 2).set_vring_addr(_kernel_index(local))
            except VhostError as exc:
                self._fail_ring(self.vrings[index], exc)

    # -- rings --

    def _program(self, ring: VringInfo, addr: VringAddr, kick_fd: int) -> None:
        """Give the kernel ring ``ring.index`` (size, position, addresses, eventfds) and attach
        it if it will be enabled. Raises (with nothing half-done left attached) on failure."""
        if self.memory is None:
            raise InvalidOperation(f"ring {ring.index}: no memory table yet")
        local = kernel_vring_addr(self.memory, addr, ring.num)
        net = self._net(ring.index // 2)
        k = ring.index % 2
        net.set_vring_num(k, ring.num)
        net.set_vring_base(k, ring.base)
        net.set_vring_addr(_kernel_index(local))
        net.set_vring_kick(k, kick_fd)
        net.set_vring_call(k, ring.call_fd)
        net.set_vring_err(k, ring.err_fd)
        self._programmed.add(ring.index)
        enabled = ring.enabled or not self.acked_features & _PROTOCOL_FEATURES_BIT
        if enabled:
            try:
                self._attach(ring.index)
            except BaseException:
                self._unprogram(ring.index)
                raise
        log.debug("ring %d in the kernel: num %d base %d", ring.index, ring.num, ring.base)

    def _unprogram(self, index: int) -> None:
        """The kernel drops its reference to the ring's kick eventfd (a stopped ring)."""
        if index in self._programmed:
            self._programmed.discard(index)
            net = self._nets[index // 2]
            if net is not None:
                net.set_vring_kick(index % 2, None)

    def _attach(self, index: int) -> None:
        if index in self._attached:
            return
        pair = index // 2
        self._attach_tap_queue(pair, True)
        self._net(pair).set_backend(index % 2, self.tap, tap_queue=pair)
        self._attached.add(index)

    def _detach(self, index: int, *, quiet: bool = False) -> None:
        """Detach ring ``index`` from the tap; the kernel has finished with it on return."""
        if index not in self._attached:
            return
        self._attached.discard(index)
        net = self._nets[index // 2]
        if net is None:
            return
        try:
            net.set_backend(index % 2, None)
        except VhostError:
            if not quiet:
                raise
            log.warning("ring %d: detaching from the tap failed", index, exc_info=True)

    def _stop_kernel_ring(self, index: int) -> int:
        """Detach ring ``index`` and read its position from the kernel."""
        self._detach(index)
        position = self._net(index // 2).get_vring_base(index % 2)
        self._unprogram(index)
        return position

    def _fail_ring(self, ring: VringInfo, exc: VhostError) -> None:
        """The kernel can no longer serve ``ring``: stop it there and tell the front-end."""
        if ring.index not in self._programmed:
            return
        log.error("ring %d stopped: %s", ring.index, exc)
        self._detach(ring.index, quiet=True)
        try:
            # where it stopped, for the front-end's GET_VRING_BASE
            ring.base = self._net(ring.index // 2).get_vring_base(ring.index % 2)
            self._unprogram(ring.index)
        except VhostError:
            self._programmed.discard(ring.index)
        if ring.err_fd is not None:
            os.eventfd_write(ring.err_fd, 1)

    def _sync_attached(self, ring: VringInfo) -> None:
        if ring.index not in self._programmed:
            return
        if ring.enabled:
            self._attach(ring.index)
        else:
            self._detach(ring.index)

    def set_vring_addr(self, addr: VringAddr) -> None:
        with self._lock:
            ring = self._ring(addr.index)
            if addr.index in self._programmed:
                # a running ring moved (rare): give the kernel the new place first
                assert self.memory is not None
                local = kernel_vring_addr(self.memory, addr, ring.num)
                self._net(addr.index // 2).set_vring_addr(_kernel_index(local))
            elif not ring.started and ring.kick_fd is not None:
                self._program(ring, addr, ring.kick_fd)  # this request starts the ring
            super().set_vring_addr(addr)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        with self._lock:
            ring = self._ring(index)
            if fd is None:
                raise Unsupported(
                    f"ring {index}: polling mode (no kick fd) cannot be served by kernel "
                    "vhost-net, which is woken only through the kick eventfd"
                )
            # The kernel first (it takes its own reference), so that a refusal leaves the fd
            # with the request, which closes it.
            if index in self._programmed:
                self._net(index // 2).set_vring_kick(index % 2, fd)
            elif not ring.started and ring.addr is not None:
                self._program(ring, ring.addr, fd)
            super().set_vring_kick(index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        with self._lock:
            self._ring(index)
            if index in self._programmed:
                self._net(index // 2).set_vring_call(index % 2, fd)
            super().set_vring_call(index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        with self._lock:
            self._ring(index)
            if index in self._programmed:
                self._net(index // 2).set_vring_err(index % 2, fd)
            super().set_vring_err(index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        with self._lock:
            super().set_vring_enable(index, enable)
            pair = index // 2
            rx, tx = self.vrings[2 * pair], self.vrings[2 * pair + 1]
            if enable:
                self._attach_tap_queue(pair, True)
            self._sync_attached(self.vrings[index])
            if not (rx.enabled or tx.enabled):
                self._attach_tap_queue(pair, False)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        if big_endian:
            raise Unsupported("big-endian (legacy cross-endian) rings are not served here")
        super().set_vring_endian(index, big_endian)

    def ring_started(self, ring: VringInfo) -> None:
        # _program already did the kernel's part, before the request's fds were taken.
        if ring.index not in self._programmed:
            log.error("ring %d started without the kernel serving it", ring.index)

    def ring_stopped(self, ring: VringInfo) -> int:
        with self._lock:
            if ring.index not in self._programmed:
                return ring.base  # taken out by take_rings, or failed
            return self._stop_kernel_ring(ring.index)

    # -- handing the rings to another data plane --

    def take_rings(self) -> tuple[VringState, ...]:
        """Stop the kernel serving every ring it serves; return their positions.

        The rings stay started as far as the front-end is concerned (kick and call eventfds,
        addresses, memory kept), so another data plane can go on from these positions, or
        :meth:`give_rings` can hand them back.
        """
        with self._lock:
            states = []
            for index in sorted(self._programmed):
                position = self._stop_kernel_ring(index)
                self.vrings[index].base = position
                states.append(VringState(index, position))
            self._changed()
            return tuple(states)

    def give_rings(self, states: Sequence[VringState]) -> None:
        """Serve again, from the given positions, rings stopped by :meth:`take_rings` (or by
        another data plane that ran them since)."""
        with self._lock:
            for state in states:
                ring = self._ring(state.index)
                if state.index in self._programmed:
                    raise InvalidOperation(f"ring {state.index} is already served by the kernel")
                if not ring.started or ring.addr is None or ring.kick_fd is None:
                    raise InvalidOperation(f"ring {state.index} is not started by the front-end")
                ring.base = state.num
                self._program(ring, ring.addr, ring.kick_fd)
                # what the driver queued meanwhile: make the kernel look at the ring once
                os.eventfd_write(ring.kick_fd, 1)
            self._changed()

    @property
    def attached_rings(self) -> frozenset[int]:
        """Ring indices the kernel serves right now (attached to their tap queue)."""
        return frozenset(self._attached)

    # -- the tap --

    @property
    def _tap_attached(self) -> list[bool]:
        return self.tap_queues.attached

    def _attach_tap_queue(self, queue: int, attach: bool) -> None:
        self.tap_queues.set(queue, attach)

    # -- net requests --

    def get_queue_num(self) -> int:
        return self.queue_pairs  # queue *pairs*, as for NetDevice

    def send_rarp(self, mac: bytes) -> None:
        from vhostkit.devices.net import rarp_frame

        super().send_rarp(mac)
        os.write(self.tap.fds[0], bytes(self.hdr_size) + rarp_frame(mac))

    def net_set_mtu(self, mtu: int) -> None:
        super().net_set_mtu(mtu)
        self.config[10:12] = struct.pack("<H", mtu)

    # -- lifetime --

    def reset_device(self) -> None:
        with self._lock:
            self._close_nets()
            super().reset_device()

    def reset_owner(self) -> None:
        with self._lock:
            self._close_nets()
            super().reset_owner()

    def _release(self) -> None:
        # Before the memory goes: the kernel must be done with it.
        self._close_nets()
        super()._release()
        for queue in range(self.queue_pairs):
            self._attach_tap_queue(queue, True)

    def disconnected(self) -> None:
        with self._lock:
            super().disconnected()

    def close(self) -> None:
        """Stop the kernel, close the vhost-net fds and the front-end's resources; give the tap
        back with every queue attached (the tap itself stays the caller's)."""
        with self._lock:
            super().close()
            for queue in range(self.queue_pairs, len(self._tap_attached)):
                self._attach_tap_queue(queue, True)


def _kernel_index(addr: VringAddr) -> VringAddr:
    """``addr`` with the ring index the kernel device uses (0 RX, 1 TX of its pair)."""
    return VringAddr(addr.index % 2, addr.desc, addr.used, addr.avail, addr.log, addr.flags)


def _release(views: list[memoryview]) -> None:
    for view in views:
        view.release()
