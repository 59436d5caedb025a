"""Grant-mode guests: the simulated guest driver with ``grants=True`` against a fake virtio-blk device
that reaches the guest's rings and buffers ONLY through grant mappings made with the real gntdev
adapter (GrantDev.map_grant_refs via SimKernel). Register accesses are real IOREQs served with the
daemon's pure virtio-mmio model (the MiniDeviceModel of test_guest_driver_sim)."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from test_guest_driver import blk_config
from test_guest_driver_sim import MiniDeviceModel

from vhost_user.virtqueue import Chain, SplitQueueDevice
from xen_vhost_master import virtio_mmio as vm
from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import SECTOR_SIZE, BlkFeature, BlkIoError, NetFeature, VirtioBlk, VirtioNet
from xen_vhost_sim.guest_driver import (
    XEN_GRANT_DMA_ADDR_OFF,
    Feature,
    FeaturesRejected,
    GuestPageAllocator,
    grant_dma_address,
)
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.gntdev import GrantDev, GrantMapping
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

T = 10.0
MMIO_BASE, IRQ = 0x0200_0000, 33
MEM = 16 << 20
SECTORS = 256
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.ACCESS_PLATFORM | BlkFeature.FLUSH)
GRANT_SPACE = [(XEN_GRANT_DMA_ADDR_OFF, XEN_GRANT_DMA_ADDR_OFF - 1)]  # where the model accepts rings


def _split(addr: int, length: int) -> tuple[list[int], int]:
    """Grant DMA address → (consecutive refs covering it, offset in the first page)."""
    assert addr & XEN_GRANT_DMA_ADDR_OFF, f"{addr:#x} is not a grant address"
    off = addr & ~XEN_GRANT_DMA_ADDR_OFF
    first, page_off = off >> 12, off & 0xFFF
    return list(range(first, first + ((page_off + length + 0xFFF) >> 12))), page_off


class GrantRam:
    """The device's view of guest memory: grant addresses mapped with gntdev, read-only unless asked."""

    def __init__(self, gnt: GrantDev, domid: int, *, writable: bool) -> None:
        self.gnt, self.domid, self.writable = gnt, domid, writable
        self.maps: list[GrantMapping] = []
        self.refs_seen: list[int] = []

    def view(self, addr: int, length: int, *, writable: bool | None = None) -> memoryview:
        refs, page_off = _split(addr, length)
        gm = self.gnt.map_grant_refs(self.domid, refs, writable=self.writable if writable is None else writable)
        self.maps.append(gm)
        self.refs_seen += refs
        return gm.view()[page_off : page_off + length]

    def unmap_all(self) -> None:
        for gm in self.maps:
            self.gnt.unmap(gm)
        self.maps.clear()


class RingRam(GrantRam):
    """The rings' grant mappings (read-write, held until reset). Once the rings exist, further views
    are SplitQueueDevice's buffer probes: those are checked by mapping the grants (read-only) and
    unmapping them at once; the data itself is mapped per request by GrantDisk."""

    def __init__(self, gnt: GrantDev, domid: int) -> None:
        super().__init__(gnt, domid, writable=True)
        self.probing = False

    def view(self, addr: int, length: int, *, writable: bool | None = None) -> memoryview:
        if not self.probing:
            return super().view(addr, length, writable=writable)
        refs, _ = _split(addr, length)
        self.gnt.unmap(self.gnt.map_grant_refs(self.domid, refs, writable=False))
        return memoryview(bytearray(length))


