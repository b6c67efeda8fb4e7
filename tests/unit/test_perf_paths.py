"""The batch fast paths of the rings and the ring workers: same results as the checked paths.

Covers what the per-batch optimisations added or changed: the bounding-box buffer check with
lazily computed offsets (and its fall-back), cheap polls (``has_pending``), notification
flags written only when they change, the free lists handed out first in first out with
``next_heads``, packed completions of single and multi-descriptor chains mixed, the driver's
transmit path (buffer per head, header placement, default header kept), and the ring
worker's busy poll.
"""

from __future__ import annotations

import numpy as np
import pytest

from vhostkit.errors import InvalidParam, VirtqueueError
from vhostkit.user.backend.ring_device import SinkDevice
from vhostkit.virtio.features import VirtioFeature as F
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.ring import SPLIT_DESC_DTYPE, DescFlag
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

BUFS = 0x10000


def _pair(mem: GuestMemory, packed: bool, num: int, features: int = 0):
    if packed:
        drv = PackedDriverQueue(mem, num, 0, features=features | int(F.RING_PACKED))
        dev = PackedDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)
    else:
        drv = SplitDriverQueue(mem, num, 0, features=features)
        dev = SplitDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)
    return drv, dev


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_batch_reap_checks_used_lengths(packed: bool) -> None:
    """reap_batch: a length on a read-only chain means nothing (0); one beyond the writable
    capacity breaks the queue, and the chains stay in flight."""
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 8)
        drv.add_batch([BUFS, BUFS + 0x100], [32, 32], writable=False)
        drv.add_batch([BUFS + 0x200, BUFS + 0x300], [64, 64], writable=True)
        drv.publish()
        batch = dev.pop_batch()
        dev.complete(batch.ids[:3], [7, 7, 64])  # a read-only chain reports 7: ignored
        tokens, lens = drv.reap_batch()
        assert tokens.tolist() == [0, 1, 2] and lens.tolist() == [0, 0, 64]
        dev.complete(batch.ids[3:], [65])
        with pytest.raises(VirtqueueError, match="device wrote 65 bytes into a 64-byte buffer"):
            drv.reap_batch()
        assert drv.broken is not None
        assert drv.num_free == 7  # the over-long chain was not given back


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_single_region_batch_views_and_lengths(packed: bool) -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 8)
        for i in range(3):
            mem.write(BUFS + i * 0x100, bytes([i + 1]) * (i + 1))
        drv.add_batch([BUFS + i * 0x100 for i in range(3)], [1, 2, 3], writable=False)
        drv.add([], [(BUFS + 0x800, 16)], token="w")
        drv.add([(BUFS + 0x900, 0)], token="empty")  # a zero-length buffer: no view
        drv.publish()
        batch = dev.pop_batch()
        assert len(batch) == 5
        assert batch.readable_len.tolist() == [1, 2, 3, 0, 0]
        assert batch.writable_len.tolist() == [0, 0, 0, 16, 0]
        assert batch.readable_total() == 6
        chains = batch.chains()
        assert [c.read_all() for c in chains[:3]] == [b"\x01", b"\x02\x02", b"\x03\x03\x03"]
        assert chains[3].writable_len == 16 and chains[3].readable == []
        assert chains[4].readable == [] and chains[4].writable == []
        assert [batch[i].read_all() for i in range(3)] == [c.read_all() for c in chains[:3]]
        head, tail = batch.split(2)
        assert [c.read_all() for c in head.chains()] == [b"\x01", b"\x02\x02"]
        assert tail.writable_len.tolist() == [0, 16, 0]
        dev.complete(batch.ids, [0, 0, 0, chains[3].write(b"x" * 16), 0])
        assert sorted(t for t, _ in drv.reap() if isinstance(t, int)) == [0, 1, 2]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_flat_batch_is_the_one_descriptor_one_region_shape_only(packed: bool) -> None:
    """ChainBatch.flat: ids, offsets and lengths (and the region's view and address) for a
    batch of one-descriptor chains in one region of one direction; None for anything else."""
    with GuestMemory.allocate([(0, 0x20000), (0x20000, 0x10000)]) as mem:
        drv, dev = _pair(mem, packed, 8)
        mem.write(0x20100, b"abcd")
        drv.add_batch([0x20100, 0x20200, 0x20300], [4, 0, 8], writable=False)
        drv.publish()
        batch = dev.pop_batch()
        assert batch.flat(writable=True) is None  # not device-writable
        flat = batch.flat(writable=False)
        assert flat is not None
        assert flat.ids == batch.ids.tolist() and flat.lengths == [4, 0, 8]
        assert [flat.gpa + o for o in flat.offsets] == [0x20100, 0x20200, 0x20300]
        o = flat.offsets[0]
        assert flat.view[o : o + 4] == b"abcd" and flat.view.nbytes == 0x10000
        dev.complete(batch.ids, [0, 0, 0])
        drv.reap_batch()
        # mixed directions, a chain of two descriptors, buffers in two regions: no flat view
        drv.add_batch([0x20100], [4], writable=False)
        drv.add_batch([0x20200], [4], writable=True)
        drv.publish()
        mixed = dev.pop_batch()
        assert mixed.flat(writable=False) is None and mixed.flat(writable=True) is None
        dev.complete(mixed.ids, [0, 0])
        drv.reap_batch()
        drv.add([(0x20100, 4), (0x20200, 4)], token="two")
        drv.publish()
        two = dev.pop_batch()
        assert two.flat(writable=False) is None
        dev.complete(two.ids, [0])
        assert [t for t, _ in drv.reap()] == ["two"]
        drv.add_batch([0x100, 0x20100], [4, 4], writable=True)
        drv.publish()
        assert dev.pop_batch().flat(writable=True) is None


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_unpop_gives_back_the_tail_of_the_last_pop(packed: bool) -> None:
    """unpop(k): the last k chains of the last pop are no longer in flight and the next pop
    takes them again (same ids, same buffers), across ring wraps and with chains of several
    descriptors; chains completed, or not of the last pop, cannot be given back."""
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 4, features=int(F.RING_EVENT_IDX))
        for lap in range(3):  # the positions wrap around the 4-entry ring
            drv.add_batch([BUFS + i * 0x100 for i in range(3)], [64] * 3, writable=True)
            drv.publish()
            batch = dev.pop_batch()
            assert len(batch) == 3
            ids = batch.ids.tolist()
            with pytest.raises(InvalidParam, match="last pop took 3"):
                dev.unpop(4)
            dev.complete(ids[:1], [64])
            with pytest.raises(InvalidParam, match="not in flight"):
                dev.unpop(3)  # the first one was completed
            dev.unpop(2)
            assert sorted(dev.inflight) == []
            assert dev.has_pending()
            again = dev.pop_batch()
            assert again.ids.tolist() == ids[1:]
            assert again.writable_len.tolist() == [64, 64]
            dev.complete(again.ids, [64, 64])
            assert sorted(drv.reap_batch()[1].tolist()) == [64, 64, 64], lap
        # chains of two descriptors (packed: two ring slots each)
        drv.add([], [(BUFS, 16), (BUFS + 0x100, 16)], token=7)
        drv.add([], [(BUFS + 0x200, 16), (BUFS + 0x300, 16)], token=8)
        drv.publish()
        batch = dev.pop_batch()
        assert batch.writable_len.tolist() == [32, 32]
        dev.unpop(1)
        assert dev.pending() == (2 if packed else 1)
        again = dev.pop_batch()
        assert again.ids.tolist() == batch.ids.tolist()[1:]
        dev.complete(batch.ids, [32, 32])
        assert sorted(t for t, _ in drv.reap()) == [7, 8]
        dev.unpop(0)
        with pytest.raises(InvalidParam, match="not in flight"):
            dev.unpop(1)  # completed meanwhile


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_buffers_across_regions_and_outside_memory(packed: bool) -> None:
    with GuestMemory.allocate([(0, 0x20000), (0x20000, 0x10000)]) as mem:
        drv, dev = _pair(mem, packed, 4)
        mem.write(0x1FFF0, b"a" * 16 + b"b" * 16)
        # one buffer in the high region, one spanning both: the exact per-buffer lookup
        drv.add_batch([0x20100, 0x1FFF0], [4, 32], writable=False)
        drv.publish()
        batch = dev.pop_batch()
        assert batch[1].read_all() == b"a" * 16 + b"b" * 16
        assert len(batch[1].readable) == 2
        dev.complete(batch.ids, [0, 0])
        drv.reap_batch()
        drv.add_batch([0x30000 - 2], [4], writable=False)  # runs past the end of memory
        drv.publish()
        with pytest.raises(VirtqueueError, match="outside guest memory"):
            dev.pop_batch()


