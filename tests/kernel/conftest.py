"""Kernel tests: run directly where /dev/vhost-* exist, otherwise inside one kernel VM.

Three modes, chosen once per session:

* **guest** (``VHOSTKIT_IN_VM=1``, set by :mod:`vhostkit.testing.kernel_vm`): we are the inner
  pytest inside the VM; the tests run as they are.
* **direct**: the host has ``/dev/vhost-net`` and ``/dev/vhost-vsock``: the tests run as they are.
* **vm**: the host lacks them. The outer pytest collects the test modules as usual, then swaps
  every selected test of this directory for a proxy item. The first proxy to run boots ONE VM
  that runs pytest on exactly those node ids (junit xml to the VM's read-write share); each
  proxy then reports its inner test's outcome: pass, fail with the inner failure text, skip
  with the inner reason. A VM that does not boot, or an inner run that crashes, fails every
  proxy loudly. The only skip: no QEMU on the machine and ``CI`` unset.

``VHOSTKIT_KERNEL_TESTS=direct|vm`` forces a mode; ``VHOSTKIT_VM_TIMEOUT`` (seconds) bounds
the inner run.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vhostkit.backend import MemoryRegion

GUEST_ENV_VAR = "VHOSTKIT_IN_VM"  # same value as vhostkit.testing.kernel_vm.GUEST_ENV_VAR
HERE = Path(__file__).resolve().parent
DEVICES = ("/dev/vhost-net", "/dev/vhost-vsock")
_STATE_KEY = pytest.StashKey["_VmRun"]()


def kernel_test_mode() -> str:
    """``guest``, ``direct`` or ``vm`` (see the module docstring)."""
    if os.environ.get(GUEST_ENV_VAR) == "1":
        return "guest"
    forced = os.environ.get("VHOSTKIT_KERNEL_TESTS", "")
    if forced in ("direct", "vm"):
        return forced
    return "direct" if all(os.path.exists(d) for d in DEVICES) else "vm"


MODE = kernel_test_mode()


def _is_ours(item: pytest.Item) -> bool:
    try:
        return Path(item.path).resolve().is_relative_to(HERE)
    except (AttributeError, OSError):
        return False


# --- proxying into the VM ---------------------------------------------------------------------


def _junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) pytest's junitxml writes for ``nodeid`` (as its mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


@dataclass
class _Outcome:
    kind: str  # passed | failed | skipped | xfailed
    text: str = ""


@dataclass
class _VmRun:
    """The single VM run shared by every proxy item of the session."""

    nodeids: list[str]
    rootdir: Path
    inifile: Path | None
    done: bool = False
    error: str | None = None
    skip_reason: str | None = None
    outcomes: dict[tuple[str, str], _Outcome] = field(default_factory=dict)
    inner_output: str = ""
    summary: str = ""
    reported_error: bool = False

    def ensure(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._run()
        except Exception as exc:  # every failure of the harness must fail loudly
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        from vhostkit.testing import kernel_vm

        if shutil.which("qemu-system-x86_64") is None:
            msg = (
                "qemu-system-x86_64 not found: the kernel tests need a VM on this host "
                "(no /dev/vhost-net); install qemu-system-x86 (tools/apt-packages.txt)"
            )
            if os.environ.get("CI"):
                raise RuntimeError(msg + " [CI is set: not skipping]")
            self.skip_reason = msg
            return
        prepared = kernel_vm.prepare()
        timeout = float(os.environ.get("VHOSTKIT_VM_TIMEOUT", "900"))
        with tempfile.TemporaryDirectory(prefix="vhostkit-kernel-tests-") as share:
            junit = Path(share) / "junit.xml"
            argv = [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                "-o",
                "junit_family=xunit2",
                "-o",
                "junit_logging=all",
                "-o",
                "console_output_style=classic",
                f"--rootdir={self.rootdir}",
                "-q",
                "-rfEs",
            ]
            if self.inifile is not None:
                argv += ["-c", str(self.inifile)]
            argv += self.nodeids
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
            env.pop("VHOSTKIT_KERNEL_TESTS", None)
            t0 = time.monotonic()
            result = kernel_vm.run_in_vm(
                argv, cwd=self.rootdir, env=env, timeout=timeout, share=share
            )
            self.inner_output = result.output
            self.summary = (
                f"kernel VM ({result.machine}, {prepared.version}): boot "
                f"{result.boot_seconds:.1f} s, inner pytest exit {result.returncode}, "
                f"total {time.monotonic() - t0:.1f} s for {len(self.nodeids)} test(s)"
            )
            if result.returncode not in (0, 1) or not junit.exists():
                raise RuntimeError(
                    f"the inner pytest run crashed (exit {result.returncode}, junit xml "
                    f"{'present' if junit.exists() else 'missing'}):\n"
                    f"{_tail(result.output, 80)}"
                )
            self.outcomes = _parse_junit(junit)

    def outcome_for(self, nodeid: str) -> _Outcome:
        self.ensure()
        if self.skip_reason is not None:
            return _Outcome("skipped", self.skip_reason)
        if self.error is not None:
            if not self.reported_error:
                self.reported_error = True
                return _Outcome("failed", f"kernel VM run failed:\n{self.error}")
            first_line = self.error.splitlines()[0] if self.error else ""
            return _Outcome(
                "failed", f"kernel VM run failed (details on the first kernel test): {first_line}"
            )
        found = self.outcomes.get(_junit_key(nodeid))
        if found is None:
            return _Outcome(
                "failed",
                f"{nodeid} was not reported by the inner pytest run:\n"
                f"{_tail(self.inner_output, 40)}",
            )
        return found


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


_SECTION = re.compile(r"^-+ Captured [\w ]+ -+$")


def _strip_empty_sections(text: str) -> str:
    """Drop pytest's "Captured ..." headers; keep text only if something was captured."""
    lines = [ln for ln in text.splitlines() if not _SECTION.match(ln.strip())]
    return "\n".join(lines).strip()


