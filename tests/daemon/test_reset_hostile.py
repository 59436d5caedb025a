"""A driver's reset against a back-end that misbehaves at it, and a guest that cycles reset →
set-up → corrupt chain: the guest's vCPU is never held by the back-end, Status reads 0 after the
reset (virtio 1.2 §4.2.2.1: the driver reads it back until it is 0), the next bring-up works on a
new connection, and what the guest or the back-end makes the device log stays bounded.

No simulator: the back-end is the library's RamDiskBlk over a socketpair, its GET_VRING_BASE
handling replaced by the misbehaviour under test; guest RAM is a bytearray (FlatMemory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.daemon.backends import serve_pair
from tests.daemon.mmio_driver import bring_up, read, write
from tests.daemon.test_faults import RAM_BASE, RAM_SIZE, ram_memfd  # noqa: F401  (fixture)
from vhost_user import AsyncFrontend, FdSocket, FrontendRequest, RequestReceived
from vhost_user.aio import REQUEST_TIMEOUT, BackendServer
from vhost_user.testing import RamDiskBlk, connected_pair
from vhost_user.virtqueue import FlatMemory, split_ring_layout
from xen_vhost_master import device as device_module
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg, Status

TIMEOUT = 20.0
RINGS = (RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000)
PREFIX = "dom1/blk0: "


class MisbehavingServer(BackendServer):
    """A back-end that, at ``held`` (GET_VRING_BASE), hangs until ``release`` is set or closes its socket."""

    def __init__(self, *args: object, mode: str, held: FrontendRequest = FrontendRequest.GET_VRING_BASE,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mode = mode
        self.held = held
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _dispatch(self, event: RequestReceived) -> None:
        if event.request == self.held:
            self.asked.set()
            if self.mode == "close":
                self.sock.close()
                raise ConnectionError(f"closed at {event.request.name}")
            await self.release.wait()
        await super()._dispatch(event)


def blk_device(connect: Callable[[], Awaitable[AsyncFrontend]], memfd: int) -> Device:
    """The device every test here drives: one blk queue of 64 over the test's RAM memfd."""
    return Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1),
                  connect=connect, memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)]),
                  set_irq=lambda level: None, log=device_logger("xvm.test.reset", 1, "blk0"))


@contextlib.asynccontextmanager
async def backends(mode: str, held: FrontendRequest = FrontendRequest.GET_VRING_BASE,
                   ) -> AsyncIterator[tuple[Callable[[], object], list[BackendServer]]]:
    """A connect() for a device: the first back-end misbehaves (``mode`` at ``held``), the next ones are good."""
    servers: list[BackendServer] = []
    tasks: list[asyncio.Task[None]] = []

    def make_server(b: FdSocket) -> BackendServer:
        dev = RamDiskBlk(1 << 20)
        return MisbehavingServer(dev, b, mode=mode, held=held) if not servers else BackendServer(dev, b)

    async def connect() -> AsyncFrontend:
        fe, server = serve_pair(make_server, tasks)
        servers.append(server)
        return fe

    try:
        yield connect, servers
    finally:
        for s in servers:
            if isinstance(s, MisbehavingServer):
                s.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)
        for s in servers:
            s.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["hang", "close"])
async def test_reset_is_answered_while_the_backend_hangs_or_drops_and_the_next_bring_up_reconnects(
        no_fd_leak, ram_memfd, monkeypatch, caplog, mode):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(device_module, "RESET_STOP_TIMEOUT", 0.5)  # the hung back-end is given up on soon
    order: list[str] = []
    async with asyncio.timeout(TIMEOUT), backends(mode) as (connect, servers):
        device = blk_device(connect, ram_memfd)  # type: ignore[arg-type]
        try:
            await device.start()
            await bring_up(device, RINGS, 64)
            assert device.stats.starts == 1
            bad = servers[0]
            assert isinstance(bad, MisbehavingServer)
            reset = asyncio.ensure_future(write(device, Reg.STATUS, 0))
            reset.add_done_callback(lambda _: order.append("reset answered"))
            await bad.asked.wait()
            # the back-end holds GET_VRING_BASE for as long as the test likes; the guest's write
            # must be answered meanwhile (the front-end's own timeout is the library's REQUEST_TIMEOUT, 60 s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reset), TIMEOUT / 2)
            order.append("back-end released")
            bad.release.set()
            await reset
            assert order == ["reset answered", "back-end released"]
            assert read(device, Reg.STATUS) == 0
            await bring_up(device, RINGS, 64)  # waits for the stop, then for the new connection
            if device.reconnecting is not None:
                await device.reconnecting
            assert device.model is not None and device.model.active
            assert read(device, Reg.STATUS) == 15  # not NEEDS_RESET
            assert len(servers) == 2 and device.stats.starts == 2 and device.stats.reconnects == 1
            assert servers[1].vrings[0].started
            daemon = [r for r in caplog.records if not r.name.startswith("vhost_user.aio.server")]
            assert daemon and all(r.getMessage().startswith(PREFIX) for r in daemon), [r.getMessage() for r in daemon]
        finally:
            await device.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "suspend"])
