"""Exception tree of :mod:`vhost_user`, sorted by what the caller has to do next.

Shape (docs/design.md §2, after h11 ``_util.py`` and rust-vmm ``Error::should_reconnect``)::

    VhostUserError
    ├── ProtocolError
    │   ├── LocalProtocolError        we misused the API (a bug on our side)
    │   │   └── FeatureNotNegotiated  request needs a feature that was not negotiated
    │   └── RemoteProtocolError       the peer sent something invalid
    │       ├── MalformedMessage      a field failed validation (names the field)
    │       ├── UnknownRequest        request code not in the spec
    │       ├── UnexpectedReply       reply code/flags do not match the request in flight
    │       ├── BackendFailed         the peer answered a request with a non-zero u64 status
    │       └── InflightRegionError   the inflight area of SET_INFLIGHT_FD is unusable
    ├── TransportError
    │   ├── Disconnected              the peer closed the socket (or we did)
    │   ├── PartialMessage            EOF in the middle of a message
    │   └── FdCountMismatch           wrong number of SCM_RIGHTS fds (also a RemoteProtocolError)
    ├── GuestMemoryError              back-end: address not covered by the memory table
    └── PeerTimeout                   (also a TimeoutError) the peer did not answer in time

Every class carries ``reconnect: ClassVar[bool]``: True means "drop this connection and
connect again" is a sensible recovery; False means retrying the same thing will not help.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "VhostUserError",
    "ProtocolError",
    "LocalProtocolError",
    "FeatureNotNegotiated",
    "RemoteProtocolError",
    "MalformedMessage",
    "UnknownRequest",
    "UnexpectedReply",
    "BackendFailed",
    "InflightRegionError",
    "TransportError",
    "Disconnected",
    "PartialMessage",
    "FdCountMismatch",
    "GuestMemoryError",
    "PeerTimeout",
    "ChannelFlood",
]


class VhostUserError(Exception):
    """Base class of every error this library raises."""

    reconnect: ClassVar[bool] = False


class ProtocolError(VhostUserError):
    """A violation of the vhost-user protocol, by us or by the peer."""


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly (e.g. two requests in flight, bad argument)."""

    reconnect: ClassVar[bool] = False


class FeatureNotNegotiated(LocalProtocolError):
    """A request needs a (protocol) feature that was not negotiated (rust-vmm ``InactiveFeature``)."""

    def __init__(self, request: object, feature: object) -> None:
        self.request = request
        self.feature = feature
        super().__init__(f"{request!s} needs {feature!s}, which was not negotiated")


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow. The connection is unusable."""

    reconnect: ClassVar[bool] = True


class MalformedMessage(RemoteProtocolError):
    """A message field failed validation. ``field`` names it, ``value`` is what was received."""

    def __init__(self, field: str, value: object, reason: str = "") -> None:
        self.field = field
        self.value = value
        self.reason = reason
        text = f"malformed message: {field}={value!r}"
        super().__init__(f"{text}: {reason}" if reason else text)


class UnknownRequest(RemoteProtocolError):
    """A request code outside the spec (or outside what this side handles)."""

    def __init__(self, code: int, channel: str = "front-end") -> None:
        self.code = code
        self.channel = channel
        super().__init__(f"unknown {channel} request code {code}")


class UnexpectedReply(RemoteProtocolError):
    """The reply does not match the request in flight (or no request was in flight)."""

    def __init__(self, expected: object, got: object) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"expected reply to {expected!s}, got {got!s}")


class BackendFailed(RemoteProtocolError):
    """The peer answered ``request`` with a non-zero u64 status (REPLY_ACK failure).

    The connection is still in sync (this is a refusal, not garbage), so ``reconnect`` is False.
    """

    reconnect: ClassVar[bool] = False

    def __init__(self, request: object, status: int) -> None:
        self.request = request
        self.status = status
        super().__init__(f"peer failed {request!s} with status {status:#x}")


class InflightRegionError(RemoteProtocolError):
    """The inflight area the front-end handed over (SET_INFLIGHT_FD) is unusable: too small for
    what it claims, a bad queue size or offset, or tracking entries no back-end could have written.

    The connection is still in sync (the back-end refuses the region or the ring), so
    ``reconnect`` is False.
    """

    reconnect: ClassVar[bool] = False

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"inflight region: {reason}")


class TransportError(VhostUserError):
    """The socket failed."""

    reconnect: ClassVar[bool] = True


class Disconnected(TransportError):
    """The peer closed the connection (or the connection was closed locally)."""


class PartialMessage(TransportError):
    """The stream ended in the middle of a message."""

    def __init__(self, have: int, need: int) -> None:
        self.have = have
        self.need = need
        super().__init__(f"connection closed after {have} of {need} bytes of a message")


class FdCountMismatch(RemoteProtocolError, TransportError):
    """A message carried the wrong number of SCM_RIGHTS file descriptors (field ``fds``)."""

    field = "fds"

    def __init__(self, request: object, expected: str, got: int) -> None:
        self.request = request
        self.expected = expected
        self.got = got
        super().__init__(f"{request!s}: expected {expected} fd(s), got {got}")


class GuestMemoryError(VhostUserError, ValueError):
    """A guest address (or user address) is not covered by the memory table (also a ValueError)."""

    reconnect: ClassVar[bool] = False

    def __init__(self, addr: int, length: int, space: str = "guest-physical") -> None:
        self.addr = addr
        self.length = length
        self.space = space
        super().__init__(f"{space} range [{addr:#x}, +{length:#x}) is not in the memory table")


class PeerTimeout(VhostUserError, TimeoutError):
    """The peer did not answer within the library's timeout."""

    reconnect: ClassVar[bool] = True

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(f"peer did not answer {what} within {seconds:g} s")


class ChannelFlood(RemoteProtocolError):
    """The back-end sent more requests on its channel than the front-end's bound allows (a
    burst of ``burst``, then ``rate`` a second). The back-end is misbehaving, not the link; a new
    connection may behave, so ``reconnect`` is True (the caller's backoff bounds the cost)."""

    reconnect: ClassVar[bool] = True

    def __init__(self, received: int, burst: int, rate: float) -> None:
        self.received = received
        self.burst = burst
        self.rate = rate
        super().__init__(
            f"back-end flooded its request channel: {received} requests, more than {burst} at once "
            f"or {rate:g} a second; disconnecting it")
