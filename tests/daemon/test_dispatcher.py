"""``xen-vhost-master watch --spawn`` as an operator runs it: the dispatcher in its own process,
``xen-vhost-sim`` as the Xen host, guests made with the simulated ``xl create`` / ``xl reboot``
(libxl's order: created paused, devices written, the toolstack's pause dropped), their instances
spawned by the dispatcher, qemu-storage-daemon back-ends reached by name.

What each test proves is in its docstring. Every wait is for an event: a line of the dispatcher's
log, READY on its NOTIFY_SOCKET, a process exit, a guest access completing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
import pytest_asyncio

from tests.daemon.test_daemon_cli import TIMEOUT, io_check, stop
from tests.peers.harness import Peers, QsdPeer
from xen_vhost_master.names import systemd_escape
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

BIN = Path(sys.executable).parent
VIRTIO_MAGIC = 0x74726976  # "virt", the MagicValue register (virtio 1.2 §4.2.2)
BASE, IRQ = 0x2000000, 33


def image_of(disk: QsdPeer) -> Path:
    assert disk.image is not None
    return disk.image


def blk(devid: int = 0, base: int = BASE, irq: int = IRQ) -> dict[str, Any]:
    """One ``virtio = [ "type=virtio,device2,transport=mmio" ]`` entry (Xen >= 4.18: no wait)."""
    return {"device_id": 2, "base": base, "irq": irq, "devid": devid}


class ProcLog:
    """A process's stderr, line by line, read by a thread; waited on from the event loop."""

    def __init__(self, stream: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.lines: list[str] = []
        self._loop = loop
        self._changed = asyncio.Event()
        self.closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._loop.call_soon_threadsafe(self._add, raw.decode(errors="replace"))
        except ValueError:  # closed under it at the test's end: an instance the dispatcher started
            pass  # may still hold the pipe's write end, so no EOF came
        with contextlib.suppress(RuntimeError):  # (the test's loop closed meanwhile)
            self._loop.call_soon_threadsafe(self._eof)

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    def _eof(self) -> None:
        self.closed = True
        self._changed.set()

    def find(self, pattern: str, start: int = 0) -> re.Match[str] | None:
        for line in self.lines[start:]:
            if m := re.search(pattern, line):
                return m
        return None

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def index(self, pattern: str) -> int:
        return next(i for i, line in enumerate(self.lines) if re.search(pattern, line))

    async def wait_for(self, pattern: str, start: int = 0) -> re.Match[str]:
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    if m := self.find(pattern, start):
                        return m
                    if self.closed:
                        raise AssertionError(f"exited before logging {pattern!r}:\n" + "".join(self.lines))
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not logged within {TIMEOUT} s: {pattern!r}:\n" + "".join(self.lines)) from None

    def text(self) -> str:
        return "".join(self.lines)


class Watch:
    """The dispatcher process and the host it works against."""

    def __init__(self, sim_path: str, root: Path, proc: subprocess.Popen[bytes], log: ProcLog,
                 notify: socket.socket, gate: socket.socket | None) -> None:
        self.sim_path, self.root, self.proc, self.log, self.notify = sim_path, root, proc, log, notify
        self.gate = gate

    async def at_gate(self) -> socket.socket:
        """The next instance to reach the start-up gate, held there until the returned
        connection is closed."""
        assert self.gate is not None
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(self.gate), TIMEOUT)
        return conn

    def ctl(self) -> SimControl:
        return SimControl(self.sim_path)

    def link_backend(self, name: str, devid: int, sock: Path) -> None:
        """The back-end socket where the guest's instance looks for it."""
        d = self.root / systemd_escape(name)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{devid}.sock").symlink_to(sock)

    async def xl(self, method: str, *args: Any, **kw: Any) -> Any:
        """A blocking SimControl call (``xl create`` may wait for InitWait) off the event loop."""
        def call() -> Any:
            with self.ctl() as ctl:
                return getattr(ctl, method)(*args, **kw)

        return await asyncio.get_running_loop().run_in_executor(None, call)

    async def served(self, name: str, domid: int) -> None:
        await self.log.wait_for(rf"{re.escape(name)}: domain {domid} is served \(READY\)")

    async def instance_pid(self, name: str, domid: int) -> int:
        m = await self.log.wait_for(rf"{re.escape(name)}: started instance for domain {domid}: pid (\d+)")
        return int(m.group(1))

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 3 * TIMEOUT)


