"""A real Linux guest's disk I/O survives a SIGKILL and restart of its vhost-user-blk back-end.

:mod:`test_restart` proves inflight I/O tracking (``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``,
GET/SET_INFLIGHT_FD) with vhostkit's own front-end; here the front-end is QEMU's
``vhost-user-blk-pci`` with a reconnecting chardev (``reconnect=1``) and the driver is Debian's
kernel (:mod:`vhostkit.testing.kernel_vm`, QEMU TCG, one boot on q35 each for split and
packed rings).

1. The first back-end is ``tests/helpers/stall_blk_backend.py``, a separate process listening
   at the socket. It serves normally until the guest's ``STALL_AFTER`` th write request, then
   keeps taking requests until it holds ``HOLD`` in flight, completes the newest half of them
   (newest first: the used index moves past requests still in flight, so QEMU's fallback of
   restarting the ring at the used index would redo completed requests and lose the stalled
   ones; only the inflight area knows which ones to redo), prints ``stalled <n>`` and hangs.
2. The test SIGKILLs it and starts the ordinary daemon (``python3 -m vhostkit.devices.blk``)
   on the same socket path and image. QEMU connects again a second later, sets the device
   up anew (memory table, SET_INFLIGHT_FD with the area the first back-end filled, rings at
   the used index it read from guest memory), and the daemon resubmits the requests that were
   in flight: it logs ``ring 0: resubmitting <n> inflight chains``, the same ``n``.
3. Meanwhile the guest (``tests/helpers/guest_blkcheck.py``, its ``parallel`` step) writes
   seeded pseudo-random data from ``len(WRITERS)`` threads with ``O_DIRECT`` (many requests in
   flight at once), flushes, reads back and reports each range's sha256 as a JSON line; an
   I/O error would end it with a traceback and a non-zero exit code. After power-off the host
   compares the image with what it expects, byte for byte.

The first back-end reports its ring starts (descriptors, acked protocol features, whether the
ring is inflight-tracked): the test asserts INFLIGHT_SHMFD was negotiated and the ring tracked,
so it cannot pass with an untracked ring. One request queue: the stall count is exact only
when one worker takes requests (with two, the other ring's worker goes on meanwhile).

Quirks (QEMU 7.2, Linux 6.1):

* Quirk: on microvm (virtio-mmio) QEMU 7.2 tells the driver QueueNumMax = 1024 while
  vhost-user-blk sizes the inflight area for ``queue-size`` (128): vhostkit runs those rings
  untracked (see ``test_guest_kernel_blkbackend``), so this test boots q35, where the PCI
  transport reports ``queue-size`` and the ring fits the area.
* Quirk: QEMU 7.2's reconnect option is ``reconnect=<seconds>`` on ``-chardev socket``
  (``reconnect-ms`` is an invalid parameter there). QEMU is the client, the back-end listens;
  with ``reconnect`` and nobody listening at start-up, QEMU prints "Unable to connect
  character device" and keeps trying (it does not exit).
* Quirk: QEMU connects again one ``reconnect`` period after the connection dropped, not when
  the new back-end starts listening: the replacement resubmits 1.0 s after the kill however
  fast it starts.
* Quirk: on q35 SeaBIOS's own virtio-blk driver starts the ring (and reads) before Linux's
  does: the first back-end sees two ring starts, and only write requests count towards the
  stall. SeaBIOS knows split rings only: with ``packed=on`` its start is split, Linux's packed.
* Quirk: when the back-end dies, QEMU's GET_VRING_BASE fails and it restarts the ring at the
  used index it reads from guest memory. With a replacement that does not offer
  INFLIGHT_SHMFD (tried by hand) it therefore took the heads of the requests completed out of
  order again ("the same head appears twice in the avail ring": the guest had reused them),
  never redid the stalled ones, and the guest hung: the out-of-order completion is what makes
  this test fail without inflight tracking.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import ExitStack

import pytest
from helpers.guest_output import HELPERS, KiB, MiB, guest_steps, seeded, sha

from vhostkit.testing import kernel_vm
from vhostkit.testing.peers import PeerProcess, PeerTimeout, which_or_skip
from vhostkit.user import ProtocolFeature

pytestmark = pytest.mark.peer

log = logging.getLogger(__name__)

HELPER = HELPERS / "stall_blk_backend.py"
GUEST_SCRIPT = HELPERS / "guest_blkcheck.py"
IMAGE_SIZE = 16 * MiB
#: the guest's writers: (offset, length, seed, cpu); 1 MiB each, every other MiB of the disk
WRITERS = [((2 * i + 1) * MiB, MiB, 100 + i, i % 2) for i in range(8)]
#: each writer's O_DIRECT calls (one request each: 128 KiB in pieces fits ``seg_max``)
CHUNK = 128 * KiB
#: the stall comes after this many of the guest's write requests (64 or more) were completed
STALL_AFTER = 16
#: requests the first back-end takes before it stalls (half of them it completes)
HOLD = 4
#: QEMU's queue-size for vhost-user-blk-pci (its default): the ring's descriptors
QUEUE_SIZE = 128
#: the whole image before the guest writes (seeded, so misplaced writes show)
BACKGROUND_SEED = 7
#: generous: TCG on a loaded 2-core machine
BOOT_WAIT = 240.0
JOB_TIMEOUT = 180.0


class Backend(PeerProcess):
    name = "blk-backend"

    def __init__(self, argv: list[str], ready: str) -> None:
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"}, ready_timeout=60)
        self.ready = ready

    def _wait_ready(self) -> None:
        self.wait_for_line(self.ready, timeout=self.ready_timeout)


class VmThread(threading.Thread):
    """``run_in_vm`` in a thread: the test drives the back-ends while the guest runs."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(name="kernel-vm", daemon=True)
        self.kwargs = kwargs
        self.result: kernel_vm.VmResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = kernel_vm.run_in_vm(**self.kwargs)  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc


