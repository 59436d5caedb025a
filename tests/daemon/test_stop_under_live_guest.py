"""``systemctl stop`` (SIGTERM) while the guest lives and uses its device: from the stop on, each
device's window answers as a removed device (reads 0: no interrupt pending, status 0; writes
dropped) with its interrupt line low, while its back-end stops; only then is the window unclaimed
and the IOREQ server destroyed. A guest vCPU that was in the device's interrupt handler when the
stop came finds the window still claimed for its InterruptStatus read and its InterruptACK write
(on Xen on Arm an unclaimed access is a data abort: tests/xenlab/README.md saw it kill a guest
in interrupt context).

The daemon runs in the test's event loop over the in-process simulated host (as in
test_waiting_backend.py); its back-end hangs at GET_VRING_BASE until the test lets it go, so the
teardown is caught half-way.

A guest that goes on posting requests after the stop (a virtio-net driver refills its receive
queue and transmits all the time) must not touch the window once it is unclaimed: its driver is
asked not to notify any more (virtio 1.2 §2.7.10) before the window goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from vhost_user import UnixListener
from vhost_user.testing import RamDiskBlk

from tests.daemon.test_reset_hostile import MisbehavingServer
from tests.daemon.test_waiting_backend import BASES, DOMID, IRQS, TIMEOUT, guest_domain, guest_of, logwatch, running  # noqa: F401  (fixture)
from xen_vhost_master.backend.blk import XenRamDiskBlk
from xen_vhost_master.backend.mapper import XenRegionMapper
from xen_vhost_master.config import MemoryMode
from xen_vhost_master.datapath.grant_export import GrantXenMmapExport
from xen_vhost_master.datapath.zerocopy import FdExport
from xen_vhost_master.platform import Platform
from xen_vhost_master.supervisor import Options
from xen_vhost_master.virtio_mmio import QueueConfig
from xen_vhost_master.xen.gntdev import GrantDev
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator, grant_dma_address

QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x50, 0x60, 0x64, 0x70  # virtio-mmio registers


class NotifyCounter:
    """A guest's bus that counts its QueueNotify writes to one window."""

    def __init__(self, bus: Any, base: int) -> None:
        self._bus, self._notify, self.notifies = bus, base + QUEUE_NOTIFY, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        if addr == self._notify:
            self.notifies += 1
        await self._bus.mmio_write(addr, size, value, vcpu)


@contextlib.asynccontextmanager
async def hanging_backend(sim_dir: str, device: Callable[[], RamDiskBlk]) -> AsyncIterator[list[MisbehavingServer]]:
    """Device 0's back-end (``device()``) at the socket the daemon connects to: it hangs at
    GET_VRING_BASE until its ``release`` is set (set on the way out in any case). The list holds
    it once the daemon has connected."""
    servers: list[MisbehavingServer] = []
    listener = UnixListener(os.path.join(sim_dir, "0.sock"))
    dev = device()

    async def serve() -> None:
        sock = await listener.accept(timeout=None)
        servers.append(MisbehavingServer(dev, sock, mode="hang"))
        await servers[0].run()

    backend = asyncio.ensure_future(serve())
    try:
        yield servers
    finally:
        for s in servers:
            s.release.set()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)
        listener.close()
        dev.memory.clear()  # (a XEN_MMAP back-end's mappings and their fds)


@pytest.mark.asyncio
async def test_sigterm_under_a_live_guest_answers_its_window_as_removed_with_the_line_low_until_unclaimed(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, logwatch):
    guest_domain(sim_control)
    base, irq = BASES[0], IRQS[0]
    async with hanging_backend(sim_dir, lambda: RamDiskBlk(1 << 20)) as servers:
        with logwatch() as log:
            async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon, \
                    guest_of(sim_host) as guest:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, base, irq, GuestPageAllocator(guest.ram)), TIMEOUT)
                data = os.urandom(4096)
                await asyncio.wait_for(blk.write(8, data), TIMEOUT)
                assert await asyncio.wait_for(blk.read(8, 8), TIMEOUT) == data
                assert await asyncio.wait_for(guest.mmio_read(base + STATUS, 4), TIMEOUT) == 0xF  # DRIVER_OK

                stop = asyncio.ensure_future(daemon.stop())
                await asyncio.wait_for(servers[0].asked.wait(), TIMEOUT)  # the back-end is being stopped
                assert not guest.irq_level(irq)
                assert await asyncio.wait_for(guest.mmio_read(base + INTERRUPT_STATUS, 4), TIMEOUT) == 0
                await asyncio.wait_for(guest.mmio_write(base + INTERRUPT_ACK, 4, 1), TIMEOUT)
                assert await asyncio.wait_for(guest.mmio_read(base + STATUS, 4), TIMEOUT) == 0
                assert not stop.done()
                servers[0].release.set()
                assert await asyncio.wait_for(stop, TIMEOUT) == 0
                assert not guest.irq_level(irq)
                # gone now: the simulator answers an unclaimed access all-ones (x86 HVM's answer)
                assert await asyncio.wait_for(guest.mmio_read(base + INTERRUPT_STATUS, 4), TIMEOUT) == 0xFFFFFFFF
                with pytest.raises(GuestDriverError, match="did not complete its reset"):  # (no device any more)
                    await asyncio.wait_for(blk.close(), TIMEOUT)  # the driver lets go of its rings all the same
            order = [i for i, line in enumerate(log.lines)
                     if "answered as a removed device" in line or "ioreq server" in line and "destroyed" in line]
            assert [("removed" in log.lines[i]) for i in order] == [True, False], [log.lines[i] for i in order]


