"""A device's back-end connection kept across the daemon's restart (xen_vhost_master/fdstore.py):
taken over without renegotiating, and whatever a store hands back that cannot be used (a back-end
that died meanwhile, fds of the wrong kind, a record that is not one, names this daemon never
stores) refused in one line, closed, and replaced by a fresh connection, without hanging.

The whole path (SIGHUP handover, SIGKILL under the dispatcher's store, the C virtiofsd keeping a
mounted guest's FUSE session) is in test_lifecycle_matrix.py (``fs-*-daemon-*-mounted``).
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vhost_user import AsyncFrontend, FrontendRequest
from vhost_user.testing import connected_pair
from vhost_user.testing.dummy_backend import DummyBackend
from xen_vhost_master import device as device_module
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.dispatcher import MAX_STORED_FDS, SpawnLauncher, WatchOptions
from xen_vhost_master.fdstore import Kept, SessionMeta, group_by_device, new_meta_fd
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import snapshot

from tests.daemon.test_faults import RAM_BASE, RAM_SIZE, _bring_up, ram_memfd  # noqa: F401  (fixture)

TIMEOUT = 20.0
CONFIG = DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1, socket="/x.sock")
# what a front-end sends only when it negotiates a connection (vhost-user.rst, "Initialisation")
NEGOTIATION = {FrontendRequest.GET_PROTOCOL_FEATURES, FrontendRequest.SET_PROTOCOL_FEATURES,
               FrontendRequest.SET_OWNER, FrontendRequest.GET_QUEUE_NUM, FrontendRequest.SET_BACKEND_REQ_FD}


class Keeper:
    """What a service manager's store would hold (names → fds are the device's, not copies)."""

    def __init__(self) -> None:
        self.stored: dict[str, int] = {}
        self.removed: list[str] = []

    def store_fds(self, name: str, fds: Any) -> bool:
        self.stored[name] = fds[0]
        return True

    def remove_fds(self, name: str) -> None:
        self.removed.append(name)
        self.stored.pop(name, None)


class Backends:
    """Back-ends reached through ``connect`` (each a DummyBackend over a socketpair)."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack
        self.backends: list[DummyBackend] = []

    async def connect(self) -> AsyncFrontend:
        backend = DummyBackend(num_queues=1)
        fe, _server = await self.stack.enter_async_context(connected_pair(backend))
        self.backends.append(backend)
        return fe


def device(ram: int, connect: Any, keeper: Keeper | None = None) -> Device:
    def read_guest(gpa: int, size: int) -> bytes:  # (a resume reads the used index)
        return os.pread(ram, size, gpa - RAM_BASE)

    return Device(CONFIG, connect=connect, memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, ram)], read_guest),
                  set_irq=lambda level: None, log=device_logger("xvm.test.fdstore", 1, "blk0"), keeper=keeper)


@contextlib.asynccontextmanager
async def running(ram: int) -> AsyncIterator[tuple[Device, Backends, Keeper]]:
    async with contextlib.AsyncExitStack() as stack:
        backends, keeper = Backends(stack), Keeper()
        dev = device(ram, backends.connect, keeper)
        try:
            async with asyncio.timeout(TIMEOUT):
                await dev.start()
                await _bring_up(dev)
            yield dev, backends, keeper
        finally:
            await dev.close()


@pytest.mark.asyncio
async def test_a_handed_over_connection_goes_on_without_renegotiating(no_fd_leak, ram_memfd):
    """The next image takes the connection the previous one suspended (its fds as a store hands
    them back): the back-end never sees a disconnect or a second negotiation, only GET_FEATURES
    (the check that it is there and the same) and the rings' restart, as after QEMU's ``cont``;
    the store is told what the device keeps, and nothing once it is closed."""
    async with running(ram_memfd) as (first, backends, keeper):
        assert set(keeper.stored) == {"dev0.conn", "dev0.chan", "dev0.meta"}
        assert SessionMeta.read(keeper.stored["dev0.meta"]).running == [0]
        assert first.model is not None
        saved = snapshot(first.model)
        handed = await first.suspend()
        backend = backends.backends[0]
        mark = len(backend.log)
        kept, problems = group_by_device(dict(handed))
        assert not problems and SessionMeta.read(kept[0].meta).running == []  # stopped by the suspend
        await first.close()
        assert "dev0.conn" in keeper.removed

        async def no_new_connection() -> AsyncFrontend:
            raise AssertionError("connected afresh")

        second = device(ram_memfd, no_new_connection, keeper)
        try:
            async with asyncio.timeout(TIMEOUT):
                await second.start(saved, kept=kept[0])
            after = backend.requests()[mark:]
            assert FrontendRequest.GET_FEATURES in after and not NEGOTIATION & set(after), after
            assert after.count(FrontendRequest.SET_VRING_KICK) == 1 and FrontendRequest.SET_MEM_TABLE in after, after
            assert second.frontend is not None and not second.frontend.broken
            assert second.model is not None and second.model.active
            assert set(keeper.stored) == {"dev0.conn", "dev0.chan", "dev0.meta"}
        finally:
            await second.close()
        assert not keeper.stored


