"""``python -m xen_vhost_sim.tools.bench``: the benchmark suite (not a test), side by side, repeated.

Every figure is paired with its reference measured in the same run:

* **fio in a real Linux guest** (User-Mode Linux, fio from the host over hostfs, libaio):
  4k randread QD1, 4k randread QD32, 128k sequential read (QD4), on a qemu-storage-daemon null-co
  disk, **direct** (UML's virtio_uml straight to qsd: Linux's own vhost-user front-end, no daemon)
  vs **relayed** (UML → :class:`~xen_vhost_sim.uml_bridge.UmlBridge` → simulated Xen →
  ``xen-vhost-master`` (its own process) → qsd), in three variants: ``relayed`` (userspace relay,
  zero copy through the simulator's sim-memfd exposure), ``relayed_fastpath`` (the simulated dom0
  kernel has privcmd IOEVENTFD/IRQFD: kicks and interrupts bypass the daemon) and
  ``relayed_shadow`` (shadow virtqueues, the copying path real Xen needs); the paths alternate
  within each of ``--reps`` repetitions. **Grant rows** (in the first ``--grant-reps``
  repetitions, side by side with the others): UML as a grant-based guest (the bridge in grant
  mode grants the pages its chains point at) through ``grant_shadow`` (the daemon's shadow
  virtqueues over gntdev → qsd null-co) and ``grant_xenmmap`` (XEN_MMAP grant regions → the
  project's Python RAM-disk back-end, which maps the grants itself: qsd has no XEN_MMAP), with
  ratios against direct and against the matching relayed row.
* **relay microbenchmark**: a simulated guest's QueueNotify → daemon → a Python echo back-end that
  calls at once → daemon → interrupt line → the guest reads and acks InterruptStatus; round-trip
  p50/p99 and notifies/s vs a raw eventfd ping-pong between two Python processes (same run), and
  the bare IOREQ round trip (one MMIO read: guest → daemon → guest over the vCPU channel, see
  sim/xen_vhost_sim/vcpu_channel.py) side by side with the ping-pong (target <= 3x, the vCPU
  blocked for its answer as on Xen: ``SimGuest(vcpu_hold=...)``; also with the vCPU waiting in
  the guest's event loop) and with the same read sent through the simulated host
  (``SimGuest(vcpu_channel=False)``, the old path). The same relay round trip against a host
  with privcmd IOEVENTFD/IRQFD (the daemon's queue on them: it serves only InterruptStatus and
  InterruptACK). The daemon's CPU per IOREQ and per relay round trip: its threads' on-CPU time
  (``/proc/PID/task/*/schedstat``) over 10 blocks, each with its wall time (a block whose CPU
  exceeds it is flagged) and the CPU a raw eventfd peer pays per round trip in between, the floor.
  That CPU is the load's as much as the code's: when other processes run between two IOREQs
  (wall time per IOREQ far above the round trip) the same code costs up to 3x the CPU (cold
  caches; this VM charges interrupts to whoever runs); compare code with ``bench_instr``.
* guest-memory **mapping time** (``PrivCmd.map_foreign`` through the simulator) for 256 MiB,
  1 GiB and 4 GiB guests.
* the daemon's **RSS** idle (after READY) and under load (max during the relayed fio; with its
  anonymous, file-backed and memfd parts: ``/proc/PID/status``), its CPU seconds per relayed
  run, **idle wake-ups/s** (context switches of all its threads over ``--idle-window`` s with a
  live device: must be 0), **start → READY** time (sd_notify).

fio runs with ``--output-format=json`` in the guest (condensed to one line per job, see
tests/peers/uml_init.sh): IOPS, bandwidth in bytes/s (MB/s = 10^6 bytes/s), completion-latency
p50/p99. Each relayed job's **IOREQs, QueueNotify writes and interrupts per I/O** come from the
bridge's counters read at the job's edges (:class:`JobMarks`); at QD1 they bound what any
daemon could reach: each I/O waits for its IOREQ round trips one after the other, and none can be
quicker than the raw eventfd ping-pong, so relayed/direct can be at most
1 / (1 + IOREQs per I/O x ping-pong x direct IOPS) (the **ceiling** row), and the IOREQ round trip
measured with the vCPU held says how much of the time each relayed I/O adds they account for.
Progress goes to stderr, one line per phase with an estimate of the time left. Prints a table
(median, min, max, fixed precision per unit) and writes ``bench-results.json``; ``--plot
FILE`` also draws each path against its reference (needs the ``plot`` extra: matplotlib). Needs
linux.uml, fio, qemu-storage-daemon (as the peer tests). SIM-ONLY numbers: the simulator's Xen is
Python. The packages the processes run from are byte-compiled first (:func:`byte_compile`), as an
installed daemon's are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("xen_vhost_sim.tools.bench")

BASE, IRQ = 0x0200_0000, 33
JOBS = {"randread_4k_qd1": "randread:4k:1", "randread_4k_qd32": "randread:4k:32", "read_128k_qd4": "read:128k:4"}
STEP = 60.0  # bound on any single wait
#: How long the held vCPU of the IOREQ round trip waits blocked before it waits through its loop.
VCPU_HOLD = 0.05
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]  # sim/xen_vhost_sim/tools/bench.py


def _harness() -> Any:
    """The peers harness (tests/peers/harness.py) starts and always kills UML and qsd."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.peers import harness

    return harness


# ---------------------------------------------------------------------------------------------- /proc
#: /proc/PID/status fields of the RSS and its parts (the kernel's own counters: the three sum to VmRSS).
RSS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def rss_parts_kib(pid: int) -> dict[str, int]:
    """The RSS of ``pid`` and its parts, KiB: ``anon`` (malloc's heap, Python's arenas, anonymous
    mappings), ``file`` (the interpreter, libraries and other files mapped), ``shmem`` (memfds: the
    bounce pool, and in the simulator the guest's RAM as the daemon touches it)."""
    out = dict.fromkeys(RSS_FIELDS.values(), 0)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in RSS_FIELDS:
                out[RSS_FIELDS[key]] = int(value.split()[0])
    return out


def ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid`` (= wake-ups)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- processes
#: The packages the processes under test run from.
MEASURED_PACKAGES = ("vhost_user", "xen_vhost_master", "xen_vhost_sim")


def byte_compile(packages: Sequence[str] = MEASURED_PACKAGES) -> list[str]:
    """Byte-compile ``packages`` where this interpreter finds them (so a tree given by PYTHONPATH
    too: the daemons inherit this environment); returns the directories that could not be. An
    installed daemon runs from the .pyc files its installation wrote (packaging/build_deb.py); one
    started from a source tree without them compiles each module as it imports it (on every start
    under PYTHONDONTWRITEBYTECODE or from a read-only tree), and what the compiler allocated stays
    in its RSS."""
    import compileall
    import importlib.util

    failed = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        for where in (spec.submodule_search_locations or []) if spec is not None else []:
            if not compileall.compile_dir(where, quiet=1):
                failed.append(where)
    return failed


#: The daemon's ``main`` under cProfile, its statistics written to argv[1] once it returns.
PROFILED_MAIN = ("import cProfile, sys\nfrom xen_vhost_master.cli import main\np = cProfile.Profile()\n"
                 "try:\n    sys.exit(p.runcall(main, sys.argv[2:]))\nfinally:\n    p.dump_stats(sys.argv[1])\n")


