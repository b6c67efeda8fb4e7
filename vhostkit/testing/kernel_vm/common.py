"""What every part of the kernel VM harness shares: constants, errors and result values."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT",
    "GUEST_ENV_VAR",
    "GUEST_MODULES",
    "KERNEL_META_PACKAGE",
    "ExtraQemuArgs",
    "PreparedKernel",
    "VmBootError",
    "VmError",
    "VmPrepareError",
    "VmResult",
    "VmTimeout",
    "default_cache_dir",
]

#: Set to ``1`` in the environment of every command :func:`run_in_vm` runs in the guest.
GUEST_ENV_VAR = "VHOSTKIT_IN_VM"

#: The meta-package whose dependency names the kernel package to fetch.
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Modules the guest loads (their dependencies are added from modules.dep, in order).
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
    "vhost_iotlb",
    "vhost",
    "tun",
    "tap",
    "vhost_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vhost_vsock",
    # for a virtio-net device given with extra_qemu_args (pulls in net_failover, failover)
    "virtio_net",
    # for a virtio-blk device given with extra_qemu_args (a module in Debian's kernel)
    "virtio_blk",
    # for labs, whose networks are Linux bridges with veth pairs into namespaces
    "bridge",
    "veth",
)

#: Bumped whenever the layout of the cache or the initramfs changes.
FORMAT_VERSION = 1

# Names the image (init.sh, the cache) and the runner must agree on; internal to this package.
MANIFEST = "manifest.json"
CURRENT = "current.json"
CONTROL_DIR = ".vhostkit-vm"
ROOT_TAG = "vhostkit_root"
SHARE_TAG = "vhostkit_share"
MARK_INIT = "vhostkit-init: start"
MARK_JOB = "vhostkit-init: job start"
MARK_EXIT = "vhostkit-init: job exit"
MARK_FAIL = "vhostkit-init: FAILED"
MAX_CONSOLE_TAIL = 60

DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 600.0
DEFAULT_BOOT_TIMEOUT = 120.0


# --- errors ---------------------------------------------------------------------------------


class VmError(RuntimeError):
    """The kernel VM harness failed (this is test infrastructure, not a vhost error)."""


class VmPrepareError(VmError):
    """The kernel, its modules or the initramfs could not be fetched or built."""


class VmBootError(VmError):
    """The VM did not boot, its init failed, or the job never reported an exit code."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        text = message
        if console_tail:
            text = f"{message}\n--- console log (tail) ---\n{console_tail}"
        super().__init__(text)
        self.console_tail = console_tail


class VmTimeout(VmError):
    """The VM ran past its timeout; QEMU was killed."""

    def __init__(self, message: str, console_tail: str = "", output_tail: str = "") -> None:
        text = message
        if output_tail:
            text += f"\n--- job output (tail) ---\n{output_tail}"
        if console_tail:
            text += f"\n--- console log (tail) ---\n{console_tail}"
        super().__init__(text)
        self.console_tail = console_tail
        self.output_tail = output_tail


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreparedKernel:
    """What :func:`prepare` built: all paths live under the cache directory."""

    package: str
    version: str
    directory: Path
    vmlinuz: Path
    vmlinux: Path | None
    initramfs: Path
    modules: tuple[str, ...]

    @property
    def pvh_capable(self) -> bool:
        """True when an uncompressed vmlinux with a PVH entry note is available."""
        return self.vmlinux is not None


@dataclass(frozen=True, slots=True)
class VmResult:
    """The outcome of one :func:`run_in_vm`."""

    returncode: int
    output: str
    console: str = ""
    boot_seconds: float = 0.0
    total_seconds: float = 0.0
    machine: str = ""


#: Extra QEMU arguments for a VM: a fixed list, or a function of the machine booted
#: (``"microvm"`` or ``"q35"``) returning them (see :func:`vhost_user_net_args`).
ExtraQemuArgs = Sequence[str] | Callable[[str], Sequence[str]]


def default_cache_dir() -> Path:
    """``$VHOSTKIT_CACHE``, or ``~/.cache/vhostkit``."""
    env = os.environ.get("VHOSTKIT_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vhostkit"


def qemu_path(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")
