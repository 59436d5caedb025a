"""IoreqServer over the simulated host: its public switch for guest accesses (``stop_reading``,
what teardown and a handover do first), a going device's window (``retire_window``), and the
slots it shares with the dom0 kernel's privcmd ioeventfd handler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from xen_vhost_master.ioreq_server import IoreqServer, MmioHandler
from xen_vhost_master.log import device_logger
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimGuest

BASE, TIMEOUT = 0x0200_0000, 20.0


class Answer:
    """A window whose every register reads 0x1234; the accesses it served, in order."""

    def __init__(self) -> None:
        self.accesses: list[tuple[int, bool, int]] = []

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None:
        self.accesses.append((offset, is_write, value))
        return None if is_write else 0x1234


@contextlib.asynccontextmanager
async def served(sim_host: Any, sim_control: Any, kernel: Any,
                 window: MmioHandler | None = None) -> AsyncIterator[tuple[IoreqServer, SimGuest, EventChannel]]:
    """An enabled IoreqServer of a new guest with one window at BASE, and that guest."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn:
        ioreq = IoreqServer(privcmd, evtchn, domid, device_logger("xvm.test", domid))
        guest = await SimGuest.connect(sim_host.path, domid)
        try:
            ioreq.create()
            ioreq.add_window(BASE, 0x200, window or Answer())
            ioreq.enable()
            yield ioreq, guest, evtchn
        finally:
            guest.close()
            await ioreq.close()


async def _until(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not pred():
            await asyncio.sleep(0.001)  # the slot and the counters have no event of their own


@pytest.mark.asyncio
async def test_stop_reading_takes_no_more_guest_accesses_and_is_idempotent(no_fd_leak, sim_host, sim_control, kernel):
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, evtchn):
        assert ioreq.reading
        assert await asyncio.wait_for(guest.mmio_read(BASE, 4), TIMEOUT) == 0x1234
        ioreq.stop_reading()
        ioreq.stop_reading()
        assert not ioreq.reading
        assert not asyncio.get_running_loop().remove_reader(evtchn.fileno())  # nothing reads the event channel now


@pytest.mark.asyncio
async def test_a_retired_window_answers_as_a_removed_device_with_its_line_low_until_unclaimed(
        no_fd_leak, sim_host, sim_control, kernel, caplog):
    """A going device (teardown, hot removal): its window still answers, as a removed device
    (reads 0: no interrupt pending; writes dropped), its line is lowered and stays low whatever
    the device asks, and only after the grace is the window unclaimed (the simulator then reads
    all-ones, as an x86 HVM guest sees an unclaimed access; Xen on Arm injects a data abort)."""
    irq = 40
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, _evtchn):
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


@pytest.mark.asyncio
async def test_a_queue_notify_the_kernel_answers_is_left_to_it(no_fd_leak, sim_host, sim_control, kernel):
    """privcmd ioeventfd (Linux drivers/xen/privcmd.c ioeventfd_interrupt) and this loop share the
    ioreq slots with plain stores: a QueueNotify of a queue the kernel answers is never taken here
    (two answers to one request: Xen's "device model set bad IO state 3" on real Xen), another
    queue's is. The test plays the kernel's answer."""
    device = Answer()
    async with served(sim_host, sim_control, kernel, device) as (ioreq, guest, evtchn):
        assert ioreq.page is not None
        ioreq.page.kernel_notifies.add((BASE + 0x50, 4, 0))
        spurious = ioreq.stats.spurious
        kick = asyncio.ensure_future(guest.mmio_write(BASE + 0x50, 4, 0, vcpu=0))
        await _until(lambda: ioreq.stats.spurious > spurious)  # the loop looked at the slot
        assert device.accesses == [] and not kick.done()
        ioreq.page.complete(0, None)  # the kernel's answer: eventfd_signal, IORESP_READY, notify
        evtchn.notify(ioreq.ports[0])
        await asyncio.wait_for(kick, TIMEOUT)
        await asyncio.wait_for(guest.mmio_write(BASE + 0x50, 4, 1, vcpu=0), TIMEOUT)  # queue 1: ours
        assert device.accesses == [(0x50, True, 1)]


