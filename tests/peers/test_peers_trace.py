"""``vhostkit trace`` (a subprocess, through the real entry point) between real peers.

* QEMU (iPXE driving ``virtio-net-pci``) -> tracer -> vhostkit's tap-backed net back-end: the
  guest still gets its DHCP lease from dnsmasq through the proxy, and the saved trace holds the
  whole bring-up in the order QEMU sent it, every reply paired with its request, agreeing with
  what the back-end ended up holding.
* vhostkit's :class:`Frontend` -> tracer -> ``dpdk-testpmd``'s vhost PMD: testpmd brings the
  port up, and the trace is exactly the requests the front-end made, each answered.
* vhostkit's blk back-end daemon (``vhostkit blk-backend``), resized on SIGHUP: its
  CONFIG_CHANGE_MSG on the back-end channel (which the tracer interposed on) reaches the
  front-end through the proxy and appears in the trace with the front-end's ack.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import sys
import threading
from pathlib import Path

import pytest
from helpers.blk_driver import IMAGE_SIZE
from helpers.dnsmasq import Dnsmasq
from helpers.net_backend import net_backend
from helpers.trace_proxy import TraceProcess

from vhostkit.backend import VringAddr
from vhostkit.guest.blk import BlkDriver
from vhostkit.testing.peers import PeerProcess, QemuVirtioNet, Testpmd, which_or_skip
from vhostkit.trace import RecordKind, TraceRecord
from vhostkit.user import Frontend, FrontendReqHandler, FrontendReqServer, ProtocolFeature
from vhostkit.user.codec import Channel, rule_for
from vhostkit.user.message import VHOST_USER_F_PROTOCOL_FEATURES, FrontendReq, ReplyRule
from vhostkit.virtio.blk import BLK_CONFIG_SIZE, SECTOR_SIZE, BlkConfig
from vhostkit.virtio.features import DeviceStatus, VirtioFeature, VirtioNetFeature
from vhostkit.virtio.memory import GuestMemory

pytestmark = pytest.mark.peer

P = ProtocolFeature
VF = VirtioFeature
NF = VirtioNetFeature


def check_pairing(messages: list[TraceRecord], protocol_acked: int | None = None) -> None:
    """Every record is valid; every reply answers an earlier request of the same name on the
    same channel; every request that must be answered was answered exactly once."""
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
    assert all(m.malformed is None for m in messages), [m for m in messages if m.malformed]
    by_seq = {m.seq: m for m in messages}
    answered: dict[int, int] = {}
    for m in messages:
        if not m.is_reply:
            continue
        assert m.reply_to is not None, m
        req = by_seq[m.reply_to]
        assert req.seq < m.seq and not req.is_reply
        assert (req.request, req.channel) == (m.request, m.channel)
        assert req.direction is not m.direction
        assert m.rtt is not None and m.rtt >= 0
        answered[req.seq] = answered.get(req.seq, 0) + 1
    assert set(answered.values()) <= {1}
    for m in messages:
        if m.is_reply or m.channel is not Channel.MAIN:
            continue
        always = rule_for(FrontendReq[m.request]).reply is ReplyRule.ALWAYS
        if always or m.need_reply:
            assert m.seq in answered, f"#{m.seq} {m.request} got no reply"


def front_end_requests(messages: list[TraceRecord]) -> list[TraceRecord]:
    return [m for m in messages if m.channel is Channel.MAIN and not m.is_reply]


# --- 1. QEMU + iPXE -> tracer -> vhostkit net back-end: DHCP through the proxy -------------


def test_qemu_ipxe_dhcp_through_the_tracer(fd_check, sock_dir):
    which_or_skip("qemu-system-x86_64")
    which_or_skip("dnsmasq")
    mac = "52:54:00:12:34:8a"
    be, fe = sock_dir / "be.sock", sock_dir / "fe.sock"
    with net_backend(be, address="10.204.0.1") as rig, contextlib.ExitStack() as stack:
        dhcp = stack.enter_context(
            Dnsmasq(
                rig.ns.name,
                rig.tap.name,
                "10.204.0.50,10.204.0.99,255.255.255.0,1h",
                sock_dir / "leases",
            )
        )
        tracer = stack.enter_context(TraceProcess(fe, be, sock_dir / "trace.jsonl"))
        qemu = stack.enter_context(QemuVirtioNet(fe, device_args=f"mac={mac}"))
        tap = re.escape(rig.tap.name)
        ack = dhcp.wait_for_line(rf"DHCPACK\({tap}\) (10\.204\.0\.\d+) {mac}", timeout=25)
        leased = ack.group(1)
        device = rig.device
        device.wait_for(  # type: ignore[attr-defined]
            lambda: device.tx_frames >= 2 and device.rx_frames >= 2,  # type: ignore[attr-defined]
            timeout=10,
        )
        acked_features = device.acked_features  # type: ignore[attr-defined]
        assert device.memory is not None  # type: ignore[attr-defined]
        mapped = sorted(
            (r.guest_phys_addr, r.memory_size)
            for r in device.memory.regions  # type: ignore[attr-defined]
        )
        ring_sizes = {r.index: r.num for r in device.vrings}  # type: ignore[attr-defined]
        dhcp.stop()
        assert f"{mac} {leased}" in (sock_dir / "leases").read_text()
        qemu.stop()
        tracer.wait_for_line(r"session 1: front-end closed the connection", timeout=10)
        tracer.stop()
    assert tracer.returncode == 0, tracer.tail()
    assert not fe.exists()

    messages = [m for m in tracer.messages() if m.session == 1]
    check_pairing(messages)
    requests = front_end_requests(messages)
    names = [m.request for m in requests]
    # the spec's flow: features first, then the memory, then the rings, then the rings run
    first = {name: names.index(name) for name in reversed(names)}
    assert names[0] == "GET_FEATURES"
    assert first["GET_PROTOCOL_FEATURES"] < first["SET_PROTOCOL_FEATURES"] < first["SET_FEATURES"]
    memory = "ADD_MEM_REG" if "ADD_MEM_REG" in first else "SET_MEM_TABLE"
    assert first["SET_FEATURES"] < first[memory] < first["SET_VRING_ADDR"]
    assert first["SET_BACKEND_REQ_FD"] < first[memory]
    for index in (0, 1):
        ring = [m.request for m in requests if m.field("ring") == index]
        for name in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK"):
            assert name in ring, (index, ring)
        assert ring.index("SET_VRING_NUM") < ring.index("SET_VRING_ADDR")
        assert ring.index("SET_VRING_ADDR") < ring.index("SET_VRING_KICK")
        assert any(
            m.request == "SET_VRING_ENABLE" and m.field("ring") == index and m.field("enable") == 1
            for m in requests
        )
        nums = [m.field("num") for m in requests if m.request == "SET_VRING_NUM"]
        assert ring_sizes[index] in nums
    # the log agrees with what the back-end holds: features, memory, and what QEMU was offered
    set_features = [m for m in requests if m.request == "SET_FEATURES"]
    assert set_features[-1].field("features") == acked_features
    assert "VERSION_1" in set_features[-1].summary
    offered = next(m for m in messages if m.request == "GET_FEATURES" and m.is_reply)
    assert "MAC" in offered.field("features_names")  # type: ignore[operator]
    if memory == "ADD_MEM_REG":
        logged = [m.field("region") for m in requests if m.request == "ADD_MEM_REG"]
    else:
        table = [m for m in requests if m.request == "SET_MEM_TABLE"][-1]
        logged = list(table.field("regions"))  # type: ignore[arg-type]
    assert sorted((r.as_dict()["gpa"], r.as_dict()["size"]) for r in logged) == mapped
    assert all(m.fds == 1 for m in requests if m.request == "ADD_MEM_REG")
    # QEMU handed the back-end channel over: the proxy interposed on it
    events = [r.summary for r in tracer.records() if r.kind is RecordKind.EVENT]
    assert any("back-end channel interposed" in e for e in events)
    # and the text output showed the same messages as they happened
    assert any(re.search(r"#\d+ +main +F>B SET_VRING_KICK fds=1 ring 1", ln) for ln in tracer.lines)


# --- 2. vhostkit Frontend -> tracer -> dpdk-testpmd's vhost PMD ----------------------------

TESTPMD_FEATURES = 0xD7C66E7CB
QUEUE_SIZE = 256


def test_frontend_to_testpmd_vhost_pmd_through_the_tracer(fd_check, sock_dir):
    which_or_skip("dpdk-testpmd")
    be, fe_path = sock_dir / "vhost-net.sock", sock_dir / "fe.sock"
    eventfds: list[int] = []
    with contextlib.ExitStack() as stack:
        pmd = stack.enter_context(Testpmd.vhost_backend(be))
        tracer = stack.enter_context(TraceProcess(fe_path, be, sock_dir / "trace.jsonl"))
        stack.callback(lambda: [os.close(fd) for fd in eventfds])
        fe = Frontend.connect(fe_path, timeout=5)
        stack.callback(fe.close)
        mem = stack.enter_context(GuestMemory.allocate([(0, 4 << 20)]))
        assert fe.get_features() == TESTPMD_FEATURES
        fe.get_protocol_features()
        fe.set_protocol_features(P.MQ | P.REPLY_ACK | P.STATUS)
        fe.set_owner()
        fe.set_features(int(VF.VERSION_1 | NF.MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES))
        assert fe.get_queue_num() == 128  # the vhost PMD's quirk, seen through the proxy too
        fe.set_mem_table(mem.regions)
        for index, gpa in ((0, 0x10000), (1, 0x20000)):
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            eventfds += [kick, call]
            fe.set_vring_num(index, QUEUE_SIZE)
            fe.set_vring_base(index, 0)
            uva = mem.gpa_to_uva(gpa)
            fe.set_vring_addr(VringAddr(index, desc=uva, avail=uva + 0x1000, used=uva + 0x2000))
            fe.set_vring_kick(index, kick)
            fe.set_vring_call(index, call)
            fe.set_vring_enable(index, True)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        fe.set_status(int(status | DeviceStatus.DRIVER_OK))
        pmd.wait_for_line(re.escape(f"({be}) virtio is now ready for processing"), 10)
        pmd.wait_for_line(r"Port 0: link state change event", 10)
        assert [fe.get_vring_base(i) for i in (0, 1)] == [0, 0]
        fe.close()
        tracer.wait_for_line(r"session 1: front-end closed the connection", timeout=10)
        tracer.stop()
        assert pmd.running
    assert tracer.returncode == 0 and pmd.returncode == 0
    messages = tracer.messages()
    check_pairing(messages)
    ring_setup = [
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL",
        "SET_VRING_ENABLE",
    ]  # fmt: skip
    assert [m.request for m in front_end_requests(messages)] == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
        "SET_FEATURES", "GET_QUEUE_NUM", "SET_MEM_TABLE", *ring_setup, *ring_setup,
        "SET_STATUS", "GET_VRING_BASE", "GET_VRING_BASE",
    ]  # fmt: skip
    replies = {m.reply_to: m for m in messages if m.is_reply}
    features = replies[1]
    assert features.field("features") == TESTPMD_FEATURES
    assert {"RING_PACKED", "MRG_RXBUF", "CTRL_VQ"} <= set(features.field("features_names"))  # type: ignore[arg-type]
    queues = next(m for m in messages if m.request == "GET_QUEUE_NUM" and m.is_reply)
    assert queues.summary == "queues 128"
    # REPLY_ACK acked before SET_OWNER: from there on every request asks for and gets an ack
    owner = next(m for m in messages if m.request == "SET_OWNER")
    later = [m for m in front_end_requests(messages) if m.seq >= owner.seq]
    assert all(m.need_reply or m.request.startswith("GET_") for m in later)
    assert all(replies[m.seq].summary == "ok" for m in later if m.need_reply)


# --- 3. blk back-end resized: CONFIG_CHANGE_MSG on the back-end channel --------------------


class BlkDaemon(PeerProcess):
    """``vhostkit blk-backend`` (the real entry point), listening at ``socket``."""

    name = "vhostkit-blk-backend"

    def __init__(self, socket: Path, image: Path) -> None:
        argv = [sys.executable, "-m", "vhostkit", "blk-backend", "--socket", str(socket)]
        super().__init__([*argv, "--image", str(image)])

    def _wait_ready(self) -> None:
        self.wait_for_line(r"listening on ", self.ready_timeout)

    def _request_stop(self) -> bool:
        self._signal(signal.SIGTERM)
        return True


class ConfigWatcher(FrontendReqHandler):
    """As QEMU does on CONFIG_CHANGE_MSG: read the config space again."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.capacities: list[int] = []
        self.changed = threading.Event()

    def config_change(self) -> None:
        self.capacities.append(BlkConfig.unpack(self.fe.get_config(0, BLK_CONFIG_SIZE)).capacity)
        self.changed.set()


