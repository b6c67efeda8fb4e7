"""The sans-I/O negotiation object: gating both ways, reply rules, and the errors it raises."""

from __future__ import annotations

import pytest

from vhostkit.errors import FeatureNotNegotiated, InvalidParam, ProtocolError
from vhostkit.user.message import (
    BACKEND_RULES,
    FRONTEND_RULES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    BackendReq,
    FrontendReq,
    HeaderFlags,
    ProtocolBitRule,
    ProtocolFeature,
    ReplyRule,
)
from vhostkit.user.negotiation import Exchange, Negotiation, ReplyKind, Role

R = FrontendReq
B = BackendReq
P = ProtocolFeature
BIT30 = VHOST_USER_F_PROTOCOL_FEATURES
VERSION_1 = 1 << 32
EVERY_PROTOCOL_FEATURE = P(sum(P))
PLAIN = Exchange(VHOST_USER_VERSION, ReplyKind.NONE)
ACKED = Exchange(VHOST_USER_VERSION | HeaderFlags.NEED_REPLY, ReplyKind.ACK)
REPLIED = Exchange(VHOST_USER_VERSION, ReplyKind.PAYLOAD)


def negotiated(role: Role, features: int, protocol: int) -> Negotiation:
    """A main-channel negotiation that went through GET/SET_(PROTOCOL_)FEATURES."""
    n = Negotiation(role)
    n.features_offered(features | BIT30)
    n.protocol_features_offered(EVERY_PROTOCOL_FEATURE)
    n.protocol_features_acked(protocol)
    n.features_acked(features | BIT30)
    return n


def allowed(n: Negotiation, request: FrontendReq | BackendReq, *, sending: bool) -> bool:
    try:
        if sending:
            n.may_send(request)
        else:
            n.may_accept(request)
    except FeatureNotNegotiated:
        return False
    return True


# --- gating ---------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", list(FrontendReq), ids=lambda r: r.name)
def test_before_negotiation_only_ungated_requests_pass(request_: FrontendReq) -> None:
    rule = FRONTEND_RULES[request_]
    n = Negotiation(Role.FRONTEND)
    expected = rule.feature is None and rule.protocol_bit is not ProtocolBitRule.ACKED
    assert allowed(n, request_, sending=True) is expected


@pytest.mark.parametrize("request_", list(FrontendReq), ids=lambda r: r.name)
def test_with_every_protocol_feature_every_request_passes(request_: FrontendReq) -> None:
    n = negotiated(Role.FRONTEND, VERSION_1, EVERY_PROTOCOL_FEATURE)
    assert allowed(n, request_, sending=True)


def test_a_request_is_refused_naming_the_missing_feature() -> None:
    n = negotiated(Role.FRONTEND, VERSION_1, P.REPLY_ACK)
    with pytest.raises(FeatureNotNegotiated, match="GET_QUEUE_NUM needs protocol feature MQ"):
        n.may_send(R.GET_QUEUE_NUM)
    with pytest.raises(FeatureNotNegotiated, match="CONFIG"):
        n.may_accept(R.GET_CONFIG)
    assert n.has(P.REPLY_ACK) and not n.has(P.MQ)
    assert not n.has(P.REPLY_ACK | P.MQ)  # every bit asked for must be there


def test_protocol_features_acked_but_not_negotiated_gate_nothing() -> None:
    n = Negotiation(Role.FRONTEND)
    assert not n.protocol_negotiated and not n.has(P(0))
    with pytest.raises(FeatureNotNegotiated):
        n.may_send(R.GET_STATUS)
    n.protocol_features_acked(P.STATUS)
    assert n.protocol_negotiated
    n.may_send(R.GET_STATUS)


def test_protocol_feature_requests_need_bit_30_offered() -> None:
    n = Negotiation(Role.FRONTEND)
    # offer unknown (GET_FEATURES not sent yet): allowed, the back-end decides
    n.may_send(R.GET_PROTOCOL_FEATURES)
    n.features_offered(VERSION_1)
    for request in (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES):
        with pytest.raises(FeatureNotNegotiated, match="VHOST_USER_F_PROTOCOL_FEATURES"):
            n.may_send(request)
    n.features_offered(VERSION_1 | BIT30)
    assert n.may_send(R.GET_PROTOCOL_FEATURES) == REPLIED
    assert n.may_send(R.SET_PROTOCOL_FEATURES) == PLAIN


