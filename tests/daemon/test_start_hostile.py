"""The driver's DRIVER_OK write against a back-end that hangs at the device's start (SET_MEM_TABLE):
the guest's vCPU is not held by the back-end (the write is answered while it hangs, Status reads
DRIVER_OK), the notifies the guest makes meanwhile are served once the start completes, a start
that fails puts the device in DEVICE_NEEDS_RESET and drops the back-end, and the next bring-up works
on a new connection. The driver's reset made while a reconnect's resume hangs there is answered
alike: the resume is abandoned and the next bring-up finds a new back-end.

A back-end slow to answer at the daemon's start is waited for (one warning line) and the device
comes up; one that dies while it negotiates costs one line and the device is tried again.

The back-end is the library's RamDiskBlk over a socketpair, its handling of one request replaced by
the misbehaviour under test; guest RAM is a memfd (zero copy) or a bytearray behind the shadow path.
The config write's test runs against qemu-storage-daemon too, held by SIGSTOP during the start.
The start tests run the daemon over the simulated host (tests/daemon/test_waiting_backend.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import re
import signal
import struct
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.daemon.backends import STOP_BOUND, StandInBackends
from tests.daemon.test_waiting_backend import DOMID, Backend, guest_domain, running
from vhost_user import AsyncFrontend, FdSocket, FrontendRequest, RequestReceived
from vhost_user.aio import REQUEST_TIMEOUT, BackendServer
from vhost_user.aio.device import Vring
from vhost_user.testing import RamDiskBlk
from vhost_user.virtqueue import FlatMemory, SplitQueueDriver
from xen_vhost_master import device as device_module
from xen_vhost_master import supervisor
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.base import DataPath
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.supervisor import Options
from xen_vhost_master.virtio_mmio import Reg, Status

TIMEOUT = 30.0
HANG = 5.0  # how long a test lets the back-end hang before releasing it anyway (only reached on failure)
RAM_BASE, RAM_SIZE = 0x4000_0000, 1 << 20
QSIZE = 16
DESC, AVAIL, USED, BUF = RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000, RAM_BASE + 0x4000
PREFIX = "dom1/blk0: "
DRIVER_OK = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


class HangingServer(BackendServer):
    """A back-end that holds ``held`` (SET_MEM_TABLE) until ``release`` is set, then answers it
    (``mode`` "answer"), closes its socket ("close"), or keeps holding it ("forever")."""

    def __init__(self, *args: object, mode: str, held: FrontendRequest = FrontendRequest.SET_MEM_TABLE,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mode = mode
        self.held = held
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def _dispatch(self, event: RequestReceived) -> None:
        if event.request == self.held and not self.asked.is_set():
            self.asked.set()
            await self.release.wait()
            if self.mode != "answer":
                for fd in event.fds:
                    os.close(fd)
                self.sock.close()
                raise ConnectionError(f"closed at {event.request.name}")
        await super()._dispatch(event)


class ConfigRamDisk(RamDiskBlk):
    """RamDiskBlk that takes config writes (SET_CONFIG), and says whether the first request it
    served came after one."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.config_writes: list[tuple[int, bytes]] = []
        self.first_kick_after_config: bool | None = None

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        self.config_writes.append((offset, data))
        return True

    def handle_kick(self, vring: Vring) -> None:
        if self.first_kick_after_config is None:
            self.first_kick_after_config = bool(self.config_writes)
        super().handle_kick(vring)


@contextlib.asynccontextmanager
async def backends(mode: str, disk: Callable[[int], RamDiskBlk] = RamDiskBlk,
                   ) -> AsyncIterator[tuple[Callable[[], object], list[BackendServer]]]:
    """A connect() for a device: the first back-end hangs at SET_MEM_TABLE (``mode``), the next
    ones are good."""
    servers: list[BackendServer] = []
    tasks: list[asyncio.Task[None]] = []

    async def connect() -> AsyncFrontend:
        a, b = FdSocket.pair()
        dev = disk(1 << 20)
        server = HangingServer(dev, b, mode=mode) if not servers else BackendServer(dev, b)
        servers.append(server)
        tasks.append(asyncio.get_running_loop().create_task(server.run()))
        return AsyncFrontend(a)

    try:
        yield connect, servers
    finally:
        for s in servers:
            if isinstance(s, HangingServer):
                s.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)
        for s in servers:
            s.close()


