"""Kernel vhost-net on a real kernel: ring setup, a tap backend, one TX frame end to end."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.kernel import Tap, VhostNet, VhostNetQueue

pytestmark = pytest.mark.kernel

VIRTIO_F_VERSION_1 = 32
ETHERTYPE = 0x88B5  # IEEE local experimental: the kernel's own frames (IPv6 MLD) never use it
VNET_HDR_LEN = 12  # struct virtio_net_hdr_mrg_rxbuf, what VERSION_1 implies
TX = int(VhostNetQueue.TX)
RX = int(VhostNetQueue.RX)


@pytest.fixture
def tap() -> Iterator[Tap]:
    with Tap("vhkt%d") as t:
        t.set_vnet_hdr_size(VNET_HDR_LEN)
        t.set_offload(0)
        t.up()
        yield t


@pytest.fixture
def net() -> Iterator[VhostNet]:
    with VhostNet() as dev:
        dev.set_owner()
        dev.set_features(dev.get_features() & (1 << VIRTIO_F_VERSION_1))
        yield dev


@contextlib.contextmanager
def packet_socket(ifname: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    try:
        sock.bind((ifname, ETHERTYPE))
        sock.settimeout(5.0)
        yield sock
    finally:
        sock.close()


def wait_readable(fd: int, timeout: float = 5.0) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def setup_ring(dev: VhostNet, ring: Any, kick: int, call: int, base: int = 0) -> None:
    dev.set_vring_num(ring.index, ring.num)
    dev.set_vring_base(ring.index, base)
    dev.set_vring_addr(ring.vring_addr())
    dev.set_vring_kick(ring.index, kick)
    dev.set_vring_call(ring.index, call)


def test_ring_setup_and_get_vring_base(
    net: VhostNet, guest_memory: Any, make_ring: Any, make_eventfds: Any, tap: Tap
) -> None:
    net.set_mem_table([guest_memory.region])
    kick, call = make_eventfds(2)
    for index, base in ((RX, 5), (TX, 7)):
        ring = make_ring(index, 256)
        ring.avail_idx = base
        setup_ring(net, ring, kick, call, base=base)
    net.set_backend(TX, tap.fd)
    net.set_backend(RX, tap.fd)
    assert net.get_vring_base(RX) == 5
    net.set_backend(RX, None)
    net.set_backend(TX, None)
    assert net.get_vring_base(TX) == 7
    # detach with no backend attached is fine; unbinding kick/call too
    net.set_vring_kick(TX, None)
    net.set_vring_call(TX, None)


def test_set_mem_table_replaces(net: VhostNet, guest_memory: Any) -> None:
    net.set_mem_table([guest_memory.region])
    net.set_mem_table([guest_memory.region])
    net.set_mem_table([])


def test_set_backend_rejects_non_tap_fd(
    net: VhostNet, guest_memory: Any, make_ring: Any, make_eventfds: Any
) -> None:
    net.set_mem_table([guest_memory.region])
    kick, call = make_eventfds(2)
    setup_ring(net, make_ring(TX), kick, call)
    with pytest.raises(InvalidParam, match="not a tap"):
        net.set_backend(TX, kick)  # an eventfd is no socket


def test_set_backend_before_ring_setup(net: VhostNet, tap: Tap) -> None:
    with pytest.raises((InvalidOperation, InvalidParam)):
        net.set_backend(TX, tap.fd)


def test_tx_frame_comes_out_of_the_tap(
    net: VhostNet, guest_memory: Any, make_ring: Any, make_eventfds: Any, tap: Tap
) -> None:
    net.set_mem_table([guest_memory.region])
    kick, call = make_eventfds(2)
    ring = make_ring(TX, 8)
    setup_ring(net, ring, kick, call)
    net.set_backend(TX, tap.fd)

    payload = b"vhostkit tx smoke " + os.urandom(8).hex().encode()
    frame = (
        b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETHERTYPE) + payload
    ).ljust(60, b"\x00")
    buf_gpa = 0x80000
    guest_memory.write(buf_gpa, bytes(VNET_HDR_LEN) + frame)  # all-zero virtio-net header
    ring.set_desc(0, buf_gpa, VNET_HDR_LEN + len(frame))

    with packet_socket(tap.name) as sock:
        ring.publish(0)
        os.eventfd_write(kick, 1)
        assert wait_readable(call), "call eventfd did not fire"
        assert os.eventfd_read(call) >= 1
        assert ring.used_idx() == 1
        assert ring.used_elem(0)[0] == 0
        got = sock.recv(2048)
    assert got[: len(frame)] == frame
    assert payload in got
    assert net.get_vring_base(TX) == 1
    net.set_backend(TX, None)