@pytest.mark.asyncio
async def test_the_kept_record_has_the_device_state_a_crash_left_not_an_older_state_file(no_fd_leak, ram_memfd):
    """state.json is written a moment after the driver's writes; the session record with them. A
    successor handed a state file from before the driver's bring-up resumes the running device
    all the same, from the record."""
    async with contextlib.AsyncExitStack() as stack:
        backends, keeper = Backends(stack), Keeper()
        first = device(ram_memfd, backends.connect, keeper)
        async with asyncio.timeout(TIMEOUT):
            await first.start()
            assert first.model is not None
            behind = snapshot(first.model)  # the last state file: nothing set up yet
            await _bring_up(first)
        handed = await first.suspend()
        await first.close()
        kept, _ = group_by_device(dict(handed))
        second = device(ram_memfd, backends.connect, keeper)
        try:
            async with asyncio.timeout(TIMEOUT):
                await second.start(behind, kept=kept[0])
            assert len(backends.backends) == 1  # the same connection
            assert second.model is not None and second.model.active
            assert backends.backends[0].requests().count(FrontendRequest.SET_VRING_KICK) == 2  # started, resumed
        finally:
            await second.close()


def _meta_fd(meta: SessionMeta | bytes) -> int:
    fd = new_meta_fd()
    os.pwrite(fd, meta.encode() if isinstance(meta, SessionMeta) else meta, 0)
    return fd


META = SessionMeta(socket="/x.sock", features=DummyBackend(num_queues=1).features, protocol_features=0,
                   backend_protocol_features=0, queue_num=None, max_mem_slots=None, channel=False, num_queues=1)


def _stale() -> Kept:
    ours, theirs = socket.socketpair()
    theirs.close()  # the back-end died meanwhile
    return Kept(0, ours.detach(), _meta_fd(META))


def _not_a_socket() -> Kept:
    r, w = os.pipe()
    os.close(w)
    return Kept(0, r, _meta_fd(META))


def _garbage_record() -> Kept:
    ours, theirs = socket.socketpair()
    theirs.close()
    return Kept(0, ours.detach(), _meta_fd(b"\x00garbage{"))


def _silent() -> Kept:
    ours, theirs = socket.socketpair()
    _silent_peers.append(theirs)  # alive, never answers
    return Kept(0, ours.detach(), _meta_fd(META))


def _other_socket() -> Kept:
    ours, theirs = socket.socketpair()
    theirs.close()
    meta = SessionMeta(**{**META.__dict__, "socket": "/elsewhere.sock"})
    return Kept(0, ours.detach(), _meta_fd(meta))


_silent_peers: list[socket.socket] = []


@pytest.mark.parametrize(("make", "reason"), [
    (_stale, "the back-end has closed the connection"),
    (_not_a_socket, "not a socket"),
    (_garbage_record, "not a session record"),
    (_silent, "no answer"),
    (_other_socket, "/elsewhere.sock"),
], ids=["stale", "not-a-socket", "garbage-record", "silent", "other-socket"])
@pytest.mark.asyncio
async def test_an_unusable_kept_connection_is_refused_in_one_line_and_a_fresh_one_made(
        no_fd_leak, ram_memfd, caplog, monkeypatch, make, reason):
    # A silent kept peer is given KEPT_TIMEOUT (5 s, shortened here), not a negotiation's 60 s: the
    # guest's accesses wait for the check, and a fresh connection is all its failure costs. (Not
    # raising: with the check under NEGOTIATION_TIMEOUT the test's own TIMEOUT fails it.)
    assert device_module.NEGOTIATION_TIMEOUT > TIMEOUT
    monkeypatch.setattr(device_module, "KEPT_TIMEOUT", 0.5, raising=False)
    kept = make()
    try:
        async with contextlib.AsyncExitStack() as stack:
            backends, keeper = Backends(stack), Keeper()
            dev = device(ram_memfd, backends.connect, keeper)
            try:
                with caplog.at_level(logging.WARNING):
                    async with asyncio.timeout(TIMEOUT):
                        await dev.start(kept=kept)
                lines = [r.getMessage() for r in caplog.records if "kept from the previous process is unusable" in r.getMessage()]
                assert len(lines) == 1 and reason in lines[0] and "connecting afresh" in lines[0], lines
                assert "\n" not in lines[0]
                assert len(backends.backends) == 1 and dev.frontend is not None  # the fresh connection
                assert {"dev0.conn", "dev0.meta"} <= set(keeper.removed)  # the store's copies go too
            finally:
                await dev.close()
    finally:
        for peer in _silent_peers:
            peer.close()
        _silent_peers.clear()


