"""What a daemon killed with SIGKILL leaves behind, taken over by its successor through the kept
back-end connection (xen_vhost_master/fdstore.py): no simulator, back-ends in this process over
socketpairs, guest RAM in a memfd. A "crash" here is a device frozen mid-flight: its readers
removed (it harvests nothing more), its end of the connection closed (nothing sent: a killed
process stops the rings of nobody), the fds the service manager holds copied first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vhost_user import AsyncFrontend, FdSocket
from vhost_user.aio.server import BackendServer
from vhost_user.testing import PAIR_SHUTDOWN_TIMEOUT, RamDiskBlk
from vhost_user.testing.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhost_user.virtqueue import FlatMemory, SplitQueueDriver, split_ring_layout
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.shadow import GuestInflightRecord, ShadowDataPath
from xen_vhost_master.datapath.shadow_pool import HEAD_MAP_HEADER, ShadowMemory
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.fdstore import Kept, SessionMeta
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg, VirtioMmioDevice, snapshot

from tests.daemon.mmio_driver import write
from tests.daemon.test_faults import RAM_BASE, RAM_SIZE, _bring_up, ram_memfd  # noqa: F401  (fixture)
from tests.daemon.test_fdstore import CONFIG, Keeper

TIMEOUT = 20.0
RINGS = (RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000)  # _bring_up's, 64 entries
BUFS = RAM_BASE + 0x10000  # request buffers: 4 KiB per request slot
_HDR = struct.Struct("<IIQ")  # virtio 1.2 §5.2.6 struct virtio_blk_req header


RINGS_1 = (RAM_BASE + 0x4000, RAM_BASE + 0x5000, RAM_BASE + 0x6000)  # queue 1's, when there is one


class Guest:
    """The guest's side of queue 0 (and 1): split-ring drivers over its RAM and the interrupt line."""

    def __init__(self, ram: int, queues: int = 1) -> None:
        self._map = mmap.mmap(ram, RAM_SIZE)
        self.mem = FlatMemory(self._map, RAM_BASE)
        self.drvs = [SplitQueueDriver(self.mem, 64, *rings) for rings in (RINGS, RINGS_1)[:queues]]
        self.drv = self.drvs[0]
        self.irq = asyncio.Event()
        self.done: dict[Any, int] = {}
        self.scattered: dict[int, list[tuple[int, int]]] = {}  # slot → its read's data buffers

    def set_irq(self, level: bool) -> None:
        if level:
            self.irq.set()

    def request(self, slot: int, kind: int, sector: int, data: bytes = b"", read: int = 0, queue: int = 0,
                scatter: int = 1) -> int:
        """A virtio-blk request in buffer slot ``slot``: header, data out, data in, status; the
        data in (``read`` bytes) in ``scatter`` pieces with 64-byte gaps between them."""
        base = BUFS + 0x1000 * slot
        self.mem.view(base, _HDR.size)[:] = _HDR.pack(kind, 0, sector)
        self.mem.view(base + 0x100, len(data))[:] = data
        piece = read // scatter
        self.scattered[slot] = [(base + 0x100 + k * (piece + 0x40), piece) for k in range(scatter)] if read else []
        status = base + 0x100 + len(data) + read + (scatter - 1) * 0x40
        self.mem.view(status, 1)[:] = b"\xff"
        readable = [(base, _HDR.size)] + ([(base + 0x100, len(data))] if data else [])
        self.drvs[queue].add(readable, [*self.scattered[slot], (status, 1)], token=slot)
        return slot

    def status(self, slot: int, data_len: int) -> int:
        gaps = 0x40 * (len(self.scattered[slot]) - 1) if self.scattered.get(slot) else 0
        return self.mem.view(BUFS + 0x1000 * slot + 0x100 + data_len + gaps, 1)[0]

    def read_back(self, slot: int, length: int) -> bytes:
        return b"".join(bytes(self.mem.view(a, n)) for a, n in self.scattered[slot])[:length]

    async def completed(self, device: Device, tokens: set[int]) -> None:
        """Wait (interrupt by interrupt) until the device has returned ``tokens``; each at most once."""
        while not tokens <= self.done.keys():
            await self.irq.wait()
            self.irq.clear()
            await write(device, Reg.INTERRUPT_ACK, 1)
            for drv in self.drvs:
                for token, written in drv.get_used():
                    assert token not in self.done, f"request {token} completed twice"
                    self.done[token] = written

    def close(self) -> None:
        for drv in self.drvs:
            drv.release()
        self.mem.release()
        self._map.close()


