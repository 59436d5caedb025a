"""L1: the pure sans-IO vhost-user **front-end** (the side that drives a back-end).

:class:`FrontendConnection` turns request calls into :class:`~vhost_user.events.Outgoing`
(bytes + fds) and incoming bytes into :class:`~vhost_user.events.Reply` /
:class:`~vhost_user.events.Ack` events. It checks every request's preconditions before
encoding it (rust-vmm ``frontend.rs``: ``check_proto_feature``), sets NEED_REPLY only when
REPLY_ACK was negotiated, and stays broken after the first protocol error.

:class:`BackendChannelResponder` is the front-end's end of the SET_BACKEND_REQ_FD channel:
it decodes back-end requests (CONFIG_CHANGE_MSG, ...) and encodes the answers.

No I/O, no clock, no logging. File descriptors are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._channel import Requester, Responder
from .errors import FeatureNotNegotiated, LocalProtocolError, MalformedMessage
from .events import Event, Outgoing, Reply
from .state import Negotiation, NegotiationInput, next_negotiation
from .wire.codec import Payload
from .wire.validate import check_regions, check_vring_addr
from .wire.enums import (
    STABLE_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    FrontendRequest,
    ProtocolFeatures,
    VirtioFeatures,
)
from .wire.payloads import (
    ConfigSpace,
    DeviceStateParams,
    Inflight,
    LogPayload,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    U64,
    VringAddr,
    VringState,
    XenMemoryRegion,
    XenMemoryTable,
    XenMemRegMsg,
)

__all__ = ["FrontendConnection", "BackendChannelResponder", "PROTOCOL_PRECONDITIONS"]

F = FrontendRequest
P = ProtocolFeatures
#: Request -> protocol feature that must be negotiated before it may be sent
#: (vhost-user.rst, each message's text). Requests not listed need none.
PROTOCOL_PRECONDITIONS: dict[FrontendRequest, ProtocolFeatures] = {
    F.GET_QUEUE_NUM: P.MQ,
    F.SET_LOG_BASE: P.LOG_SHMFD,
    F.SEND_RARP: P.RARP,
    F.NET_SET_MTU: P.MTU,
    F.SET_BACKEND_REQ_FD: P.BACKEND_REQ,
    F.SET_VRING_ENDIAN: P.CROSS_ENDIAN,
    F.CREATE_CRYPTO_SESSION: P.CRYPTO_SESSION,
    F.CLOSE_CRYPTO_SESSION: P.CRYPTO_SESSION,
    F.POSTCOPY_ADVISE: P.PAGEFAULT,
    F.POSTCOPY_LISTEN: P.PAGEFAULT,
    F.POSTCOPY_END: P.PAGEFAULT,
    F.GET_CONFIG: P.CONFIG,
    F.SET_CONFIG: P.CONFIG,
    F.GET_INFLIGHT_FD: P.INFLIGHT_SHMFD,
    F.SET_INFLIGHT_FD: P.INFLIGHT_SHMFD,
    F.RESET_DEVICE: P.RESET_DEVICE,
    F.VRING_KICK: P.INBAND_NOTIFICATIONS,
    F.GET_MAX_MEM_SLOTS: P.CONFIGURE_MEM_SLOTS,
    F.ADD_MEM_REG: P.CONFIGURE_MEM_SLOTS,
    F.REM_MEM_REG: P.CONFIGURE_MEM_SLOTS,
    F.SET_STATUS: P.STATUS,
    F.GET_STATUS: P.STATUS,
    F.GET_SHARED_OBJECT: P.SHARED_OBJECT,
    F.SET_DEVICE_STATE_FD: P.DEVICE_STATE,
    F.CHECK_DEVICE_STATE: P.DEVICE_STATE,
}
#: Requests that need VHOST_USER_F_PROTOCOL_FEATURES (virtio bit 30) offered by the back-end.
_NEEDS_BIT30 = {F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.SET_VRING_ENABLE}
del F, P


class FrontendConnection(Requester):
    """Pure front-end state machine for the main vhost-user socket.

    Typical use: ``out = conn.get_features(); write(out.data, out.fds)``, then feed what
    the socket returns into :meth:`receive` until it yields the :class:`Reply`.
    Only one request may await an answer at a time (the protocol is sequential).

    ``ack_all``: when REPLY_ACK is negotiated, set NEED_REPLY on every request that has no
    inherent reply (so the back-end confirms each one, as rust-vmm does). Individual calls can
    override it with ``need_reply=``.
    """

    def __init__(self, *, ack_all: bool = True) -> None:
        super().__init__("front-end")
        self.ack_all = ack_all
        self.negotiation = Negotiation.START
        self.backend_features: int | None = None  # GET_FEATURES answer
        self.backend_protocol_features: ProtocolFeatures | None = None  # GET_PROTOCOL_FEATURES answer
        self.protocol_features = ProtocolFeatures(0)  # in force after SET_PROTOCOL_FEATURES
        self.acked_features: int | None = None  # last SET_FEATURES value

    # -- negotiation bookkeeping -------------------------------------------------------
    def resume_negotiated(self, backend_features: int, backend_protocol_features: ProtocolFeatures | None,
                          protocol_features: ProtocolFeatures) -> None:
        """Take over a connection another front-end negotiated (the same process's previous
        image, or its predecessor through a file descriptor store): what it learnt and set is in
        force, nothing is sent. Only on a fresh object."""
        if self.negotiation is not Negotiation.START:
            raise LocalProtocolError("resume_negotiated on a connection that has negotiated itself")
        self.backend_features = backend_features
        self.negotiation = Negotiation.FEATURES_KNOWN
        if backend_protocol_features is not None:
            self.backend_protocol_features = backend_protocol_features
            self.protocol_features = protocol_features
            self.negotiation = Negotiation.PROTOCOL_SET

    def _negotiate(self, symbol: NegotiationInput) -> None:
        nxt = next_negotiation(self.negotiation, symbol)
        if nxt is None:
            raise LocalProtocolError(f"{symbol.value} is not allowed after {self.negotiation.value}")
        self.negotiation = nxt

    def has_protocol_feature(self, feature: ProtocolFeatures) -> bool:
        return bool(self.protocol_features & feature) and self.negotiation is Negotiation.PROTOCOL_SET

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol_feature(ProtocolFeatures.REPLY_ACK)

    @property
    def xen_mmap(self) -> bool:
        return self.has_protocol_feature(ProtocolFeatures.XEN_MMAP)

    def check_precondition(self, request: FrontendRequest) -> None:
        """Raise :class:`FeatureNotNegotiated` if ``request`` may not be sent now."""
        if request in _NEEDS_BIT30:
            if self.backend_features is None:
                raise LocalProtocolError(f"{request.name} before GET_FEATURES")
            if not self.backend_features & VirtioFeatures.PROTOCOL_FEATURES:
                raise FeatureNotNegotiated(request.name, "VHOST_USER_F_PROTOCOL_FEATURES")
        feature = PROTOCOL_PRECONDITIONS.get(request)
        if feature is not None and not self.has_protocol_feature(feature):
            raise FeatureNotNegotiated(request.name, feature.name)

    # -- generic request ---------------------------------------------------------------
    def send_request(
        self,
        request: FrontendRequest,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> Outgoing:
        """Encode any front-end request after checking its preconditions."""
        self._check_usable()
        self.check_precondition(request)
        want_ack = self.ack_all if need_reply is None else need_reply
        if want_ack and not self.reply_ack:
            if need_reply:
                raise FeatureNotNegotiated(request.name + " with NEED_REPLY", "REPLY_ACK")
            want_ack = False
        if request == FrontendRequest.SET_PROTOCOL_FEATURES:
            value = ProtocolFeatures(payload.value)
            offered = self.backend_protocol_features
            if offered is None:
                raise LocalProtocolError("SET_PROTOCOL_FEATURES before GET_PROTOCOL_FEATURES")
            if int(value) & ~int(offered & STABLE_PROTOCOL_FEATURES):
                raise LocalProtocolError(f"protocol features {value!r} not offered or not stable")
            self._negotiate(NegotiationInput.SET_PROTOCOL_FEATURES)
            out = self._send(request, payload, fds, need_reply=False)
            self.protocol_features = value
            return out
        if request == FrontendRequest.SET_FEATURES:
            if self.backend_features is None:
                raise LocalProtocolError("SET_FEATURES before GET_FEATURES")
            if int(payload.value) & ~int(self.backend_features):
                raise LocalProtocolError(f"features {payload.value:#x} not offered ({self.backend_features:#x})")
            self.acked_features = payload.value
        return self._send(request, payload, fds, need_reply=want_ack)

    def _on_answer(self, msg, pending) -> Event:  # type: ignore[no-untyped-def]
        event = super()._on_answer(msg, pending)
        if isinstance(event, Reply):
            if event.request == FrontendRequest.GET_FEATURES:
                self.backend_features = event.value
                self._negotiate(NegotiationInput.FEATURES)
            elif event.request == FrontendRequest.GET_PROTOCOL_FEATURES:
                self.backend_protocol_features = ProtocolFeatures(event.value)
                self._negotiate(NegotiationInput.PROTOCOL_FEATURES)
        return event

    # -- typed helpers (one per request; all return Outgoing) ------------------------
    def get_features(self) -> Outgoing:
        return self.send_request(FrontendRequest.GET_FEATURES)

    def set_features(self, features: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_FEATURES, U64(value=features))

    def set_owner(self) -> Outgoing:
        return self.send_request(FrontendRequest.SET_OWNER)

    def reset_owner(self) -> Outgoing:
        return self.send_request(FrontendRequest.RESET_OWNER)

    def get_protocol_features(self) -> Outgoing:
        return self.send_request(FrontendRequest.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_PROTOCOL_FEATURES, U64(value=int(features)))

    def get_queue_num(self) -> Outgoing:
        return self.send_request(FrontendRequest.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> Outgoing:
        return self.send_request(FrontendRequest.GET_MAX_MEM_SLOTS)

    def set_backend_req_fd(self, fd: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_BACKEND_REQ_FD, None, (fd,))

    def _region(self, r: MemoryRegion | XenMemoryRegion) -> MemoryRegion | XenMemoryRegion:
        if self.xen_mmap and not isinstance(r, XenMemoryRegion):
            raise LocalProtocolError("XEN_MMAP is negotiated: regions must be XenMemoryRegion")
        if not self.xen_mmap and isinstance(r, XenMemoryRegion):
            raise FeatureNotNegotiated("XenMemoryRegion", "XEN_MMAP")
        return r

    def set_mem_table(self, regions: Sequence[MemoryRegion | XenMemoryRegion], fds: Sequence[int]) -> Outgoing:
        if len(regions) != len(fds):
            raise LocalProtocolError(f"{len(regions)} regions but {len(fds)} fds")
        regs = [self._region(r) for r in regions]
        table_cls = XenMemoryTable if self.xen_mmap else MemoryTable
        table = table_cls(nregions=len(regs), padding=0, regions=regs)  # type: ignore[arg-type]
        try:
            check_regions(regs)
        except MalformedMessage as exc:  # our own input: a local error
            raise LocalProtocolError(str(exc)) from exc
        return self.send_request(FrontendRequest.SET_MEM_TABLE, table, fds)

    def add_mem_reg(self, region: MemoryRegion | XenMemoryRegion, fd: int) -> Outgoing:
        cls = XenMemRegMsg if self.xen_mmap else MemRegMsg
        return self.send_request(
            FrontendRequest.ADD_MEM_REG, cls(padding=0, region=self._region(region)), (fd,)  # type: ignore[arg-type]
        )

    def rem_mem_reg(self, region: MemoryRegion | XenMemoryRegion) -> Outgoing:
        cls = XenMemRegMsg if self.xen_mmap else MemRegMsg
        return self.send_request(FrontendRequest.REM_MEM_REG, cls(padding=0, region=self._region(region)))  # type: ignore[arg-type]

    def set_vring_num(self, index: int, num: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_VRING_NUM, VringState(index=index, num=num))

    def set_vring_base(self, index: int, base: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_VRING_BASE, VringState(index=index, num=base))

    def get_vring_base(self, index: int) -> Outgoing:
        return self.send_request(FrontendRequest.GET_VRING_BASE, VringState(index=index, num=0))

    def set_vring_addr(
        self, index: int, *, desc: int, used: int, avail: int, log: int = 0, flags: int = 0
    ) -> Outgoing:
        addr = VringAddr(
            index=index, flags=flags, desc_user_addr=desc, used_user_addr=used, avail_user_addr=avail, log_guest_addr=log
        )
        try:
            check_vring_addr(addr)
        except MalformedMessage as exc:  # our own input: a local error
            raise LocalProtocolError(str(exc)) from exc
        return self.send_request(FrontendRequest.SET_VRING_ADDR, addr)

    def _vring_fd(self, request: FrontendRequest, index: int, fd: int | None) -> Outgoing:
        if not 0 <= index <= VRING_IDX_MASK:
            raise LocalProtocolError(f"vring index {index} does not fit in 8 bits")
        value = index if fd is not None else index | VRING_NOFD_MASK
        return self.send_request(request, U64(value=value), () if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> Outgoing:
        return self._vring_fd(FrontendRequest.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> Outgoing:
        return self._vring_fd(FrontendRequest.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> Outgoing:
        return self._vring_fd(FrontendRequest.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> Outgoing:
        return self.send_request(FrontendRequest.SET_VRING_ENABLE, VringState(index=index, num=int(enable)))

    def get_config(self, offset: int, size: int, flags: int = 0) -> Outgoing:
        return self.send_request(
            FrontendRequest.GET_CONFIG, ConfigSpace(offset=offset, size=size, flags=flags, payload=bytes(size))
        )

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> Outgoing:
        return self.send_request(
            FrontendRequest.SET_CONFIG, ConfigSpace(offset=offset, size=len(data), flags=flags, payload=bytes(data))
        )

    def reset_device(self) -> Outgoing:
        return self.send_request(FrontendRequest.RESET_DEVICE)

    def set_status(self, status: int) -> Outgoing:
        return self.send_request(FrontendRequest.SET_STATUS, U64(value=status))

    def get_status(self) -> Outgoing:
        return self.send_request(FrontendRequest.GET_STATUS)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> Outgoing:
        return self.send_request(
            FrontendRequest.GET_INFLIGHT_FD,
            Inflight(mmap_size=0, mmap_offset=0, num_queues=num_queues, queue_size=queue_size, padding=0),
        )

    def set_inflight_fd(self, fd: int, *, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> Outgoing:
        payload = Inflight(
            mmap_size=mmap_size, mmap_offset=mmap_offset, num_queues=num_queues, queue_size=queue_size, padding=0
        )
        return self.send_request(FrontendRequest.SET_INFLIGHT_FD, payload, (fd,))

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> Outgoing:
        return self.send_request(
            FrontendRequest.SET_LOG_BASE, LogPayload(mmap_size=mmap_size, mmap_offset=mmap_offset), (fd,)
        )

    def set_device_state_fd(self, fd: int, direction: int, phase: int = 0) -> Outgoing:
        return self.send_request(
            FrontendRequest.SET_DEVICE_STATE_FD,
            DeviceStateParams(transfer_direction=direction, migration_phase=phase),
            (fd,),
        )

    def check_device_state(self) -> Outgoing:
        return self.send_request(FrontendRequest.CHECK_DEVICE_STATE)


class BackendChannelResponder(Responder):
    """Front-end end of the SET_BACKEND_REQ_FD socket: decodes back-end requests.

    ``reply_ack``: set True when REPLY_ACK was negotiated on the main channel, so requests the
    back-end sends with NEED_REPLY are answered with :meth:`ack`.
    """

    def __init__(self, *, reply_ack: bool = False) -> None:
        super().__init__("back-end")
        self.reply_ack = reply_ack
