"""Trusted state only, and nothing left behind (issue 17, items 3 and 4).

* The runtime directory holds what a restarted daemon trusts (state.json, the shadow path's
  in-flight records) and the instance lock: a directory of another user, or one another user may
  write, is refused (exit 74, one line); in the daemon's own directory every file is opened
  relative to the directory without following a symbolic link, temporary files are created
  exclusively, and what is read back is checked.
* Every way a run ends (SIGTERM, the domain destroyed without the toolstack's handshake, a device
  whose start fails after its data path was chosen) closes every fd it opened and removes every
  file it created; a crash (SIGKILL) leaves the in-flight records and state.json for the successor.

The daemon runs in the test's event loop over the in-process simulated host (fds are counted in
this process), or as a program where its exit code and stderr are the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import open_fds
from tests.daemon.test_waiting_backend import (
    BASES,
    BIN,
    DOMID,
    IRQS,
    TIMEOUT,
    Backend,
    Daemon,
    guest_domain,
    guest_of,
    io_check,
    logwatch,  # noqa: F401  (fixture)
)
from xen_vhost_master import device as device_module
from xen_vhost_master.errors import ExitCode
from xen_vhost_master.platform import Platform
from xen_vhost_master.supervisor import Options
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator

NOBODY = pwd.getpwnam("nobody").pw_uid


def runtime(tmp_path: Path, mode: int = 0o700, uid: int | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, mode)
    if uid is not None:
        os.chown(run, uid, -1)
    return run


def options(sim_dir: str, run: Path) -> Options:
    """The guest's one disk from xenstore, its back-end at sim_dir/0.sock (a RAM disk without
    XEN_MMAP: the shadow data path, which keeps an in-flight record in the runtime directory)."""
    return Options(domid=DOMID, name="late", socket_template=os.path.join(sim_dir, "{devid}.sock"),
                   state_file=str(run / "state.json"), status_socket=str(run / "status.sock"))


def victim(tmp_path: Path) -> Path:
    """A root-owned 0600 file elsewhere, what a planted link points at."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    os.chmod(path, 0o600)
    return path


# --- trusted state only ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="plants a directory of another user (chown): needs root")
@pytest.mark.parametrize(("owner", "mode", "why"), [
    ("nobody", 0o777, "is owned by uid {nobody}, not 0"),
    ("nobody", 0o700, "is owned by uid {nobody}, not 0"),
    ("root", 0o777, "is writable by others (mode 0777)"),
    ("root", 0o770, "is writable by its group (mode 0770)"),
])
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_runtime_directory_another_user_owns_or_may_write_is_refused_with_exit_74(
        owner, mode, why, start_sim, sim_dir, tmp_path):
    """The program, as the unit runs it: one line naming the directory and why, exit 74 (a
    permanent code: RestartPreventExitStatus=), and nothing written there: a link planted as
    state.json.tmp towards a root-owned file is not followed."""
    from tests.daemon.test_daemon_cli import daemon_env

    _sim, sim_path = start_sim(sim_dir)
    run = runtime(tmp_path, mode, NOBODY if owner == "nobody" else None)
    target = victim(tmp_path)
    os.symlink(target, run / "state.json.tmp")
    env = daemon_env(sim_path)
    r = await asyncio.to_thread(subprocess.run, [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir",
                                                 str(run)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == ExitCode.RUNTIME_DIR, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"xen-vhost-master: runtime directory {run} {why.format(nobody=NOBODY)}: refusing to keep state there "
        "(give --runtime-dir a directory only uid 0 can write, e.g. the unit's RuntimeDirectory=)")
    assert r.stderr.count("\n") == 2  # the platform line, then the verdict
    assert sorted(os.listdir(run)) == ["state.json.tmp"]  # no lock, no state
    assert target.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user: needs root")
@pytest.mark.asyncio
async def test_the_supervisor_refuses_a_state_file_in_a_directory_of_another_user(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path):
    """The same check where the supervisor is given a state file without the command line."""
    guest_domain(sim_control)
    run = runtime(tmp_path, 0o777, NOBODY)
    state = {"domid": DOMID, "name": "late", "ioreq_server": 0, "devices": {}}
    (run / "state.json").write_text(json.dumps(state))
    daemon = Daemon(platform, options(sim_dir, run))
    assert await asyncio.wait_for(daemon.sup.run(), TIMEOUT) == ExitCode.RUNTIME_DIR
    assert sorted(os.listdir(run)) == ["state.json"]


def test_a_runtime_directory_in_a_parent_others_may_write_is_refused(tmp_path):
    """Another user who may write the parent could swap the directory for one of theirs (a
    sticky parent, like /tmp, does not let them)."""
    from xen_vhost_master.instance import RuntimeDir

    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(Exception, match=r"its parent directory is writable by others \(mode 0777\)"):
        RuntimeDir.open(str(parent / "run"))
    os.chmod(parent, 0o1777)
    RuntimeDir.open(str(parent / "run")).close()
    assert os.stat(parent / "run").st_mode & 0o777 == 0o700


@pytest.mark.asyncio
async def test_links_planted_in_the_runtime_directory_are_neither_followed_nor_read(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path, logwatch):
    """state.json.tmp a link to a root-owned file: the state is written to a fresh file created
    exclusively, the target untouched; state.json a link to a well-formed state file: not
    read (the daemon starts fresh); the in-flight record a link: not opened through it."""
    guest_domain(sim_control)
    run = runtime(tmp_path)
    target = victim(tmp_path)
    elsewhere = tmp_path / "state-elsewhere.json"
    elsewhere.write_text(json.dumps({"domid": DOMID, "name": "late", "ioreq_server": 0, "devices": {}}))
    os.symlink(elsewhere, run / "state.json")
    os.symlink(target, run / "state.json.tmp")
    os.symlink(target, run / "shadow-0.inflight")
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    with logwatch() as log:
        daemon = Daemon(platform, options(sim_dir, run))
        await daemon.start()
        try:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            assert target.read_text() == "precious\n"
            assert not (run / "state.json").is_symlink() and not (run / "state.json.tmp").exists()
            saved = json.loads((run / "state.json").read_text())
            assert saved["domid"] == DOMID and list(saved["devices"]) == [str(BASES[0])]
            assert not [line for line in log.lines if "taking over" in line]  # the link was not read
            assert [line for line in log.lines if "ignoring unreadable state file" in line]
            assert [line for line in log.lines if "device 0: no in-flight record" in line]
        finally:
            assert await daemon.stop() == 0
    await backend.stop()
    assert target.read_text() == "precious\n"
    assert os.listdir(run) == []  # (the link named as the record went with it: unlink(2) never follows)


# --- nothing left behind --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving_with_io(daemon: Daemon, sim_host: Any, backend: Backend, run: Path) -> AsyncIterator[None]:
    """Start the daemon and let the guest's driver do I/O on the shadow path; the driver stays
    live (DRIVER_OK, rings set up) while the body ends the daemon, and lets go of its views of
    the guest's RAM afterwards."""
    await daemon.start()
    await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
    assert daemon.device(0)["data_path"] == "shadow"
    async with guest_of(sim_host) as guest:
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, backend, 7)
        assert sorted(os.listdir(run)) == ["shadow-0.inflight", "state.json", "status.sock"]
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # (the device, or the domain, is gone by now)
                await asyncio.wait_for(blk.close(), TIMEOUT)