def shadow_path(guest: Guest, record: Path | None, queues: int = 1) -> ShadowDataPath:
    return ShadowDataPath(guest.mem, [(RAM_BASE, RAM_SIZE)], pool_size=1 << 20, max_queues=queues, max_queue_size=64,
                          log=device_logger("xvm.test.crash", 1, "blk0"),
                          inflight=GuestInflightRecord(str(record), queues, 64) if record is not None else None)


def new_device(guest: Guest, memory: Any, connect: Any, keeper: Keeper, config: DeviceConfig = CONFIG) -> Device:
    return Device(config, connect=connect, memory=memory, set_irq=guest.set_irq,
                  log=device_logger("xvm.test.crash", 1, "blk0"), keeper=keeper)


class Holding(RamDiskBlk):
    """Serves each request but completes none, not even at GET_VRING_BASE: it does not drain."""

    def __init__(self, disk: bytearray) -> None:
        super().__init__(1 << 20, reorder=random.Random(0))
        self.disk = disk
        self.took = asyncio.Event()

    def _hold_completion(self, vring: Any, head: int, written: int) -> None:
        self.took.set()

    def vring_stopped(self, vring: Any) -> None:
        pass


class OutOfOrder(RamDiskBlk):
    """Completes each request at once, except those to a sector in ``hold``: never (younger ones
    complete first; not even at GET_VRING_BASE). Notes the sector of every request it runs."""

    def __init__(self, disk: bytearray, hold: set[int] | None = None, *, inflight: bool = True) -> None:
        super().__init__(1 << 20, reorder=random.Random(0), inflight=inflight)
        self.disk = disk
        self.hold = hold or set()
        self.ran: list[int] = []
        self._sector = -1
        self.held: list[tuple[Any, int, int]] = []  # (vring, head, written)
        self.took = asyncio.Event()

    def handle_request(self, chain: Any, read_buffers: Any, write_buffers: Any) -> int:
        header = read_buffers(self.memory, chain.readable, _HDR.size)
        self._sector = _HDR.unpack_from(header)[2] if len(header) == _HDR.size else -1
        self.ran.append(self._sector)
        written: int = super().handle_request(chain, read_buffers, write_buffers)
        return written

    def _hold_completion(self, vring: Any, head: int, written: int) -> None:
        if self._sector in self.hold:
            self.held.append((vring, head, written))
            self.took.set()
            return
        queue = vring.split_queue()
        queue.push(head, written)
        if queue.needs_notify():
            vring.call()

    def vring_stopped(self, vring: Any) -> None:
        pass

    def complete_held(self) -> None:
        """Complete what was held, late: into the ring as it runs now."""
        held, self.held = self.held, []
        for vring, head, written in held:
            queue = vring.split_queue()
            queue.push(head, written)
            vring.call()


def zero_copy(ram: int) -> FdExport:
    def read_guest(gpa: int, size: int) -> bytes:  # (a resume reads the used index)
        return os.pread(ram, size, gpa - RAM_BASE)

    return FdExport([FdRegion(RAM_BASE, RAM_SIZE, ram)], read_guest)


@contextlib.asynccontextmanager
async def serving(device: RamDiskBlk) -> AsyncIterator[tuple[AsyncFrontend, asyncio.Task[None]]]:
    """A front-end connected to ``device`` over a socketpair, and the back-end's task (it ends when
    the connection does)."""
    ours, theirs = FdSocket.pair()
    server = BackendServer(device, theirs)
    task = asyncio.get_running_loop().create_task(server.run())
    fe = AsyncFrontend(ours)
    try:
        yield fe, task
    finally:
        await fe.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PAIR_SHUTDOWN_TIMEOUT):
                await asyncio.gather(task, return_exceptions=True)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


async def _no_new_connection() -> AsyncFrontend:
    raise AssertionError("connected afresh: the kept connection was refused")


