"""First end-to-end I/O: simulated guest → IOREQ server → device model → qemu-storage-daemon.

The guest is the simulator's spec-following virtio-mmio driver; the daemon's Xen code (privcmd,
evtchn, dm_op, the ioreq page) runs against the simulated host's ioctls; the back-end is a real
qemu-storage-daemon exporting a raw file, reached through the simulator's labelled memfd
exposure of guest RAM (the copying shadow path for real Xen is a later slice).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random

import pytest

from vhost_user import AsyncFrontend
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.memory import sim_memfd_export
from xen_vhost_master.sim.guest import SimGuest
from xen_vhost_master.sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_master.sim.guest_driver import GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

BASE, IRQ = 0x0200_0000, 33
TIMEOUT = 60


class Daemon:
    """The daemon's pieces for one guest with one device, assembled by hand."""

    def __init__(self, kernel, control, domid: int, sock: str, queues: int | None = None) -> None:
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "blk0")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        info, fds = control.call({"op": "guest_ram", "domid": domid})
        self.memfd = fds[0]
        cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock, num_queues=queues)
        self.device = Device(
            cfg, connect=lambda: AsyncFrontend.connect(sock), memory=sim_memfd_export(info["banks"], self.memfd),
            set_irq=lambda level: self.ioreq.set_irq(IRQ, level), log=self.log,
        )

    async def start(self) -> None:
        self.ioreq.create()
        await self.device.start()
        self.ioreq.add_window(BASE, 0x200, self.device)
        self.ioreq.enable()

    async def close(self) -> None:
        await self.ioreq.close()
        await self.device.close()
        os.close(self.memfd)
        self.evtchn.close()
        self.privcmd.close()


async def write_read_verify(blk: VirtioBlk, rng: random.Random, total: int, req: int, depth: int, first_sector: int) -> bytes:
    data = rng.randbytes(total)
    per = req // 512
    ops = [BlkOp("write", first_sector + i * per, data=data[i * req:(i + 1) * req]) for i in range(total // req)]
    for i in range(0, len(ops), depth):
        await asyncio.wait_for(blk.batch(ops[i:i + depth]), TIMEOUT)
    reads = [BlkOp("read", first_sector + i * per, count=per) for i in range(total // req)]
    got = b""
    for i in range(0, len(reads), depth):
        got += b"".join(await asyncio.wait_for(blk.batch(reads[i:i + depth]), TIMEOUT))
    assert got == data
    return data


@pytest.mark.peer
@pytest.mark.asyncio
async def test_guest_writes_and_reads_4mib_through_the_daemon_to_qsd(sim_host, sim_control, kernel, peers, caplog):
    caplog.set_level(logging.INFO)
    qsd = peers.qsd_raw(size=16 << 20)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    daemon = Daemon(kernel, sim_control, domid, str(qsd.sock))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        alloc = GuestPageAllocator(guest.ram)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), TIMEOUT)
        assert blk.capacity == (16 << 20) // 512  # config space, read through the model from qsd
        rng = random.Random(1)
        written = {}
        for req, depth, offset in ((4096, 1, 0), (65536, 8, 2 << 20), (4096, 8, 6 << 20), (65536, 1, 10 << 20)):
            written[offset] = await write_read_verify(blk, rng, 1 << 20 if req == 4096 else 2 << 20, req, depth, offset // 512)
        await asyncio.wait_for(blk.flush(), TIMEOUT)
        with open(qsd.image, "rb") as f:
            for offset, data in written.items():
                f.seek(offset)
                assert f.read(len(data)) == data, f"raw file differs at {offset:#x}"
        assert daemon.device.stats.notifies > 0 and daemon.device.stats.interrupts > 0
        assert daemon.ioreq.stats.refused == 0
        await blk.close()
    finally:
        guest.close()
        await daemon.close()
    assert sim_control.domain_info(domid)["servers"] == []  # the ioreq server is gone
