"""Faults injected under a running guest (issue 10), on the shadow data path with real
qemu-storage-daemon back-ends, over the simulated Xen host:

* the back-end SIGKILLed again and again under QD 8 block I/O (:mod:`xen_vhost_sim.tools.faultbench`,
  bounded here; ``python -m xen_vhost_sim.tools.faultbench --kills 100`` for the figure);
* the same with this library's back-end process on the zero-copy path, completing out of order
  on purpose, with inflight I/O tracking (INFLIGHT_SHMFD) — and, as a control, without it, where
  the restart at the used index is caught repeating or losing a request
  (``--backend python`` for the 100-kill figure); the device's inflight area life cycle and
  back-ends that answer GET/SET_INFLIGHT_FD badly;
* a back-end that stops answering (SIGSTOP): the daemon's request times out, the device goes to
  DEVICE_NEEDS_RESET, a reconnect follows once the back-end answers again (SIGCONT), and the
  guest's other device goes on all along;
* a connection lost to an error the library says no reconnect cures: the device fails at once;
* the guest destroyed mid-I/O under the daemon as a program: it cleans up and exits 0;
* malformed and half-removed xenstore device entries: logged, skipped, the others served.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vhost_user import AsyncFrontend, FrontendRequest
from vhost_user.inflight import region_size
from vhost_user.testing import RamDiskBlk, connected_pair
from vhost_user.wire import Inflight
from tests.daemon.mmio_driver import bring_up
from tests.peers import programs
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.errors import GuestFault
from xen_vhost_sim.tools.faultbench import QsdProcess, kill_loop
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.virtio_mmio import Reg
from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import DeviceStatus, GuestDriverError, GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_master.xen.xenstore import XenstoreClient

TIMEOUT = 20.0
BIN = Path(sys.executable).parent


# --- the back-end SIGKILLed under I/O ---------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_qsd_sigkilled_5_times_under_qd8_writes_every_request_completes_once_no_data_lost(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path):
    programs.require("qemu-storage-daemon")  # QsdProcess looks it up in PATH
    figures = await asyncio.wait_for(
        kill_loop(kernel, sim_control, sim_host.path, str(tmp_path), kills=5, depth=8, seed=3), 50)
    assert figures.kills == figures.reconnects == 5
    assert figures.requests >= 5 * 8 and figures.requests % 8 == 0
    # each kill landed with chains in flight, which were published again on the new ring
    assert figures.resubmitted > 0
    assert figures.chains == figures.completed  # nothing completed twice, nothing dropped
    assert figures.data_lost == 0 and figures.completed_twice == 0 and figures.ok


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_out_of_order_python_backend_sigkilled_6_times_zero_copy_with_inflight_every_request_once(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path):
    figures = await asyncio.wait_for(
        kill_loop(kernel, sim_control, sim_host.path, str(tmp_path), kills=6, depth=8, seed=3, backend="python",
                  request_timeout=10.0), 50)
    assert figures.inflight and figures.data_path == "zero copy"
    assert figures.kills == figures.reconnects == 6
    assert figures.requests >= 8 and figures.requests % 8 == 0
    # kills landed with chains in flight (held out of order), which the new back-ends resubmitted
    assert figures.resubmitted > 0
    assert figures.data_lost == 0 and figures.completed_twice == 0 and not figures.failure and figures.ok


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_same_run_with_inflight_masked_is_caught_losing_or_repeating_a_request(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path):
    """The control: without INFLIGHT_SHMFD the daemon restarts the ring at the guest's used index,
    which an out-of-order back-end's death makes wrong. The run must notice (so the test above can
    fail): the guest driver sees a head completed twice, a request times out, or data is wrong."""
    figures = await asyncio.wait_for(
        kill_loop(kernel, sim_control, sim_host.path, str(tmp_path), kills=10, depth=8, seed=3, backend="python",
                  inflight=False, request_timeout=3.0), 50)
    assert not figures.inflight
    assert not figures.ok
    assert figures.failure or figures.data_lost, figures


# --- the device's inflight area (no simulator: a RAM-disk back-end over a socketpair) -------------

RAM_BASE, RAM_SIZE = 0x4000_0000, 1 << 20


async def _ready(fe):  # type: ignore[no-untyped-def]
    return fe


async def _bring_up(device: Device) -> None:
    """A driver's bring-up of queue 0 (64 entries) by register writes."""
    await bring_up(device, (RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000), 64)


