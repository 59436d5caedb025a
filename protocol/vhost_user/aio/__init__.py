"""L2: asyncio adapters — fd-passing transport, the front-end client, the back-end server."""

from __future__ import annotations

from .client import (
    DEFAULT_PROTOCOL_FEATURES,
    GET_VRING_BASE_TIMEOUT,
    REQUEST_TIMEOUT,
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
)

__all__ = [
    "cancel_and_wait",
    "DEFAULT_PROTOCOL_FEATURES",
    "GET_VRING_BASE_TIMEOUT",
    "REQUEST_TIMEOUT",
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
]