def test_split_head_out_of_range_breaks_the_queue() -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, False, 4)
        avail = mem.gpa_array(drv.ring_gpas[1], "<u2", 6)
        avail[2], avail[3] = 1, 9
        avail[1] = 2
        with pytest.raises(VirtqueueError, match="out of range"):
            dev.pop_batch()
        with pytest.raises(VirtqueueError):
            dev.pending()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_duplicate_and_in_flight_heads_are_caught(packed: bool) -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 4)
        drv.add_batch([BUFS, BUFS + 64], [8, 8], writable=False)
        drv.publish()
        batch = dev.pop_batch()
        with pytest.raises(InvalidParam, match="twice"):
            dev.complete([int(batch.ids[0])] * 2, [0, 0])
        with pytest.raises(InvalidParam, match="not in flight"):
            dev.complete([3], [0])
        with pytest.raises(InvalidParam, match="out of range"):
            dev.complete([-1], [0])
        with pytest.raises(InvalidParam, match="length out of range"):
            dev.complete(batch.ids[:1], [-1])
        with pytest.raises(InvalidParam, match="length out of range"):
            dev.complete(batch.ids[:1], np.array([1 << 32], dtype=np.uint64))
        assert dev.broken is None
        dev.complete(batch.ids, np.zeros(2, dtype=np.uint32))
        assert drv.reap_batch()[0].tolist() == [0, 1]