@contextlib.asynccontextmanager
async def ramdisk_device(memfd: int, *, direct: bool = True):  # type: ignore[no-untyped-def]
    async with connected_pair(RamDiskBlk(1 << 20)) as (fe, server):
        memory = FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)])
        if not direct:
            memory.direct = False  # stands in for a copying data path
        device = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1),
                        connect=lambda: _ready(fe), memory=memory, set_irq=lambda level: None,
                        log=device_logger("xvm.test.inflight", 1, "blk0"))
        await device.start()
        try:
            yield device, server
        finally:
            await device.close()


@pytest.fixture
def ram_memfd():  # type: ignore[no-untyped-def]
    fd = os.memfd_create("inflight-test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_SIZE)
    yield fd
    os.close(fd)


@pytest.mark.asyncio
async def test_zero_copy_device_gets_one_inflight_area_shares_it_and_drops_it_on_guest_reset(no_fd_leak, ram_memfd):
    async with asyncio.timeout(TIMEOUT), ramdisk_device(ram_memfd) as (device, server):
        await _bring_up(device)
        area = device.inflight
        assert area is not None and area.mmap_size == region_size(1, 64) and (area.num_queues, area.queue_size) == (1, 64)
        # the back-end maps the area we handed back (SET_INFLIGHT_FD), before the ring started
        assert server.inflight is not None and server.vrings[0].inflight is not None and server.vrings[0].started
        inode = os.fstat(area.fd).st_ino
        result = device.mmio(Reg.STATUS, 4, True, 0)  # the driver resets the device
        if result is not None:
            await result
        assert device.inflight is None  # nothing in flight any more: the area is dropped
        await _bring_up(device)
        assert device.inflight is not None and os.fstat(device.inflight.fd).st_ino != inode  # a fresh one


@pytest.mark.asyncio
async def test_copying_data_path_does_not_use_inflight(no_fd_leak, ram_memfd):
    async with asyncio.timeout(TIMEOUT), ramdisk_device(ram_memfd, direct=False) as (device, server):
        await _bring_up(device)
        assert device.model.active and device.inflight is None and server.inflight is None


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["wrong-shape", "short-fd", "size-0", "set-refused"])
async def test_backend_answering_inflight_requests_badly_is_logged_and_the_device_carries_on(
        no_fd_leak, ram_memfd, caplog, bad):
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(TIMEOUT), ramdisk_device(ram_memfd) as (device, server):
        def bad_get(ev):  # type: ignore[no-untyped-def]
            fd = os.memfd_create("bad-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096 if bad == "short-fd" else 1 << 16)
            size = {"short-fd": 1 << 16, "size-0": 0}.get(bad, 4096)
            qsize = 32 if bad == "wrong-shape" else ev.payload.queue_size
            return Inflight(mmap_size=size, mmap_offset=0, num_queues=1, queue_size=qsize, padding=0), (fd,)

        if bad == "set-refused":
            server._handlers[FrontendRequest.SET_INFLIGHT_FD] = lambda ev: (os.close(ev.fds[0]), False)[1]
        else:
            server._handlers[FrontendRequest.GET_INFLIGHT_FD] = bad_get
        await _bring_up(device)
        assert device.model.active and device.stats.starts == 1  # started, no NEEDS_RESET
        assert not device.frontend.broken
        assert any("INFLIGHT_FD" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        if bad != "set-refused":
            assert device.inflight is None  # the unusable answer was not kept (and its fd closed)


# --- a back-end that stops answering ----------------------------------------------------------------


class TwoDisks:
    """The daemon's pieces for one guest with two virtio-blk devices on the shadow path, one
    IOREQ server, each device on its own qemu-storage-daemon."""

    BASES, IRQS = (0x0200_0000, 0x0200_0200), (33, 34)

    def __init__(self, kernel, control: SimControl, domid: int, socks: list[str], request_timeout: float) -> None:
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test.faults", domid, "blk")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        banks = [(int(a), int(b)) for a, b in control.domain_info(domid)["banks"]]
        self.guest_mem = ForeignGuestMemory(self.privcmd, domid, banks)
        self.shadows, self.devices = [], []
        for i, sock in enumerate(socks):
            shadow = ShadowDataPath(self.guest_mem, banks, pool_size=4 << 20, max_queues=1, max_queue_size=256, log=self.log)
            cfg = DeviceConfig(devid=i, device_id=2, base=self.BASES[i], irq=self.IRQS[i], socket=sock)
            self.shadows.append(shadow)
            self.devices.append(Device(
                cfg, connect=lambda s=sock: AsyncFrontend.connect(s, timeout=request_timeout), memory=shadow,
                set_irq=lambda level, irq=cfg.irq: self.ioreq.set_irq(irq, level), log=self.log))

    async def start(self) -> None:
        self.ioreq.create()
        for d in self.devices:
            await asyncio.wait_for(d.start(), TIMEOUT)
            self.ioreq.add_window(d.config.base, 0x200, d)
        self.ioreq.enable()

    async def close(self) -> None:
        await self.ioreq.close()
        for d in self.devices:
            await d.close()
        for s in self.shadows:
            s.close()
        self.guest_mem.close()
        self.evtchn.close()
        self.privcmd.close()

async def _tear_down(procs, guest, daemon, *, stopped: bool) -> None:  # type: ignore[no-untyped-def]
    """Let a stopped back-end go on, close the guest, then the daemon, then the back-ends (each
    step even if the one before failed)."""
    if stopped:
        procs[0].signal(signal.SIGCONT)
    try:
        if guest is not None:
            gc.collect()  # the drivers' views of guest RAM
            guest.close()
    finally:
        try:
            if daemon is not None:
                await daemon.close()
        finally:
            for q in procs:
                q.stop()



@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_backend_that_stops_answering_times_out_needs_reset_then_reconnects_other_disk_unaffected(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path, caplog):
    """qsd A is SIGSTOPped between two driver sessions: at the guest's DRIVER_OK the daemon's first
    request to it times out (1 s here), the device shows DEVICE_NEEDS_RESET and a reconnect starts.
    Meanwhile disk B, on the other vCPU, keeps serving I/O. After SIGCONT the reconnect succeeds,
    the driver resets and re-initialises disk A, and its data is intact."""
    programs.require("qemu-storage-daemon")  # QsdProcess looks it up in PATH
    caplog.set_level(logging.INFO)
    procs = []
    for name in ("a", "b"):
        image = tmp_path / f"{name}.raw"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        q = QsdProcess(str(image), str(tmp_path / f"{name}.sock"), str(tmp_path / f"{name}.log"))
        procs.append(q)
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=2)
    daemon = guest = None
    stopped = False
    try:
        for q in procs:
            q.start()
            await q.wait_listening()
        daemon = TwoDisks(kernel, sim_control, domid, [q.sock for q in procs], request_timeout=1.0)
        await daemon.start()
        guest = await SimGuest.connect(sim_host.path, domid)
        alloc = GuestPageAllocator(guest.ram)
        blk_a = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), TIMEOUT)
        blk_b = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[1], 34, alloc, vcpu=1), TIMEOUT)
        rng = random.Random(9)
        before = rng.randbytes(64 << 10)
        await asyncio.wait_for(blk_a.write(100, before), TIMEOUT)
        await asyncio.wait_for(blk_a.close(), TIMEOUT)  # the driver resets disk A: the back-end idles

        procs[0].signal(signal.SIGSTOP)
        stopped = True
        dev_a = daemon.devices[0]
        # The driver brings disk A up again: DRIVER_OK makes the daemon talk to the stopped back-end.
        attach = asyncio.ensure_future(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0))
        # Disk B, on the other vCPU, is served while vCPU 0 waits for disk A's back-end.
        served_b = 0
        while not attach.done():  # (1,400-1,600 rounds on an idle machine: round the disk, not off its end)
            data = rng.randbytes(4096)
            sector = 8 * (served_b % (blk_b.capacity // 8))
            await asyncio.wait_for(blk_b.write(sector, data), TIMEOUT)
            assert await asyncio.wait_for(blk_b.read(sector, 8), TIMEOUT) == data
            served_b += 1
        assert served_b >= 3, "disk B stalled while disk A's back-end did not answer"
        stale = None
        try:
            stale = await attach  # DRIVER_OK is accepted; the device then says it needs a reset
        except GuestDriverError:
            pass  # (or the driver saw NEEDS_RESET at once)
        if dev_a.starting is not None:  # DRIVER_OK is answered within START_WAIT; the start goes on
            await asyncio.wait_for(asyncio.shield(dev_a.starting), TIMEOUT)
        status = await asyncio.wait_for(guest.mmio_read(TwoDisks.BASES[0] + 0x70, 4, vcpu=0), TIMEOUT)
        assert status & DeviceStatus.DEVICE_NEEDS_RESET, hex(status)
        assert dev_a.reconnecting is not None  # and the daemon is trying to get the back-end back
        assert any("did not answer" in r.getMessage() and "SET_FEATURES" in r.getMessage()
                   for r in caplog.records if r.levelno >= logging.WARNING), [r.getMessage() for r in caplog.records]

        procs[0].signal(signal.SIGCONT)
        stopped = False
        await asyncio.wait_for(asyncio.shield(dev_a.reconnecting), TIMEOUT)
        assert dev_a.stats.reconnects == 1 and not dev_a.frontend.broken
        assert any("back-end reconnected" in r.getMessage() for r in caplog.records)

        # The guest's driver resets the device and starts over: disk A works, its data is there.
        if stale is not None:
            await asyncio.wait_for(stale.close(), TIMEOUT)
        blk_a = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), TIMEOUT)
        assert await asyncio.wait_for(blk_a.read(100, len(before) // 512), TIMEOUT) == before
        after = rng.randbytes(8192)
        await asyncio.wait_for(blk_a.write(300, after), TIMEOUT)
        assert await asyncio.wait_for(blk_a.read(300, 16), TIMEOUT) == after
        other = daemon.devices[1].stats
        assert other.reconnects == 0 and not other.last_error and other.guest_errors == 0
        await asyncio.wait_for(blk_a.close(), TIMEOUT)
        await asyncio.wait_for(blk_b.close(), TIMEOUT)
    finally:
        await _tear_down(procs, guest, daemon, stopped=stopped)


# --- the daemon as a program: guest destroyed mid-I/O, malformed xenstore entries -----------------

DOMID = 7
BE = f"/local/domain/0/backend/virtio/{DOMID}"


class CliDaemon:
    """``xen-vhost-master --domid 7`` in its own process on the in-process simulated host, its
    stderr collected, READY=1 awaited on a real NOTIFY_SOCKET."""

    def __init__(self, sim_path: str, tmp: Path, runtime: Path) -> None:
        import socket

        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.notify.setblocking(False)
        self.log_path = tmp / "daemon.log"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)],
                env=dict(os.environ, XEN_VHOST_SIM=sim_path, NOTIFY_SOCKET=str(tmp / "notify")),
                stdout=subprocess.DEVNULL, stderr=err)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            while not (await loop.sock_recv(self.notify, 4096)).startswith(b"READY=1"):
                pass

    async def exit_code(self) -> int:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {TIMEOUT} s on:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()


