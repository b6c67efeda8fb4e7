"""``vhostkit probe``: what this host can do for virtio data planes, and how to fix each "no".

Every item is looked at, not guessed: device nodes are stat-ed and opened, the kernel's vhost
feature bits are asked for with ``VHOST_GET_FEATURES`` / ``VHOST_GET_BACKEND_FEATURES`` on an
open device (and the tun driver's with ``TUNGETFEATURES``), modules are looked up in
``/sys/module`` and the running kernel's ``modules.dep`` / ``modules.builtin``, peers are
found on ``PATH`` (and where Debian puts them) and asked for their version.

``--json`` prints ``{"kernel": ..., "items": [...]}``, one object per item with ``name``,
``kind`` (``device``, ``features``, ``module``, ``permission``, ``hugepages``, ``peer``),
``ok``, ``detail``, ``fix`` (``null`` when ok) and item-specific fields. ``--require NAME``
(repeatable) makes the exit code 1 when a named item is not ok, for scripts.
"""

from __future__ import annotations

import argparse
import errno
import glob
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from vhostkit.cli.common import EXIT_FAILURE, EXIT_OK, add_json_option, print_json
from vhostkit.errors import InvalidParam, VhostError

__all__ = ["Finding", "add_arguments", "probe", "run"]

TUN = "/dev/net/tun"
VHOST_NET = "/dev/vhost-net"
VHOST_VSOCK = "/dev/vhost-vsock"
VDPA_GLOB = "/dev/vhost-vdpa-*"
VDPA = "/dev/vhost-vdpa-N"
#: bit 12 of the capability sets in /proc/self/status
CAP_NET_ADMIN = 12
#: where Debian keeps binaries that are not on PATH
_EXTRA_DIRS = ("/usr/libexec", "/usr/lib/qemu")
#: the peers vhostkit is tested against, and how to install each (Debian/Ubuntu)
PEERS = {
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "dpdk-testpmd": "apt-get install dpdk (testpmd; plus librte-net-vhost23 "
    "librte-net-virtio23 librte-mempool-ring23)",
    "qemu-storage-daemon": "apt-get install qemu-system-common",
    "virtiofsd": "apt-get install virtiofsd (Debian 12 has it in qemu-system-common as "
    "/usr/lib/qemu/virtiofsd)",
}
#: module -> device node it provides (None: a library module)
MODULES = {
    "vhost": None,
    "vhost_net": VHOST_NET,
    "vhost_vsock": VHOST_VSOCK,
    "vhost_vdpa": VDPA,
    "tun": TUN,
}


