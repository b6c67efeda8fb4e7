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

Frames that reached the tap during the move wait in the tap's queue and are read by the new
data plane; buffers the guest published during the move are processed from the positions on.

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

from vhostkit.backend import VhostBackend
from vhostkit.errors import InvalidOperation
from vhostkit.guest.net import VirtioNetDriver

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
        self.nic = VirtioNetDriver(plane.backend, **driver_args)
        #: the positions handed over by each swap, oldest first
        self.swaps: list[dict[int, int]] = []

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

    def stop(self) -> dict[int, int]:
        """Stop the rings on the current data plane; returns their positions."""
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
