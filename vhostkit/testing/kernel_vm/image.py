"""Building the VM image: Debian's kernel, its modules and a busybox initramfs, in a cache.

:func:`prepare` fetches the kernel package that ``linux-image-amd64`` depends on with
``apt-get download``, unpacks it with ``dpkg -x``, runs ``depmod -b``, extracts an uncompressed
``vmlinux`` from the bzImage (for a PVH boot of QEMU's ``microvm`` machine) and builds a small
initramfs whose ``/init`` is the package data file ``init.sh``. Everything lands in a cache
directory (``$VHOSTKIT_CACHE`` or ``~/.cache/vhostkit``); a second call returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from vhostkit.testing.kernel_vm.common import (
    CONTROL_DIR,
    CURRENT,
    FORMAT_VERSION,
    GUEST_MODULES,
    KERNEL_META_PACKAGE,
    MANIFEST,
    MARK_EXIT,
    MARK_FAIL,
    MARK_INIT,
    MARK_JOB,
    ROOT_TAG,
    SHARE_TAG,
    PreparedKernel,
    VmPrepareError,
    default_cache_dir,
)
from vhostkit.testing.kernel_vm.elf import extract_vmlinux, has_pvh_note, is_static_elf

__all__ = ["prepare", "resolve_module_order"]

log = logging.getLogger(__name__)


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
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            raise VmPrepareError(f"module {name} is not in modules.dep")
        visit(found, ())
    return order


# --- initramfs ------------------------------------------------------------------------------


def _init_template() -> str:
    """The initramfs ``/init`` with ``@NAME@`` placeholders (package data ``init.sh``)."""
    return resources.files(__package__).joinpath("init.sh").read_text(encoding="utf-8")


def _render_init(version: str, modules: Sequence[str]) -> str:
    replacements = {
        "@MARK_INIT@": MARK_INIT,
        "@MARK_FAIL@": MARK_FAIL,
        "@MARK_JOB@": MARK_JOB,
        "@MARK_EXIT@": MARK_EXIT,
        "@MODULES@": " ".join(modules),
        "@VERSION@": version,
        "@ROOT_TAG@": ROOT_TAG,
        "@SHARE_TAG@": SHARE_TAG,
        "@CONTROL_DIR@": CONTROL_DIR,
    }
    text = _init_template()
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def _format_key() -> str:
    h = hashlib.sha256()
    h.update(str(FORMAT_VERSION).encode())
    h.update(_init_template().encode())
    h.update("\0".join(GUEST_MODULES).encode())
    return h.hexdigest()[:16]


def _find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
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
        manifest = json.loads((directory / MANIFEST).read_text())
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
    current = cache / CURRENT
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
    _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    prepared = _load_prepared(directory)
    if prepared is None:  # pragma: no cover - we just wrote it
        raise VmPrepareError(f"prepared kernel in {directory} is incomplete")
    return prepared