def test_blk_resize_config_change_appears_in_the_trace(fd_check, sock_dir, tmp_path):
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    be, fe_path = sock_dir / "blk.sock", sock_dir / "fe.sock"
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(BlkDaemon(be, image))
        tracer = stack.enter_context(
            TraceProcess(fe_path, be, sock_dir / "trace.jsonl", ["--device", "blk"])
        )
        fe = Frontend.connect(fe_path, timeout=5)
        stack.callback(fe.close)
        driver = BlkDriver(fe)
        stack.callback(driver.close)
        driver.start()
        watcher = ConfigWatcher(fe)
        server = FrontendReqServer(fe.open_backend_channel(), watcher, driver.protocol)
        server.start()
        stack.callback(server.close)
        since = daemon.line_count
        os.truncate(image, 2 * IMAGE_SIZE)
        daemon._signal(signal.SIGHUP)
        # logged once our ack came back to the daemon through the proxy
        daemon.wait_for_line(r"front-end told: True", timeout=15, since=since)
        assert watcher.changed.is_set()
        assert watcher.capacities == [2 * IMAGE_SIZE // SECTOR_SIZE]
        line = tracer.wait_for_line(r"bchan B>F CONFIG_CHANGE_MSG.*", timeout=10)
        assert "[NEED_REPLY]" in line.group(0)
        server.close()
        fe.close()
        tracer.wait_for_line(r"session 1: front-end closed the connection", timeout=10)
        tracer.stop()
        daemon.stop()
    assert tracer.returncode == 0 and daemon.returncode == 0
    messages = tracer.messages()
    check_pairing(messages)
    bchan = [m for m in messages if m.channel is Channel.BACKEND]
    assert [(m.direction.value, m.request, m.is_reply) for m in bchan] == [
        ("B>F", "CONFIG_CHANGE_MSG", False),
        ("F>B", "CONFIG_CHANGE_MSG", True),
    ]
    change, ack = bchan
    assert ack.reply_to == change.seq and ack.summary == "ok"
    # the front-end re-read the config while the back-end waited for its ack: the new capacity
    reread = [
        m for m in messages if m.request == "GET_CONFIG" and m.is_reply and m.seq > change.seq
    ]
    assert reread and reread[0].seq < ack.seq
    data = bytes.fromhex(reread[0].field("data"))  # type: ignore[arg-type]
    assert struct.unpack_from("<Q", data)[0] == 2 * IMAGE_SIZE // SECTOR_SIZE
    # blk feature names, since the tracer was told the device
    set_features = next(m for m in messages if m.request == "SET_FEATURES")
    assert "FLUSH" in set_features.field("features_names")  # type: ignore[operator]
