"""Find the benchmark modules, run them one after the other, collect their rows.

The modules live in the source tree's ``bench/`` directory (beside the ``vhostkit`` package
in a checkout or an editable install); each is loaded from its file, so it stays a plain
script as well. A module file that does not exist is reported as skipped, with a note.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import vhostkit
from vhostkit.bench.row import Row, Skipped
from vhostkit.bench.util import OthersLoad
from vhostkit.errors import InvalidParam

__all__ = ["BENCHMARKS", "Benchmark", "ModuleResult", "bench_dir", "load_module", "run_benchmarks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark module: its name on the command line and its file in ``bench/``."""

    name: str
    file: str
    help: str


#: Every benchmark ``vhostkit bench`` runs, in this order.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("ring", "ring_throughput.py", "device and driver roles of the rings, in-process"),
    Benchmark("control", "control.py", "connect-to-running and request round trips"),
    Benchmark("blk", "blk.py", "blk daemon vs qemu-storage-daemon: IOPS and bandwidth"),
    Benchmark("testpmd", "datapath.py", "vhostkit sink / driver vs testpmd to testpmd"),
    Benchmark("scale", "scale.py", "64 devices in one process, a 509-region memory table"),
    Benchmark("net_tap", "net_tap.py", "net daemon RX/TX vs plain tap read/write loops"),
    Benchmark("net_rx", "net_rx.py", "tap -> NetDevice -> driver in one process"),
    Benchmark("planes", "net_planes.py", "kernel VM: kernel plane, user plane, vhost-net"),
)


def bench_dir() -> Path:
    """The tree's ``bench/`` directory (it may not exist in a non-editable install)."""
    return Path(vhostkit.__file__).resolve().parent.parent / "bench"


@dataclass
class ModuleResult:
    """What one module gave: ``status`` is ``ok``, ``skipped`` or ``failed``."""

    name: str
    file: str
    status: str
    rows: list[Row] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0
    others_cpu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "status": self.status,
            "note": self.note,
            "seconds": round(self.seconds, 3),
            "others_cpu": self.others_cpu,
            "rows": [r.to_dict() for r in self.rows],
        }


def load_module(path: Path) -> ModuleType:
    """Import ``path`` as a module of its own (not added to :data:`sys.modules` for good)."""
    name = f"vhostkit_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidParam(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def _run_one(bench: Benchmark, directory: Path, quick: bool) -> ModuleResult:
    path = directory / bench.file
    result = ModuleResult(bench.name, os.fspath(path), "skipped")
    if not path.is_file():
        result.note = f"{bench.file} not found in {directory}"
        return result
    load = OthersLoad()
    t0 = time.monotonic()
    load.start()
    try:
        module = load_module(path)
        run: Callable[[bool], Sequence[Any]] | None = getattr(module, "run", None)
        if run is None:
            raise InvalidParam(f"{bench.file} has no run(quick) function")
        if quick and getattr(module, "SLOW", False):
            result.note = "slow: not run with --quick"
            return result
        rows = [Row.from_dict(d) for d in run(quick)]
    except Skipped as exc:
        result.note = str(exc) or "skipped"
        return result
    except Exception as exc:  # a benchmark's failure is reported, the others still run
        log.debug("benchmark %s failed", bench.name, exc_info=True)
        result.status = "failed"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.note = f"{type(exc).__name__}: {first[:200]}"
        return result
    finally:
        result.seconds = time.monotonic() - t0
        result.others_cpu = load.stop()
    result.status = "ok"
    result.rows = [
        r if r.others_cpu is not None else replace(r, others_cpu=result.others_cpu) for r in rows
    ]
    if not rows:
        result.note = "no figures"
    return result


def run_benchmarks(
    *,
    quick: bool = False,
    only: Sequence[str] | None = None,
    directory: Path | None = None,
    benchmarks: Sequence[Benchmark] = BENCHMARKS,
    progress: Callable[[ModuleResult], None] | None = None,
) -> list[ModuleResult]:
    """Run ``benchmarks`` (those named in ``only``, in their own order) from ``directory``
    (default :func:`bench_dir`); ``progress`` is called after each. An unknown name in
    ``only`` is :class:`~vhostkit.errors.InvalidParam`."""
    directory = bench_dir() if directory is None else directory
    names = [b.name for b in benchmarks]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise InvalidParam(
                f"no benchmark {', '.join(map(repr, unknown))} (there are: {', '.join(names)})"
            )
    chosen = [b for b in benchmarks if not only or b.name in only]
    results = []
    for bench in chosen:
        log.info("benchmark %s (%s)", bench.name, bench.file)
        result = _run_one(bench, directory, quick)
        results.append(result)
        if progress is not None:
            progress(result)
    return results