@contextlib.asynccontextmanager
async def called(device: Device, index: int = 0) -> AsyncIterator[asyncio.Event]:
    """Freeze ``device``'s harvest of queue ``index``: the back-end's calls set the event instead."""
    loop = asyncio.get_running_loop()
    fd = device._call[index]
    event = asyncio.Event()

    def on_call() -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        event.set()

    loop.remove_reader(fd)
    loop.add_reader(fd, on_call)
    try:
        yield event
    finally:
        loop.remove_reader(fd)


async def close(devices: Any) -> None:
    for device in devices():
        if device is not None:
            await device.close()


async def crash(device: Device, keeper: Keeper) -> Kept:
    """The process dies: the service manager's copies of what it stored are all that is left."""
    copies = {name.split(".", 1)[1]: os.dup(fd) for name, fd in keeper.stored.items()}
    assert device.frontend is not None
    await device.frontend.close()  # (only this process's end: the copy keeps the connection)
    return Kept(0, copies["conn"], copies["meta"], copies.get("chan"), copies.get("shadow"), copies.get("inflight"))


class Scene:
    """A guest and its device (``first``) brought up over the connection to a back-end that outlives
    it; ``successor`` builds the device of the next process. ``stack`` closes both devices, then the
    back-ends' connections; :meth:`fresh` serves a back-end on a new connection."""

    def __init__(self, guest: Guest, stack: contextlib.AsyncExitStack, fe: AsyncFrontend, task: asyncio.Task[None],
                 memory: Any, config: DeviceConfig) -> None:
        self.guest, self.stack, self.task, self.config = guest, stack, task, config
        self._fe = fe
        self.keeper = Keeper()
        self.first = new_device(guest, memory, self.kept, self.keeper, config)
        self.second: Device | None = None

    async def kept(self) -> AsyncFrontend:
        """The first device's connect(): the connection to the back-end that outlives it."""
        return self._fe

    def fresh(self, backend: RamDiskBlk, connections: list[AsyncFrontend] | None = None) -> Any:
        """A connect() to ``backend`` over a new connection each time (noted in ``connections``)."""

        async def connect() -> AsyncFrontend:
            fe, _task = await self.stack.enter_async_context(serving(backend))
            if connections is not None:
                connections.append(fe)
            return fe

        return connect

    def successor(self, memory: Any, connect: Any = _no_new_connection, keeper: Keeper | None = None) -> Device:
        self.second = new_device(self.guest, memory, connect, keeper or Keeper(), self.config)
        return self.second


@contextlib.asynccontextmanager
async def scene(ram: int, backend: RamDiskBlk, memory: Any, *, queues: int = 1,
                config: DeviceConfig = CONFIG) -> AsyncIterator[Scene]:
    """``memory(guest)``: the first device's data path. The device is started and the driver has
    brought up ``queues`` queues (64 entries each) when the scene is handed over."""
    guest = Guest(ram, queues)
    try:
        async with contextlib.AsyncExitStack() as stack:
            fe, task = await stack.enter_async_context(serving(backend))
            sc = Scene(guest, stack, fe, task, memory(guest), config)
            stack.push_async_callback(close, lambda: (sc.second, sc.first))  # before the back-ends' ends
            async with asyncio.timeout(TIMEOUT):
                await sc.first.start()
                await (_bring_up(sc.first) if queues == 1 else bring_up_two(sc.first))
            yield sc
    finally:
        guest.close()


