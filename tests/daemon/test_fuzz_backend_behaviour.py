"""A hostile back-end's *behaviour*, generated: message storms on both channels (unsolicited
replies on the main socket; CONFIG_CHANGE, NEED_REPLY requests it never reads the answer of,
unknown requests and garbage on the back-end channel), a back-end slow to read, one that never
answers a request, one that disconnects at any request. Meanwhile the guest drives the attacked
device (bring-up, notify, reset, bring-up again) and another device of the same daemon, with a
good back-end, serves the guest's I/O.

Each example asserts: every guest access to the attacked device is answered (its vCPU is never
held for good), the other device still serves, no fd is left, the lines logged stay bounded
(rate-limited), and the attacked process's RSS stays within RSS_BUDGET of what it was after
the first example (the attacks run in a process of their own: :func:`serve_plans`). ``make test`` runs a few examples; ``make fuzz`` many (HYPOTHESIS_FUZZ_EXAMPLES). With
XVM_FUZZ_FIGURES=<file>, the run's figures (messages tried, RSS, lines logged, I/O served on the
other device) are written there as JSON after each example (README.md, "Reliability").

No simulator: back-ends are the library's RamDiskBlk over socketpairs; guest RAM is a memfd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import random
import resource
import select
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vhost_user import AsyncFrontend, FdSocket, FrontendRequest, RequestReceived, VhostUserError
from vhost_user.aio import BackendServer
from vhost_user.testing import RamDiskBlk, connected_pair
from xen_vhost_master import device as device_module
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import BackendAbsent, Device, DeviceError
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg

from tests.conftest import open_fds
from tests.daemon import mmio_driver
from tests.daemon.backends import serve_pair
from tests.protocol.guestmem import GPA_BASE, Guest

FUZZ_EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "0"))
EXAMPLES = max(3, FUZZ_EXAMPLES // 100)
# make test: storms of up to 200 messages; make fuzz (100,000): thousands (README.md, "Reliability")
STORMS = [0, 1, 100, 2000, 5000] if FUZZ_EXAMPLES >= 10_000 else [0, 1, 20, 100, 200]
RSS_BUDGET = 8 << 20  # bytes the run may grow after its first example
LINES_PER_EXAMPLE = 200  # every kind of line is rate-limited (RateLimit: 10 per 10 s per kind)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCESS_BOUND = 15.0  # a guest access not answered by then is a held vCPU: a failure, not a timing figure
EXAMPLE_BOUND = 120.0  # seconds an example may take in all (its accesses are bounded one by one)
REQUEST_TIMEOUT = 0.3  # the attacked front-end's per-request timeout (the daemon's is 60 s)
NEED_REPLY, REPLY, VERSION = 0x8, 0x4, 0x1

FIGURES: dict[str, Any] = {"examples": 0, "messages_tried": 0, "storm_messages": 0, "requests_seen": 0,
                           "lines_logged": 0, "seconds": 0.0, "other_device_io": 0,
                           "rss_first_kib": 0, "rss_max_kib": 0, "rss_last_kib": 0}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@dataclass(frozen=True)
class Plan:
    frontend_storm: int  # unsolicited replies on the main socket, once request `storm_at` came
    storm_at: int
    backend_storm: int  # messages on the back-end channel once it is set up
    backend_kind: str
    slow: float  # seconds the back-end waits before it handles each request
    disconnect_at: int | None  # the request at which it closes the connection
    hang_at: int | None  # the request it never answers
    seed: int


plans = st.builds(
    Plan,
    frontend_storm=st.sampled_from(STORMS[:4]),
    storm_at=st.integers(1, 30),
    backend_storm=st.sampled_from(STORMS),
    backend_kind=st.sampled_from(["config-change", "config-change-need-reply", "unknown", "garbage", "mixed"]),
    slow=st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.5]),
    disconnect_at=st.one_of(st.none(), st.integers(1, 40)),
    hang_at=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
)


class HostileServer(BackendServer):
    """RamDiskBlk served with the plan's misbehaviour."""

    def __init__(self, sock: FdSocket, plan: Plan, figures: dict[str, Any]) -> None:
        super().__init__(RamDiskBlk(1 << 16), sock)
        self.plan = plan
        self.figures = figures
        self.seen = 0
        self.rng = random.Random(plan.seed)
        self.storms: set[asyncio.Task[None]] = set()

    def _storm(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.storms.add(task)
        task.add_done_callback(self.storms.discard)

    async def _dispatch(self, event: RequestReceived) -> None:
        self.seen += 1
        self.figures["requests_seen"] += 1
        plan = self.plan
        if plan.disconnect_at == self.seen or plan.hang_at == self.seen:
            for fd in event.fds:  # (the stand-in's own: what it was sent is not the daemon's to close)
                os.close(fd)
            if plan.disconnect_at == self.seen:
                self.sock.close()
                raise ConnectionError("hostile back-end: disconnecting")
            await asyncio.Event().wait()  # never answers (cancelled when the test ends)
        if plan.slow:
            try:
                await asyncio.sleep(plan.slow)  # the slow back-end's pace, not synchronisation
            except asyncio.CancelledError:
                for fd in event.fds:  # (cancelled at the end of the example: the stand-in's own fds)
                    os.close(fd)
                raise
        await super()._dispatch(event)
        if self.seen == plan.storm_at and plan.frontend_storm:
            self._storm(self._send(self.sock, plan.frontend_storm, self._unsolicited))
        if event.request == FrontendRequest.SET_BACKEND_REQ_FD and plan.backend_storm and self.channel_sock is not None:
            self._storm(self._send(self.channel_sock, plan.backend_storm, self._channel_message))

    def _unsolicited(self) -> bytes:
        code = self.rng.choice([1, 3, 11, 15, 24, 40, 77])  # replies to requests never made
        return struct.pack("<III", code, VERSION | REPLY, 8) + self.rng.randbytes(8)

    def _channel_message(self) -> bytes:
        kind = self.plan.backend_kind
        if kind == "mixed":
            kind = self.rng.choice(["config-change", "config-change-need-reply", "unknown", "garbage"])
        if kind == "config-change":
            return struct.pack("<III", 2, VERSION, 0)
        if kind == "config-change-need-reply":  # the ACKs are never read: a slow reader
            return struct.pack("<III", 2, VERSION | NEED_REPLY, 0)
        if kind == "unknown":
            return struct.pack("<III", self.rng.choice([1, 3, 4, 5, 6, 99, 2**31]), VERSION | NEED_REPLY, 0)
        return self.rng.randbytes(self.rng.randint(1, 64))

    async def _send(self, sock: FdSocket, count: int, make: Any) -> None:
        batch = 100
        for start in range(0, count, batch):
            data = b"".join(make() for _ in range(min(batch, count - start)))
            try:
                await sock.send(data)
            except (VhostUserError, OSError):
                return
            self.figures["storm_messages"] += min(batch, count - start)
            await asyncio.sleep(0)  # a storm among other work, as a back-end process would be

    def stop(self) -> None:
        for task in list(self.storms):
            task.cancel()


async def write(device: Device, reg: int, value: int) -> None:
    await mmio_driver.write(device, reg, value, ACCESS_BOUND)


async def bring_up(device: Device, rings: tuple[int, int, int], num: int) -> None:
    await mmio_driver.bring_up(device, rings, num, ACCESS_BOUND)


class OtherDisk:
    """The guest's other disk: a good back-end, one read in flight at a time."""

    def __init__(self, guest: Guest, fe: AsyncFrontend) -> None:
        self.guest = guest
        self.irq = asyncio.Event()
        self.device = Device(DeviceConfig(devid=1, device_id=2, base=0x2000200, irq=34, queue_size=16, num_queues=1),
                             connect=self._connect, memory=FdExport([FdRegion(GPA_BASE, guest.size, guest.fd)]),
                             set_irq=self._set_irq, log=device_logger("xen_vhost_master.device", 1, "blk1"))
        self._fe = fe
        self.hdr, self.data, self.status = guest.alloc(16), guest.alloc(512, align=512), guest.alloc(1)
        guest.write(self.hdr, struct.pack("<IIQ", 0, 0, 1))  # VIRTIO_BLK_T_IN, sector 1
        self.served = 0

    async def _connect(self) -> AsyncFrontend:
        return self._fe

    def _set_irq(self, level: bool) -> None:
        if level:
            self.irq.set()

    async def start(self) -> None:
        await self.device.start()
        await bring_up(self.device, (self.guest.desc, self.guest.avail, self.guest.used), 16)

    async def read_once(self) -> None:
        g = self.guest
        self.irq.clear()
        g.drv.add(readable=[(self.hdr, 16)], writable=[(self.data, 512), (self.status, 1)], token=self.served)
        await write(self.device, Reg.QUEUE_NOTIFY, 0)
        async with asyncio.timeout(ACCESS_BOUND):
            while not g.drv.get_used():
                await self.irq.wait()
                self.irq.clear()
        await write(self.device, Reg.INTERRUPT_ACK, 1)
        self.served += 1

    async def serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.read_once()


async def attack(plan: Plan, figures: dict[str, Any]) -> None:
    servers: list[HostileServer] = []
    tasks: list[asyncio.Task[None]] = []

    async def hostile_connect() -> AsyncFrontend:
        if len(servers) >= 20:  # the attacked back-end's unit gave up restarting
            raise BackendAbsent("hostile", "not restarted again")
        fe, server = serve_pair(lambda b: HostileServer(b, plan, figures), tasks, timeout=REQUEST_TIMEOUT)
        servers.append(server)
        return fe

    guest = Guest(size=1 << 20, queue_size=16)
    victim_ram = os.memfd_create("fuzz-victim-ram", os.MFD_CLOEXEC)
    os.ftruncate(victim_ram, 1 << 20)
    victim = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1),
                    connect=hostile_connect, memory=FdExport([FdRegion(GPA_BASE, 1 << 20, victim_ram)]),
                    set_irq=lambda level: None, log=device_logger("xen_vhost_master.device", 1, "blk0"))
    stop = asyncio.Event()
    try:
        async with connected_pair(RamDiskBlk(1 << 16)) as (fe, _good):
            other = OtherDisk(guest, fe)
            try:
                await other.start()
                io = asyncio.get_running_loop().create_task(other.serve(stop))
                at_start = other.served
                try:
                    try:
                        await asyncio.wait_for(victim.start(), ACCESS_BOUND)
                        started = True
                    except (VhostUserError, DeviceError, BackendAbsent, OSError):
                        started = False
                        victim.refuse("the hostile back-end failed its start")
                    if started:
                        rings = (GPA_BASE, GPA_BASE + 0x1000, GPA_BASE + 0x2000)
                        await bring_up(victim, rings, 64)
                        await write(victim, Reg.QUEUE_NOTIFY, 0)
                        await write(victim, Reg.STATUS, 0)
                        await bring_up(victim, rings, 64)
                        await write(victim, Reg.STATUS, 0)
                finally:
                    stop.set()
                    await asyncio.wait_for(io, ACCESS_BOUND)  # (raises what stopped its I/O)
                figures["other_device_io"] += other.served - at_start  # served during the attack
                done = other.served
                await other.read_once()  # and it still serves once the attack is over
                assert other.served == done + 1
            finally:
                await asyncio.wait_for(victim.close(), ACCESS_BOUND)
                await asyncio.wait_for(other.device.close(), ACCESS_BOUND)
    finally:
        for server in servers:
            server.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            server.close()
        guest.close()
        os.close(victim_ram)


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("vhost_user.aio.server"):  # (the stand-in back-ends' own lines)
            self.lines.append(record.getMessage())


