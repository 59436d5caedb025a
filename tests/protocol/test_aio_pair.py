"""AsyncFrontend <-> this library's back-end over a real socketpair with real fd passing
(eventfds, memfd), on both loops (tests/conftest.py runs every async test on asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from vhost_user import AsyncFrontend, BackendFailed, Disconnected, FdSocket, FeatureNotNegotiated, FrontendRequest, LocalProtocolError, ProtocolFeatures, VirtioFeatures
from vhost_user.events import RequestReceived
from vhost_user.testing import DummyBackend, RamDiskBlk, connected_pair
from vhost_user.testing.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vhost_user.wire import BackendRequest

from tests.protocol.guestmem import guest, wait_eventfd

F = FrontendRequest
TEST_TIMEOUT = 10.0


@pytest.mark.asyncio
async def test_negotiate_follows_qemu_init_order_and_passes_fds(no_fd_leak: None) -> None:
    dev = DummyBackend(num_queues=2)
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
        neg = await fe.negotiate()
        assert neg.features & VirtioFeatures.PROTOCOL_FEATURES and neg.features & VirtioFeatures.VERSION_1
        assert neg.queue_num == 2 and neg.max_mem_slots == 32 and neg.backend_channel
        assert neg.protocol_features & ProtocolFeatures.REPLY_ACK
        assert dev.requests() == [
            F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM,
            F.GET_MAX_MEM_SLOTS, F.SET_BACKEND_REQ_FD, F.SET_OWNER,
        ]
        assert dev.log[5].nfds == 1 and dev.log[5].fd_kinds[0].startswith("socket:")
        assert dev.log[5].need_reply  # REPLY_ACK negotiated: every reply-less request is ACKed
        assert await fe.get_config(4, 8) == bytes(range(4, 12))
        await fe.set_config(0, b"\xaa\xbb")
        assert dev.config[:2] == b"\xaa\xbb"
        await fe.set_features(int(VirtioFeatures.VERSION_1))
        assert dev.features == VirtioFeatures.VERSION_1  # bit 30 added on the wire, stripped for the device
        assert dev.log[-1].payload.value & VirtioFeatures.PROTOCOL_FEATURES


@pytest.mark.asyncio
async def test_memory_table_and_vring_lifecycle_with_real_eventfds(no_fd_leak: None) -> None:
    dev = DummyBackend(num_queues=1)
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            await fe.negotiate()
            await fe.set_features(int(VirtioFeatures.VERSION_1))
            await fe.set_mem_table([g.region()], [g.fd])
            assert dev.log[-1].fd_kinds[0].startswith("/memfd:proto-test-ram")
            # the back-end mmap'd the same pages: what the guest writes, the device sees
            g.write(0x4000_0000 + 0x8000, b"shared-bytes")
            assert dev.memory.read(0x4000_0000 + 0x8000, 12) == b"shared-bytes"
            await fe.start_vring(0, **g.vring_args())
            assert dev.started == [0] and server.vrings[0].gpa_desc == g.desc
            os.eventfd_write(g.kick, 1)
            await wait_eventfd(g.call)  # DummyBackend answers every kick with a call
            assert dev.kicks == [0]
            assert await fe.stop_vring(0) == 0
            assert dev.stopped == [0]
            assert [r.request for r in dev.log[-2:]] == [F.SET_VRING_ENABLE, F.GET_VRING_BASE]
            await fe.set_vring_call(0, None)  # NOFD
            assert dev.log[-1].nfds == 0 and dev.log[-1].payload.value == 0x100


@pytest.mark.asyncio
async def test_add_and_remove_mem_region(no_fd_leak: None) -> None:
    dev = DummyBackend()
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            await fe.negotiate()
            await fe.add_mem_reg(g.region(), g.fd)
            assert len(dev.memory) == 1
            await fe.rem_mem_reg(g.region())
            assert len(dev.memory) == 0
            with pytest.raises(BackendFailed) as exc:
                await fe.rem_mem_reg(g.region())  # no such region: refused via REPLY_ACK
            assert exc.value.status != 0 and not fe.broken


@pytest.mark.asyncio
async def test_backend_failure_is_reported_and_connection_survives(no_fd_leak: None) -> None:
    dev = DummyBackend(fail={F.SET_VRING_NUM})
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, _):
        await fe.negotiate()
        with pytest.raises(BackendFailed) as exc:
            await fe.set_vring_num(0, 64)
        assert exc.value.request == F.SET_VRING_NUM and type(exc.value).reconnect is False
        await fe.set_vring_base(0, 0)  # still usable


@pytest.mark.asyncio
async def test_preconditions_checked_before_sending(no_fd_leak: None) -> None:
    dev = DummyBackend(protocol_features=ProtocolFeatures.REPLY_ACK)
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, _):
        neg = await fe.negotiate()
        assert neg.queue_num is None and not neg.backend_channel
        before = len(dev.log)
        with pytest.raises(FeatureNotNegotiated):
            await fe.get_config(0, 4)
        with pytest.raises(FeatureNotNegotiated):
            await fe.reset_device()
        assert len(dev.log) == before and not fe.broken


@pytest.mark.asyncio
async def test_backend_channel_delivers_config_change(no_fd_leak: None) -> None:
    dev = DummyBackend()
    seen: list[RequestReceived] = []

    async def handler(event: RequestReceived) -> int:
        seen.append(event)
        return 0

    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
        await fe.negotiate(backend_handler=handler)
        await server.send_config_change()  # NEED_REPLY (REPLY_ACK): returns after the ACK
        assert [e.request for e in seen] == [BackendRequest.CONFIG_CHANGE_MSG]
        event = await fe.backend_events.get()
        assert event.request == BackendRequest.CONFIG_CHANGE_MSG and event.need_reply


@pytest.mark.asyncio
async def test_status_and_reset(no_fd_leak: None) -> None:
    dev = DummyBackend()
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, _):
        await fe.negotiate()
        await fe.set_status(0xF)
        assert await fe.get_status() == 0xF
        await fe.reset_device()
        assert dev.resets == 1


@pytest.mark.asyncio
async def test_backend_hangup_while_idle_is_noticed(no_fd_leak: None) -> None:
    dev = DummyBackend()
    lost: list[Exception] = []
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev, on_lost=lost.append) as (fe, server):
        await fe.negotiate()
        server.sock.close()  # back-end goes away
        await fe.lost.wait()
        assert fe.broken and lost and type(lost[0]).reconnect
        with pytest.raises(type(lost[0])):
            await fe.get_features()


@pytest.mark.asyncio
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
async def test_ramdisk_blk_serves_io_through_split_ring(no_fd_leak: None, event_idx: bool) -> None:
    dev = RamDiskBlk(1 << 20, event_idx=event_idx)
    with guest(event_idx=event_idx) as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            neg = await fe.negotiate()
            assert bool(neg.features & VirtioFeatures.RING_EVENT_IDX) == event_idx
            cfg = await fe.get_config(0, 60)
            assert struct.unpack_from("<Q", cfg)[0] == (1 << 20) // 512
            await fe.set_features(int(VirtioFeatures.VERSION_1 | (VirtioFeatures.RING_EVENT_IDX if event_idx else 0)))
            await fe.set_mem_table([g.region()], [g.fd])
            await fe.start_vring(0, **g.vring_args())
            data = os.urandom(4096)
            w = g.blk(VIRTIO_BLK_T_OUT, 8, len(data), data, token="w")
            r = g.blk(VIRTIO_BLK_T_IN, 8, len(data), token="r")
            fl = g.blk(VIRTIO_BLK_T_FLUSH, 0, 0, token="flush")
            gid = g.blk(VIRTIO_BLK_T_GET_ID, 0, 20, token="id")
            bad = g.blk(VIRTIO_BLK_T_IN, 1 << 20, 512, token="oob")
            unk = g.blk(99, 0, 0, token="unknown")
            g.notify()
            done = await g.complete({"w", "r", "flush", "id", "oob", "unknown"})
            assert bytes(dev.disk[8 * 512 : 8 * 512 + 4096]) == data
            assert g.read(r["data"], 4096) == data and done["r"] == 4097
            assert [g.read(x["status"], 1)[0] for x in (w, r, fl, gid)] == [VIRTIO_BLK_S_OK] * 4
            assert g.read(gid["data"], 20).rstrip(b"\0") == b"pyvhost-ramdisk"
            assert g.read(bad["status"], 1)[0] == VIRTIO_BLK_S_IOERR
            assert g.read(unk["status"], 1)[0] == VIRTIO_BLK_S_UNSUPP
            assert dev.flushes == 1
            assert await fe.stop_vring(0) == 6 == g.drv.avail_idx


@pytest.mark.asyncio
async def test_hostile_descriptor_stops_ring_without_crashing(no_fd_leak: None) -> None:
    dev = RamDiskBlk(1 << 20)
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            await fe.negotiate()
            await fe.set_features(int(VirtioFeatures.VERSION_1))
            await fe.set_mem_table([g.region()], [g.fd])
            await fe.start_vring(0, **g.vring_args())
            g.drv.add(readable=[(0x10, 16)], writable=[(0x20, 1)], token="evil")  # outside guest RAM
            g.notify()
            for _ in range(100):
                if not server.vrings[0].started:
                    break
                await asyncio.sleep(0.01)
            assert not server.vrings[0].started  # ring stopped, server alive
            assert await fe.get_features()  # control plane still answers


@pytest.mark.asyncio
async def test_server_mode_accepts_a_connecting_backend(tmp_path, no_fd_leak: None) -> None:  # type: ignore[no-untyped-def]
    """Front-end listens, back-end connects (dpdk-testpmd client=1 style), with connect retry."""
    from vhost_user import BackendServer, UnixListener, connect_unix

    path = tmp_path / "fe.sock"
    dev = DummyBackend()

    async def backend() -> None:
        sock = await connect_unix(path, attempts=50, backoff_initial=0.01)
        await BackendServer(dev, sock).run()

    task = asyncio.create_task(backend())  # starts before anyone listens: exercises the retry
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await asyncio.sleep(0)
            with UnixListener(path) as listener:
                fe = await AsyncFrontend.accept(listener, accept_timeout=TEST_TIMEOUT)
                try:
                    neg = await fe.negotiate()
                    assert neg.queue_num == 2
                finally:
                    await fe.close()
            await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert dev.requests()[0] == F.GET_FEATURES


@pytest.mark.asyncio
async def test_inflight_fd_get_and_set(no_fd_leak: None) -> None:
    dev = DummyBackend(protocol_features=ProtocolFeatures.REPLY_ACK | ProtocolFeatures.INFLIGHT_SHMFD)
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
        await fe.negotiate()
        inflight = await fe.get_inflight_fd(num_queues=2, queue_size=128)
        try:
            assert inflight.mmap_size == 2 * ((16 + 16 * 128 + 63) & ~63)
            assert os.fstat(inflight.fd).st_size == inflight.mmap_size  # a real memfd, now ours
            await fe.set_inflight_fd(inflight.fd, mmap_size=inflight.mmap_size, mmap_offset=0, num_queues=2, queue_size=128)
            assert dev.log[-1].fd_kinds[0].startswith("/memfd:vhost-user-inflight")
        finally:
            os.close(inflight.fd)


@pytest.mark.asyncio
async def test_xen_mmap_regions_reach_the_device_mapper_and_io_works(no_fd_leak: None) -> None:
    """XEN_MMAP end to end inside the library: 48-byte ADD_MEM_REG / 40-byte SET_MEM_TABLE regions
    carry flags + domid to the device's xen_mapper, which supplies the backing (here: the memfd
    standing in for a privcmd fd)."""
    from vhost_user import XenMemoryRegion, XenMmapFlags
    from vhost_user.aio import DEFAULT_PROTOCOL_FEATURES
    from vhost_user.memory import MmapBacking

    seen: list[tuple[int, int, int]] = []

    def mapper(region: XenMemoryRegion, fd: int) -> MmapBacking:
        seen.append((region.xen_mmap_flags, region.domid, region.guest_phys_addr))
        return MmapBacking(region, fd)

    dev = RamDiskBlk(1 << 20)
    dev.xen_mapper = mapper
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            neg = await fe.negotiate(protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.XEN_MMAP)
            assert neg.protocol_features & ProtocolFeatures.XEN_MMAP
            r = g.region()
            region = XenMemoryRegion(guest_phys_addr=r.guest_phys_addr, memory_size=r.memory_size,
                                     userspace_addr=r.userspace_addr, mmap_offset=0,
                                     xen_mmap_flags=int(XenMmapFlags.FOREIGN), domid=7)
            with pytest.raises(LocalProtocolError):
                await fe.set_mem_table([r], [g.fd])  # plain regions are refused locally under XEN_MMAP
            await fe.set_mem_table([region], [g.fd])
            await fe.set_features(int(VirtioFeatures.VERSION_1))
            await fe.start_vring(0, **g.vring_args())
            data = os.urandom(1024)
            g.blk(VIRTIO_BLK_T_OUT, 2, len(data), data, token="w")
            g.notify()
            await g.complete({"w"})
            assert bytes(dev.disk[1024 : 1024 + len(data)]) == data
            assert seen == [(1, 7, r.guest_phys_addr)]
    dev2 = DummyBackend()
    async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev2) as (fe, _):
        neg = await fe.negotiate(protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.XEN_MMAP)
        assert not neg.protocol_features & ProtocolFeatures.XEN_MMAP  # no mapper: not offered


@pytest.mark.asyncio
async def test_plain_regions_under_an_acknowledged_xen_mmap_are_mapped_as_shared_memory(no_fd_leak: None) -> None:
    """QEMU 8.2 and later acknowledge XEN_MMAP (bit 17, which they only reserve; see
    vhost_user.wire.codec) and send plain regions with a memfd: the back-end maps the memfd itself
    (its Xen mapper is not asked) and serves I/O. A plain region whose fd is a device node is
    refused and the connection goes on."""
    from vhost_user import XenMemoryRegion
    from vhost_user.aio import DEFAULT_PROTOCOL_FEATURES
    from vhost_user.memory import MmapBacking

    asked: list[XenMemoryRegion] = []

    def mapper(region: XenMemoryRegion, fd: int) -> MmapBacking:
        asked.append(region)
        return MmapBacking(region, fd)

    dev = RamDiskBlk(1 << 20)
    dev.xen_mapper = mapper
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, server):
            await fe.negotiate(protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.XEN_MMAP)
            assert server.conn.xen_mmap
            fe.conn.protocol_features &= ~ProtocolFeatures.XEN_MMAP  # QEMU's side: acknowledged, not implemented
            null = os.open("/dev/null", os.O_RDWR)
            try:
                with pytest.raises(BackendFailed):
                    await fe.add_mem_reg(g.region(), null)
            finally:
                os.close(null)
            assert len(dev.memory) == 0 and not fe.broken
            await fe.add_mem_reg(g.region(), g.fd)
            await fe.set_features(int(VirtioFeatures.VERSION_1))
            await fe.start_vring(0, **g.vring_args())
            data = os.urandom(1024)
            g.blk(VIRTIO_BLK_T_OUT, 2, len(data), data, token="w")
            g.notify()
            await g.complete({"w"})
            assert bytes(dev.disk[1024 : 1024 + len(data)]) == data
            assert asked == []


@pytest.mark.asyncio
async def test_ramdisk_command_serves_a_frontend(tmp_path, no_fd_leak: None) -> None:  # type: ignore[no-untyped-def]
    """``python -m vhost_user.testing.blk`` as a separate process (what peer tests can start)."""
    import sys

    sock = tmp_path / "blk.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vhost_user.testing.blk", "--socket", str(sock), "--size", "2M", "--connections", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30):
            fe = await AsyncFrontend.connect(sock, attempts=100, backoff_initial=0.02, backoff_max=0.2)
            try:
                await fe.negotiate()
                cfg = await fe.get_config(0, 60)
                assert struct.unpack_from("<Q", cfg)[0] == (2 << 20) // 512
            finally:
                await fe.close()
            assert await proc.wait() == 0  # --connections 1: exits after the front-end leaves
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.asyncio
async def test_peer_credentials_are_the_peer_process_ids(no_fd_leak: None) -> None:
    a, b = FdSocket.pair()
    fe = AsyncFrontend(a)
    try:
        assert fe.peer_credentials() == b.peer_credentials() == (os.getpid(), os.getuid(), os.getgid())
    finally:
        await fe.close()
        b.close()
    with pytest.raises(Disconnected):
        b.peer_credentials()


@pytest.mark.asyncio
async def test_connect_waits_while_the_listeners_backlog_is_full(tmp_path, no_fd_leak: None) -> None:  # type: ignore[no-untyped-def]
    """A back-end busy with earlier connections, its listen backlog full: Linux fails a
    non-blocking connect with EAGAIN and leaves the socket unconnected.
    connect_unix waits until there is room and returns a connected socket; it took EAGAIN for a
    connect in progress, returned at once, and the first send failed with ENOTCONN."""
    from tests.backlog import full_backlog
    from vhost_user import connect_unix

    path = str(tmp_path / "be.sock")
    loop = asyncio.get_running_loop()
    with full_backlog(path) as (listener, queued):
        connecting = asyncio.create_task(connect_unix(path, attempts=1))  # (closed below)
        try:
            for _ in range(8):  # loop iterations, the backlog still full
                await asyncio.sleep(0)
            assert not connecting.done(), "connect_unix returned while the backlog was full"
            for _ in queued:  # the back-end gets to them: room
                listener.accept()[0].close()
            async with asyncio.timeout(TEST_TIMEOUT):
                fs = await connecting
                peer = (await loop.sock_accept(listener))[0]
                with peer:
                    await fs.send(b"ping")
                    assert await loop.sock_recv(peer, 4) == b"ping"
        finally:
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                connecting.result().close()
            else:
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