@contextlib.asynccontextmanager
async def daemon_serving_with_io(platform: Platform, sim_host: Any, sim_control: SimControl, sim_dir: str,
                                 tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path]]:
    """The guest's one disk, its back-end a RAM disk, served by a daemon in this loop with its
    driver doing I/O (serving_with_io); yields the daemon and its runtime directory. However the
    body ends, a daemon still running is stopped, then the back-end."""
    guest_domain(sim_control)
    run = runtime(tmp_path)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    daemon = Daemon(platform, options(sim_dir, run))
    try:
        async with serving_with_io(daemon, sim_host, backend, run):
            yield daemon, run
    finally:
        if daemon.task is not None and not daemon.task.done():
            await daemon.stop()
        await backend.stop()


@pytest.mark.asyncio
async def test_sigterm_closes_every_fd_and_removes_every_file(no_fd_leak, platform, sim_host, sim_control, sim_dir,
                                                             tmp_path):
    async with daemon_serving_with_io(platform, sim_host, sim_control, sim_dir, tmp_path) as (daemon, run):
        assert await daemon.stop() == 0
        assert os.listdir(run) == []


@pytest.mark.asyncio
async def test_a_domain_destroyed_without_the_toolstack_handshake_leaves_no_fd_and_no_file(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path):
    """``destroy_domain``: the domain and its xenstore directories vanish at once (no `xl destroy`
    waiting for our Closed): the daemon exits 0 and leaves nothing."""
    async with daemon_serving_with_io(platform, sim_host, sim_control, sim_dir, tmp_path) as (daemon, run):
        await asyncio.get_running_loop().run_in_executor(None, sim_control.destroy_domain, DOMID)
        assert daemon.task is not None
        assert await asyncio.wait_for(daemon.task, TIMEOUT) == 0
        assert os.listdir(run) == []


