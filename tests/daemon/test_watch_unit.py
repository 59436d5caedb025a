"""The shipped dispatcher unit, systemd/xen-vhost-master-watch.service, with the shipped instance
template, run by real systemd (PID 1 of fresh PID and mount namespaces, as in
test_systemd_unit.py) against ``xen-vhost-sim`` and qemu-storage-daemon.

What this proves: inside its sandbox (seccomp, no capabilities, ProtectSystem=strict,
PrivateNetwork, RestrictAddressFamilies=AF_UNIX) the dispatcher reaches xenstore and privcmd and
drives PID 1 with ``systemctl``: ``xl create -p`` + ``xl unpause`` of a guest whose name needs
escaping starts ``xen-vhost-master@<escaped name>.service``, the guest stays paused until that
unit is READY, I/O goes through; ``xl reboot`` gets the same unit started again for the new
domid; stopping the dispatcher leaves the instance running.

The units and the program are the installed ones (`make deb`'s package laid over /usr, /opt and
/etc, as in test_systemd_unit.py), with the same drop-in for both units (``sim_dropin``: dom0
conditions reset, ``DefaultDependencies=no``, ``XEN_VHOST_SIM`` and the simulator plugged in through
PYTHONPATH, binds of the test's directories) plus stderr to files.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.test_daemon_cli import TIMEOUT, io_check, stop
from tests.daemon.test_dispatcher import (
    attach,
    blk,
    image_of,
    ran_only_after_claimed,
    start_sim,
)
from tests.daemon.test_systemd_unit import SystemdNamespace, _can_boot_systemd, _field, sim_dropin
from tests.installed import Installed
from tests.peers import programs
from tests.peers.harness import Peers
from xen_vhost_master.names import systemd_escape
from xen_vhost_sim.guest import SimControl

REPO = Path(__file__).resolve().parents[2]
NAME = "web-1 b"
INSTANCE = systemd_escape(NAME)
UNIT = f"xen-vhost-master@{INSTANCE}.service"
WATCH = "xen-vhost-master-watch.service"



class Systemd(SystemdNamespace):
    """systemd as PID 1 of new namespaces with both units installed (the package's, laid over
    /usr: tests/installed.py); ``systemctl`` via nsenter."""

    def __init__(self, work: Path, backend_sock: Path, sim_path: str, installed: Installed) -> None:
        units = work / "units"
        units.mkdir()
        for name, log in (("xen-vhost-master@.service", "instance.log"), (WATCH, "watch.log")):
            (units / f"{name}.d").mkdir()
            (units / f"{name}.d" / "test.conf").write_text(
                sim_dropin(work, sim_path) + f"BindPaths={work} {backend_sock.parent}\n"
                f"StandardError=append:{work / log}\n"
            )
        self.work = work
        self._boot(work, units, backend_sock, NAME, installed)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        return self.show_unit(unit, *props)

    def status_of(self, unit: str) -> str:
        return self.in_ns(self.show(unit, "MainPID")["MainPID"])


def wait_for_log(path: Path, pattern: str) -> re.Match[str]:
    """``pattern`` appears in a unit's log file (another process writes it: polled, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text(errors="replace"))):
            return m
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never logged: {path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="xsw-"))  # short: sun_path
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.peer
@pytest.mark.timeout(120)
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_the_installed_dispatcher_unit_under_real_systemd(work: Path, peers: Peers,
                                                                installed_package: Installed) -> None:
    reason = _can_boot_systemd()
    if reason is not None:
        programs.unable(reason)
    sim, sim_path = start_sim(str(work))
    disk = peers.qsd_raw(size=8 << 20)
    watch_log = work / "watch.log"
    sd = None
    try:
        sd = await asyncio.to_thread(Systemd, work, disk.sock, sim_path, installed_package)
        await asyncio.to_thread(sd.wait_running)
        await asyncio.to_thread(sd.ctl, "start", WATCH)  # Type=notify: returns once it watches
        status = await asyncio.to_thread(sd.status_of, WATCH)
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status, status

        with SimControl(sim_path) as ctl:
            domid = ctl.xl_create(NAME, [blk()], paused=True)
        await asyncio.to_thread(wait_for_log, watch_log, rf"holding a pause reference on domain {domid} ")
        with SimControl(sim_path) as ctl:
            ctl.unpause(domid)  # `xl unpause`: the dispatcher's reference holds it until the unit is READY
        await asyncio.to_thread(wait_for_log, watch_log, rf"domain {domid}: pause reference dropped \(instance READY\)")
        assert (await asyncio.to_thread(sd.show, UNIT, "ActiveState"))["ActiveState"] == "active"
        with SimControl(sim_path) as ctl:
            info = ctl.domain_info(domid)
        assert ran_only_after_claimed(info, [0x2000000]), info["history"]
        guest, dev = await attach(sim_path, domid)
        try:
            await io_check(dev, image_of(disk), 21)
        finally:
            guest.close()
        first_pid = (await asyncio.to_thread(sd.show, UNIT, "MainPID"))["MainPID"]
        watching = await asyncio.to_thread(sd.status_of, WATCH)
        print(f"dispatcher after a start: {_field(watching, 'VmHWM')} kB peak RSS, {_field(watching, 'Threads')} threads")

        new = await asyncio.to_thread(lambda: SimControl(sim_path).xl_reboot(domid))
        await asyncio.to_thread(wait_for_log, watch_log, rf"domain {new} is served \(READY\)")
        second = await asyncio.to_thread(sd.show, UNIT, "ActiveState", "MainPID", "Result")
        assert second["ActiveState"] == "active" and second["MainPID"] != first_pid, second
        guest, dev = await attach(sim_path, new)
        try:
            await io_check(dev, image_of(disk), 22)
        finally:
            guest.close()

        await asyncio.to_thread(sd.ctl, "stop", WATCH)
        assert (await asyncio.to_thread(sd.show, WATCH, "Result"))["Result"] == "success"
        assert (await asyncio.to_thread(sd.show, UNIT, "ActiveState"))["ActiveState"] == "active"
    except BaseException:
        if sd is not None:
            print(sd.logs())
        for log in ("watch.log", "instance.log"):
            if (work / log).exists():
                print(f"--- {log}\n" + (work / log).read_text()[-4000:])
        raise
    finally:
        if sd is not None:
            sd.close()
        stop(sim)
