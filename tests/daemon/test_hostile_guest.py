"""A hostile guest hammers one device's registers; the daemon answers per the spec (or
DEVICE_NEEDS_RESET), logs a bounded number of lines, and keeps serving the guest's other device."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from vhost_user import AsyncFrontend
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_master.virtio_mmio import MAGIC, Reg, Status
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

A, B, TIMEOUT = 0x0200_0000, 0x0200_0200, 30.0
STORM = 2000


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hostile_register_writes_are_contained(sim_host, sim_control, kernel, peers, caplog):
    caplog.set_level(logging.INFO)
    disks = [peers.qsd_raw(size=4 << 20), peers.qsd_raw(size=4 << 20)]
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=2)
    banks, memfd = sim_control.sim_only_ram_memfd(domid)
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    ioreq = IoreqServer(privcmd, evtchn, domid, device_logger("xvm.hostile", domid))
    devices = []
    for i, (base, disk) in enumerate(zip((A, B), disks)):
        log = device_logger("xvm.hostile", domid, f"blk{i}")
        devices.append(Device(DeviceConfig(devid=i, device_id=2, base=base, irq=33 + i, socket=str(disk.sock)),
                              connect=lambda s=str(disk.sock): AsyncFrontend.connect(s),
                              memory=sim_memfd_export(banks, memfd),
                              set_irq=lambda level, irq=33 + i: ioreq.set_irq(irq, level), log=log))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        ioreq.create()
        for base, dev in zip((A, B), devices):
            await dev.start()
            ioreq.add_window(base, 0x200, dev)
        ioreq.enable()
        alloc = GuestPageAllocator(guest.ram)
        good = await asyncio.wait_for(VirtioBlk.attach(guest, B, 34, alloc, vcpu=1), TIMEOUT)

        async def rd(off, size=4):
            return await asyncio.wait_for(guest.mmio_read(A + off, size), TIMEOUT)

        async def wr(off, value, size=4):
            await asyncio.wait_for(guest.mmio_write(A + off, size, value), TIMEOUT)

        # Odd sizes and offsets on control registers: reads give 0, writes change nothing.
        assert await rd(Reg.MAGIC_VALUE) == MAGIC
        assert await rd(Reg.MAGIC_VALUE, 2) == 0 and await rd(Reg.MAGIC_VALUE + 1, 4) == 0
        await wr(Reg.STATUS, 0xFF, size=1)
        assert await rd(Reg.STATUS) == 0
        await wr(Reg.MAGIC_VALUE, 0)  # read-only register
        assert await rd(Reg.MAGIC_VALUE) == MAGIC
        # Features the back-end lacks: FEATURES_OK refused.
        for st in (1, 3):
            await wr(Reg.STATUS, st)
        await wr(Reg.DRIVER_FEATURES_SEL, 0)
        await wr(Reg.DRIVER_FEATURES, 0xFFFFFFFF)
        await wr(Reg.DRIVER_FEATURES_SEL, 1)
        await wr(Reg.DRIVER_FEATURES, 1)
        await wr(Reg.STATUS, 11)
        assert not await rd(Reg.STATUS) & Status.FEATURES_OK
        # A notify storm for a queue that is not ready: all ignored, the log stays short.
        for i in range(STORM):
            await wr(Reg.QUEUE_NOTIFY, i % 7)  # cycling queue indices gets no fresh log budget
        # The good device keeps working meanwhile.
        data = random.Random(1).randbytes(64 << 10)
        await asyncio.wait_for(good.write(0, data), TIMEOUT)
        assert await asyncio.wait_for(good.read(0, 128), TIMEOUT) == data
        # Bad queue set-ups: each puts the device in DEVICE_NEEDS_RESET, and a reset clears it.
        ring = alloc.alloc(3 * 4096)
        for num, desc in ((100, ring), (4096, ring), (64, ring + 8), (64, 0x1000), (64, 0x7FFF_F000)):
            await wr(Reg.STATUS, 0)
            for st in (1, 3):
                await wr(Reg.STATUS, st)
            await wr(Reg.DRIVER_FEATURES_SEL, 1)
            await wr(Reg.DRIVER_FEATURES, 1)  # VERSION_1
            await wr(Reg.DRIVER_FEATURES_SEL, 0)
            await wr(Reg.DRIVER_FEATURES, 0)
            await wr(Reg.STATUS, 11)
            await wr(Reg.QUEUE_SEL, 0)
            await wr(Reg.QUEUE_NUM, num)
            for reg, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, ring + 4096), (Reg.QUEUE_DEVICE_LOW, ring + 8192)):
                await wr(reg, addr & 0xFFFFFFFF)
                await wr(reg + 4, addr >> 32)
            await wr(Reg.QUEUE_READY, 1)
            assert await rd(Reg.STATUS) & Status.DEVICE_NEEDS_RESET, (num, hex(desc))
            assert await rd(Reg.QUEUE_READY) == 0
        assert devices[0].stats.starts == 0  # the back-end never saw a bad ring
        # After all that, a well-behaved driver on the same device works.
        fixed = await asyncio.wait_for(VirtioBlk.attach(guest, A, 33, alloc), TIMEOUT)
        await asyncio.wait_for(fixed.write(8, data), TIMEOUT)
        assert await asyncio.wait_for(fixed.read(8, 128), TIMEOUT) == data
        assert await asyncio.wait_for(good.read(0, 128), TIMEOUT) == data
        guest_lines = [r for r in caplog.records if "guest:" in r.getMessage()]
        assert devices[0].stats.guest_errors > STORM
        assert len(guest_lines) < 100, f"{len(guest_lines)} log lines for {devices[0].stats.guest_errors} guest errors"
        await fixed.close()
        await good.close()
    finally:
        guest.close()
        await ioreq.close()
        for dev in devices:
            await dev.close()
        import os

        os.close(memfd)
        evtchn.close()
        privcmd.close()