def test_split_same_head_twice_in_one_pop() -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, False, 4)
        d, a, _ = drv.ring_gpas
        mem.gpa_array(d, SPLIT_DESC_DTYPE, 4)[2] = (BUFS, 8, 0, 0)
        avail = mem.gpa_array(a, "<u2", 6)
        avail[2] = avail[3] = 2
        avail[1] = 2
        with pytest.raises(VirtqueueError, match="twice"):
            dev.pop_batch()


def test_split_head_already_in_flight() -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, False, 4)
        d, a, _ = drv.ring_gpas
        mem.gpa_array(d, SPLIT_DESC_DTYPE, 4)[1] = (BUFS, 8, 0, 0)
        avail = mem.gpa_array(a, "<u2", 6)
        avail[2] = 1
        avail[1] = 1
        assert dev.pop_batch().ids.tolist() == [1]
        avail[3] = 1
        avail[1] = 2
        with pytest.raises(VirtqueueError, match="already in flight"):
            dev.pop_batch()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_has_pending_follows_the_ring(packed: bool) -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 4)
        for _ in range(6):  # more than a lap: wrap counters and index wrap
            assert not dev.has_pending()
            drv.add_batch([BUFS, BUFS + 64, BUFS + 128], [8, 8, 8], writable=False)
            drv.publish()
            assert dev.has_pending()
            batch = dev.pop_batch()
            assert len(batch) == 3 and not dev.has_pending()
            dev.complete(batch.ids, np.zeros(3, dtype=np.uint32))
            assert len(drv.reap_batch()[0]) == 3


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_notification_flags_written_only_on_change(packed: bool) -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 4)
        if packed:
            words = mem.gpa_array(drv.ring_gpas[2], "<u2", 2)  # device event area
            index, disabled = 1, 1
        else:
            words = mem.gpa_array(drv.ring_gpas[2], "<u2", 2)  # used ring flags
            index, disabled = 0, 1
        dev.disable_notifications()
        assert words[index] == disabled
        words[index] = 0x55  # nobody else writes there: a second disable does not store
        dev.disable_notifications()
        assert words[index] == 0x55
        words[index] = disabled
        assert not dev.enable_notifications()
        assert words[index] == 0
        dev.disable_notifications()
        assert words[index] == disabled
        drv.add_batch([BUFS], [8], writable=False)
        drv.publish()
        assert dev.enable_notifications()  # pending: pop them


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_free_lists_are_first_in_first_out(packed: bool) -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, packed, 8)
        assert drv.next_heads(3).tolist() == [0, 1, 2]
        assert drv.add_batch([BUFS] * 3, [8] * 3, writable=False).tolist() == [0, 1, 2]
        assert drv.next_heads(2).tolist() == [3, 4]
        drv.publish()
        batch = dev.pop_batch()
        dev.complete(batch.ids[::-1], np.zeros(3, dtype=np.uint32))  # 2, 1, 0
        tokens, _ = drv.reap_batch()
        assert tokens.tolist() == [2, 1, 0]
        # the ones never used go first, then the returned ones in the order they came back
        assert drv.next_heads(8).tolist() == [3, 4, 5, 6, 7, 2, 1, 0]
        with pytest.raises(Exception, match="queue full"):
            drv.next_heads(9)
        assert drv.add([(BUFS, 8)], token="t") == 3  # add() takes from the same list
        assert drv.next_heads(1).tolist() == [4]


