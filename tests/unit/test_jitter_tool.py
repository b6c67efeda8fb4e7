"""tools/jitter, the race-hunting pytest plugin: it loads, and it delays the hand-offs it names.

A small test file runs in a pytest subprocess with the plugin at probability 1: a worker
thread's ``os.eventfd_write`` and ``Event.set`` are delayed (and counted in the summary line),
the main thread's waits are not in ``worker`` mode, and ``off`` installs nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = """
import os, threading

def test_handoff():
    fd = os.eventfd(0)
    done = threading.Event()
    def worker():
        os.eventfd_write(fd, 1)
        done.set()
    t = threading.Thread(target=worker)
    t.start()
    assert done.wait(10)
    t.join()
    assert os.eventfd_read(fd) == 1
    os.close(fd)
"""


def run_sample(tmp_path: Path, mode: str) -> str:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tools' / 'jitter'}",
        "JITTER_MODE": mode,
        "JITTER_P": "1",
        "JITTER_MS": "0.1",
        "JITTER_SEED": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "jitter", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def delays(output: str) -> dict[str, int]:
    m = re.search(r"^jitter seed=1 mode=\w+ delays: (.*)$", output, re.M)
    assert m, output
    return {k: int(v) for k, v in re.findall(r"([\w.:]+)=(\d+)", m.group(1))}


@pytest.mark.parametrize("mode", ["worker", "both", "off"])
def test_jitter_plugin_delays_the_named_handoffs(tmp_path: Path, mode: str) -> None:
    got = delays(run_sample(tmp_path, mode))
    if mode == "off":
        assert got == {}
        return
    # before and after the one call, in the worker thread only (threading itself sets an
    # Event as a thread starts: more than two there)
    assert got["eventfd_write"] == 2 and got["Event.set"] >= 2, got
    assert ("main:eventfd_read" in got) == (mode == "both"), got
