"""``python -m xen_vhost_sim.tools.bench_instr``: the daemon's hot path in instructions (callgrind).

CPU time on a shared machine moves with its load (the micro benchmark's daemon CPU per IOREQ
ranged 22–34 µs over three runs at load ~4.5); the instructions a piece of code executes do not.
Each figure runs the code twice under ``valgrind --tool=callgrind`` (user-space instructions only:
the kernel's side of a system call is not counted), once with ``n`` operations and once with none,
and divides the difference by ``n``, so start-up and teardown cancel out:

* ``ioreq``: the daemon process (``xen-vhost-master``, sim-memfd, the relay microbenchmark's echo
  back-end, see :mod:`.bench`) under callgrind; the guest makes ``n`` MMIO reads (one IOREQ each)
  → instructions per IOREQ, and ``n // 5`` relay round trips (QueueNotify → back-end → interrupt
  → InterruptStatus read + ack) → instructions per relay round trip. The daemon's in-process
  simulated ioctls (SimKernel) are counted, as its CPU time counts them.
* ``vcpu``: the simulator's side of an IOREQ (what Xen's hypervisor does, nearly free there): a
  guest process (``SimGuest`` with a held vCPU, as :mod:`.bench` measures the round trip) under
  callgrind makes ``n`` MMIO reads of a live daemon's window (the daemon, the simulated host and
  the echo back-end run outside callgrind) → instructions per held read.
* ``shadow``: the shadow engine alone (``ShadowDataPath.notify``/``used`` between a guest driver
  and a fake back-end, in one process, guest RAM a bytearray): 4 KiB read chains (a 16-byte
  header, 4 KiB of data, a status byte) at QD 32 (``--depth``: another queue depth, e.g. 1: one
  chain per notify) → instructions per request, the guest driver's and the fake back-end's
  share included.
* ``backend``: the real-Xen lab's Python RAM disk alone (``XenRamDiskBlk.handle_request`` as
  ``python -m xen_vhost_master.backend.blk`` runs it: its ``XenRegionMapper``, no grant region),
  guest memory a plain memfd region: read requests of ``--pages`` 4 KiB buffers, 8 KiB apart (as
  Linux's virtio-blk sends a request whose pages are not contiguous) → instructions per request.

Needs valgrind. SIM-ONLY numbers, like every benchmark here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

VALGRIND = "valgrind"
ENGINE_QD = 32
VALGRIND_READY = 600.0  # s: a daemon under callgrind runs some 50x slower (more on a loaded machine)


def callgrind_total(path: str) -> int:
    """The instructions a callgrind output file counted (its ``summary:`` or ``totals:`` line)."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise ValueError(f"{path}: no summary line (did the program exit normally?)")


def _valgrind(out: str) -> list[str]:
    return [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]


# ---------------------------------------------------------------------------------------------- ioreq
@contextlib.asynccontextmanager
async def _live_daemon(wrap: Sequence[str] = ()) -> AsyncIterator[tuple[str, int, Any, Any, Any]]:
    """The micro benchmark's set-up (:mod:`.bench`): a simulated host, the echo back-end, a domain
    and a daemon (under ``wrap``) serving its rng device, brought up by a guest's driver. Yields
    (the host's socket, the domid, the guest, its register write and read: ``micro_device_up``'s);
    every process stopped however the body ends (the daemon by SIGTERM, so that callgrind writes
    its file)."""
    from xen_vhost_sim.guest import SimControl, SimGuest
    from xen_vhost_sim.tools import bench

    harness = bench._harness()
    with bench._workdir(False) as work, harness.peers_in(work) as peers:
        sim = str(peers.sock_dir / "xen.sock")
        bench.start_sim(peers, sim)
        sock = peers.sock_path("echo.sock")
        echo = peers.start("echo-backend", [sys.executable, "-m", "xen_vhost_sim.tools.bench", "--echo-backend", str(sock)])
        echo.wait_listening(sock)
        with SimControl(sim) as ctl:
            domid = ctl.create_domain(mem_bytes=64 << 20)
        daemon = bench.Daemon(peers, work, sim, domid, f"type=rng,base={bench.BASE:#x},irq={bench.IRQ},socket={sock}",
                              wrap=wrap)
        guest = await SimGuest.connect(sim, domid)
        try:
            await daemon.ready(VALGRIND_READY)
            w, r = await bench.micro_device_up(guest)
            yield sim, domid, guest, w, r
        finally:
            guest.close()
            daemon.proc.stop(timeout=bench.STEP)
            daemon.notify.close()
            echo.stop()


