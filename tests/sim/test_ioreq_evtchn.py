"""Event channels both ways, an IOREQ round trip and interrupt lines, through the real adapters."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import IoreqType
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

TIMEOUT = 5.0
MMIO_BASE = 0x02000000


async def drain(ev: EventChannel) -> list[int]:
    """Consume the conservative event Xen raises on a freshly bound port."""
    ports = await asyncio.wait_for(ev.wait(), TIMEOUT)
    ev.unmask(*ports)
    return ports


@pytest.mark.asyncio
async def test_evtchn_notify_both_directions_wakes_asyncio_readers(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        with EventChannel(kernel) as ev:
            gport = guest.evtchn_alloc_unbound(0)
            local = ev.bind_interdomain(domid, gport)
            assert await drain(ev) == [local]
            # guest -> dom0: twice before the unmask: one delivery, the second stays pending
            guest.evtchn_notify(gport)
            guest.evtchn_notify(gport)
            assert await asyncio.wait_for(ev.wait(), TIMEOUT) == [local]
            assert ev.read_pending() == []
            ev.unmask(local)
            assert await asyncio.wait_for(ev.wait(), TIMEOUT) == [local]
            ev.unmask(local)
            # dom0 -> guest
            waiter = asyncio.ensure_future(guest.evtchn_wait(gport))
            ev.notify(local)
            await asyncio.wait_for(waiter, TIMEOUT)
            ev.unbind(local)
            with pytest.raises(XenError) as ei:
                ev.notify(local)
            assert ei.value.errno == errno.ENOTCONN
    finally:
        guest.close()


@pytest.mark.asyncio
async def test_ioreq_round_trip_read_and_write(sim_host: SimHost, sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=16 << 20, vcpus=2)
    guest = await SimGuest.connect(sim_host.path, domid)
    pc, ev = PrivCmd(kernel), EventChannel(kernel)
    try:
        dm = DeviceModel(pc, domid)
        nr = dm.nr_vcpus()
        assert nr == 2
        sid = dm.create_ioreq_server()
        page = IoreqPage.map(pc, domid, sid, nr)
        dm.set_ioreq_server_state(sid, True)
        ports = [ev.bind_interdomain(domid, page.vp_eport(i)) for i in range(nr)]
        dm.map_io_range(sid, MMIO_BASE, MMIO_BASE + 0x1FF)
        assert sorted(await drain(ev)) == sorted(ports)
        assert page.ready() == []

        regs = {0x000: 0x74726976, 0x004: 2}
        written: list[tuple[int, int, int]] = []
        raw: list[int] = []

        async def serve_one() -> None:
            fired = await asyncio.wait_for(ev.wait(), TIMEOUT)
            ev.unmask(*fired)
            for port in fired:
                vcpu = ports.index(port)
                raw.append(int(page.slot(vcpu).data))
                req = page.take(vcpu)
                assert req is not None and req.type == IoreqType.COPY and req.count == 1
                if req.is_write:
                    written.append((vcpu, req.addr - MMIO_BASE, req.data))
                    page.complete(vcpu)
                else:
                    page.complete(vcpu, regs.get(req.addr - MMIO_BASE, 0))
                ev.notify(port)

        read = asyncio.ensure_future(guest.mmio_read(MMIO_BASE, 4, vcpu=1))
        await serve_one()
        assert await asyncio.wait_for(read, TIMEOUT) == 0x74726976

        write = asyncio.ensure_future(guest.mmio_write(MMIO_BASE + 0x70, 1, 0x1FF))
        await serve_one()
        await asyncio.wait_for(write, TIMEOUT)
        assert raw[-1] == 0x1FF  # Arm Xen passes the whole source register ...
        assert written == [(0, 0x70, 0xFF)]  # ... and IoreqPage masks it to the access size

        # an address no server claims: all-ones, no ioreq
        assert await asyncio.wait_for(guest.mmio_read(MMIO_BASE + 0x200, 4), TIMEOUT) == 0xFFFFFFFF
        assert ev.read_pending() == []

        # an edge SPI raised by set_irq_level (level 0 ignored, as Xen on Arm), taken by the guest
        assert guest.irq_level(33) is False
        waiter = asyncio.ensure_future(guest.wait_irq(33))
        dm.set_irq_level(33, 1)
        await asyncio.wait_for(waiter, TIMEOUT)
        assert guest.irq_level(33) is False
        dm.set_irq_level(33, 1)
        dm.set_irq_level(33, 0)
        assert guest.irq_level(33) is True
        await asyncio.wait_for(guest.wait_irq(33), TIMEOUT)
        assert guest.irq_level(33) is False

        dm.unmap_io_range(sid, MMIO_BASE, MMIO_BASE + 0x1FF)
        dm.set_ioreq_server_state(sid, False)
        dm.destroy_ioreq_server(sid)
        page.close()
        with pytest.raises(XenError) as ei:
            dm.get_ioreq_server_info(sid)
        assert ei.value.errno == errno.ENOENT
    finally:
        ev.close()
        pc.close()
        guest.close()


@pytest.mark.asyncio
async def test_unbound_port_allocated_by_dom0_and_bound_by_the_guest(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=1 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        with EventChannel(kernel) as ev:
            local = ev.bind_unbound_port(domid)
            gport = guest.evtchn_bind_interdomain(0, local)
            await asyncio.wait_for(guest.evtchn_wait(gport), TIMEOUT)  # Xen's event on a fresh bind
            ev.notify(local)
            await asyncio.wait_for(guest.evtchn_wait(gport), TIMEOUT)
            guest.evtchn_notify(gport)
            assert await asyncio.wait_for(ev.wait(), TIMEOUT) == [local]
            with pytest.raises(OSError) as ei:
                guest.evtchn_bind_interdomain(0, local)  # already bound
            assert ei.value.errno == errno.EINVAL
    finally:
        guest.close()


def test_the_prepared_calls_of_a_closed_event_channel_fail_with_ebadf_even_when_its_number_is_reused(
        no_fd_leak: None, kernel: SimKernel) -> None:
    """read_ports and unmask_bytes are bound to the fd when made: after close they must not reach
    the next file that gets the same number."""
    ev = EventChannel(kernel)
    number = ev.fd
    ev.close()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, number)  # the number goes to another file
    try:
        for call in (ev.read_ports, lambda: ev.unmask_bytes(b"\0\0\0\0")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EBADF
    finally:
        os.close(number)
        os.close(null)
