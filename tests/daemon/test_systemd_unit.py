"""The installed unit, systemd/xen-vhost-master@.service from the package, run by real systemd (Debian 12's 252) as
PID 1 of fresh PID and mount namespaces, against ``xen-vhost-sim`` and qemu-storage-daemon.

What this proves that ``systemd-analyze security`` cannot: the daemon starts and serves guest I/O
*inside* the unit's sandbox (seccomp SystemCallFilter, MemoryDenyWriteExecute, no capabilities,
RestrictAddressFamilies, ProtectSystem=strict, PrivateTmp, DevicePolicy=closed, UMask), Type=notify
start-up (READY=1) and the watchdog, Restart=on-failure after a SIGKILL with
RuntimeDirectoryPreserve=restart (the restarted daemon adopts its predecessor's IOREQ server and,
from the unit's file descriptor store, its back-end connection, and the guest's blocked access is
served), ``systemctl reload`` as a handover (same MainPID, no restart, the IOREQ server and the
back-end connection taken over, guest I/O goes on) run by the package's postinst as on an upgrade, a
clean stop by its prerm as on ``apt remove``, and the untouched unit skipped on a host that is not a
dom0.

The unit and the program are the *installed* ones: `make deb`'s package, unpacked into a scratch
root that the namespace lays over /usr, /opt and /etc (tests/installed.py), so systemd loads
/usr/lib/systemd/system/xen-vhost-master@.service and runs /usr/bin/xen-vhost-master on Debian's
python3, as on a dom0 after ``apt install``. A drop-in changes, in plain sight, only what cannot be
without Xen or journald: the dom0 conditions reset (``ConditionPathIsDirectory=/proc/xen``,
``ExecCondition=``: no /proc/xen here), ``XEN_VHOST_SIM`` and a PYTHONPATH that plugs the simulator
(not in the package) in as a platform, binds of the test's directories and this checkout (the
simulator's code), stderr to a file, and ``DefaultDependencies=no`` (so systemd starts nothing but
this unit: no sysinit.target touching the host's files).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.test_daemon_cli import DOMID, TIMEOUT, io_check, stop
from tests.installed import Installed, sim_plugin
from tests.peers import programs
from xen_vhost_master.config import instance_name
from xen_vhost_master.names import path_name
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator

REPO = Path(__file__).resolve().parents[2]
# A guest name systemd must escape: the instance is "my\x2dguest\x20<pid>", %I gives the name back,
# and RuntimeDirectory=xen-vhost-master/%I must be the daemon's own runtime directory (under
# ProtectSystem=strict it could write nowhere else). The test run's pid in it: the booted systemd
# shares the host's cgroup tree, where two runs at once (make test beside make test-trixie) would
# otherwise share the unit's cgroup, and one's `systemctl kill` reach the other's daemon.
NAME = f"my-guest {os.getpid()}"
INSTANCE = instance_name(NAME)
UNIT = f"xen-vhost-master@{INSTANCE}.service"

#: The drop-in every unit the tests start carries: nothing of the host's boot is started with it.
NO_SYSINIT = "[Unit]\nDefaultDependencies=no\n"

BOOT = """\
set -e
mount --make-rprivate /
{overlays}mount -t proc proc /proc
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/system '/run/vhost-user/{guest_dir}'
# A safety net: the host's /tmp, /var and /etc are this namespace's too, so the units that clean
# or populate them from tmpfiles.d are masked (should anything pull in sysinit.target after all).
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
         systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer; do
  ln -s /dev/null "/run/systemd/system/$u"
