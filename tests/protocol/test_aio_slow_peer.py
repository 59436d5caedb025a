"""A slow back-end is not a dead one (issue #19: a loaded dom0 answers in seconds). A reply later
than ``slow_after`` gets one warning line naming the request and the peer, and is still taken; a
reply later than ``timeout`` fails the request with :class:`PeerTimeout`; a peer that closes its
socket (EOF) or resets it (ECONNRESET) fails the request in flight at once, however long the
timeout.

No wall clock decides an outcome: the stand-in back-end holds the request until the test releases
it, and the test releases it when the warning has been logged (an event). The injected
``slow_after`` and ``timeout`` only order the front-end's own two timers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest

from vhost_user import (AsyncFrontend, Disconnected, FdSocket, FrontendRequest, PeerTimeout, ProtocolFeatures,
                       RequestReceived, VirtioFeatures)
from vhost_user.aio import REQUEST_TIMEOUT, SLOW_REPLY_AFTER, BackendServer
from vhost_user.testing import DummyBackend

TEST_TIMEOUT = 30.0  # the test's own bound: below every timeout the front-end is given here
LONG = 3600.0  # a front-end timeout no test reaches: an error seen is not the timeout's
SLOW = 0.01  # slow_after injected: the warning comes as soon as the loop's timer runs


class HoldingServer(BackendServer):
    """A back-end that holds ``held`` (``asked`` set) until ``release`` is set, then answers it
    ("answer"), closes its socket after reading it ("close"), or never reads it at all and closes
    with it unread, which the front-end sees as ECONNRESET ("reset": ``run`` is not used)."""

    def __init__(self, sock: FdSocket, *, held: FrontendRequest, mode: str) -> None:
        super().__init__(DummyBackend(), sock)
        self.held = held
        self.mode = mode
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _dispatch(self, event: RequestReceived) -> None:
        if event.request == self.held and not self.asked.is_set():
            self.asked.set()
            await self.release.wait()
            if self.mode == "close":
                for fd in event.fds:
                    os.close(fd)
                self.sock.close()
                raise ConnectionError(f"closed at {event.request.name}")
        await super()._dispatch(event)

    async def reset_when_asked(self) -> None:
        """Wait for a request to arrive, leave it unread, close once released."""
        await self.sock.wait_readable()
        self.asked.set()
        await self.release.wait()
        self.sock.close()


class Lines(logging.Handler):
    """The front-end's log lines, and an event set by the first "back-end slow" one."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.slow = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")
        if record.getMessage().startswith("back-end slow"):
            self.slow.set()


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, Lines]]:
    logger = logging.getLogger("tests.protocol.slow_peer")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


async def pair(held: FrontendRequest, mode: str, logger: logging.Logger,
               **frontend_kwargs: float) -> tuple[AsyncFrontend, HoldingServer, asyncio.Task[None]]:
    a, b = FdSocket.pair()
    server = HoldingServer(b, held=held, mode=mode)
    run = server.reset_when_asked() if mode == "reset" else server.run()
    task = asyncio.get_running_loop().create_task(run)
    return AsyncFrontend(a, logger=logger, **frontend_kwargs), server, task


async def finish(fe: AsyncFrontend, server: HoldingServer, task: asyncio.Task[None]) -> None:
    server.release.set()
    await fe.close()
    await asyncio.gather(task, return_exceptions=True)
    server.close()


@pytest.mark.asyncio
async def test_a_slow_reply_is_warned_about_once_then_taken(no_fd_leak, lines) -> None:
    logger, seen = lines
    fe, server, task = await pair(FrontendRequest.GET_FEATURES, "answer", logger, timeout=LONG, slow_after=SLOW)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            request = asyncio.ensure_future(fe.get_features())
            await seen.slow.wait()  # logged while the back-end still holds the request
            assert not request.done() and not server.release.is_set()
            server.release.set()
            assert await request == server.device.device_features | VirtioFeatures.PROTOCOL_FEATURES
            assert not fe.broken
            assert await fe.get_protocol_features()  # the connection serves on
        slow = [line for line in seen.lines if "GET_FEATURES" in line]
        assert len(slow) == 1, seen.lines
        assert slow[0].startswith(f"WARNING back-end slow: GET_FEATURES unanswered after {SLOW:.1f} s, "
                                  f"waiting up to {LONG:g} s (back-end pid {os.getpid()}")
    finally:
        await finish(fe, server, task)


