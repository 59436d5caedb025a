"""Interrupt lines on the vCPU channel (sim.vcpu_channel): the device model's XEN_DMOP_set_irq_level
reaches the guest's ``wait_irq`` without the simulated host, with the semantics of Xen on Arm for
libxl's edge-rising virtio-mmio SPIs (xen/arch/arm/vgic.c vgic_inject_irq): level 1 is an edge,
pending until the guest takes it (a raise while it is pending is the same interrupt), level 0 is
ignored (a raise withdrawn before the guest looks is still an interrupt), and the host's reference
path still sees every line a device model raised by itself."""

from __future__ import annotations

import asyncio
import errno
import os
import signal

import pytest

from tests.sim.test_vcpu_channel import BASE, DOMID, TIMEOUT, Dm, dm_and_guest, sim_process  # noqa: F401  (fixture)
from xen_vhost_sim.guest import SimGuest

IRQ = 40
ACK = BASE + 0x64  # virtio-mmio InterruptACK
UNCLAIMED = BASE + 0x10000


async def sent(guest: SimGuest) -> None:
    """Until ``guest``'s request in flight has been written to the host."""
    while not guest._futs:
        await asyncio.sleep(0)


async def round_trip(guest: SimGuest, dm: Dm) -> None:
    """One MMIO read served: the guest's loop has run everything ready before it returns."""
    read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
    await dm.serve_one(0x74726976)
    assert await asyncio.wait_for(read, TIMEOUT) == 0x74726976


@pytest.mark.asyncio
async def test_interrupt_lines_flow_while_the_simulated_host_is_stopped(sim_process: tuple[str, int]) -> None:
    path, pid = sim_process
    async with dm_and_guest(path) as (dm, guest):
        await dm.drain()
        await round_trip(guest, dm)  # the vCPU's own route is set up
        dm.dm.set_irq_level(IRQ, 1)  # the first change goes through the host, which hands over the line
        await asyncio.wait_for(guest.wait_irq(IRQ), TIMEOUT)
        assert not guest.irq_level(IRQ)  # taken
        os.kill(pid, signal.SIGSTOP)  # no host from here on: every hop through it would hang
        try:
            for _ in range(10):
                waiter = asyncio.ensure_future(guest.wait_irq(IRQ))
                await round_trip(guest, dm)
                assert not waiter.done()  # nothing raised: no interrupt
                dm.dm.set_irq_level(IRQ, 0)  # a falling edge ...
                await round_trip(guest, dm)
                assert not waiter.done()  # ... is none
                dm.dm.set_irq_level(IRQ, 1)  # a raise withdrawn before the guest looks ...
                dm.dm.set_irq_level(IRQ, 0)
                await asyncio.wait_for(waiter, TIMEOUT)  # ... is an interrupt (edge, not level)
                assert not guest.irq_level(IRQ)
                dm.dm.set_irq_level(IRQ, 1)
                dm.dm.set_irq_level(IRQ, 1)  # raised again while pending: the same interrupt
                assert guest.irq_level(IRQ)
                await asyncio.wait_for(guest.wait_irq(IRQ), TIMEOUT)  # pending: taken at once
                again = asyncio.ensure_future(guest.wait_irq(IRQ))
                ack = asyncio.ensure_future(guest.mmio_write(ACK, 4, 1))
                await dm.serve_one(0, lambda: dm.dm.set_irq_level(IRQ, 0))
                await asyncio.wait_for(ack, TIMEOUT)
                await round_trip(guest, dm)
                assert not again.done() and not guest.irq_level(IRQ)  # one interrupt per edge
                dm.dm.set_irq_level(IRQ, 1)
                await asyncio.wait_for(again, TIMEOUT)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert not guest.irq_level(IRQ)


@pytest.mark.asyncio
async def test_the_hosts_path_sees_lines_the_device_model_changed_itself(sim_process: tuple[str, int]) -> None:
    path, _pid = sim_process
    async with dm_and_guest(path, vcpu_channel=False) as (dm, via_host):
        dm.dm.set_irq_level(IRQ, 1)  # from here on the device model writes the line itself
        assert via_host.irq_level(IRQ)
        await asyncio.wait_for(via_host.wait_irq(IRQ), TIMEOUT)  # pending: taken at once
        assert not via_host.irq_level(IRQ)
        waiter = asyncio.ensure_future(via_host.wait_irq(IRQ))
        await asyncio.wait_for(sent(via_host), TIMEOUT)
        # an access on the same connection, unclaimed (all-ones): the host took the wait first
        assert await asyncio.wait_for(via_host.mmio_read(UNCLAIMED, 4), TIMEOUT) == 0xFFFFFFFF
        assert not waiter.done()
        dm.dm.set_irq_level(IRQ, 0)  # ignored
        assert await asyncio.wait_for(via_host.mmio_read(UNCLAIMED, 4), TIMEOUT) == 0xFFFFFFFF
        assert not waiter.done()
        dm.dm.set_irq_level(IRQ, 1)
        await asyncio.wait_for(waiter, TIMEOUT)
        assert not via_host.irq_level(IRQ)  # taken


@pytest.mark.asyncio
async def test_a_handed_over_line_keeps_the_dm_op_checks(sim_process: tuple[str, int]) -> None:
    path, _pid = sim_process
    async with dm_and_guest(path) as (dm, guest):
        dm.dm.set_irq_level(IRQ, 1)
        await asyncio.wait_for(guest.wait_irq(IRQ), TIMEOUT)
        for irq, level in ((31, 1), (96, 1), (IRQ, 2), (31, 0), (IRQ, 3)):  # not an SPI of the vGIC, not a level
            with pytest.raises(OSError) as exc:
                dm.dm.set_irq_level(irq, level)
            assert exc.value.errno == errno.EINVAL
        assert not guest.irq_level(IRQ)
        dm.pc.restrict(DOMID + 1)  # the fd may no longer act on the guest
        for level in (1, 0):
            with pytest.raises(OSError) as exc:
                dm.dm.set_irq_level(IRQ, level)
            assert exc.value.errno == errno.EPERM
        assert not guest.irq_level(IRQ)


@pytest.mark.asyncio
async def test_two_guests_of_one_domain_each_see_the_interrupts_they_wait_for(sim_process: tuple[str, int]) -> None:
    """The domain's asserted-line events are one eventfd every guest of the domain polls, and a
    guest keeps polling it from one wait to the next: one that is not waiting gives back the
    event it read, so the guest that waits is woken."""
    path, _pid = sim_process
    async with dm_and_guest(path) as (dm, guest):
        other = await SimGuest.connect(path, DOMID)
        try:
            await dm.drain()
            await round_trip(guest, dm)
            dm.dm.set_irq_level(IRQ, 1)  # (the first change hands the line over)
            await asyncio.wait_for(guest.wait_irq(IRQ), TIMEOUT)
            for _ in range(5):
                for who in (guest, other):
                    waiter = asyncio.ensure_future(who.wait_irq(IRQ))
                    await round_trip(guest, dm)
                    assert not waiter.done()
                    dm.dm.set_irq_level(IRQ, 1)
                    await asyncio.wait_for(waiter, TIMEOUT)
                    dm.dm.set_irq_level(IRQ, 0)
                    await round_trip(guest, dm)  # (the other's loop runs meanwhile)
                    assert not guest.irq_level(IRQ) and not other.irq_level(IRQ)  # taken by ``who``
        finally:
            other.close()
