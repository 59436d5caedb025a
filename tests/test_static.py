"""The code base type-checks (mypy --strict, the pyproject.toml [tool.mypy] settings) and lints
clean (ruff, [tool.ruff]), with the versions pinned in the `test` extra that `make test` installs.

The two commands are the Makefile's ``RUFF`` and ``MYPY``, run by ``make lint`` (which ``make
test`` depends on) and here the same, read from the Makefile."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.peers import programs

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a cold mypy run over every package on a loaded 2-core machine


def _makefile() -> str:
    return (REPO / "Makefile").read_text()


def _make_command(name: str) -> list[str]:
    """The Makefile's ``NAME := $(PY) -m ...`` as an argv run with this interpreter."""
    found = re.search(rf"^{name} := \$\(PY\) (.+)$", _makefile(), re.MULTILINE)
    assert found, f"the Makefile defines no {name} := $(PY) ..."
    return [sys.executable, *shlex.split(found.group(1))]


def _require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        programs.missing(f"{name} is not installed: it is in the `test` extra (pip install -e '.[test]'; make test does)")


def test_make_test_runs_make_lint_first_and_lint_runs_ruff_and_mypy_over_every_source_root() -> None:
    text = _makefile()
    test = re.search(r"^test:(.*)$", text, re.MULTILINE)
    assert test and "lint" in test.group(1).split(), "make test must depend on lint"
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert lint and lint.group(1).split() == ["$(RUFF)", "$(MYPY)"]
    assert _make_command("RUFF")[1:4] == ["-m", "ruff", "check"] and _make_command("RUFF")[-1] == "."
    mypy = _make_command("MYPY")
    assert mypy[1:4] == ["-m", "mypy", "--strict"]
    assert {mypy[i + 1] for i, arg in enumerate(mypy) if arg == "-p"} == {"vhost_user", "xen_vhost_master", "xen_vhost_sim"}


def test_mypy_strict_finds_nothing() -> None:
    _require_module("mypy")
    out = subprocess.run(_make_command("MYPY"), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_ruff_finds_nothing() -> None:
    _require_module("ruff")
    out = subprocess.run(_make_command("RUFF"), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
