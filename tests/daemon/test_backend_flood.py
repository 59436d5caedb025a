"""A back-end flooding its request channel (issue 17, defect 1): CONFIG_CHANGE_MSG without
NEED_REPLY, 20,000 of them, from a Python stand-in back-end (the library's RAM disk) over a
socketpair, while the same daemon's other device serves block I/O.

What must hold: the daemon's memory and log stay bounded, CONFIG_CHANGE is coalesced (one
GET_CONFIG pending at most, the guest sees one config interrupt per change), the flooding back-end
is disconnected with a logged reason and reconnected like any lost back-end, and the other
device's I/O goes on all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable

import pytest

from tests.daemon.backends import StandInBackends
from vhost_user import ChannelFlood, VhostUserError
from vhost_user.aio import BACKEND_REQUEST_BURST, BackendServer, FdSocket
from vhost_user.testing import RamDiskBlk
from vhost_user.virtqueue import FlatMemory, SplitQueueDriver
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg

TIMEOUT = 60.0
RAM_BASE, RAM_SIZE = 0x4000_0000, 1 << 20
QSIZE = 64
FLOOD = 20_000  # messages the back-end sends
MEMORY_BOUND = 8 << 20  # bytes the daemon's Python heap may grow by (tracemalloc peak)
LOG_BOUND = 100  # INFO-and-above lines the flood may cause


class Counting(logging.Handler):
    """Counts records (keeps none); sets ``seen`` when a message containing ``watch`` is logged."""

    def __init__(self, watch: str = "") -> None:
        super().__init__(logging.DEBUG)
        self.by_level: dict[int, int] = {}
        self.messages: list[str] = []  # INFO and above, for the assertions' messages (bounded below)
        self.watch = watch
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.by_level[record.levelno] = self.by_level.get(record.levelno, 0) + 1
        msg = record.getMessage()
        if record.levelno >= logging.INFO and len(self.messages) < 1000:
            self.messages.append(msg)
        if self.watch and self.watch in msg:
            self.seen.set()

    def at_least(self, level: int) -> int:
        return sum(n for lv, n in self.by_level.items() if lv >= level)


class Backends(StandInBackends):
    """A connect() for a Device: every call starts a fresh RAM-disk back-end over a socketpair."""

    def make_server(self, sock: FdSocket) -> BackendServer:
        return BackendServer(RamDiskBlk(1 << 20), sock)


class Driver:
    """The guest's virtio-blk driver for one device: its rings in the shared RAM memfd."""

    def __init__(self, device: Device, ram: mmap.mmap, base: int) -> None:
        self.device, self.ram, self.base = device, ram, base
        self.desc, self.avail, self.used = base, base + 0x1000, base + 0x2000
        self.buf = base + 0x3000
        self.irq = asyncio.Event()

    async def w(self, reg: int, value: int) -> None:
        result = self.device.mmio(reg, 4, True, value)
        if result is not None:
            await result

    async def bring_up(self) -> None:
        for value in (0, 1, 3):
            await self.w(Reg.STATUS, value)
        for sel, value in ((0, 0), (1, 1)):  # VERSION_1
            await self.w(Reg.DRIVER_FEATURES_SEL, sel)
            await self.w(Reg.DRIVER_FEATURES, value)
        await self.w(Reg.STATUS, 11)
        await self.w(Reg.QUEUE_SEL, 0)
        await self.w(Reg.QUEUE_NUM, QSIZE)
        for reg, addr in ((Reg.QUEUE_DESC_LOW, self.desc), (Reg.QUEUE_DRIVER_LOW, self.avail),
                          (Reg.QUEUE_DEVICE_LOW, self.used)):
            await self.w(reg, addr)
            await self.w(reg + 4, 0)
        self.mem = FlatMemory(self.ram, base=RAM_BASE)
        self.drv = SplitQueueDriver(self.mem, QSIZE, self.desc, self.avail, self.used)
        await self.w(Reg.QUEUE_READY, 1)
        await self.w(Reg.STATUS, 15)

    def put(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - RAM_BASE : gpa - RAM_BASE + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - RAM_BASE : gpa - RAM_BASE + n])

    async def write_read(self, sector: int, data: bytes) -> None:
        """One write then one read back of ``data`` (512 bytes) at ``sector``; checks both."""
        hdr, payload, status = self.buf, self.buf + 0x200, self.buf + 0x400
        for kind in (1, 0):  # VIRTIO_BLK_T_OUT, then VIRTIO_BLK_T_IN
            pending = self.device.mmio(Reg.INTERRUPT_STATUS, 4, False, 0)
            assert isinstance(pending, int)
            if pending:  # e.g. the used-ring re-check after a reconnect: lower the line first
                await self.w(Reg.INTERRUPT_ACK, pending)
            self.put(hdr, struct.pack("<IIQ", kind, 0, sector))
            self.put(status, b"\xff")
            if kind == 1:
                self.put(payload, data)
                self.drv.add(readable=[(hdr, 16), (payload, 512)], writable=[(status, 1)], token=kind)
            else:
                self.put(payload, bytes(512))
                self.drv.add(readable=[(hdr, 16)], writable=[(payload, 512), (status, 1)], token=kind)
            await self.w(Reg.QUEUE_NOTIFY, 0)
            while not (done := self.drv.get_used()):
                self.irq.clear()
                await self.irq.wait()
            assert [t for t, _ in done] == [kind] and self.get(status, 1) == b"\x00"
            await self.w(Reg.INTERRUPT_ACK, 1)
        assert self.get(payload, 512) == data

    def close(self) -> None:
        self.drv.release()
        self.mem.release()


