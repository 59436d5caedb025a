"""IoreqServer over the simulated host: its public switch for guest accesses (``stop_reading``,
what teardown and a handover do first), a going device's window (``retire_window``), and the
slots it shares with the dom0 kernel's privcmd ioeventfd handler."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from xen_vhost_master.ioreq_server import ALL_ONES, IoreqServer, MmioHandler
from xen_vhost_master.log import device_logger
from xen_vhost_master.xen.abi import IoreqState, IoreqType, ioreq_t
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimGuest

BASE, TIMEOUT = 0x0200_0000, 20.0


class Answer:
    """A window whose every register reads 0x1234; the accesses it served, in order (and their
    sizes)."""

    def __init__(self) -> None:
        self.accesses: list[tuple[int, bool, int]] = []
        self.sizes: list[int] = []

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None:
        self.accesses.append((offset, is_write, value))
        self.sizes.append(size)
        return None if is_write else 0x1234


@contextlib.asynccontextmanager
async def served(sim_host: Any, sim_control: Any, kernel: Any, window: MmioHandler | None = None,
                 vcpus: int = 1) -> AsyncIterator[tuple[IoreqServer, SimGuest, EventChannel]]:
    """An enabled IoreqServer of a new guest with one window at BASE, and that guest."""
    domid = sim_control.create_domain(mem_bytes=16 << 20, vcpus=vcpus)
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
async def test_an_interrupt_costs_one_hypercall_its_raise(no_fd_leak, sim_host, sim_control, kernel, monkeypatch):
    """Xen on Arm takes XEN_DMOP_set_irq_level with level 0 as a falling edge and ignores it
    (xen/arch/arm/vgic.c vgic_inject_irq), and libxl declares the virtio-mmio SPI edge-rising:
    lowering the line would be a hypercall that does nothing, once per interrupt. The daemon
    makes one dm_op per interrupt, the raise, and the guest takes each."""
    irq = 40
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, _evtchn):
        made: list[tuple[int, int]] = []
        real = ioreq.dm.set_irq_level

        def recorded(line: int, level: int) -> None:
            made.append((line, level))
            real(line, level)

        monkeypatch.setattr(ioreq.dm, "set_irq_level", recorded)
        for _ in range(3):
            waiter = asyncio.ensure_future(guest.wait_irq(irq))
            ioreq.set_irq(irq, True)
            await asyncio.wait_for(waiter, TIMEOUT)
            ioreq.set_irq(irq, False)  # (what virtio_mmio asks once the guest's ACK cleared every bit)
        assert made == [(irq, 1)] * 3
        assert not guest.irq_level(irq)


@pytest.mark.asyncio
async def test_a_retired_window_answers_as_a_removed_device_with_its_line_raised_no_more_until_unclaimed(
        no_fd_leak, sim_host, sim_control, kernel, caplog):
    """A going device (teardown, hot removal): its window still answers, as a removed device
    (reads 0: no interrupt pending; writes dropped), its line is raised no more whatever the
    device asks (an edge raised before is still taken by the guest, whose handler then finds the
    window for its InterruptStatus read and its ACK), and only after the grace is the window
    unclaimed (the simulator then reads all-ones, as an x86 HVM guest sees an unclaimed access;
    Xen on Arm injects a data abort)."""
    irq = 40
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, _evtchn):
        ioreq.set_irq(irq, True)
        assert guest.irq_level(irq)
        ioreq.retire_window(BASE, irq)
        await asyncio.wait_for(guest.wait_irq(irq), TIMEOUT)  # the edge raised before: taken
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


class Held(Answer):
    """A window whose reads are answered when the test says (a back-end slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def mmio(self, offset: int, size: int, is_write: bool, value: int,  # type: ignore[override]
             vcpu: int) -> int | None | asyncio.Future[int | None]:
        super().mmio(offset, size, is_write, value, vcpu)
        return None if is_write else self.answer


@pytest.mark.asyncio
async def test_the_vcpus_an_unanswered_access_holds_are_named_until_it_is_answered(
        no_fd_leak, sim_host, sim_control, kernel):
    """``waiting`` (status ``ioreqs.waiting``): the vCPUs Xen holds stopped on an access of this
    server not answered yet, the one whose access the device holds and only it."""
    device = Held()
    async with served(sim_host, sim_control, kernel, device, vcpus=2) as (ioreq, guest, _evtchn):
        assert ioreq.waiting() == []
        held = asyncio.ensure_future(guest.mmio_read(BASE + 8, 4, vcpu=1))
        await _until(lambda: len(device.accesses) == 1)
        await asyncio.wait_for(guest.mmio_write(BASE, 4, 5, vcpu=0), TIMEOUT)  # vCPU 0 goes on
        assert ioreq.waiting() == [1] and not held.done()
        device.answer.set_result(0x77)
        assert await asyncio.wait_for(held, TIMEOUT) == 0x77
        assert ioreq.waiting() == []


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
                newer.add_window(BASE + 0x100, 4, None)  # its range, served by ``through``'s window
                await asyncio.wait_for(guest.mmio_write(BASE + 0x100, 4, 4), TIMEOUT)
                assert window.accesses[-1] == (0x100, True, 4)  # through ours
                newer.dm.map_io_range(newer.server_id or 0, BASE + 0x104, BASE + 0x107)  # a predecessor's range
                await asyncio.wait_for(guest.mmio_write(BASE + 0x104, 4, 5), TIMEOUT)
                assert window.accesses[-1] == (0x104, True, 5)
                assert newer.stats.served == 3 and newer.stats.refused == 0
            finally:
                await newer.close()


# --- requests as Xen writes them: vCPU 0's slot filled by the test, then its event -------------

def _post(ioreq: IoreqServer, guest: SimGuest, *, addr: int, size: int, write: bool = False, data: int = 0,
          rtype: int = IoreqType.COPY, count: int = 1, ptr: bool = False,
          state: int = IoreqState.READY) -> ioreq_t:
    """Fill vCPU 0's slot as Xen does (the fields, then the state byte) and send the vCPU's event
    (EVTCHNOP_send on its ``vp_eport``)."""
    assert ioreq.page is not None
    slot = ioreq.page.slot(0)
    slot.addr, slot.data, slot.count, slot.size, slot.type = addr, data, count, size, rtype
    slot.flags = (0 if write else ioreq_t.DIR) | (ioreq_t.DATA_IS_PTR if ptr else 0) | state
    guest.evtchn_notify(ioreq.page.vp_eport(0))
    return slot


_HOSTILE = [
    pytest.param({"addr": BASE, "size": 3}, id="size-3"),
    pytest.param({"addr": BASE, "size": 0}, id="size-0"),
    pytest.param({"addr": BASE, "size": 16}, id="size-16"),
    pytest.param({"addr": BASE, "size": 4, "count": 2}, id="repeat-count-2"),
    pytest.param({"addr": BASE, "size": 4, "ptr": True}, id="data-is-a-pointer"),
    pytest.param({"addr": BASE, "size": 4, "rtype": IoreqType.PIO}, id="port-io"),
    pytest.param({"addr": BASE, "size": 4, "rtype": 9}, id="unknown-type"),
    pytest.param({"addr": BASE, "size": 4, "rtype": IoreqType.PCI_CONFIG}, id="config-of-no-function"),
    pytest.param({"addr": BASE + 0x1FE, "size": 4}, id="across-the-window-end"),
    pytest.param({"addr": BASE + 0x200, "size": 1}, id="just-past-the-window"),
    pytest.param({"addr": BASE - 4, "size": 4}, id="below-every-window"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("fields", _HOSTILE)
async def test_a_refused_access_is_answered_as_failed_and_reaches_no_window(
        no_fd_leak, sim_host, sim_control, kernel, fields, write):
    """A request the daemon does not serve (a size other than 1, 2, 4, 8, a repeat count, data
    by pointer, another ioreq type, an address outside every window, even by a byte) is still
    answered, or its vCPU blocks for good: a read as all-ones, a write dropped; the state byte's
    other bits are left as Xen wrote them (docs/xen-abi.md §5)."""
    device = Answer()
    async with served(sim_host, sim_control, kernel, device) as (ioreq, guest, _evtchn):
        refused, answered = ioreq.stats.refused, ioreq.stats.served
        slot = _post(ioreq, guest, write=write, data=0x55, **fields)
        flags = slot.flags
        await _until(lambda: slot.state == IoreqState.IORESP_READY)
        assert slot.data == (0x55 if write else ALL_ONES)
        assert slot.flags == flags & ~ioreq_t.STATE_MASK | IoreqState.IORESP_READY
        assert device.accesses == []
        assert (ioreq.stats.refused, ioreq.stats.served) == (refused + 1, answered + 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 2, 4, 8])
async def test_an_access_of_each_size_reaches_its_window_with_its_write_data_cut_to_size(
        no_fd_leak, sim_host, sim_control, kernel, size):
    """Arm does not mask a write's data to its size (docs/xen-abi.md §10.8): the window gets it
    masked, and a read's answer lands in ``data`` with IORESP_READY."""
    device = Answer()
    async with served(sim_host, sim_control, kernel, device) as (ioreq, guest, _evtchn):
        slot = _post(ioreq, guest, addr=BASE + 0x1F8, size=size, write=True, data=0x1122334455667788)
        await _until(lambda: slot.state == IoreqState.IORESP_READY)
        slot = _post(ioreq, guest, addr=BASE + 0x1F8, size=size)
        await _until(lambda: slot.state == IoreqState.IORESP_READY)
        assert slot.data == 0x1234 and slot.flags == ioreq_t.DIR | IoreqState.IORESP_READY
        assert device.accesses == [(0x1F8, True, 0x1122334455667788 & (1 << 8 * size) - 1), (0x1F8, False, 0)]
        assert device.sizes == [size, size] and ioreq.stats.refused == 0


@pytest.mark.asyncio
async def test_a_mapcache_invalidation_is_answered_without_a_window_or_a_complaint(
        no_fd_leak, sim_host, sim_control, kernel):
    device = Answer()
    async with served(sim_host, sim_control, kernel, device) as (ioreq, guest, _evtchn):
        slot = _post(ioreq, guest, addr=0, size=0, write=True, rtype=IoreqType.INVALIDATE)
        await _until(lambda: slot.state == IoreqState.IORESP_READY)
        assert device.accesses == [] and ioreq.stats.refused == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("state", [IoreqState.NONE, IoreqState.INPROCESS, IoreqState.IORESP_READY])
async def test_an_event_for_a_slot_that_is_not_ready_is_spurious_and_leaves_it_alone(
        no_fd_leak, sim_host, sim_control, kernel, state):
    """A stale wake-up: the slot is not READY, so it is neither taken nor answered (an answer
    Xen did not wait for puts the slot in a bad state); the next READY request is served."""
    device = Answer()
    async with served(sim_host, sim_control, kernel, device) as (ioreq, guest, _evtchn):
        spurious = ioreq.stats.spurious
        slot = _post(ioreq, guest, addr=BASE, size=4, data=0x55, state=state)
        await _until(lambda: ioreq.stats.spurious > spurious)
        assert (slot.state, slot.data, device.accesses, ioreq.stats.served) == (state, 0x55, [], 0)
        assert await asyncio.wait_for(guest.mmio_read(BASE + 4, 4), TIMEOUT) == 0x1234


@pytest.mark.asyncio
async def test_a_failed_unmask_is_logged_and_the_access_still_answered(no_fd_leak, sim_host, sim_control, kernel, caplog):
    """The port stays masked, but the request that came with the event is served: its vCPU
    would wait for nothing else."""
    async with served(sim_host, sim_control, kernel) as (ioreq, guest, evtchn):
        unmask, page = evtchn.unmask_bytes, ioreq.page
        assert page is not None

        def fail(data: bytes) -> int:  # the unmask of the request's event (not of an earlier one)
            if page.state(0) == IoreqState.READY:
                raise OSError(errno.EIO, "injected")
            return unmask(data)

        evtchn.unmask_bytes = fail
        with caplog.at_level("ERROR", logger="xvm.test"):
            assert await asyncio.wait_for(guest.mmio_read(BASE, 4), TIMEOUT) == 0x1234
        assert "event channel unmask failed" in caplog.text