@pytest.mark.asyncio
async def test_a_slot_the_kernel_held_and_put_back_ready_without_an_event_is_served(
        no_fd_leak, sim_host, sim_control, kernel):
    """The kernel's handler holds a slot INPROCESS while it looks, then stores READY back for an
    access that is not its notify, and sends no event: the loop, which saw INPROCESS at the event,
    looks again and serves it (a vCPU blocked for good otherwise). The test plays the kernel."""
    loop = asyncio.get_running_loop()
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, _evtchn):
        page = ioreq.page
        assert page is not None
        page.kernel_notifies.add((BASE + 0x50, 4, 0))
        take, held = page.take, []

        def kernel_first(vcpu: int, *, recover: bool = False):  # type: ignore[no-untyped-def]
            if not held and page.state(vcpu) == 1:  # READY: the kernel's handler gets there first
                held.append(vcpu)
                page.slot(vcpu).state = 2  # INPROCESS
                loop.call_later(0.005, lambda: setattr(page.slot(vcpu), "state", 1))  # READY back, no event
                return None
            return take(vcpu, recover=recover)

        page.take = kernel_first  # type: ignore[method-assign]
        assert await asyncio.wait_for(guest.mmio_read(BASE + 4, 4, vcpu=0), TIMEOUT) == 0x1234
        assert held == [0]


@pytest.mark.asyncio
async def test_each_access_reaches_the_window_it_falls_in_at_its_offset(no_fd_leak, sim_host, sim_control, kernel):
    first, second = Answer(), Answer()
    async with served(sim_host, sim_control, kernel, first) as (ioreq, guest, _evtchn):
        ioreq.add_window(BASE + 0x400, 0x200, second)
        assert await asyncio.wait_for(guest.mmio_read(BASE + 0x1FC, 4), TIMEOUT) == 0x1234
        await asyncio.wait_for(guest.mmio_write(BASE + 0x400, 4, 7), TIMEOUT)
        assert await asyncio.wait_for(guest.mmio_read(BASE + 0x5FC, 4), TIMEOUT) == 0x1234
        assert first.accesses == [(0x1FC, False, 0)]
        assert second.accesses == [(0, True, 7), (0x1FC, False, 0)]


@pytest.mark.asyncio
async def test_an_access_goes_to_the_newest_server_whose_ranges_hold_it_and_the_kernels_hands_the_rest_through(
        no_fd_leak, sim_host, sim_control, kernel):
    """Ranges of different IOREQ servers may overlap (xen/common/ioreq.c
    ``ioreq_server_map_io_range`` checks the server's own only) and Xen gives an access to the most
    recently created server that holds all of it (``FOR_EACH_IOREQ_SERVER`` counts ids down):
    what the kernel fast path's own server relies on (fastpath.py). An access that server holds
    but has no window for goes to its ``through`` server's window."""
    window = Answer()
    async with served(sim_host, sim_control, kernel, window) as (ioreq, guest, _evtchn):
        with EventChannel(ioreq.privcmd.kernel) as evtchn2:
            newer = IoreqServer(ioreq.privcmd, evtchn2, ioreq.domid, ioreq.log, through=ioreq)
            newer.create()
            newer.enable()
            try:
                notify = Answer()
                newer.add_window(BASE + 0x50, 4, notify)
                await asyncio.wait_for(guest.mmio_write(BASE + 0x50, 4, 1), TIMEOUT)  # held by both: the newer
                await asyncio.wait_for(guest.mmio_write(BASE + 0x64, 4, 2), TIMEOUT)  # ours only
                assert await asyncio.wait_for(guest.mmio_read(BASE + 0x50, 8), TIMEOUT) == 0x1234  # not all of it
                assert notify.accesses == [(0, True, 1)]
                assert window.accesses == [(0x64, True, 2), (0x50, False, 0)]
                newer.remove_window(BASE + 0x50)
                await asyncio.wait_for(guest.mmio_write(BASE + 0x50, 4, 3), TIMEOUT)  # ours again
                assert window.accesses[-1] == (0x50, True, 3) and len(notify.accesses) == 1
                newer.dm.map_io_range(newer.server_id or 0, BASE + 0x100, BASE + 0x103)  # no window of its own
                await asyncio.wait_for(guest.mmio_write(BASE + 0x100, 4, 4), TIMEOUT)
                assert window.accesses[-1] == (0x100, True, 4)  # through ours
                assert newer.stats.served == 2 and newer.stats.refused == 0
            finally:
                await newer.close()
