"""vhost_user: an asyncio vhost-user protocol library (front-end and back-end roles).

Follows QEMU's ``docs/interop/vhost-user.rst`` (protocol feature bits 0-19). Knows nothing
about Xen. Layers (each importable on its own):

* :mod:`vhost_user.wire` — construct structs, enums, codec, validators (L0, pure);
* :mod:`vhost_user.frontend`, :mod:`vhost_user.backend` — sans-IO state machines (L1, pure);
* :mod:`vhost_user.aio` — asyncio transport, :class:`AsyncFrontend`, :class:`BackendServer` (L2);
* :mod:`vhost_user.virtqueue`, :mod:`vhost_user.inflight` — split rings and inflight I/O
  tracking (pure);
* :mod:`vhost_user.testing` — recording dummy back-end and a RAM-disk virtio-blk device;
* :mod:`vhost_user.trace` — ``vhost-user-dump``, a decoding man-in-the-middle.
"""

from __future__ import annotations

from .aio import (
    AsyncFrontend,
    BackendServer,
    FdSocket,
    InflightFd,
    Negotiated,
    UnixListener,
    VhostUserDevice,
    Vring,
    connect_unix,
    serve_unix,
)
from .backend import BackendChannelRequester, BackendConnection
from .errors import (
    BackendFailed,
    Disconnected,
    FdCountMismatch,
    FeatureNotNegotiated,
    GuestMemoryError,
    InflightRegionError,
    LocalProtocolError,
    MalformedMessage,
    PartialMessage,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
    UnexpectedReply,
    UnknownRequest,
    VhostUserError,
)
from .events import Ack, Event, Outgoing, Reply, RequestReceived
from .frontend import BackendChannelResponder, FrontendConnection
from .memory import GuestMemory, MappedRegion
from .wire import (
    BackendRequest,
    FrontendRequest,
    MemoryRegion,
    ProtocolFeatures,
    VirtioFeatures,
    XenMemoryRegion,
    XenMmapFlags,
)

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "AsyncFrontend",
    "BackendServer",
    "FdSocket",
    "InflightFd",
    "Negotiated",
    "UnixListener",
    "VhostUserDevice",
    "Vring",
    "connect_unix",
    "serve_unix",
    "BackendChannelRequester",
    "BackendConnection",
    "BackendChannelResponder",
    "FrontendConnection",
    "BackendFailed",
    "Disconnected",
    "FdCountMismatch",
    "FeatureNotNegotiated",
    "GuestMemoryError",
    "InflightRegionError",
    "LocalProtocolError",
    "MalformedMessage",
    "PartialMessage",
    "PeerTimeout",
    "ProtocolError",
    "RemoteProtocolError",
    "TransportError",
    "UnexpectedReply",
    "UnknownRequest",
    "VhostUserError",
    "Ack",
    "Event",
    "Outgoing",
    "Reply",
    "RequestReceived",
    "GuestMemory",
    "MappedRegion",
    "BackendRequest",
    "FrontendRequest",
    "MemoryRegion",
    "ProtocolFeatures",
    "VirtioFeatures",
    "XenMemoryRegion",
    "XenMmapFlags",
]
