"""The userspace virtio-net driver against vhostkit's own back-end over a real socket.

An :class:`EchoDevice` (a :class:`RingDevice`) sends every frame it takes from the TX ring back
through the RX ring, keeping the transmit header's offload fields and spreading a frame over
several receive buffers when mergeable buffers are negotiated. The driver runs on split and
packed rings, with 12-byte (VERSION_1, with or without MRG_RXBUF) and 10-byte (legacy) headers.

Also here: property tests that :meth:`add_batch` / :meth:`reap_batch` have exactly the effect
of repeated :meth:`add` / :meth:`reap` on both ring formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.devices.echo import EchoDevice
from vhostkit.errors import InvalidOperation, InvalidParam
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.user import Frontend
from vhostkit.user.backend.listener import BackendListener
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.net import (
    GsoType,
    NetHdrFlag,
    VirtioNetHdr,
)
from vhostkit.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from vhostkit.virtio.split import SplitDeviceQueue, SplitDriverQueue

RX, TX = 0, 1


@pytest.fixture
def echo(sock_dir: Path) -> Iterator[tuple[EchoDevice, Path]]:
    device = EchoDevice()
    path = sock_dir / "echo.sock"
    listener = BackendListener(path, lambda: device, max_connections=1).start()
    yield device, path
    listener.stop()
    device.close()
    assert not listener.errors and not listener.rejected


def frames_numbered(count: int, size: int = 64) -> list[bytes]:
    dst, src = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
    return [
        dst
        + src
        + b"\x88\xb5"
        + i.to_bytes(4, "big")
        + bytes((i + j) % 256 for j in range(size - 18))
        for i in range(count)
    ]


def run_echo(nic: VirtioNetDriver, frames: list[bytes], chunk: int = 100) -> list[bytes]:
    got: list[bytes] = []
    sent = 0
    while sent < len(frames) or len(got) < len(frames):
        if sent < len(frames):
            sent += nic.send(frames[sent : sent + chunk])
        got += nic.recv(timeout=0 if sent < len(frames) else 5.0)
        if sent == len(frames) and not got[len(frames) - 1 :]:
            more = nic.recv(timeout=5.0)
            assert more, f"echo stalled at {len(got)} of {len(frames)}"
            got += more
    return got


@pytest.mark.parametrize(
    ("packed", "features", "hsize"),
    [
        (False, None, 12),
        (True, None, 12),
        (False, int(VF.VERSION_1), 12),
        (True, int(VF.VERSION_1 | VF.RING_EVENT_IDX), 12),
        (False, 0, 10),
    ],
    ids=["split-mrg", "packed-mrg", "split-v1", "packed-v1-eventidx", "split-legacy"],
)
def test_echo_roundtrip(fd_check, echo, packed, features, hsize):
    device, path = echo
    frames = frames_numbered(1000) + [f * 3 for f in frames_numbered(20, 200)]
    with ExitStack() as stack:
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(
            VirtioNetDriver(fe, packed=packed, queue_size=64, features=features).start()
        )
        assert nic.header_size == hsize
        assert bool(nic.acked_features & VF.RING_PACKED) == packed
        assert device.acked_features == nic.acked_features
        got = run_echo(nic, frames)
        assert got == frames
        assert nic.wait_tx_completed(len(frames), 5.0)
        assert nic.wait_tx_done(5.0)
        stats = nic.stats()
        assert stats.tx_frames == stats.tx_completed == len(frames)
        assert not nic.wait_tx_completed(len(frames) + 1, 0)  # nothing more is queued
        assert stats.rx_frames == len(frames)
        positions = nic.stop()
        assert set(positions) == {RX, TX}
        assert device.echoed == len(frames)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_mergeable_buffers_and_headers(fd_check, echo, packed):
    """Small receive buffers: the device spreads frames over several (num_buffers > 1)."""
    _device, path = echo
    hdr = VirtioNetHdr(
        flags=NetHdrFlag.NEEDS_CSUM,
        gso_type=GsoType.TCPV4,
        hdr_len=54,
        gso_size=1448,
        csum_start=34,
        csum_offset=16,
    )
    frames = [bytes([i]) * (60 + 37 * i) for i in range(40)]
    with ExitStack() as stack:
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = stack.enter_context(
            VirtioNetDriver(fe, packed=packed, queue_size=32, rx_buffer_size=256).start()
        )
        for i in range(0, len(frames), 8):
            assert nic.send(frames[i : i + 8], hdr=hdr) == len(frames[i : i + 8])
            got: list[tuple[VirtioNetHdr, bytes]] = []
            while len(got) < len(frames[i : i + 8]):
                more = nic.recv_headers(timeout=5.0)
                assert more
                got += more
            for (h, f), want in zip(got, frames[i : i + 8], strict=True):
                assert f == want
                need = -(-(12 + len(want)) // 256)
                assert h.num_buffers == need
                assert dataclasses.replace(h, num_buffers=0) == hdr
        nic.stop()


def test_ring_full_and_misuse(fd_check, echo):
    _device, path = echo
    with ExitStack() as stack:
        fe = Frontend.connect(path, timeout=5)
        stack.callback(fe.close)
        nic = VirtioNetDriver(fe, queue_size=16)
        stack.enter_context(nic)
        with pytest.raises(InvalidOperation):
            nic.send([b"x" * 60])  # not started
        nic.start()
        with pytest.raises(InvalidOperation):
            nic.start()
        with pytest.raises(InvalidParam):
            nic.send([b"x" * 4000])
        assert nic.recv(timeout=0) == []
        assert nic.send_all(frames_numbered(100), timeout=10) == 100
        got: list[bytes] = []
        while len(got) < 100:
            more = nic.recv(timeout=5)
            assert more
            got += more
        assert got == frames_numbered(100)
        nic.stop()
        with pytest.raises(InvalidOperation):
            nic.recv(timeout=0)
    assert nic.closed


# --- add_batch / reap_batch equivalence -----------------------------------------------------


def _pair(mem: GuestMemory, packed: bool, num: int, features: int):  # type: ignore[no-untyped-def]
    if packed:
        drv = PackedDriverQueue(mem, num, 0, features=features)
        return drv, PackedDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)
    drv = SplitDriverQueue(mem, num, 0, features=features)
    return drv, SplitDeviceQueue.from_gpa(mem, num, *drv.ring_gpas, features=features)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["plain", "event"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), num=st.sampled_from([4, 8, 16]))
def test_batch_add_and_reap_equal_repeated_calls(packed, event_idx, num, data):
    """Two identical rings: one driven by add/reap, one by add_batch/reap_batch.

    The devices complete the same ids in the same (random) order; after every step the ring
    memory of both is byte-identical and the reaped tokens and lengths are the same. Some
    multi-buffer chains are mixed in through ``add`` to cover the fallback path.
    """
    features = (int(VF.RING_PACKED) if packed else 0) | (int(VF.RING_EVENT_IDX) if event_idx else 0)
    size = 1 << 16
    with GuestMemory.allocate([(0, size)]) as m1, GuestMemory.allocate([(0, size)]) as m2:
        d1, v1 = _pair(m1, packed, num, features)
        d2, v2 = _pair(m2, packed, num, features)
        inflight: list[int] = []
        token = 0
        for _ in range(data.draw(st.integers(1, 25))):
            op = data.draw(st.sampled_from(["add", "add", "multi", "complete", "reap"]))
            if op == "add":
                k = data.draw(st.integers(0, num))
                free = d1.num_free
                writable = data.draw(st.booleans())
                addrs = [0x8000 + 64 * (token + i) for i in range(k)]
                lens = [1 + (token + i) % 50 for i in range(k)]
                toks = list(range(token, token + k))
                if k > free:
                    with pytest.raises(InvalidOperation):
                        d2.add_batch(addrs, lens, writable=writable, tokens=toks)
                    continue
                for a, n, t in zip(addrs, lens, toks, strict=True):
                    if writable:
                        d1.add([], [(a, n)], token=t)
                    else:
                        d1.add([(a, n)], token=t)
                d2.add_batch(addrs, lens, writable=writable, tokens=toks)
                token += k
                assert d1.publish() == d2.publish()
            elif op == "multi":
                if d1.num_free < 2:
                    continue
                for d in (d1, d2):
                    d.add([(0x8000, 4)], [(0x9000, 8)], token=token)
                token += 1
                assert d1.publish() == d2.publish()
            elif op == "complete":
                b1, b2 = v1.pop_batch(), v2.pop_batch()
                assert list(b1.ids) == list(b2.ids)
                inflight += [(int(i), int(w)) for i, w in zip(b1.ids, b1.writable_len, strict=True)]
                del b1, b2
                if not inflight:
                    continue
                order = data.draw(st.permutations(range(len(inflight))))
                k = data.draw(st.integers(1, len(inflight)))
                chosen = [inflight[j] for j in order[:k]]
                ids = [i for i, _ in chosen]
                lens = [w for _, w in chosen]
                assert v1.complete(ids, lens) == v2.complete(ids, lens)
                inflight = [x for x in inflight if x not in chosen]
            else:
                limit = data.draw(st.one_of(st.none(), st.integers(1, num)))
                got1 = d1.reap(limit)
                toks, lens = d2.reap_batch(limit)
                assert [(t, n) for t, n in got1] == list(
                    zip(toks.tolist(), lens.tolist(), strict=True)
                )
            assert m1.read(0, 0x8000) == m2.read(0, 0x8000)
            assert d1.num_free == d2.num_free


def test_add_batch_rejects_bad_arguments() -> None:
    with GuestMemory.allocate([(0, 1 << 16)]) as mem:
        drv = SplitDriverQueue(mem, 4, 0)
        with pytest.raises(InvalidParam):
            drv.add_batch([0x8000], [1, 2], writable=False)
        with pytest.raises(InvalidParam):
            drv.add_batch([0x8000], [1 << 33], writable=False)
        with pytest.raises(InvalidOperation):
            drv.add_batch([0x8000] * 5, [1] * 5, writable=False)
        assert drv.num_free == 4
        heads = drv.add_batch([0x8000, 0x8100], [4, 4], writable=True)
        assert list(heads) == [0, 1]
        assert drv.add_batch([], [], writable=True).shape == (0,)


def test_driver_closes_everything_on_failed_start(fd_check, sock_dir):
    """A start that fails (packed asked, not offered) leaves no fd and no memory behind."""
    device = EchoDevice(features=int(VF.VERSION_1 | NF.MRG_RXBUF))
    path = sock_dir / "np.sock"
    listener = BackendListener(path, lambda: device, max_connections=1).start()
    try:
        with Frontend.connect(path, timeout=5) as fe:
            nic = VirtioNetDriver(fe, packed=True)
            with pytest.raises(Exception, match="RING_PACKED"):
                nic.start()
            assert nic.closed and nic.memory is not None and nic.memory.closed
    finally:
        listener.stop()
        device.close()
