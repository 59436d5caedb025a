"""Simulated guest's virtio-net ↔ the daemon ↔ dpdk-testpmd (io forwarding, port looped to itself):
frames the guest transmits come back on its receive queue. testpmd connects to the daemon
(client=1: the daemon listens, as with rust-vmm back-ends) and serves guest RAM exposed by the
simulator as a memfd (the labelled baseline; shadow virtqueues are the real-Xen path)."""

from __future__ import annotations

import asyncio
import os

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioNet
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

from tests.peers.harness import TESTPMD_FORWARDING_LOG

BASE, IRQ, TIMEOUT = 0x0200_0000, 34, 25.0


def frame(n: int) -> bytes:
    return b"\xff" * 6 + bytes([0x02, 0, 0, 0, 0, n]) + b"\x88\xb5" + os.urandom(60 + n)


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_factories=["uvloop"])  # testpmd burns a CPU: run it once, on the daemon's loop
async def test_guest_frames_loop_back_through_testpmd(sim_host, sim_control, kernel, peers, sim_dir):
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    sock = os.path.join(sim_dir, "net.sock")
    listener = UnixListener(sock)
    pmd, _ = peers.testpmd(sock=sock, client=True)
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    log = device_logger("xvm.test", domid, "net0")
    ioreq = IoreqServer(privcmd, evtchn, domid, log)
    banks, memfd = sim_control.sim_only_ram_memfd(domid)
    device = Device(DeviceConfig(devid=0, device_id=1, base=BASE, irq=IRQ, listen=True, num_queues=2),
                    connect=lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT),
                    memory=sim_memfd_export(banks, memfd), set_irq=lambda level: ioreq.set_irq(IRQ, level), log=log)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        async with asyncio.timeout(TIMEOUT):
            ioreq.create()
            await device.start()
            ioreq.add_window(BASE, 0x200, device)
            ioreq.enable()
            net = await VirtioNet.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), queue_size=64)
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)  # after testpmd's RX drain, not before
            # One frame at a time (each transmit reuses the buffer of the one before), then a burst
            # of frames in flight together: every frame comes back exactly once, in order. DPDK's
            # lcore polls the guest's avail idx while the guest writes it; a torn write (0 for a
            # moment) once made it replay stale avail slots for a whole index wrap: frame0, frame1,
            # frame1, ... (see vhost_user.virtqueue, "Single stores").
            sent = [frame(i) for i in range(8)]
            received = []
            for f in sent:
                await net.send(f)
                received.append(await net.recv(TIMEOUT))
            assert received == sent
            burst = [frame(i) for i in range(8, 16)]
            await asyncio.gather(*(net.send(f) for f in burst))
            assert [await net.recv(TIMEOUT) for _ in burst] == burst
            # testpmd polls: it sets VRING_USED_F_NO_NOTIFY, so the guest need not kick (and did not);
            # it still signals used buffers, which the daemon turns into interrupts.
            assert device.stats.per_queue_calls.get(0, 0) > 0 and device.stats.interrupts > 0
            await net.close()
    finally:
        guest.close()
        await ioreq.close()
        await device.close()
        listener.close()
        os.close(memfd)
        evtchn.close()
        privcmd.close()
