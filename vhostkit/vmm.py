"""The VMM side: a virtio-net device whose data plane can be swapped while it runs.

:class:`VirtioNetDevice` holds what a VMM holds for a virtio-net device: guest memory, the
rings and their kick/call eventfds (here a :class:`~vhostkit.guest.net.VirtioNetDriver`
plays the guest, so frames can be sent and received from a script) and a data plane behind
the generic :class:`~vhostkit.backend.VhostBackend` calls. :meth:`VirtioNetDevice.swap` moves
the device to another data plane without the guest noticing:

1. the old data plane stops touching the rings (kernel vhost-net: the tap is detached, since
   the kernel's ``GET_VRING_BASE`` reads the position without stopping a ring; vhost-user:
   ``GET_VRING_BASE`` stops it);
2. the ring positions are read (``GET_VRING_BASE``);
3. the new data plane gets the same memory table, ring sizes, addresses, positions, kick and
   call eventfds (:meth:`VirtioGuest.switch_backend`), then the tap is attached (kernel) — a
   vhost-user back-end already has its own handle on the tap;
4. every ring is kicked once, so what the guest queued during the move is picked up.

:meth:`VirtioNetDevice.reconnect` is the same move when the old data plane cannot take part
(its vhost-user back-end was killed): the positions come from the rings' used indices.

Frames that reached the tap during the move wait in the tap's queue and are read by the new
data plane; buffers the guest published during the move are processed from the positions on.

:meth:`VirtioNetDevice.migrate` is the same move between two vhost-user back-ends that also
carries the back-end's own state (protocol feature ``DEVICE_STATE``, the vhost-user spec's
"Migrating back-end state"): once the old back-end's rings are stopped its state is saved
(``SET_DEVICE_STATE_FD`` SAVE, read to end-of-file, ``CHECK_DEVICE_STATE``) and loaded into the
new back-end (LOAD, ``CHECK_DEVICE_STATE``) before it gets memory and rings.

Live migration starts with dirty logging, on either plane through the same calls
(:meth:`VirtioNetDevice.start_dirty_log`, :meth:`~VirtioNetDevice.collect_dirty`,
:meth:`~VirtioNetDevice.stop_dirty_log`): the data plane marks in a shared bitmap every page of
guest memory it writes (received frames, used rings), and the VMM copies those pages again.
Kernel vhost-net gets the log's address (``VHOST_SET_LOG_BASE``), a vhost-user back-end its
memfd (``SET_LOG_BASE``, which needs the LOG_SHMFD protocol feature: the device asks for it).

Data planes (:class:`NetDataPlane`):

* :class:`KernelNetPlane`: ``/dev/vhost-net`` with a tap (one tap queue per queue pair);
* :class:`VhostUserNetPlane`: a vhost-user back-end through a :class:`~vhostkit.user.Frontend`;
* :class:`LocalNetPlane`: vhostkit's own :class:`~vhostkit.devices.net.NetDevice` on the same
  tap, served in this process (a vhost-user data plane with no second process).
"""

from __future__ import annotations

import abc
import logging
import threading
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation, Unsupported
from vhostkit.guest.net import DEFAULT_PROTOCOL_FEATURES, VirtioNetDriver
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.dirty_log import DirtyLog

if TYPE_CHECKING:
    from vhostkit.kernel import Tap, VhostNet
    from vhostkit.user import Frontend

__all__ = [
    "KernelNetPlane",
    "LocalNetPlane",
    "NetDataPlane",
    "VhostUserNetPlane",
    "VirtioNetDevice",
]

log = logging.getLogger(__name__)

#: The vhost-user LOG_SHMFD protocol feature bit (1): the dirty log travels as a file.
_LOG_SHMFD = 1 << 1


