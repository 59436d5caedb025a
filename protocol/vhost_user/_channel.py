"""Sans-IO request/answer channel endpoints shared by the front-end and back-end roles.

A vhost-user socket carries requests one way and answers (replies or REPLY_ACK statuses) the
other way. :class:`Requester` is the side that sends requests; :class:`Responder` is the side
that receives them. Both are pure: bytes and fds in, events and :class:`Outgoing` out, no I/O,
no clock, no logging. Both become sticky-``BROKEN`` after any protocol error.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

from .errors import LocalProtocolError, UnexpectedReply, VhostUserError
from .events import ANSWER_ACK, ANSWER_REPLY, Ack, Event, Outgoing, Reply, RequestReceived
from .state import CHANNEL_TRANSITIONS, ChannelInput, ChannelState
from .wire.codec import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    Message,
    MessageFramer,
    Payload,
    Request,
    RequestSpec,
    decode_reply,
    decode_request,
    encode,
)
from .wire.enums import BackendRequest, FrontendRequest
from .wire.header import MAX_FDS
from .wire.payloads import U64

__all__ = ["Requester", "Responder", "Pending"]


@dataclasses.dataclass(frozen=True)
class Pending:
    """The answer a channel is waiting for (requester) or owes (responder)."""

    request: Request
    kind: str  # ANSWER_REPLY or ANSWER_ACK


class _Endpoint:
    channel: str  # "front-end" (FrontendRequest codes) or "back-end" (BackendRequest codes)

    def __init__(self, channel: str, *, expect_reply: bool) -> None:
        self.channel = channel
        self.state = ChannelState.IDLE
        self._framer = MessageFramer(expect_reply=expect_reply)
        self.error: VhostUserError | None = None
        self._orphans: list[int] = []

    # -- state table -------------------------------------------------------------------
    def _transition(self, symbol: ChannelInput) -> None:
        nxt = CHANNEL_TRANSITIONS.get((self.state, symbol))
        if nxt is None:
            self._fail(LocalProtocolError(f"{symbol.value} is not allowed in state {self.state.value}"))
        else:
            self.state = nxt

    def _fail(self, exc: VhostUserError) -> None:
        self.error = self.error or exc
        self.state = CHANNEL_TRANSITIONS.get((self.state, ChannelInput.ERROR), self.state)
        raise exc

    def _check_usable(self) -> None:
        if self.state is ChannelState.BROKEN:
            raise LocalProtocolError(f"connection is broken by an earlier error: {self.error}")
        if self.state is ChannelState.CLOSED:
            raise LocalProtocolError("connection is closed")

    def _specs(self) -> dict:  # type: ignore[type-arg]
        return FRONTEND_SPECS if self.channel == "front-end" else BACKEND_SPECS

    def _spec(self, request: Request) -> RequestSpec:
        spec: RequestSpec | None = self._specs().get(request)
        if spec is None or not isinstance(
            request, FrontendRequest if self.channel == "front-end" else BackendRequest
        ):
            raise LocalProtocolError(f"{request!r} is not a {self.channel} request")
        return spec

    # -- public ----------------------------------------------------------------------------
    @property
    def bytes_needed(self) -> int:
        """How many bytes to read next so that a read never spans two messages."""
        return self._framer.bytes_needed

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message received so far."""
        return self._framer.buffered

    @property
    def mid_message(self) -> bool:
        """True while part of a message (or its fds) has been received."""
        return self._framer.mid_message

    @property
    def broken(self) -> bool:
        return self.state is ChannelState.BROKEN

    def close(self) -> None:
        """Mark the channel closed (the peer hung up or we did)."""
        self._transition(ChannelInput.CLOSE)

    def take_unclaimed_fds(self) -> list[int]:
        """Fds this endpoint was given that no event carries (a message that never completed,
        or one that failed validation). They are the caller's; each is returned only once."""
        fds = self._orphans + self._framer.take_fds()
        self._orphans = []
        return fds

    def _frames(self, data: bytes, fds: Sequence[int]) -> list[tuple]:  # type: ignore[type-arg]
        try:
            return self._framer.feed(data, fds)
        except VhostUserError as exc:
            self._fail(exc)
            raise  # unreachable: _fail raises


