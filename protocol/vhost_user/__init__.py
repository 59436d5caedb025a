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

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
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
        ChannelFlood,
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

# Names are imported from their submodule on first use (PEP 562), so that a program needing one
# layer (the daemon: the front-end) does not pay for the others (back-end server, testing kit).
_LAZY: dict[str, str] = {
    "AsyncFrontend": ".aio.client",
    "BackendServer": ".aio.server",
    "FdSocket": ".aio.transport",
    "InflightFd": ".aio.client",
    "Negotiated": ".aio.client",
    "UnixListener": ".aio.transport",
    "VhostUserDevice": ".aio.device",
    "Vring": ".aio.device",
    "connect_unix": ".aio.transport",
    "serve_unix": ".aio.server",
    "BackendChannelRequester": ".backend",
    "BackendConnection": ".backend",
    "BackendFailed": ".errors",
    "Disconnected": ".errors",
    "FdCountMismatch": ".errors",
    "FeatureNotNegotiated": ".errors",
    "GuestMemoryError": ".errors",
    "InflightRegionError": ".errors",
    "LocalProtocolError": ".errors",
    "MalformedMessage": ".errors",
    "PartialMessage": ".errors",
    "PeerTimeout": ".errors",
    "ChannelFlood": ".errors",
    "ProtocolError": ".errors",
    "RemoteProtocolError": ".errors",
    "TransportError": ".errors",
    "UnexpectedReply": ".errors",
    "UnknownRequest": ".errors",
    "VhostUserError": ".errors",
    "Ack": ".events",
    "Event": ".events",
    "Outgoing": ".events",
    "Reply": ".events",
    "RequestReceived": ".events",
    "BackendChannelResponder": ".frontend",
    "FrontendConnection": ".frontend",
    "GuestMemory": ".memory",
    "MappedRegion": ".memory",
    "BackendRequest": ".wire.enums",
    "FrontendRequest": ".wire.enums",
    "MemoryRegion": ".wire.payloads",
    "ProtocolFeatures": ".wire.enums",
    "VirtioFeatures": ".wire.enums",
    "XenMemoryRegion": ".wire.payloads",
    "XenMmapFlags": ".wire.enums",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


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
    "ChannelFlood",
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
