"""A back-end that is not there yet (issue 13): the daemon claims the guest's windows, writes XenBus
InitWait and says READY=1 before it contacts any back-end; a device whose back-end is missing is
*waiting* (shown in ``status`` and ``STATUS=``, tried again with backoff), a guest access to it
holds the vCPU until the back-end appears, and it is served the moment it does.

The daemon (:class:`~xen_vhost_master.supervisor.Supervisor`) runs in the test's event loop over
the in-process simulated host, with the project's RAM-disk back-end (``vhost_user.testing``)
started when each test wants it; the guest is the simulator's virtio-mmio driver. The last test
runs the daemon as a program: killed and restarted while its back-end is gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from vhost_user import FdSocket, UnixListener
from vhost_user.aio.server import BackendServer, serve_unix
from vhost_user.testing import RamDiskBlk

from tests.conftest import open_fds
from xen_vhost_master.config import DeviceConfig, MemoryMode
from xen_vhost_master.platform import Platform
from xen_vhost_master.sd_notify import Notifier
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator
from xen_vhost_master.supervisor import Options, Supervisor
from xen_vhost_master.xen.xenstore import XenstoreClient

DOMID = 7
BE = f"/local/domain/0/backend/virtio/{DOMID}"
BASES, IRQS = (0x0200_0000, 0x0200_0200), (33, 34)
DEVICE_ID, MAGIC = 0x008, 0x000  # virtio-mmio registers
TIMEOUT = 20.0
BIN = Path(sys.executable).parent


class Notes(Notifier):
    """What the daemon tells systemd, recorded."""

    def __init__(self) -> None:
        super().__init__(environ={})
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def notify(self, **fields: str | int) -> None:
        self.messages.append(fields)
        self._changed.set()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], after: int = 0) -> dict[str, Any]:
        """The first message from index ``after`` on that ``pred`` accepts."""
        async with asyncio.timeout(TIMEOUT):
            seen = after
            while True:
                for m in self.messages[seen:]:
                    if pred(m):
                        return m
                seen = len(self.messages)
                self._changed.clear()
                await self._changed.wait()

    async def status_says(self, text: str, after: int = 0) -> dict[str, Any]:
        return await self.wait(lambda m: text in str(m.get("STATUS", "")), after)


class LogWatch(logging.Handler):
    """The daemon's log lines (``xen_vhost_master``), awaitable."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._loop.call_soon_threadsafe(self._changed.set)  # (the simulated host logs from its thread)

    async def wait_for(self, pred: Callable[[str], bool]) -> str:
        async with asyncio.timeout(TIMEOUT):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def logwatch() -> Any:
    logger = logging.getLogger("xen_vhost_master")
    level = logger.level

    @contextlib.contextmanager
    def attach() -> Any:
        watch = LogWatch()
        logger.addHandler(watch)
        logger.setLevel(logging.DEBUG)
        try:
            yield watch
        finally:
            logger.removeHandler(watch)
            logger.setLevel(level)

    return attach


class Backend:
    """The project's RAM-disk virtio-blk back-end listening at ``path``, in this event loop."""

    def __init__(self, path: str, size: int = 8 << 20) -> None:
        self.path = path
        self.disk = bytearray(size)
        self.task: asyncio.Future[None] | None = None

    def _device(self) -> RamDiskBlk:
        dev = RamDiskBlk(len(self.disk))
        dev.disk = self.disk  # one disk across connections
        return dev

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.ensure_future(serve_unix(self._device, self.path, ready=ready.set))
        await asyncio.wait_for(ready.wait(), TIMEOUT)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class Daemon:
    """The supervisor in this event loop; ``stop()`` is what SIGTERM does."""

    def __init__(self, platform: Platform, options: Options, handed: dict[str, int] | None = None) -> None:
        self.notes = Notes()
        self.sup = Supervisor(options, platform, notifier=self.notes, handed=handed)
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> dict[str, Any]:
        self.task = asyncio.ensure_future(self.sup.run())
        return await self.notes.wait(lambda m: m.get("READY") == 1)

    async def stop(self) -> int:
        assert self.task is not None
        self.sup.stop()
        return await asyncio.wait_for(self.task, TIMEOUT)

    def device(self, devid: int) -> dict[str, Any]:
        (d,) = [d for d in self.sup.status()["devices"] if d["devid"] == devid]
        return d


@contextlib.asynccontextmanager
async def running(platform: Platform, options: Options, handed: dict[str, int] | None = None) -> AsyncIterator[Daemon]:
    daemon = Daemon(platform, options, handed)
    await daemon.start()
    try:
        yield daemon
    finally:
        if not daemon.task.done():  # type: ignore[union-attr]
            assert await daemon.stop() == 0