class Guest:
    """The guest's virtio-blk driver of queue 0, by register writes; its rings in ``ram``."""

    def __init__(self, ram: mmap.mmap) -> None:
        self.ram = ram
        self.irq = asyncio.Event()
        self.mem = FlatMemory(ram, base=RAM_BASE)
        self.drv: SplitQueueDriver | None = None
        self.device: Device | None = None

    def mmio(self, reg: int, value: int) -> object:
        assert self.device is not None
        return self.device.mmio(reg, 4, True, value)

    async def w(self, reg: int, value: int) -> None:
        result = self.mmio(reg, value)
        if result is not None:
            await result  # type: ignore[misc]

    def status(self) -> int:
        assert self.device is not None
        result = self.device.mmio(Reg.STATUS, 4, False, 0)
        assert isinstance(result, int)
        return result

    async def set_up(self) -> None:
        """Everything of a bring-up but the DRIVER_OK write."""
        self.ram[: 0x3000] = bytes(0x3000)
        for value in (0, 1, 3):
            await self.w(Reg.STATUS, value)
        for sel, value in ((0, 0), (1, 1)):  # VERSION_1
            await self.w(Reg.DRIVER_FEATURES_SEL, sel)
            await self.w(Reg.DRIVER_FEATURES, value)
        await self.w(Reg.STATUS, 11)
        await self.w(Reg.QUEUE_SEL, 0)
        await self.w(Reg.QUEUE_NUM, QSIZE)
        for reg, addr in ((Reg.QUEUE_DESC_LOW, DESC), (Reg.QUEUE_DRIVER_LOW, AVAIL), (Reg.QUEUE_DEVICE_LOW, USED)):
            await self.w(reg, addr)
            await self.w(reg + 4, 0)
        if self.drv is not None:
            self.drv.release()
        self.drv = SplitQueueDriver(self.mem, QSIZE, DESC, AVAIL, USED)
        await self.w(Reg.QUEUE_READY, 1)

    def put(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - RAM_BASE : gpa - RAM_BASE + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - RAM_BASE : gpa - RAM_BASE + n])

    def queue_write(self, i: int) -> None:
        """A VIRTIO_BLK_T_OUT of one sector (sector ``i``, filled with ``i + 1``), token ``i``."""
        assert self.drv is not None
        hdr, payload, status = BUF + 0x400 * i, BUF + 0x400 * i + 0x10, BUF + 0x400 * i + 0x210
        self.put(hdr, struct.pack("<IIQ", 1, 0, i))
        self.put(payload, bytes([i + 1]) * 512)
        self.put(status, b"\xff")
        self.drv.add(readable=[(hdr, 16), (payload, 512)], writable=[(status, 1)], token=i)

    def status_byte(self, i: int) -> bytes:
        return self.get(BUF + 0x400 * i + 0x210, 1)

    async def completions(self, count: int) -> list[int]:
        """The tokens of the next ``count`` used entries (waits for the interrupt line)."""
        assert self.drv is not None
        tokens: list[int] = []
        while len(tokens) < count:
            self.irq.clear()
            done = self.drv.get_used()
            tokens += [t for t, _ in done]
            if not done:
                await self.irq.wait()
            await self.w(Reg.INTERRUPT_ACK, 1)
        return tokens

    def close(self) -> None:
        if self.drv is not None:
            self.drv.release()
        self.mem.release()


@pytest.fixture
def ram() -> Iterator[tuple[int, mmap.mmap]]:
    fd = os.memfd_create("start-test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_SIZE)
    view = mmap.mmap(fd, RAM_SIZE)
    yield fd, view
    view.close()
    os.close(fd)


def data_path(kind: str, fd: int, guest: Guest) -> DataPath:
    if kind == "shadow":
        return ShadowDataPath(guest.mem, [(RAM_BASE, RAM_SIZE)], pool_size=1 << 20, max_queues=1,
                              max_queue_size=QSIZE,
                              log=device_logger("xen_vhost_master.datapath.shadow", 1, "blk0"))
    return FdExport([FdRegion(RAM_BASE, RAM_SIZE, fd)],
                    lambda gpa, n: guest.get(gpa, n))


@contextlib.asynccontextmanager
async def served(kind: str, ram: tuple[int, mmap.mmap], connect: Callable[[], object]) -> AsyncIterator[Guest]:
    guest = Guest(ram[1])
    memory = data_path(kind, ram[0], guest)
    device = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=QSIZE, num_queues=1),
                    connect=connect,  # type: ignore[arg-type]
                    memory=memory, set_irq=lambda level: guest.irq.set() if level else None,
                    log=device_logger("xvm.test.start", 1, "blk0"))
    if isinstance(memory, ShadowDataPath):
        memory.on_error = lambda index, reason: device.fail(f"shadow queue {index} stopped: {reason}")
    guest.device = device
    try:
        await device.start()
        yield guest
    finally:
        await device.close()
        memory.close()
        guest.close()