def start_sim(peers: Any, path: str, *extra: str) -> Any:
    p = peers.start("xen-vhost-sim", [str(BIN / "xen-vhost-sim"), "--socket", path, *extra])
    p.wait_listening(Path(path))
    return p


class Daemon:
    """``xen-vhost-master`` for one domain and one device, READY through a real NOTIFY_SOCKET."""

    def __init__(self, peers: Any, work: Path, sim_path: str, domid: int, device: str, profile: Path | None = None,
                 memory: str = "sim-memfd", wrap: Sequence[str] = ()) -> None:
        """``memory``: the --memory mode (sim-memfd, shadow, or auto for grant devices); ``wrap``:
        a command the daemon runs under (e.g. valgrind and the interpreter)."""
        self.notify_path = work / f"notify-{domid}-{time.monotonic_ns()}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        runtime = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        env = dict(os.environ, XEN_VHOST_SIM=sim_path, NOTIFY_SOCKET=str(self.notify_path))
        argv = [str(BIN / "xen-vhost-master"), "--domid", str(domid), "--no-xenstore", "--memory", memory,
                "--runtime-dir", str(runtime), "--device", device]
        if memory != "sim-memfd":
            # The UML domain's RAM starts at guest-physical 0: x86's layout, not libxl's Arm one.
            argv += ["--guest-arch", "x86_64"]
        if profile is not None:  # (the command ends with os._exit: cProfile's -m would never write)
            argv = [sys.executable, "-c", PROFILED_MAIN, str(profile), *argv[1:]]
        argv = [*wrap, *argv]
        self.t0 = time.perf_counter()
        self.proc = peers.start("xen-vhost-master", argv, env=env)
        self.ready_s = 0.0

    async def ready(self, timeout: float = STEP) -> float:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # STATUS= progress lines come first (sd_notify)
            msg = await asyncio.wait_for(loop.sock_recv(self.notify, 4096), max(0.0, deadline - loop.time()))
            if b"READY=1" in msg.split(b"\n"):
                break
            if msg.startswith(b"ERRNO=") or b"STOPPING=1" in msg:
                raise RuntimeError(f"daemon said {msg!r}")
        self.ready_s = time.perf_counter() - self.t0
        return self.ready_s

    def stop(self) -> None:
        self.proc.stop()
        self.notify.close()
        with contextlib.suppress(OSError):
            self.notify_path.unlink()


# ---------------------------------------------------------------------------------------------- fio
def parse_fio(verdicts: list[str]) -> dict[str, list[float]]:
    """{job: [value per repetition]} from the guest's ``FIOJ <rep> <job> <json>`` lines (fio's JSON
    output, read side): IOPS for 4k jobs, MB/s (bw_bytes / 10^6) for the 128k one; and, under
    ``<job>.clat_p50_us`` / ``<job>.clat_p99_us``, the completion latency percentiles, under
    ``<job>.ios`` the I/Os it completed."""
    names = {v: k for k, v in JOBS.items()}
    out: dict[str, list[float]] = {}
    for line in verdicts:
        if not line.startswith("FIOJ "):
            continue
        _tag, _rep, job, text = line.split(" ", 3)
        rd = json.loads(text)["read"]
        name = names[job]
        value = float(rd["bw_bytes"]) / 1e6 if "128k" in job else float(rd["iops"])
        out.setdefault(name, []).append(value)
        out.setdefault(f"{name}.ios", []).append(float(rd["io_bytes"]) / job_block_size(job))
        for q in ("p50", "p99"):
            ns = rd.get(f"clat_ns_{q}")
            if ns is not None:
                out.setdefault(f"{name}.clat_{q}_us", []).append(float(ns) / 1e3)
    return out


def job_block_size(job: str) -> int:
    """The block size in bytes of a fio job spec ``rw:bs:iodepth`` (``randread:4k:1``: 4096)."""
    bs = job.split(":")[1].lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(bs[-1:], 1)
    return int(bs.rstrip("km")) * scale


#: The UML bridge's counters (``BridgeStats``) each relayed fio job's share of is reported, beside
#: the accesses of them the simulated dom0 kernel answered (``kernel_answered``: the fast path's
#: QueueNotify writes, which never reach the daemon) and the CPU nanoseconds of the daemon (all its
#: threads, ``oncpu_ns``) and of the simulated guest side (the bridge: this process's thread) over
#: the job (``daemon_ns``, ``guest_ns``).
JOB_COUNTERS = ("mmio", "notifies", "interrupts")