# --- the hand-back itself, in processes of their own (fds from 3 on) ------------------------------

REPORT = """
import json, logging, os, stat, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from xen_vhost_master.fdstore import take_listen_fds, group_by_device
named = take_listen_fds()
kept, problems = group_by_device(named)
print(json.dumps({"kept": {d: [k.conn >= 0, k.chan is not None, k.shadow is not None] for d, k in kept.items()},
                  "problems": problems, "env": [v for v in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES") if v in os.environ],
                  "conn_is_socket": [stat.S_ISSOCK(os.fstat(k.conn).st_mode) for k in kept.values()]}))
"""

HANDER = """
import os, socket, sys
from xen_vhost_master.fdstore import exec_with_fds, new_meta_fd
a, b = socket.socketpair()
named = [("dev3.conn", a.fileno()), ("dev3.meta", new_meta_fd()), ("dev9.shadow", os.memfd_create("x")),
         ("nonsense", os.memfd_create("y"))]
for _, fd in named:
    os.set_inheritable(fd, False)
exec_with_fds([sys.executable, "-c", sys.argv[1]], named)
"""


def test_fds_handed_to_a_new_image_arrive_from_3_on_by_name_and_bad_ones_are_closed_with_a_reason():
    """exec_with_fds places the fds as systemd does; the new image takes them by name, drops the
    variables, and refuses in one line each what it cannot use (a name it never stores, a device
    without its connection), closing them."""
    out = subprocess.run([sys.executable, "-c", HANDER, REPORT], capture_output=True, timeout=TIMEOUT, check=True)
    report = json.loads(out.stdout)
    assert report["kept"] == {"3": [True, False, False]} and report["conn_is_socket"] == [True]
    assert report["env"] == []
    errors = out.stderr.decode().splitlines()
    assert any("'nonsense'" in line for line in report["problems"]), report
    assert any("device 9" in line and "lack the connection" in line for line in report["problems"]), report
    assert not errors, errors


@pytest.mark.parametrize(("env", "line"), [
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "dev0.conn"}, "names 1 fd(s), LISTEN_FDS says 2"),
    ({"LISTEN_FDS": "x", "LISTEN_FDNAMES": "dev0.conn"}, "is not a count"),
    ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "dev0.conn", "LISTEN_PID": "1"}, "is for pid 1, not this process"),
])
def test_a_malformed_hand_back_is_refused_in_one_line(env, line):
    script = ("import os; os.environ.setdefault('LISTEN_PID', str(os.getpid()));" + REPORT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=TIMEOUT, check=True,
                         env={**os.environ, **env})
    assert json.loads(out.stdout)["kept"] == {}
    errors = out.stderr.decode().splitlines()
    assert len(errors) == 1 and line in errors[0], errors


# --- the dispatcher's store ----------------------------------------------------------------------


def test_the_dispatchers_store_keeps_one_fd_a_name_and_refuses_the_rest(caplog):
    launcher = SpawnLauncher(WatchOptions(spawn=True), host=None)  # type: ignore[arg-type]
    pipes = []

    def fd() -> int:
        r, w = os.pipe()
        os.close(w)
        pipes.append(r)
        return r

    def open_(n: int) -> bool:
        try:
            os.fstat(n)
        except OSError:
            return False
        return True

    first, second = fd(), fd()
    launcher._store("g", {"FDSTORE": "1", "FDNAME": "dev0.conn"}, [first], truncated=False)
    launcher._store("g", {"FDSTORE": "1", "FDNAME": "dev0.conn"}, [second], truncated=False)  # replaces
    assert launcher.stored == {"g": {"dev0.conn": second}} and not open_(first)
    refused = [([fd()], {"FDNAME": "a"}, "without FDSTORE=1"),
               ([fd(), fd()], {"FDSTORE": "1", "FDNAME": "b"}, "2 fds under one name"),
               ([fd()], {"FDSTORE": "1", "FDNAME": "a:b"}, "not a valid name")]
    with caplog.at_level(logging.WARNING):
        for fds, fields, why in refused:
            launcher._store("g", fields, fds, truncated=False)
            assert why in caplog.records[-1].getMessage() and not any(open_(n) for n in fds)
        for i in range(MAX_STORED_FDS):
            launcher._store("g", {"FDSTORE": "1", "FDNAME": f"n{i}"}, [fd()], truncated=False)
        assert "holds 64 fds already" in caplog.records[-1].getMessage()
    launcher._unstore("g", "dev0.conn")
    assert not open_(second)
    launcher._drop_store("g")
    assert not launcher.stored and not any(open_(n) for n in pipes)


# --- a crash with requests in flight, under the dispatcher's store ---------------------------------

