"""Kernel vhost-net: ``/dev/vhost-net``, packets between the rings and a tap."""

from __future__ import annotations

import enum
import errno
import logging

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.kernel.device import KernelVhostDevice
from vhostkit.kernel.ioctls import VhostIoctl, vhost_vring_file

__all__ = ["VhostNet", "VhostNetQueue"]

log = logging.getLogger(__name__)


class VhostNetQueue(enum.IntEnum):
    """Ring indices of one vhost-net device (one queue pair)."""

    RX = 0
    TX = 1


class VhostNet(KernelVhostDevice):
    """One queue pair of kernel vhost-net (``modprobe vhost_net``).

    A multi-queue tap is served by one :class:`VhostNet` per queue pair, each attached to one of
    the tap's queue fds.
    """

    DEVICE_PATH = "/dev/vhost-net"
    MODULE = "vhost_net"
    NUM_QUEUES = 2

    def set_backend(self, index: int, tap_fd: int | None) -> None:
        """Attach a tap (or any socket vhost-net accepts) fd to ring ``index``; ``None`` detaches.

        The kernel takes its own reference to the file; the caller keeps its fd.
        """
        self._check_index(index)
        fd = -1 if tap_fd is None else tap_fd
        if not isinstance(fd, int) or fd < -1:
            raise InvalidParam(f"bad tap fd {tap_fd!r}")
        what = f"ring {index} backend fd {fd}"
        self._ioctl(
            VhostIoctl.NET_SET_BACKEND,
            vhost_vring_file(index, fd),
            what,
            overrides={
                errno.ENOTSOCK: InvalidParam(
                    f"NET_SET_BACKEND ({what}): fd {fd} is not a tap, macvtap or packet socket",
                    errno=errno.ENOTSOCK,
                ),
                errno.EFAULT: InvalidOperation(
                    f"NET_SET_BACKEND ({what}): ring {index} is not set up (memory table, "
                    "vring num/addr must come first)",
                    errno=errno.EFAULT,
                ),
                errno.ENOBUFS: InvalidParam(
                    f"NET_SET_BACKEND ({what}): no ring {index}", errno=errno.ENOBUFS
                ),
            },
        )
        log.debug("vhost-net ring %d backend -> fd %d", index, fd)