def start_sim(sim_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(sim_dir, "xen.sock")
    r, w = os.pipe()
    proc = subprocess.Popen([str(BIN / "xen-vhost-sim"), "--socket", path, "--ready-fd", str(w)], pass_fds=(w,))
    os.close(w)
    ready = select.select([r], [], [], TIMEOUT)[0]
    os.close(r)
    assert ready, "xen-vhost-sim did not start"
    return proc, path


@pytest.fixture
def watch_args() -> list[str]:
    """Extra arguments of the dispatcher (a test parametrizes this to change them)."""
    return []


# Test-only start-up gate for the instances a dispatcher spawns (and for nothing else): imported by
# every Python process started with it on PYTHONPATH, it holds an instance (recognised by the
# NOTIFY_SOCKET the dispatcher gives it) connected to the test's gate socket until the test lets
# go of that connection.
GATE_HOOK = """\
import os, socket
if os.environ.get("NOTIFY_SOCKET", "").startswith("@xen-vhost-master-watch") and os.environ.get("XVM_TEST_GATE"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gate:
        gate.connect(os.environ["XVM_TEST_GATE"])
        if gate.recv(1) == b"T":  # the test injects a temporary failure (EX_TEMPFAIL)
            os._exit(75)
"""


@pytest.fixture
def watch_gate() -> bool:
    """True: instances wait at start-up until :meth:`Watch.open_gate` (a test parametrizes this)."""
    return False


def _popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.asynccontextmanager
async def run_watch(sim_path: str, root: Path, args: list[str], env: dict[str, str],
                    gate: socket.socket | None = None) -> AsyncIterator[Watch]:
    """A dispatcher process (stopped and reaped on the way out); READY=1 awaited."""
    notify_path = str(root.parent / f"notify{next(_runs)}")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    proc = _popen([str(BIN / "xen-vhost-master"), "watch", "--runtime-root", str(root), *args],
                  {**env, "XEN_VHOST_SIM": sim_path, "NOTIFY_SOCKET": notify_path})
    assert proc.stderr is not None
    log = ProcLog(proc.stderr, asyncio.get_running_loop())
    try:
        msg = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(notify, 4096), TIMEOUT)
        assert msg.startswith(b"READY=1"), msg
        yield Watch(sim_path, root, proc, log, notify, gate)
    finally:
        stop(proc)
        proc.stderr.close()
        notify.close()


_runs = itertools.count()


@pytest_asyncio.fixture
async def watch(sim_dir: str, watch_args: list[str], watch_gate: bool) -> AsyncIterator[Watch]:
    """``xen-vhost-master watch --spawn`` against a fresh ``xen-vhost-sim``. Nothing of either is
    left when the test ends."""
    env = dict(os.environ)
    gate = None
    if watch_gate:
        hook = Path(sim_dir) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(GATE_HOOK)
        gate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gate.bind(str(hook / "gate"))
        gate.listen(8)
        gate.setblocking(False)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])])
        env["XVM_TEST_GATE"] = str(hook / "gate")
    sim, sim_path = start_sim(sim_dir)
    root = Path(sim_dir) / "run"  # short: instances put Unix sockets there
    root.mkdir()
    (Path(sim_dir) / "logs").mkdir()
    args = [a.replace("{logs}", str(Path(sim_dir) / "logs")) for a in watch_args]
    try:
        async with run_watch(sim_path, root, ["--spawn", *args], env, gate) as w:
            yield w
    finally:
        if gate is not None:
            gate.close()
        stop(sim)


async def attach(sim_path: str, domid: int, base: int = BASE, irq: int = IRQ) -> tuple[SimGuest, VirtioBlk]:
    guest = await SimGuest.connect(sim_path, domid)
    try:
        dev = await asyncio.wait_for(VirtioBlk.attach(guest, base, irq, GuestPageAllocator(guest.ram)), TIMEOUT)
    except BaseException:
        guest.close()
        raise
    return guest, dev


def ran_only_after_claimed(info: dict[str, Any], bases: list[int]) -> bool:
    """From the host's record: every window was claimed before the domain first ran."""
    history = [tuple(h) for h in info["history"]]
    first_run = history.index(("running", True))
    return all(("claimed", b) in history[:first_run] for b in bases)


async def unpaused_claimed_and_serving(watch: Watch, domid: int, disk: QsdPeer, seed: int) -> None:
    """The guest holds no pause reference any more, first ran with its window claimed, and its
    driver does I/O (checked in the back-end's image)."""
    with watch.ctl() as ctl:
        info = ctl.domain_info(domid)
    assert info["pause_count"] == 0
    assert ran_only_after_claimed(info, [BASE]), info["history"]
    guest, dev = await attach(watch.sim_path, domid)
    try:
        await io_check(dev, image_of(disk), seed)
    finally:
        guest.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the dispatcher and instances run on uvloop
