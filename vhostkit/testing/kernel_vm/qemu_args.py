"""QEMU command lines: the kernel VM itself, and the vhost-user devices tests add to it.

:func:`kernel_vm_argv` is the VM (TCG, ``microvm`` with a PVH ``vmlinux`` or ``q35`` with the
bzImage, the 9p root and job shares, the serial console into a file). The device builders
return a *function of the machine booted* (pass it as ``extra_qemu_args``), since the same
device is ``virtio-*-device`` (virtio-mmio) on microvm and ``virtio-*-pci`` on q35, and a boot
may be retried on q35:

* :func:`vhost_user_net_args`: a virtio-net device served by a vhost-user back-end; the guest
  loads ``virtio_net``, so its interface comes up as ``eth0``.
* :func:`vhost_user_blk_args`: a virtio-blk disk the same way (``virtio_blk``, ``vda``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from vhostkit.testing.kernel_vm.common import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    ROOT_TAG,
    SHARE_TAG,
    ExtraQemuArgs,
    PreparedKernel,
    qemu_path,
)

__all__ = ["kernel_vm_argv", "vhost_user_blk_args", "vhost_user_net_args"]


def _host_tsc_khz() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def kernel_vm_argv(
    qemu: str,
    prepared: PreparedKernel,
    share: Path,
    console: Path,
    machine: str,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    cpus: int = DEFAULT_CPUS,
    extra_args: ExtraQemuArgs = (),
    shared_memory: bool = False,
) -> list[str]:
    """QEMU's command line for one boot of ``prepared`` on ``machine`` (``microvm`` or ``q35``).

    The host's ``/`` goes in read-only as the 9p share the init mounts as the root, ``share``
    read-write as the job's share, the serial console into the file ``console``.
    ``extra_args`` go last (a callable gets the machine name). ``shared_memory=True`` backs
    guest RAM with ``memory-backend-memfd,share=on`` (QEMU 7.2 takes the machine property
    ``memory-backend`` on microvm and q35 alike), so that a vhost-user back-end can map it from
    the fds of SET_MEM_TABLE; the RAM is private memory otherwise.
    """
    cmdline = [
        "console=ttyS0",
        "rdinit=/init",
        "panic=-1",
        "oops=panic",
        "mitigations=off",
        "random.trust_cpu=on",
        "nokaslr",
        "8250.nr_uarts=1",
        "loglevel=4",
    ]
    cpu = os.environ.get("VHOSTKIT_VM_CPU") or "max"
    argv = [qemu, "-accel", "tcg", "-cpu", cpu]
    memory_backend = ",memory-backend=mem0" if shared_memory else ""
    if machine == "microvm":
        cmdline.append(f"tsc_early_khz={_host_tsc_khz()}")
        argv += [
            "-M",
            f"microvm,x-option-roms=off,rtc=on,acpi=on,pcie=off{memory_backend}",
            "-kernel",
            qemu_path(prepared.vmlinux or ""),
        ]
        dev9p = "virtio-9p-device"
    else:
        argv += ["-M", f"q35{memory_backend}", "-kernel", qemu_path(prepared.vmlinuz)]
        dev9p = "virtio-9p-pci"
    if shared_memory:
        argv += [
            "-object",
            f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
        ]
    argv += [
        "-m",
        f"{memory_mb}M",
        "-smp",
        str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-initrd",
        qemu_path(prepared.initramfs),
        "-append",
        " ".join(cmdline),
        "-chardev",
        f"file,id=con0,path={qemu_path(console)}",
        "-serial",
        "chardev:con0",
        "-fsdev",
        "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        f"{dev9p},fsdev=fsroot,mount_tag={ROOT_TAG}",
        "-fsdev",
        f"local,id=fsshare,path={qemu_path(share)},security_model=none,multidevs=remap",
        "-device",
        f"{dev9p},fsdev=fsshare,mount_tag={SHARE_TAG}",
    ]
    argv += list(extra_args(machine) if callable(extra_args) else extra_args)
    return argv


def vhost_user_net_args(
    socket_path: str | os.PathLike[str],
    *,
    mac: str = "52:54:00:12:34:56",
    netdev_id: str = "vhunet0",
    device_args: str = "",
    queue_pairs: int = 1,
) -> Callable[[str], list[str]]:
    """QEMU arguments for a virtio-net device whose data plane is a vhost-user back-end.

    Returns a function of the machine (pass it as ``extra_qemu_args``, with
    ``shared_memory=True``): ``-chardev socket`` connecting to the back-end listening at
    ``socket_path`` (it must listen before the VM starts: QEMU exits when nobody answers),
    ``-netdev vhost-user`` on it, and ``virtio-net-device`` on microvm (virtio-mmio) or
    ``virtio-net-pci`` on q35 (without its iPXE option ROM: the VM boots with ``-kernel``).
    On microvm the virtio-mmio transports are made modern (``force-legacy=false``): QEMU's
    default is the legacy interface, on which the guest cannot ack ``VIRTIO_F_VERSION_1``.
    On q35 the device has no MSI-X (``vectors=0``), to dodge a QEMU 7.2 crash under TCG.
    ``device_args`` is appended to the device's options (e.g. ``"mrg_rxbuf=off"``).

    ``queue_pairs > 1``: multiqueue, ``queues=N`` on the netdev (QEMU checks the back-end's
    GET_QUEUE_NUM against it and needs its protocol feature MQ) and ``mq=on`` on the device
    (both transports take it). QEMU starts every pair's rings at DRIVER_OK and enables the
    pairs the driver asks for through the control queue (SET_VRING_ENABLE).
    """
    if queue_pairs < 1:
        raise ValueError(f"queue_pairs must be at least 1, not {queue_pairs}")
    path = qemu_path(os.fspath(socket_path))
    extra = f",{device_args}" if device_args else ""
    queues = f",queues={queue_pairs}" if queue_pairs > 1 else ""
    mq = ",mq=on" if queue_pairs > 1 else ""

    def args(machine: str) -> list[str]:
        if machine == "microvm":
            # QEMU's virtio-mmio transports are legacy (virtio 0.9.5) unless told otherwise:
            # without this the guest cannot ack VERSION_1. It applies to every virtio-mmio
            # transport of the machine (the 9p ones too; the guest handles both versions).
            pre = ["-global", "virtio-mmio.force-legacy=false"]
            device = "virtio-net-device"
        else:
            # vectors=0 (INTx, no MSI-X): under TCG, QEMU 7.2 segfaults in vhost_net_start ->
            # msix_set_vector_notifiers (virtio-pci's vector unmask for a vhost device without
            # KVM irqfds) once a driver that enabled MSI-X, as Linux does, sets DRIVER_OK.
            pre, device = [], "virtio-net-pci,romfile=,vectors=0"
        return [
            *pre,
            "-chardev",
            f"socket,id={netdev_id}-chr,path={path}",
            "-netdev",
            f"vhost-user,id={netdev_id},chardev={netdev_id}-chr{queues}",
            "-device",
            f"{device},netdev={netdev_id},mac={mac}{mq}{extra}",
        ]

    return args


def vhost_user_blk_args(
    socket_path: str | os.PathLike[str],
    *,
    num_queues: int = 1,
    chardev_id: str = "vhublk0",
    device_args: str = "",
    reconnect: int = 0,
) -> Callable[[str], list[str]]:
    """QEMU arguments for a virtio-blk disk whose data plane is a vhost-user back-end.

    Like :func:`vhost_user_net_args` (pass the result as ``extra_qemu_args``, with
    ``shared_memory=True``; the back-end must listen before the VM starts): ``-chardev
    socket`` to ``socket_path``, then ``vhost-user-blk`` on microvm (virtio-mmio, made modern
    with ``force-legacy=false``) or ``vhost-user-blk-pci`` on q35. The PCI device keeps its
    MSI-X vectors: the QEMU 7.2 TCG crash of ``virtio-net-pci`` does not happen with it.
    ``num-queues=num_queues`` always (QEMU's default, "auto", means one queue on virtio-mmio
    and one per vCPU on PCI). On microvm the rings get 1024 descriptors whatever the
    ``queue-size`` (QEMU 7.2's virtio-mmio reports that as QueueNumMax, and Linux takes it).
    The guest loads ``virtio_blk``; the disk is ``/dev/vda``. ``device_args`` is appended to
    the device's options (e.g. ``"packed=on"``).

    ``reconnect=N`` (seconds, QEMU 7.2's chardev option): when the back-end goes away, QEMU
    stops the device's rings and connects to ``socket_path`` again every ``N`` seconds; once
    a back-end answers, it sets the device up on it again (with the same inflight area,
    SET_INFLIGHT_FD). The guest sees no error meanwhile, its requests wait.
    """
    path = qemu_path(os.fspath(socket_path))
    extra = f",{device_args}" if device_args else ""
    chardev_extra = f",reconnect={reconnect}" if reconnect else ""

    def args(machine: str) -> list[str]:
        if machine == "microvm":
            pre, device = ["-global", "virtio-mmio.force-legacy=false"], "vhost-user-blk"
        else:
            # MSI-X stays on: QEMU 7.2's TCG crash with virtio-net-pci (vhost_user_net_args)
            # does not happen with vhost-user-blk-pci
            pre, device = [], "vhost-user-blk-pci"
        return [
            *pre,
            "-chardev",
            f"socket,id={chardev_id},path={path}{chardev_extra}",
            "-device",
            f"{device},chardev={chardev_id},num-queues={num_queues}{extra}",
        ]

    return args
