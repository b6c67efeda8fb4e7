"""An echo device: every frame the driver transmits comes back on its receive ring.

:class:`EchoDevice` is a virtio-net shaped :class:`~vhostkit.user.backend.RingDevice` with no
network behind it: frames taken from the TX ring (ring 1) are written into the RX ring (ring 0)
with the same virtio-net header fields, spread over several receive buffers (``num_buffers``)
when MRG_RXBUF is negotiated. It is the peer of ``vhostkit demo`` and of the driver's own tests,
and a handy loopback when scripting a vhost-user front-end.
"""

from __future__ import annotations

import threading

import numpy as np

from vhostkit.user.backend.ring_device import ActiveRing, RingDevice
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.virtio.net import VirtioNetHdr, fill_mergeable, header_size
from vhostkit.virtio.ring import Chain

__all__ = ["ECHO_FEATURES", "EchoDevice"]

RX, TX = 0, 1
ECHO_FEATURES = int(VF.VERSION_1 | VF.RING_PACKED | VF.RING_EVENT_IDX | NF.MRG_RXBUF)


class EchoDevice(RingDevice):
    """Echo every TX frame back on RX (the same header fields, ``num_buffers`` set).

    Receive buffers are taken as soon as they are posted and kept until a frame needs them.
    """

    def __init__(self, features: int = ECHO_FEATURES) -> None:
        super().__init__(features=features, num_queues=2)
        self.pending: list[tuple[VirtioNetHdr, bytes]] = []
        self.stash: list[Chain] = []  # receive chains popped and not used yet
        self.echoed = 0
        self.lock = threading.Lock()

    @property
    def hdr_size(self) -> int:
        return header_size(self.acked_features)

    def process(self, ring: ActiveRing) -> None:
        if ring.index == TX:
            hs = self.hdr_size
            while len(batch := ring.queue.pop_batch()):
                frames = []
                for chain in batch:
                    data = chain.read_all()
                    frames.append((VirtioNetHdr.unpack(data, hs), data[hs:]))
                with self.lock:
                    self.pending += frames
                ring.complete(batch.ids, np.zeros(len(batch), dtype=np.int64))
                del batch
            rx = self.active.get(RX)
            if rx is not None:
                with rx.lock:
                    self._deliver(rx)
        elif ring.index == RX:
            self._deliver(ring)

    def _deliver(self, rx: ActiveRing) -> None:
        """Fill receive buffers with pending frames (caller holds ``rx.lock``)."""
        hs = self.hdr_size
        mrg = bool(self.acked_features & NF.MRG_RXBUF)
        with self.lock:
            # take every posted buffer, so that the ring has nothing pending for the worker
            self.stash += list(rx.queue.pop_batch())
            while self.pending:
                if not self.stash:
                    return
                hdr, frame = self.pending[0]
                room = 0
                take = 0
                for chain in self.stash:
                    take += 1
                    room += chain.writable_len
                    if room >= hs + len(frame) or not mrg:
                        break
                if room < hs + len(frame):
                    if len(self.stash) == take and mrg:
                        return  # wait for more buffers
                    # a receive buffer too small for the frame (no MRG_RXBUF): drop it
                    del self.pending[0]
                    continue
                chains = self.stash[:take]
                lens = fill_mergeable(chains, frame, hdr, hs) if hs >= 12 else None
                if lens is None:  # legacy header: no num_buffers field
                    data = hdr.pack(hs) + frame
                    lens = [chains[0].write(data)]
                del self.stash[:take]
                del self.pending[0]
                self.echoed += 1  # counted before the driver can see the frame
                rx.complete([c.id for c in chains], lens)
