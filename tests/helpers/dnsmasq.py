"""``dnsmasq`` as a DHCP-only server inside a test's network namespace."""

from __future__ import annotations

import signal
from pathlib import Path

from vhostkit.testing.peers import PeerProcess


class Dnsmasq(PeerProcess):
    """``dnsmasq`` serving DHCP only on ``interface`` inside the namespace ``netns``.

    No DNS (``--port=0``), no resolv.conf, /etc/hosts or config file; it stays in the
    foreground and logs every DHCP packet to its captured output (``--log-dhcp``). Ready once
    it logged its DHCP range, which it prints after the DHCP socket is set up.
    """

    name = "dnsmasq"

    def __init__(
        self, netns: str, interface: str, dhcp_range: str, leasefile: Path, **kw: object
    ) -> None:
        self.leasefile = leasefile
        argv = [
            "ip", "netns", "exec", netns,  # ip execs dnsmasq: signals reach it directly
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-resolv",
            "--no-hosts", f"--interface={interface}", "--bind-interfaces",
            f"--dhcp-range={dhcp_range}", f"--dhcp-leasefile={leasefile}", "--log-dhcp",
            "--log-facility=-", "--pid-file=", "--user=root",
        ]  # fmt: skip
        super().__init__(argv, **kw)  # type: ignore[arg-type]

    def _wait_ready(self) -> None:
        self.wait_for_line(r"DHCP, IP range", self.ready_timeout)

    def _request_stop(self) -> bool:
        # dnsmasq >= 2.79 catches SIGINT and keeps running: SIGTERM stops it
        self._signal(signal.SIGTERM)
        return True
