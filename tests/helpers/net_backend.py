"""A vhostkit NetDevice on a tap whose link is up in a namespace of the test's own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers.netns import NetNs, leftovers, quiet_namespace

from vhostkit.kernel.tap import Tap
from vhostkit.testing.packets import mac_bytes
from vhostkit.user import BackendListener


@dataclass
class TapRig:
    ns: NetNs
    tap: Tap
    device: object  # vhostkit.devices.net.NetDevice
    listener: BackendListener


@contextlib.contextmanager
def net_backend(
    sock_path: Path,
    *,
    address: str | None = None,
    mac: str = "52:54:00:00:b0:02",
    device_type: type | None = None,
    queue_pairs: int = 1,
) -> Iterator[TapRig]:
    """A NetDevice on a tap that is up in a fresh namespace, served at ``sock_path``.

    ``device_type``: a subclass of NetDevice to use instead (e.g. one that records requests).
    ``queue_pairs``: more than one gives a multi-queue tap with that many queues, and the
    device as many queue pairs (it then offers VIRTIO_NET_F_MQ).
    """
    from vhostkit.devices.net import NetDevice

    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNs())
        quiet_namespace(ns)
        tap = stack.enter_context(Tap("vhkp%d", queues=queue_pairs, nonblocking=True))
        names = (ns.name, tap.name)
        device = (device_type or NetDevice)(tap, mac=mac_bytes(mac), queue_pairs=queue_pairs)
        stack.callback(device.close)
        tap.move_to_netns(ns.name)
        if address is not None:
            tap.set_address(address, 24)
        tap.up()
        listener = BackendListener(sock_path, lambda: device, max_connections=1).start()

        def stop_listener() -> None:
            listener.stop()
            assert not listener.errors, listener.errors
            assert not listener.rejected, listener.rejected

        stack.callback(stop_listener)
        yield TapRig(ns, tap, device, listener)
    assert not leftovers(*names)
