"""The peer launchers themselves: skip/fail policy, early deaths, clean stops, statistics."""

from __future__ import annotations

import pytest

from vhostkit.testing.peers import (
    PeerExited,
    QemuStorageDaemon,
    QemuVirtioNet,
    Testpmd,
    dpdk_runtime_dir,
    which_or_skip,
)

MISSING = "vhostkit-no-such-peer-binary"


def test_which_or_skip_skips_a_missing_peer(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed"):
        which_or_skip(MISSING)


def test_which_or_skip_fails_a_missing_peer_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        which_or_skip(MISSING)


def test_which_or_skip_finds_a_present_binary(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert which_or_skip("sh").endswith("/sh")


@pytest.mark.peer
def test_testpmd_dying_early_reports_its_output(fd_check, sock_dir):
    which_or_skip("dpdk-testpmd")
    pmd = Testpmd.vhost_backend(sock_dir / "x.sock", eal_args=["--no-such-eal-option"])
    with pytest.raises(PeerExited, match="Cannot init EAL") as info:
        pmd.start()
    assert info.value.returncode == pmd.returncode != 0
    assert not pmd.running
    assert not dpdk_runtime_dir(pmd.file_prefix).exists()


@pytest.mark.peer
def test_testpmd_non_interactive_stats_and_sigint_stop(fd_check, sock_dir):
    """Without ``-i``: periodic statistics, and SIGINT stops it cleanly."""
    which_or_skip("dpdk-testpmd")
    with Testpmd.vhost_backend(sock_dir / "x.sock", interactive=False) as pmd:
        stats = pmd.port_stats(0)
        assert stats.rx_packets == stats.tx_packets == 0
    assert pmd.returncode == 0
    assert "Bye..." in pmd.output
    assert not dpdk_runtime_dir(pmd.file_prefix).exists()


@pytest.mark.peer
def test_qemu_client_without_backend_reports_the_connect_failure(fd_check, sock_dir):
    which_or_skip("qemu-system-x86_64")
    with pytest.raises(PeerExited, match="Failed to connect"):
        QemuVirtioNet(sock_dir / "nobody.sock").start()


@pytest.mark.peer
def test_qemu_storage_daemon_missing_image(fd_check, sock_dir):
    which_or_skip("qemu-storage-daemon")
    with pytest.raises(PeerExited, match="Could not open"):
        QemuStorageDaemon(sock_dir / "missing.img", sock_dir / "blk.sock").start()


@pytest.mark.peer
def test_qemu_storage_daemon_clean_stop(fd_check, sock_dir):
    which_or_skip("qemu-storage-daemon")
    path = sock_dir / "blk.sock"
    with QemuStorageDaemon(sock_dir / "disk.img", path, create_size=1 << 20) as qsd:
        assert path.is_socket()
    assert qsd.returncode == 0
    assert not path.exists()