async def driver_ok_while_hanging(guest: Guest, bad: HangingServer) -> list[object]:
    """The DRIVER_OK write while the back-end holds SET_MEM_TABLE: what the guest saw when its write
    was answered (the Status it then reads, whether the back-end had been released by then)."""
    seen: list[object] = []
    result = guest.mmio(Reg.STATUS, DRIVER_OK)
    if result is None:
        seen += ["answered", guest.status(), bad.release.is_set()]
        return seen
    write = asyncio.ensure_future(result)  # type: ignore[call-overload]
    write.add_done_callback(lambda _: seen.extend(["answered", guest.status(), bad.release.is_set()]))
    await bad.asked.wait()
    with contextlib.suppress(TimeoutError):  # answered at once, or the test releases the back-end
        await asyncio.wait_for(asyncio.shield(write), HANG)
    return seen


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["close", "forever"])
async def test_driver_ok_is_answered_while_the_backend_hangs_at_set_mem_table_and_a_failed_start_needs_reset(
        no_fd_leak, ram, monkeypatch, caplog, mode):
    caplog.set_level(logging.INFO)
    if mode == "forever":  # the start as a whole is given up on (the back-end never answers)
        monkeypatch.setattr(device_module, "START_TIMEOUT", 3.0, raising=False)
    async with asyncio.timeout(TIMEOUT), backends(mode) as (connect, servers), \
            served("zerocopy", ram, connect) as guest:
        device = guest.device
        assert device is not None
        await guest.set_up()
        bad = servers[0]
        assert isinstance(bad, HangingServer)
        seen = await driver_ok_while_hanging(guest, bad)
        # answered while the back-end still held SET_MEM_TABLE, DRIVER_OK readable (virtio 1.2
        # §2.1.1: NEEDS_RESET only once the device knows it failed)
        assert seen == ["answered", DRIVER_OK, False]
        if mode == "close":
            bad.release.set()
        assert device.starting is not None
        await device.starting
        assert guest.status() & Status.DEVICE_NEEDS_RESET and guest.status() & Status.DRIVER_OK
        assert device.stats.starts == 0
        failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(m.startswith(PREFIX + "back-end failed") for m in failed), failed
        # the guest resets (answered at once) and brings the device up again: a new back-end
        await guest.w(Reg.STATUS, 0)
        assert guest.status() == 0
        if device.reconnecting is not None:
            await device.reconnecting
        await guest.set_up()
        await guest.w(Reg.STATUS, DRIVER_OK)
        assert guest.status() == DRIVER_OK
        assert len(servers) == 2 and device.stats.starts == 1 and servers[1].vrings[0].started
        guest.queue_write(0)
        await guest.w(Reg.QUEUE_NOTIFY, 0)
        assert await guest.completions(1) == [0] and guest.status_byte(0) == b"\x00"
        daemon = [r for r in caplog.records if not r.name.startswith("vhost_user.aio.server")]
        assert all(r.getMessage().startswith(PREFIX) for r in daemon), [r.getMessage() for r in daemon]