class JobMarks:
    """Each fio job's share of a relay's counters. The guest announces a job ("UMLT: FIOS <rep>
    <job>") a second before the job's first I/O and reports it ("UMLT: FIOJ ...") after its last
    (tests/peers/uml_init.sh); :meth:`look`, called a few times a second, reads what the console
    log gained since the last look and takes ``counters()`` once for the marks it finds, so each
    job's deltas hold its own I/O and nothing of the next job's. ``jobs``: job spec → deltas."""

    def __init__(self, log_path: Path, counters: Callable[[], dict[str, int]]) -> None:
        self._path, self._counters = log_path, counters
        self._pos, self._rest = 0, b""
        self._open: dict[str, dict[str, int]] = {}
        self.jobs: dict[str, dict[str, int]] = {}

    def look(self) -> None:
        with open(self._path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()  # (a line the guest has not finished)
        now: dict[str, int] | None = None
        for raw in lines:
            _, sep, verdict = raw.decode(errors="replace").partition("UMLT: ")
            words = verdict.split()
            if not sep or len(words) < 3 or words[0] not in ("FIOS", "FIOJ"):
                continue
            now = now or self._counters()
            if words[0] == "FIOS":
                self._open[words[2]] = now
            elif (start := self._open.pop(words[2], None)) is not None:
                self.jobs[words[2]] = {k: now[k] - start[k] for k in now}


def uml_fio_env(fio_time: int) -> dict[str, str]:
    return {"UMLT_FIO_JOBS": ",".join(JOBS.values()), "UMLT_FIO_TIME": str(fio_time), "UMLT_FIO_ENGINE": "libaio",
            "UMLT_FIO_OUTPUT": "json"}


async def fio_direct(peers: Any, fio_time: int) -> dict[str, list[float]]:
    from xen_vhost_sim.uml_bridge import no_aslr

    qsd = peers.qsd_null(size=1 << 30, num_queues=1)
    with no_aslr():  # UML's memory = mem=, without a random exec-shield gap (same for both paths)
        run = peers.uml(qsd.sock, mode="fio", mem="512M", env=uml_fio_env(fio_time))
    verdicts = await run.finish(timeout=STEP + 4 * fio_time)
    if "DONE 0" not in verdicts:
        raise RuntimeError("direct fio failed:\n" + run.process.log_tail(30))
    qsd.process.stop()
    return parse_fio(verdicts)


def python_backend(peers: Any, sim_path: str) -> tuple[Any, str]:
    """The project's RAM-disk back-end with XEN_MMAP (xen-blk-backend) on the simulated host."""
    sock = peers.sock_path(f"xblk-{time.monotonic_ns() % 10**6}.sock")
    proc = peers.start("xen-blk-backend", [sys.executable, "-m", "xen_vhost_master.backend.blk", "--socket", str(sock),
                                           "--size", "256M"], env=dict(os.environ, XEN_VHOST_SIM=sim_path))
    proc.wait_listening(Path(sock))
    return proc, str(sock)


async def fio_relayed(peers: Any, work: Path, sim_path: str, fio_time: int, results: dict[str, Any],
                      profile: Path | None = None, memory: str = "sim-memfd", *, grants: bool = False,
                      backend: str = "qsd") -> dict[str, list[float]]:
    from vhost_user.aio.transport import UnixListener
    from xen_vhost_sim.uml_bridge import UmlBridge, no_aslr

    if backend == "python":
        qsd_proc, qsd_sock = python_backend(peers, sim_path)
    else:
        qsd = peers.qsd_null(size=1 << 30, num_queues=1)
        qsd_proc, qsd_sock = qsd.process, qsd.sock
    path = peers.sock_path(f"uml-relay-{time.monotonic_ns() % 10**6}.sock")
    bridge = UmlBridge(sim_path, base=BASE, irq=IRQ, device_id=2, grants=grants)
    extra = ",grants=1" if grants else ""
    daemon: Daemon | None = None
    serving: asyncio.Task[None] | None = None
    with UnixListener(path) as listener:
        with no_aslr():
            run = peers.uml(path, mode="fio", mem="512M", env=uml_fio_env(fio_time))
        try:
            domid = await bridge.accept(listener, timeout=STEP)
            daemon = Daemon(peers, work, sim_path, domid, f"type=blk,base={BASE:#x},irq={IRQ},socket={qsd_sock}{extra}",
                            profile, memory)
            results["ready_s"].append(await daemon.ready())
            idle = rss_parts_kib(daemon.proc.pid)
            results["rss_idle_kib"].append(idle.pop("rss"))
            results["rss_idle_parts_kib"].append(idle)
            cpu0, guest0 = cpu_seconds(daemon.proc.pid), time.thread_time()
            serving = asyncio.get_running_loop().create_task(bridge.serve())
            peak = dict.fromkeys(RSS_FIELDS.values(), 0)
            pid = daemon.proc.pid
            marks = JobMarks(run.process.log_path, lambda: {**{k: getattr(bridge.stats, k) for k in JOB_COUNTERS},
                                                            "kernel_answered": bridge.kernel_answered,
                                                            "daemon_ns": oncpu_ns(pid), "guest_ns": time.thread_time_ns()})
            done = asyncio.ensure_future(run.finish(timeout=STEP + 4 * fio_time))
            tick = 0
            while not done.done():
                marks.look()  # (well inside the guest's second between a job's mark and its I/O)
                if tick % 5 == 0:
                    sample = rss_parts_kib(daemon.proc.pid)
                    if sample["rss"] > peak["rss"]:
                        peak = sample
                tick += 1
                await asyncio.wait([done], timeout=0.1)
            verdicts = done.result()
            marks.look()
            results["jobs"].append(marks.jobs)
            results["rss_load_kib"].append(peak.pop("rss"))
            results["rss_load_parts_kib"].append(peak)  # the parts of the peak sample
            results["cpu_s_per_run"].append(cpu_seconds(daemon.proc.pid) - cpu0)
            results["guest_cpu_s_per_run"].append(time.thread_time() - guest0)  # the bridge runs in this thread
            await asyncio.wait_for(serving, STEP)
            # idle, with the device live (DRIVER_OK, back-end connected, rings started)
            w0, c0, t0 = ctx_switches(daemon.proc.pid), cpu_seconds(daemon.proc.pid), time.perf_counter()
            await asyncio.sleep(results["idle_window_s"])
            results["idle_wakeups_per_s"].append((ctx_switches(daemon.proc.pid) - w0) / (time.perf_counter() - t0))
            results["idle_cpu_s_per_s"].append((cpu_seconds(daemon.proc.pid) - c0) / (time.perf_counter() - t0))
            results["bridge"].append({**bridge.snapshot(), **({"grants": vars(bridge.grant_stats)} if grants else {})})
        finally:
            if serving is not None and not serving.done():
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
            if daemon is not None:
                daemon.stop()
            await bridge.close()
            qsd_proc.stop()
    if "DONE 0" not in verdicts:
        raise RuntimeError("relayed fio failed:\n" + run.process.log_tail(30))
    return parse_fio(verdicts)


# ---------------------------------------------------------------------------------------------- relay micro
def echo_backend(path: str) -> None:
    """A vhost-user back-end that calls back on every kick (the relay microbenchmark's peer)."""
    import uvloop

    from vhost_user.aio.device import VhostUserDevice, Vring
    from vhost_user.aio.server import serve_unix

    class Echo(VhostUserDevice):
        def handle_kick(self, vring: Vring) -> None:
            vring.call()

    uvloop.run(serve_unix(Echo, path))


_SYNC_CHILD = """
import os, sys
a, b = int(sys.argv[1]), int(sys.argv[2])
while True:
    os.eventfd_read(a)
    os.eventfd_write(b, 1)
"""


@contextlib.contextmanager
def _eventfd_peer(code: str, flags: int = os.EFD_CLOEXEC) -> Iterator[tuple[int, int, int]]:
    """Two eventfds (ping, pong) and a child Python process running ``code`` with their numbers
    as argv[1:3]; yields (ping, pong, the child's pid); the child killed and both fds closed
    however the body ends."""
    ping, pong = os.eventfd(0, flags), os.eventfd(0, flags)
    try:
        child = subprocess.Popen([sys.executable, "-c", code, str(ping), str(pong)], pass_fds=(ping, pong))
        try:
            yield ping, pong, child.pid
        finally:
            child.kill()
            child.wait()
    finally:
        os.close(ping)
        os.close(pong)


def eventfd_pingpong(n: int) -> list[float]:
    """Round trips of a raw eventfd ping-pong with a child Python process (blocking reads)."""
    out = []
    with _eventfd_peer(_SYNC_CHILD) as (ping, pong, _pid):
        for _ in range(n):
            t0 = time.perf_counter()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            out.append(time.perf_counter() - t0)
    return out


_ASYNC_CHILD = """
import os, sys, uvloop
a, b = int(sys.argv[1]), int(sys.argv[2])
def on_ping():
    os.eventfd_read(a)
    os.eventfd_write(b, 1)
async def main():
    import asyncio
    asyncio.get_running_loop().add_reader(a, on_ping)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def eventfd_pingpong_async(n: int) -> list[float]:
    """Round trips of an eventfd ping-pong between two Python event loops (uvloop ``add_reader`` on
    both sides): the floor for any path where both ends are asyncio processes, as the guest and the
    daemon are."""
    loop = asyncio.get_running_loop()
    out: list[float] = []
    with _eventfd_peer(_ASYNC_CHILD, os.EFD_NONBLOCK) as (ping, pong, _pid):
        for _ in range(n):
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pong, _resolve, fut)
            t0 = time.perf_counter()
            os.eventfd_write(ping, 1)
            try:
                await asyncio.wait_for(fut, STEP)
            finally:
                loop.remove_reader(pong)
            os.eventfd_read(pong)
            out.append(time.perf_counter() - t0)
    return out


MmioWrite = Callable[[int, int], Awaitable[None]]
MmioRead = Callable[[int], Awaitable[int]]


async def micro_device_up(guest: Any) -> tuple[MmioWrite, MmioRead]:
    """Bring the microbenchmark's device (an rng at BASE, one queue of 64) to DRIVER_OK the way a
    driver does; returns its register write and read (offsets in the window)."""
    from xen_vhost_sim.guest_driver import DeviceStatus as S
    from xen_vhost_sim.guest_driver import MmioReg as R

    async def w(reg: int, v: int) -> None:
        await guest.mmio_write(BASE + reg, 4, v)

    async def r(reg: int) -> int:
        return int(await guest.mmio_read(BASE + reg, 4))

    await w(R.STATUS, 0)
    await w(R.STATUS, S.ACKNOWLEDGE)
    await w(R.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    await w(R.DRIVER_FEATURES_SEL, 1)
    await w(R.DRIVER_FEATURES, 1)  # VERSION_1
    await w(R.DRIVER_FEATURES_SEL, 0)
    await w(R.DRIVER_FEATURES, 0)
    await w(R.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    ram = 0x4000_0000 + (1 << 20)
    await w(R.QUEUE_SEL, 0)
    await w(R.QUEUE_NUM, 64)
    for reg, gpa in ((R.QUEUE_DESC_LOW, ram), (R.QUEUE_DRIVER_LOW, ram + 0x1000), (R.QUEUE_DEVICE_LOW, ram + 0x2000)):
        await w(reg, gpa)
        await w(reg + 4, 0)
    await w(R.QUEUE_READY, 1)
    await w(R.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    return w, r


async def relay_micro(peers: Any, work: Path, sim_path: str, n: int) -> dict[str, Any]:
    from xen_vhost_sim.guest import SimControl, SimGuest
    from xen_vhost_sim.guest_driver import MmioReg as R

    sock = peers.sock_path("echo.sock")
    echo = peers.start("echo-backend", [sys.executable, "-m", "xen_vhost_sim.tools.bench", "--echo-backend", str(sock)])
    echo.wait_listening(sock)
    with SimControl(sim_path) as ctl:
        domid = ctl.create_domain(mem_bytes=64 << 20)
    daemon = Daemon(peers, work, sim_path, domid, f"type=rng,base={BASE:#x},irq={IRQ},socket={sock}")
    guest = await SimGuest.connect(sim_path, domid)
    via_host = await SimGuest.connect(sim_path, domid, vcpu_channel=False)
    held = await SimGuest.connect(sim_path, domid, vcpu_hold=VCPU_HOLD)
    try:
        await daemon.ready()
        w, r = await micro_device_up(guest)
        ioreq, ioreq_held, ioreq_host, rtt = [], [], [], []
        for _ in range(max(1, n // 200)):  # the paths alternate in blocks: same machine load for all
            for _ in range(50):
                t0 = time.perf_counter()
                await r(R.MAGIC_VALUE)
                ioreq.append(time.perf_counter() - t0)
            for _ in range(50):
                t0 = time.perf_counter()
                await held.mmio_read(BASE + R.MAGIC_VALUE, 4)
                ioreq_held.append(time.perf_counter() - t0)
            for _ in range(50):
                t0 = time.perf_counter()
                await via_host.mmio_read(BASE + R.MAGIC_VALUE, 4)
                ioreq_host.append(time.perf_counter() - t0)
        for _ in range(n):
            t0 = time.perf_counter()
            await w(R.QUEUE_NOTIFY, 0)
            await asyncio.wait_for(guest.wait_irq(IRQ), STEP)
            await w(R.INTERRUPT_ACK, await r(R.INTERRUPT_STATUS))
            rtt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            await w(R.QUEUE_NOTIFY, 0)
        notifies_per_s = n / (time.perf_counter() - t0)
        async def one_ioreq() -> None:
            await r(R.MAGIC_VALUE)

        async def one_relay() -> None:
            await w(R.QUEUE_NOTIFY, 0)
            await asyncio.wait_for(guest.wait_irq(IRQ), STEP)
            await w(R.INTERRUPT_ACK, await r(R.INTERRUPT_STATUS))

        with _eventfd_peer(_SYNC_CHILD) as peer:
            await one_ioreq()  # the daemon's first read of this register is not timed
            cpu_ioreq = await cpu_blocks(daemon.proc.pid, one_ioreq, n, peer)
            cpu_relay = await cpu_blocks(daemon.proc.pid, one_relay, n, peer)
        await w(R.STATUS, 0)
        raw = await asyncio.get_running_loop().run_in_executor(None, eventfd_pingpong, n)  # same daemon alive
        raw_async = await eventfd_pingpong_async(n)
    finally:
        held.close()
        via_host.close()
        guest.close()
        daemon.stop()
        echo.stop()
    return {"relay_rtt_s": rtt, "raw_eventfd_rtt_s": raw, "async_eventfd_rtt_s": raw_async, "ioreq_rtt_s": ioreq,
            "ioreq_held_rtt_s": ioreq_held, "ioreq_via_host_rtt_s": ioreq_host, "notifies_per_s": notifies_per_s,
            "daemon_cpu_per_ioreq_s": statistics.median(b["cpu_s"] for b in cpu_ioreq),
            "daemon_cpu_per_relay_s": statistics.median(b["cpu_s"] for b in cpu_relay),
            "daemon_cpu_ioreq_blocks": cpu_ioreq, "daemon_cpu_relay_blocks": cpu_relay}


async def relay_fast_micro(peers: Any, work: Path, sim_path: str, n: int) -> dict[str, Any]:
    """The relay round trip of ``relay_micro`` on a host playing a kernel with privcmd ioeventfd and
    irqfd: the daemon puts its queue on them, so the QueueNotify goes to the back-end through the
    ioeventfd and its call comes back through the irqfd; the daemon serves only the
    InterruptStatus read and the InterruptACK."""
    from xen_vhost_sim.guest import SimControl, SimGuest
    from xen_vhost_sim.guest_driver import MmioReg as R

    sock = peers.sock_path("echo-fast.sock")
    echo = peers.start("echo-backend-fast", [sys.executable, "-m", "xen_vhost_sim.tools.bench", "--echo-backend",
                                             str(sock)])
    echo.wait_listening(sock)
    with SimControl(sim_path) as ctl:
        domid = ctl.create_domain(mem_bytes=64 << 20)
    daemon = Daemon(peers, work, sim_path, domid, f"type=rng,base={BASE:#x},irq={IRQ},socket={sock}")
    guest = await SimGuest.connect(sim_path, domid)
    try:
        await daemon.ready()
        w, r = await micro_device_up(guest)

        async def one_relay() -> None:
            await w(R.QUEUE_NOTIFY, 0)
            await asyncio.wait_for(guest.wait_irq(IRQ), STEP)
            await w(R.INTERRUPT_ACK, await r(R.INTERRUPT_STATUS))

        await one_relay()
        with SimControl(sim_path) as ctl:
            if not ctl.domain_info(domid)["fastpath"]["ioeventfds"]:
                raise RuntimeError("the daemon did not put its queue on the kernel fast path")
        rtt = []
        for _ in range(n):
            t0 = time.perf_counter()
            await one_relay()
            rtt.append(time.perf_counter() - t0)
        with _eventfd_peer(_SYNC_CHILD) as peer:
            cpu_relay = await cpu_blocks(daemon.proc.pid, one_relay, n, peer)
        await w(R.STATUS, 0)
    finally:
        guest.close()
        daemon.stop()
        echo.stop()
    return {"relay_rtt_s": rtt, "daemon_cpu_relay_blocks": cpu_relay}


def oncpu_ns(pid: int) -> int:
    """Nanoseconds all threads of process ``pid`` have run (each ``/proc/PID/task/TID/schedstat``'s
    first field: time on a CPU, steal time excluded, interrupts that hit the thread included; a
    thread that ended in between is not counted)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


#: Blocks the CPU figures are cut into (each its own sample, the median reported).
CPU_BLOCKS = 10


async def cpu_blocks(pid: int, op: Callable[[], Awaitable[None]], n: int,
                     peer: tuple[int, int, int]) -> list[dict[str, float]]:
    """Process ``pid``'s CPU per ``op`` (run ``n`` times in CPU_BLOCKS blocks), each block followed by
    as many raw eventfd round trips with ``peer`` (``_eventfd_peer(_SYNC_CHILD)``) whose CPU
    per round trip is measured the same way: what this machine charges, at that moment, a process
    that does nothing but wake up, read an eventfd and write one (the same wake-ups, the same
    interrupts charged to whoever runs, the same cache and clock state). Per block: ``cpu_s`` and
    ``wall_s`` per op (one thread cannot run longer than the wall: ``cpu_s > wall_s`` would mean the
    figure is wrong), ``floor_cpu_s`` per raw round trip."""
    ping, pong, child = peer
    per = max(1, n // CPU_BLOCKS)
    for _ in range(50):  # the child's start-up is not its cost per round trip
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)
    out = []
    for _ in range(CPU_BLOCKS):
        c0, t0 = oncpu_ns(pid), time.perf_counter()
        for _ in range(per):
            await op()
        wall, cpu = time.perf_counter() - t0, oncpu_ns(pid) - c0
        f0 = oncpu_ns(child)
        for _ in range(per):
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
        out.append({"cpu_s": cpu / 1e9 / per, "wall_s": wall / per, "floor_cpu_s": (oncpu_ns(child) - f0) / 1e9 / per})
    return out


# ---------------------------------------------------------------------------------------------- mapping
def mapping_times(reps: int) -> dict[str, list[float]]:
    from xen_vhost_sim.tools.bench_map import build_gfns
    from xen_vhost_sim.host import SimHost
    from xen_vhost_sim.memory import Arch, bank_layout
    from xen_vhost_sim.simkernel import SimKernel
    from xen_vhost_master.xen.privcmd import PrivCmd

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="xsim-bench-") as d, SimHost(os.path.join(d, "xen.sock")) as host:
        with PrivCmd(SimKernel(host.path)) as pc:
            for label, size in (("256MiB", 256 << 20), ("1GiB", 1 << 30), ("4GiB", 4 << 30)):
                with host.control() as ctl:
                    domid = ctl.create_domain(mem_bytes=size)
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fm = pc.map_foreign(domid, build_gfns(bank_layout(Arch.ARM64, size)))
                        out.setdefault(label, []).append(time.perf_counter() - t0)
                        if fm.failed():
                            raise RuntimeError(f"{label}: {len(fm.failed())} pages failed to map")
                        fm.close()
                    ctl.destroy_domain(domid)
    return out


