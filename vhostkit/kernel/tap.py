"""TAP interfaces for vhost-net: the tun ioctls, plus link work through pyroute2.

A :class:`Tap` owns its queue fds (one per queue; ``IFF_MULTI_QUEUE`` for more than one) and
closes them on :meth:`Tap.close`. A tap that is not persistent disappears with its last fd.
Link operations (up/down, addresses, namespaces, bridges) use pyroute2's ``IPRoute``, opened
and closed per call, inside the namespace the tap currently lives in (pyroute2 is imported on
the first link operation).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self

from vhostkit.errors import (
    DeviceUnavailable,
    InvalidOperation,
    InvalidParam,
    RequestFailed,
    TapGone,
    TapInUse,
    Unsupported,
    VhostError,
)
from vhostkit.kernel.ioctls import IFNAMSIZ, TunFlags, TunIoctl, TunOffload, ifreq_flags

if TYPE_CHECKING:
    from pyroute2 import IPRoute

__all__ = ["VNET_HDR_SIZES", "Tap", "offload_for_features"]

log = logging.getLogger(__name__)

#: virtio-net header sizes a tap can be told: legacy (10) and with num_buffers / VERSION_1 (12).
VNET_HDR_SIZES = (10, 12)
TUN_PATH = "/dev/net/tun"


def _tun_error(err: int, what: str) -> VhostError:
    text = f"{what}: {os.strerror(err)}"
    if err in (errno.EPERM, errno.EACCES):
        return DeviceUnavailable(f"{text} (needs CAP_NET_ADMIN)", errno=err)
    if err == errno.EBUSY:
        return InvalidOperation(f"{text} (the name is taken by another device or queue)", errno=err)
    if err in (errno.ENOTTY, errno.EOPNOTSUPP):
        return Unsupported(text, errno=err)
    if err in (errno.EINVAL, errno.EFAULT, errno.EBADF):
        return InvalidParam(text, errno=err)
    return RequestFailed(text, errno=err)


def _netlink_error(exc: Any, what: str) -> VhostError:
    err = int(exc.code)
    if err in (errno.ENODEV, errno.ENOENT):
        return InvalidOperation(f"{what}: no such interface or namespace ({exc})", errno=err)
    if err == errno.EEXIST:
        return InvalidParam(f"{what}: already exists ({exc})", errno=err)
    return _tun_error(err, what)


#: virtio-net guest offload feature bit -> the tap offload it lets the tap hand over.
_GUEST_CSUM = 1 << 1  # VIRTIO_NET_F_GUEST_CSUM
_GUEST_OFFLOADS = (
    (_GUEST_CSUM, TunOffload.CSUM),
    (1 << 7, TunOffload.TSO4),  # VIRTIO_NET_F_GUEST_TSO4
    (1 << 8, TunOffload.TSO6),  # VIRTIO_NET_F_GUEST_TSO6
    (1 << 9, TunOffload.TSO_ECN),  # VIRTIO_NET_F_GUEST_ECN
    (1 << 10, TunOffload.UFO),  # VIRTIO_NET_F_GUEST_UFO
)


def offload_for_features(features: int) -> TunOffload:
    """The ``TUNSETOFFLOAD`` flags matching the guest offloads acked in ``features``.

    A tap must only hand the guest what the guest said it can take: without GUEST_CSUM no
    partial checksums, without GUEST_TSO4 no TCPv4 super-frames, and so on.

    The segmentation offloads need the checksum one: a GSO frame always carries a partial
    checksum (NEEDS_CSUM), which a driver without GUEST_CSUM must not be given (virtio 1.2,
    5.1.6.4.1: without GUEST_CSUM the device sets ``flags`` to zero), and the spec makes
    GUEST_TSO4/TSO6/UFO require GUEST_CSUM and GUEST_ECN require GUEST_TSO4 or TSO6
    (5.1.3.1). Front-ends do not enforce this (QEMU 7.2 with ``guest_csum=off`` still offers
    GUEST_TSO4, and Linux 6.1 acks it), and the tun driver refuses TSO/UFO flags without
    ``TUN_F_CSUM``, and ``TUN_F_TSO_ECN`` without a TSO flag, with EINVAL. So, as QEMU's
    own tap back-end does (``tap_fd_set_offload``), an offload whose prerequisite was not
    acked is left out rather than asked for.
    """
    if not features & _GUEST_CSUM:  # nothing at all
        return TunOffload(0)
    flags = TunOffload(0)
    for bit, flag in _GUEST_OFFLOADS:
        if features & bit:
            flags |= flag
    if not flags & (TunOffload.TSO4 | TunOffload.TSO6):
        flags &= ~TunOffload.TSO_ECN
    return flags


class Tap:
    """A TAP device with one fd per queue.

    ``name`` may be empty (the kernel picks ``tapN``) or a ``%d`` pattern. ``queues > 1``
    implies ``IFF_MULTI_QUEUE``. ``vnet_hdr`` sets ``IFF_VNET_HDR`` (vhost-net needs it).
    """

    def __init__(
        self,
        name: str = "",
        *,
        queues: int = 1,
        vnet_hdr: bool = True,
        multi_queue: bool | None = None,
        nonblocking: bool = False,
        tun_path: str = TUN_PATH,
    ) -> None:
        self._fds: list[int] = []
        self._netns: str | None = None
        #: queue -> the vhost-net device that has it attached (see :meth:`claim`)
        self._users: dict[int, object] = {}
        if queues < 1:
            raise InvalidParam(f"a tap needs at least one queue, not {queues}")
        if multi_queue is None:
            multi_queue = queues > 1
        if queues > 1 and not multi_queue:
            raise InvalidParam("more than one queue needs multi_queue=True")
        if len(name.encode()) >= IFNAMSIZ:
            raise InvalidParam(f"tap name {name!r} longer than {IFNAMSIZ - 1} bytes")
        flags = TunFlags.TAP | TunFlags.NO_PI
        if vnet_hdr:
            flags |= TunFlags.VNET_HDR
        if multi_queue:
            flags |= TunFlags.MULTI_QUEUE
        self._flags = flags
        open_flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        ifname = name
        try:
            for i in range(queues):
                try:
                    fd = os.open(tun_path, open_flags)
                except FileNotFoundError:
                    raise DeviceUnavailable(
                        f"{tun_path} does not exist: load the kernel module (modprobe tun)",
                        errno=errno.ENOENT,
                    ) from None
                except OSError as exc:
                    raise _tun_error(exc.errno or errno.EIO, f"open {tun_path}") from None
                self._fds.append(fd)
                req = ifreq_flags(ifname, int(flags))
                try:
                    fcntl.ioctl(fd, TunIoctl.TUNSETIFF, req, True)  # type: ignore[call-overload]
                except OSError as exc:
                    raise _tun_error(
                        exc.errno or errno.EIO, f"TUNSETIFF {ifname!r} queue {i}"
                    ) from None
                ifname = req.ifr_name.decode()
        except BaseException:
            self.close()
            raise
        self._name = ifname
        log.debug("tap %s: %d queue(s), fds %s", ifname, queues, self._fds)

    # -- fds --

    @property
    def name(self) -> str:
        return self._name

    @property
    def fds(self) -> tuple[int, ...]:
        """The queue fds (owned by this object)."""
        return tuple(self._fds)

    @property
    def fd(self) -> int:
        """The first queue's fd."""
        self._check_open()
        return self._fds[0]

    def fileno(self) -> int:
        return self.fd

    @property
    def flags(self) -> TunFlags:
        return self._flags

    @property
    def netns(self) -> str | None:
        """The named network namespace the interface lives in (``None``: this process's)."""
        return self._netns

    @property
    def closed(self) -> bool:
        return not self._fds

    def _check_open(self) -> None:
        if not self._fds:
            raise InvalidOperation("tap is closed")

    def _ioctl(self, request: TunIoctl, arg: Any, what: str, fd: int | None = None) -> None:
        self._check_open()
        try:
            if isinstance(arg, int):
                fcntl.ioctl(self._fds[0] if fd is None else fd, request, arg)
            else:
                fcntl.ioctl(self._fds[0] if fd is None else fd, request, arg, True)
        except OSError as exc:
            raise _tun_error(
                exc.errno or errno.EIO, f"{request.name} on {self._name} ({what})"
            ) from None

    # -- who uses the queues --

    def claim(self, queue: int, user: object) -> None:
        """Record that ``user`` (a vhost-net device) attaches queue ``queue``.

        The kernel lets a second vhost-net take a tap queue a running one uses (both then
        send into it and race for what it receives); this record is how vhostkit refuses it:
        :class:`~vhostkit.errors.TapInUse` when another user holds the queue. It knows only
        the users of this :class:`Tap` object (a tap fd handed around as a bare number, or to
        another process, is not seen).
        """
        self._check_open()
        if not 0 <= queue < len(self._fds):
            raise InvalidParam(f"tap {self._name} has no queue {queue}")
        holder = self._users.get(queue)
        if holder is not None and holder is not user:
            raise TapInUse(
                f"tap {self._name} queue {queue} is already attached to {holder!r}",
                errno=errno.EBUSY,
            )
        self._users[queue] = user

    def release(self, queue: int, user: object) -> None:
        """``user`` no longer has queue ``queue`` attached."""
        if self._users.get(queue) is user:
            del self._users[queue]

    def user(self, queue: int) -> object | None:
        """Who has queue ``queue`` attached (``None``: nobody, as far as this object knows)."""
        return self._users.get(queue)

    def check_alive(self, queue: int = 0) -> None:
        """Raise :class:`~vhostkit.errors.TapGone` if queue ``queue`` is no longer attached
        to an interface: the tap was deleted (``ip link del``) or the queue detached.

        That state is what ``poll`` reports on the queue fd as ``POLLERR``, at once and
        without being asked for: a VMM that polls its tap fds (for anything, or nothing)
        wakes up when the tap goes, and calls this to learn why.
        """
        self._check_open()
        if not 0 <= queue < len(self._fds):
            raise InvalidParam(f"tap {self._name} has no queue {queue}")
        poller = select.poll()
        poller.register(self._fds[queue], 0)  # POLLERR/POLLHUP/POLLNVAL are always reported
        if poller.poll(0):
            raise TapGone(
                f"tap {self._name} queue {queue} has no interface any more (deleted, or the "
                "queue detached)",
                errno=errno.ENODEV,
            )

    # -- tun ioctls --

    def set_vnet_hdr_size(self, size: int) -> None:
        """The virtio-net header size the tap reads and writes: 10, or 12 with VERSION_1."""
        if size not in VNET_HDR_SIZES:
            raise InvalidParam(f"vnet header size must be one of {VNET_HDR_SIZES}, not {size}")
        self._ioctl(TunIoctl.TUNSETVNETHDRSZ, ctypes.c_int(size), str(size))

    def get_vnet_hdr_size(self) -> int:
        value = ctypes.c_int(0)
        self._ioctl(TunIoctl.TUNGETVNETHDRSZ, value, "get")
        return value.value

    def set_offload(self, flags: TunOffload | int) -> None:
        """Which offloads the tap may hand us (``TUN_F_*``): 0 means none."""
        self._ioctl(TunIoctl.TUNSETOFFLOAD, int(flags), f"{int(flags):#x}")

    def set_persist(self, persist: bool) -> None:
        """A persistent tap outlives its fds (until ``set_persist(False)`` and close)."""
        self._ioctl(TunIoctl.TUNSETPERSIST, 1 if persist else 0, str(persist))

    def get_iff(self) -> tuple[str, TunFlags]:
        """TUNGETIFF: the kernel's view of the name and flags."""
        req = ifreq_flags()
        self._ioctl(TunIoctl.TUNGETIFF, req, "get")
        return req.ifr_name.decode(), TunFlags(req.ifr_flags & 0xFFFF)

    def get_features(self) -> TunFlags:
        """TUNGETFEATURES: the IFF_* flags this kernel's tun supports."""
        value = ctypes.c_uint(0)
        self._ioctl(TunIoctl.TUNGETFEATURES, value, "get")
        return TunFlags(value.value & 0xFFFF)

    def set_queue_enabled(self, queue: int, enabled: bool) -> None:
        """Attach or detach one queue of a multi-queue tap (TUNSETQUEUE)."""
        if not 0 <= queue < len(self._fds):
            raise InvalidParam(f"no queue {queue}")
        flag = TunFlags.ATTACH_QUEUE if enabled else TunFlags.DETACH_QUEUE
        self._ioctl(
            TunIoctl.TUNSETQUEUE, ifreq_flags("", int(flag)), f"queue {queue}", fd=self._fds[queue]
        )

    # -- link (pyroute2) --

    @contextlib.contextmanager
    def _iproute(self, what: str) -> Iterator[tuple[IPRoute, int]]:
        # pyroute2 is imported on first use: it is slow to import, and the tun ioctls alone
        # do not need it.
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._check_open()
        try:
            ipr = IPRoute(netns=self._netns, flags=0) if self._netns else IPRoute()
        except NetlinkError as exc:
            raise _netlink_error(exc, what) from None
        except OSError as exc:
            raise _tun_error(exc.errno or errno.EIO, f"{what} (netns {self._netns})") from None
        with ipr:
            try:
                found = ipr.link_lookup(ifname=self._name)
                if not found:
                    raise InvalidOperation(
                        f"{what}: interface {self._name} not found"
                        f"{' in netns ' + self._netns if self._netns else ''}"
                    )
                yield ipr, found[0]
            except NetlinkError as exc:
                raise _netlink_error(exc, f"{what} ({self._name})") from None

    @property
    def ifindex(self) -> int:
        with self._iproute("ifindex") as (_, index):
            return index

    def disable_ipv6(self) -> None:
        """Turn IPv6 off on the link, so the kernel sends no MLD reports or neighbour
        solicitations out of it (quiet taps for tests). The tap must be in this namespace."""
        path = f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6"
        try:
            with open(path, "w") as f:
                f.write("1")
        except FileNotFoundError:
            pass  # no IPv6 in this kernel: nothing to silence
        except OSError as exc:
            raise _tun_error(exc.errno or errno.EIO, f"disable IPv6 on {self.name}") from None

    def up(self) -> None:
        with self._iproute("link up") as (ipr, index):
            ipr.link("set", index=index, state="up")

    def down(self) -> None:
        with self._iproute("link down") as (ipr, index):
            ipr.link("set", index=index, state="down")

    def is_up(self) -> bool:
        with self._iproute("link state") as (ipr, index):
            (link,) = ipr.link("get", index=index)
            return bool(link["flags"] & 0x1)

    def set_mac(self, mac: str) -> None:
        with self._iproute("set mac") as (ipr, index):
            ipr.link("set", index=index, address=mac)

    def get_mac(self) -> str:
        with self._iproute("get mac") as (ipr, index):
            (link,) = ipr.link("get", index=index)
            return str(link.get("IFLA_ADDRESS"))

    def set_mtu(self, mtu: int) -> None:
        with self._iproute("set mtu") as (ipr, index):
            ipr.link("set", index=index, mtu=mtu)

    def add_address(self, address: str, prefixlen: int) -> None:
        """Add an IPv4 or IPv6 address (like ``ip addr add``)."""
        with self._iproute("add address") as (ipr, index):
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)

    def set_address(self, address: str, prefixlen: int) -> None:
        """Make ``address/prefixlen`` the interface's only address of its family."""
        family = 10 if ":" in address else 2
        with self._iproute("set address") as (ipr, index):
            for msg in ipr.addr("dump", index=index, family=family):
                ipr.addr(
                    "del", index=index, address=msg.get("IFA_ADDRESS"), prefixlen=msg["prefixlen"]
                )
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)

    def addresses(self) -> list[tuple[str, int]]:
        with self._iproute("list addresses") as (ipr, index):
            return [
                (str(m.get("IFA_ADDRESS")), int(m["prefixlen"]))
                for m in ipr.addr("dump", index=index)
            ]

    def move_to_netns(self, netns: str) -> None:
        """Move the interface into the named network namespace (``/run/netns/NAME``).

        The fds keep working; later link operations happen inside that namespace.
        """
        with self._iproute("move to netns") as (ipr, index):
            ipr.link("set", index=index, net_ns_fd=netns)
        self._netns = netns

    def attach_to_bridge(self, bridge: str) -> None:
        """Enslave the tap to a bridge in the same namespace."""
        with self._iproute("attach to bridge") as (ipr, index):
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                raise InvalidParam(f"no bridge {bridge!r}")
            ipr.link("set", index=index, master=found[0])

    def detach_from_bridge(self) -> None:
        with self._iproute("detach from bridge") as (ipr, index):
            ipr.link("set", index=index, master=0)

    def master(self) -> int:
        """Index of the bridge the tap is attached to, 0 if none."""
        with self._iproute("master") as (ipr, index):
            (link,) = ipr.link("get", index=index)
            return int(link.get("IFLA_MASTER") or 0)

    # -- lifetime --

    def close(self) -> None:
        """Close every queue fd (idempotent). A non-persistent tap then disappears."""
        fds, self._fds = self._fds, []
        self._users.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            log.warning("tap %s was not closed", getattr(self, "_name", "?"))
            self.close()

    def __repr__(self) -> str:
        return f"<Tap {getattr(self, '_name', '?')} fds={self._fds}>"
