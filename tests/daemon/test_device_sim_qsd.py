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
import signal

import pytest

from vhost_user import AsyncFrontend
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

BASE, IRQ = 0x0200_0000, 33
TIMEOUT = 60


class Daemon:
    """The daemon's pieces for one guest with one device, assembled by hand."""

    def __init__(self, kernel, control, domid: int, sock: str, queues: int | None = None) -> None:
        from xen_vhost_master.guestmem.foreign import foreign_reader

        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "blk0")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        info, fds = control.call({"op": "guest_ram", "domid": domid})
        self.memfd = fds[0]
        cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock, num_queues=queues)
        self.device = Device(
            cfg, connect=lambda: AsyncFrontend.connect(sock),
            memory=sim_memfd_export(info["banks"], self.memfd, foreign_reader(self.privcmd, domid)),
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


async def blk_request(driver, alloc, queue: int, kind: int, sector: int, data: bytes = b"", length: int = 0) -> bytes:
    """One virtio-blk request (virtio 1.2 §5.2.6) on ``queue``, written by hand on the raw driver."""
    import struct

    size = len(data) or length
    hdr, buf, status = alloc.alloc(16), alloc.alloc(max(size, 1)), alloc.alloc(1)
    ram = driver.bus.ram
    ram.view(hdr, 16)[:] = struct.pack("<IIQ", kind, 0, sector)
    if data:
        ram.view(buf, size)[:] = data
    readable = [(hdr, 16)] + ([(buf, size)] if data else [])
    writable = ([(buf, size)] if not data else []) + [(status, 1)]
    fut = await driver.submit(queue, readable, writable)
    await asyncio.wait_for(fut, TIMEOUT)
    assert ram.view(status, 1)[0] == 0, "virtio-blk status not OK"
    out = bytes(ram.view(buf, size)) if not data else b""
    for gpa in (hdr, buf, status):
        alloc.free(gpa)
    return out


@pytest.mark.peer
@pytest.mark.asyncio
async def test_two_queues_and_a_driver_reset_without_backend_restart(sim_host, sim_control, kernel, peers):
    from xen_vhost_sim.guest_driver import VirtioMmioDriver

    qsd = peers.qsd_raw(size=8 << 20, num_queues=2)
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=2)
    daemon = Daemon(kernel, sim_control, domid, str(qsd.sock))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        frontend = daemon.device.frontend
        alloc = GuestPageAllocator(guest.ram)
        rng = random.Random(3)
        for round_ in range(2):  # probe, I/O on both queues, reset; then the same again
            driver = VirtioMmioDriver(guest, BASE, IRQ, alloc, vcpu=round_ % 2)
            await asyncio.wait_for(driver.initialize((1 << 32) | (1 << 12), [64, 64]), TIMEOUT)  # VERSION_1 | MQ
            for queue in (0, 1):
                data = rng.randbytes(8192)
                sector = 100 * (2 * round_ + queue)
                await blk_request(driver, alloc, queue, 1, sector, data)  # VIRTIO_BLK_T_OUT
                assert await blk_request(driver, alloc, queue, 0, sector, length=8192) == data  # T_IN
                with open(qsd.image, "rb") as f:
                    f.seek(sector * 512)
                    assert f.read(8192) == data
            assert set(daemon.device.stats.per_queue_kicks) == {0, 1}
            await asyncio.wait_for(driver.close(), TIMEOUT)  # Status = 0: the daemon stops both rings
            assert daemon.device.frontend is frontend and not frontend.broken  # same back-end connection
        assert daemon.device.stats.starts == 2 and daemon.device.stats.stops == 2
    finally:
        guest.close()
        await daemon.close()


@pytest.mark.peer
@pytest.mark.asyncio
async def test_backend_killed_and_restarted_under_io_guest_sees_a_pause(sim_host, sim_control, kernel, peers, tmp_path):
    """qemu-storage-daemon is SIGKILLed twice under guest I/O (once with a request just kicked, once
    with requests queued while it is dead) and restarted on the same image; the daemon reconnects,
    replays features, memory table and rings (base = the guest's used index), and every request
    completes; the data is right in the guest and in the raw file."""
    first = peers.qsd_raw(size=8 << 20)
    link = tmp_path / "blk.sock"
    link.symlink_to(first.sock)

    def restart(old):
        old.process._signal_group(signal.SIGKILL)
        new = peers.qsd_raw(image=first.image)
        tmp = tmp_path / "blk.sock.new"
        tmp.symlink_to(new.sock)
        os.replace(tmp, link)  # the daemon's socket path now leads to the new back-end
        return new

    domid = sim_control.create_domain(mem_bytes=64 << 20)
    daemon = Daemon(kernel, sim_control, domid, str(link))
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        await daemon.start()
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
        rng = random.Random(9)
        expected: dict[int, bytes] = {}

        async def write_batch(first_sector: int, count: int, *, kill_after_kick):
            ops = []
            for i in range(count):
                data = rng.randbytes(4096)
                expected[first_sector + 8 * i] = data
                ops.append(BlkOp("write", first_sector + 8 * i, data=data))
            kicked = asyncio.Event()
            notify = daemon.device.memory.notify

            def notify_and_tell(index):
                notify(index)
                kicked.set()

            daemon.device.memory.notify = notify_and_tell
            task = asyncio.ensure_future(blk.batch(ops))
            await asyncio.wait_for(kicked.wait(), TIMEOUT)  # the back-end has been kicked: requests in flight
            daemon.device.memory.notify = notify
            back = kill_after_kick()
            await asyncio.wait_for(task, TIMEOUT)
            return back

        # One request in flight at the kill: with zero copy (no INFLIGHT_SHMFD) a resumed ring
        # restarts at the guest's used index, which is exact only when the back-end completes in
        # order (QEMU's rule too); the shadow path tracks in-flight chains itself and is exact at
        # any depth (test_shadow_sim.py kills qemu-storage-daemon with 16 in flight).
        qsd = await write_batch(0, 1, kill_after_kick=lambda: restart(first))
        if daemon.device.reconnecting is not None:
            await asyncio.wait_for(daemon.device.reconnecting, TIMEOUT)
        assert daemon.device.stats.reconnects == 1
        qsd.process._signal_group(signal.SIGKILL)  # dead while the guest queues more
        batch = asyncio.ensure_future(blk.batch([BlkOp("write", 1000 + 8 * i, data=expected.setdefault(1000 + 8 * i, rng.randbytes(4096))) for i in range(8)]))
        restart(qsd)
        await asyncio.wait_for(batch, TIMEOUT)
        for sector, data in expected.items():
            assert await asyncio.wait_for(blk.read(sector, 8), TIMEOUT) == data
        with open(first.image, "rb") as f:
            for sector, data in expected.items():
                f.seek(sector * 512)
                assert f.read(4096) == data
        assert daemon.device.stats.reconnects == 2
        await blk.close()
    finally:
        guest.close()
        await daemon.close()