# ---------------------------------------------------------------------------------------------- report
def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


#: One line of the report: figure, unit, summary, note.
Row = tuple[str, str, dict[str, float], str]


def cpu_rows(rel: dict[str, Any]) -> list[Row]:
    """The daemon's CPU figures from ``cpu_blocks``: per block samples (median, min, max), the wall
    time of the same blocks, and the floor (a raw eventfd peer's CPU per round trip, same blocks)."""
    rows: list[Row] = []
    for key, what, note in (("daemon_cpu_ioreq_blocks", "per IOREQ (1 MMIO read)", "target <= 10"),
                            ("daemon_cpu_relay_blocks", "per relay round trip",
                             "3 IOREQs + kick relay + call relay + 1 line raise")):
        blocks = rel[key]
        cpu = [1e6 * b["cpu_s"] for b in blocks]
        wall = [1e6 * b["wall_s"] for b in blocks]
        broken = sum(c > w * 1.02 for c, w in zip(cpu, wall))  # 2%: the two clocks are read apart
        rows.append((f"daemon CPU {what}", "us", summary(cpu), f"{note}; all threads, median of {len(blocks)} blocks"
                     + (f"; {broken} block(s) CPU > wall: NOT TRUSTWORTHY" if broken else "")))
        rows.append((f"  wall time {what}, same blocks", "us", summary(wall), "the daemon's CPU can only be less"))
        rows.append((f"  daemon CPU {what}/raw eventfd peer CPU", "ratio",
                     summary([b["cpu_s"] / b["floor_cpu_s"] for b in blocks if b["floor_cpu_s"] > 0]),
                     "per block; the peer only wakes, reads, writes"))
    floor = [1e6 * b["floor_cpu_s"] for b in rel["daemon_cpu_ioreq_blocks"]]
    rows.append(("raw eventfd peer CPU per round trip", "us", summary(floor), "the floor, in the IOREQ blocks"))
    return rows


