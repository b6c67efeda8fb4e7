"""atheris harness: :class:`BackendReqServer` serving a real device over a real socketpair.

The input is a list of records ``[length u8][fd mask u8][bytes]``: each record goes to the
server in one ``sendmsg`` with one fd per set mask bit (an eventfd, a memfd holding guest
memory, a pipe end, a socket, /dev/null, ...). The first input byte picks the device (sink,
echo, or blk on a scratch image). After the records the front-end's side shuts down; the
server must end. Findings (raised as exceptions):

* the server ends with anything but nothing or a :class:`VhostError`, or does not end;
* a reply that does not decode as a reply;
* fds, memfd mappings or threads left behind once the connection is gone.

Run: ``python3 fuzz/fuzz_server.py -atheris_runs=20000`` (or ``-max_total_time=SECONDS``).
"""

from __future__ import annotations

import array
import atexit
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading

from _common import fd_count, instrumented, memfd_maps, run

with instrumented():
    from vhostkit.devices.blk import BlkDevice
    from vhostkit.devices.echo import EchoDevice
    from vhostkit.errors import Disconnected, SocketBroken, VhostError
    from vhostkit.user.backend.device import BackendDevice
    from vhostkit.user.backend.ring_device import SinkDevice
    from vhostkit.user.backend_req_handler import BackendReqServer
    from vhostkit.user.connection import Connection
    from vhostkit.virtio.features import VirtioFeature as VF

HANG = 20.0
PAGE = os.sysconf("SC_PAGE_SIZE")
_SCRATCH = tempfile.mkdtemp(prefix="vhk-fuzz-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
_IMAGE = os.path.join(_SCRATCH, "disk.img")
with open(_IMAGE, "wb") as _f:
    _f.truncate(1 << 20)


class _Untyped(logging.Handler):
    """Keeps log records that carry an exception other than a VhostError (a ring worker that
    died of one logs it); the server's warnings about refused requests go nowhere."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not isinstance(record.exc_info[1], VhostError):
            self.found.append(self.format(record))


_UNTYPED = _Untyped()
logging.getLogger("vhostkit").addHandler(_UNTYPED)


def _device(choice: int) -> BackendDevice:
    match choice % 3:
        case 0:
            return SinkDevice(features=int(VF.VERSION_1 | VF.RING_PACKED), num_queues=2)
        case 1:
            return EchoDevice()
    return BlkDevice(_IMAGE, num_queues=2, max_queue_size=256)


def _fd_pool() -> list[int]:
    """The fds records may carry (the harness owns them; the server gets duplicates)."""
    guest = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
    os.ftruncate(guest, 16 * PAGE)
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return [os.eventfd(0, flags), guest, os.eventfd(0, flags), r, w, a.detach(), b.detach(), null]


def _records(data: bytes) -> list[tuple[bytes, int]]:
    out = []
    pos = 0
    while pos + 2 <= len(data):
        length, mask = data[pos], data[pos + 1]
        out.append((data[pos + 2 : pos + 2 + length], mask))
        pos += 2 + length
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    before = (fd_count(), memfd_maps(), threading.active_count())
    device = _device(data[0])
    pool = _fd_pool()
    client, server_end = Connection.pair()
    server = BackendReqServer(server_end, device)
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            server.serve()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for body, mask in _records(data[1:]):
            fds = [fd for bit, fd in enumerate(pool) if mask >> bit & 1]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                client.sock.sendmsg([body or b"\0"], anc)
            except OSError:
                break  # the server closed on a violation
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while True:
            try:
                reply = client.recv(timeout=HANG)
            except (Disconnected, SocketBroken):
                break
            reply.close_fds()
            if not reply.is_reply:
                raise AssertionError(f"the server sent a request: {reply.request.name}")
        thread.join(HANG)
        if thread.is_alive():
            raise AssertionError("the server hangs after the front-end left")
        (result,) = outcome
        if result is not None and not isinstance(result, VhostError):
            raise AssertionError(f"the server raised {result!r}") from result
    finally:
        client.close()
        device.close()
        for fd in pool:
            os.close(fd)
    after = (fd_count(), memfd_maps(), threading.active_count())
    if after != before:
        import gc

        gc.collect()
        after = (fd_count(), memfd_maps(), threading.active_count())
    if after != before:
        raise AssertionError(f"(fds, memfd maps, threads) {before} before, {after} after")
    if _UNTYPED.found:
        raise AssertionError("untyped exception logged:\n" + "\n".join(_UNTYPED.found))


if __name__ == "__main__":
    run(one_input)
    sys.exit(0)
