"""The shipped labs that need kernel vhost-net, run through ``vhostkit lab run`` on a real kernel.

Outside a host with ``/dev/vhost-net`` these run inside the one kernel VM of the session (see
conftest.py); the lab runner is told ``--vm never`` so it runs right there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhostkit.lab.spec import load_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="labs build namespaces and taps"),
]

ROOT = Path(__file__).resolve().parents[2]
KERNEL_LABS = [p for p in sorted((ROOT / "labs").glob("*.toml")) if load_lab(p).needs_kernel_vhost]


@pytest.mark.parametrize("path", KERNEL_LABS, ids=lambda p: p.stem)
def test_shipped_lab_passes_on_a_real_kernel(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vhostkit", "lab", "run", "--vm", "never", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["passed"] and not result["leftovers"]
    assert result["expectations"] and all(o["passed"] for o in result["expectations"])
    pings = [s["values"] for s in result["steps"] if s["do"] == "ping"]
    assert all(v["received"] == v["sent"] > 0 for v in pings)