@pytest.mark.asyncio
async def test_a_reply_later_than_the_timeout_fails_the_request_after_the_warning(no_fd_leak, lines) -> None:
    logger, seen = lines
    fe, server, task = await pair(FrontendRequest.GET_PROTOCOL_FEATURES, "answer", logger,
                                  timeout=0.2, slow_after=SLOW)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            features = await fe.get_features()
            assert features
            with pytest.raises(PeerTimeout) as info:
                await fe.get_protocol_features()
            assert info.value.what == "GET_PROTOCOL_FEATURES" and info.value.seconds == 0.2
            assert str(info.value) == "peer did not answer GET_PROTOCOL_FEATURES within 0.2 s"
            assert fe.broken and type(fe.error).reconnect
            assert seen.slow.is_set()  # the warning came first (its timer is the earlier one)
            with pytest.raises(PeerTimeout):  # sticky, as every broken connection
                await fe.get_queue_num()
    finally:
        await finish(fe, server, task)


@pytest.mark.asyncio
async def test_no_warning_when_the_timeout_comes_first(no_fd_leak, lines) -> None:
    """A bound at or below ``slow_after`` (a stop that must stay short): the timeout's error alone."""
    logger, seen = lines
    fe, server, task = await pair(FrontendRequest.GET_FEATURES, "answer", logger, timeout=0.05, slow_after=0.05)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            with pytest.raises(PeerTimeout):
                await fe.get_features()
        assert not seen.slow.is_set(), seen.lines
    finally:
        await finish(fe, server, task)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["close", "reset"])
@pytest.mark.parametrize("warned", [False, True], ids=["at-once", "after-the-slow-warning"])
async def test_a_dead_peer_fails_the_request_in_flight_at_once(no_fd_leak, lines, mode, warned) -> None:
    """The library's own defaults (60 s to answer, a warning after 5 s): the error is Disconnected,
    never the timeout's, and comes when the peer goes (the test's bound is below the timeout)."""
    logger, seen = lines
    kwargs = {"slow_after": SLOW} if warned else {}
    fe, server, task = await pair(FrontendRequest.GET_FEATURES, mode, logger, **kwargs)
    assert fe.timeout == REQUEST_TIMEOUT == 60.0 and SLOW_REPLY_AFTER == 5.0
    assert fe.slow_after == (SLOW if warned else SLOW_REPLY_AFTER)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            request = asyncio.ensure_future(fe.get_features())
            await server.asked.wait()
            if warned:
                await seen.slow.wait()
            assert not request.done()
            server.release.set()  # the peer goes now
            with pytest.raises(Disconnected) as info:
                await request
        assert fe.error is info.value
        expected = "back-end closed the connection" if mode == "close" else "Connection reset by peer"
        assert expected in str(info.value) and str(info.value).endswith("awaiting GET_FEATURES")
        assert seen.slow.is_set() == warned
        with pytest.raises(Disconnected):  # sticky: nothing waits again
            await fe.get_queue_num()
    finally:
        await finish(fe, server, task)


@pytest.mark.asyncio
async def test_set_config_given_its_own_timeout_fails_by_then_whatever_the_connections_timeout(no_fd_leak, lines) -> None:
    """A caller that must not wait a request timeout for SET_CONFIG's ack (a guest's vCPU held on
    it) passes ``timeout``: PeerTimeout by then, the connection broken as with any request."""
    logger, seen = lines
    fe, server, task = await pair(FrontendRequest.SET_CONFIG, "answer", logger, timeout=LONG, slow_after=LONG)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await fe.negotiate()
            assert fe.has_protocol_feature(ProtocolFeatures.CONFIG | ProtocolFeatures.REPLY_ACK)
            with pytest.raises(PeerTimeout) as info:
                await fe.set_config(0, b"\x01", timeout=0.05)
            assert server.asked.is_set() and not server.release.is_set()
            assert str(info.value) == "peer did not answer SET_CONFIG within 0.05 s"
            assert fe.broken and fe.timeout == LONG
    finally:
        await finish(fe, server, task)
