"""The Debian package, built once per test session and installed into a scratch root that a mount
namespace lays over this machine's /usr, /opt and /etc (read-only overlayfs, the package's files on
top): inside it, /usr/bin/xen-vhost-master, its environment under /opt/xen-vhost-master and the
units under /usr/lib/systemd/system are the package's, on this machine's Debian python3, systemd
and man, as after ``apt install ./xen-vhost-master_*.deb``. Nothing on the host changes.

The simulated Xen host is not in the package (a dom0 does not need it). Tests that run the
installed daemon against it plug it in the way any platform is found, from above: a directory on
PYTHONPATH with the simulator's package and a distribution whose entry point registers it
(``xen_vhost_master.platforms``, read by xen_vhost_master/platform.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "packaging" / "build_deb.py"
#: Debian's interpreter, the one the package runs.
DEBIAN_PYTHON = "/usr/bin/python3"
#: pip fetches three wheels (from its cache after the first time); compileall and xz take seconds.
BUILD_TIMEOUT = 600
#: What the package lays over the host inside the namespace.
OVERLAID = ("usr", "opt", "etc")


@dataclass(frozen=True)
class Installed:
    deb: Path
    root: Path  # the package's files, as `dpkg-deb -x` unpacks them
    control: Path  # its control files (postinst, prerm, ...), as `dpkg-deb -e` unpacks them

    def overlay_script(self) -> str:
        """Shell lines that lay the scratch root over the host, in the current mount namespace."""
        return "".join(f"mount -t overlay overlay -o lowerdir={shlex.quote(str(self.root / d))}:/{d} /{d}\n"
                       for d in OVERLAID if (self.root / d).is_dir())

    def command(self, argv: list[str], setup: str = "") -> list[str]:
        """``argv`` run in a new mount namespace where the package is installed (``setup``: more
        shell lines run there first)."""
        script = "set -e\nmount --make-rprivate /\n" + self.overlay_script() + setup + 'exec "$@"\n'
        return ["unshare", "--mount", "sh", "-c", script, "sh", *argv]


def cannot_install() -> str | None:
    """Why the package cannot be built and installed here, or None."""
    for tool in ("dpkg-deb", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.path.exists(DEBIAN_PYTHON):
        return f"{DEBIAN_PYTHON} (Debian's python3) not installed"
    if os.geteuid() != 0:
        return "needs root (mount namespaces, overlayfs)"
    r = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t overlay overlay -o lowerdir={REPO}:/opt /opt"],
                       capture_output=True, timeout=30, check=False)
    if r.returncode != 0:
        return f"cannot mount overlayfs in a mount namespace: {r.stderr.decode().strip()}"
    return None


def build(work: Path) -> Installed:
    """Build the package into ``work``/dist and unpack it into ``work``/root."""
    r = subprocess.run([sys.executable, str(BUILD), "deb", "--out", str(work / "dist"), "--python", DEBIAN_PYTHON],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    if r.returncode != 0:
        raise AssertionError(f"package build failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    deb = Path(r.stdout.strip().splitlines()[-1])
    root, control = work / "root", work / "control"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True, timeout=120)
    return Installed(deb, root, control)


def sim_plugin(directory: Path) -> Path:
    """A PYTHONPATH directory that plugs the simulated Xen host into an installed daemon: the
    simulator's package (a link to this checkout's) and a distribution registering its platform."""
    info = directory / "xen_vhost_sim_plugin-0.dist-info"
    if info.exists():
        return directory
    info.mkdir(parents=True)
    (directory / "xen_vhost_sim").symlink_to(REPO / "sim" / "xen_vhost_sim")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xen-vhost-sim-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[xen_vhost_master.platforms]\nsim = xen_vhost_sim.platform:sim_platform\n")
    return directory
