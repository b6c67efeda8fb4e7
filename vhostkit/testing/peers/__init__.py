"""Launchers for the real vhost-user peers vhostkit is tested against.

Each launcher is a context manager around one external process:

* :class:`Testpmd`: DPDK's ``dpdk-testpmd``, either as a vhost-user **back-end** (the vhost PMD,
  ``net_vhost0,iface=...``: it tests our :class:`~vhostkit.user.Frontend`) or as a vhost-user
  **front-end** (``net_virtio_user0,path=...``: it tests our back-ends).
* :class:`QemuVirtioNet`: ``qemu-system-x86_64`` (q35, TCG, memfd guest RAM, no guest kernel) with
  a vhost-user device on a chardev socket: ``virtio-net-pci`` (iPXE drives it) or
  ``vhost-user-blk-pci`` (SeaBIOS drives it).
* :class:`QemuStorageDaemon`: ``qemu-storage-daemon`` exporting an image file as a vhost-user-blk
  back-end.

Entering the context starts the process and waits until it is *ready*, always on an event and
never on a fixed sleep: a line on the peer's output (testpmd starting to forward, QEMU "waiting
for connection"), a QMP greeting, or a file appearing (the listening socket, a pid file). Socket
and pid files have no notification, so those few waits poll the file system every 20 ms until a
deadline, checking on each round that the peer is still alive. If the peer exits or misses the
deadline, :class:`PeerExited` / :class:`PeerTimeout` is raised with the tail of its output.

Leaving the context stops the peer: a polite request first where the peer has one (``quit`` on
testpmd's command line), then SIGINT, SIGTERM and SIGKILL, each with a timeout; then the process
is reaped, its pipes closed, its reader thread joined and DPDK's runtime directory
(``/var/run/dpdk/<file-prefix>``) removed. Every peer runs in its own session, so a Ctrl-C in the
terminal that runs the tests reaches only the test runner, which then stops its peers in order.

:func:`which_or_skip` is for tests: it skips a test whose peer is not installed, except under CI
(``CI`` set in the environment), where a missing peer fails the test instead.

Modules: :mod:`.process` (the :class:`PeerProcess` base, errors, :func:`which_or_skip`),
:mod:`.testpmd`, :mod:`.qemu` and :mod:`.storage_daemon`; every name is importable from here.

Quirks of the peers seen on Debian 12 (DPDK 22.11, QEMU 7.2) are documented where they matter; see
also ``tests/peers/test_peers_*.py``.
"""

from vhostkit.testing.peers.process import (
    PeerError,
    PeerExited,
    PeerProcess,
    PeerTimeout,
    which_or_skip,
)
from vhostkit.testing.peers.qemu import QemuVirtioNet, QmpError, qmp_command
from vhostkit.testing.peers.storage_daemon import QemuStorageDaemon
from vhostkit.testing.peers.testpmd import PortStats, Testpmd, dpdk_runtime_dir

__all__ = [
    "PeerError",
    "PeerExited",
    "PeerProcess",
    "PeerTimeout",
    "PortStats",
    "QemuStorageDaemon",
    "QemuVirtioNet",
    "QmpError",
    "Testpmd",
    "dpdk_runtime_dir",
    "qmp_command",
    "which_or_skip",
]
