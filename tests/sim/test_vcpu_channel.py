"""The vCPU channel (sim.vcpu_channel): a guest's IOREQ round trip reaches the device model and comes
back without the simulated host, and keeps the hypervisor's semantics (state order, masking, pause,
server and domain destruction)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.sim.simproc import sim_command, start_sim_process, stop_process
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import IoreqState
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

TIMEOUT = 10.0
BASE = 0x02000000
DOMID = 7


class Dm:
    """A minimal device model through the daemon's adapters: one server, vCPU ports bound."""

    def __init__(self, kernel: SimKernel, domid: int) -> None:
        self.pc, self.ev = PrivCmd(kernel), EventChannel(kernel)
        self.dm = DeviceModel(self.pc, domid)
        self.nr = self.dm.nr_vcpus()
        self.sid = self.dm.create_ioreq_server()
        self.page = IoreqPage.map(self.pc, domid, self.sid, self.nr)
        self.dm.set_ioreq_server_state(self.sid, True)
        self.ports = [self.ev.bind_interdomain(domid, self.page.vp_eport(i)) for i in range(self.nr)]
        self.dm.map_io_range(self.sid, BASE, BASE + 0x1FF)
        self.states: list[int] = []

    async def drain(self) -> None:
        """The event each fresh binding starts with."""
        got: set[int] = set()
        while got != set(self.ports):
            fired = await asyncio.wait_for(self.ev.wait(), TIMEOUT)
            got.update(fired)
            self.ev.unmask(*fired)

    async def serve_one(self, value: int, before_complete: Callable[[], object] | None = None) -> None:
        """One access served as the daemon does: ``before_complete`` (the line change an
        InterruptACK makes) runs before the response is written and the guest notified."""
        fired = await asyncio.wait_for(self.ev.wait(), TIMEOUT)
        self.ev.unmask(*fired)
        for port in fired:
            vcpu = self.ports.index(port)
            self.states.append(self.page.state(vcpu))
            req = self.page.take(vcpu)
            if req is None:
                continue
            self.states.append(self.page.state(vcpu))
            if before_complete is not None:
                before_complete()
            self.page.complete(vcpu, None if req.is_write else value)
            self.states.append(self.page.state(vcpu))
            self.ev.notify(port)

    def close(self) -> None:
        self.page.close()
        self.ev.close()
        self.pc.close()


@contextlib.asynccontextmanager
async def dm_and_guest(path: str, **connect: bool) -> AsyncIterator[tuple[Dm, SimGuest]]:
    """A device model for domain DOMID of the host at ``path``, then its guest connected
    (``connect``: SimGuest.connect's options); both closed however the body ends."""
    dm = Dm(SimKernel(path), DOMID)
    try:
        guest = await SimGuest.connect(path, DOMID, **connect)
        try:
            yield dm, guest
        finally:
            guest.close()
    finally:
        dm.close()


