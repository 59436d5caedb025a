"""Build the Debian package of the daemon, or install the same tree under a DESTDIR.

    python packaging/build_deb.py deb --out dist/            # dist/xen-vhost-master_<ver>_<arch>.deb
    python packaging/build_deb.py install --destdir D --prefix /usr

What goes in (the dom0 needs the daemon, nothing of the simulator):
  /opt/xen-vhost-master/       a private Python environment on Debian's own interpreter
                               (/usr/bin/python3.X of the release it is built on): the daemon
                               (xen_vhost_master), the vhost-user library (vhost_user), and the
                               pinned run-time dependencies of packaging/requirements.txt (wheels)
  PREFIX/bin/xen-vhost-master  the command, running that environment's interpreter
  PREFIX/lib/systemd/system/   xen-vhost-master@.service, xen-vhost-master-watch.service
  PREFIX/lib/tmpfiles.d/       xen-vhost-master.conf
  PREFIX/share/man/man8/       xen-vhost-master.8.gz
  PREFIX/share/doc/xen-vhost-master/   README.md, systemd.md, copyright
  /etc/default/                xen-vhost-master, xen-vhost-master-watch (conffiles)

The environment is a plain venv (pyvenv.cfg next to bin/), so ``python3 -m xen_vhost_master``,
which the daemon's handover re-executes, finds the same code. Debian's python3 refuses pip
(PEP 668), hence the private environment; the dependencies are newer than Debian's
(construct 2.10.70, uvloop) or not packaged at all (construct-typing).

The pip that fetches the wheels is this script's interpreter's (``pip --python``, pip >= 22.3),
installing into the environment the Debian interpreter runs; only that interpreter compiles the
byte code. Stdlib only otherwise; the .deb is made with dpkg-deb alone.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "xen-vhost-master"
VENV = Path("/opt/xen-vhost-master")
#: The import packages the daemon needs, and the source root each lives in (pyproject.toml's
#: [tool.setuptools.packages.find]); xen_vhost_sim is left out on purpose.
PACKAGES = {"xen_vhost_master": REPO, "vhost_user": REPO / "protocol"}
UNITS = ("xen-vhost-master@.service", "xen-vhost-master-watch.service")
MAINTAINER = "xen-vhost-master maintainers <xen-vhost-master@localhost>"
DESCRIPTION = """\
virtio device model for Xen guests, with vhost-user back-ends
 xen-vhost-master serves a Xen guest's virtio-mmio devices (disks, network,
 file systems) from dom0 with standard vhost-user back-end programs such as
 qemu-storage-daemon, dpdk-testpmd or virtiofsd: one instance per guest,
 started by a systemd template unit or by the bundled dispatcher.
 .
 The package bundles its Python dependencies (construct, construct-typing,
 uvloop) in a private environment under /opt/xen-vhost-master that runs
 Debian's own python3."""

DEFAULT_ENV = """\
# Extra command-line flags for every xen-vhost-master@<guest>.service instance, e.g.
#   XEN_VHOST_MASTER_ARGS="--memory shadow -v"
# A single guest's flags go to /etc/xen-vhost-master/<guest name>.env, its devices to
# /etc/xen-vhost-master/<guest name>.toml. See xen-vhost-master(8).
XEN_VHOST_MASTER_ARGS=""
"""
DEFAULT_WATCH_ENV = """\
# Extra command-line flags for the dispatcher, xen-vhost-master-watch.service
# (xen-vhost-master watch), e.g. XEN_VHOST_MASTER_WATCH_ARGS="--pause-timeout 60".
XEN_VHOST_MASTER_WATCH_ARGS=""
"""

