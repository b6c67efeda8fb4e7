"""``vhostkit trace``: the command line of the tracer.

``add_arguments`` fills an :mod:`argparse` parser (the ``trace`` sub-command of ``vhostkit``),
``run`` executes the parsed arguments and returns the exit status:

* ``vhostkit trace --listen PATH --connect PATH [--json] [--save FILE] [--device net|blk|none]``
  runs the proxy until SIGINT/SIGTERM (exit 0), or until a stream cannot be framed (exit 1,
  with the reason on stderr). Records go to stdout, one line each (text, or JSON with
  ``--json``); ``--save`` also writes them as JSON lines to FILE. Status lines ("listening
  on ...") go to stderr, so stdout holds records only.
* ``vhostkit trace show FILE [--filter REQ]... [--json]`` prints a saved trace again.
  ``--filter`` keeps the messages whose request name matches REQ (case-insensitive; shell
  wildcards allowed: ``SET_VRING_*``; several filters or a comma-separated list keep any that
  match), replies included; without a filter proxy events are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import signal
import sys
from collections.abc import Iterator
from enum import IntFlag
from typing import IO

from vhostkit.errors import InvalidParam, VhostError
from vhostkit.trace.decode import RecordKind, TraceRecord
from vhostkit.trace.format import format_text, from_json, to_json
from vhostkit.trace.proxy import TraceProxy
from vhostkit.virtio.blk import BlkFeature
from vhostkit.virtio.features import VirtioNetFeature

__all__ = ["add_arguments", "run"]

DEVICES: dict[str, type[IntFlag] | None] = {
    "net": VirtioNetFeature,
    "blk": BlkFeature,
    "none": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``trace`` options and its ``show`` sub-command to ``parser``."""
    parser.description = (
        "A transparent vhost-user proxy that prints every message both ways (and on the "
        "back-end channel), decoded."
    )
    parser.add_argument("--listen", metavar="PATH", help="socket the front-end connects to")
    parser.add_argument("--connect", metavar="PATH", help="socket the back-end listens on")
    parser.add_argument("--json", action="store_true", help="print one JSON object per message")
    parser.add_argument("--save", metavar="FILE", help="also write the records as JSON lines")
    parser.add_argument(
        "--device",
        choices=sorted(DEVICES),
        default="net",
        help="name device-specific feature bits as this device's (default: net)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="keep trying to reach the back-end this long when a front-end connects",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=None,
        metavar="N",
        help="exit after N front-end connections ended (default: run until a signal)",
    )
    sub = parser.add_subparsers(dest="trace_command", metavar="{show}")
    show = sub.add_parser("show", help="print a trace saved with --save")
    show.add_argument("file", help="a file written by --save")
    show.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="REQ",
        help="only this request (wildcards allowed; repeat or comma-separate for several)",
    )
    show.add_argument("--json", action="store_true", dest="show_json", help="print JSON lines")


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` (parsed with :func:`add_arguments`) asks for; the exit status."""
    if getattr(args, "trace_command", None) == "show":
        return show(args.file, args.filter, as_json=args.show_json)
    if not args.listen or not args.connect:
        print("vhostkit trace: --listen PATH and --connect PATH are required", file=sys.stderr)
        return 2
    return trace(
        args.listen,
        args.connect,
        as_json=args.json,
        save=args.save,
        device=DEVICES[args.device],
        connect_timeout=args.connect_timeout,
        sessions=args.sessions,
    )


def trace(
    listen: str,
    connect: str,
    *,
    as_json: bool = False,
    save: str | None = None,
    device: type[IntFlag] | None = VirtioNetFeature,
    connect_timeout: float = 5.0,
    sessions: int | None = None,
    out: IO[str] | None = None,
) -> int:
    """The proxy behind ``vhostkit trace``; returns the exit status."""
    stream = out if out is not None else sys.stdout
    with contextlib.ExitStack() as stack:
        saved = stack.enter_context(open(save, "w", encoding="utf-8")) if save else None

        def sink(rec: TraceRecord) -> None:
            line = to_json(rec)
            if saved is not None:
                saved.write(line + "\n")
                saved.flush()
            print(line if as_json else format_text(rec), file=stream, flush=True)

        try:
            proxy = stack.enter_context(
                TraceProxy(
                    listen,
                    connect,
                    sink,
                    device=device,
                    connect_timeout=connect_timeout,
                    max_sessions=sessions,
                )
            )
        except (VhostError, OSError) as exc:
            print(f"vhostkit trace: {exc}", file=sys.stderr)
            return 1
        stack.enter_context(_signals_to(proxy.wakeup_fd))
        print(
            f"vhostkit trace: listening on {listen}, forwarding to {connect}",
            file=sys.stderr,
            flush=True,
        )
        proxy.serve()
        if proxy.failure is not None:
            print(f"vhostkit trace: {proxy.failure}", file=sys.stderr, flush=True)
            return 1
        why = proxy.stop_signal.name if proxy.stop_signal is not None else "done"
        print(f"vhostkit trace: stopped ({why})", file=sys.stderr, flush=True)
    return 0


@contextlib.contextmanager
def _signals_to(fd: int) -> Iterator[None]:
    """SIGINT and SIGTERM write their number to ``fd`` (and do nothing else) meanwhile."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, _ignore) for sig in sigs}
    old_fd = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: object) -> None:
    """Python-level handler; the wakeup fd carries the signal to the proxy's loop."""


def _matcher(filters: list[str]) -> list[str]:
    return [f.strip().upper() for item in filters for f in item.split(",") if f.strip()]


def show(path: str, filters: list[str] | None = None, *, as_json: bool = False) -> int:
    """Print the trace saved in ``path``; 1 if a line is not a record (it is reported)."""
    patterns = _matcher(filters or [])
    status = 0
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"vhostkit trace show: {exc}", file=sys.stderr)
        return 1
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = from_json(line)
            except InvalidParam as exc:
                print(f"vhostkit trace show: {path}:{lineno}: {exc}", file=sys.stderr)
                status = 1
                continue
            if patterns and not (
                rec.kind is RecordKind.MESSAGE
                and any(fnmatch.fnmatchcase(rec.request.upper(), p) for p in patterns)
            ):
                continue
            print(to_json(rec) if as_json else format_text(rec), flush=True)
    return status
