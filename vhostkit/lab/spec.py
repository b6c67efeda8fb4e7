"""The lab file format: what a lab describes, and every check a lab file must pass.

A lab is a TOML file (``labs/README.md`` documents it with a complete example). It has:

* ``[lab]``: the name, a summary, a time limit;
* ``[[bridge]]``: Linux bridges, optionally with a host address;
* ``[[namespace]]``: network namespaces joined to bridges by veth pairs (``[[namespace.link]]``),
  optionally serving DHCP on a link;
* ``[[guest]]``: guests, ``virtual`` (vhostkit plays the guest) or ``linux`` (QEMU boots a
  kernel), each with NICs (``[[guest.nic]]``) on a bridge and a data plane (``kernel``,
  ``vhostkit`` or ``offload``), and for linux guests disks (``[[guest.disk]]``);
* ``[[step]]``: what happens, in order: traffic, swaps, back-end restarts, link changes, waits,
  commands; a step that measures something can carry ``expect`` limits.

:func:`load_lab` parses and checks a file and returns a :class:`Lab` (frozen values all the way
down) or raises :class:`~vhostkit.lab.errors.LabFileError` listing every mistake with its line
and key, and what would be right.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vhostkit.lab.errors import LabFileError, LabIssue
from vhostkit.lab.locate import KeyPath, key_lines, line_of

__all__ = [
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
    "load_lab",
    "parse_lab",
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


#: The planes a NIC may be moved between by a ``swap`` step, by guest kind. A virtual guest's
#: own VMM can hand its rings to any plane; QEMU cannot change its netdev type while it runs,
#: so a linux guest can only move inside the vhostkit back-end (user plane <-> kernel offload).
SWAPPABLE: Mapping[GuestKind, frozenset[Plane]] = {
    GuestKind.VIRTUAL: frozenset({Plane.KERNEL, Plane.VHOSTKIT, Plane.OFFLOAD}),
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


# --- checking ---------------------------------------------------------------------------------

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_SIZE = re.compile(r"^(\d+)\s*([KMG]i?B?|)$", re.IGNORECASE)


class _Checker:
    """Collects issues while the parsed document is turned into values."""

    def __init__(self, path: str, lines: Mapping[KeyPath, int]) -> None:
        self.path = path
        self.lines = lines
        self.issues: list[LabIssue] = []

    def issue(self, where: KeyPath, message: str) -> None:
        self.issues.append(LabIssue(self.path, line_of(self.lines, where), _dotted(where), message))

    def line(self, where: KeyPath) -> int | None:
        return line_of(self.lines, where)

    def table(
        self, where: KeyPath, value: object, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        """``value`` as a table whose keys are all ``allowed`` and include ``required``."""
        if not isinstance(value, dict):
            self.issue(where, f"must be a table, not {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.issue((*where, key), _unknown_key(key, allowed))
        for key in required:
            if key not in value:
                self.issue(where, f"missing required key '{key}'")
        return value

    def get(
        self,
        where: KeyPath,
        table: Mapping[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """``table[key]`` if it is of ``kind`` and passes ``check``; else ``default`` (noted)."""
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            shown = [k for k in kinds if not (k is int and float in kinds)]
            names = " or ".join(_TYPE_NAMES[k] for k in shown)
            self.issue((*where, key), f"must be {names}, not {_kind(value)} ({value!r})")
            return default
        if check is not None and (problem := check(value)) is not None:
            self.issue((*where, key), problem)
            return default
        return value

    def array(self, where: KeyPath, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        """``doc[key]`` as an array of tables (``[[key]]``)."""
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.issue((*where, key), f"must be an array of tables ([[{key}]]), not {_kind(value)}")
            return []
        return value


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a table",
    list: "an array",
}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint} (allowed here: {', '.join(sorted(allowed))})"


def _one_of(choices: Sequence[str]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        close = difflib.get_close_matches(value, list(choices), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"'{value}' is not one of {', '.join(choices)}{hint}"

    return check


def _name(value: str) -> str | None:
    if not _NAME.match(value):
        return f"'{value}' must be lower-case letters, digits and '-', starting with a letter"
    if len(value) > 12:
        return f"'{value}' is longer than 12 characters (interface names are built from it)"
    return None


def _ifname(value: str) -> str | None:
    if not _NAME.match(value) or len(value) > IFNAME_MAX:
        return f"'{value}' is not a usable interface name (a-z, 0-9, '-', at most {IFNAME_MAX})"
    return None


def _cidr(value: str) -> str | None:
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        return f"'{value}' is not an IPv4 address with a prefix length, like 10.77.0.2/24"
    if "/" not in value:
        return f"'{value}' needs a prefix length, like {value}/24"
    if not iface.ip.is_private or iface.ip.is_loopback:
        return f"'{value}' is not a private address: labs never use addresses of other hosts"
    return None


def _mac(value: str) -> str | None:
    if not _MAC.match(value):
        return f"'{value}' is not a MAC address like 02:00:00:00:00:01 (lower-case hex)"
    if int(value[:2], 16) & 1:
        return f"'{value}' is a multicast address; the first byte must be even"
    return None


def _dhcp_range(value: str) -> str | None:
    try:
        start, end = (ipaddress.IPv4Address(part.strip()) for part in value.split("-"))
    except ValueError:
        return f"'{value}' is not an address range like 10.77.0.100-10.77.0.150"
    if int(end) < int(start):
        return f"'{value}' ends before it starts"
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else f"{value} must be greater than 0"


def _at_least(low: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if value >= low else f"{value} must be at least {low}"

    return check


def _between(low: float, high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"{value} must be between {low} and {high}"

    return check


def parse_size(value: str | int) -> int:
    """``"64M"``, ``"1GiB"``, ``"512K"`` or a plain byte count, in bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a size like 64M or 1G")
    unit = m.group(2)[:1].upper()
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def _size(value: str | int) -> str | None:
    try:
        size = parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None if size > 0 else "a size must be greater than 0"


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


