"""The error taxonomy shared by every vhostkit layer.

Every error vhostkit raises on purpose is a :class:`VhostError`. The subclasses say what went
wrong in a way a caller can act on:

* :class:`ProtocolError` and its subclasses: the peer sent something the vhost-user protocol does
  not allow (bad version, unknown request, wrong payload size, wrong number of fds, ...). The
  connection that saw it should be dropped.
* :class:`TransportError` and its subclasses: the socket failed. :meth:`VhostError.should_retry`
  says whether trying again may help (EAGAIN, EINTR, ENOBUFS, ENOMEM) and
  :meth:`VhostError.should_reconnect` whether a new connection may help (the peer went away).
* :class:`RequestFailed`: the peer understood the request and answered that it failed.
* :class:`FeatureNotNegotiated`, :class:`InvalidOperation`, :class:`InvalidParam`: the caller
  asked for something the current state does not allow. :class:`SocketInUse` and
  :class:`SocketPathTaken` (both :class:`InvalidOperation`) refuse a socket path that a live
  peer listens on or that holds something other than a socket. :class:`TapInUse` (also an
  :class:`InvalidOperation`) refuses a tap queue that another vhost-net device has attached;
  :class:`TapGone` says a tap in use was deleted under it.
* :class:`Unsupported`, :class:`DeviceUnavailable`: the running kernel or the peer cannot do it.
* :class:`GuestMemoryError`, :class:`VirtqueueError`: guest-controlled data (an address, a ring)
  is out of bounds or malformed. These never read or write memory outside the guest's regions.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BadFlags",
    "BadVersion",
    "DeviceStateError",
    "DeviceStateMismatch",
    "DeviceUnavailable",
    "Disconnected",
    "FeatureNotNegotiated",
    "GuestMemoryError",
    "IncorrectFds",
    "InvalidOperation",
    "InvalidParam",
    "InvalidPayload",
    "OversizedMessage",
    "PartialMessage",
    "PayloadSizeError",
    "ProtocolError",
    "RequestFailed",
    "SocketBroken",
    "SocketConnect",
    "SocketError",
    "SocketInUse",
    "SocketPathTaken",
    "SocketRetry",
    "StateFormatError",
    "TapGone",
    "TapInUse",
    "TooManyRegions",
    "TransportError",
    "UnexpectedReply",
    "UnknownRequest",
    "Unsupported",
    "VhostError",
    "VirtqueueError",
    "error_from_errno",
]

RETRY_ERRNOS = frozenset({_errno.EAGAIN, _errno.EINTR, _errno.ENOBUFS, _errno.ENOMEM})
BROKEN_ERRNOS = frozenset({_errno.ECONNRESET, _errno.EPIPE, _errno.ENOTCONN, _errno.ESHUTDOWN})
CONNECT_ERRNOS = frozenset({_errno.EACCES, _errno.ECONNREFUSED, _errno.ENOENT})


class VhostError(Exception):
    """Base class of every error vhostkit raises on purpose.

    ``errno`` is the closest POSIX error number (what a vhost-user backend would put in a
    REPLY_ACK payload, or what the kernel returned), or ``None`` when no number fits.
    """

    default_errno: int | None = _errno.EIO

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        self.errno: int | None = errno if errno is not None else self.default_errno

    def should_retry(self) -> bool:
        """True when the same operation may succeed if simply tried again."""
        return False

    def should_reconnect(self) -> bool:
        """True when the connection is gone and a new one may succeed."""
        return False


# --- protocol violations (the peer sent something invalid) ---------------------------------


class ProtocolError(VhostError):
    """The peer sent a message the vhost-user protocol does not allow."""

    default_errno = _errno.EPROTO


class BadVersion(ProtocolError):
    """The message header carries a protocol version other than 1."""


class BadFlags(ProtocolError):
    """The message header sets reserved flag bits, or the reply flag is wrong for the direction."""


class UnknownRequest(ProtocolError):
    """The request number is not one the protocol defines."""

    default_errno = _errno.EOPNOTSUPP


class PayloadSizeError(ProtocolError):
    """The payload size does not match what the request carries."""

    default_errno = _errno.EINVAL


class OversizedMessage(ProtocolError):
    """The payload is larger than any valid message."""

    default_errno = _errno.EMSGSIZE


class IncorrectFds(ProtocolError):
    """The message carries a different number of file descriptors than the request takes."""

    default_errno = _errno.EBADF


class TooManyRegions(ProtocolError):
    """A memory table lists more regions than allowed."""

    default_errno = _errno.E2BIG


class InvalidPayload(ProtocolError):
    """The payload has the right size but a value in it is invalid."""

    default_errno = _errno.EINVAL


class UnexpectedReply(ProtocolError):
    """A reply arrived that does not answer the request that was sent."""


# --- transport ------------------------------------------------------------------------------


class TransportError(VhostError):
    """The socket failed."""


class PartialMessage(TransportError):
    """The peer closed the connection in the middle of a message."""

    default_errno = _errno.ECONNRESET

    def should_reconnect(self) -> bool:
        return True


class Disconnected(TransportError):
    """The peer closed the connection between messages."""

    default_errno = _errno.ENOTCONN

    def should_reconnect(self) -> bool:
        return True


class SocketError(TransportError):
    """A socket call failed with an errno not covered by a more specific class."""


class SocketRetry(SocketError):
    """A transient socket failure (EAGAIN, EINTR, ENOBUFS, ENOMEM): try again."""

    default_errno = _errno.EAGAIN

    def should_retry(self) -> bool:
        return True


class SocketBroken(SocketError):
    """The connection is broken (ECONNRESET, EPIPE, ...)."""

    default_errno = _errno.ECONNRESET

    def should_reconnect(self) -> bool:
        return True


class SocketConnect(SocketError):
    """Connecting failed (EACCES, ECONNREFUSED, ENOENT)."""

    default_errno = _errno.ECONNREFUSED

    def should_retry(self) -> bool:
        return True


# --- requests and state ---------------------------------------------------------------------


class RequestFailed(VhostError):
    """The peer (or kernel) understood the request and reported that it failed.

    ``status`` is the raw non-zero value the peer returned (for vhost-user: the REPLY_ACK u64).
    """

    def __init__(self, message: str = "", *, status: int = 0, errno: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.status = status


class FeatureNotNegotiated(VhostError):
    """The request needs a (protocol) feature that was not negotiated."""

    default_errno = _errno.EOPNOTSUPP


class InvalidOperation(VhostError):
    """The operation is not allowed in the current state."""

    default_errno = _errno.EINVAL


class InvalidParam(VhostError, ValueError):
    """An argument is out of range or inconsistent."""

    default_errno = _errno.EINVAL


class SocketInUse(InvalidOperation):
    """A live peer is listening on the socket path: it is not replaced."""

    default_errno = _errno.EADDRINUSE


class SocketPathTaken(InvalidOperation):
    """Something other than a socket (a file, a directory, a symlink) is at the socket path:
    it is left untouched."""

    default_errno = _errno.EEXIST


class TapInUse(InvalidOperation):
    """A tap queue is already attached to another vhost-net device (the kernel would take
    it twice: vhostkit refuses)."""

    default_errno = _errno.EBUSY


class TapGone(VhostError):
    """A tap queue is no longer attached to an interface: the tap was deleted (or the queue
    detached) under the data plane using it."""

    default_errno = _errno.ENODEV


class Unsupported(VhostError):
    """The running kernel or the peer does not implement this operation."""

    default_errno = _errno.EOPNOTSUPP


class DeviceUnavailable(VhostError):
    """A device node is missing or cannot be opened (module not loaded, no permission)."""

    default_errno = _errno.ENODEV


# --- guest-controlled data ------------------------------------------------------------------


class GuestMemoryError(VhostError):
    """An address or length falls outside the guest's memory regions."""

    default_errno = _errno.EFAULT


class VirtqueueError(VhostError):
    """A virtqueue is malformed (descriptor loop, index out of range, ...); the queue is broken."""

    default_errno = _errno.EINVAL


# --- device state (migration) ----------------------------------------------------------------


class DeviceStateError(VhostError):
    """A device state transfer failed (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE)."""

    default_errno = _errno.EIO


class StateFormatError(DeviceStateError):
    """Saved device state is malformed: bad magic or version, truncated, corrupt, a bad field."""

    default_errno = _errno.EBADMSG


class DeviceStateMismatch(DeviceStateError):
    """Well-formed device state that this device cannot take: another device type, another
    disk, features or rings the device does not have."""

    default_errno = _errno.EINVAL


def error_from_errno(err: int, context: str = "") -> VhostError:
    """Map an errno from a socket call to the transport error class a caller can act on."""
    text = f"{context}: {os.strerror(err)}" if context else os.strerror(err)
    if err in RETRY_ERRNOS:
        return SocketRetry(text, errno=err)
    if err in BROKEN_ERRNOS:
        return SocketBroken(text, errno=err)
    if err in CONNECT_ERRNOS:
        return SocketConnect(text, errno=err)
    return SocketError(text, errno=err)
