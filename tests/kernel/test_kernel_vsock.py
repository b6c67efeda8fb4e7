"""Kernel vhost-vsock on a real kernel: a host connect lands in the guest's RX ring."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any

import pytest

from vhostkit.errors import InvalidOperation
from vhostkit.kernel import VhostVsock, VhostVsockQueue

pytestmark = pytest.mark.kernel

VIRTIO_F_VERSION_1 = 32
VRING_DESC_F_WRITE = 2
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_TYPE_STREAM = 1
VMADDR_CID_HOST = 2
HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes


def test_vsock_connect_puts_op_request_in_rx_ring(
    guest_memory: Any, make_ring: Any, make_eventfds: Any
) -> None:
    guest_cid, port = 3, 1234
    with VhostVsock() as dev:
        dev.set_owner()
        dev.set_features(dev.get_features() & (1 << VIRTIO_F_VERSION_1))
        dev.set_mem_table([guest_memory.region])
        fds = make_eventfds(4)
        rings = {}
        for n, index in enumerate((VhostVsockQueue.RX, VhostVsockQueue.TX)):
            ring = make_ring(int(index), 8)
            rings[index] = ring
            dev.set_vring_num(ring.index, ring.num)
            dev.set_vring_base(ring.index, 0)
            dev.set_vring_addr(ring.vring_addr())
            dev.set_vring_kick(ring.index, fds[2 * n])
            dev.set_vring_call(ring.index, fds[2 * n + 1])
        rx = rings[VhostVsockQueue.RX]
        rx_call = fds[1]
        for i in range(4):  # four writable 4 KiB buffers for the device
            rx.set_desc(i, 0x80000 + i * 0x1000, 0x1000, VRING_DESC_F_WRITE)
            rx.publish(i)
        dev.set_guest_cid(guest_cid)
        dev.start()
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                err = sock.connect_ex((guest_cid, port))
                assert err in (0, errno.EINPROGRESS, errno.EAGAIN), os.strerror(err)
                ready, _, _ = select.select([rx_call], [], [], 5.0)
                assert ready, "RX call eventfd did not fire"
                assert rx.used_idx() >= 1
                ident, length = rx.used_elem(0)
                assert length >= HDR.size
                (src_cid, dst_cid, src_port, dst_port, plen, type_, op, _flags, buf_alloc, _fwd) = (
                    HDR.unpack(guest_memory.read(0x80000 + ident * 0x1000, HDR.size))
                )
            finally:
                sock.close()
        finally:
            dev.stop()
    assert op == VIRTIO_VSOCK_OP_REQUEST
    assert type_ == VIRTIO_VSOCK_TYPE_STREAM
    assert (src_cid, dst_cid, dst_port) == (VMADDR_CID_HOST, guest_cid, port)
    assert src_port != 0 and plen == 0 and buf_alloc > 0


def test_start_without_owner_fails() -> None:
    with VhostVsock() as dev, pytest.raises(InvalidOperation):
        dev.start()
