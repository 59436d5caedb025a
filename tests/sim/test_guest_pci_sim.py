"""An x86 HVM domain of the simulated host with a virtio-pci function: the guest's configuration
accesses reach, as IOREQ_TYPE_PCI_CONFIG, the server that claimed the function's SBDF; its BAR
accesses reach the server once it claims the range the guest programmed; MSIs (XEN_DMOP_inject_msi)
and INTx (XEN_DMOP_set_pci_intx_level) reach the guest. The simulated virtio-pci guest driver
(sim/xen_vhost_sim/guest_pci.py) runs a virtio-blk disk against the daemon's pure virtio-pci model
served by a miniature device model, as tests/sim/test_guest_driver_sim.py does for virtio-mmio."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from test_guest_driver import Disk, blk_config
from test_guest_driver_sim import ForeignRam

from vhost_user.virtqueue import SplitQueueDevice
from xen_vhost_master import virtio_mmio as vm
from xen_vhost_master import virtio_pci as vp
from xen_vhost_master.xen.abi import XEN_DMOP_PCI_SBDF, IoRangeType, IoreqType
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimControl, SimGuest, SimHostError
from xen_vhost_sim.guest_devices import SECTOR_SIZE, BlkFeature, BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestPageAllocator, NoDevice
from xen_vhost_sim.guest_pci import VirtioPciDriver, pci_intx_gsi, sbdf
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel

WAIT = 5.0
MEM = 16 << 20
DEV = 3  # 00:03.0
SBDF = XEN_DMOP_PCI_SBDF(0, 0, DEV, 0)
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | BlkFeature.FLUSH | BlkFeature.BLK_SIZE)


class MiniPciDeviceModel:
    """Serves one virtio-pci function's config and BAR ioreqs with the pure model and a RAM disk."""

    def __init__(self, dm: DeviceModel, sid: int, page: IoreqPage, ev: EventChannel, ports: list[int],
                 ram: ForeignRam, model: vp.VirtioPciDevice, disk: Disk) -> None:
        self.dm, self.sid, self.page, self.ev, self.ports, self.ram = dm, sid, page, ev, ports, ram
        self.model, self.disk = model, disk
        self.rings: dict[int, SplitQueueDevice] = {}
        self.bus = self  # Disk.handle reaches guest memory as dev.bus.ram
        self.config_ioreqs = self.bar_ioreqs = 0
        self.claimed: int | None = None
        self.guest_errors: list[str] = []
        self.msis = self.intx = 0

    async def serve(self) -> None:
        while True:
            fired = await self.ev.wait()
            self.ev.unmask(*fired)
            for port in fired:
                vcpu = self.ports.index(port)
                req = self.page.take(vcpu)
                if req is None:
                    continue
                value: int | None = None
                if req.type == IoreqType.PCI_CONFIG:
                    self.config_ioreqs += 1
                    assert req.addr >> 32 == SBDF, hex(req.addr)
                    reg = req.addr & 0xFFF
                    if req.is_write:
                        self._apply(self.model.config_write(reg, req.size, req.data))
                    else:
                        value, actions = self.model.config_read(reg, req.size)
                        self._apply(actions)
                else:
                    self.bar_ioreqs += 1
                    assert req.type == IoreqType.COPY and self.claimed is not None
                    off = req.addr - self.claimed
                    if req.is_write:
                        self._apply(self.model.bar_write(off, req.size, req.data))
                    else:
                        value, actions = self.model.bar_read(off, req.size)
                        self._apply(actions)
                self.page.complete(vcpu, value)
                self.ev.notify(port)

    def _apply(self, actions: list[vp.PciAction]) -> None:
        for action in actions:
            if isinstance(action, vp.BarMap):
                if self.claimed is not None:
                    self.dm.unmap_io_range(self.sid, self.claimed, self.claimed + action.size - 1)
                self.claimed = action.address
                if action.address is not None:
                    self.dm.map_io_range(self.sid, action.address, action.address + action.size - 1)
            elif isinstance(action, vm.Msi):
                self.msis += 1
                self.dm.inject_msi(action.address, action.data)
            elif isinstance(action, vm.IrqLevel):
                self.intx += action.level
                self.dm.set_pci_intx_level(0, DEV, 0, int(action.level))
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
                    self._apply(list(self.model.used_buffer(action.index)))
            elif isinstance(action, vm.GuestError):
                self.guest_errors.append(action.reason)


