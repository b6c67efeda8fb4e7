"""The shared data-plane check (vhostkit.testing.dataplane) against a vhost-user back-end.

The same :func:`check_net_data_plane` runs inside the kernel VM against vhost-net and a tap
(``tests/kernel/test_kernel_netdriver.py``); here it drives DPDK testpmd's vhost PMD in macswap
mode through vhostkit's :class:`~vhostkit.user.Frontend`.
"""

from __future__ import annotations

import pytest

from vhostkit.testing.dataplane import TestpmdPlane, check_net_data_plane
from vhostkit.testing.peers import which_or_skip

pytestmark = pytest.mark.peer


def test_shared_check_on_vhost_user_testpmd(fd_check, sock_dir):
    which_or_skip("dpdk-testpmd")
    with TestpmdPlane(sock_dir / "vhost.sock") as plane:
        report = check_net_data_plane(plane, count=200)
    assert report.positions == {0: 200, 1: 200}
    assert report.stats.rx_frames == 200
    assert plane.pmd is not None and plane.pmd.returncode == 0
