"""Device state transfer (protocol feature DEVICE_STATE) for ring devices.

:class:`MigratableRingDevice` is a :class:`~vhostkit.user.backend.RingDevice` that implements
``SET_DEVICE_STATE_FD`` and ``CHECK_DEVICE_STATE`` as the vhost-user spec's "Migrating
back-end state" section asks, with the state in :mod:`vhostkit.user.backend.state`'s format.
A device (net, blk) subclasses it, names its :attr:`~MigratableRingDevice.device_type`, and
fills in three hooks: what only it saves (:meth:`~MigratableRingDevice.device_records`), what
it checks a loaded state against (:meth:`~MigratableRingDevice.check_state`) and how it takes
it (:meth:`~MigratableRingDevice.apply_state`). It must offer ``DEVICE_STATE`` itself: this
class never adds a protocol feature.

* Only while the device is *suspended* (every ring stopped with ``GET_VRING_BASE``, or never
  started): a transfer asked for while a ring runs is refused (``EBUSY``).
* **SAVE**: the state is taken at once (the rings are stopped, nothing changes it) into a
  memfd, which goes back in the reply as the back-end's own channel (the spec lets the back-end
  return its own fd, and the front-end must then read that one): it holds the whole state and
  ends in end-of-file, so the reply never waits for the front-end to read a pipe, whatever the
  state's size. The front-end's fd is closed. ``CHECK_DEVICE_STATE`` then answers 0.
* **LOAD**: the front-end writes after the reply, so the back-end cannot read in the request:
  a reader thread takes the front-end's fd, reads to end-of-file (at most
  :data:`~vhostkit.user.backend.state.MAX_STATE_SIZE` bytes) and closes it.
  ``CHECK_DEVICE_STATE`` waits for it (at most :data:`LOAD_TIMEOUT` seconds), decodes the state,
  checks it against this device, and only then applies it; a malformed, truncated or
  wrong-device state is a typed error (a non-zero status for the front-end) and leaves the
  device as it was.
* What a loaded state sets: the device status, each ring's size, position and enabled state,
  the device's own fields (config space), and the chains the source held (taken and not
  completed): when the front-end starts that ring at the saved position, they are handed to
  the device again before anything new (as after a restart with inflight tracking). The
  front-end still sets the memory table, ring addresses, positions and eventfds, as the spec
  says it does on the destination.

vhostkit's devices complete every chain they took before a ring stops, so in practice the held
chains are none and the driver's requests the source did not reach are simply after the
position, in guest memory; the record is there for devices that do hold requests across a stop.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from vhostkit.errors import (
    DeviceStateError,
    DeviceStateMismatch,
    InvalidOperation,
    StateFormatError,
    Unsupported,
)
from vhostkit.user.backend.device import VringInfo
from vhostkit.user.backend.inflight import SplitInflight
from vhostkit.user.backend.ring_device import ActiveRing, DeviceQueue, RingDevice
from vhostkit.user.backend.state import (
    MAX_STATE_SIZE,
    BlkState,
    DeviceState,
    DeviceType,
    NetState,
    RingState,
)
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES, MigrationPhase, TransferDirection
from vhostkit.virtio.split import SplitDeviceQueue

__all__ = ["LOAD_TIMEOUT", "MigratableRingDevice"]

log = logging.getLogger(__name__)

#: How long CHECK_DEVICE_STATE waits for the loaded state's end-of-file.
LOAD_TIMEOUT = 30.0
_RING_PACKED = 1 << 34
_READ_CHUNK = 1 << 16


class _Load:
    """A LOAD under way: the reader thread, and what it read (or why it failed)."""

    def __init__(self, fd: int) -> None:
        self.data: bytes | None = None
        self.error: DeviceStateError | None = None
        self.thread = threading.Thread(
            target=self._read, args=(fd,), name="vhost-state-load", daemon=True
        )

    def _read(self, fd: int) -> None:
        chunks: list[bytes] = []
        total = 0
        try:
            os.set_blocking(fd, True)
            while chunk := os.read(fd, _READ_CHUNK):
                total += len(chunk)
                if total > MAX_STATE_SIZE:
                    raise StateFormatError(f"device state larger than {MAX_STATE_SIZE} bytes")
                chunks.append(chunk)
            self.data = b"".join(chunks)
        except DeviceStateError as exc:
            self.error = exc
        except OSError as exc:
            self.error = DeviceStateError(f"reading the device state: {exc}", errno=exc.errno)
        finally:
            os.close(fd)


class MigratableRingDevice(RingDevice):
    """A ring device whose state moves with ``SET_DEVICE_STATE_FD`` (see the module docs)."""

    #: which device this is; a state of another type is refused
    device_type: DeviceType

    def __init__(self, **kwargs: object) -> None:
        #: per ring stopped by GET_VRING_BASE: (position, heads taken and not completed)
        self._held: dict[int, tuple[int, tuple[int, ...]]] = {}
        #: per ring of a loaded state: (position, heads to take again when it starts there)
        self._resume: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._transfer: TransferDirection | None = None
        self._load: _Load | None = None
        #: the last state loaded (for inspection)
        self.loaded_state: DeviceState | None = None
        super().__init__(**kwargs)  # type: ignore[arg-type]

    # -- hooks for the device --

    def device_records(self) -> tuple[NetState | None, BlkState | None]:
        """The device's own records for a SAVE: ``(net, blk)``."""
        raise NotImplementedError

    def check_state(self, state: DeviceState) -> None:
        """Raise :class:`DeviceStateMismatch` if this device cannot take ``state`` (it is
        well-formed and of this device type already). Must not change anything."""

    def apply_state(self, state: DeviceState) -> None:
        """Take the device's own part of a checked ``state`` (config space and the like)."""

    # -- saving --

    def ring_stopped(self, ring: VringInfo) -> int:
        active = self.active.get(ring.index)
        position = super().ring_stopped(ring)
        held: tuple[int, ...] = ()
        if active is not None and active.error is None:
            held = tuple(active.queue.inflight)
        self._held[ring.index] = (position, held)
        return position

    def _suspended_check(self, what: str) -> None:
        running = [r.index for r in self.vrings if r.started] or sorted(self.active)
        if running:
            raise InvalidOperation(
                f"{what}: the device is not suspended, ring(s) {running} run "
                "(stop them with GET_VRING_BASE first)",
                errno=errno.EBUSY,
            )

    def save_state(self) -> DeviceState:
        """The state of this (suspended) device, as a SAVE sends it."""
        self._suspended_check("SAVE")
        packed = bool(self.acked_features & _RING_PACKED)
        rings = []
        for info in self.vrings:
            if not info.num:
                continue  # never set up
            held: tuple[int, ...] = ()
            saved = self._held.get(info.index)
            if saved is not None and saved[0] == info.base:
                held = saved[1]
            if held and packed:
                raise DeviceStateError(
                    f"ring {info.index} holds {len(held)} chains of a packed ring: "
                    "the state format cannot carry them"
                )
            rings.append(
                RingState(info.index, info.num, info.base, info.enabled, packed, tuple(held))
            )
        net, blk = self.device_records()
        return DeviceState(
            device=self.device_type,
            features=self.acked_features,
            config=bytes(self.config),
            status=self.status & 0xFF,
            rings=tuple(rings),
            net=net,
            blk=blk,
        )

    # -- loading --

    def load_state(self, state: DeviceState) -> None:
        """Check ``state`` against this device, then take it (all or nothing)."""
        self._suspended_check("LOAD")
        if state.device is not self.device_type:
            raise DeviceStateMismatch(
                f"a {state.device.name} state given to a {self.device_type.name} device"
            )
        core = ~VHOST_USER_F_PROTOCOL_FEATURES
        if state.features & ~self.offered_features:
            raise DeviceStateMismatch(
                f"the source ran features {state.features & ~self.offered_features:#x} "
                "this device does not offer"
            )
        if self.acked_features and (self.acked_features ^ state.features) & core:
            raise DeviceStateMismatch(
                f"the front-end acked {self.acked_features:#x} here, the source ran "
                f"{state.features:#x}"
            )
        packed = bool(state.features & _RING_PACKED)
        for r in state.rings:
            if r.index >= self.num_queues:
                raise DeviceStateMismatch(
                    f"ring {r.index} saved, this device has {self.num_queues} rings"
                )
            if r.num > self.max_queue_size:
                raise DeviceStateMismatch(f"ring {r.index} of {r.num} entries is too large here")
            if r.packed != packed:
                raise DeviceStateMismatch(f"ring {r.index}: layout does not match the features")
        if len(state.config) != len(self.config):
            raise DeviceStateMismatch(
                f"config space of {len(state.config)} bytes, this device has {len(self.config)}"
            )
        self.check_state(state)
        # checked: from here on nothing refuses
        self.status = state.status
        self._resume = {}
        for r in state.rings:
            info = self.vrings[r.index]
            info.num, info.base = r.num, r.base
            self.set_vring_enable(r.index, r.enabled)
            self._resume[r.index] = (r.base, r.inflight)
        self.apply_state(state)
        self.loaded_state = state
        log.info(
            "device state loaded: %s, features %#x, rings %s",
            state.device.name,
            state.features,
            {r.index: r.base for r in state.rings},
        )
        self._changed()

    def _track_inflight(self, active: ActiveRing, queue: DeviceQueue) -> None:
        # RingDevice calls this once the ring's queue is built and before its worker starts:
        # the one moment to hand the source's held chains back to the device.
        super()._track_inflight(active, queue)
        resume = self._resume.pop(active.index, None)
        if resume is None or not resume[1]:
            return
        position, heads = resume
        if active.info.base != position:
            log.warning(
                "ring %d starts at %#x, the loaded state stopped at %#x: the %d chains it held "
                "are not taken again",
                active.index,
                active.info.base,
                position,
                len(heads),
            )
            return
        if active.resubmitted is not None or not isinstance(queue, SplitDeviceQueue):
            log.warning("ring %d: held chains left to the inflight area", active.index)
            return
        active.resubmitted = queue.resubmit(heads, position)
        if isinstance(active.inflight, SplitInflight):
            active.inflight.popped(list(heads))
        log.info("ring %d: taking again %d chains the source held", active.index, len(heads))

    # -- the requests --

    def set_device_state_fd(
        self, direction: TransferDirection, phase: MigrationPhase, fd: int
    ) -> int | None:
        if phase is not MigrationPhase.STOPPED:
            raise Unsupported(f"device state transfer in phase {phase}")
        if self._load is not None and self._load.thread.is_alive():
            raise InvalidOperation("a device state load is still under way", errno=errno.EBUSY)
        self._transfer, self._load = None, None
        if direction is TransferDirection.SAVE:
            data = self.save_state().pack()
            channel = os.memfd_create("vhostkit-device-state", os.MFD_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(channel, view) :]
                os.lseek(channel, 0, os.SEEK_SET)
            except BaseException:
                os.close(channel)
                raise
            os.close(fd)  # the front-end reads ours instead
            self._transfer = direction
            log.info("device state saved: %d bytes", len(data))
            return channel
        self._suspended_check("LOAD")
        load = _Load(fd)
        load.thread.start()  # the thread owns the fd from here
        self._transfer, self._load = direction, load
        return None

    def check_device_state(self) -> None:
        direction, load = self._transfer, self._load
        self._transfer, self._load = None, None
        if direction is None:
            raise InvalidOperation("no device state transfer to check")
        if direction is TransferDirection.SAVE:
            return
        assert load is not None
        load.thread.join(LOAD_TIMEOUT)
        if load.thread.is_alive():
            raise DeviceStateError(
                f"the front-end did not finish the device state in {LOAD_TIMEOUT:.0f}s "
                "(its end of the channel is still open)",
                errno=errno.ETIMEDOUT,
            )
        if load.error is not None:
            raise load.error
        assert load.data is not None
        self.load_state(DeviceState.unpack(load.data))

    # -- lifetime --

    def _reset_state(self) -> None:
        super()._reset_state()
        self._held = {}
        self._resume = {}
        self._transfer = None
        self._load = None

    def reset_device(self) -> None:
        super().reset_device()
        self._held, self._resume = {}, {}
