"""Fault injection (not a test): the back-end SIGKILLed again and again under guest block I/O.

    python -m xen_vhost_master.faultbench [--kills 100] [--depth 8] [--uvloop] [--seed 1]

Starts a simulated Xen host (thread) and qemu-storage-daemon on a raw image file, builds the
daemon's pieces for one guest on the **shadow** data path (guest RAM reached only through privcmd
foreign mappings, chains bounced through the daemon's memfd: the production path on real Xen),
and drives the simulator's virtio-blk driver: batches of ``--depth`` 4 KiB writes with fresh,
known content to random distinct slots of a small region (slots are rewritten over and over, so a
lost, stale or replayed write shows up as wrong data).

Meanwhile qemu-storage-daemon is SIGKILLed ``--kills`` times, each time after a random short
delay while requests are in flight, reaped, and started again on the same image and socket path.
The daemon reconnects, and the shadow ring restarts with every uncompleted chain published again.

At the end: every request completed exactly once (the guest driver raises on a head completed
twice or a used index that runs ahead, and each batch must complete without error), the daemon's
shadow counters agree (chains published == chains completed, nothing in flight), and every slot
reads back, through the guest and straight from the raw file, as the last content written to it.
Prints the figures; exit status 0 only if data lost == 0 and completions twice == 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

from vhost_user import AsyncFrontend

from .config import DeviceConfig
from .device import Device
from .guest_memory import ForeignGuestMemory
from .ioreq_server import IoreqServer
from .log import device_logger
from .shadow import ShadowDataPath
from .sim.guest import SimControl, SimGuest
from .sim.guest_devices import BlkOp, VirtioBlk
from .sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator
from .sim.host import SimHost
from .sim.simkernel import SimKernel
from .xen.evtchn import EventChannel
from .xen.privcmd import PrivCmd

__all__ = ["KillFigures", "QsdProcess", "kill_loop", "main"]

log = logging.getLogger("xen_vhost_master.faultbench")

BASE, IRQ = 0x0200_0000, 33
BLOCK = 4096
SLOTS = 512  # 2 MiB of rewritten 4 KiB slots
IMAGE_BYTES = 8 << 20
STEP = 30.0  # bound on any single wait (a batch, a restart, a reconnect)
QSD = "qemu-storage-daemon"


@dataclass(frozen=True)
class KillFigures:
    kills: int
    depth: int
    reconnects: int
    requests: int  # guest write requests completed (each exactly once)
    bytes_written: int
    resubmitted: int  # chains the daemon published again after a reconnect
    chains: int  # chains the daemon published (counted once each)
    completed: int  # chains the daemon completed to the guest
    data_lost: int  # slots whose content (guest read-back or raw file) differs from the last write
    completed_twice: int  # batches that failed (a double completion or a bad used ring fails its batch)
    seconds: float
    max_pause: float  # longest time one batch took (includes a back-end restart)

    @property
    def ok(self) -> bool:
        return (self.data_lost == 0 and self.completed_twice == 0 and self.completed == self.chains
                and self.reconnects == self.kills)


class QsdProcess:
    """qemu-storage-daemon exporting a raw image over vhost-user-blk at a fixed socket path;
    SIGKILL and start again on the same image and path. Always stop it (``stop``)."""

    def __init__(self, image: str, sock: str, log_path: str) -> None:
        exe = shutil.which(QSD)
        if exe is None:
            raise FileNotFoundError(f"{QSD} not found (apt-get install qemu-system-common)")
        self.argv = [
            exe,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp1,node-name=disk0,addr.type=unix,addr.path={sock},"
                        "num-queues=1,writable=on,logical-block-size=512",
        ]
        self.image, self.sock, self.log_path = image, sock, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        self.starts += 1

    async def wait_listening(self, timeout: float = STEP) -> None:
        """Until the export accepts connections (polling: an external process's socket)."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{QSD} exited with {self.proc.returncode} (see {self.log_path})")
                if os.path.exists(self.sock):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        try:
                            s.connect(self.sock)
                            return  # (qsd sees a client come and go: harmless)
                        except (ConnectionRefusedError, FileNotFoundError):
                            pass
                await asyncio.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL and reap (so no write of the dead process can land after its successor's)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


async def _wait_reconnects(device: Device, n: int, timeout: float = STEP) -> None:
    """Until the device has reconnected ``n`` times in all (the loss is noticed asynchronously)."""
    async with asyncio.timeout(timeout):
        while device.stats.reconnects < n:
            task = device.reconnecting
            if task is not None:
                await asyncio.shield(task)
            else:
                await asyncio.sleep(0.005)


async def kill_loop(kernel: SimKernel, control: SimControl, host_path: str, workdir: str, *, kills: int,
                    depth: int = 8, seed: int = 1, progress: TextIO | None = None) -> KillFigures:
    """Run the whole experiment once (see the module docstring); returns its figures.

    Everything it starts (qemu-storage-daemon, the domain, fds) is stopped or closed on return."""
    rng = random.Random(seed)
    image = os.path.join(workdir, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    qsd = QsdProcess(image, os.path.join(workdir, "qsd.sock"), os.path.join(workdir, "qsd.log"))
    domid = control.create_domain(mem_bytes=64 << 20)
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    dlog = device_logger("xvm.faultbench", domid, "blk")
    ioreq = IoreqServer(privcmd, evtchn, domid, dlog)
    banks = [(int(a), int(b)) for a, b in control.domain_info(domid)["banks"]]
    guest_mem = ForeignGuestMemory(privcmd, domid, banks)
    queue_errors: list[tuple[int, str]] = []
    shadow = ShadowDataPath(guest_mem, banks, pool_size=8 << 20, max_queues=1, max_queue_size=256,
                            on_error=lambda i, r: queue_errors.append((i, r)), log=dlog)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=qsd.sock)
    device = Device(cfg, connect=lambda: AsyncFrontend.connect(qsd.sock), memory=shadow,
                    set_irq=lambda level: ioreq.set_irq(IRQ, level), log=dlog)
    guest: SimGuest | None = None
    expected: dict[int, bytes] = {}
    requests = failed_batches = 0
    max_pause = 0.0
    stop = asyncio.Event()
    try:
        qsd.start()
        await qsd.wait_listening()
        ioreq.create()
        await asyncio.wait_for(device.start(), STEP)
        ioreq.add_window(BASE, 0x200, device)
        ioreq.enable()
        guest = await SimGuest.connect(host_path, domid)
        blk = await asyncio.wait_for(
            VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), queue_size=64,
                             features=VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX, mmio_timeout=STEP),
            STEP)

        async def writer() -> None:
            nonlocal requests, failed_batches, max_pause
            while not stop.is_set():
                slots = rng.sample(range(SLOTS), depth)
                batch = {s * BLOCK: rng.randbytes(BLOCK) for s in slots}
                t = time.perf_counter()
                try:
                    await blk.batch([BlkOp("write", off // 512, data=d) for off, d in batch.items()])
                except GuestDriverError as e:
                    failed_batches += 1
                    log.error("batch failed: %s", e)
                    raise
                max_pause = max(max_pause, time.perf_counter() - t)
                expected.update(batch)
                requests += depth

        t0 = time.perf_counter()
        io = asyncio.get_running_loop().create_task(writer())
        try:
            for k in range(1, kills + 1):
                await asyncio.sleep(rng.uniform(0.005, 0.05))  # let I/O run: the kill lands mid-batch
                if io.done():
                    break
                qsd.kill()
                qsd.start()
                await qsd.wait_listening()
                await _wait_reconnects(device, k)
                if progress is not None and (k % 10 == 0 or k == kills):
                    progress.write(f"  {k} kills, {requests} requests\n")
                    progress.flush()
        finally:
            stop.set()
            with contextlib.suppress(GuestDriverError):
                await asyncio.wait_for(io, STEP)
        seconds = time.perf_counter() - t0
        await asyncio.wait_for(blk.flush(), STEP)
        lost = 0
        slots = sorted(expected)
        for i in range(0, len(slots), depth):
            part = slots[i : i + depth]
            got = await asyncio.wait_for(blk.batch([BlkOp("read", off // 512, count=BLOCK // 512) for off in part]), STEP)
            lost += sum(1 for off, data in zip(part, got) if data != expected[off])
        with open(image, "rb") as f:
            for off in slots:
                f.seek(off)
                if f.read(BLOCK) != expected[off]:
                    lost += 1
        st = shadow.stats(0)
        assert st is not None
        figures = KillFigures(
            kills=qsd.starts - 1, depth=depth, reconnects=device.stats.reconnects, requests=requests,
            bytes_written=requests * BLOCK, resubmitted=st.resubmitted, chains=st.chains,
            completed=st.completed, data_lost=lost, completed_twice=failed_batches + (blk.driver.broken is not None),
            seconds=seconds, max_pause=max_pause,
        )
        if queue_errors or shadow.inflight(0):
            raise RuntimeError(f"shadow queue errors {queue_errors}, {shadow.inflight(0)} chain(s) still in flight")
        await asyncio.wait_for(blk.close(), STEP)
        return figures
    finally:
        try:
            if guest is not None:
                guest.close()
            await ioreq.close()
            await device.close()
            shadow.close()
            guest_mem.close()
            evtchn.close()
            privcmd.close()
            control.destroy_domain(domid)
        finally:
            qsd.stop()


def report(f: KillFigures, out: TextIO) -> None:
    out.write(
        f"back-end SIGKILLs under blk I/O (qemu-storage-daemon, shadow virtqueues, QD {f.depth}):\n"
        f"  kills                 {f.kills}\n"
        f"  reconnects            {f.reconnects}\n"
        f"  requests completed    {f.requests} ({f.bytes_written >> 20} MiB written)\n"
        f"  chains published      {f.chains}, completed {f.completed}, resubmitted after a kill {f.resubmitted}\n"
        f"  data lost             {f.data_lost}\n"
        f"  completions twice     {f.completed_twice}\n"
        f"  time                  {f.seconds:.1f} s (longest batch {f.max_pause * 1000:.0f} ms)\n"
        f"  verdict               {'OK' if f.ok else 'FAILED'}\n"
    )
    out.flush()


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="xsim-fault-") as d, SimHost(os.path.join(d, "xen.sock")) as host, \
            host.control() as ctl:
        figures = await kill_loop(SimKernel(host.path), ctl, host.path, d, kills=args.kills, depth=args.depth,
                                  seed=args.seed, progress=sys.stderr)
    report(figures, sys.stdout)
    return 0 if figures.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--depth", type=int, default=8, help="requests per batch (queue depth)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="the daemon's log on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.uvloop:
        import uvloop

        return uvloop.run(_main(args))
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
