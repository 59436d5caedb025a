"""What libxl writes into xenstore for a domain and its virtio devices, for the simulated toolstack.

Layout and permissions follow ``tools/libs/light/libxl_create.c`` (``libxl__domain_make``),
``libxl_device.c`` (``libxl__device_generic_add``) and ``libxl_virtio.c`` / ``libxl_disk.c``; see
docs/xen-abi.md §7.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

from xen_vhost_sim.xenstore_tree import NodeAccess, domain_path
from xen_vhost_sim.xenstored import SimXenstored
from xen_vhost_master.xen.xenstore_wire import (
    XenbusState,
    XenstoreError,
    XsAccess,
    XsPerm,
)

__all__ = [
    "LIBXL_DESTROY_TIMEOUT",
    "LIBXL_INIT_TIMEOUT",
    "VirtioDeviceSpec",
    "XenbusState",
    "add_virtio_device",
    "backend_path",
    "begin_device_removal",
    "create_domain",
    "destroy_domain",
    "detach_device",
    "device_backend_paths",
    "frontend_path",
    "remove_virtio_device",
    "wait_state",
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


# What real libxl does to remove a device (``xl destroy``, ``xl block-detach``), seen on Xen 4.17
# in tests/xenlab: ``libxl__initiate_device_generic_remove`` writes ``online = 0`` and ``state = 5``
# (Closing; unless already 6) in one transaction, waits up to LIBXL_DESTROY_TIMEOUT for the backend
# to write ``state = 6`` (Closed), and only then removes the frontend and backend directories (a
# timeout forces the removal). ``xl destroy`` does this for every device before it destroys the
# domain. remove_virtio_device/destroy_domain above stay the abrupt variants (a forced removal).
LIBXL_DESTROY_TIMEOUT = 10.0


def begin_device_removal(xs: SimXenstored, be: str) -> bool:
    """libxl's Closing transaction on backend directory ``be``; False if it is already gone."""
    present = [False]

    def body(acc: NodeAccess) -> None:
        try:
            state = acc.read(f"{be}/state").decode()
        except XenstoreError as e:
            if e.errno != errno.ENOENT:
                raise
            return  # "backend already removed, cleanup frontend only"
        present[0] = True
        acc.write(f"{be}/online", b"0")
        if state != str(int(XenbusState.CLOSED)):
            acc.write(f"{be}/state", str(int(XenbusState.CLOSING)).encode())

    xs.atomically(body)
    return present[0]


def _read_state(xs: SimXenstored, path: str) -> str | None:
    out: list[str | None] = [None]

    def body(acc: NodeAccess) -> None:
        try:
            out[0] = acc.read(path).decode()
        except XenstoreError as e:
            if e.errno != errno.ENOENT:
                raise

    xs.atomically(body)
    return out[0]


# libxl_internal.h: how long ``xl create`` waits for a backend's InitWait (disks; not for
# ``virtio`` devices, which set ``skip_attach``), in seconds.
LIBXL_INIT_TIMEOUT = 10.0


async def wait_state(xs: SimXenstored, path: str, state: int, *, timeout: float = LIBXL_INIT_TIMEOUT,
                     poll: float = 0.01) -> bool:
    """True once ``path`` reads ``state`` within ``timeout`` s (libxl__ev_devstate_wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if _read_state(xs, path) == str(state):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll)


async def detach_device(xs: SimXenstored, be: str, fe: str, *, timeout: float = LIBXL_DESTROY_TIMEOUT,
                        poll: float = 0.01) -> bool:
    """Remove one device as libxl does; True if the backend reached Closed in time (False: it
    never answered, or was already gone, and the directories were removed anyway)."""
    answered = False
    if begin_device_removal(xs, be):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            state = _read_state(xs, f"{be}/state")
            if state is None:
                break
            if state == str(int(XenbusState.CLOSED)):
                answered = True
                break
            await asyncio.sleep(poll)

    def body(acc: NodeAccess) -> None:
        for path in (fe, be):
            try:
                acc.rm(path)
            except XenstoreError as e:
                if e.errno != errno.ENOENT:
                    raise

    xs.atomically(body)
    return answered


def device_backend_paths(xs: SimXenstored, domid: int, *, backend_domid: int = 0) -> list[tuple[str, str]]:
    """(backend, frontend) directories of every virtio/virtio_disk device of ``domid``."""
    found: list[tuple[str, str]] = []

    def body(acc: NodeAccess) -> None:
        for kind in ("virtio", "virtio_disk"):
            root = f"{domain_path(backend_domid)}/backend/{kind}/{domid}"
            try:
                devids = acc.directory(root)
            except XenstoreError as e:
                if e.errno != errno.ENOENT:
                    raise
                continue
            for devid in devids:
                found.append((f"{root}/{devid}", f"{domain_path(domid)}/device/{kind}/{devid}"))

    xs.atomically(body)
    return found