def wait_line(peer: PeerProcess, pattern: str, vm: VmThread, timeout: float) -> re.Match[str]:
    """``peer.wait_for_line``, failing early (with the VM's story) if the VM ended first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return peer.wait_for_line(pattern, timeout=2.0)
        except PeerTimeout:
            if not vm.is_alive():
                vm.join()
                out = vm.result.output if vm.result else ""
                pytest.fail(
                    f"the VM ended before {peer.name} printed {pattern!r}: {vm.error or ''}\n"
                    f"guest output:\n{out}\n{peer.name} output:\n{peer.output}"
                )
            if time.monotonic() >= deadline:
                raise


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_linux_guest_io_survives_backend_kill_and_restart(fd_check, sock_dir, tmp_path, packed):
    which_or_skip("qemu-system-x86_64")
    image = tmp_path / "disk.img"
    expected = bytearray(seeded(BACKGROUND_SEED, IMAGE_SIZE))
    image.write_bytes(expected)
    sock = sock_dir / "blk.sock"
    plan = {
        "parallel": [{"offset": o, "length": n, "seed": s, "cpu": c} for o, n, s, c in WRITERS],
        "parallel_chunk": CHUNK,
    }
    first = Backend(
        [
            sys.executable,
            str(HELPER),
            "--socket",
            str(sock),
            "--image",
            str(image),
            "--stall-after",
            str(STALL_AFTER),
            "--count-writes",
            "--hold",
            str(HOLD),
            "--out-of-order",
        ],
        ready="listening",
    )
    second = Backend(
        [
            sys.executable,
            "-m",
            "vhostkit.devices.blk",
            "--socket",
            str(sock),
            "--image",
            str(image),
        ],
        ready="listening on",
    )
    vm = VmThread(
        argv=["python3", str(GUEST_SCRIPT), "--plan", json.dumps(plan)],
        timeout=JOB_TIMEOUT,
        machine="q35",
        memory_mb=512,
        extra_qemu_args=kernel_vm.vhost_user_blk_args(
            sock, reconnect=1, device_args="packed=on" if packed else ""
        ),
        shared_memory=True,
    )
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(first)
        stack.callback(second.stop)
        vm.start()
        stack.callback(vm.join)  # first (LIFO): the VM ends while a back-end may still serve

        # --- the first back-end: the stall mid-stream, requests in flight
        m = wait_line(first, r"stalled (\d+), after completing (\d+) out of order", vm, BOOT_WAIT)
        in_flight, out_of_order = int(m.group(1)), int(m.group(2))
        first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.proc.wait()  # type: ignore[union-attr]
        killed = time.monotonic()

        # --- the replacement: QEMU reconnects, hands over the inflight area
        second.start()
        r = wait_line(second, r"ring 0: resubmitting (\d+) inflight chains", vm, 60.0)
        resubmitted = int(r.group(1))
        resumed = time.monotonic()
        vm.join(JOB_TIMEOUT + BOOT_WAIT)
        assert not vm.is_alive(), "the VM did not end"
        second_rc = second.stop()
    log.debug("first back-end:\n%s\nreplacement:\n%s", first.output, second.output)
    log.info(
        "stall %.1f s after launch, %d in flight (%d completed out of order); replacement "
        "resubmitted %d, %.1f s after the kill; VM %.1f s in all",
        killed - t0,
        in_flight,
        out_of_order,
        resubmitted,
        resumed - killed,
        time.monotonic() - t0,
    )

    # the first back-end ran its ring tracked, with INFLIGHT_SHMFD negotiated (every start:
    # SeaBIOS's driver starts it once, then Linux's)
    starts = [
        re.fullmatch(
            r"ring 0 started: (\d+) descriptors \((\w+)\), protocol features (0x[0-9a-f]+), "
            r"inflight (\w+)",
            line,
        )
        for line in first.lines
        if line.startswith("ring ")
    ]
    assert starts and all(starts), first.output
    for fm in starts:
        assert fm is not None
        assert int(fm.group(1)) == QUEUE_SIZE, fm.group(0)
        assert int(fm.group(3), 16) & ProtocolFeature.INFLIGHT_SHMFD, fm.group(0)
        assert fm.group(4) == "tracked", fm.group(0)
    # the last start is Linux's (SeaBIOS's driver, before it, knows split rings only)
    assert starts[-1] is not None and starts[-1].group(2) == ("packed" if packed else "split")
    # it stalled with requests in flight, after completing newer ones
    assert in_flight >= 2 and out_of_order >= 1, m.group(0)
    # the replacement resubmitted exactly those (its ring fit the area), and nothing failed
    assert resubmitted == in_flight, (resubmitted, in_flight)
    trouble = [
        line
        for line in second.lines
        if any(w in line for w in ("inflight area", "broken", "Traceback", "failed"))
    ]
    assert not trouble, second.output
    assert second_rc == 0, second.output

    # the guest: no I/O error, every range read back as written
    assert vm.error is None, vm.error
    result = vm.result
    assert result is not None
    context = f"guest exit {result.returncode} on {result.machine}; output:\n{result.output}"
    assert result.machine == "q35", context
    assert result.returncode == 0, context
    steps = guest_steps(result.output)
    got = sorted(steps["parallel"], key=lambda p: p["offset"])
    assert [(p["offset"], p["sha256"], p["readback_sha256"]) for p in got] == [
        (o, sha(seeded(s, n)), sha(seeded(s, n))) for o, n, s, _ in WRITERS
    ], context

    # the image, byte for byte
    for o, n, s, _ in WRITERS:
        expected[o : o + n] = seeded(s, n)
    content = image.read_bytes()
    if content != expected:
        bad = [
            i for i in range(0, IMAGE_SIZE, 4096) if content[i : i + 4096] != expected[i : i + 4096]
        ]
        pytest.fail(f"image differs from the expected content in {len(bad)} pages: {bad[:8]}")