class NetDataPlane(abc.ABC):
    """A data plane for a virtio-net device: a :class:`VhostBackend` and how the tap is wired."""

    name = "data plane"

    @property
    @abc.abstractmethod
    def backend(self) -> VhostBackend:
        """The backend the device's rings are handed to."""

    def attach(self, nic: VirtioNetDriver) -> None:
        """Called once the rings are set up on this data plane: connect it to the network."""
        return None

    def detach(self, nic: VirtioNetDriver) -> None:
        """Called before the ring positions are read: stop it touching the rings."""
        return None

    def close(self) -> None:
        """Release the data plane (its device fd or its connection)."""
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class KernelNetPlane(NetDataPlane):
    """Kernel vhost-net with a tap; queue pair *i* uses tap queue *i*.

    The tap is borrowed (the caller closes it). ``vhost_net`` is opened here unless given.
    """

    name = "kernel vhost-net"

    def __init__(self, tap: Tap, vhost_net: VhostNet | None = None) -> None:
        from vhostkit.kernel import VhostNet

        self.tap = tap
        self.net = vhost_net if vhost_net is not None else VhostNet()
        self._attached: list[int] = []

    @property
    def backend(self) -> VhostBackend:
        return self.net

    def attach(self, nic: VirtioNetDriver) -> None:
        from vhostkit.kernel.tap import offload_for_features

        # The tap must speak the guest's header and offer only what the guest can take.
        self.tap.set_vnet_hdr_size(nic.header_size)
        self.tap.set_offload(offload_for_features(nic.acked_features))
        for index in nic.ring_indices:
            self.net.set_backend(index, self.tap, tap_queue=index // 2)
            self._attached.append(index)

    def detach(self, nic: VirtioNetDriver) -> None:
        while self._attached:
            self.net.set_backend(self._attached.pop(), None)

    def close(self) -> None:
        self._attached.clear()
        self.net.close()


class VhostUserNetPlane(NetDataPlane):
    """A vhost-user back-end reached through ``frontend`` (which this plane closes)."""

    name = "vhost-user"

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    @property
    def backend(self) -> VhostBackend:
        return self.frontend


class VirtioNetDevice:
    """A virtio-net device on a swappable data plane (see the module docstring).

    ``driver_args`` go to :class:`VirtioNetDriver` (queue size, packed rings, features, ...).
    The device owns the driver; each data plane is the caller's to close, except that
    :meth:`swap` hands back the old one so the caller can close it.
    """

    def __init__(self, plane: NetDataPlane, **driver_args: Any) -> None:
        self.plane = plane
        # A VMM device that can migrate asks vhost-user back-ends for the dirty log's file.
        driver_args.setdefault("protocol_features", DEFAULT_PROTOCOL_FEATURES | _LOG_SHMFD)
        self.nic = VirtioNetDriver(plane.backend, **driver_args)
        #: the positions handed over by each swap, oldest first
        self.swaps: list[dict[int, int]] = []
        #: the back-end states carried by each :meth:`migrate`, oldest first (opaque bytes)
        self.states: list[bytes] = []
        #: the positions each :meth:`reconnect` started from, oldest first
        self.reconnects: list[dict[int, int]] = []

    def start(self) -> Self:
        self.nic.start()
        try:
            self.plane.attach(self.nic)
        except BaseException:
            self.nic.close()
            raise
        return self

    def swap(self, new: NetDataPlane) -> NetDataPlane:
        """Move the running device to ``new``; returns the old data plane (stopped, open)."""
        if new is self.plane:
            raise InvalidOperation("the device already runs on that data plane")
        old = self.plane
        old.detach(self.nic)
        positions = self.nic.switch_backend(new.backend)
        self.plane = new
        new.attach(self.nic)
        self.swaps.append(positions)
        log.info("virtio-net moved from %s to %s at %s", old.name, new.name, positions)
        return old

    def migrate(self, new: NetDataPlane) -> NetDataPlane:
        """Move the running device to another vhost-user back-end together with the old
        back-end's device state; returns the old data plane (stopped, open).

        Both must be vhost-user planes whose back-ends offer ``DEVICE_STATE``, and the current
        one must have negotiated it (give the device ``protocol_features`` that include it).
        Everything is checked before the old back-end is stopped. A state the new back-end
        refuses raises :class:`~vhostkit.errors.RequestFailed`; the old back-end then is
        stopped but keeps its state, as the spec wants of a failed migration's source.
        """
        old = self.plane
        if new is old:
            raise InvalidOperation("the device already runs on that data plane")
        if not isinstance(old, VhostUserNetPlane) or not isinstance(new, VhostUserNetPlane):
            raise Unsupported("device state moves between vhost-user back-ends only")
        wanted = ProtocolFeature.DEVICE_STATE
        if not old.frontend.has_protocol_feature(wanted):
            raise Unsupported(
                "the current back-end did not negotiate DEVICE_STATE "
                "(ask for it in the device's protocol_features)"
            )
        new.frontend.get_features()
        if not new.frontend.get_protocol_features() & wanted:
            raise Unsupported("the new back-end does not offer DEVICE_STATE")
        self.nic.wanted_protocol_features |= int(wanted)

        def handover(_old: VhostBackend, _new: VhostBackend) -> None:
            state = old.frontend.save_device_state()
            new.frontend.load_device_state(state)
            self.states.append(state)

        old.detach(self.nic)
        positions = self.nic.switch_backend(new.backend, handover=handover)
        self.plane = new
        new.attach(self.nic)
        self.swaps.append(positions)
        log.info(
            "virtio-net migrated from %s to %s at %s with %d bytes of device state",
            old.name,
            new.name,
            positions,
            len(self.states[-1]),
        )
        return old

    # -- dirty logging --

    def start_dirty_log(self) -> DirtyLog:
        """Turn dirty logging on for the running rings on the current data plane; returns
        the log (owned by the device). :class:`~vhostkit.errors.FeatureNotNegotiated` when the
        plane cannot log; a swap is refused while logging is on."""
        return self.nic.start_dirty_log()

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """The 4 KiB guest pages written by the data plane since the last call (cleared)."""
        return self.nic.collect_dirty()

    def stop_dirty_log(self) -> None:
        """Turn dirty logging off and release the log."""
        self.nic.stop_dirty_log()

    def reconnect(self, new: NetDataPlane) -> NetDataPlane:
        """Carry on over ``new`` after the current data plane died (its vhost-user back-end
        was killed, say, and another one started on the same tap); returns the old plane,
        for the caller to close. The rings restart where the device's used index stands
        (:meth:`~vhostkit.guest.rings.VirtioGuest.reconnect`), so a frame the dead one had
        taken and not completed is sent again; the guest keeps its memory and buffers."""
        if new is self.plane:
            raise InvalidOperation("the device already runs on that data plane")
        old = self.plane
        positions = self.nic.reconnect(new.backend)
        self.plane = new
        new.attach(self.nic)
        self.reconnects.append(positions)
        log.info("virtio-net reconnected from %s to %s at %s", old.name, new.name, positions)
        return old

    def stop(self) -> dict[int, int]:
        """Stop the rings on the current data plane; returns their positions.

        With dirty logging on, the log stays readable (:meth:`collect_dirty`): the last pass
        of a migration reads what the stopped device wrote."""
        self.plane.detach(self.nic)
        return self.nic.stop()

    def close(self) -> None:
        self.nic.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalNetPlane(VhostUserNetPlane):
    """vhostkit's own :class:`~vhostkit.devices.net.NetDevice` on ``tap``, served in this
    process over a socket pair: the userspace twin of :class:`KernelNetPlane` on the same tap.
    Closing the plane disconnects and closes the device (the tap stays the caller's)."""

    name = "vhostkit NetDevice"

    def __init__(self, tap: Tap, **device_args: object) -> None:
        from vhostkit.devices.net import NetDevice
        from vhostkit.user import BackendReqServer, Connection, Frontend

        self.device = NetDevice(tap, **device_args)  # type: ignore[arg-type]
        ours, theirs = Connection.pair()
        self.server = BackendReqServer(theirs, self.device)
        self.thread = threading.Thread(
            target=self.server.serve, daemon=True, name="local-net-plane"
        )
        self.thread.start()
        super().__init__(Frontend(ours))

    def close(self) -> None:
        self.frontend.close()
        self.thread.join(10)
        self.device.close()