async def qd8_writer(blk: VirtioBlk, progress: asyncio.Event, counter: list[int]) -> None:
    """Batches of 8 writes until the guest's machine goes away under it."""
    rng = random.Random(4)
    while True:
        await blk.batch([BlkOp("write", 8 * rng.randrange(2000), data=rng.randbytes(4096)) for _ in range(8)])
        counter[0] += 8
        if counter[0] >= 160:
            progress.set()


def in_daemon_thread(fn, *args) -> asyncio.Future:
    """``fn(*args)`` on a daemon thread (a blocked call cannot hold up the loop's shutdown)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result=None, exc=None) -> None:
        if not fut.done():
            fut.set_result(result) if exc is None else fut.set_exception(exc)

    def run() -> None:
        try:
            result = fn(*args)
        except Exception as e:  # handed to the awaiting test as is
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=run, daemon=True).start()
    return fut


async def stop_writer(writer: asyncio.Task[None]) -> None:
    """Cancel until it ends: ``VirtioBlk.batch`` takes a cancellation as one request's failure and
    goes on waiting for the others (each up to the driver's timeout) before it raises."""
    async with asyncio.timeout(TIMEOUT):
        while not writer.done():
            writer.cancel()
            await asyncio.wait([writer], timeout=0.1)
    if not writer.cancelled():
        writer.exception()  # retrieved: a failed batch after the domain went is expected


@pytest.mark.peer
@pytest.mark.parametrize("how", ["xl_destroy", "destroy_domain"])
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_guest_destroyed_mid_io_daemon_cleans_up_and_exits_0(sim_host, sim_control, peers, tmp_path, how):
    """The guest runs QD 8 writes through the daemon (shadow path, qemu-storage-daemon) when it is
    destroyed, the libxl way (Closing, wait for Closed, remove, destroy) or abruptly. The daemon
    answers Closed in time, tears down, exits 0, leaves no IOREQ server, state file or status
    socket behind, and the back-end lives on for the next front-end."""
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, name="victim")
    sim_control.add_virtio_device(DOMID, device_id=2, base=0x2000000, irq=33, devid=0)
    disk = peers.qsd_raw(size=8 << 20)
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "0.sock").symlink_to(disk.sock)
    daemon = CliDaemon(sim_host.path, tmp_path, runtime)
    guest = writer = blk = None
    try:
        await daemon.ready()
        guest = await SimGuest.connect(sim_host.path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        progress, counter = asyncio.Event(), [0]
        writer = asyncio.ensure_future(qd8_writer(blk, progress, counter))
        await asyncio.wait_for(progress.wait(), TIMEOUT)  # I/O is flowing
        assert not writer.done()
        if how == "xl_destroy":
            answered = await asyncio.get_running_loop().run_in_executor(None, sim_control.xl_destroy, DOMID)
            assert answered == {f"{BE}/0": True}, daemon.log()  # Closed in time: no 10 s libxl timeout
        else:  # abrupt; on its own connection and a daemon thread (bounded even if the host never answered)
            with SimControl(sim_host.path) as ctl:
                await asyncio.wait_for(in_daemon_thread(ctl.destroy_domain, DOMID), TIMEOUT)
        assert await daemon.exit_code() == 0, daemon.log()
        log = daemon.log()
        assert "Traceback" not in log, log
        assert not (runtime / "state.json").exists() and not (runtime / "status.sock").exists()
        with pytest.raises(Exception):
            sim_control.domain_info(DOMID)  # gone, IOREQ server with it
        assert disk.process.exit_status() is None  # qemu-storage-daemon serves the next front-end
        assert counter[0] >= 160
    finally:
        if writer is not None:
            await stop_writer(writer)
            writer = None  # (its traceback holds the driver's views of guest RAM)
        if blk is not None:  # the reset cannot reach a destroyed machine; the rings are freed anyway
            with contextlib.suppress(GuestDriverError, OSError):
                await asyncio.wait_for(blk.close(), TIMEOUT)
        if guest is not None:
            gc.collect()
            guest.close()
        daemon.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_malformed_and_half_removed_xenstore_devices_are_logged_and_skipped_others_served(
        sim_host, sim_control, kernel, peers, tmp_path):
    """Next to a good device: a device whose base is "banana", one whose irq was removed, one
    under a non-numeric devid, and (hot-added while the daemon runs) one with an irq out of
    range. Each is logged and skipped; the good device is served throughout; SIGTERM → exit 0."""
    from tests.daemon.test_daemon_cli import io_check

    sim_control.create_domain(DOMID, mem_bytes=64 << 20, name="odd")
    sim_control.add_virtio_device(DOMID, device_id=2, base=0x2000000, irq=33, devid=0)
    sim_control.add_virtio_device(DOMID, device_id=2, base=0x2000200, irq=34, devid=1)
    sim_control.add_virtio_device(DOMID, device_id=2, base=0x2000400, irq=35, devid=2)
    disk = peers.qsd_raw(size=8 << 20)
    runtime = tmp_path / "run"
    runtime.mkdir()
    for devid in range(4):  # a back-end socket for each, so only xenstore can be the reason
        (runtime / f"{devid}.sock").symlink_to(disk.sock)
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    daemon = guest = None
    try:
        await xs.write(f"{BE}/1/base", "banana")
        await xs.rm(f"{BE}/2/irq")
        good_type = await xs.read_str(f"{BE}/0/type")
        for key, value in (("type", good_type), ("base", "0x2000600"), ("irq", "36"), ("transport", "mmio"),
                           ("online", "1"), ("state", "1")):
            await xs.write(f"{BE}/xvdz/{key}", value)
        daemon = CliDaemon(sim_host.path, tmp_path, runtime)
        await daemon.ready()
        log = daemon.log()
        skipped = [line for line in log.splitlines() if "skipping device" in line]
        assert len(skipped) == 3, log
        assert any("banana" in line for line in skipped) and any("xvdz" in line for line in skipped)
        assert any("irq" in line for line in skipped if "banana" not in line and "xvdz" not in line)
        assert await xs.read_str(f"{BE}/0/state") == "2"  # the good one: InitWait
        for devid in ("1", "2", "xvdz"):
            assert await xs.read_str(f"{BE}/{devid}/state") == "1"  # untouched

        guest = await SimGuest.connect(sim_host.path, DOMID)
        assert await asyncio.wait_for(guest.mmio_read(0x2000200, 4), TIMEOUT) == 0xFFFFFFFF  # no device there
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, disk.image, 11)

        # A malformed device hot-added while the guest runs: logged, skipped, device 0 goes on.
        for key, value in (("type", good_type), ("base", "0x2000800"), ("irq", "99999999999"),
                           ("transport", "mmio"), ("online", "1"), ("state", "1")):
            await xs.write(f"{BE}/3/{key}", value)
        async with asyncio.timeout(TIMEOUT):
            while "skipping device: xenstore backend/virtio/3:" not in daemon.log():
                await io_check(blk, disk.image, 12)  # (and I/O goes on meanwhile)
        assert await xs.read_str(f"{BE}/3/state") == "1"
        await io_check(blk, disk.image, 13)
        await asyncio.wait_for(blk.close(), TIMEOUT)
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        if guest is not None:
            gc.collect()
            guest.close()
        if daemon is not None:
            daemon.close()
        await xs.close()


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_backend_stopped_with_a_request_in_flight_guest_reset_times_out_then_reconnects(
        no_fd_leak, sim_host, sim_control, kernel, tmp_path, caplog):
    """qsd A is SIGSTOPped with a write in flight: the guest's request times out (its driver's
    business), the driver resets the device, the reset completes for the vCPU without waiting for
    the back-end (device.RESET_WAIT), the daemon's request to stop the ring (1 s here) times out
    and a reconnect starts; disk B is served throughout. After SIGCONT: reconnected, and disk A
    works again."""
    programs.require("qemu-storage-daemon")  # QsdProcess looks it up in PATH
    from xen_vhost_sim.guest_driver import GuestTimeout

    caplog.set_level(logging.INFO)
    procs = []
    for name in ("a", "b"):
        image = tmp_path / f"{name}.raw"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        procs.append(QsdProcess(str(image), str(tmp_path / f"{name}.sock"), str(tmp_path / f"{name}.log")))
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=2)
    daemon = guest = None
    stopped = False
    try:
        for q in procs:
            q.start()
            await q.wait_listening()
        daemon = TwoDisks(kernel, sim_control, domid, [q.sock for q in procs], request_timeout=1.0)
        await daemon.start()
        guest = await SimGuest.connect(sim_host.path, domid)
        alloc = GuestPageAllocator(guest.ram)
        blk_a = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), TIMEOUT)
        blk_b = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[1], 34, alloc, vcpu=1), TIMEOUT)
        rng = random.Random(21)
        await asyncio.wait_for(blk_a.write(0, rng.randbytes(4096)), TIMEOUT)
        dev_a = daemon.devices[0]

        procs[0].signal(signal.SIGSTOP)
        stopped = True
        blk_a.driver.mmio_timeout = 1.0  # the guest gives up on the request after 1 s
        with pytest.raises(GuestTimeout):
            await blk_a.write(8, rng.randbytes(4096))
        assert daemon.shadows[0].inflight(0) == 1  # published, never completed by the stopped back-end

        blk_a.driver.mmio_timeout = TIMEOUT  # (a register access may take as long as the daemon's timeout)
        reset = asyncio.ensure_future(blk_a.close())  # vCPU 0 is answered; the stop goes on alone
        served_b = 0
        while not reset.done() or dev_a.reconnecting is None:
            data = rng.randbytes(4096)
            sector = 8 * served_b % blk_b.capacity  # (a fast machine goes round disk B more than once meanwhile)
            await asyncio.wait_for(blk_b.write(sector, data), TIMEOUT)
            assert await asyncio.wait_for(blk_b.read(sector, 8), TIMEOUT) == data
            served_b += 1
        assert served_b >= 3, "disk B stalled while disk A's back-end was given up on"
        await reset  # Status read back 0: the reset completed
        assert any("did not answer" in r.getMessage() and "VRING" in r.getMessage()  # (SET_VRING_ENABLE 0 comes first)
                   for r in caplog.records if r.levelno >= logging.WARNING)
        assert dev_a.reconnecting is not None

        procs[0].signal(signal.SIGCONT)
        stopped = False
        await asyncio.wait_for(asyncio.shield(dev_a.reconnecting), TIMEOUT)
        assert dev_a.stats.reconnects == 1 and not dev_a.frontend.broken
        blk_a = await asyncio.wait_for(VirtioBlk.attach(guest, TwoDisks.BASES[0], 33, alloc, vcpu=0), TIMEOUT)
        after = rng.randbytes(16384)
        await asyncio.wait_for(blk_a.write(64, after), TIMEOUT)
        assert await asyncio.wait_for(blk_a.read(64, 32), TIMEOUT) == after
        with open(procs[0].image, "rb") as f:
            f.seek(64 * 512)
            assert f.read(len(after)) == after
        other = daemon.devices[1].stats
        assert other.reconnects == 0 and not other.last_error and other.guest_errors == 0
        await asyncio.wait_for(blk_a.close(), TIMEOUT)
        await asyncio.wait_for(blk_b.close(), TIMEOUT)
    finally:
        await _tear_down(procs, guest, daemon, stopped=stopped)


