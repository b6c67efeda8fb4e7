"""vhostkit as the guest: a userspace virtio-vsock driver over kernel vhost-vsock.

Three modules, bottom up:

* :mod:`.wire`: the packet header (:class:`VsockHdr`) and its numbers.
* :mod:`.endpoint`: :class:`VsockEndpoint` is the guest's side of the virtio-vsock stream
  protocol, sans I/O: it takes received packets (:meth:`VsockEndpoint.receive`) and hands out
  the packets to send (:meth:`VsockEndpoint.outgoing`), never touching a ring or a socket. It
  listens on ports, answers OP_REQUEST with OP_RESPONSE (advertising its ``buf_alloc``), takes
  OP_RW data, honours the peer's credit (``peer buf_alloc - (tx_cnt - peer fwd_cnt)``), sends
  CREDIT_UPDATE when the peer would otherwise run out of credit, answers CREDIT_REQUEST,
  handles SHUTDOWN and RST, and answers packets for unknown connections with RST. In echo mode
  a listener's connections send back every byte they receive; once the peer shut down its
  sending side and everything was echoed, the endpoint shuts down too.
* :mod:`.driver`: :class:`VsockDriver` is a :class:`~vhostkit.guest.rings.VirtioGuest` with
  the two rings the kernel serves (RX 0, TX 1; the event queue stays with the VMM): it posts
  receive buffers, feeds what the device puts in them to the endpoint, and puts the
  endpoint's packets into transmit buffers. On :class:`~vhostkit.kernel.VhostVsock` it sets
  the guest CID and SET_RUNNING 1 once the rings are set up, and SET_RUNNING 0 in
  :meth:`VirtioGuest.stop`.

Packet layout (``struct virtio_vsock_hdr``, 44 bytes, little-endian): src_cid u64, dst_cid u64,
src_port u32, dst_port u32, len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32;
``len`` payload bytes follow in the same buffer.

Kernel quirks (Linux 6.1's vhost-vsock): a packet bigger than a receive buffer is split over
several buffers, each with its own header; the device drops transmitted packets whose source
CID is not the guest's or whose destination is not the host (CID 2), and whose buffer holds
fewer payload bytes than ``len`` says.

Script use (inside a machine with ``/dev/vhost-vsock``)::

    python3 -m vhostkit.guest.vsock --cid 3 --port 1234 --echo

then on the same machine ``socat - VSOCK-CONNECT:3:1234`` talks to it; SIGINT or SIGTERM
stops it (SET_RUNNING 0, rings stopped, everything closed).
"""

from vhostkit.guest.vsock.driver import VsockDriver, main
from vhostkit.guest.vsock.endpoint import (
    Connected,
    ConnectionClosed,
    ConnKey,
    DataReceived,
    PeerShutdown,
    VsockConnection,
    VsockEndpoint,
    VsockEvent,
)
from vhostkit.guest.vsock.wire import (
    HDR_SIZE,
    VMADDR_CID_HOST,
    ShutdownFlag,
    VsockHdr,
    VsockOp,
    VsockPacket,
    VsockType,
)

__all__ = [
    "HDR_SIZE",
    "VMADDR_CID_HOST",
    "ConnKey",
    "Connected",
    "ConnectionClosed",
    "DataReceived",
    "PeerShutdown",
    "ShutdownFlag",
    "VsockConnection",
    "VsockDriver",
    "VsockEndpoint",
    "VsockEvent",
    "VsockHdr",
    "VsockOp",
    "VsockPacket",
    "VsockType",
    "main",
]