class Requester(_Endpoint):
    """The side that sends requests and waits for their answers, one at a time."""

    def __init__(self, channel: str) -> None:
        super().__init__(channel, expect_reply=True)
        self.pending: Pending | None = None

    def _answer_kind(self, request: Request, spec: RequestSpec, need_reply: bool) -> str | None:
        if spec.reply is not None:
            return ANSWER_REPLY
        return ANSWER_ACK if need_reply else None

    def _send(
        self, request: Request, payload: Payload, fds: Sequence[int], *, need_reply: bool
    ) -> Outgoing:
        self._check_usable()
        spec = self._spec(request)
        if self.pending is not None:
            raise LocalProtocolError(f"{request.name} while the answer to {self.pending.request.name} is due")
        if len(fds) > MAX_FDS:
            raise LocalProtocolError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
        kind = self._answer_kind(request, spec, need_reply)
        data = encode(request, payload, need_reply=need_reply and kind == ANSWER_ACK)
        if kind is None:
            self._transition(ChannelInput.SEND_NO_ANSWER)
        else:
            self._transition(ChannelInput.SEND_WITH_ANSWER)
            self.pending = Pending(request, kind)
        return Outgoing(data, tuple(fds))

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Feed bytes (and the fds that came with them); returns Reply/Ack events."""
        self._check_usable()
        events: list[Event] = []
        for header, body, msg_fds in self._frames(data, fds):
            pending = self.pending
            if pending is None:
                self._orphans += msg_fds
                self._fail(UnexpectedReply("no reply (nothing in flight)", header.request))
                continue  # unreachable
            try:
                msg = decode_reply(
                    header, body, msg_fds, expected=pending.request, ack=pending.kind == ANSWER_ACK, channel=self.channel
                )
            except VhostUserError as exc:
                self._orphans += msg_fds
                self._fail(exc)
            self.pending = None
            self._transition(ChannelInput.ANSWER)
            events.append(self._on_answer(msg, pending))
        return events

    def _on_answer(self, msg: Message, pending: Pending) -> Event:
        if pending.kind == ANSWER_ACK:
            return Ack(msg.request, int(msg.payload.value))
        return Reply(msg.request, msg.payload, msg.fds)


class Responder(_Endpoint):
    """The side that receives requests and owes answers, in arrival order."""

    def __init__(self, channel: str) -> None:
        super().__init__(channel, expect_reply=False)
        self._owed: deque[Pending] = deque()
        self.reply_ack = False  # REPLY_ACK negotiated: NEED_REPLY requests get a u64 status

    def _decode(self, header, body, fds) -> Message:  # type: ignore[no-untyped-def]
        return decode_request(header, body, fds, channel=self.channel)

    def _answer_for(self, msg: Message) -> str | None:
        spec = self._spec(msg.request)
        if spec.reply is not None:
            return ANSWER_REPLY
        if msg.need_reply and self.reply_ack:
            return ANSWER_ACK
        return None

    def _on_request(self, msg: Message) -> None:
        """Hook for subclasses to track negotiation state."""

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Feed bytes and fds; returns RequestReceived events, in order."""
        self._check_usable()
        events: list[Event] = []
        for header, body, msg_fds in self._frames(data, fds):
            try:
                msg = self._decode(header, body, msg_fds)
                # State first: a SET_PROTOCOL_FEATURES that turns REPLY_ACK on and carries
                # NEED_REPLY is ACKed (Linux virtio_uml sends exactly that and waits for the ACK).
                self._on_request(msg)
                answer = self._answer_for(msg)
            except VhostUserError as exc:
                self._orphans += msg_fds
                self._fail(exc)
            if answer is not None:
                self._owed.append(Pending(msg.request, answer))
            self.state = ChannelState.AWAITING_ANSWER if self._owed else ChannelState.IDLE
            events.append(RequestReceived(msg.request, msg.payload, msg.fds, answer, msg.need_reply))
        return events

    @property
    def owed(self) -> Pending | None:
        """The oldest answer this side still owes."""
        return self._owed[0] if self._owed else None

    def _take(self, request: Request, kind: str) -> None:
        self._check_usable()
        owed = self.owed
        if owed is None or owed.request != request or owed.kind != kind:
            raise LocalProtocolError(f"no {kind} owed for {request!r} (owed: {owed})")
        self._owed.popleft()
        self.state = ChannelState.AWAITING_ANSWER if self._owed else ChannelState.IDLE

    def reply(self, request: Request, payload: Payload, fds: Sequence[int] = ()) -> Outgoing:
        """The inherent reply to ``request`` (e.g. U64 for GET_FEATURES)."""
        self._take(request, ANSWER_REPLY)
        return Outgoing(encode(request, payload, reply=True), tuple(fds))

    def ack(self, request: Request, status: int = 0) -> Outgoing:
        """A REPLY_ACK u64 status for ``request`` (0 = success)."""
        self._take(request, ANSWER_ACK)
        return Outgoing(encode(request, U64(value=status & 0xFFFFFFFFFFFFFFFF), reply=True))
