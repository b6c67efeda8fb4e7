"""``vhostkit tap create|list|delete`` on real taps (needs CAP_NET_ADMIN)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess

import pytest
from helpers.cli_run import VHOSTKIT, vhostkit

from vhostkit.kernel import Tap
from vhostkit.kernel.ioctls import TunFlags


def _net_admin() -> bool:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(caps >> 12 & 1)


pytestmark = pytest.mark.skipif(not _net_admin(), reason="creating taps needs CAP_NET_ADMIN")


@pytest.fixture
def name():
    """A tap name nobody else uses; deleted afterwards if a test left it behind."""
    tap = f"vhkt{os.getpid() % 100000}"
    yield tap
    if os.path.exists(f"/sys/class/net/{tap}"):
        vhostkit("tap", "delete", tap)


def listed(tap: str) -> dict | None:
    proc = vhostkit("tap", "list", "--json")
    assert proc.returncode == 0, proc
    return next((t for t in json.loads(proc.stdout) if t["name"] == tap), None)


def test_create_list_delete(name: str) -> None:
    proc = vhostkit(
        "tap", "create", name, "--queues", "2", "--vnet-hdr-size", "10", "--offload", "csum",
        "--offload", "tso4", "--owner", "nobody", "--group", "nogroup", "--mtu", "9000", "--up",
    )  # fmt: skip
    assert proc.returncode == 0, proc
    assert proc.stdout.strip() == name
    tap = listed(name)
    assert tap is not None
    assert tap["type"] == "tap" and tap["persist"] and tap["multi_queue"] and tap["vnet_hdr"]
    assert (tap["owner"], tap["group"], tap["mtu"]) == (65534, 65534, 9000)
    # the header size was set on the device (what a data plane attaching to it finds)
    with Tap(name, multi_queue=True) as attached:
        assert attached.get_vnet_hdr_size() == 10
        assert TunFlags.MULTI_QUEUE in attached.get_iff()[1]
    text = vhostkit("tap", "list")
    assert any(line.split()[0] == name for line in text.stdout.splitlines()), text
    proc = vhostkit("tap", "delete", name)
    assert proc.returncode == 0, proc
    assert proc.stdout.strip() == f"{name}: deleted"
    assert listed(name) is None


def test_no_persist_holds_it_until_sigterm(name: str) -> None:
    proc = subprocess.Popen(
        [*VHOSTKIT, "tap", "create", name, "--no-persist"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready
        assert proc.stdout.readline().decode().strip() == f"{name}: held until SIGTERM/SIGINT"
        tap = listed(name)
        assert tap is not None and not tap["persist"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert not os.path.exists(f"/sys/class/net/{name}")


def test_create_existing(name: str) -> None:
    assert vhostkit("tap", "create", name).returncode == 0
    proc = vhostkit("tap", "create", name)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == (
        f"vhostkit tap create: error: {name} exists already (vhostkit tap delete {name})"
    )


def test_delete_errors() -> None:
    proc = vhostkit("tap", "delete", "vhk-nonexistent")
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == "vhostkit tap delete: error: no such tap: vhk-nonexistent"
    proc = vhostkit("tap", "delete", "lo")
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == "vhostkit tap delete: error: lo is not a tun/tap device"


def test_bad_arguments(name: str) -> None:
    for argv, message in (
        (["--vnet-hdr-size", "11"], "argument --vnet-hdr-size: invalid choice: 11"),
        (["--offload", "warp"], "argument --offload: invalid choice: 'warp'"),
        (["--queues", "-1"], "-1 is not a positive number"),
        (["--owner", "no-such-user-x"], "no such user: 'no-such-user-x'"),
        (["--no-vnet-hdr", "--offload", "csum"], "--offload needs the virtio-net header"),
    ):
        proc = vhostkit("tap", "create", name, *argv)
        assert proc.returncode in (1, 2), (argv, proc)
        assert message in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(f"/sys/class/net/{name}")


@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs setpriv, root")
def test_missing_permission(name: str) -> None:
    proc = vhostkit(
        "tap", "create", name, prefix=[shutil.which("setpriv"), "--bounding-set=-net_admin", "--"]
    )
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == (
        f"vhostkit tap create: error: TUNSETIFF {name!r} queue 0: Operation not permitted "
        "(needs CAP_NET_ADMIN)"
    )
    assert not os.path.exists(f"/sys/class/net/{name}")
