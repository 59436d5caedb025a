"""prepare.sh picks the host's packages by the host's Debian release and pins the lab's own pieces
to Debian 12 (bookworm) whatever the host runs: checked here with another release's os-release
file (``XVM_OS_RELEASE``) and ``prepare.sh --plan``, which builds and installs nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

PREPARE = Path(__file__).parent / "prepare.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="prepare.sh needs root (the lab's apt state and cache)")


def _plan(tmp_path: Path, release: str, version: str) -> dict[str, str]:
    os_release = tmp_path / f"os-release-{release}"
    os_release.write_text(f'ID=debian\nVERSION_ID="{version}"\nVERSION_CODENAME={release}\n')
    proc = subprocess.run(["bash", str(PREPARE), "--plan"], env=dict(os.environ, XVM_OS_RELEASE=str(os_release)),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)


def test_on_debian_13_the_host_packages_are_trixie_names_and_the_lab_stays_bookworm(tmp_path: Path) -> None:
    bookworm, trixie = _plan(tmp_path, "bookworm", "12"), _plan(tmp_path, "trixie", "13")
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


def test_a_release_the_table_does_not_know_cannot_build_with_the_reason(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text("ID=debian\nVERSION_CODENAME=forky\n")
    proc = subprocess.run(["bash", str(PREPARE), "--plan"], env=dict(os.environ, XVM_OS_RELEASE=str(os_release)),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 3
    assert "XENLAB-CANNOT-BUILD: install-debs.sh: debian forky is not a Debian release" in proc.stderr
