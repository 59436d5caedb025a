"""Test helpers shipped with the library: a recording dummy back-end, a RAM-disk virtio-blk
device, and :func:`connected_pair` (AsyncFrontend <-> BackendServer over a socketpair)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .._lazy import lazy_exports
from ..aio.client import AsyncFrontend
from ..aio.device import VhostUserDevice
from ..aio.server import BackendServer
from ..aio.transport import FdSocket

if TYPE_CHECKING:
    from .blk import RamDiskBlk
    from .dummy_backend import DummyBackend, Recorded

# The devices are imported on first use (PEP 562): ``python -m vhost_user.testing.blk`` imports
# this package first, and runpy warns when the module it is about to run is already imported.
_LAZY: dict[str, str] = {"RamDiskBlk": ".blk", "DummyBackend": ".dummy_backend", "Recorded": ".dummy_backend"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = ["DummyBackend", "Recorded", "RamDiskBlk", "connected_pair", "PAIR_SHUTDOWN_TIMEOUT"]

PAIR_SHUTDOWN_TIMEOUT = 5.0  # how long the back-end may take to notice the front-end closed


@contextlib.asynccontextmanager
async def connected_pair(
    device: VhostUserDevice, **frontend_kwargs: Any
) -> AsyncIterator[tuple[AsyncFrontend, BackendServer]]:
    """An :class:`AsyncFrontend` talking to ``device`` through a real socketpair. On exit the
    front-end closes and the back-end task is awaited (bounded) — all fds are released."""
    a, b = FdSocket.pair()
    server = BackendServer(device, b)
    task = asyncio.get_running_loop().create_task(server.run())
    built = False
    try:
        fe = AsyncFrontend(a, **frontend_kwargs)
        built = True
    finally:
        if not built:
            a.close()
            task.cancel()
            b.close()
    try:
        yield fe, server
    finally:
        await fe.close()
        try:
            async with asyncio.timeout(PAIR_SHUTDOWN_TIMEOUT):
                await asyncio.gather(task, return_exceptions=True)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        server.close()