@contextlib.asynccontextmanager
async def started_while_hanging(kind: str, ram: tuple[int, mmap.mmap], disk: Callable[[int], RamDiskBlk] = RamDiskBlk,
                                ) -> AsyncIterator[tuple[Guest, Device, HangingServer, list[BackendServer]]]:
    """A device whose DRIVER_OK write was answered while its first back-end holds SET_MEM_TABLE
    (answered once the test sets ``release``); the next back-ends are good."""
    async with asyncio.timeout(TIMEOUT), backends("answer", disk) as (connect, servers), \
            served(kind, ram, connect) as guest:
        assert guest.device is not None
        await guest.set_up()
        bad = servers[0]
        assert isinstance(bad, HangingServer)
        assert await driver_ok_while_hanging(guest, bad) == ["answered", DRIVER_OK, False]
        yield guest, guest.device, bad, servers


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["zerocopy", "shadow"])
async def test_notifies_made_while_a_slow_backend_maps_are_served_exactly_once_when_it_answers(
        no_fd_leak, ram, kind):
    count = 5  # a full ring: 16 descriptors, 3 per request
    async with started_while_hanging(kind, ram) as (guest, device, bad, servers):
        for i in range(count):  # each notify answered at once, though no queue runs yet
            guest.queue_write(i)
            assert guest.mmio(Reg.QUEUE_NOTIFY, 0) is None
        bad.release.set()
        tokens = await guest.completions(count)
        assert sorted(tokens) == list(range(count)), tokens  # each request once
        assert all(guest.status_byte(i) == b"\x00" for i in range(count))
        disk = bad.device.disk  # type: ignore[attr-defined]
        assert all(disk[512 * i : 512 * (i + 1)] == bytes([i + 1]) * 512 for i in range(count))
        assert guest.drv is not None and not guest.drv.get_used()  # nothing completed twice
        if device.starting is not None:
            await device.starting
        assert guest.status() == DRIVER_OK and len(servers) == 1 and device.stats.starts == 1
        # and the device serves on as usual
        guest.queue_write(count)
        await guest.w(Reg.QUEUE_NOTIFY, 0)
        assert await guest.completions(1) == [count] and guest.status_byte(count) == b"\x00"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["zerocopy", "shadow"])
async def test_a_config_write_while_a_slow_backend_maps_is_answered_and_reaches_it_before_the_requests(
        no_fd_leak, ram, kind):
    """virtio-blk's writeback field written while the start DRIVER_OK left running waits for the
    back-end's SET_MEM_TABLE: the write is answered while it waits (it waited for the whole start
    before, up to START_TIMEOUT, holding the vCPU), the guest reads its value back, and the
    back-end gets it (SET_CONFIG) before the request the guest queued meanwhile."""
    writeback = 0x100 + 32  # virtio 1.2 §5.2.4: struct virtio_blk_config's writeback, in the window
    async with started_while_hanging(kind, ram, ConfigRamDisk) as (guest, device, bad, servers):
        seen: list[object] = []
        result = device.mmio(writeback, 1, True, 1)
        if result is None:
            seen.append(bad.release.is_set())
        else:
            write = asyncio.ensure_future(result)  # type: ignore[call-overload]
            write.add_done_callback(lambda _: seen.append(bad.release.is_set()))
            with contextlib.suppress(TimeoutError):  # answered at once, or only once released
                await asyncio.wait_for(asyncio.shield(write), HANG)
        assert seen == [False], "the config write waited for the back-end's start"
        assert device.mmio(writeback, 1, False, 0) == 1
        guest.queue_write(0)
        assert guest.mmio(Reg.QUEUE_NOTIFY, 0) is None
        bad.release.set()
        assert await guest.completions(1) == [0] and guest.status_byte(0) == b"\x00"
        disk = bad.device
        assert isinstance(disk, ConfigRamDisk)
        assert disk.config_writes == [(32, b"\x01")] and disk.first_kick_after_config is True
        if device.starting is not None:
            await device.starting
        assert guest.status() == DRIVER_OK and len(servers) == 1 and device.stats.starts == 1


@pytest.mark.asyncio
async def test_reset_while_the_start_hangs_is_answered_and_the_next_bring_up_uses_a_new_backend(
        no_fd_leak, ram, monkeypatch):
    monkeypatch.setattr(device_module, "RESET_STOP_TIMEOUT", 0.5)  # the hung start is given up on soon
    async with asyncio.timeout(TIMEOUT), backends("forever") as (connect, servers), \
            served("zerocopy", ram, connect) as guest:
        device = guest.device
        assert device is not None
        await guest.set_up()
        bad = servers[0]
        assert isinstance(bad, HangingServer)
        seen = await driver_ok_while_hanging(guest, bad)
        assert seen == ["answered", DRIVER_OK, False]
        await guest.w(Reg.STATUS, 0)  # the stop waits for the start, not the guest
        assert guest.status() == 0 and not bad.release.is_set()
        await guest.set_up()
        await guest.w(Reg.STATUS, DRIVER_OK)  # after the dropped start, on a new connection
        if device.reconnecting is not None:
            await device.reconnecting
        assert guest.status() == DRIVER_OK
        assert len(servers) == 2 and servers[1].vrings[0].started
        guest.queue_write(0)
        await guest.w(Reg.QUEUE_NOTIFY, 0)
        assert await guest.completions(1) == [0] and guest.status_byte(0) == b"\x00"


