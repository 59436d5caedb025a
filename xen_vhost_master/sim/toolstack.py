"""The simulated toolstack: what libxl/xl and xenstored do around the hypervisor.

Wires the simulated xenstored (``sim.xenstored``, by the xenstore engineer) into the simulated host:
``/dev/xen/xenbus`` opens become dom0 client connections, creating a domain writes
``/local/domain/<domid>`` the libxl way and fires ``@introduceDomain``, destroying it fires
``@releaseDomain`` and removes its nodes, and ``add_virtio_device`` writes a ``virtio = [...]``
device's backend/frontend directories (``sim.xenstore_libxl``).
"""

from __future__ import annotations

import logging
from typing import Any

from xen_vhost_master.sim import xenstore_libxl
from xen_vhost_master.sim.hypervisor import Domain
from xen_vhost_master.sim.xenstored import SimXenstored

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
        base_decimal=bool(o.get("base_decimal", False)),
    )


class XenstoreToolstack:
    """A :class:`~xen_vhost_master.sim.server.Toolstack` over a :class:`SimXenstored`."""

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

    async def close(self) -> None:
        await self.xenstored.close()