@dataclass(frozen=True)
class Finding:
    """One probed item: ``ok`` or not, what was seen, and (when not ok) how to fix it."""

    name: str
    kind: str
    ok: bool
    detail: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object: the fields, with ``data`` merged in."""
        out = asdict(self)
        out.update(out.pop("data"))
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vhostkit probe [--json] [--require NAME]...``."""
    add_json_option(parser)
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="NAME",
        help="exit 1 unless item NAME is ok (as named in the output, e.g. /dev/vhost-net, "
        "qemu-system-x86_64, 'module vhost_net'); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    """Probe, print, and decide the exit code from ``--require``."""
    findings = probe()
    names = {f.name for f in findings}
    unknown = [n for n in args.require if n not in names]
    if unknown:
        raise InvalidParam(
            f"--require {', '.join(unknown)}: no such item (items: {', '.join(sorted(names))})"
        )
    if args.json:
        print_json({"kernel": os.uname().release, "items": [f.to_json() for f in findings]})
    else:
        _print_table(findings)
    missing = [f for f in findings if f.name in args.require and not f.ok]
    for f in missing:
        print(
            f"vhostkit probe: required {f.name} is not available: {f.detail}",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_FAILURE if missing else EXIT_OK


def _print_table(findings: list[Finding]) -> None:
    width = max(len(f.name) for f in findings)
    print(f"kernel {os.uname().release}")
    for f in findings:
        print(f"{'yes' if f.ok else 'no ':3}  {f.name:{width}}  {f.detail}")
        if f.fix:
            print(f"{'':5}{'':{width}}  fix: {f.fix}")


def probe() -> list[Finding]:
    """Every item, in a fixed order."""
    findings: list[Finding] = []
    findings += [_device(VHOST_NET, "vhost_net"), _device(VHOST_VSOCK, "vhost_vsock")]
    vdpa = sorted(glob.glob(VDPA_GLOB))
    if vdpa:
        findings += [_device(path, "vhost_vdpa") for path in vdpa]
    else:
        findings.append(
            Finding(
                VDPA,
                "device",
                False,
                "no vhost-vdpa device nodes",
                "modprobe vhost_vdpa and create a vDPA device (vdpa dev add ...; e.g. "
                "modprobe vdpa_sim_net for a simulated one)",
            )
        )
    findings.append(_device(TUN, "tun"))
    findings.append(_vhost_features("vhost-net features", VHOST_NET, "vhost_net", net=True))
    findings.append(_vhost_features("vhost-vsock features", VHOST_VSOCK, "vhost_vsock"))
    for path in vdpa:
        findings.append(_vhost_features(f"{path} features", path, "vhost_vdpa"))
    findings.append(_tun_features())
    release = os.uname().release
    findings += [_module(name, node, release) for name, node in MODULES.items()]
    findings.append(_net_admin())
    findings.append(_hugepages())
    findings += [_peer(name, hint) for name, hint in PEERS.items()]
    return findings


# --- device nodes ---------------------------------------------------------------------------


def _mode_text(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {user}:{group}"


def _device(path: str, module: str) -> Finding:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Finding(path, "device", False, "missing", _module_fix(module), {"exists": False})
    data: dict[str, Any] = {
        "exists": True,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "owner": st.st_uid,
        "group": st.st_gid,
    }
    where = f"{_mode_text(st)}"
    if not stat.S_ISCHR(st.st_mode):
        return Finding(path, "device", False, f"not a character device ({where})", None, data)
    where = f"char {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, {where}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        data["openable"] = False
        if isinstance(exc, PermissionError):
            fix = f"run as root, or give this user access to {path} (a udev rule or chgrp)"
        elif exc.errno in (errno.ENODEV, errno.ENXIO):  # a node without its driver
            fix = _module_fix(module)
        else:
            fix = None
        return Finding(path, "device", False, f"{where}; cannot open: {exc.strerror}", fix, data)
    os.close(fd)
    data["openable"] = True
    return Finding(path, "device", True, f"{where}; opened read-write", None, data)


def _module_fix(module: str) -> str:
    release = os.uname().release
    if _module_state(module, release) == "loadable":
        return f"modprobe {module}"
    if not os.path.isdir(f"/lib/modules/{release}"):
        return (
            f"kernel {release} has no modules installed (no /lib/modules/{release}): install "
            f"them and modprobe {module}, or boot a kernel that has it (the kernel tests boot "
            "one in a VM: python3 -m vhostkit.testing.kernel_vm)"
        )
    return f"the running kernel {release} has no {module} module: boot a kernel built with it"


# --- feature bits ---------------------------------------------------------------------------


def _vhost_features(name: str, path: str, module: str, *, net: bool = False) -> Finding:
    from vhostkit.kernel.device import KernelVhostDevice
    from vhostkit.kernel.ioctls import VhostBackendFeatures
    from vhostkit.virtio.features import feature_names

    if not os.path.exists(path):
        return Finding(
            name, "features", False, f"not queried: {path} is missing", _module_fix(module)
        )
    try:
        dev = KernelVhostDevice(path)
    except VhostError as exc:
        return Finding(name, "features", False, f"not queried: {exc}", _device(path, module).fix)
    try:
        features = dev.get_features()
        try:
            backend: int | None = dev.get_backend_features()
        except VhostError:
            backend = None
    except VhostError as exc:
        return Finding(name, "features", False, f"VHOST_GET_FEATURES failed: {exc}", None)
    finally:
        dev.close()
    names = feature_names(features) if net else feature_names(features, None)
    data: dict[str, Any] = {"features": f"{features:#x}", "feature_names": names}
    detail = f"{features:#x}: {', '.join(names)}"
    if backend is not None:
        backend_names = [f.name for f in VhostBackendFeatures if f & backend and f.name]
        data["backend_features"] = f"{backend:#x}"
        data["backend_feature_names"] = backend_names
        detail += f"; backend {backend:#x}: {', '.join(backend_names) or '-'}"
    return Finding(name, "features", True, detail, None, data)


def _tun_features() -> Finding:
    import ctypes
    import fcntl

    from vhostkit.kernel.ioctls import TunFlags, TunIoctl

    name = "tun features"
    try:
        fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Finding(name, "features", False, f"not queried: {TUN}: {exc.strerror}", None)
    try:
        value = ctypes.c_uint(0)
        fcntl.ioctl(fd, TunIoctl.TUNGETFEATURES, value, True)
    except OSError as exc:
        return Finding(name, "features", False, f"TUNGETFEATURES failed: {exc.strerror}", None)
    finally:
        os.close(fd)
    flags = [f.name for f in TunFlags if f & value.value and f.name]
    return Finding(
        name,
        "features",
        True,
        f"{value.value:#x}: {', '.join(flags)}",
        None,
        {"features": f"{value.value:#x}", "feature_names": flags},
    )


# --- modules --------------------------------------------------------------------------------


def _module_lines(release: str, table: str) -> Iterator[str]:
    try:
        with open(f"/lib/modules/{release}/{table}") as f:
            yield from f
    except OSError:
        return


def _module_state(module: str, release: str) -> str:
    """``loaded``, ``builtin``, ``loadable`` or ``missing``."""
    if os.path.isdir(f"/sys/module/{module}"):
        return "loaded"

    def named(line: str) -> bool:
        base = os.path.basename(line.split(":", 1)[0].strip())
        return base.split(".ko", 1)[0].replace("-", "_") == module

    if any(named(line) for line in _module_lines(release, "modules.builtin")):
        return "builtin"
    if any(named(line) for line in _module_lines(release, "modules.dep")):
        return "loadable"
    return "missing"


def _module(module: str, node: str | None, release: str) -> Finding:
    state = _module_state(module, release)
    name = f"module {module}"
    if state in ("loaded", "builtin"):
        return Finding(name, "module", True, state, None, {"state": state})
    if state == "loadable":
        return Finding(
            name, "module", False, "not loaded, loadable", f"modprobe {module}", {"state": state}
        )
    if node is not None and node != VDPA and os.path.exists(node):
        # its device node is there: compiled in (a built-in module without parameters has no
        # /sys/module entry, and this kernel's modules.builtin is not installed)
        return Finding(
            name, "module", True, f"built in ({node} exists)", None, {"state": "builtin"}
        )
    return Finding(name, "module", False, "not present", _module_fix(module), {"state": state})


# --- permissions ----------------------------------------------------------------------------


def _capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _net_admin() -> Finding:
    caps = _capabilities()
    uid, euid = os.getuid(), os.geteuid()
    data = {"uid": uid, "euid": euid, "cap_net_admin": bool(caps >> CAP_NET_ADMIN & 1)}
    who = f"uid {uid}" + (f" (euid {euid})" if euid != uid else "")
    if data["cap_net_admin"]:
        return Finding(
            "CAP_NET_ADMIN", "permission", True, f"{who}: may create and configure taps", None, data
        )
    return Finding(
        "CAP_NET_ADMIN",
        "permission",
        False,
        f"{who}: cannot create taps or change links",
        "run with CAP_NET_ADMIN (as root outside a restricted container), or have root "
        "create the tap for this user: vhostkit tap create NAME --owner USER",
        data,
    )


# --- hugepages ------------------------------------------------------------------------------


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _hugepages() -> Finding:
    sizes: dict[str, dict[str, int]] = {}
    for d in sorted(glob.glob("/sys/kernel/mm/hugepages/hugepages-*")):
        size = os.path.basename(d).removeprefix("hugepages-")
        sizes[size] = {
            "total": _read_int(f"{d}/nr_hugepages"),
            "free": _read_int(f"{d}/free_hugepages"),
        }
    mounts: list[str] = []
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[2:3] == ["hugetlbfs"]]
    except OSError:
        pass
    total = sum(s["total"] for s in sizes.values())
    data = {"sizes": sizes, "hugetlbfs_mounts": mounts}
    pools = ", ".join(f"{k}: {v['free']}/{v['total']} free" for k, v in sizes.items()) or "none"
    detail = f"{pools}; hugetlbfs {'at ' + ', '.join(mounts) if mounts else 'not mounted'}"
    if total and mounts:
        return Finding("hugepages", "hugepages", True, detail, None, data)
    fixes = []
    if not total:
        fixes.append("echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    if not mounts:
        fixes.append("mount -t hugetlbfs nodev /dev/hugepages")
    return Finding(
        "hugepages",
        "hugepages",
        False,
        detail + " (only DPDK needs them; vhostkit's own guest memory is memfd)",
        "; ".join(fixes),
        data,
    )


# --- peers ----------------------------------------------------------------------------------


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for d in _EXTRA_DIRS:
        path = os.path.join(d, binary)
        if os.access(path, os.X_OK):
            return path
    return None


def _version(binary: str, path: str) -> str | None:
    """The first line of ``--version`` (testpmd has none: its Debian package's version)."""
    if binary == "dpdk-testpmd":
        return _package_version(path)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first or None


def _package_version(path: str) -> str | None:
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", os.path.realpath(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        package = owner.split(":", 1)[0].strip()
        if not package:
            return None
        version = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{package} {version}" if version else None


def _peer(binary: str, hint: str) -> Finding:
    path = _find(binary)
    if path is None:
        return Finding(binary, "peer", False, "not installed", hint, {"path": None})
    version = _version(binary, path)
    return Finding(
        binary,
        "peer",
        True,
        f"{path}: {version or 'version unknown'}",
        None,
        {"path": path, "version": version},
    )
