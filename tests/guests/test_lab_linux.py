"""The shipped labs with linux guests, through the real entry point (``vhostkit lab run``).

Each lab boots its linux guest once (Debian's kernel under QEMU TCG, see
:mod:`vhostkit.lab.linux`), on vhostkit back-end daemons the lab starts on its taps:

* ``labs/03-dhcp-linux.toml``: the guest leases an address from dnsmasq in a namespace and
  pings it, and is pinged back at the leased address;
* ``labs/04-blk-restart.toml``: the guest writes to a vhostkit blk disk while the disk's
  back-end is SIGKILLed and replaced; the checksums of what it wrote verify afterwards;
* ``labs/05-offloads.toml``: the same TCP transfers over a NIC with offloads and one without.

Besides each lab passing, the tests check what the JSON result says each step measured, that
teardown stopped QEMU and every daemon, and that nothing is left. Two more labs in
``tests/helpers/labs`` check the ``run`` step's expectations (an exit code, a pattern that
does not match, a command that runs too long: reported, and the guest goes on; a read-only
disk) and that an
interrupted linux lab powers its guest off. A lab on a host without one of the programs it
needs (simulated with ``PATH``) is refused before anything is built, naming the Debian
package to install. No test asserts on speed: lab 5's floor is 1 Mbit/s.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.guest_output import HELPERS

from vhostkit.lab.network import leftover_namespaces

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(os.geteuid() != 0, reason="labs build namespaces and taps"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
LABS = ROOT / "labs"
TEST_LABS = HELPERS / "labs"
MiB = 1 << 20


def lab_run(
    path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostkit", "lab", "run", *args, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def run_json(path: Path, *args: str, code: int = 0) -> dict[str, Any]:
    """Run the lab with ``--json``; its result, after checking the exit code."""
    done = lab_run(path, "--json", *args)
    assert done.returncode == code, done.stderr + done.stdout
    result: dict[str, Any] = json.loads(done.stdout)
    assert not result["leftovers"], result["leftovers"]
    return result


def steps(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in result["steps"]}


def pids(removed: list[str], prefix: str) -> list[int]:
    """The pids of the processes teardown stopped whose name starts with ``prefix``."""
    return [
        int(m.group(1))
        for item in removed
        if item.startswith(f"process {prefix}") and (m := re.search(r"\(pid (\d+)\)", item))
    ]


def assert_gone(result: dict[str, Any]) -> None:
    """Teardown stopped QEMU and the daemons (none of them is alive now)."""
    stopped = pids(result["removed"], "")
    assert pids(result["removed"], "qemu"), result["removed"]
    for pid in stopped:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"pid {pid} still runs"


def lab_namespaces(pid: int) -> set[str]:
    """The namespaces of the lab a runner with ``pid`` runs (its prefix is ``vhk`` and the
    pid, or the pid's last five digits in older runners)."""
    prefixes = (f"vhk{pid}", f"vhk{pid % 100000}")
    return {name for prefix in prefixes for name in leftover_namespaces(prefix)}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def test_lab_3_dhcp_lease_and_ping() -> None:
    result = run_json(LABS / "03-dhcp-linux.toml")
    assert result["passed"] and not result["error"]
    by_name = steps(result)
    m = re.search(r"inet (\S+)", by_name["lease"]["values"]["output"])
    assert m is not None, by_name["lease"]
    leased = ipaddress.IPv4Interface(m.group(1))
    low, high = ipaddress.IPv4Address("10.77.3.100"), ipaddress.IPv4Address("10.77.3.150")
    assert low <= leased.ip <= high and leased.network.prefixlen == 24, leased
    for name in ("to-server", "to-guest"):
        values = by_name[name]["values"]
        assert values["sent"] == values["received"] == 10, values
    # dnsmasq, the net back-end and QEMU were running until teardown
    removed = " ".join(result["removed"])
    assert "process dnsmasq server" in removed and "back-end deb.nic0" in removed, removed
    assert_gone(result)
    assert sum(r.startswith("netns") for r in result["removed"]) == 2


def test_lab_4_blk_restart_keeps_the_guests_writes() -> None:
    result = run_json(LABS / "04-blk-restart.toml")
    assert result["passed"] and not result["error"]
    by_name = steps(result)
    kill = by_name["kill"]["values"]
    assert kill["signal"] == "KILL" and kill["pid"] != kill["old_pid"], kill
    assert not Path(f"/proc/{kill['old_pid']}").exists() or _zombie(kill["old_pid"])
    before = int(by_name["before-kill"]["values"]["output"])
    m = re.search(r"writer: ok (\d+); (\d+) MiB written", by_name["after"]["values"]["output"])
    assert m is not None, by_name["after"]
    written = int(m.group(2))
    assert written >= before + 2, (written, before)  # it wrote on after the restart
    verify = by_name["verify"]["values"]["output"]
    assert f"checksums verified: {written} MiB" in verify, verify
    disk, data = re.findall(r"^(?:disk|data) ([0-9a-f]{64})", verify, re.MULTILINE)
    assert disk == data
    # teardown stopped the replacement back-end, the one the restart started
    assert kill["pid"] in pids(result["removed"], "back-end deb.disk0"), result["removed"]
    assert_gone(result)


def test_lab_5_offloads_on_and_off() -> None:
    result = run_json(LABS / "05-offloads.toml")
    assert result["passed"] and not result["error"]
    by_name = steps(result)
    features = by_name["features"]["values"]["output"]
    assert "eth0 csum=1 guest_csum=1 guest_tso4=1 host_tso4=1" in features, features
    assert "eth1 csum=0 guest_csum=0 guest_tso4=0 host_tso4=0" in features, features
    for name in ("up-on", "up-off", "down-on", "down-off"):
        values = by_name[name]["values"]
        assert values["sent"] == values["received"] == 32 * MiB, (name, values)
        assert values["seconds"] > 0 and values["throughput"] > 0, (name, values)
    shown = {o["step"]: o["value"] for o in result["expectations"] if o["key"] == "throughput_min"}
    assert set(shown) == {"up-on", "up-off", "down-on", "down-off"}
    assert_gone(result)


def test_run_steps_judge_exit_codes_patterns_and_time_outs() -> None:
    result = run_json(TEST_LABS / "linux-judge.toml", "--keep-going", code=1)
    outcomes = {(o["step"], o["key"]): (o["value"], o["passed"]) for o in result["expectations"]}
    assert outcomes[("exits-3", "exit_code")] == (3.0, False)
    assert outcomes[("exits-3", "output_matches")] == (1.0, True)  # the guest's own kernel
    assert outcomes[("no-match", "output_matches")] == (0.0, False)
    too_long = steps(result)["too-long"]
    assert "ran past its 2 s timeout" in too_long["error"] and "started" in too_long["error"]
    # the guest went on after the command that was killed
    assert outcomes[("still-there", "output_matches")] == (1.0, True)
    # a read-only disk: the guest sees it so (4 MiB, 8192 sectors) and a write fails
    read_only = steps(result)["read-only"]["values"]
    assert read_only["output"].startswith("1\n8192\n"), read_only
    assert outcomes[("read-only", "exit_code")][0] != 0.0, read_only
    assert_gone(result)


@pytest.mark.parametrize(
    "when", ["step no-match: run", "booting Linux"], ids=["during-a-command", "during-the-boot"]
)
def test_sigint_powers_the_guest_off(tmp_path: Path, when: str) -> None:
    path = tmp_path / "long.toml"
    text = (TEST_LABS / "linux-judge.toml").read_text()
    text = text.replace('command = "echo nothing to see"', 'command = "sleep 300"')
    # no disk: the guest boots on microvm, faster (the lab never gets to its disk step)
    disk = '  [[guest.disk]]\n  size = "4M"\n  read_only = true\n'
    assert disk in text
    path.write_text(text.replace(disk, ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostkit", "lab", "run", "--json", "--keep-going", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if when in line:
                break
        else:
            pytest.fail(f"the lab never said {when!r}")
        assert lab_namespaces(proc.pid), "the lab runs"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["error"] == "interrupted" and not result["leftovers"], result
    assert_gone(result)
    assert lab_namespaces(proc.pid) == set()


def test_a_missing_program_is_named_with_its_package(tmp_path: Path) -> None:
    """A host without dnsmasq (PATH without it): lab 3 is refused before anything is built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "busybox", "ip"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    before = leftover_namespaces("vhk")
    done = lab_run(LABS / "03-dhcp-linux.toml", env=env, timeout=60)
    assert done.returncode == 2, done.stderr + done.stdout
    assert "dnsmasq is missing: apt-get install dnsmasq-base" in done.stderr, done.stderr
    assert "qemu" not in done.stderr, done.stderr  # only what is missing is named
    assert leftover_namespaces("vhk") == before
    # nothing at all on PATH: each program the lab runs, with its package
    done = lab_run(LABS / "03-dhcp-linux.toml", env={**os.environ, "PATH": "/nonexistent"})
    assert done.returncode == 2
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("ip", "iproute2"),
        ("dnsmasq", "dnsmasq-base"),
    ):
        assert f"{tool} is missing: apt-get install {package}" in done.stderr, done.stderr


def test_a_linux_guest_on_the_kernel_plane_is_refused(tmp_path: Path) -> None:
    """QEMU's vhost=on needs /dev/vhost-net: not done for linux guests; refused up front."""
    path = tmp_path / "kernel.toml"
    text = (LABS / "03-dhcp-linux.toml").read_text()
    path.write_text(text.replace('plane = "vhostkit"', 'plane = "kernel"'))
    done = lab_run(path, "--vm", "never", timeout=60)
    assert done.returncode == 2, done.stderr + done.stdout
    assert "guest deb nic 0: the kernel plane for a linux guest" in done.stderr, done.stderr
