"""``systemctl stop`` (SIGTERM) while the guest lives and uses its device: from the stop on, each
device's window answers as a removed device (reads 0: no interrupt pending, status 0; writes
dropped) with its interrupt line low, while its back-end stops; only then is the window unclaimed
and the IOREQ server destroyed. A guest vCPU that was in the device's interrupt handler when the
stop came finds the window still claimed for its InterruptStatus read and its InterruptACK write
(on Xen on Arm an unclaimed access is a data abort: tests/xenlab/README.md saw it kill a guest
in interrupt context).

The daemon runs in the test's event loop over the in-process simulated host (as in
test_waiting_backend.py); its back-end hangs at GET_VRING_BASE until the test lets it go, so the
teardown is caught half-way.

A guest that goes on posting requests after the stop (a virtio-net driver refills its receive
queue and transmits all the time) must not touch the window once it is unclaimed: its driver is
asked not to notify any more (virtio 1.2 §2.7.10) before the window goes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from vhost_user import UnixListener
from vhost_user.testing import RamDiskBlk

from tests.daemon.test_reset_hostile import MisbehavingServer
from tests.daemon.test_waiting_backend import BASES, DOMID, IRQS, TIMEOUT, guest_domain, guest_of, logwatch, running  # noqa: F401  (fixture)
from xen_vhost_master.config import MemoryMode
from xen_vhost_master.datapath.zerocopy import FdExport
from xen_vhost_master.supervisor import Options
from xen_vhost_master.virtio_mmio import QueueConfig
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator

QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x50, 0x60, 0x64, 0x70  # virtio-mmio registers


class NotifyCounter:
    """A guest's bus that counts its QueueNotify writes to one window."""

    def __init__(self, bus: Any, base: int) -> None:
        self._bus, self._notify, self.notifies = bus, base + QUEUE_NOTIFY, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        if addr == self._notify:
            self.notifies += 1
        await self._bus.mmio_write(addr, size, value, vcpu)


@pytest.mark.asyncio
async def test_sigterm_under_a_live_guest_answers_its_window_as_removed_with_the_line_low_until_unclaimed(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, logwatch):
    guest_domain(sim_control)
    path = os.path.join(sim_dir, "0.sock")
    servers: list[MisbehavingServer] = []
    listener = UnixListener(path)

    async def serve() -> None:
        sock = await listener.accept(timeout=None)
        servers.append(MisbehavingServer(RamDiskBlk(1 << 20), sock, mode="hang"))
        await servers[0].run()

    backend = asyncio.ensure_future(serve())
    base, irq = BASES[0], IRQS[0]
    try:
        with logwatch() as log:
            async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon, \
                    guest_of(sim_host) as guest:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, base, irq, GuestPageAllocator(guest.ram)), TIMEOUT)
                data = os.urandom(4096)
                await asyncio.wait_for(blk.write(8, data), TIMEOUT)
                assert await asyncio.wait_for(blk.read(8, 8), TIMEOUT) == data
                assert await asyncio.wait_for(guest.mmio_read(base + STATUS, 4), TIMEOUT) == 0xF  # DRIVER_OK

                stop = asyncio.ensure_future(daemon.stop())
                await asyncio.wait_for(servers[0].asked.wait(), TIMEOUT)  # the back-end is being stopped
                assert not guest.irq_level(irq)
                assert await asyncio.wait_for(guest.mmio_read(base + INTERRUPT_STATUS, 4), TIMEOUT) == 0
                await asyncio.wait_for(guest.mmio_write(base + INTERRUPT_ACK, 4, 1), TIMEOUT)
                assert await asyncio.wait_for(guest.mmio_read(base + STATUS, 4), TIMEOUT) == 0
                assert not stop.done()
                servers[0].release.set()
                assert await asyncio.wait_for(stop, TIMEOUT) == 0
                assert not guest.irq_level(irq)
                # gone now: the simulator answers an unclaimed access all-ones (x86 HVM's answer)
                assert await asyncio.wait_for(guest.mmio_read(base + INTERRUPT_STATUS, 4), TIMEOUT) == 0xFFFFFFFF
                with pytest.raises(GuestDriverError, match="did not complete its reset"):  # (no device any more)
                    await asyncio.wait_for(blk.close(), TIMEOUT)  # the driver lets go of its rings all the same
            order = [i for i, line in enumerate(log.lines)
                     if "answered as a removed device" in line or "ioreq server" in line and "destroyed" in line]
            assert [("removed" in log.lines[i]) for i in order] == [True, False], [log.lines[i] for i in order]
    finally:
        for s in servers:
            s.release.set()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)
        listener.close()


async def _post(blk: VirtioBlk, allocator: GuestPageAllocator) -> asyncio.Future[int]:
    """One more read request of the guest, notified as its driver decides (used ring flags,
    avail_event); nobody completes it."""
    header, status = allocator.alloc(4096), allocator.alloc(4096)
    with blk.driver.bus.ram.view(header, 16) as mv:
        mv[:] = bytes(16)  # VIRTIO_BLK_T_IN, sector 0
    return await blk.driver.submit(0, readable=[(header, 16)], writable=[(status, 1)])


