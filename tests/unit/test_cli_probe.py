"""``vhostkit probe``: what this host can do, looked at (not guessed), each "no" with a fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from helpers.cli_run import vhostkit

#: every item the issue asks for, by its name in the output
REQUIRED = {
    "/dev/vhost-net": "device",
    "/dev/vhost-vsock": "device",
    "/dev/net/tun": "device",
    "vhost-net features": "features",
    "vhost-vsock features": "features",
    "tun features": "features",
    "module vhost": "module",
    "module vhost_net": "module",
    "module vhost_vsock": "module",
    "module vhost_vdpa": "module",
    "module tun": "module",
    "CAP_NET_ADMIN": "permission",
    "hugepages": "hugepages",
    "qemu-system-x86_64": "peer",
    "dpdk-testpmd": "peer",
    "qemu-storage-daemon": "peer",
    "virtiofsd": "peer",
}


def probe_json(**kwargs) -> dict:
    proc = vhostkit("probe", "--json", **kwargs)
    assert proc.returncode == 0, proc
    return json.loads(proc.stdout)


def test_json_names_every_item() -> None:
    data = probe_json()
    assert data["kernel"] == os.uname().release
    items = {item["name"]: item for item in data["items"]}
    for name, kind in REQUIRED.items():
        assert items[name]["kind"] == kind, name
    # vhost-vdpa: its nodes, or one item saying there are none
    assert any(n.startswith("/dev/vhost-vdpa-") for n in items)
    for item in data["items"]:
        assert isinstance(item["ok"], bool) and item["detail"], item
        if item["ok"]:
            assert item["fix"] is None, item
        elif item["kind"] != "features" or not os.path.exists(item["name"]):
            assert item["fix"], f"a 'no' without a fix: {item}"


def test_device_nodes_are_reported_as_they_are() -> None:
    items = {item["name"]: item for item in probe_json()["items"]}
    for node, feature in (
        ("/dev/vhost-net", "vhost-net features"),
        ("/dev/vhost-vsock", "vhost-vsock features"),
    ):
        exists = os.path.exists(node)
        assert items[node]["exists"] is exists
        if not exists:
            # this host (the kernel tests run in a VM): an honest no, with a way out
            assert not items[node]["ok"] and items[node]["detail"] == "missing"
            assert "modprobe" in items[node]["fix"] or "kernel" in items[node]["fix"]
            assert not items[feature]["ok"]
            assert items[feature]["detail"] == f"not queried: {node} is missing"
        elif items[node]["ok"]:
            # opened: the kernel was asked for its feature bits
            assert items[feature]["ok"]
            assert int(items[feature]["features"], 16) & (1 << 32)  # VERSION_1
    tun = items["/dev/net/tun"]
    assert tun["exists"] is os.path.exists("/dev/net/tun")
    if tun["ok"]:
        flags = items["tun features"]["feature_names"]
        assert "TAP" in flags and "VNET_HDR" in flags


def test_peers_and_versions_are_looked_up() -> None:
    items = {item["name"]: item for item in probe_json()["items"]}
    for binary in ("qemu-system-x86_64", "qemu-storage-daemon"):
        path = shutil.which(binary)
        assert items[binary]["ok"] is (path is not None)
        if path:
            first = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.splitlines()[0]
            assert items[binary]["version"] == first
            assert items[binary]["path"] == path


def test_missing_peer_binaries(tmp_path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on PATH
    items = {item["name"]: item for item in probe_json(env=env)["items"]}
    for binary in ("qemu-system-x86_64", "dpdk-testpmd", "qemu-storage-daemon"):
        assert not items[binary]["ok"]
        assert items[binary]["detail"] == "not installed"
        assert items[binary]["fix"].startswith("apt-get install ")
    proc = vhostkit("probe", "--require", "qemu-system-x86_64", env=env)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        "vhostkit probe: required qemu-system-x86_64 is not available: not installed"
    )
    assert "fix: apt-get install qemu-system-x86" in proc.stdout


def test_require() -> None:
    tun_ok = os.path.exists("/dev/net/tun")
    proc = vhostkit("probe", "--require", "/dev/net/tun")
    assert proc.returncode == (0 if tun_ok else 1), proc
    proc = vhostkit("probe", "--require", "no-such-item")
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("vhostkit probe: error: --require no-such-item: no such item")


def test_table_gives_a_fix_under_every_no() -> None:
    proc = vhostkit("probe")
    assert proc.returncode == 0, proc
    lines = proc.stdout.splitlines()
    assert lines[0] == f"kernel {os.uname().release}"
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("no "):
            assert lines[i + 1].strip().startswith("fix: "), line


@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs setpriv, root")
def test_without_net_admin() -> None:
    items = {
        item["name"]: item
        for item in probe_json(prefix=[shutil.which("setpriv"), "--bounding-set=-net_admin", "--"])[
            "items"
        ]
    }
    assert items["CAP_NET_ADMIN"]["ok"] is False
    assert "vhostkit tap create NAME --owner USER" in items["CAP_NET_ADMIN"]["fix"]