@pytest.mark.asyncio
async def test_a_device_removal_the_domains_end_interrupts_is_finished_by_the_teardown(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path, monkeypatch, logwatch):
    """What a hard destroy does, in a fixed order: the device's xenstore directory goes and its
    removal starts (held here inside the device's close until the domain is gone); then the domain
    goes, which ends the run and cancels that removal half-way. The teardown still releases the
    device: no fd, no in-flight record. (The test above meets this order by chance.)"""
    from xen_vhost_master.device import Device

    held: list[Device] = []
    real_close = Device.close

    async def first_close_held(self: Device, stop_timeout: float | None = None) -> None:
        if not held:  # the removal's: it waits until the run's end cancels it
            held.append(self)
            await asyncio.Event().wait()
        await real_close(self, stop_timeout)

    monkeypatch.setattr(Device, "close", first_close_held)
    loop = asyncio.get_running_loop()
    with logwatch() as log:
        async with daemon_serving_with_io(platform, sim_host, sim_control, sim_dir, tmp_path) as (daemon, run):
            await loop.run_in_executor(None, lambda: sim_control.remove_virtio_device(
                DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0))
            await log.wait_for(lambda line: line == f"dom{DOMID}: device 0 removed from xenstore: tearing it down")
            await loop.run_in_executor(None, sim_control.destroy_domain, DOMID)
            assert daemon.task is not None
            assert await asyncio.wait_for(daemon.task, TIMEOUT) == 0
            assert held  # the removal was under way when the run ended
            assert os.listdir(run) == []


@pytest.mark.asyncio
async def test_sigterm_with_a_backend_that_never_answers_the_stop_still_releases_the_device(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path, monkeypatch):
    """The back-end takes the guest's rings but never answers GET_VRING_BASE: the teardown's
    bounded step gives up on it, and still closes the connection, the eventfds and the data path
    (its memfd and record) and removes the record."""
    from vhost_user import AsyncFrontend

    from xen_vhost_master import supervisor

    async def never_answers(self: AsyncFrontend, index: int) -> int:
        await asyncio.Event().wait()
        return 0

    async with daemon_serving_with_io(platform, sim_host, sim_control, sim_dir, tmp_path) as (daemon, run):
        monkeypatch.setattr(AsyncFrontend, "stop_vring", never_answers)
        monkeypatch.setattr(supervisor, "STEP_TIMEOUT", 0.5)
        assert await daemon.stop() == 0
        assert os.listdir(run) == []


@pytest.mark.asyncio
async def test_a_fatal_error_while_serving_leaves_no_fd_and_no_file(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path, monkeypatch):
    """The run ends on an error (here the xenstore device watch fails, EIO): exit 75 (a restart
    may cure it) after the same full teardown as SIGTERM: nothing left to adopt, nothing left."""
    from xen_vhost_master.supervisor import Supervisor

    failing = asyncio.Event()

    async def watch_fails(self: Supervisor) -> None:
        await failing.wait()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Supervisor, "_watch_devices", watch_fails)
    async with daemon_serving_with_io(platform, sim_host, sim_control, sim_dir, tmp_path) as (daemon, run):
        failing.set()
        assert daemon.task is not None
        assert await asyncio.wait_for(daemon.task, TIMEOUT) == ExitCode.TEMPFAIL
        assert os.listdir(run) == []


