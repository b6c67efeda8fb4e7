"""What one side of a vhost-user connection has negotiated, and what that allows (sans-I/O).

:class:`Negotiation` is pure state, in the manner of h11's connection object: no sockets, no
threads. The roles record in it what each side sent (the virtio features and protocol features
the back-end offered, what the front-end acked), and ask it, per request, the questions the
per-request rules of :mod:`vhostkit.user.message` answer together with that state:

* may this request be sent (:meth:`Negotiation.may_send`) or accepted
  (:meth:`Negotiation.may_accept`) now? If not, :class:`FeatureNotNegotiated` says which feature
  is missing;
* which header flags does it go out with, and what comes back: nothing, a u64 status (an ack),
  or the request's reply payload (:class:`Exchange`, :meth:`Negotiation.reply_owed`)?

Both channels use it. On the main channel the front-end sends and the back-end accepts; on the
back-end request channel (set up by ``SET_BACKEND_REQ_FD``) the roles are swapped, and the
protocol features are the ones the main channel settled (:meth:`Negotiation.settled`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhostkit.errors import FeatureNotNegotiated, InvalidParam, ProtocolError, VhostError
from vhostkit.user.codec import Request, rule_for
from vhostkit.user.message import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    BackendReq,
    HeaderFlags,
    ProtocolBitRule,
    ProtocolFeature,
    ReplyRule,
)

__all__ = ["Exchange", "Negotiation", "ReplyKind", "Role"]


class Role(enum.Enum):
    """Which side of the connection a :class:`Negotiation` belongs to."""

    FRONTEND = "frontend"
    BACKEND = "backend"


class ReplyKind(enum.Enum):
    """What the receiver of a request sends back."""

    NONE = "none"  #: nothing
    ACK = "ack"  #: a u64 status: 0 for success, else an error number
    PAYLOAD = "payload"  #: the request's reply payload (its rule's ``reply_payload``)


@dataclass(frozen=True, slots=True)
class Exchange:
    """How to send one request: the header flags, and what to wait for afterwards."""

    flags: int
    reply: ReplyKind


#: INBAND_NOTIFICATIONS is only usable with both of these (the spec: else close the connection).
_INBAND_NEEDS = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK


class Negotiation:
    """Offered and acked virtio features and protocol features of one connection, one side.

    Record what was sent with the ``*_offered`` / ``*_acked`` methods once the message carrying
    it went through; check an ack before it is sent or applied with the ``check_*`` methods.
    An ack beyond the offer is the caller's mistake on the side that acks (the front-end:
    :class:`InvalidParam`) and the peer's on the side that receives it (the back-end:
    :class:`FeatureNotNegotiated`).
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._offered_features: int | None = None
        self._acked_features = 0
        self._offered_protocol: ProtocolFeature | None = None
        self._acked_protocol = ProtocolFeature(0)
        self._protocol_negotiated = False

    @classmethod
    def settled(cls, role: Role, protocol_features: int) -> Negotiation:
        """A negotiation already done with ``protocol_features`` acked.

        The back-end request channel has no negotiation of its own: it runs with what the main
        channel settled.
        """
        negotiation = cls(role)
        negotiation.protocol_features_acked(protocol_features)
        return negotiation

    # -- state --

    @property
    def offered_features(self) -> int | None:
        """The virtio features the back-end offered (``None``: not known yet)."""
        return self._offered_features

    @property
    def acked_features(self) -> int:
        """The virtio features the front-end acked (SET_FEATURES)."""
        return self._acked_features

    @property
    def offered_protocol_features(self) -> ProtocolFeature | None:
        """The protocol features the back-end offered (``None``: not known yet)."""
        return self._offered_protocol

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        """The protocol features the front-end acked (SET_PROTOCOL_FEATURES)."""
        return self._acked_protocol

    @property
    def protocol_negotiated(self) -> bool:
        """True once SET_PROTOCOL_FEATURES went through."""
        return self._protocol_negotiated

    def has(self, feature: ProtocolFeature) -> bool:
        """True when every bit of ``feature`` was negotiated."""
        return self._protocol_negotiated and self._acked_protocol & feature == feature

    # -- recording what each side sent --

    def features_offered(self, features: int) -> None:
        """The back-end's GET_FEATURES answer."""
        self._offered_features = features

    def check_features_ack(self, features: int) -> None:
        """Raise unless ``features`` is within the offer (when the offer is known)."""
        if self._offered_features is not None and features & ~self._offered_features:
            raise self._not_offered("features", features & ~self._offered_features)

    def features_acked(self, features: int) -> None:
        """SET_FEATURES went through with ``features``."""
        self._acked_features = features

    def protocol_features_offered(self, features: int) -> None:
        """The back-end's GET_PROTOCOL_FEATURES answer."""
        self._offered_protocol = ProtocolFeature(features)

    def check_protocol_features_ack(self, features: int) -> None:
        """Raise unless ``features`` is within the protocol offer (when the offer is known)."""
        if self._offered_protocol is not None and features & ~self._offered_protocol:
            raise self._not_offered("protocol features", features & ~self._offered_protocol)

    def protocol_features_acked(self, features: int) -> ProtocolFeature:
        """SET_PROTOCOL_FEATURES went through with ``features``; return them as flags."""
        self._acked_protocol = ProtocolFeature(features)
        self._protocol_negotiated = True
        return self._acked_protocol

    def check_consistent(self) -> None:
        """Raise :class:`ProtocolError` if the acked protocol features cannot work together.

        INBAND_NOTIFICATIONS needs BACKEND_REQ and REPLY_ACK; the spec's only remedy for a
        front-end that acks it alone is to close the connection.
        """
        acked = self._acked_protocol
        if acked & ProtocolFeature.INBAND_NOTIFICATIONS and acked & _INBAND_NEEDS != _INBAND_NEEDS:
            raise ProtocolError("INBAND_NOTIFICATIONS negotiated without BACKEND_REQ and REPLY_ACK")

    def _not_offered(self, what: str, extra: int) -> VhostError:
        text = f"{what} {extra:#x} were not offered"
        if self.role is Role.FRONTEND:
            return InvalidParam(text)
        return FeatureNotNegotiated(text)

    # -- per-request gating --

    def may_send(self, request: Request, *, carries_fds: bool = False) -> Exchange:
        """Check that ``request`` may be sent now; return its flags and what comes back.

        A request that always replies waits for its reply payload; SET_LOG_BASE (LOG_SHMFD)
        is always acked; any other request asks for an ack (``NEED_REPLY``) once REPLY_ACK is
        negotiated, and otherwise gets nothing back.
        """
        self._gate(request, carries_fds)
        reply = rule_for(request).reply
        if reply is ReplyRule.ALWAYS:
            return Exchange(VHOST_USER_VERSION, ReplyKind.PAYLOAD)
        if reply is ReplyRule.LOG_SHMFD:
            return Exchange(VHOST_USER_VERSION, ReplyKind.ACK)
        if self.has(ProtocolFeature.REPLY_ACK):
            return Exchange(VHOST_USER_VERSION | HeaderFlags.NEED_REPLY, ReplyKind.ACK)
        return Exchange(VHOST_USER_VERSION, ReplyKind.NONE)

    def may_accept(self, request: Request, *, carries_fds: bool = False) -> None:
        """Check that a received ``request`` is allowed by what was negotiated."""
        self._gate(request, carries_fds)

    def reply_owed(self, request: Request, *, need_reply: bool) -> ReplyKind:
        """What the receiver of ``request`` must send back, whether it accepts it or not.

        ``NEED_REPLY`` is honoured even when REPLY_ACK was not negotiated (answering costs
        nothing, and a sender that asks waits for it).
        """
        reply = rule_for(request).reply
        if reply is ReplyRule.ALWAYS:
            return ReplyKind.PAYLOAD
        if need_reply:
            return ReplyKind.ACK
        if reply is ReplyRule.LOG_SHMFD and self.has(ProtocolFeature.LOG_SHMFD):
            # the spec: SET_LOG_BASE replies "if VHOST_USER_PROTOCOL_F_LOG_SHMFD"; without
            # it a front-end (QEMU) sends it and waits for nothing
            return ReplyKind.ACK
        return ReplyKind.NONE

    def _gate(self, request: Request, carries_fds: bool) -> None:
        rule = rule_for(request)
        if rule.feature is not None and not self.has(rule.feature):
            raise FeatureNotNegotiated(
                f"{request.name} needs protocol feature {rule.feature.name}, not negotiated"
            )
        if rule.protocol_bit is ProtocolBitRule.OFFERED:
            ok = self._offered_features is None or bool(
                self._offered_features & VHOST_USER_F_PROTOCOL_FEATURES
            )
        elif rule.protocol_bit is ProtocolBitRule.ACKED:
            ok = self._protocol_negotiated or bool(
                self._acked_features & VHOST_USER_F_PROTOCOL_FEATURES
            )
        else:
            ok = True
        if not ok:
            raise FeatureNotNegotiated(
                f"{request.name} needs VHOST_USER_F_PROTOCOL_FEATURES (virtio bit 30)"
            )
        if (
            isinstance(request, BackendReq)
            and carries_fds
            and not self.has(ProtocolFeature.BACKEND_SEND_FD)
        ):
            raise FeatureNotNegotiated(f"{request.name} carries an fd, which needs BACKEND_SEND_FD")
