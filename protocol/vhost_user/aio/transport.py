"""L2: a non-blocking AF_UNIX SOCK_STREAM socket that carries SCM_RIGHTS fds under asyncio.

asyncio streams and uvloop transports cannot send or receive ancillary data, so
:class:`FdSocket` drives a plain non-blocking socket with ``loop.add_reader`` /
``loop.add_writer`` and ``socket.send_fds`` / ``socket.recv_fds``. Those two loop hooks are
the only ones used, so it behaves the same on the stock loop and on uvloop.

Ownership: fds passed to :meth:`FdSocket.send` stay the caller's (the kernel duplicates
them into the peer). Fds returned by :meth:`FdSocket.recv` are the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Sequence

from ..errors import Disconnected, FdCountMismatch, PeerTimeout, TransportError
from ..wire.header import MAX_FDS

__all__ = [
    "cancel_and_wait",
    "close_fds",
    "FdSocket",
    "UnixListener",
    "connect_unix",
    "connect_unix_stream",
    "CONNECT_TIMEOUT",
    "CONNECT_ATTEMPTS",
    "CONNECT_BACKOFF_INITIAL",
    "CONNECT_BACKOFF_MAX",
    "ACCEPT_TIMEOUT",
]

log = logging.getLogger("vhost_user.aio")

# Time for one connect() to an AF_UNIX path (local: it either works at once or the
# listener's backlog is full).
CONNECT_TIMEOUT = 5.0
# Client mode retries while the back-end is still starting (socket path missing or refusing).
CONNECT_ATTEMPTS = 20
CONNECT_BACKOFF_INITIAL = 0.05
CONNECT_BACKOFF_MAX = 1.0
# Server mode: how long to wait for the peer to connect.
ACCEPT_TIMEOUT = 30.0
# A listener's backlog full: connect() again after this, doubling up to the maximum (a non-blocking
# socket has no event to wait on for room in another socket's backlog).
BACKLOG_RETRY_INITIAL = 0.001
BACKLOG_RETRY_MAX = 0.05

_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED}


def close_fds(*groups: Sequence[int]) -> None:
    """Close every fd in ``groups`` once (duplicates across groups are closed once)."""
    seen: set[int] = set()
    for group in groups:
        for fd in group:
            if fd not in seen:
                seen.add(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)


class FdSocket:
    """A connected AF_UNIX stream socket with fd passing, usable from one task at a time."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("FdSocket needs an AF_UNIX SOCK_STREAM socket")
        sock.setblocking(False)
        self.sock = sock
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    @classmethod
    def pair(cls) -> tuple[FdSocket, FdSocket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self.sock.fileno()

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the peer as the kernel recorded them when the connection was made
        (SO_PEERCRED, socket(7)). :class:`Disconnected` once the socket is closed."""
        if self._closed:
            raise Disconnected("socket is closed")
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return pid, uid, gid

    async def _wait(self, writable: bool) -> None:
        if self._closed:
            raise Disconnected("socket is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self._closed:
                if writable:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send all of ``data``; ``fds`` ride on the first byte (one sendmsg with SCM_RIGHTS)."""
        view = memoryview(data)
        pending_fds = list(fds)
        while view or pending_fds:
            try:
                if pending_fds:
                    sent = socket.send_fds(self.sock, [view], pending_fds)
                    pending_fds = []
                else:
                    sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise Disconnected(f"send failed: {exc}") from exc
            view = view[sent:]

    async def recv(self, n: int, maxfds: int = MAX_FDS) -> tuple[bytes, list[int]]:
        """Receive up to ``n`` bytes and the fds attached to them. ``b""`` means EOF."""
        while True:
            if self._closed:
                raise Disconnected("socket is closed")
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, n, maxfds, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as exc:
                raise Disconnected(f"recv failed: {exc}") from exc
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise FdCountMismatch("message", f"at most {maxfds}", maxfds + 1)
            return data, list(fds)

    async def wait_readable(self) -> None:
        """Wait until the socket has data or EOF (used to notice a peer hanging up while idle)."""
        await self._wait(writable=False)

    def peek_eof(self) -> bool:
        """True if the peer has closed (readable with no data). Non-blocking."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.remove_reader(self.sock.fileno())
            loop.remove_writer(self.sock.fileno())
        # Wake whoever waits for readiness on this socket: it will never come now.
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_exception(Disconnected("socket closed locally"))
        self.sock.close()

    def detach_fd(self) -> int:
        """Give up the socket object and return its fd (e.g. to send it over SCM_RIGHTS)."""
        self._closed = True
        return self.sock.detach()


async def connect_unix_stream(sock: socket.socket, path: str) -> None:
    """connect() the non-blocking AF_UNIX stream socket ``sock`` to ``path``; bound it with a
    timeout. Linux connects such a socket at once or refuses it (OSError): a Unix connect never
    runs in the background. With the listener's backlog full it fails with EAGAIN and leaves the
    socket unconnected, which ``loop.sock_connect`` (asyncio's and uvloop's) takes for a connect
    in progress and, the unconnected socket polling writable, reports as done: the first write
    then fails with ENOTCONN (a busy xenstored, whose backlog is 1, did that to an instance on a
    loaded dom0: tests/xenlab/README.md). Here EAGAIN is waited out: connect() is tried again
    until it connects or fails otherwise."""
    delay = BACKLOG_RETRY_INITIAL
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:  # EAGAIN: the backlog is full
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKLOG_RETRY_MAX)


async def connect_unix(
    path: str | os.PathLike[str],
    *,
    attempts: int = CONNECT_ATTEMPTS,
    backoff_initial: float = CONNECT_BACKOFF_INITIAL,
    backoff_max: float = CONNECT_BACKOFF_MAX,
    timeout: float = CONNECT_TIMEOUT,
) -> FdSocket:
    """Connect to a listening back-end, retrying with exponential backoff while the path is
    missing or refusing (the back-end may still be starting)."""
    delay = backoff_initial
    last: OSError | None = None
    for attempt in range(1, max(1, attempts) + 1):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        connected = False
        try:
            async with asyncio.timeout(timeout):
                await connect_unix_stream(sock, os.fspath(path))
            connected = True
        except TimeoutError as exc:
            raise PeerTimeout(f"connect to {os.fspath(path)}", timeout) from exc
        except OSError as exc:
            if exc.errno not in _RETRY_ERRNOS:
                raise TransportError(f"connect to {os.fspath(path)}: {exc}") from exc
            last = exc
        finally:
            if not connected:  # failed, timed out or cancelled
                sock.close()
        if connected:
            return FdSocket(sock)
        log.debug("connect %s attempt %d failed: %s; retrying in %.2fs", path, attempt, last, delay)
        if attempt < attempts:
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max)
    raise Disconnected(f"could not connect to {os.fspath(path)} after {attempts} attempts: {last}")


class UnixListener:
    """Server mode: listen on an AF_UNIX path and accept one peer at a time."""

    def __init__(self, path: str | os.PathLike[str], *, backlog: int = 1) -> None:
        self.path: str | None = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(self.path)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    @classmethod
    def from_fd(cls, fd: int) -> UnixListener:
        """Adopt an inherited, already listening AF_UNIX stream socket (the ``--fd`` of
        vhost-user.rst's back-end program conventions). Raises ValueError, leaving ``fd`` to
        the caller, when it is not one; closing the listener does not unlink anything."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"fd {fd} is not a socket: {exc.strerror}") from exc
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:  # pragma: no cover - any socket answers SO_ACCEPTCONN on Linux
            sock.detach()
            raise ValueError(f"fd {fd}: {exc.strerror}") from exc
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            what = f"{sock.family.name}/{sock.type.name}{'' if listening else ', not listening'}"
            sock.detach()
            raise ValueError(f"fd {fd} is not a listening AF_UNIX stream socket ({what})")
        sock.set_inheritable(False)
        sock.setblocking(False)
        self = cls.__new__(cls)
        self.path, self.sock = None, sock
        return self

    async def accept(self, timeout: float | None = ACCEPT_TIMEOUT) -> FdSocket:
        """Wait for one peer (``timeout=None``: forever)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self.sock)
        except TimeoutError as exc:
            where = self.path if self.path is not None else f"fd {self.sock.fileno()}"
            raise PeerTimeout(f"a peer to connect to {where}", timeout or 0.0) from exc
        return FdSocket(conn)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def __enter__(self) -> UnixListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def cancel_and_wait(task: asyncio.Task[object] | asyncio.Future[object] | None) -> None:
    """Cancel ``task`` and wait for it to end, swallowing only *its* cancellation: if the caller
    is itself being cancelled meanwhile, that cancellation propagates (a plain
    ``suppress(CancelledError)`` would eat it and leave the caller running)."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
