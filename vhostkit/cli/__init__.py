"""The ``vhostkit`` command line: one parser tree, one module per command group.

=================================  ===========================================================
``vhostkit demo``                  the README's main job (:mod:`vhostkit.cli.demo`)
``vhostkit backend net|blk ...``   the vhost-user back-end daemons (:mod:`vhostkit.cli.backend`);
                                   ``net-backend`` / ``blk-backend`` are aliases
``vhostkit swap PATH --to ...``    move a running net device between its planes
                                   (:mod:`vhostkit.cli.swap`)
``vhostkit probe [--json]``        what this host can do (:mod:`vhostkit.cli.probe`)
``vhostkit tap create|list|...``   tap devices for the data planes (:mod:`vhostkit.cli.tap`)
``vhostkit trace ...``             a decoding vhost-user proxy (:mod:`vhostkit.trace.cli`)
``vhostkit lab check|run|clean``   scripted networking labs (:mod:`vhostkit.lab.cli`)
``vhostkit bench [--quick]``       the benchmarks, one table (:mod:`vhostkit.cli.bench`)
=================================  ===========================================================

**Adding a command.** A command is a module with two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...  # its own options
    def run(args: argparse.Namespace) -> int: ...                    # the exit code

and one :class:`Command` line in :data:`COMMANDS` (that is where the tracer, ``vhostkit
trace``, plugs in). The module adds only its own options (it may add its own sub-commands with
``parser.add_subparsers``). It does not add the global options: after the tree is built,
every parser in it gets ``-v/--verbose`` and ``--log-level``, so they work before and after
any sub-command. A command whose output is data calls :func:`~vhostkit.cli.common.add_json_option`
on its parser; ``--json`` is then accepted there (and before the sub-command), and refused for
commands that have no data output. ``run`` may raise a :class:`~vhostkit.errors.VhostError`
or ``OSError``: it is printed as one ``vhostkit ...: error: ...`` line (no traceback) and
becomes the exit code (:func:`~vhostkit.cli.common.exit_code`).

Exit codes: 0 success; 1 the command failed (a device missing, no permission, I/O); 2 the
command line or a path it names cannot be used (bad arguments, a socket path that is live or
not a socket).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vhostkit.cli.common import LOG_LEVELS, exit_code, format_error
from vhostkit.cli.demo import run_demo
from vhostkit.errors import VhostError

__all__ = ["COMMANDS", "Command", "build_parser", "main", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One top-level command: ``module`` provides ``add`` (options) and ``run`` (the work).

    ``log_level`` is the logging level unless ``-v`` / ``--log-level`` say otherwise (daemons
    log what they do at INFO; one-shot commands stay quiet).
    """

    name: str
    module: str
    help: str
    add: str = "add_arguments"
    run: str = "run"
    log_level: str = "warning"


#: The command tree, in ``--help`` order. A new command module is one more line here.
COMMANDS: tuple[Command, ...] = (
    Command("demo", "vhostkit.cli.demo", "a vhostkit front-end drives a vhostkit back-end"),
    Command("backend", "vhostkit.cli.backend", "serve a vhost-user device", log_level="info"),
    Command(
        "net-backend",
        "vhostkit.cli.backend",
        "alias of 'backend net'",
        add="add_net_arguments",
        log_level="info",
    ),
    Command(
        "blk-backend",
        "vhostkit.cli.backend",
        "alias of 'backend blk'",
        add="add_blk_arguments",
        log_level="info",
    ),
    Command("probe", "vhostkit.cli.probe", "what this host can do, and how to fix each 'no'"),
    Command("tap", "vhostkit.cli.tap", "create, list and delete tap devices"),
    Command("swap", "vhostkit.cli.swap", "move a running net device to the other data plane"),
    Command("trace", "vhostkit.trace.cli", "trace a vhost-user connection, decoded"),
    Command("lab", "vhostkit.lab.cli", "scripted VM networking labs: check and run lab files"),
    Command("bench", "vhostkit.cli.bench", "run the benchmarks, print one table of figures"),
)


_GLOBAL_DESTS = frozenset({"verbose", "log_level", "json"})


def _subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _children(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        child
        for action in _subparser_actions(parser)
        for child in dict.fromkeys(action.choices.values())  # an alias is the same parser
    ]


def _has_json(parser: argparse.ArgumentParser) -> bool:
    return "--json" in parser._option_string_actions or any(
        _has_json(child) for child in _children(parser)
    )


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every parser below it the global options (defaults suppressed, so
    that a sub-command's parser does not reset what was given before it). ``--json`` goes on
    the parsers on the way to a command that has it."""
    taken = parser._option_string_actions
    data = "--json" in taken
    for action in parser._actions:
        # a command module that added one of these itself: a default there would overwrite
        # what was given before the command
        if action.dest in _GLOBAL_DESTS:
            action.default = argparse.SUPPRESS
    if "-v" not in taken and "--verbose" not in taken:
        parser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log everything, protocol messages included (--log-level debug)",
        )
    if "--log-level" not in taken:
        parser.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help="how much to log to stderr",
        )
    if not data and _has_json(parser):
        parser.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print data as JSON (for the sub-commands whose output is data)",
        )
    parser.set_defaults(_parser=parser, _json_ok=data)
    for child in _children(parser):
        _add_global_options(child)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``vhostkit`` parser tree (imports every command module)."""
    parser = argparse.ArgumentParser(
        prog="vhostkit",
        description="Drive Linux virtio data planes: kernel vhost and vhost-user, both sides.",
        epilog="Global options (-v, --log-level, --json) may also follow the command. Exit "
        "codes: 0 success, 1 the command failed, 2 bad arguments or an unusable path.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = importlib.import_module(command.module)
        add: Callable[[argparse.ArgumentParser], None] = getattr(module, command.add)
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        add(child)
        child.set_defaults(_run=getattr(module, command.run), _log_level=command.log_level)
    _add_global_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    leaf: argparse.ArgumentParser = args._parser  # the innermost command's parser
    if extra:
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "json", False) and not args._json_ok:
        leaf.error("--json: this command's output is not data")
    if not hasattr(args, "json"):
        args.json = False
    verbose = getattr(args, "verbose", False)
    level = "debug" if verbose else getattr(args, "log_level", None) or args._log_level
    logging.basicConfig(level=level.upper(), format="%(name)s: %(message)s")
    try:
        return int(args._run(args))
    except BrokenPipeError:
        # the reader went away (``vhostkit probe | head``): no error message, and no second
        # one when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (VhostError, OSError) as exc:
        log.debug("%s failed", leaf.prog, exc_info=True)
        print(f"{leaf.prog}: error: {format_error(exc)}", file=sys.stderr, flush=True)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
