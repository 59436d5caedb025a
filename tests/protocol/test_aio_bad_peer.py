"""Bad input over a real socket: truncated header, oversized size, wrong reply code, missing or
extra fds, a peer that hangs. Always a typed error or a timeout, never a crash, never an fd leak."""

from __future__ import annotations

import asyncio
import os

import pytest

from vhost_user import (
    AsyncFrontend,
    BackendServer,
    FdCountMismatch,
    FdSocket,
    FrontendRequest,
    MalformedMessage,
    PartialMessage,
    PeerTimeout,
    RemoteProtocolError,
    UnexpectedReply,
    UnknownRequest,
    VhostUserError,
)
from vhost_user.testing import DummyBackend
from vhost_user.wire import HEADER_SIZE, U64, encode

F = FrontendRequest
TEST_TIMEOUT = 5.0


async def read_request(peer: FdSocket) -> tuple[bytes, list[int]]:
    """Read one whole request as a scripted back-end; returns (bytes, fds) (fds: caller closes)."""
    data, fds = await peer.recv(HEADER_SIZE)
    size = int.from_bytes(data[8:12], "little")
    while len(data) < HEADER_SIZE + size:
        more, more_fds = await peer.recv(HEADER_SIZE + size - len(data))
        assert more
        data += more
        fds += more_fds
    return data, fds


async def scripted(answer: bytes, fds: tuple[int, ...] = (), *, close_after: bool = False,
                   timeout: float = 1.0) -> tuple[AsyncFrontend, FdSocket, asyncio.Task[None]]:
    fe_sock, peer = FdSocket.pair()
    fe = AsyncFrontend(fe_sock, timeout=timeout)

    async def backend() -> None:
        _, got = await read_request(peer)
        for fd in got:
            os.close(fd)
        if answer:
            await peer.send(answer, fds)
        if close_after:
            peer.close()

    return fe, peer, asyncio.get_running_loop().create_task(backend())


async def finish(fe: AsyncFrontend, peer: FdSocket, task: asyncio.Task[None]) -> None:
    await fe.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    peer.close()


@pytest.mark.asyncio
async def test_truncated_header_then_eof_is_partial_message(no_fd_leak: None) -> None:
    fe, peer, task = await scripted(encode(F.GET_FEATURES, U64(value=1), reply=True)[:7], close_after=True)
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(PartialMessage) as exc:
            await fe.get_features()
        assert (exc.value.have, exc.value.need) == (7, 12)
        assert fe.broken and type(fe.error).reconnect
        with pytest.raises(PartialMessage):  # sticky: same error at once, nothing sent
            await fe.set_owner()
    await finish(fe, peer, task)


@pytest.mark.asyncio
async def test_oversized_size_is_rejected_without_reading_it(no_fd_leak: None) -> None:
    header = (1).to_bytes(4, "little") + (5).to_bytes(4, "little") + (1 << 30).to_bytes(4, "little")
    fe, peer, task = await scripted(header)
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(MalformedMessage) as exc:
            await fe.get_features()
        assert exc.value.field == "size"
    await finish(fe, peer, task)


@pytest.mark.asyncio
async def test_wrong_reply_code(no_fd_leak: None) -> None:
    fe, peer, task = await scripted(encode(F.GET_QUEUE_NUM, U64(value=1), reply=True))
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(UnexpectedReply) as exc:
            await fe.get_features()
        assert exc.value.expected == F.GET_FEATURES and isinstance(exc.value, RemoteProtocolError)
    await finish(fe, peer, task)


@pytest.mark.asyncio
async def test_reply_missing_reply_flag(no_fd_leak: None) -> None:
    fe, peer, task = await scripted(encode(F.GET_FEATURES, U64(value=1)))
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(MalformedMessage) as exc:
            await fe.get_features()
        assert exc.value.field == "flags.reply"
    await finish(fe, peer, task)


@pytest.mark.asyncio
async def test_unexpected_fds_on_a_reply_are_closed(no_fd_leak: None) -> None:
    stray = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe, peer, task = await scripted(encode(F.GET_FEATURES, U64(value=1), reply=True), (stray, stray))
        async with asyncio.timeout(TEST_TIMEOUT):
            with pytest.raises(FdCountMismatch):
                await fe.get_features()
        await finish(fe, peer, task)
    finally:
        os.close(stray)


