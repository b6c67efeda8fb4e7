"""vhostkit as the guest: the ring plumbing every userspace virtio driver shares.

:class:`VirtioGuest` is the data-plane-agnostic part of a "virtual guest device" over any
:class:`~vhostkit.backend.VhostBackend` (kernel vhost or a vhost-user back-end through the
:class:`~vhostkit.user.Frontend`). It owns

* the guest memory (one memfd region from :meth:`GuestMemory.allocate`, rings first, then the
  buffer area a device driver carves with :meth:`VirtioGuest._carve`),
* one driver-role queue per ring (split by default, packed on request) with its kick and call
  eventfds (:class:`GuestRing`),

and does the start-up a VMM does, in this order: ``set_owner``, ``negotiate`` (virtio features,
plus vhost-user protocol features where the data plane has them), ``set_mem_table``, per ring
``set_vring_num`` / ``set_vring_base`` / ``set_vring_addr`` / ``set_vring_kick`` /
``set_vring_call``, the driver's buffers posted, ``set_vring_enable`` for every ring, and for
vhost-user with STATUS negotiated ``SET_STATUS`` DRIVER_OK. :meth:`VirtioGuest.stop` stops the
rings and returns their positions (``get_vring_base``); :meth:`VirtioGuest.close` closes the
eventfds and the guest memory (the backend is borrowed and stays open).

Device drivers (:class:`~vhostkit.guest.net.VirtioNetDriver`,
:class:`~vhostkit.guest.vsock.VsockDriver`) subclass it and fill in the hooks:

* :meth:`~VirtioGuest._buffer_bytes`: how much buffer memory to reserve after the rings;
* :meth:`~VirtioGuest._on_negotiated`: check the acked features, derive header sizes;
* :meth:`~VirtioGuest._setup_buffers`: lay out buffer pools, post receive buffers (after every
  ring is set up, before the rings are enabled);
* :meth:`~VirtioGuest._on_enabled`: e.g. kick the receive rings once;
* :meth:`~VirtioGuest._quiesce`: stop the data plane before the ring positions are read, where
  that data plane needs it (kernel vhost-vsock's SET_RUNNING 0);
* :meth:`~VirtioGuest._release`: drop views of guest memory before it is unmapped;
* :meth:`~VirtioGuest._on_reconnect`: forget half-done work when :meth:`VirtioGuest.reconnect`
  moves the rings to a new back-end after the old one died.

Dirty logging (the first step of live migration) on the running rings, over either plane:
:meth:`VirtioGuest.start_dirty_log` allocates a log that covers the guest memory and hands it
to the data plane (:meth:`VhostBackend.start_dirty_log`), :meth:`~VirtioGuest.collect_dirty`
takes the pages the data plane wrote since the last call, :meth:`~VirtioGuest.stop_dirty_log`
turns logging off and releases the log. Pages stay collectable after :meth:`~VirtioGuest.stop`
(the last pass of a migration reads the log of a stopped device).
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Iterable
from typing import Self

import numpy as np
import numpy.typing as npt

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation, InvalidParam, Unsupported
from vhostkit.types import VringAddr
from vhostkit.virtio.dirty_log import DirtyLog, log_size_for
from vhostkit.virtio.features import DeviceStatus, VirtioFeature
from vhostkit.virtio.memory import PAGE_SIZE, GuestMemory
from vhostkit.virtio.packed import PackedDriverQueue, encode_base
from vhostkit.virtio.split import SplitDriverQueue

__all__ = [
    "DRIVER_OK_STATUS",
    "PROTOCOL_STATUS",
    "DriverQueue",
    "GuestRing",
    "VirtioGuest",
    "drain_eventfd",
    "kick_eventfd",
    "new_eventfd",
    "wait_readable",
]

log = logging.getLogger(__name__)

#: The vhost-user STATUS protocol feature bit (16). A plain number so that this module does not
#: depend on :mod:`vhostkit.user`.
PROTOCOL_STATUS = 1 << 16

#: The device status a driver sets once it is ready.
DRIVER_OK_STATUS = int(
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)
_RING_ALIGN = 4096
#: virtio bit 30, vhost-user's "protocol features supported": acked or not per data plane.
_PROTOCOL_FEATURES_BIT = 1 << 30

DriverQueue = SplitDriverQueue | PackedDriverQueue


def new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (the caller owns it)."""
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def kick_eventfd(fd: int) -> None:
    """Signal an eventfd once."""
    os.eventfd_write(fd, 1)


