"""The values a lab file describes: bridges, namespaces, guests and their NICs, steps.

All frozen. :mod:`vhostkit.lab.spec` builds them from a checked file; the runner reads them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "IFNAME_MAX",
    "SWAPPABLE",
    "Bridge",
    "Disk",
    "Guest",
    "GuestKind",
    "Lab",
    "Link",
    "Namespace",
    "Nic",
    "Plane",
    "Step",
    "StepKind",
]

IFNAME_MAX = 15  # IFNAMSIZ - 1


class Plane(StrEnum):
    """Which data plane serves a NIC's rings."""

    #: kernel vhost-net on a tap (a virtual guest's own VMM, or QEMU's ``vhost=on``)
    KERNEL = "kernel"
    #: the vhostkit net back-end daemon on a tap, over vhost-user
    VHOSTKIT = "vhostkit"
    #: the vhostkit net back-end daemon with the rings handed to kernel vhost-net
    OFFLOAD = "offload"


class GuestKind(StrEnum):
    """What plays the guest."""

    #: vhostkit's userspace virtio-net driver with a small IP responder, in its own process
    VIRTUAL = "virtual"
    #: QEMU (TCG) booting Debian's kernel, commands run inside it
    LINUX = "linux"


class StepKind(StrEnum):
    """What a step does."""

    PING = "ping"
    STREAM = "stream"
    STOP = "stop"
    TCP = "tcp"
    SWAP = "swap"
    RESTART_BACKEND = "restart-backend"
    LINK = "link"
    WAIT = "wait"
    RUN = "run"


#: The planes a NIC may be moved between by a ``swap`` step, by guest kind. A swap happens
#: inside the vhostkit net back-end, through its control socket: its user plane (``vhostkit``)
#: and kernel offload (``offload``) serve the same vhost-user connection, so the guest, virtual
#: or QEMU, sees nothing. A NIC on plane ``kernel`` (the guest's own vhost-net) has no back-end
#: process to move it, and QEMU cannot change its netdev type while it runs.
SWAPPABLE: Mapping[GuestKind, frozenset[Plane]] = {
    GuestKind.VIRTUAL: frozenset({Plane.VHOSTKIT, Plane.OFFLOAD}),
    GuestKind.LINUX: frozenset({Plane.VHOSTKIT, Plane.OFFLOAD}),
}


# --- the values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bridge:
    """A Linux bridge in the lab's network namespace; ``address`` is its own, if any."""

    name: str
    address: ipaddress.IPv4Interface | None = None
    mtu: int | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """One veth pair from a namespace into a bridge; ``dhcp`` is a range served on it."""

    bridge: str
    address: ipaddress.IPv4Interface | None = None
    mtu: int | None = None
    dhcp: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None


@dataclass(frozen=True, slots=True)
class Namespace:
    """A network namespace standing in for a host on the lab's network."""

    name: str
    links: tuple[Link, ...] = ()
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Nic:
    """A guest's virtio-net NIC: its bridge, data plane and addresses."""

    bridge: str
    plane: Plane = Plane.VHOSTKIT
    address: ipaddress.IPv4Interface | None = None
    mac: str | None = None
    queues: int = 1
    offloads: bool = True
    dhcp: bool = False


@dataclass(frozen=True, slots=True)
class Disk:
    """A linux guest's virtio-blk disk, served by the vhostkit blk back-end from a file."""

    size: int
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Guest:
    """A guest with its NICs (and, for linux guests, disks)."""

    name: str
    kind: GuestKind
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    memory: int = 256 << 20
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One step: its kind, its name, its parameters and its expectations.

    ``params`` and ``expect`` hold the checked values of the keys :data:`STEP_KEYS` allows for
    the kind (defaults filled in); ``at`` is the time (seconds since the lab started) the step
    waits for before it runs, if given.
    """

    kind: StepKind
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    expect: Mapping[str, float] = field(default_factory=dict)
    at: float | None = None
    background: bool = False
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Lab:
    """A whole checked lab file."""

    name: str
    path: str
    summary: str = ""
    timeout: float = 300.0
    bridges: tuple[Bridge, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    guests: tuple[Guest, ...] = ()
    steps: tuple[Step, ...] = ()

    def guest(self, name: str) -> Guest:
        """The guest called ``name`` (``KeyError`` if there is none)."""
        for guest in self.guests:
            if guest.name == name:
                return guest
        raise KeyError(name)

    @property
    def needs_kernel_vhost(self) -> bool:
        """True when some NIC uses kernel vhost-net, now or after a swap."""
        planes = {nic.plane for guest in self.guests for nic in guest.nics}
        planes |= {Plane(step.params["to"]) for step in self.steps if step.kind is StepKind.SWAP}
        return bool(planes & {Plane.KERNEL, Plane.OFFLOAD})

    @property
    def needs_qemu(self) -> bool:
        """True when a linux guest is booted."""
        return any(guest.kind is GuestKind.LINUX for guest in self.guests)