def serve_plans() -> None:
    """The attacked process: one plan (JSON) per line of stdin, one verdict (JSON) per line of
    stdout. A process of its own, so that its RSS is the daemon's code under attack, not the
    fuzzer's (hypothesis keeps what it generated)."""
    # the reset's own bound is shortened like the attacked front-end's timeout. (SET_MEM_TABLE keeps
    # its MEM_TABLE_TIMEOUT: the guest's DRIVER_OK write waits START_WAIT for it at most, and its
    # reset cuts a reconnect's start of the rings, which the writes made meanwhile wait for.)
    device_module.RESET_STOP_TIMEOUT = 1.0
    handler = _Count()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    figures: dict[str, Any] = {"storm_messages": 0, "requests_seen": 0, "other_device_io": 0}
    for line in sys.stdin:
        plan = Plan(**json.loads(line))
        handler.lines.clear()
        fds = open_fds()
        begun = time.monotonic()
        error = ""
        try:
            asyncio.run(attack(plan, figures))
        except Exception:  # noqa: BLE001 - reported to the fuzzer, which fails the example
            error = traceback.format_exc()
        gc.collect()
        leaked = [os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")]
        print(json.dumps({"error": error, "leaked": leaked, "lines": handler.lines[:40], "line_count": len(handler.lines),
                          "seconds": time.monotonic() - begun, "rss": rss(), **figures}), flush=True)


@pytest.fixture(scope="module")
def attacked() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", "from tests.daemon.test_fuzz_backend_behaviour import serve_plans; serve_plans()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(ACCESS_BOUND * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def verdict(proc: subprocess.Popen[str], plan: Plan) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(dataclasses.asdict(plan)) + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], EXAMPLE_BOUND)
    assert ready, f"the attacked process did not finish the example within {EXAMPLE_BOUND} s"
    line = proc.stdout.readline()
    assert line, f"the attacked process died (exit status {proc.wait()})"
    result: dict[str, Any] = json.loads(line)
    return result


