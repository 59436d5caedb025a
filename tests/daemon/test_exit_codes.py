"""Permanent problems exit with their own documented code and one line saying what is missing and
how to fix it; the units' RestartPreventExitStatus= lists exactly those codes.

The simulated host plays the hosts that can never serve a guest (``SimControl.set_host``): no
/dev/xen nodes, a domU's /proc/xen/capabilities, nodes that refuse this user, a Xen built without
CONFIG_IOREQ_SERVER. The daemon runs as an operator runs it, in its own process.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.test_daemon_cli import BIN, DOMID, TIMEOUT, daemon_env
from xen_vhost_master import cli
from xen_vhost_master.errors import PERMANENT_EXIT_CODES, ExitCode
from xen_vhost_sim.guest import SimControl

StartSim = Callable[..., tuple[subprocess.Popen[bytes], str]]  # the start_sim fixture of conftest.py

DAEMON = str(BIN / "xen-vhost-master")
UNITS = Path(__file__).resolve().parents[2] / "systemd"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DAEMON, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def verdict(r: subprocess.CompletedProcess[str]) -> str:
    """The daemon's last stderr line: the one-line verdict (no traceback before it)."""
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["--domain", "0"], ["--domid", "0"], ["--domain", "32752"], ["--domid", "65535"]])
def test_a_domain_id_that_is_no_guests_is_refused_at_parse_time(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(args)
    assert e.value.code == ExitCode.USAGE
    assert "a guest's domain id is 1..32751" in capsys.readouterr().err
    assert cli.parse_args(["--domain", "32751"]).domain == "32751"


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_hosts_that_cannot_serve_a_guest_exit_with_their_code_and_a_hint(start_sim: StartSim, sim_dir: str,
                                                                             tmp_path: Path) -> None:
    _sim, sim_path = start_sim(sim_dir)
    env = daemon_env(sim_path)
    runtime = tmp_path / "run"
    serve = ("--domain", str(DOMID), "--runtime-dir", str(runtime))
    with SimControl(sim_path) as ctl:
        ctl.set_host(devices="missing")
        r = await asyncio.to_thread(run, env, *serve)
        assert r.returncode == ExitCode.NOT_DOM0
        assert verdict(r) == ("xen-vhost-master: not a Xen dom0: /dev/xen/privcmd is missing (ENOENT): run in dom0 "
                              "with the xen-privcmd, xen-evtchn, xen-gntdev modules loaded (see README Requirements)")

        ctl.set_host(devices="ok", capabilities="")  # a domU: xenfs mounted, no control_d
        r = await asyncio.to_thread(run, env, *serve)
        assert r.returncode == ExitCode.NOT_DOM0
        assert verdict(r) == ("xen-vhost-master: not a Xen dom0: /proc/xen/capabilities lacks control_d: "
                              "run the daemon in the control domain (dom0)")

        ctl.set_host(capabilities="control_d\n", devices="eacces")
        r = await asyncio.to_thread(run, env, *serve)
        assert r.returncode == ExitCode.NOPERM
        assert verdict(r) == ("xen-vhost-master: permission denied opening /dev/xen/privcmd (EACCES): run as root, "
                              "as the unit does")

        ctl.set_host(devices="ok", ioreq_server=False)  # Debian's arm64 Xen
        r = await asyncio.to_thread(run, env, *serve)
        assert r.returncode == ExitCode.NO_IOREQ_SERVER
        errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
        assert errors == [f"ERROR xen_vhost_master: dom{DOMID}: Xen has no IOREQ server (dm_op create_ioreq_server: "
                          "ENOSYS): rebuild Xen with CONFIG_IOREQ_SERVER=y (see README Requirements)"], r.stderr
        assert "Traceback" not in r.stderr
        assert not (runtime / "status.sock").exists()
        ctl.set_host(ioreq_server=True)

    r = await asyncio.to_thread(run, env, "--domain", "nosuch", "--runtime-dir", str(runtime))
    assert (r.returncode, verdict(r)) == (ExitCode.UNAVAILABLE, "xen-vhost-master: no domain named 'nosuch'")
    # status: a domain that exists but nobody serves (3) is not a domain that does not exist (69)
    r = await asyncio.to_thread(run, env, "status", "--domid", str(DOMID))
    assert r.returncode == ExitCode.NOT_RUNNING
    assert verdict(r).startswith(f"xen-vhost-master: no daemon serves domain {DOMID} (nothing answers on ")
    r = await asyncio.to_thread(run, env, "status", "--domid", "99")
    assert (r.returncode, verdict(r)) == (ExitCode.UNAVAILABLE, "xen-vhost-master: no domain with id or name '99'")


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_an_uncreatable_runtime_directory_is_one_line_and_a_permanent_code(start_sim: StartSim, sim_dir: str,
                                                                                 tmp_path: Path) -> None:
    _sim, sim_path = start_sim(sim_dir)
    env = daemon_env(sim_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = await asyncio.to_thread(run, env, "--domain", str(DOMID), "--runtime-dir", str(blocker / "run"))
    assert r.returncode == ExitCode.RUNTIME_DIR
    assert verdict(r).startswith(f"xen-vhost-master: cannot create the runtime directory {blocker}/run: Not a directory")
    assert r.stderr.count("\n") == 2  # the platform line, then the verdict


def test_status_tells_permission_denied_from_no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    runtime = tmp_path / "run"
    runtime.mkdir()
    assert cli.main(["status", "--domain", "web1", "--runtime-dir", str(runtime)]) == ExitCode.NOT_RUNNING
    err = capsys.readouterr().err
    assert err.startswith(f"xen-vhost-master: no daemon serves domain web1 (nothing answers on {runtime}/status.sock: ")

    def denied(self: socket.socket, address: object) -> None:  # what a non-root user meets on the 0600 socket
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    assert cli.main(["status", "--domain", "web1", "--runtime-dir", str(runtime)]) == ExitCode.NOPERM
    assert capsys.readouterr().err == (f"xen-vhost-master: permission denied on {runtime}/status.sock "
                                       "(Permission denied): run status as root\n")


def test_every_exit_code_is_in_help_and_the_permanent_ones_stop_restarts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    documented = {int(m) for m in re.findall(r"^ +(\d+)  \S", text.split("exit codes")[1], re.M)}
    assert documented == {int(c) for c in ExitCode}
    man = (UNITS.parent / "docs" / "xen-vhost-master.8").read_text().split(".SH EXIT STATUS")[1].split(".SH ")[0]
    assert {int(m) for m in re.findall(r"^\.B (\d+)$", man, re.M)} == documented  # the man page says the same
    for unit in ("xen-vhost-master@.service", "xen-vhost-master-watch.service"):
        lines = [line for line in (UNITS / unit).read_text().splitlines() if line.startswith("RestartPreventExitStatus=")]
        assert len(lines) == 1, unit
        assert {int(c) for c in lines[0].split("=", 1)[1].split()} == {int(c) for c in PERMANENT_EXIT_CODES}, unit
    assert ExitCode.TEMPFAIL not in PERMANENT_EXIT_CODES and ExitCode.FAILURE not in PERMANENT_EXIT_CODES


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "type=blk,base=0x2000100,irq=33"], "base=0x2000100: not aligned to the 0x200-byte virtio-mmio window"),
    (["--device", "type=blk,base=0x2000000,irq=7"], "irq=7: not a GIC SPI (32..1019"),
    (["--device", "type=blk,base=0x2000000,irq=33,queue-size=7"], "queue-size=7: not a power of two"),
    (["--socket", "rel/{devid}.sock"], "--socket='rel/{devid}.sock': not an absolute path"),
    (["--config", "CONFIG"], "unknown table [[devices]]"),
])
def test_bad_flags_and_files_are_exit_78_before_anything_touches_xen(args: list[str], message: str, tmp_path: Path) -> None:
    """On a host that is no dom0 at all (this one: no /dev/xen), a bad flag still says what is wrong
    with the flag (78), not with the host (72)."""
    config = tmp_path / "g.toml"
    config.write_text("[[devices]]\ntype = 'blk'\nbase = 0x2000000\nirq = 33\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XEN_VHOST_SIM", "JOURNAL_STREAM")}
    r = run(env, "--domain", "web1", "--runtime-dir", str(tmp_path / "run"),
            *[str(config) if a == "CONFIG" else a for a in args])
    assert r.returncode == ExitCode.CONFIG, r.stderr
    assert message in verdict(r) and r.stderr.count("\n") == 2  # the platform line, then the one error
    assert not (tmp_path / "run").exists()
