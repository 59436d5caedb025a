"""One instance per guest, keyed by its name, as an operator runs it: ``xen-vhost-master --domain
NAME`` in its own process against ``xen-vhost-sim`` in another.

Checks: a second instance for a served guest exits 73 at once with the holder's pid and leaves the
first one serving (guest I/O, same IOREQ server); unknown names, malformed per-guest files and odd
names get one clear line; the per-guest file and socket templates keyed by name; the domain
vanishing during start-up ends the instance with exit 0 and nothing left behind, and SIGTERM during
start-up is honoured; SIGHUP hands the guest over to a new image of the same process with writes
in flight (each completes once, data checked, no reset seen by the guest, same pid and IOREQ
server), after which SIGTERM still tears everything down.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.test_daemon_cli import (
    BIN,
    DOMID,
    TIMEOUT,
    DaemonLog,
    io_check,
    start_sim,
    stop,
)
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import DeviceStatus, GuestPageAllocator

NAME = f"guest{DOMID}"  # what xen-vhost-sim names a domain created without a name
DAEMON = str(BIN / "xen-vhost-master")


def daemon_cmd(runtime: Path, *extra: str, domain: str = NAME) -> list[str]:
    return [DAEMON, "--domain", domain, "--runtime-dir", str(runtime), *extra]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Notify:
    """A NOTIFY_SOCKET the test reads sd_notify messages from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[bytes] = []

    async def wait_for(self, prefix: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            while True:
                msg = await loop.sock_recv(self.sock, 4096)
                self.seen.append(msg)
                if msg.startswith(prefix):
                    return msg

    def close(self) -> None:
        self.sock.close()


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemons run uvloop in their own processes
async def test_a_second_instance_for_a_served_guest_exits_73_and_leaves_the_first_serving(sim_dir, peers, tmp_path):
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    disk = peers.qsd_raw(size=8 << 20)
    (runtime / "0.sock").symlink_to(disk.sock)
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    first = await asyncio.to_thread(subprocess.Popen, daemon_cmd(runtime), env=env, stderr=subprocess.PIPE)
    guest = None
    try:
        await DaemonLog(first).wait_for("serving: ")
        assert (runtime / "lock").read_text() == f"{first.pid}\n"
        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, disk.image, 21)

        # By name, and by id through the --domid alias: refused at once, the holder named.
        for how in (["--domain", NAME], ["--domid", str(DOMID)]):
            second = await asyncio.to_thread(
                subprocess.run, [DAEMON, *how, "--runtime-dir", str(runtime)], env=env,
                capture_output=True, text=True, timeout=TIMEOUT)
            assert second.returncode == 73, second.stderr
            assert f"xen-vhost-master: domain {NAME} (id {DOMID}) is already served by pid {first.pid}\n" in second.stderr
            assert "ioreq" not in second.stderr  # it touched nothing of the guest's

        # The first instance is untouched: same IOREQ server, guest I/O with data checked.
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == [0]
        await io_check(blk, disk.image, 22)
        assert (runtime / "lock").read_text() == f"{first.pid}\n"
        assert first.poll() is None
        status = await asyncio.to_thread(
            subprocess.run, [DAEMON, "status", "--json", "--domain", NAME, "--runtime-dir", str(runtime)], env=env,
            capture_output=True, text=True, timeout=TIMEOUT)
        assert json.loads(status.stdout)["pid"] == first.pid, status  # who serves the guest
        await blk.close()
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, TIMEOUT) == 0
        assert sorted(os.listdir(runtime)) == ["0.sock"]  # lock, state and status socket gone
    finally:
        if guest is not None:
            guest.close()
        stop(first)
        if first.stderr is not None:
            first.stderr.close()
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_sighup_hands_the_guest_over_with_writes_in_flight_then_sigterm_tears_down(sim_dir, tmp_path):
    """A back-end that completes out of order (the project's RAM disk, ``--reorder``), shadow
    path: SIGHUP right after the first of 8 writes completed, three times over. Each time the
    process re-executes itself (same pid, RELOADING=1 then READY=1), adopts the same IOREQ server,
    and resumes the device from the in-flight record: every write completes exactly once (the
    guest driver fails a batch on a completion for a chain not in flight, and a lost one times
    out), every byte is in the image, and the guest's driver never saw a reset or a config
    interrupt. SIGTERM afterwards is the full teardown."""
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    runtime.mkdir()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 << 20))
    sock = Path(sim_dir) / "blk.sock"
    backend = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "vhost_user.testing.blk", "--socket", str(sock), "--size", "8M", "--image", str(image),
         "--reorder", "3", "--hold-ms", "40"], stderr=subprocess.DEVNULL)
    (runtime / "0.sock").symlink_to(sock)
    notify = Notify(tmp_path / "notify")
    env = dict(os.environ, XEN_VHOST_SIM=sim_path, NOTIFY_SOCKET=str(notify.path))
    daemon = await asyncio.to_thread(subprocess.Popen, daemon_cmd(runtime), env=env, stderr=subprocess.PIPE)
    log = DaemonLog(daemon)
    guest = None
    try:
        await notify.wait_for(b"READY=1")
        guest = await SimGuest.connect(sim_path, DOMID)
        # The guest waits out a handover as a real one does (its vCPU blocks on the access for
        # as long as the IOREQ server takes, virtio_blk's requests time out after 30 s): bounded
        # by the test's TIMEOUT, not the simulated driver's 10 s hang detector. A re-execution
        # costs the daemon about 0.3 s of CPU, but beside 10 CPU hogs one took 11 s.
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram),
                                                      mmio_timeout=TIMEOUT), TIMEOUT)
        driver, queue = blk.driver, blk.driver.queues[0]
        await io_check(blk, image, 31)
        fds = fd_count(daemon.pid)
        rng = random.Random(9)
        expected: dict[int, bytes] = {}
        resumed = 0
        for round_ in range(3):
            ops = [BlkOp("write", 4096 * round_ + 64 * i, data=rng.randbytes(16 << 10)) for i in range(8)]
            batch = asyncio.ensure_future(blk.batch(ops))
            async with asyncio.timeout(TIMEOUT):
                while len(queue.pending) < len(ops):  # all posted and kicked
                    await asyncio.sleep(0)
                await asyncio.wait(set(queue.pending), return_when=asyncio.FIRST_COMPLETED)
            daemon.send_signal(signal.SIGHUP)
            await notify.wait_for(b"RELOADING=1")
            await log.wait_for("ioreq server 0 adopted")
            await notify.wait_for(b"READY=1")
            try:
                await asyncio.wait_for(batch, TIMEOUT)  # every write, exactly once
            except Exception as e:
                raise AssertionError(f"handover {round_}: {e!r}; the daemon's log:\n{await log.ended()}") from e
            line = await log.wait_for("resum")
            resumed += "from the in-flight record" in line
            expected.update((op.sector, op.data) for op in ops)
            assert daemon.poll() is None  # the same process, re-executed: systemd's MainPID stays
            with SimControl(sim_path) as ctl:
                assert ctl.domain_info(DOMID)["servers"] == [0]
            assert (runtime / "lock").read_text() == f"{daemon.pid}\n"
            # (the writes may all have completed in the old image: a read served by the new one
            # makes it raise the line, whose simulated route it opens on first use)
            await asyncio.wait_for(blk.read(0, 1), TIMEOUT)
            assert fd_count(daemon.pid) == fds  # the old image's handles went with it
        for sector, data in expected.items():
            assert await asyncio.wait_for(blk.read(sector, len(data) // 512), TIMEOUT) == data
        status = await driver.read_status()
        assert status & DeviceStatus.DRIVER_OK and not status & DeviceStatus.DEVICE_NEEDS_RESET, status
        assert driver.config_changes == 0 and not driver.needs_reset
        assert resumed >= 1  # chains were in flight at some handover, and the record brought them back
        content = await asyncio.to_thread(image.read_bytes)
        for sector, data in expected.items():
            assert content[sector * 512:sector * 512 + len(data)] == data
        await io_check(blk, image, 32)  # and I/O goes on
        await blk.close()

        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, TIMEOUT) == 0
        assert any(m.startswith(b"STOPPING=1") for m in notify.seen) or await notify.wait_for(b"STOPPING=1")
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == []  # destroyed
        assert sorted(os.listdir(runtime)) == ["0.sock"]  # state, record, lock and status socket gone
    finally:
        if guest is not None:
            guest.close()
        stop(daemon)
        if daemon.stderr is not None:
            daemon.stderr.close()
        notify.close()
        stop(backend)
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_unknown_name_bad_config_and_odd_names_get_one_clear_line(sim_dir, tmp_path):
    sim, sim_path = start_sim(sim_dir)
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    runtime = tmp_path / "run"
    # the daemon's first line says what it runs on (xen_vhost_master/platform.py), then the error
    said = f"INFO xen_vhost_master: platform: SIMULATED Xen host at {sim_path} (xen-vhost-sim), not /dev/xen\n"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DAEMON, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)

    try:
        r = await asyncio.to_thread(run, "--domain", "nosuch", "--runtime-dir", str(runtime))
        assert (r.returncode, r.stderr) == (69, said + "xen-vhost-master: no domain named 'nosuch'\n")
        r = await asyncio.to_thread(run, "--domain", "99", "--runtime-dir", str(runtime))
        assert (r.returncode, r.stderr) == (69, said + "xen-vhost-master: no domain with id or name '99'\n")
        r = await asyncio.to_thread(run, "--domain", "", "--runtime-dir", str(runtime))
        assert r.returncode == 78 and "--domain: empty" in r.stderr
        assert not runtime.exists()  # nothing created for a guest that is not served

        # A guest with an odd name: spaces, '/', a leading '-', non-ASCII.
        odd = "-web 1/é"
        with SimControl(sim_path) as ctl:
            domid = ctl.create_domain(mem_bytes=16 << 20, name=odd)
            ctl.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=51712, kind="virtio_disk")
        conf = tmp_path / "etc"
        conf.mkdir()
        (conf / "-web 1-é.toml").write_text("[[device]\n")  # '/' in a name: the file uses its escaped form
        (conf / "\\x2dweb\\x201-\\xc3\\xa9.toml").write_text("[[device]\n")
        # --domain=NAME: a name may start with '-' (so the unit says --domain=%I)
        r = await asyncio.to_thread(run, f"--domain={odd}", "--runtime-dir", str(runtime), "--config-dir", str(conf))
        assert r.returncode == 78, r.stderr
        assert r.stderr.startswith(f"{said}xen-vhost-master: {conf}/\\x2dweb\\x201-\\xc3\\xa9.toml: not valid TOML: ")
        assert r.stderr.count("\n") == 2

        # A unit instance typed without systemd-escape: systemd hands '-' over as '/' (%I).
        r = await asyncio.to_thread(run, "--domain=/web 1/é", "--runtime-dir", str(runtime))
        assert r.returncode == 69 and "no domain named" in r.stderr
    finally:
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_per_guest_config_and_socket_templates_by_name(sim_dir, tmp_path):
    """``<config-dir>/<name>.toml`` is picked up; its device takes the xenstore device's id (a Xen
    4.17 disk, 51712) and is served in server mode on a ``{name}/{vdev}`` template: the daemon
    creates the escaped-name directory 0755 and the socket 0600."""
    sim, sim_path = start_sim(sim_dir)
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    runtime = tmp_path / "run"
    odd = "db 2.é"
    conf = tmp_path / "etc"
    conf.mkdir()
    sockets = Path(sim_dir) / "vu"
    (conf / f"{odd}.toml").write_text(
        f'memory = "shadow"\n[[device]]\ntype = "blk"\nbase = 0x2000000\nirq = 33\nmode = "server"\n'
        f'socket = "{sockets}/{{name}}/{{vdev}}-{{domid}}.sock"\n')
    daemon = None
    try:
        with SimControl(sim_path) as ctl:
            domid = ctl.create_domain(mem_bytes=16 << 20, name=odd)
            ctl.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33, devid=51712, kind="virtio_disk")
        daemon = await asyncio.to_thread(
        subprocess.Popen,
            [DAEMON, "--domain", odd, "--runtime-dir", str(runtime), "--config-dir", str(conf)],
            env=env, stderr=subprocess.PIPE)
        log = DaemonLog(daemon)
        await log.wait_for(f"configuration from {conf}/{odd}.toml: 1 device(s)")
        path = sockets / odd / f"xvda-{domid}.sock"  # a plain path component: the name itself
        await log.wait_for(f"waiting for back-end at {path} (listening for it to connect)")
        assert stat.S_IMODE(os.stat(sockets).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        daemon.send_signal(signal.SIGTERM)  # still starting (no back-end came): it stops all the same
        assert await asyncio.to_thread(daemon.wait, TIMEOUT) == 0, "".join(log.lines)
    finally:
        if daemon is not None:
            stop(daemon)
            if daemon.stderr is not None:
                daemon.stderr.close()
        stop(sim)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_domain_gone_during_start_up_exits_0_and_leaves_nothing(sim_dir, tmp_path):
    """The domain is destroyed while its instance is still starting (its back-end is not there,
    so the start waits on it): the instance notices at once, logs why, exits 0, and leaves no
    IOREQ server, state file, status socket or lock behind."""
    sim, sim_path = start_sim(sim_dir)
    runtime = tmp_path / "run"
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    daemon = await asyncio.to_thread(subprocess.Popen, daemon_cmd(runtime, "--socket", str(tmp_path / "nobody-{devid}.sock")),
                              env=env, stderr=subprocess.PIPE)
    log = DaemonLog(daemon)
    try:
        await log.wait_for("ioreq server 0 created")  # (and state.json written next to the lock)
        with SimControl(sim_path) as ctl:
            ctl.destroy_domain(DOMID)
        await log.wait_for(f"domain {DOMID} is gone")
        assert await asyncio.to_thread(daemon.wait, TIMEOUT) == 0, "".join(log.lines)
        assert os.listdir(runtime) == []
    finally:
        stop(daemon)
        if daemon.stderr is not None:
            daemon.stderr.close()
        stop(sim)
