"""ForeignGuestMemory over the simulated host: guest RAM through privcmd foreign mappings only;
holes (frames Xen refuses) and ranges outside RAM raise GuestMemoryError and are never touched;
a shadow queue whose guest buffer lies in a hole stops with the reason."""

from __future__ import annotations

import os

import pytest

from vhost_user import GuestMemoryError
from vhost_user.virtqueue import SplitQueueDriver, split_ring_layout
from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_sim.guest import SimGuest
from xen_vhost_master.virtio_mmio import QueueConfig
from xen_vhost_master.xen.privcmd import PrivCmd

RAM0 = 0x4000_0000
HOLE = RAM0 + (4 << 20)


@pytest.mark.asyncio
async def test_foreign_guest_memory_reads_writes_and_refuses_holes(no_fd_leak, sim_host, sim_control, kernel):
    domid = sim_control.create_domain(mem_bytes=16 << 20, holes=[(HOLE, 2 * 4096)])
    banks = [(int(a), int(b)) for a, b in sim_control.domain_info(domid)["banks"]]
    guest = await SimGuest.connect(sim_host.path, domid)
    privcmd = PrivCmd(kernel)
    mem = ForeignGuestMemory(privcmd, domid, banks)
    try:
        assert mem.banks() == banks
        guest.ram.view(RAM0 + 0x1000, 8)[:] = b"from-gst"
        with mem.view(RAM0 + 0x1000, 8) as v:
            assert bytes(v) == b"from-gst"
            v[:4] = b"DM!!"
        assert bytes(guest.ram.view(RAM0 + 0x1000, 8)) == b"DM!!-gst"
        with mem.view(HOLE - 4096, 4096) as v:  # just below the hole: fine
            assert len(v) == 4096
        mem.check(HOLE - 4096, 4096)  # what the ring walk validates buffers with: the same rule, no view
        for gpa, n in ((HOLE - 8, 16), (HOLE + 4096, 1), (RAM0 - 4096, 16), (RAM0 + (16 << 20) - 4, 8), (RAM0, -1)):
            with pytest.raises(GuestMemoryError):
                mem.view(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.check(gpa, n)
    finally:
        mem.close()
        mem.close()  # idempotent
        privcmd.close()
        guest.close()


@pytest.mark.asyncio
async def test_shadow_queue_with_a_buffer_in_a_hole_stops(sim_host, sim_control, kernel):
    domid = sim_control.create_domain(mem_bytes=16 << 20, holes=[(HOLE, 4096)])
    banks = [(int(a), int(b)) for a, b in sim_control.domain_info(domid)["banks"]]
    guest = await SimGuest.connect(sim_host.path, domid)
    privcmd = PrivCmd(kernel)
    mem = ForeignGuestMemory(privcmd, domid, banks)
    errors: list[tuple[int, str]] = []
    dp = ShadowDataPath(mem, banks, pool_size=1 << 20, max_queues=1, max_queue_size=16,
                        on_error=lambda i, r: errors.append((i, r)))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    desc, avail, used, _ = split_ring_layout(16, RAM0)
    drv = SplitQueueDriver(guest.ram, 16, desc, avail, used)
    try:
        dp.open_queue(QueueConfig(0, 16, desc, avail, used), 0, kick)
        drv.add([(RAM0 + 0x8000, 16)], [(HOLE, 512)])
        dp.notify(0)
        assert errors and errors[0][0] == 0 and "not in guest memory" in errors[0][1]
        assert dp.inflight(0) == 0
    finally:
        drv.release()
        dp.close()
        mem.close()
        privcmd.close()
        os.close(kick)
        guest.close()


@pytest.mark.asyncio
async def test_paged_out_frames_are_retried_and_mapped(sim_host, sim_control, kernel):
    paged = RAM0 + 0x10000
    domid = sim_control.create_domain(mem_bytes=1 << 20, paged=[(paged, 3 * 4096)])
    banks = [(int(a), int(b)) for a, b in sim_control.domain_info(domid)["banks"]]
    guest = await SimGuest.connect(sim_host.path, domid)
    privcmd = PrivCmd(kernel)
    try:
        mem = ForeignGuestMemory(privcmd, domid, banks)
        try:
            guest.ram.view(paged + 4096, 4)[:] = b"page"
            with mem.view(paged, 3 * 4096) as v:
                assert bytes(v[4096:4100]) == b"page"
        finally:
            mem.close()
    finally:
        privcmd.close()
        guest.close()
