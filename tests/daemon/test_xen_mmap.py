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
from xen_vhost_master.memory import XenMmapExport
from xen_vhost_master.sim.guest import SimGuest
from xen_vhost_master.sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_master.sim.guest_driver import GuestPageAllocator
from xen_vhost_master.sim.memory import bank_layout, Arch
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_master.xen_mapper import XenRegionMapper

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