def test_packed_single_and_multi_chains_complete_in_any_order() -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, True, 8)
        for lap in range(5):  # several laps: used slots wrap with chains of different length
            a = drv.add([(BUFS, 4), (BUFS + 64, 4)], [(BUFS + 128, 8)], token=f"m{lap}")
            drv.add_batch([BUFS + 256, BUFS + 320], [8, 8], writable=True, tokens=[7, 9])
            drv.publish()
            batch = dev.pop_batch()
            assert len(batch) == 3 and int(batch.ids[0]) == a
            assert batch.writable_len.tolist() == [8, 8, 8]
            order = [2, 0, 1] if lap % 2 else [1, 2, 0]
            dev.complete(batch.ids[order], batch.writable_len[order])
            got = drv.reap()
            assert sorted(map(str, got)) == sorted(map(str, [(f"m{lap}", 8), (7, 8), (9, 8)]))
            assert drv.num_free == 8


def test_split_reap_batch_keeps_checking_lengths_and_ids() -> None:
    with GuestMemory.allocate([(0, 1 << 20)]) as mem:
        drv, dev = _pair(mem, False, 4)
        drv.add_batch([BUFS, BUFS + 64], [8, 8], writable=True, tokens=[10, 11])
        drv.publish()
        batch = dev.pop_batch()
        dev.complete(batch.ids, [8, 9])  # one byte more than the buffer
        with pytest.raises(VirtqueueError, match="bytes into"):
            drv.reap_batch()


