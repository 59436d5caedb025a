"""Transition tables shared by the sans-IO connections (h11 ``_state.py`` / h2 style).

Two small machines:

* :class:`ChannelState` — the request/answer turn-taking of one socket. Input symbols are in
  :class:`ChannelInput`. Anything missing from :data:`CHANNEL_TRANSITIONS` is a protocol error
  and moves the channel to the sticky ``BROKEN`` state.
* :class:`Negotiation` — how far feature negotiation has come on the main channel
  (:data:`NEGOTIATION_TRANSITIONS`); it gates which requests may be sent.
"""

from __future__ import annotations

import enum

__all__ = [
    "ChannelState",
    "ChannelInput",
    "CHANNEL_TRANSITIONS",
    "Negotiation",
    "NegotiationInput",
    "NEGOTIATION_TRANSITIONS",
    "next_negotiation",
]


class ChannelState(enum.Enum):
    IDLE = "idle"  # nothing outstanding
    AWAITING_ANSWER = "awaiting-answer"  # requester: a reply/ack is due; responder: we owe one
    BROKEN = "broken"  # sticky: a protocol or transport error happened
    CLOSED = "closed"  # the peer or the user closed the channel


class ChannelInput(enum.Enum):
    SEND_NO_ANSWER = "send-no-answer"  # requester sends a request that gets no answer
    SEND_WITH_ANSWER = "send-with-answer"  # requester sends a request that will be answered
    ANSWER = "answer"  # the answer arrives (requester) / is sent (responder)
    RECEIVE_NO_ANSWER = "receive-no-answer"  # responder receives a request needing no answer
    RECEIVE_WITH_ANSWER = "receive-with-answer"  # responder receives one it must answer
    ERROR = "error"
    CLOSE = "close"


S, I = ChannelState, ChannelInput  # noqa: E741  (short names keep the transition table readable)
#: (state, input) -> next state. Missing pairs are protocol errors.
CHANNEL_TRANSITIONS: dict[tuple[ChannelState, ChannelInput], ChannelState] = {
    (S.IDLE, I.SEND_NO_ANSWER): S.IDLE,
    (S.IDLE, I.SEND_WITH_ANSWER): S.AWAITING_ANSWER,
    (S.AWAITING_ANSWER, I.ANSWER): S.IDLE,
    (S.IDLE, I.RECEIVE_NO_ANSWER): S.IDLE,
    (S.IDLE, I.RECEIVE_WITH_ANSWER): S.AWAITING_ANSWER,
    (S.IDLE, I.ERROR): S.BROKEN,
    (S.AWAITING_ANSWER, I.ERROR): S.BROKEN,
    (S.BROKEN, I.ERROR): S.BROKEN,
    (S.IDLE, I.CLOSE): S.CLOSED,
    (S.AWAITING_ANSWER, I.CLOSE): S.CLOSED,
    (S.BROKEN, I.CLOSE): S.CLOSED,
    (S.CLOSED, I.CLOSE): S.CLOSED,
    (S.CLOSED, I.ERROR): S.CLOSED,
}
del S, I


class Negotiation(enum.Enum):
    START = "start"  # nothing known about the peer
    FEATURES_KNOWN = "features-known"  # GET_FEATURES answered
    PROTOCOL_KNOWN = "protocol-known"  # GET_PROTOCOL_FEATURES answered
    PROTOCOL_SET = "protocol-set"  # SET_PROTOCOL_FEATURES sent: protocol features are in force


class NegotiationInput(enum.Enum):
    FEATURES = "features"  # GET_FEATURES reply
    PROTOCOL_FEATURES = "protocol-features"  # GET_PROTOCOL_FEATURES reply
    SET_PROTOCOL_FEATURES = "set-protocol-features"  # SET_PROTOCOL_FEATURES sent/received


N, NI = Negotiation, NegotiationInput
#: (state, input) -> next state. GET_FEATURES may be repeated (QEMU re-reads features after
#: SET_OWNER); protocol features are set at most once per connection (vhost-user.rst).
NEGOTIATION_TRANSITIONS: dict[tuple[Negotiation, NegotiationInput], Negotiation] = {
    (N.START, NI.FEATURES): N.FEATURES_KNOWN,
    (N.FEATURES_KNOWN, NI.FEATURES): N.FEATURES_KNOWN,
    (N.FEATURES_KNOWN, NI.PROTOCOL_FEATURES): N.PROTOCOL_KNOWN,
    (N.PROTOCOL_KNOWN, NI.FEATURES): N.PROTOCOL_KNOWN,
    (N.PROTOCOL_KNOWN, NI.PROTOCOL_FEATURES): N.PROTOCOL_KNOWN,
    (N.PROTOCOL_KNOWN, NI.SET_PROTOCOL_FEATURES): N.PROTOCOL_SET,
    (N.PROTOCOL_SET, NI.FEATURES): N.PROTOCOL_SET,
    (N.PROTOCOL_SET, NI.PROTOCOL_FEATURES): N.PROTOCOL_SET,
}
del N, NI


def next_negotiation(state: Negotiation, symbol: NegotiationInput) -> Negotiation | None:
    """The next negotiation state, or None when the table has no such transition."""
    return NEGOTIATION_TRANSITIONS.get((state, symbol))
