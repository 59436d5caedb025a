"""prepare.sh picks the host's packages by the host's Debian release, and the Xen release by it too
(Debian 12: Xen 4.17 from bookworm, Debian 13: Xen 4.20 from trixie; ``XENLAB_XEN`` asks for the
other), each Xen's pieces from its own Debian release whatever the host runs: checked here with
another release's os-release file (``XVM_OS_RELEASE``) and ``prepare.sh --plan``, which builds and
installs nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

PREPARE = Path(__file__).parent / "prepare.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="prepare.sh needs root (the lab's apt state and cache)")


def _plan(tmp_path: Path, release: str, version: str, xen: str = "") -> dict[str, str]:
    os_release = tmp_path / f"os-release-{release}"
    os_release.write_text(f'ID=debian\nVERSION_ID="{version}"\nVERSION_CODENAME={release}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("XENLAB_XEN", "XENLAB_XEN_SRC")}
    env.update(XVM_OS_RELEASE=str(os_release), **({"XENLAB_XEN": xen} if xen else {}))
    proc = subprocess.run(["bash", str(PREPARE), "--plan"], env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)


def test_xen_4_17_on_debian_13_takes_trixie_host_packages_and_stays_bookworm(tmp_path: Path) -> None:
    bookworm, trixie = _plan(tmp_path, "bookworm", "12"), _plan(tmp_path, "trixie", "13", xen="4.17")
    assert bookworm["xen"] == trixie["xen"] == "4.17"
    # Xen 4.17 is built by gcc 12 on both (trixie's gcc 14 fails it): its own package on each release
    assert "gcc-12-aarch64-linux-gnu" in trixie["host-packages"].split()
    assert trixie["cross-compiler"].startswith("aarch64-linux-gnu-gcc-12 ")
    # the kernel, the Xen source and the dom0 userland come from bookworm, asked of bookworm's lists
    assert bookworm["kernel"] == trixie["kernel"]
    assert trixie["kernel"].startswith("linux-image-6.1.") and trixie["kernel"].endswith("-arm64")
    assert trixie["xen-source"].startswith("4.17.")
    assert "python3=3.11." in trixie["versions"]
    # the lab's kernel: Debian's 6.12 source (bookworm-backports), the same build on either host
    assert trixie["lab-kernel"].startswith("linux-src=6.12.")
    assert bookworm["lab-kernel-dir"] == trixie["lab-kernel-dir"]
    # and the key of the cache is the same whatever the host's release (same compiler version here)
    assert bookworm["key"] == trixie["key"]


def test_the_hosts_debian_release_picks_the_xen_and_each_has_its_own_apt_state_and_key(tmp_path: Path) -> None:
    trixie, bookworm = _plan(tmp_path, "trixie", "13"), _plan(tmp_path, "bookworm", "12", xen="4.20")
    assert trixie["xen"] == bookworm["xen"] == "4.20" and trixie["release"] == "trixie"
    assert trixie["xen-source"].startswith("4.20.") and trixie["dom0-python"] == "3.13"
    assert trixie["kernel"].startswith("linux-image-6.12.")  # Debian 13's kernel for the guests without grants
    assert "python3=3.13." in trixie["versions"] and "dpdk=" in trixie["versions"]
    four17 = _plan(tmp_path, "bookworm", "12")
    # nothing of 4.17's is 4.20's: its apt state and artefacts stay as they are; one lab kernel for both
    assert four17["apt-state"] != trixie["apt-state"] and four17["key"] != trixie["key"]
    assert four17["lab-kernel-dir"] == trixie["lab-kernel-dir"]
    # the host's Debian release decides the compiler's package, not the key's Xen
    assert bookworm["key"] == trixie["key"] or bookworm["cross-compiler"] != trixie["cross-compiler"]


def test_a_xen_release_the_lab_does_not_build_is_refused_with_the_reason(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n')
    proc = subprocess.run(["bash", str(PREPARE), "--plan"], env=dict(os.environ, XVM_OS_RELEASE=str(os_release), XENLAB_XEN="4.19"),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 3
    assert "XENLAB-CANNOT-BUILD: XENLAB_XEN=4.19: use 4.17 (Debian 12's) or 4.20 (Debian 13's)" in proc.stderr


def test_a_release_the_table_does_not_know_cannot_build_with_the_reason(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text("ID=debian\nVERSION_CODENAME=forky\n")
    proc = subprocess.run(["bash", str(PREPARE), "--plan"], env=dict(os.environ, XVM_OS_RELEASE=str(os_release)),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 3
    assert "XENLAB-CANNOT-BUILD: install-debs.sh: debian forky is not a Debian release" in proc.stderr