@pytest.mark.asyncio
async def test_device_closed_while_its_start_hangs_leaves_nothing_open(no_fd_leak, ram):
    async with asyncio.timeout(TIMEOUT), backends("forever") as (connect, servers):
        async with served("shadow", ram, connect) as guest:
            device = guest.device
            assert device is not None
            await guest.set_up()
            bad = servers[0]
            assert isinstance(bad, HangingServer)
            assert await driver_ok_while_hanging(guest, bad) == ["answered", DRIVER_OK, False]
            guest.queue_write(0)
            assert guest.mmio(Reg.QUEUE_NOTIFY, 0) is None
            starting = device.starting
            assert starting is not None and not starting.done()
        # (served() closed the device: the start is cut, its connection closed)
        assert starting.cancelled() and device.frontend is not None and device.frontend.broken
        assert not bad.release.is_set()


class GoodHungGood(StandInBackends):
    """Good back-ends, but the second one holds SET_MEM_TABLE (until ``hung.release``, then closes
    its socket); ``asked`` is set once it holds it."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        super().__init__(stack)
        self.asked = asyncio.Event()
        self.hung: HangingServer | None = None

    def make_server(self, sock: FdSocket) -> BackendServer:
        dev = RamDiskBlk(1 << 20)
        if len(self.servers) != 1:
            return BackendServer(dev, sock)
        self.hung = HangingServer(dev, sock, mode="close")
        self.hung.asked = self.asked
        return self.hung


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "config_write"), [("zerocopy", False), ("shadow", False), ("zerocopy", True)])
async def test_reset_while_a_reconnect_resume_hangs_is_answered_and_the_next_bring_up_uses_a_new_backend(
        no_fd_leak, ram, kind, config_write):
    # config_write: a config write waits behind the resume, the reset behind it
    async with asyncio.timeout(TIMEOUT), contextlib.AsyncExitStack() as stack:
        stand_ins = GoodHungGood(stack)
        async with served(kind, ram, stand_ins.connect) as guest:
            device = guest.device
            assert device is not None
            await guest.set_up()
            await guest.w(Reg.STATUS, DRIVER_OK)
            guest.queue_write(0)
            await guest.w(Reg.QUEUE_NOTIFY, 0)
            assert await guest.completions(1) == [0]
            stand_ins.servers[0].sock.close()  # the back-end goes away: the device reconnects, resumes
            await stand_ins.asked.wait()  # the second back-end holds the resume's SET_MEM_TABLE
            bad = stand_ins.hung
            assert bad is not None and device.reconnecting is not None
            seen: list[object] = []
            before: list[asyncio.Future[object]] = []
            if config_write:
                cw = device.mmio(0x100, 4, True, 0)
                assert cw is not None and not isinstance(cw, int)
                before.append(asyncio.ensure_future(cw))
                before[0].add_done_callback(lambda _: seen.extend(["config written", bad.release.is_set()]))
            result = guest.mmio(Reg.STATUS, 0)
            if result is None:
                seen += ["answered", guest.status(), bad.release.is_set()]
            else:
                write = asyncio.ensure_future(result)  # type: ignore[call-overload]
                write.add_done_callback(lambda _: seen.extend(["answered", guest.status(), bad.release.is_set()]))
                with contextlib.suppress(TimeoutError):  # answered at once, or the test releases the back-end
                    await asyncio.wait_for(asyncio.shield(write), HANG)
            bad.release.set()
            assert seen == ["config written", False] * config_write + ["answered", 0, False]
            await asyncio.gather(*before)
            if device.reconnecting is not None:
                await device.reconnecting
            await guest.set_up()
            await guest.w(Reg.STATUS, DRIVER_OK)
            if device.reconnecting is not None:
                await device.reconnecting
            if device.starting is not None:
                await device.starting
            assert guest.status() == DRIVER_OK
            assert len(stand_ins.servers) == 3 and stand_ins.servers[2].vrings[0].started
            guest.queue_write(1)
            await guest.w(Reg.QUEUE_NOTIFY, 0)
            assert await guest.completions(1) == [1] and guest.status_byte(1) == b"\x00"


# --- the daemon's start: a slow back-end against a dead one (issue #19) ------------------------------


class FirstBackend:
    """The daemon's connect() (``supervisor._connect_once``): the first connection reaches a
    HangingServer holding ``held`` (``mode``) over a socketpair, the next ones the real back-end at
    the device's socket."""

    def __init__(self, held: FrontendRequest, mode: str, **frontend_kwargs: float) -> None:
        self.server = HangingServer(RamDiskBlk(1 << 20), None, mode=mode, held=held)  # type: ignore[arg-type]
        self.frontend_kwargs = frontend_kwargs
        self.tries = 0
        self.task: asyncio.Task[None] | None = None
        self.real = supervisor._connect_once

    async def connect(self, path: str) -> AsyncFrontend:
        self.tries += 1
        if self.task is not None:
            return await self.real(path)
        a, b = FdSocket.pair()
        try:
            fe = AsyncFrontend(a, **self.frontend_kwargs)
        except BaseException:
            a.close()
            b.close()
            raise
        self.server.sock = b
        self.task = asyncio.get_running_loop().create_task(self.server.run())
        return fe

    async def close(self) -> None:
        self.server.release.set()
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_BOUND):  # it sees the daemon's end close
                    await asyncio.gather(self.task, return_exceptions=True)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.server.close()


