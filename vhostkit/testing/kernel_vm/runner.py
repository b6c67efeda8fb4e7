"""Running a job: boot a prepared kernel under QEMU (TCG), run one command, bring back its result.

:func:`run_in_vm` (or :meth:`KernelVm.run`) boots the kernel :func:`prepare` built, with the
host's ``/`` as a read-only virtio-9p root under an overlayfs (tmpfs upper layer, so the guest
may write anywhere), plus one read-write 9p share (mounted in the guest at the *same path* as
on the host) for the job's files. It runs the command in a chroot of that root, with
:data:`GUEST_ENV_VAR` set to ``1`` in its environment, and brings back its output and exit code.
A boot that hangs before the job starts is retried once on ``q35``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vhostkit.testing.kernel_vm.common import (
    CONTROL_DIR,
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    GUEST_ENV_VAR,
    MARK_FAIL,
    MARK_INIT,
    MARK_JOB,
    MAX_CONSOLE_TAIL,
    ExtraQemuArgs,
    PreparedKernel,
    VmBootError,
    VmError,
    VmResult,
    VmTimeout,
)
from vhostkit.testing.kernel_vm.image import prepare
from vhostkit.testing.kernel_vm.qemu_args import kernel_vm_argv

__all__ = ["KernelVm", "run_in_vm"]

log = logging.getLogger(__name__)


def _tail(text: str, lines: int = MAX_CONSOLE_TAIL) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


#: Variables an outer pytest sets about itself: not meant for a command in the guest.
_ENV_DROP = frozenset({"PYTEST_CURRENT_TEST", "PYTEST_VERSION"})


def _default_guest_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ENV_DROP}


class KernelVm:
    """Boots a :class:`PreparedKernel` under QEMU (TCG) to run one command per boot."""

    def __init__(
        self,
        prepared: PreparedKernel,
        *,
        machine: str | None = None,
        memory_mb: int = DEFAULT_MEMORY_MB,
        cpus: int = DEFAULT_CPUS,
        qemu: str | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        self.prepared = prepared
        machine = machine or os.environ.get("VHOSTKIT_VM_MACHINE") or "microvm"
        if machine not in ("microvm", "q35"):
            raise ValueError(f"machine must be microvm or q35, not {machine!r}")
        if machine == "microvm" and not prepared.pvh_capable:
            machine = "q35"
        self.machine = machine
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        found = qemu or shutil.which("qemu-system-x86_64")
        if found is None:
            raise VmError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        self.qemu = found

    def qemu_argv(
        self,
        share: Path,
        console: Path,
        machine: str | None = None,
        *,
        extra_args: ExtraQemuArgs = (),
        shared_memory: bool = False,
    ) -> list[str]:
        """QEMU's command line for one boot on ``machine`` (default: :attr:`machine`).

        See :func:`~vhostkit.testing.kernel_vm.qemu_args.kernel_vm_argv`.
        """
        machine = machine or self.machine
        return kernel_vm_argv(
            self.qemu,
            self.prepared,
            share,
            console,
            machine,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            extra_args=extra_args,
            shared_memory=shared_memory,
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        share: str | os.PathLike[str] | None = None,
        extra_qemu_args: ExtraQemuArgs = (),
        shared_memory: bool = False,
    ) -> VmResult:
        """Boot, run ``argv`` in the guest, power off. See :func:`run_in_vm`."""
        if not argv:
            raise ValueError("empty command")
        with contextlib.ExitStack() as stack:
            if share is None:
                share_dir = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="vhostkit-vm-share-"))
                )
            else:
                share_dir = Path(share).resolve()
                share_dir.mkdir(parents=True, exist_ok=True)
            if any(c.isspace() for c in str(share_dir)) or share_dir == Path("/"):
                raise ValueError(f"unusable share directory {str(share_dir)!r}")
            ctl = share_dir / CONTROL_DIR
            if ctl.exists():
                shutil.rmtree(ctl)
            ctl.mkdir()
            stack.callback(shutil.rmtree, ctl, True)
            guest_env = dict(_default_guest_env() if env is None else env)
            guest_env[GUEST_ENV_VAR] = "1"
            workdir = Path(cwd).resolve() if cwd is not None else Path.cwd()
            cmd = list(argv)
            if cmd[0] in ("python", "python3"):
                cmd[0] = sys.executable
            job = [
                "#!/bin/sh",
                f"cd {shlex.quote(str(workdir))} || exit 125",
                "exec /usr/bin/env -i "
                + " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(guest_env.items()))
                + " "
                + shlex.join(cmd),
                "",
            ]
            (ctl / "job.sh").write_text("\n".join(job))
            (ctl / "vm.conf").write_text(f"SHARE_PATH={shlex.quote(str(share_dir))}\n")
            console_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="vhostkit-vm-console-"))
            )
            # A boot that hangs before the job starts is retried once, on q35 (microvm under
            # TCG has been seen to hang early in boot; q35 has not).
            for attempt, machine in enumerate((self.machine, "q35")):
                try:
                    return self._boot(
                        share_dir,
                        ctl,
                        console_dir / f"console{attempt}.log",
                        timeout,
                        machine,
                        extra_qemu_args,
                        shared_memory,
                    )
                except _BootHang as hang:
                    if attempt == 1:
                        raise VmBootError(str(hang), hang.console_tail) from None
                    log.warning("%s; retrying once on q35", hang)
        raise AssertionError("unreachable")  # pragma: no cover

    def _boot(
        self,
        share: Path,
        ctl: Path,
        console: Path,
        timeout: float,
        machine: str,
        extra_args: ExtraQemuArgs,
        shared_memory: bool,
    ) -> VmResult:
        console.touch()
        for name in ("rc", "output"):
            (ctl / name).unlink(missing_ok=True)
        qemu_argv = self.qemu_argv(
            share, console, machine, extra_args=extra_args, shared_memory=shared_memory
        )
        log.debug("qemu: %s", shlex.join(qemu_argv))
        qemu_log = console.with_suffix(".qemu")
        t0 = time.monotonic()
        with qemu_log.open("wb") as qemu_out:
            proc = subprocess.Popen(
                qemu_argv, stdin=subprocess.DEVNULL, stdout=qemu_out, stderr=subprocess.STDOUT
            )
        boot_seconds = 0.0
        try:
            while True:
                try:
                    proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - t0
                if not boot_seconds:
                    text = _read(console)
                    if MARK_JOB in text:
                        boot_seconds = elapsed
                    elif elapsed > self.boot_timeout:
                        if MARK_FAIL in text:  # init failed and could not power off
                            raise VmBootError(f"{machine} VM: the init failed", _tail(text))
                        raise _BootHang(
                            f"{machine} VM did not reach the job within {self.boot_timeout:.0f} s",
                            _tail(text),
                        )
                elif elapsed - boot_seconds > timeout:
                    raise VmTimeout(
                        f"job ran past its {timeout:.0f} s timeout; QEMU killed",
                        _tail(_read(console)),
                        _tail(_read(ctl / "output")),
                    )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        total = time.monotonic() - t0
        console_text = _read(console)
        qemu_text = _read(qemu_log).strip()
        output = _read(ctl / "output")
        rc_text = _read(ctl / "rc").strip()
        if not rc_text:
            if MARK_FAIL in console_text:
                reason = "the VM init failed"
            elif MARK_JOB in console_text:
                reason = "the job started but no exit code came back (guest crash?)"
            elif MARK_INIT in console_text:
                reason = "the VM init started but never reached the job"
            else:
                reason = "the kernel never reached /init"
            detail = f" (QEMU exit {proc.returncode}"
            detail += f": {qemu_text[-1000:]})" if qemu_text else ")"
            tail = _tail(console_text)
            if output:
                tail = f"{tail}\n--- job output (tail) ---\n{_tail(output)}"
            raise VmBootError(f"{machine} VM failed: {reason}{detail}", tail)
        try:
            returncode = int(rc_text)
        except ValueError:
            raise VmBootError(f"unreadable exit code {rc_text!r}", _tail(console_text)) from None
        log.info(
            "VM (%s): boot %.2f s, total %.2f s, exit %d", machine, boot_seconds, total, returncode
        )
        return VmResult(
            returncode=returncode,
            output=output,
            console=console_text,
            boot_seconds=boot_seconds,
            total_seconds=total,
            machine=machine,
        )


class _BootHang(VmError):
    def __init__(self, message: str, console_tail: str) -> None:
        super().__init__(message)
        self.console_tail = console_tail


def run_in_vm(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    share: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    machine: str | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    cpus: int = DEFAULT_CPUS,
    extra_qemu_args: ExtraQemuArgs = (),
    shared_memory: bool = False,
) -> VmResult:
    """Boot the prepared kernel once and run ``argv`` in the guest.

    ``cwd`` defaults to the current directory (the host's filesystem is the guest's). ``env``
    is the command's whole environment (default: this process's, less the variables an
    outer pytest sets about itself);
    :data:`GUEST_ENV_VAR` is always added. A leading ``python``/``python3`` is replaced by this
    interpreter's real path (``python3`` may be a pyenv shim). ``share`` is a host directory
    the guest can write to, at the same path; by default a temporary one. ``timeout`` counts
    from the start of the job. Returns the job's exit code and its output (stdout and stderr).

    ``extra_qemu_args`` adds devices (a list, or a function of the machine booted, see
    :func:`vhost_user_net_args`); ``shared_memory=True`` puts guest RAM in a shared memfd, as
    a vhost-user device needs.
    """
    prepared = prepare(cache_dir)
    vm = KernelVm(prepared, machine=machine, memory_mb=memory_mb, cpus=cpus)
    return vm.run(
        argv,
        cwd=cwd,
        env=env,
        timeout=timeout,
        share=share,
        extra_qemu_args=extra_qemu_args,
        shared_memory=shared_memory,
    )