async def test_a_new_guest_is_held_until_its_instance_is_ready_then_served_across_a_reboot(watch: Watch, peers: Peers) -> None:
    """``xl create -p`` then ``xl unpause`` (libxl's reference gone): the dispatcher saw the
    devices, paused the domain itself and keeps it paused until the instance it spawned for the
    guest's NAME is READY; the guest's very first access (issued while still paused) finds the
    device, and the host's record shows the window claimed before the guest ever ran. Then
    ``xl reboot``: a new domid with the same name is served by a new instance (the old one exited
    0), I/O works again. SIGTERM: the instance is stopped, the dispatcher exits 0."""
    disk = peers.qsd_raw(size=8 << 20)
    watch.link_backend("alpha", 0, disk.sock)
    domid = await watch.xl("xl_create", "alpha", [blk()], paused=True)
    await watch.log.wait_for(rf"alpha: holding a pause reference on domain {domid} ")
    with watch.ctl() as ctl:
        assert ctl.domain_info(domid)["pause_count"] == 2  # libxl's (-p) and the dispatcher's
        ctl.unpause(domid)  # `xl unpause`: only the dispatcher's reference is left
    guest = await SimGuest.connect(watch.sim_path, domid)
    try:
        # The guest's first access, issued now: held by the pause, answered by the device model.
        assert await asyncio.wait_for(guest.mmio_read(BASE, 4), TIMEOUT) == VIRTIO_MAGIC
    finally:
        guest.close()
    await watch.log.wait_for(rf"domain {domid}: pause reference dropped \(instance READY\)")
    served = watch.log.index(rf"alpha: domain {domid} is served \(READY\)")
    assert served < watch.log.index(rf"domain {domid}: pause reference dropped \(instance READY\)")
    await unpaused_claimed_and_serving(watch, domid, disk, 1)
    first_pid = await watch.instance_pid("alpha", domid)

    new = await watch.xl("xl_reboot", domid)
    assert new != domid
    await watch.log.wait_for(rf"alpha: instance for domain {domid} \(pid {first_pid}\) exited with status 0")
    # The new domain waited paused while the old instance (holding the guest's lock) went away.
    await watch.log.wait_for(rf"alpha: holding a pause reference on domain {new} ")
    await watch.served("alpha", new)
    await watch.log.wait_for(rf"domain {new}: pause reference dropped \(instance READY\)")
    second_pid = await watch.instance_pid("alpha", new)
    assert second_pid != first_pid
    guest, dev = await attach(watch.sim_path, new)
    try:
        await io_check(dev, image_of(disk), 2)
    finally:
        guest.close()

    assert await watch.terminate() == 0, watch.log.text()
    await watch.log.wait_for(rf"alpha: instance for domain {new} \(pid {second_pid}\) exited with status 0")
    with pytest.raises(ProcessLookupError):
        os.kill(second_pid, 0)  # reaped: nothing left running
    with watch.ctl() as ctl:
        info = ctl.domain_info(new)
    assert info["servers"] == [] and info["pause_count"] == 0