async def shadow_crash(ram: int, record: Path | None, scribble: Any = None, scatter: int = 1) -> RamDiskBlk:
    """A write (sector 0) completed; then a write (sector 8, slot 1) and a read of sector 0 (slot
    2; its data in ``scatter`` pieces) the back-end completes into the shadow ring of a process
    that dies before it harvests them;
    ``scribble(shadow memory fd, its layout)`` meddles with the kept memory before the successor
    starts with it. The successor must complete both to the guest once each; a later write (slot
    3, sector 16) is served. Returns the back-end (its request counts)."""
    backend = RamDiskBlk(1 << 20)
    async with scene(ram, backend, lambda guest: shadow_path(guest, record)) as sc, asyncio.timeout(TIMEOUT):
        guest, first = sc.guest, sc.first
        one = b"\x11" * 512
        guest.request(0, VIRTIO_BLK_T_OUT, 0, one)
        await write(first, Reg.QUEUE_NOTIFY, 0)
        await guest.completed(first, {0})
        assert "dev0.shadow" in sc.keeper.stored
        two = b"\x22" * 512
        async with called(first) as backend_called:
            guest.request(1, VIRTIO_BLK_T_OUT, 8, two)
            guest.request(2, VIRTIO_BLK_T_IN, 0, read=512, scatter=scatter)
            await write(first, Reg.QUEUE_NOTIFY, 0)
            await backend_called.wait()  # the back-end completed both: nobody harvests them
            assert backend.requests[VIRTIO_BLK_T_OUT] == 2 and backend.requests[VIRTIO_BLK_T_IN] == 1
            assert isinstance(first.model, VirtioMmioDevice)
            saved = snapshot(first.model)
            kept = await crash(first, sc.keeper)
            sc.stack.callback(kept.close)  # (what the successor did not take)
        if scribble is not None:
            assert kept.shadow is not None and isinstance(first.memory, ShadowDataPath)
            scribble(kept.shadow, first.memory.shadow)
        second = sc.successor(shadow_path(guest, record))
        await second.start(saved, kept=kept)
        await guest.completed(second, {1, 2})
        assert guest.status(1, 512) == 0 and guest.status(2, 512) == 0
        assert guest.read_back(2, 512) == one and guest.done[2] == 513
        assert bytes(backend.disk[8 * 512 : 9 * 512]) == two
        three = b"\x33" * 512
        guest.request(3, VIRTIO_BLK_T_OUT, 16, three)
        await write(second, Reg.QUEUE_NOTIFY, 0)
        await guest.completed(second, {3})
        assert bytes(backend.disk[16 * 512 : 17 * 512]) == three
    return backend


@pytest.mark.parametrize("scatter", [1, 4], ids=["one-piece", "scattered"])
@pytest.mark.parametrize("record", [True, False], ids=["inflight-record", "no-record"])
@pytest.mark.asyncio
async def test_completions_the_backend_made_before_the_crash_reach_the_guest_once_and_are_not_run_again(
        no_fd_leak, ram_memfd, tmp_path, record, scatter):
    """Shadow path: a write and a read the back-end completed into the killed process's shadow
    ring, which it did not live to harvest. The successor gives both to the guest from the kept
    shadow memory (the read's data copied back, the write's status), and the back-end never sees
    either again: 3 writes and 1 read executed for 3 writes and 1 read asked, with or without the
    guest-side in-flight record; also with the read's data in four pieces, which reached the
    back-end as one buffer (shadow.py ``_layout``) and go back piece by piece."""
    backend = await shadow_crash(ram_memfd, tmp_path / "dev0.inflight" if record else None, scatter=scatter)
    assert backend.requests[VIRTIO_BLK_T_OUT] == 3 and backend.requests[VIRTIO_BLK_T_IN] == 1, \
        f"a chain the back-end had completed ran again: {backend.requests}"


def _heads(fd: int, layout: ShadowMemory) -> int:
    return layout.head_map(0) + HEAD_MAP_HEADER


def _out_of_range(fd: int, layout: ShadowMemory) -> None:
    os.pwrite(fd, b"\xff\xff" * 64, _heads(fd, layout))


def _swapped(fd: int, layout: ShadowMemory) -> None:
    """The write's and the read's guest heads exchanged: both rings hand out descriptors lowest
    first and reuse the first request's, so the write heads descriptor 0 and the read descriptor 3
    on both sides (3 descriptors each); both are in flight, only their shapes differ."""
    os.pwrite(fd, struct.pack("<HHHH", 3, 0, 0, 0), _heads(fd, layout))


def _far_ahead(fd: int, layout: ShadowMemory) -> None:
    os.pwrite(fd, struct.pack("<H", 0x8000), layout.head_map(0))


def _bad_used_element(fd: int, layout: ShadowMemory) -> None:
    """The back-end's own doing: the second used element (the first not harvested) names a
    descriptor beyond the ring."""
    used = split_ring_layout(64, layout.ring_slot(0))[2] - layout.base
    os.pwrite(fd, struct.pack("<I", 999), used + 4 + 8 * 1)


@pytest.mark.parametrize("scribble", [_out_of_range, _swapped, _far_ahead, _bad_used_element],
                         ids=["out-of-range", "swapped", "far-ahead", "bad-used-element"])
