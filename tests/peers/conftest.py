"""Fixtures that start real vhost-user peers (see harness.py) and always stop them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.harness import Peers


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """Start peers with ``peers.qsd_raw()``, ``peers.testpmd()``, ``peers.uml()``…; all of them are
    stopped (SIGTERM, then SIGKILL, reaped) when the test ends, whether it passed or not."""
    p = Peers(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