done
cp -r {units}/. /run/systemd/system/
ln -s {backend} '/run/vhost-user/{guest_dir}/0.sock'
export container=xen-vhost-master-test
exec {systemd} --system --unit=xvm-test.target --log-level=info
"""


def _can_boot_systemd() -> str | None:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare or nsenter (util-linux) not installed"
    if os.geteuid() != 0:
        return "needs root (PID and mount namespaces)"
    r = subprocess.run(["unshare", "--pid", "--mount", "--fork", "true"], capture_output=True, timeout=10)
    return None if r.returncode == 0 else f"cannot create namespaces: {r.stderr.decode().strip()}"


#: What the installed daemon needs to see besides the package: this checkout (the simulator's code).
CHECKOUT_PATHS = (REPO,)
#: ProtectHome=yes makes these inaccessible (systemd.exec(5)).
HOME_DIRS = (Path("/root"), Path("/home"), Path("/run/user"))


def _under_home(paths: tuple[Path, ...]) -> bool:
    return any(p == home or home in p.parents for p in paths for home in HOME_DIRS)


class SystemdNamespace:
    """systemd as PID 1 of new PID + mount namespaces, booted with the units in ``units``;
    ``systemctl`` through nsenter. Subclasses write the units, then call :meth:`_boot`."""

    def _boot(self, work: Path, units: Path, backend_sock: Path, name: str, installed: Installed) -> None:
        """Boot with guest ``name``'s back-end socket at the daemon's default path and the package
        ``installed`` laid over /usr, /opt and /etc."""
        (units / "xvm-test.target").write_text("[Unit]\nDescription=test target\nDefaultDependencies=no\n")
        boot = work / "boot.sh"
        boot.write_text(BOOT.format(guest_dir=path_name(name), units=units, backend=backend_sock,
                                    systemd=programs.require("systemd"), overlays=installed.overlay_script()))
        self.log = open(work / "systemd.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["unshare", "--pid", "--mount", "--fork", "--kill-child", "sh", str(boot)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = self._find_pid1()

    def _find_pid1(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline:
            try:
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/exe").resolve().name == "systemd":
                    return int(pids[0])
            except FileNotFoundError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # polling another process's exec: no event to wait on
        raise AssertionError(f"systemd did not start: {self.logs()}")

    def ctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", *args, check=check)

    def run(self, *argv: str, check: bool = True) -> str:
        """``argv`` in the namespace (its mounts: the package installed; its PID 1)."""
        # -r -w: PID 1's root and cwd too. Entering a mount namespace sets the root to the namespace's
        # own, which is not PID 1's when the tests run in a chroot (tests/tools/test-trixie.sh).
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-r", "-w", *argv],
                           capture_output=True, timeout=TIMEOUT + 10, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: rc {r.returncode} {r.stderr.decode()}")
        return r.stdout.decode()

    def show_unit(self, unit: str, *props: str) -> dict[str, str]:
        out = self.ctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_running(self) -> None:
        """PID 1 has finished its (tiny) boot transaction."""
        deadline = time.monotonic() + TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.ctl("is-system-running", check=False).strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)  # systemd's boot is another process: poll its state, bounded
        raise AssertionError(f"systemd stuck in {state!r}: {self.logs()}")

    def in_ns(self, pid_in_ns: int | str) -> str:
        """/proc/<pid>/status of a process of the namespace, read from inside it."""
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-r", "-w", "cat", f"/proc/{pid_in_ns}/status"],
                           capture_output=True, timeout=TIMEOUT, check=False)
        return r.stdout.decode()

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid1, 9)  # PID 1 of the namespace: the kernel kills everything in it
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def sim_dropin(work: Path, sim_path: str) -> str:
    """The drop-in that lets an installed unit run against the simulated Xen host (the module's
    docstring says why each line is there); [Service] lines may follow."""
    plugin = sim_plugin(work / "plugin")
    return (
        "[Unit]\nDefaultDependencies=no\n"
        "ConditionPathIsDirectory=\n"
        "[Service]\nExecCondition=\n"
        f"Environment=XEN_VHOST_SIM={sim_path} PYTHONPATH={plugin}\n"
        f"BindReadOnlyPaths={' '.join(str(p) for p in CHECKOUT_PATHS)}\n"
        # A checkout under /root, /home or /run/user is hidden by ProtectHome=yes; tmpfs hides the
        # homes just as well (an empty read-only tmpfs) and lets the bind above show through.
        + ("ProtectHome=tmpfs\n" if _under_home(CHECKOUT_PATHS) else "")
    )


class Systemd(SystemdNamespace):
    """The installed instance unit with the test's drop-in."""

    def __init__(self, work: Path, backend_sock: Path, dropin: str, installed: Installed) -> None:
        units = work / "units"
        # Every instance: DefaultDependencies=no, so that no start pulls in sysinit.target (its
        # systemd-tmpfiles-setup.service would clean the host's /tmp: this mount namespace shares it).
        (units / "xen-vhost-master@.service.d").mkdir(parents=True)
        (units / "xen-vhost-master@.service.d" / "no-sysinit.conf").write_text(NO_SYSINIT)
        # The simulator, for the test's guest only: any other instance runs the installed unit as is.
        (units / f"{UNIT}.d").mkdir(parents=True)
        (units / f"{UNIT}.d" / "test.conf").write_text(dropin)
        self._boot(work, units, backend_sock, NAME, installed)

    def show(self, *props: str) -> dict[str, str]:
        return self.show_unit(UNIT, *props)

    def wait_active(self) -> dict[str, str]:
        """The unit is active again (a reload ends with the daemon's READY=1)."""
        deadline = time.monotonic() + TIMEOUT
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.show("ActiveState", "SubState", "MainPID", "NRestarts")
            if state["ActiveState"] == "active":
                return state
            time.sleep(0.1)  # systemd's unit state is another process's: poll it, bounded
        raise AssertionError(f"{UNIT} not active again: {state}")


