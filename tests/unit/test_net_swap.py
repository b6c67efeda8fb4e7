"""The swappable net device and its control socket, where there is no ``/dev/vhost-net``.

The device serves on the user plane; a swap to the kernel fails with a typed error naming the
module and leaves the device (and a running front-end's rings) where they were. The control
protocol (JSON lines on a 0600 Unix socket) answers every bad request with ``ok: false`` and
goes on serving. The userspace plane's ``take_rings`` / ``give_rings`` (what a swap does to
it) keep the ring positions and serve what was queued in between. The swaps between the
planes themselves run in the kernel VM (tests/kernel/test_kernel_net_swap.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vhostkit.cli import main as cli_main
from vhostkit.devices.net import NetDevice
from vhostkit.devices.net_swap import (
    SWAP_PROTOCOL_FEATURES,
    ControlServer,
    Plane,
    SwappableNetDevice,
    SwapResult,
    handle_request,
    status,
    swap,
)
from vhostkit.errors import (
    DeviceUnavailable,
    InvalidOperation,
    InvalidParam,
    SocketConnect,
    SocketInUse,
    SocketPathTaken,
)
from vhostkit.types import VringState
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature as VF

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="a tap needs root"
)

RX, TX = 0, 1


@pytest.fixture
def tap(fd_check) -> Iterator[object]:
    from vhostkit.kernel.tap import Tap

    with Tap("vhksu%d", nonblocking=True) as t:
        t.disable_ipv6()  # nothing of the kernel's own in the rings
        t.up()
        yield t


@pytest.fixture
def device(tap, tmp_path: Path) -> Iterator[SwappableNetDevice]:
    with SwappableNetDevice(tap, vhost_net_path=tmp_path / "no-vhost-net") as d:
        yield d


@pytest.fixture
def control(device: SwappableNetDevice, sock_dir: Path) -> Iterator[Path]:
    path = sock_dir / "ctl.sock"
    with ControlServer(path, device).start():
        yield path
    assert not path.exists()  # the server removes its socket


def ask(path: Path, *lines: bytes) -> list[dict[str, object]]:
    """Send raw request lines on one connection; the answers, one per line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"".join(line + b"\n" for line in lines))
        buf = b""
        while buf.count(b"\n") < len(lines):
            data = s.recv(65536)
            assert data, f"closed after {buf!r}"
            buf += data
    return [json.loads(line) for line in buf.splitlines()]


# --- the device without vhost-net --------------------------------------------------------------


def test_offers_only_what_both_planes_serve(device: SwappableNetDevice) -> None:
    offered = device.get_features()
    assert not offered & (VF.RING_PACKED | VF.LOG_ALL)  # the kernel plane serves neither
    assert offered & VF.VERSION_1 and offered & VF.RING_EVENT_IDX
    protocol = ProtocolFeature(device.get_protocol_features())
    assert protocol == ProtocolFeature(SWAP_PROTOCOL_FEATURES)
    assert not protocol & (ProtocolFeature.LOG_SHMFD | ProtocolFeature.INFLIGHT_SHMFD)
    assert device.plane is Plane.USER and isinstance(device.device, NetDevice)
    assert device.kernel is None


def test_swap_to_kernel_fails_typed_and_stays_on_user(device: SwappableNetDevice) -> None:
    with pytest.raises(DeviceUnavailable, match=r"modprobe vhost_net"):
        device.swap("kernel")
    assert device.plane is Plane.USER and not device.swaps
    with pytest.raises(InvalidParam, match="no data plane"):
        device.swap("dpdk")
    same = device.swap(Plane.USER)
    assert same == SwapResult(Plane.USER, Plane.USER, 0.0, {})


def test_kernel_plane_at_start_needs_vhost_net(tap, tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match=r"modprobe vhost_net"):
        SwappableNetDevice(tap, plane="kernel", vhost_net_path=tmp_path / "none")
    assert not tap.closed  # the tap stays its owner's (and fd_check: nothing left open)


# --- the control protocol ------------------------------------------------------------------------


