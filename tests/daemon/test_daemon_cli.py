"""The daemon as an operator runs it: ``xen-vhost-master --domid N`` in its own process, attached to
``xen-vhost-sim`` in another, devices from the simulated xenstore, qemu-storage-daemon back-ends
reached through shadow virtqueues (the default for a back-end without XEN_MMAP), as on real Xen.

Checks: READY=1 on a real NOTIFY_SOCKET, XenBus states (InitWait, Connected, Closed), guest I/O,
a device hot-added and hot-removed through xenstore, SIGTERM → exit 0 with STOPPING=1 and nothing
left behind (status socket gone, IOREQ server destroyed in the simulator).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.test_sd_notify import drain_queue, fill_queue
from tests.sim.simproc import start_sim_process, stop_process
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

DOMID = 7
TIMEOUT = 20.0
BIN = Path(sys.executable).parent


def start_sim(sim_dir: str, name: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """``xen-vhost-sim`` with domain DOMID (named ``name``, else guest<DOMID>) and one virtio disk;
    nothing is left running if it does not start (the ``start_sim`` fixture of conftest.py also
    stops it when the test ends, however it ends)."""
    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process(
        [str(BIN / "xen-vhost-sim"), "--socket", path, "--domain", f"domid={DOMID},mem=64M,vcpus=2"
         + (f",name={name}" if name else ""),
         "--virtio", f"domid={DOMID},device_id=2,base=0x2000000,irq=33,devid=0"], TIMEOUT)
    return proc, path


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    stop_process(proc, TIMEOUT)


def daemon_env(sim_path: str) -> dict[str, str]:
    """The environment of a daemon run as a program over the simulated host at ``sim_path``: this
    one without JOURNAL_STREAM, so the daemon logs to stderr as text."""
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    env.pop("JOURNAL_STREAM", None)
    return env


class DaemonLog:
    """The daemon's stderr, read line by line from the event loop."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for(self, text: str) -> str:
        assert self.proc.stderr is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = (await loop.run_in_executor(None, self.proc.stderr.readline)).decode()
                if not line:
                    raise AssertionError(f"daemon exited before logging {text!r}:\n" + "".join(self.lines))
                self.lines.append(line)
                if text in line:
                    return line

    async def ended(self) -> str:
        """Everything the daemon logged, once it is stopped (SIGTERM, then SIGKILL): for a
        failing test's message."""
        await asyncio.to_thread(stop, self.proc)
        assert self.proc.stderr is not None
        rest = await asyncio.to_thread(self.proc.stderr.read)
        return "".join(self.lines) + rest.decode(errors="replace")


async def wait_state(xs: XenstoreClient, path: str, value: str) -> None:
    async with await xs.watch(path) as w:
        async with asyncio.timeout(TIMEOUT):
            async for _ in w:
                try:
                    if await xs.read_str(path) == value:
                        return
                except FileNotFoundError:
                    pass


