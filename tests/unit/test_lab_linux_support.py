"""What the lab runner says it can do for linux guests (:func:`vhostkit.lab.runner.unsupported`)
and which programs such a lab needs (:func:`vhostkit.lab.linux.missing_tools`); no boot."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostkit.lab.linux import missing_tools
from vhostkit.lab.runner import unsupported
from vhostkit.lab.spec import load_lab, parse_lab

LABS = Path(__file__).resolve().parents[2] / "labs"

BASE = """
[lab]
name = "t"
[[bridge]]
name = "br0"
[[namespace]]
name = "host"
  [[namespace.link]]
  bridge = "br0"
  address = "10.77.0.1/24"
  dhcp = "10.77.0.100-10.77.0.110"
[[guest]]
name = "deb"
kind = "linux"
  [[guest.nic]]
  bridge = "br0"
  plane = "PLANE"
  dhcp = true
  [[guest.disk]]
  size = "16M"
[[guest]]
name = "v"
kind = "virtual"
  [[guest.nic]]
  bridge = "br0"
  address = "10.77.0.3/24"
"""


def lab(plane: str = "vhostkit", steps: str = ""):  # type: ignore[no-untyped-def]
    return parse_lab(BASE.replace("PLANE", plane) + steps)


@pytest.mark.parametrize("name", ["03-dhcp-linux", "04-blk-restart", "05-offloads"])
def test_the_shipped_linux_labs_are_supported(name: str) -> None:
    assert unsupported(load_lab(LABS / f"{name}.toml")) == []


def test_linux_guests_dhcp_disks_run_tcp_and_disk_restarts_are_supported() -> None:
    steps = """
[[step]]
do = "run"
guest = "deb"
command = "true"
[[step]]
do = "tcp"
from = "deb"
to = "host"
[[step]]
do = "restart-backend"
guest = "deb"
disk = 0
[[step]]
do = "ping"
from = "host"
to = "deb"
"""
    assert unsupported(lab(steps=steps)) == []


def test_what_is_not_done_for_linux_guests_is_named() -> None:
    steps = """
[[step]]
do = "restart-backend"
guest = "deb"
nic = 0
[[step]]
do = "tcp"
from = "deb"
to = "v"
[[step]]
do = "stream"
from = "v"
to = "deb"
frames = 10
[[step]]
do = "swap"
guest = "deb"
to = "vhostkit"
"""
    on_kernel = unsupported(lab("kernel"))
    assert "guest deb nic 0: the kernel plane for a linux guest (QEMU's vhost=on)" in on_kernel
    on_offload = unsupported(lab("offload"))
    assert (
        "guest deb nic 0: the offload plane for a linux guest (its daemon's kernel rings)"
        in on_offload
    )
    found = unsupported(lab("vhostkit", steps))
    assert "step restart-backend-1: restarting a linux guest NIC's back-end" in found
    assert "step tcp-2: TCP to a virtual guest (it has no TCP stack)" in found
    assert "step stream-3: a stream to a linux guest (use 'tcp')" in found
    assert "step swap-4: swapping a linux guest's NIC" in found
    # and nothing else (but 'swap' steps in general, where this runner has none)
    assert len([f for f in found if "'swap' steps" not in f]) == 4, found


def test_missing_programs_name_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert missing_tools(lab()) == [
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86",
        "busybox is missing: apt-get install busybox-static",
        "ip is missing: apt-get install iproute2",
        "dnsmasq is missing: apt-get install dnsmasq-base",
    ]
    # a lab of virtual guests only, without DHCP, runs none of them
    assert missing_tools(load_lab(LABS / "01-bridge-ping.toml")) == []


def test_linux_guests_are_refused_where_the_lab_would_run_in_the_kernel_vm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nested TCG (QEMU booting a guest inside the kernel VM) was tried: the guest did not
    reach its agent in 300 s. So a lab with linux guests does not go there."""
    with_kernel_plane = (
        BASE.replace("PLANE", "vhostkit")
        + """
[[guest]]
name = "k"
kind = "virtual"
  [[guest.nic]]
  bridge = "br0"
  plane = "kernel"
  address = "10.77.0.4/24"
"""
    )
    refusal = "linux guests in a lab that runs inside the kernel VM"
    mixed = parse_lab(with_kernel_plane)
    if Path("/dev/vhost-net").exists():
        assert unsupported(mixed) == []
    else:
        assert any(refusal in item for item in unsupported(mixed))
    monkeypatch.setenv("VHOSTKIT_IN_VM", "1")  # the lab is already inside the VM
    assert any(refusal in item for item in unsupported(lab()))


def test_a_virtual_guests_nic_back_end_restart_is_supported() -> None:
    """Lab 6: the runner restarts a virtual guest NIC's daemon (the guest reconnects)."""
    lab6 = load_lab(LABS / "06-nic-restart.toml")
    assert any(s.kind.value == "restart-backend" and s.params["nic"] == 0 for s in lab6.steps)
    assert unsupported(lab6) == []
