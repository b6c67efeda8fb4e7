"""A vhostkit blk back-end that hangs mid-stream, for the kill-and-restart tests.

It serves normally until it has completed ``--stall-after`` requests (with
``--count-writes``: write requests only, so that a real guest's reads at boot do not count),
then takes the rest of the batch it is working on (so they are in flight, recorded in the
inflight area), prints ``stalled <n in flight>`` and blocks until it is killed. Run as a
script by tests/test_restart.py and tests/test_guest_kernel_blk_restart.py.

``--hold N``: at the stall, keep taking requests (waiting for the driver's kicks) until at
least ``N`` are in flight. ``--out-of-order``: then complete the newest half of them (newest
first) before hanging with the rest, so that the used ring moves past requests that are still
in flight: only the inflight area, not the used index, tells a new back-end which requests to
redo.

Every ring start prints ``ring <i> started: <n> descriptors (split|packed), protocol features
<hex>, inflight tracked`` (or ``untracked``).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading

from vhostkit.devices.blk import BlkDevice, BlkRequestType
from vhostkit.user.backend.device import VringInfo
from vhostkit.user.backend.listener import BackendListener
from vhostkit.user.backend.ring_device import ActiveRing
from vhostkit.virtio.features import VirtioFeature
from vhostkit.virtio.ring import Chain

#: how long the stall waits for a kick while it holds fewer than ``--hold`` requests
HOLD_TIMEOUT = 300.0


class StallingBlk(BlkDevice):
    def __init__(
        self,
        image: str,
        stall_after: int,
        *,
        num_queues: int = 1,
        count_writes: bool = False,
        hold: int = 0,
        out_of_order: bool = False,
    ) -> None:
        super().__init__(image, num_queues=num_queues)
        self.stall_after = stall_after
        self.count_writes = count_writes
        self.hold = hold
        self.out_of_order = out_of_order
        self.completed_requests = 0

    def ring_started(self, ring: VringInfo) -> None:
        super().ring_started(ring)
        active = self.active[ring.index]
        tracked = "tracked" if active.inflight is not None else "untracked"
        layout = "packed" if self.acked_features & VirtioFeature.RING_PACKED else "split"
        print(
            f"ring {ring.index} started: {active.queue.num} descriptors ({layout}), protocol "
            f"features "
            f"{self.acked_protocol_features:#x}, inflight {tracked}",
            flush=True,
        )

    def _counts(self, chain: Chain) -> bool:
        if not self.count_writes:
            return True
        header = b"".join(bytes(v) for v in chain.readable)[:4]
        return len(header) == 4 and int.from_bytes(header, "little") == BlkRequestType.OUT

    def process(self, ring: ActiveRing) -> None:
        while len(batch := ring.pop_batch()):
            for i, chain in enumerate(batch):
                if self.completed_requests >= self.stall_after:
                    self._stall(ring, list(batch)[i:])
                length, _ = self._handle(ring.index, chain)
                ring.complete([chain.id], [length])
                if self._counts(chain):
                    self.completed_requests += 1

    def _stall(self, ring: ActiveRing, held: list[Chain]) -> None:
        """Hang with ``held`` (and, with ``--hold``, more) in flight; never returns."""
        queue = ring.queue
        kick = ring.info.kick_fd
        while len(held) < self.hold:
            more = ring.pop_batch(force=True)
            if len(more):
                held += list(more)
                continue
            if queue.enable_notifications():
                continue  # chains came in meanwhile
            if kick is None or not select.select([kick], [], [], HOLD_TIMEOUT)[0]:
                print(f"stall: only {len(held)} requests came, {self.hold} wanted", flush=True)
                break
            try:
                os.eventfd_read(kick)
            except BlockingIOError:
                pass
            queue.disable_notifications()
        done = 0
        if self.out_of_order:
            for chain in reversed(held[len(held) - len(held) // 2 :]):
                length, _ = self._handle(ring.index, chain)
                ring.complete([chain.id], [length])
                done += 1
        suffix = f", after completing {done} out of order" if self.out_of_order else ""
        print(f"stalled {len(held) - done}{suffix}", flush=True)
        threading.Event().wait()  # hang here, chains in flight, until SIGKILL


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--stall-after", type=int, required=True)
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--count-writes", action="store_true", help="count write requests only")
    parser.add_argument("--hold", type=int, default=0, help="requests in flight at the stall")
    parser.add_argument("--out-of-order", action="store_true")
    args = parser.parse_args()
    device = StallingBlk(
        args.image,
        args.stall_after,
        num_queues=args.queues,
        count_writes=args.count_writes,
        hold=args.hold,
        out_of_order=args.out_of_order,
    )
    with BackendListener(args.socket, lambda: device, max_connections=1).start():
        print("listening", flush=True)
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
