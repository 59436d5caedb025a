"""libxl's device removal as real Xen 4.17 does it (seen in tests/xenlab), in the simulator, and the
daemon's side of it.

Real ``xl destroy``: pause, then per device ``online=0`` + ``state=5`` (Closing) in one transaction,
wait up to 10 s for the backend's ``state=6`` (Closed), remove the directories, destroy the domain.
The simulator used to remove everything at once; ``SimControl.xl_destroy`` /
``xl_detach_virtio_device`` now follow libxl. Real xenstored also showed the daemon two things the
simulator had not: a device directory read half-removed (no ``state``), and a state write after
libxl's rm re-creating the directory. Both are tested here against the daemon as a program
(``xen-vhost-master --domid N``) with the project's XEN_MMAP back-end
(``python -m xen_vhost_master.backend.blk``), Xen 4.17's ``virtio_disk`` kind (decimal base).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xen_vhost_master.platform import Platform
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

DOMID = 7
DEVID = 51712  # xvda
TIMEOUT = 20.0
BE = f"/local/domain/0/backend/virtio_disk/{DOMID}"


async def wait_value(xs: XenstoreClient, path: str, value: str) -> None:
    async with await xs.watch(path) as w:
        async with asyncio.timeout(TIMEOUT):
            async for _ in w:
                try:
                    if await xs.read_str(path) == value:
                        return
                except FileNotFoundError:
                    pass


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Lab:
    """One simulated guest with a virtio_disk slot, the XEN_MMAP back-end and the daemon."""

    def __init__(self, sim_path: str, tmp: Path, ctl: SimControl) -> None:
        self.sim_path, self.tmp, self.ctl = sim_path, tmp, ctl
        ctl.create_domain(DOMID, mem_bytes=64 << 20, name="lab")
        ctl.add_virtio_device(DOMID, device_id=2, base=0x2000000, irq=33, devid=DEVID, kind="virtio_disk")
        self.image = tmp / "disk.img"
        self.image.write_bytes(bytes(8 << 20))
        runtime = tmp / "run"
        runtime.mkdir()
        env = dict(os.environ, XEN_VHOST_SIM=sim_path)
        self.backend = subprocess.Popen(
            [sys.executable, "-m", "xen_vhost_master.backend.blk", "--socket", str(runtime / f"{DEVID}.sock"),
             "--image", str(self.image)], env=env, stderr=subprocess.DEVNULL)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.notify.setblocking(False)
        self.daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)],
            env=dict(env, NOTIFY_SOCKET=str(tmp / "notify")), stderr=subprocess.PIPE)

    async def notified(self, prefix: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            while True:
                msg = await loop.sock_recv(self.notify, 4096)
                if msg.startswith(prefix):
                    return msg

    def drain(self) -> None:
        while True:
            try:
                self.notify.recv(4096)
            except BlockingIOError:
                return

    async def exit_code(self) -> int:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.daemon.wait, TIMEOUT)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            raise AssertionError(f"daemon still running {TIMEOUT} s after the domain went:\n{self.log()}") from None

    def log(self) -> str:
        stop(self.daemon)
        assert self.daemon.stderr is not None
        return self.daemon.stderr.read().decode(errors="replace")

    def close(self) -> None:
        stop(self.daemon)
        stop(self.backend)
        if self.daemon.stderr is not None:
            self.daemon.stderr.close()
        self.notify.close()


@pytest.fixture
def lab(sim_host, sim_control: SimControl, tmp_path: Path) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    lab = Lab(sim_host.path, tmp_path, sim_control)
    try:
        yield lab
    finally:
        lab.close()


async def guest_io(lab: Lab) -> SimGuest:
    guest = await SimGuest.connect(lab.sim_path, DOMID)
    try:
        await _io(lab, guest)
    except BaseException:
        close_guest(guest)
        raise
    return guest


def close_guest(guest: SimGuest) -> None:
    gc.collect()
    guest.close()


async def _io(lab: Lab, guest: SimGuest) -> None:
    blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
    data = random.Random(DOMID).randbytes(128 << 10)
    await asyncio.wait_for(blk.write(2048, data), TIMEOUT)
    assert await asyncio.wait_for(blk.read(2048, len(data) // 512), TIMEOUT) == data
    with open(lab.image, "rb") as f:  # the back-end's image, written through its foreign mapping
        f.seek(2048 * 512)
        assert f.read(len(data)) == data
    await asyncio.wait_for(blk.close(), TIMEOUT)  # the driver resets its device (releases its ring views)


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_xl_destroy_waits_for_closed_and_nothing_is_left(lab: Lab, kernel: SimKernel) -> None:
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    guest = None
    try:
        await lab.notified(b"READY=1")
        assert await xs.read_str(f"{BE}/{DEVID}/base") == str(0x2000000)  # 4.17 virtio_disk: decimal
        assert await xs.read_str(f"{BE}/{DEVID}/state") == "2"
        guest = await guest_io(lab)

        t0 = time.monotonic()
        answered = await asyncio.get_running_loop().run_in_executor(None, lab.ctl.xl_destroy, DOMID)
        assert answered == {f"{BE}/{DEVID}": True}, lab.log()  # Closed came: no 10 s timeout
        assert time.monotonic() - t0 < 5.0
        assert await lab.exit_code() == 0
        assert not await xs.exists(BE), lab.log()  # not re-created by a late state write
        assert lab.backend.poll() is None  # the back-end serves the next front-end
    finally:
        if guest is not None:
            close_guest(guest)
        await xs.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_abrupt_destroy_leaves_no_backend_directory(lab: Lab, kernel: SimKernel) -> None:
    """A forced removal (libxl after its timeout; the old simulator): the directory vanishes under
    a live device. The daemon tears down, exits 0, and writes no state into the void."""
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    guest = None
    try:
        await lab.notified(b"READY=1")
        guest = await guest_io(lab)
        lab.ctl.destroy_domain(DOMID)
        assert await lab.exit_code() == 0
        assert not await xs.exists(BE), lab.log()
    finally:
        if guest is not None:
            close_guest(guest)
        await xs.close()


@pytest.mark.asyncio
async def test_half_removed_directory_is_not_a_device(sim_control: SimControl, kernel: SimKernel, platform: Platform) -> None:
    """Real xenstored answers each read on its own: the daemon's reads of a device's keys can
    straddle libxl's rm and see base/irq but no state (it then served a removed device again and
    wrote its state back, seen in tests/xenlab). A directory without ``state`` is not a device."""
    from xen_vhost_master.supervisor import Options, Supervisor

    domid = sim_control.create_domain(mem_bytes=16 << 20)
    be = sim_control.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=DEVID, kind="virtio_disk")
    sup = Supervisor(Options(domid=domid), platform)
    sup.xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    try:
        whole = await sup._read_device("virtio_disk", str(DEVID))
        assert whole is not None and whole.base == 0x2000000 and whole.irq == 33
        await sup.xs.rm(f"{be}/state")
        await sup.xs.rm(f"{be}/online")
        assert await sup._read_device("virtio_disk", str(DEVID)) is None
        assert await sup._discover() == []
    finally:
        await sup.xs.close()
        sup.notifier.close()


@pytest.mark.asyncio
async def test_sim_detach_handshake(sim_control: SimControl, kernel: SimKernel) -> None:
    """The simulated libxl: Closing + online=0, waits for Closed, then removes; without an
    answer it removes after the timeout and says so."""
    domid = sim_control.create_domain(mem_bytes=16 << 20)
    be = sim_control.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=DEVID, kind="virtio_disk")
    assert be.startswith("/local/domain/0/backend/virtio_disk/")
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    loop = asyncio.get_running_loop()
    try:
        assert await xs.read_str(f"{be}/base") == "33554432"
        detach = loop.run_in_executor(None, lambda: sim_control.xl_detach_virtio_device(
            domid, device_id=2, base=0x2000000, irq=33, devid=DEVID, kind="virtio_disk"))
        await wait_value(xs, f"{be}/state", "5")
        assert await xs.read_str(f"{be}/online") == "0"
        assert await xs.exists(be)  # libxl waits for the backend before removing
        await xs.write(f"{be}/state", "6")
        assert await asyncio.wait_for(detach, TIMEOUT) is True
        assert not await xs.exists(be)
        assert not await xs.exists(f"/local/domain/{domid}/device/virtio_disk/{DEVID}")

        be = sim_control.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=DEVID, kind="virtio_disk")
        t0 = time.monotonic()
        assert sim_control.xl_detach_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=DEVID,
                                                   kind="virtio_disk", timeout=0.3) is False
        assert 0.3 <= time.monotonic() - t0 < 5.0
        assert not await xs.exists(be)
    finally:
        await xs.close()
