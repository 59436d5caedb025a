"""Grant mapping through the real GrantDev adapter against the simulated host."""

from __future__ import annotations

import asyncio
import errno

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import GntdevUnmapNotify
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.gntdev import GrantDev

RAM0 = 0x40000000
GFN0 = RAM0 >> 12


@pytest.mark.asyncio
async def test_rw_and_ro_grants_map_and_ro_refuses_writes(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        guest.ram.view(RAM0 + 5 * 4096, 8)[:] = b"rw-page!"
        guest.ram.view(RAM0 + 9 * 4096, 8)[:] = b"ro-page!"
        rw = guest.grant(GFN0 + 5)
        ro = guest.grant(GFN0 + 9, readonly=True)
        with GrantDev(kernel) as gd:
            m = gd.map_grant_refs(domid, [rw, ro], writable=False)
            v = m.view()
            assert bytes(v[0:8]) == b"rw-page!" and bytes(v[4096 : 4096 + 8]) == b"ro-page!"
            with pytest.raises(TypeError):
                v[0] = 0  # read-only mapping
            del v
            gd.unmap(m)
            with pytest.raises(XenError) as ei:
                gd.map_grant_refs(domid, [ro], writable=True)
            assert ei.value.errno == errno.EINVAL
            w = gd.map_grant_refs(domid, [rw], writable=True)
            w.view()[0:4] = b"BACK"
            assert guest.ram.view(RAM0 + 5 * 4096, 4).tobytes() == b"BACK"
            gd.unmap(w)
            guest.revoke(rw)
            with pytest.raises(XenError) as ei:
                gd.map_grant_refs(domid, [rw])
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(XenError) as ei:
                gd.map_grant_refs(domid + 100, [ro], writable=False)
            assert ei.value.errno == errno.EINVAL
    finally:
        guest.close()


@pytest.mark.asyncio
async def test_unmap_notify_clears_byte_and_sends_event(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        guest.ram.view(RAM0 + 3 * 4096 + 10, 1)[0] = 0x5A
        ref = guest.grant(GFN0 + 3)
        gport = guest.evtchn_alloc_unbound(0)
        with GrantDev(kernel) as gd, EventChannel(kernel) as ev:
            local = ev.bind_interdomain(domid, gport)
            m = gd.map_grant_refs(domid, [ref])
            gd.set_unmap_notify(m, 10, GntdevUnmapNotify.CLEAR_BYTE | GntdevUnmapNotify.SEND_EVENT, local)
            waiter = asyncio.ensure_future(guest.evtchn_wait(gport))
            gd.unmap(m)
            await asyncio.wait_for(waiter, 5.0)
            assert guest.ram.view(RAM0 + 3 * 4096 + 10, 1)[0] == 0
            with pytest.raises(XenError) as ei:
                gd.set_unmap_notify(m, 0, GntdevUnmapNotify.CLEAR_BYTE)
            assert ei.value.errno == errno.ENOENT
    finally:
        guest.close()


@pytest.mark.asyncio
async def test_closing_gntdev_runs_pending_unmap_notifications(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        ref = guest.grant(GFN0 + 1)
        gport = guest.evtchn_alloc_unbound(0)
        with EventChannel(kernel) as ev:
            local = ev.bind_interdomain(domid, gport)
            gd = GrantDev(kernel)
            m = gd.map_grant_refs(domid, [ref])
            gd.set_unmap_notify(m, 0, GntdevUnmapNotify.SEND_EVENT, local)
            assert m.mapping is not None
            m.mapping.close()
            waiter = asyncio.ensure_future(guest.evtchn_wait(gport))
            gd.close()  # the process "dies" with the grant still mapped by gntdev
            await asyncio.wait_for(waiter, 5.0)
    finally:
        guest.close()
