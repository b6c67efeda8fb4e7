"""The back-end daemon framework: ring workers on top of :class:`BackendDevice`.

:class:`RingDevice` turns the ring state the front-end sets up into running device-role
virtqueues. When a ring starts (it has memory, addresses and a kick fd, or polling mode) the
device builds a split or packed :mod:`device-role queue <vhostkit.virtio.split>` at the ring's
base and starts one worker thread for it. The worker sleeps on the kick eventfd (``poll``), and
on every kick calls :meth:`RingDevice.process` with notifications suppressed, then re-enables
them and checks once more (so a kick that raced with the re-enable is never lost).
``GET_VRING_BASE`` stops the worker and returns the queue's position; several rings run in
parallel.

A device subclasses :class:`RingDevice` and implements :meth:`RingDevice.process`: pop a
batch from ``ring.queue``, do the work, ``ring.complete(ids, lengths)``. Completing signals the
call eventfd when the driver asked for it (event index or flags).

A malformed ring (:class:`VirtqueueError`) stops only that ring's worker, which then signals
the ring's error eventfd (or the in-band VRING_ERR), sets ``DEVICE_NEEDS_RESET`` in the status
GET_STATUS reports and, with ``BACKEND_REQ`` and ``CONFIG``, sends CONFIG_CHANGE_MSG so the
driver looks (:meth:`BackendDevice.device_needs_reset`); the other rings keep running.

Safety of fds and memory while rings run: each ring has a lock that its worker holds while it
processes and signals. Replacing a ring's call/err fd, the memory table, or stopping the ring
takes that lock, so a worker never writes to a closed (or reused) fd number or to unmapped
memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostkit._frames import without_frames
from vhostkit.errors import InvalidOperation, VhostError, VirtqueueError
from vhostkit.types import VHOST_VRING_F_LOG, MemoryRegion, VringAddr
from vhostkit.user.backend.device import DEFAULT_PROTOCOL_FEATURES, BackendDevice, VringInfo
from vhostkit.user.backend.inflight import (
    PackedInflight,
    SplitInflight,
    packed_queue_region_size,
    split_queue_region_size,
)
from vhostkit.user.backend_req_handler import InflightArea
from vhostkit.user.message import InflightDesc, ProtocolFeature
from vhostkit.virtio.dirty_log import DirtyLog
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue
from vhostkit.virtio.ring import ChainBatch
from vhostkit.virtio.split import SplitDeviceQueue

__all__ = ["ActiveRing", "RingDevice", "SinkDevice"]

log = logging.getLogger(__name__)

_RING_PACKED = 1 << 34
#: Poll timeout in polling mode (no kick fd): how often an idle polled ring looks again.
POLL_INTERVAL_MS = 1

DeviceQueue = SplitDeviceQueue | PackedDeviceQueue


@dataclass(eq=False)
class ActiveRing:
    """A started ring: its device-role queue and its worker.

    It owns only its control eventfd (:attr:`ctl_fd`); the kick, call and err fds are
    borrowed from :attr:`info`, which alone closes them.
    """

    info: VringInfo
    queue: DeviceQueue
    device: RingDevice
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: the worker's control eventfd: written to stop it or to make it look again
    ctl_fd: int = -1
    #: set before ``ctl_fd`` is written to stop the worker
    stopping: bool = False
    #: how many threads wait for :attr:`lock` (while non-zero, :meth:`pop_batch` hands out
    #: nothing, so a busy worker finishes its round and lets them in)
    waiters: int = 0
    thread: threading.Thread | None = None
    signals: int = 0
    error: BaseException | None = None
    #: whether the front-end was told that this ring broke (its err fd, NEEDS_RESET)
    error_reported: bool = False
    #: whether the worker should also wake on :meth:`RingDevice.wake_fds` (a device clears it
    #: while it cannot take more input, e.g. no receive buffers, and waits for a kick instead)
    extra_wanted: bool = True
    #: inflight tracking of this ring (INFLIGHT_SHMFD negotiated and an area given)
    inflight: SplitInflight | PackedInflight | None = None
    #: chains a previous back-end took and never completed, handed out first
    resubmitted: ChainBatch | None = None

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def enabled(self) -> bool:
        return self.info.enabled

    def signal(self) -> None:
        """Interrupt the driver: write the call eventfd (or the in-band VRING_CALL)."""
        self.signals += 1
        fd = self.info.call_fd
        if fd is not None:
            os.eventfd_write(fd, 1)
        elif self.device.inband_notifications and self.device.backend_channel is not None:
            self.device.backend_channel.vring_call(self.index)

    @property
    def interrupted(self) -> bool:
        """True when the worker should end its round (stopping, or someone waits for the
        ring's lock): :meth:`pop_batch` then returns empty batches."""
        return self.stopping or self.waiters > 0

    def pop_batch(self, max_chains: int | None = None, *, force: bool = False) -> ChainBatch:
        """Take available chains (first any resubmitted after a restart), tracked in flight.

        Devices should pop through here rather than ``ring.queue`` so that inflight tracking
        sees every chain. While :attr:`interrupted` the batch is empty (a device's loop then
        ends), unless ``force`` (a device finishing a unit of work it already started).
        """
        if self.interrupted and not force:
            return self.queue.pop_batch(max_chains=0)
        if self.resubmitted is not None:
            batch = self.resubmitted
            if max_chains is not None and len(batch) > max_chains:
                batch, rest = batch.split(max_chains)
                self.resubmitted = rest
            else:
                self.resubmitted = None
            return batch
        queue = self.queue
        batch = queue.pop_batch(max_chains)
        tracker = self.inflight
        if tracker is not None and len(batch):
            if isinstance(tracker, PackedInflight):
                tracker.popped(*queue.last_popped)  # type: ignore[union-attr]
            else:
                tracker.popped(batch.ids)
        return batch

    @property
    def can_unpop(self) -> bool:
        """Whether :meth:`unpop` may be used: not while the ring's chains are tracked in an
        inflight area (which recorded them as taken) or resubmitted ones are handed out."""
        return self.inflight is None and self.resubmitted is None

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains of the last :meth:`pop_batch` (none completed):
        the next pop takes them again. Only when :attr:`can_unpop`."""
        if not self.can_unpop:
            raise InvalidOperation("chains tracked in flight cannot be given back")
        self.queue.unpop(count)

    def complete(
        self,
        ids: Sequence[int] | npt.NDArray[np.integer],
        lengths: Sequence[int] | npt.NDArray[np.integer],
    ) -> None:
        """Put a batch in the used ring and signal if the driver wants it."""
        tracker = self.inflight
        if tracker is not None:
            tracker.completing(ids)
        queue = self.queue
        want = queue.complete(ids, lengths)
        if queue.logs_ring:
            # the used-ring update is in the log: tell the front-end, as vhost's log_ctx does
            fd = self.device.log_call_fd
            if fd is not None:
                os.eventfd_write(fd, 1)
        if tracker is not None:
            if isinstance(tracker, PackedInflight):
                tracker.completed(ids)
            else:
                tracker.completed(ids, self.queue.used_idx)  # type: ignore[union-attr]
        if want:
            self.signal()

    def signal_error(self) -> None:
        fd = self.info.err_fd
        if fd is not None:
            os.eventfd_write(fd, 1)
        elif self.device.inband_notifications and self.device.backend_channel is not None:
            self.device.backend_channel.vring_err(self.index)


class RingDevice(BackendDevice):
    """A :class:`BackendDevice` whose started rings are served by worker threads.

    Subclasses implement :meth:`process`. ``process`` is only called for enabled rings; a
    device that must consume from disabled rings too (virtio-net TX) overrides
    :meth:`process_disabled`.
    """

    def __init__(self, *, busy_poll: float = 0.0, **kwargs: object) -> None:
        self.active: dict[int, ActiveRing] = {}
        self._inflight_map: GuestMemory | None = None
        #: seconds a worker keeps polling a ring that ran dry before it re-enables kicks and
        #: sleeps (0: sleep at once). Like vhost-net's ``busyloop_timeout``: while the driver
        #: keeps the ring busy, it neither kicks nor waits for the worker to wake up.
        self.busy_poll = busy_poll
        # The queues log every write (see "dirty logging" below): VHOST_F_LOG_ALL is offered
        # wherever the log can be shared (LOG_SHMFD), and only there.
        protocol = int(kwargs.get("protocol_features", DEFAULT_PROTOCOL_FEATURES))  # type: ignore[call-overload]
        features = int(kwargs.get("features", 0))  # type: ignore[call-overload]
        if protocol & ProtocolFeature.LOG_SHMFD:
            kwargs["features"] = features | VirtioFeature.LOG_ALL
        else:
            kwargs["features"] = features & ~VirtioFeature.LOG_ALL
        super().__init__(**kwargs)  # type: ignore[arg-type]

    @property
    def inband_notifications(self) -> bool:
        return bool(self.acked_protocol_features & ProtocolFeature.INBAND_NOTIFICATIONS)

    # -- the hook devices implement --

    def process(self, ring: ActiveRing) -> bool | None:
        """Handle what is pending on ``ring`` (called by its worker, under ``ring.lock``).

        Return ``True`` or ``None`` when the ring itself ran dry (the worker re-enables
        notifications and looks again, so a racing kick is never lost); ``False`` when it
        stopped for another reason (an input fd from :meth:`wake_fds` has nothing more).
        """
        raise NotImplementedError

    def wake_fds(self, ring: ActiveRing) -> list[int]:
        """Fds besides the kick that should wake ``ring``'s worker (e.g. a tap to read)."""
        return []

    def process_disabled(self, ring: ActiveRing) -> None:
        """Called instead of :meth:`process` while the ring is started but disabled."""

    # -- building and running queues --

    def _make_queue(self, info: VringInfo) -> DeviceQueue:
        if self.memory is None or info.addr is None:
            raise InvalidOperation(f"ring {info.index} has no memory or addresses")
        cls = PackedDeviceQueue if self.acked_features & _RING_PACKED else SplitDeviceQueue
        addr: VringAddr = info.addr
        return cls.from_vring_addr(
            self.memory, info.num, addr, features=self.acked_features, base=info.base
        )

    def ring_started(self, ring: VringInfo) -> None:
        try:
            queue = self._make_queue(ring)
        except VhostError as exc:
            log.error("ring %d cannot start: %s", ring.index, exc)
            ring.started = False
            raise
        active = ActiveRing(ring, queue, self)
        self._log_ring(active, self.dirty_log, ring.addr)
        self._track_inflight(active, queue)
        log.debug("ring %d runs from %s", ring.index, _positions(queue))
        active.ctl_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.active[ring.index] = active
        self._start_worker(active)

    # -- inflight tracking --

    def _inflight_area(self) -> GuestMemory | None:
        """The inflight area, mapped (once per fd)."""
        if not self.acked_protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            return None
        if self.inflight_fd is None or self.inflight_desc is None:
            return None
        if self._inflight_map is None:
            desc = self.inflight_desc
            self._inflight_map = GuestMemory.map_regions(
                [MemoryRegion(0, desc.mmap_size, 0, desc.mmap_offset, self.inflight_fd)]
            )
        return self._inflight_map

    def _drop_inflight_map(self) -> None:
        if self._inflight_map is not None:
            self._inflight_map.close()
            self._inflight_map = None

    def _track_inflight(self, active: ActiveRing, queue: DeviceQueue) -> None:
        area = self._inflight_area()
        if area is None:
            return
        desc = self.inflight_desc
        assert desc is not None  # the area is mapped from it
        if queue.num > desc.queue_size or active.index >= desc.num_queues:
            # The area was sized by GET_INFLIGHT_FD for num_queues rings of queue_size
            # descriptors ("Inflight I/O tracking", vhost-user spec): it has no room for this
            # ring's descriptors. QEMU 7.2 does send such a ring: on virtio-mmio it tells the
            # driver QueueNumMax = 1024 whatever the device's queue-size, Linux takes 1024,
            # and vhost-user-blk still asks for an area of queue-size (128) descriptors. The
            # ring runs untracked (a restarted back-end cannot resubmit its requests) rather
            # than not at all, or tracked over the next rings' regions.
            log.warning(
                "ring %d (%d descriptors) does not fit the inflight area (%d rings of %d): "
                "its requests are not tracked",
                active.index,
                queue.num,
                desc.num_queues,
                desc.queue_size,
            )
            return
        if isinstance(queue, PackedDeviceQueue):
            self._track_packed(active, queue, area)
            return
        size = split_queue_region_size(queue.num)
        view = area.gpa_view(active.index * size, size)
        fresh = view[8:10] == b"\0\0"  # version 0: nobody used this region yet
        tracker = SplitInflight(view, queue.num)
        active.inflight = tracker
        if fresh:
            tracker.completed([], queue.used_idx)
            return
        heads = tracker.recover(queue.used_idx)
        if heads:
            resume = (queue.used_idx + len(heads)) & 0xFFFF
            active.resubmitted = queue.resubmit(heads, resume)
            log.info(
                "ring %d: resubmitting %d inflight chains %s, resuming at avail %d",
                active.index,
                len(heads),
                heads,
                resume,
            )
        elif queue.last_avail_idx != queue.used_idx:
            # nothing was in flight: everything taken was completed
            queue.resubmit([], queue.used_idx)

    def _track_packed(
        self, active: ActiveRing, queue: PackedDeviceQueue, area: GuestMemory
    ) -> None:
        size = packed_queue_region_size(queue.num)
        view = area.gpa_view(active.index * size, size)
        fresh = view[8:10] == b"\0\0"  # version 0: nobody used this region yet
        tracker = PackedInflight(view, queue.num)
        active.inflight = tracker
        if fresh:
            tracker.set_used_position(*queue.used_position)
            return
        # the region, not SET_VRING_BASE, knows the used position: a front-end whose back-end
        # crashed cannot know it for a packed ring (no used index in guest memory)
        rec = tracker.recover(queue.ring_flags)
        batch = queue.resubmit(rec.descs, rec.counts, rec.used_idx, rec.used_wrap)
        if rec.heads:
            active.resubmitted = batch
            log.info(
                "ring %d: resubmitting %d inflight chains (ids %s), used %s, resuming at avail %s",
                active.index,
                len(rec.heads),
                batch.ids.tolist(),
                queue.used_position,
                queue.avail_position,
            )

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        self._drop_inflight_map()
        return super().get_inflight_fd(num_queues, queue_size)

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        self._drop_inflight_map()
        super().set_inflight_fd(desc, fd)

    def _start_worker(self, active: ActiveRing) -> None:
        t = threading.Thread(
            target=self._worker, args=(active,), name=f"vhost-ring-{active.index}", daemon=True
        )
        active.thread = t
        t.start()

    def _stop_worker(self, active: ActiveRing) -> None:
        if active.thread is not None and active.thread.is_alive():
            active.stopping = True
            os.eventfd_write(active.ctl_fd, 1)
            active.thread.join()
        active.thread = None
        active.stopping = False
        # drain the control counter so a restarted worker does not stop at once
        try:
            os.eventfd_read(active.ctl_fd)
        except BlockingIOError:
            pass

    @contextlib.contextmanager
    def _holding(self, active: ActiveRing) -> Iterator[None]:
        """Hold ``active.lock``, making a busy worker end its round first; wake it after."""
        active.waiters += 1
        try:
            with active.lock:
                yield
        finally:
            active.waiters -= 1
            if active.thread is not None:
                os.eventfd_write(active.ctl_fd, 1)

    def _retire(self, index: int) -> ActiveRing | None:
        active = self.active.pop(index, None)
        if active is not None:
            self._stop_worker(active)
            os.close(active.ctl_fd)
        return active

    def ring_stopped(self, ring: VringInfo) -> int:
        active = self._retire(ring.index)
        if active is None or active.error is not None:
            return ring.base
        log.debug("ring %d stopped at %s", ring.index, _positions(active.queue))
        return active.queue.get_base()

    def _wake(self, index: int) -> None:
        """Make the worker look at its ring again (after enable, or a config change)."""
        active = self.active.get(index)
        if active is not None and active.thread is not None:
            os.eventfd_write(active.ctl_fd, 1)

    def _worker(self, active: ActiveRing) -> None:
        info = active.info
        poller = select.poll()
        poller.register(active.ctl_fd, select.POLLIN)
        kick = info.kick_fd
        if kick is not None:
            poller.register(kick, select.POLLIN)
        timeout = None if kick is not None else POLL_INTERVAL_MS
        extra = self.wake_fds(active)
        registered = False
        try:
            if active.error is not None:
                # broken while its worker was stopped (a memory table it cannot follow)
                if not active.error_reported:
                    self._report_broken(active)
                return
            with active.lock:
                self._run_once(active)
            while True:
                if active.extra_wanted != registered:
                    for fd in extra:
                        if active.extra_wanted:
                            poller.register(fd, select.POLLIN)
                        else:
                            poller.unregister(fd)
                    registered = active.extra_wanted
                events = poller.poll(timeout)
                for fd, _ in events:
                    if fd == active.ctl_fd:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                if active.stopping:
                    return
                for fd, ev in events:
                    if fd == kick:
                        if ev & (select.POLLNVAL | select.POLLERR | select.POLLHUP):
                            log.warning("ring %d: kick fd went away", info.index)
                            return
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                with active.lock:
                    self._run_once(active)
        except VirtqueueError as exc:
            log.error("ring %d is broken: %s", info.index, exc)
            active.error = without_frames(exc)  # the frames hold views of guest memory
            self._report_broken(active)
        except BaseException as exc:
            log.exception("ring %d worker failed", info.index)
            active.error = without_frames(exc)
            self._report_broken(active)
        finally:
            self._changed()

    def _report_broken(self, active: ActiveRing) -> None:
        """Tell the front-end that ``active`` broke (from its worker's thread): NEEDS_RESET
        in the status and a config change, then its error eventfd (or in-band VRING_ERR):
        whoever sees the error sees the status too."""
        active.error_reported = True
        self.device_needs_reset()
        try:
            with active.lock:
                active.signal_error()
        except (OSError, VhostError):
            log.exception("ring %d: could not signal the error", active.index)

    def _run_once(self, active: ActiveRing) -> None:
        """Process until the ring is empty with notifications re-enabled."""
        if active.error is not None:
            return
        queue = active.queue
        budget = self.busy_poll
        try:
            while True:
                if not active.info.enabled:
                    self.process_disabled(active)
                    return
                queue.disable_notifications()
                drained = self.process(active) is not False
                if drained and budget > 0 and _spin(active, queue, budget):
                    continue  # more came while polling: no kick was needed
                if not queue.enable_notifications() or not drained or active.interrupted:
                    return
        finally:
            self.notify_waiters()

    # -- dirty logging --
    #
    # Each running ring's queue logs its writes itself (DeviceRole.start_logging); the device
    # decides when: VHOST_F_LOG_ALL acked and a log mapped; the ring's own writes too when its
    # SET_VRING_ADDR had VHOST_VRING_F_LOG. A change (SET_FEATURES, SET_LOG_BASE, SET_VRING_ADDR)
    # reaches a running ring between two rounds of its worker (under its lock), so a queue
    # never marks into a log being unmapped.

    def _log_ring(self, active: ActiveRing, dlog: DirtyLog | None, addr: VringAddr | None) -> None:
        """Turn ``active``'s logging on or off for ``dlog`` and ``addr`` (caller holds the
        ring, or its worker does not run yet)."""
        queue = active.queue
        wanted = dlog is not None and bool(self.acked_features & VirtioFeature.LOG_ALL)
        if not wanted or dlog is None:
            if queue.logging:
                queue.stop_logging()
                log.info("ring %d: dirty logging off", active.index)
            return
        ring_log = addr.log if addr is not None and addr.flags & VHOST_VRING_F_LOG else None
        was = queue.logging
        queue.start_logging(dlog, ring_log)
        if not was:
            log.info(
                "ring %d: dirty logging on (ring writes %s)",
                active.index,
                "off" if ring_log is None else f"at {ring_log:#x}",
            )

    def _relog(self, dlog: DirtyLog | None) -> None:
        """Apply the logging state with ``dlog`` to every running ring."""
        for active in list(self.active.values()):
            with self._holding(active):
                self._log_ring(active, dlog, active.info.addr)

    def check_log(self, new: DirtyLog) -> None:
        super().check_log(new)
        # every running ring's own log range must fit too, if it is to be logged
        for active in self.active.values():
            addr = active.info.addr
            if addr is not None and addr.flags & VHOST_VRING_F_LOG:
                active.queue.check_ring_log(new, addr.log)

    def install_log(self, new: DirtyLog | None) -> DirtyLog | None:
        self._relog(new)
        return super().install_log(new)

    def install_log_call(self, fd: int | None) -> int | None:
        # no worker may signal the old fd once it is closed
        with contextlib.ExitStack() as stack:
            for active in list(self.active.values()):
                stack.enter_context(self._holding(active))
            return super().install_log_call(fd)

    def set_features(self, features: int) -> None:
        # QEMU starts and stops logging on running rings with a SET_FEATURES that only
        # toggles VHOST_F_LOG_ALL: nothing else changes, positions and chains in flight stay
        super().set_features(features)
        self._relog(self.dirty_log)

    def set_vring_addr(self, addr: VringAddr) -> None:
        active = self.active.get(addr.index)
        if active is None:
            super().set_vring_addr(addr)
            return
        old = active.info.addr
        if old is None or (addr.desc, addr.used, addr.avail) != (old.desc, old.used, old.avail):
            raise InvalidOperation(
                f"SET_VRING_ADDR would move running ring {addr.index}: stop it first "
                "(GET_VRING_BASE)"
            )
        # the same ring, another log flag or address (how QEMU turns used-ring logging on
        # and off on a running ring): the queue keeps its positions and chains in flight
        with self._holding(active):
            self._log_ring(active, self.dirty_log, addr)
            active.info.addr = addr
        self._changed()

    # -- state changes that touch a running ring --

    def set_vring_enable(self, index: int, enable: bool) -> None:
        super().set_vring_enable(index, enable)
        if enable:
            self._wake(index)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        active = self.active.get(index)
        if active is None:
            super().set_vring_call(index, fd)
            return
        with self._holding(active):
            super().set_vring_call(index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        active = self.active.get(index)
        if active is None:
            super().set_vring_err(index, fd)
            return
        with self._holding(active):
            super().set_vring_err(index, fd)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        active = self.active.get(index)
        if active is None:
            super().set_vring_kick(index, fd)
            return
        # The worker polls the old fd: stop it, swap, start a new worker on the same queue.
        # If the swap is refused the ring is still started: its worker comes back on
        # whatever kick the ring kept (none: it polls), or the ring would hang for good.
        self._stop_worker(active)
        try:
            super().set_vring_kick(index, fd)
        finally:
            if self.active.get(index) is active:
                self._start_worker(active)

    def set_mem_table(self, regions: tuple) -> None:  # type: ignore[type-arg]
        # Running rings move to the new memory with all their state: their positions, and the
        # chains a device still holds (completing one later must find it in flight).
        paused = list(self.active.values())
        for active in paused:
            self._stop_worker(active)
            active.lock.acquire()
        try:
            super().set_mem_table(regions)
            assert self.memory is not None
            for active in paused:
                try:
                    active.queue.rebind(self.memory)
                except VirtqueueError as exc:
                    # the table was taken; only this ring cannot follow it (its restarted
                    # worker reports it: not this thread, which owes the front-end a reply)
                    log.error("ring %d is broken: %s", active.index, exc)
                    active.error = without_frames(exc)
        finally:
            for active in paused:
                active.lock.release()
                self._start_worker(active)

    # -- lifetime --

    def _stop_all(self) -> None:
        for index in list(self.active):
            self._retire(index)

    def reset_device(self) -> None:
        self._stop_all()
        super().reset_device()

    def _release(self) -> None:
        self._stop_all()
        self._drop_inflight_map()
        super()._release()


def _spin(active: ActiveRing, queue: DeviceQueue, budget: float) -> bool:
    """Poll ``queue`` for up to ``budget`` seconds; True when chains became available."""
    has_pending = queue.has_pending
    clock = time.perf_counter
    deadline = clock() + budget
    while not active.interrupted:
        if has_pending():
            return True
        if clock() >= deadline:
            return False
    return False


class SinkDevice(RingDevice):
    """A device that consumes every chain and completes it unchanged (length 0).

    Counts what it saw: useful as a benchmark sink and as a reference device.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chains = [0] * self.num_queues
        self.bytes = [0] * self.num_queues

    def process(self, ring: ActiveRing) -> None:
        index = ring.index
        chains, nbytes = self.chains, self.bytes
        pop, complete = ring.pop_batch, ring.complete
        zeros = np.zeros(0, dtype=np.uint32)
        while True:
            batch = pop()
            n = len(batch)
            if not n:
                return
            chains[index] += n
            nbytes[index] += batch.readable_total()
            if zeros.shape[0] < n:
                zeros = np.zeros(max(n, ring.queue.num), dtype=np.uint32)
            complete(batch.ids, zeros[:n])


def _positions(queue: DeviceQueue) -> str:
    """Where ``queue`` stands, for the log: next avail entry to take, used index written."""
    if isinstance(queue, PackedDeviceQueue):
        return f"avail {queue.avail_position}, used {queue.used_position}"
    return f"avail {queue.get_base()}, used {queue.used_idx}, in flight {len(queue.inflight)}"