def drain_eventfd(fd: int) -> int:
    """Reset a non-blocking eventfd; returns the count it held (0 when it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_readable(fds: Iterable[int], timeout: float | None) -> list[int]:
    """Block until some of ``fds`` are readable or ``timeout`` seconds passed (``None``:
    forever); returns the readable ones (``[]`` on timeout)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]


class GuestRing:
    """One ring of a :class:`VirtioGuest`: its driver-role queue and its two eventfds.

    Owned by the guest (internal, mutable); the eventfds are closed by :meth:`VirtioGuest.close`.
    """

    __slots__ = ("call", "gpa", "index", "interrupt_waits", "kick", "kicks", "queue")

    def __init__(self, index: int, gpa: int, queue: DriverQueue, kick: int, call: int) -> None:
        self.index = index
        self.gpa = gpa
        self.queue = queue
        self.kick = kick
        self.call = call
        self.kicks = 0
        self.interrupt_waits = 0

    def notify(self) -> None:
        """Kick the device (signal the kick eventfd)."""
        kick_eventfd(self.kick)
        self.kicks += 1

    def publish(self) -> bool:
        """Publish what was added and kick when the ring asks for it; True when kicked."""
        if self.queue.publish():
            self.notify()
            return True
        return False

    def wait_used(self, timeout: float | None) -> bool:
        """Wait until the device used buffers of this ring (call eventfd, interrupts on only
        while waiting); True when used entries are pending, False after ``timeout`` seconds."""
        q = self.queue
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if q.enable_interrupts():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.interrupt_waits += 1
                if not wait_readable((self.call,), left):
                    return False
                drain_eventfd(self.call)
        finally:
            q.disable_interrupts()

    def __repr__(self) -> str:
        return f"<GuestRing {self.index} kick={self.kick} call={self.call}>"


