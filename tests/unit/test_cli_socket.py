"""Socket path safety in the library: :class:`vhostkit.user.connection.Listener`.

A live socket is never taken over, something that is not a socket is never touched, the mode
is the one asked for, and a listener unlinks only the socket it created.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import pytest

from vhostkit.errors import InvalidOperation, InvalidParam, SocketInUse, SocketPathTaken
from vhostkit.user import BackendDevice, BackendListener, Frontend
from vhostkit.user.connection import Listener, check_socket_path


def stale_socket(path) -> None:
    """A socket file nobody listens on (a daemon that died without cleaning up)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_default_mode_is_owner_only(fd_check, sock_dir) -> None:
    path = sock_dir / "a.sock"
    with Listener(path):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(sock_dir) == ["a.sock"]  # the private staging directory is gone
    assert not path.exists()


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o400, 0o000])
def test_mode_is_applied(fd_check, sock_dir, mode: int) -> None:
    path = sock_dir / "m.sock"
    old = os.umask(0o077)  # a restrictive umask does not narrow it, a lax one would not widen it
    try:
        with Listener(path, mode=mode):
            assert stat.S_IMODE(os.lstat(path).st_mode) == mode
    finally:
        os.umask(old)


def test_owner_and_group_are_applied(fd_check, sock_dir) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = sock_dir / "o.sock"
    with Listener(path, mode=0o660, owner=65534, group=65534):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)


def test_long_path_falls_back_to_binding_in_place_with_the_mode(fd_check, sock_dir) -> None:
    # too long for the private staging name, short enough for sun_path
    path = sock_dir / ("x" * (99 - len(str(sock_dir))))
    assert len(str(path)) == 100
    with Listener(path, mode=0o640):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    assert os.listdir(sock_dir) == []


def test_bad_mode(fd_check, sock_dir) -> None:
    with pytest.raises(InvalidParam):
        Listener(sock_dir / "b.sock", mode=0o1777)
    assert os.listdir(sock_dir) == []


def test_live_socket_is_refused(fd_check, sock_dir) -> None:
    path = sock_dir / "live.sock"
    with Listener(path) as first:
        inode = os.lstat(path).st_ino
        with pytest.raises(SocketInUse) as info:
            Listener(path)
        assert info.value.errno == errno.EADDRINUSE
        assert "in use" in str(info.value)
        assert isinstance(info.value, InvalidOperation)  # what callers caught before
        assert os.lstat(path).st_ino == inode  # still the first one's
        with pytest.raises(SocketInUse):
            check_socket_path(str(path))
        # and the first listener still accepts
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(path))
        first.accept(timeout=5).close()
        peer.close()


def test_stale_socket_is_replaced(fd_check, sock_dir) -> None:
    path = sock_dir / "stale.sock"
    stale_socket(path)
    old_inode = os.lstat(path).st_ino
    assert check_socket_path(str(path)) is not None
    with Listener(path, mode=0o600):
        st = os.lstat(path)
        assert st.st_ino != old_inode
        assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink", "dangling symlink"])
def test_non_socket_is_left_untouched(fd_check, sock_dir, kind: str) -> None:
    path = sock_dir / "taken"
    target = sock_dir / "target"
    if kind == "regular file":
        path.write_bytes(b"precious")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "symlink":
        stale_socket(target)  # even a symlink to a stale socket is not followed
        path.symlink_to(target)
    else:
        path.symlink_to(sock_dir / "nowhere")
    before = os.lstat(path)
    with pytest.raises(SocketPathTaken) as info:
        Listener(path)
    assert str(path) in str(info.value)
    assert kind.split()[-1] in str(info.value)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    if kind == "regular file":
        assert path.read_bytes() == b"precious"
    # nothing else left behind (no staging directory)
    assert sorted(os.listdir(sock_dir)) == sorted(
        {"taken", "target"} if kind == "symlink" else {"taken"}
    )


def test_close_unlinks_only_its_own_socket(fd_check, sock_dir) -> None:
    path = sock_dir / "own.sock"
    first = Listener(path)
    # someone else replaced the path meanwhile (by hand, or an older vhostkit)
    os.unlink(path)
    with Listener(path) as second:
        inode = os.lstat(path).st_ino
        first.close()
        assert os.lstat(path).st_ino == inode  # the second's socket survived
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(path))
        second.accept(timeout=5).close()
        peer.close()
    assert not path.exists()


def test_backend_listener_takes_a_prepared_listener(fd_check, sock_dir) -> None:
    path = sock_dir / "bl.sock"
    device = BackendDevice(features=1 << 32, num_queues=1)
    listener = BackendListener(Listener(path, mode=0o660), lambda: device).start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        with Frontend.connect(path, timeout=5) as fe:
            assert fe.get_features() & (1 << 32)
    finally:
        listener.stop()
        device.close()
    assert not path.exists()
