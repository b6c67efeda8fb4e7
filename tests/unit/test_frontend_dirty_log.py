"""The front-end's and the VMM's side of dirty logging, against a scripted back-end.

A fake back-end (a unit test of one side) sits on a real socketpair, records every request
and answers as a back-end would; it maps the log it is given and marks pages in it, so the
VMM collects what "the device" wrote through the shared memfd. Checked:

* the order QEMU uses: SET_LOG_BASE (the memfd, its size), SET_FEATURES with VHOST_F_LOG_ALL
  added, SET_VRING_ADDR again on every ring with VHOST_VRING_F_LOG and ``log`` = the ring's
  used-ring guest-physical address; stopping sends the same without the bits;
* every SET_LOG_BASE reply real back-ends send is accepted (quirks "DPDK: empty SET_LOG_BASE
  reply" and "libvhost-user: SET_LOG_BASE echoes the size"), a non-zero status is a failure;
* a back-end without VHOST_F_LOG_ALL or LOG_SHMFD is refused with FeatureNotNegotiated before
  anything is sent (also vhostkit's own echo device, which offers no LOG_ALL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from vhostkit.backend import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG, VringAddr
from vhostkit.devices.echo import EchoDevice
from vhostkit.errors import (
    FeatureNotNegotiated,
    InvalidOperation,
    InvalidParam,
    RequestFailed,
    TransportError,
)
from vhostkit.user import BackendReqServer, Connection, Frontend
from vhostkit.user.message import (
    U64,
    Empty,
    FrontendReq,
    LogBaseReply,
    LogDesc,
    Payload,
    ProtocolFeature,
    VringAddrPayload,
    VringStatePayload,
)
from vhostkit.virtio.dirty_log import LOG_PAGE_SIZE, DirtyLog, log_size_for
from vhostkit.virtio.features import VirtioFeature as VF
from vhostkit.virtio.features import VirtioNetFeature as NF
from vhostkit.vmm import VhostUserNetPlane, VirtioNetDevice

R = FrontendReq
P = ProtocolFeature
OFFER = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.LOG_ALL | NF.MRG_RXBUF)
PROTOCOL = int(P.MQ | P.REPLY_ACK | P.STATUS | P.LOG_SHMFD)


@dataclass
class FakeBackend:
    """Answers every request like a back-end; maps the dirty log it is given."""

    conn: Connection
    features: int = OFFER
    protocol: int = PROTOCOL
    #: how SET_LOG_BASE is answered: "empty" (DPDK), "echo" (libvhost-user), or a u64 status
    log_reply: str | int = "empty"
    seen: list[tuple[R, Payload, int]] = field(default_factory=list)
    log: DirtyLog | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="fake-log-backend", daemon=True)

    def requests(self, *names: R) -> list[tuple[R, Payload, int]]:
        return [s for s in self.seen if s[0] in names]

    def _answer(self, req: R, p: Payload) -> Payload | None:
        match req:
            case R.GET_FEATURES:
                return U64(self.features)
            case R.GET_PROTOCOL_FEATURES:
                return U64(self.protocol)
            case R.GET_QUEUE_NUM:
                return U64(1)
            case R.GET_STATUS:
                return U64(0xF)
            case R.GET_VRING_BASE:
                assert isinstance(p, VringStatePayload)
                return VringStatePayload(p.index, 0)
            case R.SET_LOG_BASE:
                assert isinstance(p, LogDesc)
                if self.log_reply == "empty":
                    return Empty()
                if self.log_reply == "echo":
                    return U64(p.mmap_size)
                assert isinstance(self.log_reply, int)
                return U64(self.log_reply)
        return None

    def _run(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv(timeout=10)
                except TransportError:
                    return
                req = msg.request
                assert isinstance(req, R)
                self.seen.append((req, msg.payload, len(msg.fds)))
                if req is R.SET_LOG_BASE:
                    assert isinstance(msg.payload, LogDesc) and len(msg.fds) == 1
                    if self.log is not None:
                        self.log.close()
                    self.log = DirtyLog.map(msg.fds[0], msg.payload.mmap_size)
                msg.close_fds()
                answer = self._answer(req, msg.payload)
                if answer is not None:
                    self.conn.send(msg.reply(answer))
                elif msg.need_reply:
                    self.conn.send(msg.reply(U64(0)))
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            if self.log is not None:
                self.log.close()
            self.conn.close()


@contextmanager
def fake_backend(**kwargs: object) -> Iterator[tuple[Frontend, FakeBackend]]:
    ours, theirs = Connection.pair()
    fake = FakeBackend(theirs, **kwargs)  # type: ignore[arg-type]
    fake.thread.start()
    try:
        with Frontend(ours, reply_timeout=10) as fe:
            yield fe, fake
    finally:
        fake.thread.join(10)
    assert fake.error is None, fake.error


@contextmanager
def device_on_fake(**kwargs: object) -> Iterator[tuple[VirtioNetDevice, FakeBackend]]:
    with (
        fake_backend(**kwargs) as (fe, fake),
        VirtioNetDevice(VhostUserNetPlane(fe), queue_size=64) as dev,
    ):
        dev.start()
        yield dev, fake


# --- the whole sequence, from the VMM ------------------------------------------------------


def test_vmm_turns_logging_on_and_off_as_qemu_does(fd_check) -> None:
    with device_on_fake() as (dev, fake):
        nic = dev.nic
        acked = nic.acked_features
        assert acked & VF.PROTOCOL_FEATURES and not acked & VF.LOG_ALL
        assert nic.acked_protocol_features & P.LOG_SHMFD  # the VMM device asks for it
        before = len(fake.seen)
        rx, tx = nic.queues()
        plain = {0: rx.vring_addr(), 1: tx.vring_addr()}
        used_gpa = {0: rx.ring_gpas[2], 1: tx.ring_gpas[2]}

        dlog = dev.start_dirty_log()
        assert dev.nic.dirty_log is dlog
        on = fake.seen[before:]
        assert [s[0] for s in on] == [
            R.SET_LOG_BASE,
            R.SET_FEATURES,
            R.SET_VRING_ADDR,
            R.SET_VRING_ADDR,
        ]
        assert on[0][1] == LogDesc(log_size_for(nic.memory.regions), 0) and on[0][2] == 1
        assert on[1][1] == U64(acked | VHOST_F_LOG_ALL)
        for (_, payload, _), index in zip(on[2:], (0, 1), strict=True):
            assert isinstance(payload, VringAddrPayload)
            a = payload.addr
            assert a.index == index and a.flags == VHOST_VRING_F_LOG
            assert a.log == used_gpa[index] != 0
            assert (a.desc, a.avail, a.used) == (
                plain[index].desc,
                plain[index].avail,
                plain[index].used,
            )
        assert fe_reply(dev) is LogBaseReply.EMPTY

        # "the device" writes: the pages it marks in the log it mapped reach the VMM
        assert fake.log is not None
        fake.log.mark(used_gpa[0], 8)
        fake.log.mark(5 * LOG_PAGE_SIZE + 100, 2 * LOG_PAGE_SIZE)  # pages 5, 6 and 7
        got = dev.collect_dirty()
        want = sorted({used_gpa[0] // LOG_PAGE_SIZE, 5, 6, 7})
        assert got.tolist() == want
        assert dev.collect_dirty().size == 0  # taken and cleared

        with pytest.raises(InvalidOperation, match="already on"):
            dev.start_dirty_log()
        other, peer = Connection.pair()
        with (
            VhostUserNetPlane(Frontend(other)) as plane,
            pytest.raises(InvalidOperation, match="stop dirty logging"),
        ):
            dev.swap(plane)
        peer.close()

        before = len(fake.seen)
        dev.stop_dirty_log()
        off = fake.seen[before:]
        assert [s[0] for s in off] == [R.SET_FEATURES, R.SET_VRING_ADDR, R.SET_VRING_ADDR]
        assert off[0][1] == U64(acked)
        for _, payload, _ in off[1:]:
            assert isinstance(payload, VringAddrPayload) and payload.addr.flags == 0
        assert dev.nic.dirty_log is None
        with pytest.raises(InvalidOperation, match="not on"):
            dev.collect_dirty()
        dev.stop_dirty_log()  # idempotent
        dev.stop()


def fe_reply(dev: VirtioNetDevice) -> LogBaseReply | None:
    backend = dev.plane.backend
    assert isinstance(backend, Frontend)
    return backend.log_base_reply


def test_the_log_stays_readable_after_the_device_stopped(fd_check) -> None:
    # The last pass of a migration: stop the device, then read what it wrote.
    with device_on_fake() as (dev, fake):
        dev.start_dirty_log()
        assert fake.log is not None
        fake.log.mark(3 * LOG_PAGE_SIZE, 1)
        dev.stop()
        assert dev.collect_dirty().tolist() == [3]
        before = len(fake.seen)
        dev.stop_dirty_log()  # rings stopped: only the log is released
        assert fake.seen[before:] == []


# --- SET_LOG_BASE replies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_reply", "form"),
    [
        ("empty", LogBaseReply.EMPTY),  # quirk "DPDK: empty SET_LOG_BASE reply"
        ("echo", LogBaseReply.SIZE_ECHOED),  # quirk "libvhost-user: SET_LOG_BASE echoes the size"
        (0, LogBaseReply.OK),  # vhostkit's and rust-vmm's back-ends
    ],
    ids=["dpdk-empty", "libvhost-user-echo", "status-0"],
)
def test_every_set_log_base_reply_form_is_accepted(fd_check, log_reply, form) -> None:
    with fake_backend(log_reply=log_reply) as (fe, fake), DirtyLog.allocate(64) as dlog:
        fe.negotiate(int(VF.VERSION_1), PROTOCOL)
        fe.set_dirty_log(dlog)
        assert fe.log_base_reply is form
        # the connection is still in step: the next request gets its own reply
        assert fe.get_features() == OFFER
        assert fake.requests(R.SET_LOG_BASE)[0][1:] == (LogDesc(64, 0), 1)


def test_a_non_zero_status_is_a_failure(fd_check) -> None:
    with fake_backend(log_reply=12) as (fe, _), DirtyLog.allocate(64) as dlog:
        fe.negotiate(int(VF.VERSION_1), PROTOCOL)
        with pytest.raises(RequestFailed, match="SET_LOG_BASE") as info:
            fe.set_dirty_log(dlog)
        assert info.value.errno == 12
        assert fe.get_features() == OFFER


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "protocol", "ask", "match"),
    [
        (OFFER & ~VF.LOG_ALL, PROTOCOL, PROTOCOL, "VHOST_F_LOG_ALL"),
        (OFFER, PROTOCOL & ~P.LOG_SHMFD, PROTOCOL, "does not offer it"),
        (OFFER, PROTOCOL, PROTOCOL & ~P.LOG_SHMFD, "not acked"),
    ],
    ids=["no-log-all", "no-log-shmfd", "log-shmfd-not-acked"],
)
def test_refused_without_log_all_or_log_shmfd(fd_check, features, protocol, ask, match) -> None:
    with fake_backend(features=features, protocol=protocol) as (fe, fake):
        fe.negotiate(int(VF.VERSION_1), ask)
        before = len(fake.seen)
        with DirtyLog.allocate(64) as dlog, pytest.raises(FeatureNotNegotiated, match=match):
            fe.start_dirty_log(dlog, fe.acked_features, [])
        assert fake.seen[before:] == []  # nothing reached the back-end


def test_vmm_refused_by_a_backend_without_log_all(fd_check) -> None:
    """A device that offers no VHOST_F_LOG_ALL (vhostkit's echo device with logging taken
    out of its offer): the VMM says so and carries on."""
    device = EchoDevice()
    device.offered_features &= ~VF.LOG_ALL
    device.offered_protocol_features &= ~P.LOG_SHMFD
    ours, theirs = Connection.pair()
    server = BackendReqServer(theirs, device)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with VirtioNetDevice(VhostUserNetPlane(Frontend(ours)), queue_size=64) as dev:
            dev.start()
            with pytest.raises(FeatureNotNegotiated, match="VHOST_F_LOG_ALL"):
                dev.start_dirty_log()
            assert dev.nic.dirty_log is None
            assert dev.nic.send([bytes(60)]) == 1  # the device still works
            assert dev.nic.recv(timeout=5) == [bytes(60)]
            dev.stop()
            dev.plane.close()
    finally:
        thread.join(10)
        device.close()


def test_log_addresses_must_be_given(fd_check) -> None:
    with device_on_fake() as (dev, fake), DirtyLog.allocate(64) as dlog:
        addrs = [VringAddr(a.index, a.desc, a.used, a.avail) for a in dev.nic.vring_addrs()]
        before = len(fake.seen)
        with pytest.raises(InvalidParam, match="used ring"):
            dev.plane.backend.start_dirty_log(dlog, dev.nic.acked_features, addrs)
        assert fake.seen[before:] == []
        assert np.array_equal(dlog.snapshot(), [])
        dev.stop()
