"""XEN_MMAP end to end: the daemon hands the back-end its privcmd fd + domid, and the back-end
(the project's Python RAM-disk, with ``XenRegionMapper``) foreign-maps the simulated guest through
that fd, as a rust-vmm back-end built with its ``xen`` feature would. No memfd anywhere."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from vhost_user import AsyncFrontend
from vhost_user.aio.server import serve_unix
from vhost_user.testing import RamDiskBlk
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device, DeviceError
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import XenMmapExport
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.memory import bank_layout, Arch
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_master.backend.mapper import XenRegionMapper

BASE, IRQ, TIMEOUT = 0x0200_0000, 33, 30.0


@pytest.mark.asyncio
async def test_python_backend_maps_the_guest_through_xen_mmap(sim_host, sim_control, kernel, sim_dir):
    domid = sim_control.create_domain(mem_bytes=32 << 20, holes=[(0x4100_0000, 0x10000)])
    banks = bank_layout(Arch.ARM64, 32 << 20)
    disk = RamDiskBlk(4 << 20)
    mapper, seen = XenRegionMapper(kernel), []

    def recording_mapper(region, fd):
        seen.append((region.xen_mmap_flags, region.domid, region.guest_phys_addr, region.memory_size))
        return mapper(region, fd)

    disk.xen_mapper = recording_mapper
    sock = os.path.join(sim_dir, "blk.sock")
    ready = asyncio.Event()
    backend = asyncio.ensure_future(serve_unix(lambda: disk, sock, connections=1, ready=ready.set))
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    log = device_logger("xvm.test", domid, "blk0")
    ioreq = IoreqServer(privcmd, evtchn, domid, log)
    device = Device(DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock),
                    connect=lambda: AsyncFrontend.connect(sock), memory=XenMmapExport(domid, banks, privcmd.fileno()),
                    set_irq=lambda level: ioreq.set_irq(IRQ, level), log=log)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        ioreq.create()
        await device.start()
        assert device.frontend is not None and device.frontend.has_protocol_feature(XenMmapExport.protocol_features)
        ioreq.add_window(BASE, 0x200, device)
        ioreq.enable()
        alloc = GuestPageAllocator(guest.ram, reserve=2 << 20)  # keep rings and buffers clear of the hole
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), TIMEOUT)
        assert blk.capacity == (4 << 20) // 512
        data = random.Random(5).randbytes(1 << 20)
        ops = [BlkOp("write", i * 128, data=data[i * 65536:(i + 1) * 65536]) for i in range(16)]
        await asyncio.wait_for(blk.batch(ops), TIMEOUT)
        got = await asyncio.wait_for(blk.batch([BlkOp("read", i * 128, count=128) for i in range(16)]), TIMEOUT)
        assert b"".join(got) == data
        assert bytes(disk.disk[: len(data)]) == data  # the back-end's own bytes
        assert seen == [(1, domid, 0x4000_0000, 32 << 20)]  # FOREIGN, the guest's domid, its RAM bank
        await blk.close()
    finally:
        guest.close()
        await ioreq.close()
        await device.close()
        evtchn.close()
        privcmd.close()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)


@pytest.mark.asyncio
async def test_backend_without_xen_mmap_is_refused_with_a_clear_error(sim_host, sim_control, kernel, sim_dir):
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    disk = RamDiskBlk(1 << 20)  # no xen_mapper: it does not offer XEN_MMAP
    sock = os.path.join(sim_dir, "plain.sock")
    ready = asyncio.Event()
    backend = asyncio.ensure_future(serve_unix(lambda: disk, sock, connections=1, ready=ready.set))
    privcmd = PrivCmd(kernel)
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        device = Device(DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock),
                        connect=lambda: AsyncFrontend.connect(sock),
                        memory=XenMmapExport(domid, bank_layout(Arch.ARM64, 16 << 20), privcmd.fileno()),
                        set_irq=lambda level: None, log=device_logger("xvm.test", domid, "blk0"))
        with pytest.raises(DeviceError, match="XEN_MMAP"):
            await device.start()
        assert device.frontend is None  # nothing half-open left behind
    finally:
        privcmd.close()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)


# --- grant-based guests over XEN_MMAP: grant regions, our Python back-end maps grants itself --------

import logging  # noqa: E402
import struct  # noqa: E402

from vhost_user import XenMmapFlags  # noqa: E402
from xen_vhost_master.datapath.grant_export import MAX_REGIONS, GrantXenMmapExport, grant_layout, ring_parts  # noqa: E402
from xen_vhost_master.guestmem.grants import GRANT_ADDR_BIT  # noqa: E402
from xen_vhost_sim.guest_driver import DeviceStatus, Feature, grant_dma_address  # noqa: E402
from xen_vhost_master.virtio_mmio import QueueConfig  # noqa: E402
from xen_vhost_master.xen.gntdev import GrantDev  # noqa: E402
from xen_vhost_master.backend.blk import XenRamDiskBlk  # noqa: E402
from xen_vhost_master.guestmem.grants import GrantBacking, OnDemandGrantBacking  # noqa: E402

RUSTVMM, SPEC = XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM, XenMmapFlags.NO_ADVANCE_MAP_SPEC
GRANT_FEATURES = int(VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX)


class GrantXenMmap:
    """A grant device exported over XEN_MMAP (as the supervisor's ``_grant_export`` builds it) to
    an in-process RamDiskBlk whose XenRegionMapper maps the grant regions through gntdev."""

    def __init__(self, kernel, domid: int, sim_dir: str, *, front: XenMmapFlags = RUSTVMM,
                 back: XenMmapFlags = RUSTVMM, span: int = 32 << 20) -> None:
        self.disk = XenRamDiskBlk(4 << 20)
        self.mapper = XenRegionMapper(kernel, no_advance=back)
        self.seen: list[tuple[int, int, int, int, object]] = []
        self.disk.release_mapper = self.mapper
        self.refusals = self.disk.refusals

        def recording_mapper(region, fd):
            backing = self.mapper(region, fd)
            self.seen.append((region.xen_mmap_flags, region.domid, region.guest_phys_addr, region.memory_size, backing))
            return backing

        self.disk.xen_mapper = recording_mapper
        self.sock = os.path.join(sim_dir, "gblk.sock")
        self.ready = asyncio.Event()
        self.backend = asyncio.ensure_future(serve_unix(lambda: self.disk, self.sock, connections=1, ready=self.ready.set))
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "gblk")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        self.export = GrantXenMmapExport(GrantDev(kernel), domid, span, no_advance=front, log=self.log)
        self.device = Device(DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=self.sock, grants=True),
                             connect=lambda: AsyncFrontend.connect(self.sock), memory=self.export,
                             set_irq=lambda level: self.ioreq.set_irq(IRQ, level), log=self.log)

    async def start(self) -> None:
        await asyncio.wait_for(self.ready.wait(), TIMEOUT)
        self.ioreq.create()
        await self.device.start()
        self.ioreq.add_window(BASE, 0x200, self.device)
        self.ioreq.enable()

    async def close(self) -> None:
        try:
            await self.ioreq.close()
            await self.device.close()
        finally:
            self.evtchn.close()
            self.privcmd.close()
            self.backend.cancel()
            await asyncio.gather(self.backend, return_exceptions=True)
            self.disk.memory.clear()


@pytest.mark.parametrize("no_advance", [RUSTVMM, SPEC], ids=["rust-vmm-0x8", "spec-0x100"])
@pytest.mark.asyncio
async def test_grant_guest_blk_through_xen_mmap_grant_regions(no_fd_leak, sim_host, sim_control, kernel, sim_dir, no_advance):
    domid = sim_control.create_domain(mem_bytes=32 << 20)
    gx = GrantXenMmap(kernel, domid, sim_dir, front=no_advance, back=no_advance)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await gx.start()
        assert gx.device.frontend is not None and gx.device.frontend.has_protocol_feature(XenMmapExport.protocol_features)
        assert list(gx.device.model.ram) == [(GRANT_ADDR_BIT, 32 << 20)]
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), grants=True,
                                                      features=GRANT_FEATURES, queue_size=64), TIMEOUT)
        assert blk.driver.has(Feature.ACCESS_PLATFORM)
        # the memory table: the rings in advance (one region per part, their exact sizes), the
        # rest of grant space on demand with the configured flag; one gntdev fd each, the guest's domid
        queue = gx.device.model.queues[0]
        rings = sorted(ring_parts(QueueConfig(0, queue.num, queue.desc, queue.driver, queue.device)))
        assert [(a, n) for a, n in rings] == [(queue.desc, 16 * 64), (queue.driver, 6 + 2 * 64), (queue.device, 6 + 8 * 64)]
        assert len(gx.seen) <= MAX_REGIONS
        advance = [(gpa, size) for flags, _d, gpa, size, _b in gx.seen if flags == XenMmapFlags.GRANT]
        assert advance == rings
        assert all(flags in (XenMmapFlags.GRANT, XenMmapFlags.GRANT | no_advance) and d == domid for flags, d, *_ in gx.seen)
        spans = sorted((gpa, size) for _f, _d, gpa, size, _b in gx.seen)
        assert spans[0][0] == GRANT_ADDR_BIT and sum(size for _gpa, size in spans) == 32 << 20  # covers it all
        assert all(a + n == b for (a, n), (b, _m) in zip(spans, spans[1:]))  # no holes, no overlap
        assert all(isinstance(b, GrantBacking) == (f == XenMmapFlags.GRANT) for f, _d, _g, _s, b in gx.seen)
        on_demand = [b for f, _d, _g, _s, b in gx.seen if isinstance(b, OnDemandGrantBacking)]
        data = random.Random(9).randbytes(256 << 10)
        async with asyncio.timeout(TIMEOUT):
            for sector, size in ((0, 4096), (17, 512), (100, 3 * 4096 + 512)):
                await blk.write(sector, data[:size])
                assert await blk.read(sector, size // 512) == data[:size]
            ops = [BlkOp("write", 1000 + 32 * i, data=data[i * 16384:(i + 1) * 16384]) for i in range(16)]  # QD 16
            await blk.batch(ops)
            got = await blk.batch([BlkOp("read", op.sector, count=32) for op in ops])
            assert got == [op.data for op in ops]
            await blk.flush()  # one more round trip: the guest has ended the grants of the earlier ones
        assert bytes(gx.disk.disk[1000 * 512:1000 * 512 + len(data)]) == data  # the back-end's own bytes
        maps = sum(b.memory.stats.maps for b in on_demand)
        assert maps >= 2 * 16 and sum(b.memory.stats.read_only for b in on_demand) >= 16  # headers are read-only grants
        assert sum(b.memory.mapped_pages for b in on_demand) == 0  # data pages unmapped after use
        assert blk.driver.live_grants == len(blk.driver.queues[0].grant_refs)  # the guest could end every data grant
        assert gx.refusals.count == 0
        await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        guest.close()
        await gx.close()


@pytest.mark.asyncio
async def test_no_advance_values_must_agree(no_fd_leak, sim_host, sim_control, kernel, sim_dir, caplog):
    """The front-end says 0x100 (spec), the back-end understands 0x8 (rust-vmm): the back-end
    refuses the memory table, the device shows NEEDS_RESET (logged); nothing crashes."""
    caplog.set_level(logging.WARNING)
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    gx = GrantXenMmap(kernel, domid, sim_dir, front=SPEC, back=RUSTVMM, span=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await gx.start()
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), grants=True,
                                                      features=GRANT_FEATURES, queue_size=64), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            while not await blk.driver.read_status() & DeviceStatus.DEVICE_NEEDS_RESET:
                await asyncio.sleep(0.01)
        assert any("0x102" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert not any(isinstance(b, GrantBacking) for *_x, b in gx.seen)  # nothing was mapped
        await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        guest.close()
        await gx.close()


@pytest.mark.asyncio
async def test_write_into_a_read_only_grant_is_refused_and_logged(no_fd_leak, sim_host, sim_control, kernel, sim_dir, caplog):
    """A hostile chain: a blk READ whose data buffer is a READ-ONLY grant marked device-writable.
    The back-end maps it read-only, refuses that request (logged, used length 0), the page is
    untouched, and the queue keeps serving."""
    caplog.set_level(logging.ERROR)
    domid = sim_control.create_domain(mem_bytes=32 << 20)
    gx = GrantXenMmap(kernel, domid, sim_dir)
    gx.disk.disk[:4096] = b"\x77" * 4096
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await gx.start()
        alloc = GuestPageAllocator(guest.ram)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc, grants=True, features=GRANT_FEATURES,
                                                      queue_size=64), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            assert await blk.read(0, 8) == b"\x77" * 4096
        hdr, data, status = alloc.alloc(4096), alloc.alloc(4096), alloc.alloc(4096)
        with guest.ram.view(hdr, 16) as v:
            v[:] = struct.pack("<IIQ", 0, 0, 0)  # VIRTIO_BLK_T_IN, sector 0
        with guest.ram.view(data, 4096) as v:
            v[:] = b"\x11" * 4096
        refs = [guest.grant(hdr >> 12, readonly=True), guest.grant(data >> 12, readonly=True),
                guest.grant(status >> 12, readonly=False)]
        driver = blk.driver
        driver.grants = False  # post the addresses as they are (no granting by the driver)
        try:
            fut = await asyncio.wait_for(driver.submit(0, readable=[(grant_dma_address(refs[0]), 16)],
                                                       writable=[(grant_dma_address(refs[1]), 4096),
                                                                 (grant_dma_address(refs[2]), 1)]), TIMEOUT)
            written = await driver.wait(fut, TIMEOUT)
        finally:
            driver.grants = True
        assert written == 0 and gx.refusals.count == 1 and "read-only" in gx.refusals.last
        assert any("read-only" in r.getMessage() and f"{grant_dma_address(refs[1]):#x}" in r.getMessage()
                   for r in caplog.records if r.levelno >= logging.ERROR)
        with guest.ram.view(data, 4096) as v:
            assert bytes(v) == b"\x11" * 4096  # nothing written into the page
        for ref in refs:
            guest.revoke(ref)
        async with asyncio.timeout(TIMEOUT):  # the queue keeps serving
            await blk.write(16, b"\x5a" * 4096)
            assert await blk.read(16, 8) == b"\x5a" * 4096
        assert not await asyncio.wait_for(driver.read_status(), TIMEOUT) & DeviceStatus.DEVICE_NEEDS_RESET
        await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        guest.close()
        await gx.close()


# --- the layout on its own (pure) ----------------------------------------------------------------


def _q(index: int, ref: int, num: int = 64) -> QueueConfig:
    g = grant_dma_address(ref)
    return QueueConfig(index, num, g, g + 16 * num, g + ((16 * num + 6 + 2 * num + 3) & ~3))


@pytest.mark.parametrize("no_advance", [RUSTVMM, SPEC])
def test_grant_layout_one_region_per_ring_part_and_gaps_on_demand(no_advance):
    q = _q(0, 8)
    layout = grant_layout([q], 64 << 20, no_advance)
    assert layout is not None and len(layout) <= MAX_REGIONS
    assert [(r.addr, r.size) for r in layout if r.in_advance] == sorted(ring_parts(q))
    assert all(r.flags == XenMmapFlags.GRANT | no_advance for r in layout if not r.in_advance)
    assert layout[0].addr == GRANT_ADDR_BIT and layout[-1].addr + layout[-1].size == GRANT_ADDR_BIT + (64 << 20)
    assert all(a.addr + a.size == b.addr for a, b in zip(layout, layout[1:]))


def test_grant_layout_merges_rings_to_fit_and_gives_up_beyond():
    two = grant_layout([_q(0, 8), _q(1, 100)], 64 << 20, RUSTVMM)  # 6 parts + 5 gaps > 8: merged per queue
    assert two is not None and len(two) == 5 and sum(r.in_advance for r in two) == 2
    assert grant_layout([_q(i, 8 + 100 * i) for i in range(4)], 64 << 20, RUSTVMM) is None  # 4 + 5 > 8
    packed = grant_layout([_q(i, 8 + i) for i in range(4)], 64 << 20, RUSTVMM)  # adjacent rings: one region
    assert packed is not None and sum(r.in_advance for r in packed) == 1
    from xen_vhost_master.errors import GuestFault

    with pytest.raises(GuestFault, match="outside"):
        grant_layout([_q(0, (64 << 20) >> 12)], 64 << 20, RUSTVMM)


def test_grant_export_falls_back_to_shadow_when_the_rings_do_not_fit(caplog):
    """Scattered rings of four queues: the export serves that activation with the shadow path
    (its memfd region as a XEN_MMAP UNIX region, flags 0; a going device's driver is asked not to
    notify by it), logged; zero copy again when they fit."""
    caplog.set_level(logging.WARNING)

    class FakeShadow:
        def __init__(self):
            self.opened, self.closed = [], False

        def regions(self, queues):
            from vhost_user import MemoryRegion

            return [MemoryRegion(guest_phys_addr=1 << 40, memory_size=1 << 20, userspace_addr=1 << 40, mmap_offset=0)], [99]

        def open_queue(self, queue, features, kick_fd, *, resume=False):
            self.opened.append(queue.index)
            return "shadow rings"

        def close_queue(self, index):
            pass

        def quiesce(self):
            return list(self.opened)

        def close(self):
            self.closed = True

    shadow, rings = FakeShadow(), [[_q(i, 8 + 100 * i) for i in range(4)]]

    class Dev:
        def __init__(self):
            self.fd = 77
            self.kernel = None

        def fileno(self):
            return self.fd

        def close(self):
            self.fd = -1

    gntdev = Dev()
    export = GrantXenMmapExport(gntdev, 5, 64 << 20, fallback=lambda: shadow)
    table, fds = export.regions(rings[0])
    assert [(r.xen_mmap_flags, r.guest_phys_addr) for r in table] == [(0, 1 << 40)] and fds == [99]
    assert not export.direct and export.open_queue(rings[0][0], 0, 3) == "shadow rings" and shadow.opened == [0]
    assert export.quiesce() == [0]  # the shadow path's own
    assert any("more than 8 XEN_MMAP grant regions" in r.getMessage() for r in caplog.records)
    rings[0] = rings[0][:1]
    table, fds = export.regions(rings[0])
    assert export.direct and fds == [77] * len(table) and all(r.domid == 5 for r in table)
    export.close()
    assert shadow.closed and gntdev.fd == -1


@pytest.mark.parametrize("flags", [0x3, 0x1 | 0x8, 0x2 | 0x100, 0x2 | 0x10, 0x8, 0x100])
def test_mapper_refuses_flag_combinations_it_does_not_know_and_closes_the_fd(kernel, flags):
    """FOREIGN|GRANT, FOREIGN with a no-advance flag, GRANT with the other no-advance value (this
    mapper takes 0x8), unknown bits, a lone no-advance flag: refused (typed), the fd closed."""
    from vhost_user import GuestMemoryError, XenMemoryRegion

    mapper = XenRegionMapper(kernel)  # no_advance 0x8 (rust-vmm)
    fd = os.memfd_create("region")
    region = XenMemoryRegion(guest_phys_addr=GRANT_ADDR_BIT, memory_size=1 << 20, userspace_addr=GRANT_ADDR_BIT,
                             mmap_offset=0, xen_mmap_flags=flags, domid=1)
    with pytest.raises(GuestMemoryError, match=f"{flags:#x}"):
        mapper(region, fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # the mapper owned it


def test_mapper_maps_a_unix_region_with_plain_mmap(kernel):
    """xen_mmap_flags 0 under XEN_MMAP: a plain shareable fd (the grant export's shadow fallback)."""
    from vhost_user import XenMemoryRegion

    fd = os.memfd_create("shadow")
    os.ftruncate(fd, 1 << 16)
    os.pwrite(fd, b"shadow!", 0x1000)
    region = XenMemoryRegion(guest_phys_addr=1 << 40, memory_size=1 << 16, userspace_addr=1 << 40, mmap_offset=0,
                             xen_mmap_flags=0, domid=0)
    backing = XenRegionMapper(kernel, no_advance=SPEC)(region, fd)
    try:
        with backing.slice(0x1000, 7) as v:
            assert bytes(v) == b"shadow!"
    finally:
        backing.close()
    with pytest.raises(ValueError, match="0x4"):
        XenRegionMapper(kernel, no_advance=XenMmapFlags(0x4))


def test_read_only_grant_refusals_are_counted_each_but_logged_at_a_bounded_rate(caplog):
    """A guest that grants its status buffers read-only on purpose, request after request: every
    request is refused (counted), the log gets at most a burst of lines per window."""
    import logging as _logging
    from types import SimpleNamespace

    from vhost_user.virtqueue import Buffer
    from xen_vhost_master.log import GUEST_LOG_BURST
    from xen_vhost_master.backend.blk import XenRamDiskBlk

    ram = bytes(0x2000)  # read-only memory: every view is read-only
    device = XenRamDiskBlk(0x2000)
    device.memory = SimpleNamespace(view=lambda addr, length: memoryview(ram)[addr : addr + length])
    refusals = device.refusals
    caplog.set_level(_logging.ERROR, logger="xen_vhost_master.backend.blk")
    chain = SimpleNamespace(head=3, writable=[Buffer(0x1000, 1)])
    for _ in range(200):
        assert device.handle_request(chain, None, None) == 0  # refused before RamDiskBlk's handler
    assert refusals.count == 200
    lines = [r for r in caplog.records if "read-only grant" in r.getMessage()]
    assert 1 <= len(lines) <= GUEST_LOG_BURST
