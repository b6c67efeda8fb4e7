"""``vhostkit lab run`` through the real entry point: a lab on vhostkit back-end daemons.

The lab (tests/helpers/labs/userplane.toml) builds a bridge in a namespace of its own, a
namespace host on a veth pair, and two virtual guests, each a process with vhostkit's virtio-net
driver talking vhost-user to a vhostkit net back-end daemon on its tap. The guests ping each
other and are pinged from the namespace, and send numbered streams to the namespace's UDP
socket and to each other. Nothing leaves the machine: the lab's namespaces have no other link.

The shipped labs that need neither kernel vhost-net nor QEMU (lab 6: a guest's net back-end
SIGKILLed and restarted under streams) run here too; the others run in tests/kernel and
tests/guests. Also here: a lab interrupted mid-traffic leaves no namespace, process, socket
file or directory behind; a lab with linux guests that would have to run inside the kernel VM
is refused before anything boots; a lab needing a program this host lacks names its package.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.guest_output import HELPERS

from vhostkit.lab.network import leftover_namespaces
from vhostkit.lab.spec import load_lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="labs build namespaces and taps")

LABS = HELPERS / "labs"
ROOT = Path(__file__).resolve().parents[2]
#: shipped labs this host runs as they are: no kernel vhost-net, no linux guest
HOST_LABS = [
    p
    for p in sorted((ROOT / "labs").glob("*.toml"))
    if not load_lab(p).needs_kernel_vhost and not load_lab(p).needs_qemu
]


def lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostkit", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def runner_leftovers(pid: int) -> list[str]:
    """The namespaces a runner with ``pid`` has (or left)."""
    return leftover_namespaces(f"vhk{pid}")


def test_a_user_plane_lab_passes_and_leaves_nothing() -> None:
    done = lab("run", "--json", str(LABS / "userplane.toml"))
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    assert result["passed"] and not result["error"] and not result["leftovers"]
    keys = {(o["step"], o["key"]) for o in result["expectations"]}
    assert ("ping-1", "loss_max") in keys and ("stop-7", "reordered_max") in keys
    stops = [s for s in result["steps"] if s["do"] == "stop"]
    assert all(s["values"]["sent"] >= 1000 and s["values"]["lost"] == 0 for s in stops)
    pings = [s for s in result["steps"] if s["do"] == "ping"]
    assert all(s["values"]["received"] == s["values"]["sent"] == 5 for s in pings)
    # teardown stopped the two guests and two back-ends and removed both namespaces
    assert sum(r.startswith("process") for r in result["removed"]) == 4
    assert sum(r.startswith("netns") for r in result["removed"]) == 2
    assert "lab: teardown" in done.stderr  # progress, as plain lines when not on a terminal


def steps_by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s["values"] for s in result["steps"]}


def check_nic_restart(result: dict[str, Any]) -> None:
    """Lab 6: the back-end was replaced, the guest reconnected, what it sent meanwhile went
    out, and what was sent to it during the outage is counted as lost, in one gap."""
    by_name = steps_by_name(result)
    kill = by_name["kill"]
    assert kill["signal"] == "KILL" and kill["pid"] != kill["old_pid"], kill
    assert not Path(f"/proc/{kill['old_pid']}").exists()
    assert 0 < kill["outage"] <= kill["seconds"], kill
    out, into = by_name["stop-7"], by_name["stop-8"]
    assert out["sent"] > 0 and out["lost"] == 0, out  # queued in its ring meanwhile
    assert into["lost"] > 0, into  # no back-end read the tap: measured, not hidden
    assert into["longest_gap"] == into["lost"], into  # the outage, in one piece
    assert into["received"] + into["lost"] == into["sent"] and into["duplicates"] == 0
    assert into["received"] > 0
    for name in ("ping-9", "ping-10"):  # the guest answers and sends over the new back-end
        assert by_name[name]["received"] == by_name[name]["sent"] == 5
    # teardown stopped the replacement daemon (the killed one was gone already)
    assert f"process back-end a.nic0 (pid {kill['pid']})" in result["removed"]


LAB_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"06-nic-restart": check_nic_restart}


@pytest.mark.parametrize("path", HOST_LABS, ids=lambda p: p.stem)
def test_shipped_lab_passes_on_this_host(path: Path) -> None:
    done = lab("run", "--json", str(path))
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    assert result["passed"] and not result["error"] and not result["leftovers"], result
    assert result["expectations"] and all(o["passed"] for o in result["expectations"])
    LAB_CHECKS.get(path.stem, lambda result: None)(result)


def test_lab_6_is_run_here() -> None:
    assert "06-nic-restart" in [p.stem for p in HOST_LABS]


def test_a_failing_expectation_exits_1_and_says_which() -> None:
    done = lab("run", str(LABS / "failing.toml"))
    assert done.returncode == 1, done.stderr + done.stdout
    assert "FAIL" in done.stdout and "received_min" in done.stdout
    # the runner stops at the failed step ...
    assert "FAILED: 2/3 expectations held" in done.stdout.replace("\n", " ")
    assert "step stop-6: failed, stopping" in done.stderr
    # ... unless told to keep going
    done = lab("run", "--keep-going", "--json", str(LABS / "failing.toml"))
    assert done.returncode == 1
    result = json.loads(done.stdout)
    failed = [(o["step"], o["key"]) for o in result["expectations"] if not o["passed"]]
    assert failed == [("stop-6", "received_min")] and len(result["expectations"]) == 6


def test_sigint_mid_traffic_tears_everything_down(tmp_path: Path) -> None:
    text = (LABS / "userplane.toml").read_text().replace("seconds = 1", "seconds = 60")
    path = tmp_path / "long.toml"
    path.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostkit", "lab", "run", "--json", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the streams are running once the wait step starts
            if "step wait-5" in line:
                break
        else:
            pytest.fail("the lab never reached its wait step")
        assert runner_leftovers(proc.pid), "the lab's namespaces exist while it runs"
        children = child_pids(proc.pid)
        assert len(children) == 4, children  # two guests, two back-ends
        # the back-ends' sockets are in the lab's work directory
        found = {m for pid in children for m in re.findall(r"--socket (\S+)", cmdline(pid))}
        sockets = [Path(f) for f in found]
        assert len(sockets) == 2 and all(s.is_socket() for s in sockets), sockets
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["error"] == "interrupted" and not result["leftovers"], result
    # nothing is left: namespaces (and the bridge, taps and veths in them) ...
    assert runner_leftovers(proc.pid) == []
    assert sum(r.startswith("netns") for r in result["removed"]) == 2, result["removed"]
    # ... processes: every guest and back-end teardown stopped is gone ...
    stopped = [int(m) for r in result["removed"] for m in re.findall(r"\(pid (\d+)\)", r)]
    assert sorted(stopped) == sorted(children), result["removed"]
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    # ... and socket files, with the lab's work directory
    assert not [s for s in sockets if s.exists()]
    workdir = sockets[0].parent
    assert workdir.name.startswith("vhk-lab-") and not workdir.exists()
    assert not [pid for pid in all_pids() if str(workdir) in cmdline(pid)]


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    found = []
    for pid in all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(pid)
    return found


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_broken_lab_file_exits_2_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    good = (LABS / "userplane.toml").read_text()
    path.write_text(good.replace('br0"\n  address = "10.77.0.2', 'br9"\n  address = "10.77.0.2'))
    for command in ("check", "run"):
        done = lab(command, str(path))
        assert done.returncode == 2
        expected = f"{path}:15: guest[0].nic[0].bridge: no bridge called 'br9'"
        assert expected in done.stdout + done.stderr


def test_clean_removes_only_what_dead_runners_left() -> None:
    from pyroute2 import netns

    dead = next(pid for pid in range(99999, 90000, -1) if not Path(f"/proc/{pid}").exists())
    alive = os.getpid()
    left = [f"vhk{dead}", f"vhk{dead}-host"]
    mine = f"vhk{alive}-keep"
    for name in [*left, mine]:
        netns.create(name)
    try:
        done = lab("clean")
        assert done.returncode == 0, done.stderr
        for name in left:
            assert f"removed netns {name}" in done.stdout
            assert not Path("/run/netns", name).exists()
        assert Path("/run/netns", mine).exists(), "a live runner's namespace is kept"
    finally:
        for name in [*left, mine]:
            if Path("/run/netns", name).exists():
                netns.remove(name)


def test_linux_guests_needing_the_kernel_vm_are_refused_before_anything_boots(
    tmp_path: Path,
) -> None:
    """A linux guest inside the kernel VM would be nested TCG (far too slow): refused by
    ``lab check`` and ``lab run`` up front, saying why and what would work."""
    text = (ROOT / "labs" / "03-dhcp-linux.toml").read_text()
    text += """