def test_vring_enable_needs_bit_30_acked_or_protocol_features_negotiated() -> None:
    n = Negotiation(Role.BACKEND)
    n.features_offered(VERSION_1 | BIT30)
    with pytest.raises(FeatureNotNegotiated, match="SET_VRING_ENABLE"):
        n.may_accept(R.SET_VRING_ENABLE)
    n.features_acked(VERSION_1 | BIT30)
    n.may_accept(R.SET_VRING_ENABLE)
    # protocol features may be negotiated before SET_FEATURES: that is enough too
    early = Negotiation(Role.BACKEND)
    early.protocol_features_acked(0)
    early.may_accept(R.SET_VRING_ENABLE)


def test_sender_and_receiver_agree_on_every_request() -> None:
    for protocol in (P(0), P.REPLY_ACK | P.MQ, P.CONFIG | P.STATUS, EVERY_PROTOCOL_FEATURE):
        fe = negotiated(Role.FRONTEND, VERSION_1, protocol)
        be = negotiated(Role.BACKEND, VERSION_1, protocol)
        for request in FrontendReq:
            assert allowed(fe, request, sending=True) == allowed(be, request, sending=False)
        fe_ch = Negotiation.settled(Role.FRONTEND, protocol)
        be_ch = Negotiation.settled(Role.BACKEND, protocol)
        for breq in BackendReq:
            assert allowed(be_ch, breq, sending=True) == allowed(fe_ch, breq, sending=False)


# --- reply rules ----------------------------------------------------------------------------


def test_without_reply_ack_only_always_replying_requests_wait() -> None:
    n = negotiated(Role.FRONTEND, VERSION_1, P.MQ | P.LOG_SHMFD)
    assert n.may_send(R.GET_FEATURES) == REPLIED
    assert n.may_send(R.GET_QUEUE_NUM) == REPLIED
    assert n.may_send(R.SET_FEATURES) == PLAIN
    assert n.may_send(R.SET_VRING_ENABLE) == PLAIN
    # SET_LOG_BASE is acked whenever it is allowed (LOG_SHMFD), without NEED_REPLY
    assert n.may_send(R.SET_LOG_BASE) == Exchange(VHOST_USER_VERSION, ReplyKind.ACK)


def test_with_reply_ack_every_other_request_asks_for_an_ack() -> None:
    n = negotiated(Role.FRONTEND, VERSION_1, P.REPLY_ACK | P.LOG_SHMFD)
    assert n.may_send(R.SET_FEATURES) == ACKED
    assert n.may_send(R.SET_MEM_TABLE) == ACKED
    assert n.may_send(R.GET_FEATURES) == REPLIED  # has its own reply: no NEED_REPLY
    assert n.may_send(R.SET_LOG_BASE) == Exchange(VHOST_USER_VERSION, ReplyKind.ACK)


@pytest.mark.parametrize("request_", list(FrontendReq), ids=lambda r: r.name)
def test_reply_owed_follows_the_rule_and_the_flag(request_: FrontendReq) -> None:
    n = Negotiation(Role.BACKEND)  # nothing negotiated: many of these are refused ...
    rule = FRONTEND_RULES[request_]
    if rule.reply is ReplyRule.ALWAYS:
        expected = (ReplyKind.PAYLOAD, ReplyKind.PAYLOAD)
    elif rule.reply is ReplyRule.LOG_SHMFD:
        # without LOG_SHMFD negotiated, SET_LOG_BASE replies nothing (the spec's rule)
        expected = (ReplyKind.NONE, ReplyKind.ACK)
    else:
        expected = (ReplyKind.NONE, ReplyKind.ACK)
    # ... and are answered all the same: the sender waits for what it asked for
    got = (
        n.reply_owed(request_, need_reply=False),
        n.reply_owed(request_, need_reply=True),
    )
    assert got == expected


def test_set_log_base_is_acked_only_with_log_shmfd() -> None:
    n = negotiated(Role.BACKEND, VERSION_1, P.LOG_SHMFD)
    assert n.reply_owed(R.SET_LOG_BASE, need_reply=False) is ReplyKind.ACK
    n = negotiated(Role.BACKEND, VERSION_1, P.MQ)
    assert n.reply_owed(R.SET_LOG_BASE, need_reply=False) is ReplyKind.NONE


# --- the back-end request channel -----------------------------------------------------------


