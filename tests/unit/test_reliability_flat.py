"""Flat resources: many connections, and many memory-table changes on one live connection,
leave the daemon's open fds, memfd mappings, threads and RSS where they started.

The daemon is the real ``python3 -m vhostkit blk-backend`` (started with ``--ready-fd``); the
test reads its ``/proc/PID/fd``, ``/proc/PID/maps`` and ``/proc/PID/status``
(:mod:`helpers.proc_usage`).

* :data:`CONNECTS` connect / request / disconnect cycles (10,000; the cheap kind, a socket and
  a GET_FEATURES, so that 10,000 fit the default run; test_reliability_leaks.py runs fewer
  full sessions with rings and hostile ones);
* :data:`MEM_TABLES` SET_MEM_TABLE changes (1,000) on one connection whose ring keeps running:
  each table keeps the region with the ring and replaces a second region by a fresh memfd; a
  block read every 50 changes proves the ring followed.

``VHOSTKIT_LONG=1`` multiplies both by 5.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from helpers.proc_usage import Held
from helpers.vhostkit_daemon import (
    assert_clean_output,
    daemon_held,
    daemon_settled,
    good_connection,
    start_blk_daemon,
)

from vhostkit.guest.blk import BlkDriver
from vhostkit.user import Frontend
from vhostkit.user.message import FrontendReq
from vhostkit.virtio.memory import GuestMemory

pytestmark = pytest.mark.reliability

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
CONNECTS = 50_000 if LONG else 10_000
MEM_TABLES = 5_000 if LONG else 1_000
#: RSS growth allowed from the warm-up to the end (a leak of one mapping's page tables, a
#: frame or a socket buffer per cycle would be megabytes; the allocator's own noise is not)
RSS_SLACK_KB = 1024
#: where the changing second region lives (above the driver's 16 MiB at guest address 0)
SECOND_GPA = 0x4000_0000
SECOND_SIZE = 0x10000

GET_FEATURES = struct.pack("<III", FrontendReq.GET_FEATURES, 0x1, 0)


def assert_flat(daemon, baseline: Held, rss_warm: int, what: str) -> None:  # type: ignore[no-untyped-def]
    held = daemon_settled(daemon, baseline)
    assert held.within(baseline), f"after {what}: the daemon holds {held}, before {baseline}"
    assert held.rss_kb - rss_warm < RSS_SLACK_KB, f"after {what}: RSS {rss_warm} -> {held}"


def test_connect_disconnect_cycles_leave_the_daemon_flat(sock_dir, tmp_path) -> None:
    sock = sock_dir / "blk.sock"
    with start_blk_daemon(sock, tmp_path / "disk.img") as daemon:
        good_connection(sock)
        baseline = daemon_held(daemon)
        rss_warm = 0
        path = os.fspath(sock)
        for i in range(CONNECTS):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(GET_FEATURES)
                reply = s.recv(64)
                assert len(reply) == 20, reply  # header and the u64
            if i == 500:
                rss_warm = daemon_settled(daemon, baseline).rss_kb
        assert_flat(daemon, baseline, rss_warm, f"{CONNECTS} connections")
        good_connection(sock)
        rc, output = daemon.stop()
    assert rc == 0
    assert_clean_output(output)


def test_memory_table_changes_on_a_live_connection_leave_the_daemon_flat(
    fd_check, sock_dir, tmp_path
) -> None:
    sock = sock_dir / "blk.sock"
    with start_blk_daemon(sock, tmp_path / "disk.img") as daemon:
        with Frontend.connect(sock, timeout=5) as fe:
            drv = BlkDriver(fe)
            try:
                drv.start()
                (ring_region,) = drv.mem.regions
                data = b"\x5a" * 512
                assert drv.write(3, data).status == 0

                def change() -> None:
                    with GuestMemory.allocate([(SECOND_GPA, SECOND_SIZE)]) as second:
                        fe.set_mem_table([ring_region, *second.regions])

                change()
                baseline = daemon_held(daemon)
                rss_warm = 0
                for i in range(MEM_TABLES):
                    change()
                    if i % 50 == 0:
                        assert drv.read(3, 512).data == data
                    if i == 100:
                        rss_warm = daemon_settled(daemon, baseline).rss_kb
                assert drv.read(3, 512).data == data
                assert_flat(daemon, baseline, rss_warm, f"{MEM_TABLES} memory tables")
                fe.get_vring_base(0)
            finally:
                drv.close()
        good_connection(sock)
        rc, output = daemon.stop()
    assert rc == 0
    assert_clean_output(output)