async def io_check(blk: VirtioBlk, image: Path, seed: int) -> None:
    data = random.Random(seed).randbytes(256 << 10)
    await asyncio.wait_for(blk.write(64, data), TIMEOUT)
    assert await asyncio.wait_for(blk.read(64, len(data) // 512), TIMEOUT) == data
    await asyncio.wait_for(blk.flush(), TIMEOUT)
    with open(image, "rb") as f:
        f.seek(64 * 512)
        assert f.read(len(data)) == data


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_daemon_serves_discovers_hotplugs_and_stops_cleanly(start_sim, sim_dir, peers, tmp_path):
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    disk0, disk1 = peers.qsd_raw(size=8 << 20), peers.qsd_raw(size=8 << 20)
    (runtime / "0.sock").symlink_to(disk0.sock)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = dict(os.environ, XEN_VHOST_SIM=sim_path, NOTIFY_SOCKET=str(tmp_path / "notify"))
    daemon = subprocess.Popen(
        [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)],
        env=env, stderr=subprocess.PIPE,
    )
    log = DaemonLog(daemon)
    guest = xs = None
    fillers: list[socket.socket] = []
    try:
        loop = asyncio.get_running_loop()
        notify.setblocking(False)
        before = []  # STATUS= of each start-up step, then READY=1
        while not (msg := await asyncio.wait_for(loop.sock_recv(notify, 4096), TIMEOUT)).startswith(b"READY=1"):
            before.append(msg)
        assert before[0] == f"STATUS=dom{DOMID}: creating the IOREQ server".encode(), before
        # The manager stops reading, its queue full (net.unix.max_dgram_qlen datagrams): the
        # daemon's notifications after READY=1 must not stop it serving (they wait, in order).
        fillers = fill_queue(str(tmp_path / "notify"))
        xs = await XenstoreClient.open(socket_paths=(), opener=SimKernel(sim_path).open)
        backend = f"/local/domain/0/backend/virtio/{DOMID}"
        assert await xs.read_str(f"{backend}/0/state") == "2"  # InitWait: `xl create` may go on
        await log.wait_for("serving virtio device")  # (READY comes before the back-end is reached)
        status = subprocess.run([str(BIN / "xen-vhost-master"), "status", "--json", "--domid", str(DOMID), "--runtime-dir", str(runtime)],
                                capture_output=True, text=True, timeout=TIMEOUT, check=True)
        state = json.loads(status.stdout)
        assert state["restricted"] is True  # privcmd/evtchn only reach this guest now
        assert [(d["backend"], d["data_path"]) for d in state["devices"]] == [("connected", "shadow")]

        guest = await SimGuest.connect(sim_path, DOMID)
        alloc = GuestPageAllocator(guest.ram)
        blk0 = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, alloc), TIMEOUT)
        await wait_state(xs, f"{backend}/0/state", "4")  # Connected: the guest's driver is live
        await io_check(blk0, disk0.image, 1)

        # Hot add: libxl writes a second device; the daemon serves it without a restart.
        (runtime / "1.sock").symlink_to(disk1.sock)
        with SimControl(sim_path) as ctl:
            ctl.add_virtio_device(DOMID, device_id=2, base=0x2000200, irq=34, devid=1)
        await wait_state(xs, f"{backend}/1/state", "2")
        blk1 = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000200, 34, alloc), TIMEOUT)
        await io_check(blk1, disk1.image, 2)

        # Hot remove: the window answers as a removed device (reads 0) for a grace, then goes away
        # (unclaimed MMIO reads as all-ones); device 0 goes on.
        with SimControl(sim_path) as ctl:
            ctl.remove_virtio_device(DOMID, device_id=2, base=0x2000200, irq=34, devid=1)
        await log.wait_for("removed from xenstore")
        await log.wait_for("window at 0x2000200 answered as a removed device")
        assert await asyncio.wait_for(guest.mmio_read(0x2000200, 4), TIMEOUT) == 0xFFFFFFFF
        await io_check(blk0, disk0.image, 3)
        await blk0.close()  # the guest's driver resets its device: back to InitWait
        with pytest.raises(GuestDriverError):
            await blk1.close()  # its device is gone: the reset never completes
        await wait_state(xs, f"{backend}/0/state", "2")

        drain_queue(notify)  # the manager reads again
        daemon.send_signal(signal.SIGTERM)
        # what waited for room comes first, in order, then STOPPING=1
        while not (await asyncio.wait_for(loop.sock_recv(notify, 4096), TIMEOUT)).startswith(b"STOPPING=1"):
            pass
        await log.wait_for(f"dom{DOMID}: stopped")  # its teardown is done ...
        daemon.send_signal(signal.SIGTERM)  # ... and a second stop (an operator's, twice) finds nothing to stop
        rc = await loop.run_in_executor(None, daemon.wait, TIMEOUT)
        assert rc == 0, "".join(log.lines)
        assert not (runtime / "status.sock").exists()
        assert await xs.read_str(f"{backend}/0/state") == "6"  # Closed
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == []  # the IOREQ server is destroyed
    finally:
        if guest is not None:
            guest.close()
        if xs is not None:
            await xs.close()
        stop(daemon)
        if daemon.stderr is not None:
            daemon.stderr.close()
        notify.close()
        for filler in fillers:
            filler.close()
        stop(sim)


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_daemon_sigkilled_and_restarted_takes_over_the_running_guest(start_sim, sim_dir, peers, tmp_path):
    """The daemon dies (SIGKILL) while the guest's disk is live; the guest's next access blocks in
    its vCPU. A restarted daemon adopts the IOREQ server its predecessor left, restores the
    device's state, resumes the back-end's rings, serves the blocked access, and I/O goes on."""
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    disk = peers.qsd_raw(size=8 << 20)
    (runtime / "0.sock").symlink_to(disk.sock)
    cmd = [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)]
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    second = None
    guest = None
    try:
        await DaemonLog(first).wait_for("serving: ")
        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, disk.image, 4)
        first.kill()
        first.wait(TIMEOUT)
        # The guest carries on: this write's notify blocks its vCPU until a device model answers.
        data = random.Random(5).randbytes(64 << 10)
        pending = asyncio.ensure_future(blk.write(2048, data))
        second = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        log = DaemonLog(second)
        await log.wait_for("ioreq server 0 adopted")
        await asyncio.wait_for(pending, TIMEOUT)
        assert await asyncio.wait_for(blk.read(2048, 128), TIMEOUT) == data
        await io_check(blk, disk.image, 6)
        await blk.close()
        second.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, second.wait, TIMEOUT) == 0
        assert not (runtime / "state.json").exists()  # a clean stop leaves nothing to take over
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == []
    finally:
        if guest is not None:
            guest.close()
        for proc in (first, second):
            if proc is not None:
                stop(proc)
                if proc.stderr is not None:
                    proc.stderr.close()
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemons run uvloop in their own processes
async def test_daemon_sigkilled_with_out_of_order_requests_in_flight_resumes_exactly(start_sim, sim_dir, tmp_path):
    """Shadow path, a back-end that completes out of order (the project's RAM disk with
    ``--reorder``): the daemon is SIGKILLed right after the first of 8 writes completed, three times
    over. Each restarted daemon resumes from the guest-side in-flight record it finds in the runtime
    directory: every write completes exactly once (the guest driver fails the batch on a completion
    for a chain not in flight, and a lost one times out) and every byte is in the image."""
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 << 20))
    sock = Path(sim_dir) / "blk.sock"
    backend = subprocess.Popen(
        [sys.executable, "-m", "vhost_user.testing.blk", "--socket", str(sock), "--size", "8M", "--image", str(image),
         "--reorder", "3", "--hold-ms", "40"], stderr=subprocess.DEVNULL)
    (runtime / "0.sock").symlink_to(sock)
    cmd = [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)]
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    daemons: list[subprocess.Popen[bytes]] = []
    guest = None
    resumed = 0
    try:
        daemons.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
        await DaemonLog(daemons[-1]).wait_for("serving: ")
        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        queue = blk.driver.queues[0]
        rng = random.Random(9)
        expected: dict[int, bytes] = {}
        for round_ in range(3):
            ops = [BlkOp("write", 4096 * round_ + 64 * i, data=rng.randbytes(16 << 10)) for i in range(8)]
            batch = asyncio.ensure_future(blk.batch(ops))
            async with asyncio.timeout(TIMEOUT):
                while len(queue.pending) < len(ops):  # all posted and kicked
                    await asyncio.sleep(0)
                await asyncio.wait(set(queue.pending), return_when=asyncio.FIRST_COMPLETED)
            daemons[-1].kill()
            daemons[-1].wait(TIMEOUT)
            daemons.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
            log = DaemonLog(daemons[-1])
            await log.wait_for("ioreq server 0 adopted")
            await asyncio.wait_for(batch, TIMEOUT)  # every write, exactly once
            line = await log.wait_for("resum")
            resumed += "from the in-flight record" in line
            expected.update((op.sector, op.data) for op in ops)
        for sector, data in expected.items():
            assert await asyncio.wait_for(blk.read(sector, len(data) // 512), TIMEOUT) == data
        await blk.close()
        with open(image, "rb") as f:
            for sector, data in expected.items():
                f.seek(sector * 512)
                assert f.read(len(data)) == data
        assert resumed >= 1  # chains were in flight at some kill, and the record brought them back
    finally:
        if guest is not None:
            guest.close()
        for proc in daemons:
            stop(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        stop(backend)
        stop(sim)