#: Fixed precision per unit (digits after the point).
PRECISION = {"IOPS": 0, "MB/s": 1, "per IO": 2, "ratio": 3, "us": 1, "ms": 1, "MiB": 1, "s": 2, "1/s": 1, "s/s": 4}


def table(rows: list[tuple[str, str, dict[str, float], str]]) -> str:
    lines = [f"{'figure':<48} {'unit':<6} {'median':>11} {'min':>11} {'max':>11}  note", "-" * 112]
    for name, unit, s, note in rows:
        d = PRECISION.get(unit, 2)
        lines.append(f"{name:<48} {unit:<6} {s['median']:>11.{d}f} {s['min']:>11.{d}f} {s['max']:>11.{d}f}  {note}")
    return "\n".join(lines)


class Progress:
    """Phase progress on stderr with an estimate of the time left: each phase has a weight (its
    expected seconds); the estimate scales the remaining weight by the measured pace so far."""

    def __init__(self, phases: list[tuple[str, float]]) -> None:
        self.phases, self.done, self.t0 = phases, 0, time.perf_counter()
        self.total = sum(w for _n, w in phases) or 1.0
        self.spent = 0.0

    def start(self, name: str) -> None:
        i = next((k for k in range(self.done, len(self.phases)) if self.phases[k][0] == name), self.done)
        elapsed = time.perf_counter() - self.t0
        left = sum(w for _n, w in self.phases[i:])
        self.spent = sum(w for _n, w in self.phases[:i])  # expected seconds of the phases done
        pace = elapsed / self.spent if self.spent > 0 and elapsed > 0 else 1.0
        print(f"[{i + 1}/{len(self.phases)}] {name}: {elapsed:.0f} s elapsed, about {fmt_s(left * pace)} left",
              file=sys.stderr, flush=True)
        self.done = i

    def finish(self) -> None:
        print(f"done in {fmt_s(time.perf_counter() - self.t0)}", file=sys.stderr, flush=True)


