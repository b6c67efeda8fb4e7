"""A complete generic vhost-user back-end: the state every device needs, no device logic.

:class:`BackendDevice` implements every generic request of :class:`BackendHandler`: ownership,
feature and protocol-feature negotiation, the memory table (mapped with
:class:`vhostkit.virtio.memory.GuestMemory`, also ADD/REM_MEM_REG), per-ring state (size,
addresses, position, kick/call/err fds, enabled/started), config space, status, reset, the
dirty log, inflight areas and the back-end request channel. Real devices (net, blk) subclass it
and add their ring processing; tests and the demo use it as it is.

Ring states follow the spec: a ring starts *stopped*; it is *started* once it has a kick fd
(or, in polling mode, when the front-end sets its kick with the no-fd flag) and its addresses;
``GET_VRING_BASE`` stops it and returns its position. Without ``VHOST_USER_F_PROTOCOL_FEATURES``
rings are enabled as soon as they start; with it they stay disabled until
``SET_VRING_ENABLE``. ``SET_FEATURES`` never disables a ring.

Every state change notifies :attr:`BackendDevice.changed`, so a test (or a supervisor) can
:meth:`BackendDevice.wait_for` a condition instead of sleeping.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vhostkit.errors import InvalidOperation, InvalidParam, SocketRetry
from vhostkit.types import MemoryRegion, VringAddr
from vhostkit.user.backend.inflight import packed_queue_region_size, split_queue_region_size
from vhostkit.user.backend_req import BackendChannel
from vhostkit.user.backend_req_handler import BackendHandler, InflightArea
from vhostkit.user.connection import Connection
from vhostkit.user.message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    InflightDesc,
    LogDesc,
    ProtocolFeature,
)
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "BackendDevice", "VringInfo"]

log = logging.getLogger(__name__)

#: What :class:`BackendDevice` implements generically.
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.CONFIG
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)

_RING_PACKED = 1 << 34


@dataclass
class VringInfo:
    """What the front-end told the back-end about one ring.

    The ring's kick, call and err eventfds are owned here, and only here: each is closed
    exactly once, when it is replaced, given back (:meth:`release_kick`) or when the ring's
    state is dropped (:meth:`close_fds`). Ring workers and :class:`ActiveRing` only borrow
    them, while the ring runs (replacing one stops or locks out its worker first).
    """

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    polling: bool = False
    enabled: bool = False
    started: bool = False
    big_endian: bool = False
    kicks: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    _kick_fd: int | None = field(default=None, init=False, repr=False)
    _call_fd: int | None = field(default=None, init=False, repr=False)
    _err_fd: int | None = field(default=None, init=False, repr=False)

    @property
    def kick_fd(self) -> int | None:
        """The kick eventfd (borrowed: only this object closes it)."""
        return self._kick_fd

    @property
    def call_fd(self) -> int | None:
        """The call eventfd (borrowed: only this object closes it)."""
        return self._call_fd

    @property
    def err_fd(self) -> int | None:
        """The error eventfd (borrowed: only this object closes it)."""
        return self._err_fd

    def set_kick(self, fd: int | None) -> None:
        """Close the kick eventfd, then take ``fd`` in its place (if closing fails, ``fd``
        is not taken: it stays the caller's)."""
        old, self._kick_fd = self._kick_fd, None
        _close(old)
        self._kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        """Close the call eventfd, then take ``fd`` in its place (if closing fails, ``fd``
        is not taken: it stays the caller's)."""
        old, self._call_fd = self._call_fd, None
        _close(old)
        self._call_fd = fd

    def set_err(self, fd: int | None) -> None:
        """Close the error eventfd, then take ``fd`` in its place (if closing fails, ``fd``
        is not taken: it stays the caller's)."""
        old, self._err_fd = self._err_fd, None
        _close(old)
        self._err_fd = fd

    def release_kick(self) -> int | None:
        """Give the kick eventfd up without closing it (the caller owns it now)."""
        fd, self._kick_fd = self._kick_fd, None
        return fd

    def close_fds(self) -> None:
        """Close the kick, call and err eventfds (each once); the ring then has none."""
        fds = (self._kick_fd, self._call_fd, self._err_fd)
        self._kick_fd = self._call_fd = self._err_fd = None
        failed: OSError | None = None
        for fd in fds:
            try:
                _close(fd)
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return not os.path.isdir("/proc/self/fd")  # no /proc to ask: cannot tell, take it


def _close(fd: int | None) -> None:
    """Close an fd this process owns. EBADF is a bug (a double close), so it is raised."""
    if fd is not None:
        os.close(fd)


def _close_region_fds(regions: tuple[MemoryRegion, ...]) -> None:
    """Close the fds that came with mapped regions (each fd once)."""
    for fd in {r.fd for r in regions if r.fd is not None}:
        os.close(fd)


def _region_key(region: MemoryRegion) -> tuple[int, int, int]:
    """What identifies a region in ADD_MEM_REG / REM_MEM_REG."""
    return (region.guest_phys_addr, region.memory_size, region.userspace_addr)


def inflight_queue_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's inflight region (header + one entry per descriptor), 64-aligned."""
    return (packed_queue_region_size if packed else split_queue_region_size)(queue_size)


class BackendDevice(BackendHandler):
    """Generic vhost-user back-end state.

    ``features`` are the virtio feature bits offered (bit 30 is added when
    ``protocol_features`` is non-zero); ``num_queues`` the rings the device has;
    ``config`` the initial device config space.
    """

    def __init__(
        self,
        *,
        features: int,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        num_queues: int = 2,
        config: bytes = b"",
        max_mem_slots: int = 32,
        max_queue_size: int = 32768,
    ) -> None:
        if num_queues < 1:
            raise InvalidParam("a device has at least one queue")
        self.offered_features = features | (
            VHOST_USER_F_PROTOCOL_FEATURES if protocol_features else 0
        )
        self.offered_protocol_features = ProtocolFeature(protocol_features)
        self.num_queues = num_queues
        self.max_mem_slots = max_mem_slots
        self.max_queue_size = max_queue_size
        self.config = bytearray(config)
        self.changed = threading.Condition()
        self._reset_state()

    def _reset_state(self) -> None:
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = ProtocolFeature(0)
        self.protocol_negotiated = False
        self.memory: GuestMemory | None = None
        #: ADD_MEM_REG of a region already mapped, by (gpa, size, uva): how many more
        #: REM_MEM_REG it takes to unmap it (see :meth:`add_mem_region`)
        self.mem_region_dups: dict[tuple[int, int, int], int] = {}
        self.vrings = [VringInfo(i) for i in range(self.num_queues)]
        self.status = 0
        #: the dirty log SET_LOG_BASE mapped (owned here: unmapped when replaced, on reset
        #: and on disconnect); its fd is closed once mapped
        self.dirty_log: DirtyLog | None = None
        self.log_desc: LogDesc | None = None
        #: SET_LOG_FD's eventfd (owned here), signalled after used-ring writes are logged
        self.log_call_fd: int | None = None
        self.backend_channel: BackendChannel | None = None
        self.inflight_fd: int | None = None
        self.inflight_desc: InflightDesc | None = None
        self.mtu: int | None = None
        self.rarp_macs: list[bytes] = []
        self.requests_seen = 0

    # -- waiting --

    def _changed(self) -> None:
        with self.changed:
            self.requests_seen += 1
            self.changed.notify_all()

    def notify_waiters(self) -> None:
        """Wake :meth:`wait_for` callers (ring workers call this after each round of work)."""
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true (checked after every request and every round
        of ring work)."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise SocketRetry(f"device state did not reach the condition in {timeout}s")

    # -- helpers --

    def _ring(self, index: int) -> VringInfo:
        if not 0 <= index < self.num_queues:
            raise InvalidParam(f"ring {index} does not exist (device has {self.num_queues})")
        return self.vrings[index]

    def _maybe_start(self, ring: VringInfo) -> None:
        if ring.started or ring.addr is None or (ring.kick_fd is None and not ring.polling):
            return
        ring.started = True
        if not self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
            ring.enabled = True
        log.debug("ring %d started (enabled=%s)", ring.index, ring.enabled)
        try:
            self.ring_started(ring)
        except BaseException:
            ring.started = False
            raise

    def ring_started(self, ring: VringInfo) -> None:
        """Hook: ring ``ring.index`` just started. Devices start their worker here."""

    def ring_stopped(self, ring: VringInfo) -> int:
        """Hook: ring stopped by GET_VRING_BASE; return its position (default: the base)."""
        return ring.base

    def avail_idx(self, index: int) -> int:
        """The driver's current ``avail->idx`` of split ring ``index`` (read from guest memory)."""
        ring = self._ring(index)
        if self.memory is None or ring.addr is None:
            raise InvalidOperation(f"ring {index} has no memory or addresses yet")
        return int.from_bytes(self.memory.uva_view(ring.addr.avail + 2, 2), "little")

    # -- session and features --

    def set_owner(self) -> None:
        if self.owner:
            raise InvalidOperation("SET_OWNER: the device already has an owner")
        self.owner = True
        self._changed()

    def reset_owner(self) -> None:
        self._release()
        self._reset_state()
        self._changed()

    def get_features(self) -> int:
        return self.offered_features

    def set_features(self, features: int) -> None:
        if features & ~self.offered_features:
            raise InvalidParam(f"features {features & ~self.offered_features:#x} not offered")
        self.acked_features = features
        self._changed()

    def get_protocol_features(self) -> int:
        return int(self.offered_protocol_features)

    def set_protocol_features(self, features: ProtocolFeature) -> None:
        self.acked_protocol_features = features
        self.protocol_negotiated = True
        self._changed()

    def get_queue_num(self) -> int:
        return self.num_queues

    # -- memory --

    def set_mem_table(self, regions: tuple[MemoryRegion, ...]) -> None:
        # Mapped, the memory stays alive without the fds. They are ours to close only once
        # the request succeeds: when it fails, the server closes them (once).
        memory = GuestMemory.map_regions(regions)
        old, self.memory = self.memory, memory
        self.mem_region_dups = {}
        if old is not None:
            old.close()
        log.info(
            "memory table: %s",
            ", ".join(
                f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x} off {r.mmap_offset:#x}"
                for r in regions
            ),
        )
        self.memory_changed()
        self._changed()
        _close_region_fds(regions)

    def memory_changed(self) -> None:
        """Hook: the memory table changed (rebuild ring views here)."""

    def get_max_mem_slots(self) -> int:
        return self.max_mem_slots

    def add_mem_region(self, region: MemoryRegion) -> None:
        # QEMU 7.2 (and older) sends ADD_MEM_REG/REM_MEM_REG once per vhost_dev; a multiqueue
        # virtio-net has one vhost_dev per queue pair on the same connection: the same
        # region (same guest and user addresses, size and file offset) arrives once per
        # pair. It is mapped once and counted; each REM_MEM_REG takes one count off.
        key = _region_key(region)
        if self.memory is not None and any(
            _region_key(r) == key and r.mmap_offset == region.mmap_offset
            for r in self.memory.regions
        ):
            if region.fd is not None:
                os.close(region.fd)
            self.mem_region_dups[key] = self.mem_region_dups.get(key, 0) + 1
            log.debug("ADD_MEM_REG of a mapped region %s: counted", key)
            self._changed()
            return
        if self.memory is None:
            self.memory = GuestMemory()
        if len(self.memory.regions) >= self.max_mem_slots:
            raise InvalidParam(f"all {self.max_mem_slots} memory slots are in use")
        self.memory.add_region(region)  # on failure the server closes the fd
        self.memory_changed()
        self._changed()
        _close_region_fds((region,))

    def remove_mem_region(self, region: MemoryRegion) -> None:
        if self.memory is None:
            raise InvalidParam("no memory region is mapped")
        key = _region_key(region)
        if self.mem_region_dups.get(key):
            self.mem_region_dups[key] -= 1
            self._changed()
            return
        self.mem_region_dups.pop(key, None)
        self.memory.remove_region(region)
        self.memory_changed()
        self._changed()

    # -- dirty log --

    @property
    def logging(self) -> bool:
        """Whether writes to guest memory are to be logged now: VHOST_F_LOG_ALL acked and a
        log mapped."""
        return bool(self.acked_features & VirtioFeature.LOG_ALL) and self.dirty_log is not None

    def set_log_base(self, log_desc: LogDesc, fd: int) -> None:
        # A bad size or offset raises before anything is kept: the server then closes the fd
        # (once) and replies with the error. Mapped, the log no longer needs the fd.
        new = DirtyLog.map(fd, log_desc.mmap_size, log_desc.mmap_offset)
        try:
            self.check_log(new)
            old = self.install_log(new)
        except BaseException:
            new.close()
            raise
        os.close(fd)
        self.log_desc = log_desc
        if old is not None:
            old.close()
        log.info(
            "dirty log: %d bytes at offset %#x (%d pages)",
            log_desc.mmap_size,
            log_desc.mmap_offset,
            new.pages,
        )
        self._changed()

    def check_log(self, new: DirtyLog) -> None:
        """Refuse (:class:`InvalidParam`) a log that does not cover guest memory."""
        if self.memory is None or not self.memory.regions:
            return
        end = max(r.guest_end for r in self.memory.regions)
        if end > new.pages << 12:
            raise InvalidParam(
                f"a log of {new.pages:#x} pages does not cover guest memory up to {end:#x}"
            )

    def install_log(self, new: DirtyLog | None) -> DirtyLog | None:
        """Make ``new`` the log (None: none); return the old one for the caller to unmap.
        Devices that write from other threads switch them over here first."""
        old, self.dirty_log = self.dirty_log, new
        return old

    def set_log_fd(self, fd: int) -> None:
        if not _is_eventfd(fd):
            raise InvalidParam(f"SET_LOG_FD: fd {fd} is not an eventfd")
        old = self.install_log_call(fd)
        _close(old)
        self._changed()

    def install_log_call(self, fd: int | None) -> int | None:
        """Make ``fd`` the log eventfd; return the old one for the caller to close."""
        old, self.log_call_fd = self.log_call_fd, fd
        return old

    def _drop_log(self) -> None:
        old = self.install_log(None)
        if old is not None:
            old.close()
        _close(self.install_log_call(None))
        self.log_desc = None

    # -- rings --

    def set_vring_num(self, index: int, num: int) -> None:
        ring = self._ring(index)
        if not 0 < num <= self.max_queue_size:
            raise InvalidParam(f"ring size {num} out of range 1..{self.max_queue_size}")
        packed = bool(self.acked_features & _RING_PACKED)
        if not packed and num & (num - 1):
            raise InvalidParam(f"split ring size {num} is not a power of two")
        ring.num = num
        self._changed()

    def set_vring_addr(self, addr: VringAddr) -> None:
        ring = self._ring(addr.index)
        ring.addr = addr
        self._maybe_start(ring)
        self._changed()

    def set_vring_base(self, index: int, base: int) -> None:
        ring = self._ring(index)
        if ring.started:
            raise InvalidOperation(f"SET_VRING_BASE on ring {index} while it runs")
        ring.base = base
        self._changed()

    def get_vring_base(self, index: int) -> int:
        ring = self._ring(index)
        position = self.ring_stopped(ring) if ring.started else ring.base
        ring.base = position
        ring.started = False
        ring.set_kick(None)
        self._changed()
        return position

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        ring = self._ring(index)
        try:
            ring.set_kick(fd)
            ring.polling = fd is None
            self._maybe_start(ring)
        except BaseException:
            # The request fails, so the server closes the fd it brought: the ring must not
            # keep that number (closing it again later would close whatever reuses it).
            ring.release_kick()
            ring.polling = False
            raise
        self._changed()

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._ring(index).set_call(fd)
        self._changed()

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._ring(index).set_err(fd)
        self._changed()

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._ring(index).enabled = enable
        self._changed()

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        self._ring(index).big_endian = big_endian
        self._changed()

    def vring_kick(self, index: int) -> None:
        self._ring(index).kicks += 1
        self._changed()

    # -- device --

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        if offset + size > len(self.config):
            raise InvalidParam(
                f"config read {offset}+{size} beyond the {len(self.config)}-byte config space"
            )
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset + len(data) > len(self.config):
            raise InvalidParam(
                f"config write {offset}+{len(data)} beyond the {len(self.config)}-byte space"
            )
        self.config[offset : offset + len(data)] = data
        self._changed()

    def set_status(self, status: int) -> None:
        self.status = status
        self._changed()

    def get_status(self) -> int:
        return self.status

    def reset_device(self) -> None:
        self._drop_log()
        for ring in self.vrings:
            ring.close_fds()
        self.vrings = [VringInfo(i) for i in range(self.num_queues)]
        self.status = 0
        self.acked_features = 0
        self._changed()

    def send_rarp(self, mac: bytes) -> None:
        self.rarp_macs.append(mac)
        self._changed()

    def net_set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise InvalidParam(f"MTU {mtu} out of range 68..65535")
        self.mtu = mtu
        self._changed()

    def set_backend_req_fd(self, conn: Connection) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = BackendChannel(conn, self.acked_protocol_features)
        self._changed()

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        if not 0 < num_queues <= self.num_queues or not 0 < queue_size <= self.max_queue_size:
            raise InvalidParam(f"inflight area for {num_queues} x {queue_size} out of range")
        size = num_queues * inflight_queue_size(
            queue_size, bool(self.acked_features & _RING_PACKED)
        )
        fd = os.memfd_create("vhostkit-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            keep = os.dup(fd)
        except BaseException:
            os.close(fd)
            raise
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight_fd = keep
        self.inflight_desc = InflightDesc(size, 0, num_queues, queue_size)
        self._changed()
        return InflightArea(fd, size, 0)

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        if os.fstat(fd).st_size < desc.mmap_offset + desc.mmap_size:
            raise InvalidParam("inflight fd is smaller than the area it should hold")
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight_fd, self.inflight_desc = fd, desc
        self._changed()

    # -- lifetime --

    def _release(self) -> None:
        for ring in self.vrings:
            ring.close_fds()
        self._drop_log()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight_fd = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def disconnected(self) -> None:
        """The front-end left: drop its fds and memory, keep nothing but the config."""
        self._release()
        self._reset_state()
        self._changed()

    def close(self) -> None:
        self._release()