def _device(devid: int, memory: FdExport, connect: Callable[[], object], set_irq: Callable[[bool], None]) -> Device:
    return Device(DeviceConfig(devid=devid, device_id=2, base=0x200_0000 + 0x200 * devid, irq=33 + devid,
                               queue_size=QSIZE, num_queues=1),
                  connect=connect, memory=memory, set_irq=set_irq,  # type: ignore[arg-type]
                  log=device_logger("xvm.test.flood", 1, f"blk{devid}"))


@contextlib.asynccontextmanager
async def two_disks() -> AsyncIterator[tuple[list[Device], list[Driver], list[Backends]]]:
    """Two virtio-blk devices of one guest (one event loop, like one daemon), each on its own
    RAM-disk back-ends, zero-copy over one RAM memfd."""
    fd = os.memfd_create("flood-test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_SIZE)
    ram = mmap.mmap(fd, RAM_SIZE)
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with _disks(stack, fd, ram) as found:
                yield found
    finally:
        ram.close()
        os.close(fd)


@contextlib.asynccontextmanager
async def _disks(stack: contextlib.AsyncExitStack, fd: int, ram: mmap.mmap,
                 ) -> AsyncIterator[tuple[list[Device], list[Driver], list[Backends]]]:
    backends = [Backends(stack), Backends(stack)]
    devices: list[Device] = []
    drivers: list[Driver] = []
    for i in range(2):
        holder: list[Driver] = []
        export = FdExport([FdRegion(RAM_BASE, RAM_SIZE, fd)],
                          lambda gpa, n: bytes(ram[gpa - RAM_BASE : gpa - RAM_BASE + n]))
        device = _device(i, export, backends[i].connect,
                         lambda level, h=holder: h[0].irq.set() if level and h else None)
        driver = Driver(device, ram, RAM_BASE + 0x10000 * (i + 1))
        holder.append(driver)
        devices.append(device)
        drivers.append(driver)
    try:
        for device, driver in zip(devices, drivers, strict=True):
            await device.start()
            await driver.bring_up()
        yield devices, drivers, backends
    finally:
        for device in devices:
            await device.close()
        for driver in drivers:
            if hasattr(driver, "drv"):
                driver.close()


async def flood(server: BackendServer, count: int) -> int:
    """Send ``count`` CONFIG_CHANGE_MSG without NEED_REPLY on ``server``'s channel, as fast as the
    socket takes them; returns how many were written before the front-end hung up."""
    assert server.channel is not None and server.channel_sock is not None
    one = server.channel.config_change(need_reply=False).data
    sent, batch = 0, 500
    try:
        while sent < count:
            n = min(batch, count - sent)
            await server.channel_sock.send(one * n, [])
            sent += n
    except (VhostUserError, OSError):
        pass
    return sent


async def attack(device: Device, backends: Backends, total: int) -> tuple[int, int]:
    """Flood every connection ``device`` makes until ``total`` messages were sent; returns
    (messages sent, connections flooded)."""
    sent = flooded = 0
    while sent < total:
        sent += await flood(backends.servers[-1], total - sent)
        flooded += 1
        if sent < total:  # hung up on: flood the connection the device makes next
            reconnect = device.reconnecting
            assert reconnect is not None, "the front-end hung up but the device does not reconnect"
            await reconnect
            assert device.frontend is not None and not device.frontend.broken
    return sent, flooded


@pytest.mark.asyncio
async def test_config_change_flood_is_bounded_disconnected_and_the_other_disk_keeps_serving(no_fd_leak):
    log = logging.getLogger("xvm.test.flood")
    lib_log = logging.getLogger("vhost_user")
    counter = Counting(watch="flooded")
    saved = (log.level, lib_log.level)
    log.setLevel(logging.DEBUG)
    lib_log.setLevel(logging.DEBUG)
    log.addHandler(counter)
    lib_log.addHandler(counter)
    try:
        async with asyncio.timeout(TIMEOUT), two_disks() as (devices, drivers, backends):
            victim, other = devices
            first = backends[0].frontends[0]
            await drivers[1].write_read(1, b"\x5a" * 512)
            tracemalloc.start()
            base_mem, _ = tracemalloc.get_traced_memory()
            lines_before = counter.at_least(logging.INFO)

            attacker = asyncio.get_running_loop().create_task(attack(victim, backends[0], FLOOD))
            served = 0  # the other disk, during the attack: write and read back
            while not attacker.done():
                await drivers[1].write_read(2 + served % 100, bytes([served % 256]) * 512)
                served += 1
            sent, flooded = await attacker
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            lines = counter.at_least(logging.INFO) - lines_before
            figures = (f"{sent} CONFIG_CHANGE_MSG sent over {flooded} connection(s), heap peak "
                       f"+{(peak - base_mem) >> 10} KiB, {lines} lines at INFO+, {served} write+read pairs "
                       "served on the other disk during the attack")
            print(f"\nflood: {figures}")
            # bounded: memory, log lines, queues, tasks
            assert peak - base_mem < MEMORY_BOUND, figures
            assert lines <= LOG_BOUND, (figures, counter.messages[:10])
            assert all(fe.backend_events.qsize() <= fe.backend_events.maxsize > 0 for fe in backends[0].frontends)
            assert len(victim._tasks) <= 1, figures  # noqa: SLF001

            # every flooding connection was dropped (the last one may still be reading what the
            # socket buffered when the attack ended), the reason logged ...
            for fe in backends[0].frontends[:flooded]:
                await fe.lost.wait()
                assert isinstance(fe.error, ChannelFlood), fe.error
            assert first.lost.is_set()
            assert counter.seen.is_set()
            # ... and treated like any lost back-end: a new connection, the device resumed
            reconnect = victim.reconnecting
            if reconnect is not None:
                await reconnect
            assert victim.stats.reconnects == flooded and victim.model.active
            assert not backends[0].frontends[flooded].broken
            await drivers[0].write_read(3, b"\xa5" * 512)
            # the other disk served I/O during the attack and still does
            assert served >= 1
            await drivers[1].write_read(4, b"\x3c" * 512)
            assert other.model.active and other.stats.reconnects == 0
    finally:
        log.removeHandler(counter)
        lib_log.removeHandler(counter)
        log.setLevel(saved[0])
        lib_log.setLevel(saved[1])


@pytest.mark.asyncio
async def test_config_changes_within_the_bound_are_coalesced_one_refresh_one_guest_interrupt(no_fd_leak):
    async with asyncio.timeout(TIMEOUT), two_disks() as (devices, drivers, backends):
        device, server = devices[0], backends[0].servers[0]
        disk = server.device
        assert isinstance(disk, RamDiskBlk)
        gets = 0
        get_config = disk.get_config

        def counted(offset: int, size: int) -> bytes:
            nonlocal gets
            gets += 1
            return get_config(offset, size)

        disk.get_config = counted  # type: ignore[method-assign]
        disk.size *= 2  # the disk grew: the config's capacity changes
        generation, interrupts = device.model.config_generation, device.stats.interrupts
        burst = BACKEND_REQUEST_BURST // 2
        assert server.channel is not None and server.channel_sock is not None
        await server.channel_sock.send(server.channel.config_change(need_reply=False).data * burst, [])
        # the last message answered: one NEED_REPLY message after the burst, its ACK ordered after
        await server.send_config_change()
        while device._tasks:  # noqa: SLF001 (the refreshes the messages started)
            await asyncio.wait(set(device._tasks))  # noqa: SLF001
        assert not backends[0].frontends[0].broken
        assert 1 <= gets <= 3, gets  # not one per message
        assert device.model.config_generation == generation + 1  # one change seen by the guest ...
        assert device.stats.interrupts - interrupts == 1  # ... with one config interrupt
        assert device.model.interrupt_status & 2  # INT_CONFIG
        assert backends[0].frontends[0].backend_events.qsize() <= backends[0].frontends[0].backend_events.maxsize
