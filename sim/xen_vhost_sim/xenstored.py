"""A simulated xenstored: the xs_wire protocol over Unix sockets, backed by ``sim.xenstore_tree``.

* :meth:`SimXenstored.serve_unix` listens like ``/run/xenstored/socket`` (connections there are dom0,
  privileged, as with the real daemon's socket).
* :meth:`SimXenstored.connection_socket` hands out an already-connected socket for a given domid —
  what the simulated kernel returns when a process opens ``/dev/xen/xenbus`` (dom0) or what a
  simulated guest's xenbus ring would carry (domU).
* An in-process API (:meth:`read`, :meth:`write`, :meth:`rm`, :meth:`set_perms`, …, each "as" a
  domid) for the simulated toolstack and tests; its writes fire watches like wire writes do.

Every connection is a non-blocking socket driven by ``loop.add_reader`` (asyncio and uvloop).
Bad input from a client gets the errno xenstored would send (EINVAL for malformed payloads, EACCES,
ENOENT, …); a frame longer than XENSTORE_PAYLOAD_MAX closes that connection, as xenstored does.
All methods must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xen_vhost_sim.xenstore_tree import (
    Change,
    NodeAccess,
    Store,
    Transaction,
    XenstoreQuota,
    domain_path,
    watch_event_path,
)
from xen_vhost_sim.xenstore_tree import access_for as _access_for
from xen_vhost_master.xen.xenstore_wire import (
    XENSTORE_PAYLOAD_MAX,
    XSD_ERRORS,
    XenstoreError,
    XenstoreProtocolError,
    XsFramer,
    XsMessage,
    XsPerm,
    XsType,
    encode_message,
)

__all__ = ["SimXenstored", "XenstoreQuota", "XsSeen"]

logger = logging.getLogger(__name__)

_ERRNO_NAMES = {num: name for name, num in XSD_ERRORS.items()}
_OK = b"OK\0"
# Bytes a connection may have queued for sending before it is dropped (a client that never reads).
_MAX_OUTPUT = 4 * 1024 * 1024
# Entries kept in SimXenstored.seen (the oldest are dropped): enough for a test's window of a
# few hundred, bounded for a long-running ``xen-vhost-sim`` process.
SEEN_MAX = 4096


def _error_name(err: int | None) -> str:
    return _ERRNO_NAMES.get(err or errno.EIO, "EIO")


@dataclass(frozen=True)
class XsSeen:
    """One request as xenstored took it off a connection, or one node the host's in-process API
    changed (``conn`` 0: the simulated toolstack's writes, as a WRITE of the node's new value, or an
    RM); sim-only, what a test counts."""

    conn: int  # the connection's serial number, from 1 in the order they were opened; 0: the host
    domid: int
    type: int  # an XsType (or whatever number the client sent)
    tx_id: int
    path: str  # the first argument ("" if there is none; undecodable bytes replaced)
    value: bytes = b""  # a WRITE's value


@dataclass(frozen=True)
class _Watch:
    path: str  # as the client gave it (relative or absolute or @special)
    token: str
    abs_path: str


class _Conn:
    """One client connection (a socket) and its watches and open transactions."""

    def __init__(self, server: SimXenstored, sock: socket.socket, domid: int) -> None:
        self.server = server
        self.sock = sock
        self.domid = domid
        self.serial = next(server._serials)
        self.framer = XsFramer()
        self.out = bytearray()
        self.writing = False
        self.closed = False
        self.watches: list[_Watch] = []
        self.transactions: dict[int, Transaction] = {}
        sock.setblocking(False)
        server.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.debug("xenstored: dom%d connection read error: %s", self.domid, exc)
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            messages = self.framer.feed(data)
        except XenstoreProtocolError as exc:
            logger.warning("xenstored: dom%d sent a bad frame, dropping connection: %s", self.domid, exc)
            self.close()
            return
        for msg in messages:
            if self.closed:
                return
            self.server._handle(self, msg)

    def send(self, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if self.closed:
            return
        self.out += encode_message(type_, req_id, tx_id, payload)
        if len(self.out) > _MAX_OUTPUT:
            logger.warning("xenstored: dom%d does not read its replies, dropping connection", self.domid)
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self.out[:n]
        loop = self.server.loop
        if self.out and not self.writing:
            loop.add_writer(self.sock.fileno(), self._flush)
            self.writing = True
        elif not self.out and self.writing:
            loop.remove_writer(self.sock.fileno())
            self.writing = False

    def fire(self, change: Change) -> None:
        for w in self.watches:
            hit = watch_event_path(w.abs_path, change)
            if hit is None:
                continue
            path, perms = hit
            current = self.server.store.nodes.get(path)
            if current is not None and not change.recursive:
                perms = current.perms  # as xenstored: checked against the node at delivery time
            if not _access_for(self.domid, perms, self.server.store.is_privileged(self.domid))[0]:
                continue
            self.send_event(w, path)

    def send_event(self, w: _Watch, abs_path: str) -> None:
        path = abs_path
        if w.path != w.abs_path and not abs_path.startswith("@"):
            prefix = domain_path(self.domid) + "/"
            path = abs_path[len(prefix) :] if abs_path.startswith(prefix) else abs_path
        self.send(XsType.WATCH_EVENT, 0, 0, path.encode() + b"\0" + w.token.encode() + b"\0")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        loop.remove_reader(self.sock.fileno())
        if self.writing:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.watches.clear()
        self.transactions.clear()
        self.server._conns.discard(self)


def _args(payload: bytes, n: int, *, rest: bool = False) -> list[str]:
    """``n`` NUL-terminated strings (plus, with ``rest``, any further ones); EINVAL otherwise."""
    if not payload or payload[-1] != 0:
        raise XenstoreError(errno.EINVAL, "arguments not NUL-terminated")
    try:
        parts = payload[:-1].decode("utf-8").split("\0")
    except UnicodeDecodeError:
        raise XenstoreError(errno.EINVAL, "arguments not UTF-8") from None
    if len(parts) < n or (not rest and len(parts) != n):
        raise XenstoreError(errno.EINVAL, f"expected {n} argument(s), got {len(parts)}")
    return parts


def _domid_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise XenstoreError(errno.EINVAL, f"bad domid {text!r}")
    return int(text)


class SimXenstored:
    """The simulated xenstore daemon (see module docstring)."""

    def __init__(self, quota: XenstoreQuota | None = None, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.store = Store(quota)
        self._loop = loop
        self._conns: set[_Conn] = set()
        self._listeners: list[tuple[socket.socket, str]] = []
        self._tx_ids = itertools.count(1)
        self._serials = itertools.count(1)
        #: every request taken and every node the in-process API changed, oldest first (at most
        #: SEEN_MAX): appended on the host's thread, read by tests from theirs (a deque's append
        #: and copy are each atomic)
        self.seen: deque[XsSeen] = deque(maxlen=SEEN_MAX)
        self._handlers: dict[int, Callable[[_Conn, XsMessage], bytes | None]] = {
            XsType.READ: self._do_read,
            XsType.WRITE: self._do_write,
            XsType.MKDIR: self._do_mkdir,
            XsType.RM: self._do_rm,
            XsType.DIRECTORY: self._do_directory,
            XsType.DIRECTORY_PART: self._do_directory_part,
            XsType.GET_PERMS: self._do_get_perms,
            XsType.SET_PERMS: self._do_set_perms,
            XsType.WATCH: self._do_watch,
            XsType.UNWATCH: self._do_unwatch,
            XsType.RESET_WATCHES: self._do_reset_watches,
            XsType.TRANSACTION_START: self._do_transaction_start,
            XsType.TRANSACTION_END: self._do_transaction_end,
            XsType.GET_DOMAIN_PATH: self._do_get_domain_path,
            XsType.INTRODUCE: self._do_introduce,
            XsType.RELEASE: self._do_release,
            XsType.IS_DOMAIN_INTRODUCED: self._do_is_introduced,
        }

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # ---- serving -------------------------------------------------------------------------------

    async def serve_unix(self, path: str) -> None:
        """Listen on ``path`` (removed again by :meth:`close`); connections are privileged dom0."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Xen's xenstoreds listen with a backlog of 1 (tools/xenstored/posix.c, oxenstored's
            # utils.ml): a busy one makes a non-blocking connect fail with EAGAIN.
            sock.listen(1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listeners.append((sock, path))
        self.loop.add_reader(sock.fileno(), self._on_accept, sock)

    def _on_accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("xenstored: accept failed: %s", exc)
            return
        self._conns.add(_Conn(self, sock, 0))

    def connection_socket(self, domid: int = 0) -> socket.socket:
        """A connected socket whose peer is a new connection of domain ``domid``; caller owns it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        served = False
        try:
            self._conns.add(_Conn(self, ours, domid))
            served = True
        finally:
            if not served:
                ours.close()
                theirs.close()
        return theirs

    def connect_fd(self, domid: int = 0) -> int:
        """Like :meth:`connection_socket` but a raw fd (what the simulated kernel hands out for
        ``/dev/xen/xenbus``); the caller owns and closes it."""
        return self.connection_socket(domid).detach()

    def connections(self, domid: int | None = None) -> int:
        """How many client connections are open (of ``domid``, or all)."""
        return sum(1 for c in self._conns if domid is None or c.domid == domid)

    async def close(self) -> None:
        for sock, path in self._listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._listeners.clear()
        for conn in list(self._conns):
            conn.close()

    async def __aenter__(self) -> SimXenstored:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- dispatch ------------------------------------------------------------------------------

    def _handle(self, conn: _Conn, msg: XsMessage) -> None:
        path, _, rest = msg.payload.partition(b"\0")
        self.seen.append(XsSeen(conn.serial, conn.domid, msg.type, msg.tx_id, path.decode("utf-8", "replace"),
                                rest if msg.type == XsType.WRITE else b""))
        handler = self._handlers.get(msg.type)
        try:
            if handler is None:
                raise XenstoreError(errno.EINVAL if msg.type not in XsType._value2member_map_ else errno.ENOSYS)
            reply = handler(conn, msg)
        except XenstoreError as exc:
            logger.debug("xenstored: dom%d type %d -> %s", conn.domid, msg.type, exc)
            conn.send(XsType.ERROR, msg.req_id, msg.tx_id, _error_name(exc.errno).encode() + b"\0")
            return
        if reply is not None:  # None: the handler replied itself
            conn.send(msg.type, msg.req_id, msg.tx_id, reply)

    def _fire(self, changes: Iterable[Change]) -> None:
        for change in changes:
            for conn in list(self._conns):
                conn.fire(change)

    def _tx(self, conn: _Conn, msg: XsMessage) -> Transaction | None:
        if msg.tx_id == 0:
            return None
        tx = conn.transactions.get(msg.tx_id)
        if tx is None:
            raise XenstoreError(errno.ENOENT, f"no transaction {msg.tx_id}")
        return tx

    def _privileged(self, conn: _Conn) -> None:
        if not self.store.is_privileged(conn.domid):
            raise XenstoreError(errno.EACCES, "privileged operation")

    def _mutate(self, conn: _Conn, msg: XsMessage, op: Callable[..., None], *args: object) -> bytes:
        tx = self._tx(conn, msg)
        acc = self.store.access(conn.domid, tx)
        op(acc, *args)
        if tx is None:
            self._fire(acc.changes)
        return _OK

    def _do_read(self, conn: _Conn, msg: XsMessage) -> bytes:
        (path,) = _args(msg.payload, 1)
        return self.store.access(conn.domid, self._tx(conn, msg)).read(path)

    def _do_write(self, conn: _Conn, msg: XsMessage) -> bytes:
        nul = msg.payload.find(b"\0")
        if nul <= 0:
            raise XenstoreError(errno.EINVAL, "WRITE without path")
        try:
            path = msg.payload[:nul].decode("utf-8")
        except UnicodeDecodeError:
            raise XenstoreError(errno.EINVAL, "path not UTF-8") from None
        return self._mutate(conn, msg, NodeAccess.write, path, msg.payload[nul + 1 :])

    def _do_mkdir(self, conn: _Conn, msg: XsMessage) -> bytes:
        (path,) = _args(msg.payload, 1)
        return self._mutate(conn, msg, NodeAccess.mkdir, path)

    def _do_rm(self, conn: _Conn, msg: XsMessage) -> bytes:
        (path,) = _args(msg.payload, 1)
        return self._mutate(conn, msg, NodeAccess.rm, path)

    def _do_set_perms(self, conn: _Conn, msg: XsMessage) -> bytes:
        path, *texts = _args(msg.payload, 2, rest=True)
        try:
            perms = [XsPerm.parse(t) for t in texts]
        except ValueError as exc:
            raise XenstoreError(errno.EINVAL, str(exc)) from None
        if path.startswith("@"):
            self._privileged(conn)
            if path not in self.store.special_perms:
                raise XenstoreError(errno.ENOENT, path=path)
            self.store.special_perms[path] = tuple(perms)
            return _OK
        return self._mutate(conn, msg, NodeAccess.set_perms, path, perms)

    def _do_directory(self, conn: _Conn, msg: XsMessage) -> bytes:
        (path,) = _args(msg.payload, 1)
        names = self.store.access(conn.domid, self._tx(conn, msg)).directory(path)
        reply = b"".join(n.encode() + b"\0" for n in names)
        if len(reply) > XENSTORE_PAYLOAD_MAX:
            raise XenstoreError(errno.E2BIG, "directory listing exceeds one message")
        return reply

    def _do_directory_part(self, conn: _Conn, msg: XsMessage) -> bytes:
        path, off_text = _args(msg.payload, 2)
        if not off_text.isdigit():
            raise XenstoreError(errno.EINVAL, "bad offset")
        gen, names = self.store.access(conn.domid, self._tx(conn, msg)).directory_generation(path)
        blob = b"".join(n.encode() + b"\0" for n in names)
        offset = int(off_text)
        if offset > len(blob):
            raise XenstoreError(errno.EINVAL, "offset beyond the child list")
        head = str(gen).encode() + b"\0"
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        chunk = blob[offset:]
        if len(chunk) <= room:
            return head + chunk + b"\0"  # last part: terminated by an empty name
        cut = chunk.rfind(b"\0", 0, room) + 1
        return head + chunk[:cut]

    def _do_get_perms(self, conn: _Conn, msg: XsMessage) -> bytes:
        (path,) = _args(msg.payload, 1)
        if path.startswith("@"):
            perms = self.store.special_perms.get(path)
            if perms is None:
                raise XenstoreError(errno.ENOENT, path=path)
        else:
            perms = tuple(self.store.access(conn.domid, self._tx(conn, msg)).get_perms(path))
        return b"".join(str(p).encode() + b"\0" for p in perms)

    def _do_watch(self, conn: _Conn, msg: XsMessage) -> bytes | None:
        path, token = _args(msg.payload, 2, rest=True)[:2]
        if path.startswith("@"):
            abs_path = path
        else:
            abs_path = self.store.access(conn.domid).canonical(path)
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XenstoreError(errno.EEXIST, "watch already registered", path=path)
        if not self.store.is_privileged(conn.domid):
            count = sum(len(c.watches) for c in self._conns if c.domid == conn.domid)
            if count >= self.store.quota.max_watches_per_domain:
                raise XenstoreError(errno.E2BIG, "watch quota exceeded", path=path)
        watch = _Watch(path, token, abs_path)
        conn.watches.append(watch)
        # Real xenstored acks first, then fires the watch once (do_watch: send_ack; fire_watch).
        conn.send(XsType.WATCH, msg.req_id, msg.tx_id, _OK)
        conn.send_event(watch, abs_path)
        return None

    def _do_unwatch(self, conn: _Conn, msg: XsMessage) -> bytes:
        path, token = _args(msg.payload, 2)
        for w in conn.watches:
            if w.path == path and w.token == token:
                conn.watches.remove(w)
                return _OK
        raise XenstoreError(errno.ENOENT, "no such watch", path=path)

    def _do_reset_watches(self, conn: _Conn, msg: XsMessage) -> bytes:
        conn.watches.clear()
        return _OK

    def _do_transaction_start(self, conn: _Conn, msg: XsMessage) -> bytes:
        if msg.tx_id != 0:
            raise XenstoreError(errno.EBUSY, "nested transaction")
        _args(msg.payload, 1)
        if (
            not self.store.is_privileged(conn.domid)
            and len(conn.transactions) >= self.store.quota.max_transactions_per_connection
        ):
            raise XenstoreError(errno.ENOSPC, "transaction quota exceeded")
        tx_id = next(self._tx_ids)
        conn.transactions[tx_id] = self.store.begin(tx_id, conn.domid)
        return f"{tx_id}\0".encode()

    def _do_transaction_end(self, conn: _Conn, msg: XsMessage) -> bytes:
        (flag,) = _args(msg.payload, 1)
        if flag not in ("T", "F"):
            raise XenstoreError(errno.EINVAL, "TRANSACTION_END wants T or F")
        tx = conn.transactions.pop(msg.tx_id, None)
        if tx is None:
            raise XenstoreError(errno.ENOENT, f"no transaction {msg.tx_id}")
        if flag == "T":
            self._fire(self.store.commit(tx))
        return _OK

    def _do_get_domain_path(self, conn: _Conn, msg: XsMessage) -> bytes:
        (text,) = _args(msg.payload, 1)
        return domain_path(_domid_arg(text)).encode() + b"\0"

    def _do_introduce(self, conn: _Conn, msg: XsMessage) -> bytes:
        self._privileged(conn)
        domid_text, mfn, port = _args(msg.payload, 3)
        if not (mfn.isdigit() and port.isdigit()):
            raise XenstoreError(errno.EINVAL, "INTRODUCE wants domid, mfn, port")
        self.introduce_domain(_domid_arg(domid_text))
        return _OK

    def _do_release(self, conn: _Conn, msg: XsMessage) -> bytes:
        self._privileged(conn)
        (text,) = _args(msg.payload, 1)
        domid = _domid_arg(text)
        if domid == 0:
            raise XenstoreError(errno.EINVAL, "cannot release dom0")
        self.release_domain(domid)
        return _OK

    def _do_is_introduced(self, conn: _Conn, msg: XsMessage) -> bytes:
        (text,) = _args(msg.payload, 1)
        return b"T\0" if _domid_arg(text) in self.store.introduced else b"F\0"

    # ---- in-process API (the simulated toolstack / hypervisor side) ---------------------------

    def read(self, path: str, *, domid: int = 0) -> bytes:
        return self.store.access(domid).read(path)

    def directory(self, path: str, *, domid: int = 0) -> list[str]:
        return self.store.access(domid).directory(path)

    def get_perms(self, path: str, *, domid: int = 0) -> list[XsPerm]:
        return self.store.access(domid).get_perms(path)

    def exists(self, path: str) -> bool:
        return self.store.access(0).canonical(path) in self.store.nodes

    def write(self, path: str, value: bytes | str, *, domid: int = 0) -> None:
        acc = self.store.access(domid)
        acc.write(path, value.encode() if isinstance(value, str) else bytes(value))
        self._host_fire(acc.changes, domid)

    def mkdir(self, path: str, *, domid: int = 0) -> None:
        acc = self.store.access(domid)
        acc.mkdir(path)
        self._host_fire(acc.changes, domid)

    def rm(self, path: str, *, domid: int = 0) -> None:
        acc = self.store.access(domid)
        acc.rm(path)
        self._host_fire(acc.changes, domid)

    def set_perms(self, path: str, perms: Iterable[XsPerm], *, domid: int = 0) -> None:
        acc = self.store.access(domid)
        acc.set_perms(path, list(perms))
        self._host_fire(acc.changes, domid)

    def atomically(self, body: Callable[[NodeAccess], None], *, domid: int = 0) -> None:
        """Run ``body`` against a transaction as ``domid`` and commit it: watches fire once, after."""
        tx = self.store.begin(0, domid)
        body(self.store.access(domid, tx))
        self._host_fire(self.store.commit(tx), domid)

    def _host_fire(self, changes: Iterable[Change], domid: int) -> None:
        """The in-process API's changes: recorded in :attr:`seen` (``conn`` 0), then fired."""
        changes = list(changes)
        for change in changes:
            node = self.store.nodes.get(change.path)
            if change.recursive or node is None:
                self.seen.append(XsSeen(0, domid, XsType.RM, 0, change.path))
            else:
                self.seen.append(XsSeen(0, domid, XsType.WRITE, 0, change.path, node.value))
        self._fire(changes)

    def introduce_domain(self, domid: int) -> None:
        """The hypervisor side announces a domain: fires ``@introduceDomain``."""
        self._fire([self.store.introduce(domid)])

    def release_domain(self, domid: int) -> None:
        """The domain is gone: fires ``@releaseDomain`` and drops its connections."""
        change = self.store.release(domid)
        for conn in [c for c in self._conns if c.domid == domid]:
            conn.close()
        self._fire([change])

