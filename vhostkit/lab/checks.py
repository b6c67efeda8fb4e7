"""The building blocks of the lab file checks: a collector of issues, and value checks.

Each ``check_*`` function takes a value and returns ``None`` when it is right, or a message that
says what would be right. :class:`Checker` reads keys with their types and checks and records
every issue with its line (from :mod:`vhostkit.lab.locate`), so one pass reports every mistake.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vhostkit.lab.errors import LabIssue
from vhostkit.lab.locate import KeyPath, line_of
from vhostkit.lab.model import IFNAME_MAX

NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
SIZE_RE = re.compile(r"^(\d+)\s*([KMG]i?B?|)$", re.IGNORECASE)


class Checker:
    """Collects issues while the parsed document is turned into values."""

    def __init__(self, path: str, lines: Mapping[KeyPath, int]) -> None:
        self.path = path
        self.lines = lines
        self.issues: list[LabIssue] = []

    def issue(self, where: KeyPath, message: str) -> None:
        self.issues.append(LabIssue(self.path, line_of(self.lines, where), dotted(where), message))

    def line(self, where: KeyPath) -> int | None:
        return line_of(self.lines, where)

    def table(
        self, where: KeyPath, value: object, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        """``value`` as a table whose keys are all ``allowed`` and include ``required``."""
        if not isinstance(value, dict):
            self.issue(where, f"must be a table, not {kind_of(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.issue((*where, key), unknown_key(key, allowed))
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
            names = " or ".join(TYPE_NAMES[k] for k in shown)
            self.issue((*where, key), f"must be {names}, not {kind_of(value)} ({value!r})")
            return default
        if check is not None and (problem := check(value)) is not None:
            self.issue((*where, key), problem)
            return default
        return value

    def array(self, where: KeyPath, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        """``doc[key]`` as an array of tables (``[[key]]``)."""
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.issue(
                (*where, key), f"must be an array of tables ([[{key}]]), not {kind_of(value)}"
            )
            return []
        return value


TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a table",
    list: "an array",
}


def kind_of(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint} (allowed here: {', '.join(sorted(allowed))})"


def one_of(choices: Sequence[str]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        close = difflib.get_close_matches(value, list(choices), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"'{value}' is not one of {', '.join(choices)}{hint}"

    return check


def check_name(value: str) -> str | None:
    if not NAME_RE.match(value):
        return f"'{value}' must be lower-case letters, digits and '-', starting with a letter"
    if len(value) > 12:
        return f"'{value}' is longer than 12 characters (interface names are built from it)"
    return None


def check_ifname(value: str) -> str | None:
    if not NAME_RE.match(value) or len(value) > IFNAME_MAX:
        return f"'{value}' is not a usable interface name (a-z, 0-9, '-', at most {IFNAME_MAX})"
    return None


def check_cidr(value: str) -> str | None:
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        return f"'{value}' is not an IPv4 address with a prefix length, like 10.77.0.2/24"
    if "/" not in value:
        return f"'{value}' needs a prefix length, like {value}/24"
    if not iface.ip.is_private or iface.ip.is_loopback:
        return f"'{value}' is not a private address: labs never use addresses of other hosts"
    return None


def check_mac(value: str) -> str | None:
    if not MAC_RE.match(value):
        return f"'{value}' is not a MAC address like 02:00:00:00:00:01 (lower-case hex)"
    if int(value[:2], 16) & 1:
        return f"'{value}' is a multicast address; the first byte must be even"
    return None


def check_dhcp_range(value: str) -> str | None:
    try:
        start, end = (ipaddress.IPv4Address(part.strip()) for part in value.split("-"))
    except ValueError:
        return f"'{value}' is not an address range like 10.77.0.100-10.77.0.150"
    if int(end) < int(start):
        return f"'{value}' ends before it starts"
    return None


def check_positive(value: float) -> str | None:
    return None if value > 0 else f"{value} must be greater than 0"


def at_least(low: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if value >= low else f"{value} must be at least {low}"

    return check


def between(low: float, high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"{value} must be between {low} and {high}"

    return check


def parse_size(value: str | int) -> int:
    """``"64M"``, ``"1GiB"``, ``"512K"`` or a plain byte count, in bytes."""
    if isinstance(value, int):
        return value
    m = SIZE_RE.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a size like 64M or 1G")
    unit = m.group(2)[:1].upper()
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def check_size(value: str | int) -> str | None:
    try:
        size = parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None if size > 0 else "a size must be greater than 0"


def check_regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None
