"""IoreqServer's public switch for guest accesses: ``stop_reading`` (what teardown and a
handover do first), over the simulated host."""

from __future__ import annotations

import asyncio

import pytest

from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimGuest

BASE, TIMEOUT = 0x0200_0000, 20.0


class Answer:
    """A window whose every register reads 0x1234."""

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None:
        return None if is_write else 0x1234


@pytest.mark.asyncio
async def test_stop_reading_takes_no_more_guest_accesses_and_is_idempotent(no_fd_leak, sim_host, sim_control, kernel):
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    loop = asyncio.get_running_loop()
    with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn:
        ioreq = IoreqServer(privcmd, evtchn, domid, device_logger("xvm.test", domid))
        guest = await SimGuest.connect(sim_host.path, domid)
        try:
            ioreq.create()
            ioreq.add_window(BASE, 0x200, Answer())
            ioreq.enable()
            assert ioreq.reading
            assert await asyncio.wait_for(guest.mmio_read(BASE, 4), TIMEOUT) == 0x1234
            ioreq.stop_reading()
            ioreq.stop_reading()
            assert not ioreq.reading
            assert not loop.remove_reader(evtchn.fileno())  # nothing reads the event channel now
        finally:
            guest.close()
            await ioreq.close()


@pytest.mark.asyncio
async def test_a_retired_window_answers_as_a_removed_device_with_its_line_low_until_unclaimed(
        no_fd_leak, sim_host, sim_control, kernel, caplog):
    """A going device (teardown, hot removal): its window still answers, as a removed device
    (reads 0: no interrupt pending; writes dropped), its line is lowered and stays low whatever
    the device asks, and only after the grace is the window unclaimed (the simulator then reads
    all-ones, as an x86 HVM guest sees an unclaimed access; Xen on Arm injects a data abort)."""
    irq = 40
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn:
        ioreq = IoreqServer(privcmd, evtchn, domid, device_logger("xvm.test", domid))
        guest = await SimGuest.connect(sim_host.path, domid)
        try:
            ioreq.create()
            ioreq.add_window(BASE, 0x200, Answer())
            ioreq.enable()
            ioreq.set_irq(irq, True)
            assert guest.irq_level(irq)
            ioreq.retire_window(BASE, irq, raised=True)
            assert not guest.irq_level(irq)
            assert await asyncio.wait_for(guest.mmio_read(BASE + 0x60, 4), TIMEOUT) == 0  # InterruptStatus
            await asyncio.wait_for(guest.mmio_write(BASE + 0x64, 4, 1), TIMEOUT)  # InterruptACK: dropped
            ioreq.set_irq(irq, True)  # the device, still being stopped, signals a completion
            assert not guest.irq_level(irq)
            with caplog.at_level("INFO", logger="xvm.test"):
                await asyncio.wait_for(ioreq.remove_window_after_grace(BASE, grace=0.05), TIMEOUT)
            assert "answered as a removed device" in caplog.text
            assert await asyncio.wait_for(guest.mmio_read(BASE + 0x60, 4), TIMEOUT) == 0xFFFFFFFF
            ioreq.set_irq(irq, True)  # the window is gone: the line is the server's again
            assert guest.irq_level(irq)
        finally:
            guest.close()
            await ioreq.close()
