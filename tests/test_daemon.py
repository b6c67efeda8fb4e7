"""Ring workers: a vhostkit driver queue feeds a SinkDevice over a real vhost-user socket."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.user.daemon import SinkDevice
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDriverQueue, decode_base, encode_base
from vhostkit.virtio.split import SplitDriverQueue

VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
PACKED = 1 << 34
NUM = 64
BUF = 0x100000  # data buffers live from here


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no notification arrived"
    os.eventfd_read(fd)


@dataclass
class Setup:
    fe: Frontend
    device: SinkDevice
    mem: GuestMemory
    queues: list[SplitDriverQueue | PackedDriverQueue] = field(default_factory=list)
    kicks: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    errs: list[int] = field(default_factory=list)

    def start_ring(self, index: int, base: int | None = None) -> None:
        q = self.queues[index]
        if base is None:
            # a fresh packed ring starts with the wrap counters set (bit 15), as QEMU sends it
            base = encode_base(0, True) if isinstance(q, PackedDriverQueue) else 0
        self.fe.set_vring_num(index, NUM)
        self.fe.set_vring_base(index, base)
        self.fe.set_vring_addr(q.vring_addr())
        self.fe.set_vring_call(index, self.calls[index])
        self.fe.set_vring_err(index, self.errs[index])
        self.fe.set_vring_kick(index, self.kicks[index])
        self.fe.set_vring_enable(index, True)

    def send(self, index: int, count: int, size: int = 64) -> None:
        q = self.queues[index]
        for i in range(count):
            addr = BUF + index * 0x40000 + (i % NUM) * 0x1000
            self.mem.write(addr, bytes([i & 0xFF]) * size)
            q.add([(addr, size)], token=i)
        if q.publish():
            os.eventfd_write(self.kicks[index], 1)


@pytest.fixture(params=["split", "packed"])
def setup(request, fd_check, sock_dir) -> Iterator[Setup]:
    packed = request.param == "packed"
    features = VERSION_1 | EVENT_IDX | (PACKED if packed else 0)
    device = SinkDevice(features=features, num_queues=2)
    listener = BackendListener(str(sock_dir / "sink.sock"), lambda: device).start()
    fe = Frontend.connect(sock_dir / "sink.sock", timeout=5)
    mem = GuestMemory.allocate([(0, 0x200000)])
    s = Setup(fe, device, mem)
    try:
        fe.set_owner()
        fe.negotiate(features, ProtocolFeature.REPLY_ACK)
        fe.set_mem_table(mem.regions)
        cls = PackedDriverQueue if packed else SplitDriverQueue
        for index in (0, 1):
            s.queues.append(cls(mem, NUM, index * 0x8000, features=features, index=index))
            s.kicks.append(eventfd())
            s.calls.append(eventfd())
            s.errs.append(eventfd())
        yield s
    finally:
        fe.close()
        listener.stop()
        device.close()
        mem.close()
        for fd in s.kicks + s.calls + s.errs:
            os.close(fd)
        assert not listener.errors


def reap_all(s: Setup, index: int, count: int) -> list[object]:
    got: list[object] = []
    while len(got) < count:
        got += [token for token, _ in s.queues[index].reap()]
        if len(got) < count:
            wait_readable(s.calls[index])
    return got


def test_sink_consumes_and_signals(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.send(0, 40)
    assert reap_all(s, 0, 40) == list(range(40))  # in order, each exactly once
    assert s.device.chains[0] == 40
    assert s.device.bytes[0] == 40 * 64
    # GET_VRING_BASE stops the worker and returns the position
    base = s.fe.get_vring_base(0)
    if isinstance(s.queues[0], SplitDriverQueue):
        assert base == 40
    else:
        assert decode_base(base)[:2] == (40, 1)  # 40 entries in, not wrapped yet

    assert 0 not in s.device.active


def test_ring_resumes_from_the_base_after_a_stop(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.send(0, 10)
    reap_all(s, 0, 10)
    base = s.fe.get_vring_base(0)
    kick = eventfd()  # a stopped ring needs a new kick fd to start again
    os.close(s.kicks[0])
    s.kicks[0] = kick
    s.start_ring(0, base)
    s.send(0, 30)
    assert reap_all(s, 0, 30) == list(range(30))
    assert s.device.chains[0] == 40


def test_two_rings_in_parallel(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.start_ring(1)
    s.send(0, 50)
    s.send(1, 50)
    assert reap_all(s, 0, 50) == list(range(50))
    assert reap_all(s, 1, 50) == list(range(50))
    assert s.device.chains == [50, 50]


def test_a_broken_ring_signals_its_error_fd_and_spares_the_others(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.start_ring(1)
    # ring 0: a descriptor whose buffer lies far outside guest memory, made available
    desc = s.queues[0].ring_gpas[0]
    outside = 0x7FFF_0000_0000
    if isinstance(s.queues[0], PackedDriverQueue):
        # addr, len, id, flags = AVAIL (the driver's wrap counter is 1 on a fresh ring)
        s.mem.write(desc, struct.pack("<QIHH", outside, 64, 0, 1 << 7))
    else:
        avail = s.queues[0].ring_gpas[1]
        s.mem.write(desc, struct.pack("<QIHH", outside, 64, 0, 0))
        s.mem.write(avail + 4, struct.pack("<H", 0))
        s.mem.write(avail + 2, struct.pack("<H", 1))
    os.eventfd_write(s.kicks[0], 1)
    wait_readable(s.errs[0])
    s.device.wait_for(lambda: s.device.active[0].error is not None)
    # ring 1 keeps working
    s.send(1, 20)
    assert reap_all(s, 1, 20) == list(range(20))


def test_memory_table_change_while_running(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.send(0, 10)
    reap_all(s, 0, 10)
    # the same memory, re-sent (QEMU does this on hotplug): the ring moves to the new mapping
    s.fe.set_mem_table(s.mem.regions)
    s.send(0, 10)
    assert reap_all(s, 0, 10) == list(range(10))
    assert s.device.chains[0] == 20
