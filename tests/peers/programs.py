"""Find the programs and files the tests need from Debian, by the one table tests/tools/debian-packages.tsv.

``find(need)`` looks a need up the way its row says (names in PATH, then absolute paths), whatever
the release. ``require(need)`` returns what was found, or stops the test with the true reason and
the package that brings it on this release ("qemu-storage-daemon not found: on Debian 13 (trixie)
it is in qemu-utils; run `make deps`"). Under ``make test`` (``XVM_REQUIRE_PEERS=1``, set by the
Makefile after ``make deps`` installed the table's ``test`` group) that is a failure: ``make deps``
should have installed it. A developer running one file without the deps gets a skip with the hint.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, NoReturn

import pytest

__all__ = ["Need", "find", "missing", "unable", "require", "host_release", "table", "REQUIRE_ENV"]

TABLE: Final = Path(__file__).resolve().parents[1] / "tools" / "debian-packages.tsv"
#: Set by the Makefile's ``test`` target: what ``make deps`` installs must be there.
REQUIRE_ENV: Final = "XVM_REQUIRE_PEERS"
#: Read instead of /etc/os-release when set (as tests/tools/install-debs.sh does).
OS_RELEASE_ENV: Final = "XVM_OS_RELEASE"
RELEASE_NAMES: Final = {"bookworm": "Debian 12 (bookworm)", "trixie": "Debian 13 (trixie)"}


@dataclass(frozen=True)
class Need:
    name: str
    groups: tuple[str, ...]
    packages: dict[str, str]  # release codename -> Debian package ("-": none needed)
    lookup: tuple[str, ...]


@cache
def table() -> dict[str, Need]:
    releases: list[str] = []
    needs: dict[str, Need] = {}
    for line in TABLE.read_text().splitlines():
        cols = line.split()
        if cols[:2] == ["#", "need"]:
            releases = cols[3:-1]
        if not cols or cols[0].startswith("#"):
            continue
        name, groups, rest = cols[0], tuple(cols[1].split(",")), cols[2:]
        packages = dict(zip(releases, rest[: len(releases)], strict=True))
        needs[name] = Need(name, groups, packages, tuple(rest[len(releases):]))
    return needs


def host_release() -> str | None:
    """This host's Debian codename if the table has a column for it, else None."""
    fields: dict[str, str] = {}
    try:
        text = Path(os.environ.get(OS_RELEASE_ENV, "/etc/os-release")).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip().strip('"')
    codename = fields.get("VERSION_CODENAME") or {"12": "bookworm", "13": "trixie"}.get(fields.get("VERSION_ID", ""), "")
    known = next(iter(table().values())).packages
    return codename if fields.get("ID") == "debian" and codename in known else None


def find(need: str) -> str | None:
    for item in table()[need].lookup:
        if item.startswith("/"):
            if os.path.exists(item):
                return item
        elif (path := shutil.which(item)) is not None:
            return path
    return None


def hint(need: str) -> str:
    """Where ``need`` comes from on this release (or on each, when this host is not one the table knows)."""
    row = table()[need]
    release = host_release()
    if release is not None:
        where = f"on {RELEASE_NAMES.get(release, release)} it is in {row.packages[release]}"
    else:
        where = "it is in " + ", ".join(f"{p} on {RELEASE_NAMES.get(r, r)}" for r, p in row.packages.items())
    how = "run `make deps`" if "test" in row.groups else "see tests/tools/debian-packages.tsv"
    return f"{where}; {how}"


def missing(reason: str) -> NoReturn:
    """Stop the test: a failure under ``make test`` (its deps are installed), a skip otherwise."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (make test installed its Debian packages, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def unable(reason: str) -> NoReturn:
    """Stop a test this machine cannot run (root, namespaces, overlayfs): a failure under ``make
    test``, which runs as root on Debian 12 or 13 where all of that works, a skip otherwise."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (make test runs as root on Debian 12 or 13, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def require(need: str) -> str:
    """The path ``need`` was found at, or stop the test (see :func:`missing`) with where it comes from."""
    found = find(need)
    if found is None:
        reason = f"{need} not found: {hint(need)}"
        if "test" not in table()[need].groups:
            pytest.skip(reason)  # not one of `make deps`'s packages
        missing(reason)
    return found
