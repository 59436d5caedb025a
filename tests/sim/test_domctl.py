"""XEN_DOMCTL_pausedomain / unpausedomain: the adapter (``xen/domctl.py``) through privcmd's
HYPERCALL ioctl, against the simulated Xen, which answers as xen/common/domctl.c and domain.c do:
counted pause references, EACCES for a foreign interface version, ESRCH, EINVAL, EOVERFLOW."""

from __future__ import annotations

import asyncio
import errno

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.domctl import (
    INTERFACE_VERSIONS,
    Domctl,
    DomctlInterfaceUnknown,
)
from xen_vhost_master.xen.privcmd import PrivCmd

TIMEOUT = 5.0


@pytest.mark.asyncio
async def test_pause_references_are_counted_and_hold_the_vcpus(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=1 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    with PrivCmd(kernel) as pc:
        dc = Domctl(pc)
        try:
            dc.pause(domid)
            sim_control.pause(domid)  # someone else's reference (the toolstack's)
            assert sim_control.domain_info(domid)["pause_count"] == 2
            access = asyncio.ensure_future(guest.mmio_read(0x1000, 4))
            dc.unpause(domid)
            done, _ = await asyncio.wait({access}, timeout=0.2)
            assert not done  # one reference left: the vCPU still does not run
            sim_control.unpause(domid)
            assert await asyncio.wait_for(access, TIMEOUT) == 0xFFFFFFFF  # runs at 0 (unclaimed MMIO)
            with pytest.raises(XenError) as ei:
                dc.unpause(domid)  # no reference left to drop
            assert ei.value.errno == errno.EINVAL
            for _ in range(255):
                dc.pause(domid)
            with pytest.raises(XenError) as ei:
                dc.pause(domid)  # "an arbitrary 255"
            assert ei.value.errno == errno.EOVERFLOW
            with pytest.raises(XenError) as ei:
                dc.pause(0)  # the caller's own domain
            assert ei.value.errno == errno.EINVAL
            sim_control.destroy_domain(domid)
            with pytest.raises(XenError) as ei:
                dc.unpause(domid)
            assert ei.value.errno == errno.ESRCH
        finally:
            dc.close()
            guest.close()


def test_interface_version_is_probed_and_kept(sim_control: SimControl, kernel: SimKernel) -> None:
    """The simulated Xen says 4.17 (0x15 first) but accepts 0x16 only: found, then used alone."""
    domid = sim_control.create_domain(mem_bytes=1 << 20)
    with PrivCmd(kernel) as pc:
        dc = Domctl(pc)
        try:
            assert dc.candidates()[0] == INTERFACE_VERSIONS[(4, 17)]
            sim_control.set_domctl_interface(0x16)
            dc.pause(domid)
            assert dc.interface_version == 0x16 and dc.candidates() == [0x16]
            assert sim_control.domain_info(domid)["pause_count"] == 1
            # Once a version is known, EACCES is a refusal (e.g. an XSM policy), not a mismatch.
            sim_control.set_domctl_interface(0x17)
            with pytest.raises(XenError) as ei:
                dc.unpause(domid)
            assert ei.value.errno == errno.EACCES and not isinstance(ei.value, DomctlInterfaceUnknown)
        finally:
            dc.close()


def test_every_version_refused(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=1 << 20)
    sim_control.set_domctl_interface(0x99)
    with PrivCmd(kernel) as pc:
        dc = Domctl(pc)
        try:
            with pytest.raises(DomctlInterfaceUnknown) as ei:
                dc.pause(domid)
            assert ei.value.errno == errno.EACCES and dc.interface_version is None
            assert sim_control.domain_info(domid)["pause_count"] == 0
        finally:
            dc.close()
