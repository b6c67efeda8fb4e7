"""Restart: a back-end process is killed mid-stream; a new process takes over from the inflight
area and the stream completes with nothing lost.

The first back-end (tests/helpers/stall_blk_backend.py) serves a stream of numbered block
writes, completes some, takes the rest and hangs with them in flight; it is killed with
SIGKILL. A fresh ``python3 -m vhostkit.devices.blk`` on the same image gets the inflight area
back with SET_INFLIGHT_FD and resubmits exactly the requests that were in flight. Every
request completes OK once, and every block on the image holds what was written to it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import sys
from pathlib import Path

import pytest

from vhostkit.devices.blk import BlkRequestType, BlkStatus
from vhostkit.testing.peers import PeerProcess
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "stall_blk_backend.py"
NUM = 128  # three descriptors per request
STREAM = 40
STALL_AFTER = 12
SECTOR = 512
DATA = 0x100000
FEATURES = int(VirtioFeature.VERSION_1)
PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD


class Backend(PeerProcess):
    name = "blk-backend"

    def __init__(self, argv: list[str], ready: str) -> None:
        super().__init__(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready = ready

    def _wait_ready(self) -> None:
        self.wait_for_line(self.ready, timeout=self.ready_timeout)


def block(i: int) -> bytes:
    return struct.pack("<I", i) * (SECTOR // 4)


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no interrupt from the back-end"
    os.eventfd_read(fd)


def set_up(
    fe: Frontend, mem: GuestMemory, q: SplitDriverQueue, base: int, kick: int, call: int
) -> None:
    fe.set_mem_table(mem.regions)
    fe.set_vring_num(0, NUM)
    fe.set_vring_base(0, base)
    fe.set_vring_addr(q.vring_addr())
    fe.set_vring_call(0, call)
    fe.set_vring_kick(0, kick)
    fe.set_vring_enable(0, True)


def test_killed_backend_is_replaced_and_nothing_is_lost(fd_check, sock_dir, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(STREAM * SECTOR))
    mem = GuestMemory.allocate([(0, 0x400000)])
    q = SplitDriverQueue(mem, NUM, 0, features=FEATURES)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    region = None
    try:
        # --- the first back-end: it will hang with requests in flight
        first_sock = sock_dir / "first.sock"
        first = Backend(
            [
                sys.executable,
                str(HELPER),
                "--socket",
                str(first_sock),
                "--image",
                str(image),
                "--stall-after",
                str(STALL_AFTER),
            ],
            ready="listening",
        )
        with first:
            fe = Frontend.connect(first_sock, timeout=10)
            with fe:
                fe.set_owner()
                fe.negotiate(FEATURES, PROTOCOL)
                region = fe.get_inflight_fd(1, NUM)
                set_up(fe, mem, q, 0, kick, call)
                # the stream: STREAM numbered writes, one block each
                for i in range(STREAM):
                    base = DATA + i * 0x1000
                    mem.write(base, struct.pack("<IIQ", BlkRequestType.OUT, 0, i))
                    mem.write(base + 16, block(i))
                    mem.write(base + 16 + SECTOR, b"\xff")
                    q.add([(base, 16), (base + 16, SECTOR)], [(base + 16 + SECTOR, 1)], token=i)
                q.publish()
                os.eventfd_write(kick, 1)
                stalled = int(first.wait_for_line(re.compile(r"stalled (\d+)"), 20).group(1))
                assert stalled == STREAM - STALL_AFTER
                first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                first.proc.wait()  # type: ignore[union-attr]
        done = [t for t, _ in q.reap()]
        assert sorted(done) == list(range(STALL_AFTER))
        used_idx = q.last_used_idx

        # --- the replacement: the ordinary daemon, same image, inflight area handed over
        second_sock = sock_dir / "second.sock"
        second = Backend(
            [
                sys.executable,
                "-m",
                "vhostkit.devices.blk",
                "--socket",
                str(second_sock),
                "--image",
                str(image),
            ],
            ready="listening on",
        )
        with second:
            with Frontend.connect(second_sock, timeout=10) as fe:
                fe.set_owner()
                fe.negotiate(FEATURES, PROTOCOL)
                fe.set_inflight_fd(region)
                kick2 = os.eventfd(0, os.EFD_CLOEXEC)
                try:
                    set_up(fe, mem, q, used_idx, kick2, call)  # base: the used index we saw
                    while len(done) < STREAM:
                        done += [t for t, _ in q.reap()]
                        if len(done) < STREAM:
                            wait_readable(call)
                finally:
                    os.close(kick2)
            second.wait_for_line(f"resubmitting {STREAM - STALL_AFTER} inflight chains", 10)
        assert sorted(done) == list(range(STREAM))  # every request completed exactly once
        statuses = [mem.read(DATA + i * 0x1000 + 16 + SECTOR, 1)[0] for i in range(STREAM)]
        assert statuses == [BlkStatus.OK] * STREAM
        data = image.read_bytes()
        for i in range(STREAM):
            assert data[i * SECTOR : (i + 1) * SECTOR] == block(i), f"block {i}"
    finally:
        mem.close()
        os.close(kick)
        os.close(call)
        if region is not None:
            os.close(region.fd)


@pytest.fixture(autouse=True)
def _needs_helper() -> None:
    assert HELPER.exists()