def test_backend_channel_gates_on_the_settled_features() -> None:
    n = Negotiation.settled(Role.BACKEND, P.BACKEND_REQ | P.CONFIG | P.HOST_NOTIFIER)
    assert n.may_send(B.CONFIG_CHANGE_MSG) == PLAIN
    with pytest.raises(FeatureNotNegotiated, match="INBAND_NOTIFICATIONS"):
        n.may_send(B.VRING_CALL)
    n.may_send(B.VRING_HOST_NOTIFIER_MSG)  # removing a notifier sends no fd
    with pytest.raises(FeatureNotNegotiated, match="BACKEND_SEND_FD"):
        n.may_send(B.VRING_HOST_NOTIFIER_MSG, carries_fds=True)
    with pytest.raises(FeatureNotNegotiated, match="BACKEND_SEND_FD"):
        Negotiation.settled(Role.FRONTEND, P.HOST_NOTIFIER).may_accept(
            B.VRING_HOST_NOTIFIER_MSG, carries_fds=True
        )
    with_fds = Negotiation.settled(Role.BACKEND, P.HOST_NOTIFIER | P.BACKEND_SEND_FD)
    with_fds.may_send(B.VRING_HOST_NOTIFIER_MSG, carries_fds=True)


def test_fds_on_the_main_channel_need_no_protocol_feature() -> None:
    n = Negotiation(Role.BACKEND)
    n.may_accept(R.SET_LOG_FD, carries_fds=True)


def test_backend_channel_replies() -> None:
    plain = Negotiation.settled(Role.BACKEND, P.SHARED_OBJECT)
    assert plain.may_send(B.SHARED_OBJECT_ADD) == PLAIN
    assert plain.may_send(B.SHARED_OBJECT_LOOKUP) == REPLIED
    acked = Negotiation.settled(Role.BACKEND, P.SHARED_OBJECT | P.REPLY_ACK)
    assert acked.may_send(B.SHARED_OBJECT_ADD) == ACKED
    assert acked.may_send(B.SHARED_OBJECT_LOOKUP) == REPLIED
    fe = Negotiation.settled(Role.FRONTEND, P.SHARED_OBJECT)
    for breq in BackendReq:
        always = BACKEND_RULES[breq].reply is ReplyRule.ALWAYS
        assert fe.reply_owed(breq, need_reply=False) is (
            ReplyKind.PAYLOAD if always else ReplyKind.NONE
        )
        assert fe.reply_owed(breq, need_reply=True) is (
            ReplyKind.PAYLOAD if always else ReplyKind.ACK
        )


# --- recording offers and acks --------------------------------------------------------------


def test_state_records_what_each_side_sent() -> None:
    n = Negotiation(Role.FRONTEND)
    assert n.offered_features is None and n.offered_protocol_features is None
    assert (n.acked_features, n.acked_protocol_features) == (0, P(0))
    n.features_offered(VERSION_1 | BIT30)
    n.protocol_features_offered(P.MQ | P.REPLY_ACK)
    assert n.protocol_features_acked(int(P.MQ)) is P.MQ
    n.features_acked(VERSION_1)
    assert n.offered_features == VERSION_1 | BIT30
    assert n.offered_protocol_features == P.MQ | P.REPLY_ACK
    assert (n.acked_features, n.acked_protocol_features) == (VERSION_1, P.MQ)


def test_an_ack_beyond_the_offer_is_the_acking_sides_mistake() -> None:
    fe = Negotiation(Role.FRONTEND)
    fe.check_features_ack(1 << 5)  # offer not known yet: nothing to check against
    fe.check_protocol_features_ack(P.PAGEFAULT)
    fe.features_offered(VERSION_1)
    fe.protocol_features_offered(P.MQ)
    fe.check_features_ack(VERSION_1)
    fe.check_protocol_features_ack(P.MQ)
    with pytest.raises(InvalidParam, match="features 0x20 were not offered"):
        fe.check_features_ack(VERSION_1 | 1 << 5)
    with pytest.raises(InvalidParam, match="protocol features 0x100 were not offered"):
        fe.check_protocol_features_ack(P.MQ | P.PAGEFAULT)
    # on the back-end the ack came from the peer: the feature cannot be negotiated
    be = Negotiation(Role.BACKEND)
    be.protocol_features_offered(P.MQ)
    with pytest.raises(FeatureNotNegotiated, match="0x100 were not offered") as info:
        be.check_protocol_features_ack(P.PAGEFAULT)
    assert not isinstance(info.value, InvalidParam)


def test_inband_notifications_need_backend_req_and_reply_ack() -> None:
    n = Negotiation(Role.BACKEND)
    n.check_consistent()
    n.protocol_features_acked(P.INBAND_NOTIFICATIONS | P.BACKEND_REQ)
    with pytest.raises(ProtocolError, match="INBAND_NOTIFICATIONS"):
        n.check_consistent()
    n.protocol_features_acked(P.INBAND_NOTIFICATIONS | P.BACKEND_REQ | P.REPLY_ACK)
    n.check_consistent()
    n.protocol_features_acked(P.BACKEND_REQ)  # without INBAND nothing else is required
    n.check_consistent()
