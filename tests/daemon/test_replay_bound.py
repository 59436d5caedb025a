"""No replay loops (issue 17, defect 2), without a simulator: the shadow data path over a RAM
buffer, a stand-in back-end (the library's RAM disk) that drops the connection whenever it is
handed one particular request.

A chain still in flight after the back-end dropped the connection MAX_LOSSES_IN_FLIGHT times in a
row is not published again: the queue stops, the device goes to DEVICE_NEEDS_RESET with a logged
reason, the reconnects are bounded, and once the guest resets the device its I/O works again.
Chains that make no back-end drop anything are checked too: zero-length buffers are refused as a
guest error before any back-end sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vhost_user import AsyncFrontend
from vhost_user.aio import BackendServer, FdSocket
from vhost_user.testing import RamDiskBlk
from tests.daemon.backends import StandInBackends, serve_pair
from tests.daemon.test_backend_flood import QSIZE, RAM_BASE, RAM_SIZE, Counting, Driver
from tests.daemon.test_faults import TIMEOUT as STEP, TwoDisks, _tear_down
from tests.peers import programs
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import DeviceStatus, GuestDriverError, GuestPageAllocator
from xen_vhost_sim.tools.faultbench import QsdProcess
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.shadow import MAX_LOSSES_IN_FLIGHT, ShadowDataPath
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg
from vhost_user.virtqueue import FlatMemory

TIMEOUT = 30.0
POISON = 7  # the sector whose requests make the stand-in back-end drop the connection
RUNAWAY = 10  # connections after which the test calls it a replay loop
NEEDS_RESET = 0x40


class PoisonBlk(RamDiskBlk):
    """A RAM disk that drops its connection (no completion) when a request for POISON arrives."""

    def __init__(self, drop: Any) -> None:
        super().__init__(1 << 20, event_idx=False)
        self.drop = drop
        self.poisoned = 0

    def handle_request(self, chain: Any, read_buffers: Any, write_buffers: Any) -> int:
        header = read_buffers(self.memory, chain.readable)[:16]
        if len(header) == 16 and struct.unpack_from("<IIQ", header)[2] == POISON:
            self.poisoned += 1
            # a moment later, as a back-end crashing on it does (the daemon may have finished
            # resuming it, or still be waiting for an answer: both are one more loss)
            asyncio.get_running_loop().call_later(0.01, self.drop)
            raise ValueError("poisoned request: dropping the connection")  # the server stops the ring
        return super().handle_request(chain, read_buffers, write_buffers)


class Backends(StandInBackends):
    """connect() for a Device: a fresh PoisonBlk over a socketpair on every call."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        super().__init__(stack)
        self.disks: list[PoisonBlk] = []
        self.runaway = asyncio.Event()

    def make_server(self, sock: FdSocket) -> BackendServer:
        disk = PoisonBlk(lambda: sock.sock.shutdown(socket.SHUT_RDWR))
        self.disks.append(disk)
        if len(self.disks) >= RUNAWAY:
            self.runaway.set()
        return BackendServer(disk, sock)


@contextlib.asynccontextmanager
async def shadow_disk() -> AsyncIterator[tuple[Device, Driver, Backends, ShadowDataPath]]:
    ram = mmap.mmap(-1, RAM_SIZE)
    try:
        async with contextlib.AsyncExitStack() as stack:
            backends = Backends(stack)
            log = device_logger("xvm.test.replay", 1, "blk0")
            holder: list[Device] = []
            guest_memory = FlatMemory(ram, RAM_BASE)  # the daemon's map of the guest's RAM
            stack.callback(guest_memory.release)
            shadow = ShadowDataPath(guest_memory, [(RAM_BASE, RAM_SIZE)], pool_size=1 << 20,
                                    max_queues=1, max_queue_size=QSIZE, log=log,
                                    on_error=lambda i, reason: holder[0].fail(f"shadow queue {i} stopped: {reason}"))
            driver_box: list[Driver] = []
            device = Device(DeviceConfig(devid=0, device_id=2, base=0x200_0000, irq=33, queue_size=QSIZE, num_queues=1),
                            connect=backends.connect, memory=shadow, log=log,
                            set_irq=lambda level: driver_box[0].irq.set() if level and driver_box else None)
            holder.append(device)
            driver = Driver(device, ram, RAM_BASE + 0x10000)
            driver_box.append(driver)
            try:
                await device.start()
                await driver.bring_up()
                yield device, driver, backends, shadow
            finally:
                await device.close()
                shadow.close()
                if hasattr(driver, "drv"):
                    driver.close()
    finally:
        ram.close()


async def reset_and_bring_up(driver: Driver) -> None:
    await driver.w(Reg.STATUS, 0)
    driver.close()
    await driver.bring_up()


