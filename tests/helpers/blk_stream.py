"""A front-end that streams numbered block writes across back-end restarts (inflight tracking).

:class:`BlkStream` plays the VMM of a vhost-user-blk device: it owns the guest memory, one
split ring, the kick and call eventfds and the inflight area it got from the first back-end
(``GET_INFLIGHT_FD``). Request ``i`` writes block ``i`` (sector ``i``, filled with ``i``) from
its own buffers, so a request resubmitted by a restarted back-end writes the same bytes again.
After a back-end dies, :meth:`attach` sets a new one up as QEMU does on reconnect: the same
inflight area (``SET_INFLIGHT_FD``) and, as the ring base, the used index found in the ring; the
back-end then resubmits what was in flight.

:attr:`done` counts the completions reaped per request: "exactly once" is every count 1.
"""

from __future__ import annotations

import os
import select
import struct
from collections import Counter
from pathlib import Path

from vhostkit.devices.blk import BlkRequestType, BlkStatus
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.user.frontend import InflightRegion
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.memory import GuestMemory
from vhostkit.virtio.split import SplitDriverQueue

NUM = 128  # three descriptors per request: up to 42 in flight
WINDOW = 32
SECTOR = 512
DATA = 0x100000
SLOT = 0x240  # header 16 + data 512 + status 1, 64-byte aligned
FEATURES = int(VirtioFeature.VERSION_1)
PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD


def block(i: int) -> bytes:
    """What request ``i`` writes to sector ``i``."""
    return struct.pack("<I", i) * (SECTOR // 4)


class BlkStream:
    """``total`` numbered writes over one split ring, whoever serves it at the moment."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.mem = GuestMemory.allocate([(0, DATA + total * SLOT)])
        self.q = SplitDriverQueue(self.mem, NUM, 0, features=FEATURES)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.region: InflightRegion | None = None
        self.next = 0
        self.done: Counter[int] = Counter()
        self.outstanding: set[int] = set()

    # -- the back-end side --

    def ring_used_idx(self) -> int:
        """The used index the device last published (what QEMU sends as the base)."""
        return struct.unpack("<H", self.mem.read(self.q.ring_gpas[2] + 2, 2))[0]

    def attach(self, fe: Frontend) -> None:
        """Set up a (new) back-end: negotiate, inflight area, memory, ring at the used index."""
        fe.set_owner()
        fe.negotiate(FEATURES, PROTOCOL)
        if self.region is None:
            self.region = fe.get_inflight_fd(1, NUM)
        else:
            fe.set_inflight_fd(self.region)
        fe.set_mem_table(self.mem.regions)
        fe.set_vring_num(0, NUM)
        fe.set_vring_base(0, self.ring_used_idx())
        fe.set_vring_addr(self.q.vring_addr())
        fe.set_vring_call(0, self.call)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_enable(0, True)

    # -- the driver side --

    def fill(self) -> int:
        """Submit requests until :data:`WINDOW` are outstanding; kick. Returns how many."""
        n = 0
        while self.next < self.total and len(self.outstanding) < WINDOW:
            i = self.next
            base = DATA + i * SLOT
            self.mem.write(base, struct.pack("<IIQ", BlkRequestType.OUT, 0, i))
            self.mem.write(base + 16, block(i))
            self.mem.write(base + 16 + SECTOR, b"\xff")
            self.q.add([(base, 16), (base + 16, SECTOR)], [(base + 16 + SECTOR, 1)], token=i)
            self.outstanding.add(i)
            self.next += 1
            n += 1
        if n:
            self.q.publish()
            os.eventfd_write(self.kick, 1)
        return n

    def reap(self) -> int:
        """Take what the device completed. Returns how many."""
        got = self.q.reap()
        for token, _ in got:
            self.done[token] += 1
            self.outstanding.discard(token)
        return len(got)

    def wait_call(self, timeout: float) -> bool:
        """Wait for an interrupt (True) or ``timeout`` (False)."""
        ready, _, _ = select.select([self.call], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass
        return bool(ready)

    def run(self, completions: int, timeout: float = 10.0) -> None:
        """Keep the window full until ``completions`` more requests completed (or all)."""
        target = min(sum(self.done.values()) + completions, self.total)
        while sum(self.done.values()) < target:
            self.fill()
            if not self.reap() and not self.wait_call(timeout):
                raise TimeoutError(
                    f"no completion in {timeout} s: {len(self.outstanding)} outstanding, "
                    f"{sum(self.done.values())} done"
                )

    def run_until(self, fd: int, timeout: float = 10.0) -> None:
        """Keep the window full until ``fd`` is readable (a back-end's own signal)."""
        while True:
            self.fill()
            self.reap()
            ready, _, _ = select.select([self.call, fd], [], [], timeout)
            if fd in ready:
                return
            if not ready:
                raise TimeoutError(
                    f"no signal and no completion in {timeout} s: "
                    f"{len(self.outstanding)} outstanding, {sum(self.done.values())} done"
                )
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass

    @property
    def completed(self) -> int:
        return sum(self.done.values())

    @property
    def finished(self) -> bool:
        return sum(self.done.values()) >= self.total and not self.outstanding

    # -- the verdict --

    def check(self, image: Path) -> None:
        """Every request completed exactly once with OK; every block holds its data."""
        assert self.next == self.total
        twice = {i: n for i, n in self.done.items() if n != 1}
        assert not twice, f"requests completed more than once: {twice}"
        assert sorted(self.done) == list(range(self.total)), "requests never completed"
        statuses = [self.mem.read(DATA + i * SLOT + 16 + SECTOR, 1)[0] for i in range(self.total)]
        bad = [i for i, s in enumerate(statuses) if s != BlkStatus.OK]
        assert not bad, f"requests without an OK status: {bad[:20]}"
        data = image.read_bytes()
        wrong = [i for i in range(self.total) if data[i * SECTOR : (i + 1) * SECTOR] != block(i)]
        assert not wrong, f"blocks with the wrong data on disk: {wrong[:20]}"

    def close(self) -> None:
        self.mem.close()
        for fd in (self.kick, self.call):
            os.close(fd)
        if self.region is not None:
            os.close(self.region.fd)
            self.region = None
