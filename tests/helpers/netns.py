"""Network namespaces of a test's own, for tests that put a tap's far end in one.

:class:`NetNs` makes one with ``ip netns add`` and deletes it on close; :meth:`NetNs.call` runs a
function inside it. Nothing leaves the machine: a test's namespace has no link but its own tap.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SO_RCVBUFFORCE = 33  # not in Python's socket module
_T = TypeVar("_T")
_ns_counter = itertools.count()

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetNs:
    """A network namespace of the test's own (``ip netns add``), deleted by :meth:`close`.

    :meth:`call` runs a function in a short-lived thread that entered the namespace
    (``setns``), e.g. to open a socket there: a socket stays in the namespace it was made in.
    """

    def __init__(self, prefix: str = "vhk") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_ns_counter)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.closed = False

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in a thread inside the namespace; its result or its exception."""
        out: list[_T] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, f"setns {self.name}: {os.strerror(e)}")
                finally:
                    os.close(fd)
                out.append(fn())
            except BaseException as exc:
                err.append(exc)

        t = threading.Thread(target=run, name=f"netns-{self.name}")
        t.start()
        t.join()
        if err:
            raise err[0]
        return out[0]

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket of the namespace (the caller closes it)."""
        return self.call(lambda: socket.socket(family, kind | socket.SOCK_CLOEXEC, proto))

    def sysctl(self, key: str, value: str) -> None:
        """Write ``/proc/sys/<key with dots as slashes>`` inside the namespace."""

        def write() -> None:
            Path("/proc/sys", *key.split(".")).write_text(value)

        self.call(write)

    def snmp(self, proto: str) -> dict[str, int]:
        """The namespace's ``/proc/net/snmp`` counters of ``proto`` (``Udp``, ``Tcp``, ...)."""
        text = self.call(lambda: Path("/proc/thread-self/net/snmp").read_text())
        names, values = (ln.split()[1:] for ln in text.splitlines() if ln.startswith(f"{proto}:"))
        return dict(zip(names, map(int, values), strict=True))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            subprocess.run(["ip", "netns", "del", self.name], check=True, capture_output=True)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def quiet_namespace(ns: NetNs) -> None:
    """No IPv6 in ``ns`` (no router solicitations or MLD reports out of the tap)."""
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", "1")


def add_neighbour(ns: NetNs, ifname: str, ip: str, mac: str) -> None:
    """A permanent ARP entry in ``ns`` (so the kernel sends to ``ip`` without asking)."""
    from pyroute2 import IPRoute

    with IPRoute(netns=ns.name, flags=0) as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.neigh("add", dst=ip, lladdr=mac, ifindex=index, state=0x80)  # NUD_PERMANENT


def leftovers(ns_name: str, tap_name: str) -> list[str]:
    """What a test left behind: its namespace, or its tap in the root namespace."""
    found = []
    if Path("/run/netns", ns_name).exists():
        found.append(f"netns {ns_name}")
    if Path("/sys/class/net", tap_name).exists():
        found.append(f"tap {tap_name}")
    return found
