"""``vhostkit swap PATH --to kernel|user``: move a running net device to the other data plane.

PATH is the control socket of ``vhostkit backend net ... --control PATH``. The daemon stops
the rings on the plane that serves them, hands their positions, memory, addresses and eventfds
to the other plane and starts them there; the front-end sees nothing. The output says how long
the rings were stopped (the pause) and where each ring was; ``--json`` prints the daemon's
answer (``{"ok": true, "from": ..., "to": ..., "pause_ms": ..., "positions": {...}}``).
A swap the daemon refuses (no ``/dev/vhost-net``, a feature the kernel cannot serve) leaves
the device where it was and exits 1 with the reason.
"""

from __future__ import annotations

import argparse

from vhostkit.cli.common import add_json_option, print_json

__all__ = ["add_arguments", "run"]


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vhostkit swap PATH --to kernel|user [--json] [--timeout S]``."""
    parser.add_argument("path", metavar="PATH", help="the daemon's control socket (--control)")
    parser.add_argument(
        "--to", required=True, choices=("kernel", "user"), help="the data plane to move to"
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=30.0,
        metavar="S",
        help="how long to wait for the daemon's answer (default 30 s)",
    )
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    """Ask for the swap; print the pause and the positions."""
    from vhostkit.devices.net_swap import swap

    result = swap(args.path, args.to, timeout=args.timeout)
    if getattr(args, "json", False):
        print_json(result.to_json())
        return 0
    if result.from_plane == result.to_plane:
        print(f"already on the {result.to_plane} plane: nothing to do (pause 0 ms)")
        return 0
    where = (
        ", ".join(f"ring {i} at {base}" for i, base in sorted(result.positions.items()))
        or "no ring was running"
    )
    print(
        f"swapped {result.from_plane} -> {result.to_plane}: pause {result.pause_ms:.3f} ms "
        f"({where})"
    )
    return 0