def fmt_s(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def plan(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The phases of :func:`run_all` in order, each with its expected duration (s)."""
    boot = 3 * args.fio_time + 12.0  # a UML boot + the three fio jobs + teardown
    paths = [r[0] for r in RELAYED if r[0] in args.paths]
    grants = [g[0] for g in GRANTED if g[0] in args.paths]
    out: list[tuple[str, float]] = []
    if args.only != "micro":
        for rep in range(args.reps):
            out.append((f"fio direct, repetition {rep + 1}/{args.reps}", boot))
            out += [(f"fio {n}, repetition {rep + 1}/{args.reps}", boot + 3.0 + args.idle_window) for n in paths]
            if rep < args.grant_reps:
                out += [(f"fio {n}, repetition {rep + 1}/{args.reps}", boot + 3.0 + args.idle_window) for n in grants]
    out.append(("relay and IOREQ microbenchmark", 5.0 + args.pingpong * 0.004))
    if args.only != "micro":
        out.append(("guest memory mapping", 4.0 * args.map_reps))
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "uml": subprocess.run(["linux.uml", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()}


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="xvm-bench-", dir="/tmp"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


#: The relayed variants: (name, simulated host, --memory, what it is).
RELAYED = (
    ("relayed", "plain", "sim-memfd", "userspace relay, zero copy (sim-memfd)"),
    ("relayed_fastpath", "eventfd", "sim-memfd", "kernel fast path emulated (privcmd ioeventfd/irqfd), zero copy"),
    ("relayed_shadow", "plain", "shadow", "userspace relay, shadow virtqueues (the real-Xen copy path)"),
)
#: Grant-based guest (the UML bridge in grant mode): name, back-end, --memory, the row it is compared with, note.
GRANTED = (
    ("grant_shadow", "qsd", "auto", "relayed_shadow", "grant guest, shadow virtqueues over gntdev -> qsd"),
    ("grant_xenmmap", "python", "auto", "relayed", "grant guest, XEN_MMAP grant regions -> Python RAM disk"),
)


def _daemon_figs(idle_window: float) -> dict[str, Any]:
    return {"ready_s": [], "rss_idle_kib": [], "rss_idle_parts_kib": [], "rss_load_kib": [], "rss_load_parts_kib": [],
            "cpu_s_per_run": [], "guest_cpu_s_per_run": [], "idle_wakeups_per_s": [], "idle_cpu_s_per_s": [], "bridge": [],
            "jobs": [], "idle_window_s": idle_window}


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    harness = _harness()
    res: dict[str, Any] = {"machine": machine(), "params": vars(args).copy(), "started": time.time()}
    res["not_byte_compiled"] = byte_compile()
    for where in res["not_byte_compiled"]:
        print(f"warning: {where} could not be byte-compiled: the daemons compile it as they start, "
              "and their RSS counts the compiler", file=sys.stderr)
    t_start = time.perf_counter()
    progress = Progress(plan(args))
    paths = [r for r in RELAYED if r[0] in args.paths]
    grant_paths = [g for g in GRANTED if g[0] in args.paths]
    with _workdir(args.keep) as work, harness.peers_in(work) as peers:
        sims = {"plain": str(peers.sock_dir / "xen.sock"), "eventfd": str(peers.sock_dir / "xenf.sock")}
        start_sim(peers, sims["plain"])
        if args.only == "micro":
            res.update(fio={"direct": {}}, paths={}, grant_paths={}, daemon={}, mapping_s={})
            progress.start("relay and IOREQ microbenchmark")
            res["relay"] = await relay_micro(peers, work, sims["plain"], args.pingpong)
            start_sim(peers, sims["eventfd"], "--privcmd-eventfd", "on")
            res["relay_fastpath"] = await relay_fast_micro(peers, work, sims["eventfd"], args.pingpong)
            res["elapsed_s"] = time.perf_counter() - t_start
            progress.finish()
            return res
        if any(host == "eventfd" for _n, host, _m, _d in paths):
            start_sim(peers, sims["eventfd"], "--privcmd-eventfd", "on")
        fio: dict[str, dict[str, list[float]]] = {"direct": {}, **{name: {} for name, *_ in (*paths, *grant_paths)}}
        daemon: dict[str, dict[str, Any]] = {name: _daemon_figs(args.idle_window) for name, *_ in (*paths, *grant_paths)}
        for rep in range(args.reps):  # the paths alternate within each repetition
            progress.start(f"fio direct, repetition {rep + 1}/{args.reps}")
            for k, v in (await fio_direct(peers, args.fio_time)).items():
                fio["direct"].setdefault(k, []).extend(v)
            for name, host, memory, _what in paths:
                progress.start(f"fio {name}, repetition {rep + 1}/{args.reps}")
                prof = work / "daemon.prof" if args.profile and rep == 0 and name == paths[0][0] else None
                got = await fio_relayed(peers, work, sims[host], args.fio_time, daemon[name], prof, memory)
                for k, v in got.items():
                    fio[name].setdefault(k, []).extend(v)
                if prof is not None and prof.exists():
                    shutil.copy(prof, args.profile)
            for name, backend, memory, _ref, _what in grant_paths if rep < args.grant_reps else ():
                progress.start(f"fio {name}, repetition {rep + 1}/{args.reps}")
                got = await fio_relayed(peers, work, sims["plain"], args.fio_time, daemon[name], None, memory,
                                        grants=True, backend=backend)
                for k, v in got.items():
                    fio[name].setdefault(k, []).extend(v)
        res["fio"] = fio
        res["paths"] = {name: what for name, _h, _m, what in paths}
        res["grant_paths"] = {name: {"what": what, "ref": ref} for name, _b, _m, ref, what in grant_paths}
        res["daemon"] = daemon
        progress.start("relay and IOREQ microbenchmark")
        res["relay"] = await relay_micro(peers, work, sims["plain"], args.pingpong)
        if "eventfd" not in {host for _n, host, _m, _d in paths}:
            start_sim(peers, sims["eventfd"], "--privcmd-eventfd", "on")
        res["relay_fastpath"] = await relay_fast_micro(peers, work, sims["eventfd"], args.pingpong)
    progress.start("guest memory mapping")
    res["mapping_s"] = await asyncio.get_running_loop().run_in_executor(None, mapping_times, args.map_reps)
    res["elapsed_s"] = time.perf_counter() - t_start
    progress.finish()
    return res


def report_daemon_rows(daemon: dict[str, dict[str, Any]], fio_time: int) -> list[Row]:
    """The daemon figures of each path (``_daemon_figs``), in the report's rows."""
    rows: list[Row] = []
    for name, dm in daemon.items():
        if not dm["ready_s"]:
            continue
        rows.append((f"daemon start -> READY ({name})", "ms", summary([1e3 * x for x in dm["ready_s"]]), ""))
        rows.append((f"daemon RSS idle ({name})", "MiB", summary([x / 1024 for x in dm["rss_idle_kib"]]), "target <= 40"))
        rows.append((f"daemon RSS under load ({name})", "MiB", summary([x / 1024 for x in dm["rss_load_kib"]]), "target <= 40"))
        for kind, what in (("anon", "heap and anonymous mappings"), ("file", "interpreter, libraries"),
                           ("shmem", "memfds: bounce pool, guest RAM touched")):
            parts = [p[kind] / 1024 for p in dm.get("rss_load_parts_kib", [])]
            if parts:
                rows.append((f"  of which {kind}", "MiB", summary(parts), what))
        rows.append((f"daemon CPU per fio run ({name})", "s", summary(dm["cpu_s_per_run"]),
                     f"{len(JOBS)} jobs x {fio_time} s"))
        if dm.get("guest_cpu_s_per_run"):
            rows.append((f"  simulated guest side CPU, same runs ({name})", "s", summary(dm["guest_cpu_s_per_run"]),
                         "the UML bridge's vCPU accesses and interrupts: a real guest's traps cost Xen a fraction"))
        rows.append((f"daemon idle wake-ups ({name})", "1/s", summary(dm["idle_wakeups_per_s"]), "target 0 (device live)"))
        rows.append((f"daemon CPU at idle ({name})", "s/s", summary(dm["idle_cpu_s_per_s"]), "device live"))
    return rows


def job_rows(res: dict[str, Any], job: str, name: str) -> list[Row]:
    """Path ``name``'s IOREQs per I/O in ``job`` (with its QueueNotify writes and interrupts per
    I/O), and the daemon's and the simulated guest side's CPU per I/O, from the counters taken at
    the job's edges (:class:`JobMarks`) and fio's I/O count, per repetition. At QD1 each I/O waits for its IOREQ round trips one after the other: the
    **ceiling** of relayed/direct with them all at the raw eventfd ping-pong p50 and nothing else
    costing anything, 1 / (1 + IOREQs per I/O x ping-pong x direct IOPS), and the **share** of
    the time the path adds per I/O (1/IOPS against direct's) that they take at the measured
    held IOREQ round trip p50."""
    fio, rel, spec = res["fio"], res["relay"], JOBS[job]
    ios = fio.get(name, {}).get(f"{job}.ios", [])
    direct, got = fio["direct"].get(job, []), fio.get(name, {}).get(job, [])
    per: dict[str, list[float]] = {k: [] for k in (*JOB_COUNTERS, "kernel_answered", "daemon_ns", "guest_ns")}
    ceiling: list[float] = []
    share: list[float] = []
    raw = pct(rel["raw_eventfd_rtt_s"], 0.5)
    held = pct(rel["ioreq_held_rtt_s"], 0.5) if rel.get("ioreq_held_rtt_s") else None
    for i, marks in enumerate(res["daemon"].get(name, {}).get("jobs", [])):
        counts = marks.get(spec)
        if counts is None or i >= len(ios) or ios[i] <= 0:
            continue
        for k, v in counts.items():
            if k in per:
                per[k].append(v / ios[i])
        n = counts["mmio"] / ios[i]
        if job.endswith("_qd1") and i < len(direct) and i < len(got):
            ceiling.append(1 / (1 + n * raw * direct[i]))
            if held is not None and got[i] < direct[i]:
                share.append(n * held / (1 / got[i] - 1 / direct[i]))
    if not per["mmio"]:
        return []
    rows: list[Row] = [(f"  IOREQs per I/O ({name})", "per IO", summary(per["mmio"]),
                        f"QueueNotify {statistics.median(per['notifies']):.2f}, "
                        f"interrupts {statistics.median(per['interrupts']):.2f} per I/O")]
    if per["kernel_answered"] and any(per["kernel_answered"]):  # (marks from before the count have none)
        rows.append((f"  of which the daemon served ({name})", "per IO",
                     summary([m - k for m, k in zip(per["mmio"], per["kernel_answered"], strict=False)]),
                     f"the dom0 kernel's ioeventfd answered {statistics.median(per['kernel_answered']):.2f} per I/O"))
    if per["daemon_ns"]:  # (results from before the CPU marks have none)
        rows.append((f"  daemon CPU per I/O ({name})", "us", summary([ns / 1e3 for ns in per["daemon_ns"]]),
                     "all its threads" + ("; target <= 5 per 4k request" if "_4k_" in job else "")))
        rows.append((f"  simulated guest side CPU per I/O ({name})", "us", summary([ns / 1e3 for ns in per["guest_ns"]]),
                     "the UML bridge (the vCPU's accesses, interrupts)"))
    if ceiling:
        rows.append((f"  {name}/direct ceiling", "ratio", summary(ceiling),
                     "its IOREQs at the raw ping-pong each, nothing else costing: no daemon can do more"))
    if share:
        rows.append((f"  IOREQ share of the time {name} adds", "ratio", summary(share),
                     "its IOREQs at the held round trip p50; the rest: relays, injection"))
    return rows


def report(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, dict[str, float], str]] = []
    fio = res["fio"]
    for job in JOBS:
        unit = "MB/s" if "128k" in job else "IOPS"
        d = fio["direct"].get(job)
        if not d:
            continue
        rows.append((f"fio {job} direct", unit, summary(d), "UML -> qsd null-co (no daemon)"))
        lat = fio["direct"].get(f"{job}.clat_p50_us")
        if lat:
            rows.append((f"fio {job} direct clat p50", "us", summary(lat), ""))
        for name, what in res["paths"].items():
            r = fio[name].get(job)
            if r:
                rows.append((f"fio {job} {name}", unit, summary(r), what))
                lat = fio[name].get(f"{job}.clat_p50_us")
                if lat:
                    rows.append((f"fio {job} {name} clat p50", "us", summary(lat), ""))
                rows.append((f"fio {job} {name}/direct", "ratio", summary([b / a for a, b in zip(d, r)]), "per repetition"))
                rows.extend(job_rows(res, job, name))
        for name, g in res.get("grant_paths", {}).items():
            r = fio[name].get(job)
            if not r:
                continue
            rows.append((f"fio {job} {name}", unit, summary(r), g["what"]))
            rows.append((f"fio {job} {name}/direct", "ratio", summary([b / a for a, b in zip(d, r)]), "same repetition"))
            rows.extend(job_rows(res, job, name))
            ref = fio.get(g["ref"], {}).get(job)
            if ref:
                note = "same back-end" if g["ref"] == "relayed_shadow" else "Python back-end vs qsd null-co"
                rows.append((f"fio {job} {name}/{g['ref']}", "ratio", summary([b / a for a, b in zip(ref, r)]), note))
        zc, sh = fio.get("relayed", {}).get(job), fio.get("relayed_shadow", {}).get(job)
        if zc and sh:
            rows.append((f"fio {job} shadow/zero-copy", "ratio", summary([b / a for a, b in zip(zc, sh)]),
                         "target >= 0.6 at QD32" if "qd32" in job else ""))
    rel = res["relay"]
    rows.append(("relay round trip p50", "us", summary([1e6 * pct(rel["relay_rtt_s"], 0.5)]), "notify->echo->irq->ack"))
    rows.append(("relay round trip p99", "us", summary([1e6 * pct(rel["relay_rtt_s"], 0.99)]), ""))
    rows.append(("raw eventfd ping-pong p50", "us", summary([1e6 * pct(rel["raw_eventfd_rtt_s"], 0.5)]), "2 Python processes"))
    rows.append(("raw eventfd ping-pong p99", "us", summary([1e6 * pct(rel["raw_eventfd_rtt_s"], 0.99)]), ""))
    for q in (0.5, 0.99):
        added = pct(rel["relay_rtt_s"], q) - pct(rel["raw_eventfd_rtt_s"], q)
        rows.append((f"relay added latency p{int(q * 100)}", "us", summary([1e6 * added]), "relay - raw eventfd"))
    if rel.get("ioreq_held_rtt_s"):
        rows.append(("IOREQ round trip, vCPU held (1 MMIO read) p50", "us",
                     summary([1e6 * pct(rel["ioreq_held_rtt_s"], 0.5)]), "the vCPU blocks for its answer, as on Xen"))
        rows.append(("IOREQ round trip, vCPU held p99", "us", summary([1e6 * pct(rel["ioreq_held_rtt_s"], 0.99)]), ""))
        rows.append(("IOREQ round trip, vCPU held/raw eventfd ping-pong p50", "ratio",
                     summary([pct(rel["ioreq_held_rtt_s"], 0.5) / pct(rel["raw_eventfd_rtt_s"], 0.5)]), "target <= 3"))
    rows.append(("IOREQ round trip (1 MMIO read) p50", "us", summary([1e6 * pct(rel["ioreq_rtt_s"], 0.5)]),
                 "guest->daemon->guest (vCPU channel), the vCPU waits in the guest's event loop"))
    rows.append(("IOREQ round trip (1 MMIO read) p99", "us", summary([1e6 * pct(rel["ioreq_rtt_s"], 0.99)]), ""))
    if "daemon_cpu_ioreq_blocks" in rel:
        rows.extend(cpu_rows(rel))
    elif "daemon_cpu_per_ioreq_s" in rel:  # a results file from before the blocks
        rows.append(("daemon CPU per IOREQ (1 MMIO read)", "us", summary([1e6 * rel["daemon_cpu_per_ioreq_s"]]),
                     "target <= 10; one sample"))
    if rel.get("ioreq_via_host_rtt_s"):
        rows.append(("IOREQ round trip through the sim host p50", "us",
                     summary([1e6 * pct(rel["ioreq_via_host_rtt_s"], 0.5)]), "guest->sim->daemon->sim->guest (old path)"))
    rows.append(("IOREQ round trip/raw eventfd ping-pong p50", "ratio",
                 summary([pct(rel["ioreq_rtt_s"], 0.5) / pct(rel["raw_eventfd_rtt_s"], 0.5)]), "the vCPU in an event loop"))
    if rel.get("async_eventfd_rtt_s"):
        rows.append(("asyncio eventfd ping-pong p50", "us", summary([1e6 * pct(rel["async_eventfd_rtt_s"], 0.5)]),
                     "2 Python processes, uvloop add_reader both sides"))
        rows.append(("IOREQ round trip/asyncio eventfd ping-pong p50", "ratio",
                     summary([pct(rel["ioreq_rtt_s"], 0.5) / pct(rel["async_eventfd_rtt_s"], 0.5)]),
                     "the event-loop floor of both ends"))
    fast = res.get("relay_fastpath")
    if fast:
        rows.append(("relay round trip, kernel fast path p50", "us", summary([1e6 * pct(fast["relay_rtt_s"], 0.5)]),
                     "notify->ioeventfd->echo->irqfd->irq->ack"))
        rows.append(("relay round trip, kernel fast path/relayed p50", "ratio",
                     summary([pct(fast["relay_rtt_s"], 0.5) / pct(rel["relay_rtt_s"], 0.5)]), "below 1: faster"))
        cpu = [1e6 * b["cpu_s"] for b in fast["daemon_cpu_relay_blocks"]]
        rows.append(("daemon CPU per relay round trip, kernel fast path", "us", summary(cpu),
                     f"2 IOREQs (status, ack), no line change (the kernel raises it); median of {len(cpu)} blocks"))
    rows.append(("relay/raw p50", "ratio", summary([pct(rel["relay_rtt_s"], 0.5) / pct(rel["raw_eventfd_rtt_s"], 0.5)]), "target <= 2"))
    rows.append(("QueueNotify writes/s", "1/s", summary([rel["notifies_per_s"]]), "sync IOREQ, back to back"))
    for label, v in res["mapping_s"].items():
        rows.append((f"map_foreign {label}", "ms", summary([1e3 * x for x in v]), "target 4GiB <= 500 ms" if label == "4GiB" else ""))
    rows.extend(report_daemon_rows(res["daemon"], res["params"]["fio_time"]))
    m = res["machine"]
    head = f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, {m['uml']}\n"
    return head + table(rows) + f"\nelapsed {res['elapsed_s']:.0f} s"


def plot(res: dict[str, Any], path: str) -> None:
    """Each path against its reference: fio figures / direct per job, IOREQ and relay vs eventfd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = res["fio"]
    names = [n for n in (*res["paths"], *res.get("grant_paths", {})) if any(fio.get(n, {}).get(j) for j in JOBS)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for k, job in enumerate(JOBS):
            d, r = fio["direct"].get(job), fio[name].get(job)
            if d and r:
                xs.append(k + i * width)
                ys.append(statistics.median([b / a for a, b in zip(d, r)]))
        ax1.bar(xs, ys, width, label=name)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks([k + 0.4 - width / 2 for k in range(len(JOBS))], list(JOBS))
    ax1.set_ylabel("path / direct (median ratio)")
    ax1.set_title("fio in UML: each path against direct")
    if names:
        ax1.legend(fontsize=8)
    rel = res["relay"]
    bars = [("raw eventfd\nping-pong", rel["raw_eventfd_rtt_s"])]
    if rel.get("async_eventfd_rtt_s"):
        bars.append(("asyncio eventfd\nping-pong", rel["async_eventfd_rtt_s"]))
    if rel.get("ioreq_held_rtt_s"):
        bars.append(("IOREQ\nvCPU held", rel["ioreq_held_rtt_s"]))
    bars.append(("IOREQ\nvCPU channel", rel["ioreq_rtt_s"]))
    if rel.get("ioreq_via_host_rtt_s"):
        bars.append(("IOREQ\nthrough sim host", rel["ioreq_via_host_rtt_s"]))
    bars.append(("relay\nnotify->irq->ack", rel["relay_rtt_s"]))
    ax2.bar([b[0] for b in bars], [1e6 * pct(b[1], 0.5) for b in bars])
    ax2.set_ylabel("p50 round trip (us)")
    ax2.set_yscale("log")
    ax2.set_title("round trips against the raw eventfd ping-pong")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xen_vhost_sim.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="fio boots per path (direct and relayed alternate)")
    p.add_argument("--fio-time", type=int, default=4, help="seconds per fio job")
    p.add_argument("--pingpong", type=int, default=2000, help="relay microbenchmark round trips")
    p.add_argument("--map-reps", type=int, default=3)
    p.add_argument("--idle-window", type=float, default=3.0, help="seconds of idle wake-up counting")
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--grant-reps", type=int, default=1, help="repetitions that also run the grant rows")
    p.add_argument("--paths", default=",".join(r[0] for r in (*RELAYED, *GRANTED)),
                   help="relayed variants to run, comma-separated (%(default)s)")
    p.add_argument("--profile", metavar="FILE", help="run the first daemon of the first --paths row under cProfile, stats to FILE")
    p.add_argument("--only", choices=("micro",), help="run only the relay/IOREQ microbenchmark")
    p.add_argument("--plot", metavar="FILE", help="also draw the figures against their references (PNG/SVG/PDF; "
                                                  "needs matplotlib: pip install '.[plot]')")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--echo-backend", metavar="SOCKET", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    if unknown := set(args.paths) - {r[0] for r in (*RELAYED, *GRANTED)}:
        p.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if args.echo_backend:
        echo_backend(args.echo_backend)
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install '.[plot]')")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    import uvloop

    res = uvloop.run(run_all(args))
    text = report(res)
    print(text)
    res["table"] = text
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    if args.plot:
        plot(res, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