@dataclass
class GrantDisk:
    """virtio-blk requests served through per-request grant mappings (unmapped when answered)."""

    gnt: GrantDev
    domid: int
    data: bytearray = field(default_factory=lambda: bytearray(os.urandom(SECTORS * SECTOR_SIZE)))
    flushes: int = 0
    hostile_write_to_header: bool = False
    refused: list[str] = field(default_factory=list)
    last_refs: list[int] = field(default_factory=list)

    def handle(self, _dev: object, _index: int, chain: Chain) -> int:
        ro, rw = GrantRam(self.gnt, self.domid, writable=False), GrantRam(self.gnt, self.domid, writable=True)
        try:
            return self._handle(ro, rw, chain)
        finally:
            self.last_refs = ro.refs_seen + rw.refs_seen
            ro.unmap_all()
            rw.unmap_all()

    def _handle(self, ro: GrantRam, rw: GrantRam, chain: Chain) -> int:
        hdr = chain.readable[0]
        rtype, _, sector = struct.unpack("<IIQ", bytes(ro.view(hdr.addr, 16)))
        status_buf = chain.writable[-1]
        status, written = 0, 1
        if self.hostile_write_to_header:
            try:
                rw.view(hdr.addr, 16)[:4] = b"EVIL"  # the header was granted read-only
            except XenError as exc:
                self.refused.append(f"{exc.errno}")
                status = 1
        off = sector * SECTOR_SIZE
        if status:
            pass
        elif rtype == 0:  # IN
            for buf in chain.writable[:-1]:
                rw.view(buf.addr, buf.length)[:] = self.data[off : off + buf.length]
                off += buf.length
                written += buf.length
        elif rtype == 1:  # OUT
            for buf in chain.readable[1:]:
                self.data[off : off + buf.length] = ro.view(buf.addr, buf.length)
                off += buf.length
        elif rtype == 4:
            self.flushes += 1
        else:
            status = 2
        rw.view(status_buf.addr, 1)[0] = status
        return written


class GrantDeviceModel(MiniDeviceModel):
    """MiniDeviceModel whose rings are grant mappings held for the queue's lifetime."""

    def __init__(self, ring_ram: RingRam, **kw: object) -> None:
        super().__init__(ram=ring_ram, **kw)  # type: ignore[arg-type]
        self.ring_ram = ring_ram

    def _apply(self, actions: list[vm.Action]) -> None:
        for action in actions:
            if isinstance(action, vm.Activate):
                idx = bool(action.features & Feature.RING_EVENT_IDX)
                self.ring_ram.probing = False
                for q in action.queues:
                    self.rings[q.index] = SplitQueueDevice(self.ring_ram, q.num, q.desc, q.driver, q.device, event_idx=idx)
                self.ring_ram.probing = True
            elif isinstance(action, vm.Reset):
                super()._apply([action])
                self.ring_ram.unmap_all()
                self.ring_ram.probing = False
            else:
                super()._apply([action])


class GrantNetLoopback(GrantDeviceModel):
    """virtio-net whose transmitq loops every frame back into the receiveq, through grant mappings."""

    def __init__(self, ring_ram: RingRam, gnt: GrantDev, domid: int, **kw: object) -> None:
        super().__init__(ring_ram, **kw)
        self.gnt, self.domid = gnt, domid
        self.frames: list[bytes] = []

    def _apply(self, actions: list[vm.Action]) -> None:
        for action in actions:
            if not isinstance(action, vm.Notify):
                super()._apply([action])
                continue
            rx, tx = self.rings[0], self.rings[1]
            while (chain := tx.pop()) is not None:
                ro = GrantRam(self.gnt, self.domid, writable=False)
                frame = b"".join(bytes(ro.view(b.addr, b.length)) for b in chain.readable)
                ro.unmap_all()
                tx.push(chain.head, 0)
                self.frames.append(frame[12:])
                slot = rx.pop()
                assert slot is not None, "no rx buffer posted"
                rw = GrantRam(self.gnt, self.domid, writable=True)
                rw.view(slot.writable[0].addr, len(frame))[:] = frame
                rw.unmap_all()
                rx.push(slot.head, len(frame))
            if rx.needs_notify() or tx.needs_notify():
                super()._apply(self.model.used_buffer())


@dataclass
class Rig:
    guest: SimGuest
    dmodel: GrantDeviceModel
    disk: GrantDisk
    gnt: GrantDev
    domid: int
    allocator: GuestPageAllocator

    async def attach(self, **kw: object) -> VirtioBlk:
        async with asyncio.timeout(T):
            return await VirtioBlk.attach(self.guest, MMIO_BASE, IRQ, self.allocator, grants=True,
                                          queue_size=64, **kw)  # type: ignore[arg-type]


