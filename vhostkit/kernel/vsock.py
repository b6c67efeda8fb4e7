"""Kernel vhost-vsock: ``/dev/vhost-vsock``, AF_VSOCK on the host to a guest's rings."""

from __future__ import annotations

import ctypes
import enum
import errno
import logging

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.kernel.device import KernelVhostDevice
from vhostkit.kernel.ioctls import VhostIoctl

__all__ = ["RESERVED_CIDS", "VMADDR_CID_ANY", "VhostVsock", "VhostVsockQueue"]

log = logging.getLogger(__name__)

#: ``VMADDR_CID_ANY``: not a CID a guest can have.
VMADDR_CID_ANY = 0xFFFFFFFF
#: CIDs no guest may take: hypervisor (0), local (1), host (2), and ANY (U32_MAX).
RESERVED_CIDS = frozenset({0, 1, 2, VMADDR_CID_ANY})


class VhostVsockQueue(enum.IntEnum):
    """Ring indices the kernel serves (the event queue stays with the VMM)."""

    RX = 0
    TX = 1


class VhostVsock(KernelVhostDevice):
    """Kernel vhost-vsock (``modprobe vhost_vsock``): one guest, one CID."""

    DEVICE_PATH = "/dev/vhost-vsock"
    MODULE = "vhost_vsock"
    NUM_QUEUES = 2

    def set_guest_cid(self, cid: int) -> None:
        """Give the guest its context id. Reserved CIDs are refused before any ioctl.

        A CID another vhost-vsock device already holds raises :class:`InvalidParam` with
        ``errno == EADDRINUSE``.
        """
        if not isinstance(cid, int) or cid in RESERVED_CIDS or not 0 <= cid <= VMADDR_CID_ANY:
            raise InvalidParam(
                f"guest CID {cid!r} is reserved or out of range (0 hypervisor, 1 local, "
                "2 host and 0xffffffff any are not guest CIDs; CIDs are 32-bit)"
            )
        self._ioctl(
            VhostIoctl.VSOCK_SET_GUEST_CID,
            ctypes.c_uint64(cid),
            f"cid {cid}",
            overrides={
                errno.EADDRINUSE: InvalidParam(
                    f"guest CID {cid} is already in use by another vhost-vsock device",
                    errno=errno.EADDRINUSE,
                )
            },
        )
        log.debug("vhost-vsock guest CID %d", cid)

    def set_running(self, running: bool) -> None:
        """Start (``True``) or stop the kernel's handling of the rings (SET_RUNNING)."""
        what = "start" if running else "stop"
        self._ioctl(
            VhostIoctl.VSOCK_SET_RUNNING,
            ctypes.c_int(1 if running else 0),
            what,
            overrides={
                errno.EFAULT: InvalidOperation(
                    f"vhost-vsock {what}: the rings are not set up (memory table, vring num/addr "
                    "must come first)",
                    errno=errno.EFAULT,
                )
            },
        )

    def start(self) -> None:
        """SET_RUNNING 1: the kernel starts serving the rings."""
        self.set_running(True)

    def stop(self) -> None:
        """SET_RUNNING 0."""
        self.set_running(False)
