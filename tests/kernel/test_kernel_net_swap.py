"""Live data-plane swap behind a vhost-user socket, on a real kernel.

``vhostkit backend net --control PATH`` serves a tap; its rings move between kernel vhost-net
and vhostkit's userspace NetDevice (``vhostkit.devices.net_swap.swap``, the ``vhostkit swap``
command) while frames stream both ways. The front-end is vhostkit's Frontend and
VirtioNetDriver in a process of its own (tests/helpers/net_swap_driver.py), so nothing is
shared with the daemon but the socket, the memory and the eventfds it was given; it sees no
message and no reset during a swap. Every frame must arrive exactly once, in order. Then the
daemon is restarted and a new front-end process is served across more swaps; and DPDK
testpmd's virtio_user across two swaps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.net_swap_driver import END, DriverProcess

from vhostkit.devices.net_swap import SwapResult, status, swap
from vhostkit.guest.rings import wait_readable
from vhostkit.testing.peers import PeerProcess, Testpmd, which_or_skip
from vhostkit.testing.swap import GUEST_MAC, PEER_MAC, frame_number, numbered, packet_socket

pytestmark = pytest.mark.kernel

RX, TX = 0, 1


class SwapDaemon(PeerProcess):
    """``vhostkit backend net --control``, ready once it says where it serves."""

    name = "vhostkit-net-swap"

    def _wait_ready(self) -> None:
        self.wait_for_line(r"vhostkit net backend: tap", self.ready_timeout)


@contextlib.contextmanager
def ipv6_off_for_new_links() -> Iterator[None]:
    """The daemon's tap comes up without IPv6 (no MLD reports into the rings)."""
    knob = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6")
    old = knob.read_text()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(old)


def daemon(sock: Path, control: Path, tap: str, plane: str) -> SwapDaemon:
    argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
    argv += ["--tap", tap, "--control", str(control), "--dataplane", plane]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return SwapDaemon(argv, env=env, ready_timeout=30)


def sniff_numbers(sock: socket.socket, count: int, src: bytes, timeout: float = 20.0) -> list[int]:
    """Numbers of the numbered frames from ``src`` read off ``sock``, in arrival order."""
    deadline = time.monotonic() + timeout
    got: list[int] = []
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable((sock.fileno(),), left):
            break
        frame = sock.recv(65536)
        n = frame_number(frame)
        if n is not None and frame[6:12] == src:
            got.append(n)
    return got