def test_control_socket_is_private_and_refuses_a_live_path(
    device: SwappableNetDevice, control: Path
) -> None:
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    with pytest.raises(SocketInUse):
        ControlServer(control, device)
    plain = control.with_name("plain")
    plain.write_text("")
    with pytest.raises(SocketPathTaken):
        ControlServer(plain, device)


def test_status_and_swaps_over_the_socket(control: Path) -> None:
    st = status(control)
    assert st["plane"] == "user" and st["connected"] is False
    assert st["kernel_available"] is False
    assert st["rings"] == {str(i): {"started": False, "enabled": False, "num": 0} for i in (RX, TX)}
    with pytest.raises(DeviceUnavailable, match=r"modprobe vhost_net"):
        swap(control, "kernel")
    assert status(control)["plane"] == "user"
    result = swap(control, "user")
    assert (result.from_plane, result.to_plane, result.pause_ms) == ("user", "user", 0.0)


def test_bad_requests_get_typed_errors_and_the_connection_goes_on(control: Path) -> None:
    answers = ask(
        control,
        b"not json",
        b"[1, 2]",
        b'{"op": "reboot"}',
        b'{"op": "swap"}',
        b'{"op": "swap", "to": "dpdk"}',
        b'{"op": "swap", "to": "kernel"}',
        b'{"op": "status"}',
    )
    assert [a["ok"] for a in answers] == [False] * 6 + [True]
    assert [a.get("type") for a in answers[:6]] == ["InvalidParam"] * 5 + ["DeviceUnavailable"]
    assert "unknown op 'reboot'" in str(answers[2]["error"])
    assert answers[6]["plane"] == "user"


def test_an_oversized_request_is_refused(control: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(control))
        s.sendall(b"x" * 10000)
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is False and "bytes" in answer["error"]
    assert status(control)["ok"] is True  # the server goes on


def test_no_daemon_is_a_connect_error(sock_dir: Path) -> None:
    with pytest.raises(SocketConnect, match="no control socket"):
        swap(sock_dir / "nobody.sock", "kernel")


def test_handle_request_never_raises(device: SwappableNetDevice) -> None:
    assert handle_request(device, b"\xff\xfe")["ok"] is False
    assert handle_request(device, b'{"op": "status"}')["plane"] == "user"


# --- a running front-end: the user plane's take/give, a refused swap --------------------------


def test_running_rings_survive_a_refused_swap_and_a_user_plane_restart(
    device: SwappableNetDevice, tap, sock_dir: Path
) -> None:
    from vhostkit.guest.net import VirtioNetDriver
    from vhostkit.testing.swap import frame_number, numbered, packet_socket
    from vhostkit.user import BackendListener, Frontend

    def sniffed(s: socket.socket, count: int) -> list[int]:
        s.settimeout(10)
        got: list[int] = []
        while len(got) < count:
            n = frame_number(s.recv(65536))
            if n is not None:
                got.append(n)
        return got

    with (
        packet_socket(tap.name) as sniffer,
        BackendListener(sock_dir / "net.sock", lambda: device, max_connections=1) as listener,
    ):
        listener.start()
        with (
            Frontend.connect(listener.path, timeout=5) as fe,
            VirtioNetDriver(fe, queue_size=64).start() as nic,
        ):
            device.wait_for(lambda: all(r.started for r in device.vrings))
            assert nic.send([numbered(i) for i in range(8)]) == 8
            assert sniffed(sniffer, 8) == list(range(8))
            with pytest.raises(DeviceUnavailable):
                device.swap("kernel")
            # the rings were never stopped: frames still flow
            assert nic.send([numbered(i) for i in range(8, 16)]) == 8
            assert sniffed(sniffer, 8) == list(range(8, 16))
            assert nic.wait_tx_done(10)
            # what a swap does to the user plane: stop, then start from the same positions
            user = device.device
            assert isinstance(user, NetDevice)
            states = user.take_rings()
            assert {s.index: s.num for s in states} == {RX: 0, TX: 16}
            assert all(r.started for r in device.vrings)  # still started for the front-end
            assert nic.send([numbered(i) for i in range(16, 24)]) == 8  # queued while stopped
            user.give_rings(states)
            assert sniffed(sniffer, 8) == list(range(16, 24))  # served once given back
            assert nic.stop() == {RX: 0, TX: 24}
        device.wait_for(lambda: not device.device.owner)  # the front-end left
        assert device.status()["connected"] is False
        assert not listener.errors


