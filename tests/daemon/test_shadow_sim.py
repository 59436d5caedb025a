"""Shadow virtqueues end to end over the simulated Xen host, WITHOUT the sim-only memfd: the daemon
reaches guest RAM only through privcmd foreign mappings (:class:`ForeignGuestMemory`), as on real
Xen, and the back-ends only ever see the daemon's shadow memfd.

Real peers: qemu-storage-daemon (raw file), dpdk-testpmd (io forwarding, looped port), the C
virtiofsd (FUSE INIT / LOOKUP / GETATTR / READ about a real directory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.guest_memory import ForeignGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.shadow import ShadowDataPath
from xen_vhost_master.shadow_pool import SHADOW_BASE
from xen_vhost_master.sim.guest import SimGuest
from xen_vhost_master.sim.guest_devices import BlkFeature, BlkOp, VirtioBlk
from xen_vhost_master.sim.guest_driver import Feature, GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

BASE, IRQ = 0x0200_0000, 33
TIMEOUT = 25.0


class ShadowDaemon:
    """The daemon's pieces for one guest and one device, on the shadow data path."""

    def __init__(self, kernel, control, domid: int, cfg: DeviceConfig, connect, *, pool_size: int = 8 << 20) -> None:
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "shadow")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        banks = [(int(a), int(b)) for a, b in control.domain_info(domid)["banks"]]
        self.guest_mem = ForeignGuestMemory(self.privcmd, domid, banks)
        self.errors: list[tuple[int, str]] = []
        self.shadow = ShadowDataPath(self.guest_mem, banks, pool_size=pool_size, max_queues=4, max_queue_size=256,
                                     on_error=lambda i, r: self.errors.append((i, r)), log=self.log)
        self.device = Device(cfg, connect=connect, memory=self.shadow,
                             set_irq=lambda level: self.ioreq.set_irq(cfg.irq, level), log=self.log)

    async def start(self) -> None:
        self.ioreq.create()
        await self.device.start()
        self.ioreq.add_window(self.device.config.base, 0x200, self.device)
        self.ioreq.enable()

    async def close(self) -> None:
        await self.ioreq.close()
        await self.device.close()
        self.shadow.close()
        self.guest_mem.close()
        self.evtchn.close()
        self.privcmd.close()


def regions_are_shadow_only(daemon: ShadowDaemon) -> None:
    regions, fds = daemon.shadow.regions()
    assert len(regions) == 1 and regions[0].guest_phys_addr == SHADOW_BASE and fds == [daemon.shadow.shadow.fd]


async def run_blk(blk: VirtioBlk, rng: random.Random, plan, disk_bytes: int) -> dict[int, bytes]:
    """Random-offset write then read-back for each (request size, depth, total) of ``plan``; each
    entry has its own part of the disk (so later checks of the whole set stay valid)."""
    written: dict[int, bytes] = {}
    part = disk_bytes // len(plan)
    for n, (req, depth, total) in enumerate(plan):
        slots = [n * part // req + s for s in rng.sample(range(part // req), total // req)]
        ops = []
        for s in slots:
            data = rng.randbytes(req)
            written[s * req] = data
            ops.append(BlkOp("write", s * req // 512, data=data))
        for i in range(0, len(ops), depth):
            await asyncio.wait_for(blk.batch(ops[i : i + depth]), TIMEOUT)
        reads = [BlkOp("read", s * req // 512, count=req // 512) for s in slots]
        for i in range(0, len(reads), depth):
            got = await asyncio.wait_for(blk.batch(reads[i : i + depth]), TIMEOUT)
            for op, data in zip(reads[i : i + depth], got):
                assert data == written[op.sector * 512], f"read-back differs at {op.sector * 512:#x} (req {req}, QD {depth})"
    return written


@pytest.mark.peer
@pytest.mark.asyncio
async def test_qsd_4mib_random_write_read_back_at_qd_1_8_32_and_mixed(sim_host, sim_control, kernel, peers, caplog):
    caplog.set_level(logging.WARNING)
    disk = 32 << 20
    qsd = peers.qsd_raw(size=disk)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=str(qsd.sock))
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(qsd.sock)))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        regions_are_shadow_only(daemon)
        features = VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), features=features), TIMEOUT)
        assert blk.driver.has(BlkFeature.FLUSH) and blk.driver.has(Feature.RING_EVENT_IDX)
        rng = random.Random(6)
        plan = [(4096, 1, 256 << 10), (4096, 8, 256 << 10), (4096, 32, 256 << 10),
                (65536, 1, 1 << 20), (65536, 8, 1 << 20), (65536, 32, 1 << 20)]
        written = await run_blk(blk, rng, plan, disk - (1 << 20))  # the last MiB is for the mixed phase
        # mixed: reads of what is there and new writes in the same batches (QD 16), 256 KiB of writes
        keys = list(written)
        ops, expect = [], []
        for i in range(64):
            if i % 2:
                off = rng.choice(keys)
                ops.append(BlkOp("read", off // 512, count=len(written[off]) // 512))
                expect.append(written[off])
            else:
                off = (disk - (1 << 20)) + (i // 2) * 8192  # a region the plan above never wrote
                data = rng.randbytes(8192)
                written[off] = data
                ops.append(BlkOp("write", off // 512, data=data))
                expect.append(None)
        for i in range(0, len(ops), 16):
            got = await asyncio.wait_for(blk.batch(ops[i : i + 16]), TIMEOUT)
            assert got == expect[i : i + 16]
        assert sum(len(d) for d in written.values()) == 4 << 20
        await asyncio.wait_for(blk.flush(), TIMEOUT)
        with open(qsd.image, "rb") as f:
            for off, data in written.items():
                f.seek(off)
                assert f.read(len(data)) == data, f"raw file differs at {off:#x}"
        st = daemon.shadow.stats(0)
        assert st.completed == st.chains > 300 and st.bytes_out >= 4 << 20 and st.bytes_in >= 4 << 20
        assert st.kicks < st.chains  # one kick per batch
        assert daemon.errors == [] and daemon.shadow.pool.used_pages == 0
        await blk.close()
    finally:
        guest.close()
        await daemon.close()
