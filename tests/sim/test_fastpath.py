"""The simulated dom0 kernel's privcmd IRQFD / IOEVENTFD, driven through the real adapters
(PrivCmd.ioeventfd / PrivCmd.irqfd with the abi.py structs, IoreqPage, EventChannel, DeviceModel).

Nobody serves ioreqs in these tests unless a test does it itself: a guest QueueNotify that completes
proves the kernel consumed it.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.sim.simproc import start_sim_process, stop_process
from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import (
    PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
    PRIVCMD_IRQFD_FLAG_DEASSIGN,
    DmOp,
    IoreqState,
    privcmd_ioeventfd,
    privcmd_irqfd,
    xen_dm_op,
)
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.ioreq import IoreqPage
from xen_vhost_master.xen.privcmd import PrivCmd

BASE = 0x2000000
NOTIFY = BASE + 0x50
IRQ = 33
T = 5.0  # bound on every wait for the simulated host


@pytest.fixture
def host(sim_dir: str) -> Iterator[SimHost]:
    with SimHost(os.path.join(sim_dir, "xen.sock"), privcmd_eventfd="on") as h:
        yield h


@pytest.fixture
def ctl(host: SimHost) -> Iterator[SimControl]:
    with host.control() as c:
        yield c


@dataclass
class Rig:
    domid: int
    kernel: SimKernel
    privcmd: PrivCmd
    evtchn: EventChannel
    page: IoreqPage
    ports: array.array[int]
    guest: SimGuest
    ctl: SimControl

    def ioeventfd_arg(self, fd: int, vq: int, *, flags: int = 0, addr_len: int = 4, ioreq: int | None = None,
                      dom: int | None = None) -> privcmd_ioeventfd:
        return privcmd_ioeventfd(
            ioreq=self.page.mapping.addr if ioreq is None else ioreq, ports=self.ports.buffer_info()[0],
            addr=BASE, addr_len=addr_len, event_fd=fd, vcpus=len(self.ports), vq=vq, flags=flags,
            dom=self.domid if dom is None else dom,
        )

    def fastpath(self) -> dict[str, int]:
        return dict(self.ctl.domain_info(self.domid)["fastpath"])

    async def events(self) -> list[int]:
        """Wait for fired ports and re-enable them at once (as the daemon does: late EOI)."""
        ports = await asyncio.wait_for(self.evtchn.wait(), T)
        self.evtchn.unmask(*ports)
        return ports


@pytest_asyncio.fixture
async def rig(host: SimHost, ctl: SimControl) -> AsyncIterator[Rig]:
    domid = ctl.create_domain(vcpus=2, mem_bytes=64 << 20)
    kernel = SimKernel(host.path)
    privcmd = PrivCmd(kernel)
    evtchn = EventChannel(kernel)
    dm = DeviceModel(privcmd, domid)
    sid = dm.create_ioreq_server()
    page = IoreqPage.map(privcmd, domid, sid, 2)
    dm.map_io_range(sid, BASE, BASE + 0x1FF)
    dm.set_ioreq_server_state(sid, True)
    ports = array.array("I", [evtchn.bind_interdomain(domid, page.vp_eport(v)) for v in range(2)])
    fired: set[int] = set()
    while fired != set(ports):  # binding raises an event on each new port (Xen's "conservative" one)
        fired.update(await asyncio.wait_for(evtchn.wait(), T))
    evtchn.unmask(*ports)
    guest = await SimGuest.connect(host.path, domid)
    try:
        yield Rig(domid, kernel, privcmd, evtchn, page, ports, guest, ctl)
    finally:
        guest.close()
        page.close()
        evtchn.close()
        privcmd.close()


def _read_eventfd(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


async def _serve_one(rig: Rig, *, expect_addr: int, expect_write: bool, data: int | None = None) -> int:
    """Play user space for one access: the event, a READY slot with that access, complete, notify."""
    await rig.events()
    vcpus = rig.page.ready()
    assert vcpus, "the slot should have been left READY for user space"
    req = rig.page.take(vcpus[0])
    assert req is not None and req.addr == expect_addr and req.is_write == expect_write
    rig.page.complete(req.vcpu, data)
    rig.evtchn.notify(rig.ports[req.vcpu])
    return req.data


@pytest.mark.asyncio
async def test_notify_completes_in_kernel_and_signals_eventfd(no_fd_leak: None, rig: Rig, efd: int) -> None:
    rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0))
    assert rig.fastpath()["ioeventfds"] == 1
    # NOTIFICATION_DATA-style upper bits are ignored: only data & 0xffff is the queue index.
    await asyncio.wait_for(rig.guest.mmio_write(NOTIFY, 4, 0x00050000), T)
    assert _read_eventfd(efd) == 1
    info = rig.fastpath()
    assert info["ioeventfd_consumed"] == 1 and info["ioeventfd_passed"] == 0
    # The event channel is shared: user space sees the event but the slot is no longer READY.
    fired = await rig.events()
    assert rig.ports[0] in fired
    assert rig.page.state(0) == IoreqState.NONE and rig.page.take(0) is None
    # A second notify from the other vCPU goes through that vCPU's port and slot.
    await asyncio.wait_for(rig.guest.mmio_write(NOTIFY, 4, 0, vcpu=1), T)
    assert _read_eventfd(efd) == 1
    assert rig.fastpath()["ioeventfd_consumed"] == 2


@pytest.mark.asyncio
async def test_non_matching_accesses_stay_for_user_space(no_fd_leak: None, rig: Rig, efd: int) -> None:
    rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0))
    # another queue index, another register, a read of QueueNotify, another access size
    cases = [
        (rig.guest.mmio_write(NOTIFY, 4, 1), NOTIFY, True),
        (rig.guest.mmio_write(BASE + 0x70, 4, 0), BASE + 0x70, True),
        (rig.guest.mmio_read(NOTIFY, 4), NOTIFY, False),
        (rig.guest.mmio_write(NOTIFY, 2, 0), NOTIFY, True),
    ]
    for access, addr, write in cases:
        task = asyncio.ensure_future(access)
        await _serve_one(rig, expect_addr=addr, expect_write=write, data=None if write else 0x1234)
        result = await asyncio.wait_for(task, T)
        if not write:
            assert result == 0x1234
    assert _read_eventfd(efd) == 0
    info = rig.fastpath()
    assert info["ioeventfd_consumed"] == 0 and info["ioeventfd_passed"] == 3  # the read never gets that far


@pytest.mark.asyncio
async def test_masked_port_holds_the_fast_path_until_user_space_unmasks(no_fd_leak: None, rig: Rig, efd: int) -> None:
    """Late EOI: the kernel handler shares the evtchn device's interrupt, which stays masked from a
    delivery until user space writes the port back."""
    rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0))
    await asyncio.wait_for(rig.guest.mmio_write(NOTIFY, 4, 0), T)  # delivered: port 0 now masked
    second = asyncio.ensure_future(rig.guest.mmio_write(NOTIFY, 4, 0))
    for _ in range(200):
        if rig.ctl.pending_access(rig.domid):
            break
        await asyncio.sleep(0.005)
    assert rig.ctl.pending_access(rig.domid) and not second.done()
    assert rig.fastpath()["ioeventfd_consumed"] == 1
    await rig.events()  # read + unmask: the pending event runs the kernel handler
    await asyncio.wait_for(second, T)
    assert rig.fastpath()["ioeventfd_consumed"] == 2


@pytest.mark.asyncio
async def test_ioeventfd_deassign_and_close(no_fd_leak: None, rig: Rig, efd: int) -> None:
    rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0))
    with pytest.raises(XenError) as e:
        rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=1))  # same eventfd for the same guest
    assert e.value.errno == errno.EBUSY
    with pytest.raises(XenError) as e:  # same ioreq page, other vCPU count
        arg = rig.ioeventfd_arg(os.dup(efd), vq=1)
        try:
            arg.vcpus = 1
            rig.privcmd.ioeventfd(arg)
        finally:
            os.close(arg.event_fd)
    assert e.value.errno == errno.EINVAL
    rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0, flags=PRIVCMD_IOEVENTFD_FLAG_DEASSIGN))
    assert rig.fastpath()["ioeventfds"] == 0
    with pytest.raises(XenError) as e:
        rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, vq=0, flags=PRIVCMD_IOEVENTFD_FLAG_DEASSIGN))
    assert e.value.errno == errno.ENODEV
    # after DEASSIGN the notify is user space's again
    task = asyncio.ensure_future(rig.guest.mmio_write(NOTIFY, 4, 0))
    await _serve_one(rig, expect_addr=NOTIFY, expect_write=True)
    await asyncio.wait_for(task, T)
    assert _read_eventfd(efd) == 0
    # closing the privcmd fd releases what was assigned through it (a second fd keeps the rig's)
    other = PrivCmd(rig.kernel)
    other.ioeventfd(rig.ioeventfd_arg(efd, vq=0))
    assert rig.fastpath()["ioeventfds"] == 1
    other.close()
    assert rig.fastpath()["ioeventfds"] == 0


@pytest.mark.asyncio
async def test_ioeventfd_argument_checks(no_fd_leak: None, rig: Rig, efd: int) -> None:
    def errno_of(arg: privcmd_ioeventfd) -> int:
        with pytest.raises(XenError) as e:
            rig.privcmd.ioeventfd(arg)
        return e.value.errno

    assert errno_of(rig.ioeventfd_arg(efd, 0, addr_len=3)) == errno.EINVAL
    assert errno_of(rig.ioeventfd_arg(efd, 0, flags=2)) == errno.EINVAL
    bad = rig.ioeventfd_arg(efd, 0)
    bad.vcpus = 0
    assert errno_of(bad) == errno.EINVAL
    assert errno_of(rig.ioeventfd_arg(0x7FFF0000, 0)) == errno.EBADF
    r, w = os.pipe()
    try:
        assert errno_of(rig.ioeventfd_arg(r, 0)) == errno.EINVAL  # not an eventfd
    finally:
        os.close(r)
        os.close(w)
    buf = ctypes.create_string_buffer(4096)  # not a privcmd mapping
    assert errno_of(rig.ioeventfd_arg(efd, 0, ioreq=ctypes.addressof(buf))) == errno.EFAULT
    bad = rig.ioeventfd_arg(efd, 0)
    bad.ports = 8  # unreadable ports[]
    assert errno_of(bad) == errno.EFAULT
    assert rig.fastpath()["ioeventfds"] == 0


@pytest.mark.asyncio
async def test_irqfd_raises_the_guest_line(no_fd_leak: None, rig: Rig, efd: int) -> None:
    op = xen_dm_op(op=DmOp.set_irq_level)
    op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
    rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, flags=0, dom=rig.domid))
    op.u.set_irq_level.irq = 34  # copied at assign time: later changes do not matter
    assert not rig.guest.irq_level(IRQ)
    os.write(efd, (1).to_bytes(8, "little"))
    await asyncio.wait_for(rig.guest.wait_irq(IRQ), T)
    assert not rig.guest.irq_level(IRQ) and not rig.guest.irq_level(34)  # IRQ's edge, taken
    assert _read_eventfd(efd) == 0  # the kernel read (cleared) it
    assert rig.fastpath()["irqfd_injected"] == 1
    with pytest.raises(XenError) as e:
        rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, dom=rig.domid))
    assert e.value.errno == errno.EBUSY
    # the next signal is the next edge (a level 0 between them, ignored by Xen on Arm, changes nothing)
    DeviceModel(rig.privcmd, rig.domid).set_irq_level(IRQ, 0)
    os.write(efd, (1).to_bytes(8, "little"))
    await asyncio.wait_for(rig.guest.wait_irq(IRQ), T)
    assert rig.fastpath()["irqfd_injected"] == 2
    # DEASSIGN (only fd matters): the eventfd is nobody's now, its counter stays
    rig.privcmd.irqfd(privcmd_irqfd(fd=efd, flags=PRIVCMD_IRQFD_FLAG_DEASSIGN))
    os.write(efd, (1).to_bytes(8, "little"))
    info = rig.fastpath()
    assert info["irqfds"] == 0 and info["irqfd_injected"] == 2
    assert _read_eventfd(efd) == 1 and not rig.guest.irq_level(IRQ)
    # a signal already pending at assign time is injected at once
    os.write(efd, (1).to_bytes(8, "little"))
    rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, dom=rig.domid))
    await asyncio.wait_for(rig.guest.wait_irq(34), T)


@pytest.mark.asyncio
async def test_a_guest_taking_each_irqfd_interrupt_itself_keeps_polling_its_line(no_fd_leak: None, rig: Rig,
                                                                                   efd: int) -> None:
    """The guest plays the kernel's irqfd (sim.vcpu_channel) and its own waiter takes the edge. It
    does not also signal the domain's line event for it: its loop would find that event with
    nobody waiting, give it back, stop polling the line and the irqfds, poll them again at the next
    wait and be woken once for nothing (at each interrupt: the UML bridge's fast path at each I/O).
    The interrupts arrive all the same, each once."""
    op = xen_dm_op(op=DmOp.set_irq_level)
    op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
    rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, flags=0, dom=rig.domid))
    guest = rig.guest
    for _ in range(20):
        waiter = asyncio.ensure_future(guest.wait_irq(IRQ))
        for _ in range(3):  # (its loop runs it up to the wait)
            await asyncio.sleep(0)
        assert not waiter.done()
        os.write(efd, (1).to_bytes(8, "little"))
        await asyncio.wait_for(waiter, T)
        for _ in range(3):  # what the interrupt left ready in the loop runs
            await asyncio.sleep(0)
    assert guest.irq_rearms == 1  # polled from the first wait on
    assert rig.fastpath()["irqfd_injected"] == 20 and not guest.irq_level(IRQ)


@pytest.mark.asyncio
async def test_an_irqfd_edge_fired_for_a_wait_cancelled_before_it_took_it_goes_to_another_guest(
        no_fd_leak: None, rig: Rig, efd: int) -> None:
    """A guest fires the irqfd for its own wait (no event for the domain's other guests: that wait
    takes the edge), then the wait is cancelled before it took it: the edge is passed on, and
    another guest of the domain waiting for the line takes it."""
    op = xen_dm_op(op=DmOp.set_irq_level)
    op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
    rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, flags=0, dom=rig.domid))
    guest = rig.guest
    other = await SimGuest.connect(guest.path, rig.domid)
    try:
        theirs = asyncio.ensure_future(other.wait_irq(IRQ))
        mine = asyncio.ensure_future(guest.wait_irq(IRQ))
        for _ in range(3):  # (both wait)
            await asyncio.sleep(0)
        assert not theirs.done() and not mine.done()
        os.write(efd, (1).to_bytes(8, "little"))
        ((_level, fd),) = guest._irqfds[IRQ]
        assert guest._irqfd_fire(IRQ, 1, fd)  # this guest's kernel play, for its own wait ...
        mine.cancel()  # ... which goes before it took the edge
        await asyncio.wait_for(theirs, T)
        with pytest.raises(asyncio.CancelledError):
            await mine
        assert not guest.irq_level(IRQ) and not other.irq_level(IRQ)  # taken, once
    finally:
        other.close()


@pytest.mark.asyncio
async def test_irqfd_bad_dm_op_is_logged_not_fatal(no_fd_leak: None, rig: Rig, efd: int) -> None:
    op = xen_dm_op(op=DmOp.set_irq_level)
    op.u.set_irq_level.irq, op.u.set_irq_level.level = 7, 1  # not an SPI: EINVAL at injection
    rig.privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, dom=rig.domid))
    os.write(efd, (1).to_bytes(8, "little"))
    for _ in range(400):
        if rig.fastpath()["irqfd_failed"]:
            break
        await asyncio.sleep(0.005)
    assert rig.fastpath()["irqfd_failed"] == 1 and rig.fastpath()["irqfd_injected"] == 0
    with pytest.raises(XenError) as e:  # unreadable dm_op buffer
        rig.privcmd.irqfd(privcmd_irqfd(dm_op=8, size=32, fd=efd, dom=rig.domid))
    assert e.value.errno == errno.EFAULT


@pytest.mark.asyncio
@pytest.mark.parametrize("mode, code", [("enotty", errno.ENOTTY), ("eopnotsupp", errno.EOPNOTSUPP)])
async def test_kernels_without_the_fast_path(no_fd_leak: None, rig: Rig, efd: int, mode: str, code: int) -> None:
    assert rig.privcmd.eventfd_ioctls_supported()
    rig.ctl.set_privcmd_eventfd(mode)
    assert not rig.privcmd.eventfd_ioctls_supported()
    for call in (lambda: rig.privcmd.ioeventfd(rig.ioeventfd_arg(efd, 0)),
                 lambda: rig.privcmd.irqfd(privcmd_irqfd(dm_op=8, size=32, fd=efd, dom=rig.domid))):
        with pytest.raises(XenError) as e:
            call()  # answered before the argument is read (dm_op=8 would be EFAULT otherwise)
        assert e.value.errno == code


def test_default_host_is_a_6_1_kernel(no_fd_leak: None, sim_host: SimHost, kernel: SimKernel) -> None:
    with PrivCmd(kernel) as privcmd:
        assert not privcmd.eventfd_ioctls_supported()
        with pytest.raises(XenError) as e:
            privcmd.irqfd(privcmd_irqfd(fd=0, flags=PRIVCMD_IRQFD_FLAG_DEASSIGN))
        assert e.value.errno == errno.ENOTTY


@pytest.mark.asyncio
async def test_restricted_fd_is_eperm_for_other_domains(no_fd_leak: None, rig: Rig, efd: int) -> None:
    other = rig.ctl.create_domain(mem_bytes=16 << 20)
    with PrivCmd(rig.kernel) as privcmd:
        privcmd.restrict(other)
        assert privcmd.eventfd_ioctls_supported()  # probe (dom 0) answers EPERM: present
        with pytest.raises(XenError) as e:
            privcmd.ioeventfd(rig.ioeventfd_arg(efd, 0))
        assert e.value.errno == errno.EPERM
        op = xen_dm_op(op=DmOp.set_irq_level)
        with pytest.raises(XenError) as e:
            privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=32, fd=efd, dom=rig.domid))
        assert e.value.errno == errno.EPERM
        op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
        privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=32, fd=efd, dom=other))
        privcmd.irqfd(privcmd_irqfd(fd=efd, flags=PRIVCMD_IRQFD_FLAG_DEASSIGN, dom=other))


@pytest.fixture
def sim_process(sim_dir: str) -> Iterator[str]:
    """``xen-vhost-sim --privcmd-eventfd=on`` as its own process: the eventfds cross a process boundary."""
    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process(
        [sys.executable, "-m", "xen_vhost_sim.cli", "--socket", path, "--privcmd-eventfd", "on",
         "--domain", "domid=3,mem=32M,vcpus=1"], T * 2)
    try:
        yield path
    finally:
        stop_process(proc, T)
    assert proc.returncode == 0


@pytest.mark.asyncio
async def test_fast_path_in_a_separate_host_process(sim_process: str, efd: int) -> None:
    kernel = SimKernel(sim_process)
    domid = 3
    with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn, SimControl(sim_process) as ctl:
        dm = DeviceModel(privcmd, domid)
        sid = dm.create_ioreq_server()
        page = IoreqPage.map(privcmd, domid, sid, 1)
        try:
            dm.map_io_range(sid, BASE, BASE + 0x1FF)
            dm.set_ioreq_server_state(sid, True)
            ports = array.array("I", [evtchn.bind_interdomain(domid, page.vp_eport(0))])
            evtchn.unmask(*await asyncio.wait_for(evtchn.wait(), T))
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                privcmd.ioeventfd(privcmd_ioeventfd(
                    ioreq=page.mapping.addr, ports=ports.buffer_info()[0], addr=BASE, addr_len=4,
                    event_fd=kick, vcpus=1, vq=0, dom=domid))
                op = xen_dm_op(op=DmOp.set_irq_level)
                op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
                privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=efd, dom=domid))
                async with await SimGuest.connect(sim_process, domid) as guest:
                    await asyncio.wait_for(guest.mmio_write(NOTIFY, 4, 0), T)
                    assert _read_eventfd(kick) == 1
                    os.write(efd, (1).to_bytes(8, "little"))
                    await asyncio.wait_for(guest.wait_irq(IRQ), T)
                info = ctl.domain_info(domid)["fastpath"]
                assert info["ioeventfd_consumed"] == 1 and info["irqfd_injected"] == 1 and info["mode"] == "on"
            finally:
                os.close(kick)
        finally:
            page.close()


class _RecordingDevice:
    """An MmioHandler that records what reaches user space."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool, int]] = []

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None:
        self.seen.append((offset, size, is_write, value))
        return None if is_write else 0x74726976


@pytest.mark.asyncio
async def test_daemon_ioreq_server_skips_what_the_kernel_consumed(host: SimHost, ctl: SimControl, efd: int) -> None:
    """The daemon's own IoreqServer beside the kernel's ioeventfd: notifies of the registered queue
    never reach its handler (counted as spurious wake-ups), everything else does."""
    from xen_vhost_master.ioreq_server import IoreqServer
    from xen_vhost_master.log import device_logger

    domid = ctl.create_domain(vcpus=2, mem_bytes=16 << 20)
    kernel = SimKernel(host.path)
    dev = _RecordingDevice()
    with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn:
        srv = IoreqServer(privcmd, evtchn, domid, device_logger("test", domid))
        srv.create()
        srv.enable()
        srv.add_window(BASE, 0x200, dev)
        guest = await SimGuest.connect(host.path, domid)
        try:
            assert srv.page is not None
            ports = array.array("I", getattr(srv, "ports", None) or srv._ports)  # local port per vCPU
            privcmd.ioeventfd(privcmd_ioeventfd(
                ioreq=srv.page.mapping.addr, ports=ports.buffer_info()[0], addr=BASE, addr_len=4,
                event_fd=efd, vcpus=2, vq=0, dom=domid))
            async with asyncio.timeout(T):
                assert await guest.mmio_read(BASE, 4) == 0x74726976
                for _ in range(5):
                    await guest.mmio_write(NOTIFY, 4, 0)
                await guest.mmio_write(NOTIFY, 4, 1, vcpu=1)  # queue 1 has no ioeventfd
                await guest.mmio_write(BASE + 0x70, 4, 0xF)
            assert dev.seen == [(0, 4, False, 0), (0x50, 4, True, 1), (0x70, 4, True, 0xF)]
            assert _read_eventfd(efd) == 5
            info = ctl.domain_info(domid)["fastpath"]
            assert info["ioeventfd_consumed"] == 5
            assert guest.kernel_answered == 5  # of the guest's 8 accesses (the bench's "daemon served")
            for _ in range(200):  # the shared events reach the daemon too: each finds no READY slot
                if srv.stats.spurious >= 5:
                    break
                await asyncio.sleep(0.005)
            assert srv.stats.spurious >= 5
            privcmd.ioeventfd(privcmd_ioeventfd(
                ioreq=srv.page.mapping.addr, ports=ports.buffer_info()[0], addr=BASE, addr_len=4,
                event_fd=efd, vcpus=2, vq=0, flags=PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, dom=domid))
        finally:
            guest.close()
            await srv.close()


@pytest.mark.asyncio
async def test_kernel_fast_path_runs_with_the_simulated_host_stopped(sim_dir: str, efd: int) -> None:
    """sim.vcpu_channel: the vCPU plays the dom0 kernel's ioeventfd handler and the guest its irqfd,
    so a QueueNotify, the back-end's call raising the line, and the user-space accesses beside them
    cost no hop through the simulated host: they complete while it is stopped (SIGSTOP), and its
    counters still see every notify consumed and every call injected."""
    import signal

    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process(
        [sys.executable, "-m", "xen_vhost_sim.cli", "--socket", path, "--privcmd-eventfd", "on",
         "--domain", "domid=3,mem=32M,vcpus=1"], T * 2)
    try:
        kernel = SimKernel(path)
        with PrivCmd(kernel) as privcmd, EventChannel(kernel) as evtchn, SimControl(path) as ctl:
            dm = DeviceModel(privcmd, 3)
            sid = dm.create_ioreq_server()
            page = IoreqPage.map(privcmd, 3, sid, 1)
            try:
                dm.map_io_range(sid, BASE, BASE + 0x1FF)
                dm.set_ioreq_server_state(sid, True)
                ports = array.array("I", [evtchn.bind_interdomain(3, page.vp_eport(0))])
                evtchn.unmask(*await asyncio.wait_for(evtchn.wait(), T))
                privcmd.ioeventfd(privcmd_ioeventfd(
                    ioreq=page.mapping.addr, ports=ports.buffer_info()[0], addr=BASE, addr_len=4,
                    event_fd=efd, vcpus=1, vq=0, dom=3))
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                op = xen_dm_op(op=DmOp.set_irq_level)
                op.u.set_irq_level.irq, op.u.set_irq_level.level = IRQ, 1
                privcmd.irqfd(privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=call, dom=3))
                dm.set_irq_level(IRQ, 0)  # (the first one goes through the host: SimKernel's line route)
                async with await SimGuest.connect(path, 3) as guest:
                    await asyncio.wait_for(guest.mmio_write(NOTIFY, 4, 0), T)  # (fetches the route)
                    evtchn.unmask(*await asyncio.wait_for(evtchn.wait(), T))
                    assert _read_eventfd(efd) == 1
                    assert not guest.irq_level(IRQ)  # (fetches the irqfds)
                    os.kill(proc.pid, signal.SIGSTOP)  # every hop through the host would hang from here
                    try:
                        for i in range(20):
                            os.eventfd_write(call, 1)  # the back-end's call
                            await asyncio.wait_for(guest.wait_irq(IRQ), T)
                            assert not guest.irq_level(IRQ)  # taken
                            await asyncio.wait_for(guest.mmio_write(NOTIFY, 4, 0), T)
                            assert _read_eventfd(efd) == 1
                            assert ports[0] in await asyncio.wait_for(evtchn.wait(), T)  # shared with user space
                            assert page.take(0) is None and page.state(0) == IoreqState.NONE
                            evtchn.unmask(ports[0])
                            read = asyncio.ensure_future(guest.mmio_read(BASE + 0x70, 4))
                            fired = await asyncio.wait_for(evtchn.wait(), T)
                            evtchn.unmask(*fired)
                            req = page.take(0)
                            assert req is not None and req.addr == BASE + 0x70 and not req.is_write
                            page.complete(0, i)
                            evtchn.notify(ports[0])
                            assert await asyncio.wait_for(read, T) == i
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
                info = ctl.domain_info(3)["fastpath"]
                assert info["ioeventfd_consumed"] == 21 and info["ioeventfd_passed"] == 0
                assert info["irqfd_injected"] == 20 and info["irqfd_failed"] == 0
                privcmd.irqfd(privcmd_irqfd(fd=call, flags=PRIVCMD_IRQFD_FLAG_DEASSIGN, dom=3))
                os.close(call)
            finally:
                page.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc, T)
