"""The code base type-checks (mypy --strict, the pyproject.toml [tool.mypy] settings) and lints
clean (ruff, [tool.ruff]), with the versions pinned in the `test` extra that `make test` installs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.peers import programs

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a cold mypy run over every package on a loaded 2-core machine


def _require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        programs.missing(f"{name} is not installed: it is in the `test` extra (pip install -e '.[test]'; make test does)")


def test_mypy_strict_finds_nothing() -> None:
    _require_module("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "-p", "vhost_user", "-p", "xen_vhost_master",
                          "-p", "xen_vhost_sim"],
                         cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_ruff_finds_nothing() -> None:
    _require_module("ruff")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
