"""The common part of the kernel vhost devices: a ``/dev/vhost-*`` fd driven by ioctls.

:class:`KernelVhostDevice` implements every :class:`~vhostkit.backend.VhostBackend` method with
the ioctls of ``include/uapi/linux/vhost.h`` and maps the kernel's errno values to vhostkit's
error classes:

==========================================  ==============================================
kernel says                                 vhostkit raises
==========================================  ==============================================
node missing / ENODEV / ENXIO at open       :class:`DeviceUnavailable` (names the module)
EACCES / EPERM at open                      :class:`DeviceUnavailable` (permission)
EBUSY on SET_OWNER                          :class:`InvalidOperation` ("already owned")
EPERM on any other ioctl                    :class:`InvalidOperation` (not the owner)
EBUSY elsewhere                             :class:`InvalidOperation` (ring busy)
ENOTTY / ENOIOCTLCMD / EOPNOTSUPP           :class:`Unsupported` (cached per device)
EINVAL / EFAULT / E2BIG / EBADF / ...       :class:`InvalidParam`, with what was asked
anything else                               :class:`RequestFailed` with the errno
==========================================  ==============================================
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from vhostkit.backend import VhostBackend
from vhostkit.errors import (
    DeviceUnavailable,
    InvalidOperation,
    InvalidParam,
    RequestFailed,
    Unsupported,
    VhostError,
)
from vhostkit.kernel.ioctls import (
    VHOST_FILE_UNBIND,
    VhostIoctl,
    VringEndian,
    make_vhost_memory,
    vhost_vring_addr,
    vhost_vring_file,
    vhost_vring_state,
    vhost_vring_worker,
    vhost_worker_state,
)
from vhostkit.types import LogRegion, MemoryRegion, VringAddr
from vhostkit.virtio.dirty_log import DirtyLog

__all__ = ["ENOIOCTLCMD", "KernelVhostDevice"]

log = logging.getLogger(__name__)

#: The kernel-internal "no such ioctl" errno; normally turned into ENOTTY before userspace.
ENOIOCTLCMD = 515

_UNSUPPORTED_ERRNOS = frozenset({errno.ENOTTY, ENOIOCTLCMD, errno.EOPNOTSUPP})
_PARAM_ERRNOS = frozenset(
    {
        errno.EINVAL,
        errno.EFAULT,
        errno.E2BIG,
        errno.EBADF,
        errno.ENOBUFS,
        errno.ENOTSOCK,
        errno.ERANGE,
        errno.EOVERFLOW,
    }
)
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

#: How :meth:`KernelVhostDevice.supports` probes an optional ioctl without side effects.
_PROBES: Mapping[VhostIoctl, Callable[[], object]] = {
    # Read-only questions about ring 0 (a vring ioctl reads the ring index first: it must be
    # valid, or the kernel answers ENOBUFS before it looks at the request).
    VhostIoctl.GET_VRING_WORKER: lambda: vhost_vring_worker(0, 0),
    VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT: lambda: vhost_vring_state(0, 0),
    VhostIoctl.GET_VRING_ENDIAN: lambda: vhost_vring_state(0, 0),
    VhostIoctl.GET_BACKEND_FEATURES: lambda: ctypes.c_uint64(0),
}
#: Which harmless request answers for each optional one.
_PROBE_WITH: Mapping[VhostIoctl, VhostIoctl] = {
    VhostIoctl.NEW_WORKER: VhostIoctl.GET_VRING_WORKER,
    VhostIoctl.FREE_WORKER: VhostIoctl.GET_VRING_WORKER,
    VhostIoctl.ATTACH_VRING_WORKER: VhostIoctl.GET_VRING_WORKER,
    VhostIoctl.GET_VRING_WORKER: VhostIoctl.GET_VRING_WORKER,
    VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT: VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT,
    VhostIoctl.SET_VRING_BUSYLOOP_TIMEOUT: VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT,
    VhostIoctl.GET_VRING_ENDIAN: VhostIoctl.GET_VRING_ENDIAN,
    VhostIoctl.SET_VRING_ENDIAN: VhostIoctl.GET_VRING_ENDIAN,
    VhostIoctl.GET_BACKEND_FEATURES: VhostIoctl.GET_BACKEND_FEATURES,
    VhostIoctl.SET_BACKEND_FEATURES: VhostIoctl.GET_BACKEND_FEATURES,
}


def _request_name(request: VhostIoctl | int) -> str:
    if isinstance(request, VhostIoctl):
        return request.name
    return f"ioctl {request:#x}"


def _fd_arg(fd: int | None) -> int:
    if fd is None:
        return VHOST_FILE_UNBIND
    if not isinstance(fd, int) or fd < -1 or fd > 0x7FFFFFFF:
        raise InvalidParam(f"bad file descriptor {fd!r}")
    return fd


class KernelVhostDevice(VhostBackend):
    """A ``/dev/vhost-*`` character device (opened ``O_RDWR | O_CLOEXEC``).

    Subclasses set :attr:`DEVICE_PATH`, :attr:`MODULE` and :attr:`NUM_QUEUES`. ``path``
    overrides the device node (tests point it at a path that does not exist).
    """

    DEVICE_PATH: ClassVar[str] = ""
    MODULE: ClassVar[str] = ""
    NUM_QUEUES: ClassVar[int] = 0

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._fd = -1
        self._path = os.fspath(path) if path is not None else self.DEVICE_PATH
        if not self._path:
            raise InvalidParam(f"{type(self).__name__} has no device path")
        self._support: dict[VhostIoctl, bool] = {}
        self._fd = self._open(self._path)
        log.debug("opened %s as fd %d", self._path, self._fd)

    # -- plumbing --

    def _open(self, path: str) -> int:
        module = self.MODULE or "the vhost module"
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceUnavailable(
                f"{path} does not exist: load the kernel module (modprobe {module})",
                errno=errno.ENOENT,
            ) from None
        except PermissionError as exc:
            raise DeviceUnavailable(
                f"no permission to open {path} ({exc.strerror}): run as root or grant access "
                "to the device node",
                errno=exc.errno,
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENXIO):
                raise DeviceUnavailable(
                    f"{path} has no driver behind it: load the kernel module (modprobe {module})",
                    errno=exc.errno,
                ) from None
            raise DeviceUnavailable(
                f"cannot open {path}: {exc.strerror}", errno=exc.errno
            ) from None

    @property
    def path(self) -> str:
        """The device node this device was opened from."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The device fd (still owned by this object)."""
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise InvalidOperation(f"{type(self).__name__} ({self._path}) is closed")

    def _error(
        self,
        request: VhostIoctl | int,
        err: int,
        what: str,
        overrides: Mapping[int, VhostError] | None = None,
    ) -> VhostError:
        if overrides and err in overrides:
            return overrides[err]
        name = _request_name(request)
        text = f"{name} ({what}) on {self._path}: {os.strerror(err)}"
        if err in _UNSUPPORTED_ERRNOS:
            if isinstance(request, VhostIoctl):
                self._support[request] = False
            return Unsupported(
                f"{name} is not supported by the running kernel "
                f"({os.uname().release}): {os.strerror(err)}",
                errno=err,
            )
        if err == errno.EPERM:
            return InvalidOperation(
                f"{text}: this process does not own the device (call set_owner first)", errno=err
            )
        if err == errno.EACCES:
            return DeviceUnavailable(f"{text}: permission denied", errno=err)
        if err == errno.EBUSY:
            return InvalidOperation(f"{text}: busy", errno=err)
        if err in _PARAM_ERRNOS:
            return InvalidParam(text, errno=err)
        return RequestFailed(text, errno=err)

    def _ioctl(
        self,
        request: VhostIoctl | int,
        arg: object = 0,
        what: str = "",
        overrides: Mapping[int, VhostError] | None = None,
    ) -> None:
        """Issue ``request``; ``arg`` is 0 or a ctypes object the kernel may read/write.

        ``request`` is normally a :class:`VhostIoctl`; a plain number is allowed (probes).
        """
        self._check_open()
        if isinstance(request, VhostIoctl) and self._support.get(request) is False:
            raise Unsupported(
                f"{request.name} is not supported by the running kernel ({os.uname().release})",
                errno=errno.ENOTTY,
            )
        try:
            if isinstance(arg, int):
                fcntl.ioctl(self._fd, request, arg)
            else:
                fcntl.ioctl(self._fd, request, arg, True)  # type: ignore[call-overload]
        except OSError as exc:
            err = exc.errno if exc.errno is not None else errno.EIO
            raise self._error(request, err, what, overrides) from None
        if isinstance(request, VhostIoctl):
            self._support.setdefault(request, True)

    def supports(self, request: VhostIoctl) -> bool:
        """Whether the running kernel implements an optional ioctl (probed once, then cached).

        Probing needs ownership (the kernel answers EPERM to a non-owner); the probe has no
        side effects. Mandatory ioctls are simply reported as supported.
        """
        if request in self._support:
            return self._support[request]
        probe = _PROBE_WITH.get(request)
        if probe is None:
            return True
        try:
            self._ioctl(probe, _PROBES[probe](), "probe")
        except Unsupported:
            self._support[request] = False
            self._support[probe] = False
            return False
        except InvalidOperation:
            raise
        except VhostError:
            pass  # any other answer means the kernel knows the request
        self._support[request] = True
        self._support[probe] = True
        return True

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < max(self.NUM_QUEUES, 1):
            raise InvalidParam(
                f"ring index {index!r} out of range for {type(self).__name__} "
                f"({self.NUM_QUEUES} rings)"
            )

    # -- ownership and features --

    def set_owner(self) -> None:
        self._ioctl(
            VhostIoctl.SET_OWNER,
            what="set owner",
            overrides={
                errno.EBUSY: InvalidOperation(
                    f"{self._path} is already owned (SET_OWNER twice on one fd)", errno=errno.EBUSY
                )
            },
        )

    def reset_owner(self) -> None:
        self._ioctl(VhostIoctl.RESET_OWNER, what="reset owner")

    def get_features(self) -> int:
        value = ctypes.c_uint64(0)
        self._ioctl(VhostIoctl.GET_FEATURES, value, "get features")
        return value.value

    def set_features(self, features: int) -> None:
        if not 0 <= features <= _U64:
            raise InvalidParam(f"features {features:#x} do not fit in 64 bits")
        self._ioctl(
            VhostIoctl.SET_FEATURES,
            ctypes.c_uint64(features),
            f"features={features:#x}",
            overrides={
                errno.EOPNOTSUPP: InvalidParam(
                    f"the kernel does not offer some of features {features:#x}",
                    errno=errno.EOPNOTSUPP,
                )
            },
        )

    # -- memory and logging --

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        table = [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in regions]
        desc = ", ".join(f"[gpa {g:#x} size {s:#x} uaddr {u:#x}]" for g, s, u in table)
        hint = (
            f"the kernel rejected the memory table ({len(table)} regions: {desc or 'none'}): "
            "regions must lie in this process's address space, and their number must not "
            "exceed the vhost module's max_mem_regions (default 64)"
        )
        self._ioctl(
            VhostIoctl.SET_MEM_TABLE,
            make_vhost_memory(table),
            f"{len(table)} regions",
            overrides={
                e: InvalidParam(f"{hint}: {os.strerror(e)}", errno=e)
                for e in (errno.EINVAL, errno.EFAULT, errno.E2BIG, errno.EOPNOTSUPP)
            },
        )

    def set_log_base(self, base: int, region: LogRegion | None = None) -> None:
        # The kernel takes a user address; a LogRegion (vhost-user's shared file) has no
        # meaning here beyond what ``base`` already says.
        if region is not None:
            log.debug("set_log_base: the kernel ignores the log region %r", region)
        if not 0 <= base <= _U64:
            raise InvalidParam(f"log base {base:#x} does not fit in 64 bits")
        self._ioctl(VhostIoctl.SET_LOG_BASE, ctypes.c_uint64(base), f"log base {base:#x}")

    def set_log_fd(self, fd: int | None) -> None:
        """An eventfd the kernel signals after it wrote to the log (``None``: none)."""
        self._ioctl(VhostIoctl.SET_LOG_FD, ctypes.c_int(_fd_arg(fd)), f"log fd {fd}")

    def set_dirty_log(self, log: DirtyLog) -> None:
        """``VHOST_SET_LOG_BASE`` with the log's address in this process: the kernel's worker
        writes the bits through this process's mapping, so the log stays mapped (open) for as
        long as logging is on."""
        self.set_log_base(log.address)

    # -- rings --

    def set_vring_num(self, index: int, num: int) -> None:
        self._check_index(index)
        self._ioctl(
            VhostIoctl.SET_VRING_NUM, vhost_vring_state(index, num), f"ring {index} num {num}"
        )

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._check_index(addr.index)
        raw = vhost_vring_addr(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)
        self._ioctl(
            VhostIoctl.SET_VRING_ADDR,
            raw,
            f"ring {addr.index} desc {addr.desc:#x} avail {addr.avail:#x} used {addr.used:#x}",
        )

    def set_vring_base(self, index: int, base: int) -> None:
        self._check_index(index)
        self._ioctl(
            VhostIoctl.SET_VRING_BASE, vhost_vring_state(index, base), f"ring {index} base {base}"
        )

    def get_vring_base(self, index: int) -> int:
        self._check_index(index)
        state = vhost_vring_state(index, 0)
        self._ioctl(VhostIoctl.GET_VRING_BASE, state, f"ring {index}")
        return int(state.num)

    def _vring_file(self, request: VhostIoctl, index: int, fd: int | None, what: str) -> None:
        self._check_index(index)
        self._ioctl(request, vhost_vring_file(index, _fd_arg(fd)), f"ring {index} {what} {fd}")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_file(VhostIoctl.SET_VRING_KICK, index, fd, "kick fd")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_file(VhostIoctl.SET_VRING_CALL, index, fd, "call fd")

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_file(VhostIoctl.SET_VRING_ERR, index, fd, "err fd")

    # -- optional extras --

    def set_vring_endian(self, index: int, endian: VringEndian) -> None:
        """Legacy cross-endian rings (needs CONFIG_VHOST_CROSS_ENDIAN_LEGACY)."""
        self._check_index(index)
        self._ioctl(
            VhostIoctl.SET_VRING_ENDIAN,
            vhost_vring_state(index, int(endian)),
            f"ring {index} endian {endian!r}",
        )

    def get_vring_endian(self, index: int) -> VringEndian:
        self._check_index(index)
        state = vhost_vring_state(index, 0)
        self._ioctl(VhostIoctl.GET_VRING_ENDIAN, state, f"ring {index}")
        return VringEndian(state.num)

    def set_vring_busyloop_timeout(self, index: int, usecs: int) -> None:
        """How long the kernel worker busy-polls ring ``index`` before sleeping (µs)."""
        self._check_index(index)
        if not 0 <= usecs <= _U32:
            raise InvalidParam(f"busyloop timeout {usecs} out of range")
        self._ioctl(
            VhostIoctl.SET_VRING_BUSYLOOP_TIMEOUT,
            vhost_vring_state(index, usecs),
            f"ring {index} busyloop {usecs} us",
        )

    def get_vring_busyloop_timeout(self, index: int) -> int:
        self._check_index(index)
        state = vhost_vring_state(index, 0)
        self._ioctl(VhostIoctl.GET_VRING_BUSYLOOP_TIMEOUT, state, f"ring {index}")
        return int(state.num)

    def get_backend_features(self) -> int:
        """``VHOST_BACKEND_F_*`` bits the device offers (see ``VhostBackendFeatures``)."""
        value = ctypes.c_uint64(0)
        self._ioctl(VhostIoctl.GET_BACKEND_FEATURES, value, "get backend features")
        return value.value

    def set_backend_features(self, features: int) -> None:
        if not 0 <= features <= _U64:
            raise InvalidParam(f"backend features {features:#x} do not fit in 64 bits")
        self._ioctl(
            VhostIoctl.SET_BACKEND_FEATURES,
            ctypes.c_uint64(features),
            f"backend features {features:#x}",
            overrides={
                errno.EOPNOTSUPP: InvalidParam(
                    f"the kernel does not offer backend features {features:#x}",
                    errno=errno.EOPNOTSUPP,
                )
            },
        )

    def new_worker(self) -> int:
        """Create a kernel worker thread for this device (Linux 6.5+); returns its id."""
        state = vhost_worker_state(0)
        self._ioctl(VhostIoctl.NEW_WORKER, state, "new worker")
        return int(state.worker_id)

    def free_worker(self, worker_id: int) -> None:
        self._ioctl(VhostIoctl.FREE_WORKER, vhost_worker_state(worker_id), f"worker {worker_id}")

    def attach_vring_worker(self, index: int, worker_id: int) -> None:
        self._check_index(index)
        self._ioctl(
            VhostIoctl.ATTACH_VRING_WORKER,
            vhost_vring_worker(index, worker_id),
            f"ring {index} worker {worker_id}",
        )

    def get_vring_worker(self, index: int) -> int:
        self._check_index(index)
        state = vhost_vring_worker(index, 0)
        self._ioctl(VhostIoctl.GET_VRING_WORKER, state, f"ring {index}")
        return int(state.worker_id)

    # -- lifetime --

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            log.debug("closing %s (fd %d)", self._path, fd)
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            log.warning("%s for %s was not closed", type(self).__name__, self._path)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {self._path} {state}>"
