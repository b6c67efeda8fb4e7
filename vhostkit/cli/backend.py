"""``vhostkit backend net|blk``: the vhost-user back-end daemons.

Both devices share the socket options and the daemon runner
(:func:`vhostkit.user.backend.daemon.run_daemon`): server mode (the daemon owns the socket,
``--socket-mode`` 0600 by default) or ``--client`` mode (the front-end listens; reconnect
unless ``--no-reconnect``), ``--ready-fd`` / ``--pidfile`` for scripts, ``--user`` to drop
root once the tap or image and the socket are open, and SIGTERM/SIGINT for a clean stop (the
socket the daemon made is removed, exit 0). ``vhostkit net-backend`` and ``vhostkit
blk-backend`` are aliases, as are ``python3 -m vhostkit.devices.net`` / ``.blk``.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
from typing import Any

from vhostkit.cli.common import checked, non_negative_int, octal_mode, positive_int
from vhostkit.errors import DeviceUnavailable, InvalidParam
from vhostkit.user.backend.daemon import DaemonOptions, lookup_group, lookup_user
from vhostkit.user.connection import check_socket_path

__all__ = ["add_arguments", "add_blk_arguments", "add_net_arguments", "run"]

log = logging.getLogger(__name__)

SECTOR_SIZE = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vhostkit backend DEVICE ...``: one sub-command per device."""
    sub = parser.add_subparsers(dest="device", required=True, metavar="DEVICE")
    add_net_arguments(
        sub.add_parser(
            "net",
            help="tap-backed virtio-net (the userspace twin of vhost-net)",
            description="Serve a tap as a virtio-net device over vhost-user.",
        )
    )
    add_blk_arguments(
        sub.add_parser(
            "blk",
            help="file-backed virtio-blk",
            description="Serve a disk image or block device as virtio-blk over vhost-user.",
        )
    )


def run(args: argparse.Namespace) -> int:
    """Serve the device chosen on the command line until SIGTERM/SIGINT."""
    return int(args._serve(args))


# --- options both devices share -------------------------------------------------------------


def _owner(text: str) -> tuple[int, int | None]:
    user, _, group = text.partition(":")
    uid = lookup_user(user).pw_uid if user else -1
    return uid, (lookup_group(group) if group else None)


def _user(text: str) -> str:
    lookup_user(text)
    return text


def _add_socket_arguments(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("socket")
    s.add_argument("--socket", required=True, metavar="PATH", help="the vhost-user socket path")
    s.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening at PATH (QEMU server=on, testpmd server=1) "
        "instead of listening there",
    )
    s.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="client mode: exit when the front-end goes away (default: connect again)",
    )
    s.add_argument(
        "--socket-mode",
        type=octal_mode,
        metavar="MODE",
        help="permission bits of the socket the daemon creates, in octal (default 0600: only "
        "its owner may connect); set before the socket appears at PATH",
    )
    s.add_argument(
        "--socket-owner",
        type=checked(_owner),
        metavar="USER[:GROUP]",
        help="owner (and group) of the socket the daemon creates",
    )
    s.add_argument(
        "--socket-group",
        type=checked(lookup_group),
        metavar="GROUP",
        help="group of the socket the daemon creates (with --socket-mode 0660: who may connect)",
    )
    d = parser.add_argument_group("daemon")
    d.add_argument(
        "--ready-fd",
        type=non_negative_int,
        metavar="N",
        help="write 'READY=1' to fd N (then close it) once serving",
    )
    d.add_argument(
        "--pidfile", metavar="FILE", help="write the pid to FILE once serving; removed at exit"
    )
    d.add_argument(
        "--user",
        type=checked(_user),
        metavar="USER",
        help="started as root: switch to USER once the device and the socket are open",
    )


def _daemon_options(args: argparse.Namespace) -> DaemonOptions:
    owner: tuple[int, int | None] | None = args.socket_owner
    group = args.socket_group
    if args.client:
        given = [
            name
            for name, value in (
                ("--socket-mode", args.socket_mode),
                ("--socket-owner", owner),
                ("--socket-group", group),
            )
            if value is not None
        ]
        if given:
            raise InvalidParam(
                f"{', '.join(given)}: in --client mode the front-end creates the socket"
            )
    if owner is not None and owner[1] is not None:
        if group is not None and group != owner[1]:
            raise InvalidParam("--socket-owner names a group and --socket-group another")
        group = owner[1]
    uid = owner[0] if owner is not None and owner[0] >= 0 else None
    kwargs: dict[str, Any] = {}
    if args.socket_mode is not None:
        kwargs["socket_mode"] = args.socket_mode
    return DaemonOptions(
        socket=args.socket,
        client=args.client,
        reconnect=args.reconnect,
        socket_owner=uid,
        socket_group=group,
        ready_fd=args.ready_fd,
        pidfile=args.pidfile,
        user=args.user,
        **kwargs,
    )


def _check_socket(options: DaemonOptions) -> None:
    """Refuse a live or foreign socket path before the device (a tap, an image) is opened."""
    if not options.client:
        check_socket_path(options.socket)


# --- net ------------------------------------------------------------------------------------


def _mac(text: str) -> bytes:
    try:
        mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address (52:54:00:12:34:56)")
    return mac


