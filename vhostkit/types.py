"""The values every data plane exchanges: memory regions, ring addresses, ring states.

They are plain frozen dataclasses with range checks and no behaviour, shared by
:mod:`vhostkit.backend` (the :class:`~vhostkit.backend.VhostBackend` interface), the vhost-user
codec (:mod:`vhostkit.user.message`), guest memory and the rings, so that none of those has to
import another to speak about a region or a ring.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostkit.errors import InvalidParam

__all__ = [
    "VHOST_VRING_F_LOG",
    "LogRegion",
    "MemoryRegion",
    "VringAddr",
    "VringState",
]

#: ``VringAddr.flags`` bit: log writes to the used ring (``VHOST_VRING_F_LOG``).
VHOST_VRING_F_LOG = 1 << 0

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64:
        raise InvalidParam(f"{name}={value:#x} does not fit in 64 bits")


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of guest memory, as the VMM sees it.

    ``fd`` is the file (usually a memfd) that backs the region; vhost-user needs it to share the
    memory with the backend, the kernel ignores it. ``mmap_offset`` is where the region starts in
    that file.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int = 0
    fd: int | None = None

    def __post_init__(self) -> None:
        _check_u64("guest_phys_addr", self.guest_phys_addr)
        _check_u64("userspace_addr", self.userspace_addr)
        _check_u64("mmap_offset", self.mmap_offset)
        if not 0 < self.memory_size <= _U64:
            raise InvalidParam(f"memory_size={self.memory_size} must be positive")
        if self.guest_phys_addr + self.memory_size - 1 > _U64:
            raise InvalidParam("region wraps around the 64-bit guest address space")
        if self.userspace_addr + self.memory_size - 1 > _U64:
            raise InvalidParam("region wraps around the 64-bit user address space")

    @property
    def guest_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def user_end(self) -> int:
        """One past the last user address of the region."""
        return self.userspace_addr + self.memory_size


@dataclass(frozen=True, slots=True)
class LogRegion:
    """The dirty-page log shared through a file (vhost-user with LOG_SHMFD)."""

    fd: int
    size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Where a virtqueue's three parts live, in the VMM's own address space.

    For packed rings ``desc`` is the descriptor ring, ``avail`` the driver event suppression area
    and ``used`` the device event suppression area.
    """

    index: int
    desc: int
    used: int
    avail: int
    log: int = 0
    flags: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index <= _U32:
            raise InvalidParam(f"ring index {self.index} out of range")
        for name in ("desc", "used", "avail", "log"):
            _check_u64(name, getattr(self, name))
        if not 0 <= self.flags <= _U32:
            raise InvalidParam(f"flags {self.flags:#x} out of range")


@dataclass(frozen=True, slots=True)
class VringState:
    """A ring index with a number: the ring size, or a ring position."""

    index: int
    num: int

    def __post_init__(self) -> None:
        if not 0 <= self.index <= _U32 or not 0 <= self.num <= _U32:
            raise InvalidParam(f"vring state ({self.index}, {self.num}) out of range")
