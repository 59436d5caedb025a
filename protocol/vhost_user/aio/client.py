"""L2: :class:`AsyncFrontend` — the awaitable vhost-user front-end API the daemon calls.

One owner task, one request at a time (the protocol is sequential, so there is no lock and
no reordering). Every await on the back-end is bounded by a named timeout; a timeout or a
protocol/transport error breaks the connection for good (sticky), and every later call fails
at once with the original cause (rust-vmm ``FrontendInternal.error``).

A slow back-end is told from a dead one: a reply later than ``slow_after`` gets one warning line
and is still waited for, up to ``timeout``; a peer that closes or resets its socket fails the
request in flight as soon as the socket says so.

It owns no guest memory: callers hand it fds and addresses. Fds passed in stay the caller's;
fds returned (GET_INFLIGHT_FD) become the caller's. Every other fd the back-end sends is
closed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import (
    BackendFailed,
    ChannelFlood,
    Disconnected,
    LocalProtocolError,
    PartialMessage,
    PeerTimeout,
    VhostUserError,
)
from ..events import Ack, Outgoing, Reply, RequestReceived
from ..frontend import BackendChannelResponder, FrontendConnection
from ..wire.enums import (
    STABLE_PROTOCOL_FEATURES,
    BackendRequest,
    FrontendRequest,
    ProtocolFeatures,
    VirtioFeatures,
)
from ..wire.payloads import MemoryRegion, XenMemoryRegion
from .transport import FdSocket, UnixListener, cancel_and_wait, close_fds, connect_unix

__all__ = [
    "AsyncFrontend",
    "Negotiated",
    "InflightFd",
    "BackendRequestHandler",
    "REQUEST_TIMEOUT",
    "SLOW_REPLY_AFTER",
    "MEM_TABLE_TIMEOUT",
    "DEFAULT_PROTOCOL_FEATURES",
    "BACKEND_REQUEST_BURST",
    "BACKEND_REQUEST_RATE",
    "BACKEND_EVENTS_MAX",
]

log = logging.getLogger("vhost_user.aio.client")

# How long the back-end may take to answer one request before the request fails (PeerTimeout) and
# the connection with it. Back-ends answer control messages at once (QEMU trace: < 1 ms), but on a
# loaded dom0 (the real-Xen lab under emulation runs at loads of 10 and more, tests/xenlab/README.md)
# a live back-end may take several seconds, and GET_VRING_BASE waits for the back-end to drain its I/O
# (libvhost-user, qemu-storage-daemon). A dead back-end is not waited for: its socket's EOF or
# ECONNRESET fails the request at once. A caller whose wait must stay short (a stop) lowers
# :attr:`AsyncFrontend.timeout`.
REQUEST_TIMEOUT = 60.0
# A reply later than this gets one warning line (the request, the peer, how long it is still
# waited for): a slow back-end is visible long before it is given up on.
SLOW_REPLY_AFTER = 5.0
# SET_MEM_TABLE / ADD_MEM_REG: the back-end maps the regions before it answers, which for a Xen
# back-end is a foreign mapping of every guest page: seconds for a large guest on a loaded host, and
# more than 30 s for 128 MiB under emulation (tests/xenlab under TCG beside two CPU hogs). QEMU waits
# for this reply without a bound; a front-end that gives up leaves the guest a device it cannot use.
# (At least this: a larger ``timeout`` applies to them too.)
MEM_TABLE_TIMEOUT = 120.0
# What a back-end may send on its request channel before it counts as flooding it (and is
# disconnected): a burst of BACKEND_REQUEST_BURST requests, then BACKEND_REQUEST_RATE a second. A
# back-end sends CONFIG_CHANGE_MSG on a resize or a link change, a few at a time; VRING_CALL/ERR
# come on the channel only with INBAND_NOTIFICATIONS, which DEFAULT_PROTOCOL_FEATURES leaves out
# (docs/interop/vhost-user.rst, "Back-end message types"). Both are constructor arguments.
BACKEND_REQUEST_BURST = 256
BACKEND_REQUEST_RATE = 64.0
# :attr:`AsyncFrontend.backend_events` keeps the newest this many events (a log for whoever reads
# it; nobody has to).
BACKEND_EVENTS_MAX = 64

P = ProtocolFeatures
#: What negotiate() asks for by default (intersected with what the back-end offers). XEN_MMAP
#: is left out on purpose: callers that hand out Xen mappings ask for it explicitly.
DEFAULT_PROTOCOL_FEATURES = (
    P.MQ
    | P.REPLY_ACK
    | P.BACKEND_REQ
    | P.CONFIG
    | P.BACKEND_SEND_FD
    | P.RESET_DEVICE
    | P.CONFIGURE_MEM_SLOTS
    | P.STATUS
    | P.INFLIGHT_SHMFD
)
del P

BackendRequestHandler = Callable[[RequestReceived], int | Awaitable[int]]


class _RequestBudget:
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` a second (``clock`` in s)."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float]) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.taken = 0

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self.taken += 1
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclasses.dataclass(frozen=True)
class Negotiated:
    """Result of :meth:`AsyncFrontend.negotiate`."""

    features: int  # GET_FEATURES: what the back-end offers (incl. bit 30 if it has it)
    protocol_features: ProtocolFeatures  # in force (our wish ∩ offered ∩ stable)
    backend_protocol_features: ProtocolFeatures  # what the back-end offered
    queue_num: int | None  # GET_QUEUE_NUM (None without MQ)
    max_mem_slots: int | None  # GET_MAX_MEM_SLOTS (None without CONFIGURE_MEM_SLOTS)
    backend_channel: bool  # SET_BACKEND_REQ_FD was sent


@dataclasses.dataclass(frozen=True)
class InflightFd:
    """GET_INFLIGHT_FD answer. ``fd`` is the caller's to close."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class AsyncFrontend:
    """Awaitable vhost-user front-end over one connected :class:`FdSocket`.

    Build it with :meth:`connect` (client mode: the back-end listens), :meth:`accept` (server
    mode: we listen, the back-end connects, e.g. dpdk-testpmd ``client=1``) or directly from
    an :class:`FdSocket` (e.g. a socketpair in tests). Use it as an async context manager or
    call :meth:`close`.

    ``timeout``: how long one reply may take (SET_MEM_TABLE and ADD_MEM_REG: MEM_TABLE_TIMEOUT at
    least); later, the request fails with :class:`PeerTimeout`. The attribute may be lowered at
    any time, e.g. before a stop that must stay bounded. ``slow_after``: a reply not there by then
    gets one warning line (none if ``timeout`` comes first). A peer that closes or resets the
    socket fails the request in flight at once (:class:`Disconnected`).

    ``on_lost(exc)`` is called once when the connection breaks (peer hangs up while idle, a
    protocol error, a timeout, a back-end flooding its request channel beyond ``backend_burst``
    requests at once or ``backend_rate`` a second: :class:`ChannelFlood`), so a supervisor can
    react without polling; the owner closes the connection.
    """

    def __init__(
        self,
        sock: FdSocket,
        *,
        timeout: float = REQUEST_TIMEOUT,
        slow_after: float = SLOW_REPLY_AFTER,
        ack_all: bool = True,
        on_lost: Callable[[VhostUserError], None] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        backend_burst: int = BACKEND_REQUEST_BURST,
        backend_rate: float = BACKEND_REQUEST_RATE,
    ) -> None:
        self.sock = sock
        self.conn = FrontendConnection(ack_all=ack_all)
        self.timeout = timeout
        self.slow_after = slow_after
        self.on_lost = on_lost
        self.log = logger or log
        self.error: VhostUserError | None = None
        self.lost = asyncio.Event()
        self.backend_events: asyncio.Queue[RequestReceived] = asyncio.Queue(BACKEND_EVENTS_MAX)
        self.backend_events_dropped = 0  # events pushed out of the full queue (oldest first)
        self.backend_burst = backend_burst
        self.backend_rate = backend_rate
        self._backend_sock: FdSocket | None = None
        self._backend_task: asyncio.Task[None] | None = None
        self._backend_handler: BackendRequestHandler | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._busy = False
        self._start_watch()

    # -- construction ------------------------------------------------------------------
    @classmethod
    async def connect(cls, path: str | os.PathLike[str], **kwargs: Any) -> AsyncFrontend:
        """Client mode: connect to a listening back-end (retries with backoff while it starts).

        Keyword arguments ``attempts``, ``backoff_initial``, ``backoff_max``, ``connect_timeout``
        go to :func:`connect_unix`; the rest to the constructor.
        """
        conn_kw: dict[str, Any] = {k: kwargs.pop(k) for k in ("attempts", "backoff_initial", "backoff_max") if k in kwargs}
        if "connect_timeout" in kwargs:
            conn_kw["timeout"] = kwargs.pop("connect_timeout")
        sock = await connect_unix(path, **conn_kw)
        return cls(sock, **kwargs)

    @classmethod
    async def accept(cls, listener: UnixListener, *, accept_timeout: float | None = None, **kwargs: Any) -> AsyncFrontend:
        """Server mode: wait for one back-end to connect to ``listener``."""
        sock = await (listener.accept() if accept_timeout is None else listener.accept(accept_timeout))
        return cls(sock, **kwargs)

    @classmethod
    def adopt(cls, sock: FdSocket, negotiated: Negotiated, *, backend_sock: FdSocket | None = None,
              backend_handler: BackendRequestHandler | None = None, **kwargs: Any) -> AsyncFrontend:
        """A connection negotiated by another front-end (this process's previous image, or its
        crashed predecessor through a file descriptor store) taken over as it is: ``negotiated``
        is what that front-end learnt and set, ``backend_sock`` its end of the back-end channel
        (served here with ``backend_handler``). Nothing is sent: the caller checks the connection
        (e.g. GET_FEATURES) and restarts the rings, as QEMU does on ``cont``."""
        fe = cls(sock, **kwargs)
        fe.conn.resume_negotiated(negotiated.features, negotiated.backend_protocol_features
                                  if negotiated.features & VirtioFeatures.PROTOCOL_FEATURES else None,
                                  negotiated.protocol_features)
        if backend_sock is not None:
            fe._backend_sock = backend_sock
            fe._backend_handler = backend_handler
            fe._backend_task = asyncio.get_running_loop().create_task(fe._serve_backend_channel())
        return fe

    def backend_channel_fileno(self) -> int | None:
        """Our end of the back-end channel (SET_BACKEND_REQ_FD), if there is one."""
        sock = self._backend_sock
        return None if sock is None or sock.closed else sock.fileno()

    async def __aenter__(self) -> AsyncFrontend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection state --------------------------------------------------------------
    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def features(self) -> int | None:
        """Features the back-end offered (GET_FEATURES), if known."""
        return self.conn.backend_features

    @property
    def protocol_features(self) -> ProtocolFeatures:
        """Protocol features in force."""
        return self.conn.protocol_features

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the back-end's process when it connected or accepted
        (:meth:`FdSocket.peer_credentials`): whom to trust is the caller's policy."""
        return self.sock.peer_credentials()

    def describe_peer(self) -> str:
        """The back-end for a log line: its pid (SO_PEERCRED) and the socket's path, as far as
        they are known (a socketpair has no path)."""
        parts = []
        with contextlib.suppress(OSError, VhostUserError):
            parts.append(f"back-end pid {self.peer_credentials()[0]}")
        with contextlib.suppress(OSError):
            # client mode: the back-end's path; server mode: our listener's, which it connected to
            path = self.sock.sock.getpeername() or self.sock.sock.getsockname()
            if path:
                parts.append(os.fsdecode(path) if isinstance(path, bytes) else str(path))
        return ", ".join(parts) or "back-end unknown"

    def _slow_reply(self, name: object, limit: float) -> None:
        self.log.warning("back-end slow: %s unanswered after %.1f s, waiting up to %g s (%s)",
                         name, self.slow_after, limit, self.describe_peer())

    def has_protocol_feature(self, feature: ProtocolFeatures) -> bool:
        return self.conn.has_protocol_feature(feature)

    def _break(self, exc: VhostUserError, *, raised: bool = False) -> None:
        """The connection is unusable from now on. Logged as a warning only when nobody else hears
        of it: ``raised`` to the caller of a request, or told to ``on_lost``, it is theirs to report
        (one line per event)."""
        if self.error is None:
            self.error = exc
            told = raised or self.on_lost is not None
            self.log.log(logging.DEBUG if told else logging.WARNING, "vhost-user connection lost: %s", exc)
            self.lost.set()
            if self.on_lost is not None:
                self.on_lost(exc)

    def _start_watch(self) -> None:
        """While idle, notice the back-end hanging up (or talking out of turn)."""
        if self._watch_task is None and not self.sock.closed and self.error is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            await self.sock.wait_readable()
        except (Disconnected, asyncio.CancelledError):
            return
        finally:
            self._watch_task = None
        if self._busy or self.sock.closed:
            return
        if self.sock.peek_eof():
            self._break(Disconnected("back-end closed the connection"))
        else:
            self._break(LocalProtocolError("back-end sent data while no request was in flight"))

    async def _stop_watch(self) -> None:
        task = self._watch_task
        if task is not None:
            await cancel_and_wait(task)
            self._watch_task = None

    # -- the one request/answer primitive ----------------------------------------------
    async def _roundtrip(self, make: Callable[[], Outgoing], *, timeout: float | None = None) -> Reply | Ack | None:
        if self.error is not None:
            raise self.error
        if self._busy:
            raise LocalProtocolError("AsyncFrontend is used by two tasks at once (requests are sequential)")
        self._busy = True
        await self._stop_watch()
        limit = self.timeout if timeout is None else timeout
        try:
            out = make()  # precondition errors surface here; the connection stays usable
            request = self.conn.pending.request if self.conn.pending else None
            name = getattr(request, "name", request)
            slow = None
            if request is not None and self.slow_after < limit:
                slow = asyncio.get_running_loop().call_later(self.slow_after, self._slow_reply, name, limit)
            try:
                async with asyncio.timeout(limit):
                    await self.sock.send(out.data, out.fds)
                    if self.conn.pending is None:
                        return None
                    while True:
                        try:
                            data, fds = await self.sock.recv(max(1, self.conn.bytes_needed))
                        except Disconnected as exc:  # e.g. ECONNRESET: the back-end died with our request unread
                            raise Disconnected(f"{exc} awaiting {name}") from exc
                        if not data:
                            partial = self.conn.mid_message
                            have, need = self.conn.buffered, self.conn.buffered + self.conn.bytes_needed
                            close_fds(fds, self.conn.take_unclaimed_fds())
                            if self.error is not None:  # we hung up (a flooded back-end channel)
                                raise self.error
                            if partial:
                                raise PartialMessage(have, need)
                            raise Disconnected(f"back-end closed the connection awaiting {name}")
                        try:
                            events = self.conn.receive(data, fds)
                        except VhostUserError:
                            close_fds(fds, self.conn.take_unclaimed_fds())
                            raise
                        if events:
                            event = events[0]
                            assert isinstance(event, (Reply, Ack))
                            return event
            except TimeoutError as exc:
                err: VhostUserError = PeerTimeout(f"{name}", limit)
                close_fds(self.conn.take_unclaimed_fds())
                self._break(err, raised=True)
                raise err from exc
            except VhostUserError as exc:
                close_fds(self.conn.take_unclaimed_fds())
                cause = self.error  # the connection broke meanwhile (e.g. a flooded back-end channel)
                if self.conn.error is not None or not isinstance(exc, LocalProtocolError):
                    self._break(exc, raised=True)
                if cause is not None and cause is not exc:
                    raise cause from exc
                raise
            finally:
                if slow is not None:
                    slow.cancel()
        finally:
            self._busy = False
            self._start_watch()

    async def _call(self, make: Callable[[], Outgoing], *, timeout: float | None = None) -> Reply | None:
        event = await self._roundtrip(make, timeout=timeout)
        if isinstance(event, Ack):
            if not event.ok:
                raise BackendFailed(event.request, event.status)
            return None
        return event

    async def _u64(self, make: Callable[[], Outgoing]) -> int:
        reply = await self._call(make)
        assert reply is not None
        self._close_fds(reply.fds)
        return reply.value

    @staticmethod
    def _close_fds(fds: Sequence[int]) -> None:
        for fd in fds:
            os.close(fd)

    # -- negotiation -------------------------------------------------------------------
    async def get_features(self) -> int:
        return await self._u64(self.conn.get_features)

    async def set_features(self, features: int) -> None:
        """SET_FEATURES. Bit 30 (PROTOCOL_FEATURES) is added when the back-end offered it, as
        QEMU always does; pass only the virtio bits the driver accepted."""
        if self.conn.backend_features is not None and self.conn.backend_features & VirtioFeatures.PROTOCOL_FEATURES:
            features |= VirtioFeatures.PROTOCOL_FEATURES
        await self._call(lambda: self.conn.set_features(int(features)))

    async def get_protocol_features(self) -> ProtocolFeatures:
        return ProtocolFeatures(await self._u64(self.conn.get_protocol_features))

    async def set_protocol_features(self, features: ProtocolFeatures | int) -> None:
        await self._call(lambda: self.conn.set_protocol_features(int(features)))

    async def get_queue_num(self) -> int:
        return await self._u64(self.conn.get_queue_num)

    async def get_max_mem_slots(self) -> int:
        return await self._u64(self.conn.get_max_mem_slots)

    async def set_owner(self) -> None:
        await self._call(self.conn.set_owner)

    async def reset_owner(self) -> None:
        await self._call(self.conn.reset_owner)

    async def negotiate(
        self,
        *,
        protocol_features: ProtocolFeatures | int = DEFAULT_PROTOCOL_FEATURES,
        backend_handler: BackendRequestHandler | None = None,
        backend_channel: bool = True,
        set_owner: bool = True,
    ) -> Negotiated:
        """The init sequence QEMU uses (reference trace, "Init"): GET_FEATURES,
        GET/SET_PROTOCOL_FEATURES (if bit 30), GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS
        (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ and ``backend_channel``),
        SET_OWNER. Protocol features asked for = ``protocol_features`` ∩ offered ∩ bits 0-19."""
        features = await self.get_features()
        offered = ProtocolFeatures(0)
        if features & VirtioFeatures.PROTOCOL_FEATURES:
            offered = await self.get_protocol_features()
            wanted = ProtocolFeatures(int(protocol_features)) & offered & STABLE_PROTOCOL_FEATURES
            await self.set_protocol_features(wanted)
        queue_num = await self.get_queue_num() if self.has_protocol_feature(ProtocolFeatures.MQ) else None
        slots = (
            await self.get_max_mem_slots() if self.has_protocol_feature(ProtocolFeatures.CONFIGURE_MEM_SLOTS) else None
        )
        channel = False
        if backend_channel and self.has_protocol_feature(ProtocolFeatures.BACKEND_REQ):
            await self.set_backend_req_fd(backend_handler)
            channel = True
        if set_owner:
            await self.set_owner()
        return Negotiated(features, self.conn.protocol_features, offered, queue_num, slots, channel)

    # -- back-end request channel --------------------------------------------------------
    async def set_backend_req_fd(self, handler: BackendRequestHandler | None = None) -> None:
        """Create the back-end -> front-end channel (a socketpair), send one end with
        SET_BACKEND_REQ_FD and serve back-end requests on the other.

        ``handler(event)`` gets each :class:`RequestReceived` (it owns ``event.fds``) and returns
        the u64 status for NEED_REPLY requests (0 = success); it may be a coroutine function.
        Without a handler, CONFIG_CHANGE_MSG and VRING_CALL/ERR are accepted (status 0) and
        everything else is refused (status 1, fds closed). Every event is also put, without
        its fds, on :attr:`backend_events`, which keeps the newest BACKEND_EVENTS_MAX.

        A back-end sending more than ``backend_burst`` requests at once or ``backend_rate`` a
        second is disconnected: the channel closes and the connection breaks with
        :class:`ChannelFlood` (``on_lost``).

        The handler runs on the channel's own task and must not await requests on the main
        channel (the back-end may be blocked waiting for this answer, and the front-end is
        sequential: a second concurrent request raises LocalProtocolError). Schedule such work
        (e.g. re-reading config after CONFIG_CHANGE_MSG) on the owner task instead.
        """
        if self._backend_sock is not None:
            raise LocalProtocolError("the back-end channel is already set up")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        accepted = False
        try:
            await self._call(lambda: self.conn.set_backend_req_fd(theirs.fileno()))
            accepted = True
        finally:
            theirs.close()  # the back-end has its copy now (or never will)
            if not accepted:
                ours.close()
        self._backend_sock = FdSocket(ours)
        self._backend_handler = handler
        self._backend_task = asyncio.get_running_loop().create_task(self._serve_backend_channel())

    async def _default_backend_handler(self, event: RequestReceived) -> int:
        self._close_fds(event.fds)
        if event.request in (BackendRequest.CONFIG_CHANGE_MSG, BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
            return 0
        self.log.info("refusing back-end request %s", event.request.name)
        return 1

    async def _serve_backend_channel(self) -> None:
        sock = self._backend_sock
        assert sock is not None
        chan = BackendChannelResponder(reply_ack=self.has_protocol_feature(ProtocolFeatures.REPLY_ACK))
        handler = self._backend_handler or self._default_backend_handler
        budget = _RequestBudget(self.backend_burst, self.backend_rate, asyncio.get_running_loop().time)
        try:
            while True:
                data, fds = await sock.recv(max(1, chan.bytes_needed))
                if not data:
                    close_fds(fds, chan.take_unclaimed_fds())
                    self.log.info("back-end closed its request channel")
                    return
                try:
                    events = chan.receive(data, fds)
                except VhostUserError as exc:
                    close_fds(fds, chan.take_unclaimed_fds())
                    self.log.warning("back-end channel: %s; closing it", exc)
                    return
                for i, event in enumerate(events):
                    assert isinstance(event, RequestReceived)
                    if not budget.take():  # this one and the rest are not served: their fds go
                        close_fds(*(e.fds for e in events[i:] if isinstance(e, RequestReceived)),
                                  chan.take_unclaimed_fds())
                        self._break(ChannelFlood(budget.taken, budget.burst, budget.rate))
                        # hang up on it: a request waiting for its answer fails now, with the flood
                        with contextlib.suppress(OSError):
                            self.sock.sock.shutdown(socket.SHUT_RDWR)
                        return
                    self.log.debug("back-end request %s", event.request.name)
                    result = handler(event)
                    status = await result if inspect.isawaitable(result) else result
                    if event.answer == "ack":
                        await sock.send(chan.ack(event.request, int(status or 0)).data)
                    elif event.answer == "reply":
                        await sock.send(chan.reply(event.request, None).data)
                    if self.backend_events.full():
                        self.backend_events.get_nowait()
                        self.backend_events_dropped += 1
                    self.backend_events.put_nowait(dataclasses.replace(event, fds=()))
        except Disconnected as exc:
            self.log.info("back-end channel closed: %s", exc)
        finally:
            sock.close()

    # -- memory ----------------------------------------------------------------------
    async def set_mem_table(self, regions: Sequence[MemoryRegion | XenMemoryRegion], fds: Sequence[int]) -> None:
        """SET_MEM_TABLE: one fd per region, same order (XenMemoryRegion when XEN_MMAP)."""
        await self._call(lambda: self.conn.set_mem_table(regions, fds), timeout=max(self.timeout, MEM_TABLE_TIMEOUT))

    async def add_mem_reg(self, region: MemoryRegion | XenMemoryRegion, fd: int) -> None:
        await self._call(lambda: self.conn.add_mem_reg(region, fd), timeout=max(self.timeout, MEM_TABLE_TIMEOUT))

    async def rem_mem_reg(self, region: MemoryRegion | XenMemoryRegion) -> None:
        await self._call(lambda: self.conn.rem_mem_reg(region))

    # -- vrings ----------------------------------------------------------------------
    async def set_vring_num(self, index: int, num: int) -> None:
        await self._call(lambda: self.conn.set_vring_num(index, num))

    async def set_vring_base(self, index: int, base: int) -> None:
        await self._call(lambda: self.conn.set_vring_base(index, base))

    async def set_vring_addr(
        self, index: int, *, desc: int, used: int, avail: int, log: int = 0, flags: int = 0
    ) -> None:
        """Ring addresses in the *user address space* of the memory table's regions."""
        await self._call(lambda: self.conn.set_vring_addr(index, desc=desc, used=used, avail=avail, log=log, flags=flags))

    async def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring and returns the back-end's next avail index."""
        reply = await self._call(lambda: self.conn.get_vring_base(index))
        assert reply is not None
        return int(reply.payload.num)

    async def set_vring_kick(self, index: int, fd: int | None) -> None:
        """``fd=None`` sends the NOFD flag (back-end polls)."""
        await self._call(lambda: self.conn.set_vring_kick(index, fd))

    async def set_vring_call(self, index: int, fd: int | None) -> None:
        await self._call(lambda: self.conn.set_vring_call(index, fd))

    async def set_vring_err(self, index: int, fd: int | None) -> None:
        await self._call(lambda: self.conn.set_vring_err(index, fd))

    async def set_vring_enable(self, index: int, enable: bool = True) -> None:
        await self._call(lambda: self.conn.set_vring_enable(index, enable))

    async def start_vring(
        self,
        index: int,
        *,
        num: int,
        desc: int,
        avail: int,
        used: int,
        kick_fd: int | None,
        call_fd: int | None,
        base: int = 0,
        log: int = 0,
        enable: bool = True,
    ) -> None:
        """QEMU's per-vring start order: CALL, NUM, BASE, ADDR, KICK, then ENABLE(1) when the
        back-end has PROTOCOL_FEATURES (without it, rings start enabled)."""
        await self.set_vring_call(index, call_fd)
        await self.set_vring_num(index, num)
        await self.set_vring_base(index, base)
        await self.set_vring_addr(index, desc=desc, used=used, avail=avail, log=log)
        await self.set_vring_kick(index, kick_fd)
        if enable and self.conn.backend_features is not None and (
            self.conn.backend_features & VirtioFeatures.PROTOCOL_FEATURES
        ):
            await self.set_vring_enable(index, True)

    async def stop_vring(self, index: int) -> int:
        """QEMU's stop order: ENABLE(0) (if PROTOCOL_FEATURES) then GET_VRING_BASE.
        Returns the ring's next avail index."""
        if self.conn.backend_features is not None and self.conn.backend_features & VirtioFeatures.PROTOCOL_FEATURES:
            await self.set_vring_enable(index, False)
        return await self.get_vring_base(index)

    # -- config, status, reset, inflight ---------------------------------------------------
    async def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG. An empty answer (size 0) is the back-end's way of failing: BackendFailed."""
        reply = await self._call(lambda: self.conn.get_config(offset, size, flags))
        assert reply is not None
        if reply.payload.size == 0 and size:
            raise BackendFailed(FrontendRequest.GET_CONFIG, 0)
        if reply.payload.offset != offset or reply.payload.size != size:
            raise BackendFailed(FrontendRequest.GET_CONFIG, reply.payload.size)
        return bytes(reply.payload.payload)

    async def set_config(self, offset: int, data: bytes, flags: int = 0, *, timeout: float | None = None) -> None:
        """SET_CONFIG. ``timeout``: how long its ack (REPLY_ACK) may take, in place of
        :attr:`timeout`; past it PeerTimeout, and the connection is broken as with any request."""
        await self._call(lambda: self.conn.set_config(offset, data, flags), timeout=timeout)

    async def reset_device(self) -> None:
        await self._call(self.conn.reset_device)

    async def set_status(self, status: int) -> None:
        await self._call(lambda: self.conn.set_status(status))

    async def get_status(self) -> int:
        return await self._u64(self.conn.get_status)

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightFd:
        reply = await self._call(lambda: self.conn.get_inflight_fd(num_queues, queue_size))
        assert reply is not None and len(reply.fds) == 1
        p = reply.payload
        return InflightFd(reply.fds[0], p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size)

    async def set_inflight_fd(
        self, fd: int, *, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        await self._call(
            lambda: self.conn.set_inflight_fd(
                fd, mmap_size=mmap_size, mmap_offset=mmap_offset, num_queues=num_queues, queue_size=queue_size
            )
        )

    async def request(
        self, request: FrontendRequest, payload: Any = None, fds: Sequence[int] = (), *, need_reply: bool | None = None
    ) -> Reply | None:
        """Escape hatch: any front-end request (preconditions still checked). Returns the
        inherent reply (its fds are the caller's) or None."""
        return await self._call(lambda: self.conn.send_request(request, payload, fds, need_reply=need_reply))

    # -- teardown ----------------------------------------------------------------------
    async def close(self) -> None:
        """Close the back-end channel and the socket. Idempotent."""
        await self._stop_watch()
        if self._backend_task is not None:
            await cancel_and_wait(self._backend_task)
            self._backend_task = None
        if self._backend_sock is not None:
            self._backend_sock.close()
        self.sock.close()
        if self.error is None:
            self.error = Disconnected("connection closed locally")
            self.lost.set()