@pytest.mark.asyncio
async def test_kept_shadow_memory_that_does_not_match_the_guests_ring_is_refused_in_one_line(
        no_fd_leak, ram_memfd, tmp_path, caplog, scribble):
    """What the kept memory says does not match the guest's ring: head maps naming no chain in
    flight or the other chain (shapes differ), a used-index relation that makes more completions
    than the ring holds, a used element the back-end wrote naming a descriptor beyond the ring.
    Refused in one line, and those chains are taken from the guest again (run twice, as before
    this was kept, each completed to the guest once)."""
    with caplog.at_level(logging.WARNING):
        backend = await shadow_crash(ram_memfd, tmp_path / "dev0.inflight", scribble)
    lines = [r.getMessage() for r in caplog.records if "completed before the daemon restarted is not usable" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert backend.requests[VIRTIO_BLK_T_OUT] == 4 and backend.requests[VIRTIO_BLK_T_IN] == 2, backend.requests


@pytest.mark.asyncio
async def test_a_backend_that_does_not_drain_after_the_crash_is_dropped_in_one_line_and_a_fresh_one_serves(
        no_fd_leak, ram_memfd, tmp_path, caplog, monkeypatch):
    """Shadow path, a back-end that took a write and never completes it (not even once GET_VRING_BASE
    stopped its ring): the successor does not go on with its connection, whose late completion
    would land in the shadow ring laid out anew; it says so in one line, the connection is closed
    (the back-end sees it end), and a fresh connection serves: the write is taken from the guest
    again and completes once, and a later one too."""
    monkeypatch.setattr("xen_vhost_master.device.SUSPEND_DRAIN", 0.3)  # (the bound, not a synchronisation)
    path = tmp_path / "dev0.inflight"
    disk = bytearray(1 << 20)
    holding, fresh = Holding(disk), RamDiskBlk(1 << 20)
    fresh.disk = disk
    async with scene(ram_memfd, holding, lambda guest: shadow_path(guest, path)) as sc, asyncio.timeout(TIMEOUT):
        guest, first = sc.guest, sc.first
        connections: list[AsyncFrontend] = []
        one = b"\x44" * 512
        guest.request(0, VIRTIO_BLK_T_OUT, 0, one)
        await write(first, Reg.QUEUE_NOTIFY, 0)
        await holding.took.wait()
        assert isinstance(first.model, VirtioMmioDevice)
        saved = snapshot(first.model)
        kept = await crash(first, sc.keeper)
        second = sc.successor(shadow_path(guest, path), sc.fresh(fresh, connections))
        with caplog.at_level(logging.WARNING):
            await second.start(saved, kept=kept)
        lines = [r.getMessage() for r in caplog.records if "kept from the previous process is unusable" in r.getMessage()]
        assert len(lines) == 1 and "does not drain" in lines[0] and "connecting afresh" in lines[0], lines
        assert "\n" not in lines[0]
        await sc.task  # its connection is closed: it ends
        assert len(connections) == 1 and second.frontend is connections[0]
        await guest.completed(second, {0})
        assert guest.status(0, 512) == 0 and bytes(disk[:512]) == one
        two = b"\x55" * 512
        guest.request(1, VIRTIO_BLK_T_OUT, 8, two)
        await write(second, Reg.QUEUE_NOTIFY, 0)
        await guest.completed(second, {1})
        assert bytes(disk[8 * 512 : 9 * 512]) == two and fresh.requests[VIRTIO_BLK_T_OUT] == 2


@pytest.mark.asyncio
async def test_the_inflight_area_outlives_a_crash_and_a_restarted_backend_resubmits_exactly_what_was_left(
        no_fd_leak, ram_memfd, caplog):
    """Zero copy, a back-end with inflight tracking (INFLIGHT_SHMFD) that completes out of order:
    of two writes it completed the younger (sector 8) and holds the older (sector 0). The daemon
    is killed, and the back-end dies too. The successor finds the kept connection dead and
    connects to the restarted back-end, handing it the kept inflight area (SET_INFLIGHT_FD): it
    submits the held write again, and not the completed one (which resuming at the guest's used
    index with a fresh area would run again, leaving the held one never completed)."""
    disk = bytearray(1 << 20)
    before, after = OutOfOrder(disk, hold={0}), OutOfOrder(disk)
    async with scene(ram_memfd, before, lambda _guest: zero_copy(ram_memfd)) as sc:
        guest, first = sc.guest, sc.first
        old, young = b"\x66" * 512, b"\x77" * 512
        async with asyncio.timeout(TIMEOUT):
            assert "dev0.inflight" in sc.keeper.stored and first.inflight is not None
            guest.request(0, VIRTIO_BLK_T_OUT, 0, old)
            guest.request(1, VIRTIO_BLK_T_OUT, 8, young)
            await write(first, Reg.QUEUE_NOTIFY, 0)
            await guest.completed(first, {1})
            assert before.ran == [0, 8]
            assert isinstance(first.model, VirtioMmioDevice)
            saved = snapshot(first.model)
            kept = await crash(first, sc.keeper)
            sc.task.cancel()  # the back-end dies too
            await asyncio.gather(sc.task, return_exceptions=True)
            second = sc.successor(zero_copy(ram_memfd), sc.fresh(after))
            with caplog.at_level(logging.WARNING):
                await second.start(saved, kept=kept)
            assert not [r for r in caplog.records if "inflight area" in r.getMessage()], caplog.text
        try:
            async with asyncio.timeout(5.0):
                await guest.completed(second, {0})
        except TimeoutError:
            raise AssertionError(f"the held write never completed; the restarted back-end ran sectors {after.ran}") from None
        assert after.ran == [0], f"the restarted back-end ran sectors {after.ran}, the held write's (0) only expected"
        assert guest.status(0, 512) == 0 and bytes(disk[:512]) == old and bytes(disk[8 * 512 : 9 * 512]) == young
        async with asyncio.timeout(TIMEOUT):
            guest.request(2, VIRTIO_BLK_T_OUT, 16, old)
            await write(second, Reg.QUEUE_NOTIFY, 0)
            await guest.completed(second, {2})
        assert after.ran == [0, 16]


async def handover(device: Device) -> Kept:
    """SIGHUP: the device hands its connection over (Device.suspend); the next image gets the copies."""
    handed = {name.split(".", 1)[1]: fd for name, fd in await device.suspend()}
    return Kept(0, handed["conn"], handed["meta"], handed.get("chan"), handed.get("shadow"), handed.get("inflight"))


@pytest.mark.parametrize("how", ["crash", "handover"])
@pytest.mark.asyncio
async def test_zero_copy_resumes_the_kept_connection_where_the_backend_stopped_not_at_the_guests_used_index(
        no_fd_leak, ram_memfd, how):
    """Zero copy, a back-end (no inflight tracking) that took a write and completes it late, after
    GET_VRING_BASE (it does not drain: libvhost-user's back-ends answer at once). The successor
    (after a crash: it stops the ring itself; after a SIGHUP handover: the session record says
    where the handing image stopped it) restarts the ring on the kept connection at the
    back-end's answer, not at the guest's used index: the write is not taken from the guest a
    second time, its late completion reaches the guest once, and a later write is served."""
    disk = bytearray(1 << 20)
    late = OutOfOrder(disk, hold={0}, inflight=False)
    async with scene(ram_memfd, late, lambda _guest: zero_copy(ram_memfd)) as sc, asyncio.timeout(TIMEOUT):
        guest, first = sc.guest, sc.first
        one, two = b"\x88" * 512, b"\x99" * 512
        guest.request(0, VIRTIO_BLK_T_OUT, 0, one)
        await write(first, Reg.QUEUE_NOTIFY, 0)
        await late.took.wait()
        assert isinstance(first.model, VirtioMmioDevice)
        saved = snapshot(first.model)
        if how == "crash":
            kept = await crash(first, sc.keeper)
        else:
            kept = await handover(first)
            assert SessionMeta.read(kept.meta).stopped == [[0, 1]]
        second = sc.successor(zero_copy(ram_memfd))
        await second.start(saved, kept=kept)
        guest.request(1, VIRTIO_BLK_T_OUT, 8, two)
        await write(second, Reg.QUEUE_NOTIFY, 0)
        await guest.completed(second, {1})  # (the back-end has looked at the ring since the resume)
        assert late.ran == [0, 8], f"the back-end ran sectors {late.ran}: the held write was taken again"
        late.complete_held()
        await guest.completed(second, {0})
        assert guest.status(0, 512) == 0 and bytes(disk[:512]) == one and bytes(disk[8 * 512 : 9 * 512]) == two


def _other_shape(kept: Kept) -> None:
    meta = SessionMeta.read(kept.meta)
    assert meta.inflight is not None
    meta.inflight = [meta.inflight[0], meta.inflight[1], meta.inflight[2], 128]
    meta.write(kept.meta)


def _not_described(kept: Kept) -> None:
    meta = SessionMeta.read(kept.meta)
    meta.inflight = None
    meta.write(kept.meta)


def _not_a_memory_file(kept: Kept) -> None:
    assert kept.inflight is not None
    os.close(kept.inflight)
    r, w = os.pipe()
    os.close(w)
    kept.inflight = r


@pytest.mark.parametrize(("spoil", "reason"), [
    (_other_shape, "1 x 128 answered, 1 x 64 asked"),
    (_not_described, "does not describe it"),
    (_not_a_memory_file, "not a memory file"),
], ids=["other-shape", "not-described", "not-a-memory-file"])
@pytest.mark.asyncio
async def test_a_kept_inflight_area_that_does_not_fit_is_refused_in_one_line_and_a_fresh_one_asked_for(
        no_fd_leak, ram_memfd, caplog, spoil, reason):
    """Zero copy, a back-end with inflight tracking: the successor goes on with the kept connection
    but not with an inflight area that does not fit the device or its record (logged in one line,
    closed): it asks the back-end for a fresh one at the resume, and keeps that one."""
    backend = RamDiskBlk(1 << 20)
    async with scene(ram_memfd, backend, lambda _guest: zero_copy(ram_memfd)) as sc, asyncio.timeout(TIMEOUT):
        guest, first = sc.guest, sc.first
        assert first.inflight is not None
        assert isinstance(first.model, VirtioMmioDevice)
        saved = snapshot(first.model)
        kept = await crash(first, sc.keeper)
        sc.stack.callback(kept.close)
        spoil(kept)
        later = Keeper()
        second = sc.successor(zero_copy(ram_memfd), keeper=later)
        with caplog.at_level(logging.WARNING):
            await second.start(saved, kept=kept)
        lines = [r.getMessage() for r in caplog.records if "inflight area" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0] and "\n" not in lines[0], lines
        area = second.inflight
        assert area is not None and (area.num_queues, area.queue_size) == (1, 64)
        assert later.stored.get("dev0.inflight") == area.fd
        assert SessionMeta.read(later.stored["dev0.meta"]).inflight == [area.mmap_size, area.mmap_offset, 1, 64]
        guest.request(0, VIRTIO_BLK_T_OUT, 0, b"\x12" * 512)
        await write(second, Reg.QUEUE_NOTIFY, 0)
        await guest.completed(second, {0})


def test_the_session_record_carries_the_inflight_areas_shape_and_refuses_a_malformed_one():
    meta = SessionMeta(socket="/x.sock", features=1, protocol_features=0, backend_protocol_features=0,
                       queue_num=None, max_mem_slots=None, channel=False, num_queues=1, inflight=[4096, 0, 1, 64])
    assert SessionMeta.decode(meta.encode()) == meta
    older = json.loads(meta.encode())
    del older["inflight"]
    assert SessionMeta.decode(json.dumps(older).encode()).inflight is None  # a record written before it
    for bad in ([4096, 0, 1], [4096, 0, 1, -1], [4096, 0, 1, True], "4096", {"size": 4096}):
        with pytest.raises(ValueError, match="malformed"):
            SessionMeta.decode(json.dumps({**older, "inflight": bad}).encode())
    # where a handover stopped each ring: [queue, avail index] pairs within the device's queues
    stopped = SessionMeta.decode(json.dumps({**older, "stopped": [[0, 65535]]}).encode())
    assert stopped.stopped == [[0, 65535]] and SessionMeta.decode(stopped.encode()) == stopped
    for bad in ([[1, 0]], [[0, 65536]], [[0, 1], [0, 2]], [[0]], [[0, True]], [0], {"0": 1}):
        with pytest.raises(ValueError, match="malformed"):
            SessionMeta.decode(json.dumps({**older, "stopped": bad}).encode())


def test_shadow_memory_of_an_earlier_daemon_without_head_maps_is_taken_and_grown(no_fd_leak):
    """A handover from a daemon whose shadow memfd is the back-end's region alone: taken (the region
    the back-end maps is unchanged), grown by the head maps, which read as zero."""
    new = ShadowMemory(pool_size=1 << 20, max_queues=2, max_queue_size=64)
    try:
        old = os.memfd_create("earlier-shadow", os.MFD_CLOEXEC)
        os.ftruncate(old, new.size)
        taken = ShadowMemory(pool_size=1 << 20, max_queues=2, max_queue_size=64, fd=old)
        try:
            assert os.fstat(taken.fd).st_size == taken.file_size > taken.size == new.size
            assert taken.region() == new.region()
            assert not any(taken.mv[taken.head_map(0) : taken.file_size])
        finally:
            taken.close()
        other = os.memfd_create("other-shadow", os.MFD_CLOEXEC)
        os.ftruncate(other, new.file_size + 4096)
        with pytest.raises(ValueError, match="holds"):
            ShadowMemory(pool_size=1 << 20, max_queues=2, max_queue_size=64, fd=other)
    finally:
        new.close()


async def bring_up_two(device: Device) -> None:
    """A driver's bring-up of queues 0 and 1 (64 entries each) by register writes."""
    for value in (0, 1, 3):
        await write(device, Reg.STATUS, value)
    for sel, value in ((0, 0), (1, 1)):  # VERSION_1
        await write(device, Reg.DRIVER_FEATURES_SEL, sel)
        await write(device, Reg.DRIVER_FEATURES, value)
    await write(device, Reg.STATUS, 11)
    for index, rings in enumerate((RINGS, RINGS_1)):
        await write(device, Reg.QUEUE_SEL, index)
        await write(device, Reg.QUEUE_NUM, 64)
        for reg, addr in zip((Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW), rings, strict=True):
            await write(device, reg, addr)
            await write(device, reg + 4, 0)
        await write(device, Reg.QUEUE_READY, 1)
    await write(device, Reg.STATUS, 15)


@pytest.mark.asyncio
async def test_every_queues_kept_completions_reach_the_guest_before_any_queue_takes_new_chains(
        no_fd_leak, ram_memfd, tmp_path):
    """Two queues: a read the back-end completed on queue 1 into the killed process's shadow ring
    (its data in the bounce pool, not harvested), and a write the guest queued on queue 0 while no
    daemon ran. The successor's bounce pool starts empty over those bytes: queue 0's resume must
    not take the write into them before queue 1's read is given back (the guest would read the
    write's bytes)."""
    config = DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=2, socket="/x.sock")
    path = tmp_path / "dev0.inflight"
    backend = RamDiskBlk(1 << 20, num_queues=2)
    backend.disk[:512] = b"\x5a" * 512
    async with scene(ram_memfd, backend, lambda guest: shadow_path(guest, path, 2), queues=2, config=config) as sc, \
            asyncio.timeout(TIMEOUT):
        guest, first = sc.guest, sc.first
        async with called(first, 1) as backend_called:
            guest.request(0, VIRTIO_BLK_T_IN, 0, read=512, queue=1)
            await write(first, Reg.QUEUE_NOTIFY, 1)
            await backend_called.wait()
            assert isinstance(first.model, VirtioMmioDevice)
            saved = snapshot(first.model)
            kept = await crash(first, sc.keeper)
            sc.stack.callback(kept.close)
        guest.request(1, VIRTIO_BLK_T_OUT, 8, b"\xaa" * 512, queue=0)  # (its notify reached no daemon)
        second = sc.successor(shadow_path(guest, path, 2))
        await second.start(saved, kept=kept)
        await guest.completed(second, {0, 1})
        assert guest.status(0, 512) == 0 and guest.status(1, 512) == 0
        assert guest.read_back(0, 512) == b"\x5a" * 512, "the read's bytes were overwritten in the bounce pool"
        assert backend.requests[VIRTIO_BLK_T_IN] == 1 and bytes(backend.disk[8 * 512 : 9 * 512]) == b"\xaa" * 512
