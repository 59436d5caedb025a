"""Shared test configuration.

Every async test runs twice: on the stock asyncio loop and on uvloop, so that
differences in fd passing or reader callbacks between the two show up.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests.installed import Installed, build, cannot_install
from tests.peers import programs


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session", autouse=True)
def _uvloop_global_pipe() -> None:
    """libuv opens a process-wide pipe pair the first time a uvloop loop runs and keeps it for the
    life of the process. Open it before any test so that ``no_fd_leak`` does not blame whichever
    test happens to run first on uvloop."""
    uvloop.run(asyncio.sleep(0))


def open_fds() -> set[int]:
    """The file descriptors this process has open right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves file descriptors open.

    Put it first in a test's arguments: fixtures are torn down in reverse order, so it then checks
    after every other fixture (servers, peers) has closed its fds.
    """
    before = open_fds()
    yield
    leaked = open_fds() - before
    # /proc/self/fd listing itself can show a transient fd; re-check once.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {sorted(leaked)} -> {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The Debian package (`make deb`), built once per session and unpacked into a scratch root
    (tests/installed.py); skipped where it cannot be (no dpkg-deb, not root), a failure under `make test`."""
    reason = cannot_install()
    if reason is not None:
        programs.unable(reason)
    return build(tmp_path_factory.mktemp("deb"))