@settings(max_examples=EXAMPLES, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking:
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
def test_hostile_backend_behaviour_leaves_the_guest_and_the_other_device_served(attacked, plan):
    # (each example takes seconds: a failing plan is reported as found, not shrunk)
    got = verdict(attacked, plan)
    FIGURES["examples"] += 1
    FIGURES["seconds"] += got["seconds"]
    FIGURES["lines_logged"] += got["line_count"]
    for key in ("storm_messages", "requests_seen", "other_device_io"):
        FIGURES[key] = got[key]
    FIGURES["messages_tried"] = got["storm_messages"] + got["requests_seen"]
    FIGURES["rss_first_kib"] = FIGURES["rss_first_kib"] or got["rss"] >> 10
    FIGURES["rss_max_kib"] = max(FIGURES["rss_max_kib"], got["rss"] >> 10)
    FIGURES["rss_last_kib"] = got["rss"] >> 10
    if path := os.environ.get("XVM_FUZZ_FIGURES"):
        with open(path, "w") as f:
            json.dump(FIGURES, f, indent=1)
    assert not got["error"], got["error"]
    assert not got["leaked"], got["leaked"]
    assert got["line_count"] <= LINES_PER_EXAMPLE, f"{got['line_count']} lines: " + "\n".join(got["lines"])
    assert got["rss"] <= (FIGURES["rss_first_kib"] << 10) + RSS_BUDGET, FIGURES
