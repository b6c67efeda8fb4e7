"""A lab's network, built in network namespaces of its own and taken down without a trace.

Everything a lab makes lives in one *lab namespace* (``/run/netns/<prefix>``): its bridges, the
guests' taps, and the ends of the veth pairs that join the lab's ``[[namespace]]`` hosts to the
bridges. Each of those hosts is a namespace of its own (``<prefix>-<name>``). Nothing is added
to the namespace the runner started in, so two labs can use the same names at once, and
deleting the namespaces removes every link.

All link work goes through pyroute2 (nothing shells out to ``ip``). Processes that need the
lab's links (back-end daemons, virtual guests, QEMU) are started from a thread that
:meth:`LabNetwork.entered` the lab namespace, so they open the lab's taps by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from vhostkit.kernel.tap import Tap
from vhostkit.lab.errors import LabSetupError
from vhostkit.lab.spec import Lab

__all__ = ["NETNS_DIR", "LabNetwork", "leftover_namespaces"]

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) into a network namespace (``os.setns`` is Python 3.12+)."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _netns() -> Any:
    # pyroute2 is slow to import: only labs pay for it
    from pyroute2 import netns

    return netns


def _iproute(netns: str) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=netns)


def leftover_namespaces(prefix: str) -> list[str]:
    """The namespaces of the lab ``prefix`` under ``/run/netns``: ``prefix`` itself and
    ``prefix-<host>`` (not those of another lab whose prefix merely starts the same)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(
        p.name for p in NETNS_DIR.iterdir() if p.name == prefix or p.name.startswith(prefix + "-")
    )


class LabNetwork:
    """The namespaces, bridges, veth pairs and taps of one lab.

    :meth:`build` makes them; :meth:`close` removes them and returns what it removed.
    ``prefix`` names the lab namespace and starts every namespace name the lab makes.
    """

    def __init__(self, lab: Lab, prefix: str) -> None:
        self.lab = lab
        self.prefix = prefix
        self.namespaces: list[str] = []
        self._built = False

    # -- names --

    @property
    def main(self) -> str:
        """The lab namespace: bridges, taps and the bridge ends of the veth pairs."""
        return self.prefix

    def host_ns(self, name: str) -> str:
        """The namespace of the lab's ``[[namespace]]`` called ``name``."""
        return f"{self.prefix}-{name}"

    @staticmethod
    def tap_name(guest: str, nic: int) -> str:
        """The tap of a guest's NIC (at most 14 characters: names are checked to 12)."""
        return f"t{guest}{nic}"

    @staticmethod
    def veth_name(namespace: str, link: int) -> str:
        """The bridge end of a namespace's veth pair; the other end is ``eth<link>``."""
        return f"v{namespace}{link}"

    # -- building --

    def build(self) -> LabNetwork:
        """Make every namespace, bridge, veth pair and tap; undo all of it on a failure."""
        if self._built:
            return self
        self._built = True
        try:
            self._make_namespace(self.main)
            with _iproute(self.main) as ipr:
                _up(ipr, "lo")
                for bridge in self.lab.bridges:
                    ipr.link("add", ifname=bridge.name, kind="bridge")
                    (index,) = ipr.link_lookup(ifname=bridge.name)
                    if bridge.mtu:
                        ipr.link("set", index=index, mtu=bridge.mtu)
                    if bridge.address:
                        _address(ipr, index, bridge.address)
                    ipr.link("set", index=index, state="up")
            for ns in self.lab.namespaces:
                self._build_host(ns.name)
            self.call(self._make_taps)
        except LabSetupError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise LabSetupError(f"building the lab network failed: {exc}") from exc
        return self

    def _make_namespace(self, name: str) -> None:
        if (NETNS_DIR / name).exists():
            raise LabSetupError(
                f"network namespace {name} already exists",
                hint="another lab with this prefix is running, or one was killed: "
                "`vhostkit lab clean` removes what it left",
            )
        try:
            _netns().create(name)
        except PermissionError as exc:
            raise LabSetupError(
                f"cannot create network namespace {name}", hint="run as root"
            ) from exc
        self.namespaces.append(name)

    def _build_host(self, name: str) -> None:
        ns = self.host_ns(name)
        self._make_namespace(ns)
        spec = next(n for n in self.lab.namespaces if n.name == name)
        with _iproute(self.main) as ipr:
            for j, link in enumerate(spec.links):
                veth = self.veth_name(name, j)
                ipr.link(
                    "add", ifname=veth, kind="veth", peer={"ifname": f"eth{j}", "net_ns_fd": ns}
                )
                (index,) = ipr.link_lookup(ifname=veth)
                (bridge,) = ipr.link_lookup(ifname=link.bridge)
                if link.mtu:
                    ipr.link("set", index=index, mtu=link.mtu)
                ipr.link("set", index=index, master=bridge, state="up")
        with _iproute(ns) as ipr:
            _up(ipr, "lo")
            for j, link in enumerate(spec.links):
                (index,) = ipr.link_lookup(ifname=f"eth{j}")
                if link.mtu:
                    ipr.link("set", index=index, mtu=link.mtu)
                if link.address:
                    _address(ipr, index, link.address)
                ipr.link("set", index=index, state="up")

    def _make_taps(self) -> None:
        """Persistent taps, one per NIC, on their bridges (runs inside the lab namespace)."""
        for guest in self.lab.guests:
            for j, nic in enumerate(guest.nics):
                with Tap(self.tap_name(guest.name, j), queues=nic.queues) as tap:
                    tap.set_persist(True)
                    tap.attach_to_bridge(nic.bridge)
                    tap.up()

    # -- running things inside --

    def call(self, fn: Callable[[], _T], netns: str | None = None) -> _T:
        """``fn()`` in a short-lived thread inside ``netns`` (default: the lab namespace)."""
        out: list[_T] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                with self.entered(netns):
                    out.append(fn())
            except BaseException as exc:  # handed to the caller's thread
                err.append(exc)

        thread = threading.Thread(target=run, name=f"netns-{netns or self.main}")
        thread.start()
        thread.join()
        if err:
            raise err[0]
        return out[0]

    @contextlib.contextmanager
    def entered(self, netns: str | None = None) -> Iterator[None]:
        """Move the calling thread into ``netns`` (default: the lab namespace), and back.

        Threads and processes started inside inherit the namespace. Use it from a thread of
        its own (see :meth:`call`): the namespace is per thread.
        """
        target = os.open(NETNS_DIR / (netns or self.main), os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def set_link(self, ifname: str, up: bool, netns: str | None = None) -> None:
        """Set a link of the lab namespace (or of ``netns``) up or down."""
        with _iproute(netns or self.main) as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise LabSetupError(f"no link {ifname} in {netns or self.main}")
            ipr.link("set", index=found[0], state="up" if up else "down")

    # -- teardown --

    def close(self) -> list[str]:
        """Remove every namespace the lab made (their links go with them); what was removed."""
        removed = []
        netns = _netns()
        for name in reversed(self.namespaces):
            try:
                netns.remove(name)
                removed.append(f"netns {name}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove netns %s: %s", name, exc)
        self.namespaces = []
        return removed

    def leftovers(self) -> list[str]:
        """What of this lab's namespaces still exists (should be nothing after close)."""
        return [f"netns {name}" for name in leftover_namespaces(self.prefix)]

    def __enter__(self) -> LabNetwork:
        return self.build()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _up(ipr: Any, ifname: str) -> None:
    (index,) = ipr.link_lookup(ifname=ifname)
    ipr.link("set", index=index, state="up")


def _address(ipr: Any, index: int, address: Any) -> None:
    ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
