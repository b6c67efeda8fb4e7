"""The one ``vhostkit`` parser tree, through the real entry point.

Every command's ``--help`` names ``vhostkit ...`` and documents every option; the global
options work before and after the sub-command; ``--json`` only where the output is data.
"""

from __future__ import annotations

import argparse
import json

import pytest
from helpers.cli_run import vhostkit

from vhostkit.cli import build_parser


def all_parsers() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """(command words, parser) for every parser in the tree, aliases once."""
    found: list[tuple[list[str], argparse.ArgumentParser]] = []

    def walk(words: list[str], parser: argparse.ArgumentParser) -> None:
        found.append((words, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen: set[int] = set()
                for name, child in action.choices.items():
                    if id(child) not in seen:
                        seen.add(id(child))
                        walk([*words, name], child)

    walk([], build_parser())
    return found


PARSERS = all_parsers()


def test_the_tree_has_every_command() -> None:
    commands = {" ".join(words) for words, _ in PARSERS}
    assert {
        "demo",
        "backend net",
        "backend blk",
        "net-backend",
        "blk-backend",
        "probe",
        "tap create",
        "tap list",
        "tap delete",
    } <= commands


@pytest.mark.parametrize("words", [w for w, _ in PARSERS], ids=lambda w: " ".join(w) or "-")
def test_every_help_names_vhostkit_and_documents_every_option(words: list[str]) -> None:
    parser = dict((" ".join(w), p) for w, p in PARSERS)[" ".join(words)]
    proc = vhostkit(*words, "--help")
    assert proc.returncode == 0, proc
    assert proc.stdout.startswith(f"usage: {' '.join(['vhostkit', *words])}"), proc.stdout
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in action.choices:
                assert name in proc.stdout
            continue
        assert action.help, f"undocumented: {action}"
        if action.help == argparse.SUPPRESS:
            continue  # deliberately hidden (an internal option its command passes itself)
        for option in action.option_strings:
            assert option in proc.stdout, option
    for option in ("-v", "--verbose", "--log-level"):
        assert option in proc.stdout


def test_global_options_before_and_after_the_command(tmp_path) -> None:
    missing = str(tmp_path / "none.img")
    sock = str(tmp_path / "s.sock")
    base = ["--socket", sock, "--image", missing]
    quiet = vhostkit("backend", "blk", *base)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr, quiet
    # -v logs the failure with its traceback (at debug): wherever -v stands
    for argv in (
        ["-v", "backend", "blk", *base],
        ["backend", "-v", "blk", *base],
        ["backend", "blk", "-v", *base],
        ["backend", "blk", *base, "--verbose"],
        ["--log-level", "debug", "blk-backend", *base],
        ["blk-backend", *base, "--log-level", "debug"],
    ):
        proc = vhostkit(*argv)
        assert proc.returncode == 1, (argv, proc)
        assert "Traceback" in proc.stderr, argv
        assert (
            proc.stderr.strip().splitlines()[-1].endswith(f"{missing}: No such file or directory")
        )


def test_json_before_and_after_where_output_is_data() -> None:
    for argv in (["--json", "probe"], ["probe", "--json"], ["-v", "probe", "--json"]):
        proc = vhostkit(*argv)
        assert proc.returncode == 0, proc
        assert json.loads(proc.stdout)["items"]
    for argv in (["--json", "tap", "list"], ["tap", "list", "--json"], ["tap", "--json", "list"]):
        proc = vhostkit(*argv)
        assert proc.returncode == 0, proc
        assert isinstance(json.loads(proc.stdout), list)


@pytest.mark.parametrize(
    "argv", [["--json", "demo"], ["demo", "--json"], ["--json", "tap", "delete", "x"]]
)
def test_json_is_refused_where_output_is_not_data(argv: list[str]) -> None:
    proc = vhostkit(*argv)
    assert proc.returncode == 2, proc
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "--json: this command's output is not data"
        if argv[0] == "--json"
        else "unrecognized arguments: --json"  # not even offered there
    ), proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("argv", "prog", "message"),
    [
        ([], "vhostkit", "the following arguments are required: COMMAND"),
        (["nonsense"], "vhostkit", "invalid choice: 'nonsense'"),
        (["backend"], "vhostkit backend", "the following arguments are required: DEVICE"),
        (["backend", "scsi"], "vhostkit backend", "invalid choice: 'scsi'"),
        (["tap"], "vhostkit tap", "the following arguments are required: ACTION"),
        (["tap", "create"], "vhostkit tap create", "the following arguments are required: NAME"),
        (["probe", "--bogus"], "vhostkit probe", "unrecognized arguments: --bogus"),
        (["--log-level", "loud", "probe"], "vhostkit", "invalid choice: 'loud'"),
        (["demo", "extra"], "vhostkit demo", "unrecognized arguments: extra"),
    ],
)
def test_bad_arguments_name_the_right_program(argv: list[str], prog: str, message: str) -> None:
    proc = vhostkit(*argv)
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith(f"usage: {prog} "), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message in last, proc.stderr