@pytest.mark.asyncio
async def test_guest_fault_while_resuming_a_backend_needs_reset_not_a_dead_task(no_fd_leak, ram_memfd, caplog):
    """Resuming a zero-copy ring reads the guest's used index; a guest that made it unreadable
    (a revoked ring grant) gets DEVICE_NEEDS_RESET and a logged reason, and the device lives on."""
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(TIMEOUT), ramdisk_device(ram_memfd) as (device, server):
        await _bring_up(device)
        assert device.model.active

        async def resume_reads_a_revoked_ring() -> None:
            raise GuestFault(RAM_BASE + 0x2000, "cannot read the used index to resume: grant revoked")

        await device._guarded(resume_reads_a_revoked_ring())  # noqa: SLF001 (the path every resume takes)
        assert device.model.status & 0x40  # DEVICE_NEEDS_RESET
        assert "grant revoked" in device.stats.last_error
        assert "guest: fault while starting the back-end" in caplog.text
        result = device.mmio(Reg.STATUS, 4, True, 0)  # the driver resets: the device is usable again
        if result is not None:
            await result
        await _bring_up(device)
        assert device.model.active


@pytest.mark.asyncio
async def test_a_connection_lost_to_an_error_the_library_says_no_reconnect_cures_fails_the_device_at_once(
        no_fd_leak, ram_memfd, caplog):
    """The library classifies each error (``VhostUserError.reconnect``). A back-end that talks out
    of turn while no request is in flight breaks the connection with an error it marks as not
    worth reconnecting: the device goes to DEVICE_NEEDS_RESET with the reason logged, and no
    reconnect loop starts (the back-end is not contacted again)."""
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(TIMEOUT), connected_pair(RamDiskBlk(1 << 20)) as (fe, server):
        connects = 0

        async def connect() -> AsyncFrontend:
            nonlocal connects
            connects += 1
            return fe

        device = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1),
                        connect=connect, memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, ram_memfd)]),
                        set_irq=lambda level: None, log=device_logger("xvm.test.reconnect", 1, "blk0"))
        await device.start()
        try:
            await _bring_up(device)
            assert device.model.active and connects == 1
            await server.sock.send(bytes(12), [])  # a header nobody asked for
            await fe.lost.wait()  # (the device heard of it first: on_lost runs as the connection breaks)
            assert not fe.error.reconnect  # the library's verdict
            assert device.reconnecting is None  # no retry loop
            assert device.model.status & 0x40  # DEVICE_NEEDS_RESET
            assert any("not reconnecting" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
            assert connects == 1 and device.stats.reconnects == 0 and device.reconnecting is None
        finally:
            await device.close()