# --- the step kinds ---------------------------------------------------------------------------

#: For each step kind: its parameter keys as (name, type, default, check), and the expectation
#: keys it can measure.
_NUM = (int, float)
STEP_KEYS: Mapping[StepKind, tuple[tuple[tuple[str, Any, Any, Any], ...], tuple[str, ...]]] = {
    StepKind.PING: (
        (
            ("from", str, None, None),
            ("to", str, None, None),
            ("count", int, 10, _positive),
            ("interval", _NUM, 0.1, _positive),
            ("timeout", _NUM, 2.0, _positive),
        ),
        ("loss_max",),
    ),
    StepKind.STREAM: (
        (
            ("from", str, None, None),
            ("to", str, None, None),
            ("rate", _NUM, 1000, _positive),
            ("frames", int, None, _positive),
            ("duration", _NUM, None, _positive),
            ("size", int, 128, _between(64, 1500)),
        ),
        ("lost_max", "duplicates_max", "reordered_max", "received_min"),
    ),
    StepKind.STOP: (
        (("step", str, None, None),),
        ("lost_max", "duplicates_max", "reordered_max", "received_min"),
    ),
    StepKind.TCP: (
        (
            ("from", str, None, None),
            ("to", str, None, None),
            ("bytes", (int, str), "64M", _size),
            ("port", int, 5201, _between(1024, 65535)),
        ),
        ("throughput_min",),
    ),
    StepKind.SWAP: (
        (
            ("guest", str, None, None),
            ("nic", int, 0, _at_least(0)),
            ("to", str, None, _one_of([p.value for p in Plane])),
        ),
        ("pause_max",),
    ),
    StepKind.RESTART_BACKEND: (
        (
            ("guest", str, None, None),
            ("nic", int, None, _at_least(0)),
            ("disk", int, None, _at_least(0)),
            ("signal", str, "KILL", _one_of(["KILL", "TERM"])),
        ),
        (),
    ),
    StepKind.LINK: (
        (
            ("guest", str, None, None),
            ("nic", int, 0, _at_least(0)),
            ("bridge", str, None, None),
            ("state", str, None, _one_of(["up", "down"])),
        ),
        (),
    ),
    StepKind.WAIT: ((("seconds", _NUM, None, _positive),), ()),
    StepKind.RUN: (
        (
            ("guest", str, None, None),
            ("command", str, None, None),
            ("timeout", _NUM, 60.0, _positive),
        ),
        ("exit_code", "output_matches"),
    ),
}

