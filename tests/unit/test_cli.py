"""The README's main job: ``python3 -m vhostkit demo``."""

from __future__ import annotations

import io
import subprocess
import sys

from vhostkit.cli import run_demo


def test_demo_negotiates_and_maps_memory(fd_check) -> None:
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    assert "PROTOCOL_FEATURES" in text and "VERSION_1" in text
    assert "REPLY_ACK" in text
    assert "status     0xf (DRIVER_OK)" in text
    assert "gpa 0x00100000-0x00200000" in text  # the backend mapped the second region
    assert "ring 0     size 256 started=True enabled=True avail.idx=3" in text
    # the data path: every frame came back intact and in order
    assert "2000 echoed back, 2000 byte-identical and in order" in text


def test_demo_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vhostkit", "demo"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("over a real vhost-user socket")


def test_daemons_are_reachable_from_the_cli() -> None:
    for name in ("net-backend", "blk-backend"):
        proc = subprocess.run(
            [sys.executable, "-m", "vhostkit", name, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and "--socket" in proc.stdout, proc.stderr
