"""Grant-based guests end to end: the simulator's grant-mode driver (ACCESS_PLATFORM, grant DMA
addresses in rings and descriptors, data buffers granted per request, device-readable ones
read-only) → the daemon (IOREQ server, device model, shadow virtqueues over GrantGuestMemory: the
daemon reaches the guest ONLY through gntdev mappings of what the guest granted) → a real
qemu-storage-daemon, which only ever sees the daemon's shadow memfd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_user import AsyncFrontend, GuestMemoryError
from vhost_user.virtqueue import SplitQueueDevice, SplitQueueDriver, read_buffers, split_ring_layout, write_buffers
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.datapath.grant_export import GrantShadowDataPath
from xen_vhost_master.guestmem.grants import GRANT_SPACE, GrantGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.shadow_pool import SHADOW_BASE
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import SECTOR_SIZE, BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import (
    DeviceStatus,
    Feature,
    FeaturesRejected,
    GuestPageAllocator,
    grant_dma_address,
)
from xen_vhost_master.virtio_mmio import QueueConfig, Status
from xen_vhost_master.xen.abi import GntdevIoctl
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.gntdev import GrantDev
from xen_vhost_master.xen.privcmd import PrivCmd

BASE, IRQ = 0x0200_0000, 33
T = 25.0
GRANT_FEATURES = int(VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX)


class GrantDaemon:
    """The daemon's pieces for one grant device, wired as the supervisor's ``_shadow`` does
    (GrantShadowDataPath over its own gntdev; a stopped queue → Device.fail → NEEDS_RESET)."""

    def __init__(self, kernel, domid: int, sock: str, *, max_pages: int = 1024) -> None:
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "grants")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        self.cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock, grants=True)
        self.memory = GrantGuestMemory(GrantDev(kernel), domid, max_pages=max_pages, own_gntdev=True)
        self.errors: list[tuple[int, str]] = []
        self.shadow = GrantShadowDataPath(self.memory, pool_size=4 << 20, max_queues=2, max_queue_size=256,
                                          on_error=self._failed, log=self.log)
        self.device = Device(self.cfg, connect=lambda: AsyncFrontend.connect(sock), memory=self.shadow,
                             set_irq=lambda level: self.ioreq.set_irq(IRQ, level), log=self.log)

    def _failed(self, index: int, reason: str) -> None:
        self.errors.append((index, reason))
        self.device.fail(f"shadow queue {index} stopped: {reason}")

    async def start(self) -> None:
        self.ioreq.create()
        await self.device.start()
        self.ioreq.add_window(BASE, 0x200, self.device)
        self.ioreq.enable()

    async def close(self) -> None:
        try:
            await self.ioreq.close()
            await self.device.close()  # closes the data path, which unmaps and closes the gntdev
        finally:
            self.shadow.close()
            self.evtchn.close()
            self.privcmd.close()


async def _attach(guest: SimGuest, alloc: GuestPageAllocator) -> VirtioBlk:
    return await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc, grants=True, features=GRANT_FEATURES,
                                                   queue_size=64), T)


@pytest.mark.peer
@pytest.mark.asyncio
async def test_grant_guest_write_read_back_through_qsd(no_fd_leak, sim_host, sim_control, kernel, peers):
    disk = 8 << 20
    qsd = peers.qsd_raw(size=disk)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    daemon = GrantDaemon(kernel, domid, str(qsd.sock))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        assert daemon.device.model is not None and list(daemon.device.model.ram) == list(GRANT_SPACE)
        assert daemon.device.model.required_features >> 33 & 1
        region = daemon.shadow.shadow.region()  # (regions() itself is once per back-end connection)
        assert region.guest_phys_addr == SHADOW_BASE and region.memory_size == daemon.shadow.shadow.size
        blk = await _attach(guest, GuestPageAllocator(guest.ram))
        assert blk.driver.has(Feature.ACCESS_PLATFORM)
        queue = blk.driver.queues[0]
        cfg = daemon.device.model.queues[0]
        assert cfg.desc == grant_dma_address(queue.grant_refs[0], queue.desc - queue.ring_gpa)  # grant space
        written: dict[int, bytes] = {}
        async with asyncio.timeout(T):
            for sector, size in ((0, 4096), (17, 512), (100, 3 * 4096 + 512), (2000, 64 << 10)):
                data = os.urandom(size)
                await blk.write(sector, data)
                written[sector] = data
                assert await blk.read(sector, size // SECTOR_SIZE) == data
            ops = [BlkOp("write", 4000 + 16 * i, data=os.urandom(8192)) for i in range(16)]  # QD 16
            await blk.batch(ops)
            written.update({op.sector: op.data for op in ops})
            got = await blk.batch([BlkOp("read", op.sector, count=16) for op in ops])
            assert got == [op.data for op in ops]
            await blk.flush()
        with open(qsd.image, "rb") as f:
            for sector, data in written.items():
                f.seek(sector * SECTOR_SIZE)
                assert f.read(len(data)) == data, f"raw file differs at sector {sector}"
        st, ms = daemon.shadow.stats(0), daemon.memory.stats
        assert st is not None and st.completed == st.chains and daemon.errors == []
        # every readable buffer was a read-only grant; data buffers were unmapped on completion:
        # what stays mapped is the ring (granted for the queue's lifetime)
        assert ms.read_only >= 8 and ms.unmaps >= ms.maps - daemon.memory.mappings
        assert daemon.memory.mapped_pages == len(queue.grant_refs)
        assert blk.driver.live_grants == len(queue.grant_refs)  # the guest revoked every data grant
        await asyncio.wait_for(blk.close(), T)  # reset: the daemon closes the queue
        assert blk.driver.live_grants == 0
        assert daemon.memory.mapped_pages == 0 and daemon.memory.mappings == 0  # the ring is unmapped at reset
    finally:
        try:
            guest.close()
        finally:
            await daemon.close()
    assert daemon.memory.closed and daemon.memory.mapped_pages == 0


@pytest.mark.peer
@pytest.mark.asyncio
async def test_non_grant_driver_on_a_grant_device_fails_features_ok(no_fd_leak, sim_host, sim_control, kernel, peers, caplog):
    caplog.set_level(logging.WARNING)
    qsd = peers.qsd_raw(size=1 << 20)
    domid = sim_control.create_domain(mem_bytes=32 << 20)
    daemon = GrantDaemon(kernel, domid, str(qsd.sock))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        alloc = GuestPageAllocator(guest.ram)
        with pytest.raises(FeaturesRejected, match="refused features"):
            await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), T)  # no ACCESS_PLATFORM
        assert daemon.device.model is not None
        assert not daemon.device.model.status & Status.FEATURES_OK
        assert any(f"required features {1 << 33:#x}: FEATURES_OK refused" in r.getMessage() for r in caplog.records)
        assert daemon.memory.stats.maps == 0  # nothing of the guest was ever mapped
        # the daemon keeps serving: a grant-mode driver then works
        blk = await _attach(guest, alloc)
        async with asyncio.timeout(T):
            await blk.write(8, b"\x42" * 4096)
            assert await blk.read(8, 8) == b"\x42" * 4096
        await asyncio.wait_for(blk.close(), T)
    finally:
        try:
            guest.close()
        finally:
            await daemon.close()


@pytest.mark.peer
@pytest.mark.parametrize("case", ["read-only", "revoked"])
@pytest.mark.asyncio
async def test_read_only_grant_marked_device_writable_is_refused(no_fd_leak, sim_host, sim_control, kernel, peers, caplog,
                                                                 case):
    """A hostile grant-mode chain: a virtio-blk READ whose data buffer is a READ-ONLY grant marked
    device-writable (or a grant already revoked). The daemon refuses it before the back-end sees it
    (the queue stops, the device shows NEEDS_RESET, logged), the page is untouched, and after a
    reset the device serves again on the same back-end connection."""
    caplog.set_level(logging.ERROR)
    qsd = peers.qsd_raw(size=1 << 20)
    with open(qsd.image, "r+b") as f:
        f.write(b"\x77" * 4096)  # what a READ of sector 0 would bring into the page
    domid = sim_control.create_domain(mem_bytes=32 << 20)
    daemon = GrantDaemon(kernel, domid, str(qsd.sock))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        alloc = GuestPageAllocator(guest.ram)
        blk = await _attach(guest, alloc)
        async with asyncio.timeout(T):
            assert await blk.read(0, 8) == b"\x77" * 4096  # the device works before
        chains = daemon.shadow.stats(0).chains
        # the hostile chain, granted by hand: header RO (fine), data RO but device-writable, status RW
        hdr, data, status = alloc.alloc(4096), alloc.alloc(4096), alloc.alloc(4096)
        with guest.ram.view(hdr, 16) as v:
            v[:] = struct.pack("<IIQ", 0, 0, 0)  # VIRTIO_BLK_T_IN, sector 0
        with guest.ram.view(data, 4096) as v:
            v[:] = b"\x11" * 4096
        refs = [guest.grant(hdr >> 12, readonly=True), guest.grant(data >> 12, readonly=case == "read-only"),
                guest.grant(status >> 12, readonly=False)]
        if case == "revoked":
            guest.revoke(refs[1])
            refs.pop(1)
            data_ref = refs[0] + 1
        else:
            data_ref = refs[1]
        expect = "read-only" if case == "read-only" else f"grant refs {data_ref}..{data_ref}"
        driver = blk.driver
        driver.grants = False  # post the addresses as they are (no granting by the driver)
        try:
            await asyncio.wait_for(driver.submit(0, readable=[(grant_dma_address(refs[0]), 16)],
                                                 writable=[(grant_dma_address(data_ref), 4096),
                                                           (grant_dma_address(refs[-1]), 1)]), T)
        finally:
            driver.grants = True
        assert daemon.errors and daemon.errors[0][0] == 0 and expect in daemon.errors[0][1], daemon.errors
        assert await asyncio.wait_for(driver.read_status(), T) & DeviceStatus.DEVICE_NEEDS_RESET
        assert any(expect in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        assert daemon.shadow.stats(0).chains == chains  # nothing published to the back-end
        with guest.ram.view(data, 4096) as v:
            assert bytes(v) == b"\x11" * 4096  # nothing written into the page
        for ref in refs:
            guest.revoke(ref)
        await asyncio.wait_for(blk.close(), T)  # the driver resets: the daemon closes the queue
        # the daemon keeps serving on the same back-end connection
        frontend = daemon.device.frontend
        blk = await _attach(guest, alloc)
        async with asyncio.timeout(T):
            await blk.write(16, b"\x5a" * 4096)
            assert await blk.read(16, 8) == b"\x5a" * 4096
        assert daemon.device.frontend is frontend and not frontend.broken
        await asyncio.wait_for(blk.close(), T)
    finally:
        try:
            guest.close()
        finally:
            await daemon.close()


# --- GrantGuestMemory on its own (the real gntdev adapter against the simulated host) ----------------


@pytest.mark.asyncio
async def test_grant_memory_views_read_only_grants_limits_and_release(no_fd_leak, sim_host, sim_control, kernel):
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    mem = GrantGuestMemory(GrantDev(kernel), domid, max_pages=4, own_gntdev=True)
    try:
        gpa = int(sim_control.domain_info(domid)["banks"][0][0]) + (1 << 20)
        with guest.ram.view(gpa, 3 * 4096) as v:
            v[:] = bytes(range(256)) * 48
        rw = [guest.grant((gpa >> 12) + i) for i in range(2)]  # two consecutive read-write grants
        ro = guest.grant((gpa >> 12) + 2, readonly=True)
        assert rw[1] == rw[0] + 1 and ro == rw[1] + 1
        # non-grant addresses are refused (typed, a ValueError for the ring code)
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, 16)
        # a buffer spanning two grants, starting mid-page: consecutive refs, writable
        addr = grant_dma_address(rw[0], 4000)
        with mem.view(addr, 200) as v:
            assert not v.readonly and bytes(v) == (bytes(range(256)) * 48)[4000:4200]
            v[:4] = b"GNT!"
        with guest.ram.view(gpa + 4000, 4) as v:
            assert bytes(v) == b"GNT!"  # the daemon's write reached the guest page
        assert mem.mapped_pages == 2 and mem.stats.maps == 1
        with mem.view(grant_dma_address(rw[1], 8), 8):  # inside the mapping: reused
            assert mem.stats.maps == 1 and mem.stats.hits == 1
        # a read-only grant: mapped read-only, the view refuses writes (no fault)
        with mem.view(grant_dma_address(ro, 16), 16) as v:
            assert v.readonly and mem.stats.read_only == 1
            with pytest.raises(TypeError):
                v[:1] = b"x"
        with guest.ram.view(gpa + 2 * 4096 + 16, 1) as v:
            assert bytes(v) == bytes([16])
        assert mem.mapped_pages == 3
        # a live view pins its mapping: release does not unmap it, dropping the view does
        held = mem.view(grant_dma_address(ro, 0), 8)
        mem.release_buffers([(grant_dma_address(ro, 0), 8)])
        assert mem.mapped_pages == 3 and bytes(held) == bytes(range(8))
        held.release()
        mem.release_buffers([(grant_dma_address(ro, 0), 8), (gpa, 8)])  # non-grant entries are ignored
        assert mem.mapped_pages == 2 and mem.stats.unmaps == 1
        # limits: a view longer than max_pages, a ref beyond u32
        with pytest.raises(GuestMemoryError):
            mem.view(grant_dma_address(rw[0]), 5 * 4096)
        with pytest.raises(GuestMemoryError):
            mem.view(grant_dma_address((1 << 32) - 1, 4090), 16)
        # a revoked grant fails that view only (typed); the memory keeps working
        guest.revoke(ro)
        with pytest.raises(GuestMemoryError, match="grant refs"):
            mem.view(grant_dma_address(ro), 16)
        with mem.view(addr, 4) as v:
            assert bytes(v) == b"GNT!"
        # bounded: when every mapped page is in use, a new mapping is refused; idle ones are evicted
        extra = [guest.grant((gpa >> 12) + 3 + i) for i in range(3)]
        pin = mem.view(addr, 200)  # 2 pages in use
        a = mem.view(grant_dma_address(extra[0]), 8)
        b = mem.view(grant_dma_address(extra[1]), 8)  # 4 pages: the limit
        with pytest.raises(GuestMemoryError, match="limit 4"):
            mem.view(grant_dma_address(extra[2]), 8)
        a.release()
        with mem.view(grant_dma_address(extra[2]), 8):  # the idle one is evicted to make room
            assert mem.stats.evicted == 1 and mem.mapped_pages == 4
        b.release()
        pin.release()
    finally:
        mem.close()
        guest.close()
    assert mem.closed and mem.mapped_pages == 0
    with pytest.raises(GuestMemoryError):
        mem.view(grant_dma_address(8), 8)


class CountingKernel:
    """The kernel object with every gntdev MAP_GRANT_REF / UNMAP_GRANT_REF ioctl and mmap counted."""

    def __init__(self, kernel) -> None:
        self._k = kernel
        self.maps = self.unmaps = self.mmaps = 0

    def __getattr__(self, name: str):
        return getattr(self._k, name)

    def ioctl(self, fd: int, request: int, arg=None) -> int:
        self.maps += request == GntdevIoctl.MAP_GRANT_REF
        self.unmaps += request == GntdevIoctl.UNMAP_GRANT_REF
        return self._k.ioctl(fd, request, arg)

    def mmap(self, *args, **kw):
        self.mmaps += 1
        return self._k.mmap(*args, **kw)

    def counts(self) -> tuple[int, int, int]:
        return self.maps, self.mmaps, self.unmaps


@pytest.mark.asyncio
async def test_map_chain_maps_each_access_mode_of_a_chain_in_one_ioctl(no_fd_leak, sim_host, sim_control, kernel):
    """GrantGuestMemory.map_chain: the pages of a chain's device-readable buffers in ONE
    MAP_GRANT_REF + ONE read-only mmap (refs not consecutive, in buffer order), those of its
    device-writable buffers in one more (writable); views of the buffers (or of a prefix: a partial
    copy-back) are served without an ioctl; releasing a batch's buffers unmaps it with one
    UNMAP_GRANT_REF. A batch that cannot be mapped falls back to per-buffer mapping, which fails
    exactly the buffer at fault; batches are capped in pages."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    counting = CountingKernel(kernel)
    mem = GrantGuestMemory(GrantDev(counting), domid, max_pages=64, max_batch_pages=8, own_gntdev=True)
    try:
        gfn0 = (int(sim_control.domain_info(domid)["banks"][0][0]) >> 12) + 256
        with guest.ram.view(gfn0 << 12, 16 * 4096) as v:
            v[:] = bytes(range(256)) * 256
        page = lambda i: bytes(range(256)) * 16  # noqa: E731 - every page holds 0..255 x 16
        # interleaved: the refs of a batch are not consecutive (buffer order is not ref order)
        kinds = "RWWRWRWR"  # R: a read-only grant
        refs = [guest.grant(gfn0 + i, readonly=k == "R") for i, k in enumerate(kinds)]
        ro = [r for r, k in zip(refs, kinds) if k == "R"]  # gfn0 + 0, 3, 5, 7
        rw = [r for r, k in zip(refs, kinds) if k == "W"]  # gfn0 + 1, 2, 4, 6
        readable = [(grant_dma_address(ro[0], 100), 16), (grant_dma_address(ro[2]), 4096), (grant_dma_address(ro[1], 8), 8)]
        writable = [(grant_dma_address(rw[0], 4000), 200), (grant_dma_address(rw[2]), 4096), (grant_dma_address(rw[3], 5), 1)]
        assert mem.check(*readable[0]) is None and counting.counts() == (0, 0, 0)  # validates, maps nothing
        with pytest.raises(GuestMemoryError):
            mem.check(0x1000, 16)
        mem.map_chain(readable, writable)
        assert counting.counts() == (2, 2, 0)  # 6 buffers: one map + one mmap per access mode
        assert mem.stats.batches == 2 and mem.mapped_pages == 3 + 4
        for addr, n in readable:
            with mem.view(addr, n) as v:
                assert v.readonly and bytes(v) == page(0)[(addr & 0xFFF):(addr & 0xFFF) + n]
        with mem.view(*writable[0]) as v:  # spans two pages of the batch: one contiguous slice
            assert not v.readonly and bytes(v) == (page(0) * 2)[4000:4200]
            v[:] = b"W" * 200
        with mem.view(writable[1][0], 10) as v:  # a prefix (partial copy-back)
            v[:] = b"0123456789"
        assert counting.counts() == (2, 2, 0) and mem.stats.hits == 5
        with guest.ram.view(((gfn0 + 1) << 12) + 4000, 200) as v:  # rw[0] and rw[1]: gfn0 + 1, 2
            assert bytes(v) == b"W" * 200
        with guest.ram.view((gfn0 + 4) << 12, 10) as v:
            assert bytes(v) == b"0123456789"
        mem.release_buffers(readable)
        assert counting.counts() == (2, 2, 1) and mem.mapped_pages == 4
        held = mem.view(*writable[2])  # a live view pins its batch: released, unmapped by trim() later
        mem.release_buffers(writable)
        assert counting.counts() == (2, 2, 1) and mem.mapped_pages == 4
        held.release()
        assert mem.trim() == 1 and mem.mapped_pages == 0 and counting.counts() == (2, 2, 2)
        # a chain already mapped by run (a probe, a ring) is not mapped twice
        with mem.view(*readable[1]):
            pass
        maps = counting.maps
        mem.map_chain([readable[1]], [])
        assert counting.maps == maps and mem.stats.batches == 2
        mem.release_buffers([readable[1]])
        assert mem.mapped_pages == 0
        # a read-only grant among the writable buffers: the batch is refused, each buffer is then
        # mapped on its own, the culprit read-only (the engine refuses the chain)
        mem.map_chain([], [writable[0], (grant_dma_address(ro[3]), 64)])
        assert mem.stats.batch_fallbacks == 1 and mem.mapped_pages == 0
        with mem.view(grant_dma_address(ro[3]), 64) as v:
            assert v.readonly
        mem.release_buffers([writable[0], (grant_dma_address(ro[3]), 64)])
        # a revoked grant: the batch falls back, only the revoked buffer's view fails
        guest.revoke(ro[2])
        mem.map_chain([readable[0], readable[1]], [])
        assert mem.stats.batch_fallbacks == 2
        with mem.view(*readable[0]) as v:
            assert bytes(v) == page(0)[100:116]
        with pytest.raises(GuestMemoryError, match="grant refs"):
            mem.view(*readable[1])
        mem.release_buffers([readable[0], readable[1]])
        assert mem.mapped_pages == 0
        # a buffer repeated in a chain (one batch, one slot), and shared by two chains in flight
        # (a batch each): each release unmaps one batch, nothing is left behind
        x = writable[1]
        mem.map_chain([], [x, x, x])
        mem.map_chain([], [x])
        assert mem.stats.batches == 4 and mem.mapped_pages == 4 and len(mem._slots[x[0]]) == 2  # noqa: SLF001
        mem.release_buffers([x])
        assert mem.mapped_pages == 3
        with mem.view(*x) as v:  # still served by the batch of the three
            assert not v.readonly
        mem.release_buffers([x, x, x])
        assert mem.mapped_pages == 0 and mem.mappings == 0 and not mem._slots  # noqa: SLF001
        # capped: 12 pages of writable buffers with max_batch_pages=8 → two batches; a buffer
        # longer than a batch is left to view()
        more = [guest.grant(gfn0 + 8 + i) for i in range(8)]
        big = [(grant_dma_address(r), 4096) for r in (*rw, *more)]
        maps = counting.maps
        mem.map_chain([], big + [(grant_dma_address(more[0]), 9 * 4096)])
        assert counting.maps - maps == 2 and mem.mapped_pages == 12
        mem.release_buffers(big)
        assert mem.mapped_pages == 0 and mem.mappings == 0
    finally:
        mem.close()
        guest.close()
    assert mem.closed and mem.mapped_pages == 0