async def test_a_stop_waits_a_short_bound_for_each_reply_not_the_request_timeout(
        no_fd_leak, ram_memfd, monkeypatch, caplog, how):
    """The device removed (close, no overall bound given) or handed over (suspend) while its back-end
    holds GET_VRING_BASE: the stop gives that reply STOP_REPLY_TIMEOUT (injected short), not the
    minute a running device gives a slow back-end, then drops the connection in one line."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(device_module, "STOP_REPLY_TIMEOUT", 0.2)
    async with asyncio.timeout(TIMEOUT), backends("hang") as (connect, servers):
        device = blk_device(connect, ram_memfd)  # type: ignore[arg-type]
        try:
            await device.start()
            await bring_up(device, RINGS, 64)
            fe = device.frontend
            assert fe is not None and fe.timeout == REQUEST_TIMEOUT
            if how == "close":
                await device.close()
            else:
                assert await device.suspend() == []  # nothing kept: the next image connects afresh
            bad = servers[0]
            assert isinstance(bad, MisbehavingServer) and bad.asked.is_set() and not bad.release.is_set()
            assert fe.broken and fe.sock.closed
        finally:
            await device.close()
    said = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and not r.name.startswith("vhost_user.aio.server")]
    expected = {"close": PREFIX + "back-end did not stop (peer did not answer GET_VRING_BASE within 0.2 s): "
                                  "dropping its connection",
                "suspend": PREFIX + "handover: stopping the back-end's rings: peer did not answer GET_VRING_BASE "
                                    "within 0.2 s"}
    assert said == [expected[how]], said


@pytest.mark.asyncio
async def test_a_config_write_the_backend_never_acks_is_answered_within_its_bound_and_needs_reset(
        no_fd_leak, ram_memfd, monkeypatch, caplog):
    """The back-end never acks SET_CONFIG: the guest's config write (its vCPU held meanwhile) is
    answered after CONFIG_REPLY_TIMEOUT (injected short), not the library's REQUEST_TIMEOUT; the
    device reads DEVICE_NEEDS_RESET and says why in one line, and the driver's reset and bring-up
    work afterwards on a new connection. (Not raising: without the bound the write is held past
    ``bound``.)"""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(device_module, "CONFIG_REPLY_TIMEOUT", 0.2, raising=False)
    bound = 5.0  # the test's wait for the guest's write: above the injected bound, below the library's 60 s
    assert REQUEST_TIMEOUT > bound
    async with asyncio.timeout(TIMEOUT), backends("hang", FrontendRequest.SET_CONFIG) as (connect, servers):
        device = blk_device(connect, ram_memfd)  # type: ignore[arg-type]
        try:
            await device.start()
            await bring_up(device, RINGS, 64)
            bad = servers[0]
            assert isinstance(bad, MisbehavingServer)
            await write(device, 0x100 + 32, 1, bound)  # virtio_blk_config.writeback
            assert bad.asked.is_set() and not bad.release.is_set()
            assert read(device, Reg.STATUS) == 15 | Status.DEVICE_NEEDS_RESET
            await write(device, Reg.STATUS, 0)
            assert read(device, Reg.STATUS) == 0
            if device.reconnecting is not None:
                await device.reconnecting
            await bring_up(device, RINGS, 64)
            assert read(device, Reg.STATUS) == 15
            assert len(servers) == 2 and device.stats.starts == 2 and servers[1].vrings[0].started
        finally:
            await device.close()
    # the connection's loss (the device reconnects at once) and the device's DEVICE_NEEDS_RESET: a line each
    said = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and not r.name.startswith("vhost_user.aio.server")]
    assert said == [PREFIX + "back-end lost (peer did not answer SET_CONFIG within 0.2 s): reconnecting",
                    PREFIX + "back-end failed: peer did not answer SET_CONFIG within 0.2 s"], said


# --- a guest cycling reset → set-up → corrupt chain (the shadow path stops the queue) ------------

NUM = 16


@pytest.mark.asyncio
async def test_guest_cycling_reset_setup_corrupt_chain_logs_a_bounded_number_of_prefixed_lines(no_fd_leak, caplog):
    caplog.set_level(logging.DEBUG + 1)
    ram = bytearray(RAM_SIZE)
    mem = FlatMemory(ram, RAM_BASE)
    desc, avail, used, _ = split_ring_layout(NUM, RAM_BASE)
    shadow = ShadowDataPath(mem, [(RAM_BASE, RAM_SIZE)], pool_size=1 << 20, max_queues=1, max_queue_size=NUM,
                            log=device_logger("xen_vhost_master.datapath.shadow", 1, "blk0"))
    cycles = 40
    async with asyncio.timeout(TIMEOUT * 3), connected_pair(RamDiskBlk(1 << 20)) as (fe, _server):
        async def ready() -> AsyncFrontend:
            return fe

        device = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=NUM, num_queues=1),
                        connect=ready, memory=shadow, set_irq=lambda level: None,
                        log=device_logger("xen_vhost_master.device", 1, "blk0"), clock=lambda: 0.0)
        shadow.on_error = lambda index, reason: device.fail(f"shadow queue {index} stopped: {reason}")
        try:
            await device.start()
            caplog.clear()
            for _ in range(cycles):
                await bring_up(device, (desc, avail, used), NUM)
                assert read(device, Reg.STATUS) == 15
                # a chain whose only descriptor lies below guest RAM
                struct.pack_into("<QIHH", ram, desc - RAM_BASE, 0x1000, 64, 0, 0)
                idx = struct.unpack_from("<H", ram, avail + 2 - RAM_BASE)[0]
                struct.pack_into("<H", ram, avail + 4 + 2 * (idx % NUM) - RAM_BASE, 0)
                struct.pack_into("<H", ram, avail + 2 - RAM_BASE, (idx + 1) & 0xFFFF)
                await write(device, Reg.QUEUE_NOTIFY, 0)
                assert read(device, Reg.STATUS) & 0x40  # DEVICE_NEEDS_RESET
                await write(device, Reg.STATUS, 0)
                ram[:] = bytes(RAM_SIZE)
            assert device.stats.starts == cycles
        finally:
            await device.close()
            shadow.close()
    lines = [r.getMessage() for r in caplog.records  # (the stand-in back-end's own lines are not the daemon's)
             if r.levelno > logging.DEBUG and not r.name.startswith("vhost_user.aio.server")]
    # 4 kinds of line per cycle (reset, started, stopped queue, NEEDS_RESET): each kind is let
    # through RateLimit's burst (10) times in its window, whatever the number of cycles
    assert len(lines) <= 4 * 10 + 4, "\n".join(lines)
    for line in lines:
        assert line.startswith(PREFIX) and line.count("dom1/") == 1, line


# --- a back-end that answers every request, slowly ------------------------------------------------


class SlowServer(BackendServer):
    """Answers each request after ``delay`` s: within any per-request timeout, yet never done."""

    delay = 0.1

    async def _dispatch(self, event: RequestReceived) -> None:
        await asyncio.sleep(self.delay)  # the back-end's pace, not synchronisation
        await super()._dispatch(event)


@pytest.mark.asyncio
async def test_negotiation_as_a_whole_is_bounded_and_leaves_nothing_open(no_fd_leak, ram_memfd, monkeypatch):
    """Each answer comes inside the request timeout, but the negotiation does not end in
    NEGOTIATION_TIMEOUT: the start fails with TimeoutError (an OSError, so the supervisor keeps the
    device waiting and tries again), the connection is closed."""
    monkeypatch.setattr(device_module, "NEGOTIATION_TIMEOUT", 3 * SlowServer.delay)
    tasks: list[asyncio.Task[None]] = []
    servers: list[BackendServer] = []

    async def connect() -> AsyncFrontend:
        fe, server = serve_pair(lambda b: SlowServer(RamDiskBlk(1 << 20), b), tasks)
        servers.append(server)
        return fe

    device = blk_device(connect, ram_memfd)
    async with asyncio.timeout(TIMEOUT):
        try:
            with pytest.raises(TimeoutError) as info:
                await device.start()
            assert isinstance(info.value, OSError) and device.frontend is None
            await asyncio.gather(*tasks, return_exceptions=True)  # the back-end sees the connection close
        finally:
            await device.close()
            for s in servers:
                s.close()
