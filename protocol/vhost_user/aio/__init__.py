"""L2: asyncio adapters — fd-passing transport, the front-end client, the back-end server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .client import (
        BACKEND_EVENTS_MAX,
        BACKEND_REQUEST_BURST,
        BACKEND_REQUEST_RATE,
        DEFAULT_PROTOCOL_FEATURES,
        MEM_TABLE_TIMEOUT,
        REQUEST_TIMEOUT,
        SLOW_REPLY_AFTER,
        AsyncFrontend,
        BackendRequestHandler,
        InflightFd,
        Negotiated,
    )
    from .device import DEFAULT_BACKEND_PROTOCOL_FEATURES, VhostUserDevice, Vring
    from .server import BACKEND_CHANNEL_TIMEOUT, BackendServer, serve_unix
    from .transport import (
        ACCEPT_TIMEOUT,
        CONNECT_ATTEMPTS,
        CONNECT_TIMEOUT,
        FdSocket,
        UnixListener,
        cancel_and_wait,
        close_fds,
        connect_unix,
        connect_unix_stream,
    )

# Names are imported from their submodule on first use (PEP 562), so that a program needing one
# layer (the daemon: the front-end) does not pay for the others (back-end server, testing kit).
_LAZY: dict[str, str] = {
    "BACKEND_EVENTS_MAX": ".client",
    "BACKEND_REQUEST_BURST": ".client",
    "BACKEND_REQUEST_RATE": ".client",
    "DEFAULT_PROTOCOL_FEATURES": ".client",
    "MEM_TABLE_TIMEOUT": ".client",
    "REQUEST_TIMEOUT": ".client",
    "SLOW_REPLY_AFTER": ".client",
    "AsyncFrontend": ".client",
    "BackendRequestHandler": ".client",
    "InflightFd": ".client",
    "Negotiated": ".client",
    "DEFAULT_BACKEND_PROTOCOL_FEATURES": ".device",
    "VhostUserDevice": ".device",
    "Vring": ".device",
    "BACKEND_CHANNEL_TIMEOUT": ".server",
    "BackendServer": ".server",
    "serve_unix": ".server",
    "ACCEPT_TIMEOUT": ".transport",
    "CONNECT_ATTEMPTS": ".transport",
    "CONNECT_TIMEOUT": ".transport",
    "FdSocket": ".transport",
    "UnixListener": ".transport",
    "cancel_and_wait": ".transport",
    "close_fds": ".transport",
    "connect_unix": ".transport",
    "connect_unix_stream": ".transport",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "BACKEND_EVENTS_MAX",
    "BACKEND_REQUEST_BURST",
    "BACKEND_REQUEST_RATE",
    "cancel_and_wait",
    "DEFAULT_PROTOCOL_FEATURES",
    "MEM_TABLE_TIMEOUT",
    "REQUEST_TIMEOUT",
    "SLOW_REPLY_AFTER",
    "AsyncFrontend",
    "BackendRequestHandler",
    "InflightFd",
    "Negotiated",
    "DEFAULT_BACKEND_PROTOCOL_FEATURES",
    "VhostUserDevice",
    "Vring",
    "BACKEND_CHANNEL_TIMEOUT",
    "BackendServer",
    "serve_unix",
    "ACCEPT_TIMEOUT",
    "CONNECT_ATTEMPTS",
    "CONNECT_TIMEOUT",
    "FdSocket",
    "UnixListener",
    "close_fds",
    "connect_unix",
    "connect_unix_stream",
]