[[guest]]
name = "k"
kind = "virtual"
  [[guest.nic]]
  bridge = "br0"
  plane = "kernel"
  address = "10.77.3.9/24"
"""
    path = tmp_path / "mixed.toml"
    path.write_text(text)
    reason = "linux guests in a lab that runs inside the kernel VM"
    if Path("/dev/vhost-net").exists():  # then it runs on the host, no VM needed
        done = lab("check", str(path))
        assert done.returncode == 0, done.stdout
    else:
        for command in ("check", "run"):
            done = lab(command, str(path), timeout=30)
            assert done.returncode == 2, done.stdout + done.stderr
            said = done.stdout + done.stderr
            assert reason in said and "k.nic0 on plane kernel" in said, said
            assert "no /dev/vhost-net" in said and "linux guest(s) deb" in said, said
            assert "what would work: a host with /dev/vhost-net" in said, said
            assert "kernel VM:" not in said and "lab: network" not in said  # nothing began
    # --vm always asks for the VM outright
    done = lab("run", "--vm", "always", str(ROOT / "labs" / "03-dhcp-linux.toml"), timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert reason in done.stderr and "(--vm always)" in done.stderr, done.stderr
    assert "what would work: --vm auto or never" in done.stderr
    assert "lab: network" not in done.stderr  # refused before anything was built


def test_a_missing_program_is_named_with_its_package(tmp_path: Path) -> None:
    """A lab of virtual guests whose namespace serves DHCP needs dnsmasq: on a host without
    it (PATH without it) the lab is refused before anything is built, naming the package."""
    text = (LABS / "userplane.toml").read_text()
    text = text.replace(
        'address = "10.77.0.1/24"', 'address = "10.77.0.1/24"\n  dhcp = "10.77.0.100-10.77.0.110"'
    )
    assert "dhcp" in text
    path = tmp_path / "dhcp.toml"
    path.write_text(text)
    env = {**os.environ, "PATH": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-m", "vhostkit", "lab", "run", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr + done.stdout
    assert "dnsmasq is missing: apt-get install dnsmasq-base" in done.stderr, done.stderr
    assert "qemu" not in done.stderr  # only what this lab runs
    assert "lab: network" not in done.stderr  # refused before anything was built