def _bench_module():
    """bench/ring_throughput.py (its in-process loopback data plane), loaded by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "ring_throughput.py"
    spec = importlib.util.spec_from_file_location("_vhk_ring_throughput", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_netdriver_tx_layout_and_headers() -> None:
    """Frames land 64-byte aligned behind their header; a custom header is not kept."""
    from vhostkit.guest.net import VirtioNetDriver
    from vhostkit.virtio.net import VirtioNetHdr

    loop = _bench_module()
    with loop.Loopback() as be, VirtioNetDriver(be, queue_size=8).start() as nic:
        dev = be.device_queue(1)
        frames = [bytes([i]) * 60 for i in range(5)] + [b"\x09" * 100]
        assert nic.send(frames) == 6
        batch = dev.pop_batch()
        chains = batch.chains()
        hs = nic.header_size
        for frame, chain in zip(frames, chains, strict=True):
            data = chain.read_all()
            assert data[hs:] == frame and data[:hs] == bytes(hs)
        assert batch._addr.tolist()[0] % 64 == 64 - hs
        dev.complete(batch.ids, np.zeros(6, dtype=np.uint32))
        hdr = VirtioNetHdr(num_buffers=1)
        assert nic.send(frames[:3], hdr=hdr) == 3
        batch = dev.pop_batch()
        for chain in batch.chains():
            assert chain.read_all()[:hs] == hdr.pack(hs)
        dev.complete(batch.ids, np.zeros(3, dtype=np.uint32))
        assert nic.send(frames) == 6  # reaps first; slots that held the header get zeros
        batch = dev.pop_batch()
        assert all(c.read_all()[:hs] == bytes(hs) for c in batch.chains())
        dev.complete(batch.ids, np.zeros(6, dtype=np.uint32))
        assert nic.wait_tx_done(1.0)
        assert nic.tx_in_flight == 0


def test_netdriver_send_measures_frames_before_it_reaps() -> None:
    """send() measures and joins the frames before it reaps completions (so the device has
    longer to finish): what it queues is still exactly the first ``free`` frames, only those
    are length-checked, a longer list than the ring is fine, and a full ring queues none."""
    from vhostkit.guest.net import VirtioNetDriver

    loop = _bench_module()
    with loop.Loopback() as be, VirtioNetDriver(be, queue_size=8).start() as nic:
        dev = be.device_queue(1)
        hs = nic.header_size

        def consume(count: int) -> list[bytes]:
            batch = dev.pop_batch()
            assert len(batch) == count
            dev.complete(batch.ids, np.zeros(count, dtype=np.uint32))
            return [c.read_all()[hs:] for c in batch.chains()]

        frames = [bytes([i]) * 60 for i in range(20)]
        assert nic.send(frames) == 8  # 20 frames, an 8-entry ring
        assert nic.send(frames) == 0  # full, and the device completed nothing
        assert consume(8) == frames[:8]
        assert nic.send(frames[:5]) == 5  # reaps the 8 first
        assert nic.send(frames) == 3  # what is left
        assert consume(8) == frames[:5] + frames[:3]
        assert nic.send(frames[:4]) == 4  # reaps the 8; 4 stay free
        # the 5th frame is too long, but 4 are free (the device completed nothing): not queued
        too_long = [*frames[:4], b"\xff" * 4000]
        assert nic.send(too_long) == 4
        assert consume(8) == frames[:4] * 2
        with pytest.raises(InvalidParam):
            nic.send([frames[0], b"\xff" * 4000])  # among the frames that would be queued
        # frames of different lengths (no uniform fast path), partly sent
        mixed = [bytes([i]) * (40 + i) for i in range(12)]
        assert nic.send(mixed) == 8
        assert consume(8) == mixed[:8]
        assert nic.wait_tx_done(1.0)


def test_sink_busy_poll_consumes_without_kicks(fd_check, sock_dir) -> None:
    """A worker that polls keeps serving a ring whose driver never kicks after the first."""
    import os
    import select

    from vhostkit.user import BackendListener, Frontend, ProtocolFeature

    features = (1 << 32) | (1 << 29)
    device = SinkDevice(features=features, num_queues=1, busy_poll=60.0)
    listener = BackendListener(str(sock_dir / "bp.sock"), lambda: device).start()
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with (
            Frontend.connect(sock_dir / "bp.sock", timeout=5) as fe,
            GuestMemory.allocate([(0, 0x100000)]) as mem,
        ):
            fe.set_owner()
            fe.negotiate(features, ProtocolFeature.REPLY_ACK)
            fe.set_mem_table(mem.regions)
            q = SplitDriverQueue(mem, 16, 0, features=features)
            fe.set_vring_num(0, 16)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(q.vring_addr())
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            q.add_batch([BUFS], [64], writable=False)
            q.publish()
            os.eventfd_write(kick, 1)
            waiter = select.poll()
            waiter.register(call, select.POLLIN)

            def reap_until_all_free() -> None:
                # used_event follows each reap: every completion past it writes the call fd
                while q.num_free < 16:
                    q.reap_batch()
                    if q.num_free < 16:
                        assert waiter.poll(5000), "the device signalled nothing in 5 s"
                        os.eventfd_read(call)

            reap_until_all_free()
            assert device.chains[0] == 1
            # the worker now polls (until GET_VRING_BASE stops it): no kick needed for the next ones
            for _ in range(3):
                q.add_batch([BUFS + 64, BUFS + 128], [64, 64], writable=False)
                kicked = q.publish()
                assert not kicked  # the worker keeps notifications off while it polls
                reap_until_all_free()
            assert device.chains[0] == 7
            fe.get_vring_base(0)  # stops the worker, even while it polls
    finally:
        listener.stop()
        device.close()
        os.close(kick)
        os.close(call)
        assert not listener.errors


def test_flags_constants_unchanged() -> None:
    assert int(DescFlag.AVAIL | DescFlag.USED) == 0x8080