POSTINST = """\
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create xen-vhost-master.conf || true
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        # An upgrade: running instances hand over to the new code (systemctl reload re-executes
        # the daemon in place; the guest sees a pause, no reset), the dispatcher restarts.
        for unit in $(systemctl list-units --plain --no-legend --state=active 'xen-vhost-master@*.service' | cut -d' ' -f1); do
            systemctl reload "$unit" || echo "xen-vhost-master: reload of $unit failed; restart it by hand" >&2
        done
        systemctl try-restart xen-vhost-master-watch.service || true
    fi
fi
exit 0
"""
PRERM = """\
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    # The dispatcher first (it would start instances again), then every instance: their guests'
    # virtio devices stop (IOREQ servers destroyed, XenBus Closed).
    systemctl stop xen-vhost-master-watch.service || true
    systemctl stop 'xen-vhost-master@*.service' || true
fi
exit 0
"""
POSTRM = """\
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -f /etc/systemd/system/multi-user.target.wants/xen-vhost-master-watch.service
    rm -rf /opt/xen-vhost-master
fi
if { [ "$1" = remove ] || [ "$1" = purge ]; } && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"""


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def debian_release() -> str:
    """The major version of the Debian release this runs on ("12", "13"), "" if unknown (sid)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r'^VERSION_ID="?(\d+)', text, re.M)
    return m.group(1) if m else ""


def _run(cmd: list[str], **kw: object) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise SystemExit(f"build_deb: {' '.join(cmd)} failed (rc {r.returncode}):\n{r.stderr.strip()}")
    return str(r.stdout)


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    path.chmod(mode)


def _copy_package(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def interpreter(python: str) -> tuple[str, str]:
    """(the versioned interpreter's absolute path, its full version) for ``python``."""
    out = _run([python, "-c", "import sys, os; print(os.path.realpath(sys.executable)); print(sys.version.split()[0])"])
    real, full = out.split()
    return real, full


def make_venv(root: Path, python: str, venv: Path = VENV) -> Path:
    """The private environment under ``root``/``venv``, for ``python``: pyvenv.cfg and bin/ as
    ``python3 -m venv --without-pip`` makes them, its interpreter linked by its versioned name (the
    environment's site-packages belong to that one Python)."""
    real, full = interpreter(python)
    env = root / venv.relative_to("/")
    (env / "bin").mkdir(parents=True)
    _write(env / "pyvenv.cfg", f"home = {os.path.dirname(real)}\ninclude-system-site-packages = false\n"
           f"version = {full}\n")
    (env / "bin" / "python3").symlink_to(real)
    (env / "bin" / "python").symlink_to("python3")
    xy = ".".join(full.split(".")[:2])
    site = env / "lib" / f"python{xy}" / "site-packages"
    site.mkdir(parents=True)
    return site


def install_dependencies(env_python: Path, requirements: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "--quiet", "--no-deps",
          "--no-compile", "--only-binary=:all:", "--disable-pip-version-check", "-r", str(requirements)])


def write_dist_info(site: Path, version: str) -> None:
    """The daemon's own distribution metadata: what ``--version`` reads (importlib.metadata). Its
    entry points name the command only: no platform plug-in (the simulator is not installed)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    info = site / f"{NAME.replace('-', '_')}-{version}.dist-info"
    requires = "".join(f"Requires-Dist: {d}\n" for d in project["dependencies"])
    _write(info / "METADATA", f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {version}\n"
           f"Summary: {project['description']}\nLicense: {project['license']['text']}\n"
           f"Requires-Python: {project['requires-python']}\n{requires}")
    _write(info / "INSTALLER", "dpkg\n")
    _write(info / "top_level.txt", "".join(f"{p}\n" for p in PACKAGES))
    _write(info / "entry_points.txt", f"[console_scripts]\n{NAME} = xen_vhost_master.cli:entry\n")


def strip_extensions(site: Path) -> None:
    """The wheels' extension modules carry their symbol tables (uvloop's loop.so: 13 of 14 MB)."""
    strip = shutil.which("strip")
    if strip is None:
        return
    for so in site.rglob("*.so"):
        _run([strip, "--strip-unneeded", str(so)])


def compile_bytecode(root: Path, env_python: Path, site: Path) -> None:
    """Byte code compiled by the environment's own interpreter, with the installed paths in it: the
    unit's ProtectSystem=strict would keep the daemon from writing it at run time."""
    _run([str(env_python), "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", str(site)])


