"""``vhostkit lab run`` through the real entry point: a lab on vhostkit back-end daemons.

The lab (tests/helpers/labs/userplane.toml) builds a bridge in a namespace of its own, a
namespace host on a veth pair, and two virtual guests, each a process with vhostkit's virtio-net
driver talking vhost-user to a vhostkit net back-end daemon on its tap. The guests ping each
other and are pinged from the namespace, and send numbered streams to the namespace's UDP
socket and to each other. Nothing leaves the machine: the lab's namespaces have no other link.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.guest_output import HELPERS

from vhostkit.lab.network import leftover_namespaces

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="labs build namespaces and taps")

LABS = HELPERS / "labs"
ROOT = Path(__file__).resolve().parents[2]


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
        [sys.executable, "-m", "vhostkit", "lab", "run", str(path)],
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
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in out + err
    assert runner_leftovers(proc.pid) == []
    lingering = subprocess.run(
        ["pgrep", "-f", f"vhk-lab-.*{proc.pid}|vhostkit.lab.guest"], capture_output=True
    )
    assert lingering.stdout == b"", "no guest or back-end process outlives the lab"


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
