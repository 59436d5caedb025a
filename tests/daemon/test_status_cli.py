"""``xen-vhost-master status`` and its metrics, as an operator runs them (issue 15 items 5, 6).

Two guests on one ``xen-vhost-sim`` host, each served by its own daemon process started the way
the unit starts it (bare ``xen-vhost-master --domain=NAME``), both under one runtime root:

* ``web1``: a virtio disk from xenstore served by qemu-storage-daemon through shadow virtqueues
  (the guest does real I/O on it), a ``--device`` whose back-end is refused (``memory=xen-mmap``
  with a back-end that lacks XEN_MMAP: failed) and a malformed xenstore entry (failed);
* ``db1``: a virtio disk whose back-end is not there (waiting).

``status`` is then read as a table, as JSON, for ``--all``, and as OpenMetrics and Prometheus text
parsed by prometheus_client's own parsers. The sub-command parsers and the status client's error
classification are checked without a daemon.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from tests.daemon.test_daemon_cli import BIN, TIMEOUT, DaemonLog, io_check, stop
from tests.sim.simproc import start_sim_process
from xen_vhost_master import __version__, cli, metrics
from xen_vhost_master.errors import ExitCode
from xen_vhost_master.status import COLUMNS, STATUS_SCHEMA, driver_status_names, render_table, status_error
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

WEB, DB = (7, "web1"), (8, "db1")
BASE, IRQ = 0x2000000, 33
REFUSED_BASE, REFUSED_IRQ, REFUSED_DEVID = 0x2000400, 35, 11
MALFORMED_DEVID = 5


def _start_sim(sim_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """``xen-vhost-sim`` with both guests, each with one virtio disk at BASE in xenstore."""
    path = os.path.join(sim_dir, "xen.sock")
    argv = [str(BIN / "xen-vhost-sim"), "--socket", path]
    for domid, name in (WEB, DB):
        argv += ["--domain", f"domid={domid},mem=64M,vcpus=1,name={name}",
                 "--virtio", f"domid={domid},device_id=2,base={BASE:#x},irq={IRQ},devid=0"]
    return start_sim_process(argv, TIMEOUT), path


async def _logged(log: DaemonLog, text: str) -> None:
    """``text`` in a line the daemon logged, before or from now on (whatever the devices' order)."""
    if not any(text in line for line in log.lines):
        await log.wait_for(text)


def _status(*args: str, env: dict[str, str] | None = None, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    # as an operator's shell runs it: its output block-buffered into the pipe (no PYTHONUNBUFFERED)
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([str(BIN / "xen-vhost-master"), "status", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _row(table: str, devid: int) -> list[str]:
    """The table row of device ``devid`` in its 11 columns (two spaces or more between them)."""
    for line in table.splitlines():
        columns = re.split(r" {2,}", line.strip(), maxsplit=len(COLUMNS) - 1)
        if columns[0] == str(devid) and len(columns) == len(COLUMNS):
            return columns
    raise AssertionError(f"no row for device {devid} in:\n{table}")


# A fresh interpreter (a fork of this multi-threaded one may deadlock in the child) that imports the
# CLI as root and then becomes nobody: nobody may not be able to read this interpreter's files.
_AS_NOBODY = """
import os, shutil, sys  # noqa: F401 - (argparse imports shutil when it formats)
from xen_vhost_master import cli, eventloop  # noqa: F401 - before the files may become unreadable
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
sys.exit(cli.main(sys.argv[1:]))
"""


def _as_other_user(argv: list[str]) -> tuple[int, str]:
    """``cli.main(argv)`` running as nobody (the status socket and its directory are root's only):
    its exit code and stderr."""
    proc = subprocess.run([sys.executable, "-c", _AS_NOBODY, *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    return proc.returncode, proc.stderr


def _samples(families: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.mark.peer
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemons run uvloop in their own processes
async def test_status_table_json_all_and_metrics_of_two_served_guests_after_real_io(sim_dir, peers, tmp_path):
    sim, sim_path = _start_sim(sim_dir)
    root = tmp_path / "run"
    (root / WEB[1]).mkdir(parents=True)
    (root / DB[1]).mkdir()
    disk, other = peers.qsd_raw(size=8 << 20), peers.qsd_raw(size=8 << 20)
    (root / WEB[1] / "0.sock").symlink_to(disk.sock)  # db1's 0.sock is not there: its disk waits
    env = dict(os.environ, XEN_VHOST_SIM=sim_path)
    refused = f"type=blk,base={REFUSED_BASE:#x},irq={REFUSED_IRQ},devid={REFUSED_DEVID},socket={other.sock},memory=xen-mmap"
    daemons = [
        subprocess.Popen([str(BIN / "xen-vhost-master"), f"--domain={WEB[1]}", "--runtime-dir", str(root / WEB[1]),
                          "--device", refused], env=env, stderr=subprocess.PIPE),
        subprocess.Popen([str(BIN / "xen-vhost-master"), f"--domain={DB[1]}", "--runtime-dir", str(root / DB[1])],
                         env=env, stderr=subprocess.PIPE),
    ]
    web_log, db_log = DaemonLog(daemons[0]), DaemonLog(daemons[1])
    guest = xs = None
    try:
        await _logged(web_log, "serving virtio device 2 at 0x2000000")
        await _logged(web_log, f"device {REFUSED_DEVID}: not serving this device")
        await _logged(db_log, "device 0: waiting for back-end")
        xs = await XenstoreClient.open(socket_paths=(), opener=SimKernel(sim_path).open)
        malformed = f"/local/domain/0/backend/virtio/{WEB[0]}/{MALFORMED_DEVID}"
        for key, value in (("type", "virtio,device2"), ("base", "0x2000600"), ("irq", "36"), ("transport", "pci"),
                           ("state", "1")):
            await xs.write(f"{malformed}/{key}", value)
        await _logged(web_log, "skipping device")

        guest = await SimGuest.connect(sim_path, WEB[0])
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
        await io_check(blk, disk.image, 1)  # 256 KiB written and read back, a flush

        # The table: the header, and every device whatever its state, driver status by name.
        table = _status(f"--domain={WEB[1]}", "--runtime-root", str(root)).stdout
        header = table.splitlines()[0]
        assert header.startswith(f"guest {WEB[1]}  domid {WEB[0]}  pid {daemons[0].pid}  version {__version__}  up "), table
        assert re.split(r" {2,}", table.splitlines()[1].strip()) == list(COLUMNS), table
        _dev, type_, base, irq, backend, path, driver, kicks, calls, reconnects, error = _row(table, 0)
        assert (type_, base, irq, backend, path) == ("blk", hex(BASE), str(IRQ), "connected", "shadow"), table
        assert driver == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK", table
        assert int(kicks) > 0 and int(calls) > 0 and (reconnects, error) == ("0", "-"), table
        _dev, type_, base, irq, backend, path, driver, *_, error = _row(table, REFUSED_DEVID)
        assert (type_, base, irq, backend, driver) == ("blk", hex(REFUSED_BASE), str(REFUSED_IRQ), "failed", "-"), table
        assert "XEN_MMAP" in error, table
        row = _row(table, MALFORMED_DEVID)
        assert (row[2], row[3], row[4]) == ("0x2000600", "36", "failed") and "transport='pci'" in row[-1], table

        # --json: the document, versioned.
        doc = json.loads(_status(f"--domain={WEB[1]}", "--runtime-root", str(root), "--json").stdout)
        assert (doc["schema"], doc["version"], doc["name"], doc["domid"], doc["pid"]) == (
            STATUS_SCHEMA, __version__, WEB[1], WEB[0], daemons[0].pid)
        assert doc["uptime"] >= 0 and doc["started"] > 0
        # every ioreq counted once, under the vCPU (event channel) it came from: one vCPU here
        assert doc["ioreqs"]["served"] > 0 and doc["ioreqs"]["per_vcpu"] == [doc["ioreqs"]["served"]], doc["ioreqs"]
        assert doc["ioreqs"]["waiting"] == [], doc["ioreqs"]  # no access of the guest held now
        assert "vCPUs waiting" not in render_table([doc])
        held = {**doc, "ioreqs": {**doc["ioreqs"], "waiting": [0, 3]}}
        assert render_table([held]).splitlines()[0].endswith("  vCPUs waiting 0,3")
        by_devid = {d["devid"]: d for d in doc["devices"]}
        assert sorted(by_devid) == [0, MALFORMED_DEVID, REFUSED_DEVID]
        assert by_devid[0]["driver_status"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
        assert by_devid[0]["type"] == "blk" and by_devid[0]["data_path_stats"]["requests"] > 0
        assert [by_devid[d]["backend"] for d in (MALFORMED_DEVID, REFUSED_DEVID)] == ["failed", "failed"]

        # --all: both guests, the waiting disk of db1 among them.
        table = _status("--all", "--runtime-root", str(root)).stdout
        blocks = table.split("\n\n")
        assert [b.split()[1] for b in blocks] == [DB[1], WEB[1]], table  # (sorted by runtime directory)
        row = _row(blocks[0], 0)
        assert (row[1], row[4], row[6]) == ("blk", "waiting", "-") and "No such file or directory" in row[-1], table
        assert _row(blocks[1], 0)[4] == "connected", table
        docs = json.loads(_status("--all", "--runtime-root", str(root), "--json").stdout)
        assert docs["schema"] == STATUS_SCHEMA and docs["unreachable"] == []
        assert sorted(d["name"] for d in docs["instances"]) == [DB[1], WEB[1]]

        # Metrics, parsed by prometheus_client: what moved with the guest's I/O, for both formats.
        om = _status("--all", "--runtime-root", str(root), "--format=openmetrics").stdout
        prom = _status("--all", "--runtime-root", str(root), "--format=prometheus").stdout
        assert om.endswith("# EOF\n") and "# EOF" not in prom
        for text, parse in ((om, parse_openmetrics), (prom, parse_prometheus)):
            samples = _samples(parse(text))
            web = {"domain": WEB[1], "domid": str(WEB[0]), "device": "0", "type": "blk"}
            requests = _value(samples, "xen_vhost_master_requests_total", **web)
            assert requests >= 3  # the write, the read, the flush (and the driver's probe)
            assert _value(samples, "xen_vhost_master_guest_read_bytes_total", **web) >= 256 << 10  # the write's data
            assert _value(samples, "xen_vhost_master_guest_written_bytes_total", **web) >= 256 << 10  # the read's
            assert _value(samples, "xen_vhost_master_request_latency_seconds_count", **web) == requests
            assert _value(samples, "xen_vhost_master_request_latency_seconds_bucket", **web, le="+Inf") == requests
            assert _value(samples, "xen_vhost_master_request_latency_seconds_sum", **web) > 0
            assert _value(samples, "xen_vhost_master_kicks_total", **web) > 0
            assert _value(samples, "xen_vhost_master_calls_total", **web) > 0
            assert _value(samples, "xen_vhost_master_inflight_requests", **web) == 0  # all completed
            assert _value(samples, "xen_vhost_master_shadow_pool_size_bytes", **web) > 0
            assert _value(samples, "xen_vhost_master_backend_up", **web) == 1
            assert _value(samples, "xen_vhost_master_vcpus_waiting", domain=WEB[1], domid=str(WEB[0])) == 0
            assert _value(samples, "xen_vhost_master_backend_state", **web, state="connected") == 1
            refused_labels = {**web, "device": str(REFUSED_DEVID)}
            assert _value(samples, "xen_vhost_master_backend_up", **refused_labels) == 0
            assert _value(samples, "xen_vhost_master_backend_state", **refused_labels, state="failed") == 1
            db = {"domain": DB[1], "domid": str(DB[0]), "device": "0", "type": "blk"}
            assert _value(samples, "xen_vhost_master_backend_state", **db, state="waiting") == 1
            assert _value(samples, "xen_vhost_master_reconnects_total", **db) == 0
            assert ("xen_vhost_master_requests_total", frozenset(db.items())) not in samples  # no data path yet
            start = _value(samples, "xen_vhost_master_start_time_seconds", domain=DB[1], domid=str(DB[0]),
                           version=__version__)
            assert start > 0

        # Permission denied is its own error (and exit code), not "no daemon".
        code, err = _as_other_user(["status", f"--domain={WEB[1]}", "--runtime-root", str(root)])
        assert code == ExitCode.NOPERM and "permission denied" in err, err
        await blk.close()
        for proc in daemons:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, TIMEOUT) == 0
        gone = _status("--all", "--runtime-root", str(root), check=False)
        assert gone.returncode == 0 and gone.stdout.startswith("no instance is running"), gone
    finally:
        if guest is not None:
            guest.close()
        if xs is not None:
            await xs.close()
        for proc in daemons:
            stop(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        stop(sim)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_each_subcommand_has_its_own_help(capsys):
    top = _help(["--help"], capsys)
    assert all(f"  {c} " in top for c in ("serve", "status", "watch")) and "--device" not in top
    serve = _help(["serve", "--help"], capsys)
    assert _help(["--domain=x", "--help"], capsys) == serve  # bare flags are serve's
    assert "--device" in serve and "--memory" in serve and "--all" not in serve and "--format" not in serve
    status = _help(["status", "--help"], capsys)
    assert "--all" in status and "--format" in status and "--json" in status and "--runtime-root" in status
    assert "--device" not in status and "--memory" not in status and "--config" not in status
    watch = _help(["watch", "--help"], capsys)
    assert "--spawn" in watch and "--device" not in watch and "--format" not in watch


def test_bare_flags_are_serve_and_domid_stays_an_alias():
    args = cli.parse_args(["--domain=web1", "--memory", "shadow"])  # what xen-vhost-master@.service runs
    assert (args.command, args.domain, args.memory) == ("serve", "web1", "shadow")
    assert cli.parse_args(["--domid", "4"]).domain == "4"
    assert cli.parse_args(["serve", "--domid", "4"]).domain == "4"
    status = cli.parse_args(["status", "--domid", "4", "--json"])
    assert (status.command, status.domain, status.format) == ("status", "4", "json")
    assert cli.parse_args(["status", "--all", "--format=openmetrics"]).all
    with pytest.raises(SystemExit):
        cli.parse_args(["status", "--all", "--domain", "web1"])  # one or the other
    with pytest.raises(SystemExit):
        cli.parse_args(["status", "--domain", "web1", "--device", "type=blk"])  # not a status flag


def test_status_errors_say_what_happened():
    """Permission denied, no daemon (no socket; a socket nobody listens on) and no answer in time
    are different errors with different exit codes."""
    assert status_error(PermissionError(errno.EACCES, "Permission denied"), "/x").code == ExitCode.NOPERM
    assert "permission denied" in str(status_error(PermissionError(errno.EACCES, "Permission denied"), "/x"))
    assert status_error(FileNotFoundError(errno.ENOENT, "No such file"), "/x").code == ExitCode.NOT_RUNNING
    refused = status_error(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "/x")
    assert refused.code == ExitCode.NOT_RUNNING and "not running" in str(refused)
    assert status_error(TimeoutError(), "/x").code == 75


def test_status_all_reports_a_stale_socket_and_goes_on(tmp_path, capsys):
    """A runtime directory left with a socket nobody listens on (an instance killed): --all says
    so on stderr and exits 3 (LSB "not running"); the other formats still print what answered (nothing here)."""
    (tmp_path / "gone").mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "gone" / "status.sock"))  # bound, never listening: ECONNREFUSED
    assert cli.main(["status", "--all", "--runtime-root", str(tmp_path), "--format=openmetrics"]) == ExitCode.NOT_RUNNING
    out = capsys.readouterr()
    assert out.out == "# EOF\n" and "not running" in out.err
    assert cli.main(["status", "--domain", "gone", "--runtime-root", str(tmp_path)]) == ExitCode.NOT_RUNNING
    assert "not running" in capsys.readouterr().err


def test_driver_status_by_name():
    assert driver_status_names(15) == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]
    assert driver_status_names(0) == []
    assert driver_status_names(0x4B) == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DEVICE_NEEDS_RESET"]


def test_metrics_labels_are_escaped_and_both_formats_parse_back():
    """A guest name holding a quote, a backslash and a newline (xenstore allows them) survives both
    expositions; a counter's family is named without ``_total`` in OpenMetrics, with it in the
    Prometheus text format; an instance with no devices still has its start time."""
    name = 'we"b\\1\nx'
    doc = {"name": name, "domid": 3, "version": "9", "started": 12.5, "ioreqs": {"waiting": [0, 2]}, "devices": [
        {"devid": 0, "type": "net", "backend": "lost", "reconnects": 2, "kicks": {"0": 1, "1": 2}, "calls": {}}]}
    om = metrics.render([doc, {"name": "idle", "domid": 4, "started": 1.0, "devices": []}])
    prom = metrics.render([doc], openmetrics=False)
    assert "# TYPE xen_vhost_master_reconnects counter" in om and "# TYPE xen_vhost_master_reconnects_total counter" in prom
    labels = {"domain": name, "domid": "3", "device": "0", "type": "net"}
    for samples in (_samples(parse_openmetrics(om)), _samples(parse_prometheus(prom))):
        assert _value(samples, "xen_vhost_master_reconnects_total", **labels) == 2
        assert _value(samples, "xen_vhost_master_kicks_total", **labels) == 3
        assert _value(samples, "xen_vhost_master_backend_up", **labels) == 0
        assert _value(samples, "xen_vhost_master_backend_state", **labels, state="lost") == 1
        assert _value(samples, "xen_vhost_master_vcpus_waiting", domain=name, domid="3") == 2
    assert _value(_samples(parse_openmetrics(om)), "xen_vhost_master_start_time_seconds", domain="idle", domid="4",
                  version="") == 1.0
    assert metrics.render([], openmetrics=False) == "" and metrics.render([]) == "# EOF\n"
