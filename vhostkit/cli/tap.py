"""``vhostkit tap create|list|delete``: tap devices made ready for the data planes.

``create`` makes a persistent tap (it outlives the command) with what vhost-net or the
vhostkit net back-end needs: ``IFF_VNET_HDR`` and its header size, ``IFF_MULTI_QUEUE`` for
more than one queue, offloads, and an owner/group so that an unprivileged process may attach
to it later. With ``--no-persist`` the tap lives only as long as the command, which then
holds it until SIGTERM/SIGINT. ``list`` reads ``/sys/class/net/*/tun_flags`` (``--json`` for
scripts). ``delete`` clears the persist flag; the tap goes away once nobody holds it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
from typing import Any

from vhostkit.cli.common import add_json_option, positive_int, print_json
from vhostkit.errors import DeviceUnavailable, InvalidOperation, InvalidParam
from vhostkit.kernel.ioctls import TunFlags, TunIoctl, TunOffload

__all__ = ["add_arguments", "list_taps", "run"]

log = logging.getLogger(__name__)

SYS_NET = "/sys/class/net"
#: ``--offload`` names -> TUN_F_* bits
OFFLOADS = {
    "csum": TunOffload.CSUM,
    "tso4": TunOffload.TSO4,
    "tso6": TunOffload.TSO6,
    "ecn": TunOffload.TSO_ECN,
    "ufo": TunOffload.UFO,
    "uso4": TunOffload.USO4,
    "uso6": TunOffload.USO6,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vhostkit tap create|list|delete``."""
    sub = parser.add_subparsers(dest="tap_command", required=True, metavar="ACTION")

    create = sub.add_parser(
        "create",
        help="create a tap for vhost-net or the vhostkit net back-end",
        description="Create a persistent tap (or, with --no-persist, hold one until "
        "SIGTERM/SIGINT).",
    )
    create.add_argument("name", metavar="NAME", help="interface name (a %%d pattern is allowed)")
    create.add_argument(
        "--queues",
        type=positive_int,
        default=1,
        metavar="N",
        help="queues (more than 1 implies --multi-queue)",
    )
    create.add_argument(
        "--multi-queue",
        action="store_true",
        help="IFF_MULTI_QUEUE even with one queue (queues attach later)",
    )
    create.add_argument(
        "--vnet-hdr-size",
        type=int,
        choices=(10, 12),
        default=12,
        help="virtio-net header size the tap reads and writes (12 for VERSION_1 or "
        "MRG_RXBUF, 10 for legacy; default 12)",
    )
    create.add_argument(
        "--no-vnet-hdr",
        dest="vnet_hdr",
        action="store_false",
        help="no virtio-net header at all (not usable by vhost-net or the net back-end)",
    )
    create.add_argument(
        "--offload",
        action="append",
        default=[],
        choices=sorted(OFFLOADS),
        metavar="NAME",
        help=f"enable an offload ({', '.join(OFFLOADS)}); repeatable; the data plane sets "
        "its own once the guest's features are known",
    )
    create.add_argument("--owner", metavar="USER", help="user who may attach to it later")
    create.add_argument("--group", metavar="GROUP", help="group whose members may attach")
    create.add_argument("--mtu", type=positive_int, help="set the MTU")
    create.add_argument("--up", action="store_true", help="bring the link up")
    create.add_argument(
        "--no-persist",
        dest="persist",
        action="store_false",
        help="do not persist: hold the tap until SIGTERM/SIGINT, then it goes away",
    )
    create.set_defaults(_tap=_create)

    listing = sub.add_parser(
        "list", help="list tun/tap devices", description="List tun/tap devices."
    )
    add_json_option(listing)
    listing.set_defaults(_tap=_list)

    delete = sub.add_parser(
        "delete",
        help="delete persistent taps",
        description="Clear the persist flag of taps; each goes once nobody holds it open.",
    )
    delete.add_argument("names", nargs="+", metavar="NAME", help="the taps to delete")
    delete.set_defaults(_tap=_delete)


def run(args: argparse.Namespace) -> int:
    """Do the chosen action."""
    return int(args._tap(args))


# --- list -----------------------------------------------------------------------------------


def _sys(name: str, attr: str) -> str | None:
    try:
        with open(os.path.join(SYS_NET, name, attr)) as f:
            return f.read().strip()
    except OSError:
        return None


def _id_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)
    return None if value < 0 else value