@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_xen_4_17_disk_guest_is_created_once_its_instance_says_initwait(watch: Watch, peers: Peers) -> None:
    """Xen 4.17's ``disk = [ "...,specification=virtio" ]`` is a ``virtio_disk`` device named
    after the disk (51712: xvda), and ``xl create`` waits for its back-end's InitWait: the
    instance the dispatcher started writes it, so the creation completes, and the guest first
    ran with its window claimed."""
    disk = peers.qsd_raw(size=8 << 20)
    watch.link_backend("kappa", 51712, disk.sock)
    domid = await watch.xl("xl_create", "kappa", [{**blk(51712), "kind": "virtio_disk"}])
    await watch.served("kappa", domid)
    await watch.log.wait_for(rf"domain {domid}: pause reference dropped \(instance READY\)")  # logged after "served"
    with watch.ctl() as ctl:
        info = ctl.domain_info(domid)
    assert ran_only_after_claimed(info, [BASE]), info["history"]
    guest, dev = await attach(watch.sim_path, domid)
    try:
        await io_check(dev, image_of(disk), 5)
    finally:
        guest.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_two_guests_at_once_each_served_by_its_own_instance(watch: Watch, peers: Peers) -> None:
    """Two guests created back to back (one with a name systemd must escape) get one instance
    each, I/O runs on both at the same time."""
    names = ["beta", "odd guest/ü"]
    disks = [peers.qsd_raw(size=8 << 20) for _ in names]
    for name, disk in zip(names, disks, strict=True):
        watch.link_backend(name, 0, disk.sock)
    domids = [await watch.xl("xl_create", name, [blk()]) for name in names]
    for name, domid in zip(names, domids, strict=True):
        await watch.served(name, domid)
    pids = {await watch.instance_pid(name, domid) for name, domid in zip(names, domids, strict=True)}
    assert len(pids) == 2
    assert (watch.root / "odd\\x20guest-\\xc3\\xbc" / "state.json").exists()  # systemd-escape's spelling
    pairs = [await attach(watch.sim_path, domid) for domid in domids]
    try:
        await asyncio.gather(*(io_check(dev, image_of(disk), seed) for (_, dev), disk, seed in zip(pairs, disks, (3, 4),
                                                                                                 strict=True)))
    finally:
        for guest, _ in pairs:
            guest.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_an_unknown_domctl_interface_is_reported_and_the_guest_still_gets_its_instance(watch: Watch) -> None:
    with watch.ctl() as ctl:
        ctl.set_domctl_interface(0x99)  # a Xen newer than the table: every known version is refused
    domid = await watch.xl("xl_create", "gamma", [blk()], paused=True)
    await watch.log.wait_for(rf"cannot pause domain {domid} \(domctl interface not known\): the guest may probe "
                             "before its windows are claimed")
    await watch.instance_pid("gamma", domid)
    with watch.ctl() as ctl:
        assert ctl.domain_info(domid)["pause_count"] == 1  # libxl's -p only


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("watch_gate", [True])
async def test_a_xen_4_17_guest_is_created_while_its_instance_is_still_starting(watch: Watch, peers: Peers) -> None:
    """A loaded dom0: the instance takes longer to start than libxl's 10 s wait for InitWait (here
    it is held at the test's gate, and ``xl create`` is given 3 s). The dispatcher says InitWait
    on its behalf while it holds the domain paused, so ``xl create`` completes; the guest does not
    run until the instance is READY, and first runs with its window claimed."""
    disk = peers.qsd_raw(size=8 << 20)
    watch.link_backend("lambda", 51712, disk.sock)
    create = asyncio.ensure_future(watch.xl("xl_create", "lambda", [{**blk(51712), "kind": "virtio_disk"}],
                                            timeout=3.0))
    held = await watch.at_gate()
    try:
        domid = await asyncio.wait_for(create, TIMEOUT)  # libxl saw InitWait: the creation completed
        await watch.log.wait_for(rf"lambda: domain {domid} is held paused: InitWait written for virtio_disk/51712 ")
        with watch.ctl() as ctl:
            info = ctl.domain_info(domid)
        assert info["pause_count"] == 1 and ("running", True) not in [tuple(h) for h in info["history"]]
    finally:
        held.close()  # the instance goes on starting
    await watch.served("lambda", domid)
    await watch.log.wait_for(rf"domain {domid}: pause reference dropped \(instance READY\)")
    await unpaused_claimed_and_serving(watch, domid, disk, 6)


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("watch_gate", [True])
async def test_sigterm_while_an_instance_starts_stops_it_and_unpauses_the_guest(watch: Watch) -> None:
    """The dispatcher is stopped while a guest's instance is still starting (held at the test's
    gate): the instance is stopped first, then the dispatcher's pause reference is dropped (only
    libxl's ``-p`` reference is left), the dispatcher exits 0 and no process is left."""
    domid = await watch.xl("xl_create", "delta", [blk()], paused=True)
    held = await watch.at_gate()
    try:
        pid = await watch.instance_pid("delta", domid)
        with watch.ctl() as ctl:
            assert ctl.domain_info(domid)["pause_count"] == 2
        assert await watch.terminate() == 0, watch.log.text()
    finally:
        held.close()
    stopped = watch.log.index(rf"delta: instance for domain {domid} \(pid {pid}\) exited with status -15")
    assert stopped < watch.log.index(rf"domain {domid}: pause reference dropped \(dispatcher stopping\)")
    with watch.ctl() as ctl:
        assert ctl.domain_info(domid)["pause_count"] == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("watch_args", [["--instance-args", "--config /nonexistent/guest.toml", "-vv",
                                          "--log-dir", "{logs}"]])
