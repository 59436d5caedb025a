"""Fixtures for the simulated Xen host: a host on its own thread, a SimKernel attached to it, and
the daemon's Platform for it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from xen_vhost_sim.guest import SimControl
from xen_vhost_master.platform import Platform
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.platform import sim_platform
from xen_vhost_sim.simkernel import SimKernel


@pytest.fixture
def sim_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="xsim-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sim_host(sim_dir: str) -> Iterator[SimHost]:
    with SimHost(os.path.join(sim_dir, "xen.sock")) as host:
        yield host


@pytest.fixture
def sim_control(sim_host: SimHost) -> Iterator[SimControl]:
    with sim_host.control() as ctl:
        yield ctl


@pytest.fixture
def kernel(sim_host: SimHost) -> SimKernel:
    return SimKernel(sim_host.path)


@pytest.fixture
def platform(sim_host: SimHost) -> Platform:
    return sim_platform(sim_host.path)