async def _rig(host: SimHost, ctl: SimControl, features: int, *, net: bool = False) -> AsyncIterator[Rig]:
    kernel = SimKernel(host.path)
    domid = await asyncio.to_thread(ctl.create_domain, mem_bytes=MEM)
    guest = await SimGuest.connect(host.path, domid)
    pc, ev, gnt = PrivCmd(kernel), EventChannel(kernel), GrantDev(kernel)
    dm = DeviceModel(pc, domid)
    sid = dm.create_ioreq_server()
    page = IoreqPage.map(pc, domid, sid, dm.nr_vcpus())
    server: asyncio.Task[None] | None = None
    try:
        dm.set_ioreq_server_state(sid, True)
        ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(dm.nr_vcpus())]
        dm.map_io_range(sid, MMIO_BASE, MMIO_BASE + 0x1FF)
        disk = GrantDisk(gnt, domid)
        dmodel: GrantDeviceModel
        if net:
            model = vm.VirtioMmioDevice(device_id=1, device_features=features, queue_sizes=[64, 64],
                                        config=bytes.fromhex("020000000001") + b"\x01\x00", ram=GRANT_SPACE)
            dmodel = GrantNetLoopback(RingRam(gnt, domid), gnt, domid, dm=dm, page=page, ev=ev, ports=ports,
                                      model=model, disk=disk)
        else:
            model = vm.VirtioMmioDevice(device_id=2, device_features=features, queue_sizes=[64],
                                        config=bytes(blk_config(SECTORS)), ram=GRANT_SPACE)
            dmodel = GrantDeviceModel(RingRam(gnt, domid), dm=dm, page=page, ev=ev, ports=ports,
                                      model=model, disk=disk)
        server = asyncio.create_task(dmodel.serve())
        yield Rig(guest, dmodel, disk, gnt, domid, GuestPageAllocator(guest.ram, reserve=1 << 20))
    finally:
        if server is not None:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        dm.destroy_ioreq_server(sid)
        page.close()
        gnt.close()
        ev.close()
        pc.close()
        guest.close()


@pytest_asyncio.fixture
async def rig(sim_host: SimHost, sim_control: SimControl) -> AsyncIterator[Rig]:
    async for r in _rig(sim_host, sim_control, FEATURES):
        yield r


def _blk_header_grant_ok(gnt: GrantDev, domid: int, ref: int) -> bool:
    try:
        gm = gnt.map_grant_refs(domid, [ref], writable=False)
    except XenError as exc:
        assert exc.errno == errno.EINVAL
        return False
    gnt.unmap(gm)
    return True


@pytest.mark.asyncio
async def test_grant_mode_blk_round_trip(no_fd_leak: None, rig: Rig) -> None:
    blk = await rig.attach()
    try:
        assert blk.driver.has(Feature.ACCESS_PLATFORM)
        queue = blk.driver.queues[0]
        assert len(queue.grant_refs) >= 1 and blk.driver.live_grants == len(queue.grant_refs)
        async with asyncio.timeout(T):
            data = os.urandom(8 * SECTOR_SIZE)
            await blk.write(3, data)
            assert bytes(rig.disk.data[3 * SECTOR_SIZE : 11 * SECTOR_SIZE]) == data
            assert await blk.read(3, 8) == data
            # a 3-page buffer that starts mid-page: consecutive refs, one descriptor
            big = os.urandom(16 * SECTOR_SIZE)
            await blk.write(40, big)
            assert await blk.read(40, 16) == big
            await blk.flush()
        assert rig.disk.flushes == 1
        # every buffer of the last request was a grant; all of them are revoked now (completion)
        assert rig.disk.last_refs and blk.driver.live_grants == len(queue.grant_refs)
        for ref in rig.disk.last_refs:
            assert not _blk_header_grant_ok(rig.gnt, rig.domid, ref), f"grant {ref} still mappable"
        # the ring grants live as long as the queue
        assert _blk_header_grant_ok(rig.gnt, rig.domid, queue.grant_refs[0])
        ring_refs = list(queue.grant_refs)
    finally:
        async with asyncio.timeout(T):
            await blk.close()
    assert blk.driver.live_grants == 0
    assert not _blk_header_grant_ok(rig.gnt, rig.domid, ring_refs[0])
    assert rig.dmodel.guest_errors == []


