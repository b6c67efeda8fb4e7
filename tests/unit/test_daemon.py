"""Ring workers: a vhostkit driver queue feeds a SinkDevice over a real vhost-user socket."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from vhostkit.errors import InvalidParam, RequestFailed
from vhostkit.user import BackendListener, Frontend, ProtocolFeature
from vhostkit.user.backend.device import BackendDevice
from vhostkit.user.backend.ring_device import RingDevice, SinkDevice
from vhostkit.virtio.features import DeviceStatus
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDriverQueue, decode_base, encode_base
from vhostkit.virtio.split import SplitDriverQueue

VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
PACKED = 1 << 34
INDIRECT = 1 << 28
NUM = 64
BUF = 0x100000  # data buffers live from here


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no notification arrived"
    os.eventfd_read(fd)


def start_one_ring(
    fe: Frontend,
    q: SplitDriverQueue | PackedDriverQueue,
    *,
    call: int,
    kick: int,
    base: int = 0,
    err: int | None = None,
) -> None:
    """Give the back-end ring ``q.index`` (size, base, addresses, fds) and enable it."""
    fe.set_vring_num(q.index, q.num)
    fe.set_vring_base(q.index, base)
    fe.set_vring_addr(q.vring_addr())
    fe.set_vring_call(q.index, call)
    if err is not None:
        fe.set_vring_err(q.index, err)
    fe.set_vring_kick(q.index, kick)
    fe.set_vring_enable(q.index, True)


def reap_tokens(
    q: SplitDriverQueue | PackedDriverQueue, call: int, count: int, done: list[object] | None = None
) -> list[object]:
    """Reap ``q`` into ``done`` until it holds ``count`` tokens, waiting on ``call``.

    Before sleeping, re-arm interrupts and look again (``enable_interrupts``): ``reap`` writes
    used_event only after it read the used index, so a batch the device completed in between
    saw the old used_event and sent no interrupt (EVENT_IDX) -- as a virtio driver does.
    """
    done = [] if done is None else done
    while len(done) < count:
        done += [t for t, _ in q.reap()]
        if len(done) < count and not q.enable_interrupts():
            wait_readable(call)
    return done


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
        start_one_ring(
            self.fe, q, call=self.calls[index], kick=self.kicks[index], base=base,
            err=self.errs[index],
        )  # fmt: skip

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
    return reap_tokens(s.queues[index], s.calls[index], count)


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
    assert s.device.get_status() & DeviceStatus.NEEDS_RESET
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


def test_a_ring_left_outside_a_new_memory_table_is_broken(setup: Setup) -> None:
    s = setup
    s.start_ring(0)
    s.send(0, 4)
    reap_all(s, 0, 4)
    with GuestMemory.allocate([(0x400000, 0x100000)]) as other:
        s.fe.set_mem_table(other.regions)  # taken: the table itself is valid
    wait_readable(s.errs[0])
    error = s.device.active[0].error
    assert error is not None and "not in the new memory table" in str(error)
    assert s.device.get_status() & DeviceStatus.NEEDS_RESET


class OutOfOrder(RingDevice):
    """Completes odd tokens' chains at once and holds the even ones (as a disk completing out
    of order: the state a crash can leave behind) until :attr:`release` is set; then, on its
    next round, completes what it held."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.held: list[int] = []
        self.release = False

    def process(self, ring) -> None:  # type: ignore[no-untyped-def]
        while len(batch := ring.pop_batch()):
            ids = batch.ids.tolist()  # heads are tokens here: a fresh driver queue
            if done := [h for h in ids if h % 2]:
                ring.complete(done, [0] * len(done))
            self.held += [h for h in ids if not h % 2]  # after completing: see wait_for users
        if self.release and self.held:
            ring.complete(self.held, [0] * len(self.held))
            self.held = []


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_chains_held_across_a_memory_table_change_complete_after_it(
    fd_check, sock_dir, packed: bool
) -> None:
    """A device still holding chains when SET_MEM_TABLE arrives completes them afterwards:
    the ring keeps knowing what is in flight (and, packed, how far each chain reaches)."""
    features = VERSION_1 | EVENT_IDX | (PACKED if packed else 0)
    device = OutOfOrder(features=features, num_queues=1)
    listener = BackendListener(str(sock_dir / "hold.sock"), lambda: device).start()
    mem = GuestMemory.allocate([(0, 0x200000)])
    cls = PackedDriverQueue if packed else SplitDriverQueue
    q = cls(mem, NUM, 0, features=features, index=0)
    kick, call, err = eventfd(), eventfd(), eventfd()
    try:
        with Frontend.connect(sock_dir / "hold.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(features, ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            start_one_ring(
                fe, q, call=call, kick=kick, base=encode_base(0, True) if packed else 0, err=err
            )

            def send(tokens: range, segments: int) -> None:
                for t in tokens:  # chains of several descriptors: packed must know their size
                    bufs = [(BUF + t * 0x1000 + k * 0x100, 64) for k in range(segments)]
                    q.add(bufs, token=t)
                if q.publish():
                    os.eventfd_write(kick, 1)

            send(range(8), 3)
            device.wait_for(lambda: len(device.held) == 4)
            done = reap_tokens(q, call, 4)
            assert sorted(done) == [1, 3, 5, 7]
            fe.set_mem_table(mem.regions)  # a new mapping of the same memory, as on hotplug
            device.release = True
            send(range(8, 10), 2)  # the kick runs a round: it completes the held chains
            reap_tokens(q, call, 10, done)
            assert sorted(done) == list(range(10))
            assert device.active[0].error is None
            assert not select.select([err], [], [], 0)[0]
            base = fe.get_vring_base(0)
            if packed:
                # 10 chains taken and completed: 8 * 3 + 2 * 2 descriptors on both sides
                assert decode_base(base) == (28, True, 28, True)
            else:
                assert base == 10
    finally:
        listener.stop()
        device.close()
        mem.close()
        for fd in (kick, call, err):
            os.close(fd)
        assert not listener.errors


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_restarted_backend_resubmits_inflight_chains(fd_check, sock_dir, packed: bool) -> None:
    """The first back-end completes out of order and dies; the second one resubmits exactly
    the chains left in flight, from the inflight area, and nothing is lost or repeated.

    Packed: chains of several descriptors and an indirect one are held; the second back-end
    rebuilds them from the inflight area (the ring slots hold used descriptors by then) and
    finds the ring position there, not in the stale base the front-end sends."""
    features = VERSION_1 | (PACKED | INDIRECT if packed else 0)
    protocol = ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD
    mem = GuestMemory.allocate([(0, 0x200000)])
    q: SplitDriverQueue | PackedDriverQueue
    if packed:
        q = PackedDriverQueue(mem, NUM, 0, features=features, index=0, max_indirect=4)
    else:
        q = SplitDriverQueue(mem, NUM, 0, features=features, index=0)
    kick, call = eventfd(), eventfd()
    region = None

    def add(tokens: range) -> None:
        for i in tokens:
            out = [(BUF + i * 0x1000, 64)]
            if packed and i % 3 == 0:  # two descriptors
                q.add(out, [(BUF + i * 0x1000 + 0x800, 64)], token=i, indirect=False)
            elif packed and i % 3 == 2:  # one indirect descriptor with a table of two
                q.add(out, [(BUF + i * 0x1000 + 0x800, 64)], token=i, indirect=True)
            else:
                q.add(out, token=i)
        q.publish()

    try:
        # --- the first back-end
        first = OutOfOrder(features=features, num_queues=1)
        listener = BackendListener(str(sock_dir / "a.sock"), lambda: first).start()
        with Frontend.connect(sock_dir / "a.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(features, protocol)
            region = fe.get_inflight_fd(1, NUM)
            fe.set_mem_table(mem.regions)
            start_one_ring(fe, q, call=call, kick=kick, base=encode_base(0, 1) if packed else 0)
            add(range(6))
            os.eventfd_write(kick, 1)
            done = reap_tokens(q, call, 3)
            assert sorted(done) == [1, 3, 5]
            first.wait_for(lambda: len(first.held) == 3)
        # the front-end's socket closed without GET_VRING_BASE: the back-end is gone
        listener.stop()
        first.close()
        # --- the second back-end, a plain sink, takes over from the inflight area
        second = SinkDevice(features=features, num_queues=1)
        listener = BackendListener(str(sock_dir / "b.sock"), lambda: second).start()
        with Frontend.connect(sock_dir / "b.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(features, protocol)
            fe.set_inflight_fd(region)
            fe.set_mem_table(mem.regions)
            kick2 = eventfd()
            # split: what the front-end knows, the used index; packed: a stale base (the
            # front-end cannot know the position)
            base = encode_base(0, 1) if packed else 3
            start_one_ring(fe, q, call=call, kick=kick2, base=base)
            add(range(6, 10))
            os.eventfd_write(kick2, 1)
            reap_tokens(q, call, 10, done)
            base = fe.get_vring_base(0)
            os.close(kick2)
        listener.stop()
        second.close()
        assert sorted(done) == list(range(10))  # every chain exactly once
        assert second.chains[0] == 3 + 4  # the three resubmitted, then the four new ones
        assert q.num_free == NUM
        if packed:
            # used (1, 3, 5: 4 descriptors) + held (0, 2, 4: 4) + new (6..9: 6)
            assert decode_base(base)[2:] == (14, 1)
        else:
            assert base == 10
    finally:
        mem.close()
        os.close(kick)
        os.close(call)
        if region is not None:
            os.close(region.fd)


class NeverDry(RingDevice):
    """A device whose ring never runs dry: it keeps working until the framework asks it to
    yield (what a ring under continuous load looks like to the worker)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.busy = threading.Event()
        self.yields = 0

    def process(self, ring) -> bool:  # type: ignore[no-untyped-def]
        self.busy.set()
        while not ring.interrupted:
            time.sleep(0.001)  # stands for work on an endless stream of chains
        self.yields += 1
        return True


def test_a_busy_ring_still_lets_requests_through(fd_check, sock_dir) -> None:
    device = NeverDry(features=VERSION_1, num_queues=1)
    listener = BackendListener(str(sock_dir / "busy.sock"), lambda: device).start()
    mem = GuestMemory.allocate([(0, 0x100000)])
    q = SplitDriverQueue(mem, NUM, 0, features=VERSION_1)
    kick, call, call2 = eventfd(), eventfd(), eventfd()
    try:
        with Frontend.connect(sock_dir / "busy.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(VERSION_1, ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            start_one_ring(fe, q, call=call, kick=kick)
            assert device.busy.wait(10)
            # the worker never runs dry, yet a call fd swap (which needs the ring's lock) and
            # GET_VRING_BASE (which stops the worker) both complete: REPLY_ACK acks them
            fe.set_vring_call(0, call2)
            assert device.vrings[0].call_fd is not None
            assert fe.get_vring_base(0) == 0
            assert device.yields >= 1  # it was made to yield (a second round may not start)
    finally:
        listener.stop()
        device.close()
        mem.close()
        for fd in (kick, call, call2):
            os.close(fd)


def test_memory_regions_added_and_removed_while_rings_run(fd_check, sock_dir) -> None:
    """ADD_MEM_REG / REM_MEM_REG while a ring runs: buffers in the new region are served, and
    removing a region the ring does not use leaves it running."""
    protocol = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
    device = SinkDevice(features=VERSION_1, num_queues=1)
    listener = BackendListener(str(sock_dir / "slots.sock"), lambda: device).start()
    low = GuestMemory.allocate([(0, 0x100000)])
    high = GuestMemory.allocate([(0x40000000, 0x100000)])
    extra = GuestMemory.allocate([(0x80000000, 0x10000)])
    q = SplitDriverQueue(low, NUM, 0, features=VERSION_1)
    kick, call = eventfd(), eventfd()
    try:
        with Frontend.connect(sock_dir / "slots.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(VERSION_1, protocol)
            fe.add_mem_region(low.regions[0])
            start_one_ring(fe, q, call=call, kick=kick)
            # running; now hot-add two regions and put buffers in one of them
            fe.add_mem_region(high.regions[0])
            fe.add_mem_region(extra.regions[0])
            for i in range(8):
                high.write(0x40000000 + i * 0x1000, bytes([i]) * 100)
                q.add([(0x40000000 + i * 0x1000, 100)], token=i)
            q.publish()
            os.eventfd_write(kick, 1)
            assert reap_tokens(q, call, 8) == list(range(8))
            assert device.bytes[0] == 800
            # hot-remove the region no buffer points at; the ring keeps running
            fe.remove_mem_region(extra.regions[0])
            assert device.memory is not None and len(device.memory.regions) == 2
            q.add([(0x40000000, 10)], token=8)
            q.publish()
            os.eventfd_write(kick, 1)
            # the signal for the first eight may still be pending: wait for the chain itself
            assert reap_tokens(q, call, 1) == [8]
    finally:
        listener.stop()
        device.close()
        for m in (low, high, extra):
            m.close()
        os.close(kick)
        os.close(call)


def test_one_listener_serves_several_frontends_at_once(fd_check, sock_dir) -> None:
    """Each front-end gets its own device from the factory; their rings run side by side."""
    devices: list[SinkDevice] = []

    def factory() -> SinkDevice:
        devices.append(SinkDevice(features=VERSION_1, num_queues=1))
        return devices[-1]

    listener = BackendListener(str(sock_dir / "many.sock"), factory).start()
    mems = [GuestMemory.allocate([(0, 0x200000)]) for _ in range(3)]
    fds = [(eventfd(), eventfd()) for _ in range(3)]
    fes: list[Frontend] = []
    try:
        queues = []
        for mem, (kick, call) in zip(mems, fds, strict=True):
            fe = Frontend.connect(sock_dir / "many.sock", timeout=5)
            fes.append(fe)
            fe.set_owner()
            fe.negotiate(VERSION_1, ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            q = SplitDriverQueue(mem, NUM, 0, features=VERSION_1)
            queues.append(q)
            start_one_ring(fe, q, call=call, kick=kick)
        for n, (q, (kick, _)) in enumerate(zip(queues, fds, strict=True)):
            for i in range(5 + n):
                q.add([(BUF + i * 0x1000, 64)], token=i)
            q.publish()
            os.eventfd_write(kick, 1)
        for n, (q, (_, call)) in enumerate(zip(queues, fds, strict=True)):
            assert reap_tokens(q, call, 5 + n) == list(range(5 + n))
        assert [d.chains[0] for d in devices] == [5, 6, 7]  # each saw only its own front-end
    finally:
        for fe in fes:
            fe.close()
        listener.stop()
        for d in devices:
            d.close()
        for m in mems:
            m.close()
        for kick, call in fds:
            os.close(kick)
            os.close(call)


class RefusesKicks(BackendDevice):
    """A device layer below :class:`RingDevice` that refuses a kick fd while :attr:`refuse`
    is set (as a device validating what it is given would)."""

    refuse = False

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        if self.refuse:
            raise InvalidParam(f"ring {index}: this kick fd is refused")
        super().set_vring_kick(index, fd)


class SinkRefusingKicks(SinkDevice, RefusesKicks):
    """MRO: SinkDevice, RingDevice, RefusesKicks, BackendDevice: RingDevice stops the worker,
    then the layer below it raises."""


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_refused_kick_replacement_leaves_the_ring_running(
    fd_check, sock_dir, packed: bool
) -> None:
    features = VERSION_1 | EVENT_IDX | (PACKED if packed else 0)
    device = SinkRefusingKicks(features=features, num_queues=1)
    listener = BackendListener(str(sock_dir / "kick.sock"), lambda: device).start()
    mem = GuestMemory.allocate([(0, 0x200000)])
    cls = PackedDriverQueue if packed else SplitDriverQueue
    q = cls(mem, NUM, 0, features=features, index=0)
    kick, call, other = eventfd(), eventfd(), eventfd()

    def send(tokens: range) -> None:
        for t in tokens:
            q.add([(BUF + (t % NUM) * 0x1000, 64)], token=t)
        if q.publish():
            os.eventfd_write(kick, 1)

    try:
        with Frontend.connect(sock_dir / "kick.sock", timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(features, ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            start_one_ring(fe, q, call=call, kick=kick, base=encode_base(0, True) if packed else 0)
            send(range(10))
            assert reap_tokens(q, call, 10) == list(range(10))
            device.refuse = True
            with pytest.raises(RequestFailed):
                fe.set_vring_kick(0, other)
            # the ring keeps its worker on the kick it had: the next chains are served
            send(range(10, 20))
            assert reap_tokens(q, call, 10) == list(range(10, 20))
            assert device.active[0].thread is not None and device.active[0].thread.is_alive()
            assert device.chains[0] == 20
    finally:
        listener.stop()
        device.close()
        mem.close()
        for fd in (kick, call, other):
            os.close(fd)
        assert not listener.errors