#: Keys every step may have besides its kind's.
_COMMON_STEP_KEYS = ("do", "name", "at", "background", "expect")
#: Parameters each kind cannot do without.
_REQUIRED: Mapping[StepKind, tuple[str, ...]] = {
    StepKind.PING: ("from", "to"),
    StepKind.STREAM: ("from", "to"),
    StepKind.STOP: ("step",),
    StepKind.TCP: ("from", "to"),
    StepKind.SWAP: ("guest", "to"),
    StepKind.RESTART_BACKEND: ("guest",),
    StepKind.LINK: ("state",),
    StepKind.WAIT: ("seconds",),
    StepKind.RUN: ("guest", "command"),
}
#: Kinds that may run in the background (``background = true``), stopped by a ``stop`` step.
_BACKGROUND = frozenset({StepKind.PING, StepKind.STREAM})


# --- the whole file ---------------------------------------------------------------------------


def load_lab(path: str | Path) -> Lab:
    """Read, parse and check the lab file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabFileError(
            [LabIssue(str(path), None, "", f"cannot read the file: {exc}")]
        ) from None
    return parse_lab(text, str(path))


def parse_lab(text: str, path: str = "<lab>") -> Lab:
    """Parse and check the TOML ``text`` of a lab file (``path`` names it in messages)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = int(m.group(1)) if m else None
        raise LabFileError([LabIssue(path, line, "", f"not valid TOML: {exc}")]) from None
    c = _Checker(path, key_lines(text))
    top = c.table((), doc, ("lab", "bridge", "namespace", "guest", "step"), ("lab",)) or {}
    head = c.table(("lab",), top.get("lab", {}), ("name", "summary", "timeout"), ("name",)) or {}
    name = c.get(("lab",), head, "name", str, "", _name) or ""
    summary = c.get(("lab",), head, "summary", str, "")
    timeout = float(c.get(("lab",), head, "timeout", _NUM, 300.0, _positive))

    bridges = _bridges(c, top)
    namespaces = _namespaces(c, top)
    guests = _guests(c, top)
    names: dict[str, KeyPath] = {}
    for where, item in (
        *((("bridge", i), b.name) for i, b in enumerate(bridges)),
        *((("namespace", i), n.name) for i, n in enumerate(namespaces)),
        *((("guest", i), g.name) for i, g in enumerate(guests)),
    ):
        if not item:
            continue
        if item in names:
            c.issue((*where, "name"), f"'{item}' is already the name of {_dotted(names[item])}")
        names[item] = where
    bridge_names = {b.name for b in bridges}
    for i, ns in enumerate(namespaces):
        for j, link in enumerate(ns.links):
            _check_bridge(c, ("namespace", i, "link", j, "bridge"), link.bridge, bridge_names)
    for i, guest in enumerate(guests):
        for j, nic in enumerate(guest.nics):
            _check_bridge(c, ("guest", i, "nic", j, "bridge"), nic.bridge, bridge_names)
    steps = _steps(c, top, guests, namespaces)
    if c.issues:
        raise LabFileError(c.issues)
    return Lab(name, path, summary, timeout, bridges, namespaces, guests, steps)


def _check_bridge(c: _Checker, where: KeyPath, name: str, bridges: set[str]) -> None:
    if name and name not in bridges:
        known = ", ".join(sorted(bridges)) or "none: add a [[bridge]] table"
        c.issue(where, f"no bridge called '{name}' (bridges: {known})")


