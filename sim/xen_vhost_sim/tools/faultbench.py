"""Fault injection (not a test): the back-end SIGKILLed again and again under guest block I/O.

    python -m xen_vhost_sim.tools.faultbench [--kills 100] [--depth 8] [--uvloop] [--seed 1]
    python -m xen_vhost_sim.tools.faultbench --backend python [--kills 100] [--control-kills 20]

``--backend python`` (second half below) runs this library's own back-end instead, on the
zero-copy data path with inflight I/O tracking.

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

``--backend python``: ``python -m vhost_user.testing.blk`` (a separate process, on a raw image
file that survives its restarts) reaches guest RAM itself (zero copy: the simulator's RAM memfd
in the memory table, the guest's own rings), offers INFLIGHT_SHMFD, and completes requests out
of order on purpose (each after a random delay of up to ``--hold-ms``), so a kill nearly always
leaves an older request in flight behind completed younger ones. The daemon hands the back-end
the inflight area it got at the first start again on every reconnect, and the new back-end
resubmits exactly the chains left in flight. The same run is then repeated as a control with
the feature masked (``--no-inflight`` back-end, ``--control-kills`` kills, shorter guest timeout):
the restart at the used index must be caught repeating or losing a request. Exit status 0 only
if the inflight run is clean and the control run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from vhost_user import AsyncFrontend

from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import WINDOW_SIZE
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_master.guestmem.foreign import foreign_reader
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

__all__ = ["BackendProcess", "KillFigures", "PythonBlkProcess", "QsdProcess", "kill_loop", "main"]

log = logging.getLogger("xen_vhost_sim.tools.faultbench")

BASE, IRQ = 0x0200_0000, 33
BLOCK = 4096
SLOTS = 512  # 2 MiB of rewritten 4 KiB slots
IMAGE_BYTES = 8 << 20
STEP = 30.0  # bound on any single wait (a batch, a restart, a reconnect)
CONTROL_TIMEOUT = 5.0  # guest request timeout of the control run (a lost request shows up as one)
QSD = "qemu-storage-daemon"
_RESUBMITTED = re.compile(rb"resubmitting (\d+) chain")


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
    backend: str = "qemu-storage-daemon"
    data_path: str = "shadow virtqueues"
    inflight: bool = False  # INFLIGHT_SHMFD was in use (the daemon shared an area)
    failure: str = ""  # what the guest saw go wrong (a lost or repeated request), if anything

    @property
    def ok(self) -> bool:
        return (self.data_lost == 0 and self.completed_twice == 0 and self.completed == self.chains
                and self.reconnects == self.kills and not self.failure)


class BackendProcess:
    """A vhost-user back-end program at a fixed socket path, SIGKILLed and started again on the
    same disk and path. Always stop it (``stop``)."""

    name = "back-end"

    def __init__(self, argv: Sequence[str], sock: str, log_path: str) -> None:
        self.argv = list(argv)
        self.sock, self.log_path = sock, log_path
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
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (see {self.log_path})")
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


class QsdProcess(BackendProcess):
    """qemu-storage-daemon exporting a raw image over vhost-user-blk."""

    name = QSD

    def __init__(self, image: str, sock: str, log_path: str) -> None:
        exe = shutil.which(QSD)
        if exe is None:
            raise FileNotFoundError(f"{QSD} not found (Debian 12: qemu-system-common, Debian 13: qemu-utils; `make deps` installs it)")
        super().__init__([
            exe,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp1,node-name=disk0,addr.type=unix,addr.path={sock},"
                        "num-queues=1,writable=on,logical-block-size=512",
        ], sock, log_path)
        self.image = image


class PythonBlkProcess(BackendProcess):
    """``python -m vhost_user.testing.blk`` on a raw image, completing out of order on purpose
    (``seed``, ``hold_ms``); ``inflight=False`` masks INFLIGHT_SHMFD."""

    name = "vhost_user.testing.blk"

    def __init__(self, image: str, sock: str, log_path: str, *, seed: int, hold_ms: float = 20.0,
                 inflight: bool = True) -> None:
        argv = [sys.executable, "-m", "vhost_user.testing.blk", "--socket", sock, "--image", image,
                "--reorder", str(seed), "--hold-ms", str(hold_ms)]
        super().__init__(argv + ([] if inflight else ["--no-inflight"]), sock, log_path)
        self.image = image

    def resubmitted(self) -> int:
        """Chains the restarted back-ends found in flight and submitted again (from their logs)."""
        with open(self.log_path, "rb") as f:
            return sum(int(m.group(1)) for m in _RESUBMITTED.finditer(f.read()))


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
                    depth: int = 8, seed: int = 1, progress: TextIO | None = None, backend: str = "qsd",
                    inflight: bool = True, hold_ms: float = 20.0, request_timeout: float = STEP) -> KillFigures:
    """Run the whole experiment once (see the module docstring); returns its figures.

    ``backend``: "qsd" (shadow data path) or "python" (zero copy; ``inflight`` offers
    INFLIGHT_SHMFD, ``hold_ms`` bounds its completion delays). ``request_timeout``: how long the
    guest waits for a request (a lost one fails its batch after that long).
    Everything it starts (back-end, the domain, fds) is stopped or closed on return."""
    rng = random.Random(seed)
    image = os.path.join(workdir, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    sock, blog = os.path.join(workdir, "backend.sock"), os.path.join(workdir, "backend.log")
    proc: BackendProcess
    if backend == "qsd":
        proc = QsdProcess(image, sock, blog)
    elif backend == "python":
        proc = PythonBlkProcess(image, sock, blog, seed=seed, hold_ms=hold_ms, inflight=inflight)
    else:
        raise ValueError(f"unknown back-end {backend!r} (qsd or python)")
    domid = control.create_domain(mem_bytes=64 << 20)
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    dlog = device_logger("xvm.faultbench", domid, "blk")
    ioreq = IoreqServer(privcmd, evtchn, domid, dlog)
    banks = [(int(a), int(b)) for a, b in control.domain_info(domid)["banks"]]
    guest_mem = ForeignGuestMemory(privcmd, domid, banks)
    queue_errors: list[tuple[int, str]] = []
    shadow: ShadowDataPath | None = None
    memfd = -1
    memory: Any
    if backend == "qsd":
        memory = shadow = ShadowDataPath(guest_mem, banks, pool_size=8 << 20, max_queues=1, max_queue_size=256,
                                         on_error=lambda i, r: queue_errors.append((i, r)), log=dlog)
    else:
        info, fds = control.call({"op": "guest_ram", "domid": domid})
        memfd = fds[0]
        memory = sim_memfd_export(info["banks"], memfd, foreign_reader(privcmd, domid))
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock)
    device = Device(cfg, connect=lambda: AsyncFrontend.connect(sock), memory=memory,
                    set_irq=lambda level: ioreq.set_irq(IRQ, level), log=dlog)
    guest: SimGuest | None = None
    expected: dict[int, bytes] = {}
    requests = failed_batches = 0
    failure = ""
    max_pause = 0.0
    used_inflight = False
    stop = asyncio.Event()
    try:
        proc.start()
        await proc.wait_listening()
        ioreq.create()
        await asyncio.wait_for(device.start(), STEP)
        ioreq.add_window(BASE, WINDOW_SIZE, device)
        ioreq.enable()
        guest = await SimGuest.connect(host_path, domid)
        blk = await asyncio.wait_for(
            VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), queue_size=64,
                             features=VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX, mmio_timeout=STEP),
            STEP)
        blk.driver.mmio_timeout = request_timeout
        used_inflight = device.inflight is not None

        async def writer() -> None:
            nonlocal requests, failed_batches, max_pause, failure
            while not stop.is_set():
                slots = rng.sample(range(SLOTS), depth)
                batch = {s * BLOCK: rng.randbytes(BLOCK) for s in slots}
                t = time.perf_counter()
                try:
                    await blk.batch([BlkOp("write", off // 512, data=d) for off, d in batch.items()])
                except GuestDriverError as e:
                    failed_batches += 1
                    failure = f"{type(e).__name__}: {e}"
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
                proc.kill()
                proc.start()
                await proc.wait_listening()
                await _wait_reconnects(device, k)
                if progress is not None and (k % 10 == 0 or k == kills):
                    progress.write(f"  {k} kills, {requests} requests\n")
                    progress.flush()
        finally:
            stop.set()
            with contextlib.suppress(GuestDriverError):
                await asyncio.wait_for(io, max(STEP, request_timeout + 1))
        seconds = time.perf_counter() - t0
        lost = 0
        if not failure:
            lost = await _verify(blk, image, expected, depth)
        resubmitted = st_chains = st_completed = 0
        if shadow is not None:
            st = shadow.stats(0)
            assert st is not None
            resubmitted, st_chains, st_completed = st.resubmitted, st.chains, st.completed
            if queue_errors or shadow.inflight(0):
                raise RuntimeError(f"shadow queue errors {queue_errors}, {shadow.inflight(0)} chain(s) still in flight")
        else:
            assert isinstance(proc, PythonBlkProcess)
            resubmitted, st_chains, st_completed = proc.resubmitted(), requests, requests
        figures = KillFigures(
            kills=proc.starts - 1, depth=depth, reconnects=device.stats.reconnects, requests=requests,
            bytes_written=requests * BLOCK, resubmitted=resubmitted, chains=st_chains,
            completed=st_completed, data_lost=lost, completed_twice=failed_batches + (blk.driver.broken is not None),
            seconds=seconds, max_pause=max_pause, backend=proc.name,
            data_path="shadow virtqueues" if shadow is not None else "zero copy",
            inflight=used_inflight, failure=failure,
        )
        if not failure:
            await asyncio.wait_for(blk.close(), STEP)
        else:  # the driver is broken; its reset may still work, and the rings are released anyway
            with contextlib.suppress(GuestDriverError, TimeoutError):
                await asyncio.wait_for(blk.close(), STEP)
        return figures
    finally:
        try:
            if guest is not None:
                guest.close()
            await ioreq.close()
            await device.close()
            if shadow is not None:
                shadow.close()
            if memfd >= 0:
                os.close(memfd)
            guest_mem.close()
            evtchn.close()
            privcmd.close()
            control.destroy_domain(domid)
        finally:
            proc.stop()


async def _verify(blk: VirtioBlk, image: str, expected: dict[int, bytes], depth: int) -> int:
    """Slots whose content differs from the last write, read back through the guest and from the
    raw file (each slot counted once per place it is wrong)."""
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
    return lost


def report(f: KillFigures, out: TextIO, *, title: str = "") -> None:
    tracking = ", inflight tracking" if f.inflight else ""
    out.write(
        f"{title or 'back-end SIGKILLs under blk I/O'} ({f.backend}, {f.data_path}{tracking}, QD {f.depth}):\n"
        f"  kills                 {f.kills}\n"
        f"  reconnects            {f.reconnects}\n"
        f"  requests completed    {f.requests} ({f.bytes_written >> 20} MiB written)\n"
        + (f"  chains published      {f.chains}, completed {f.completed}, resubmitted after a kill {f.resubmitted}\n"
           if f.data_path == "shadow virtqueues" else
           f"  chains resubmitted    {f.resubmitted} (by the restarted back-ends, from the inflight area)\n")
        + f"  data lost             {f.data_lost}\n"
        f"  completions twice     {f.completed_twice}\n"
        + (f"  guest saw             {f.failure}\n" if f.failure else "")
        + f"  time                  {f.seconds:.1f} s (longest batch {f.max_pause * 1000:.0f} ms)\n"
        f"  verdict               {'OK' if f.ok else 'FAILED'}\n"
    )
    out.flush()


async def _main(args: argparse.Namespace) -> int:
    async def run(**kw: Any) -> KillFigures:
        with tempfile.TemporaryDirectory(prefix="xsim-fault-") as d, SimHost(os.path.join(d, "xen.sock")) as host, \
                host.control() as ctl:
            return await kill_loop(SimKernel(host.path), ctl, host.path, d, depth=args.depth, seed=args.seed,
                                   progress=sys.stderr, backend=args.backend, hold_ms=args.hold_ms, **kw)

    figures = await run(kills=args.kills)
    report(figures, sys.stdout)
    if args.backend != "python" or not args.control_kills:
        return 0 if figures.ok else 1
    sys.stderr.write("control run: the same, INFLIGHT_SHMFD masked\n")
    control = await run(kills=args.control_kills, inflight=False, request_timeout=CONTROL_TIMEOUT)
    report(control, sys.stdout, title="control, feature masked")
    detected = not control.ok and not control.inflight
    sys.stdout.write(f"control run {'caught the used-index restart losing or repeating requests' if detected else 'did NOT fail'}"
                     f" ({control.failure or f'data lost {control.data_lost}'})\n")
    return 0 if figures.ok and figures.inflight and detected else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--depth", type=int, default=8, help="requests per batch (queue depth)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", choices=("qsd", "python"), default="qsd",
                   help="qemu-storage-daemon on the shadow path, or vhost_user.testing.blk zero copy with inflight tracking")
    p.add_argument("--hold-ms", type=float, default=20.0, help="python back-end: longest completion delay")
    p.add_argument("--control-kills", type=int, default=20,
                   help="python back-end: kills of the control run without INFLIGHT_SHMFD (0: skip it)")
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