class VirtioGuest:
    """The shared guest-side plumbing of vhostkit's userspace virtio drivers.

    ``num_rings`` rings of ``queue_size`` entries (``packed``: packed rings, which needs
    VIRTIO_F_RING_PACKED from the data plane); ``features`` are the virtio features wanted
    (RING_PACKED is added with ``packed``); ``protocol_features`` are asked for from vhost-user
    data planes (the kernel has none); ``set_status`` sends SET_STATUS DRIVER_OK when the data
    plane negotiated the STATUS protocol feature. See the module docstring for the hooks.

    :meth:`start` sets everything up; the constructor does not touch the backend.
    """

    def __init__(
        self,
        backend: VhostBackend,
        *,
        num_rings: int,
        queue_size: int = 256,
        packed: bool = False,
        features: int = int(VirtioFeature.VERSION_1),
        protocol_features: int = 0,
        set_status: bool = True,
        name: str = "vhostkit-guest",
    ) -> None:
        if num_rings < 1:
            raise InvalidParam("a virtio device has at least one ring")
        self.backend = backend
        self.num_rings = num_rings
        self.queue_size = queue_size
        self.packed = packed
        wanted = features | (VirtioFeature.RING_PACKED if packed else 0)
        self.wanted_features = int(wanted)
        self.wanted_protocol_features = protocol_features
        self.send_status = set_status
        self.name = name
        #: the features the data plane acked (valid after :meth:`start`)
        self.acked_features = 0
        #: the vhost-user protocol features acked (0 on the kernel)
        self.acked_protocol_features = 0
        self.memory: GuestMemory | None = None
        self._rings: list[GuestRing] = []
        self._fds: list[int] = []
        self._carve_at = 0
        self._dirty_log: DirtyLog | None = None
        self._started = False
        self._stopped = False
        self._closed = False

    # -- hooks (subclasses override what they need) -----------------------------------------

    def _buffer_bytes(self) -> int:
        """Bytes of buffer memory to reserve after the rings."""
        return 0

    def _on_negotiated(self) -> None:
        """Called once :attr:`acked_features` is known, before the memory table is sent."""

    def _setup_buffers(self) -> None:
        """Called after every ring is set up and before they are enabled: carve buffer pools
        (:meth:`_carve`) and post receive buffers (publish, but kick in :meth:`_on_enabled`)."""

    def _on_enabled(self) -> None:
        """Called after the rings were enabled (and DRIVER_OK sent)."""

    def _quiesce(self) -> None:
        """Called by :meth:`stop` before the ring positions are read."""

    def _release(self) -> None:
        """Called by :meth:`close` before the guest memory is unmapped: drop views of it."""

    def _on_reconnect(self) -> None:
        """Called by :meth:`reconnect` before the new data plane gets the rings: forget what
        the old device left half done (a frame spread over receive buffers, say)."""

    # -- layout -----------------------------------------------------------------------------

    def _ring_footprint(self) -> int:
        if self.packed:
            size = PackedDriverQueue.footprint(self.queue_size)
        else:
            size = SplitDriverQueue.footprint(self.queue_size)
        return -(-size // _RING_ALIGN) * _RING_ALIGN

    def _memory_size(self) -> int:
        total = self.num_rings * self._ring_footprint() + self._buffer_bytes()
        return -(-total // PAGE_SIZE) * PAGE_SIZE

    def _carve(self, size: int, align: int = 64) -> int:
        """Reserve ``size`` bytes of the buffer area; returns their guest-physical address."""
        assert self.memory is not None
        gpa = -(-self._carve_at // align) * align
        end = gpa + size
        limit = self.memory.regions[0].memory_size
        if end > limit:
            raise InvalidParam(
                f"buffer area exhausted: {size} bytes at {gpa:#x} do not fit {limit:#x} "
                "(the driver's _buffer_bytes is too small)"
            )
        self._carve_at = end
        return gpa

    @property
    def ring_indices(self) -> list[int]:
        """Every ring index of the device."""
        return list(range(self.num_rings))

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Set the data plane up (see the module docstring).

        On failure everything the guest opened is closed again and the error propagates.
        """
        if self._started or self._closed:
            raise InvalidOperation(f"{type(self).__name__} was already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        be = self.backend
        self.memory = mem = GuestMemory.allocate([(0, self._memory_size())], name=self.name)
        be.set_owner()
        acked, protocol = be.negotiate(self.wanted_features, self.wanted_protocol_features)
        self.acked_features, self.acked_protocol_features = int(acked), int(protocol)
        if self.packed and not acked & VirtioFeature.RING_PACKED:
            raise Unsupported("the data plane does not offer VIRTIO_F_RING_PACKED")
        log.info(
            "%s: features acked %#x (protocol %#x)",
            self.name,
            self.acked_features,
            self.acked_protocol_features,
        )
        self._on_negotiated()
        be.set_mem_table(mem.regions)
        footprint = self._ring_footprint()
        for index in self.ring_indices:
            self._rings.append(self._setup_ring(index, index * footprint))
        self._carve_at = self.num_rings * footprint
        self._setup_buffers()
        for index in self.ring_indices:
            be.set_vring_enable(index, True)
        if self.send_status and self.acked_protocol_features & PROTOCOL_STATUS:
            set_status = getattr(be, "set_status", None)
            if set_status is not None:
                set_status(DRIVER_OK_STATUS)
        self._on_enabled()

    def _setup_ring(self, index: int, gpa: int) -> GuestRing:
        be = self.backend
        assert self.memory is not None
        kick = new_eventfd()
        self._fds.append(kick)
        call = new_eventfd()
        self._fds.append(call)
        q: DriverQueue
        if self.packed:
            q = PackedDriverQueue(
                self.memory, self.queue_size, gpa, features=self.acked_features, index=index
            )
            base = encode_base(0, 1)
        else:
            q = SplitDriverQueue(
                self.memory, self.queue_size, gpa, features=self.acked_features, index=index
            )
            base = 0
        be.set_vring_num(index, self.queue_size)
        be.set_vring_base(index, base)
        be.set_vring_addr(q.vring_addr())
        be.set_vring_kick(index, kick)
        be.set_vring_call(index, call)
        # interrupts are asked for only while waiting
        q.disable_interrupts()
        return GuestRing(index, gpa, q, kick, call)

    # -- access -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started, not stopped, not closed."""
        return self._started and not self._stopped and not self._closed and bool(self._rings)

    def _check_running(self) -> None:
        if not self.running:
            raise InvalidOperation(f"{type(self).__name__} is not running (start() it first)")

    def ring(self, index: int) -> GuestRing:
        """Ring ``index`` (while running)."""
        self._check_running()
        try:
            return self._rings[index]
        except IndexError:
            raise InvalidParam(f"ring {index} does not exist") from None

    def wait_any(self, indices: Iterable[int], timeout: float | None) -> list[int]:
        """Wait until one of the rings ``indices`` has used entries (their call eventfds, with
        interrupts enabled only while waiting); returns the ring indices with used entries
        pending (``[]`` after ``timeout`` seconds)."""
        rings = [self.ring(i) for i in indices]
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                ready = [r.index for r in rings if r.queue.enable_interrupts()]
                if ready:
                    return ready
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                for r in rings:
                    r.interrupt_waits += 1
                fired = wait_readable([r.call for r in rings], left)
                if not fired:
                    return []
                for fd in fired:
                    drain_eventfd(fd)
        finally:
            for r in rings:
                r.queue.disable_interrupts()

    # -- dirty logging ----------------------------------------------------------------------

    def vring_addrs(self) -> list[VringAddr]:
        """Every ring's current address, with ``log`` = the guest-physical address of its used
        ring (the device area of a packed ring), as dirty logging wants it (flags clear)."""
        self._check_running()
        return [r.queue.vring_addr(log=r.queue.ring_gpas[2]) for r in self._rings]

    @property
    def dirty_log(self) -> DirtyLog | None:
        """The log while dirty logging is on (owned by the guest), else ``None``."""
        return self._dirty_log

    def start_dirty_log(self) -> DirtyLog:
        """Turn dirty logging on for the running rings; returns the log (the guest's).

        Raises :class:`~vhostkit.errors.FeatureNotNegotiated` when the data plane cannot log
        (no VHOST_F_LOG_ALL; for vhost-user also no LOG_SHMFD negotiated): nothing changed.
        """
        self._check_running()
        if self._dirty_log is not None:
            raise InvalidOperation("dirty logging is already on")
        assert self.memory is not None
        dlog = DirtyLog.allocate(log_size_for(self.memory.regions), name=f"{self.name}-log")
        try:
            self.backend.start_dirty_log(dlog, self.acked_features, self.vring_addrs())
        except BaseException:
            dlog.close()
            raise
        self._dirty_log = dlog
        log.info("%s: dirty logging on (%d pages)", self.name, dlog.pages)
        return dlog

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """The guest pages (4 KiB page numbers, sorted) the data plane wrote since the last
        call; each is cleared as it is taken."""
        if self._dirty_log is None:
            raise InvalidOperation("dirty logging is not on")
        return self._dirty_log.collect()

    def stop_dirty_log(self) -> None:
        """Turn dirty logging off (on running rings: SET_FEATURES without LOG_ALL, the ring
        addresses without VHOST_VRING_F_LOG) and release the log. Idempotent."""
        dlog, self._dirty_log = self._dirty_log, None
        if dlog is None:
            return
        try:
            if self.running:
                self.backend.stop_dirty_log(self.acked_features, self.vring_addrs())
        finally:
            dlog.close()

    # -- moving to another data plane ------------------------------------------------------

    def switch_backend(
        self,
        new: VhostBackend,
        *,
        handover: Callable[[VhostBackend, VhostBackend], None] | None = None,
    ) -> dict[int, int]:
        """Move the running rings to another data plane; returns the positions handed over.

        The old data plane must already have stopped touching the rings where its
        ``get_vring_base`` does not stop them (kernel vhost-net: detach the tap first; see
        :class:`vhostkit.vmm.VirtioNetDevice`, which does the whole move). The old data plane
        is stopped (``get_vring_base`` per ring) and left open for the caller to close. The
        new one gets the same memory table, ring sizes, addresses, positions, kick and call
        eventfds, and must ack the same features: everything the guest already relies on.
        Buffers added while the move happens are not lost: the new data plane starts at the
        positions and every ring is kicked once it runs.

        ``handover(old, new)`` is called once the old data plane is stopped and the new one has
        negotiated, before it gets memory or rings: the moment to move device state
        (vhost-user ``DEVICE_STATE``, see :meth:`vhostkit.vmm.VirtioNetDevice.migrate`).
        """
        self._check_running()
        self._check_not_logging()
        self._check_features(new)
        old = self.backend
        positions = {index: old.get_vring_base(index) for index in self.ring_indices}
        self._hand_over(new, positions, None if handover is None else lambda: handover(old, new))
        log.info("%s: moved to %s at positions %s", self.name, type(new).__name__, positions)
        return positions

    def reconnect(self, new: VhostBackend) -> dict[int, int]:
        """Set the running rings up on ``new`` after their data plane went away; returns the
        positions handed over.

        For a vhost-user back-end that died (killed, crashed) and was started again: the old
        one cannot say where it stopped, so each ring restarts where the device's used index
        stands, as QEMU does when a back-end reconnects without inflight tracking. What the
        old device used is done; what it took from the ring and did not mark used is done
        again by the new one (a transmit buffer may go out twice, a receive buffer is filled
        anew). The device must use buffers in the order they were made available (vhostkit's
        net back-end does). The guest keeps its memory, rings, buffers and eventfds, and
        every ring is kicked once the new data plane runs. Split rings only.

        The old backend is neither stopped nor closed (it is gone): that is the caller's.
        """
        self._check_running()
        if self.packed:
            raise Unsupported("reconnecting packed rings is not done (split rings only)")
        self._check_not_logging()
        self._check_features(new)
        positions = {}
        for ring in self._rings:
            q = ring.queue
            assert isinstance(q, SplitDriverQueue)
            positions[ring.index] = (q.last_used_idx + q.pending_used()) & 0xFFFF
        self._on_reconnect()
        self._hand_over(new, positions)
        log.info("%s: reconnected to %s at positions %s", self.name, type(new).__name__, positions)
        return positions

    def _check_not_logging(self) -> None:
        if self._dirty_log is not None:
            raise InvalidOperation("stop dirty logging before moving to another data plane")

    def _check_features(self, new: VhostBackend) -> None:
        offered = new.get_features()
        missing = self.acked_features & ~offered & ~_PROTOCOL_FEATURES_BIT
        if missing:
            raise Unsupported(
                f"the new data plane lacks features {missing:#x} the guest negotiated; "
                "nothing was changed"
            )

    def _hand_over(
        self,
        new: VhostBackend,
        positions: dict[int, int],
        before_rings: Callable[[], None] | None = None,
    ) -> None:
        """Give ``new`` everything the rings run on, starting at ``positions``; kick them.

        ``before_rings`` runs once ``new`` has negotiated, before it gets memory or rings."""
        assert self.memory is not None
        new.set_owner()
        acked, protocol = new.negotiate(self.acked_features, self.wanted_protocol_features)
        if int(acked) & ~_PROTOCOL_FEATURES_BIT != self.acked_features & ~_PROTOCOL_FEATURES_BIT:
            raise Unsupported(
                f"the new data plane acked {int(acked):#x}, the guest runs {self.acked_features:#x}"
            )
        if before_rings is not None:
            before_rings()
        new.set_mem_table(self.memory.regions)
        for ring in self._rings:
            new.set_vring_num(ring.index, self.queue_size)
            new.set_vring_base(ring.index, positions[ring.index])
            new.set_vring_addr(ring.queue.vring_addr())
            new.set_vring_call(ring.index, ring.call)
            # Enabled before the kick fd starts it: a ring that starts disabled must consume
            # and discard what is queued on it (the spec's rule for net TX), and this ring
            # carries the guest's frames published before and during the move.
            new.set_vring_enable(ring.index, True)
            new.set_vring_kick(ring.index, ring.kick)
        self.acked_protocol_features = int(protocol)
        if self.send_status and self.acked_protocol_features & PROTOCOL_STATUS:
            set_status = getattr(new, "set_status", None)
            if set_status is not None:
                set_status(DRIVER_OK_STATUS)
        self.backend = new
        for ring in self._rings:
            ring.notify()  # whatever was published during the move is picked up now

    # -- stop and close ---------------------------------------------------------------------

    def stop(self) -> dict[int, int]:
        """Stop every ring (``get_vring_base``); returns ``{ring index: position}``.

        Afterwards the rings are not used any more; :meth:`close` still must be called.
        """
        if not self._started or self._closed or self._stopped:
            raise InvalidOperation(f"{type(self).__name__} is not running")
        self._stopped = True
        self._quiesce()
        return {index: self.backend.get_vring_base(index) for index in self.ring_indices}

    def close(self) -> None:
        """Close the eventfds and the guest memory the guest made. Idempotent.

        The backend is borrowed and stays open. Close only after the data plane stopped using
        the rings (:meth:`stop`, or the backend closed), since the memory goes.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._release()
        finally:
            if self._dirty_log is not None:
                self._dirty_log.close()
                self._dirty_log = None
            self._rings = []
            fds, self._fds = self._fds, []
            for fd in fds:
                os.close(fd)
            if self.memory is not None:
                self.memory.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        ring = "packed" if self.packed else "split"
        return f"<{type(self).__name__} {ring} x{self.num_rings} {state}>"