async def test_failing_instance_is_unpaused_and_retried_only_when_its_devices_change(watch: Watch) -> None:
    """Every instance exits 78 (a configuration error) before READY: logged with its status, the
    pause reference dropped at once, started again only when the guest's devices in xenstore
    change (not on any other xenstore write), three times at most. Their output goes to
    ``--log-dir``."""
    domid = await watch.xl("xl_create", "epsilon", [blk()], paused=True)
    await watch.log.wait_for(rf"epsilon: instance for domain {domid} \(pid \d+\) exited with status 78")
    await watch.log.wait_for(rf"epsilon: instance for domain {domid}: exited with status 78 before READY; "
                             r"tried again when its devices in xenstore change \(2 attempt\(s\) left\)")
    await watch.log.wait_for(rf"domain {domid}: pause reference dropped \(failed\)")
    with watch.ctl() as ctl:
        assert ctl.domain_info(domid)["pause_count"] == 1  # libxl's -p only
    xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=SimKernel(watch.sim_path).open)
    try:
        mark = len(watch.log.lines)
        await xs.write(f"/local/domain/0/backend/virtio/{domid}/0/online", "1")  # not a change of devices
        await watch.log.wait_for(rf"epsilon: domain {domid}: devices unchanged since its instance failed", mark)
    finally:
        await xs.close()
    assert watch.log.count(rf"epsilon: started instance for domain {domid}") == 1
    with watch.ctl() as ctl:
        ctl.add_virtio_device(domid, device_id=2, base=BASE + 0x200, irq=IRQ + 1, devid=1)
    await watch.log.wait_for(r"\(1 attempt\(s\) left\)")
    with watch.ctl() as ctl:
        ctl.add_virtio_device(domid, device_id=2, base=BASE + 0x400, irq=IRQ + 2, devid=2)
    await watch.log.wait_for(rf"epsilon: instance for domain {domid}: exited with status 78 before READY; giving up")
    with watch.ctl() as ctl:
        ctl.add_virtio_device(domid, device_id=2, base=BASE + 0x600, irq=IRQ + 3, devid=3)
    await watch.log.wait_for(rf"epsilon: domain {domid}: instance failed 3 times: not starting it again")
    assert watch.log.count(rf"epsilon: started instance for domain {domid}") == 3
    written = (watch.root.parent / "logs" / "epsilon.log").read_text()
    assert written.count("/nonexistent/guest.toml") == 3, written  # each start's one-line error
    assert watch.log.find(r"^\[epsilon\]") is None  # not relayed to the dispatcher's stderr


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("watch_gate", [True])
async def test_an_instance_that_fails_for_now_is_started_again_while_the_guest_stays_paused(
        watch: Watch, peers: Peers) -> None:
    """The guest's first instance exits 75 before READY (EX_TEMPFAIL: here injected at the test's
    gate; in the lab, xenstored too busy to take its connection on a loaded dom0). The dispatcher
    starts it again a second later, holding the domain paused meanwhile; the second start is
    READY and the guest first runs with its window claimed and does I/O. It dropped the pause at
    once and waited for a change of the guest's devices, which never came: the rebooted guest
    ran without its disk (lab, pyblk reboot-served)."""
    disk = peers.qsd_raw(size=8 << 20)
    watch.link_backend("mu", 0, disk.sock)
    domid = await watch.xl("xl_create", "mu", [blk()], paused=True)
    await watch.log.wait_for(rf"mu: holding a pause reference on domain {domid} ")
    with watch.ctl() as ctl:
        ctl.unpause(domid)  # `xl unpause`: only the dispatcher's reference holds it
    with await watch.at_gate() as held:
        held.send(b"T")
    await watch.log.wait_for(rf"mu: instance for domain {domid}: exited with status 75 \(a temporary failure\) "
                             r"before READY; trying again in 1 s, the domain held paused \(2 attempt\(s\) left\)")
    with watch.ctl() as ctl:
        assert ctl.domain_info(domid)["pause_count"] == 1  # still the dispatcher's
    with await watch.at_gate():
        pass  # the second start goes on
    await watch.served("mu", domid)
    await watch.log.wait_for(rf"domain {domid}: pause reference dropped \(instance READY\)")
    assert watch.log.count(rf"mu: started instance for domain {domid}") == 2
    assert watch.log.find(rf"domain {domid}: pause reference dropped \(failed") is None
    await unpaused_claimed_and_serving(watch, domid, disk, 3)


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize(("watch_gate", "watch_args"), [(True, ["--stop-timeout", "2"])])
async def test_bad_xenstore_input_and_a_domain_dying_during_start_up(watch: Watch) -> None:
    """Malformed entries are logged once and skipped; a guest without a name waits for one; a
    name systemd cannot use is refused; a domain destroyed while its instance starts loses its
    pause reference with it, the instance ends (status 69: no such domain) and is reaped."""
    xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=SimKernel(watch.sim_path).open)
    try:
        root = "/local/domain/0/backend/virtio"
        await xs.write(f"{root}/notadomain/0/state", "1")
        await watch.log.wait_for(r"backend/virtio/notadomain: not a domain id: ignored")

        # A device directory that is not a number, next to a good device: the guest is served.
        zeta = await watch.xl("xl_create", "zeta", [])
        for key in ("state", "online"):
            await xs.write(f"{root}/{zeta}/abc/{key}", "1")
        await watch.log.wait_for(rf"domain {zeta}: xenstore {root}/{zeta}/abc: device id is not a number: ignored")
        with watch.ctl() as ctl:
            ctl.add_virtio_device(zeta, device_id=2, base=BASE, irq=IRQ, devid=0)
        (await watch.at_gate()).close()
        await watch.instance_pid("zeta", zeta)
        assert watch.log.count(r"device id is not a number") == 1

        # No name yet: not served; once it has one (and its devices change), it is.
        with watch.ctl() as ctl:
            eta = ctl.create_domain(mem_bytes=16 << 20, name="eta")
        await xs.rm(f"/local/domain/{eta}/name")
        with watch.ctl() as ctl:
            ctl.add_virtio_device(eta, device_id=2, base=BASE, irq=IRQ, devid=0)
        await watch.log.wait_for(rf"domain {eta} has virtio devices but no name in xenstore")
        await xs.write(f"/local/domain/{eta}/name", "eta")
        await xs.write(f"{root}/{eta}/0/online", "1")
        (await watch.at_gate()).close()
        await watch.instance_pid("eta", eta)

        # A name too long for a unit: refused, never paused.
        long = await watch.xl("xl_create", "é" * 120, [blk()])
        await watch.log.wait_for(rf"domain {long}: unit name for guest .* systemd allows 255: not served")

        # Destroyed while its instance starts.
        theta = await watch.xl("xl_create", "theta", [blk()], paused=True)
        held = await watch.at_gate()
        try:
            pid = await watch.instance_pid("theta", theta)
            await watch.log.wait_for(rf"theta: holding a pause reference on domain {theta} ")
            with watch.ctl() as ctl:
                ctl.destroy_domain(theta)
            await watch.log.wait_for(rf"theta: domain {theta} is gone")
        finally:
            held.close()
        await watch.log.wait_for(rf"theta: instance for domain {theta} \(pid {pid}\) exited with status 69")
        await watch.log.wait_for(rf"theta: domain {theta} went away while its instance started")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with watch.ctl() as ctl:
            assert ctl.domain_info(long)["pause_count"] == 0
    finally:
        await xs.close()