@pytest.mark.asyncio
async def test_ring_and_descriptor_addresses_are_grant_addresses(no_fd_leak: None, rig: Rig) -> None:
    blk = await rig.attach()
    try:
        queue = blk.driver.queues[0]
        cfg = rig.dmodel.model.queues[0]
        assert cfg.desc == grant_dma_address(queue.grant_refs[0], queue.desc - queue.ring_gpa)
        assert cfg.driver == grant_dma_address(queue.grant_refs[0], queue.avail - queue.ring_gpa)
        assert cfg.device == grant_dma_address(queue.grant_refs[0], queue.used - queue.ring_gpa)
        async with asyncio.timeout(T):
            await blk.write(0, bytes(SECTOR_SIZE))
        # descriptor 0's address in guest RAM (the guest's own view) is a grant address
        with rig.guest.ram.view(queue.desc, 16) as mv:
            addr, length, _flags, _next = struct.unpack("<QIHH", mv)
        assert addr & XEN_GRANT_DMA_ADDR_OFF and length == 16
    finally:
        async with asyncio.timeout(T):
            await blk.close()


@pytest.mark.asyncio
async def test_write_to_a_read_only_grant_is_refused(no_fd_leak: None, rig: Rig) -> None:
    blk = await rig.attach()
    try:
        rig.disk.hostile_write_to_header = True
        async with asyncio.timeout(T):
            with pytest.raises(BlkIoError):
                await blk.write(5, b"\xAA" * SECTOR_SIZE)
        assert rig.disk.refused == [str(errno.EINVAL)]  # gntdev mmap with PROT_WRITE of a RO grant
        assert bytes(rig.disk.data[5 * SECTOR_SIZE : 6 * SECTOR_SIZE]) != b"\xAA" * SECTOR_SIZE
        rig.disk.hostile_write_to_header = False
        async with asyncio.timeout(T):
            await blk.write(5, b"\xBB" * SECTOR_SIZE)  # the device keeps working
        assert bytes(rig.disk.data[5 * SECTOR_SIZE : 6 * SECTOR_SIZE]) == b"\xBB" * SECTOR_SIZE
    finally:
        async with asyncio.timeout(T):
            await blk.close()


@pytest_asyncio.fixture
async def rig_without_access_platform(sim_host: SimHost, sim_control: SimControl) -> AsyncIterator[Rig]:
    async for r in _rig(sim_host, sim_control, FEATURES & ~Feature.ACCESS_PLATFORM):
        yield r


@pytest.mark.asyncio
async def test_device_without_access_platform_fails_cleanly(no_fd_leak: None, rig_without_access_platform: Rig) -> None:
    rig = rig_without_access_platform
    with pytest.raises(FeaturesRejected, match="ACCESS_PLATFORM"):
        await rig.attach()
    assert rig.dmodel.model.status & vm.Status.FAILED
    assert not rig.dmodel.model.status & vm.Status.FEATURES_OK


@pytest_asyncio.fixture
async def net_rig(sim_host: SimHost, sim_control: SimControl) -> AsyncIterator[Rig]:
    feats = int(Feature.VERSION_1 | Feature.ACCESS_PLATFORM | NetFeature.MAC | NetFeature.STATUS)
    async for r in _rig(sim_host, sim_control, feats, net=True):
        yield r


@pytest.mark.asyncio
async def test_grant_mode_net_loopback(no_fd_leak: None, net_rig: Rig) -> None:
    async with asyncio.timeout(T):
        net = await VirtioNet.attach(net_rig.guest, MMIO_BASE, IRQ, net_rig.allocator, grants=True,
                                     queue_size=64, rx_buffers=8)
    try:
        assert net.mac == bytes.fromhex("020000000001") and net.driver.has(Feature.ACCESS_PLATFORM)
        ring_grants = sum(len(q.grant_refs) for q in net.driver.queues.values())
        assert net.driver.live_grants == ring_grants + 8  # 8 posted rx buffers, granted read-write
        frames = [os.urandom(60 + 100 * i) for i in range(12)]  # more than the 8 rx buffers: reposting
        async with asyncio.timeout(T):
            for frame in frames:
                await net.send(frame)
                assert await net.recv() == frame
        assert net_rig.dmodel.frames == frames  # type: ignore[attr-defined]
        assert net.driver.live_grants == ring_grants + 8  # tx grants revoked, rx re-granted on repost
    finally:
        async with asyncio.timeout(T):
            await net.close()
    assert net.driver.live_grants == 0