@pytest.mark.asyncio
async def test_a_chain_that_makes_the_backend_drop_the_connection_is_not_replayed_forever(no_fd_leak):
    logger = logging.getLogger("xvm.test.replay")
    counter = Counting(watch="not publishing it again")
    logger.addHandler(counter)
    try:
        async with asyncio.timeout(TIMEOUT), shadow_disk() as (device, driver, backends, shadow):
            await driver.write_read(1, b"\x11" * 512)  # the disk works
            hdr, status = driver.buf, driver.buf + 0x400
            driver.put(hdr, struct.pack("<IIQ", 0, 0, POISON))
            driver.drv.add(readable=[(hdr, 16)], writable=[(driver.buf + 0x200, 512), (status, 1)], token="poison")
            await driver.w(Reg.QUEUE_NOTIFY, 0)
            gave_up = asyncio.get_running_loop().create_task(counter.seen.wait())
            runaway = asyncio.get_running_loop().create_task(backends.runaway.wait())
            await asyncio.wait({gave_up, runaway}, return_when=asyncio.FIRST_COMPLETED)
            gave_up.cancel()
            runaway.cancel()
            poisoned = sum(d.poisoned for d in backends.disks)
            assert not backends.runaway.is_set(), f"replay loop: {len(backends.disks)} connections, poisoned {poisoned} times"
            # bounded: the chain went to MAX_LOSSES_IN_FLIGHT back-ends, no more
            assert poisoned == MAX_LOSSES_IN_FLIGHT
            reconnect = device.reconnecting
            if reconnect is not None:
                await reconnect
            assert device.stats.reconnects == MAX_LOSSES_IN_FLIGHT == len(backends.disks) - 1
            assert device.model.status & NEEDS_RESET
            assert "not publishing it again" in device.stats.last_error
            assert shadow.broken(0) is not None
            # the guest resets the device: I/O works again, on the connection the device has
            await reset_and_bring_up(driver)
            await driver.write_read(2, b"\x22" * 512)
            assert device.model.active and not device.model.status & NEEDS_RESET
            assert len(backends.disks) == MAX_LOSSES_IN_FLIGHT + 1 and device.frontend is not None
            assert not device.frontend.broken
    finally:
        logger.removeHandler(counter)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["data", "status"])
async def test_a_zero_length_buffer_is_refused_as_a_guest_error_before_any_backend_sees_it(no_fd_leak, where):
    logger = logging.getLogger("xvm.test.replay")
    counter = Counting(watch="length 0")
    logger.addHandler(counter)
    try:
        async with asyncio.timeout(TIMEOUT), shadow_disk() as (device, driver, backends, shadow):
            await driver.write_read(1, b"\x11" * 512)
            hdr, data, status = driver.buf, driver.buf + 0x200, driver.buf + 0x400
            driver.put(hdr, struct.pack("<IIQ", 0, 0, 3))
            lengths = {"data": (0, 1), "status": (512, 0)}[where]
            driver.drv.add(readable=[(hdr, 16)], writable=[(data, lengths[0]), (status, lengths[1])], token="zero")
            await driver.w(Reg.QUEUE_NOTIFY, 0)
            await counter.seen.wait()
            assert device.model.status & NEEDS_RESET
            assert "length 0" in (shadow.broken(0) or "")
            assert device.stats.reconnects == 0 and len(backends.disks) == 1  # the back-end never saw it
            await reset_and_bring_up(driver)
            await driver.write_read(2, b"\x22" * 512)
            assert device.model.active
    finally:
        logger.removeHandler(counter)


# --- with qemu-storage-daemon and the simulated guest's driver ---------------------------------------