async def _post(blk: VirtioBlk, allocator: GuestPageAllocator) -> asyncio.Future[int]:
    """One more read request of the guest, notified as its driver decides (used ring flags,
    avail_event); nobody completes it."""
    header, status = allocator.alloc(4096), allocator.alloc(4096)
    with blk.driver.bus.ram.view(header, 16) as mv:
        mv[:] = bytes(16)  # VIRTIO_BLK_T_IN, sector 0
    return await blk.driver.submit(0, readable=[(header, 16)], writable=[(status, 1)])


def _backend(platform: Platform, event_idx: bool, grants: bool) -> RamDiskBlk:
    """The RAM disk; for a grant guest one that maps the grant regions of XEN_MMAP itself."""
    if not grants:
        return RamDiskBlk(1 << 20, event_idx=event_idx)
    disk = XenRamDiskBlk(1 << 20, event_idx=event_idx)
    disk.xen_mapper = disk.release_mapper = XenRegionMapper(platform.kernel)
    return disk


@pytest.mark.parametrize(("memory", "grants", "data_path"), [
    (MemoryMode.SHADOW, False, "shadow"),
    (MemoryMode.SIM_MEMFD, False, "sim-memfd"),
    (MemoryMode.XEN_MMAP, True, "xen-mmap (grants)"),
], ids=["shadow", "zero-copy", "grant-zero-copy"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.asyncio
async def test_a_guest_posting_on_after_sigterm_is_asked_not_to_notify_and_never_touches_the_window(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, logwatch, event_idx, memory, grants, data_path):
    """Shadow virtqueues: from the stop on (the daemon alone sees the guest's rings). Zero copy
    (the back-end's view of guest RAM, here the simulator's memfd; for a grant guest the grant
    regions the back-end maps through gntdev): once the back-end has stopped its rings, before
    the window goes."""
    guest_domain(sim_control, devices=0)
    base, irq = BASES[0], IRQS[0]
    sim_control.add_virtio_device(DOMID, device_id=2, base=base, irq=irq, grant_usage=True if grants else None)
    opt = Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"), memory=memory)
    async with hanging_backend(sim_dir, lambda: _backend(platform, event_idx, grants)) as servers:
        with logwatch() as log:
            async with running(platform, opt) as daemon, guest_of(sim_host) as guest:
                try:
                    bus = NotifyCounter(guest, base)
                    allocator = GuestPageAllocator(guest.ram)
                    features = VirtioBlk.DEFAULT_FEATURES | (Feature.RING_EVENT_IDX if event_idx else 0)
                    blk = await asyncio.wait_for(VirtioBlk.attach(bus, base, irq, allocator, features=features,
                                                                  grants=grants), TIMEOUT)
                    assert blk.driver.has(Feature.RING_EVENT_IDX) == event_idx
                    assert blk.driver.has(Feature.ACCESS_PLATFORM) == grants
                    data = os.urandom(4096)
                    await asyncio.wait_for(blk.write(8, data), TIMEOUT)
                    assert await asyncio.wait_for(blk.read(8, 8), TIMEOUT) == data
                    assert bus.notifies > 0  # the driver notifies while the device serves
                    assert daemon.device(0)["data_path"] == data_path

                    stop = asyncio.ensure_future(daemon.stop())
                    await asyncio.wait_for(servers[0].asked.wait(), TIMEOUT)  # the back-end is being stopped
                    posted: list[asyncio.Future[int]] = []
                    if memory is MemoryMode.SHADOW:
                        before = bus.notifies
                        posted += [await asyncio.wait_for(_post(blk, allocator), TIMEOUT) for _ in range(8)]
                        assert bus.notifies == before, "the driver notified after the stop"
                    servers[0].release.set()
                    assert await asyncio.wait_for(stop, TIMEOUT) == 0
                    before = bus.notifies
                    assert any("ioreq server" in line and "destroyed" in line for line in log.lines)  # the window is gone
                    posted += [await asyncio.wait_for(_post(blk, allocator), TIMEOUT) for _ in range(8)]
                    assert bus.notifies == before, "the driver touched the unclaimed window"
                    assert not any(f.done() for f in posted)  # nobody served them
                    assert not guest.irq_level(irq)
                    with pytest.raises(GuestDriverError, match="did not complete its reset"):
                        await asyncio.wait_for(blk.close(), TIMEOUT)
                finally:  # a failed check must not leave the daemon waiting for the back-end
                    for server in servers:
                        server.release.set()
            assert sum("driver is asked not to notify" in line for line in log.lines) == 1  # once, at the stop


@pytest.mark.parametrize(("features", "flags_at", "flags", "avail_event"), [
    (0, 0x2000, 1, None),  # split: VIRTQ_USED_F_NO_NOTIFY in the used ring's flags
    (1 << 29, 0x2000, 1, (0xFFF0 + 0x8000) & 0xFFFF),  # split, EVENT_IDX: avail_event half the index space away
    (1 << 34, 0x2002, 1, None),  # packed: the device event suppression's RING_EVENT_FLAGS_DISABLE
], ids=["split", "split-event-idx", "packed"])
def test_zero_copy_quiesce_writes_the_suppression_the_ring_layout_has(features, flags_at, flags, avail_event):
    ram = bytearray(0x4000)
    desc, driver, device, num = 0x0000, 0x1000, 0x2000, 16
    ram[driver + 2:driver + 4] = (0xFFF0).to_bytes(2, "little")  # the driver's avail idx

    def read(gpa: int, n: int) -> bytes:
        return bytes(ram[gpa:gpa + n])

    def write(gpa: int, data: bytes) -> None:
        ram[gpa:gpa + len(data)] = data

    path = FdExport([], read, write)
    path.open_queue(QueueConfig(0, num, desc, driver, device), features | (1 << 32), -1)
    assert path.quiesce() == [0]
    assert int.from_bytes(ram[flags_at:flags_at + 2], "little") == flags
    got = int.from_bytes(ram[device + 4 + 8 * num:device + 6 + 8 * num], "little")
    assert got == (avail_event if avail_event is not None else 0)
    path.close_queue(0)
    assert path.quiesce() == []  # a queue the driver reset is never written again
    assert FdExport([], read).quiesce() == []  # no way to write guest memory: nothing asked


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.asyncio
async def test_grant_zero_copy_quiesce_writes_through_a_writable_grant_and_leaves_a_read_only_one_unwritten(
        no_fd_leak, sim_host, sim_control, kernel, caplog, event_idx):
    """Two queues of a grant guest over XEN_MMAP: queue 0's rings granted writable get the
    suppression (through the daemon's own gntdev mapping); queue 1's used ring the guest granted
    read-only stays byte for byte as it was, said in one line."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    export = GrantXenMmapExport(GrantDev(kernel), domid, 16 << 20, log=logging.getLogger("xvm.test.quiesce"))
    try:
        gfn = (int(sim_control.domain_info(domid)["banks"][0][0]) + (1 << 20)) >> 12
        with guest.ram.view(gfn << 12, 6 << 12) as v:
            v[:] = b"\xa5" * (6 << 12)
            for avail in (1 << 12, 4 << 12):
                v[avail + 2:avail + 4] = (0xFFF0).to_bytes(2, "little")  # the driver's avail idx
        refs = [guest.grant(gfn + i, readonly=i == 5) for i in range(6)]
        num, features = 16, 1 << 32 | (1 << 29 if event_idx else 0)
        for index in (0, 1):
            desc, driver, device = (grant_dma_address(ref) for ref in refs[3 * index:3 * index + 3])
            export.open_queue(QueueConfig(index, num, desc, driver, device), features, -1)
        with caplog.at_level(logging.WARNING):
            assert export.quiesce() == [0]
        used = (gfn + 2) << 12
        with guest.ram.view(used, 4 + 8 * num + 2) as v:
            assert int.from_bytes(v[:2], "little") == 1  # VIRTQ_USED_F_NO_NOTIFY
            assert v[2:4 + 8 * num] == b"\xa5" * (2 + 8 * num)  # the used index and ring untouched
            assert int.from_bytes(v[4 + 8 * num:], "little") == ((0xFFF0 + 0x8000) & 0xFFFF if event_idx else 0xA5A5)
        with guest.ram.view((gfn + 5) << 12, 4096) as v:
            assert bytes(v) == b"\xa5" * 4096  # the read-only grant's page is unwritten
        lines = [r.getMessage() for r in caplog.records if "not to notify" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("queue 1:") and "read-only" in lines[0], lines
        export.close_queue(0)
        export.close_queue(1)
        assert export.quiesce() == []  # queues the driver reset are never written again
    finally:
        export.close()
        guest.close()