class RefusingPlane(NetDevice):
    """A second plane that starts the first ring it is given, then fails (as a kernel that
    refuses a ring would): the swap must put every ring back where it was."""

    def give_rings(self, states: Sequence[VringState]) -> None:
        super().give_rings(states[:1])
        raise InvalidOperation("this plane refuses the second ring")

    def _close_nets(self) -> None:
        """(What the kernel plane does when the rings leave it: nothing to do here.)"""


def test_a_swap_that_fails_halfway_puts_the_rings_back(
    device: SwappableNetDevice, tap, sock_dir: Path
) -> None:
    from vhostkit.guest.net import VirtioNetDriver
    from vhostkit.testing.swap import frame_number, numbered, packet_socket
    from vhostkit.user import BackendListener, Frontend

    refusing = RefusingPlane(
        tap,
        features=device.user.offered_features & ~(1 << 30),
        protocol_features=SWAP_PROTOCOL_FEATURES,
    )
    refusing.changed = device.changed
    device.kernel = refusing  # the plane a swap to "kernel" goes to
    with (
        packet_socket(tap.name) as sniffer,
        BackendListener(sock_dir / "net.sock", lambda: device, max_connections=1) as listener,
    ):
        sniffer.settimeout(10)
        listener.start()
        with (
            Frontend.connect(listener.path, timeout=5) as fe,
            VirtioNetDriver(fe, queue_size=64).start() as nic,
        ):
            device.wait_for(lambda: all(r.started for r in device.vrings))
            assert nic.send([numbered(i) for i in range(4)]) == 4
            assert nic.wait_tx_done(10)
            with pytest.raises(InvalidOperation, match="refuses"):
                device.swap("kernel")
            assert device.plane is Plane.USER and device.device is device.user
            assert sorted(device.user.active) == [RX, TX]  # both rings run here again
            assert not refusing.active and not refusing.owner  # nothing left there
            assert nic.send([numbered(i) for i in range(4, 8)]) == 4
            got: list[int] = []
            while len(got) < 8:
                n = frame_number(sniffer.recv(65536))
                if n is not None:
                    got.append(n)
            assert got == list(range(8))
            assert nic.stop() == {RX: 0, TX: 8}
        assert not listener.errors


# --- the command line ----------------------------------------------------------------------------


def test_swap_command_errors(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["swap", str(sock_dir / "none.sock"), "--to", "kernel"]) == 1
    assert "vhostkit swap: error: no control socket" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main(["swap", str(sock_dir / "none.sock"), "--to", "dpdk"])
    assert info.value.code == 2


def test_daemon_with_control_socket(sock_dir: Path) -> None:
    """``vhostkit backend net --control``, and ``vhostkit swap`` against it (no vhost-net)."""
    sock, ctl = sock_dir / "d.sock", sock_dir / "d.ctl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock)]
    argv += ["--tap", f"vhksc{os.getpid() % 10000}", "--control", str(ctl)]
    r, w = os.pipe()
    proc = subprocess.Popen([*argv, "--ready-fd", str(w)], env=env, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.read() == b"READY=1\n"
        swap_cmd = [sys.executable, "-m", "vhostkit", "swap", str(ctl)]
        out = subprocess.run(
            [*swap_cmd, "--to", "kernel"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1 and "modprobe vhost_net" in out.stderr
        out = subprocess.run(
            [*swap_cmd, "--to", "user", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {
            "ok": True,
            "from": "user",
            "to": "user",
            "pause_ms": 0.0,
            "positions": {},
        }
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    assert not ctl.exists() and not sock.exists()