def copyright_text(site: Path, version: str) -> str:
    """DEP-5 (https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/): the project and
    every bundled distribution, with the license files each ships in its dist-info."""
    parts = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {NAME}\n\n"
        "Files: *\nCopyright: the xen-vhost-master authors\nLicense: MIT\n"
    ]
    for info in sorted(site.glob("*.dist-info")):
        meta = (info / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", meta, re.M)
        if name is None or name.group(1) == NAME:
            continue
        lic = re.search(r"^License(?:-Expression)?: (.+)$", meta, re.M)
        top = (info / "top_level.txt").read_text().split() if (info / "top_level.txt").exists() else []
        files = " ".join(f"{VENV}/lib/*/site-packages/{t}/*" for t in top) or "*"
        parts.append(f"\nFiles: {files}\nComment: {name.group(1)} (PyPI), bundled\n"
                     f"License: {lic.group(1).strip() if lic else 'see below'}\n")
        for f in sorted(p for p in info.rglob("*") if p.is_file() and "LICEN" in p.name.upper()):
            body = f.read_text(errors="replace").strip().splitlines()
            parts.append(" " + "\n ".join(line.rstrip() or "." for line in body) + "\n")
    return "".join(parts)


def stage(root: Path, prefix: str = "/usr", python: str = "/usr/bin/python3",
          requirements: Path = REPO / "packaging" / "requirements.txt") -> str:
    """Write the installed tree under ``root``; returns the daemon's version. Directories it
    creates are 0755 (umask 022 meanwhile), whatever the caller's umask."""
    old = os.umask(0o022)
    try:
        return _stage(root, prefix, python, requirements)
    finally:
        os.umask(old)


def _stage(root: Path, prefix: str, python: str, requirements: Path) -> str:
    version = project_version()
    site = make_venv(root, python)
    env_python = root / VENV.relative_to("/") / "bin" / "python3"
    install_dependencies(env_python, requirements)
    for package, source_root in PACKAGES.items():
        _copy_package(source_root / package, site / package)
    write_dist_info(site, version)
    strip_extensions(site)
    compile_bytecode(root, env_python, site)

    pre = root / prefix.lstrip("/")
    _write(pre / "bin" / NAME,
           f"#!{VENV}/bin/python3\n# xen-vhost-master(8); the environment is {VENV} (Debian's python3).\n"
           "from xen_vhost_master.cli import entry\n\nentry()\n", 0o755)
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text()
        text = text.replace("/usr/bin/xen-vhost-master", f"{prefix}/bin/{NAME}")
        _write(pre / "lib" / "systemd" / "system" / unit, text)
    _write(pre / "lib" / "tmpfiles.d" / f"{NAME}.conf", (REPO / "systemd" / f"{NAME}.tmpfiles.conf").read_text())
    _write(pre / "share" / "man" / "man8" / f"{NAME}.8.gz",
           gzip.compress((REPO / "docs" / f"{NAME}.8").read_bytes(), mtime=0))
    doc = pre / "share" / "doc" / NAME
    _write(doc / "README.md", (REPO / "README.md").read_text())
    _write(doc / "systemd.md", (REPO / "systemd" / "README.md").read_text())
    _write(doc / "copyright", copyright_text(site, version))
    for conffile, text in ((NAME, DEFAULT_ENV), (f"{NAME}-watch", DEFAULT_WATCH_ENV)):
        if not (root / "etc" / "default" / conffile).exists():  # an operator's edits stay
            _write(root / "etc" / "default" / conffile, text)
    return version


def build_deb(out: Path, python: str = "/usr/bin/python3") -> Path:
    arch = _run(["dpkg", "--print-architecture"]).strip()
    real, full = interpreter(python)
    pyver = "python" + ".".join(full.split(".")[:2])
    release = debian_release()
    with tempfile.TemporaryDirectory(prefix="xvm-deb-") as tmp:
        root = Path(tmp) / "root"
        version = stage(root, "/usr", python)
        deb_version = f"{version}-1" + (f"+deb{release}" if release else "")
        size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) // 1024
        control = (f"Package: {NAME}\nVersion: {deb_version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n"
                   # procps: /bin/kill, the instance unit's ExecReload= (not Essential: a minimal Debian 13 lacks it)
                   f"Installed-Size: {size_kib}\nDepends: {pyver}, libc6, procps\nRecommends: xen-utils-common\n"
                   f"Section: admin\nPriority: optional\nDescription: {DESCRIPTION}\n")
        debian = root / "DEBIAN"
        _write(debian / "control", control)
        _write(debian / "conffiles", f"/etc/default/{NAME}\n/etc/default/{NAME}-watch\n")
        _write(debian / "postinst", POSTINST, 0o755)
        _write(debian / "prerm", PRERM, 0o755)
        _write(debian / "postrm", POSTRM, 0o755)
        debian.chmod(0o755)
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{NAME}_{deb_version}_{arch}.deb"
        _run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)])
    return deb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_deb.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("deb", help="build dist/xen-vhost-master_<version>_<arch>.deb")
    d.add_argument("--out", type=Path, default=REPO / "dist")
    d.add_argument("--python", default="/usr/bin/python3", help="the interpreter the package runs (Debian's)")
    i = sub.add_parser("install", help="install the same tree under DESTDIR")
    i.add_argument("--destdir", type=Path, default=Path("/"))
    i.add_argument("--prefix", default="/usr")
    i.add_argument("--python", default="/usr/bin/python3")
    args = p.parse_args(argv)
    if args.what == "deb":
        print(build_deb(args.out, args.python))
        return 0
    env = args.destdir / VENV.relative_to("/")
    if env.exists():
        shutil.rmtree(env)  # a reinstall: the environment is the package's alone
    stage(args.destdir, args.prefix, args.python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
