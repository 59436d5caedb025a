"""The daemon's tests use the simulated Xen host and the real peers."""

from __future__ import annotations

from tests.peers.conftest import peers  # noqa: F401  (fixture)
from tests.sim.conftest import kernel, sim_control, sim_dir, sim_host  # noqa: F401  (fixtures)
