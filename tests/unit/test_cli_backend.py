"""``vhostkit backend net|blk`` through the real entry point, in subprocesses.

Every way to start a daemon (``backend blk``, the ``blk-backend`` alias, ``python3 -m
vhostkit.devices.blk``; the same for net) serves, applies ``--socket-mode``, and on SIGTERM or
SIGINT stops, removes its socket and exits 0. Socket paths that are live or not sockets are
refused with one line and exit code 2, nothing touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest
from helpers.cli_run import Daemon, vhostkit

from vhostkit.guest.net import VirtioNetDriver
from vhostkit.user import Frontend, ProtocolFeature
from vhostkit.virtio.features import VirtioFeature

IMAGE_SIZE = 1 << 20

BLK_FORMS = {
    "backend blk": ["-m", "vhostkit", "backend", "blk"],
    "blk-backend": ["-m", "vhostkit", "blk-backend"],
    "devices.blk": ["-m", "vhostkit.devices.blk"],
}
NET_FORMS = {
    "backend net": ["-m", "vhostkit", "backend", "net"],
    "net-backend": ["-m", "vhostkit", "net-backend"],
    "devices.net": ["-m", "vhostkit.devices.net"],
}


def needs_net_admin() -> None:
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if not caps >> 12 & 1:
        pytest.skip("creating a tap needs CAP_NET_ADMIN")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def tap_name(tag: str) -> str:
    return f"vhkc{os.getpid() % 100000}{tag}"[:15]


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def assert_serves(path) -> None:
    """A vhostkit front-end gets a sensible answer over the socket."""
    with Frontend.connect(path, timeout=5) as fe:
        assert fe.get_features() & VirtioFeature.VERSION_1


# --- start, serve, stop ---------------------------------------------------------------------


@pytest.mark.parametrize("form", sorted(BLK_FORMS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_blk_daemon_serves_and_stops_cleanly(sock_dir, image, form: str, sig: int) -> None:
    path = sock_dir / "blk.sock"
    with Daemon([*BLK_FORMS[form], "--socket", str(path), "--image", str(image)]) as d:
        d.wait_ready()
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600  # the default
        assert_serves(path)
        rc, out = d.stop(sig)
    assert rc == 0, out
    assert f"stopping on {signal.Signals(sig).name}" in out
    assert "listening on" in out
    assert not os.path.lexists(path)  # the socket it made is gone
    assert "Traceback" not in out


@pytest.mark.parametrize("form", sorted(NET_FORMS))
def test_net_daemon_serves_and_stops_cleanly(sock_dir, form: str) -> None:
    needs_net_admin()
    path = sock_dir / "net.sock"
    tap = tap_name(form[-3:])
    argv = [*NET_FORMS[form], "--socket", str(path), "--tap", tap, "--queues", "2"]
    with Daemon([*argv, "--socket-mode", "0660"]) as d:
        d.wait_ready()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert link_exists(tap)
        with open(f"/sys/class/net/{tap}/tun_flags") as f:
            assert int(f.read(), 16) & 0x0100  # IFF_MULTI_QUEUE for two queue pairs
        with Frontend.connect(path, timeout=5) as fe:
            fe.set_owner()
            fe.negotiate(int(VirtioFeature.VERSION_1), ProtocolFeature.MQ)
            assert fe.get_queue_num() == 2
        rc, out = d.stop()
    assert rc == 0, out
    assert f"net backend: tap {tap}, listening on {path}" in out
    assert not os.path.lexists(path)
    assert not link_exists(tap)  # the tap it created is gone with it


def test_socket_mode_owner_group_pidfile(sock_dir, image, tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = sock_dir / "m.sock"
    pidfile = tmp_path / "blk.pid"
    argv = [*BLK_FORMS["backend blk"], "--socket", str(path), "--image", str(image)]
    argv += ["--socket-mode", "640", "--socket-owner", "nobody", "--socket-group", "65534"]
    with Daemon([*argv, "--pidfile", str(pidfile)]) as d:
        d.wait_ready()
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 65534, 65534)
        assert pidfile.read_text() == f"{d.pid}\n"
        rc, out = d.stop()
    assert rc == 0, out
    assert not pidfile.exists()
    assert not os.path.lexists(path)


def test_user_drops_root_after_opening(sock_dir, image) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    os.chown(sock_dir, 65534, 65534)  # so that the unprivileged daemon can remove its socket
    os.chown(image, 65534, 65534)
    image.chmod(0o600)
    path = sock_dir / "u.sock"
    argv = [*BLK_FORMS["backend blk"], "--socket", str(path), "--image", str(image)]
    with Daemon([*argv, "--user", "nobody", "--socket-owner", "root"]) as d:
        d.wait_ready()
        with open(f"/proc/{d.pid}/status") as f:
            ids = {k: v.split() for k, v in (line.split(":", 1) for line in f)}
        assert ids["Uid"] == ["65534"] * 4
        assert ids["Gid"][0] == "65534"
        assert_serves(path)  # the image and the socket were opened before the switch
        rc, out = d.stop()
    assert rc == 0, out
    assert not os.path.lexists(path)


def test_net_user_drops_root_and_still_configures_the_tap(sock_dir) -> None:
    needs_net_admin()
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    os.chown(sock_dir, 65534, 65534)
    path = sock_dir / "nu.sock"
    tap = tap_name("u")
    argv = [*NET_FORMS["backend net"], "--socket", str(path), "--tap", tap, "--queues", "2"]
    with Daemon([*argv, "--user", "nobody", "--socket-owner", "root"]) as d:
        d.wait_ready()
        with open(f"/sys/class/net/{tap}/owner") as f:
            assert int(f.read()) == 65534  # so that nobody may attach and detach its queues
        with Frontend.connect(path, timeout=5) as fe, VirtioNetDriver(fe).start() as nic:
            # features acked after the switch: the header size and offloads went to the tap
            assert nic.header_size == 12
            nic.stop()
        with open(f"/proc/{d.pid}/status") as f:
            assert next(line for line in f if line.startswith("Uid:")).split()[1:] == ["65534"] * 4
        rc, out = d.stop()
    assert rc == 0, out
    assert "header 12 bytes" in out
    assert "Traceback" not in out and "tap queue" not in out  # no TUNSETQUEUE refused
    assert not os.path.lexists(path)


def test_client_mode_without_reconnect_ends_with_the_front_end(sock_dir, image) -> None:
    path = sock_dir / "c.sock"
    argv = [*BLK_FORMS["backend blk"], "--socket", str(path), "--image", str(image)]
    with Daemon([*argv, "--client", "--no-reconnect"]) as d:
        d.wait_ready()
        with Frontend.accept(path, timeout=15) as fe:
            assert fe.get_features() & VirtioFeature.VERSION_1
        rc, out = d.wait(timeout=15)  # no signal: it stops by itself
    assert rc == 0, out
    assert "connecting to" in out


# --- socket paths that must not be taken ----------------------------------------------------


def test_live_socket_is_refused_and_survives(sock_dir, image) -> None:
    path = sock_dir / "live.sock"
    argv = [*BLK_FORMS["backend blk"], "--socket", str(path), "--image", str(image)]
    with Daemon(argv) as first:
        first.wait_ready()
        inode = os.lstat(path).st_ino
        second = vhostkit("blk-backend", "--socket", str(path), "--image", str(image))
        assert second.returncode == 2, second
        assert second.stderr.strip().splitlines()[-1] == (
            f"vhostkit blk-backend: error: {path} is in use: a peer is listening on it "
            "(another daemon?); not taking it over"
        )
        assert "Traceback" not in second.stderr
        assert os.lstat(path).st_ino == inode
        assert_serves(path)  # the first still serves
        rc, out = first.stop()
    assert rc == 0, out
    assert not os.path.lexists(path)


def test_stale_socket_is_replaced(sock_dir, image) -> None:
    path = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    path.chmod(0o777)
    argv = [*BLK_FORMS["backend blk"], "--socket", str(path), "--image", str(image)]
    with Daemon(argv) as d:
        d.wait_ready()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert_serves(path)
        rc, out = d.stop()
    assert rc == 0, out


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink"])
@pytest.mark.parametrize("device", ["blk", "net"])
def test_path_that_is_not_a_socket_is_refused(sock_dir, image, kind: str, device: str) -> None:
    path = sock_dir / "taken"
    if kind == "regular file":
        path.write_bytes(b"keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(image)
    before = os.lstat(path)
    tap = tap_name("x")
    args = ["--image", str(image)] if device == "blk" else ["--tap", tap]
    proc = vhostkit("backend", device, "--socket", str(path), *args)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        f"vhostkit backend {device}: error: {path} exists and is a {kind}: not replacing it "
        "(remove it or choose another socket path)"
    )
    assert "Traceback" not in proc.stderr
    after = os.lstat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    if kind == "regular file":
        assert path.read_bytes() == b"keep me"
    assert not link_exists(tap)  # refused before the tap was made
    assert sorted(os.listdir(sock_dir)) == ["taken"]


# --- other errors ---------------------------------------------------------------------------


def test_missing_tap_permission(sock_dir) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to start a process without CAP_NET_ADMIN")
    path = sock_dir / "p.sock"
    tap = tap_name("p")
    proc = vhostkit(
        "backend",
        "net",
        "--socket",
        str(path),
        "--tap",
        tap,
        prefix=[setpriv, "--bounding-set=-net_admin", "--"],
    )
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vhostkit backend net: error: TUNSETIFF {tap!r} queue 0: Operation not permitted "
        "(needs CAP_NET_ADMIN)"
    )
    assert not os.path.lexists(path)
    assert not link_exists(tap)


def test_missing_image(sock_dir, tmp_path) -> None:
    path = sock_dir / "i.sock"
    proc = vhostkit("blk-backend", "--socket", str(path), "--image", str(tmp_path / "none.img"))
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vhostkit blk-backend: error: {tmp_path / 'none.img'}: No such file or directory"
    )
    assert not os.path.lexists(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: --socket"),
        (["--socket", "S", "--socket-mode", "999"], "'999' is not an octal mode such as 0600"),
        (["--socket", "S", "--socket-mode", "1777"], "1777 is not a set of permission bits"),
        (["--socket", "S", "--socket-owner", "no-such-user-x"], "no such user: 'no-such-user-x'"),
        (["--socket", "S", "--socket-group", "no-such-group-x"], "no such group"),
        (["--socket", "S", "--user", "no-such-user-x"], "no such user: 'no-such-user-x'"),
        (["--socket", "S", "--queues", "0"], "0 is not a positive number"),
        (["--socket", "S", "--ready-fd", "x"], "'x' is not a number"),
        (["--socket", "S", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments(args: list[str], message: str) -> None:
    for argv in (["backend", "blk", "--image", "I", *args], ["blk-backend", "--image", "I", *args]):
        proc = vhostkit(*argv)
        assert proc.returncode == 2, proc
        prog = "vhostkit backend blk" if argv[0] == "backend" else "vhostkit blk-backend"
        assert proc.stderr.startswith(f"usage: {prog} "), proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{prog}: error: "), proc.stderr
        assert message in proc.stderr, proc.stderr


def test_bad_mac_and_client_with_socket_mode(sock_dir) -> None:
    proc = vhostkit("net-backend", "--socket", "S", "--mac", "zz")
    assert proc.returncode == 2 and "'zz' is not a MAC address" in proc.stderr, proc
    proc = vhostkit(
        "backend", "blk", "--socket", str(sock_dir / "x"), "--image", "I", "--client",
        "--socket-mode", "0660",
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == (
        "vhostkit backend blk: error: --socket-mode: in --client mode the front-end creates "
        "the socket"
    )


def test_ready_fd_that_is_not_open(sock_dir, image) -> None:
    proc = vhostkit(
        "backend", "blk", "--socket", str(sock_dir / "r.sock"), "--image", str(image),
        "--ready-fd", "250",
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        "vhostkit backend blk: error: --ready-fd 250 is not an open fd"
    )
    assert not os.path.lexists(sock_dir / "r.sock")


def test_devices_modules_name_vhostkit_in_their_usage() -> None:
    for module, prog in (("net", "backend net"), ("blk", "backend blk")):
        proc = subprocess.run(
            [sys.executable, "-m", f"vhostkit.devices.{module}", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc
        assert proc.stdout.startswith(f"usage: vhostkit {prog} "), proc.stdout
