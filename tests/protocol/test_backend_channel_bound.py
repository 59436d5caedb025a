"""The back-end's request channel is bounded (issue 17, defect 1): a back-end sending more than
the front-end's burst is disconnected with :class:`ChannelFlood` (``on_lost``, reconnect=True),
fds riding on the requests it did not serve are closed, and ``backend_events`` keeps the newest
BACKEND_EVENTS_MAX events whoever reads it or not."""

from __future__ import annotations

import asyncio

import pytest

from vhost_user import AsyncFrontend, BackendServer, ChannelFlood, FdSocket, RequestReceived, VhostUserError
from vhost_user.aio import BACKEND_EVENTS_MAX
from vhost_user.testing import DummyBackend, connected_pair

TEST_TIMEOUT = 10.0


@pytest.mark.asyncio
async def test_a_backend_within_its_burst_is_served_and_backend_events_stays_bounded(no_fd_leak: None) -> None:
    seen: list[RequestReceived] = []
    burst = 3 * BACKEND_EVENTS_MAX
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(DummyBackend(), backend_burst=burst + 1,
                                                             backend_rate=0.001) as (fe, server):
        await fe.negotiate(backend_handler=seen.append)  # type: ignore[arg-type]  (returns None: status 0)
        assert server.channel is not None and server.channel_sock is not None
        await server.channel_sock.send(server.channel.config_change(need_reply=False).data * burst, [])
        await server.send_config_change()  # one more, acknowledged: the ones before were read
        assert len(seen) == burst + 1 and not fe.broken
        assert fe.backend_events.qsize() == BACKEND_EVENTS_MAX
        assert fe.backend_events_dropped == burst + 1 - BACKEND_EVENTS_MAX


@pytest.mark.asyncio
async def test_a_flooding_backend_is_disconnected_with_channel_flood(no_fd_leak: None) -> None:
    lost: list[VhostUserError] = []
    handled = 0

    def handler(event: RequestReceived) -> int:
        nonlocal handled
        handled += 1
        return 0

    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(DummyBackend(), backend_burst=8, backend_rate=0.001,
                                                             on_lost=lost.append) as (fe, server):
        await fe.negotiate(backend_handler=handler)
        assert server.channel is not None and server.channel_sock is not None
        with pytest.raises(VhostUserError):  # the front-end hangs up on the flood
            for _ in range(1000):
                await server.channel_sock.send(server.channel.config_change(need_reply=False).data * 100, [])
        await fe.lost.wait()
        assert handled == 8  # the burst, no more
        assert len(lost) == 1 and isinstance(lost[0], ChannelFlood) and lost[0].reconnect
        assert "flooded its request channel" in str(fe.error)
        with pytest.raises(ChannelFlood):  # sticky: every later request fails at once
            await fe.get_features()


@pytest.mark.asyncio
async def test_a_request_waiting_for_a_flooding_backend_fails_with_the_flood_not_a_timeout(no_fd_leak: None) -> None:
    a, b = FdSocket.pair()
    server = BackendServer(DummyBackend(), b)
    task = asyncio.get_running_loop().create_task(server.run())
    fe = AsyncFrontend(a, timeout=60.0, backend_burst=8, backend_rate=0.001)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await fe.negotiate()

            asked = asyncio.Event()

            async def never_answer(event: RequestReceived) -> None:
                asked.set()
                await asyncio.get_running_loop().create_future()

            server._dispatch = never_answer  # type: ignore[method-assign]  # the back-end stops answering ...
            waiting = asyncio.get_running_loop().create_task(fe.get_features())
            await asked.wait()
            assert server.channel is not None and server.channel_sock is not None
            with pytest.raises(VhostUserError):  # ... and floods its channel until hung up on
                for _ in range(1000):
                    await server.channel_sock.send(server.channel.config_change(need_reply=False).data * 100, [])
            with pytest.raises(ChannelFlood):
                await waiting
    finally:
        await fe.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
