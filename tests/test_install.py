"""`make deb`'s package, installed (tests/installed.py: unpacked into a scratch root laid over this
machine's /usr, /opt and /etc in a mount namespace) and run from where it is installed, on Debian's
own /usr/bin/python3: the command, its --version and --help, the man page, the installed units
under ``systemd-analyze verify``, what the package holds and what it leaves out, and the daemon on
asyncio's loop when uvloop is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.daemon.test_daemon_cli import DOMID, start_sim, stop
from tests.installed import REPO, Installed, sim_plugin
from tests.peers import programs
from xen_vhost_master.version import version

UNITS = ("xen-vhost-master@.service", "xen-vhost-master-watch.service")
VENV = "/opt/xen-vhost-master"


def _run(installed: Installed, argv: list[str], setup: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(installed.command(argv, setup), capture_output=True, text=True, timeout=120, cwd="/",
                          check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", **env})


def _members(deb: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=60).stdout
    import io  # noqa: PLC0415

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("."): m for m in tar.getmembers()}


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_the_installed_command_prints_its_version_and_help_on_debians_python(installed_package: Installed) -> None:
    r = _run(installed_package, ["/usr/bin/xen-vhost-master", "--version"])
    assert r.returncode == 0 and r.stdout == f"xen-vhost-master {version()}\n", r
    assert _field(installed_package.deb, "Version").startswith(version() + "-")
    # The command runs the package's environment, on Debian's interpreter, not this test's.
    r = _run(installed_package, [f"{VENV}/bin/python3", "-c", "import os, sys, xen_vhost_master, uvloop; "
                                 "print(os.path.realpath(sys.executable)); print(xen_vhost_master.__file__)"])
    assert r.returncode == 0, r
    exe, module = r.stdout.split()
    assert exe == os.path.realpath("/usr/bin/python3") and module.startswith(f"{VENV}/lib/"), r.stdout
    depends = [d.strip() for d in _field(installed_package.deb, "Depends").split(",")]
    assert depends[0] == os.path.basename(exe) and "procps" in depends, depends  # procps: ExecReload='s /bin/kill
    r = _run(installed_package, ["/usr/bin/xen-vhost-master", "serve", "--help"])
    assert r.returncode == 0 and "--domain NAME|ID" in r.stdout and "exit codes" in r.stdout, r


def test_the_man_page_is_installed_and_renders(installed_package: Installed) -> None:
    programs.require("man")
    r = _run(installed_package, ["man", "-w", "xen-vhost-master"])
    assert r.stdout.strip() == "/usr/share/man/man8/xen-vhost-master.8.gz", r
    r = _run(installed_package, ["man", "-l", "/usr/share/man/man8/xen-vhost-master.8.gz"], MANWIDTH="80")
    assert r.returncode == 0, r
    text = r.stdout
    for heading in ("NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "FILES"):
        assert f"\n{heading}\n" in text, heading
    # groff fills and justifies the NAME line (1.23, Debian 13's, pads it with more than one space)
    assert "xen-vhost-master - virtio device model" in " ".join(text.split())
    # groff's warnings (-ww) on the source: none
    w = subprocess.run(["groff", "-man", "-ww", "-z", str(REPO / "docs" / "xen-vhost-master.8")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert w.returncode == 0 and w.stderr == "", w.stderr


def test_systemd_analyze_verify_passes_on_the_installed_units(installed_package: Installed) -> None:
    """On this machine's systemd and units (Debian's xen.service, if any, and no proc-xen.mount):
    every dependency, ExecStart=/ExecCondition= program and Documentation=man: page resolves."""
    programs.require("systemd")  # systemd-analyze comes with it
    programs.require("kill")  # the instance unit's ExecReload= (procps, which the package depends on)
    units = ["/usr/lib/systemd/system/xen-vhost-master@web1.service", "/usr/lib/systemd/system/xen-vhost-master-watch.service"]
    r = _run(installed_package, ["systemd-analyze", "verify", *units])
    # Warnings about other units a release ships (verify loads the whole dependency tree) are not ours.
    ours = [line for line in r.stderr.splitlines() if "xen-vhost-master" in line]
    assert r.returncode == 0 and ours == [], r.stderr
    for unit in UNITS:
        text = (installed_package.root / "usr/lib/systemd/system" / unit).read_text()
        assert "Documentation=man:xen-vhost-master(8)" in text
        assert "Before=xendomains.service" in text and "ExecStart=/usr/bin/xen-vhost-master " in text


def test_the_package_holds_the_daemon_and_its_files_and_no_simulator(installed_package: Installed) -> None:
    members = _members(installed_package.deb)
    for path in ("/usr/bin/xen-vhost-master", "/usr/lib/tmpfiles.d/xen-vhost-master.conf",
                 "/usr/share/man/man8/xen-vhost-master.8.gz", "/usr/share/doc/xen-vhost-master/README.md",
                 "/usr/share/doc/xen-vhost-master/copyright", "/etc/default/xen-vhost-master",
                 *(f"/usr/lib/systemd/system/{u}" for u in UNITS)):
        assert path in members, path
    assert members["/usr/bin/xen-vhost-master"].mode == 0o755
    assert all(m.uname == "root" and m.gname == "root" for m in members.values())
    site = [p + "/" for p in members if p.startswith(f"{VENV}/lib/") and p.endswith("/site-packages")]
    assert len(site) == 1, site
    packages = {p[len(site[0]):].split("/")[0] for p in members if p.startswith(site[0])}
    assert {"xen_vhost_master", "vhost_user", "construct", "construct_typed", "uvloop"} <= packages
    assert not [p for p in packages if "sim" in p], packages
    # byte code compiled for the installed paths (ProtectSystem=strict: none can be written later)
    assert any(p.startswith(site[0] + "xen_vhost_master/__pycache__/") for p in members)
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(installed_package.deb)], capture_output=True,
                               check=True, timeout=60).stdout
    import io  # noqa: PLC0415

    with tarfile.open(fileobj=io.BytesIO(conffiles)) as tar:
        ctrl = {m.name.removeprefix("./"): tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
        assert ctrl["conffiles"] is not None
        assert ctrl["conffiles"].read().decode().split() == ["/etc/default/xen-vhost-master",
                                                              "/etc/default/xen-vhost-master-watch"]
        for script in ("postinst", "prerm", "postrm"):
            f = ctrl[script]
            assert f is not None
            check = subprocess.run(["sh", "-n"], input=f.read(), capture_output=True, timeout=30, check=False)
            assert check.returncode == 0, (script, check.stderr)
    # the copyright file names every bundled distribution
    copyright_text = (installed_package.root / "usr/share/doc/xen-vhost-master/copyright").read_text()
    for dist in ("construct", "construct-typing", "uvloop"):
        assert f"Comment: {dist} (PyPI), bundled" in copyright_text, dist


def test_the_installed_daemon_serves_on_asyncios_loop_when_uvloop_is_missing(installed_package: Installed,
                                                                                  tmp_path: Path) -> None:
    """The installed package with uvloop's files taken out (a copy of the scratch root): the daemon
    says so once and serves the simulated guest's device up to READY."""
    root = tmp_path / "root"
    shutil.copytree(installed_package.root, root, symlinks=True)
    removed = [p for p in root.glob("opt/xen-vhost-master/lib/*/site-packages/uvloop*")]
    assert removed
    for p in removed:
        shutil.rmtree(p)
    no_uvloop = Installed(installed_package.deb, root, installed_package.control)
    plugin = sim_plugin(tmp_path / "plugin")
    sim, sim_path = start_sim(str(tmp_path))
    try:
        proc = subprocess.Popen(
            no_uvloop.command(["/usr/bin/xen-vhost-master", "--domid", str(DOMID), "--no-xenstore", "--runtime-dir",
                               str(tmp_path / "run"), "--device",
                               f"type=blk,base=0x2000000,irq=33,socket={tmp_path / 'blk.sock'},mode=server"]),
            env={"PATH": "/usr/bin:/bin", "XEN_VHOST_SIM": sim_path, "PYTHONPATH": str(plugin)},
            stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            lines: list[str] = []
            assert proc.stderr is not None
            for line in proc.stderr:  # ends when the daemon exits; bounded by the test's timeout
                lines.append(line)
                if "serving:" in line:  # the daemon is READY (its window claimed, the device waiting)
                    break
            text = "".join(lines)
            assert proc.poll() is None, text
            assert text.count("uvloop is not available") == 1 and "asyncio's event loop" in text, text
        finally:
            stop(proc)
        assert proc.returncode == 0, proc.returncode
    finally:
        stop(sim)


def test_make_install_writes_the_same_tree_under_destdir_and_prefix(installed_package: Installed,
                                                                     tmp_path: Path) -> None:
    """`make install DESTDIR=... PREFIX=/usr/local`: the command, units pointing at it, the same
    environment; an operator's /etc/default edits are kept on a second install."""
    dest = tmp_path / "dest"
    cmd = [sys.executable, str(REPO / "packaging" / "build_deb.py"), "install", "--destdir", str(dest),
           "--prefix", "/usr/local"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    unit = (dest / "usr/local/lib/systemd/system/xen-vhost-master@.service").read_text()
    assert "ExecStart=/usr/local/bin/xen-vhost-master --domain=%I" in unit
    assert os.access(dest / "usr/local/bin/xen-vhost-master", os.X_OK)
    assert (dest / "usr/local/share/man/man8/xen-vhost-master.8.gz").exists()
    site = "opt/xen-vhost-master/lib"
    assert sorted(p.name for p in (dest / site).glob("*/site-packages/*")) == \
        sorted(p.name for p in (installed_package.root / site).glob("*/site-packages/*"))
    (dest / "etc/default/xen-vhost-master").write_text('XEN_VHOST_MASTER_ARGS="-v"\n')
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    assert (dest / "etc/default/xen-vhost-master").read_text() == 'XEN_VHOST_MASTER_ARGS="-v"\n'