def _bridges(c: _Checker, top: Mapping[str, Any]) -> tuple[Bridge, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "bridge")):
        at: KeyPath = ("bridge", i)
        t = c.table(at, raw, ("name", "address", "mtu"), ("name",)) or {}
        address = c.get(at, t, "address", str, None, _cidr)
        out.append(
            Bridge(
                name=c.get(at, t, "name", str, "", _ifname),
                address=ipaddress.IPv4Interface(address) if address else None,
                mtu=c.get(at, t, "mtu", int, None, _between(68, 65535)),
                line=c.line(at),
            )
        )
    return tuple(out)


def _namespaces(c: _Checker, top: Mapping[str, Any]) -> tuple[Namespace, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "namespace")):
        at: KeyPath = ("namespace", i)
        t = c.table(at, raw, ("name", "link"), ("name",)) or {}
        links = []
        for j, rl in enumerate(c.array(at, t, "link")):
            lat: KeyPath = (*at, "link", j)
            lt = c.table(lat, rl, ("bridge", "address", "mtu", "dhcp"), ("bridge",)) or {}
            address = c.get(lat, lt, "address", str, None, _cidr)
            dhcp = c.get(lat, lt, "dhcp", str, None, _dhcp_range)
            if dhcp and not address:
                c.issue((*lat, "dhcp"), "a link that serves DHCP needs an 'address' of its own")
            links.append(
                Link(
                    bridge=c.get(lat, lt, "bridge", str, ""),
                    address=ipaddress.IPv4Interface(address) if address else None,
                    mtu=c.get(lat, lt, "mtu", int, None, _between(68, 65535)),
                    dhcp=_range(dhcp) if dhcp else None,
                )
            )
        if not links and "link" not in t:
            c.issue(at, "a namespace needs at least one [[namespace.link]] to a bridge")
        out.append(Namespace(c.get(at, t, "name", str, "", _name), tuple(links), c.line(at)))
    return tuple(out)


def _range(value: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    start, end = (ipaddress.IPv4Address(part.strip()) for part in value.split("-"))
    return start, end


def _guests(c: _Checker, top: Mapping[str, Any]) -> tuple[Guest, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "guest")):
        at: KeyPath = ("guest", i)
        t = c.table(at, raw, ("name", "kind", "memory", "nic", "disk"), ("name", "kind")) or {}
        kind_text = c.get(at, t, "kind", str, None, _one_of([k.value for k in GuestKind]))
        kind = GuestKind(kind_text) if kind_text else GuestKind.VIRTUAL
        nics = []
        for j, rn in enumerate(c.array(at, t, "nic")):
            nat: KeyPath = (*at, "nic", j)
            keys = ("bridge", "plane", "address", "mac", "queues", "offloads", "dhcp")
            nt = c.table(nat, rn, keys, ("bridge",)) or {}
            plane = c.get(nat, nt, "plane", str, "vhostkit", _one_of([p.value for p in Plane]))
            address = c.get(nat, nt, "address", str, None, _cidr)
            dhcp = c.get(nat, nt, "dhcp", bool, False)
            if dhcp and kind is not GuestKind.LINUX:
                c.issue((*nat, "dhcp"), "only a linux guest runs a DHCP client; give an address")
            if dhcp and address:
                c.issue((*nat, "dhcp"), "a NIC takes either an 'address' or 'dhcp = true'")
            nics.append(
                Nic(
                    bridge=c.get(nat, nt, "bridge", str, ""),
                    plane=Plane(plane),
                    address=ipaddress.IPv4Interface(address) if address else None,
                    mac=c.get(nat, nt, "mac", str, None, _mac),
                    queues=c.get(nat, nt, "queues", int, 1, _between(1, 8)),
                    offloads=c.get(nat, nt, "offloads", bool, True),
                    dhcp=dhcp,
                )
            )
        if not nics and "nic" not in t:
            c.issue(at, "a guest needs at least one [[guest.nic]]")
        disks = []
        for j, rd in enumerate(c.array(at, t, "disk")):
            dat: KeyPath = (*at, "disk", j)
            if kind is not GuestKind.LINUX:
                c.issue(dat, "only a linux guest has disks")
            dt = c.table(dat, rd, ("size", "read_only"), ("size",)) or {}
            size = c.get(dat, dt, "size", (int, str), "64M", _size)
            disks.append(Disk(parse_size(size), c.get(dat, dt, "read_only", bool, False)))
        memory = c.get(at, t, "memory", (int, str), "256M", _size)
        if "memory" in t and kind is not GuestKind.LINUX:
            c.issue((*at, "memory"), "only a linux guest has a memory size")
        out.append(
            Guest(
                name=c.get(at, t, "name", str, "", _name),
                kind=kind,
                nics=tuple(nics),
                disks=tuple(disks),
                memory=parse_size(memory),
                line=c.line(at),
            )
        )
    return tuple(out)