@pytest.mark.asyncio
async def test_shadow_engine_maps_a_grant_chain_in_one_ioctl_per_access_mode(no_fd_leak, sim_host, sim_control, kernel):
    """The shadow data path over GrantGuestMemory, counted at the kernel object: a chain of 4
    device-readable and 9 device-writable grant buffers (as UML splits a read into single pages)
    costs 2 MAP_GRANT_REF + 2 mmap + 2 UNMAP_GRANT_REF (one per access mode), not one per buffer;
    a chain of writable buffers only, 1 of each. The bytes go both ways and nothing of the data
    stays mapped after completion."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    counting = CountingKernel(kernel)
    mem = GrantGuestMemory(GrantDev(counting), domid, own_gntdev=True)
    errors: list[tuple[int, str]] = []
    dp = GrantShadowDataPath(mem, pool_size=1 << 20, max_queues=1, max_queue_size=16,
                             on_error=lambda i, r: errors.append((i, r)))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    gfn0 = (int(sim_control.domain_info(domid)["banks"][0][0]) >> 12) + 256
    ring_ref = guest.grant(gfn0)
    gdesc, gavail, gused, _ = split_ring_layout(16, gfn0 << 12)
    drv = SplitQueueDriver(guest.ram, 16, gdesc, gavail, gused)
    be = None
    try:
        desc, avail, used, _ = split_ring_layout(16, grant_dma_address(ring_ref))
        rings = dp.open_queue(QueueConfig(0, 16, desc, avail, used), 0, kick)
        be = SplitQueueDevice(dp.shadow, 16, rings.desc, rings.avail, rings.used)
        data = os.urandom(3 * 4096)
        with guest.ram.view((gfn0 + 1) << 12, 4 * 4096) as v:
            v[:16] = b"H" * 16
            v[4096:] = data
        ro = [guest.grant(gfn0 + 1 + i, readonly=True) for i in range(4)]
        rw = [guest.grant(gfn0 + 8 + i) for i in range(9)]
        readable = [(grant_dma_address(ro[0]), 16)] + [(grant_dma_address(r), 4096) for r in ro[1:]]
        writable = [(grant_dma_address(r), 4096) for r in rw[:8]] + [(grant_dma_address(rw[8], 7), 1)]
        base = counting.counts()
        drv.add(readable, writable)
        dp.notify(0)
        c = be.pop()
        assert c is not None and errors == []
        assert read_buffers(dp.shadow, c.readable) == b"H" * 16 + data  # copied in from one mapping
        got = tuple(x - y for x, y in zip(counting.counts(), base))
        assert got == (2, 2, 1), got  # readable batch already unmapped; 13 buffers, 2 maps
        reply = os.urandom(8 * 4096) + b"\x00"
        write_buffers(dp.shadow, c.writable, reply)
        be.push(c.head, len(reply))
        dp.used(0)
        assert drv.get_used()[0][1] == len(reply)
        got = tuple(x - y for x, y in zip(counting.counts(), base))
        assert got == (2, 2, 2), got
        with guest.ram.view((gfn0 + 8) << 12, 9 * 4096) as v:
            assert bytes(v[: 8 * 4096]) == reply[:-1] and v[8 * 4096 + 7] == 0
        assert mem.mapped_pages == 1  # the ring only
        # writable buffers only: one of each
        base = counting.counts()
        drv.add([], writable[:4])
        dp.notify(0)
        c = be.pop()
        be.push(c.head, 0)
        dp.used(0)
        assert tuple(x - y for x, y in zip(counting.counts(), base)) == (1, 1, 1)
        assert mem.mapped_pages == 1 and errors == [] and dp.stats(0).completed == 2
    finally:
        if be is not None:
            be.release()
        drv.release()
        dp.close()  # closes the memory and its gntdev
        os.close(kick)
        guest.close()
    assert mem.mapped_pages == 0


# --- the daemon as an operator runs it: xenstore grant_usage=1 -------------------------------------


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_cli_daemon_serves_a_grant_usage_device_from_xenstore(sim_dir, peers, tmp_path):
    from tests.daemon.test_daemon_cli import DaemonLog, stop
    from xen_vhost_sim.guest import SimControl

    bin_dir, domid = Path(sys.executable).parent, 7
    sim_path = os.path.join(sim_dir, "xen.sock")
    r, w = os.pipe()
    sim = subprocess.Popen([str(bin_dir / "xen-vhost-sim"), "--socket", sim_path, "--domain",
                            f"domid={domid},mem=64M,vcpus=2", "--ready-fd", str(w)], pass_fds=(w,))
    os.close(w)
    daemon = guest = None
    try:
        ready = select.select([r], [], [], T)[0]
        assert ready, "xen-vhost-sim did not start"
        with SimControl(sim_path) as ctl:
            ctl.add_virtio_device(domid, device_id=2, base=BASE, irq=IRQ, devid=0, grant_usage=True)
        runtime = tmp_path / "run"
        runtime.mkdir()
        qsd = peers.qsd_raw(size=8 << 20)
        (runtime / "0.sock").symlink_to(qsd.sock)
        daemon = subprocess.Popen([str(bin_dir / "xen-vhost-master"), "--domid", str(domid), "--runtime-dir", str(runtime)],
                                  env=dict(os.environ, XEN_VHOST_SIM=sim_path), stderr=subprocess.PIPE)
        log = DaemonLog(daemon)
        await log.wait_for("serving: ")  # after READY: the IOREQ server is enabled
        await log.wait_for("grant-based guest: shadow virtqueues over gntdev")  # the back-end answered
        guest = await SimGuest.connect(sim_path, domid)
        alloc = GuestPageAllocator(guest.ram)
        with pytest.raises(FeaturesRejected):  # a driver that does not use grants is refused
            await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), T)
        blk = await _attach(guest, alloc)
        data = os.urandom(64 << 10)
        async with asyncio.timeout(T):
            await blk.write(64, data)
            assert await blk.read(64, len(data) // SECTOR_SIZE) == data
            await blk.flush()
        with open(qsd.image, "rb") as f:
            f.seek(64 * SECTOR_SIZE)
            assert f.read(len(data)) == data
        # status shows the daemon's own gntdev mappings, the written buffers' read-only (the real-Xen lab reads these)
        status = subprocess.run([str(bin_dir / "xen-vhost-master"), "status", "--json", "--domid", str(domid),
                                 "--runtime-dir", str(runtime)], capture_output=True, text=True, timeout=T, check=True)
        (dev,) = json.loads(status.stdout)["devices"]
        assert dev["data_path"] == "shadow (grants)" and dev["kernel_queues"] == []
        grants = dev["data_path_stats"]["grants"]
        assert grants["maps"] > 0 and 0 < grants["read_only"] < grants["maps"], grants
        await asyncio.wait_for(blk.close(), T)
        daemon.send_signal(signal.SIGTERM)
        rc = await asyncio.get_running_loop().run_in_executor(None, daemon.wait, T)
        assert rc == 0, "".join(log.lines)
    finally:
        os.close(r)
        if guest is not None:
            guest.close()
        if daemon is not None:
            stop(daemon)
            if daemon.stderr is not None:
                daemon.stderr.close()
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_cli_daemon_exports_grants_over_xen_mmap_to_a_python_backend_process(sim_dir, tmp_path):
    """The daemon as an operator runs it, a grant_usage=1 device whose back-end (the project's
    xen-blk-backend, its own process) offers XEN_MMAP: the daemon exports grant space as GRANT
    regions with the configured no-advance flag (0x100 here, on both sides) over its gntdev fd,
    and the back-end maps the grants itself: zero copy, no shadow."""
    from tests.daemon.test_daemon_cli import DaemonLog, stop
    from xen_vhost_sim.guest import SimControl

    bin_dir, domid = Path(sys.executable).parent, 7
    sim_path = os.path.join(sim_dir, "xen.sock")
    r, w = os.pipe()
    sim = subprocess.Popen([str(bin_dir / "xen-vhost-sim"), "--socket", sim_path, "--domain",
                            f"domid={domid},mem=64M,vcpus=2", "--ready-fd", str(w)], pass_fds=(w,))
    os.close(w)
    daemon = guest = backend = None
    image, sock = tmp_path / "disk.img", str(tmp_path / "blk.sock")
    image.write_bytes(bytes(4 << 20))
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    try:
        ready = select.select([r], [], [], T)[0]
        assert ready, "xen-vhost-sim did not start"
        with SimControl(sim_path) as ctl:
            ctl.add_virtio_device(domid, device_id=2, base=BASE, irq=IRQ, devid=0, grant_usage=True)
        backend = subprocess.Popen([sys.executable, "-m", "xen_vhost_master.backend.blk", "--socket", sock,
                                    "--image", str(image), "--xen-no-advance", "spec"], env=env, stderr=subprocess.PIPE)
        runtime = tmp_path / "run"
        runtime.mkdir()
        daemon = subprocess.Popen([str(bin_dir / "xen-vhost-master"), "--domid", str(domid), "--runtime-dir", str(runtime),
                                   "--device", f"type=blk,base={BASE:#x},irq={IRQ},grants=1,xen-no-advance=spec,socket={sock}"],
                                  env=env, stderr=subprocess.PIPE)
        log = DaemonLog(daemon)
        await log.wait_for("serving: ")
        await log.wait_for("back-end maps the grants itself (XEN_MMAP grant regions, no-advance flag 0x100)")
        guest = await SimGuest.connect(sim_path, domid)
        blk = await _attach(guest, GuestPageAllocator(guest.ram))
        data = os.urandom(64 << 10)
        async with asyncio.timeout(T):
            await blk.write(64, data)
            assert await blk.read(64, len(data) // SECTOR_SIZE) == data
            await blk.flush()
        with open(image, "rb") as f:
            f.seek(64 * SECTOR_SIZE)
            assert f.read(len(data)) == data  # the back-end wrote the guest's bytes, mapped through grants
        await asyncio.wait_for(blk.close(), T)
        assert blk.driver.live_grants == 0  # the back-end unmapped everything: the guest ended all grants
        status = subprocess.run([str(bin_dir / "xen-vhost-master"), "status", "--json", "--domid", str(domid),
                                 "--runtime-dir", str(runtime)], capture_output=True, text=True, timeout=T, check=True)
        assert [d["data_path"] for d in json.loads(status.stdout)["devices"]] == ["xen-mmap (grants)"]
        daemon.send_signal(signal.SIGTERM)
        rc = await asyncio.get_running_loop().run_in_executor(None, daemon.wait, T)
        assert rc == 0, "".join(log.lines)
    finally:
        os.close(r)
        if guest is not None:
            guest.close()
        for proc in (daemon, backend):
            if proc is not None:
                stop(proc)
                if proc.stderr is not None:
                    proc.stderr.close()
        stop(sim)


# --- the UML bridge's grant layer on its own (pure: a bytearray RAM, a recording grant table) -------


def test_uml_grant_ring_translates_chains_and_ends_grants():
    import struct as st

    from xen_vhost_sim.uml_grants import GrantRing, GrantRingError, RingArea, grant_address

    ram = memoryview(bytearray(1 << 20))
    table: dict[int, tuple[int, bool]] = {}
    ended: list[int] = []

    def grant(gfn, ro):
        ref = 8 + len(table)
        table[ref] = (gfn, ro)
        return ref

    num, udesc, uavail, uused = 8, 0x1000, 0x1080, 0x1100
    area = RingArea(0x80000, 0x10000)
    for cache in (0, 4):
        table.clear()
        ended.clear()
        ram[:] = bytes(len(ram))
        ring = GrantRing(ram, num, (udesc, uavail, uused), area.for_queue(0, 1), grant, ended.append, cache_runs=cache)
        ring_ref = ring.ring_refs[0]
        assert table[ring_ref] == (0x80, False) and ring.addresses[0] == grant_address(ring_ref)
        # UML: a blk-like chain 0 -> 1 -> 2: header (readable), 2 pages of data from mid-page (writable), status
        st.pack_into("<QIHH", ram, udesc + 0, 0x20000, 16, 1, 1)
        st.pack_into("<QIHH", ram, udesc + 16, 0x30800, 8192, 1 | 2, 2)
        st.pack_into("<QIHH", ram, udesc + 32, 0x40010, 1, 2, 0)
        st.pack_into("<HH", ram, uavail, 0, 1)
        st.pack_into("<H", ram, uavail + 4, 0)
        assert ring.pump() == 1 and ring.pump() == 0
        d = [st.unpack_from("<QIHH", ram, ring.desc + 16 * i) for i in range(3)]
        refs = sorted(table)
        hdr = next(r for r in refs if table[r] == (0x20, True))
        data = next(r for r in refs if table[r] == (0x30, False))
        assert table[data + 1] == (0x31, False) and table[data + 2] == (0x32, False)  # 3 consecutive pages
        assert d[0] == (grant_address(hdr), 16, 1, 1) and d[1] == (grant_address(data, 0x800), 8192, 3, 2)
        assert st.unpack_from("<HH", ram, ring.avail) == (0, 1) and st.unpack_from("<H", ram, ring.avail + 4)[0] == 0
        # the device returns chain 0: UML's used ring gets it, the buffers' grants end (or stay cached)
        st.pack_into("<HHII", ram, ring.used, 0, 1, 0, 8193)
        assert ring.complete() == 1
        assert st.unpack_from("<HHII", ram, uused) == (0, 1, 0, 8193)
        assert len(ended) == (5 if cache == 0 else 0)
        # the same buffers again: with the cache, no new grant
        st.pack_into("<H", ram, uavail + 6, 0)
        st.pack_into("<H", ram, uavail + 2, 2)
        before = len(table)
        ring.pump()
        assert (len(table) == before) == bool(cache)
        st.pack_into("<II", ram, ring.used + 12, 0, 1)
        st.pack_into("<H", ram, ring.used + 2, 2)
        ring.complete()
        ring.close()
        assert sorted(set(ended)) == sorted(table) and ring.pump() == 0  # every grant ended at reset
    # a loop in UML's chain is refused without leaking grants
    table.clear()
    ended.clear()
    ram[:] = bytes(len(ram))
    ring = GrantRing(ram, num, (udesc, uavail, uused), area.for_queue(0, 1), grant, ended.append, cache_runs=0)
    st.pack_into("<QIHH", ram, udesc, 0x20000, 16, 1, 0)  # 0 -> 0
    st.pack_into("<HH", ram, uavail, 0, 1)
    with pytest.raises(GrantRingError, match="loops"):
        ring.pump()
    assert len(ended) == len(table) - 1  # all but the ring's own page


def test_the_data_path_policy_for_a_grant_device():
    """XEN_MMAP grant export when the back-end offers XEN_MMAP and the rings fit; shadow over
    gntdev otherwise, each with its reason; memory=xen-mmap insists on the export; nothing is
    decided for a grant device before the back-end has answered."""
    from vhost_user import ProtocolFeatures
    from xen_vhost_master.config import MemoryMode
    from xen_vhost_master.datapath.choose import Kind, decide, wanted_protocol_features
    from xen_vhost_master.datapath.grant_export import MAX_GRANT_QUEUES

    xm = ProtocolFeatures.XEN_MMAP | ProtocolFeatures.MQ
    auto = MemoryMode.AUTO
    assert wanted_protocol_features(auto) == ProtocolFeatures.XEN_MMAP  # asked for
    assert decide(auto, True) is None
    kind, why = decide(auto, True, xm, 1)
    assert kind is Kind.GRANT_XEN_MMAP and "back-end maps the grants itself (XEN_MMAP grant regions" in why
    kind, why = decide(auto, True, xm, MAX_GRANT_QUEUES + 1)
    assert kind is Kind.GRANT_SHADOW and "may not fit the 8 XEN_MMAP regions" in why
    kind, why = decide(auto, True, ProtocolFeatures.MQ, 1)
    assert kind is Kind.GRANT_SHADOW and why.endswith("shadow virtqueues over gntdev (the back-end does not offer XEN_MMAP)")
    # memory=xen-mmap: the export whatever the back-end offers (the device then refuses the back-end)
    assert decide(MemoryMode.XEN_MMAP, True, ProtocolFeatures.MQ, 1)[0] is Kind.GRANT_XEN_MMAP  # type: ignore[index]
    assert wanted_protocol_features(MemoryMode.SHADOW) == ProtocolFeatures(0)  # memory=shadow
    for mode in (MemoryMode.SHADOW, MemoryMode.SIM_MEMFD):  # sim-memfd is impossible with grants
        assert decide(mode, True, xm, 1) == (Kind.GRANT_SHADOW, "grant-based guest: shadow virtqueues over gntdev")


def test_the_data_path_policy_for_a_ram_device():
    """Guest RAM: XEN_MMAP and sim-memfd are fixed by the configuration; auto waits for the back-end
    (XEN_MMAP if offered, else shadow); shadow is shadow whatever the back-end offers."""
    from vhost_user import ProtocolFeatures
    from xen_vhost_master.config import MemoryMode
    from xen_vhost_master.datapath.choose import Kind, decide

    xm = ProtocolFeatures.XEN_MMAP
    assert decide(MemoryMode.XEN_MMAP, False) == (Kind.XEN_MMAP, "memory=xen-mmap")
    assert decide(MemoryMode.SIM_MEMFD, False) == (Kind.SIM_MEMFD, "memory=sim-memfd")
    assert decide(MemoryMode.AUTO, False) is None and decide(MemoryMode.SHADOW, False) is None
    assert decide(MemoryMode.AUTO, False, xm) == (Kind.XEN_MMAP, "back-end maps guest memory itself (XEN_MMAP)")
    assert decide(MemoryMode.AUTO, False, ProtocolFeatures(0))[0] is Kind.SHADOW  # type: ignore[index]
    assert decide(MemoryMode.SHADOW, False, xm)[0] is Kind.SHADOW  # type: ignore[index]


def test_each_data_path_names_itself_as_status_shows_it():
    """``status`` shows ``DataPath.name``: one name per kind of data path, the grant XEN_MMAP
    export's following whether this activation fell back to shadow rings."""
    from xen_vhost_master.datapath.base import DataPathChooser
    from xen_vhost_master.datapath.grant_export import GrantShadowDataPath, GrantXenMmapExport
    from xen_vhost_master.datapath.zerocopy import FdExport, XenMmapExport
    from xen_vhost_master.datapath.shadow import ShadowDataPath

    assert [c.name for c in (XenMmapExport, ShadowDataPath, GrantShadowDataPath, FdExport, DataPathChooser)] == [
        "xen-mmap", "shadow", "shadow (grants)", "sim-memfd", "not chosen yet"]
    export = GrantXenMmapExport(None, 1, 1 << 20)  # (no gntdev needed to ask the name)
    assert export.name == "xen-mmap (grants)"
    export.shadowed = True
    assert export.name == "shadow (grants, region limit)"
