"""What the daemon runs on: a :class:`Platform`, chosen once by an entry point and handed down.

A platform is the kernel object every ``/dev/xen/*`` access goes through (``xen/kernel.py``), the
guest architecture assumed when ``--guest-arch`` is not given, where xenstored answers, and, on a
simulated host only, a way to get the guest's RAM as a memfd (the ``memory=sim-memfd`` baseline,
impossible on real Xen).

:func:`real_platform` is a dom0. Any other platform plugs in from above, as a packaging entry point
of the group :data:`ENTRY_POINT_GROUP` (a callable taking a socket path, returning a Platform); the
daemon never names the module that provides it. It is looked up only when the environment asks for
it explicitly: ``XEN_VHOST_SIM=<socket>`` asks for the entry point :data:`SIM_ENTRY_POINT` (the
simulated Xen host, ``xen-vhost-sim``). Every entry point of the daemon logs the platform it got
(:func:`announce`) before it does anything else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .xen.kernel import Kernel
    from .xen.xenstore import XenstoreClient

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_SIM_SOCKET",
    "SIM_ENTRY_POINT",
    "Platform",
    "RamMemfd",
    "announce",
    "host_arch",
    "platform_from_env",
    "real_platform",
]

ENV_SIM_SOCKET = "XEN_VHOST_SIM"
ENTRY_POINT_GROUP = "xen_vhost_master.platforms"
SIM_ENTRY_POINT = "sim"

RamMemfd = Callable[[int], tuple[list[tuple[int, int]], int]]
"""``(domid) -> (RAM banks as (gpa, size), memfd holding them back to back)``; the caller owns the fd."""


@dataclass(frozen=True)
class Platform:
    kernel: Kernel
    guest_arch: str  # arm64 | x86_64: the guest's RAM layout when --guest-arch is not given
    # xenstored's sockets to try before the kernel's xenbus device: None = the real ones
    # ($XENSTORED_PATH, /run/xenstored/socket, ...), () = only the kernel's /dev/xen/xenbus
    xenstore_sockets: tuple[str, ...] | None = None
    sim_ram_memfd: RamMemfd | None = None  # SIM-ONLY: guest RAM as a shareable memfd
    name: str = "real Xen (/dev/xen)"

    async def open_xenstore(self) -> XenstoreClient:
        from .xen.xenstore import XenstoreClient  # noqa: PLC0415  (asyncio: only for who talks to xenstore)

        return await XenstoreClient.open(socket_paths=self.xenstore_sockets, opener=self.kernel.open)


def host_arch() -> str:
    return "arm64" if os.uname().machine in ("aarch64", "arm64") else "x86_64"


def real_platform() -> Platform:
    from .xen.kernel import RealKernel  # noqa: PLC0415  (ctypes: only for who opens /dev/xen)

    return Platform(kernel=RealKernel(), guest_arch=host_arch())


def platform_from_env(environ: Mapping[str, str] | None = None) -> Platform:
    """The real platform, unless ``$XEN_VHOST_SIM`` asks for the simulated host: then the platform
    the installed entry point ``xen_vhost_master.platforms:sim`` builds for that socket.
    :class:`ConfigError` if it is asked for and not installed, or gives something else."""
    env = os.environ if environ is None else environ
    socket_path = env.get(ENV_SIM_SOCKET)
    if not socket_path:
        return real_platform()
    from importlib.metadata import entry_points  # noqa: PLC0415  (only when a platform is asked for)

    found = {ep.value: ep for ep in entry_points(group=ENTRY_POINT_GROUP, name=SIM_ENTRY_POINT)}
    where = f"{ENV_SIM_SOCKET}={socket_path} asks for the simulated Xen host"
    if not found:
        raise ConfigError(f"{where}, but no package provides the entry point {ENTRY_POINT_GROUP}:{SIM_ENTRY_POINT} "
                          f"(install the simulator, or unset {ENV_SIM_SOCKET} on a dom0)")
    if len(found) > 1:
        raise ConfigError(f"{where}, but several packages provide {ENTRY_POINT_GROUP}:{SIM_ENTRY_POINT}: "
                          f"{', '.join(sorted(found))}")
    (ep,) = found.values()
    try:
        factory = ep.load()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}, but its entry point {ep.value} cannot be loaded: {e}") from None
    platform = factory(socket_path)
    if not isinstance(platform, Platform):
        raise ConfigError(f"{where}, but its entry point {ep.value} gave {type(platform).__name__}, not a Platform")
    return platform


def announce(platform: Platform, log: logging.Logger) -> None:
    """The one line that says what the daemon runs on (a stray XEN_VHOST_SIM on a dom0 shows here)."""
    log.info("platform: %s", platform.name)