# A stand-in for systemctl (the dispatcher's --systemctl): units live in a JSON file. `start` of
# an inactive unit plays the instance: the unit becomes active and its state.json names the domid
# the test put in "next" (the domain the real instance would resolve the name to); "fail" makes
# it fail like a unit whose process exited "status" (78 unless set): every start (true), or the
# next n.
FAKE_SYSTEMCTL = """\
import fcntl, json, os, sys
path = os.environ["FAKE_SYSTEMD"]
with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(path) as f:
        st = json.load(f)
    verb, unit = sys.argv[1], sys.argv[-1]
    st["calls"].append([verb, unit])
    u = st["units"].setdefault(unit, {"state": "inactive"})
    rundir = os.path.join(st["root"], unit.removeprefix("xen-vhost-master@").removesuffix(".service"))
    rc, out = 0, ""
    if verb == "is-active":
        out, rc = u["state"], 0 if u["state"] == "active" else 3
    elif verb == "start" and u.get("fail"):
        if u["fail"] is not True:
            u["fail"] -= 1
        u["state"], rc, out = "failed", 1, f"Job for {unit} failed because the control process exited with error code."
    elif verb == "start" and u["state"] != "active":
        u["state"] = "active"
        os.makedirs(rundir, exist_ok=True)
        with open(os.path.join(rundir, "state.json"), "w") as f:
            json.dump({"domid": u["next"]}, f)
    elif verb == "stop":
        u["state"] = "inactive"
    elif verb == "show":
        out = f"Result=exit-code\\nExecMainStatus={u.get('status', 78)}"
    with open(path + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(path + ".tmp", path)
print(out)
sys.exit(rc)
"""


