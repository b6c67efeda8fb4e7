"""Net data path through a tap: vhostkit's net back-end daemon against the tap's syscall ceiling.

Two directions, three frame sizes (64 B, 1500 B, 64 KiB GSO super-frames):

* **RX** (tap -> back-end -> guest): a sender in a network namespace of the benchmark's own
  writes frames into the tap's link with an AF_PACKET socket (``PACKET_QDISC_BYPASS``; GSO
  super-frames with ``PACKET_VNET_HDR``); the daemon (``python3 -m vhostkit backend net``, its
  own process) reads them from the tap fd and puts them into the guest's receive ring. The
  guest is DPDK's testpmd (virtio_user, ``rxonly``) for 64 B and 1500 B, and vhostkit's own
  driver in a separate process for 64 KiB GSO (testpmd's virtio_user takes no GSO frames
  without LRO). The figure is what the guest received.
* **TX** (guest -> back-end -> tap): testpmd ``txonly`` (64 B, 1500 B) or vhostkit's driver
  in a separate process (64 KiB GSO with a TCPv4 GSO header) fills the TX ring; the daemon
  writes every frame to the tap fd. The figure is what the tap's link received (its
  ``rx_packets`` counter in the namespace; the kernel drops the frames there: they are for
  nobody).
* **References**, measured in the same run with the same traffic on the same kind of tap
  (vnet header, same offloads): a plain Python ``os.read`` loop on the tap fd (RX) and a plain
  ``os.write`` loop (TX), each in its own process. That is the syscall ceiling of one Python
  thread.

Every figure is the median of several repetitions; each row says how much CPU the processes
of the measured party took, and how much other processes on the machine took meanwhile
("others": on a shared machine a figure taken while others ran says little).

Nothing leaves the machine: the tap's link lives in the benchmark's namespace, which has no
other link, no address and no IPv6.

Module contract (``vhostkit bench`` imports it): :func:`run` returns one dict per figure.
Run as a script (root: taps and namespaces): ``python3 bench/net_tap.py [--quick] [--json]
[--runs N] [--seconds S] [--only rx|tx] [--sizes 64,1500,gso] [--busy-poll-us N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH = "net_tap"
GUEST_MAC = bytes.fromhex("020000000002")
#: frames are for nobody in the namespace: dropped by the kernel as soon as they arrive
OTHER_MAC = bytes.fromhex("020000000099")
SRC_MAC = bytes.fromhex("020000000001")
HDR_SIZE = 12  # virtio-net header with VERSION_1 / MRG_RXBUF (what the back-end gives the tap)
GSO_IP_LEN = 65535  # IPv4 total length of a GSO super-frame (the largest there is)
GSO_MSS = 1448
#: the RX "64 KiB" frame: the largest a tap's link sends (MTU 65521 + the Ethernet header)
RX_JUMBO = 65535
RX_JUMBO_MTU = RX_JUMBO - 14

TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
_HZ = os.sysconf("SC_CLK_TCK")


# --- frames -----------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def gso_frame(dst: bytes) -> bytes:
    """An Ethernet/IPv4/TCP super-frame of 64 KiB (what a TSO sender hands its NIC)."""
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, GSO_IP_LEN, 1, 0x4000, 64, 6, 0,
                    bytes([10, 203, 0, 1]), bytes([10, 203, 0, 2]))
    )  # fmt: skip
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    payload = bytes(GSO_IP_LEN - 40)
    return dst + SRC_MAC + b"\x08\x00" + bytes(ip) + tcp + payload


def gso_header(size: int) -> bytes:
    """The virtio-net header of a TCPv4 GSO super-frame: NEEDS_CSUM, hdr_len, gso_size,
    csum_start/offset of the TCP checksum (``size`` 10 or 12 bytes)."""
    return struct.pack("<BBHHHH", 1, 1, 54, GSO_MSS, 34, 16) + bytes(size - 10)


def small_frame(dst: bytes, size: int) -> bytes:
    """A frame of ``size`` bytes with the IEEE local experimental EtherType (no stack's)."""
    return dst + SRC_MAC + b"\x88\xb5" + bytes(size - 14)


@dataclass(frozen=True)
class Size:
    label: str
    frame_len: int  # bytes of one frame on the wire (without the virtio-net header)
    gso: bool


SIZES = {
    "64": Size("64 B", 64, False),
    "1500": Size("1500 B", 1514, False),
    "gso": Size("64 KiB", 14 + GSO_IP_LEN, True),
}


# --- processes, namespace, counters -----------------------------------------------------------


#: CPUs, on a machine of two or more: the party measured (the back-end daemon, or the plain
#: read/write loop it is compared with) runs alone on one; the traffic source and the guest
#: (testpmd's forwarding lcore, vhostkit's driver) share the other
MEASURED_CPU = 0
TRAFFIC_CPU = 1


def _env(tree: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree or ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Namespace:
    """A network namespace of the benchmark's own: no IPv6, no link but the taps moved in."""

    def __init__(self) -> None:
        self.name = f"vhkbench-{os.getpid()}"
        _run("ip", "netns", "add", self.name)
        for scope in ("all", "default"):
            self.exec_argv("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")

    def exec_argv(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.name, *argv)

    def take_link(self, ifname: str, mtu: int | None = None) -> None:
        """Move ``ifname`` (a tap in the root namespace) here and bring it up."""
        _run("ip", "link", "set", "dev", ifname, "netns", self.name)
        if mtu is not None:
            _run("ip", "-n", self.name, "link", "set", "dev", ifname, "mtu", str(mtu))
        _run("ip", "-n", self.name, "link", "set", "dev", ifname, "up")

    def stats(self, ifname: str) -> dict[str, int]:
        """The link's counters: rx_packets (frames written to the tap fd), tx_packets (frames
        the tap fd's reader took), tx_dropped, ..."""
        out = json.loads(_run("ip", "-n", self.name, "-s", "-j", "link", "show", "dev", ifname))
        s = out[0]["stats64"]
        return {f"{d}_{k}": int(v) for d in ("rx", "tx") for k, v in s[d].items()}

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _proc_cpu(pid: int) -> float:
    """CPU seconds a process (all its threads) has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


def _machine_busy() -> tuple[float, float]:
    """CPU seconds of the machine in processes (user, system), and in interrupts (irq and
    softirq: the kernel's packet processing, which no process is charged with)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + steal) / _HZ, (irq + softirq) / _HZ


@dataclass
class Window:
    """A measurement window: CPU of ``parties`` (name -> pid), of this process and of the
    whole machine between :meth:`start` and :meth:`stop`."""

    parties: dict[str, int]
    t0: float = 0.0
    t1: float = 0.0
    cpu0: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # per cent of one CPU
    others: float = 0.0  # per cent of one CPU
    softirq: float = 0.0  # per cent of one CPU
    _busy0: tuple[float, float] = (0.0, 0.0)
    _self0: float = 0.0

    def _ours(self) -> dict[str, float]:
        return {name: _proc_cpu(pid) for name, pid in self.parties.items()}

    def start(self) -> None:
        self.cpu0 = self._ours()
        self._self0 = _proc_cpu(os.getpid())
        self._busy0 = _machine_busy()
        self.t0 = time.monotonic()

    def stop(self) -> None:
        self.t1 = time.monotonic()
        wall = self.t1 - self.t0
        now = self._ours()
        self.cpu = {k: 100 * (now[k] - self.cpu0[k]) / wall for k in now}
        mine = sum(now[k] - self.cpu0[k] for k in now) + _proc_cpu(os.getpid()) - self._self0
        busy, irq = _machine_busy()
        self.others = max(0.0, 100 * ((busy - self._busy0[0]) - mine) / wall)
        self.softirq = 100 * (irq - self._busy0[1]) / wall

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def describe(self) -> str:
        parts = [f"{k} {v:.0f}%" for k, v in self.cpu.items()]
        return f"CPU: {', '.join(parts)}, irq {self.softirq:.0f}%; others {self.others:.0f}%"


class Proc:
    """A child process with its output collected by a thread (lines kept)."""

    def __init__(
        self,
        argv: list[str],
        *,
        pass_fds: tuple[int, ...] = (),
        cpu: int | None = None,
        tree: Path | None = None,
        nice: int = 0,
    ):
        def pin() -> None:
            if cpu is not None and (os.cpu_count() or 1) > cpu:
                os.sched_setaffinity(0, {cpu})
            if nice:
                os.nice(nice)

        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=pass_fds,
            env=_env(tree),
            cwd=str(tree or ROOT),  # ``-m`` puts the working directory first on sys.path
            preexec_fn=pin,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 20.0, since: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-15:])
                    raise RuntimeError(f"{self.popen.args!r}: no {pattern!r}; output:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(2)


# --- the child programs -------------------------------------------------------------------------

#: The traffic source in the namespace: AF_PACKET frames into the tap's link, forever.
_SENDER = r"""
import socket, sys
ifname, frame, vnet = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3] == "1"
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS: straight to the tap's xmit
if vnet:
    s.setsockopt(263, 15, 1)  # PACKET_VNET_HDR: a virtio-net header (GSO) before the frame
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
s.bind((ifname, 0))
send = s.send
print("sending", flush=True)
while True:
    for _ in range(256):
        try:
            send(frame)
        except OSError:
            pass
"""

#: The RX reference: a plain read loop on the tap fd (blocking; the tap counts what it hands).
_READER = r"""
import os, sys
fd = int(sys.argv[1])
os.set_blocking(fd, True)
read = os.read
print("reading", flush=True)
while True:
    read(fd, 65536 + 512)
"""

#: The TX reference: a plain write loop of one frame (virtio-net header first) on the tap fd.
_WRITER = r"""
import os, sys
fd, frame = int(sys.argv[1]), open(sys.argv[2], "rb").read()
os.set_blocking(fd, True)
write = os.write
print("writing", flush=True)
while True:
    for _ in range(256):
        try:
            write(fd, frame)
        except OSError:
            pass
"""

#: vhostkit's driver as the guest, in a process of its own. RX: it counts the frames the
#: device put in its buffers and reposts them, a batch at a time (no copy, no per-frame
#: Python), and sleeps on its call eventfd when nothing came; TX: 64 KiB TCPv4 GSO frames.
_GUEST = r"""
import os, signal, sys, time
import numpy as np
from vhostkit.guest.net import VirtioNetDriver
from vhostkit.user import Frontend
from vhostkit.virtio.features import VirtioFeature as VF, VirtioNetFeature as NF
from vhostkit.virtio.net import VirtioNetHdr, NetHdrFlag, GsoType
mode, path, frame = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read()
rx_size = int(sys.argv[4])
count = 0
def report(*_):
    print(f"count {count} {time.monotonic():.6f}", flush=True)
signal.signal(signal.SIGUSR1, report)
features = VF.VERSION_1 | NF.MRG_RXBUF | NF.CSUM | NF.HOST_TSO4 | NF.GUEST_CSUM | NF.GUEST_TSO4
fe = Frontend.connect(path, timeout=5)
nic = VirtioNetDriver(fe, features=int(features), buffer_size=65664 if mode == "tx" else 2048,
                      rx_buffer_size=rx_size, queue_size=256).start()
print("started", flush=True)
if mode == "rx":
    p = nic._pairs[0]
    rx, ring, base = p.rx, p.rx_ring, p.rx_base
    while True:
        tokens, lens = rx.reap_batch()
        k = tokens.shape[0]
        if not k:
            ring.wait_used(0.5)
            continue
        count += k  # every buffer is one frame: the buffers hold the largest frame
        rx.add_batch(base + tokens * rx_size, np.full(k, rx_size), writable=True, tokens=tokens)
        ring.publish()
else:
    hdr = VirtioNetHdr(flags=NetHdrFlag.NEEDS_CSUM, gso_type=GsoType.TCPV4, hdr_len=54,
                       gso_size=1448, csum_start=34, csum_offset=16)
    frames = [frame] * 64
    send = nic.send
    while True:
        n = send(frames, hdr=hdr)
        count += n
        if not n:
            nic.wait_tx_done(0.01)
"""


# --- one measurement ------------------------------------------------------------------------


@dataclass
class Result:
    frames_per_s: float
    frame_len: int
    window: Window
    extra: str = ""

    @property
    def gbps(self) -> float:
        return self.frames_per_s * self.frame_len * 8 / 1e9


@dataclass
class Config:
    seconds: float
    warmup: float
    queue_size: int = 256
    busy_poll_us: float = 0.0
    extra_backend_args: tuple[str, ...] = ()
    #: the source tree the daemon runs from (None: this one)
    tree: Path | None = None


_tap_counter = iter(range(10**6))


def _tap_name(kind: str) -> str:
    return f"vhk{kind}{os.getpid() % 100000}{next(_tap_counter)}"[:15]


def _measure_link(
    ns: Namespace, ifname: str, cfg: Config, parties: dict[str, int], counter: str
) -> tuple[float, Window]:
    """Frames per second of a link counter (``rx_packets``/``tx_packets``) over the window."""
    time.sleep(cfg.warmup)  # a measurement window, not synchronisation
    w = Window(parties)
    s0 = ns.stats(ifname)[counter]
    w.start()
    time.sleep(cfg.seconds)
    s1 = ns.stats(ifname)[counter]
    w.stop()
    return (s1 - s0) / w.seconds, w


def _reference_tap(ns: Namespace, size: Size, blocking: bool = True) -> tuple[object, str]:
    from vhostkit.kernel.tap import Tap

    name = _tap_name("r")
    tap = Tap(name, nonblocking=not blocking)
    tap.set_vnet_hdr_size(HDR_SIZE)
    # what the back-end sets for a guest that acks these offloads (the GSO rows need them)
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if size.gso else 0)
    ns.take_link(tap.name, RX_JUMBO_MTU if size.gso else None)
    return tap, tap.name


def _frame_file(data: bytes) -> str:
    """A file holding ``data`` for a child (a 64 KiB frame does not fit in an argument)."""
    fd, path = tempfile.mkstemp(prefix="vhk-frame-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _frame_files.append(path)
    return path


_frame_files: list[str] = []


def _sender(ns: Namespace, ifname: str, size: Size) -> Proc:
    # A 64 KiB frame goes as one plain frame over a link with the largest MTU a tap takes: a
    # packet socket's GSO frames (PACKET_VNET_HDR) are SKB_GSO_DODGY, which a tap (no
    # NETIF_F_GSO_ROBUST) only takes segmented. The reader sees the same bytes either way.
    payload = small_frame(GUEST_MAC, RX_JUMBO if size.gso else size.frame_len)
    p = Proc(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", _SENDER, ifname,
         _frame_file(payload), "0"],
        cpu=TRAFFIC_CPU,
        nice=10,  # the guest beside it runs first when it has work (it sleeps otherwise)
    )  # fmt: skip
    p.wait_line("sending")
    return p


def reference_rx(ns: Namespace, size: Size, cfg: Config) -> Result:
    with ExitStack() as stack:
        tap, name = _reference_tap(ns, size)
        stack.callback(tap.close)  # type: ignore[attr-defined]
        fd = tap.fd  # type: ignore[attr-defined]
        reader = Proc([sys.executable, "-c", _READER, str(fd)], pass_fds=(fd,), cpu=MEASURED_CPU)
        stack.callback(reader.stop)
        reader.wait_line("reading")
        sender = _sender(ns, name, size)
        stack.callback(sender.stop)
        parties = {"reader": reader.pid, "sender": sender.pid}
        rate, w = _measure_link(ns, name, cfg, parties, "tx_packets")
        return Result(rate, RX_JUMBO if size.gso else size.frame_len, w)


def reference_tx(ns: Namespace, size: Size, cfg: Config) -> Result:
    with ExitStack() as stack:
        tap, name = _reference_tap(ns, size)
        stack.callback(tap.close)  # type: ignore[attr-defined]
        if size.gso:
            frame = gso_header(HDR_SIZE) + gso_frame(OTHER_MAC)
        else:
            frame = bytes(HDR_SIZE) + small_frame(OTHER_MAC, size.frame_len)
        writer = Proc(
            [sys.executable, "-c", _WRITER, str(tap.fd), _frame_file(frame)],  # type: ignore[attr-defined]
            pass_fds=(tap.fd,),  # type: ignore[attr-defined]
            cpu=MEASURED_CPU,
        )
        stack.callback(writer.stop)
        writer.wait_line("writing")
        rate, w = _measure_link(ns, name, cfg, {"writer": writer.pid}, "rx_packets")
        return Result(rate, size.frame_len, w)


@contextmanager
def backend_daemon(
    ns: Namespace, sock: Path, cfg: Config, mtu: int | None = None
) -> Iterator[tuple[Proc, str]]:
    """``python3 -m vhostkit backend net`` on a tap of its own, whose link is then moved into
    the namespace."""
    name = _tap_name("b")
    r, w = os.pipe()
    argv = [sys.executable, "-m", "vhostkit", "backend", "net", "--socket", str(sock),
            "--tap", name, "--mac", GUEST_MAC.hex(":"), "--ready-fd", str(w)]  # fmt: skip
    if cfg.busy_poll_us:
        argv += ["--busy-poll-us", f"{cfg.busy_poll_us:g}"]
    argv += list(cfg.extra_backend_args)
    try:
        daemon = Proc(argv, pass_fds=(w,), cpu=MEASURED_CPU, tree=cfg.tree)
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            if not ready.read().startswith(b"READY=1"):
                time.sleep(0.2)
                raise RuntimeError("backend daemon did not start:\n" + "\n".join(daemon.lines))
        ns.take_link(name, mtu)
        yield daemon, name
    finally:
        daemon.stop()


def _testpmd(sock: Path, mode: str, cfg: Config, size: Size) -> object:
    from vhostkit.testing.peers import Testpmd

    app = [f"--txpkts={size.frame_len}"] if mode == "txonly" else []
    pmd = Testpmd.virtio_user_frontend(
        sock,
        forward_mode=mode,
        queue_size=cfg.queue_size,
        interactive=False,
        mac=GUEST_MAC.hex(":"),
        app_args=app,
        lcores=f"{MEASURED_CPU},{TRAFFIC_CPU}",  # forwards on the second: TRAFFIC_CPU
    )
    pmd.start()
    return pmd


_PPS = re.compile(r"\b(Rx|Tx)-pps:\s*(\d+)")


def _testpmd_pps(pmd: object, start: int, end: int, field_: str) -> float:
    lines = pmd.lines[start:end]  # type: ignore[attr-defined]
    values = [int(m.group(2)) for ln in lines if (m := _PPS.search(ln)) and m.group(1) == field_]
    values = values[1:]  # the first report covers time before the window
    return statistics.fmean(values) if values else float("nan")


def _guest(sock: Path, mode: str, size: Size) -> Proc:
    frame = gso_frame(OTHER_MAC) if mode == "tx" else b""
    # receive buffers that hold the largest frame of the row: one buffer per frame
    rx_size = 65664 if size.gso else 2048
    p = Proc(
        [sys.executable, "-c", _GUEST, mode, str(sock), _frame_file(frame), str(rx_size)],
        cpu=TRAFFIC_CPU,
    )
    p.wait_line("started")
    return p


def _guest_count(p: Proc) -> tuple[int, float]:
    since = len(p.lines)
    os.kill(p.pid, signal.SIGUSR1)
    m = p.wait_line(r"count (\d+) ([\d.]+)", 5, since=since)
    return int(m.group(1)), float(m.group(2))


def backend_rx(ns: Namespace, size: Size, cfg: Config, d: Path) -> Result:
    sock = d / "rx.sock"
    with ExitStack() as stack:
        mtu = RX_JUMBO_MTU if size.gso else None
        daemon, name = stack.enter_context(backend_daemon(ns, sock, cfg, mtu))
        guest = _guest(sock, "rx", size)
        stack.callback(guest.stop)
        sender = _sender(ns, name, size)
        stack.callback(sender.stop)
        time.sleep(cfg.warmup)
        w = Window({"backend": daemon.pid, "guest": guest.pid, "sender": sender.pid})
        c0, t0 = _guest_count(guest)
        s0 = ns.stats(name)
        w.start()
        time.sleep(cfg.seconds)
        c1, t1 = _guest_count(guest)
        s1 = ns.stats(name)
        w.stop()
        rate = (c1 - c0) / (t1 - t0)
        taken = (s1["tx_packets"] - s0["tx_packets"]) / w.seconds
        lost = (s1["tx_dropped"] - s0["tx_dropped"]) / w.seconds
        extra = (
            f"backend read {taken / 1e6:.3f} Mpps from the tap, tap dropped {lost / 1e6:.3f} Mpps"
        )
        return Result(rate, RX_JUMBO if size.gso else size.frame_len, w, extra)


def backend_tx(ns: Namespace, size: Size, cfg: Config, d: Path) -> Result:
    sock = d / "tx.sock"
    with ExitStack() as stack:
        daemon, name = stack.enter_context(backend_daemon(ns, sock, cfg))
        if size.gso:
            guest = _guest(sock, "tx", size)
            stack.callback(guest.stop)
            parties = {"backend": daemon.pid, "guest": guest.pid}
        else:
            pmd = _testpmd(sock, "txonly", cfg, size)
            stack.callback(pmd.stop)  # type: ignore[attr-defined]
            parties = {"backend": daemon.pid, "testpmd": pmd.pid}  # type: ignore[attr-defined]
        rate, w = _measure_link(ns, name, cfg, parties, "rx_packets")
        return Result(rate, size.frame_len, w)


# --- the table ----------------------------------------------------------------------------------


def _median(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.frames_per_s)
    return ordered[len(ordered) // 2]


def _label(direction: str, size: Size) -> str:
    if not size.gso:
        return size.label
    return size.label + (" GSO" if direction == "tx" else " frames")


def _row(
    direction: str, size: Size, ours: list[Result], ref: list[Result], variant: str = ""
) -> dict[str, object]:
    o, r = _median(ours), _median(ref)
    gbit = size.frame_len >= 1000
    if gbit:
        value, ref_value, unit = o.gbps, r.gbps, "Gbit/s"
    else:
        value, ref_value, unit = o.frames_per_s / 1e6, r.frames_per_s / 1e6, "Mpps"
    ratio = value / ref_value if ref_value else float("nan")
    if direction == "rx":
        path = "tap -> backend -> vhostkit guest"
        refname = "os.read loop on a tap"
    else:
        path = ("vhostkit guest" if size.gso else "testpmd") + " -> backend -> tap"
        refname = "os.write loop on a tap"
    aim = "ratio >= 0.8"
    if direction == "tx" and size.gso:
        aim = "ratio >= 0.8; > 20 Gbit/s"
    note = (
        f"median of {len(ours)}: {o.frames_per_s / 1e6:.3f} Mpps ({o.window.describe()}"
        + (f"; {o.extra}" if o.extra else "")
        + f") vs {r.frames_per_s / 1e6:.3f} Mpps ({r.window.describe()})"
    )
    return {
        "bench": BENCH,
        "figure": f"net {direction.upper()} {_label(direction, size)} ({path})"
        + (f" [{variant}]" if variant else ""),
        "value": float(value),
        "unit": unit,
        "reference": refname,
        "reference_value": float(ref_value),
        "ratio": float(ratio),
        "aim": aim,
        "note": note,
    }


def measure(
    *,
    quick: bool,
    runs: int | None = None,
    seconds: float | None = None,
    directions: tuple[str, ...] = ("rx", "tx"),
    sizes: tuple[str, ...] = ("64", "1500", "gso"),
    busy_poll_us: float = 0.0,
    extra_backend_args: tuple[str, ...] = (),
    compare_tree: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Every figure of this benchmark (see the module docstring).

    ``compare_tree``: also measure the daemon of another source tree (e.g. an export of an
    older commit), interleaved with this one's in the same run against the same references;
    its rows say ``[compare_tree]`` (``busy_poll_us`` and ``extra_backend_args`` are not
    given to it).
    """
    if os.geteuid() != 0:
        raise PermissionError("net_tap needs root (taps and network namespaces)")
    runs = runs or (1 if quick else 3)
    cfg = Config(
        seconds=seconds or (1.0 if quick else 2.5),
        warmup=0.3 if quick else 0.7,
        busy_poll_us=busy_poll_us,
        extra_backend_args=extra_backend_args,
    )
    variants: list[tuple[str, Config]] = [("", cfg)]
    if compare_tree is not None:
        other = Config(cfg.seconds, cfg.warmup, cfg.queue_size, tree=compare_tree)
        variants.insert(0, (str(compare_tree), other))
    rows: list[dict[str, object]] = []
    with ExitStack() as stack:
        ns = Namespace()
        stack.callback(ns.close)
        stack.callback(_remove_frame_files)
        d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vhk-nettap-")))
        for direction in directions:
            for key in sizes:
                size = SIZES[key]
                ours: dict[str, list[Result]] = {label: [] for label, _ in variants}
                ref: list[Result] = []
                for _ in range(runs):  # interleaved: all see the same load
                    ref_fn = reference_rx if direction == "rx" else reference_tx
                    ours_fn = backend_rx if direction == "rx" else backend_tx
                    ref.append(ref_fn(ns, size, cfg))
                    for label, vcfg in variants:
                        ours[label].append(ours_fn(ns, size, vcfg, d))
                        if progress:
                            o, r = ours[label][-1], ref[-1]
                            progress(
                                f"  {direction} {_label(direction, size)}"
                                + (f" [{label}]" if label else "")
                                + f": backend {o.frames_per_s / 1e6:.3f} Mpps "
                                f"({o.window.describe()}"
                                + (f"; {o.extra}" if o.extra else "")
                                + f"), reference {r.frames_per_s / 1e6:.3f} Mpps"
                                f" ({r.window.describe()})"
                            )
                for label, _ in variants:
                    rows.append(_row(direction, size, ours[label], ref, label))
    return rows


def _remove_frame_files() -> None:
    while _frame_files:
        try:
            os.unlink(_frame_files.pop())
        except OSError:
            pass


def run(quick: bool) -> list[dict[str, object]]:
    """The benchmark runner's entry point: one dict per figure."""
    return measure(quick=quick)


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"{'figure':58} {'value':>10} {'reference':>10} {'ratio':>6}  aim")
    for r in rows:
        print(
            f"{r['figure']!s:58} {r['value']:10.3f} {r['reference_value']:10.3f} "
            f"{r['ratio']:6.2f}  {r['aim']}   [{r['unit']}]"
        )
    for r in rows:
        print(f"  {r['figure']}: {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--only", choices=("rx", "tx"))
    parser.add_argument("--sizes", default="64,1500,gso")
    parser.add_argument("--busy-poll-us", type=float, default=0.0)
    parser.add_argument("--backend-arg", action="append", default=[])
    parser.add_argument("--compare-tree", type=Path, help="also run the daemon of this tree")
    args = parser.parse_args(argv)
    rows = measure(
        quick=args.quick,
        runs=args.runs,
        seconds=args.seconds,
        directions=(args.only,) if args.only else ("rx", "tx"),
        sizes=tuple(args.sizes.split(",")),
        busy_poll_us=args.busy_poll_us,
        extra_backend_args=tuple(args.backend_arg),
        compare_tree=args.compare_tree,
        progress=None if args.json else print,
    )
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
