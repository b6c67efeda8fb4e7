"""A minimal virtio-blk guest driver over a vhost-user :class:`Frontend` (split rings).

Used by the blk back-end tests and by the qemu-storage-daemon peer test, so that both drive
a back-end the same way.
"""

from __future__ import annotations

import os
import select
from collections.abc import Sequence
from dataclasses import dataclass

from vhostkit.user import Frontend
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.blk import (
    BLK_CONFIG_SIZE,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
    request_header,
)
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

P = ProtocolFeature
T = BlkRequestType
S = BlkStatus
BF = BlkFeature
VF = VirtioFeature

IMAGE_SIZE = 4 << 20
QUEUE_SIZE = 64
MEM_SIZE = 16 << 20
QUEUE_AREA = 0x8000  # each ring's footprint, from gpa 0
DATA_BASE = 0x100000  # each queue's request buffers: 2 MiB from here
DATA_AREA = 0x200000

#: What a test driver asks for (each side acks what the other offers).
DRIVER_FEATURES = int(
    VF.VERSION_1
    | VF.RING_EVENT_IDX
    | BF.SEG_MAX
    | BF.BLK_SIZE
    | BF.FLUSH
    | BF.MQ
    | BF.RO
    | BF.DISCARD
    | BF.WRITE_ZEROES
)
DRIVER_PROTOCOL = P.MQ | P.REPLY_ACK | P.CONFIG | P.BACKEND_REQ


@dataclass(frozen=True, slots=True)
class Reply:
    """One answered request: the status byte, the data the device wrote, the used length."""

    status: int
    data: bytes
    used_len: int


def wait_readable(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


class BlkDriver:
    """A minimal virtio-blk driver over a vhost-user :class:`Frontend` (split rings).

    Owns its guest memory and eventfds (``close``); borrows the front-end. ``start`` does
    the whole set-up a VMM does; ``request`` submits one request and waits for it.
    """

    def __init__(
        self,
        fe: Frontend,
        *,
        features: int = DRIVER_FEATURES,
        protocol: int = DRIVER_PROTOCOL,
        num_queues: int = 1,
        inflight: tuple[int, int] | None = None,
    ) -> None:
        self.fe = fe
        self.wanted_features = features
        self.wanted_protocol = protocol
        self.num_queues = num_queues
        #: (num_queues, queue_size) of an inflight area to ask for and hand back (as QEMU's
        #: vhost-user-blk does before it sets up the rings); needs INFLIGHT_SHMFD
        self.inflight = inflight
        self.mem = GuestMemory.allocate([(0, MEM_SIZE)])
        self.queues: list[SplitDriverQueue] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        self.features = 0
        self.protocol = P(0)
        self._token = 0
        try:
            for _ in range(num_queues):
                for fds in (self.kicks, self.calls, self.errs):
                    fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        fe = self.fe
        fe.set_owner()
        self.features, self.protocol = fe.negotiate(self.wanted_features, self.wanted_protocol)
        if self.inflight is not None:
            region = fe.get_inflight_fd(*self.inflight)
            try:
                fe.set_inflight_fd(region)
            finally:
                os.close(region.fd)  # the back-end keeps its own
        fe.set_mem_table(self.mem.regions)
        for index in range(self.num_queues):
            q = SplitDriverQueue(
                self.mem, QUEUE_SIZE, index * QUEUE_AREA, features=self.features, index=index
            )
            self.queues.append(q)
            fe.set_vring_num(index, QUEUE_SIZE)
            fe.set_vring_base(index, 0)
            fe.set_vring_addr(q.vring_addr())
            fe.set_vring_call(index, self.calls[index])
            fe.set_vring_err(index, self.errs[index])
            fe.set_vring_kick(index, self.kicks[index])
            if self.features & VF.PROTOCOL_FEATURES:
                fe.set_vring_enable(index, True)

    def config(self, size: int = BLK_CONFIG_SIZE) -> BlkConfig:
        return BlkConfig.unpack(self.fe.get_config(0, size))

    # -- requests --

    def submit(
        self,
        out: Sequence[bytes],
        in_sizes: Sequence[int],
        queue: int = 0,
    ) -> tuple[int, list[tuple[int, int]]]:
        """Post one chain: readable buffers with ``out`` contents, then writable buffers of
        ``in_sizes`` bytes (filled with 0xEE first). Returns ``(token, writable buffers)``."""
        addr = DATA_BASE + queue * DATA_AREA
        outs: list[tuple[int, int]] = []
        for data in out:
            self.mem.write(addr, data)
            outs.append((addr, len(data)))
            addr += (len(data) + 63) // 64 * 64
        ins: list[tuple[int, int]] = []
        for size in in_sizes:
            self.mem.write(addr, b"\xee" * size)
            ins.append((addr, size))
            addr += (size + 63) // 64 * 64
        assert addr <= DATA_BASE + (queue + 1) * DATA_AREA
        self._token += 1
        q = self.queues[queue]
        q.add(outs, ins, token=self._token)
        if q.publish():
            os.eventfd_write(self.kicks[queue], 1)
        return self._token, ins

    def wait(self, token: int, queue: int = 0, timeout: float = 10.0) -> int:
        """Wait for chain ``token`` to be used; return its used length."""
        q = self.queues[queue]
        while True:
            for got, length in q.reap():
                assert got == token, f"completed {got}, expected {token}"
                return length
            if not wait_readable(self.calls[queue], timeout):
                raise TimeoutError(f"request {token} on queue {queue} not completed")

    def raw(self, out: Sequence[bytes], in_sizes: Sequence[int], queue: int = 0) -> Reply:
        """Submit a chain as given and wait; the status is the last writable byte."""
        token, ins = self.submit(out, in_sizes, queue)
        used = self.wait(token, queue)
        written = b"".join(self.mem.read(a, n) for a, n in ins)
        return Reply(written[-1] if written else -1, written[:-1], used)

    def request(
        self,
        rtype: int,
        sector: int = 0,
        data: bytes = b"",
        in_len: int = 0,
        *,
        queue: int = 0,
        split: int = 1,
    ) -> Reply:
        """One well-formed request: header, ``data`` (out) in ``split`` buffers, ``in_len``
        bytes to be written by the device in ``split`` buffers, the status byte."""
        out = [request_header(rtype, sector), *_pieces(data, split)]
        ins = [len(p) for p in _pieces(b"\0" * in_len, split)]
        return self.raw(out, [*ins, 1], queue)

    def read(self, sector: int, nbytes: int, **kw: int) -> Reply:
        return self.request(T.IN, sector, in_len=nbytes, **kw)

    def write(self, sector: int, data: bytes, **kw: int) -> Reply:
        return self.request(T.OUT, sector, data, **kw)

    def close(self) -> None:
        for fd in self.kicks + self.calls + self.errs:
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []
        self.mem.close()


def _pieces(data: bytes, n: int) -> list[bytes]:
    if not data:
        return []
    step = -(-len(data) // n)
    return [data[i : i + step] for i in range(0, len(data), step)]


def pattern(nbytes: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(nbytes))