def guest_domain(ctl: SimControl, devices: int = 1) -> None:
    ctl.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, name="late")
    for devid in range(devices):
        ctl.add_virtio_device(DOMID, device_id=2, base=BASES[devid], irq=IRQS[devid], devid=devid)


async def io_check(blk: VirtioBlk, backend: Backend, seed: int) -> None:
    data = random.Random(seed).randbytes(128 << 10)
    await asyncio.wait_for(blk.write(64, data), TIMEOUT)
    assert await asyncio.wait_for(blk.read(64, len(data) // 512), TIMEOUT) == data
    assert bytes(backend.disk[64 * 512:64 * 512 + len(data)]) == data  # it reached the back-end's disk


@contextlib.asynccontextmanager
async def guest_of(sim_host: Any) -> AsyncIterator[SimGuest]:
    guest = await SimGuest.connect(sim_host.path, DOMID)
    try:
        yield guest
    finally:
        guest.close()


@contextlib.asynccontextmanager
async def xenstore(kernel: Any) -> AsyncIterator[XenstoreClient]:
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    try:
        yield xs
    finally:
        await xs.close()


async def wait_value(xs: XenstoreClient, path: str, value: str) -> None:
    async with await xs.watch(path) as w:
        async with asyncio.timeout(TIMEOUT):
            async for _ in w:
                if await xs.read_str(path) == value:
                    return


@pytest.mark.asyncio
async def test_a_backend_that_is_there_but_has_not_answered_yet_is_connecting_not_waiting(
        platform, sim_host, sim_control, sim_dir):
    """The usual start: the back-end's socket is there and takes the connection, but has not
    answered yet (here: it never accepts, so negotiation is pending). ``status`` and ``STATUS=``
    say connecting, not waiting: nothing is missing yet."""
    guest_domain(sim_control)
    sock = os.path.join(sim_dir, "0.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(sock)
        listening.listen(4)
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
            ready = next(m for m in daemon.notes.messages if "READY" in m)
            assert ready["STATUS"] == f"dom{DOMID}: 0 device(s) serving, 0 waiting, 1 connecting"
            assert daemon.device(0)["backend"] == "connecting"


# --- (a) READY without the back-end; the back-end appears; the guest's driver does I/O -------------


@pytest.mark.asyncio
async def test_ready_and_initwait_come_without_the_backend_which_is_served_once_it_appears(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    guest_domain(sim_control)
    sock = os.path.join(sim_dir, "0.sock")
    backend = Backend(sock)
    with logwatch() as log:
        async with xenstore(kernel) as xs, running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
            ready = next(m for m in daemon.notes.messages if "READY" in m)
            # READY comes before the back-end answers; its first try failed already (no socket)
            assert ready["READY"] == 1 and ready["STATUS"] == (f"dom{DOMID}: 0 device(s) serving, 1 waiting; "
                                                               f"waiting for back-end {sock} (attempt 1)")
            # what start-up did before, step by step
            steps = [m["STATUS"] for m in daemon.notes.messages[:daemon.notes.messages.index(ready)]]
            assert steps[:4] == [f"dom{DOMID}: creating the IOREQ server",
                                 f"dom{DOMID}: reading the guest's devices from xenstore",
                                 f"dom{DOMID}: claiming windows of 1 device(s)",
                                 f"dom{DOMID}: enabling the IOREQ server"]
            assert await xs.read_str(f"{BE}/0/state") == "2"  # InitWait: `xl create` goes on
            await log.wait_for(lambda line: line == f"dom{DOMID}: serving: 0 device(s) serving, 1 waiting")  # one prefix
            await log.wait_for(lambda line: line == f"dom{DOMID}: device 0: waiting for back-end at {sock} "
                                                    "(No such file or directory)")
            await log.wait_for(lambda line: "device 0: back-end still not there after 3 tries" in line)
            await daemon.notes.status_says(f"; waiting for back-end {sock} (attempt 3)")
            d = daemon.device(0)
            assert (d["backend"], d["socket"], d["last_error"]) == ("waiting", sock, "No such file or directory")
            assert d["attempts"] >= 3 and d["data_path"] == "not chosen yet"

            mark = len(daemon.notes.messages)
            await backend.start()
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting", after=mark)
            d = daemon.device(0)
            assert (d["backend"], d["data_path"], d["last_error"]) == ("connected", "shadow", "")
            assert d["attempts"] >= 4
            async with guest_of(sim_host) as guest:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                             TIMEOUT)
                await io_check(blk, backend, 1)
                await asyncio.wait_for(blk.close(), TIMEOUT)
    await backend.stop()


# --- (b) a guest access while waiting blocks and completes with the right value ----------------------


@pytest.mark.asyncio
async def test_guest_access_while_waiting_holds_the_vcpu_until_the_backend_appears(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    with logwatch() as log:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon, guest_of(sim_host) as guest:
            device_id = asyncio.ensure_future(guest.mmio_read(BASES[0] + DEVICE_ID, 4, vcpu=1))
            await log.wait_for(lambda line: line.endswith(
                "guest vCPU 1 touched device 0 before its back-end was ready: holding it"))
            magic = asyncio.ensure_future(guest.mmio_read(BASES[0] + MAGIC, 4, vcpu=0))
            await log.wait_for(lambda line: "back-end still not there after 2 tries" in line)
            assert not device_id.done() and not magic.done()  # both vCPUs are held
            assert daemon.device(0)["backend"] == "waiting"
            await backend.start()
            assert await asyncio.wait_for(device_id, TIMEOUT) == 2  # virtio-blk
            assert await asyncio.wait_for(magic, TIMEOUT) == 0x74726976  # "virt"
            assert sum("before its back-end was ready" in line for line in log.lines) == 1  # said once
    await backend.stop()


# --- (c) two devices: the present one serves while the missing one waits -----------------------------


@pytest.mark.asyncio
async def test_present_backend_serves_io_while_the_other_device_waits_and_teardown_answers_its_vcpu(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir):
    guest_domain(sim_control, devices=2)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    daemon = Daemon(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock")))
    async with guest_of(sim_host) as guest:
        await daemon.start()
        try:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 1 waiting")
            held = asyncio.ensure_future(guest.mmio_read(BASES[1] + DEVICE_ID, 4, vcpu=1))
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram),
                                                          vcpu=0), TIMEOUT)
            await io_check(blk, backend, 2)  # on vCPU 0, while vCPU 1 waits for device 1
            assert not held.done()
            assert [daemon.device(i)["backend"] for i in (0, 1)] == ["connected", "waiting"]
            await asyncio.wait_for(blk.close(), TIMEOUT)
        finally:
            rc = await daemon.stop()
        assert rc == 0
        assert await asyncio.wait_for(held, TIMEOUT) == 0xFFFFFFFF  # the teardown answered the held vCPU
    await backend.stop()


# --- (d) a waiting device removed: nothing left behind --------------------------------------------


@pytest.mark.asyncio
async def test_waiting_device_hot_removed_cancels_its_retries_answers_its_vcpu_and_unmaps_the_window(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    guest_domain(sim_control)
    with logwatch() as log:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon, guest_of(sim_host) as guest:
            held = asyncio.ensure_future(guest.mmio_read(BASES[0] + DEVICE_ID, 4, vcpu=1))
            await log.wait_for(lambda line: "holding it" in line)
            await log.wait_for(lambda line: "back-end still not there after 2 tries" in line)
            before = open_fds()  # (between two tries: no socket of the device open)
            start = daemon.sup.devices[BASES[0]].start_task
            mark = len(daemon.notes.messages)
            # (on the fixture's connection: a new one would be the host's to close, in its own time)
            closed = await asyncio.get_running_loop().run_in_executor(None, lambda: sim_control.xl_detach_virtio_device(
                DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0))
            assert closed  # our Closed came in time
            assert await asyncio.wait_for(held, TIMEOUT) == 0xFFFFFFFF  # answered as no device
            assert start is not None and start.done()  # no more tries
            # (Closed comes before the window's grace: the device is gone once that is over)
            await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
            assert daemon.sup.status()["devices"] == []
            left = open_fds() - before
            assert not left, [os.readlink(f"/proc/self/fd/{fd}") for fd in left]
            served = daemon.sup.ioreq.stats.served
            refused = daemon.sup.ioreq.stats.refused
            assert await asyncio.wait_for(guest.mmio_read(BASES[0] + MAGIC, 4), TIMEOUT) == 0xFFFFFFFF
            # the simulated Xen answered it: the range is no longer ours
            assert (daemon.sup.ioreq.stats.served, daemon.sup.ioreq.stats.refused) == (served, refused)


@pytest.mark.asyncio
async def test_waiting_server_mode_device_torn_down_leaves_no_socket_file(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    """Server mode: we listen and the back-end connects. Waiting means listening; a teardown
    answers the held vCPU and removes the socket file."""
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, name="late")
    sock = os.path.join(sim_dir, "listen.sock")
    cfg = DeviceConfig(devid=0, device_id=2, base=BASES[0], irq=IRQS[0], socket=sock, listen=True)
    with logwatch() as log:
        daemon = Daemon(platform, Options(domid=DOMID, devices=(cfg,), xenstore=False))
        async with guest_of(sim_host) as guest:
            await daemon.start()
            try:
                await log.wait_for(lambda line: line.endswith(
                    f"device 0: waiting for back-end at {sock} (listening for it to connect)"))
                assert os.path.exists(sock)
                held = asyncio.ensure_future(guest.mmio_read(BASES[0] + DEVICE_ID, 4))
                await log.wait_for(lambda line: "holding it" in line)
                d = daemon.device(0)
                assert (d["backend"], d["mode"]) == ("waiting", "server")
            finally:
                rc = await daemon.stop()
            assert rc == 0
            assert await asyncio.wait_for(held, TIMEOUT) == 0xFFFFFFFF
            assert not os.path.exists(sock)


@pytest.mark.asyncio
async def test_server_mode_backend_connecting_late_is_served(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, name="late")
    sock = os.path.join(sim_dir, "listen.sock")
    cfg = DeviceConfig(devid=0, device_id=2, base=BASES[0], irq=IRQS[0], socket=sock, listen=True)
    disk = RamDiskBlk(8 << 20)
    with logwatch() as log:
        async with running(platform, Options(domid=DOMID, devices=(cfg,), xenstore=False)) as daemon, \
                guest_of(sim_host) as guest:
            held = asyncio.ensure_future(guest.mmio_read(BASES[0] + DEVICE_ID, 4))
            await log.wait_for(lambda line: "holding it" in line)
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            peer.setblocking(False)
            await asyncio.get_running_loop().sock_connect(peer, sock)  # the back-end connects to us
            server = asyncio.ensure_future(BackendServer(disk, FdSocket(peer)).run())
            try:
                assert await asyncio.wait_for(held, TIMEOUT) == 2
                assert daemon.device(0)["backend"] == "connected"
            finally:
                await daemon.stop()
                await asyncio.wait_for(asyncio.gather(server, return_exceptions=True), TIMEOUT)


# --- refused for good, and refused for now --------------------------------------------------------


@pytest.mark.asyncio
async def test_backend_refused_for_good_is_failed_closed_kept_in_status_and_reads_as_no_device(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir):
    """memory=xen-mmap with a back-end that lacks XEN_MMAP: the back-end answers but cannot serve
    the guest. The device is failed (not retried), its XenBus state Closed, it stays in status
    (a later xenstore event does not take it for a removal; libxl's detach does remove it), and
    the guest reads no device."""
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    async with xenstore(kernel) as xs, running(
            platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"), memory=MemoryMode.XEN_MMAP)) as daemon:
        await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting, 1 failed")
        await wait_value(xs, f"{BE}/0/state", "6")  # Closed
        d = daemon.device(0)
        assert d["backend"] == "failed" and "XEN_MMAP" in d["last_error"] and d["attempts"] == 1
        async with guest_of(sim_host) as guest:
            assert await asyncio.wait_for(guest.mmio_read(BASES[0] + MAGIC, 4), TIMEOUT) == 0xFFFFFFFF
        mark = len(daemon.notes.messages)
        await xs.write(f"{BE}/0/hotplug-status", "connected")  # any change below the backend directory
        await daemon.notes.status_says(f"dom{DOMID}:", after=mark)  # (the daemon looked at xenstore again)
        assert daemon.device(0)["backend"] == "failed"
        mark = len(daemon.notes.messages)
        closed = await asyncio.get_running_loop().run_in_executor(None, lambda: sim_control.xl_detach_virtio_device(
            DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0))
        assert closed
        await daemon.notes.wait(lambda m: m.get("STATUS") == f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
        assert daemon.sup.status()["devices"] == []  # a real removal still removes it
    await backend.stop()


@pytest.mark.asyncio
async def test_backend_that_drops_the_connection_during_negotiation_is_retried_until_one_answers(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):
    guest_domain(sim_control)
    sock = os.path.join(sim_dir, "0.sock")
    listener = UnixListener(sock)

    async def hang_up() -> None:
        while True:
            (await listener.accept(timeout=None)).close()

    rude = asyncio.ensure_future(hang_up())
    backend = Backend(sock)
    try:
        with logwatch() as log:
            async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon:
                line = await log.wait_for(lambda line: "device 0: waiting for back-end at" in line)
                assert "negotiation failed" in line
                await log.wait_for(lambda line: "back-end still not there after 3 tries" in line)
                assert daemon.device(0)["backend"] == "waiting"
                rude.cancel()
                await asyncio.gather(rude, return_exceptions=True)
                listener.close()
                await backend.start()
                await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
                async with guest_of(sim_host) as guest:
                    blk = await asyncio.wait_for(
                        VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)), TIMEOUT)
                    await io_check(blk, backend, 3)
                    await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        rude.cancel()
        await asyncio.gather(rude, return_exceptions=True)
        listener.close()
        await backend.stop()


# --- taken over while the back-end is gone too ----------------------------------------------------


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A back-end (stderr dropped) or, with ``env``, a daemon (stderr piped for :class:`DaemonLog`)."""
    if env is None:
        return subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemons run uvloop in their own processes
async def test_daemon_restarted_while_its_backend_is_gone_keeps_the_saved_state_and_resumes(sim_dir, tmp_path):
    """The daemon and its back-end both die (SIGKILL) with the guest's disk live; the guest's next
    write blocks its vCPU. A new daemon adopts the IOREQ server while no back-end is there: the
    device waits, state.json keeps the device state the first daemon saved, and when the
    back-end is back the device is restored, the blocked write completes and I/O goes on."""
    from tests.daemon.test_daemon_cli import DaemonLog, start_sim, stop

    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 << 20))
    sock = str(runtime / "0.sock")
    blk_cmd = [sys.executable, "-m", "vhost_user.testing.blk", "--socket", sock, "--size", "8M", "--image", str(image)]
    cmd = [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)]
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    procs: list[subprocess.Popen[bytes]] = []
    guest = None
    try:
        procs.append(spawn(blk_cmd))
        procs.append(spawn(cmd, env))
        await DaemonLog(procs[-1]).wait_for("serving virtio device")
        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)), TIMEOUT)
        before = random.Random(8).randbytes(64 << 10)
        await asyncio.wait_for(blk.write(128, before), TIMEOUT)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)
        data = random.Random(9).randbytes(64 << 10)
        pending = asyncio.ensure_future(blk.write(2048, data))  # its notify blocks the vCPU
        procs.append(spawn(cmd, env))
        log = DaemonLog(procs[-1])
        await log.wait_for("ioreq server 0 adopted")
        await log.wait_for("device 0: waiting for back-end at")
        saved = json.loads((runtime / "state.json").read_text())
        assert str(BASES[0]) in saved["devices"], saved  # not lost while the device waits
        assert not pending.done()
        procs.append(spawn(blk_cmd))
        await asyncio.wait_for(pending, TIMEOUT)
        assert await asyncio.wait_for(blk.read(2048, len(data) // 512), TIMEOUT) == data
        assert await asyncio.wait_for(blk.read(128, len(before) // 512), TIMEOUT) == before
        await asyncio.wait_for(blk.close(), TIMEOUT)
        procs[2].send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, procs[2].wait, TIMEOUT) == 0
        assert image.read_bytes()[2048 * 512:2048 * 512 + len(data)] == data
    finally:
        if guest is not None:
            guest.close()
        for proc in procs:
            stop(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        stop(sim)


# --- (e) a back-end lost for longer than RECONNECT_WINDOW: DEVICE_NEEDS_RESET, as before ------------


@pytest.mark.asyncio
async def test_backend_lost_beyond_the_reconnect_window_sets_needs_reset(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch, monkeypatch):
    """Waiting is for a back-end that has not come yet: one that served and then went away for
    longer than the reconnect window still ends in DEVICE_NEEDS_RESET (the window is shortened)."""
    from xen_vhost_master import device as device_module

    monkeypatch.setattr(device_module, "RECONNECT_WINDOW", 1.0)
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    with logwatch() as log:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) as daemon, guest_of(sim_host) as guest:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                         TIMEOUT)
            await io_check(blk, backend, 4)
            await backend.stop()
            await log.wait_for(lambda line: "back-end did not come back within 1 s" in line)
            status = await asyncio.wait_for(guest.mmio_read(BASES[0] + 0x070, 4), TIMEOUT)
            assert status & 0x40, hex(status)  # DEVICE_NEEDS_RESET
            assert daemon.device(0)["backend"] == "lost"
            with contextlib.suppress(GuestDriverError):
                await asyncio.wait_for(blk.close(), TIMEOUT)  # (a driver may see NEEDS_RESET after its reset)
