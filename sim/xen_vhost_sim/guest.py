"""Clients of the simulated host's sim-only ``control`` node.

* :class:`SimControl` (blocking): create/destroy/pause/shutdown domains, inspect them.
* :class:`SimGuest`: one domain seen from inside, implementing :class:`~xen_vhost_sim.guest_api.GuestBus`
  (vCPU MMIO accesses that block until the device model answers, RAM, interrupt lines, grants), plus
  the guest's side of event channels (``evtchn_alloc_unbound`` / ``evtchn_notify`` / ``evtchn_wait``).
  It works the same whether the host runs in a thread of this process or as ``xen-vhost-sim``.

The guest's RAM is reached through the host's RAM memfd, which only the *guest* side gets (the guest
owns its memory); the daemon's side never does: it must foreign-map or grant-map like on Xen.

vCPU accesses take the vCPU channel (sim.vcpu_channel) when the host's page says they may: the
guest writes the IOREQ slot and signals the device model's event channel itself, and waits for the
device model's notify on an eventfd, so an access costs no round trip to the simulated host.
Anything else (paused, unclaimed, a kernel ioeventfd, ...) is the host's ``mmio`` request.
With ``vcpu_hold`` the vCPU waits for that notify blocked for up to so many seconds, as a vCPU is
held in the hypervisor until its IOREQ completes, before it waits through the event loop: for a
guest that makes one access at a time and does nothing else meanwhile (a benchmark), the round
trip then costs no event-loop wake-up on the guest's side.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import mmap
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Self

from xen_vhost_sim import rpc, vcpu_channel
from xen_vhost_sim.memory import GuestMemory
from xen_vhost_sim.vcpu_channel import Snapshot
from xen_vhost_master.xen.abi import IOREQ_SLOT_SIZE, XEN_PAGE_SIZE, IoreqState, IoreqType, ioreq_t

__all__ = ["SimControl", "SimGuest", "SimGuestRam", "SimHostError"]


class SimHostError(OSError):
    """The simulated host refused a control request (errno as Xen would answer)."""


def _raise(reply: dict[str, Any], what: str) -> None:
    code = int(reply.get("errno", errno.EIO))
    if code:
        raise SimHostError(code, f"{what}: {reply.get('why') or os.strerror(code)}")


class SimControl:
    """Blocking admin connection to a simulated host."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
            self.call({"op": "open", "node": "control"})
        except OSError:
            self.sock.close()
            raise

    def call(self, obj: dict[str, Any], fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
        """One request (``fds`` are sent with it and stay the caller's); the reply and its fds."""
        if fds:
            obj = {**obj, "nfds": len(fds)}
        rpc.send_blocking(self.sock, obj, fds=fds)
        reply, _blob, fds = rpc.recv_blocking(self.sock)
        if reply.get("errno"):
            for fd in fds:
                os.close(fd)
        _raise(reply, str(obj.get("op")))
        return reply, fds

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_domain(
        self,
        domid: int | None = None,
        *,
        mem_bytes: int = 1 << 30,
        vcpus: int = 1,
        arch: str = "arm64",
        holes: list[tuple[int, int]] | None = None,
        paged: list[tuple[int, int]] | None = None,
        name: str = "",
    ) -> int:
        """A new guest; ``holes`` are unpopulated (gpa, size) ranges inside its RAM banks; ``paged``
        ranges are paged out: the first foreign map of each frame fails with ENOENT (retry works)."""
        reply, _ = self.call(
            {"op": "create_domain", "domid": domid, "mem_bytes": mem_bytes, "vcpus": vcpus, "arch": arch,
             "holes": holes or [], "paged": paged or [], "name": name}
        )
        return int(reply["domid"])

    def create_domain_on_fd(
        self, ram_fd: int, banks: list[tuple[int, int]], *, domid: int | None = None, vcpus: int = 1,
        arch: str = "arm64", holes: list[tuple[int, int]] | None = None, name: str = "",
    ) -> int:
        """SIM-ONLY: a guest whose RAM is an EXTERNAL shareable fd (``ram_fd``, still the caller's;
        the host keeps a duplicate) holding ``banks`` ((gpa, size), ascending) back to back from
        file offset 0: e.g. User-Mode Linux's physical memory, guest-physical = UML-physical."""
        reply, _ = self.call(
            {"op": "create_domain", "domid": domid, "vcpus": vcpus, "arch": arch, "holes": holes or [],
             "name": name, "external_ram": True, "banks": [[a, b] for a, b in banks]},
            fds=[ram_fd],
        )
        return int(reply["domid"])

    def destroy_domain(self, domid: int) -> None:
        self.call({"op": "destroy_domain", "domid": domid})

    def pause(self, domid: int) -> None:
        self.call({"op": "pause", "domid": domid})

    def unpause(self, domid: int) -> None:
        self.call({"op": "pause", "domid": domid, "unpause": True})

    def shutdown(self, domid: int, reason: str = "poweroff") -> None:
        self.call({"op": "shutdown", "domid": domid, "reason": reason})

    def add_virtio_device(
        self, domid: int, *, device_id: int, base: int, irq: int, devid: int = 0, backend_domid: int = 0,
        grant_usage: bool | None = None, kind: str = "virtio",
    ) -> str:
        """Simulated ``xl``: libxl's xenstore nodes for a virtio-mmio device; returns the backend path."""
        reply, _ = self.call(
            {"op": "add_virtio_device", "domid": domid, "devid": devid, "device_id": device_id, "base": base,
             "irq": irq, "backend_domid": backend_domid, "kind": kind,
             "grant_usage": None if grant_usage is None else int(grant_usage)}
        )
        return str(reply["value"])

    def remove_virtio_device(self, domid: int, *, device_id: int, base: int, irq: int, devid: int = 0) -> None:
        self.call({"op": "remove_virtio_device", "domid": domid, "devid": devid, "device_id": device_id,
                   "base": base, "irq": irq})

    def xl_destroy(self, domid: int, *, timeout: float = 10.0) -> dict[str, bool]:
        """``xl destroy`` the libxl way: each device Closing → wait for the backend's Closed (up to
        ``timeout`` s) → removed, then the domain destroyed. Backend path → answered in time."""
        answered: dict[str, bool] = self.call({"op": "xl_destroy", "domid": domid, "timeout": timeout})[0]["value"]
        return answered

    def xl_detach_virtio_device(self, domid: int, *, device_id: int, base: int, irq: int, devid: int = 0,
                                kind: str = "virtio", timeout: float = 10.0) -> bool:
        """``xl block-detach`` the libxl way; True if the backend answered Closed in time."""
        return bool(self.call({"op": "xl_detach_virtio_device", "domid": domid, "devid": devid, "device_id": device_id,
                               "base": base, "irq": irq, "kind": kind, "timeout": timeout})[0]["value"])

    def xl_create(
        self, name: str, devices: list[dict[str, Any]], *, mem_bytes: int = 64 << 20, vcpus: int = 1,
        arch: str = "arm64", paused: bool = False, timeout: float = 10.0,
    ) -> int:
        """``xl create`` the libxl way; returns the new domid (Xen hands out ids with a rover: a
        re-created guest gets a new one). The domain is created paused (the toolstack's pause
        reference), introduced with ``name`` (EEXIST if a live domain has it), then each device
        of ``devices`` (``add_virtio_device`` keywords: device_id, base, irq, devid, kind, ...) is
        written. ``kind="virtio_disk"`` (Xen 4.17 ``disk=[...specification=virtio]``) waits up
        to ``timeout`` s for its backend's InitWait and fails the creation (ETIMEDOUT, domain
        destroyed) without it; ``kind="virtio"`` (Xen >= 4.18 ``virtio=[...]``) does not wait.
        Then the toolstack's pause reference is dropped, unless ``paused`` (``xl create -p``)."""
        reply, _ = self.call({"op": "xl_create", "name": name, "devices": devices, "mem_bytes": mem_bytes,
                              "vcpus": vcpus, "arch": arch, "paused": paused, "timeout": timeout})
        return int(reply["value"])

    def xl_reboot(self, domid: int, *, timeout: float = 10.0) -> int:
        """``xl reboot`` of a guest made by :meth:`xl_create` (``on_reboot = "restart"``): shut down
        (reason reboot), destroyed the libxl way (each device Closing, up to ``timeout`` s for
        its backend's Closed, removed), created again with the same name and devices. Returns
        the new domid."""
        reply, _ = self.call({"op": "xl_reboot", "domid": domid, "timeout": timeout})
        return int(reply["value"]["domid"])

    def set_domctl_interface(self, version: int) -> int:
        """SIM-ONLY: the XEN_DOMCTL_INTERFACE_VERSION the simulated Xen accepts (default 0x15, Xen
        4.17; any other value in a domctl is refused with EACCES, as xen/common/domctl.c does)."""
        return int(self.call({"op": "set_domctl_interface", "version": version})[0]["value"])

    def set_host(self, **profile: object) -> dict[str, Any]:
        """SIM-ONLY: play another host for later opens and dm_ops (server.HostProfile):
        ``devices="ok"|"missing"|"eacces"``, ``capabilities="control_d\\n"|""|None`` (None: no
        xenfs), ``ioreq_server=False`` (Xen without CONFIG_IOREQ_SERVER: dm_op ENOSYS)."""
        return dict(self.call({"op": "set_host", **profile})[0]["value"])

    def domain_info(self, domid: int) -> dict[str, Any]:
        """Domain facts; ``fastpath`` holds the dom0 kernel's privcmd eventfd counters for it
        (``ioeventfd_consumed``: notify ioreqs completed in the kernel, ``ioeventfd_passed``: events
        left to user space, ``irqfd_injected`` / ``irqfd_failed``, active ``ioeventfds`` / ``irqfds``, ``mode``)."""
        return self.call({"op": "domain_info", "domid": domid})[0]

    def set_privcmd_eventfd(self, mode: str) -> str:
        """SIM-ONLY: boot another dom0 kernel for IRQFD/IOEVENTFD: ``enotty`` (Linux 6.1),
        ``eopnotsupp`` (>= 6.7 without CONFIG_XEN_PRIVCMD_EVENTFD) or ``on``. Applies to later ioctls."""
        return str(self.call({"op": "set_privcmd_eventfd", "mode": mode})[0]["value"])

    def sim_only_ram_memfd(self, domid: int) -> tuple[list[tuple[int, int]], int]:
        """SIM-ONLY (no Xen equivalent): the guest's RAM banks and a memfd holding them back to back
        (bank i at the sum of the earlier banks' sizes; holes read as zero). For baselines that
        need a shareable fd; the caller owns and closes the fd."""
        reply, fds = self.call({"op": "guest_ram", "domid": domid})
        return [(int(a), int(b)) for a, b in reply["banks"]], fds[0]

    def pending_access(self, domid: int, vcpu: int = 0) -> bool:
        """True while vCPU ``vcpu`` is blocked in an MMIO access waiting for the device model."""
        return bool(self.call({"op": "pending_access", "domid": domid, "vcpu": vcpu})[0]["value"])


def vcpu_channel_page() -> int:
    return vcpu_channel.PAGE


#: The longest a vCPU-channel access may hold the guest's event loop (SimGuest's ``vcpu_hold``).
MAX_VCPU_HOLD = 60.0


class SimGuestRam:
    """GuestRam over the (sim-only) RAM memfd of a domain."""

    def __init__(self, mem: GuestMemory) -> None:
        self._mem = mem

    def view(self, gpa: int, length: int) -> memoryview:
        return self._mem.view(gpa, length)

    def banks(self) -> list[tuple[int, int]]:
        return list(self._mem.banks)

    def close(self) -> None:
        self._mem.close()


@dataclass(eq=False)
class _Route:
    """One vCPU's eventfd route to one IOREQ server (sim.vcpu_channel)."""

    gen: int
    page: mmap.mmap
    slot: ioreq_t | None
    raw: memoryview | None  # the slot's bytes (the hot path's loads and stores)
    wake: int
    deliver: int
    rpage: mmap.mmap  # the route page (sim.vcpu_channel: the port's mask, the handler's counters)
    #: the dom0 kernel's ioeventfds on this vCPU's port: (QueueNotify address, addr_len, vq, eventfd)
    kevs: list[tuple[int, int, int, int]]
    #: ``wake`` stays polled from one access to the next (SimGuest._route_woken reads it): an
    #: access in progress, an event read for it and not yet looked at, the access's wait for one
    polled: bool = False
    active: bool = False
    woken: bool = False
    waiter: asyncio.Future[None] | None = None

    def close(self) -> None:
        self.slot = self.raw = None  # a view pins the mmap
        try:
            self.page.close()
        except BufferError:
            pass  # an access in flight still holds a view: the mapping goes with it
        self.rpage.close()
        os.close(self.wake)
        os.close(self.deliver)
        for k in self.kevs:
            os.close(k[3])


_U64 = (1 << 64) - 1
_REQ = struct.Struct("<QQII")  # ioreq_t's addr, data, count, size: the request's fields in one store
_DATA = struct.Struct("<Q")
_DATA_OFF = ioreq_t.data.offset
_FLAGS_OFF = ioreq_t.flags.offset  # type: ignore[attr-defined]  # state, data_is_ptr, dir: one byte
_TYPE_OFF = ioreq_t.type.offset
_KEEP = ~ioreq_t.STATE_MASK & 0xFF
_COPY = int(IoreqType.COPY)
_IORESP_READY = int(IoreqState.IORESP_READY)
_READY = {False: ioreq_t.DIR | int(IoreqState.READY), True: int(IoreqState.READY)}  # by write: dir, state


class _VcpuGate:
    """One access per vCPU at a time (Hypervisor.mmio holds the vCPU's lock), in arrival order.
    An access that finds it free takes it without a suspension (the usual case); a waiter is
    handed it by :meth:`release` (``busy`` stays set)."""

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed it as it was cancelled: on to the next
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.busy = False
QUEUE_NOTIFY = 0x50  # virtio-mmio QueueNotify (privcmd ioeventfd watches base + 0x50)
QUEUE_NOTIFY_VQ_MASK = 0xFFFF
UNMASK_LOOK = 0.01  # s: a vCPU waiting for an unmask looks again at least this often


class SimGuest:
    """GuestBus of domain ``domid`` on the simulated host at ``path``. Create with :meth:`connect`.

    ``vcpu_channel=False`` sends every access through the simulated host (the reference path);
    ``vcpu_hold``: seconds a vCPU-channel access waits for its answer blocked (holding this
    process's event loop: nothing else of the guest runs meanwhile) before it waits through the
    loop (0: at once through the loop)."""

    def __init__(self, path: str, domid: int, *, vcpu_channel: bool = True, vcpu_hold: float = 0.0) -> None:
        if not 0.0 <= vcpu_hold <= MAX_VCPU_HOLD:
            raise ValueError(f"vcpu_hold={vcpu_hold!r}: 0 to {MAX_VCPU_HOLD} s")
        self.path, self.domid = path, domid
        self._hold = vcpu_hold
        self._ctl = SimControl(path)
        self._chan: mmap.mmap | None = None
        self._routes: dict[tuple[int, int], _Route] = {}
        self._gates: dict[int, _VcpuGate] = {}
        self._fast_waits: set[asyncio.Future[None]] = set()
        self._snap: Snapshot | None = None  # the page as last read (valid while its seq is)
        # (addr, size, vcpu) -> what _route found, for accesses while the page's seq stays _cached_seq
        self._cached: dict[tuple[int, int, int], tuple[int, _Route, bool]] = {}
        self._cached_seq = -1
        self._irq_efd = -1  # the domain's asserted-line events (sim.vcpu_channel)
        self._irq_waits: dict[int, set[asyncio.Future[None]]] = {}  # irq -> this guest's waits for it
        # the dom0 kernel's irqfds this guest plays (sim.vcpu_channel): irq -> [(level, eventfd)]
        self._irqfds: dict[int, list[tuple[int, int]]] = {}
        self._irqfd_gen = -1
        self._irq_host_efd = -1
        self._irqfd_readers: list[int] = []  # the irqfds polled
        self._irq_watched = False  # _irq_efd and the irqfds polled (from a wait_irq on)
        self.irq_rearms = 0  # times the pollers of _irq_efd and the irqfds were set up again
        #: vCPU-channel accesses the dom0 kernel's privcmd ioeventfd handler answered (played by
        #: this guest's vCPUs, :meth:`_kernel_notify`): IOREQs that never reached the device model
        self.kernel_answered = 0
        try:
            reply, fds = self._ctl.call({"op": "guest_ram", "domid": domid})
            banks = [(int(a), int(b)) for a, b in reply["banks"]]
            holes = [(int(a), int(b)) for a, b in reply["holes"]]
            self._ram = SimGuestRam(GuestMemory(banks, holes, memfd=fds[0]))
            if vcpu_channel:
                _r, cfds = self._ctl.call({"op": "vcpu_channel", "domid": domid})
                try:
                    self._chan = mmap.mmap(cfds[0], vcpu_channel_page())
                finally:
                    os.close(cfds[0])
                self._irq_efd = cfds[1]
        except BaseException:
            self._ctl.close()
            raise
        self._sock: socket.socket | None = None
        self._reader = rpc.MessageReader()
        self._futs: dict[int, asyncio.Future[Any]] = {}
        self._tags = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def connect(cls, path: str, domid: int, *, vcpu_channel: bool = True, vcpu_hold: float = 0.0) -> SimGuest:
        g = cls(path, domid, vcpu_channel=vcpu_channel, vcpu_hold=vcpu_hold)
        connected = False
        try:
            g._loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            g._sock = sock
            sock.connect(path)
            rpc.send_blocking(sock, {"op": "open", "node": "control"})
            reply, _b, _f = rpc.recv_blocking(sock)
            _raise(reply, "open control")
            sock.setblocking(False)
            g._loop.add_reader(sock.fileno(), g._readable)
            connected = True
        finally:
            if not connected:
                g.close()
        return g

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for f in self._futs.values():
            if not f.done():
                f.set_exception(ConnectionResetError("SimGuest closed"))
        self._futs.clear()
        self._fail_fast_waits(ConnectionResetError("SimGuest closed"))
        for route in self._routes.values():
            self._drop_route(route)
        self._routes.clear()
        self._unwatch_irqfds()
        if self._irq_efd >= 0:
            if self._irq_watched and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._irq_efd)
            self._irq_watched = False
            self._irq_waits.clear()
            os.close(self._irq_efd)
            self._irq_efd = -1
        self._close_irqfds()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        self._ctl.close()
        self._ram.close()

    def _fail_fast_waits(self, exc: BaseException) -> None:
        for f in self._fast_waits:
            if not f.done():
                f.set_exception(exc)
        self._fast_waits.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            for f in self._futs.values():
                if not f.done():
                    f.set_exception(ConnectionResetError("simulated host went away"))
            self._futs.clear()
            self._fail_fast_waits(ConnectionResetError("simulated host went away"))
            return
        for obj, _blob in self._reader.feed(data):
            fut = self._futs.pop(int(obj.get("tag", -1)), None)
            if fut is None or fut.done():
                continue
            code = int(obj.get("errno", 0))
            if code:
                fut.set_exception(SimHostError(code, os.strerror(code)))
            else:
                fut.set_result(obj.get("value"))

    async def _call(self, obj: dict[str, Any]) -> Any:
        if self._sock is None or self._loop is None:
            raise ConnectionResetError("SimGuest not connected")
        tag = next(self._tags)
        fut = self._loop.create_future()
        self._futs[tag] = fut
        head, tail = rpc.encode({**obj, "domid": self.domid, "tag": tag})
        try:
            await self._loop.sock_sendall(self._sock, bytes(head) + bytes(tail))
            return await fut
        finally:
            self._futs.pop(tag, None)

    # ------------------------------------------------------------ GuestBus
    @property
    def ram(self) -> SimGuestRam:
        return self._ram

    def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> Coroutine[Any, Any, int]:
        # (a coroutine of _mmio itself: one coroutine frame less per access than ``async def``)
        return self._mmio(addr, size, False, 0, vcpu)

    async def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        await self._mmio(addr, size, True, value, vcpu)

    async def _mmio(self, addr: int, size: int, write: bool, value: int, vcpu: int) -> int:
        gate = self._gates.get(vcpu)
        if gate is None:
            gate = self._gates[vcpu] = _VcpuGate()
        if gate.busy:
            await gate.wait()
        else:
            gate.busy = True
        try:
            got = self._route(addr, size, vcpu)
            if got is None:
                obj = {"op": "mmio", "addr": addr, "size": size, "write": write, "vcpu": vcpu}
                if write:
                    obj["value"] = value
                return int(await self._call(obj))
            uid, route, arm64 = got
            return await self._fast_mmio(uid, route, addr, size, write, value, vcpu, arm64)
        finally:
            gate.release()

    def _route(self, addr: int, size: int, vcpu: int) -> tuple[int, _Route, bool] | None:
        """The vCPU channel for this access, if the host's page allows it (else None: host path);
        what was found is kept for the next accesses while the page's sequence counter stays."""
        chan = self._chan
        if chan is None:
            return None
        seq = vcpu_channel.seq_of(chan)
        if seq != self._cached_seq:
            self._cached.clear()
            self._cached_seq = seq
        key = (addr, size, vcpu)
        got = self._cached.get(key)
        if got is None or got[1].raw is None:  # (a route closed since: fetched again)
            got = self._find_route(addr, size, vcpu)
            if got is not None:
                self._cached[key] = got
        return got

    def _find_route(self, addr: int, size: int, vcpu: int) -> tuple[int, _Route, bool] | None:
        chan = self._chan
        if chan is None or size not in (1, 2, 4, 8) or not 0 <= vcpu < vcpu_channel.MAX_FAST_VCPUS:
            return None
        snap = self._snap
        if snap is None or snap.seq != vcpu_channel.seq_of(chan):
            snap = self._snap = vcpu_channel.read_snapshot(chan)
        if snap is None or snap.flags & (vcpu_channel.FLAG_RUNNING | vcpu_channel.FLAG_DYING) != vcpu_channel.FLAG_RUNNING:
            return None
        claim = snap.claim(addr, size)
        if claim is None or not claim[1] >> vcpu & 1:
            return None
        uid, _fast, gen = claim
        route = self._routes.get((uid, vcpu))
        if route is None or route.gen != gen:
            route = self._fetch_route(uid, vcpu, gen)
        if route is None:
            return None
        return uid, route, bool(snap.flags & vcpu_channel.FLAG_ARM64)

    def _fetch_route(self, uid: int, vcpu: int, gen: int) -> _Route | None:
        old = self._routes.pop((uid, vcpu), None)
        if old is not None:
            self._drop_route(old)
        try:
            reply, fds = self._ctl.call({"op": "vcpu_server", "domid": self.domid, "uid": uid, "vcpu": vcpu})
        except SimHostError:
            return None  # gone or re-routed meanwhile: the host's path
        kev_args = reply.get("ioeventfds") or []
        if len(fds) != 4 + len(kev_args):
            for fd in fds:
                os.close(fd)
            return None
        try:
            page = mmap.mmap(fds[0], XEN_PAGE_SIZE)
            try:
                rpage = mmap.mmap(fds[3], vcpu_channel.ROUTE_PAGE)
            except OSError:
                page.close()
                raise
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        os.close(fds[0])
        os.close(fds[3])
        kevs = [(int(a) + QUEUE_NOTIFY, int(n), int(q), fd) for (a, n, q), fd in zip(kev_args, fds[4:])]
        off = vcpu * IOREQ_SLOT_SIZE
        route = _Route(gen, page, ioreq_t.from_buffer(page, off), memoryview(page)[off:off + IOREQ_SLOT_SIZE],
                       fds[1], fds[2], rpage, kevs)
        self._routes[(uid, vcpu)] = route
        return route

    def _drop_route(self, route: _Route) -> None:
        if route.polled and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(route.wake)
        route.polled = False
        route.close()

    def _start_access(self, route: _Route) -> None:
        """An access begins on ``route``: its events from now on are the access's. ``wake`` is
        polled from the first access on, not set up and torn down per access (two epoll_ctl and
        a poll handle each time, a third of the vCPU's cost per access)."""
        route.active = True
        route.woken = False  # (an event read before this access is not its answer)
        if not route.polled:
            assert self._loop is not None
            self._loop.add_reader(route.wake, self._route_woken, route)
            route.polled = True

    def _route_woken(self, route: _Route) -> None:
        """``route.wake`` readable: the device model's notify (or the host's, as the server goes).
        With no access of ours in progress it is someone else's (the vCPU's port is shared by
        every player of the vCPU: the host's own path, another SimGuest of the domain): the event
        is given back and ``wake`` no longer polled until our next access."""
        try:
            os.eventfd_read(route.wake)
        except BlockingIOError:
            return
        if not route.active:
            os.eventfd_write(route.wake, 1)
            assert self._loop is not None
            self._loop.remove_reader(route.wake)
            route.polled = False
            return
        route.woken = True
        fut = route.waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _route_wait(self, route: _Route, timeout: float | None = None) -> None:
        """Until ``route.wake`` has fired since ``route.woken`` was last cleared (or ``timeout``)."""
        assert self._loop is not None
        if route.woken:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        route.waiter = fut
        self._fast_waits.add(fut)
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass
        finally:
            route.waiter = None
            self._fast_waits.discard(fut)

    async def _fast_mmio(self, uid: int, route: _Route, addr: int, size: int, write: bool, value: int, vcpu: int,
                         arm64: bool) -> int:
        """Hypervisor.mmio's claimed-access path, played by the vCPU itself (sim.vcpu_channel)."""
        assert self._chan is not None and self._loop is not None and route.slot is not None and route.raw is not None
        mask = (1 << (8 * size)) - 1
        slot = route.slot
        raw = route.raw
        data = (value & (_U64 if arm64 else mask)) if write else 0
        kernel = -1
        if write and route.kevs:
            for notify, addr_len, vq, efd in route.kevs:
                if addr == notify and size == addr_len and data & QUEUE_NOTIFY_VQ_MASK == vq:
                    kernel = efd
                    break
            else:
                vcpu_channel.count_route(route.rpage, False)  # left to user space (the slot below)
        busy = vcpu_channel.BUSY_OFF + vcpu
        chan = self._chan
        chan[busy] = 1
        stale: _Route | None = None
        try:
            self._start_access(route)
            if kernel >= 0:
                await self._kernel_notify(route, slot, addr, size, data, kernel)
                return 0
            _REQ.pack_into(raw, 0, addr, data, 1, size)
            raw[_TYPE_OFF] = _COPY
            raw[_FLAGS_OFF] = _READY[write]  # state last (wmb)
            route.rpage[vcpu_channel.ROUTE_MASKED] = 1  # the evtchn device masks as it queues
            os.eventfd_write(route.deliver, 1)  # EVTCHNOP_send on the vCPU's port
            # (the page unchanged since _route: the route is the binding's own)
            snap = None if vcpu_channel.seq_of(chan) == self._cached_seq else vcpu_channel.read_snapshot(chan)
            if snap is not None and snap.gen_of(uid) not in (None, route.gen):
                # the device model re-bound meanwhile: the new binding's pending event covers a
                # READY slot only if it came after; send on the new route too (spurious at worst).
                # With no new route yet (the daemon died: its port unbound), the vCPU waits on the
                # one it started with: its ``wake`` is the server's, which a restarted daemon's
                # answer writes; the route is closed once the access is over.
                started = self._routes.pop((uid, vcpu), None)  # (``route``: the vCPU's one at a time)
                fresh = self._fetch_route(uid, vcpu, int(snap.gen_of(uid) or 0))
                if fresh is not None and fresh.raw is not None:
                    self._start_access(fresh)
                    os.eventfd_write(fresh.deliver, 1)
                    route = fresh
                    raw = fresh.raw
                    if started is not None:
                        self._drop_route(started)
                else:
                    stale = started
            data = await self._fast_wait(uid, route, raw)
        finally:
            route.active = False
            if not chan.closed:  # (close() during the access)
                chan[busy] = 0
            if stale is not None:
                self._drop_route(stale)
        return 0 if write else (mask if data == -1 else data & mask)

    async def _kernel_notify(self, route: _Route, slot: ioreq_t, addr: int, size: int, data: int, efd: int) -> None:
        """The dom0 kernel's privcmd ioeventfd handler on a matching QueueNotify (sim.fastpath
        ``_ioeventfd_interrupt``), played by the vCPU (sim.vcpu_channel): once user space has the
        port unmasked (late EOI), the eventfd is signalled and the access is complete; the slot
        holds the request, answered (never READY for user space), and the port's event still
        reaches user space, as the evtchn device shares the interrupt."""
        assert self._loop is not None
        rpage = route.rpage
        while rpage[vcpu_channel.ROUTE_MASKED]:
            route.woken = False
            rpage[vcpu_channel.ROUTE_WAITING] = 1  # the SimKernel's unmask writes ``wake``
            if not rpage[vcpu_channel.ROUTE_MASKED]:
                break
            # bounded: the flag and the mask are written by two processes without a fence
            await self._route_wait(route, UNMASK_LOOK)
            if route.slot is None:
                raise ConnectionResetError("SimGuest closed")
        route.woken = False
        rpage[vcpu_channel.ROUTE_WAITING] = 0
        slot.addr, slot.data, slot.count, slot.size = addr, data, 1, size
        slot.type = IoreqType.COPY
        slot.flags = IoreqState.NONE  # a write: dir 0; answered and taken back by the vCPU
        try:
            os.eventfd_write(efd, 1)  # eventfd_signal
        except OSError:
            pass  # (as the kernel: a saturated counter is not the vCPU's problem)
        vcpu_channel.count_route(rpage, True)
        self.kernel_answered += 1
        rpage[vcpu_channel.ROUTE_MASKED] = 1  # the evtchn device's share of the event: masked
        os.eventfd_write(route.deliver, 1)  # until user space reads and unmasks it

    async def _fast_wait(self, uid: int, route: _Route, raw: memoryview) -> int:
        """Until the slot (``raw``) says IORESP_READY (data) or the server/domain is gone (-1: all-ones)."""
        assert self._chan is not None
        hold = self._hold
        while True:
            flags = raw[_FLAGS_OFF]
            if flags & ioreq_t.STATE_MASK == _IORESP_READY:
                data: int = _DATA.unpack_from(raw, _DATA_OFF)[0]
                raw[_FLAGS_OFF] = flags & _KEEP  # state NONE
                return data
            if route.woken:
                route.woken = False
                snap = vcpu_channel.read_snapshot(self._chan)
                while snap is None:  # the host is writing the page: a few instructions
                    await asyncio.sleep(0)
                    snap = vcpu_channel.read_snapshot(self._chan)
                if snap.flags & vcpu_channel.FLAG_DYING or uid not in snap.live:
                    return -1  # the access completes as an unclaimed one (IoreqServer.close)
                continue  # spurious (Xen keeps the vCPU blocked): wait again
            if hold:  # blocked once, then through the loop (the device model may be slow)
                ready = select.select([route.wake], [], [], hold)[0]
                hold = 0.0
                if ready:
                    self._route_woken(route)
                    continue
            await self._route_wait(route)

    def _irq_line(self, irq: int) -> int | None:
        """The page byte of ``irq``'s level, if the guest reads the line itself (sim.vcpu_channel)."""
        chan = self._chan
        off = vcpu_channel.irq_offset(irq)
        if chan is None or self._irq_efd < 0 or off is None or \
                vcpu_channel.flags_of(chan) & (vcpu_channel.FLAG_DYING | vcpu_channel.FLAG_ARM64) \
                != vcpu_channel.FLAG_ARM64:
            return None
        return off

    def _close_irqfds(self) -> None:
        for lst in self._irqfds.values():
            for _level, fd in lst:
                os.close(fd)
        self._irqfds.clear()
        if self._irq_host_efd >= 0:
            os.close(self._irq_host_efd)
            self._irq_host_efd = -1

    def _sync_irqfds(self, chan: mmap.mmap) -> None:
        """Fetch the irqfds this guest may play again if the host's set changed."""
        gen = vcpu_channel.irqfd_gen(chan)
        if gen == self._irqfd_gen:
            return
        self._unwatch_irqfds()
        self._close_irqfds()
        self._irqfd_gen = gen
        try:
            reply, fds = self._ctl.call({"op": "irqfds", "domid": self.domid})
        except SimHostError:
            return
        lines = reply.get("lines") or []
        if len(fds) != 1 + len(lines):
            for fd in fds:
                os.close(fd)
            return
        self._irq_host_efd = fds[0]
        for (irq, level), fd in zip(lines, fds[1:]):
            self._irqfds.setdefault(int(irq), []).append((int(level), fd))
        if self._irq_watched:
            self._watch_irqfds()

    def _watch_irqfds(self) -> None:
        """Poll the irqfds (the kernel's irqfd worker, :meth:`_irqfd_fire`)."""
        assert self._loop is not None
        for line, lst in self._irqfds.items():
            for level, fd in lst:
                self._loop.add_reader(fd, self._irqfd_fire, line, level, fd)
                self._irqfd_readers.append(fd)

    def _unwatch_irqfds(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._irqfd_readers:
                self._loop.remove_reader(fd)
        self._irqfd_readers = []

    def _irqfd_fire(self, irq: int, level: int, fd: int, *, taking: bool = False) -> bool:
        """The kernel's irqfd worker and the hypervisor's set_irq_level, if the eventfd was signalled:
        the level first, then (on an assert) the waits: this guest's own, woken here, and through
        the domain's guest and host irq eventfds the others'. An edge goes to one waiter: when this
        guest takes it at once (``taking``) or waits for that line itself, the guest eventfd is left
        alone (its own loop would find that event with nobody waiting, give it back and stop
        polling until its next wait: a wasted wake-up and two epoll_ctl per poller, per interrupt)."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False  # nothing, or the host read it first (and injects it)
        chan = self._chan
        off = vcpu_channel.irq_offset(irq)
        if chan is None or off is None:
            return False
        vcpu_channel.count_irqfd(chan)
        if level:  # (0: a falling edge, ignored as the hypervisor does: Hypervisor.set_irq_level)
            chan[off] = 1
            mine = taking or irq in self._irq_waits
            for efd in (self._irq_host_efd,) if mine else (self._irq_efd, self._irq_host_efd):
                if efd >= 0:
                    os.eventfd_write(efd, 1)
            self._wake_irq_waits()
        return True

    def irq_level(self, irq: int) -> bool:
        off = self._irq_line(irq)
        if off is not None:
            assert self._chan is not None
            self._sync_irqfds(self._chan)
            for level, fd in self._irqfds.get(irq, ()):
                self._irqfd_fire(irq, level, fd)
            return self._chan[off] != 0
        return bool(self._ctl.call({"op": "irq_level", "domid": self.domid, "irq": irq})[0]["value"])

    async def wait_irq(self, irq: int) -> None:
        """Take interrupt ``irq``: at once if it is pending, else when it is raised; an Arm SPI is
        an edge, cleared as it is taken (Hypervisor.wait_irq)."""
        while True:
            off = self._irq_line(irq)
            if off is None:
                await self._call({"op": "wait_irq", "irq": irq})  # the host's path (reference)
                return
            assert self._chan is not None and self._loop is not None
            self._sync_irqfds(self._chan)
            for level, fd in self._irqfds.get(irq, ()):
                self._irqfd_fire(irq, level, fd, taking=True)
            if self._chan[off]:
                self._chan[off] = 0  # taken (the GIC's acknowledge; a raise after this is a new edge)
                return
            fut: asyncio.Future[None] = self._loop.create_future()
            if not self._irq_watched:  # kept polled from one wait to the next: no poller set up per wait
                self._irq_watched = True
                self.irq_rearms += 1
                self._loop.add_reader(self._irq_efd, self._irq_woken)
                self._watch_irqfds()
            self._irq_waits.setdefault(irq, set()).add(fut)
            self._fast_waits.add(fut)
            woken = False
            try:
                await fut
                woken = True
            finally:
                self._fast_waits.discard(fut)
                waits = self._irq_waits.get(irq, set())  # (emptied by close())
                waits.discard(fut)
                if not waits:
                    self._irq_waits.pop(irq, None)
                    chan = self._chan
                    if not woken and chan is not None and not chan.closed and chan[off] and self._irq_efd >= 0:
                        # cancelled with an edge pending that an irqfd may have fired for this wait
                        # (the guest eventfd left alone): passed on to whoever else of the domain waits
                        os.eventfd_write(self._irq_efd, 1)

    def _irq_woken(self) -> None:
        try:
            os.eventfd_read(self._irq_efd)
        except BlockingIOError:
            return
        if not self._irq_waits:  # someone else's (as a route's event, _route_woken): given back,
            os.eventfd_write(self._irq_efd, 1)  # and no longer polled until our next wait
            assert self._loop is not None
            self._loop.remove_reader(self._irq_efd)
            self._unwatch_irqfds()
            self._irq_watched = False
            return
        self._wake_irq_waits()

    def _wake_irq_waits(self) -> None:
        for waits in self._irq_waits.values():
            for f in waits:  # each re-reads its line
                if not f.done():
                    f.set_result(None)

    # ------------------------------------------------------------ PciBus (x86 HVM guests)
    async def pci_config_read(self, sbdf: int, reg: int, size: int, vcpu: int = 0) -> int:
        return int(await self._call({"op": "pci_config", "sbdf": sbdf, "reg": reg, "size": size, "write": False,
                                     "vcpu": vcpu}))

    async def pci_config_write(self, sbdf: int, reg: int, size: int, value: int, vcpu: int = 0) -> None:
        await self._call({"op": "pci_config", "sbdf": sbdf, "reg": reg, "size": size, "write": True,
                          "value": value, "vcpu": vcpu})

    async def wait_msi(self, addr: int, data: int) -> None:
        await self._call({"op": "wait_msi", "addr": addr, "data": data})

    def grant(self, gfn: int, *, readonly: bool = False) -> int:
        return int(self._ctl.call({"op": "grant", "domid": self.domid, "gfn": gfn, "readonly": readonly})[0]["value"])

    def revoke(self, ref: int) -> None:
        self._ctl.call({"op": "revoke", "domid": self.domid, "ref": ref})

    # ------------------------------------------------------------ guest-side event channels
    def evtchn_alloc_unbound(self, remote_dom: int = 0) -> int:
        """EVTCHNOP_alloc_unbound in the guest, for ``remote_dom`` to bind to; returns the guest port."""
        return int(self._ctl.call({"op": "evtchn_alloc_unbound", "domid": self.domid, "remote": remote_dom})[0]["value"])

    def evtchn_bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain in the guest (to a port dom0 allocated with BIND_UNBOUND_PORT).
        As on Xen, the new local port starts with an event pending."""
        return int(self._ctl.call(
            {"op": "evtchn_bind_interdomain", "domid": self.domid, "remote": remote_dom, "remote_port": remote_port}
        )[0]["value"])

    def evtchn_notify(self, port: int) -> None:
        self._ctl.call({"op": "evtchn_notify", "domid": self.domid, "port": port})

    async def evtchn_wait(self, port: int) -> None:
        """Return once the guest's ``port`` has fired (consumes the event)."""
        await self._call({"op": "evtchn_wait", "port": port})
