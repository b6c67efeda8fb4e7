"""A vhostkit blk back-end that hangs mid-stream, for the kill-and-restart test.

It serves normally until it has completed ``--stall-after`` requests, then takes the rest of
the batch it is working on (so they are in flight, recorded in the inflight area), prints
``stalled <n in flight>`` and blocks until it is killed. Run as a script by
tests/test_restart.py.
"""

from __future__ import annotations

import argparse
import sys
import threading

from vhostkit.devices.blk import BlkDevice
from vhostkit.user.daemon import ActiveRing
from vhostkit.user.listener import BackendListener


class StallingBlk(BlkDevice):
    def __init__(self, image: str, stall_after: int) -> None:
        super().__init__(image)
        self.stall_after = stall_after
        self.completed_requests = 0

    def process(self, ring: ActiveRing) -> None:
        while len(batch := ring.pop_batch()):
            for chain in batch:
                if self.completed_requests >= self.stall_after:
                    left = len(batch) - batch.ids.tolist().index(chain.id)
                    print(f"stalled {left}", flush=True)
                    threading.Event().wait()  # hang here, chains in flight, until SIGKILL
                length, _ = self._handle(ring.index, chain)
                ring.complete([chain.id], [length])
                self.completed_requests += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--stall-after", type=int, required=True)
    args = parser.parse_args()
    device = StallingBlk(args.image, args.stall_after)
    with BackendListener(args.socket, lambda: device, max_connections=1).start():
        print("listening", flush=True)
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
