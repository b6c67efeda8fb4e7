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

import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vhostkit.lab.checks import (
    Checker,
    at_least,
    between,
    check_cidr,
    check_dhcp_range,
    check_ifname,
    check_mac,
    check_name,
    check_positive,
    check_regex,
    check_size,
    dotted,
    one_of,
    parse_size,
)
from vhostkit.lab.errors import LabFileError, LabIssue
from vhostkit.lab.locate import KeyPath, key_lines
from vhostkit.lab.model import (
    SWAPPABLE,
    Bridge,
    Disk,
    Guest,
    GuestKind,
    Lab,
    Link,
    Namespace,
    Nic,
    Plane,
    Step,
    StepKind,
)

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

# --- the step kinds ---------------------------------------------------------------------------

#: For each step kind: its parameter keys as (name, type, default, check), and the expectation
#: keys it can measure.
_NUM = (int, float)
STEP_KEYS: Mapping[StepKind, tuple[tuple[tuple[str, Any, Any, Any], ...], tuple[str, ...]]] = {
    StepKind.PING: (
        (
            ("from", str, None, None),
            ("to", str, None, None),
            ("count", int, 10, check_positive),
            ("interval", _NUM, 0.1, check_positive),
            ("timeout", _NUM, 2.0, check_positive),
        ),
        ("loss_max",),
    ),
    StepKind.STREAM: (
        (
            ("from", str, None, None),
            ("to", str, None, None),
            ("rate", _NUM, 1000, check_positive),
            ("frames", int, None, check_positive),
            ("duration", _NUM, None, check_positive),
            ("size", int, 128, between(64, 1500)),
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
            ("bytes", (int, str), "64M", check_size),
            ("port", int, 5201, between(1024, 65535)),
        ),
        ("throughput_min",),
    ),
    StepKind.SWAP: (
        (
            ("guest", str, None, None),
            ("nic", int, 0, at_least(0)),
            ("to", str, None, one_of([p.value for p in Plane])),
        ),
        ("pause_max",),
    ),
    StepKind.RESTART_BACKEND: (
        (
            ("guest", str, None, None),
            ("nic", int, None, at_least(0)),
            ("disk", int, None, at_least(0)),
            ("signal", str, "KILL", one_of(["KILL", "TERM"])),
        ),
        (),
    ),
    StepKind.LINK: (
        (
            ("guest", str, None, None),
            ("nic", int, 0, at_least(0)),
            ("bridge", str, None, None),
            ("state", str, None, one_of(["up", "down"])),
        ),
        (),
    ),
    StepKind.WAIT: ((("seconds", _NUM, None, check_positive),), ()),
    StepKind.RUN: (
        (
            ("guest", str, None, None),
            ("command", str, None, None),
            ("timeout", _NUM, 60.0, check_positive),
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
    c = Checker(path, key_lines(text))
    top = c.table((), doc, ("lab", "bridge", "namespace", "guest", "step"), ("lab",)) or {}
    head = c.table(("lab",), top.get("lab", {}), ("name", "summary", "timeout"), ("name",)) or {}
    name = c.get(("lab",), head, "name", str, "", check_name) or ""
    summary = c.get(("lab",), head, "summary", str, "")
    timeout = float(c.get(("lab",), head, "timeout", _NUM, 300.0, check_positive))

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
            c.issue((*where, "name"), f"'{item}' is already the name of {dotted(names[item])}")
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


def _check_bridge(c: Checker, where: KeyPath, name: str, bridges: set[str]) -> None:
    if name and name not in bridges:
        known = ", ".join(sorted(bridges)) or "none: add a [[bridge]] table"
        c.issue(where, f"no bridge called '{name}' (bridges: {known})")


def _bridges(c: Checker, top: Mapping[str, Any]) -> tuple[Bridge, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "bridge")):
        at: KeyPath = ("bridge", i)
        t = c.table(at, raw, ("name", "address", "mtu"), ("name",)) or {}
        address = c.get(at, t, "address", str, None, check_cidr)
        out.append(
            Bridge(
                name=c.get(at, t, "name", str, "", check_ifname),
                address=ipaddress.IPv4Interface(address) if address else None,
                mtu=c.get(at, t, "mtu", int, None, between(68, 65535)),
                line=c.line(at),
            )
        )
    return tuple(out)


def _namespaces(c: Checker, top: Mapping[str, Any]) -> tuple[Namespace, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "namespace")):
        at: KeyPath = ("namespace", i)
        t = c.table(at, raw, ("name", "link"), ("name",)) or {}
        links = []
        for j, rl in enumerate(c.array(at, t, "link")):
            lat: KeyPath = (*at, "link", j)
            lt = c.table(lat, rl, ("bridge", "address", "mtu", "dhcp"), ("bridge",)) or {}
            address = c.get(lat, lt, "address", str, None, check_cidr)
            dhcp = c.get(lat, lt, "dhcp", str, None, check_dhcp_range)
            if dhcp and not address:
                c.issue((*lat, "dhcp"), "a link that serves DHCP needs an 'address' of its own")
            links.append(
                Link(
                    bridge=c.get(lat, lt, "bridge", str, ""),
                    address=ipaddress.IPv4Interface(address) if address else None,
                    mtu=c.get(lat, lt, "mtu", int, None, between(68, 65535)),
                    dhcp=_range(dhcp) if dhcp else None,
                )
            )
        if not links and "link" not in t:
            c.issue(at, "a namespace needs at least one [[namespace.link]] to a bridge")
        out.append(Namespace(c.get(at, t, "name", str, "", check_name), tuple(links), c.line(at)))
    return tuple(out)


def _range(value: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    start, end = (ipaddress.IPv4Address(part.strip()) for part in value.split("-"))
    return start, end


def _guests(c: Checker, top: Mapping[str, Any]) -> tuple[Guest, ...]:
    out = []
    for i, raw in enumerate(c.array((), top, "guest")):
        at: KeyPath = ("guest", i)
        t = c.table(at, raw, ("name", "kind", "memory", "nic", "disk"), ("name", "kind")) or {}
        kind_text = c.get(at, t, "kind", str, None, one_of([k.value for k in GuestKind]))
        kind = GuestKind(kind_text) if kind_text else GuestKind.VIRTUAL
        nics = []
        for j, rn in enumerate(c.array(at, t, "nic")):
            nat: KeyPath = (*at, "nic", j)
            keys = ("bridge", "plane", "address", "mac", "queues", "offloads", "dhcp")
            nt = c.table(nat, rn, keys, ("bridge",)) or {}
            plane = c.get(nat, nt, "plane", str, "vhostkit", one_of([p.value for p in Plane]))
            address = c.get(nat, nt, "address", str, None, check_cidr)
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
                    mac=c.get(nat, nt, "mac", str, None, check_mac),
                    queues=c.get(nat, nt, "queues", int, 1, between(1, 8)),
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
            size = c.get(dat, dt, "size", (int, str), "64M", check_size)
            disks.append(Disk(parse_size(size), c.get(dat, dt, "read_only", bool, False)))
        memory = c.get(at, t, "memory", (int, str), "256M", check_size)
        if "memory" in t and kind is not GuestKind.LINUX:
            c.issue((*at, "memory"), "only a linux guest has a memory size")
        out.append(
            Guest(
                name=c.get(at, t, "name", str, "", check_name),
                kind=kind,
                nics=tuple(nics),
                disks=tuple(disks),
                memory=parse_size(memory),
                line=c.line(at),
            )
        )
    return tuple(out)


def _steps(
    c: Checker,
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
        kind_text = c.get(at, raw, "do", str, None, one_of([k.value for k in StepKind]))
        if kind_text is None:
            continue
        kind = StepKind(kind_text)
        spec, measures = STEP_KEYS[kind]
        allowed = (*_COMMON_STEP_KEYS, *(key for key, *_ in spec))
        t = c.table(at, raw, allowed, _REQUIRED[kind]) or {}
        params = {key: c.get(at, t, key, typ, default, check) for key, typ, default, check in spec}
        name = c.get(at, t, "name", str, f"{kind.value}-{i + 1}", check_name)
        if name in {s.name for s in out}:
            c.issue((*at, "name"), f"'{name}' is already the name of an earlier step")
        at_time = c.get(at, t, "at", _NUM, None, at_least(0))
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
    c: Checker,
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
            value = c.get(where, raw, key, str, None, check_regex)
        elif key == "loss_max":
            value = c.get(where, raw, key, _NUM, None, between(0, 100))
        else:
            value = c.get(where, raw, key, _NUM, None, at_least(0))
        if value is not None:
            out[key] = value
    return out


def _check_step_refs(
    c: Checker,
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


def _check_swap(c: Checker, at: KeyPath, guest: Guest, nic: Nic, to: Plane) -> None:
    planes = SWAPPABLE[guest.kind]
    if nic.plane not in planes or to not in planes:
        allowed = " and ".join(sorted(p.value for p in planes))
        c.issue(
            (*at, "to"),
            f"a {guest.kind.value} guest's NIC can only be swapped between {allowed} "
            f"(this NIC starts on {nic.plane.value})",
        )


def _check_restart(c: Checker, at: KeyPath, params: Mapping[str, Any], guest: Guest) -> None:
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