def _parse_junit(path: Path) -> dict[tuple[str, str], _Outcome]:
    outcomes: dict[tuple[str, str], _Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        problems: list[str] = []
        skipped: ET.Element | None = None
        captured: list[str] = []
        for child in case:
            if child.tag in ("failure", "error"):
                head = f"[inner {child.tag}] {child.get('message', '')}".rstrip()
                problems.append(f"{head}\n{child.text or ''}")
            elif child.tag == "skipped":
                skipped = child
            elif child.tag in ("system-out", "system-err"):
                body = _strip_empty_sections(child.text or "")
                if body:
                    captured.append(f"--- inner {child.tag} ---\n{body}")
        previous = outcomes.get(key)
        if problems:
            text = "\n".join(problems)
            if captured:
                text += "\n" + "\n".join(captured)[-6000:]
            outcomes[key] = _Outcome("failed", text)
        elif skipped is not None and (previous is None or previous.kind != "failed"):
            kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            outcomes[key] = _Outcome(kind, skipped.get("message") or (skipped.text or ""))
        elif previous is None:
            outcomes[key] = _Outcome("passed")
    return outcomes


class InnerTestFailure(Exception):
    """The test failed inside the kernel VM."""


class VmProxyItem(pytest.Item):
    """Stands for one kernel test; its outcome comes from the inner run in the VM."""

    def runtest(self) -> None:
        run = self.config.stash[_STATE_KEY]
        outcome = run.outcome_for(self.nodeid)
        if outcome.kind == "failed":
            raise InnerTestFailure(outcome.text)
        if outcome.kind == "skipped":
            pytest.skip(f"(in the kernel VM) {outcome.text}")
        if outcome.kind == "xfailed":
            pytest.xfail(f"(in the kernel VM) {outcome.text}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, InnerTestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} [in kernel VM]"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Mark our tests ``kernel``; in vm mode, swap them for proxies (after -k/-m selection)."""
    ours = [i for i in items if _is_ours(i)]
    for item in ours:
        item.add_marker(pytest.mark.kernel)
    if MODE != "vm" or not ours:
        return
    rootdir = Path(config.rootpath)
    run = _VmRun(
        nodeids=[i.nodeid for i in ours],
        rootdir=rootdir,
        inifile=Path(config.inipath) if config.inipath else None,
    )
    config.stash[_STATE_KEY] = run
    for pos, item in enumerate(items):
        if not _is_ours(item):
            continue
        proxy = VmProxyItem.from_parent(item.parent, name=item.name)
        proxy.own_markers.extend(item.own_markers)
        for mark in item.own_markers:
            proxy.keywords[mark.name] = mark
        proxy.extra_keyword_matches.update(item.extra_keyword_matches)
        assert proxy.nodeid == item.nodeid, (proxy.nodeid, item.nodeid)
        items[pos] = proxy


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_STATE_KEY, None)
    if run is not None and run.done:
        terminalreporter.write_sep("-", "vhostkit kernel VM")
        terminalreporter.write_line(
            run.summary or (run.error or run.skip_reason or "").splitlines()[0]
        )


def pytest_report_header(config: pytest.Config) -> str:
    return f"vhostkit kernel tests: {MODE} mode"


# --- fixtures for the tests themselves (guest/direct mode) ------------------------------------


@pytest.fixture(autouse=True)
def _kernel_fd_check(fd_check: Any) -> Iterator[None]:
    """Every kernel test must close what it opens (the shared ``fd_check`` of tests/)."""
    yield


@dataclass
class GuestMemory:
    """A memfd mapped in this process: what a VMM hands the kernel as guest memory."""

    fd: int
    mm: mmap.mmap
    addr: int
    size: int
    gpa: int = 0

    @property
    def region(self) -> MemoryRegion:
        return MemoryRegion(
            guest_phys_addr=self.gpa, memory_size=self.size, userspace_addr=self.addr, fd=self.fd
        )

    def uaddr(self, gpa: int) -> int:
        return self.addr + gpa - self.gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.mm[off : off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        off = gpa - self.gpa
        return self.mm[off : off + size]


@pytest.fixture
def guest_memory() -> Iterator[GuestMemory]:
    """1 MiB of memfd-backed "guest memory" at guest-physical address 0."""
    size = 1 << 20
    fd = os.memfd_create("vhostkit-test-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    try:
        view = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(view)
        del view
        yield GuestMemory(fd=fd, mm=mm, addr=addr, size=size)
    finally:
        mm.close()
        os.close(fd)


# --- a split virtqueue written by hand, on purpose ---------------------------------------------
#
# The library's rings and drivers (vhostkit.virtio.split, vhostkit.guest) have their own kernel
# tests (test_kernel_netdriver.py, test_kernel_vsockdriver.py). The ioctl tests here
# (test_kernel_net.py, test_kernel_vsock.py, test_kernel_errors.py) instead place individual
# descriptors by index and read raw used elements, byte by byte with struct, so that what they
# check about the kernel does not depend on vhostkit's ring code, and a bug there cannot hide
# or fake a kernel behaviour. SplitDriverQueue manages its own free list and tokens, so it is
# not a drop-in for that; keep this small.

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2


@dataclass
class SplitRing:
    """One split virtqueue laid out by hand in :class:`GuestMemory` (driver side)."""

    mem: GuestMemory
    index: int
    num: int
    desc: int  # guest-physical addresses
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0

    def set_desc(self, i: int, gpa: int, length: int, flags: int = 0, next_: int = 0) -> None:
        buf = bytearray(16)
        struct.pack_into("<QIHH", buf, 0, gpa, length, flags, next_)
        self.mem.write(self.desc + 16 * i, bytes(buf))

    def publish(self, head: int) -> None:
        """Put descriptor chain ``head`` in the avail ring and bump avail->idx."""
        slot = self.avail_idx % self.num
        self.mem.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def used_elem(self, n: int) -> tuple[int, int]:
        """(id, len) of used element ``n`` (a free-running index)."""
        off = self.used + 4 + 8 * (n % self.num)
        ident, length = struct.unpack("<II", self.mem.read(off, 8))
        return ident, length

    def vring_addr(self) -> Any:
        from vhostkit.backend import VringAddr

        return VringAddr(
            index=self.index,
            desc=self.mem.uaddr(self.desc),
            used=self.mem.uaddr(self.used),
            avail=self.mem.uaddr(self.avail),
        )


@pytest.fixture
def make_ring(guest_memory: GuestMemory) -> Any:
    """``make_ring(index, num=8)``: a split ring in its own 16 KiB slot of guest memory."""

    def make(index: int, num: int = 8) -> SplitRing:
        base = 0x4000 * index
        return SplitRing(
            mem=guest_memory,
            index=index,
            num=num,
            desc=base,
            avail=base + 0x1000,
            used=base + 0x2000,
        )

    return make


@contextlib.contextmanager
def eventfds(n: int) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for _ in range(n):
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def make_eventfds() -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        yield lambda n: stack.enter_context(eventfds(n))
