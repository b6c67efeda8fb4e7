"""``vhostkit bench``: the runner, the table and the JSON document, over fake benchmark
modules (a directory given with ``--dir``); no real benchmark runs here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.cli_run import vhostkit

from vhostkit.bench import BENCHMARKS, Row, bench_dir, make_row, run_benchmarks
from vhostkit.bench.table import COLUMNS, format_number, plain_table, print_table
from vhostkit.bench.util import OthersLoad, process_tree
from vhostkit.errors import InvalidParam

GOOD = """
from vhostkit.bench import make_row

def run(quick):
    return [
        make_row("ring", "fake figure", 2.0, "M/s", "fake reference", 4.0, aim=">= 0.5",
                 note="quick" if quick else "slow"),
        dict(bench="ring", figure="own others", value=1.0, unit="ms", reference="r",
             reference_value=1.0, ratio=1.0, aim=None, others_cpu=7.0),
    ]
"""


def write_modules(d: Path, **modules: str) -> Path:
    for file, text in modules.items():
        (d / f"{file}.py").write_text(textwrap.dedent(text))
    return d


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    return write_modules(
        tmp_path,
        ring_throughput=GOOD,
        control="from vhostkit.bench import Skipped\n"
        "def run(quick):\n    raise Skipped('no peer')\n",
        blk="def run(quick):\n    raise RuntimeError('broken image')\n",
        datapath="def run(quick):\n    return [{'bench': 'testpmd', 'value': 1.0}]\n",
        net_planes="SLOW = True\ndef run(quick):\n    raise AssertionError('must not run')\n",
    )


def by_name(doc: dict) -> dict[str, dict]:
    return {m["name"]: m for m in doc["modules"]}


def test_json_document_reports_every_module(fakes: Path) -> None:
    proc = vhostkit("bench", "--dir", str(fakes), "--quick", "--json")
    assert proc.returncode == 1, proc  # blk failed
    doc = json.loads(proc.stdout)
    assert doc["quick"] is True
    assert [m["name"] for m in doc["modules"]] == [b.name for b in BENCHMARKS]
    mods = by_name(doc)
    ring = mods["ring"]
    assert ring["status"] == "ok"
    first, second = ring["rows"]
    assert first["figure"] == "fake figure"
    assert first["ratio"] == 0.5
    assert first["note"] == "quick"
    assert first["others_cpu"] is not None and first["others_cpu"] >= 0  # the runner's
    assert second["others_cpu"] == 7.0  # the module's own figure is kept
    assert mods["control"] == {**mods["control"], "status": "skipped", "note": "no peer"}
    assert mods["blk"]["status"] == "failed"
    assert "RuntimeError: broken image" in mods["blk"]["note"]
    assert mods["testpmd"]["status"] == "failed"  # a row without the contract's keys
    assert "InvalidParam" in mods["testpmd"]["note"]
    assert mods["planes"]["status"] == "skipped"
    assert "--quick" in mods["planes"]["note"]
    assert mods["net_tap"]["status"] == "skipped"
    assert "net_tap.py not found" in mods["net_tap"]["note"]
    assert "bench net_tap: skipped" in proc.stderr


def test_plain_table_when_not_a_tty(fakes: Path) -> None:
    proc = vhostkit("bench", "--dir", str(fakes), "--quick", "--only", "ring", "control")
    assert proc.returncode == 0, proc
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [w for c in COLUMNS for w in c.split()]
    ring = [line for line in lines if "fake figure" in line]
    assert len(ring) == 1
    assert ring[0].split()[:2] == ["ring", "fake"]
    assert " 0.50 " in ring[0] and ">= 0.5" in ring[0]
    assert any(line.startswith("control") and "(skipped) [2]" in line for line in lines)
    assert "[1] quick" in lines
    assert "[2] no peer" in lines
    assert "blk" not in proc.stdout  # --only


def test_only_refuses_an_unknown_name(fakes: Path) -> None:
    proc = vhostkit("bench", "--dir", str(fakes), "--only", "nosuch")
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr
    with pytest.raises(InvalidParam, match="nosuch"):
        run_benchmarks(only=["nosuch"], directory=fakes)


def test_json_before_the_command(fakes: Path) -> None:
    proc = vhostkit("--json", "bench", "--dir", str(fakes), "--only", "ring", "--quick")
    assert proc.returncode == 0, proc
    assert by_name(json.loads(proc.stdout))["ring"]["rows"][0]["note"] == "quick"


def test_not_quick_runs_slow_modules(fakes: Path) -> None:
    results = run_benchmarks(only=["ring", "planes"], directory=fakes)
    ring, planes = results
    assert ring.rows[0].note == "slow"
    assert planes.status == "failed" and "must not run" in planes.note


def test_rich_table_on_a_terminal(fakes: Path) -> None:
    results = run_benchmarks(quick=True, only=["ring", "blk"], directory=fakes)
    out = io.StringIO()
    print_table(results, out, tty=True, width=200)
    text = out.getvalue()
    for column in ("benchmark", "figure", "reference", "ratio", "aim"):
        assert column in text
    assert "fake figure" in text and "(failed)" in text
    assert "RuntimeError: broken image" in text


def test_row_contract() -> None:
    row = Row.from_dict(make_row("b", "f", 3.0, "u", "r", 2.0))
    assert row.ratio == 1.5 and row.aim is None and row.note == ""
    assert Row.from_dict(row.to_dict()) == row
    for broken in (
        {**make_row("b", "f", 1.0, "u", "r", 1.0), "value": "fast"},
        {**make_row("b", "f", 1.0, "u", "r", 1.0), "aim": 3},
        {k: v for k, v in make_row("b", "f", 1.0, "u", "r", 1.0).items() if k != "unit"},
        {**make_row("b", "f", 1.0, "u", "r", 1.0), "value": True},
    ):
        with pytest.raises(InvalidParam):
            Row.from_dict(broken)
    nan = make_row("b", "f", 1.0, "u", "r", 0.0)
    assert Row.from_dict(nan).to_dict()["ratio"] is None  # JSON has no NaN


def test_format_number() -> None:
    assert format_number(1234567.0) == "1,234,567"
    assert format_number(123.45) == "123.5"
    assert format_number(0.5) == "0.500"
    assert format_number(None) == "-"
    assert format_number(float("nan")) == "-"


def test_a_note_given_twice_has_one_number() -> None:
    from vhostkit.bench.runner import ModuleResult

    rows = [Row.from_dict(make_row("x", f, 1.0, "u", "r", 1.0, note="same")) for f in "ab"]
    text = plain_table([ModuleResult("x", "x.py", "ok", rows)])
    assert text.count("[1]") == 3 and "[2]" not in text


def test_plain_table_lines_up() -> None:
    from vhostkit.bench.runner import ModuleResult

    rows = [Row.from_dict(make_row("x", "a long figure", 1.0, "u", "r", 3.0, others_cpu=12.4))]
    text = plain_table([ModuleResult("x", "x.py", "ok", rows)])
    header, rule, line = text.splitlines()
    assert len(header) == len(rule)
    assert line.endswith("12")


def test_the_tree_has_its_benchmarks() -> None:
    # every registered module except the one another branch adds
    present = {b.name for b in BENCHMARKS if (bench_dir() / b.file).is_file()}
    assert {"ring", "blk", "testpmd", "control", "scale", "planes"} <= present


def test_others_load_leaves_out_our_children() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    load = OthersLoad().start()
    ours0 = load._ours()
    child = subprocess.Popen([sys.executable, "-c", burn])
    assert child.pid in process_tree(os.getpid())
    child.wait()
    assert load._ours() - ours0 >= 0.25  # its CPU, reaped, counts as ours
    assert load.stop() >= 0.0
