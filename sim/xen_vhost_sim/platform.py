"""The simulated Xen host as a :class:`~xen_vhost_master.platform.Platform` for the daemon.

Installed as the entry point ``xen_vhost_master.platforms:sim`` (pyproject.toml): the daemon's
entry points look it up when ``XEN_VHOST_SIM=<socket>`` asks for it, and tests hand
:func:`sim_platform` to the daemon's objects directly.
"""

from __future__ import annotations

from xen_vhost_master.platform import Platform

from .guest import SimControl
from .memory import Arch
from .simkernel import SimKernel

__all__ = ["sim_platform"]


def sim_platform(socket_path: str) -> Platform:
    """The simulated host listening at ``socket_path``: its kernel, Arm64 guests, xenstore through
    the kernel's xenbus node only, and the SIM-ONLY RAM memfd (the host models an Arm64 Xen host)."""

    def ram_memfd(domid: int) -> tuple[list[tuple[int, int]], int]:
        with SimControl(socket_path) as ctl:
            return ctl.sim_only_ram_memfd(domid)

    return Platform(kernel=SimKernel(socket_path), guest_arch=Arch.ARM64.value, xenstore_sockets=(),
                    sim_ram_memfd=ram_memfd,
                    name=f"SIMULATED Xen host at {socket_path} (xen-vhost-sim), not /dev/xen")
