"""The operations every vhost data plane supports, kernel and vhost-user alike.

A VMM (or vhostkit's own userspace guest driver) holds guest memory and virtqueue rings and hands
them to a data plane through :class:`VhostBackend`. The same calls drive:

* :class:`vhostkit.kernel.VhostNet` / :class:`vhostkit.kernel.VhostVsock`: ioctls on
  ``/dev/vhost-net`` and ``/dev/vhost-vsock``;
* :class:`vhostkit.user.Frontend`: vhost-user messages to a backend process.

Dirty logging (live migration) has one shape on every plane, QEMU's: the VMM gives the data
plane a :class:`~vhostkit.virtio.dirty_log.DirtyLog` (:meth:`VhostBackend.set_dirty_log`: the
kernel gets its address in this process, vhost-user its file), then turns logging on for the
running rings with :meth:`VhostBackend.start_dirty_log` (``SET_FEATURES`` with
``VHOST_F_LOG_ALL`` added, then ``SET_VRING_ADDR`` again on each ring with
``VHOST_VRING_F_LOG`` and ``log`` = the guest-physical address of its used ring), collects dirty
pages from the log, and turns logging off with :meth:`VhostBackend.stop_dirty_log` (the same
two steps without the bits).

Addresses: ``MemoryRegion.userspace_addr`` and every address in :class:`VringAddr` are addresses
in the *calling* process (the VMM), which is what both the kernel and vhost-user expect. A
vhost-user backend translates them through the memory table it received.

File descriptors passed in are borrowed: the data plane duplicates or transmits them and the
caller keeps ownership of its own copy.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from vhostkit.errors import FeatureNotNegotiated, InvalidParam
from vhostkit.types import VHOST_VRING_F_LOG, LogRegion, MemoryRegion, VringAddr, VringState
from vhostkit.virtio.features import VirtioFeature

if TYPE_CHECKING:
    from vhostkit.virtio.dirty_log import DirtyLog

__all__ = [
    "VHOST_F_LOG_ALL",
    "VHOST_VRING_F_LOG",
    "LogRegion",
    "MemoryRegion",
    "VhostBackend",
    "VringAddr",
    "VringState",
]

_log = logging.getLogger(__name__)

#: ``VHOST_F_LOG_ALL``, virtio feature bit 26: the data plane logs every write it makes.
VHOST_F_LOG_ALL = int(VirtioFeature.LOG_ALL)


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

    # -- dirty logging (live migration) --

    def check_dirty_log(self) -> None:
        """Raise :class:`FeatureNotNegotiated` unless this data plane can log dirty pages.

        The default asks for ``VHOST_F_LOG_ALL`` in :meth:`get_features`; vhost-user also
        needs the LOG_SHMFD protocol feature.
        """
        offered = self.get_features()
        if not offered & VHOST_F_LOG_ALL:
            raise FeatureNotNegotiated(
                f"the data plane does not offer VHOST_F_LOG_ALL (features {offered:#x})"
            )

    @abc.abstractmethod
    def set_dirty_log(self, log: DirtyLog) -> None:
        """Hand the data plane ``log`` (borrowed: keep it open while logging is on).

        The kernel takes the log's address in this process (``VHOST_SET_LOG_BASE``);
        vhost-user takes its file (``SET_LOG_BASE`` with the memfd).
        """

    def start_dirty_log(self, log: DirtyLog, features: int, rings: Sequence[VringAddr]) -> None:
        """Log every write to guest memory into ``log``, on running rings, as QEMU does.

        ``features`` are the features acked now; ``rings`` the current address of every ring,
        each with ``log`` set to the guest-physical address of its used ring (the device area
        of a packed ring). In order: :meth:`check_dirty_log`, :meth:`set_dirty_log`,
        :meth:`set_features` with ``VHOST_F_LOG_ALL`` added, then :meth:`set_vring_addr` on
        each ring with ``VHOST_VRING_F_LOG`` set. Nothing is sent when the check fails.
        """
        self.check_dirty_log()
        _check_log_addrs(rings)
        self.set_dirty_log(log)
        self.set_features(features | VHOST_F_LOG_ALL)
        for addr in rings:
            self.set_vring_addr(dataclasses.replace(addr, flags=addr.flags | VHOST_VRING_F_LOG))
        _log.info("dirty logging on for rings %s", [a.index for a in rings])

    def stop_dirty_log(self, features: int, rings: Sequence[VringAddr]) -> None:
        """Stop logging: :meth:`set_features` without ``VHOST_F_LOG_ALL``, then every ring's
        address without ``VHOST_VRING_F_LOG``. The log may be released afterwards."""
        self.set_features(features & ~VHOST_F_LOG_ALL)
        for addr in rings:
            self.set_vring_addr(dataclasses.replace(addr, flags=addr.flags & ~VHOST_VRING_F_LOG))
        _log.info("dirty logging off for rings %s", [a.index for a in rings])

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


def _check_log_addrs(rings: Sequence[VringAddr]) -> None:
    for addr in rings:
        if not addr.log:
            # DPDK refuses to map a ring whose log address is 0 once VHOST_VRING_F_LOG is set
            raise InvalidParam(
                f"ring {addr.index}: give the guest-physical address of its used ring as log"
            )