class ReleaseOnLine(logging.Handler):
    """Sets ``event`` at the first log line that starts with ``text`` (after the device prefix)."""

    def __init__(self, text: str, event: asyncio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = event
        self._loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().split(": ", 1)[-1].startswith(self.text):
            self._loop.call_soon_threadsafe(self.event.set)  # (the simulated host logs from its thread)


def daemon_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[logging.LogRecord]:
    """What the daemon logged at ``level`` and above (the stand-in back-end's own lines left out)."""
    return [r for r in caplog.records if r.levelno >= level and not r.name.startswith("vhost_user.aio.server")]


@pytest.mark.asyncio
async def test_a_backend_slow_to_answer_at_the_start_is_waited_for_and_the_device_comes_up(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, monkeypatch, caplog):
    """The back-end holds GET_FEATURES until the daemon has logged that it is slow (``slow_after``
    injected short): one warning line naming the request and the back-end, then the device serves
    on that first connection. The daemon waits for a slow negotiation as long as for any answer."""
    assert device_module.NEGOTIATION_TIMEOUT == REQUEST_TIMEOUT == 60.0
    caplog.set_level(logging.INFO)
    guest_domain(sim_control)
    first = FirstBackend(FrontendRequest.GET_FEATURES, "answer", slow_after=0.01)
    monkeypatch.setattr(supervisor, "_connect_once", first.connect)
    released = ReleaseOnLine("back-end slow: GET_FEATURES", first.server.release)
    logging.getLogger("xen_vhost_master").addHandler(released)
    try:
        async with asyncio.timeout(TIMEOUT), \
                running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            d = daemon.device(0)
            assert d["backend"] == "connected" and d["attempts"] == 1 and first.tries == 1
    finally:
        logging.getLogger("xen_vhost_master").removeHandler(released)
        await first.close()
    slow = [r.getMessage() for r in daemon_lines(caplog) if "slow" in r.getMessage()]
    assert len(slow) == 1, slow
    assert slow[0].startswith(f"dom{DOMID}/0: back-end slow: GET_FEATURES unanswered after 0.0 s, waiting up to "
                              f"{REQUEST_TIMEOUT:g} s (back-end pid {os.getpid()}"), slow
    assert not daemon_lines(caplog, logging.ERROR)


@pytest.mark.asyncio
async def test_a_backend_that_dies_mid_negotiation_costs_one_line_and_is_tried_again(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, monkeypatch, caplog):
    """The back-end closes its socket at GET_PROTOCOL_FEATURES: the daemon notices at once (well
    inside the 60 s a slow answer is given: the test's bound is 20 s), says so in one line without a
    traceback, and tries again (the waiting device's backoff): the second connection serves."""
    caplog.set_level(logging.INFO)
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    first = FirstBackend(FrontendRequest.GET_PROTOCOL_FEATURES, "close")
    first.server.release.set()  # it closes as soon as the request arrives
    monkeypatch.setattr(supervisor, "_connect_once", first.connect)
    try:
        async with asyncio.timeout(TIMEOUT), \
                running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            d = daemon.device(0)
            assert d["backend"] == "connected" and d["attempts"] == 2 and first.tries == 2
    finally:
        await first.close()
        await backend.stop()
    about = [r for r in daemon_lines(caplog) if "GET_PROTOCOL_FEATURES" in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about]
    assert about[0].exc_info is None and "\n" not in about[0].getMessage()
    assert "back-end closed the connection awaiting GET_PROTOCOL_FEATURES" in about[0].getMessage()


@pytest.mark.peer
@pytest.mark.asyncio
async def test_a_config_write_while_qsd_is_stopped_in_the_start_reaches_it_before_the_rings(no_fd_leak, ram, peers):
    """The same against qemu-storage-daemon, held by SIGSTOP from just before the DRIVER_OK write
    (a back-end starved of CPU on a loaded dom0), seen on the wire through the library's
    vhost-user-dump relay: the DRIVER_OK write and the writeback field's write (flipped) are
    answered while qsd is stopped; the request the guest queues meanwhile
    completes once it runs again; qsd got SET_CONFIG after SET_MEM_TABLE and before any
    SET_VRING_*, applied it (its own GET_CONFIG answer has the new value), and wrote the sector."""
    from vhost_user.trace import Tracer

    qsd = peers.qsd_raw(size=1 << 20)
    front = peers.sock_path("trace-early-config.sock")
    lines: list[str] = []
    tracer = Tracer(front, qsd.sock, emit=lines.append)
    tracer.start_listening()
    relaying = asyncio.create_task(tracer.serve(connections=1))
    writeback = 0x100 + 32  # virtio 1.2 §5.2.4: struct virtio_blk_config's writeback, in the window
    stopped = False
    try:
        async with asyncio.timeout(TIMEOUT), \
                served("zerocopy", ram, lambda: AsyncFrontend.connect(str(front))) as guest:
            device = guest.device
            assert device is not None and device.frontend is not None
            before = device.mmio(writeback, 1, False, 0)
            assert before in (0, 1)
            await guest.set_up()
            os.kill(qsd.process.pid, signal.SIGSTOP)
            stopped = True
            answered: list[object] = []
            for reg, size, value in ((Reg.STATUS, 4, DRIVER_OK), (writeback, 1, 1 - before)):
                result = device.mmio(reg, size, True, value)
                try:  # (a coroutine, if the write has something to wait for)
                    if result is not None:
                        await asyncio.wait_for(result, HANG)  # type: ignore[arg-type]
                    answered.append(True)
                except TimeoutError:
                    answered.append(False)
            assert answered == [True, True], "a write waited for the stopped back-end"
            assert device.starting is not None, "the start did not wait for the stopped qsd"
            assert guest.status() == DRIVER_OK and device.mmio(writeback, 1, False, 0) == 1 - before
            guest.queue_write(0)
            assert guest.mmio(Reg.QUEUE_NOTIFY, 0) is None
            os.kill(qsd.process.pid, signal.SIGCONT)
            stopped = False
            assert await guest.completions(1) == [0] and guest.status_byte(0) == b"\x00"
            if device.starting is not None:
                await device.starting
            assert device.stats.starts == 1
            config = await device.frontend.get_config(0, 60)
            assert config[32] == 1 - before, "qsd did not apply the writeback field"
    finally:
        if stopped:
            os.kill(qsd.process.pid, signal.SIGCONT)
        await asyncio.wait_for(relaying, TIMEOUT)
    sent = [m.group(1) for line in lines if (m := re.match(r" *\d+ F->B (\w+)\(", line))]
    assert "SET_CONFIG" in sent, sent
    acked = [line for line in lines if re.match(r" *\d+ B->F SET_CONFIG\(", line)]
    assert len(acked) == 1 and "REPLY_ACK u64=0x0 (success)" in acked[0], acked
    assert sent.index("SET_MEM_TABLE") < sent.index("SET_CONFIG") < min(
        i for i, name in enumerate(sent) if name.startswith("SET_VRING_")), sent
    assert qsd.image is not None
    with open(qsd.image, "rb") as f:
        assert f.read(512) == b"\x01" * 512
