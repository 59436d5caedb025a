"""Grant-based guests end to end: the simulator's grant-mode driver (ACCESS_PLATFORM, grant DMA
addresses in rings and descriptors, data buffers granted per request, device-readable ones
read-only) → the daemon (IOREQ server, device model, shadow virtqueues over GrantGuestMemory: the
daemon reaches the guest ONLY through gntdev mappings of what the guest granted) → a real
qemu-storage-daemon, which only ever sees the daemon's shadow memfd.
"""

from __future__ import annotations

import asyncio
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
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.grant_memory import GRANT_SPACE, GrantGuestMemory, GrantShadowDataPath
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.shadow_pool import SHADOW_BASE
from xen_vhost_master.sim.guest import SimGuest
from xen_vhost_master.sim.guest_devices import SECTOR_SIZE, BlkOp, VirtioBlk
from xen_vhost_master.sim.guest_driver import (
    DeviceStatus,
    Feature,
    FeaturesRejected,
    GuestPageAllocator,
    grant_dma_address,
)
from xen_vhost_master.virtio_mmio import Status
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


# --- the daemon as an operator runs it: xenstore grant_usage=1 -------------------------------------


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_cli_daemon_serves_a_grant_usage_device_from_xenstore(sim_dir, peers, tmp_path):
    from tests.daemon.test_daemon_cli import DaemonLog, stop
    from xen_vhost_master.sim.guest import SimControl

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
        assert any("grant-based guest: shadow virtqueues over gntdev" in line for line in log.lines), log.lines
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
    from xen_vhost_master.sim.guest import SimControl

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
        backend = subprocess.Popen([sys.executable, "-m", "xen_vhost_master.xen_blk_backend", "--socket", sock,
                                    "--image", str(image), "--xen-no-advance", "spec"], env=env, stderr=subprocess.PIPE)
        runtime = tmp_path / "run"
        runtime.mkdir()
        daemon = subprocess.Popen([str(bin_dir / "xen-vhost-master"), "--domid", str(domid), "--runtime-dir", str(runtime),
                                   "--device", f"type=blk,base={BASE:#x},irq={IRQ},grants=1,xen-no-advance=spec,socket={sock}"],
                                  env=env, stderr=subprocess.PIPE)
        log = DaemonLog(daemon)
        await log.wait_for("serving: ")
        assert any("back-end maps the grants itself (XEN_MMAP grant regions, no-advance flag 0x100)" in line
                   for line in log.lines), log.lines
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

    from xen_vhost_master.sim.uml_grants import GrantRing, GrantRingError, RingArea, grant_address

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


def test_supervisor_choice_for_a_grant_device(caplog):
    """XEN_MMAP grant export when the back-end offers XEN_MMAP and the rings fit; shadow over
    gntdev otherwise (each choice logged); memory=xen-mmap insists on the export."""
    from vhost_user import ProtocolFeatures
    from xen_vhost_master.grant_memory import MAX_GRANT_QUEUES
    from xen_vhost_master.supervisor import _Choose

    caplog.set_level(logging.INFO)

    class Sup:
        log = logging.getLogger("xvm.test.choose")

        def _shadow(self, cfg, nq):
            return ("shadow", nq)

    cfg = DeviceConfig(devid=3, device_id=2, base=BASE, irq=IRQ, grants=True, xen_no_advance=0x100)
    choose = _Choose(Sup(), cfg, lambda nq: ("xen-mmap", nq))
    assert choose.protocol_features == ProtocolFeatures.XEN_MMAP  # asked for
    xm = ProtocolFeatures.XEN_MMAP | ProtocolFeatures.MQ
    assert choose(xm, 1) == ("xen-mmap", 1)
    assert "back-end maps the grants itself (XEN_MMAP grant regions, no-advance flag 0x100)" in caplog.text
    assert choose(xm, MAX_GRANT_QUEUES + 1) == ("shadow", MAX_GRANT_QUEUES + 1)
    assert "may not fit the 8 XEN_MMAP regions" in caplog.text
    assert choose(ProtocolFeatures.MQ, 1) == ("shadow", 1)
    assert "shadow virtqueues over gntdev (the back-end does not offer XEN_MMAP)" in caplog.text
    required = _Choose(Sup(), cfg, lambda nq: ("xen-mmap", nq), required=True)
    assert required(ProtocolFeatures.MQ, 1) == ("xen-mmap", 1)  # the device then refuses the back-end
    assert _Choose(Sup(), cfg, None).protocol_features == ProtocolFeatures(0)  # memory=shadow
