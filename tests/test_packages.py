"""tests/tools/install-debs.sh picks each need's Debian package for the host's release from the one
table, tests/tools/debian-packages.tsv (checked here with other releases' os-release files)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.peers import programs

INSTALL = Path(__file__).parent / "tools" / "install-debs.sh"


def _print(tmp_path: Path, os_release: str, *groups: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "os-release"
    f.write_text(os_release)
    return subprocess.run(["bash", str(INSTALL), "--print", *groups], env={"XVM_OS_RELEASE": str(f), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("os_release", "present", "absent"), [
    ("ID=debian\nVERSION_CODENAME=bookworm\n", {"qemu-system-common", "iproute2", "systemd", "dpdk-dev"},
     {"qemu-utils", "virtiofsd"}),
    ('ID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n', {"qemu-utils", "virtiofsd", "iproute2", "systemd"},
     {"qemu-system-common"}),
    ('ID=debian\nVERSION_ID="13"\n', {"qemu-utils", "virtiofsd"}, {"qemu-system-common"}),  # no codename
])
def test_make_deps_installs_this_releases_packages(tmp_path: Path, os_release: str, present: set[str],
                                                   absent: set[str]) -> None:
    out = _print(tmp_path, os_release, "test")
    assert out.returncode == 0, out.stderr
    packages = set(out.stdout.split())
    assert present <= packages and not absent & packages


def test_plain_package_names_pass_through_and_groups_combine(tmp_path: Path) -> None:
    out = _print(tmp_path, "ID=debian\nVERSION_CODENAME=trixie\n", "demo", "python3-venv")
    assert out.stdout.split() == ["qemu-utils", "python3-venv"]


@pytest.mark.parametrize("os_release", ["ID=debian\nVERSION_CODENAME=forky\n", "ID=ubuntu\nVERSION_ID=24.04\n",
                                        "ID=debian\n"])
def test_a_release_the_table_does_not_know_is_refused_with_the_reason(tmp_path: Path, os_release: str) -> None:
    out = _print(tmp_path, os_release, "test")
    assert out.returncode == 2 and out.stdout == ""
    assert "is not a Debian release tests/tools/debian-packages.tsv knows (bookworm trixie)" in out.stderr


def test_every_row_names_a_package_per_release_and_a_lookup() -> None:
    table = programs.table()
    assert len(table) > 20
    for need in table.values():
        assert set(need.packages) == {"bookworm", "trixie"} and all(need.packages.values()), need
        assert need.lookup and need.groups, need