def add_net_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vhostkit backend net`` (and of its alias ``net-backend``)."""
    _add_socket_arguments(parser)
    t = parser.add_argument_group("device")
    t.add_argument(
        "--tap",
        default="vhk%d",
        metavar="NAME",
        help="tap to serve: an existing (persistent) one is attached, otherwise it is created "
        "and removed at exit (default vhk%%d: the kernel picks the number)",
    )
    t.add_argument(
        "--queues",
        type=positive_int,
        default=1,
        metavar="N",
        help="queue pairs (a multi-queue tap with N queues; default 1)",
    )
    t.add_argument(
        "--mac", type=_mac, default=_mac("52:54:00:00:00:01"), help="the device's MAC address"
    )
    t.add_argument("--mtu", type=positive_int, default=1500, help="MTU in the config space")
    t.add_argument(
        "--dataplane",
        choices=("user", "kernel"),
        default="user",
        help="who serves the rings: this process (user, the default), or kernel vhost-net "
        "(kernel: the frontend's rings, memory and eventfds are handed to /dev/vhost-net, and "
        "no Python runs per packet)",
    )
    t.add_argument(
        "--busy-poll-us",
        type=non_negative_int,
        default=0,
        metavar="US",
        help="user plane: microseconds a ring worker keeps polling its ring (and the tap) once "
        "they ran dry, before it sleeps on the kick (and the tap): fewer wake-ups under load, "
        "a busy CPU meanwhile (like vhost-net's busyloop_timeout; default 0)",
    )
    t.add_argument(
        "--control",
        metavar="PATH",
        help="open a control socket at PATH (mode 0600): 'vhostkit swap PATH --to "
        "kernel|user' then moves the running device between the data planes, live; the "
        "features offered are then those both planes serve",
    )
    parser.set_defaults(_serve=_serve_net)


def _set_tap_owner(tap: Any, uid: int) -> None:
    """TUNSETOWNER: let ``uid`` attach and detach the tap's queues after dropping root."""
    from vhostkit.kernel.ioctls import TunIoctl

    try:
        fcntl.ioctl(tap.fd, TunIoctl.TUNSETOWNER, uid)
    except OSError as exc:
        raise DeviceUnavailable(
            f"TUNSETOWNER {tap.name}: {exc.strerror} (needs CAP_NET_ADMIN)", errno=exc.errno
        ) from None


def _serve_net(args: argparse.Namespace) -> int:
    from vhostkit.devices.net import NetDevice
    from vhostkit.devices.net_kernel import KernelNetDevice
    from vhostkit.kernel.tap import Tap
    from vhostkit.user.backend.daemon import daemon_signals, run_daemon

    options = _daemon_options(args)
    _check_socket(options)
    if args.control is not None:
        check_socket_path(args.control)
        if not options.client and args.control == options.socket:
            raise InvalidParam("--control needs a path of its own, not the vhost-user socket")
    with daemon_signals() as signals, Tap(args.tap, queues=args.queues, nonblocking=True) as tap:
        uid = lookup_user(options.user).pw_uid if options.user is not None else None
        if uid is not None:
            _set_tap_owner(tap, uid)
        tap.up()
        if args.control is not None:
            return _serve_swappable_net(args, options, signals, tap, uid)
        device: NetDevice | KernelNetDevice
        if args.dataplane == "kernel":
            device = KernelNetDevice(tap, mac=args.mac, mtu=args.mtu, queue_pairs=args.queues)
        else:
            device = NetDevice(
                tap,
                mac=args.mac,
                mtu=args.mtu,
                queue_pairs=args.queues,
                busy_poll=args.busy_poll_us * 1e-6,
            )
        try:
            name = f"net backend: tap {tap.name}"
            if args.dataplane == "kernel":
                name += " (rings served by kernel vhost-net)"
            return run_daemon(device, options, signals, name=name)
        finally:
            device.close()


def _serve_swappable_net(
    args: argparse.Namespace, options: DaemonOptions, signals: Any, tap: Any, uid: int | None
) -> int:
    """The net daemon with a control socket: one SwappableNetDevice, both planes."""
    from vhostkit.devices.net_swap import ControlServer, SwappableNetDevice
    from vhostkit.user.backend.daemon import run_daemon

    with (
        SwappableNetDevice(
            tap, mac=args.mac, mtu=args.mtu, queue_pairs=args.queues, plane=args.dataplane
        ) as device,
        ControlServer(args.control, device, owner=uid).start(),
    ):
        name = f"net backend: tap {tap.name} ({device.plane} plane, control {args.control})"
        return run_daemon(device, options, signals, name=name)


# --- blk ------------------------------------------------------------------------------------


def add_blk_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vhostkit backend blk`` (and of its alias ``blk-backend``)."""
    _add_socket_arguments(parser)
    b = parser.add_argument_group("device")
    b.add_argument(
        "--image", required=True, metavar="FILE", help="disk image (regular file or block device)"
    )
    b.add_argument("--read-only", action="store_true", help="serve the image read-only")
    b.add_argument(
        "--queues", type=positive_int, default=1, metavar="N", help="request queues (default 1)"
    )
    b.add_argument("--serial", default="vhostkit-blk", help="the GET_ID string (at most 20 bytes)")
    b.add_argument(
        "--blk-size",
        type=positive_int,
        default=SECTOR_SIZE,
        metavar="BYTES",
        help="logical block size (a power of two, 512 or more; default 512)",
    )
    parser.set_defaults(_serve=_serve_blk)


def _serve_blk(args: argparse.Namespace) -> int:
    from vhostkit.devices.blk import BlkDevice
    from vhostkit.user.backend.daemon import daemon_signals, run_daemon

    options = _daemon_options(args)
    _check_socket(options)
    with (
        daemon_signals() as signals,
        BlkDevice(
            args.image,
            read_only=args.read_only,
            num_queues=args.queues,
            serial=args.serial,
            blk_size=args.blk_size,
        ) as device,
    ):

        def hangup() -> None:
            told = device.resize()
            log.info("image re-read: %d sectors (front-end told: %s)", device.capacity, told)

        return run_daemon(
            device, options, signals, name=f"blk backend: {args.image}", on_hangup=hangup
        )
