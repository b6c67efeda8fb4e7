"""Run a command under a real Linux kernel that has vhost_net and vhost_vsock.

The machines vhostkit is developed on may run a kernel without vhost (no ``/dev/vhost-net``).
Debian's kernel has both as modules, and QEMU boots it in software emulation (TCG) in a few
seconds. This package:

* :func:`prepare` (:mod:`.image`) fetches Debian's kernel package (the one
  ``linux-image-amd64`` depends on) with ``apt-get download``, unpacks it with ``dpkg -x``,
  runs ``depmod -b``, extracts an uncompressed ``vmlinux`` from the bzImage (:mod:`.elf`, for
  a PVH boot of QEMU's ``microvm`` machine) and builds a small busybox initramfs whose
  ``/init`` is the package data file ``init.sh``. Everything lands in a cache directory
  (``$VHOSTKIT_CACHE`` or ``~/.cache/vhostkit``); a second call returns at once.
* :func:`run_in_vm` (:mod:`.runner`) boots that kernel once, with the host's ``/`` as a
  read-only virtio-9p root under an overlayfs (tmpfs upper layer, so the guest may write
  anywhere), plus one read-write 9p share (mounted in the guest at the *same path* as on the
  host) for the job's files. It runs the command in a chroot of that root, with
  :data:`GUEST_ENV_VAR` set to ``1`` in its environment, and brings back its output and exit
  code.
* Extra devices (:mod:`.qemu_args`): :meth:`KernelVm.run` (and :func:`run_in_vm`) take
  ``extra_qemu_args``, a list of QEMU arguments or a function of the machine booted
  (``"microvm"`` or ``"q35"``) that returns them, since the same device is
  ``virtio-*-device`` (virtio-mmio) on microvm and ``virtio-*-pci`` on q35, and a boot may be
  retried on q35. ``shared_memory=True`` puts guest RAM in a shared memfd, which a vhost-user
  back-end needs in order to map it. :func:`vhost_user_net_args` builds the arguments of a
  virtio-net device served by a vhost-user back-end; the guest loads ``virtio_net``, so its
  interface comes up as ``eth0``. :func:`vhost_user_blk_args` does the same for a virtio-blk
  disk (``virtio_blk``, ``vda``).

Command line (:mod:`.cli`)::

    python3 -m vhostkit.testing.kernel_vm prepare
    python3 -m vhostkit.testing.kernel_vm run [--share DIR] [--timeout S] -- CMD...

Failures are loud: a kernel that never reaches ``/init``, an init that fails, a job that
never reports its exit code all raise :class:`VmBootError` with the tail of the console log;
a job that runs past its timeout kills QEMU and raises :class:`VmTimeout`.
"""

from __future__ import annotations

from vhostkit.testing.kernel_vm.common import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    GUEST_ENV_VAR,
    GUEST_MODULES,
    KERNEL_META_PACKAGE,
    ExtraQemuArgs,
    PreparedKernel,
    VmBootError,
    VmError,
    VmPrepareError,
    VmResult,
    VmTimeout,
    default_cache_dir,
)
from vhostkit.testing.kernel_vm.elf import extract_vmlinux, has_pvh_note
from vhostkit.testing.kernel_vm.image import prepare, resolve_module_order
from vhostkit.testing.kernel_vm.qemu_args import (
    kernel_vm_argv,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from vhostkit.testing.kernel_vm.runner import KernelVm, run_in_vm

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT",
    "GUEST_ENV_VAR",
    "GUEST_MODULES",
    "KERNEL_META_PACKAGE",
    "ExtraQemuArgs",
    "KernelVm",
    "PreparedKernel",
    "VmBootError",
    "VmError",
    "VmPrepareError",
    "VmResult",
    "VmTimeout",
    "default_cache_dir",
    "extract_vmlinux",
    "has_pvh_note",
    "kernel_vm_argv",
    "prepare",
    "resolve_module_order",
    "run_in_vm",
    "vhost_user_blk_args",
    "vhost_user_net_args",
]
