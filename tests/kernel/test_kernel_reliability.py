"""The kernel plane when things go away: the VMM dies or closes while /dev/vhost-net rings run,
the tap is deleted under a running vhost-net, a second vhost-net takes the same tap.

Each ends in a typed error or a clean state, never a hang: after a VMM process (forked from
the test, it owns the vhost-net fd and streams TX frames) is SIGKILLed at a random moment, the
kernel releases the tap and a new VhostNet on the same tap sends a frame out of it; a
VhostNet closed while its worker is busy refuses further calls with
:class:`~vhostkit.errors.InvalidOperation`; once the tap is deleted the kernel stops taking TX
frames (no error comes by itself), but the tap fd reports POLLERR at once, so a VMM polling it
wakes up and :meth:`VhostNet.check_backends` raises :class:`~vhostkit.errors.TapGone`; the
ring stops, and re-attaching the dead tap or configuring it raises a typed error. A second
VhostNet on a tap queue a running one has attached is refused with
:class:`~vhostkit.errors.TapInUse` (the kernel would accept it).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vhostkit.errors import (
    InvalidOperation,
    InvalidParam,
    RequestFailed,
    TapGone,
    TapInUse,
    VhostError,
)
from vhostkit.kernel import Tap, VhostNet, VhostNetQueue

pytestmark = [pytest.mark.kernel, pytest.mark.reliability]

LONG = os.environ.get("VHOSTKIT_LONG") == "1"
#: VMM processes killed while their rings run (the VM runs under TCG: keep it short)
VMM_KILLS = 1000 if LONG else 100
VIRTIO_F_VERSION_1 = 32
ETHERTYPE = 0x88B5
VNET_HDR_LEN = 12
TX = int(VhostNetQueue.TX)
RX = int(VhostNetQueue.RX)
NUM = 8
FRAMES = 0x80000  # guest address of the TX frames, one 2 KiB slot per descriptor
RX_BUFS = 0xA0000


@pytest.fixture
def tap() -> Iterator[Tap]:
    with Tap("vhkr%d") as t:
        t.set_vnet_hdr_size(VNET_HDR_LEN)
        t.set_offload(0)
        t.up()
        yield t


def fresh_rings(mem: Any, make_ring: Any, first: int = 0) -> tuple[Any, Any]:
    """TX and RX rings in zeroed slots ``first`` and ``first + 1`` (a ring slot left by an
    earlier device still holds its indices)."""
    rings = []
    for index, slot in ((TX, first), (RX, first + 1)):
        ring = make_ring(slot, NUM)
        ring.index = index
        mem.write(0x4000 * slot, bytes(0x4000))
        rings.append(ring)
    return rings[0], rings[1]


def open_net() -> VhostNet:
    dev = VhostNet()
    try:
        dev.set_owner()
        dev.set_features(dev.get_features() & (1 << VIRTIO_F_VERSION_1))
    except BaseException:
        dev.close()
        raise
    return dev


def frame(tag: bytes) -> bytes:
    return (b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETHERTYPE) + tag).ljust(
        60, b"\x00"
    )


def setup_ring(dev: VhostNet, ring: Any, kick: int, call: int) -> None:
    dev.set_vring_num(ring.index, ring.num)
    dev.set_vring_base(ring.index, ring.avail_idx)
    dev.set_vring_addr(ring.vring_addr())
    dev.set_vring_kick(ring.index, kick)
    dev.set_vring_call(ring.index, call)


def start_net(mem: Any, tx: Any, rx: Any, kick: int, call: int, tap_fd: int | Tap) -> VhostNet:
    """A vhost-net with TX (frames in every descriptor) and RX (2 KiB buffers) on ``tap_fd``."""
    dev = open_net()
    try:
        dev.set_mem_table([mem.region])
        for i in range(NUM):
            mem.write(FRAMES + i * 2048, bytes(VNET_HDR_LEN) + frame(b"vmm %d" % i))
            tx.set_desc(i, FRAMES + i * 2048, VNET_HDR_LEN + 60)
            rx.set_desc(i, RX_BUFS + i * 2048, 2048, flags=2)  # VRING_DESC_F_WRITE
        setup_ring(dev, tx, kick, call)
        setup_ring(dev, rx, kick, call)
        dev.set_backend(TX, tap_fd)
        dev.set_backend(RX, tap_fd)
    except BaseException:
        dev.close()
        raise
    return dev


def keep_sending(tx: Any, kick: int, rounds: int | None = None, timeout: float = 20.0) -> None:
    """Keep the TX ring full, kicking, for ``rounds`` frames (``None``: until killed).

    The kernel's worker gives no event this thread could wait on except the call eventfd,
    which the test shares; a ring the kernel stops consuming fails after ``timeout``.
    """
    sent = 0
    deadline = time.monotonic() + timeout
    while rounds is None or sent < rounds:
        if (tx.avail_idx - tx.used_idx()) & 0xFFFF < tx.num:
            tx.publish(tx.avail_idx % tx.num)
            os.eventfd_write(kick, 1)
            sent += 1
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise TimeoutError(f"TX ring stuck after {sent} frames (used {tx.used_idx()})")


@contextlib.contextmanager
def packet_socket(ifname: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    try:
        sock.bind((ifname, ETHERTYPE))
        sock.settimeout(5.0)
        yield sock
    finally:
        sock.close()


def assert_tap_works(tap: Tap, guest_memory: Any, make_ring: Any, make_eventfds: Any) -> None:
    """A fresh VhostNet on ``tap`` sends one frame out of it (the tap is free and alive)."""
    tx, rx = fresh_rings(guest_memory, make_ring)
    kick, call = make_eventfds(2)
    with (
        packet_socket(tap.name) as sock,
        contextlib.closing(start_net(guest_memory, tx, rx, kick, call, tap.fd)) as dev,
    ):
        tx.publish(0)
        os.eventfd_write(kick, 1)
        got = sock.recv(2048)
        assert got[:60] == frame(b"vmm 0")
        dev.set_backend(TX, None)
        dev.set_backend(RX, None)


def test_vmm_killed_while_rings_run_releases_the_tap(
    tap, guest_memory, make_ring, make_eventfds
) -> None:
    rng = random.Random()
    for _ in range(VMM_KILLS):
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the VMM: owns the vhost-net fd, streams until killed
            code = 1
            try:
                os.close(r)
                kick, call = os.eventfd(0), os.eventfd(0)
                tx, rx = fresh_rings(guest_memory, make_ring)
                start_net(guest_memory, tx, rx, kick, call, tap.fd)
                os.write(w, b"r")
                keep_sending(tx, kick)
            finally:
                os._exit(code)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 20)
            assert ready and os.read(r, 1) == b"r", "the VMM process did not start its rings"
        finally:
            os.close(r)
        time.sleep(rng.uniform(0, 0.02))  # a random moment, not a synchronisation
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
    assert_tap_works(tap, guest_memory, make_ring, make_eventfds)


def test_vmm_closes_while_rings_run(tap, guest_memory, make_ring, make_eventfds) -> None:
    tx, rx = fresh_rings(guest_memory, make_ring)
    kick, call = make_eventfds(2)
    dev = start_net(guest_memory, tx, rx, kick, call, tap)
    try:
        keep_sending(tx, kick, 50)
        while (tx.avail_idx - tx.used_idx()) & 0xFFFF < tx.num:  # a full ring in flight
            tx.publish(tx.avail_idx % tx.num)
        os.eventfd_write(kick, 1)
        dev.close()
        assert tap.user(0) is None  # the closed device let the tap go
        os.eventfd_write(kick, 1)  # the guest kicks a device that is gone: nobody listens
        with pytest.raises(InvalidOperation):
            dev.get_vring_base(TX)
        with pytest.raises(InvalidOperation):
            dev.set_backend(TX, tap.fd)
    finally:
        dev.close()
    assert_tap_works(tap, guest_memory, make_ring, make_eventfds)


def test_tap_deleted_under_running_vhost_net(tap, guest_memory, make_ring, make_eventfds) -> None:
    from pyroute2 import IPRoute

    tx, rx = fresh_rings(guest_memory, make_ring)
    kick, call = make_eventfds(2)
    with contextlib.closing(start_net(guest_memory, tx, rx, kick, call, tap)) as dev:
        keep_sending(tx, kick, 20)
        dev.check_backends()  # alive: nothing to report
        poller = select.poll()
        poller.register(tap.fd, 0)  # what a VMM's loop has: errors are always reported
        assert poller.poll(0) == []
        with IPRoute() as ip:
            ip.link("del", index=tap.ifindex)
        # the guest keeps sending: the kernel takes what it takes, without a tap to put it in,
        # and says nothing; the VMM's poll wakes up on the tap fd (no timeout involved)
        while (tx.avail_idx - tx.used_idx()) & 0xFFFF < tx.num:
            tx.publish(tx.avail_idx % tx.num)
        os.eventfd_write(kick, 1)
        events = poller.poll(10_000)
        assert events and events[0][1] & select.POLLERR, events
        with pytest.raises(TapGone):
            dev.check_backends()
        with pytest.raises(TapGone):
            tap.check_alive()
        base = dev.get_vring_base(TX)  # stops the ring, does not hang
        assert (base - tx.used_idx()) & 0xFFFF <= (tx.avail_idx - tx.used_idx()) & 0xFFFF
        dev.get_vring_base(RX)
        dev.set_backend(TX, None)
        dev.set_backend(RX, None)
        # the dead tap cannot be attached again, nor configured: typed errors
        with pytest.raises(InvalidParam):  # the kernel's poll on the detached tap: EPOLLERR
            dev.set_backend(TX, tap.fd)
        with pytest.raises(VhostError):  # netlink: no such device
            tap.up()
        with pytest.raises(RequestFailed, match="bad state"):  # EBADFD
            tap.get_iff()


def test_second_vhost_net_on_the_same_tap(tap, guest_memory, make_ring, make_eventfds) -> None:
    tx, rx = fresh_rings(guest_memory, make_ring)
    kick, call = make_eventfds(2)
    with contextlib.closing(start_net(guest_memory, tx, rx, kick, call, tap)) as first:
        second = open_net()
        try:
            second.set_mem_table([guest_memory.region])
            tx2, rx2 = fresh_rings(guest_memory, make_ring, 2)
            setup_ring(second, rx2, kick, call)
            setup_ring(second, tx2, kick, call)
            for i in range(NUM):
                tx2.set_desc(i, FRAMES + i * 2048, VNET_HDR_LEN + 60)
            # the kernel would let a second vhost-net take the same tap queue: vhostkit does not
            with pytest.raises(TapInUse):
                second.set_backend(RX, tap)
            with pytest.raises(TapInUse):
                second.set_backend(TX, tap)
            assert tap.user(0) is first
            keep_sending(tx, kick, 3 * NUM)  # the first goes on, untouched
            # once the first lets the tap go, the second may have it
            first.set_backend(TX, None)
            first.set_backend(RX, None)
            assert tap.user(0) is None
            second.set_backend(RX, tap)
            second.set_backend(TX, tap)
            with packet_socket(tap.name) as sock:
                keep_sending(tx2, kick, 3 * NUM)
                assert sock.recv(2048)[:60] in {frame(b"vmm %d" % i) for i in range(NUM)}
            with pytest.raises(TapInUse):  # and now the first is refused
                first.set_backend(TX, tap)
            assert second.get_vring_base(TX) == tx2.avail_idx
        finally:
            second.close()
        assert tap.user(0) is None  # closing a device releases its taps
