"""What libxl writes into xenstore for a domain and its virtio devices, for the simulated toolstack.

Layout and permissions follow ``tools/libs/light/libxl_create.c`` (``libxl__domain_make``),
``libxl_device.c`` (``libxl__device_generic_add``) and ``libxl_virtio.c`` / ``libxl_disk.c``; see
../shared/reference/abi.md §7.
"""

from __future__ import annotations

from dataclasses import dataclass

from xen_vhost_master.sim.xenstore_tree import NodeAccess, domain_path
from xen_vhost_master.sim.xenstored import SimXenstored
from xen_vhost_master.xen.xenstore_wire import XenbusState, XsAccess, XsPerm

__all__ = [
    "XenbusState",
    "VirtioDeviceSpec",
    "create_domain",
    "destroy_domain",
    "add_virtio_device",
    "remove_virtio_device",
    "backend_path",
    "frontend_path",
]


@dataclass(frozen=True)
class VirtioDeviceSpec:
    """One ``virtio = [...]`` entry (or a 4.17 ``virtio_disk``) as libxl stores it."""

    domid: int
    devid: int
    device_id: int  # virtio device id: 2 = block, 1 = net, 0x1a = fs, ...
    base: int  # MMIO window GPA
    irq: int  # GIC SPI
    backend_domid: int = 0
    transport: str = "mmio"
    grant_usage: bool | None = None  # None: libxl's default (1 iff backend_domid != 0)
    kind: str = "virtio"  # or "virtio_disk" (Xen 4.17)
    base_decimal: bool = False  # 4.17 virtio_disk / early 4.18 libxl wrote base as %lu

    @property
    def compatible(self) -> str:
        return f"virtio,device{self.device_id:x}"


def backend_path(spec: VirtioDeviceSpec) -> str:
    return f"{domain_path(spec.backend_domid)}/backend/{spec.kind}/{spec.domid}/{spec.devid}"


def frontend_path(spec: VirtioDeviceSpec) -> str:
    return f"{domain_path(spec.domid)}/device/{spec.kind}/{spec.devid}"


def _ro(domid: int) -> tuple[XsPerm, ...]:
    """libxl ``roperm``: owned by dom0, readable by the domain."""
    return (XsPerm(0, XsAccess.NONE), XsPerm(domid, XsAccess.READ))


def _rw(domid: int) -> tuple[XsPerm, ...]:
    """libxl ``rwperm``: owned by the domain."""
    return (XsPerm(domid, XsAccess.NONE),)


def create_domain(xs: SimXenstored, domid: int, name: str, *, memory_kib: int = 1 << 20) -> None:
    """``/local/domain/<domid>`` with libxl's subdirectories and permissions."""
    home = domain_path(domid)

    def body(acc: NodeAccess) -> None:
        acc.mkdir(home)
        acc.set_perms(home, list(_ro(domid)))
        for sub, perms in (("device", _ro(domid)), ("control", _ro(domid)), ("memory", _ro(domid)),
                           ("data", _rw(domid)), ("drivers", _rw(domid)), ("feature", _rw(domid)),
                           ("attr", _rw(domid)), ("error", _rw(domid))):
            acc.mkdir(f"{home}/{sub}")
            acc.set_perms(f"{home}/{sub}", list(perms))
        acc.write(f"{home}/name", name.encode())
        acc.write(f"{home}/domid", str(domid).encode())
        acc.write(f"{home}/memory/static-max", str(memory_kib).encode())
        acc.write(f"{home}/memory/target", str(memory_kib).encode())
        acc.write(f"{home}/control/shutdown", b"")
        acc.set_perms(f"{home}/control/shutdown", list(_rw(domid)))

    xs.atomically(body)
    xs.introduce_domain(domid)


def destroy_domain(xs: SimXenstored, domid: int, *, backend_domid: int = 0) -> None:
    """Release the domain (fires ``@releaseDomain``), remove its home and its devices' backend dirs."""
    if domid in xs.store.introduced:
        xs.release_domain(domid)
    backend_root = f"{domain_path(backend_domid)}/backend"

    def body(acc: NodeAccess) -> None:
        acc.rm(domain_path(domid))
        if backend_root in xs.store.nodes:
            for kind in acc.directory(backend_root):
                acc.rm(f"{backend_root}/{kind}/{domid}")

    xs.atomically(body)


def add_virtio_device(xs: SimXenstored, spec: VirtioDeviceSpec) -> str:
    """Write the backend and frontend directories in one transaction; returns the backend path."""
    be, fe = backend_path(spec), frontend_path(spec)
    grant = spec.grant_usage if spec.grant_usage is not None else spec.backend_domid != 0
    base = str(spec.base) if spec.base_decimal else hex(spec.base)
    be_perms = [XsPerm(spec.backend_domid, XsAccess.NONE), XsPerm(spec.domid, XsAccess.READ)]
    fe_perms = [XsPerm(spec.domid, XsAccess.NONE), XsPerm(spec.backend_domid, XsAccess.READ)]
    backend_keys: dict[str, str] = {
        "frontend": fe,
        "frontend-id": str(spec.domid),
        "online": "1",
        "state": str(int(XenbusState.INITIALISING)),
        "irq": str(spec.irq),
        "base": base,
        "transport": spec.transport,
        "grant_usage": "1" if grant else "0",
    }
    if spec.kind == "virtio":
        backend_keys["type"] = spec.compatible
    else:
        backend_keys["specification"] = "virtio"
    frontend_keys = {"backend": be, "backend-id": str(spec.backend_domid), "state": str(int(XenbusState.INITIALISING))}

    def body(acc: NodeAccess) -> None:
        for path, keys, perms in ((be, backend_keys, be_perms), (fe, frontend_keys, fe_perms)):
            acc.mkdir(path)
            acc.set_perms(path, perms)
            for key, value in keys.items():
                acc.write(f"{path}/{key}", value.encode())

    xs.atomically(body)
    return be


def remove_virtio_device(xs: SimXenstored, spec: VirtioDeviceSpec) -> None:
    """What ``xl device-detach`` leaves behind: both directories gone."""

    def body(acc: NodeAccess) -> None:
        acc.rm(frontend_path(spec))
        acc.rm(backend_path(spec))

    xs.atomically(body)