class FakeSystemd:
    def __init__(self, work: Path, root: Path) -> None:
        self.path = work / "systemd.json"
        self.script = work / "systemctl"
        self.script.write_text(f"#!{sys.executable}\n{FAKE_SYSTEMCTL}")
        self.script.chmod(0o755)
        self.path.write_text(json.dumps({"root": str(root), "units": {}, "calls": []}))

    def _edit(self, unit: str, **fields: Any) -> None:
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            st = json.loads(self.path.read_text())
            st["units"].setdefault(unit, {"state": "inactive"}).update(fields)
            self.path.write_text(json.dumps(st))

    def will_serve(self, name: str, domid: int) -> None:
        self._edit(f"xen-vhost-master@{systemd_escape(name)}.service", next=domid)

    def set(self, name: str, **fields: Any) -> None:
        self._edit(f"xen-vhost-master@{systemd_escape(name)}.service", **fields)

    def calls(self, verb: str) -> list[str]:
        return [unit for v, unit in json.loads(self.path.read_text())["calls"] if v == verb]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_systemd_mode_starts_units_by_name_and_waits_for_a_rebooted_guests_old_unit(sim_dir: str) -> None:
    """systemd mode against a stand-in systemctl: a new guest's unit is started (pause held until
    ``systemctl start`` returns); after a reboot the unit still serves the old domid, so the
    dispatcher waits (the new guest paused) until it is inactive, then starts it for the new
    one; a unit stuck on a vanished domain is stopped after --reboot-grace; a failing start is
    reported with its exit status and unpaused. Stopping the dispatcher stops no unit; a new
    dispatcher finds the served guests and leaves them (and their guests) alone."""
    sim, sim_path = start_sim(sim_dir)
    root = Path(sim_dir) / "run"
    root.mkdir()
    fake = FakeSystemd(Path(sim_dir), root)
    env = dict(os.environ, FAKE_SYSTEMD=str(fake.path))
    args = ["--systemd", "--systemctl", str(fake.script), "--reboot-grace", "3"]
    unit = "xen-vhost-master@lambda.service"
    try:
        async with run_watch(sim_path, root, args, env) as watch:
            with watch.ctl() as ctl:
                first = ctl.xl_create("lambda", [blk()], paused=True)
                fake.will_serve("lambda", first)
                ctl.unpause(first)
            await watch.served("lambda", first)
            await watch.log.wait_for(rf"domain {first}: pause reference dropped \(instance READY\)")
            assert fake.calls("start") == [unit]

            # Reboot: the unit is still active for the old domid until the test says it ended.
            fake.will_serve("lambda", first + 1)
            second = await watch.xl("xl_reboot", first, timeout=0.5)  # nobody answers Closing here
            assert second == first + 1
            await watch.log.wait_for(rf"lambda: domain {second} appeared while {re.escape(unit)} is still active "
                                     rf"for domain {first}: waiting for it to end")
            with watch.ctl() as ctl:
                assert ctl.domain_info(second)["pause_count"] == 1  # the dispatcher's
            fake.set("lambda", state="inactive")  # the old instance exited 0 with its domain
            await watch.served("lambda", second)
            assert fake.calls("start") == [unit, unit] and fake.calls("stop") == []

            # Reboot again, and the unit never lets go of the vanished domain: stopped, restarted.
            fake.will_serve("lambda", second + 1)
            third = await watch.xl("xl_reboot", second, timeout=0.5)
            await watch.log.wait_for(rf"lambda: {re.escape(unit)} still serves domain {second}, gone for 3 s: "
                                     "stopping it")
            await watch.served("lambda", third)
            assert fake.calls("stop") == [unit]

            fake.set("mu", fail=True)
            mu = await watch.xl("xl_create", "mu", [blk()], paused=True)
            await watch.log.wait_for(rf"mu: instance for domain {mu}: systemctl start xen-vhost-master@mu.service "
                                     r"failed \(status 1: .*result exit-code, exit status 78\)")
            with watch.ctl() as ctl:
                assert ctl.domain_info(mu)["pause_count"] == 1  # libxl's -p only

            # A start that fails for now (exit 75): started again, the guest held paused meanwhile.
            fake.set("nu", fail=1, status=75)
            fake.will_serve("nu", mu + 1)
            nu = await watch.xl("xl_create", "nu", [blk()], paused=True)
            assert nu == mu + 1
            await watch.log.wait_for(rf"nu: instance for domain {nu}: systemctl start xen-vhost-master@nu.service "
                                     r"failed \(status 1: .*exit status 75\); trying again in 1 s, the domain held paused")
            await watch.served("nu", nu)
            await watch.log.wait_for(rf"domain {nu}: pause reference dropped \(instance READY\)")
            assert fake.calls("start").count("xen-vhost-master@nu.service") == 2
            assert await watch.terminate() == 0
        assert fake.calls("stop") == [unit]  # stopping the dispatcher stopped no unit

        async with run_watch(sim_path, root, args, env) as again:
            await again.log.wait_for(rf"lambda: domain {third} is served \(READY\)")
            assert again.log.find(rf"holding a pause reference on domain {third}") is None
            assert fake.calls("start")[4:].count(unit) == 1  # a no-op for an active unit
    finally:
        stop(sim)


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_spawn_mode_restarts_an_instance_that_dies_after_ready(watch: Watch, peers: Peers) -> None:
    """An instance killed while serving (SIGKILL) is started again for the same domain, which
    adopts what its predecessor left; a write the guest issued meanwhile completes."""
    disk = peers.qsd_raw(size=8 << 20)
    watch.link_backend("nu", 0, disk.sock)
    domid = await watch.xl("xl_create", "nu", [blk()])
    await watch.served("nu", domid)
    pid = await watch.instance_pid("nu", domid)
    guest, dev = await attach(watch.sim_path, domid)
    try:
        await io_check(dev, image_of(disk), 6)
        mark = len(watch.log.lines)
        os.kill(pid, signal.SIGKILL)
        await watch.log.wait_for(rf"nu: instance for domain {domid} \(pid {pid}\) exited with status -9", mark)
        await watch.log.wait_for(rf"nu: domain {domid} is served \(READY\)", mark)
        assert watch.log.count(rf"nu: started instance for domain {domid}") == 2
        await io_check(dev, image_of(disk), 7)
    finally:
        guest.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_pause_reference_left_by_a_killed_dispatcher_is_dropped_by_the_next(sim_dir: str, peers: Peers) -> None:
    """The dispatcher is SIGKILLed while it holds a new guest paused (its instance is held at the
    test's gate): the reference it took is recorded in xenstore, so the next dispatcher takes it
    over, serves the guest with an instance of its own and drops it at READY: the guest is not
    left paused for good, and the record is gone."""
    sim, sim_path = start_sim(sim_dir)
    root = Path(sim_dir) / "run"
    root.mkdir()
    hook = Path(sim_dir) / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    gate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gate.bind(str(hook / "gate"))
    gate.listen(8)
    gate.setblocking(False)
    gated = dict(os.environ, XVM_TEST_GATE=str(hook / "gate"),
                 PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    disk = peers.qsd_raw(size=8 << 20)
    held = None
    try:
        async with run_watch(sim_path, root, ["--spawn"], gated, gate) as first:
            first.link_backend("pi", 0, disk.sock)
            domid = await first.xl("xl_create", "pi", [blk()])
            held = await first.at_gate()
            await first.log.wait_for(rf"pi: holding a pause reference on domain {domid} ")
            with first.ctl() as ctl:
                assert ctl.domain_info(domid)["pause_count"] == 1  # ours: libxl's is gone
            first.proc.kill()  # no clean-up of any kind
            await asyncio.get_running_loop().run_in_executor(None, first.proc.wait, TIMEOUT)
        async with run_watch(sim_path, root, ["--spawn"], dict(os.environ)) as second:
            await second.log.wait_for(rf"pi: domain {domid}: taking over the pause reference a previous dispatcher left")
            await second.served("pi", domid)
            await second.log.wait_for(rf"domain {domid}: pause reference dropped \(instance READY\)")
            with second.ctl() as ctl:
                assert ctl.domain_info(domid)["pause_count"] == 0
            xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=SimKernel(sim_path).open)
            record = "/local/domain/0/xen-vhost-master-watch/paused"
            try:  # the record goes right after the drop: wait for xenstore to show it gone
                async with await xs.watch(record) as w, asyncio.timeout(TIMEOUT):
                    async for _ in w:
                        if await xs.directory(record) == []:
                            break
            finally:
                await xs.close()
            guest, dev = await attach(sim_path, domid)
            try:
                await io_check(dev, image_of(disk), 9)
            finally:
                guest.close()
    finally:
        if held is not None:
            held.close()  # the first dispatcher's instance goes on: the guest's lock is taken, it exits 73
        gate.close()
        stop(sim)


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_restarted_dispatcher_leaves_a_running_instance_alone(sim_dir: str, peers: Peers) -> None:
    """A dispatcher killed outright leaves its instance running (it holds the guest's lock); the
    next dispatcher finds the guest at its first scan, sees the lock held, and neither pauses the
    guest nor starts a second instance. The guest's I/O goes on throughout."""
    sim, sim_path = start_sim(sim_dir)
    root = Path(sim_dir) / "run"
    root.mkdir()
    logs = Path(sim_dir) / "logs"
    logs.mkdir()
    disk = peers.qsd_raw(size=8 << 20)
    pid = None
    try:
        async with run_watch(sim_path, root, ["--spawn", "--log-dir", str(logs)], dict(os.environ)) as first:
            first.link_backend("omicron", 0, disk.sock)
            domid = await first.xl("xl_create", "omicron", [blk()])
            await first.served("omicron", domid)
            pid = await first.instance_pid("omicron", domid)
            # "served" is logged just before the pause reference is dropped: a kill in between
            # leaves the guest paused (no dispatcher is left to drop it)
            await first.log.wait_for(rf"domain {domid}: pause reference dropped")
            first.proc.kill()  # no clean-up of any kind
            await asyncio.get_running_loop().run_in_executor(None, first.proc.wait, TIMEOUT)
        os.kill(pid, 0)  # still running
        guest, dev = await attach(sim_path, domid)
        try:
            async with run_watch(sim_path, root, ["--spawn"], dict(os.environ)) as second:
                await second.log.wait_for(rf"omicron: domain {domid} is served \(pid {pid} holds its instance lock\)")
                assert second.log.find("holding a pause reference") is None
                assert second.log.find("started instance") is None
                await io_check(dev, image_of(disk), 8)
        finally:
            guest.close()
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        stop(sim)
