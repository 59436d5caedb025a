"""Running a simulated Xen host: in a thread of this process (unit tests) or as the main loop of
the ``xen-vhost-sim`` process. Either way the daemon reaches it only through its Unix socket
(``XEN_VHOST_SIM=<path>``, which makes the daemon's entry points take :func:`.platform.sim_platform`).

The simulated toolstack (``sim.toolstack``: xenstored + libxl's xenstore layout) runs inside the
host; ``/dev/xen/xenbus`` opens are wired to it as dom0 connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.hypervisor import Hypervisor
from xen_vhost_sim.server import SimServer

if TYPE_CHECKING:
    from xen_vhost_sim.xenstored import SimXenstored

__all__ = ["SimHost", "serve"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0


def _toolstack() -> Any:
    """The xenstore-backed toolstack, if the simulated xenstored is importable."""
    try:
        from xen_vhost_sim.toolstack import XenstoreToolstack
    except ImportError as exc:
        log.info("no simulated xenstored (%s): /dev/xen/xenbus opens fail with ENOENT", exc)
        return None
    return XenstoreToolstack()


async def serve(path: str, started: Callable[[Hypervisor, SimServer], None] | None = None,
                stop: asyncio.Event | None = None, *, xenstore_socket: str | None = None,
                privcmd_eventfd: str = "enotty") -> None:
    """Run a simulated host on ``path`` until ``stop`` is set (or forever). With ``xenstore_socket``
    the simulated xenstored also listens there (like /var/run/xenstored/socket: dom0 connections).
    ``privcmd_eventfd``: the dom0 kernel's IRQFD/IOEVENTFD (``sim.fastpath.EventfdMode``: enotty =
    Linux 6.1, eopnotsupp = no CONFIG_XEN_PRIVCMD_EVENTFD, on = supported)."""
    hv = Hypervisor()
    toolstack = _toolstack()
    server = SimServer(hv, path, toolstack=toolstack, privcmd_eventfd=privcmd_eventfd)
    await server.start()
    try:
        if xenstore_socket is not None:
            if toolstack is None:
                raise RuntimeError("no simulated xenstored to listen on the xenstore socket")
            await toolstack.xenstored.serve_unix(xenstore_socket)
        if started is not None:
            started(hv, server)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await server.close()
        if toolstack is not None:
            await toolstack.close()


class SimHost:
    """A simulated Xen host on its own thread and event loop, listening on ``path``.

    Use as a context manager; :meth:`control` gives a blocking admin client.
    """

    def __init__(self, path: str, *, xenstore_socket: str | None = None, privcmd_eventfd: str = "enotty") -> None:
        self.path = path
        self.xenstore_socket = xenstore_socket
        self.privcmd_eventfd = privcmd_eventfd
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.hv: Hypervisor | None = None
        self._server: SimServer | None = None

    def start(self) -> SimHost:
        self._thread = threading.Thread(target=self._run, name="xen-sim-host", daemon=True)
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT):
            raise TimeoutError("simulated host did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        def started(hv: Hypervisor, server: SimServer) -> None:
            self.hv = hv
            self._server = server
            self._ready.set()

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(self.path, started, self._stop, xenstore_socket=self.xenstore_socket,
                        privcmd_eventfd=self.privcmd_eventfd)

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(STARTUP_TIMEOUT)
            self._thread = None

    def control(self) -> SimControl:
        return SimControl(self.path)

    @property
    def xenstored(self) -> SimXenstored | None:
        """The host's simulated xenstored (None without one), for a test to look at what it was
        asked (:attr:`SimXenstored.seen`)."""
        from xen_vhost_sim.toolstack import XenstoreToolstack  # noqa: PLC0415  (optional, as in _toolstack)

        toolstack = self._server.toolstack if self._server is not None else None
        return toolstack.xenstored if isinstance(toolstack, XenstoreToolstack) else None

    def __enter__(self) -> SimHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