def _steps(
    c: _Checker,
    top: Mapping[str, Any],
    guests: Sequence[Guest],
    namespaces: Sequence[Namespace],
) -> tuple[Step, ...]:
    by_name = {g.name: g for g in guests}
    hosts = {n.name for n in namespaces} | set(by_name)
    out: list[Step] = []
    background: set[str] = set()
    for i, raw in enumerate(c.array((), top, "step")):
        at: KeyPath = ("step", i)
        if not isinstance(raw, dict) or "do" not in raw:
            c.issue(at, f"a step needs 'do', one of: {', '.join(k.value for k in StepKind)}")
            continue
        kind_text = c.get(at, raw, "do", str, None, _one_of([k.value for k in StepKind]))
        if kind_text is None:
            continue
        kind = StepKind(kind_text)
        spec, measures = STEP_KEYS[kind]
        allowed = (*_COMMON_STEP_KEYS, *(key for key, *_ in spec))
        t = c.table(at, raw, allowed, _REQUIRED[kind]) or {}
        params = {key: c.get(at, t, key, typ, default, check) for key, typ, default, check in spec}
        name = c.get(at, t, "name", str, f"{kind.value}-{i + 1}", _name)
        if name in {s.name for s in out}:
            c.issue((*at, "name"), f"'{name}' is already the name of an earlier step")
        at_time = c.get(at, t, "at", _NUM, None, _at_least(0))
        bg = c.get(at, t, "background", bool, False)
        if bg and kind not in _BACKGROUND:
            c.issue((*at, "background"), f"a '{kind.value}' step cannot run in the background")
        expect = _expectations(c, at, t, kind, measures, bg)
        _check_step_refs(c, at, kind, params, by_name, hosts, background)
        if bg:
            background.add(name)
        out.append(Step(kind, name, params, expect, at_time, bool(bg), c.line(at)))
    return tuple(out)


def _expectations(
    c: _Checker,
    at: KeyPath,
    t: Mapping[str, Any],
    kind: StepKind,
    measures: Sequence[str],
    background: bool,
) -> dict[str, Any]:
    if "expect" not in t:
        return {}
    where = (*at, "expect")
    if not measures:
        c.issue(where, f"a '{kind.value}' step measures nothing it could expect")
        return {}
    if background:
        c.issue(where, "a background step is measured by the 'stop' step that ends it")
        return {}
    raw = c.table(where, t["expect"], measures) or {}
    out: dict[str, Any] = {}
    for key in raw:
        if key not in measures:
            continue
        if key == "output_matches":
            value = c.get(where, raw, key, str, None, _regex)
        elif key == "loss_max":
            value = c.get(where, raw, key, _NUM, None, _between(0, 100))
        else:
            value = c.get(where, raw, key, _NUM, None, _at_least(0))
        if value is not None:
            out[key] = value
    return out


