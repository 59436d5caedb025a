"""The guest driver on a simulated domain: every register access is a real IOREQ through the simulated
Xen host, the interrupt line is driven with dm_op set_irq_level, and the rings live in the domain's RAM,
reached from this (dom0) side through a privcmd foreign mapping — the daemon's path in miniature, with
the daemon's pure virtio-mmio model answering the accesses."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_guest_driver import Disk, blk_config

from vhost_user.virtqueue import SplitQueueDevice
from xen_vhost_master import virtio_mmio as vm
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import SECTOR_SIZE, BlkFeature, BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestPageAllocator
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

WAIT = 5.0
MMIO_BASE, IRQ = 0x0200_0000, 33
RAM0, MEM = 0x4000_0000, 16 << 20
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | BlkFeature.FLUSH | BlkFeature.BLK_SIZE)


class ForeignRam:
    """Guest-physical addresses over dom0's foreign mapping of the guest's RAM."""

    def __init__(self, view: memoryview, base: int) -> None:
        self._mv, self.base = view, base

    def view(self, gpa: int, length: int) -> memoryview:
        off = gpa - self.base
        if off < 0 or length < 0 or off + length > len(self._mv):
            raise ValueError(f"{gpa:#x}+{length:#x} outside the mapping")
        return self._mv[off : off + length]


class MiniDeviceModel:
    """Serves the IOREQs of one virtio-mmio window with the pure model and a RAM disk."""

    def __init__(self, dm: DeviceModel, page: IoreqPage, ev: EventChannel, ports: list[int], ram: ForeignRam,
                 model: vm.VirtioMmioDevice, disk: Disk) -> None:
        self.dm, self.page, self.ev, self.ports, self.ram = dm, page, ev, ports, ram
        self.model, self.disk = model, disk
        self.rings: dict[int, SplitQueueDevice] = {}
        self.bus = self  # Disk.handle reaches guest memory as dev.bus.ram
        self.ioreqs = 0
        self.guest_errors: list[str] = []

    async def serve(self) -> None:
        while True:
            fired = await self.ev.wait()
            self.ev.unmask(*fired)
            for port in fired:
                vcpu = self.ports.index(port)
                req = self.page.take(vcpu)
                if req is None:
                    continue
                self.ioreqs += 1
                off = req.addr - MMIO_BASE
                if req.is_write:
                    self._apply(self.model.write(off, req.size, req.data))
                    self.page.complete(vcpu)
                else:
                    value, actions = self.model.read(off, req.size)
                    self._apply(actions)
                    self.page.complete(vcpu, value)
                self.ev.notify(port)

    def _apply(self, actions: list[vm.Action]) -> None:
        for action in actions:
            if isinstance(action, vm.IrqLevel):
                self.dm.set_irq_level(IRQ, int(action.level))
            elif isinstance(action, vm.Activate):
                idx = bool(action.features & Feature.RING_EVENT_IDX)
                for q in action.queues:
                    self.rings[q.index] = SplitQueueDevice(self.ram, q.num, q.desc, q.driver, q.device, event_idx=idx)
            elif isinstance(action, vm.Reset):
                for ring in self.rings.values():
                    ring.release()
                self.rings.clear()
            elif isinstance(action, vm.Notify):
                ring = self.rings[action.index]
                while (chain := ring.pop()) is not None:
                    ring.push(chain.head, self.disk.handle(self, action.index, chain))  # type: ignore[arg-type]
                if ring.needs_notify():
                    self._apply(self.model.used_buffer())
            elif isinstance(action, vm.GuestError):
                self.guest_errors.append(action.reason)


@pytest.mark.asyncio
async def test_virtio_blk_through_ioreqs_of_the_simulated_host(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = await asyncio.to_thread(sim_control.create_domain, mem_bytes=MEM)
    guest = await SimGuest.connect(sim_host.path, domid)
    pc, ev = PrivCmd(kernel), EventChannel(kernel)
    dm = DeviceModel(pc, domid)
    nr = dm.nr_vcpus()
    sid = dm.create_ioreq_server()
    page = IoreqPage.map(pc, domid, sid, nr)
    fm = pc.map_foreign_range(domid, RAM0 >> 12, MEM >> 12)
    view = fm.view()
    server: asyncio.Task[None] | None = None
    blk: VirtioBlk | None = None
    try:
        dm.set_ioreq_server_state(sid, True)
        ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(nr)]
        dm.map_io_range(sid, MMIO_BASE, MMIO_BASE + 0x1FF)
        model = vm.VirtioMmioDevice(device_id=2, device_features=FEATURES, queue_sizes=[64],
                                    config=bytes(blk_config(512)), ram=guest.ram.banks())
        dmodel = MiniDeviceModel(dm, page, ev, ports, ForeignRam(view, RAM0), model, Disk(512))
        server = asyncio.create_task(dmodel.serve())
        async with asyncio.timeout(30):
            blk = await VirtioBlk.attach(guest, MMIO_BASE, IRQ, GuestPageAllocator(guest.ram, reserve=1 << 20),
                                         features=FEATURES, queue_size=64)
            assert blk.capacity == 512
            data = os.urandom(8 * SECTOR_SIZE)
            await blk.write(10, data)
            assert bytes(dmodel.disk.data[10 * SECTOR_SIZE : 18 * SECTOR_SIZE]) == data  # reached the "back-end"
            assert await blk.read(10, 8) == data
            payloads = [os.urandom(SECTOR_SIZE) for _ in range(8)]
            await blk.batch([BlkOp("write", 100 + i, data=p) for i, p in enumerate(payloads)])  # queue depth 8
            assert await blk.batch([BlkOp("read", 100 + i, 1) for i in range(8)]) == payloads
            await blk.flush()
        assert dmodel.disk.flushes == 1 and dmodel.ioreqs > 30
        assert blk.driver.interrupts >= 5 and not guest.irq_level(IRQ)
        assert dmodel.guest_errors == []
    finally:
        if blk is not None:
            async with asyncio.timeout(WAIT):
                await blk.close()
        if server is not None:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        del view
        fm.close()
        dm.destroy_ioreq_server(sid)
        page.close()
        ev.close()
        pc.close()
        guest.close()
