"""The real-Xen lab's pytest wiring: the ``xenlab`` marker and the one lab run shared by its tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "xenlab: boots real Xen + a Debian dom0 + a domU under qemu-system-aarch64 (TCG, ~1 min warm, both cores); "
        "XENLAB=0 skips it",
    )
