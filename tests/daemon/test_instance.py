"""The instance's key: the guest's name escaped as systemd does, ``--domain NAME|ID`` resolved
through (simulated) xenstore, the runtime directory, the per-guest lock, ``status``'s lookup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xen_vhost_master import cli, instance
from xen_vhost_master.config import instance_name, parse_device_arg
from xen_vhost_master.errors import ConfigError
from xen_vhost_master.instance import (
    AlreadyServed,
    DomainNotFound,
    GuestDomain,
    InstanceLock,
    find_runtime_by_domid,
    resolve_domain,
    runtime_dir,
)
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.supervisor import ExitCode, Options, Supervisor
from xen_vhost_master.xen.xenstore import XenstoreClient

from tests.daemon.test_waiting_backend import logwatch  # noqa: F401  (fixture)

ODD_NAMES = ["web1", "my-guest", "web 1", "a/b", "/lead", "tail/", "-lead", ".hidden", "x..y", "Ünïcødé",
             "日本", "tab\there", "back\\slash", "ok:_.Z9", "a//b", "é", "%i", "@x", "\udcff raw byte"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_instance_name_is_what_systemd_escape_prints(name):
    escaped = instance_name(name)
    assert "/" not in escaped and not escaped.startswith(".") and escaped.isascii()
    binary = shutil.which("systemd-escape")
    if binary is None:
        pytest.skip("systemd-escape is not installed (Debian: systemd)")
    raw = name.encode("utf-8", "surrogateescape")
    assert subprocess.run([binary, "--", raw], capture_output=True, check=True).stdout.decode() == escaped + "\n"


def test_runtime_dir_is_the_name_as_percent_I_gives_it_and_refuses_empty_or_too_long_names(tmp_path):
    # what RuntimeDirectory=xen-vhost-master/%I creates: the name itself, when it is one plain component
    assert runtime_dir("my-guest 7", root="/r") == "/r/my-guest 7"
    # one component whatever the name: escaped when it is not plain
    assert runtime_dir("web 1/x", root="/r") == "/r/web\\x201-x"
    assert runtime_dir("..", root="/r") == "/r/\\x2e."  # never the parent directory
    with pytest.raises(ConfigError, match="empty"):
        runtime_dir("")
    assert os.path.basename(runtime_dir("é" * 127)) == "é" * 127  # 254 bytes
    with pytest.raises(ConfigError, match="more than a directory name may have"):
        runtime_dir("é" * 128)
    # an instance started by a unit that said %i (before the upgrade's restart) keeps its directory
    (tmp_path / "my\\x2dguest").mkdir()
    assert runtime_dir("my-guest", root=str(tmp_path)) == str(tmp_path / "my\\x2dguest")
    (tmp_path / "my-guest").mkdir()
    assert runtime_dir("my-guest", root=str(tmp_path)) == str(tmp_path / "my-guest")


def test_per_guest_config_file_name():
    assert cli.guest_config_path("/etc/x", "web-1 é") == "/etc/x/web-1 é.toml"
    assert cli.guest_config_path("/etc/x", "a/b") == "/etc/x/a-b.toml"
    assert cli.guest_config_path("/etc/x", "../../etc/passwd") == "/etc/x/\\x2e.-..-etc-passwd.toml"


@pytest.mark.asyncio
async def test_resolve_by_name_by_id_and_the_errors(sim_control: SimControl, kernel: SimKernel):
    names = {sim_control.create_domain(mem_bytes=16 << 20, name=name): name for name in ODD_NAMES[:8]}
    twins = [sim_control.create_domain(mem_bytes=16 << 20, name="twin") for _ in range(2)]
    digits = sim_control.create_domain(mem_bytes=16 << 20, name="4242")
    xs = await XenstoreClient.open(socket_paths=(), opener=kernel.open)
    try:
        for domid, name in names.items():
            assert await resolve_domain(xs, name) == GuestDomain(domid, name)
            assert await resolve_domain(xs, str(domid)) == GuestDomain(domid, name)
        # all digits: a live domain id first (xl's rule), else a name
        assert await resolve_domain(xs, "4242") == GuestDomain(digits, "4242")
        with pytest.raises(DomainNotFound, match="no domain named 'nosuch'"):
            await resolve_domain(xs, "nosuch")
        with pytest.raises(DomainNotFound, match="no domain with id or name '999'"):
            await resolve_domain(xs, "999")
        with pytest.raises(DomainNotFound, match=f"2 domains are named 'twin' \\(ids {twins[0]}, {twins[1]}\\)"):
            await resolve_domain(xs, "twin")
        with pytest.raises(DomainNotFound, match="its unit is xen-vhost-master@my\\\\x2dguest.service"):
            await resolve_domain(xs, "my/guest")  # systemd's %I of an unescaped "my-guest"
        with pytest.raises(ConfigError, match="empty"):
            await resolve_domain(xs, "")
        with pytest.raises(ConfigError, match="between 1 and 32751"):
            await resolve_domain(xs, "32752")
        with pytest.raises(ConfigError, match="the domain this daemon runs in"):
            await resolve_domain(xs, str(twins[0]), backend_domid=twins[0])
        # a domain whose name node is missing is known by its id
        nameless = sim_control.create_domain(mem_bytes=16 << 20, name="gone-soon")
        await xs.rm(f"/local/domain/{nameless}/name")
        assert await resolve_domain(xs, str(nameless)) == GuestDomain(nameless, str(nameless))
    finally:
        await xs.close()
    # without xenstore only an id is understood, and it names itself
    assert await resolve_domain(None, "7") == GuestDomain(7, "7")
    with pytest.raises(ConfigError, match="with --no-xenstore give the domain id"):
        await resolve_domain(None, "web1")


def test_the_lock_admits_one_holder_names_it_and_goes_with_a_clean_exit(tmp_path, monkeypatch):
    path = str(tmp_path / "lock")
    guest = GuestDomain(5, "web 1")
    lock = InstanceLock.acquire(path, guest)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyServed, match=f"^domain web 1 \\(id 5\\) is already served by pid {os.getpid()}$"):
        InstanceLock.acquire(path, guest)  # a second open file description of the same file: refused
    # another process sees the lock too
    probe = "import fcntl,os,sys; fd=os.open(sys.argv[1],os.O_RDWR); fcntl.flock(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", probe, path], capture_output=True, check=False).returncode != 0

    # a handover: the fd survives exec, the next image takes it as it is
    lock.keep_for_exec()
    assert os.get_inheritable(lock.fd) and os.environ[instance.ENV_LOCK_FD] == str(lock.fd)
    again = InstanceLock.acquire(path, guest)
    assert again.fd == lock.fd and instance.ENV_LOCK_FD not in os.environ and not os.get_inheritable(lock.fd)
    again.release()
    assert not os.path.exists(path)  # a clean exit leaves nothing

    # a lock whose holder has not written its pid yet
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(AlreadyServed, match="another process \\(its pid is not written yet\\)"):
            InstanceLock.acquire(path, guest)
    finally:
        os.close(holder)
    # an inherited fd that is not this lock's is closed and ignored
    other = os.open(str(tmp_path / "other"), os.O_RDWR | os.O_CREAT, 0o644)
    monkeypatch.setenv(instance.ENV_LOCK_FD, str(other))
    lock = InstanceLock.acquire(path, guest)
    assert os.readlink(f"/proc/self/fd/{lock.fd}") == path
    assert str(tmp_path / "other") not in {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                                           if os.path.exists(f"/proc/self/fd/{fd}")}
    lock.release()


def test_status_finds_the_instance_by_name_or_by_the_domid_in_its_state_file(tmp_path, monkeypatch):
    monkeypatch.setattr(instance, "RUNTIME_ROOT", str(tmp_path))
    monkeypatch.setattr(cli, "RUNTIME_ROOT", str(tmp_path))
    monkeypatch.delenv("XEN_VHOST_SIM", raising=False)
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-xenstored"))
    args = cli.parse_args(["status", "--domain=web 1/x"])
    assert cli._status_socket(args) == str(tmp_path / "web\\x201-x" / "status.sock")  # no xenstore needed
    for name, domid in (("a", 3), ("b", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(f'{{"domid": {domid}, "name": "{name}"}}')
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.json").write_text("{")
    assert find_runtime_by_domid(4, str(tmp_path)) == str(tmp_path / "b")
    # an id: xenstore cannot be reached here, so the state files say where
    assert cli._status_socket(cli.parse_args(["status", "--domid", "4"])) == str(tmp_path / "b" / "status.sock")
    # xenstore unreachable and no state file: no daemon serves it (exit 3), not "no such domain" (69)
    with pytest.raises(cli._NotServed, match="no daemon serves domain 9"):
        cli._status_socket(cli.parse_args(["status", "--domain", "9"]))
    assert cli.main(["status", "--domain", "9"]) == ExitCode.NOT_RUNNING


@pytest.mark.asyncio
async def test_a_domain_gone_between_resolution_and_start_is_exit_0_and_leaves_nothing(sim_control, platform, tmp_path):
    """Resolved through xenstore, then destroyed before the IOREQ server exists: nothing to serve,
    exit 0 (the guest went away, as when it goes while served). Without xenstore nothing resolved
    it: a domain id that does not exist is exit 69."""
    domid = sim_control.create_domain(mem_bytes=16 << 20, name="brief")
    sim_control.destroy_domain(domid)
    run = tmp_path / "run"
    run.mkdir()
    opts = Options(domid=domid, name="brief", state_file=str(run / "state.json"), status_socket=str(run / "status.sock"))
    assert await Supervisor(opts, platform).run() == ExitCode.OK
    assert os.listdir(run) == []
    device = parse_device_arg("type=blk,base=0x2000000,irq=33,socket=/nonexistent.sock")
    opts = Options(domid=domid, xenstore=False, devices=(device,), state_file=str(run / "state.json"))
    assert await Supervisor(opts, platform).run() == ExitCode.UNAVAILABLE
    assert os.listdir(run) == []


SNAPSHOT = {"status": 0, "driver_features": 0, "interrupt_status": 0, "config_generation": 0,
            "selectors": [0, 0, 0, 0], "queues": [[0, 0, 0, 0, 0]]}
GONE = object()  # the key is left out
BAD_STATES = {
    "no devices": ({"devices": GONE}, "it lacks devices"),
    "domid not a number": ({"domid": "D"}, "domid 'D' is not a domain id"),
    "devices null": ({"devices": None}, "devices None is not an object"),
    "name a number": ({"name": 7}, "name 7 is not a string"),
    "server id a string": ({"ioreq_server": "0"}, "ioreq_server '0' is not an IOREQ server id"),
    "server id out of range": ({"ioreq_server": 1 << 16}, "ioreq_server 65536 is not an IOREQ server id"),
    "devices a list": ({"devices": [1]}, "devices [1] is not an object"),
    "device key": ({"devices": {"x": SNAPSHOT}}, "device key 'x' is not a window base address"),
    "device lacks queues": ({"devices": {"33554432": {k: v for k, v in SNAPSHOT.items() if k != "queues"}}},
                            "device at 0x2000000: snapshot lacks queues"),
    "selectors a string": ({"devices": {"33554432": dict(SNAPSHOT, selectors="abcd")}},
                           "device at 0x2000000: snapshot's selectors is 'abcd', not a list of 4"),
    "status a bool": ({"devices": {"33554432": dict(SNAPSHOT, status=True)}},
                      "device at 0x2000000: snapshot's status is True, not a number"),
    "queue size": ({"devices": {"33554432": dict(SNAPSHOT, queues=[[65536, 1, 0, 0, 0]])}},
                   "device at 0x2000000: snapshot's queue 0 num 65536 is not in 0..0x8000"),
    "queue short": ({"devices": {"33554432": dict(SNAPSHOT, queues=[[1, 1, 0, 0]])}},
                    "device at 0x2000000: snapshot's queue 0 is [1, 1, 0, 0], not a list of 5"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [*BAD_STATES, "good", "good without a name"])
async def test_a_malformed_state_file_is_logged_and_ignored(case, sim_control, platform, kernel, sim_dir, tmp_path, logwatch):
    """A state.json with wrong types, missing keys or out-of-range values is one warning and the
    daemon starts fresh (a new IOREQ server), as for an unreadable one, whatever part is wrong; the
    same file well formed is taken over (the IOREQ server it names is adopted), also without the
    guest's name (which files of a daemon before instances had a name lack)."""
    from tests.daemon.test_waiting_backend import running
    from xen_vhost_master.xen.dmop import DeviceModel
    from xen_vhost_master.xen.privcmd import PrivCmd

    domid = sim_control.create_domain(mem_bytes=16 << 20, name="brief")
    with PrivCmd(kernel) as privcmd:  # a predecessor's IOREQ server, still there
        server = DeviceModel(privcmd, domid).create_ioreq_server()
    state: dict[str, object] = {"domid": domid, "name": "brief", "ioreq_server": server, "devices": {"33554432": SNAPSHOT}}
    change, reason = BAD_STATES.get(case, ({"name": GONE} if case == "good without a name" else {}, ""))
    state.update(change)
    state = {k: v for k, v in state.items() if v is not GONE}
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps(state))
    device = parse_device_arg(f"type=blk,base=0x2000000,irq=33,socket={sim_dir}/absent.sock")
    opts = Options(domid=domid, name="brief", xenstore=False, devices=(device,), state_file=str(run / "state.json"))
    with logwatch() as log:
        async with running(platform, opts):
            warnings = [line for line in log.lines if "state file" in line]
            if case.startswith("good"):
                assert warnings == [f"dom{domid}: state file of a previous run found: taking over"]
                assert f"dom{domid}: ioreq server {server} adopted for 1 vCPU(s)" in log.lines
            else:
                assert warnings == [f"dom{domid}: ignoring malformed state file {run / 'state.json'}: {reason}"]
                assert not [line for line in log.lines if "adopted" in line]
                assert json.loads((run / "state.json").read_text())["ioreq_server"] != server  # started fresh