@pytest.mark.asyncio
async def test_a_device_whose_start_fails_after_its_data_path_was_chosen_keeps_nothing_open(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, tmp_path, monkeypatch, logwatch):
    """The back-end negotiated and the shadow path was chosen (its pool memfd and in-flight
    record opened), then the device's start fails (here: eventfd() answers EMFILE, as when the
    process is out of descriptors): the device waits to be tried again, and the connection, the
    eventfds made so far, the data path and its record file are all gone at once, not at exit."""
    guest_domain(sim_control)
    run = runtime(tmp_path)
    sock = os.path.join(sim_dir, "0.sock")
    real_eventfd = os.eventfd
    made: list[int] = []

    def eventfd(initval: int, flags: int = 0) -> int:
        if made:
            raise OSError(24, "Too many open files")
        made.append(real_eventfd(initval, flags))
        return made[-1]

    class DeviceOs:  # the device's os module alone: the simulated host makes eventfds of its own
        def __getattr__(self, name: str) -> object:
            return eventfd if name == "eventfd" else getattr(os, name)

    monkeypatch.setattr(device_module, "os", DeviceOs())
    with logwatch() as log:
        daemon = Daemon(platform, options(sim_dir, run))
        backend = None
        try:
            await daemon.start()
            await log.wait_for(lambda line: "back-end still not there after 2 tries" in line)
            before = open_fds()  # (between two tries: nothing of the device open)
            # in a process of its own: only the daemon's fds are in this one
            backend = subprocess.Popen([sys.executable, "-m", "vhost_user.testing.blk", "--socket", sock, "--size", "8M"],
                                       stderr=subprocess.DEVNULL)
            # a host that ran short is a waiting device (tried again), not a failed one
            await log.wait_for(lambda line: "(start failed: [Errno 24] Too many open files)" in line)
            assert made, "the failure came after the data path was chosen"
            backend.kill()  # the next tries find no back-end: nothing of the device is open between them
            backend.wait()
            backend = None
            await log.wait_for(lambda line: "device 0: waiting for back-end" in line and "Errno 24" not in line)
            left = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
            assert not left, [os.readlink(f"/proc/self/fd/{fd}") for fd in left]
            assert sorted(os.listdir(run)) == ["state.json", "status.sock"]  # no in-flight record
        finally:
            monkeypatch.undo()
            assert await daemon.stop() == 0
            if backend is not None:
                backend.kill()
                backend.wait()
    assert os.listdir(run) == []


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon runs uvloop in its own process
async def test_a_crash_leaves_the_records_for_the_successor_and_its_clean_stop_removes_them(
        start_sim, sim_dir, tmp_path):
    """SIGKILL: state.json and the in-flight record stay (RuntimeDirectoryPreserve=restart keeps
    them for the next instance, which adopts the guest); that one's SIGTERM removes them."""
    from tests.daemon.test_daemon_cli import DaemonLog, daemon_env

    _sim, sim_path = start_sim(sim_dir)
    run = runtime(tmp_path)
    sock = str(run / "0.sock")
    blk = subprocess.Popen([sys.executable, "-m", "vhost_user.testing.blk", "--socket", sock, "--size", "8M"],
                           stderr=subprocess.DEVNULL)
    cmd = [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(run)]
    env = daemon_env(sim_path)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        daemons.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
        await DaemonLog(daemons[-1]).wait_for("serving virtio device")
        assert {"lock", "state.json", "shadow-0.inflight"} <= set(os.listdir(run))
        daemons[-1].kill()
        await asyncio.to_thread(daemons[-1].wait, TIMEOUT)
        assert {"state.json", "shadow-0.inflight"} <= set(os.listdir(run))
        daemons.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
        log = DaemonLog(daemons[-1])
        await log.wait_for("taking over")
        await log.wait_for("serving virtio device")
        daemons[-1].terminate()
        assert await asyncio.to_thread(daemons[-1].wait, TIMEOUT) == 0
        assert os.listdir(run) == ["0.sock"]  # the back-end's
    finally:
        for proc in (*daemons, blk):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --- the dispatcher's files -----------------------------------------------------------------------


def test_the_dispatchers_log_dir_must_be_its_own_and_logs_are_not_written_through_links(tmp_path):
    """``watch --log-dir``: a directory others may write (not sticky) or another user owns is a
    configuration error; an instance's log planted as a link is refused, its target untouched;
    state.json reached through a link says no domain."""
    from types import SimpleNamespace

    from xen_vhost_master import dispatcher

    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o777)
    with pytest.raises(ValueError, match=r"--log-dir .*/logs: is writable by others \(mode 0777\)"):
        dispatcher.options(dispatcher.parse_args(["--spawn", "--log-dir", str(logs)]))
    if os.geteuid() == 0:
        os.chmod(logs, 0o755)
        os.chown(logs, NOBODY, -1)
        with pytest.raises(ValueError, match=rf"--log-dir .*/logs: is owned by uid {NOBODY}, not 0"):
            dispatcher.options(dispatcher.parse_args(["--spawn", "--log-dir", str(logs)]))
        os.chown(logs, 0, -1)
    os.chmod(logs, 0o755)
    opt = dispatcher.options(dispatcher.parse_args(["--spawn", "--log-dir", str(logs),
                                                    "--runtime-root", str(tmp_path / "root")]))
    launcher = SimpleNamespace(opt=opt)
    target = victim(tmp_path)
    os.symlink(target, logs / "web1.log")
    with pytest.raises(OSError):
        dispatcher.SpawnLauncher._log_file(launcher, "web1")  # type: ignore[arg-type]
    assert target.read_text() == "precious\n"
    with dispatcher.SpawnLauncher._log_file(launcher, "web2") as f:  # type: ignore[arg-type]
        f.write(b"line\n")
    assert (logs / "web2.log").read_text() == "line\n" and (logs / "web2.log").stat().st_mode & 0o777 == 0o640

    (tmp_path / "root" / "web1").mkdir(parents=True)
    elsewhere = tmp_path / "state-elsewhere.json"
    elsewhere.write_text(json.dumps({"domid": 5}))
    os.symlink(elsewhere, tmp_path / "root" / "web1" / "state.json")
    assert dispatcher._served_domid(opt, "web1") is None
    os.unlink(tmp_path / "root" / "web1" / "state.json")
    (tmp_path / "root" / "web1" / "state.json").write_text(json.dumps({"domid": 5}))
    assert dispatcher._served_domid(opt, "web1") == 5
