"""Tap devices (no vhost needed): tun ioctls and link work through pyroute2.

Runs on the host when /dev/net/tun works and we have CAP_NET_ADMIN (root); skipped with the
reason otherwise. Interfaces, bridges and namespaces get unique names and are removed.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator

import pytest

from vhostkit.errors import DeviceUnavailable, InvalidOperation, InvalidParam
from vhostkit.kernel import Tap, TunFlags, TunOffload
from vhostkit.kernel.tap import offload_for_features


def _tap_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "tap tests need root (CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this host"
    try:
        Tap("vhkprobe%d").close()
    except DeviceUnavailable as exc:
        return f"cannot create a tap here: {exc}"
    return None


_REASON = _tap_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(autouse=True)
def _fds(fd_check: object) -> None:
    """Every tap test must leave no fd open (tests/conftest.py's fd_check)."""


@pytest.fixture
def netns_name() -> Iterator[str]:
    from pyroute2 import netns

    name = f"vhk-{_uid()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def bridge() -> Iterator[str]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"vhkbr{_uid()}"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as exc:
            pytest.skip(f"cannot create a bridge on this host: {exc}")
    try:
        yield name
    finally:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def test_create_single_queue() -> None:
    with Tap(f"vhk{_uid()}") as tap:
        assert len(tap.fds) == 1
        assert tap.fd == tap.fileno() == tap.fds[0]
        name, flags = tap.get_iff()
        assert name == tap.name
        assert flags & (TunFlags.TAP | TunFlags.NO_PI | TunFlags.VNET_HDR) == (
            TunFlags.TAP | TunFlags.NO_PI | TunFlags.VNET_HDR
        )
        assert not flags & TunFlags.MULTI_QUEUE
        assert _exists(tap.name)
        assert tap.ifindex > 0
    assert not _exists(name)
    assert tap.closed


def test_kernel_picks_the_name() -> None:
    with Tap() as tap:
        assert tap.name.startswith("tap")


def test_multi_queue() -> None:
    with Tap(f"vhk{_uid()}", queues=4) as tap:
        assert len(tap.fds) == 4 and len(set(tap.fds)) == 4
        assert tap.get_iff()[1] & TunFlags.MULTI_QUEUE
        assert tap.get_features() & TunFlags.MULTI_QUEUE
        tap.set_queue_enabled(2, False)
        tap.set_queue_enabled(2, True)
        with pytest.raises(InvalidParam):
            tap.set_queue_enabled(4, True)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidParam):
        Tap(queues=0)
    with pytest.raises(InvalidParam):
        Tap(queues=2, multi_queue=False)
    with pytest.raises(InvalidParam, match="longer"):
        Tap("x" * 16)


def test_missing_tun_node(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(DeviceUnavailable, match="modprobe tun"):
        Tap(tun_path=os.path.join(tmp_path, "tun"))


def test_name_taken_by_a_non_multiqueue_tap() -> None:
    with Tap(f"vhk{_uid()}") as tap, pytest.raises(InvalidOperation) as info:
        Tap(tap.name)
    assert info.value.errno == errno.EBUSY


def test_vnet_hdr_size() -> None:
    with Tap(f"vhk{_uid()}") as tap:
        assert tap.get_vnet_hdr_size() == 10
        tap.set_vnet_hdr_size(12)
        assert tap.get_vnet_hdr_size() == 12
        tap.set_vnet_hdr_size(10)
        assert tap.get_vnet_hdr_size() == 10
        with pytest.raises(InvalidParam):
            tap.set_vnet_hdr_size(11)


def test_offload() -> None:
    with Tap(f"vhk{_uid()}") as tap:
        tap.set_offload(TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO6)
        tap.set_offload(0)
        with pytest.raises(InvalidParam):
            tap.set_offload(1 << 20)


def test_offload_for_every_guest_feature_set_is_accepted() -> None:
    """Whatever guest offloads a driver acked, the flags derived from them are ones the tun
    driver takes. A Linux guest behind QEMU may ack GUEST_TSO4 without GUEST_CSUM, or
    GUEST_ECN without any TSO (QEMU offers them with ``guest_csum=off`` or
    ``guest_tso4=off,guest_tso6=off``): TSO without CSUM, or TSO_ECN without TSO, is EINVAL."""
    guest_csum, tso4, tso6, ecn, ufo = (1 << 1, 1 << 7, 1 << 8, 1 << 9, 1 << 10)
    bits = (guest_csum, tso4, tso6, ecn, ufo)
    with Tap(f"vhk{_uid()}") as tap:
        for mask in range(1 << len(bits)):
            features = sum(b for i, b in enumerate(bits) if mask >> i & 1)
            flags = offload_for_features(features)
            tap.set_offload(flags)  # raises InvalidParam on EINVAL
            if not features & guest_csum:
                assert flags == 0, hex(features)
    assert offload_for_features(guest_csum | tso4 | ecn) == (
        TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO_ECN
    )
    assert offload_for_features(tso4 | tso6 | ecn) == 0  # QEMU's guest_csum=off
    assert offload_for_features(guest_csum | ecn) == TunOffload.CSUM  # ECN needs a TSO


def test_up_down_mac_mtu_addresses() -> None:
    with Tap(f"vhk{_uid()}") as tap:
        assert not tap.is_up()
        tap.up()
        assert tap.is_up()
        tap.down()
        assert not tap.is_up()
        tap.set_mac("02:00:00:12:34:56")
        assert tap.get_mac() == "02:00:00:12:34:56"
        tap.set_mtu(1400)
        tap.add_address("10.255.77.1", 24)
        tap.set_address("10.255.78.1", 24)
        v4 = [a for a in tap.addresses() if ":" not in a[0]]
        assert v4 == [("10.255.78.1", 24)]


def test_persist() -> None:
    name = f"vhk{_uid()}"
    tap = Tap(name)
    try:
        tap.set_persist(True)
    finally:
        tap.close()
    assert _exists(name)
    with Tap(name) as again:
        again.set_persist(False)
    assert not _exists(name)


def test_move_to_netns(netns_name: str) -> None:
    from pyroute2 import IPRoute

    with Tap(f"vhk{_uid()}") as tap:
        tap.move_to_netns(netns_name)
        assert tap.netns == netns_name
        assert not _exists(tap.name)
        tap.up()
        tap.add_address("10.255.79.1", 24)
        with IPRoute(netns=netns_name, flags=0) as ipr:
            (index,) = ipr.link_lookup(ifname=tap.name)
            (link,) = ipr.link("get", index=index)
            assert link["flags"] & 1
        # the fd still works after the move
        assert tap.get_iff()[0] == tap.name


def test_bridge(bridge: str) -> None:
    from pyroute2 import IPRoute

    with Tap(f"vhk{_uid()}") as tap:
        assert tap.master() == 0
        tap.attach_to_bridge(bridge)
        with IPRoute() as ipr:
            (br_index,) = ipr.link_lookup(ifname=bridge)
        assert tap.master() == br_index
        tap.detach_from_bridge()
        assert tap.master() == 0
        with pytest.raises(InvalidParam, match="no bridge"):
            tap.attach_to_bridge("vhk-no-such-br")


def test_close_is_idempotent_and_later_calls_fail() -> None:
    tap = Tap(f"vhk{_uid()}")
    tap.close()
    tap.close()
    with pytest.raises(InvalidOperation, match="closed"):
        tap.set_vnet_hdr_size(12)
    with pytest.raises(InvalidOperation, match="closed"):
        tap.up()
