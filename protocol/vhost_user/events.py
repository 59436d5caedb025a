"""Events the sans-IO connections emit (frozen dataclasses, wsproto ``events.py`` style).

File descriptors inside events belong to whoever consumes the event: the sans-IO layer never
closes them; the asyncio layer closes the ones it does not hand to its caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .wire.codec import Request
from .wire.enums import BackendRequest, FrontendRequest

__all__ = ["Event", "Outgoing", "Reply", "Ack", "RequestReceived", "ANSWER_REPLY", "ANSWER_ACK"]

ANSWER_REPLY = "reply"  # the request has an inherent reply (e.g. GET_FEATURES -> u64)
ANSWER_ACK = "ack"  # NEED_REPLY with REPLY_ACK negotiated -> u64 status, 0 = success


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """Bytes to write, and the fds to attach (SCM_RIGHTS) to the first byte of them."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """Base class of every event."""


@dataclasses.dataclass(frozen=True)
class Reply(Event):
    """The peer's inherent reply to ``request`` (e.g. a u64 for GET_FEATURES)."""

    request: Request
    payload: Any
    fds: tuple[int, ...] = ()

    @property
    def value(self) -> int:
        """The reply's u64 (for U64 replies)."""
        return int(self.payload.value)


@dataclasses.dataclass(frozen=True)
class Ack(Event):
    """A REPLY_ACK status for ``request``: 0 means success."""

    request: Request
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclasses.dataclass(frozen=True)
class RequestReceived(Event):
    """A request from the peer. ``answer`` is None, ``"reply"`` or ``"ack"``: what the receiving
    side must send back (via the connection's ``reply()``/``ack()``) before the next answer."""

    request: FrontendRequest | BackendRequest
    payload: Any
    fds: tuple[int, ...] = ()
    answer: str | None = None
    need_reply: bool = False
