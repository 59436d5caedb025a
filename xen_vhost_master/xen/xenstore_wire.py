"""XenStore wire protocol (xs_wire), sans-IO: message framing, request/reply matching, typed errors.

Bytes in, typed events out; no I/O, no clock, no logging (docs/design.md §3 rule 1). Request ids are
allocated and matched here, and every field of every reply is validated, so a hostile xenstored
gets a typed error, never a crash. Used by the asyncio client (``xen.xenstore``) and, for framing
and encoding, by the simulated xenstored (``xen_vhost_sim.xenstored``).

Wire facts: ``xen/include/public/io/xs_wire.h`` and ``io/xenbus.h`` (docs/xen-abi.md §7).
"""

from __future__ import annotations

import enum
import errno as errno_mod
import itertools
import os
import re
import struct
from dataclasses import dataclass

__all__ = [
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XSD_ERRORS",
    "XsType",
    "XenbusState",
    "XsAccess",
    "XsPerm",
    "XsHeader",
    "XsMessage",
    "XsFramer",
    "XsReply",
    "XsWatchEvent",
    "XsClientProtocol",
    "encode_message",
    "split_strings",
    "one_string",
    "XenstoreError",
    "XenstoreNotFound",
    "XenstorePermissionError",
    "XenstoreExists",
    "XenstoreConflict",
    "XenstoreProtocolError",
    "XenstoreDisconnected",
    "XenstoreTimeout",
    "xenstore_error",
]

# xs_wire.h: "#define XENSTORE_PAYLOAD_MAX 4096" (bytes after the header, both directions).
XENSTORE_PAYLOAD_MAX = 4096
# xs_wire.h: absolute / relative path limits.
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
# Timed-out request ids remembered so that their late replies are dropped rather than taken for a
# protocol violation; beyond this many, the oldest are forgotten.
ABANDONED_MAX = 1024


class XsType(enum.IntEnum):
    """``enum xsd_sockmsg_type`` (xs_wire.h)."""

    CONTROL = 0  # alias XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT (removed)
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (xen/include/public/io/xenbus.h): the ``state`` key of front/back ends."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