@pytest.mark.parametrize("memory", [MemoryMode.SHADOW, MemoryMode.SIM_MEMFD], ids=["shadow", "zero-copy"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.asyncio
async def test_a_guest_posting_on_after_sigterm_is_asked_not_to_notify_and_never_touches_the_window(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, logwatch, event_idx, memory):
    """Shadow virtqueues: from the stop on (the daemon alone sees the guest's rings). Zero copy
    (the back-end's view of guest RAM, here the simulator's memfd): once the back-end has stopped
    its rings, before the window goes."""
    guest_domain(sim_control)
    path = os.path.join(sim_dir, "0.sock")
    servers: list[MisbehavingServer] = []
    listener = UnixListener(path)

    async def serve() -> None:
        sock = await listener.accept(timeout=None)
        servers.append(MisbehavingServer(RamDiskBlk(1 << 20, event_idx=event_idx), sock, mode="hang"))
        await servers[0].run()

    backend = asyncio.ensure_future(serve())
    base, irq = BASES[0], IRQS[0]
    opt = Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"), memory=memory)
    try:
        with logwatch() as log:
            async with running(platform, opt) as daemon, guest_of(sim_host) as guest:
                try:
                    bus = NotifyCounter(guest, base)
                    allocator = GuestPageAllocator(guest.ram)
                    features = VirtioBlk.DEFAULT_FEATURES | (Feature.RING_EVENT_IDX if event_idx else 0)
                    blk = await asyncio.wait_for(VirtioBlk.attach(bus, base, irq, allocator, features=features), TIMEOUT)
                    assert blk.driver.has(Feature.RING_EVENT_IDX) == event_idx
                    data = os.urandom(4096)
                    await asyncio.wait_for(blk.write(8, data), TIMEOUT)
                    assert await asyncio.wait_for(blk.read(8, 8), TIMEOUT) == data
                    assert bus.notifies > 0  # the driver notifies while the device serves

                    stop = asyncio.ensure_future(daemon.stop())
                    await asyncio.wait_for(servers[0].asked.wait(), TIMEOUT)  # the back-end is being stopped
                    posted: list[asyncio.Future[int]] = []
                    if memory is MemoryMode.SHADOW:
                        before = bus.notifies
                        posted += [await asyncio.wait_for(_post(blk, allocator), TIMEOUT) for _ in range(8)]
                        assert bus.notifies == before, "the driver notified after the stop"
                    servers[0].release.set()
                    assert await asyncio.wait_for(stop, TIMEOUT) == 0
                    before = bus.notifies
                    assert any("ioreq server" in line and "destroyed" in line for line in log.lines)  # the window is gone
                    posted += [await asyncio.wait_for(_post(blk, allocator), TIMEOUT) for _ in range(8)]
                    assert bus.notifies == before, "the driver touched the unclaimed window"
                    assert not any(f.done() for f in posted)  # nobody served them
                    assert not guest.irq_level(irq)
                    with pytest.raises(GuestDriverError, match="did not complete its reset"):
                        await asyncio.wait_for(blk.close(), TIMEOUT)
                finally:  # a failed check must not leave the daemon waiting for the back-end
                    for server in servers:
                        server.release.set()
            assert sum("driver is asked not to notify" in line for line in log.lines) == 1  # once, at the stop
    finally:
        for s in servers:
            s.release.set()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)
        listener.close()


@pytest.mark.parametrize(("features", "flags_at", "flags", "avail_event"), [
    (0, 0x2000, 1, None),  # split: VIRTQ_USED_F_NO_NOTIFY in the used ring's flags
    (1 << 29, 0x2000, 1, (0xFFF0 + 0x8000) & 0xFFFF),  # split, EVENT_IDX: avail_event half the index space away
    (1 << 34, 0x2002, 1, None),  # packed: the device event suppression's RING_EVENT_FLAGS_DISABLE
], ids=["split", "split-event-idx", "packed"])
def test_zero_copy_quiesce_writes_the_suppression_the_ring_layout_has(features, flags_at, flags, avail_event):
    ram = bytearray(0x4000)
    desc, driver, device, num = 0x0000, 0x1000, 0x2000, 16
    ram[driver + 2:driver + 4] = (0xFFF0).to_bytes(2, "little")  # the driver's avail idx

    def read(gpa: int, n: int) -> bytes:
        return bytes(ram[gpa:gpa + n])

    def write(gpa: int, data: bytes) -> None:
        ram[gpa:gpa + len(data)] = data

    path = FdExport([], read, write)
    path.open_queue(QueueConfig(0, num, desc, driver, device), features | (1 << 32), -1)
    assert path.quiesce() == [0]
    assert int.from_bytes(ram[flags_at:flags_at + 2], "little") == flags
    got = int.from_bytes(ram[device + 4 + 8 * num:device + 6 + 8 * num], "little")
    assert got == (avail_event if avail_event is not None else 0)
    path.close_queue(0)
    assert path.quiesce() == []  # a queue the driver reset is never written again
    assert FdExport([], read).quiesce() == []  # no way to write guest memory: nothing asked
