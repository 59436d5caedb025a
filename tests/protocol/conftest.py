"""Fixtures for the protocol tests."""

from __future__ import annotations

import pytest
import uvloop


@pytest.fixture(scope="session", autouse=True)
def _uvloop_global_pipe() -> None:
    """libuv opens a process-wide pipe pair the first time a uvloop loop is created and keeps it
    for the life of the process; create it up front so ``no_fd_leak`` does not blame the first
    uvloop test. (The same fixture lives in tests/peers/conftest.py; tests/conftest.py would be
    the right single home for it.)"""
    uvloop.new_event_loop().close()