@contextlib.asynccontextmanager
async def guest_and_dm(sim_host: SimHost, sim_control: SimControl,
                       kernel: SimKernel) -> AsyncIterator[tuple[int, SimGuest, Dm]]:
    """A new 16 MiB domain, its guest connected and a device model serving its window; both
    closed however the body ends."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid)
    dm = Dm(kernel, domid)
    try:
        yield domid, guest, dm
    finally:
        guest.close()
        dm.close()


@pytest.fixture
def sim_process(sim_dir: str) -> Iterator[tuple[str, int]]:
    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process(
        [*sim_command(), "--socket", path, "--domain", f"domid={DOMID},mem=16M,vcpus=1,name=chan"], TIMEOUT)
    try:
        yield path, proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc, TIMEOUT)


@pytest.mark.asyncio
async def test_ioreq_round_trips_complete_while_the_simulated_host_is_stopped(sim_process: tuple[str, int]) -> None:
    path, pid = sim_process
    async with dm_and_guest(path) as (dm, guest):
        await dm.drain()
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        await dm.serve_one(0x74726976)
        assert await asyncio.wait_for(read, TIMEOUT) == 0x74726976
        os.kill(pid, signal.SIGSTOP)  # no host from here on: every hop through it would hang
        try:
            for i in range(20):
                read = asyncio.ensure_future(guest.mmio_read(BASE + 4 * (i % 8), 4))
                await dm.serve_one(i)
                assert await asyncio.wait_for(read, TIMEOUT) == i
                write = asyncio.ensure_future(guest.mmio_write(BASE + 0x50, 4, i))
                await dm.serve_one(0)
                await asyncio.wait_for(write, TIMEOUT)
                assert dm.page.state(0) == IoreqState.NONE  # the vCPU consumed the response
        finally:
            os.kill(pid, signal.SIGCONT)
        # READY -> INPROCESS -> IORESP_READY for every request (docs/xen-abi.md)
        assert dm.states == [IoreqState.READY, IoreqState.INPROCESS, IoreqState.IORESP_READY] * 41


@pytest.mark.asyncio
async def test_a_vcpus_accesses_go_one_at_a_time_in_order_and_a_cancelled_one_holds_none_back(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    """A vCPU has one slot: its accesses wait for the one in flight (Hypervisor.mmio holds the
    vCPU's lock), in the order they came, and one cancelled while it waits is skipped."""
    async with guest_and_dm(sim_host, sim_control, kernel) as (_domid, guest, dm):
        await dm.drain()
        served: list[int] = []
        first, second, third = (asyncio.ensure_future(guest.mmio_read(BASE + off, 4)) for off in (0, 4, 8))
        await asyncio.sleep(0)  # (one step each: the first is in the slot, the others wait their turn)
        second.cancel()
        for value in (11, 33):
            await dm.serve_one(value, lambda: served.append(dm.page.slot(0).addr))
        assert await asyncio.wait_for(first, TIMEOUT) == 11 and await asyncio.wait_for(third, TIMEOUT) == 33
        assert second.cancelled() and served == [BASE, BASE + 8]
        assert await asyncio.wait_for(asyncio.gather(guest.mmio_read(BASE, 4), dm.serve_one(44)), TIMEOUT) == [44, None]


@pytest.mark.asyncio
async def test_a_vcpu_turn_handed_to_an_access_cancelled_before_it_ran_goes_on_to_the_next() -> None:
    from xen_vhost_sim.guest import _VcpuGate

    gate = _VcpuGate()
    gate.busy = True  # an access in flight
    waiting = [asyncio.ensure_future(gate.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    gate.release()  # the first waiter's turn, which it is cancelled before taking
    waiting[0].cancel()
    await asyncio.wait_for(waiting[1], TIMEOUT)
    assert waiting[0].cancelled() and gate.busy and not gate.waiters
    gate.release()
    assert not gate.busy


@pytest.mark.asyncio
async def test_masked_port_keeps_the_event_pending_until_unmasked(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        # the bind-time event, left masked
        assert await asyncio.wait_for(dm.ev.wait(), TIMEOUT) == dm.ports
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        while dm.page.state(0) != IoreqState.READY:  # the vCPU's request is out ...
            await asyncio.sleep(0)
        assert sim_control.pending_access(domid) is True
        assert dm.ev.read_pending() == []  # ... but its port is masked: nothing to read
        dm.ev.unmask(*dm.ports)  # the pending event comes through once unmasked
        await dm.serve_one(5)
        assert await asyncio.wait_for(read, TIMEOUT) == 5
        assert sim_control.pending_access(domid) is False


@pytest.mark.asyncio
async def test_paused_domain_access_waits_for_unpause(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        await dm.drain()
        sim_control.pause(domid)
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        # the access went to the host, which holds the paused vCPU: no request reaches the slot
        info = sim_control.domain_info(domid)
        assert info["paused"] is True
        await asyncio.sleep(0)
        assert dm.page.state(0) == IoreqState.NONE and not read.done()
        sim_control.unpause(domid)
        await dm.serve_one(9)
        assert await asyncio.wait_for(read, TIMEOUT) == 9


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["server", "domain"])
async def test_access_in_flight_completes_as_unclaimed_when_destroyed(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel, what: str
) -> None:
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        await dm.drain()
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        assert await asyncio.wait_for(dm.ev.wait(), TIMEOUT) == dm.ports  # never answered
        assert sim_control.pending_access(domid) is True
        if what == "server":
            dm.dm.destroy_ioreq_server(dm.sid)
        else:
            sim_control.destroy_domain(domid)
        assert await asyncio.wait_for(read, TIMEOUT) == 0xFFFFFFFF


@pytest.mark.asyncio
async def test_closing_the_guest_fails_its_access_in_flight(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        await dm.drain()
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        assert await asyncio.wait_for(dm.ev.wait(), TIMEOUT) == dm.ports  # the vCPU is waiting in this process
        guest.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(read, TIMEOUT)


@pytest.mark.asyncio
async def test_an_access_whose_route_is_dropped_as_it_starts_waits_for_the_next_device_model(
    sim_process: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon is killed (its evtchn fd closed: the vCPU's eventfd route dropped) between the
    moment a vCPU picks its route and the moment it has written the access READY and signalled it
    (a window of a few instructions: once in a loaded CI run). The server's page outlives the
    daemon; its restart binds the port again and answers the READY slot, as after a kill that comes
    later. The vCPU waits for that answer on the route it started with, whether or not a new one
    exists yet (it did wait on a closed eventfd: EBADF, or another file's reused number)."""
    path, _pid = sim_process
    async with dm_and_guest(path) as (dm, guest):
        await dm.drain()
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
        await dm.serve_one(1)
        assert await asyncio.wait_for(read, TIMEOUT) == 1  # the route is the guest's from here on
        real = guest._route

        def then_killed(addr: int, size: int, vcpu: int) -> object:
            got = real(addr, size, vcpu)
            assert got is not None, "the access does not take the vCPU channel"
            dm.ev.unbind(dm.ports[0])  # (synchronous: the host has dropped the route when it returns)
            return got

        monkeypatch.setattr(guest, "_route", then_killed)
        read = asyncio.ensure_future(guest.mmio_read(BASE + 4, 4))
        await asyncio.sleep(0)  # the access is READY and waiting
        assert not read.done()
        monkeypatch.setattr(guest, "_route", real)
        dm.ports = [dm.ev.bind_interdomain(DOMID, dm.page.vp_eport(0))]  # the daemon's restart
        await dm.serve_one(2)  # the fresh binding's event: the READY slot found and answered
        assert await asyncio.wait_for(read, TIMEOUT) == 2
        read = asyncio.ensure_future(guest.mmio_read(BASE, 4))  # and the vCPU goes on
        await dm.serve_one(3)
        assert await asyncio.wait_for(read, TIMEOUT) == 3


@pytest.mark.asyncio
async def test_the_notify_hot_path_reads_its_ctypes_argument_directly_and_a_bare_address_with_the_fault_check(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's NOTIFY (every answered IOREQ) and set_irq_level arguments are ctypes objects
    it keeps: their bytes are read as they are, without the fault-checked copy (process_vm_readv,
    a few µs of system time each). A bare address is still read with it: EFAULT, never a crash."""
    import errno

    from xen_vhost_master.xen.abi import EvtchnIoctl
    from xen_vhost_sim import simkernel

    checked: list[int] = []
    real = simkernel.copy_from_user

    def counting(addr: int, length: int) -> bytes:
        checked.append(length)
        return real(addr, length)

    monkeypatch.setattr(simkernel, "copy_from_user", counting)
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        await dm.drain()
        dm.dm.set_irq_level(40, 1)  # the first one goes through the host (the line's route comes with it)
        checked.clear()
        for i in range(5):
            read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
            await dm.serve_one(i)
            assert await asyncio.wait_for(read, TIMEOUT) == i
        assert checked == [], "a NOTIFY argument given as a ctypes object was read by address"
        await asyncio.wait_for(guest.wait_irq(40), TIMEOUT)  # (the first raise, taken)
        dm.dm.set_irq_level(40, 1)
        assert guest.irq_level(40) is True
        assert len(checked) == 2  # the dm_op's buffer array and its buffer: addresses inside the argument
        with pytest.raises(OSError) as e:
            kernel.ioctl(dm.ev.fd, int(EvtchnIoctl.NOTIFY), 8)
        assert e.value.errno == errno.EFAULT


def _serve_blocking(dm: Dm, value: int, loop: asyncio.AbstractEventLoop, seen: list[bool]) -> None:
    """One access served from another thread (a device model in its own process). Before it
    answers, it asks the guest's event loop to run a callback and waits ``LOOP_LOOK`` s for it:
    ``seen`` gets whether the loop ran while the vCPU waited."""
    import select
    import threading

    select.select([dm.ev.fd], [], [], TIMEOUT)
    ports = dm.ev.read_pending()
    dm.ev.unmask(*ports)
    ran = threading.Event()
    loop.call_soon_threadsafe(ran.set)
    seen.append(ran.wait(LOOP_LOOK))
    for port in ports:
        vcpu = dm.ports.index(port)
        if dm.page.take(vcpu) is not None:
            dm.page.complete(vcpu, value)
            dm.ev.notify(port)


LOOP_LOOK = 2.0  # s the device model gives the guest's loop to run a callback (held: it cannot)


@pytest.mark.asyncio
@pytest.mark.parametrize("hold", [0.0, TIMEOUT])
async def test_a_held_vcpu_waits_for_its_answer_blocked_without_running_the_event_loop(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel, hold: float
) -> None:
    """``vcpu_hold``: the access waits for the device model's notify blocked, as a vCPU held in
    the hypervisor (nothing else of the guest's loop runs meanwhile); without, through the loop."""
    import threading

    domid = sim_control.create_domain(mem_bytes=16 << 20)
    guest = await SimGuest.connect(sim_host.path, domid, vcpu_hold=hold)
    dm = Dm(kernel, domid)
    try:
        await dm.drain()
        seen: list[bool] = []
        server = threading.Thread(target=_serve_blocking, args=(dm, 0x1234, asyncio.get_running_loop(), seen))
        server.start()
        try:
            assert await asyncio.wait_for(guest.mmio_read(BASE, 4), 2 * TIMEOUT) == 0x1234
        finally:
            server.join(TIMEOUT)
        assert seen == [not hold]
    finally:
        guest.close()
        dm.close()


@pytest.mark.asyncio
async def test_a_held_vcpu_whose_answer_takes_longer_waits_on_through_the_event_loop(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    """The device model answers from this very loop: the vCPU blocks for its hold, then waits
    through the loop, where the answer comes."""
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, _guest, dm):
        guest = await SimGuest.connect(sim_host.path, domid, vcpu_hold=0.01)
        try:
            await dm.drain()
            read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
            await dm.serve_one(0x55)
            assert await asyncio.wait_for(read, TIMEOUT) == 0x55
        finally:
            guest.close()
    with pytest.raises(ValueError, match="vcpu_hold"):
        SimGuest(sim_host.path, domid, vcpu_hold=-1.0)


@pytest.mark.asyncio
async def test_the_players_of_one_vcpu_take_turns_each_answered_and_its_wake_polled_once(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    """Two guests of one domain on its vCPU channel and one on the host's path take turns on
    vCPU 0, whose port (and the eventfd its notify writes) they share: each access gets its own
    answer. A guest keeps its route's eventfd polled from one access to the next (not a poller
    set up and torn down per access) and gives back an event that came while none of its accesses
    was in progress: the others' answers are not lost to it."""
    async with guest_and_dm(sim_host, sim_control, kernel) as (domid, guest, dm):
        other = await SimGuest.connect(sim_host.path, domid)
        via_host = await SimGuest.connect(sim_host.path, domid, vcpu_channel=False)
        loop = asyncio.get_running_loop()
        polled: list[int] = []
        add_reader = loop.add_reader

        def counting(fd: int, *args: Any) -> None:
            polled.append(fd)
            add_reader(fd, *args)

        try:
            await dm.drain()
            loop.add_reader = counting  # type: ignore[method-assign,assignment]
            for i in range(40):
                read = asyncio.ensure_future(guest.mmio_read(BASE, 4))
                await dm.serve_one(i)
                assert await asyncio.wait_for(read, TIMEOUT) == i
            wakes = {route.wake for route in guest._routes.values()}  # (the device model polls its evtchn too)
            assert len([fd for fd in polled if fd in wakes]) == 1  # its route's wake, once for 40 accesses
            for i in range(6):
                for who in (guest, other, via_host):
                    read = asyncio.ensure_future(who.mmio_read(BASE + 4, 4))
                    await dm.serve_one(100 + i)
                    assert await asyncio.wait_for(read, TIMEOUT) == 100 + i
        finally:
            loop.add_reader = add_reader  # type: ignore[method-assign]
            other.close()
            via_host.close()