async def _run_disk(sim_host: SimHost, sim_control: SimControl, kernel: SimKernel, *, msix: bool) -> None:
    domid = await asyncio.to_thread(sim_control.create_domain, mem_bytes=MEM, arch="x86_64")
    guest = await SimGuest.connect(sim_host.path, domid)
    pc, ev = PrivCmd(kernel), EventChannel(kernel)
    dm = DeviceModel(pc, domid)
    nr = dm.nr_vcpus()
    sid = dm.create_ioreq_server()
    page = IoreqPage.map(pc, domid, sid, nr)
    fm = pc.map_foreign_range(domid, 0, MEM >> 12)
    view = fm.view()
    server: asyncio.Task[None] | None = None
    blk: VirtioBlk | None = None
    try:
        dm.set_ioreq_server_state(sid, True)
        ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(nr)]
        dm.map_io_range(sid, SBDF, SBDF, IoRangeType.PCI)
        model = vp.VirtioPciDevice(device_id=2, device_features=FEATURES, queue_sizes=[64],
                                   config=bytes(blk_config(512)), ram=guest.ram.banks())
        dmodel = MiniPciDeviceModel(dm, sid, page, ev, ports, ForeignRam(view, 0), model, Disk(512))
        server = asyncio.create_task(dmodel.serve())
        async with asyncio.timeout(30):
            driver = VirtioPciDriver(guest, sbdf(DEV), GuestPageAllocator(guest.ram, reserve=1 << 20), msix=msix)
            blk = await VirtioBlk.bring_up(driver, features=FEATURES, queue_size=64)
            assert blk.capacity == 512 and driver.device_id == 2
            assert dmodel.claimed == driver.bars[0][0] and model.msix_enabled == msix
            data = os.urandom(8 * SECTOR_SIZE)
            await blk.write(10, data)
            assert bytes(dmodel.disk.data[10 * SECTOR_SIZE : 18 * SECTOR_SIZE]) == data
            assert await blk.read(10, 8) == data
            payloads = [os.urandom(SECTOR_SIZE) for _ in range(8)]
            await blk.batch([BlkOp("write", 100 + i, data=p) for i, p in enumerate(payloads)])
            assert await blk.batch([BlkOp("read", 100 + i, 1) for i in range(8)]) == payloads
            await blk.flush()
        assert dmodel.disk.flushes == 1 and dmodel.config_ioreqs > 20 and dmodel.bar_ioreqs > 30
        assert driver.interrupts >= 5
        if msix:
            assert dmodel.msis >= 5 and dmodel.intx == 0
            info = await asyncio.to_thread(sim_control.domain_info, domid)
            assert [0xFEE0_0000, 0x31] in info["msis"]  # queue 0's vector
        else:
            assert dmodel.msis == 0 and dmodel.intx >= 5 and not guest.irq_level(pci_intx_gsi(DEV, 0))
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


@pytest.mark.asyncio
async def test_virtio_blk_over_pci_with_msix(sim_host: SimHost, sim_control: SimControl, kernel: SimKernel) -> None:
    await _run_disk(sim_host, sim_control, kernel, msix=True)


@pytest.mark.asyncio
async def test_virtio_blk_over_pci_with_intx(sim_host: SimHost, sim_control: SimControl, kernel: SimKernel) -> None:
    await _run_disk(sim_host, sim_control, kernel, msix=False)


@pytest.mark.asyncio
async def test_an_unclaimed_function_reads_all_ones_and_arm_has_no_pci_config_ioreqs(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = await asyncio.to_thread(sim_control.create_domain, mem_bytes=MEM, arch="x86_64")
    arm = await asyncio.to_thread(sim_control.create_domain, mem_bytes=MEM)
    guest = await SimGuest.connect(sim_host.path, domid)
    arm_guest = await SimGuest.connect(sim_host.path, arm)
    try:
        assert await guest.pci_config_read(sbdf(DEV), 0, 4) == 0xFFFFFFFF
        driver = VirtioPciDriver(guest, sbdf(DEV), GuestPageAllocator(guest.ram, reserve=1 << 20))
        with pytest.raises(NoDevice):
            await driver.probe()
        with pytest.raises(SimHostError) as e:
            await arm_guest.pci_config_read(sbdf(DEV), 0, 4)
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(SimHostError) as e:
            await guest.pci_config_read(sbdf(DEV), 2, 4)  # crosses a dword
        assert e.value.errno == errno.EINVAL
    finally:
        guest.close()
        arm_guest.close()


def test_intx_levels_and_msis_reach_the_x86_guest_only(sim_host: SimHost, sim_control: SimControl,
                                                       kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=MEM, arch="x86_64")
    arm = sim_control.create_domain(mem_bytes=MEM)
    pc = PrivCmd(kernel)
    try:
        dm = DeviceModel(pc, domid)
        dm.set_pci_intx_level(0, DEV, 0, 1)
        assert sim_control.call({"op": "irq_level", "domid": domid, "irq": pci_intx_gsi(DEV, 0)})[0]["value"]
        dm.set_pci_intx_level(0, DEV, 0, 0)
        assert not sim_control.call({"op": "irq_level", "domid": domid, "irq": pci_intx_gsi(DEV, 0)})[0]["value"]
        for bad in ((1, DEV, 0, 1), (0, 32, 0, 1), (0, DEV, 4, 1), (0, DEV, 0, 2)):
            with pytest.raises(OSError) as e:
                dm.set_pci_intx_level(*bad)
            assert e.value.errno == errno.EINVAL, bad
        dm.inject_msi(0xFEE0_0000, 0x41)
        assert sim_control.domain_info(domid)["msis"] == [[0xFEE0_0000, 0x41]]
        for op in (lambda d: d.inject_msi(0xFEE0_0000, 0x41), lambda d: d.set_pci_intx_level(0, DEV, 0, 1)):
            with pytest.raises(OSError) as e:
                op(DeviceModel(pc, arm))
            assert e.value.errno == errno.EOPNOTSUPP
    finally:
        pc.close()
