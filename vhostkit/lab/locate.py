"""Where in a TOML file each key was written, so that a lab file's mistakes can name a line.

:mod:`tomllib` parses a document but forgets positions. :func:`key_lines` reads the same text a
second time, line by line, and records the line of every table header and every ``key =``
line under the path the parsed document gives it: ``("step", 2, "count")`` is the ``count`` key
of the third ``[[step]]``. Keys of an inline table (``expect = { loss_max = 0 }``) get the line
of the key that holds the table. It is only a locator: the text was already parsed by tomllib,
so it only needs to follow headers, keys and multi-line values, not to check them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["KeyPath", "key_lines", "line_of"]

#: A path into the parsed document: table names, array indices and key names.
KeyPath = tuple[str | int, ...]

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEY_LINE = re.compile(rf"^\s*({_DOTTED})\s*=\s*(.*)$")
_INLINE_KEY = re.compile(rf"(?:^|[{{,])\s*({_DOTTED})\s*=")


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(rf"{_BARE}|{_QUOTED}", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _open_brackets(value: str) -> int:
    """How many ``[``/``{`` the value leaves open (strings and comments skipped)."""
    depth = 0
    quote = ""
    i = 0
    while i < len(value):
        ch = value[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif value.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif value.startswith('"""', i) or value.startswith("'''", i):
            quote = value[i : i + 3]
            i += 2
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        i += 1
    return depth


def key_lines(text: str) -> dict[KeyPath, int]:
    """Map every table and key path of the TOML ``text`` to its 1-based line number."""
    lines: dict[KeyPath, int] = {}
    counts: dict[tuple[str, ...], int] = {}
    # the resolved path (with array indices) of each named table prefix seen so far
    resolved: dict[tuple[str, ...], KeyPath] = {}
    table: KeyPath = ()
    pending = 0  # open brackets of a multi-line value
    multiline = ""  # an open triple-quoted string
    for number, line in enumerate(text.splitlines(), start=1):
        if multiline:
            if multiline in line:
                multiline = ""
            continue
        if pending > 0:
            pending += _open_brackets(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if m := _ARRAY_HEADER.match(line):
            names = tuple(_split_dotted(m.group(1)))
            index = counts.get(names, 0)
            counts[names] = index + 1
            # entries of a nested array restart under each new parent entry
            for key in [k for k in counts if len(k) > len(names) and k[: len(names)] == names]:
                del counts[key]
            table = (*_resolve(resolved, names[:-1]), names[-1], index)
            resolved[names] = table
            lines.setdefault(table, number)
            continue
        if m := _TABLE_HEADER.match(line):
            names = tuple(_split_dotted(m.group(1)))
            table = (*_resolve(resolved, names[:-1]), names[-1])
            resolved[names] = table
            lines.setdefault(table, number)
            continue
        if m := _KEY_LINE.match(line):
            path = (*table, *_split_dotted(m.group(1)))
            lines.setdefault(path, number)
            value = m.group(2)
            for inner in _INLINE_KEY.finditer(value):
                lines.setdefault((*path, *_split_dotted(inner.group(1))), number)
            for quote in ('"""', "'''"):
                if value.lstrip().startswith(quote) and value.count(quote) == 1:
                    multiline = quote
            if not multiline:
                pending = _open_brackets(value)
    return lines


def _resolve(resolved: Mapping[tuple[str, ...], KeyPath], names: tuple[str, ...]) -> KeyPath:
    if not names:
        return ()
    if names in resolved:
        return resolved[names]
    return (*_resolve(resolved, names[:-1]), names[-1])


def line_of(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path``, or of its nearest written ancestor (``None`` if none is known)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