def _check_step_refs(
    c: _Checker,
    at: KeyPath,
    kind: StepKind,
    params: Mapping[str, Any],
    guests: Mapping[str, Guest],
    hosts: set[str],
    background: set[str],
) -> None:
    """Check that a step names guests, NICs, disks and steps that exist and can do it."""

    def known(key: str, names: set[str], what: str) -> bool:
        value = params.get(key)
        if value is None or value in names:
            return value is not None
        c.issue((*at, key), f"no {what} called '{value}' ({what}s: {', '.join(sorted(names))})")
        return False

    def address_or_host(key: str) -> None:
        value = params.get(key)
        if value is None or value in hosts:
            return
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            listed = ", ".join(sorted(hosts))
            c.issue((*at, key), f"'{value}' is neither a guest or namespace ({listed}) nor an IP")

    if kind in (StepKind.PING, StepKind.STREAM, StepKind.TCP):
        known("from", hosts, "guest or namespace")
        address_or_host("to")
        sender = guests.get(params.get("from") or "")
        if kind is StepKind.STREAM and params.get("from") in hosts and sender is None:
            c.issue((*at, "from"), "a stream is sent by a virtual guest, not a namespace")
        if kind is StepKind.STREAM and sender is not None and sender.kind is not GuestKind.VIRTUAL:
            c.issue((*at, "from"), "a stream is sent by a virtual guest (use 'tcp' for linux)")
        if kind is StepKind.TCP and sender is not None and sender.kind is GuestKind.VIRTUAL:
            c.issue((*at, "from"), "a virtual guest has no TCP stack; use 'stream'")
        if kind is StepKind.STREAM and params.get("frames") and params.get("duration"):
            c.issue((*at, "duration"), "give 'frames' or 'duration', not both")
    if kind is StepKind.STOP:
        target = params.get("step")
        if target is not None and target not in background:
            earlier = ", ".join(sorted(background)) or "none"
            c.issue((*at, "step"), f"no earlier background step '{target}' (running: {earlier})")
        elif target is not None:
            background.discard(target)
    if kind in (StepKind.SWAP, StepKind.RESTART_BACKEND, StepKind.LINK, StepKind.RUN):
        if kind is StepKind.LINK and params.get("guest") is None:
            if params.get("bridge") is None:
                c.issue(at, "a 'link' step names a 'guest' (and 'nic') or a 'bridge'")
            return
        if not known("guest", set(guests), "guest"):
            return
        guest = guests[params["guest"]]
        if kind is StepKind.RUN and guest.kind is not GuestKind.LINUX:
            c.issue((*at, "guest"), f"'{guest.name}' is a virtual guest: it has no shell")
        if kind is StepKind.RESTART_BACKEND:
            _check_restart(c, at, params, guest)
            return
        if kind in (StepKind.SWAP, StepKind.LINK):
            nic_index = params.get("nic", 0)
            if nic_index is None or not guest.nics:
                return
            if nic_index >= len(guest.nics):
                c.issue((*at, "nic"), f"'{guest.name}' has {len(guest.nics)} NIC(s)")
                return
            nic = guest.nics[nic_index]
            if kind is StepKind.SWAP and params.get("to"):
                _check_swap(c, at, guest, nic, Plane(params["to"]))


def _check_swap(c: _Checker, at: KeyPath, guest: Guest, nic: Nic, to: Plane) -> None:
    planes = SWAPPABLE[guest.kind]
    if nic.plane not in planes or to not in planes:
        allowed = " and ".join(sorted(p.value for p in planes))
        c.issue(
            (*at, "to"),
            f"a {guest.kind.value} guest's NIC can only be swapped between {allowed} "
            f"(this NIC starts on {nic.plane.value})",
        )


def _check_restart(c: _Checker, at: KeyPath, params: Mapping[str, Any], guest: Guest) -> None:
    nic_index, disk_index = params.get("nic"), params.get("disk")
    if (nic_index is None) == (disk_index is None):
        c.issue(at, "a 'restart-backend' step names one 'nic' or one 'disk'")
        return
    if disk_index is not None:
        if disk_index >= len(guest.disks):
            c.issue((*at, "disk"), f"'{guest.name}' has {len(guest.disks)} disk(s)")
        return
    if nic_index is None:
        return
    if nic_index >= len(guest.nics):
        c.issue((*at, "nic"), f"'{guest.name}' has {len(guest.nics)} NIC(s)")
    elif guest.nics[nic_index].plane is Plane.KERNEL:
        c.issue((*at, "nic"), "this NIC is on kernel vhost-net: it has no back-end process")
