"""``vhostkit lab check|run|clean``: the command line of :mod:`vhostkit.lab` (thin).

* ``vhostkit lab check FILE...``: check lab files; every mistake with its line and key, and
  what ``lab run`` would refuse of a valid one on this host (and why).
* ``vhostkit lab run FILE [--json] [--keep-going] [--vm auto|always|never]``: run a lab, with
  live progress, then a table of every expectation and a timing line (``--json``: one JSON
  document instead). A lab that needs kernel vhost-net on a host without ``/dev/vhost-net``
  runs as a whole inside the kernel VM (``--vm auto``, the default).
* ``vhostkit lab clean``: remove namespaces that a killed lab left behind.

Exit codes: 0 when every expectation held, 1 when one failed (or a step failed), 2 for a lab
file or set-up error, 130 when interrupted (SIGINT or SIGTERM; teardown still runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vhostkit.lab.errors import LabError, LabFileError, LabSetupError
from vhostkit.lab.spec import Lab, load_lab

if TYPE_CHECKING:
    from vhostkit.lab.runner import LabResult

__all__ = ["add_arguments", "run"]

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``check``, ``run`` and ``clean`` to ``parser`` (the ``vhostkit lab`` parser)."""
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="check lab files and show each mistake with its line",
        description="Check lab files: every mistake is shown with its line, its key and what "
        "would be right; of a valid file, what 'lab run' would refuse on this host, and why. "
        "Exit 0 when all files are valid and runnable here, 2 otherwise.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a lab file (TOML)")
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    runp = sub.add_parser(
        "run",
        help="run a lab and report its expectations",
        description="Build the lab's network, start its guests and back-ends, run its steps, "
        "check its expectations and tear everything down. Exit 0 when every expectation "
        "held, 1 when one failed, 2 on a lab file or set-up error, 130 when interrupted.",
    )
    runp.add_argument("file", type=Path, metavar="FILE", help="the lab file (TOML)")
    runp.add_argument("--json", action="store_true", help="print the result as one JSON document")
    runp.add_argument(
        "--keep-going", action="store_true", help="run every step even after one failed"
    )
    runp.add_argument(
        "--vm",
        choices=("auto", "always", "never"),
        default="auto",
        help="run inside the kernel VM: when the lab needs /dev/vhost-net and this host has "
        "none (auto, the default), always, or never",
    )
    # used by a run inside the kernel VM to hand its result and progress back
    runp.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    runp.add_argument("--progress-file", type=Path, help=argparse.SUPPRESS)
    sub.add_parser(
        "clean",
        help="remove what a killed lab left behind",
        description="Remove the network namespaces of labs whose runner is no longer alive.",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``vhostkit lab ...`` command; returns the exit code."""
    if args.lab_command == "check":
        return _check(args.files, args.json, sys.stdout)
    if args.lab_command == "clean":
        return _clean(sys.stdout)
    return _run(args)


def _check(files: list[Path], as_json: bool, out: TextIO) -> int:
    from vhostkit.lab.runner import unsupported

    report: list[dict[str, Any]] = []
    status = EXIT_OK
    for path in files:
        try:
            lab = load_lab(path)
        except LabFileError as exc:
            status = EXIT_SETUP
            issues = [{"line": i.line, "key": i.key, "message": i.message} for i in exc.issues]
            report.append({"file": str(path), "valid": False, "issues": issues})
            if not as_json:
                for issue in exc.issues:
                    print(issue, file=out)
            continue
        refused = unsupported(lab)
        report.append({"file": str(path), "valid": True, "issues": [], "refused": refused})
        if refused:
            status = EXIT_SETUP
            if not as_json:
                print(f"{path}: a valid lab, but {_refusal(refused)}", file=out)
            continue
        if not as_json:
            print(
                f"{path}: ok: lab {lab.name}, {len(lab.guests)} guest(s), {len(lab.steps)} step(s)",
                file=out,
            )
    if as_json:
        json.dump(report, out, indent=2)
        out.write("\n")
    return status


def _clean(out: TextIO) -> int:
    from vhostkit.lab.network import NETNS_DIR, _netns

    removed = 0
    if NETNS_DIR.is_dir():
        for path in sorted(NETNS_DIR.iterdir()):
            pid = _runner_pid(path.name)
            if pid is None or Path(f"/proc/{pid}").exists():
                continue
            _netns().remove(path.name)
            print(f"removed netns {path.name}", file=out)
            removed += 1
    if not removed:
        print("nothing to clean", file=out)
    return EXIT_OK


def _runner_pid(name: str) -> int | None:
    """The runner pid in a lab namespace name (``vhk<pid>`` or ``vhk<pid>-<host>``)."""
    head = name.split("-", 1)[0]
    if not head.startswith("vhk") or not head[3:].isdigit():
        return None
    return int(head[3:])


def _refusal(missing: list[str]) -> str:
    return "this lab needs what the runner cannot do here:\n" + "\n".join(
        f"  - {item}" for item in missing
    )


def _run(args: argparse.Namespace) -> int:
    from vhostkit.lab.runner import run_lab, signals_interrupt, unsupported

    try:
        lab = load_lab(args.file)
    except LabFileError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SETUP
    missing = unsupported(lab, vm=args.vm)
    if missing:  # before anything is built or booted
        print(f"vhostkit lab run: {_refusal(missing)}", file=sys.stderr)
        return EXIT_SETUP
    progress, done = _progress(quiet=False)
    if args.progress_file is not None:
        progress = _to_file(args.progress_file, progress)
    try:
        with signals_interrupt():
            if _wants_vm(lab, args.vm):
                result = _run_in_vm(lab, args, progress)
            else:
                result = run_lab(lab, progress=progress, keep_going=args.keep_going)
    except LabSetupError as exc:
        done()
        print(f"vhostkit lab run: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except LabError as exc:
        done()
        print(f"vhostkit lab run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        done()
        print("vhostkit lab run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    done()
    if args.result_file is not None:
        args.result_file.write_text(json.dumps(result.to_json()))
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _show(result, lab)
    return _exit_code(result)


def _exit_code(result: LabResult) -> int:
    if result.error == "interrupted":
        return EXIT_INTERRUPTED
    if result.setup_failed:
        return EXIT_SETUP
    return EXIT_OK if result.passed else EXIT_FAILED


def _wants_vm(lab: Lab, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return lab.needs_kernel_vhost and not Path("/dev/vhost-net").exists()


def _run_in_vm(lab: Lab, args: argparse.Namespace, progress: Callable[[str], None]) -> LabResult:
    """Run the whole lab inside the kernel VM and bring its result back."""
    from vhostkit.lab.runner import LabResult

    try:
        from vhostkit.testing import kernel_vm
    except ImportError as exc:  # pragma: no cover - the harness ships with vhostkit
        raise LabSetupError("the kernel VM harness is missing") from exc
    progress("kernel VM: this host has no /dev/vhost-net, so the lab runs inside a VM")
    with tempfile.TemporaryDirectory(prefix="vhk-labvm-", dir="/tmp") as share:
        result_file = Path(share) / "result.json"
        argv = ["python3", "-m", "vhostkit", "lab", "run", "--vm", "never", "--json"]
        progress_file = Path(share) / "progress"
        progress_file.touch()
        argv += ["--result-file", str(result_file), "--progress-file", str(progress_file)]
        if args.keep_going:
            argv.append("--keep-going")
        argv.append(str(Path(args.file).resolve()))
        with _follow(progress_file, progress):
            try:
                vm = kernel_vm.run_in_vm(argv, share=share, timeout=lab.timeout + 60, cpus=2)
            except kernel_vm.VmError as exc:
                raise LabSetupError(f"the kernel VM failed: {exc}") from exc
        progress(f"kernel VM: booted in {vm.boot_seconds:.1f} s, done in {vm.total_seconds:.1f} s")
        if not result_file.exists():
            tail = vm.output.strip().splitlines()[-15:]
            raise LabSetupError("the lab inside the VM gave no result:\n" + "\n".join(tail))
        return LabResult.from_json(json.loads(result_file.read_text()))


def _to_file(path: Path, also: Callable[[str], None]) -> Callable[[str], None]:
    """A progress printer that also appends each line to ``path`` (flushed at once)."""

    def say(text: str) -> None:
        also(text)
        with path.open("a") as f:
            f.write(text + "\n")

    return say


@contextlib.contextmanager
def _follow(path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Show the lines a run inside the VM appends to ``path`` while it runs.

    The file is on the VM's 9p share, which has no change notification: it is read again
    every 0.2 s, and once more at the end.
    """
    stop = threading.Event()
    seen = 0

    def show_new() -> None:
        nonlocal seen
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for line in lines[seen:]:
            progress(f"kernel VM: {line}")
        seen = len(lines)

    def loop() -> None:
        while not stop.wait(0.2):
            show_new()

    thread = threading.Thread(target=loop, name="lab-vm-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show_new()


def _progress(quiet: bool) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A progress line printer: a rich status line on a terminal, plain lines otherwise."""
    if quiet:
        return (lambda text: None), (lambda: None)
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        from rich.console import Console

        console = Console(stderr=True, log_path=False)
        status = console.status("starting")
        status.start()

        def say(text: str) -> None:
            console.log(text)
            status.update(text)

        return say, status.stop

    def plain(text: str) -> None:
        print(f"lab: {text}", file=sys.stderr, flush=True)

    return plain, (lambda: None)


def _show(result: LabResult, lab: Lab) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"lab {result.lab}: {lab.summary}" if lab.summary else f"lab {result.lab}")
    for column in ("step", "expectation", "value", "limit", "result"):
        table.add_column(column, justify="right" if column in ("value", "limit") else "left")
    for o in result.outcomes:
        table.add_row(o.step, o.key, f"{o.value:g}", f"{o.limit:g}", "pass" if o.passed else "FAIL")
    console.print(table)
    for step in result.steps:
        if step.error:
            console.print(f"step {step.name} failed: {step.error}")
    if result.error:
        console.print(f"error: {result.error}")
    if result.leftovers:
        console.print(f"left behind: {', '.join(result.leftovers)}")
    verdict = "PASSED" if result.passed else "FAILED"
    console.print(
        f"{verdict}: {sum(o.passed for o in result.outcomes)}/{len(result.outcomes)} "
        f"expectations held; {len(result.steps)} step(s) in {result.seconds:.1f} s "
        f"(set-up {result.setup_seconds:.1f} s); teardown removed {len(result.removed)} item(s)"
    )
