"""XenStore client for asyncio and uvloop, over the xenstored Unix socket or /dev/xen/xenbus.

The asyncio adapter over the sans-IO core in ``xen.xenstore_wire`` (whose public names are re-exported
here): one non-blocking fd driven by ``loop.add_reader`` / ``add_writer`` (the only hooks uvloop and
asyncio share for arbitrary fds), awaitable requests with a timeout each, watch events delivered to
:class:`XsWatch` queues, transactions with an EAGAIN retry helper (:meth:`XenstoreClient.transaction`).
A closed connection fails every pending and later request with a typed error.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from xen_vhost_master.xen.xenstore_wire import (
    encode_message,
    one_string,
    split_strings,
    XenbusState,
    XENSTORE_ABS_PATH_MAX,
    xenstore_error,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XenstoreConflict,
    XenstoreDisconnected,
    XenstoreError,
    XenstoreExists,
    XenstoreNotFound,
    XenstorePermissionError,
    XenstoreProtocolError,
    XenstoreTimeout,
    XsAccess,
    XsClientProtocol,
    XSD_ERRORS,
    XsFramer,
    XsHeader,
    XsMessage,
    XsPerm,
    XsReply,
    XsType,
    XsWatchEvent,
)

__all__ = [
    "DEFAULT_SOCKET_PATHS",
    "XENBUS_DEVICE_PATHS",
    "DEFAULT_TIMEOUT",
    "XenstoreClient",
    "XsTransaction",
    "XsWatch",
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
    "connect_stream",
    "XenstoreTimeout",
    "xenstore_error",
]

logger = logging.getLogger(__name__)

# Default time a request may take before XenstoreTimeout (xenstored answers in microseconds; a dom0
# under load may take a while; 10 s is the order of libxenstore's own watchdog-free blocking).
DEFAULT_TIMEOUT = 30.0  # a dead xenstored, not a slow one: on a loaded dom0 a reply can take seconds
# Watch events buffered per watch before the oldest are dropped (the watch is then flagged
# ``overflowed`` so its owner rescans): bounds memory against a flooding or hostile xenstored.
WATCH_QUEUE_MAX = 4096
# Attempts of XenstoreClient.transaction before giving up with XenstoreConflict.
TRANSACTION_MAX_ATTEMPTS = 16
# libxenstore xs_daemon_socket(): $XENSTORED_PATH, else <rundir>/socket (rundir /var/run/xenstored).
DEFAULT_SOCKET_PATHS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
# Linux xenbus_dev_frontend; /proc/xen/xenbus on old kernels.
XENBUS_DEVICE_PATHS = ("/dev/xen/xenbus", "/proc/xen/xenbus")

_T = TypeVar("_T")


def _path_bytes(path: str) -> bytes:
    raw = path.encode("utf-8")
    if b"\0" in raw or not raw:
        raise ValueError(f"bad xenstore path {path!r}")
    limit = XENSTORE_ABS_PATH_MAX if path.startswith("/") else XENSTORE_REL_PATH_MAX
    if len(raw) > limit:
        raise ValueError(f"xenstore path longer than {limit} bytes")
    return raw


def _expect_ok(payload: bytes, op: str) -> None:
    if payload != b"OK\0":
        raise XenstoreProtocolError(f"expected OK, got {payload[:32]!r}", op=op)


class _Ops:
    """The node operations, shared by the connection (tx 0) and a transaction."""

    _tx_id: int = 0

    async def _call(self, type_: XsType, payload: bytes, *, tx_id: int, path: str = "") -> bytes:
        raise NotImplementedError

    async def read(self, path: str) -> bytes:
        return await self._call(XsType.READ, _path_bytes(path) + b"\0", tx_id=self._tx_id, path=path)

    async def read_str(self, path: str) -> str:
        raw = await self.read(path)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise XenstoreProtocolError("value is not UTF-8", op="READ", path=path) from None

    async def read_many(self, paths: Sequence[str]) -> list[bytes | None]:
        """The values of ``paths`` (None for a node that does not exist), asked all at once: the
        requests go out together and xenstored answers them in order, so they cost one round
        trip instead of one each. Any other error is raised once every request was answered."""

        async def one(path: str) -> bytes | None:
            try:
                return await self.read(path)
            except XenstoreNotFound:
                return None

        values: list[bytes | None] = []
        for result in await asyncio.gather(*(one(p) for p in paths), return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
            values.append(result)
        return values

    async def write(self, path: str, value: bytes | str) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        reply = await self._call(XsType.WRITE, _path_bytes(path) + b"\0" + data, tx_id=self._tx_id, path=path)
        _expect_ok(reply, "WRITE")

    async def mkdir(self, path: str) -> None:
        _expect_ok(await self._call(XsType.MKDIR, _path_bytes(path) + b"\0", tx_id=self._tx_id, path=path), "MKDIR")

    async def rm(self, path: str) -> None:
        _expect_ok(await self._call(XsType.RM, _path_bytes(path) + b"\0", tx_id=self._tx_id, path=path), "RM")

    async def directory(self, path: str) -> list[str]:
        """Children names of ``path``; falls back to DIRECTORY_PART for listings above one message."""
        try:
            reply = await self._call(XsType.DIRECTORY, _path_bytes(path) + b"\0", tx_id=self._tx_id, path=path)
        except XenstoreError as exc:
            if exc.errno != errno_mod.E2BIG:
                raise
            return await self._directory_part(path)
        names = split_strings(reply, what="directory reply")
        if any(not n or "/" in n for n in names):
            raise XenstoreProtocolError("bad child name in directory reply", op="DIRECTORY", path=path)
        return names

    async def _directory_part(self, path: str) -> list[str]:
        for _restart in range(TRANSACTION_MAX_ATTEMPTS):
            names: list[str] = []
            gen: str | None = None
            offset = 0
            while True:
                payload = _path_bytes(path) + b"\0" + str(offset).encode() + b"\0"
                reply = await self._call(XsType.DIRECTORY_PART, payload, tx_id=self._tx_id, path=path)
                parts = split_strings(reply, what="directory part")
                if not parts or not parts[0].isdigit():
                    raise XenstoreProtocolError("bad DIRECTORY_PART generation", path=path)
                if gen is None:
                    gen = parts[0]
                elif gen != parts[0]:
                    break  # node changed between parts: start over
                chunk = parts[1:]
                done = bool(chunk) and chunk[-1] == ""
                chunk = [c for c in chunk if c]
                if any("/" in c for c in chunk):
                    raise XenstoreProtocolError("bad child name in DIRECTORY_PART", path=path)
                names += chunk
                if done:
                    return names
                if not chunk:
                    raise XenstoreProtocolError("DIRECTORY_PART made no progress", path=path)
                offset += sum(len(c.encode()) + 1 for c in chunk)
        raise XenstoreConflict(errno_mod.EAGAIN, "directory kept changing", op="DIRECTORY_PART", path=path)

    async def get_perms(self, path: str) -> list[XsPerm]:
        reply = await self._call(XsType.GET_PERMS, _path_bytes(path) + b"\0", tx_id=self._tx_id, path=path)
        try:
            perms = [XsPerm.parse(p) for p in split_strings(reply, what="perms")]
        except ValueError as exc:
            raise XenstoreProtocolError(str(exc), op="GET_PERMS", path=path) from None
        if not perms:
            raise XenstoreProtocolError("empty permission list", op="GET_PERMS", path=path)
        return perms

    async def set_perms(self, path: str, perms: Iterable[XsPerm]) -> None:
        items = list(perms)
        if not items:
            raise ValueError("a node needs at least its owner entry")
        payload = _path_bytes(path) + b"\0" + b"".join(str(p).encode() + b"\0" for p in items)
        _expect_ok(await self._call(XsType.SET_PERMS, payload, tx_id=self._tx_id, path=path), "SET_PERMS")

    async def exists(self, path: str) -> bool:
        try:
            await self.read(path)
        except XenstoreNotFound:
            return False
        return True


class XsTransaction(_Ops):
    """A transaction: the same operations, all tagged with ``tx_id``; end with commit() or abort()."""

    def __init__(self, client: XenstoreClient, tx_id: int) -> None:
        self._client = client
        self._tx_id = tx_id
        self.ended = False

    @property
    def tx_id(self) -> int:
        return self._tx_id

    async def _call(self, type_: XsType, payload: bytes, *, tx_id: int, path: str = "") -> bytes:
        if self.ended:
            raise XenstoreError(errno_mod.EINVAL, "transaction already ended", op=type_.name, path=path)
        return await self._client._call(type_, payload, tx_id=tx_id, path=path)

    async def _end(self, commit: bool) -> None:
        if self.ended:
            raise XenstoreError(errno_mod.EINVAL, "transaction already ended", op="TRANSACTION_END")
        self.ended = True
        flag = b"T\0" if commit else b"F\0"
        _expect_ok(await self._client._call(XsType.TRANSACTION_END, flag, tx_id=self._tx_id), "TRANSACTION_END")

    async def commit(self) -> None:
        """XenstoreConflict (EAGAIN) if another writer touched what this transaction used."""
        await self._end(True)

    async def write_if_present(self, directory: str, key: str, value: bytes | str) -> bool:
        """Write ``directory/key`` if ``directory`` exists, else abort the transaction and return
        False. A plain write would create the directory again (WRITE creates missing parents:
        Xen's docs/misc/xenstore.txt). The presence read and the write go out together (one
        round trip): in a directory that is gone the write re-created it, but only inside this
        transaction, which is then aborted."""
        found, wrote = await asyncio.gather(self.read(directory), self.write(f"{directory}/{key}", value),
                                            return_exceptions=True)
        if isinstance(found, XenstoreNotFound):
            await self.abort()
            return False
        for outcome in (found, wrote):
            if isinstance(outcome, BaseException):
                raise outcome
        return True

    async def abort(self) -> None:
        await self._end(False)


class XsWatch:
    """Events of one registered watch, as an async iterator or with :meth:`get` (which has a timeout)."""

    def __init__(self, client: XenstoreClient, path: str, token: str) -> None:
        self._client = client
        self.path = path
        self.token = token
        self._events: deque[XsWatchEvent] = deque()
        self._wakeup = asyncio.Event()
        self.overflowed = False
        self.closed: XenstoreError | None = None

    def _deliver(self, ev: XsWatchEvent) -> None:
        if len(self._events) >= WATCH_QUEUE_MAX:
            self._events.popleft()
            if not self.overflowed:
                logger.warning("xenstore watch %s (%s): event queue full, dropping", self.path, self.token)
            self.overflowed = True
        self._events.append(ev)
        self._wakeup.set()

    def _close(self, exc: XenstoreError) -> None:
        self.closed = exc
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._events)

    async def get(self, timeout: float | None = None) -> XsWatchEvent:
        """The next event; XenstoreTimeout after ``timeout`` s; XenstoreDisconnected once closed."""
        try:
            async with asyncio.timeout(timeout):
                while not self._events:
                    if self.closed is not None:
                        raise self.closed
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError:
            raise XenstoreTimeout(f"no watch event within {timeout} s", op="WATCH", path=self.path) from None
        return self._events.popleft()

    def __aiter__(self) -> XsWatch:
        return self

    async def __anext__(self) -> XsWatchEvent:
        return await self.get()

    async def unwatch(self) -> None:
        await self._client.unwatch(self)

    async def __aenter__(self) -> XsWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.closed is None:
            await self.unwatch()


async def connect_stream(sock: socket.socket, path: str) -> None:
    """connect() the non-blocking AF_UNIX stream socket ``sock`` to ``path`` (bound it with a
    timeout), waiting out a full listen backlog. xenstored listens with a backlog of 1; while it
    is busy, Linux fails a non-blocking connect with EAGAIN and leaves the socket unconnected,
    and ``loop.sock_connect`` (asyncio's and uvloop's) reports that as connected, as the socket
    polls writable: the first request then failed with ENOTCONN ("cannot resolve --domain ...:
    write failed: Transport endpoint is not connected", an instance on a loaded dom0,
    tests/xenlab/README.md). The adapters import nothing of vhost_user, whose transport does the
    same for back-end sockets (``connect_unix_stream``)."""
    delay = 0.001
    while True:
        try:
            return sock.connect(path)  # at once, or refused: a Unix connect never runs in the background
        except BlockingIOError:  # EAGAIN: the backlog is full; no event says when it has room
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


class XenstoreClient(_Ops):
    """An asyncio xenstore connection over one stream fd (Unix socket or /dev/xen/xenbus).

    Requests may be issued concurrently from several tasks; replies are matched by req_id. Each
    request fails with XenstoreTimeout after ``timeout`` seconds; once the connection closes (EOF,
    error, protocol violation or :meth:`close`) every pending and later request fails with
    XenstoreDisconnected (or the protocol error that broke it).
    """

    def __init__(self, fd: int | socket.socket, *, timeout: float = DEFAULT_TIMEOUT, name: str = "xenstore") -> None:
        """Take ownership of ``fd`` (a socket object or a raw fd) and start reading."""
        self._sock = fd if isinstance(fd, socket.socket) else None
        self._fd = fd.fileno() if isinstance(fd, socket.socket) else fd
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.name = name
        self._proto = XsClientProtocol()
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._watches: dict[str, XsWatch] = {}
        self._tokens = itertools.count(1)
        # One entry per message: each write() carries at most one message, because the Linux
        # xenbus device processes only the first message of a write and drops the rest
        # (xenbus_dev_frontend.c xenbus_file_write); a partial write is fine, it buffers those.
        self._out: deque[bytes] = deque()
        self._writing = False
        self._closed: XenstoreError | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    async def connect_unix(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> XenstoreClient:
        """Connect to xenstored's Unix socket (privileged dom0 connection)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await connect_stream(sock, path)
        except TimeoutError:
            sock.close()
            raise XenstoreTimeout(f"connect to {path} timed out (its listen backlog stayed full)") from None
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout=timeout, name=path)

    @classmethod
    async def open(
        cls,
        socket_paths: Iterable[str] | None = None,
        device_paths: Iterable[str] = XENBUS_DEVICE_PATHS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        opener: Callable[[str, int], int] = os.open,
    ) -> XenstoreClient:
        """libxenstore's order: $XENSTORED_PATH / the xenstored socket, then the xenbus device.

        ``opener`` opens the device (the daemon passes its kernel object's ``open`` here so the
        simulated host can answer).
        """
        if socket_paths is None:
            env = os.environ.get("XENSTORED_PATH")
            socket_paths = (env,) if env else DEFAULT_SOCKET_PATHS
        errors: list[str] = []
        for path in socket_paths:
            try:
                return await cls.connect_unix(path, timeout=timeout)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
        for path in device_paths:
            try:
                fd = opener(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
                continue
            return cls(fd, timeout=timeout, name=path)
        raise XenstoreDisconnected("no xenstore reachable: " + "; ".join(errors))

    # ---- transport -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._shutdown(XenstoreDisconnected(f"read failed: {exc.strerror}"))
            return
        if not data:
            self._shutdown(XenstoreDisconnected())
            return
        try:
            events = self._proto.receive_data(data)
        except XenstoreProtocolError as exc:
            logger.error("%s: protocol violation, closing: %s", self.name, exc)
            self._shutdown(exc)
            return
        for ev in events:
            if isinstance(ev, XsWatchEvent):
                watch = self._watches.get(ev.token)
                if watch is None:
                    logger.debug("%s: event for unknown watch token %r dropped", self.name, ev.token)
                else:
                    watch._deliver(ev)
                continue
            fut = self._waiters.pop(ev.req_id, None)
            if fut is None or fut.done():
                continue
            if ev.error is not None:
                fut.set_exception(ev.error)
            else:
                fut.set_result(ev.payload)

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._flush()

    def _flush(self) -> None:
        while self._out:
            head = self._out[0]
            try:
                n = os.write(self._fd, head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._shutdown(XenstoreDisconnected(f"write failed: {exc.strerror}"))
                return
            if n < len(head):
                self._out[0] = head[n:]
            else:
                self._out.popleft()
        if self._out and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _shutdown(self, exc: XenstoreError) -> None:
        if self._closed is not None:
            return
        self._closed = exc
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        for watch in self._watches.values():
            watch._close(exc)

    async def close(self) -> None:
        self._shutdown(XenstoreDisconnected("closed by caller"))

    async def __aenter__(self) -> XenstoreClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, type_: XsType, payload: bytes, *, tx_id: int, path: str = "") -> bytes:
        if self._closed is not None:
            raise self._closed
        req_id, data = self._proto.request(type_, payload, tx_id)
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._waiters[req_id] = fut
        self._send(data)
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            raise XenstoreTimeout(f"no reply within {self.timeout} s", op=type_.name, path=path) from None
        except XenstoreError as exc:
            if not exc.op and not isinstance(exc, XenstoreDisconnected):
                exc.op, exc.path = type_.name, path
            raise
        finally:
            if self._waiters.pop(req_id, None) is not None:
                self._proto.abandon(req_id)

    # ---- watches, transactions, domains --------------------------------------------------------

    async def watch(self, path: str, token: str | None = None) -> XsWatch:
        """Register a watch on ``path`` (and its descendants). xenstored fires it once at once."""
        if token is None:
            token = f"xvm-{next(self._tokens)}"
        if token in self._watches:
            raise ValueError(f"watch token {token!r} already in use on this connection")
        tok = token.encode("utf-8")
        if b"\0" in tok:
            raise ValueError("NUL in watch token")
        watch = XsWatch(self, path, token)
        self._watches[token] = watch  # before sending: the first event may precede the ack
        registered = False
        try:
            reply = await self._call(XsType.WATCH, _path_bytes(path) + b"\0" + tok + b"\0", tx_id=0, path=path)
            _expect_ok(reply, "WATCH")
            registered = True
        finally:
            if not registered:  # refused, lost or cancelled: no events will come for it
                self._watches.pop(token, None)
        return watch

    async def unwatch(self, watch: XsWatch) -> None:
        self._watches.pop(watch.token, None)
        watch._close(XenstoreDisconnected("watch removed"))
        payload = _path_bytes(watch.path) + b"\0" + watch.token.encode() + b"\0"
        _expect_ok(await self._call(XsType.UNWATCH, payload, tx_id=0, path=watch.path), "UNWATCH")

    async def transaction_start(self) -> XsTransaction:
        reply = await self._call(XsType.TRANSACTION_START, b"\0", tx_id=0)
        text = one_string(reply, what="transaction id")
        if not text.isdigit() or not 0 < int(text) <= 0xFFFFFFFF:
            raise XenstoreProtocolError(f"bad transaction id {text!r}", op="TRANSACTION_START")
        return XsTransaction(self, int(text))

    async def transaction(
        self, body: Callable[[XsTransaction], Awaitable[_T]], *, attempts: int = TRANSACTION_MAX_ATTEMPTS
    ) -> _T:
        """Run ``body(tx)`` in a transaction and commit; on EAGAIN rerun it (up to ``attempts`` times).

        If ``body`` raises, the transaction is aborted and the exception propagates; a ``body``
        that ended the transaction itself (e.g. :meth:`XsTransaction.write_if_present` aborting
        it) is not committed again.
        """
        for attempt in range(attempts):
            tx = await self.transaction_start()
            done = False
            try:
                result = await body(tx)
                done = True
            finally:
                if not done and not tx.ended:  # body raised or was cancelled: abort, then propagate
                    self._abort_nowait(tx)
            if tx.ended:
                return result
            try:
                await tx.commit()
            except XenstoreConflict:
                logger.debug("%s: transaction %d conflicted (attempt %d)", self.name, tx.tx_id, attempt + 1)
                continue
            return result
        raise XenstoreConflict(errno_mod.EAGAIN, f"transaction still conflicting after {attempts} attempts")

    def _abort_nowait(self, tx: XsTransaction) -> None:
        """End a transaction without waiting (the caller may be cancelled); the reply is discarded."""
        tx.ended = True
        if self._closed is not None:
            return
        req_id, data = self._proto.request(XsType.TRANSACTION_END, b"F\0", tx.tx_id)
        self._proto.abandon(req_id)
        self._send(data)

    async def get_domain_path(self, domid: int) -> str:
        reply = await self._call(XsType.GET_DOMAIN_PATH, f"{domid}\0".encode(), tx_id=0)
        return one_string(reply, what="domain path")

    async def introduce(self, domid: int, mfn: int, port: int) -> None:
        payload = f"{domid}\0{mfn}\0{port}\0".encode()
        _expect_ok(await self._call(XsType.INTRODUCE, payload, tx_id=0), "INTRODUCE")

    async def release(self, domid: int) -> None:
        _expect_ok(await self._call(XsType.RELEASE, f"{domid}\0".encode(), tx_id=0), "RELEASE")

    async def is_domain_introduced(self, domid: int) -> bool:
        reply = one_string(await self._call(XsType.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode(), tx_id=0), what="bool")
        if reply not in ("T", "F"):
            raise XenstoreProtocolError(f"IS_DOMAIN_INTRODUCED answered {reply!r}")
        return reply == "T"