@pytest.mark.peer
@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_qsd_never_sees_a_zero_length_buffer_no_reconnect_loop_guest_reset_recovers(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path, caplog):
    """qemu-storage-daemon (libvhost-user) refuses a zero-sized buffer and drops the connection;
    the shadow path used to pass one through and publish it again to every new connection. Now the
    guest's chain is refused as a guest error: the device goes to DEVICE_NEEDS_RESET with the reason
    logged, at most MAX_LOSSES_IN_FLIGHT reconnects happen (none here), and after the guest's
    reset the disk serves again, its data intact."""
    programs.require("qemu-storage-daemon")  # QsdProcess looks it up in PATH
    caplog.set_level(logging.INFO)
    image = tmp_path / "a.raw"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    procs = [QsdProcess(str(image), str(tmp_path / "a.sock"), str(tmp_path / "a.log"))]
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=1)
    daemon = guest = None
    try:
        procs[0].start()
        await procs[0].wait_listening()
        daemon = TwoDisks(kernel, sim_control, domid, [procs[0].sock], request_timeout=5.0)
        device, shadow = daemon.devices[0], daemon.shadows[0]
        shadow.on_error = lambda i, reason: device.fail(f"shadow queue {i} stopped: {reason}")  # as the supervisor
        await daemon.start()
        guest = await SimGuest.connect(sim_host.path, domid)
        alloc = GuestPageAllocator(guest.ram)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), STEP)
        before = bytes(range(256)) * 64
        await asyncio.wait_for(blk.write(100, before), TIMEOUT)

        # a write whose data descriptor has len 0
        gpa = alloc.alloc(4096)
        with guest.ram.view(gpa, 16) as hdr:
            struct.pack_into("<IIQ", hdr, 0, 1, 0, 10)  # VIRTIO_BLK_T_OUT, sector 10
        with guest.ram.view(gpa + 16, 1) as st:
            st[0] = 0xFF
        fut = await blk.driver.submit(0, [(gpa, 16), (gpa + 512, 0)], [(gpa + 16, 1)])
        with pytest.raises(GuestDriverError):  # the driver sees DEVICE_NEEDS_RESET (or gives up waiting)
            await asyncio.wait_for(blk.driver.wait(fut), TIMEOUT)
        status = await asyncio.wait_for(guest.mmio_read(TwoDisks.BASES[0] + 0x70, 4, vcpu=0), TIMEOUT)
        assert device.stats.reconnects <= MAX_LOSSES_IN_FLIGHT, f"{device.stats.reconnects} reconnects"
        assert status & DeviceStatus.DEVICE_NEEDS_RESET, hex(status)
        assert device.stats.reconnects == 0 and device.frontend is not None and not device.frontend.broken
        assert any("length 0" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)

        # the guest resets the device and starts over: the disk serves, its data is there
        await asyncio.wait_for(blk.close(), TIMEOUT)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), STEP)
        assert await asyncio.wait_for(blk.read(100, len(before) // 512), TIMEOUT) == before
        after = b"\x77" * 4096
        await asyncio.wait_for(blk.write(300, after), TIMEOUT)
        assert await asyncio.wait_for(blk.read(300, 8), TIMEOUT) == after
        assert device.stats.reconnects == 0
        await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        await _tear_down(procs, guest, daemon, stopped=False)


class DropAfterConfig(RamDiskBlk):
    """A RAM disk that, once armed, drops its connection just after answering GET_CONFIG (the last
    request of the daemon's negotiation): every reconnect succeeds, and is lost at once."""

    armed = False

    def __init__(self, drop: Any) -> None:
        super().__init__(1 << 20, event_idx=False)
        self.drop = drop

    def get_config(self, offset: int, size: int) -> bytes:
        if DropAfterConfig.armed:
            asyncio.get_running_loop().call_later(0.01, self.drop)
        return super().get_config(offset, size)


@pytest.mark.asyncio
async def test_a_backend_lost_right_after_every_reconnect_gets_growing_pauses_not_a_spin(no_fd_leak):
    logger = logging.getLogger("xvm.test.replay")
    pauses: list[str] = []

    class Pauses(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "reconnecting" in msg:
                pauses.append(msg.split("reconnecting", 1)[1])

    handler = Pauses()
    logger.addHandler(handler)
    socks: list[FdSocket] = []

    def drop_after_config(b: FdSocket) -> BackendServer:
        socks.append(b)
        return BackendServer(DropAfterConfig(lambda: b.sock.shutdown(socket.SHUT_RDWR)), b)

    async def connect() -> AsyncFrontend:
        fe, server = serve_pair(drop_after_config, tasks)
        servers.append(server)
        if len(servers) == 7:
            seventh.set()
        return fe

    seventh = asyncio.Event()

    tasks: list[asyncio.Task[None]] = []
    servers: list[BackendServer] = []
    DropAfterConfig.armed = False
    device = Device(DeviceConfig(devid=0, device_id=2, base=0x200_0000, irq=33, queue_size=QSIZE, num_queues=1),
                    connect=connect, memory=ShadowDataPath(FlatMemory(bytearray(RAM_SIZE), RAM_BASE),
                                                           [(RAM_BASE, RAM_SIZE)], pool_size=1 << 20, max_queues=1,
                                                           max_queue_size=QSIZE),
                    set_irq=lambda level: None, log=device_logger("xvm.test.replay", 1, "blk0"))
    try:
        async with asyncio.timeout(TIMEOUT):
            await device.start()
            DropAfterConfig.armed = True
            socks[0].sock.shutdown(socket.SHUT_RDWR)  # the first loss; every reconnect is lost again
            await seventh.wait()  # six losses, six reconnects
            # the first reconnect is at once, then each waits twice as long as the one before
            assert pauses[:6] == ["", " in 0.05 s (2 losses in a row)", " in 0.1 s (3 losses in a row)",
                                  " in 0.2 s (4 losses in a row)", " in 0.4 s (5 losses in a row)",
                                  " in 0.8 s (6 losses in a row)"], pauses
    finally:
        DropAfterConfig.armed = False
        logger.removeHandler(handler)
        await device.close()
        device.memory.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            server.close()
