"""Run a command under a real Linux kernel that has vhost_net and vhost_vsock.

The machines vhostkit is developed on may run a kernel without vhost (no ``/dev/vhost-net``).
Debian's kernel has both as modules, and QEMU boots it in software emulation (TCG) in a few
seconds. This module:

* :func:`prepare` fetches Debian's kernel package (the one ``linux-image-amd64`` depends on) with
  ``apt-get download``, unpacks it with ``dpkg -x``, runs ``depmod -b``, extracts an uncompressed
  ``vmlinux`` from the bzImage (for a PVH boot of QEMU's ``microvm`` machine) and builds a small
  busybox initramfs. Everything lands in a cache directory (``$VHOSTKIT_CACHE`` or
  ``~/.cache/vhostkit``); a second call returns at once.
* :func:`run_in_vm` boots that kernel once, with the host's ``/`` as a read-only virtio-9p root
  under an overlayfs (tmpfs upper layer, so the guest may write anywhere), plus one read-write
  9p share (mounted in the guest at the *same path* as on the host) for the job's files. It runs
  the command in a chroot of that root, with :data:`GUEST_ENV_VAR` set to ``1`` in its
  environment, and brings back its output and exit code.
* Extra devices: :meth:`KernelVm.run` (and :func:`run_in_vm`) take ``extra_qemu_args``, a list
  of QEMU arguments or a function of the machine booted (``"microvm"`` or ``"q35"``) that
  returns them, since the same device is ``virtio-*-device`` (virtio-mmio) on microvm and
  ``virtio-*-pci`` on q35, and a boot may be retried on q35. ``shared_memory=True`` puts guest
  RAM in a shared memfd, which a vhost-user back-end needs in order to map it.
  :func:`vhost_user_net_args` builds the arguments of a virtio-net device served by a
  vhost-user back-end; the guest loads ``virtio_net``, so its interface comes up as ``eth0``.
  :func:`vhost_user_blk_args` does the same for a virtio-blk disk (``virtio_blk``, ``vda``).

Command line::

    python3 -m vhostkit.testing.kernel_vm prepare
    python3 -m vhostkit.testing.kernel_vm run [--share DIR] [--timeout S] -- CMD...

Failures are loud: a kernel that never reaches ``/init``, an init that fails, a job that
never reports its exit code all raise :class:`VmBootError` with the tail of the console log;
a job that runs past its timeout kills QEMU and raises :class:`VmTimeout`.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import hashlib
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GUEST_ENV_VAR",
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
    "prepare",
    "resolve_module_order",
    "run_in_vm",
    "vhost_user_blk_args",
    "vhost_user_net_args",
]

log = logging.getLogger(__name__)

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
_FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_CURRENT = "current.json"
_CONTROL_DIR = ".vhostkit-vm"
_ROOT_TAG = "vhostkit_root"
_SHARE_TAG = "vhostkit_share"
_MARK_INIT = "vhostkit-init: start"
_MARK_JOB = "vhostkit-init: job start"
_MARK_EXIT = "vhostkit-init: job exit"
_MARK_FAIL = "vhostkit-init: FAILED"
_MAX_CONSOLE_TAIL = 60

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


# --- bzImage -> vmlinux ---------------------------------------------------------------------

_BZ_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
)

_EXTERNAL_DECOMPRESSORS: dict[str, tuple[str, ...]] = {
    "zstd": ("zstd", "-dcq"),
    "lzo": ("lzop", "-dcq"),
    "lz4": ("lz4", "-dcq"),
}


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    tool = _EXTERNAL_DECOMPRESSORS.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        raise VmPrepareError(f"cannot decompress a {kind} kernel payload (no {kind} tool)")
    # These tools stop with an error on trailing data; what they wrote so far is the image.
    proc = subprocess.run(tool, input=data, capture_output=True, check=False)
    return proc.stdout


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel inside an x86 bzImage.

    Uses the boot protocol header (``payload_offset``/``payload_length``, boot protocol 2.08+)
    when present, otherwise scans for a known compression magic, as the kernel's
    ``scripts/extract-vmlinux`` does.
    """
    candidates: list[tuple[str, int, int]] = []
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        version = struct.unpack_from("<H", bzimage, 0x206)[0]
        if version >= 0x208:
            setup_sects = bzimage[0x1F1] or 4
            payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
            start = (setup_sects + 1) * 512 + payload_offset
            for kind, magic in _BZ_MAGICS:
                if bzimage.startswith(magic, start):
                    candidates.append((kind, start, start + payload_length))
                    break
    for kind, magic in _BZ_MAGICS:
        pos = bzimage.find(magic)
        while pos != -1 and len(candidates) < 64:
            candidates.append((kind, pos, len(bzimage)))
            pos = bzimage.find(magic, pos + 1)
    for kind, start, end in candidates:
        try:
            data = _decompress(kind, bzimage[start:end])
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, VmPrepareError) as exc:
            log.debug("payload candidate %s at %#x: %s", kind, start, exc)
            continue
        if _is_elf(data):
            log.debug("vmlinux: %s payload at %#x, %d bytes", kind, start, len(data))
            return data
    raise VmPrepareError("no compressed ELF kernel found in the bzImage")