def stream_across_swaps(
    driver: DriverProcess,
    sock: socket.socket,
    control: Path,
    planes: list[str],
    *,
    total: int,
    chunk: int,
    first: int = 0,
    daemon_pid: int | None = None,
) -> list[SwapResult]:
    """Numbered frames ``first .. first+total-1`` both ways, a swap to each of ``planes``
    right after a chunk was queued (frames still in the rings and in the tap); asserts every
    frame arrived exactly once, in order."""
    starts = list(range(first, first + total, chunk))
    assert len(starts) > len(planes)
    points = [starts[(k + 1) * len(starts) // (len(planes) + 1)] for k in range(len(planes))]
    swap_after = dict(zip(points, planes, strict=True))
    results: list[SwapResult] = []
    for start in starts:
        end = min(start + chunk, first + total)
        assert driver.call(f"send {start} {end}") == {"sent": end - start}
        for i in range(start, end):
            sock.send(numbered(i, src=PEER_MAC, dst=GUEST_MAC))
        if start in swap_after:
            results.append(swap(control, swap_after[start]))
            if daemon_pid is not None:
                # the kernel plane holds a vhost-net fd; the user plane none (closed on leaving)
                want = 1 if swap_after[start] == "kernel" else 0
                assert vhost_net_fds(daemon_pid) == want
    rx = driver.call(f"recv {total} 20")["numbers"]
    tx = sniff_numbers(sock, total, GUEST_MAC)
    assert tx == list(range(first, first + total))  # driver -> tap: each once, in order
    assert rx == list(range(first, first + total))  # tap -> driver: the same
    return results


def vhost_net_fds(pid: int) -> int:
    """How many fds on /dev/vhost-net process ``pid`` has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/vhost-net"
    return count


def check_swaps(results: list[SwapResult], planes: list[str]) -> None:
    assert [str(r.to_plane) for r in results] == planes
    for before, after in itertools.pairwise(results):
        assert after.from_plane == before.to_plane
    for r in results:
        assert set(r.positions) == {RX, TX}  # both rings were running and moved
        assert r.pause_ms > 0
    # positions only move forward (16-bit avail indices, far from wrapping here)
    for ring in (RX, TX):
        seen = [r.positions[ring] for r in results]
        assert seen == sorted(seen)


@contextlib.contextmanager
def persistent_tap(name: str) -> Iterator[None]:
    """A tap that outlives the daemons attached to it (a restart keeps the packet socket),
    up already: a packet socket bound to a link that is down gets ENETDOWN on its first use
    even after the link came up."""
    from vhostkit.kernel import Tap

    with Tap(name, nonblocking=True) as t:
        t.set_persist(True)
        t.up()
    try:
        yield
    finally:
        with Tap(name, nonblocking=True) as t:
            t.set_persist(False)


def test_driver_process_across_swaps_and_a_backend_restart(sock_dir: Path) -> None:
    sock, control = sock_dir / "net.sock", sock_dir / "net.ctl"
    tap = f"vhksw{os.getpid() % 10000}"
    planes = ["user", "kernel"] * 3  # kernel -> user -> kernel, three times
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with (
        ipv6_off_for_new_links(),
        persistent_tap(tap),
        packet_socket(tap) as ps,
        DriverProcess.deferred() as driver,
    ):
        with daemon(sock, control, tap, "kernel") as d:
            assert d.pid is not None
            driver.start(sock)
            assert driver.ready["header_size"] == 12
            assert status(control)["plane"] == "kernel"
            assert vhost_net_fds(d.pid) == 1
            results = stream_across_swaps(
                driver, ps, control, planes, total=180, chunk=15, daemon_pid=d.pid
            )
            check_swaps(results, planes)
            # the back-end goes down: the driver stops its rings there and keeps them
            assert driver.call("detach")["positions"] == {str(RX): 180, str(TX): 180}
            # `vhostkit swap` with no ring running: only the plane changes (pause printed)
            out = subprocess.run(
                [sys.executable, "-m", "vhostkit", "swap", str(control), "--to", "user"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert "swapped kernel -> user: pause" in out.stdout
        assert d.returncode == 0
        # restarted (on the user plane); a swap before the front-end is back only picks the
        # plane its rings start on; the same driver process comes back at the same positions
        with daemon(sock, control, tap, "user") as d2:
            assert d2.pid is not None
            first = swap(control, "kernel")
            assert (first.from_plane, first.to_plane, first.positions) == ("user", "kernel", {})
            assert driver.call(f"attach {sock}")["positions"] == {str(RX): 180, str(TX): 180}
            assert vhost_net_fds(d2.pid) == 1  # the rings started in the kernel
            planes2 = ["user", "kernel"]
            results = stream_across_swaps(
                driver, ps, control, planes2, total=90, chunk=15, first=180, daemon_pid=d2.pid
            )
            check_swaps(results, planes2)
            assert driver.call("stop")["positions"] == {str(RX): 270, str(TX): 270}
        assert d2.returncode == 0
    assert driver.proc is not None and driver.proc.returncode == 0


TESTPMD_MAC = bytes.fromhex("020000cc0003")


def test_testpmd_virtio_user_across_two_swaps(sock_dir: Path) -> None:
    which_or_skip("dpdk-testpmd")
    sock, control = sock_dir / "pmd.sock", sock_dir / "pmd.ctl"
    tap = f"vhkst{os.getpid() % 10000}"
    with (
        ipv6_off_for_new_links(),
        daemon(sock, control, tap, "kernel") as d,
        packet_socket(tap) as ps,
        Testpmd.virtio_user_frontend(
            str(sock),
            forward_mode="macswap",
            mac=TESTPMD_MAC.hex(":"),
            app_args=("--no-flush-rx",),
            ready_timeout=60,
        ),
    ):
        deadline = time.monotonic() + 30
        while not all(r["started"] for r in status(control)["rings"].values()):
            assert time.monotonic() < deadline, status(control)
            time.sleep(0.05)  # the rings start inside another process: no event to wait on
        got: list[int] = []
        for k, plane in enumerate(["user", "kernel", None]):
            for i in range(30 * k, 30 * (k + 1)):
                ps.send(numbered(i, src=PEER_MAC, dst=TESTPMD_MAC))
            if plane is not None:
                assert set(swap(control, plane).positions) == {RX, TX}
            # macswap: each frame comes back from testpmd's TX ring with the addresses swapped
            got += sniff_numbers(ps, 30, TESTPMD_MAC)
        assert got == list(range(90))
    assert d.returncode == 0


def tap_counter(tap: str, name: str) -> int:
    """One of the tap's interface statistics (``tx_dropped``: frames the tap's queue had no
    room for, dropped before any data plane could read them)."""
    return int(Path(f"/sys/class/net/{tap}/statistics/{name}").read_text())


def test_frames_into_the_guest_while_it_swaps(sock_dir: Path) -> None:
    """Numbered frames go into the tap at a steady few hundred per second while the driver
    receives them (reaping and posting its buffers again all along) and sends a stream of its
    own, as a guest's I/O loop does, and the daemon swaps kernel -> user -> kernel three times:
    every frame, both ways, arrives exactly once, in order."""
    sock, control = sock_dir / "rx.sock", sock_dir / "rx.ctl"
    tap = f"vhksr{os.getpid() % 10000}"
    rate = 400  # into the guest; out of it twice as many
    planes = ["user", "kernel"] * 3
    with (
        ipv6_off_for_new_links(),
        daemon(sock, control, tap, "kernel") as d,
        packet_socket(tap) as ps,
        DriverProcess(sock) as driver,
    ):
        dropped_before = tap_counter(tap, "tx_dropped")
        driver.begin(f"duplex {2 * rate} 120")
        stop = threading.Event()
        sent: list[int] = []

        def send() -> None:
            start = time.monotonic()
            i = 0
            while not stop.is_set():
                ps.send(numbered(i, src=PEER_MAC, dst=GUEST_MAC))
                i += 1
                pause = start + i / rate - time.monotonic()
                if pause > 0:
                    stop.wait(pause)  # the stream's pace
            sent.append(i)

        sender = threading.Thread(target=send, name="rx-stream", daemon=True)
        sender.start()
        results = []
        try:
            for plane in planes:
                stop.wait(0.4)  # the stream's pace: each plane serves a few hundred frames
                results.append(swap(control, plane))
            stop.wait(0.4)
        finally:
            stop.set()
            sender.join(30)
        ps.send(numbered(END, src=PEER_MAC, dst=GUEST_MAC))
        answer = driver.result(150)
        got, total = answer["numbers"], sent[0]
        dropped = tap_counter(tap, "tx_dropped") - dropped_before
        missing = sorted(set(range(total)) - set(got))
        detail = (
            f"{total} sent, {len(got)} received, end frame seen: {answer['end']}; "
            f"{len(missing)} missing {missing[:10]}...{missing[-10:]}; the tap's queue "
            f"overflowed {dropped} times; the driver sent {answer['sent']} and waited "
            f"{answer['longest_send']:.3f} s at most for ring room; swaps "
            f"{[(str(r.to_plane), dict(r.positions)) for r in results]}\n{d.tail(30)}"
        )
        assert got == list(range(total)), detail
        assert answer["end"], detail
        tx = sniff_numbers(ps, answer["sent"], GUEST_MAC)
        assert tx == list(range(answer["sent"])), detail  # and out of the guest, the same
        check_swaps(results, planes)
    assert d.returncode == 0
