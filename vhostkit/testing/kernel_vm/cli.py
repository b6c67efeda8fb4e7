"""``python3 -m vhostkit.testing.kernel_vm``: prepare the kernel VM, or run a command in it."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from vhostkit.testing.kernel_vm.common import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    VmError,
)
from vhostkit.testing.kernel_vm.image import prepare
from vhostkit.testing.kernel_vm.runner import run_in_vm

__all__ = ["main"]


def main(args: Sequence[str] | None = None) -> int:
    """Parse ``args`` (default: ``sys.argv[1:]``), do the command, return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python3 -m vhostkit.testing.kernel_vm",
        description="Run commands under a Debian kernel with vhost_net/vhost_vsock (QEMU, TCG).",
    )
    parser.add_argument(
        "--cache", help="cache directory (default $VHOSTKIT_CACHE or ~/.cache/vhostkit)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p_prep = sub.add_parser("prepare", help="fetch the kernel and build the initramfs")
    p_prep.add_argument(
        "--refresh", action="store_true", help="ask apt again which kernel package is current"
    )
    p_run = sub.add_parser("run", help="boot once and run a command in the guest")
    p_run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p_run.add_argument("--share", help="host directory the guest may write (same path inside)")
    p_run.add_argument("--machine", choices=("microvm", "q35"))
    p_run.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, help="MiB")
    p_run.add_argument("--cpus", type=int, default=DEFAULT_CPUS)
    p_run.add_argument("--console", action="store_true", help="print the console log")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO, format="%(name)s: %(message)s"
    )
    try:
        if ns.command == "prepare":
            t0 = time.monotonic()
            prepared = prepare(ns.cache, refresh=ns.refresh)
            print(
                f"{prepared.package} ({prepared.version}) in {prepared.directory} "
                f"[{'microvm/PVH' if prepared.pvh_capable else 'q35'}] "
                f"{time.monotonic() - t0:.2f} s"
            )
            return 0
        cmd = list(ns.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            parser.error("run needs a command after --")
        result = run_in_vm(
            cmd,
            timeout=ns.timeout,
            share=ns.share,
            cache_dir=ns.cache,
            machine=ns.machine,
            memory_mb=ns.memory,
            cpus=ns.cpus,
        )
    except VmError as exc:
        print(f"kernel_vm: {exc}", file=sys.stderr)
        return 2
    if ns.console:
        sys.stderr.write(result.console)
    sys.stdout.write(result.output)
    sys.stdout.flush()
    print(
        f"kernel_vm: {result.machine} boot {result.boot_seconds:.2f} s, "
        f"total {result.total_seconds:.2f} s, exit {result.returncode}",
        file=sys.stderr,
    )
    return result.returncode