def has_pvh_note(elf: bytes) -> bool:
    """True when a 64-bit ELF kernel carries XEN_ELFNOTE_PHYS32_ENTRY (the PVH entry point)."""
    if not _is_elf(elf) or elf[4] != 2 or elf[5] != 1:
        return False
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type = struct.unpack_from("<I", elf, off)[0]
        if p_type != 4:  # PT_NOTE
            continue
        p_offset = struct.unpack_from("<Q", elf, off + 8)[0]
        p_filesz = struct.unpack_from("<Q", elf, off + 32)[0]
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _is_static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF executable without a PT_INTERP (a static binary)."""
    with path.open("rb") as f:
        head = f.read(64)
        if not _is_elf(head) or head[4] != 2:
            return False
        e_phoff = struct.unpack_from("<Q", head, 0x20)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    return all(struct.unpack_from("<I", table, i * e_phentsize)[0] != 3 for i in range(e_phnum))


# --- modules --------------------------------------------------------------------------------


def _module_name(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def resolve_module_order(modules_dep: str, wanted: Sequence[str]) -> list[str]:
    """Relative module paths to insmod, dependencies first, from a ``modules.dep`` text.

    Names compare with ``-`` and ``_`` as equal (as modprobe does). A wanted module that is not
    in ``modules.dep`` is an error; a builtin one must simply be left out of ``wanted``.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in stack:
            raise VmPrepareError(f"module dependency cycle: {' -> '.join((*stack, path))}")
        # modules.dep lists the full closure, deepest last: visit in reverse so that the
        # deepest dependencies load first.
        for dep in reversed(deps.get(path, [])):
            visit(dep, (*stack, path))
        seen.add(path)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise VmPrepareError(f"module {name} is not in modules.dep")
        visit(path, ())
    return order


# --- initramfs ------------------------------------------------------------------------------

_INIT_TEMPLATE = r"""#!/bin/busybox sh
# vhostkit kernel VM init (generated by vhostkit.testing.kernel_vm)
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@MARK_INIT@"

fail() {
    echo "@MARK_FAIL@: $*"
    poweroff -f
    sleep 10
    echo o > /proc/sysrq-trigger
}

for m in @MODULES@; do
    insmod "/lib/modules/@VERSION@/$m" || echo "vhostkit-init: insmod $m failed"
done

mkdir -p /mnt/lower /mnt/rw /mnt/root /mnt/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose @ROOT_TAG@ /mnt/lower \
    || fail "cannot mount the host root (9p @ROOT_TAG@)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 @SHARE_TAG@ /mnt/share \
    || fail "cannot mount the job share (9p @SHARE_TAG@)"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "cannot mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
    /mnt/root || fail "cannot mount the overlay root"

CTL=/mnt/share/@CONTROL_DIR@
[ -r "$CTL/vm.conf" ] || fail "no $CTL/vm.conf in the share"
. "$CTL/vm.conf"

R=/mnt/root
mount -t proc proc $R/proc || fail "proc in root"
mount -t sysfs sysfs $R/sys || fail "sysfs in root"
mount -t devtmpfs devtmpfs $R/dev || fail "devtmpfs in root"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/lock $R/run/netns
mkdir -p "$R$SHARE_PATH" || fail "cannot create $SHARE_PATH in root"
mount --bind /mnt/share "$R$SHARE_PATH" || fail "cannot bind the share at $SHARE_PATH"
ip link set lo up
hostname vhostkit-vm

echo "@MARK_JOB@"
chroot $R /bin/sh "$SHARE_PATH/@CONTROL_DIR@/job.sh" </dev/null >"$CTL/output" 2>&1
rc=$?
echo "$rc" > "$CTL/rc.tmp" && mv "$CTL/rc.tmp" "$CTL/rc"
echo "@MARK_EXIT@ $rc"
sync
umount "$R$SHARE_PATH" 2>/dev/null
umount /mnt/share 2>/dev/null
poweroff -f
sleep 10
echo o > /proc/sysrq-trigger
"""


