"""The operations every vhost data plane supports, kernel and vhost-user alike.

A VMM (or vhostkit's own userspace guest driver) holds guest memory and virtqueue rings and hands
them to a data plane through :class:`VhostBackend`. The same calls drive:

* :class:`vhostkit.kernel.VhostNet` / :class:`vhostkit.kernel.VhostVsock`: ioctls on
  ``/dev/vhost-net`` and ``/dev/vhost-vsock``;
* :class:`vhostkit.user.Frontend`: vhost-user messages to a backend process.

Addresses: ``MemoryRegion.userspace_addr`` and every address in :class:`VringAddr` are addresses
in the *calling* process (the VMM), which is what both the kernel and vhost-user expect. A
vhost-user backend translates them through the memory table it received.

File descriptors passed in are borrowed: the data plane duplicates or transmits them and the
caller keeps ownership of its own copy.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Self

from vhostkit.types import VHOST_VRING_F_LOG, LogRegion, MemoryRegion, VringAddr, VringState

__all__ = [
    "VHOST_VRING_F_LOG",
    "LogRegion",
    "MemoryRegion",
    "VhostBackend",
    "VringAddr",
    "VringState",
]


class VhostBackend(abc.ABC):
    """A vhost data plane: the kernel, or a vhost-user backend through the frontend.

    The call order a VMM follows to start a device: :meth:`set_owner`, :meth:`get_features`,
    :meth:`set_features`, :meth:`set_mem_table`, then per ring :meth:`set_vring_num`,
    :meth:`set_vring_base`, :meth:`set_vring_addr`, :meth:`set_vring_call`,
    :meth:`set_vring_kick`. :meth:`get_vring_base` stops a ring and returns its position.

    Instances are context managers; leaving the ``with`` block calls :meth:`close`.
    """

    # -- ownership and features --

    @abc.abstractmethod
    def set_owner(self) -> None:
        """Claim the device for this process/connection. A second call is an error."""

    @abc.abstractmethod
    def reset_owner(self) -> None:
        """Give up ownership and reset the device (deprecated in vhost-user)."""

    @abc.abstractmethod
    def get_features(self) -> int:
        """The virtio feature bits the data plane offers."""

    @abc.abstractmethod
    def set_features(self, features: int) -> None:
        """Acknowledge a subset of :meth:`get_features`."""

    # -- memory and logging --

    @abc.abstractmethod
    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """Describe guest memory. Replaces any previous table."""

    @abc.abstractmethod
    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        """Set the dirty log: a user address (kernel) or a shared file (vhost-user)."""

    @abc.abstractmethod
    def set_log_fd(self, fd: int) -> None:
        """An eventfd the data plane signals after it writes to the dirty log."""

    # -- rings --

    @abc.abstractmethod
    def set_vring_num(self, index: int, num: int) -> None:
        """Set the size of ring ``index``."""

    @abc.abstractmethod
    def set_vring_addr(self, addr: VringAddr) -> None:
        """Set where ring ``addr.index`` lives."""

    @abc.abstractmethod
    def set_vring_base(self, index: int, base: int) -> None:
        """Set the position the data plane resumes ring ``index`` from."""

    @abc.abstractmethod
    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` and return its position."""

    @abc.abstractmethod
    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the driver signals when it adds buffers (``None``: poll instead)."""

    @abc.abstractmethod
    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the data plane signals when it uses buffers (``None``: no interrupt)."""

    @abc.abstractmethod
    def set_vring_err(self, index: int, fd: int | None) -> None:
        """The eventfd the data plane signals when ring ``index`` fails."""

    # -- generic steps with a default --

    def negotiate(self, features: int, protocol_features: int = 0) -> tuple[int, int]:
        """Ack the subset of ``features`` the data plane offers; return ``(acked, protocol)``.

        Data planes with a second feature word (vhost-user protocol features) override this
        and negotiate ``protocol_features`` too; the kernel has none and returns 0 for it.
        """
        acked = features & self.get_features()
        self.set_features(acked)
        return acked, 0

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Enable or disable ring ``index``.

        vhost-user rings start disabled once protocol features are negotiated and need this;
        kernel vhost has no per-ring enable (a ring runs once it is set up and, for vhost-net,
        a tap is attached), so the default does nothing.
        """
        return None

    # -- lifetime --

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device or the connection. Safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