def _field(status: str, name: str) -> int:
    """A number of /proc/<pid>/status ("VmHWM:\t  41234 kB" -> 41234)."""
    line = next(line for line in status.splitlines() if line.startswith(f"{name}:"))
    return int(line.split()[1])


def wait_for_line(path: Path, text: str) -> None:
    """``text`` appears in the daemon's log file (written by another process: polled, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never logged: {path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="xsd-"))  # short: sun_path
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.peer
@pytest.mark.timeout(90)
@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon itself runs on uvloop
async def test_the_installed_unit_under_real_systemd(start_sim, work, peers, user, installed_package):
    """``user``: root (the unit as shipped), or a dedicated unprivileged user as systemd/README.md's
    "Running as a dedicated user" adds with a drop-in (User=/Group=); its sockets are made
    reachable for it the way that section says (here: mode 0666 on the simulator's and qsd's)."""
    programs.require("systemd")
    reason = _can_boot_systemd()
    if reason is not None:
        programs.unable(reason)
    sim, sim_path = start_sim(str(work), name=NAME)
    disk = peers.qsd_raw(size=8 << 20)
    if user != "root":
        for path in (work, disk.sock.parent):
            path.chmod(0o755)
        for path in (Path(sim_path), disk.sock):
            path.chmod(0o666)
    dropin = (
        sim_dropin(work, sim_path)
        + ("" if user == "root" else f"User={user}\nGroup={grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name}\n")
        + f"BindPaths={work} {disk.sock.parent}\n"
        + f"StandardError=append:{work / 'daemon.log'}\n"
    )
    sd = None
    guest = None
    try:
        sd = await asyncio.to_thread(Systemd, work, disk.sock, dropin, installed_package)
        await asyncio.to_thread(sd.wait_running)
        # The installed unit, untouched, on a host that is not a dom0 (no /proc/xen here): skipped
        # by its condition, not failed, and no daemon ran.
        await asyncio.to_thread(sd.ctl, "start", "xen-vhost-master@not-a-dom0.service")
        skipped = await asyncio.to_thread(sd.show_unit, "xen-vhost-master@not-a-dom0.service", "ActiveState",
                                          "ConditionResult", "Result", "ExecMainPID")
        assert skipped == {"ActiveState": "inactive", "ConditionResult": "no", "Result": "success",
                           "ExecMainPID": "0"}, skipped
        # Type=notify: `systemctl start` returns once the daemon said READY=1 (it then serves).
        await asyncio.to_thread(sd.ctl, "start", UNIT)
        first = await asyncio.to_thread(sd.show, "ActiveState", "MainPID", "NRestarts")
        assert first["ActiveState"] == "active", first
        status = await asyncio.to_thread(sd.in_ns, int(first["MainPID"]))
        # The sandbox is really there: seccomp filter mode, no_new_privs, no capabilities.
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status, status
        uid = pwd.getpwnam(user).pw_uid
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status, status

        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, 0x2000000, 33, GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, disk.image, 11)
        served = await asyncio.to_thread(sd.in_ns, int(first["MainPID"]))
        print(f"daemon after I/O: {_field(served, 'VmHWM')} kB peak RSS, {_field(served, 'Threads')} threads")
        # The unit's MemoryMax=/TasksMax= come from these figures (its comment): well inside them.
        limits = await asyncio.to_thread(sd.show, "MemoryMax", "TasksMax")
        assert _field(served, "VmHWM") * 1024 * 4 < int(limits["MemoryMax"]), (served, limits)
        assert _field(served, "Threads") * 4 <= int(limits["TasksMax"]), (served, limits)

        # An upgrade: the package's postinst (`configure <old version>`) reloads every active instance,
        # the handover. The same process re-executes itself (MainPID unchanged, no
        # restart counted), the new image adopts the IOREQ server, and the guest's I/O goes on.
        await asyncio.to_thread(sd.run, "sh", str(installed_package.control / "postinst"), "configure", "0.0.1-1")
        await asyncio.to_thread(wait_for_line, work / "daemon.log", "ioreq server 0 adopted")
        reloaded = await asyncio.to_thread(sd.wait_active)
        assert (reloaded["MainPID"], reloaded["NRestarts"]) == (first["MainPID"], "0"), reloaded
        assert "Seccomp:\t2" in await asyncio.to_thread(sd.in_ns, int(reloaded["MainPID"]))  # still sandboxed
        data = random.Random(14).randbytes(64 << 10)
        await asyncio.wait_for(blk.write(4096, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(4096, 128), TIMEOUT) == data
        await io_check(blk, disk.image, 15)

        # SIGKILL: Restart=on-failure brings it back; RuntimeDirectoryPreserve=restart kept state.json,
        # so the new daemon adopts the IOREQ server and serves the guest's blocked access.
        await asyncio.to_thread(sd.ctl, "kill", "--signal=KILL", UNIT)
        data = random.Random(12).randbytes(64 << 10)
        await asyncio.wait_for(blk.write(2048, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(2048, 128), TIMEOUT) == data
        second = await asyncio.to_thread(sd.show, "ActiveState", "MainPID", "NRestarts")
        assert second["ActiveState"] == "active" and second["NRestarts"] == "1", second
        assert second["MainPID"] != first["MainPID"]
        await io_check(blk, disk.image, 13)
        await blk.close()

        # `apt remove`: the package's prerm stops every instance (and the dispatcher, not running here).
        await asyncio.to_thread(sd.run, "sh", str(installed_package.control / "prerm"), "remove")
        final = await asyncio.to_thread(sd.show, "ActiveState", "Result", "ExecMainStatus")
        assert final == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, final
        log = (work / "daemon.log").read_text()
        assert log.count("ioreq server 0 adopted") == 2, log[-3000:]  # by the reload, and after the SIGKILL
        # ... each on the back-end connection its predecessor had: the handover passes it to the new
        # image, and across the SIGKILL the unit's file descriptor store (FileDescriptorStoreMax=) held it
        assert log.count("going on with the back-end connection kept from the previous process") == 2, log[-3000:]
        assert "unusable" not in log and "cannot record the back-end session" not in log, log[-3000:]
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == []  # the clean stop destroyed the IOREQ server
    except BaseException:
        if sd is not None:
            print(sd.logs())
            print(sd.ctl("status", "--no-pager", "--lines=0", UNIT, check=False))
        if (work / "daemon.log").exists():
            print((work / "daemon.log").read_text()[-4000:])
        raise
    finally:
        if guest is not None:
            guest.close()
        if sd is not None:
            sd.close()
        stop(sim)