def _render_init(version: str, modules: Sequence[str]) -> str:
    replacements = {
        "@MARK_INIT@": _MARK_INIT,
        "@MARK_FAIL@": _MARK_FAIL,
        "@MARK_JOB@": _MARK_JOB,
        "@MARK_EXIT@": _MARK_EXIT,
        "@MODULES@": " ".join(modules),
        "@VERSION@": version,
        "@ROOT_TAG@": _ROOT_TAG,
        "@SHARE_TAG@": _SHARE_TAG,
        "@CONTROL_DIR@": _CONTROL_DIR,
    }
    text = _INIT_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def _format_key() -> str:
    h = hashlib.sha256()
    h.update(str(_FORMAT_VERSION).encode())
    h.update(_INIT_TEMPLATE.encode())
    h.update("\0".join(GUEST_MODULES).encode())
    return h.hexdigest()[:16]


def _find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file() and _is_static_elf(Path(candidate)):
            return Path(candidate)
    raise VmPrepareError(
        "no static busybox found: apt-get install busybox-static (the initramfs needs it)"
    )


def _build_initramfs(
    dest: Path, version: str, module_root: Path, modules: Sequence[str], busybox: Path
) -> None:
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=dest.parent) as tmp:
        stage = Path(tmp) / "root"
        for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "etc"):
            (stage / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, stage / "bin" / "busybox")
        with contextlib.suppress(OSError):
            os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        for rel in modules:
            target = stage / "lib" / "modules" / version / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(module_root / rel, target)
        init = stage / "init"
        init.write_text(_render_init(version, modules))
        init.chmod(0o755)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        listing = "\0".join([".", *names]) + "\0"
        partial = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
        with partial.open("wb") as out:
            proc = subprocess.run(
                ["cpio", "--null", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
                input=listing.encode(),
                stdout=out,
                stderr=subprocess.PIPE,
                cwd=stage,
                check=False,
            )
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise VmPrepareError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
        partial.replace(dest)


def _atomic_write(dest: Path, data: bytes) -> None:
    """Write ``dest`` through a private temporary name, so readers never see a partial file."""
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


# --- prepare --------------------------------------------------------------------------------


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise VmPrepareError(f"{argv[0]} not found: {exc}") from exc
    if proc.returncode != 0:
        raise VmPrepareError(
            f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _kernel_package() -> str:
    override = os.environ.get("VHOSTKIT_KERNEL_PACKAGE")
    if override:
        return override
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        except VmPrepareError:
            out = ""
        for line in out.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
            if m and m.group(1) != KERNEL_META_PACKAGE:
                return m.group(1)
        if attempt == 0:
            log.info("apt-cache knows no %s: running apt-get update", KERNEL_META_PACKAGE)
            _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"])
    raise VmPrepareError(f"cannot find the kernel package {KERNEL_META_PACKAGE} depends on")


def _load_prepared(directory: Path) -> PreparedKernel | None:
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != _format_key():
        return None
    vmlinux = directory / "vmlinux" if manifest.get("vmlinux") else None
    prepared = PreparedKernel(
        package=manifest["package"],
        version=manifest["version"],
        directory=directory,
        vmlinuz=directory / "vmlinuz",
        vmlinux=vmlinux,
        initramfs=directory / "initramfs.cpio",
        modules=tuple(manifest["modules"]),
    )
    paths = [prepared.vmlinuz, prepared.initramfs] + ([vmlinux] if vmlinux else [])
    if not all(p.is_file() for p in paths):
        return None
    return prepared


def prepare(
    cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> PreparedKernel:
    """Fetch and build everything the VM needs; instant when the cache is already complete.

    ``refresh=True`` asks apt again which kernel package is current (and rebuilds if it changed).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    current = cache / _CURRENT
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError):
            directory = cache / json.loads(current.read_text())["directory"]
            prepared = _load_prepared(directory)
            if prepared is not None:
                return prepared

    t0 = time.monotonic()
    package = _kernel_package()
    directory = cache / "kernels" / package
    prepared = _load_prepared(directory)
    if prepared is None:
        prepared = _build(package, directory)
        log.info("prepared %s in %.1f s", package, time.monotonic() - t0)
    _atomic_write(current, json.dumps({"directory": str(directory.relative_to(cache))}).encode())
    return prepared


def _build(package: str, directory: Path) -> PreparedKernel:
    for tool in ("apt-get", "dpkg", "depmod", "cpio"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise VmPrepareError(f"{tool} not found (see tools/apt-packages.txt)")
    busybox = _find_busybox()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=directory) as tmp:
        work = Path(tmp)
        log.info("downloading %s", package)
        _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise VmPrepareError(f"apt-get download {package} left {len(debs)} .deb files")
        root = work / "root"
        _run(["dpkg", "-x", str(debs[0]), str(root)])
        versions = sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if len(versions) != 1:
            raise VmPrepareError(f"{package}: expected one module tree, found {versions}")
        version = versions[0]
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        _run([depmod, "-b", str(root), version])
        module_root = root / "lib" / "modules" / version
        modules = resolve_module_order((module_root / "modules.dep").read_text(), GUEST_MODULES)
        vmlinuz_src = root / "boot" / f"vmlinuz-{version}"
        bzimage = vmlinuz_src.read_bytes()
        _atomic_write(directory / "vmlinuz", bzimage)
        config = root / "boot" / f"config-{version}"
        if config.exists():
            _atomic_write(directory / "config", config.read_bytes())
        have_vmlinux = False
        try:
            elf = extract_vmlinux(bzimage)
        except VmPrepareError as exc:
            log.warning("no vmlinux for microvm (will boot q35 + bzImage): %s", exc)
        else:
            if has_pvh_note(elf):
                _atomic_write(directory / "vmlinux", elf)
                have_vmlinux = True
            else:
                log.warning("vmlinux has no PVH entry note: will boot q35 + bzImage")
        _build_initramfs(directory / "initramfs.cpio", version, module_root, modules, busybox)
    manifest = {
        "format": _format_key(),
        "package": package,
        "version": version,
        "vmlinux": have_vmlinux,
        "modules": modules,
    }
    _atomic_write(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
    prepared = _load_prepared(directory)
    if prepared is None:  # pragma: no cover - we just wrote it
        raise VmPrepareError(f"prepared kernel in {directory} is incomplete")
    return prepared


# --- running --------------------------------------------------------------------------------


def _host_tsc_khz() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def _qemu_path(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _tail(text: str, lines: int = _MAX_CONSOLE_TAIL) -> str:
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

        ``extra_args`` go last (a callable gets the machine name). ``shared_memory=True``
        backs guest RAM with ``memory-backend-memfd,share=on`` (QEMU 7.2 takes the machine
        property ``memory-backend`` on microvm and q35 alike), so that a vhost-user back-end
        can map it from the fds of SET_MEM_TABLE; the RAM is private memory otherwise.
        """
        machine = machine or self.machine
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
        argv = [self.qemu, "-accel", "tcg", "-cpu", cpu]
        memory_backend = ",memory-backend=mem0" if shared_memory else ""
        if machine == "microvm":
            cmdline.append(f"tsc_early_khz={_host_tsc_khz()}")
            argv += [
                "-M",
                f"microvm,x-option-roms=off,rtc=on,acpi=on,pcie=off{memory_backend}",
                "-kernel",
                _qemu_path(self.prepared.vmlinux or ""),
            ]
            dev9p = "virtio-9p-device"
        else:
            argv += ["-M", f"q35{memory_backend}", "-kernel", _qemu_path(self.prepared.vmlinuz)]
            dev9p = "virtio-9p-pci"
        if shared_memory:
            argv += [
                "-object",
                f"memory-backend-memfd,id=mem0,size={self.memory_mb}M,share=on",
            ]
        argv += [
            "-m",
            f"{self.memory_mb}M",
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-initrd",
            _qemu_path(self.prepared.initramfs),
            "-append",
            " ".join(cmdline),
            "-chardev",
            f"file,id=con0,path={_qemu_path(console)}",
            "-serial",
            "chardev:con0",
            "-fsdev",
            "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            f"{dev9p},fsdev=fsroot,mount_tag={_ROOT_TAG}",
            "-fsdev",
            f"local,id=fsshare,path={_qemu_path(share)},security_model=none,multidevs=remap",
            "-device",
            f"{dev9p},fsdev=fsshare,mount_tag={_SHARE_TAG}",
        ]
        argv += list(extra_args(machine) if callable(extra_args) else extra_args)
        return argv

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
            ctl = share_dir / _CONTROL_DIR
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
                    if _MARK_JOB in text:
                        boot_seconds = elapsed
                    elif elapsed > self.boot_timeout:
                        if _MARK_FAIL in text:  # init failed and could not power off
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
            if _MARK_FAIL in console_text:
                reason = "the VM init failed"
            elif _MARK_JOB in console_text:
                reason = "the job started but no exit code came back (guest crash?)"
            elif _MARK_INIT in console_text:
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
    path = _qemu_path(os.fspath(socket_path))
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
    path = _qemu_path(os.fspath(socket_path))
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


# --- command line ---------------------------------------------------------------------------


def _cli(args: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(_cli())