async def _daemon_run(work_out: str, reads: int, relays: int) -> int:
    """Instructions of one daemon lifetime serving ``reads`` MMIO reads and ``relays`` relay
    round trips after the device's bring-up."""
    from xen_vhost_sim.guest_driver import MmioReg as R
    from xen_vhost_sim.tools import bench

    async with _live_daemon(_valgrind(work_out)) as (_sim, _domid, guest, w, r):
        for _ in range(reads):
            await r(R.MAGIC_VALUE)
        for _ in range(relays):
            await w(R.QUEUE_NOTIFY, 0)
            await asyncio.wait_for(guest.wait_irq(bench.IRQ), bench.STEP)
            await w(R.INTERRUPT_ACK, await r(R.INTERRUPT_STATUS))
        await w(R.STATUS, 0)
    return callgrind_total(work_out)


async def ioreq_figures(n: int, tmp: str) -> dict[str, float]:
    base = await _daemon_run(os.path.join(tmp, "ioreq-0.out"), 0, 0)
    reads = await _daemon_run(os.path.join(tmp, "ioreq-r.out"), n, 0)
    relays = await _daemon_run(os.path.join(tmp, "ioreq-q.out"), 0, max(1, n // 5))
    return {"daemon instructions per IOREQ (1 MMIO read)": (reads - base) / n,
            "daemon instructions per relay round trip": (relays - base) / max(1, n // 5)}


# ---------------------------------------------------------------------------------------------- kernel
def kernel_child(n: int, bare: bool) -> int:
    """``n`` IOREQ events through the in-process simulated kernel alone: per event the guest's side
    raises the vCPU port's deliver eventfd, then what the daemon asks its kernel for one IOREQ (the
    evtchn read, the unmask write, the NOTIFY ioctl: ``SimKernel.read``/``write``/``ioctl``, as
    ``EventChannel`` calls them), then the guest's side reads its wake eventfd. ``bare``: the same
    eventfd system calls made directly instead of the three kernel calls (what a real dom0's
    kernel does in kernel mode, which callgrind does not count). Returns the events served."""
    from xen_vhost_master.xen.dmop import DeviceModel
    from xen_vhost_master.xen.evtchn import _NOTIFY, MAX_PORTS_PER_READ, EventChannel
    from xen_vhost_master.xen.ioreq import IoreqPage
    from xen_vhost_master.xen.privcmd import PrivCmd
    from xen_vhost_master.xen.abi import ioctl_evtchn_notify
    from xen_vhost_sim.host import SimHost
    from xen_vhost_sim.simkernel import SimKernel

    from xen_vhost_sim.tools import bench

    with tempfile.TemporaryDirectory(prefix="xvm-instr-k-") as d, SimHost(os.path.join(d, "xen.sock")) as host, \
            host.control() as ctl:
        domid = ctl.create_domain(mem_bytes=16 << 20)
        kernel = SimKernel(host.path)
        with PrivCmd(kernel) as pc, EventChannel(kernel) as ev:
            dm = DeviceModel(pc, domid)
            sid = dm.create_ioreq_server()
            page = IoreqPage.map(pc, domid, sid, 1)
            try:
                dm.map_io_range(sid, bench.BASE, bench.BASE + 0x1FF)
                dm.set_ioreq_server_state(sid, True)
                port = ev.bind_interdomain(domid, page.vp_eport(0))
                ev.unmask(*ev.read_pending())  # the bind-time event
                _reply, fds = ctl.call({"op": "vcpu_server", "domid": domid, "uid": _uid(ctl, domid), "vcpu": 0})
                wake, deliver = fds[1], fds[2]
                arg = ioctl_evtchn_notify(port)
                data = struct.pack("=I", port)
                for _ in range(n):
                    os.eventfd_write(deliver, 1)
                    if bare:
                        os.eventfd_read(deliver)
                        os.eventfd_write(wake, 1)
                    else:
                        kernel.read(ev.fd, 4 * MAX_PORTS_PER_READ)
                        kernel.write(ev.fd, data)
                        kernel.ioctl(ev.fd, _NOTIFY, arg)
                    os.eventfd_read(wake)  # (non-blocking: raises if NOTIFY did not wake the vCPU)
                for fd in fds:
                    os.close(fd)
            finally:
                page.close()
    return n


def _uid(ctl: Any, domid: int) -> int:
    """The uid of the domain's one IOREQ server in its vCPU channel page (sim.vcpu_channel)."""
    import mmap

    from xen_vhost_sim import vcpu_channel

    _r, fds = ctl.call({"op": "vcpu_channel", "domid": domid})
    try:
        buf = mmap.mmap(fds[0], vcpu_channel.PAGE)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        snap = vcpu_channel.read_snapshot(buf)
        assert snap is not None and snap.entries
        return int(snap.entries[0][2])
    finally:
        buf.close()


def kernel_figures(n: int, tmp: str) -> dict[str, float]:
    totals = {}
    for bare in (False, True):
        for count in (0, n):
            out = os.path.join(tmp, f"kernel-{int(bare)}-{count}.out")
            subprocess.run([*_valgrind(out), "-m", "xen_vhost_sim.tools.bench_instr", "--kernel-child", str(count)]
                           + (["--bare"] if bare else []), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            totals[bare, count] = callgrind_total(out)
    sim = (totals[False, n] - totals[False, 0]) / n
    bare_ = (totals[True, n] - totals[True, 0]) / n
    return {"simulated kernel instructions per IOREQ (evtchn read, unmask, NOTIFY: SimKernel)": sim - bare_}


# ---------------------------------------------------------------------------------------------- vcpu
async def vcpu_child(n: int) -> int:
    """``n`` held MMIO reads of a live daemon's register, after its device's bring-up."""
    from xen_vhost_sim.guest import SimGuest
    from xen_vhost_sim.guest_driver import MMIO_MAGIC
    from xen_vhost_sim.guest_driver import MmioReg as R
    from xen_vhost_sim.tools import bench

    async with _live_daemon() as (sim, domid, _guest, _w, _r):
        held = await SimGuest.connect(sim, domid, vcpu_hold=bench.VCPU_HOLD)
        try:
            for _ in range(20):  # the route fetched, the daemon's first reads: not counted
                await held.mmio_read(bench.BASE + R.MAGIC_VALUE, 4)
            for _ in range(n):
                if await held.mmio_read(bench.BASE + R.MAGIC_VALUE, 4) != MMIO_MAGIC:
                    raise RuntimeError("the daemon's MagicValue read wrong")
        finally:
            held.close()
    return n


def vcpu_figures(n: int, tmp: str) -> dict[str, float]:
    totals = []
    for count in (0, n):
        out = os.path.join(tmp, f"vcpu-{count}.out")
        subprocess.run([*_valgrind(out), "-m", "xen_vhost_sim.tools.bench_instr", "--vcpu-child", str(count)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals.append(callgrind_total(out))
    return {"simulated vCPU instructions per held MMIO read (SimGuest)": (totals[1] - totals[0]) / n}


# ---------------------------------------------------------------------------------------------- shadow
def engine(n: int, depth: int = ENGINE_QD, pages: int = 1, *, write: bool = False, spent: list[int] | None = None) -> int:
    """``n`` (rounded up to a batch) read chains (``write``: write chains) through the shadow
    engine at QD ``depth``, EVENT_IDX, indirect descriptors and VERSION_1 negotiated; returns the
    requests served. ``pages`` 1: a 16-byte header, 4 KiB of data and a status byte in three
    descriptors; more: that many 4 KiB pages, 4 KiB apart, in an indirect table with the header
    and the status, as Linux's virtio-blk sends a request of that size. ``spent``: the
    nanoseconds spent in the engine's ``notify`` and ``used`` are appended to it."""
    from vhost_user.virtqueue import FlatMemory, SplitQueueDevice, SplitQueueDriver, split_ring_layout

    from xen_vhost_master.datapath.shadow import ShadowDataPath
    from xen_vhost_master.virtio_mmio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, QueueConfig

    gbase, num = 0x4000_0000, 256
    stride = 8192 * (pages + 1)  # request k: header at +stride*k, status at +64, table at +2048, pages from +8192
    gsize = (1 << 20) + stride * depth
    mem = FlatMemory(mmap.mmap(-1, gsize), gbase)  # (page-aligned, as guest RAM is)
    dp = ShadowDataPath(mem, [(gbase, gsize)], pool_size=max(4 << 20, 2 * depth * stride), max_queues=1,
                        max_queue_size=num)
    desc, avail, used, _ = split_ring_layout(num, gbase)
    drv = SplitQueueDriver(mem, num, desc, avail, used, event_idx=True)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    backend: SplitQueueDevice | None = None
    try:
        rings = dp.open_queue(QueueConfig(0, num, desc, avail, used),
                              1 << F_EVENT_IDX | 1 << F_INDIRECT_DESC | 1 << F_VERSION_1, kick)
        backend = SplitQueueDevice(dp.shadow, num, rings.desc, rings.avail, rings.used, event_idx=True)
        data = gbase + (1 << 20)
        done = 0
        while done < n:
            for k in range(depth):
                at = data + stride * k
                body = [(at + 4096, 4096)] if pages == 1 else [(at + 8192 * (i + 1), 4096) for i in range(pages)]
                readable, writable = ([(at, 16), *body], [(at + 64, 1)]) if write else ([(at, 16)], [*body, (at + 64, 1)])
                if pages == 1:
                    drv.add(readable, writable)
                else:
                    drv.add_indirect(at + 2048, readable, writable)
            t0 = time.perf_counter_ns()
            dp.notify(0)
            t1 = time.perf_counter_ns()
            while (c := backend.pop()) is not None:
                backend.push(c.head, 1 if write else 4096 * pages + 1)
            t2 = time.perf_counter_ns()
            dp.used(0)
            if spent is not None:
                spent.append(t1 - t0 + time.perf_counter_ns() - t2)
            if len(drv.get_used()) != depth:
                raise RuntimeError("the shadow engine lost a chain")
            done += depth
        return done
    finally:
        if backend is not None:
            backend.release()
        drv.release()
        dp.close()
        mem.release()
        os.close(kick)


def engine_wall(n: int, depth: int, pages: int, write: bool, runs: int = 5) -> dict[str, float]:
    """The shadow engine's own time per request (``notify`` + ``used``, in this process, no
    valgrind), the best of ``runs`` runs of ``n`` requests: a machine's load moves it less than
    the fio figures, more than instructions."""
    best = float("inf")
    for _ in range(runs):
        spent: list[int] = []
        done = engine(n, depth, pages, write=write, spent=spent)
        best = min(best, sum(spent) / done / 1000)
    what = ("4k" if pages == 1 else f"{4 * pages}k") + (" write" if write else " read")
    return {f"shadow engine us per {what} request (QD{depth}, best of {runs})": best}


def backend(n: int, pages: int) -> int:
    """``n`` virtio-blk reads of ``pages`` 4 KiB buffers through ``XenRamDiskBlk.handle_request``
    (the lab's pyblk, with the mapper ``backend.blk.main`` gives it); returns the bytes it wrote
    into the guest's buffers (data and status), all requests together."""
    from vhost_user import MemoryRegion
    from vhost_user.virtqueue import Buffer, Chain, read_buffers, write_buffers

    from xen_vhost_master.backend.blk import XenRamDiskBlk
    from xen_vhost_master.backend.mapper import XenRegionMapper
    from xen_vhost_master.xen.kernel import RealKernel

    size = 8192 * (pages + 1)
    disk = XenRamDiskBlk(max(1 << 20, 4096 * pages))
    disk.xen_mapper = disk.release_mapper = XenRegionMapper(RealKernel())
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        disk.memory.add(MemoryRegion(0, size, 0x7000_0000, 0), fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        disk.memory.write(0, struct.pack("<IIQ", 0, 0, 0))  # VIRTIO_BLK_T_IN at sector 0
        chain = Chain(0, [Buffer(0, 16)], [*(Buffer(8192 * (i + 1), 4096) for i in range(pages)), Buffer(64, 1)])
        served = 0
        for _ in range(n):
            written = disk.handle_request(chain, read_buffers, write_buffers)
            if written != 4096 * pages + 1:
                raise RuntimeError(f"the RAM disk served {written} of a read's {4096 * pages + 1} bytes")
            served += written
        return served
    finally:
        disk.memory.clear()


def backend_figures(n: int, tmp: str, pages: int) -> dict[str, float]:
    totals = []
    for count in (0, n):
        out = os.path.join(tmp, f"backend-{count}.out")
        subprocess.run([*_valgrind(out), "-m", "xen_vhost_sim.tools.bench_instr", "--backend-child", str(count),
                        "--pages", str(pages)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals.append(callgrind_total(out))
    return {f"RAM disk (pyblk) instructions per {4 * pages}k read of {pages} buffers": (totals[1] - totals[0]) / n}


def shadow_figures(n: int, tmp: str, depth: int = ENGINE_QD, pages: int = 1, write: bool = False) -> dict[str, float]:
    totals = []
    for count in (0, n):
        out = os.path.join(tmp, f"engine-{count}.out")
        subprocess.run([*_valgrind(out), "-m", "xen_vhost_sim.tools.bench_instr", "--engine-child", str(count),
                        "--depth", str(depth), "--pages", str(pages), *(["--write"] if write else [])],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        totals.append(callgrind_total(out))
    n = -(-n // depth) * depth
    what = ("4k" if pages == 1 else f"{4 * pages}k") + (" write" if write else "") + " request" + \
        ("" if pages == 1 else f" of {pages} pages")
    return {f"shadow engine instructions per {what} (QD{depth})": (totals[1] - totals[0]) / n}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xen_vhost_sim.tools.bench_instr", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("ioreq", "kernel", "vcpu", "shadow", "backend"), help="one group of figures")
    p.add_argument("-n", type=int, default=5000, help="MMIO reads (relay round trips: n/5)")
    p.add_argument("--requests", type=int, default=3200, help="shadow engine requests")
    p.add_argument("--depth", type=int, default=ENGINE_QD,
                   help=f"shadow engine queue depth: chains per notify (default {ENGINE_QD}, at most 64)")
    p.add_argument("--pages", type=int, default=1,
                   help="shadow engine request size in 4 KiB pages (more than 1: an indirect table, as Linux sends)")
    p.add_argument("--write", action="store_true", help="shadow engine: write requests (the data device-readable)")
    p.add_argument("--wall", action="store_true",
                   help="shadow engine: its time per request in this process instead of instructions (no valgrind)")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    p.add_argument("--engine-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backend-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kernel-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vcpu-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_child is not None:
        engine(args.engine_child, args.depth, args.pages, write=args.write)
        return 0
    if args.backend_child is not None:
        backend(args.backend_child, args.pages)
        return 0
    if args.kernel_child is not None:
        kernel_child(args.kernel_child, args.bare)
        return 0
    if args.vcpu_child is not None:
        asyncio.run(vcpu_child(args.vcpu_child))
        return 0
    if args.wall and args.only != "shadow":
        p.error("--wall times the shadow engine: give --only shadow")
    if shutil.which(VALGRIND) is None and not args.wall:
        p.error("valgrind not found (Debian: apt install valgrind)")
    if args.n <= 0 or args.requests <= 0:
        p.error("-n and --requests must be positive")
    if not 1 <= args.depth <= 64:
        p.error("--depth must be 1 to 64 (the guest ring has 256 descriptors, 3 per chain)")
    if not 1 <= args.pages <= 128:
        p.error("--pages must be 1 to 128")
    figures: dict[str, Any] = {}
    if args.wall:
        figures.update(engine_wall(args.requests, args.depth, args.pages, args.write))
    else:
        figures.update(instruction_figures(args))
    for name, value in figures.items():
        print(f"{name:<52} {value:>10,.1f}" if args.wall else f"{name:<52} {value:>10,.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


def instruction_figures(args: argparse.Namespace) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="xvm-instr-") as tmp:
        if args.only in (None, "shadow"):
            figures.update(shadow_figures(args.requests, tmp, args.depth, args.pages, args.write))
        if args.only in (None, "backend"):
            figures.update(backend_figures(max(1, args.requests // 10), tmp, args.pages))
        if args.only in (None, "ioreq"):
            figures.update(asyncio.run(ioreq_figures(args.n, tmp)))
        if args.only in (None, "kernel"):
            figures.update(kernel_figures(args.n, tmp))
        if args.only in (None, "vcpu"):
            figures.update(vcpu_figures(args.n, tmp))
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
