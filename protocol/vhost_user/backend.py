"""L1: the pure sans-IO vhost-user **back-end** (the side that serves a device).

:class:`BackendConnection` decodes front-end requests into
:class:`~vhost_user.events.RequestReceived` events and encodes the answers the back-end owes
(``reply()`` for requests with an inherent reply, ``ack()`` for REPLY_ACK). It follows the
protocol features the front-end sets (REPLY_ACK, XEN_MMAP region layout) and refuses to
decode anything after a protocol error.

:class:`BackendChannelRequester` is the back-end's end of the SET_BACKEND_REQ_FD channel: it
encodes back-end requests (CONFIG_CHANGE_MSG, VRING_CALL, ...) and decodes their ACKs.

No I/O, no clock, no logging. File descriptors are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._channel import Requester, Responder
from .errors import LocalProtocolError, MalformedMessage
from .events import Outgoing
from .wire.codec import Message, Payload, decode_request
from .wire.enums import STABLE_PROTOCOL_FEATURES, BackendRequest, FrontendRequest, ProtocolFeatures
from .wire.payloads import SharedObject, U64, VringArea, VringState

__all__ = ["BackendConnection", "BackendChannelRequester"]


class BackendConnection(Responder):
    """Pure back-end state machine for the main vhost-user socket.

    ``protocol_features``: what this back-end offers; a SET_PROTOCOL_FEATURES asking for
    more is a :class:`MalformedMessage` (field ``u64``).
    """

    def __init__(self, *, protocol_features: ProtocolFeatures = ProtocolFeatures(0)) -> None:
        super().__init__("front-end")
        self.offered_protocol_features = ProtocolFeatures(protocol_features) & STABLE_PROTOCOL_FEATURES
        self.protocol_features = ProtocolFeatures(0)
        self.features: int | None = None  # last SET_FEATURES

    @property
    def xen_mmap(self) -> bool:
        return bool(self.protocol_features & ProtocolFeatures.XEN_MMAP)

    def _decode(self, header, body, fds) -> Message:  # type: ignore[no-untyped-def]
        return decode_request(header, body, fds, channel="front-end", xen_mmap=self.xen_mmap)

    def _answer_for(self, msg: Message) -> str | None:
        if msg.request == FrontendRequest.SET_LOG_BASE and not self.protocol_features & ProtocolFeatures.LOG_SHMFD:
            return "ack" if (msg.need_reply and self.reply_ack) else None
        return super()._answer_for(msg)

    def _on_request(self, msg: Message) -> None:
        if msg.request == FrontendRequest.SET_PROTOCOL_FEATURES:
            value = ProtocolFeatures(msg.payload.value)
            if int(value) & ~int(self.offered_protocol_features):
                raise MalformedMessage("u64", hex(int(value)), "protocol features that were not offered")
            self.protocol_features = value
            self.reply_ack = bool(value & ProtocolFeatures.REPLY_ACK)
        elif msg.request == FrontendRequest.SET_FEATURES:
            self.features = int(msg.payload.value)

    def reply_u64(self, request: FrontendRequest, value: int) -> Outgoing:
        """Convenience: the inherent u64 reply (GET_FEATURES, GET_QUEUE_NUM, ...)."""
        return self.reply(request, U64(value=value))


class BackendChannelRequester(Requester):
    """Back-end end of the SET_BACKEND_REQ_FD channel.

    ``reply_ack``: REPLY_ACK negotiated on the main channel (then :meth:`send_request` may set
    NEED_REPLY and the front-end answers with a u64 status).
    """

    def __init__(self, *, reply_ack: bool = False, send_fd: bool = False) -> None:
        super().__init__("back-end")
        self.reply_ack = reply_ack
        self.send_fd = send_fd  # BACKEND_SEND_FD negotiated

    def send_request(
        self, request: BackendRequest, payload: Payload = None, fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> Outgoing:
        if need_reply and not self.reply_ack:
            raise LocalProtocolError("NEED_REPLY without REPLY_ACK")
        if fds and not self.send_fd:
            raise LocalProtocolError("fds on the back-end channel need BACKEND_SEND_FD")
        return self._send(request, payload, fds, need_reply=need_reply)

    def config_change(self, *, need_reply: bool = False) -> Outgoing:
        return self.send_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)

    def vring_call(self, index: int) -> Outgoing:
        return self.send_request(BackendRequest.VRING_CALL, VringState(index=index, num=0))

    def vring_err(self, index: int) -> Outgoing:
        return self.send_request(BackendRequest.VRING_ERR, VringState(index=index, num=0))

    def host_notifier(self, index: int, fd: int | None, size: int = 0, offset: int = 0) -> Outgoing:
        value = index if fd is not None else index | 0x100
        return self.send_request(
            BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(u64=value, size=size, offset=offset), () if fd is None else (fd,)
        )

    def shared_object(self, request: BackendRequest, uuid: bytes) -> Outgoing:
        return self.send_request(request, SharedObject(uuid=bytes(uuid)))
