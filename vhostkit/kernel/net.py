"""Kernel vhost-net: ``/dev/vhost-net``, packets between the rings and a tap."""

from __future__ import annotations

import enum
import errno
import logging
import os

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.kernel.device import KernelVhostDevice
from vhostkit.kernel.ioctls import VhostIoctl, vhost_vring_file
from vhostkit.kernel.tap import Tap

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

    Given a :class:`~vhostkit.kernel.tap.Tap` (rather than a bare fd), :meth:`set_backend`
    records the attachment in it: a second device attaching the same tap queue gets
    :class:`~vhostkit.errors.TapInUse` (the kernel itself would accept it), and
    :meth:`check_backends` raises :class:`~vhostkit.errors.TapGone` once the tap was deleted
    under the running rings (the kernel then stops taking TX frames without telling anyone).
    """

    DEVICE_PATH = "/dev/vhost-net"
    MODULE = "vhost_net"
    NUM_QUEUES = 2

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        #: ring index -> the tap (and its queue) attached to it, when given as a Tap
        self._taps: dict[int, tuple[Tap, int]] = {}
        super().__init__(path)

    def set_backend(self, index: int, tap_fd: int | Tap | None, *, tap_queue: int = 0) -> None:
        """Attach a tap (or any socket vhost-net accepts) fd to ring ``index``; ``None`` detaches.

        The kernel takes its own reference to the file; the caller keeps its fd. A
        :class:`~vhostkit.kernel.tap.Tap` attaches its queue ``tap_queue`` and is claimed for
        this device (:meth:`Tap.claim <vhostkit.kernel.tap.Tap.claim>`): a queue another
        device has attached raises :class:`~vhostkit.errors.TapInUse`.
        """
        self._check_index(index)
        tap: Tap | None = None
        if isinstance(tap_fd, Tap):
            tap = tap_fd
            tap.claim(tap_queue, self)
            fd = tap.fds[tap_queue]
        else:
            fd = -1 if tap_fd is None else tap_fd
        if not isinstance(fd, int) or fd < -1:
            raise InvalidParam(f"bad tap fd {tap_fd!r}")
        try:
            self._set_backend(index, fd)
        except BaseException:
            if tap is not None and (tap, tap_queue) not in self._taps.values():
                tap.release(tap_queue, self)
            raise
        old = self._taps.pop(index, None)
        if tap is not None:
            self._taps[index] = (tap, tap_queue)
        if old is not None and old not in self._taps.values():
            old[0].release(old[1], self)

    def check_backends(self) -> None:
        """Raise :class:`~vhostkit.errors.TapGone` if a tap attached (as a
        :class:`~vhostkit.kernel.tap.Tap`) lost its interface: deleted under the rings."""
        for tap, queue in set(self._taps.values()):
            tap.check_alive(queue)

    def close(self) -> None:
        taps, self._taps = getattr(self, "_taps", {}), {}
        for tap, queue in taps.values():
            tap.release(queue, self)
        super().close()

    def _set_backend(self, index: int, fd: int) -> None:
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
