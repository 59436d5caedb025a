"""Encoding, framing and decoding of whole vhost-user messages.

* :data:`FRONTEND_SPECS` / :data:`BACKEND_SPECS` — per-request table: payload type of the
  request, payload type of its inherent reply (if any), fd count rule.
* :func:`encode` — header + payload bytes.
* :class:`MessageFramer` — turns a byte stream (+ fds) into ``(Header, body, fds)`` frames and
  tells the transport how many bytes to read next so fds stay attached to their message.
* :func:`decode_request` / :func:`decode_reply` — validated, typed :class:`Message`.

Every construct failure is converted to :class:`~vhost_user.errors.MalformedMessage`; nothing
else escapes (checked by hypothesis tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from construct import ConstructError

from ..errors import FdCountMismatch, MalformedMessage, UnexpectedReply, UnknownRequest
from . import validate
from .enums import VHOST_USER_VERSION, BackendRequest, FrontendRequest, HeaderFlags
from .header import HEADER, HEADER_SIZE, MAX_FDS, VHOST_MEMORY_BASELINE_NREGIONS, Header
from .payloads import (
    STRUCTS,
    ConfigSpace,
    DeviceStateParams,
    Inflight,
    IotlbMsg,
    LogPayload,
    MemoryTable,
    MemRegMsg,
    SharedObject,
    U64,
    VringAddr,
    VringArea,
    VringState,
    XenMemoryTable,
    XenMemRegMsg,
)

__all__ = [
    "RawPayload",
    "Payload",
    "Message",
    "RequestSpec",
    "FRONTEND_SPECS",
    "BACKEND_SPECS",
    "encode",
    "encode_payload",
    "decode_header",
    "decode_request",
    "decode_reply",
    "MessageFramer",
    "Request",
]

Request = FrontendRequest | BackendRequest


@dataclasses.dataclass(frozen=True)
class RawPayload:
    """An opaque payload the library does not interpret (e.g. crypto session blobs)."""

    data: bytes


Payload = Any  # None | one of the payload dataclasses | RawPayload


# Marker types for "which layout, depending on XEN_MMAP".
class _MemTable:  # SET_MEM_TABLE
    pass


class _MemReg:  # ADD/REM_MEM_REG
    pass


def _fds_none(payload: Payload) -> tuple[int, int]:
    return (0, 0)


def _fds_one(payload: Payload) -> tuple[int, int]:
    return (1, 1)


def _fds_opt(payload: Payload) -> tuple[int, int]:
    return (0, 1)


def _fds_per_region(payload: Payload) -> tuple[int, int]:
    n = payload.nregions
    return (n, n)


def _fds_vring_u64(payload: Payload) -> tuple[int, int]:
    n = validate.check_vring_index_u64(payload)
    return (n, n)


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """How one request code looks on the wire.

    ``payload``: payload class of the request (None = empty). ``reply``: payload class of the
    inherent reply (None = the request has no reply of its own; it may still be ACKed).
    ``fds``: (min, max) fds of the request. ``reply_fds``: (min, max) fds of the reply.
    """

    payload: type | None
    reply: type | None = None
    fds: Callable[[Payload], tuple[int, int]] = _fds_none
    reply_fds: tuple[int, int] = (0, 0)


F = FrontendRequest
#: vhost-user.rst "Front-end message types" (docs/vhost-user-wire.md §4).
FRONTEND_SPECS: dict[FrontendRequest, RequestSpec] = {
    F.GET_FEATURES: RequestSpec(None, U64),
    F.SET_FEATURES: RequestSpec(U64),
    F.SET_OWNER: RequestSpec(None),
    F.RESET_OWNER: RequestSpec(None),
    F.SET_MEM_TABLE: RequestSpec(_MemTable, fds=_fds_per_region),
    F.SET_LOG_BASE: RequestSpec(LogPayload, U64, fds=_fds_one),
    F.SET_LOG_FD: RequestSpec(None, fds=_fds_one),
    F.SET_VRING_NUM: RequestSpec(VringState),
    F.SET_VRING_ADDR: RequestSpec(VringAddr),
    F.SET_VRING_BASE: RequestSpec(VringState),
    F.GET_VRING_BASE: RequestSpec(VringState, VringState),
    F.SET_VRING_KICK: RequestSpec(U64, fds=_fds_vring_u64),
    F.SET_VRING_CALL: RequestSpec(U64, fds=_fds_vring_u64),
    F.SET_VRING_ERR: RequestSpec(U64, fds=_fds_vring_u64),
    F.GET_PROTOCOL_FEATURES: RequestSpec(None, U64),
    F.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    F.GET_QUEUE_NUM: RequestSpec(None, U64),
    F.SET_VRING_ENABLE: RequestSpec(VringState),
    F.SEND_RARP: RequestSpec(U64),
    F.NET_SET_MTU: RequestSpec(U64),
    F.SET_BACKEND_REQ_FD: RequestSpec(None, fds=_fds_one),
    F.IOTLB_MSG: RequestSpec(IotlbMsg, U64),
    F.SET_VRING_ENDIAN: RequestSpec(VringState),
    F.GET_CONFIG: RequestSpec(ConfigSpace, ConfigSpace),
    F.SET_CONFIG: RequestSpec(ConfigSpace),
    F.CREATE_CRYPTO_SESSION: RequestSpec(RawPayload, RawPayload),
    F.CLOSE_CRYPTO_SESSION: RequestSpec(U64),
    F.POSTCOPY_ADVISE: RequestSpec(None, RawPayload, reply_fds=(0, 1)),
    F.POSTCOPY_LISTEN: RequestSpec(None),
    F.POSTCOPY_END: RequestSpec(None, U64),
    F.GET_INFLIGHT_FD: RequestSpec(Inflight, Inflight, reply_fds=(1, 1)),
    F.SET_INFLIGHT_FD: RequestSpec(Inflight, fds=_fds_one),
    F.GPU_SET_SOCKET: RequestSpec(None, fds=_fds_one),
    F.RESET_DEVICE: RequestSpec(None),
    F.VRING_KICK: RequestSpec(VringState),
    F.GET_MAX_MEM_SLOTS: RequestSpec(None, U64),
    F.ADD_MEM_REG: RequestSpec(_MemReg, fds=_fds_one),
    F.REM_MEM_REG: RequestSpec(_MemReg, fds=_fds_opt),
    F.SET_STATUS: RequestSpec(U64),
    F.GET_STATUS: RequestSpec(None, U64),
    F.GET_SHARED_OBJECT: RequestSpec(SharedObject, U64, reply_fds=(0, 1)),
    F.SET_DEVICE_STATE_FD: RequestSpec(DeviceStateParams, U64, fds=_fds_one, reply_fds=(0, 1)),
    F.CHECK_DEVICE_STATE: RequestSpec(None, U64),
}
del F

B = BackendRequest
#: vhost-user.rst "Back-end message types" (sent on the SET_BACKEND_REQ_FD channel).
BACKEND_SPECS: dict[BackendRequest, RequestSpec] = {
    B.IOTLB_MSG: RequestSpec(IotlbMsg),
    B.CONFIG_CHANGE_MSG: RequestSpec(None),
    B.VRING_HOST_NOTIFIER_MSG: RequestSpec(VringArea, fds=_fds_opt),
    B.VRING_CALL: RequestSpec(VringState),
    B.VRING_ERR: RequestSpec(VringState),
    B.SHARED_OBJECT_ADD: RequestSpec(SharedObject),
    B.SHARED_OBJECT_REMOVE: RequestSpec(SharedObject),
    B.SHARED_OBJECT_LOOKUP: RequestSpec(SharedObject, U64, reply_fds=(0, 1)),
}
del B


@dataclasses.dataclass(frozen=True)
class Message:
    """One decoded message. ``fds`` are the SCM_RIGHTS descriptors that came with it."""

    request: Request
    flags: HeaderFlags
    payload: Payload = None
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


def _plain_layout(cls: type | None, body: bytes) -> bool:
    """A memory message of exactly the plain layout's size (ADD/REM_MEM_REG 40 bytes, SET_MEM_TABLE
    8 + nregions * 32), which no Xen layout can be: for nregions >= 1 the Xen table is at least
    8 + nregions * 40 and at most the full 328-byte struct, above 8 + nregions * 32 up to the
    baseline's 8 regions.

    QEMU 8.2 and later acknowledge XEN_MMAP (protocol feature 17) when a back-end offers it,
    without implementing it: include/hw/virtio/vhost-user.h only reserves bit 17 ("Feature 17
    reserved for VHOST_USER_PROTOCOL_F_XEN_MMAP"), while hw/virtio/vhost-user.c's
    VHOST_USER_PROTOCOL_FEATURE_MASK is every bit below VHOST_USER_PROTOCOL_F_MAX (19 or more since
    SHARED_OBJECT = 18); their memory messages keep the plain layout."""
    if cls is _MemReg:
        return len(body) == STRUCTS[MemRegMsg].sizeof()
    if cls is _MemTable and len(body) >= 4:
        return len(body) == 8 + int.from_bytes(body[:4], "little") * STRUCTS[_region_of(MemoryTable)].sizeof()
    return False


def _resolve(cls: type | None, xen_mmap: bool) -> type | None:
    if cls is _MemTable:
        return XenMemoryTable if xen_mmap else MemoryTable
    if cls is _MemReg:
        return XenMemRegMsg if xen_mmap else MemRegMsg
    return cls


def encode_payload(payload: Payload) -> bytes:
    """Bytes of one payload object (None -> b"")."""
    if payload is None:
        return b""
    if isinstance(payload, RawPayload):
        return payload.data
    if isinstance(payload, (MemoryTable, XenMemoryTable)):
        payload.nregions = len(payload.regions)
    if isinstance(payload, ConfigSpace):
        payload.size = len(payload.payload)
    struct = STRUCTS[type(payload)]
    return bytes(struct.build(payload))


def encode(
    request: Request,
    payload: Payload = None,
    *,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """A whole message: 12-byte header followed by the payload."""
    body = encode_payload(payload)
    flags = VHOST_USER_VERSION
    if reply:
        flags |= HeaderFlags.REPLY
    if need_reply:
        flags |= HeaderFlags.NEED_REPLY
    return bytes(HEADER.build(Header(request=int(request), flags=int(flags), size=len(body)))) + body


def decode_header(data: bytes, *, expect_reply: bool | None) -> Header:
    """Parse and check a 12-byte header (version, reserved bits, REPLY bit, size cap)."""
    if len(data) != HEADER_SIZE:
        raise MalformedMessage("header", len(data), f"need exactly {HEADER_SIZE} bytes")
    header = HEADER.parse(data)
    validate.check_header(header, expect_reply=expect_reply)
    return header


def _parse(cls: type | None, body: bytes, what: str) -> Payload:
    if cls is None:
        if body:
            raise MalformedMessage("size", len(body), f"{what} has no payload")
        return None
    if cls is RawPayload:
        return RawPayload(bytes(body))
    struct = STRUCTS[cls]
    if cls in (MemoryTable, XenMemoryTable):
        if len(body) < 8:
            raise MalformedMessage("size", len(body), f"{what}: memory table header is 8 bytes")
        nregions = int.from_bytes(body[:4], "little")
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise MalformedMessage("nregions", nregions, f"at most {VHOST_MEMORY_BASELINE_NREGIONS}")
        regsize = STRUCTS[_region_of(cls)].sizeof()
        expected = 8 + nregions * regsize
        full = 8 + VHOST_MEMORY_BASELINE_NREGIONS * regsize
        if expected <= len(body) <= full:
            # QEMU sends exactly 8 + n*size; Linux virtio_uml sends a larger, zero-padded
            # struct. Accept trailing bytes up to the full C struct (VhostUserMemory) and
            # ignore them, as libvhost-user does.
            body = body[:expected]
    elif cls is ConfigSpace:
        if len(body) < 12:
            raise MalformedMessage("size", len(body), f"{what}: config header is 12 bytes")
        expected = 12 + int.from_bytes(body[4:8], "little")
    else:
        expected = struct.sizeof()
    if len(body) != expected:
        raise MalformedMessage("size", len(body), f"{what} payload must be {expected} bytes")
    try:
        return struct.parse(body)
    except ConstructError as exc:  # pragma: no cover - sizes are checked above
        raise MalformedMessage("payload", bytes(body[:32]).hex(), str(exc)) from exc


def _region_of(cls: type) -> type:
    from .payloads import MemoryRegion, XenMemoryRegion

    return XenMemoryRegion if cls is XenMemoryTable else MemoryRegion


def _spec(request_code: int, channel: str) -> tuple[Request, RequestSpec]:
    if channel == "front-end":
        req: Request = FrontendRequest.from_code(request_code)  # type: ignore[assignment]
        spec = FRONTEND_SPECS.get(req)  # type: ignore[arg-type]
    else:
        req = BackendRequest.from_code(request_code)  # type: ignore[assignment]
        spec = BACKEND_SPECS.get(req)  # type: ignore[arg-type]
    if spec is None:
        raise UnknownRequest(request_code, channel)
    return req, spec


def decode_request(
    header: Header,
    body: bytes,
    fds: Sequence[int] = (),
    *,
    channel: str = "front-end",
    xen_mmap: bool = False,
) -> Message:
    """Decode and validate a request (``channel``: "front-end" for FrontendRequest codes,
    "back-end" for BackendRequest codes on the SET_BACKEND_REQ_FD channel)."""
    request, spec = _spec(header.request, channel)
    if len(body) != header.size:
        raise MalformedMessage("size", header.size, f"{len(body)} payload bytes present")
    xen_layout = xen_mmap and not _plain_layout(spec.payload, body)
    payload = _parse(_resolve(spec.payload, xen_layout), body, request.name)
    _validate_payload(request, payload)
    lo, hi = spec.fds(payload)
    validate.check_fd_count(request, fds, lo, hi)
    return Message(request, HeaderFlags(header.flags), payload, tuple(fds))


def decode_reply(
    header: Header,
    body: bytes,
    fds: Sequence[int] = (),
    *,
    expected: Request,
    ack: bool,
    channel: str = "front-end",
) -> Message:
    """Decode the reply to ``expected``. ``ack``: the reply is a REPLY_ACK u64 status
    (the request had no inherent reply and NEED_REPLY was set)."""
    if header.request != int(expected):
        got: object = header.request
        try:
            got = (FrontendRequest if channel == "front-end" else BackendRequest).from_code(header.request)
        except ValueError:  # pragma: no cover - from_code never raises for ints
            pass
        raise UnexpectedReply(expected, got)
    _, spec = _spec(header.request, channel)
    if len(body) != header.size:
        raise MalformedMessage("size", header.size, f"{len(body)} payload bytes present")
    cls = U64 if ack else spec.reply
    if cls is None:
        raise UnexpectedReply(expected, f"reply to {expected.name}, which has no reply")
    if cls is ConfigSpace and not body:
        # libvhost-user (qemu-storage-daemon, vhost-user-gpu) answers a GET_CONFIG it refuses
        # with an empty reply (size 0), not a zero-size config header. QEMU treats it as a
        # failed request, not a broken connection: report it as an empty window.
        payload: Payload = ConfigSpace(offset=0, size=0, flags=0, payload=b"")
    else:
        payload = _parse(cls, body, f"reply to {expected.name}")
    lo, hi = (0, 0) if ack else spec.reply_fds
    validate.check_fd_count(expected, fds, lo, hi)
    if isinstance(payload, ConfigSpace):
        validate.check_config(payload, allow_empty=True)
    return Message(expected, HeaderFlags(header.flags), payload, tuple(fds))


def _validate_payload(request: Request, payload: Payload) -> None:
    if isinstance(payload, VringAddr):
        validate.check_vring_addr(payload)
    elif isinstance(payload, (MemoryTable, XenMemoryTable)):
        validate.check_regions(payload.regions)
    elif isinstance(payload, (MemRegMsg, XenMemRegMsg)):
        validate.check_regions([payload.region])
    elif isinstance(payload, ConfigSpace):
        validate.check_config(payload, allow_empty=request == FrontendRequest.GET_CONFIG)
    elif isinstance(payload, VringState) and request == FrontendRequest.SET_VRING_ENABLE:
        if payload.num > 1:
            raise MalformedMessage("num", payload.num, "SET_VRING_ENABLE takes 0 or 1")


class MessageFramer:
    """Reassemble messages from a byte stream, keeping fds attached to their message.

    Feed it with :meth:`feed`; read at most :attr:`bytes_needed` bytes per ``recvmsg`` so that
    a read never spans two messages (the sender attaches fds to the sendmsg that carries the
    header, as QEMU and libvhost-user do). Complete frames come out of :meth:`feed` as
    ``(header, body, fds)``. Only the header is validated here.
    """

    def __init__(self, *, expect_reply: bool | None) -> None:
        self._expect_reply = expect_reply
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []

    @property
    def bytes_needed(self) -> int:
        """How many bytes complete the current header or payload."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes of the current, incomplete message received so far (header included)."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    @property
    def mid_message(self) -> bool:
        return bool(self._buf) or self._header is not None or bool(self._fds)

    def take_fds(self) -> list[int]:
        """Hand back the fds of the incomplete message (e.g. at EOF); the caller owns them."""
        fds, self._fds = self._fds, []
        return fds

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[tuple[Header, bytes, list[int]]]:
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise FdCountMismatch("message", f"at most {MAX_FDS}", len(self._fds))
        out: list[tuple[Header, bytes, list[int]]] = []
        view = memoryview(bytes(data))
        while True:
            take = view[: self.bytes_needed]
            self._buf += take
            view = view[len(take) :]
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                self._header = decode_header(bytes(self._buf), expect_reply=self._expect_reply)
                self._buf.clear()
            if len(self._buf) < self._header.size:
                if not view:
                    break
                continue
            out.append((self._header, bytes(self._buf), self._fds))
            self._header, self._buf, self._fds = None, bytearray(), []
            if not view:
                break
        return out
