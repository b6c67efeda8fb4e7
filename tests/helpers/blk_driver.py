"""Test-only helpers around :class:`vhostkit.guest.blk.BlkDriver` (the driver itself lives in
the library): the image size the blk tests use, a recognisable data pattern, and a wait on
an eventfd that also resets it."""

from __future__ import annotations

import os
import select

#: Size of the disk images the blk tests create.
IMAGE_SIZE = 4 << 20


def wait_readable(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for an eventfd; reset it and return True if it fired."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


def pattern(nbytes: int, seed: int) -> bytes:
    """``nbytes`` of data that differs with ``seed`` and with the offset."""
    return bytes((i * 7 + seed) & 0xFF for i in range(nbytes))
