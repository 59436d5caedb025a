"""Fixtures that start real vhost-user peers (see harness.py) and always stop them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

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


@pytest.fixture(scope="session", autouse=True)
def _uvloop_global_pipe() -> None:
    """libuv opens a process-wide pipe pair the first time any uvloop loop is created and keeps
    it for the life of the process. Create it before any test so that ``no_fd_leak`` does not
    blame whichever test happens to run first on uvloop."""
    uvloop.new_event_loop().close()