# The project's RAM disk, saying on stderr which request it runs ("ran <type> <sector>").
COUNTING_BACKEND = """
import struct, sys
from vhost_user.testing.blk import RamDiskBlk, main
class Counting(RamDiskBlk):
    def handle_request(self, chain, read_buffers, write_buffers):
        head = read_buffers(self.memory, chain.readable, 16)
        if len(head) == 16:
            print("ran %d %d" % struct.unpack_from("<IxxxxQ", head), file=sys.stderr, flush=True)
        return super().handle_request(chain, read_buffers, write_buffers)
raise SystemExit(main(sys.argv[1:], device_class=Counting))
"""


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the dispatcher and its instances run on uvloop
async def test_an_instance_killed_with_out_of_order_requests_in_flight_goes_on_with_its_connection(
        start_sim, sim_dir, tmp_path):
    """Shadow path, a back-end that completes out of order and holds requests (the project's RAM
    disk, ``--reorder``, ``--hold-ms``; it does not drain at GET_VRING_BASE), its daemon run by the
    dispatcher: the instance is SIGKILLed right after the first of 8 writes completed, twice (the
    dispatcher starts an instance three times at most). Each restarted instance is handed the connection back and goes on with it once the
    back-end has completed what it took (or, if it does not within the bound, says so and
    connects afresh): every write completes exactly once (the guest driver fails the batch on a
    completion for a chain not in flight, and a lost one times out), and every byte is in the
    image. On the kept connection the back-end also runs every write exactly once: what it
    completed into the killed instance's shadow rings (those it held, it completes when
    GET_VRING_BASE stops the ring) reaches the guest from the kept memory, not by running it again."""
    from tests.daemon.test_daemon_cli import DOMID
    from tests.daemon.test_dispatcher import run_watch
    from xen_vhost_sim.guest import SimGuest
    from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
    from xen_vhost_sim.guest_driver import GuestPageAllocator

    sim, sim_path = start_sim(sim_dir, name="kept")
    root = Path(sim_dir) / "run"
    (root / "kept").mkdir(parents=True)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 << 20))
    sock = Path(sim_dir) / "blk.sock"
    ran = tmp_path / "backend.log"
    with open(ran, "wb") as out:
        backend = subprocess.Popen(
            [sys.executable, "-c", COUNTING_BACKEND, "--socket", str(sock), "--size", "8M", "--image", str(image),
             "--reorder", "3", "--hold-ms", "40"], stderr=out)
    (root / "kept" / "0.sock").symlink_to(sock)
    guest = None
    try:
        async with run_watch(sim_path, root, ["--spawn", "--instance-args", "--memory shadow"], dict(os.environ)) as w:
            await w.served("kept", DOMID)
            guest = await SimGuest.connect(sim_path, DOMID)
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
            queue = blk.driver.queues[0]
            rng = random.Random(9)
            expected: dict[int, bytes] = {}
            for round_ in range(2):
                ops = [BlkOp("write", 4096 * round_ + 64 * i, data=rng.randbytes(16 << 10)) for i in range(8)]
                batch = asyncio.ensure_future(blk.batch(ops))
                async with asyncio.timeout(TIMEOUT):
                    while len(queue.pending) < len(ops):  # all posted and kicked
                        await asyncio.sleep(0)
                    await asyncio.wait(set(queue.pending), return_when=asyncio.FIRST_COMPLETED)
                mark = len(w.log.lines)
                pid = int([line for line in w.log.lines if f"started instance for domain {DOMID}: pid" in line][-1].split()[-1])
                os.kill(pid, signal.SIGKILL)
                await w.log.wait_for(rf"\(pid {pid}\) exited with status -9", mark)
                await w.log.wait_for("ioreq server 0 adopted", mark)
                await asyncio.wait_for(batch, TIMEOUT)  # every write, exactly once
                expected.update((op.sector, op.data) for op in ops)
            for sector, data in expected.items():
                assert await asyncio.wait_for(blk.read(sector, len(data) // 512), TIMEOUT) == data
            await blk.close()
            with open(image, "rb") as f:
                for sector, data in expected.items():
                    f.seek(sector * 512)
                    assert f.read(len(data)) == data
            kept, refused = w.log.count("going on with the back-end connection kept"), w.log.count("is unusable")
            assert kept >= 1 and kept + refused == 2, "".join(w.log.lines[-60:])
            if not refused:  # (a connection given up hands what it held to nobody: taken again, run again)
                writes = [line.split()[2] for line in ran.read_text().splitlines() if line.startswith("ran 1 ")]
                twice = sorted({int(s) for s in writes if writes.count(s) > 1})
                assert len(writes) == len(expected) and not twice, f"sectors written more than once: {twice}"
    finally:
        if guest is not None:
            guest.close()
        backend.kill()
        backend.wait(TIMEOUT)
        sim.kill()