# xs_wire.h ``xsd_errors[]`` in table order: the wire carries the *name*.
XSD_ERRORS: dict[str, int] = {
    "EINVAL": errno_mod.EINVAL,
    "EACCES": errno_mod.EACCES,
    "EEXIST": errno_mod.EEXIST,
    "EISDIR": errno_mod.EISDIR,
    "ENOENT": errno_mod.ENOENT,
    "ENOMEM": errno_mod.ENOMEM,
    "ENOSPC": errno_mod.ENOSPC,
    "EIO": errno_mod.EIO,
    "ENOTEMPTY": errno_mod.ENOTEMPTY,
    "ENOSYS": errno_mod.ENOSYS,
    "EROFS": errno_mod.EROFS,
    "EBUSY": errno_mod.EBUSY,
    "EAGAIN": errno_mod.EAGAIN,
    "EISCONN": errno_mod.EISCONN,
    "E2BIG": errno_mod.E2BIG,
    "EPERM": errno_mod.EPERM,
}


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class XenstoreError(OSError):
    """A XenStore operation failed; ``errno`` is the Linux errno, ``op``/``path`` say which request."""

    def __init__(self, err: int, message: str = "", *, op: str = "", path: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.op = op
        self.path = path

    def __str__(self) -> str:
        where = " ".join(part for part in (self.op, self.path) if part)
        return f"[Errno {self.errno}] {self.strerror}" + (f" ({where})" if where else "")


class XenstoreNotFound(XenstoreError, FileNotFoundError):
    """ENOENT: no such node (or unknown transaction / watch)."""


class XenstorePermissionError(XenstoreError, PermissionError):
    """EACCES / EPERM: the connection's domain may not do this."""


class XenstoreExists(XenstoreError, FileExistsError):
    """EEXIST: e.g. the same watch (path, token) registered twice."""


class XenstoreConflict(XenstoreError):
    """EAGAIN on TRANSACTION_END: another writer got there first; rerun the transaction."""


class XenstoreProtocolError(XenstoreError):
    """The peer sent something xs_wire does not allow (remote protocol error)."""

    def __init__(self, message: str, *, op: str = "", path: str = "") -> None:
        super().__init__(errno_mod.EPROTO, message, op=op, path=path)


class XenstoreDisconnected(XenstoreError, ConnectionResetError):
    """The connection is closed; every pending and later request fails with this."""

    def __init__(self, message: str = "xenstore connection closed") -> None:
        super().__init__(errno_mod.ECONNRESET, message)


class XenstoreTimeout(XenstoreError, TimeoutError):
    """No reply within the request timeout."""

    def __init__(self, message: str, *, op: str = "", path: str = "") -> None:
        super().__init__(errno_mod.ETIMEDOUT, message, op=op, path=path)


_ERRNO_CLASSES: dict[int, type[XenstoreError]] = {
    errno_mod.ENOENT: XenstoreNotFound,
    errno_mod.EACCES: XenstorePermissionError,
    errno_mod.EPERM: XenstorePermissionError,
    errno_mod.EEXIST: XenstoreExists,
    errno_mod.EAGAIN: XenstoreConflict,
}


def xenstore_error(err: int, *, op: str = "", path: str = "") -> XenstoreError:
    """The typed exception for errno ``err``."""
    return _ERRNO_CLASSES.get(err, XenstoreError)(err, op=op, path=path)


# --------------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------------


class XsAccess(enum.Enum):
    """Permission letters of ``xs_perm_to_string``: none, read, write, both."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def can_read(self) -> bool:
        return self in (XsAccess.READ, XsAccess.BOTH)

    @property
    def can_write(self) -> bool:
        return self in (XsAccess.WRITE, XsAccess.BOTH)


_PERM_RE = re.compile(r"([nrwb])([0-9]{1,5})")
_DOMID_MAX = 0xFFFF


@dataclass(frozen=True)
class XsPerm:
    """One permission entry. The first entry of a node names its owner and the default for others."""

    domid: int
    access: XsAccess

    def __post_init__(self) -> None:
        if not 0 <= self.domid <= _DOMID_MAX:
            raise ValueError(f"domid out of range: {self.domid}")

    def __str__(self) -> str:
        return f"{self.access.value}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> XsPerm:
        """Parse ``"r5"``; ValueError if malformed."""
        m = _PERM_RE.fullmatch(text)
        if m is None or int(m.group(2)) > _DOMID_MAX:
            raise ValueError(f"bad permission {text!r}")
        return cls(int(m.group(2)), XsAccess(m.group(1)))


# --------------------------------------------------------------------------------------------------
# Framing (sans-IO, shared with the simulated xenstored)
# --------------------------------------------------------------------------------------------------

_HEADER = struct.Struct("=IIII")


@dataclass(frozen=True)
class XsHeader:
    """``struct xsd_sockmsg`` (xs_wire.h), native-endian, 16 bytes::

        struct xsd_sockmsg {
            uint32_t type;   /* XS_??? */
            uint32_t req_id; /* Request identifier, echoed in daemon's response.  */
            uint32_t tx_id;  /* Transaction id (0 if not related to a transaction). */
            uint32_t len;    /* Length of data following this. */
            /* Generally followed by nul-terminated string(s). */
        };
    """

    type: int
    req_id: int
    tx_id: int
    len: int

    SIZE = _HEADER.size

    def pack(self) -> bytes:
        return _HEADER.pack(self.type, self.req_id, self.tx_id, self.len)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> XsHeader:
        return cls(*_HEADER.unpack(data))


@dataclass(frozen=True)
class XsMessage:
    """One complete message: header fields plus payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode_message(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Header + payload; ValueError if the payload exceeds XENSTORE_PAYLOAD_MAX."""
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(f"xenstore payload {len(payload)} > {XENSTORE_PAYLOAD_MAX}")
    return XsHeader(int(type_), req_id, tx_id, len(payload)).pack() + payload


class XsFramer:
    """Splits a byte stream into messages; a length above XENSTORE_PAYLOAD_MAX breaks the stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[XsMessage]:
        """Add bytes; return the complete messages. XenstoreProtocolError on an oversized length."""
        self._buf += data
        out: list[XsMessage] = []
        while len(self._buf) >= XsHeader.SIZE:
            hdr = XsHeader.unpack(memoryview(self._buf)[: XsHeader.SIZE])
            if hdr.len > XENSTORE_PAYLOAD_MAX:
                raise XenstoreProtocolError(f"message length {hdr.len} > XENSTORE_PAYLOAD_MAX")
            end = XsHeader.SIZE + hdr.len
            if len(self._buf) < end:
                break
            out.append(XsMessage(hdr.type, hdr.req_id, hdr.tx_id, bytes(self._buf[XsHeader.SIZE : end])))
            del self._buf[:end]
        return out


def split_strings(payload: bytes, *, what: str = "payload") -> list[str]:
    """``a\\0b\\0`` → ``["a", "b"]``; the payload must be empty or end with NUL, and be UTF-8."""
    if not payload:
        return []
    if payload[-1] != 0:
        raise XenstoreProtocolError(f"{what} is not NUL-terminated")
    try:
        return payload[:-1].decode("utf-8").split("\0")
    except UnicodeDecodeError as exc:
        raise XenstoreProtocolError(f"{what} is not UTF-8: {exc.reason}") from None


def one_string(payload: bytes, *, what: str) -> str:
    parts = split_strings(payload, what=what)
    if len(parts) != 1:
        raise XenstoreProtocolError(f"{what}: expected one NUL-terminated string, got {len(parts)}")
    return parts[0]


@dataclass(frozen=True)
class XsReply:
    """A reply matched to request ``req_id``: either ``payload`` or ``error`` is meaningful."""

    req_id: int
    type: XsType
    payload: bytes
    error: XenstoreError | None = None


@dataclass(frozen=True)
class XsWatchEvent:
    """``XS_WATCH_EVENT``: ``path`` changed (as the watch was registered: absolute or relative)."""

    path: str
    token: str


class XsClientProtocol:
    """Sans-IO client side of xs_wire: allocates request ids, matches replies, demultiplexes events.

    ``request()`` returns ``(req_id, bytes_to_send)``; ``receive_data()`` returns :class:`XsReply` and
    :class:`XsWatchEvent` events.  A framing violation raises XenstoreProtocolError and leaves the
    protocol ``broken`` (sticky); a reply to an unknown request id is such a violation, except for
    requests the caller ``abandon()``-ed (timed out), whose late replies are dropped.
    """

    def __init__(self) -> None:
        self._framer = XsFramer()
        self._ids = itertools.count(1)
        self._pending: dict[int, XsType] = {}
        self._abandoned: dict[int, None] = {}  # insertion-ordered set
        self.broken: XenstoreError | None = None

    @property
    def pending(self) -> dict[int, XsType]:
        return dict(self._pending)

    def request(self, type_: XsType, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        if self.broken is not None:
            raise self.broken
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenstoreError(errno_mod.E2BIG, "request payload too large", op=type_.name)
        req_id = next(self._ids) & 0xFFFFFFFF
        while req_id == 0 or req_id in self._pending or req_id in self._abandoned:
            req_id = next(self._ids) & 0xFFFFFFFF
        self._pending[req_id] = type_
        return req_id, encode_message(type_, req_id, tx_id, payload)

    def abandon(self, req_id: int) -> None:
        """Forget a request whose caller gave up; its reply, if it ever comes, is discarded."""
        if self._pending.pop(req_id, None) is not None:
            self._abandoned[req_id] = None
            if len(self._abandoned) > ABANDONED_MAX:
                del self._abandoned[next(iter(self._abandoned))]

    def receive_data(self, data: bytes) -> list[XsReply | XsWatchEvent]:
        if self.broken is not None:
            raise self.broken
        try:
            return [ev for msg in self._framer.feed(data) if (ev := self._message(msg)) is not None]
        except XenstoreProtocolError as exc:
            self.broken = exc
            raise

    def _message(self, msg: XsMessage) -> XsReply | XsWatchEvent | None:
        if msg.type == XsType.WATCH_EVENT:
            parts = split_strings(msg.payload, what="watch event")
            if len(parts) < 2:
                raise XenstoreProtocolError("watch event without path and token")
            return XsWatchEvent(parts[0], parts[1])
        req_type = self._pending.pop(msg.req_id, None)
        if req_type is None:
            if msg.req_id in self._abandoned:
                del self._abandoned[msg.req_id]
                return None
            raise XenstoreProtocolError(f"reply to unknown req_id {msg.req_id} (type {msg.type})")
        if msg.type == XsType.ERROR:
            try:
                name = one_string(msg.payload, what="error reply")
            except XenstoreProtocolError as exc:
                return XsReply(msg.req_id, req_type, b"", exc)
            err = XSD_ERRORS.get(name)
            if err is None:
                # Unknown name: libxenstore maps these to EINVAL; keep the name for the log.
                return XsReply(msg.req_id, req_type, b"", XenstoreError(errno_mod.EINVAL, f"unknown error {name!r}"))
            return XsReply(msg.req_id, req_type, b"", xenstore_error(err))
        if msg.type != req_type:
            mismatch = XenstoreProtocolError(f"reply type {msg.type} to a {req_type.name} request")
            return XsReply(msg.req_id, req_type, b"", mismatch)
        return XsReply(msg.req_id, req_type, msg.payload)
