"""Stand-in vhost-user back-ends for a Device's connect(): each one a BackendServer on one end of a
socketpair, the daemon's AsyncFrontend on the other (protocol/vhost_user/aio)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from vhost_user import AsyncFrontend
from vhost_user.aio import BackendServer, FdSocket

S = TypeVar("S", bound=BackendServer)

STOP_BOUND = 5.0  # how long a stand-in back-end is given to see its front-end close


def serve_pair(make_server: Callable[[FdSocket], S], tasks: list[asyncio.Task[None]],
               **frontend_kwargs: Any) -> tuple[AsyncFrontend, S]:
    """A front-end connected to the back-end ``make_server`` builds on the other end of a socketpair;
    the back-end's run() is a task appended to ``tasks`` (the caller awaits or cancels it)."""
    a, b = FdSocket.pair()
    server = make_server(b)
    tasks.append(asyncio.get_running_loop().create_task(server.run()))
    return AsyncFrontend(a, **frontend_kwargs), server


class StandInBackends:
    """connect() for a Device: every call starts a fresh back-end (``make_server``) over a socketpair,
    stopped when ``stack`` closes: its front-end closed, its task awaited (bounded) then cancelled."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack
        self.servers: list[BackendServer] = []
        self.frontends: list[AsyncFrontend] = []

    def make_server(self, sock: FdSocket) -> BackendServer:
        raise NotImplementedError

    async def connect(self) -> AsyncFrontend:
        tasks: list[asyncio.Task[None]] = []
        fe, server = serve_pair(self.make_server, tasks)
        task = tasks[0]

        async def stop() -> None:
            await fe.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_BOUND):
                    await asyncio.gather(task, return_exceptions=True)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()

        self.stack.push_async_callback(stop)
        self.servers.append(server)
        self.frontends.append(fe)
        return fe