@pytest.mark.asyncio
async def test_peer_that_hangs_times_out_and_breaks_connection(no_fd_leak: None) -> None:
    fe, peer, task = await scripted(b"", timeout=0.2)
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(PeerTimeout) as exc:
            await fe.get_features()
        assert isinstance(exc.value, TimeoutError) and fe.broken
        with pytest.raises(PeerTimeout):
            await fe.get_queue_num()
    await finish(fe, peer, task)


@pytest.mark.asyncio
async def test_connect_to_missing_path_retries_then_fails(tmp_path, no_fd_leak: None) -> None:  # type: ignore[no-untyped-def]
    from vhost_user import Disconnected

    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(Disconnected, match="after 3 attempts"):
            await AsyncFrontend.connect(tmp_path / "nobody.sock", attempts=3, backoff_initial=0.01)


# -- the back-end side facing a bad front-end ----------------------------------------------


async def run_server_with(data: bytes, fds: tuple[int, ...] = ()) -> BaseException | None:
    dev = DummyBackend()
    ours, theirs = FdSocket.pair()
    server = BackendServer(dev, theirs)
    task = asyncio.get_running_loop().create_task(server.run())
    await ours.send(data, fds)
    ours.close()
    results = await asyncio.gather(task, return_exceptions=True)
    return results[0]  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_server_missing_kick_fd_is_typed_error(no_fd_leak: None) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        err = await run_server_with(encode(F.SET_VRING_KICK, U64(value=0)))
    assert isinstance(err, FdCountMismatch)


@pytest.mark.asyncio
async def test_server_extra_fds_are_closed(no_fd_leak: None) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            err = await run_server_with(encode(F.GET_FEATURES), (efd, efd, efd))
        assert isinstance(err, FdCountMismatch)
    finally:
        os.close(efd)


@pytest.mark.asyncio
async def test_server_unknown_request_and_garbage(no_fd_leak: None) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        err = await run_server_with((77).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4))
        assert isinstance(err, UnknownRequest) and err.code == 77
        err = await run_server_with(b"\xff" * 12)
        assert isinstance(err, MalformedMessage)
        # truncated message then EOF: the server just ends, closing the fd that came with it
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            err = await run_server_with(encode(F.SET_VRING_CALL, U64(value=0))[:15], (efd,))
        finally:
            os.close(efd)
        assert err is None


@pytest.mark.asyncio
async def test_server_refuses_out_of_range_vring_but_survives(no_fd_leak: None) -> None:
    from vhost_user.testing import connected_pair

    dev = DummyBackend(num_queues=1)
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
        await fe.negotiate()
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            with pytest.raises(VhostUserError):
                await fe.set_vring_call(7, efd)  # only 1 queue: refused via REPLY_ACK
        finally:
            os.close(efd)
        assert not fe.broken
        assert await fe.get_vring_base(5) == 0


@pytest.mark.asyncio
async def test_empty_get_config_reply_is_a_refusal_not_a_broken_connection(no_fd_leak: None) -> None:
    """libvhost-user answers a refused GET_CONFIG with hdr.size = 0 (seen from qemu-storage-daemon)."""
    from vhost_user import BackendFailed
    from vhost_user.wire import ProtocolFeatures

    fe_sock, peer = FdSocket.pair()
    fe = AsyncFrontend(fe_sock, timeout=1.0)
    fe.conn.backend_features = 1 << 30  # pretend negotiation happened (sans-IO state)
    fe.conn.backend_protocol_features = ProtocolFeatures.CONFIG
    fe.conn.negotiation = fe.conn.negotiation.__class__.PROTOCOL_SET
    fe.conn.protocol_features = ProtocolFeatures.CONFIG

    async def backend() -> None:
        for _ in range(2):
            _, got = await read_request(peer)
            for fd in got:
                os.close(fd)
            await peer.send(encode(F.GET_CONFIG, None, reply=True))  # hdr.size = 0

    task = asyncio.get_running_loop().create_task(backend())
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(BackendFailed):
            await fe.get_config(0, 60)
        assert not fe.broken
        with pytest.raises(BackendFailed):
            await fe.get_config(0, 8)
    await finish(fe, peer, task)
