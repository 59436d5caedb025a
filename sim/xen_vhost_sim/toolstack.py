"""The simulated toolstack: what libxl/xl and xenstored do around the hypervisor.

Wires the simulated xenstored (``sim.xenstored``, by the xenstore engineer) into the simulated host:
``/dev/xen/xenbus`` opens become dom0 client connections, creating a domain writes
``/local/domain/<domid>`` the libxl way and fires ``@introduceDomain``, destroying it fires
``@releaseDomain`` and removes its nodes, and ``add_virtio_device`` writes a ``virtio = [...]``
device's backend/frontend directories (``sim.xenstore_libxl``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from xen_vhost_sim import xenstore_libxl
from xen_vhost_sim.hypervisor import Domain
from xen_vhost_sim.xenstored import SimXenstored

__all__ = ["XenstoreToolstack", "virtio_spec"]

log = logging.getLogger(__name__)


def virtio_spec(o: dict[str, Any]) -> xenstore_libxl.VirtioDeviceSpec:
    """A VirtioDeviceSpec from a control request / CLI dict (ints may be given as strings, e.g. "0x...")."""

    def num(key: str, default: int | None = None) -> int:
        value = o.get(key, default)
        if value is None:
            raise KeyError(key)
        return int(value, 0) if isinstance(value, str) else int(value)

    grant = o.get("grant_usage")
    return xenstore_libxl.VirtioDeviceSpec(
        domid=num("domid"),
        devid=num("devid", 0),
        device_id=num("device_id"),
        base=num("base"),
        irq=num("irq"),
        backend_domid=num("backend_domid", 0),
        grant_usage=None if grant is None else bool(int(grant)),
        kind=str(o.get("kind", "virtio")),
        # real libxl 4.17 writes a virtio_disk's base in decimal (seen in tests/xenlab)
        base_decimal=bool(o.get("base_decimal", o.get("kind") == "virtio_disk")),
    )


class XenstoreToolstack:
    """A :class:`~xen_vhost_sim.server.Toolstack` over a :class:`SimXenstored`."""

    def __init__(self, xenstored: SimXenstored | None = None) -> None:
        self.xenstored = xenstored if xenstored is not None else SimXenstored()

    def xenbus_fd(self, domid: int) -> int:
        return self.xenstored.connect_fd(domid)

    def domain_created(self, dom: Domain) -> None:
        mem_kib = (dom.memory.populated_pages() * 4) if dom.memory is not None else 0
        xenstore_libxl.create_domain(self.xenstored, dom.domid, dom.name, memory_kib=mem_kib)

    def domain_destroyed(self, domid: int) -> None:
        xenstore_libxl.destroy_domain(self.xenstored, domid)

    def add_virtio_device(self, spec: dict[str, Any]) -> str:
        return xenstore_libxl.add_virtio_device(self.xenstored, virtio_spec(spec))

    def remove_virtio_device(self, spec: dict[str, Any]) -> None:
        xenstore_libxl.remove_virtio_device(self.xenstored, virtio_spec(spec))

    async def wait_backend_state(self, be: str, state: int, timeout: float) -> bool:
        """libxl__ev_devstate_wait: True once ``be``/state is ``state`` within ``timeout`` s."""
        return await xenstore_libxl.wait_state(self.xenstored, f"{be}/state", state, timeout=timeout)

    async def detach_virtio_device(self, spec: dict[str, Any], timeout: float) -> bool:
        """``xl block-detach``: Closing, wait for the backend's Closed, then remove (libxl's way)."""
        s = virtio_spec(spec)
        return await xenstore_libxl.detach_device(self.xenstored, xenstore_libxl.backend_path(s),
                                                  xenstore_libxl.frontend_path(s), timeout=timeout)

    async def detach_all_devices(self, domid: int, timeout: float) -> dict[str, bool]:
        """``xl destroy``'s first half: every device of ``domid`` removed the libxl way, in parallel;
        backend path → whether its backend answered Closed within ``timeout``."""
        paths = xenstore_libxl.device_backend_paths(self.xenstored, domid)
        answers = await asyncio.gather(*(xenstore_libxl.detach_device(self.xenstored, be, fe, timeout=timeout)
                                         for be, fe in paths))
        return {be: ok for (be, _fe), ok in zip(paths, answers)}

    async def close(self) -> None:
        await self.xenstored.close()