def list_taps() -> list[dict[str, Any]]:
    """Every tun/tap interface in this network namespace, from sysfs."""
    found = []
    for name in sorted(os.listdir(SYS_NET)):
        raw = _sys(name, "tun_flags")
        if raw is None:
            continue
        flags = TunFlags(int(raw, 16) & 0xFFFF)
        found.append(
            {
                "name": name,
                "type": "tap" if TunFlags.TAP in flags else "tun",
                "flags": [f.name for f in TunFlags if f & flags and f.name],
                "multi_queue": TunFlags.MULTI_QUEUE in flags,
                "vnet_hdr": TunFlags.VNET_HDR in flags,
                "persist": TunFlags.PERSIST in flags,
                "owner": _id_or_none(_sys(name, "owner")),
                "group": _id_or_none(_sys(name, "group")),
                "mtu": int(_sys(name, "mtu") or 0),
                "address": _sys(name, "address"),
                "operstate": _sys(name, "operstate"),
            }
        )
    return found


def _list(args: argparse.Namespace) -> int:
    taps = list_taps()
    if args.json:
        print_json(taps)
        return 0
    if not taps:
        print("no tun/tap devices")
    for t in taps:
        extra = [
            f"owner {t['owner']}" if t["owner"] is not None else "",
            f"group {t['group']}" if t["group"] is not None else "",
        ]
        print(
            f"{t['name']:16} {t['type']} {t['operstate']:8} mtu {t['mtu']:<6} "
            f"{','.join(t['flags'])} {' '.join(e for e in extra if e)}".rstrip()
        )
    return 0


# --- create and delete ----------------------------------------------------------------------


def _tun_ioctl(tap: Any, request: TunIoctl, value: int, what: str) -> None:
    try:
        fcntl.ioctl(tap.fd, request, value)
    except OSError as exc:
        hint = " (needs CAP_NET_ADMIN)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
        raise DeviceUnavailable(
            f"{request.name} {what} on {tap.name}: {exc.strerror}{hint}", errno=exc.errno
        ) from None


def _create(args: argparse.Namespace) -> int:
    from vhostkit.kernel.tap import Tap
    from vhostkit.user.backend.daemon import daemon_signals, lookup_group, lookup_user

    uid = lookup_user(args.owner).pw_uid if args.owner else None
    gid = lookup_group(args.group) if args.group else None
    if "%" not in args.name and os.path.exists(os.path.join(SYS_NET, args.name)):
        raise InvalidOperation(f"{args.name} exists already (vhostkit tap delete {args.name})")
    if args.offload and not args.vnet_hdr:
        raise InvalidParam("--offload needs the virtio-net header (drop --no-vnet-hdr)")
    offload = TunOffload(0)
    for name in args.offload:
        offload |= OFFLOADS[name]
    with (
        daemon_signals() as signals,
        Tap(
            args.name,
            queues=args.queues,
            vnet_hdr=args.vnet_hdr,
            multi_queue=args.multi_queue or args.queues > 1,
        ) as tap,
    ):
        if args.vnet_hdr:
            tap.set_vnet_hdr_size(args.vnet_hdr_size)
            tap.set_offload(offload)
        if uid is not None:
            _tun_ioctl(tap, TunIoctl.TUNSETOWNER, uid, str(uid))
        if gid is not None:
            _tun_ioctl(tap, TunIoctl.TUNSETGROUP, gid, str(gid))
        if args.mtu is not None:
            tap.set_mtu(args.mtu)
        if args.up:
            tap.up()
        if args.persist:
            tap.set_persist(True)
            print(tap.name, flush=True)
            return 0
        print(f"{tap.name}: held until SIGTERM/SIGINT", flush=True)
        while signals.wait() == signal.SIGHUP:
            pass
        return 0


def _delete(args: argparse.Namespace) -> int:
    from vhostkit.kernel.tap import Tap

    for name in args.names:
        raw = _sys(name, "tun_flags")
        if raw is None:
            if os.path.exists(os.path.join(SYS_NET, name)):
                raise InvalidOperation(f"{name} is not a tun/tap device")
            raise InvalidOperation(f"no such tap: {name}")
        flags = TunFlags(int(raw, 16) & 0xFFFF)
        if TunFlags.TAP not in flags:
            raise InvalidOperation(f"{name} is a tun device, not a tap")
        with Tap(
            name,
            vnet_hdr=TunFlags.VNET_HDR in flags,
            multi_queue=TunFlags.MULTI_QUEUE in flags,
        ) as tap:
            tap.set_persist(False)
        if os.path.exists(os.path.join(SYS_NET, name)):
            print(f"{name}: no longer persistent; it goes when its last user closes it")
        else:
            print(f"{name}: deleted")
    return 0
