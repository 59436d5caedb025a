"""The daemon's tests use the simulated Xen host and the real peers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.peers.conftest import peers  # noqa: F401  (fixture)
from tests.sim.conftest import kernel, platform, sim_control, sim_dir, sim_host  # noqa: F401  (fixtures)


@pytest.fixture
def start_sim() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    """``start_sim(dir, name="")`` -> (process, socket path): ``xen-vhost-sim`` in its own process
    (test_daemon_cli.start_sim), stopped when the test ends however it ends (passed, failed, or
    skipped for a missing peer)."""
    from tests.daemon.test_daemon_cli import start_sim as _start_sim, stop

    procs: list[subprocess.Popen[bytes]] = []

    def start(directory: str, name: str = "") -> tuple[subprocess.Popen[bytes], str]:
        proc, path = _start_sim(directory, name)
        procs.append(proc)
        return proc, path

    try:
        yield start
    finally:
        for proc in procs:
            stop(proc)
