"""Benchmark (not a test): shadow virtqueues vs zero copy, same run, same machine.

    python -m xen_vhost_sim.tools.bench_shadow [--seconds 2] [--rounds 3] [--uvloop] [--pool-mib 32]

Starts a simulated Xen host (thread) and a qemu-storage-daemon null-co export, then for each data
path builds the daemon's pieces for one guest (IOREQ server, device model, vhost-user front-end)
and drives the simulator's spec-following virtio-blk driver:

* ``zero-copy``: the back-end maps guest RAM itself (the simulator's labelled sim-only memfd
  exposure, the baseline);
* ``shadow``: guest RAM reached only through privcmd foreign mappings, chains bounced through the
  daemon's memfd (:mod:`xen_vhost_master.datapath.shadow`), as on real Xen.

Workloads: 4 KiB random read at QD 1 and QD 32 (IOPS), 64 KiB sequential read at QD 8 (MB/s).
QD n = batches of n requests, one notify per batch, all completed before the next batch.
CPU: the guest driver, the daemon and the simulated host share this process, so two figures are
printed per request: the whole process (``proc``) and the data path alone (``dp``: time spent in
``notify``/``used``, the part that differs between the two modes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vhost_user import AsyncFrontend

from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import WINDOW_SIZE
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestPageAllocator
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

__all__ = ["Result", "main"]

BASE, IRQ = 0x0200_0000, 33
DISK = 1 << 30
QSD = "qemu-storage-daemon"
WORKLOADS = (("4K rand read QD1", 4096, 1, True), ("4K rand read QD32", 4096, 32, True), ("64K seq read QD8", 65536, 8, False))


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    bytes: int
    proc_cpu: float
    dp_cpu: float
    notifies: int = 0  # guest QueueNotify writes
    calls: int = 0  # back-end call eventfd wake-ups
    interrupts: int = 0

    @property
    def iops(self) -> float:
        return self.requests / self.seconds

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6


@contextlib.contextmanager
def qsd_null(directory: str) -> Iterator[str]:
    sock = os.path.join(directory, "qsd.sock")
    exe = shutil.which(QSD)
    if exe is None:
        raise SystemExit(f"{QSD} not found (Debian 12: qemu-system-common, Debian 13: qemu-utils; `make deps` installs it)")
    argv = [exe, "--blockdev", f"driver=null-co,node-name=null0,size={DISK}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={sock},num-queues=1,writable=on"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{QSD} did not start")
            time.sleep(0.02)  # waiting for an external process's socket: polling is the only way
        yield sock
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kw: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            acc[0] += time.thread_time() - t
    return wrapper


async def run_mode(mode: str, host: SimHost, ctl: SimControl, sock: str, seconds: float, pool: int) -> dict[str, Result]:
    kernel = SimKernel(host.path)
    domid = ctl.create_domain(mem_bytes=256 << 20)
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    log = device_logger("xvm.bench", domid, mode)
    ioreq = IoreqServer(privcmd, evtchn, domid, log)
    memfd = -1
    guest_mem: ForeignGuestMemory | None = None
    if mode == "zero-copy":
        banks, memfd = ctl.sim_only_ram_memfd(domid)
        memory: Any = sim_memfd_export(banks, memfd)
    else:
        banks = [(int(a), int(b)) for a, b in ctl.domain_info(domid)["banks"]]
        guest_mem = ForeignGuestMemory(privcmd, domid, banks)
        memory = ShadowDataPath(guest_mem, banks, pool_size=pool, max_queues=1, max_queue_size=256, log=log)
    dp = [0.0]
    memory.notify = _timed(memory.notify, dp)
    memory.used = _timed(memory.used, dp)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock)
    device = Device(cfg, connect=lambda: AsyncFrontend.connect(sock), memory=memory,
                    set_irq=lambda level: ioreq.set_irq(IRQ, level), log=log)
    guest = await SimGuest.connect(host.path, domid)
    results: dict[str, Result] = {}
    try:
        ioreq.create()
        await device.start()
        ioreq.add_window(BASE, WINDOW_SIZE, device)
        ioreq.enable()
        blk = await VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), queue_size=256,
                                     features=VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX)
        rng = random.Random(1)
        for name, size, depth, rand in WORKLOADS:
            sectors, per = DISK // 512, size // 512
            pos = 0
            n = 0
            await blk.batch([BlkOp("read", 0, count=per)] * depth)  # warm-up
            dp[0] = 0.0
            st = device.stats
            ev0 = (st.notifies, st.per_queue_calls.get(0, 0), st.interrupts)
            t0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                ops = []
                for _ in range(depth):
                    if rand:
                        sector = rng.randrange(0, sectors // per) * per
                    else:
                        sector, pos = pos, (pos + per) % sectors
                    ops.append(BlkOp("read", sector, count=per))
                await asyncio.wait_for(blk.batch(ops), 30)
                n += depth
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            ev = (st.notifies - ev0[0], st.per_queue_calls.get(0, 0) - ev0[1], st.interrupts - ev0[2])
            results[name] = Result(n, wall, n * size, cpu, dp[0], *ev)
        await blk.close()
    finally:
        guest.close()
        await ioreq.close()
        await device.close()
        if isinstance(memory, ShadowDataPath):
            memory.close()
        if guest_mem is not None:
            guest_mem.close()
        if memfd >= 0:
            os.close(memfd)
        evtchn.close()
        privcmd.close()
        ctl.destroy_domain(domid)
    return results


def report(all_results: dict[str, dict[str, Result]], out: Any) -> None:
    zc, sh = all_results["zero-copy"], all_results["shadow"]
    out.write(f"{'workload':<20} {'zero-copy':>14} {'shadow':>14} {'shadow/zc':>10}   "
              f"{'CPU/req zc (proc, dp)':>24} {'CPU/req shadow (proc, dp)':>27}\n")
    for name, size, _, _ in WORKLOADS:
        a, b = zc[name], sh[name]
        if size >= 65536:
            va, vb, unit = a.mbps, b.mbps, "MB/s"
        else:
            va, vb, unit = a.iops, b.iops, "IOPS"
        out.write(
            f"{name:<20} {va:>9.0f} {unit:<4} {vb:>9.0f} {unit:<4} {vb / va:>9.2f}x   "
            f"{1e6 * a.proc_cpu / a.requests:>9.0f} µs, {1e6 * a.dp_cpu / a.requests:>5.1f} µs   "
            f"{1e6 * b.proc_cpu / b.requests:>11.0f} µs, {1e6 * b.dp_cpu / b.requests:>5.1f} µs\n"
        )
    out.write("events per request (guest notifies / back-end calls / guest interrupts):\n")
    for name, *_ in WORKLOADS:
        line = []
        for mode in ("zero-copy", "shadow"):
            r = all_results[mode][name]
            line.append(f"{mode} {r.notifies / r.requests:.2f} / {r.calls / r.requests:.2f} / {r.interrupts / r.requests:.2f}")
        out.write(f"  {name:<20} " + ",  ".join(line) + "\n")
    out.flush()


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="xsim-bench-") as d, SimHost(os.path.join(d, "xen.sock")) as host, \
            host.control() as ctl, qsd_null(d) as sock:
        results: dict[str, dict[str, Result]] = {}
        for _ in range(args.rounds):  # modes alternate, so a busy neighbour hurts both alike
            for mode in ("zero-copy", "shadow"):
                got = await run_mode(mode, host, ctl, sock, args.seconds, args.pool_mib << 20)
                best = results.setdefault(mode, got)
                for name, r in got.items():
                    if r.requests / r.seconds > best[name].requests / best[name].seconds:
                        best[name] = r
        report(results, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per workload and data path")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--pool-mib", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is shown")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        return uvloop.run(_main(args))
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
