"""The atheris harnesses in ``fuzz/``: a short coverage-guided run of each, and their seeds.

Each harness runs in its own process (libFuzzer owns the process) from a scratch copy of its
seed corpus, for :data:`RUNS` inputs; ``VHOSTKIT_LONG=1`` runs each for
:data:`LONG_SECONDS` instead. A finding makes the harness exit non-zero with the input saved
(``crash-*``) in the scratch directory; the test shows its output.

Without atheris the coverage-guided runs are skipped; the seed replay still checks that the
harnesses import and pass on their seeds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: inputs per harness in a short run (a few seconds each)
RUNS = {"codec": 20000, "rings": 6000, "server": 800}
#: seconds per harness with VHOSTKIT_LONG=1
LONG_SECONDS = 300
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris is not installed")
@pytest.mark.parametrize("harness", sorted(RUNS))
def test_a_short_atheris_run_finds_nothing(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "seeds" / harness, corpus)
    budget = f"-max_total_time={LONG_SECONDS}" if LONG else f"-atheris_runs={RUNS[harness]}"
    proc = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{harness}.py"), budget, str(corpus)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LONG_SECONDS * 2 if LONG else 240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    done = re.search(r"Done (\d+) (?:runs )?in (\d+) second", out)
    assert done, out[-3000:]
    print(f"fuzz_{harness}: {done.group(1)} inputs in {done.group(2)} s")
    assert not list(tmp_path.glob("crash-*"))


REPLAY = """
import sys
sys.modules["atheris"] = None  # as on a machine without it
sys.path.insert(0, {fuzz!r})
import importlib
from pathlib import Path
harness = importlib.import_module("fuzz_" + {name!r})
for seed in sorted(Path({fuzz!r}, "seeds", {name!r}).iterdir()):
    harness.one_input(seed.read_bytes())
    harness.one_input(seed.read_bytes()[: len(seed.read_bytes()) // 2])
print("replayed")
"""


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_the_harnesses_import_without_atheris_and_pass_their_seeds(harness: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REPLAY.format(fuzz=str(FUZZ), name=harness)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "replayed" in proc.stdout, proc.stdout + proc.stderr
