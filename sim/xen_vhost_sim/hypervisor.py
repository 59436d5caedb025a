"""The simulated hypervisor: domains, event channels, IOREQ servers, interrupt lines, grant tables.

Everything here runs on the simulated host's own event loop (a thread or the ``xen-vhost-sim``
process); the daemon never touches these objects, it reaches them through SimKernel's ioctls.
Errors are ``HvError(errno)`` with the errno Xen would return (ESRCH for an unknown domain,
EINVAL for a bad port/argument, EPERM for a forbidden one, ...).

Modelled after xen/common/{event_channel.c,ioreq.c,grant_table.c} and xen/arch/arm/dm.c:
* event channels: per-domain port tables; interdomain pairs; closing one end leaves the other
  unbound towards the closer; binding sets the new local port pending (Xen does so to avoid lost
  notifications, and a re-attaching device model relies on it);
* IOREQ servers belong to the *domain* that created them (dom0), not to a process or fd: they
  survive the daemon's death, with any vCPU access still pending in its slot;
* x86 guests' PCI configuration accesses go, as IOREQ_TYPE_PCI_CONFIG, to the server that claimed the
  function's SBDF; their MSIs (XEN_DMOP_inject_msi) and INTx levels (XEN_DMOP_set_pci_intx_level)
  reach the guest;
* a vCPU's MMIO access to a range claimed by an enabled server blocks the vCPU until the slot reaches
  STATE_IORESP_READY and its event channel fires; unclaimed accesses read all-ones and drop writes
  (x86 HVM behaviour; Xen on Arm would inject a data abort, see README of sim).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import mmap
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xen_vhost_sim import vcpu_channel
from xen_vhost_sim.memory import Arch, GuestMemory, bank_layout
from xen_vhost_master.xen.abi import (
    DOMID_FIRST_RESERVED,
    IOREQ_SLOT_SIZE,
    XEN_PAGE_SIZE,
    IoRangeType,
    IoreqState,
    IoreqType,
    ioreq_t,
)

__all__ = ["Domain", "HvError", "Hypervisor", "IoreqServer", "Port", "pci_intx_gsi"]

log = logging.getLogger(__name__)

MAX_PORTS = 4096  # per domain (2-level ABI on 64-bit allows 4096)
GNTTAB_FIRST_REF = 8  # GNTTAB_NR_RESERVED_ENTRIES
NR_SPIS = 64  # SPIs 32..95 exist in the simulated vGIC
MAX_IOREQ_SERVERS = 8  # MAX_NR_IOREQ_SERVERS
MAX_VCPUS = 128  # one ioreq page holds 128 slots
MAX_CONTROLLER_PAUSES = 255  # _domain_pause_by_systemcontroller: "an arbitrary 255"
HISTORY_MAX = 256
_uids = itertools.count(1)


def pci_intx_gsi(device: int, intx: int) -> int:
    """The GSI of PCI device ``device``'s pin ``intx`` (0 = INTA) on an HVM guest's bus 0:
    ``hvm_pci_intx_gsi`` (xen/arch/x86/include/asm/hvm/irq.h)."""
    return ((((device << 2) + (device >> 3) + intx) & 31) + 16)


class HvError(Exception):
    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why or os.strerror(err))
        self.errno = err


@dataclass(eq=False)
class Port:
    """One event channel endpoint in a domain's table."""

    domid: int
    port: int
    state: str = "unbound"  # unbound | interdomain
    remote_dom: int = 0
    remote_port: int = 0
    consumer: Callable[[Port], None] | None = None
    owner: object | None = None  # the evtchn connection owning a dom0 port


@dataclass(eq=False)
class Grant:
    gfn: int
    readonly: bool
    revoked: bool = False
    maps: int = 0


@dataclass(eq=False)
class Vcpu:
    index: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: asyncio.Future[int] | None = None
    pending_server: IoreqServer | None = None
    watching: asyncio.AbstractEventLoop | None = None  # the loop reading pending_server.wake[index]


class IoreqServer:
    """One IOREQ server: shared page of ``ioreq_t[vcpus]``, ranges, per-vCPU guest ports."""

    def __init__(self, hv: Hypervisor, dom: Domain, sid: int, bufioreq: int, emulator: int) -> None:
        self.hv, self.dom, self.id, self.bufioreq, self.emulator = hv, dom, sid, bufioreq, emulator
        self.enabled = False
        self.closed = False
        self.ranges: list[tuple[int, int, int]] = []  # (type, start, end inclusive)
        self.uid = next(_uids)  # SIM-ONLY: names this server in the vCPU channel page
        self.memfd = os.memfd_create(f"xen-sim-ioreq-d{dom.domid}-s{sid}", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, XEN_PAGE_SIZE)
        self.page = mmap.mmap(self.memfd, XEN_PAGE_SIZE)
        # SIM-ONLY (sim.vcpu_channel): per vCPU, the guest port's event as an eventfd (written by
        # whoever notifies the port: the daemon's SimKernel directly, or the host) and the bound
        # dom0 port's event as an eventfd (set by the evtchn connection that bound it).
        self.wake = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(dom.nr_vcpus)]
        self.deliver: list[int | None] = [None] * dom.nr_vcpus
        # SIM-ONLY (sim.vcpu_channel): per vCPU with a route, its route page (memfd, mapping)
        self.route_pages: list[tuple[int, mmap.mmap] | None] = [None] * dom.nr_vcpus
        self.route_gen = 0  # bumped whenever an entry of ``deliver`` changes
        self.ports: list[int] = []
        for v in range(dom.nr_vcpus):
            p = dom.alloc_port(remote_dom=emulator, consumer=self._on_event)
            self.ports.append(p.port)
            self.slot(v).vp_eport = p.port

    def slot(self, vcpu: int) -> ioreq_t:
        return ioreq_t.from_buffer(self.page, vcpu * IOREQ_SLOT_SIZE)

    def claims(self, kind: int, addr: int, size: int) -> bool:
        return self.enabled and any(t == kind and s <= addr and addr + size - 1 <= e for t, s, e in self.ranges)

    def _on_event(self, port: Port) -> None:
        """The device model notified vCPU ``i``'s port: complete the access if the slot says so."""
        vcpu = self.dom.vcpus[self.ports.index(port.port)]
        fut = vcpu.pending
        if fut is None or fut.done() or vcpu.pending_server is not self:
            _kick(self.wake[vcpu.index])  # a vCPU waiting in the guest's process (sim.vcpu_channel)
            return
        self.complete(vcpu)

    def woken(self, vcpu: Vcpu) -> None:
        """vCPU ``vcpu``'s wake eventfd fired while the host itself waits for the access."""
        try:
            os.eventfd_read(self.wake[vcpu.index])
        except BlockingIOError:
            return
        if vcpu.pending is not None and not vcpu.pending.done() and vcpu.pending_server is self:
            self.complete(vcpu)

    def complete(self, vcpu: Vcpu) -> None:
        fut = vcpu.pending
        assert fut is not None
        slot = self.slot(vcpu.index)
        if slot.state != IoreqState.IORESP_READY:
            return  # spurious or early: Xen keeps the vCPU blocked
        data = int(slot.data)
        slot.state = IoreqState.NONE
        fut.set_result(data)

    def close(self) -> None:
        self.closed = True
        self.hv.publish(self.dom)  # a vCPU waiting in the guest's process sees the server gone ...
        for v in self.dom.vcpus:
            if v.pending_server is self and v.pending is not None and not v.pending.done():
                v.pending.set_result(-1)  # the access completes as an unclaimed one (all-ones)
            if v.pending_server is self and v.watching is not None:
                v.watching.remove_reader(self.wake[v.index])
                v.watching = None
            _kick(self.wake[v.index])  # ... once woken
        for p in self.ports:
            self.hv.close_port(self.dom.domid, p)
        self.page.close()
        os.close(self.memfd)
        for fd in self.wake:
            os.close(fd)
        self.wake = []

    def fast_vcpus(self) -> int:
        """Bit i: vCPU i's port has the eventfd route and no dom0 kernel handler the guest cannot
        play itself (sim.vcpu_channel)."""
        mask = 0
        for i, d in enumerate(self.deliver[: vcpu_channel.MAX_FAST_VCPUS]):
            p = self.dom.ports.get(self.ports[i])
            if d is not None and p is not None and p.state == "interdomain" and p.remote_dom == 0 \
                    and not self.hv.kernel_handles(p.remote_port, self, i):
                mask |= 1 << i
        return mask


def _kick(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass  # closed or saturated: the waiter re-reads the state anyway


class Domain:
    def __init__(
        self, domid: int, name: str, nr_vcpus: int, memory: GuestMemory | None, arch: Arch, *, paused: bool = False
    ) -> None:
        self.domid, self.name, self.nr_vcpus, self.memory, self.arch = domid, name, nr_vcpus, memory, arch
        self.ports: dict[int, Port] = {}
        self.servers: dict[int, IoreqServer] = {}
        self.irq: dict[int, bool] = {}
        self.irq_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.msis: deque[tuple[int, int]] = deque(maxlen=HISTORY_MAX)  # (addr, data) injected, latest last
        self.msi_pending: dict[tuple[int, int], int] = {}  # not yet taken by the guest (Hypervisor.wait_msi)
        self.msi_waiters: dict[tuple[int, int], list[asyncio.Future[None]]] = {}
        self.grants: dict[int, Grant] = {}
        self._next_ref = GNTTAB_FIRST_REF
        self.vcpus = [Vcpu(i) for i in range(nr_vcpus)]
        # vCPUs run while ``running`` is set: no controller pause reference and not shut down
        # (d->controller_pause_count, xen/common/domain.c; a toolstack-built domain starts at 1).
        self.running = asyncio.Event()
        self.pause_count = 1 if paused else 0
        if not paused:
            self.running.set()
        self.shutdown_reason: str | None = None
        self.dying = False
        self.user_events: dict[int, asyncio.Event] = {}
        # SIM-ONLY: what happened to the domain, in order (JSON-able pairs): ["running", bool] at
        # each change, ["claimed", base] when an MMIO range becomes served by an enabled IOREQ
        # server. Lets a test prove the guest never ran while a window was unclaimed.
        self.history: deque[tuple[str, object]] = deque(maxlen=HISTORY_MAX)
        # SIM-ONLY: the vCPU channel page (sim.vcpu_channel), guests only
        self.ctl_fd = -1
        self.ctl: mmap.mmap | None = None
        self.ctl_seq = 0
        # SIM-ONLY: an asserted line's events (sim.vcpu_channel): the guest's, and the host's own
        self.irq_efd = self.irq_host_efd = -1
        self.irq_watching: asyncio.AbstractEventLoop | None = None
        if memory is not None:
            self.ctl_fd = os.memfd_create(f"xen-sim-vcpu-d{domid}", os.MFD_CLOEXEC)
            os.ftruncate(self.ctl_fd, vcpu_channel.PAGE)
            self.ctl = mmap.mmap(self.ctl_fd, vcpu_channel.PAGE)
            self.irq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.irq_host_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.on_change: Callable[[Domain], None] | None = None

    def irq_level(self, irq: int) -> bool:
        off = vcpu_channel.irq_offset(irq)
        if self.ctl is not None and off is not None:
            return self.ctl[off] != 0
        return self.irq.get(irq, False)

    def set_irq_line(self, irq: int, level: bool) -> None:
        off = vcpu_channel.irq_offset(irq)
        if self.ctl is None or off is None:
            self.irq[irq] = level
            return
        self.ctl[off] = int(level)
        if level:
            for efd in (self.irq_efd, self.irq_host_efd):
                os.eventfd_write(efd, 1)

    def take_irq(self, irq: int) -> None:
        """The guest took edge interrupt ``irq`` (an Arm SPI): no longer pending."""
        off = vcpu_channel.irq_offset(irq)
        if self.ctl is None or off is None:
            self.irq[irq] = False
        else:
            self.ctl[off] = 0

    def wake_irq_waiters(self) -> None:
        """The host's waiters of lines now asserted (by the host or by a device model's SimKernel)."""
        if self.irq_host_efd >= 0:
            try:
                os.eventfd_read(self.irq_host_efd)
            except BlockingIOError:
                pass
        for irq in [i for i in self.irq_waiters if self.irq_level(i)]:
            for w in self.irq_waiters.pop(irq):
                if not w.done():
                    w.set_result(None)
        if not self.irq_waiters and self.irq_watching is not None:
            self.irq_watching.remove_reader(self.irq_host_efd)
            self.irq_watching = None

    def close_irq(self) -> None:
        if self.irq_watching is not None:
            self.irq_watching.remove_reader(self.irq_host_efd)
            self.irq_watching = None
        if self.irq_efd >= 0:
            os.eventfd_write(self.irq_efd, 1)  # the guest's waiters see the domain dying
            os.close(self.irq_efd)
            os.close(self.irq_host_efd)
            self.irq_efd = self.irq_host_efd = -1

    def sync_running(self) -> None:
        run = self.pause_count == 0 and self.shutdown_reason is None and not self.dying
        if run != self.running.is_set():
            self.history.append(("running", run))
        if run or self.dying:
            self.running.set()  # a dying domain's waiting vCPUs must see that it is gone
        else:
            self.running.clear()
        if self.on_change is not None:
            self.on_change(self)

    def alloc_port(self, remote_dom: int, consumer: Callable[[Port], None] | None = None, owner: object = None) -> Port:
        for n in range(1, MAX_PORTS):
            if n not in self.ports:
                p = Port(self.domid, n, "unbound", remote_dom, 0, consumer, owner)
                self.ports[n] = p
                return p
        raise HvError(errno.ENOSPC)

    def port(self, n: int) -> Port:
        p = self.ports.get(n)
        if p is None:
            raise HvError(errno.EINVAL, f"port {n} not allocated in d{self.domid}")
        return p

    def new_grant(self, gfn: int, readonly: bool) -> int:
        ref = self._next_ref
        self._next_ref += 1
        self.grants[ref] = Grant(gfn, readonly)
        return ref


class Hypervisor:
    """All domains of one simulated host (dom0 is the device-model domain, without RAM)."""

    def __init__(self) -> None:
        self.domains: dict[int, Domain] = {0: Domain(0, "Domain-0", 1, None, Arch.ARM64)}
        self._rover = 0  # XEN_DOMCTL_createdomain's "static domid_t rover": ids are not reused at once
        #: SIM-ONLY: whether a dom0 kernel handler (privcmd ioeventfd) shares this dom0 port that the
        #: guest's vCPU of that server cannot play itself (sim.vcpu_channel)
        self.kernel_handles: Callable[[int, IoreqServer, int], bool] = lambda _port, _srv, _vcpu: False

    def publish(self, dom: Domain) -> None:
        """SIM-ONLY: rewrite ``dom``'s vCPU channel page from the current state (sim.vcpu_channel)."""
        if dom.ctl is None:
            return
        run = dom.pause_count == 0 and dom.shutdown_reason is None and not dom.dying
        flags = (vcpu_channel.FLAG_RUNNING if run else 0) | (vcpu_channel.FLAG_DYING if dom.dying else 0) \
            | (vcpu_channel.FLAG_ARM64 if dom.arch is Arch.ARM64 else 0)
        live = [s for _, s in sorted(dom.servers.items(), reverse=True) if not s.closed]  # (as _access searches)
        entries = [(start, end, s.uid, s.fast_vcpus(), s.route_gen & 0xFFFFFFFF) for s in live if s.enabled
                   for kind, start, end in s.ranges if kind == IoRangeType.MEMORY]
        dom.ctl_seq = vcpu_channel.write(dom.ctl, dom.ctl_seq, flags, entries, [s.uid for s in live])

    def publish_all(self) -> None:
        for dom in self.domains.values():
            self.publish(dom)

    def _next_domid(self) -> int:
        """The first free id after the last one handed out, wrapping below DOMID_FIRST_RESERVED."""
        for step in range(1, DOMID_FIRST_RESERVED):
            dom = (self._rover + step - 1) % (DOMID_FIRST_RESERVED - 1) + 1
            if dom not in self.domains:
                self._rover = dom
                return dom
        raise HvError(errno.ENOMEM, "no free domain id")

    # ------------------------------------------------------------------ domains
    def create_domain(
        self,
        domid: int | None = None,
        *,
        name: str = "",
        mem_bytes: int = 1 << 30,
        vcpus: int = 1,
        arch: str = "arm64",
        holes: list[tuple[int, int]] = (),  # type: ignore[assignment]
        paged: list[tuple[int, int]] = (),  # type: ignore[assignment]
        ram_fd: int | None = None,
        banks: list[tuple[int, int]] | None = None,
        paused: bool = False,
    ) -> Domain:
        """A new guest domain. With ``ram_fd`` (taken over, closed on failure too) its RAM is an
        EXTERNAL shareable fd (e.g. User-Mode Linux's physical memory file) holding ``banks``
        back to back from offset 0; ``mem_bytes`` is then ignored. ``paused``: created the way
        XEN_DOMCTL_createdomain does, with one controller pause reference (the toolstack's, which
        libxl drops once the domain is built); otherwise running at once."""
        if ram_fd is not None:
            try:
                return self._create_external(domid, name, vcpus, arch, banks or [], list(holes), ram_fd, paused)
            finally:
                os.close(ram_fd)  # the domain's memory holds its own duplicate
        if domid is None:
            domid = self._next_domid()
        if not 0 < domid < DOMID_FIRST_RESERVED or domid in self.domains:
            raise HvError(errno.EEXIST if domid in self.domains else errno.EINVAL)
        if not 1 <= vcpus <= MAX_VCPUS or mem_bytes <= 0 or mem_bytes % XEN_PAGE_SIZE:
            raise HvError(errno.EINVAL)
        a = Arch(arch)
        mem = GuestMemory(bank_layout(a, mem_bytes), list(holes), name=f"d{domid}")
        for gpa, size in paged:
            if gpa % XEN_PAGE_SIZE or size % XEN_PAGE_SIZE or size <= 0:
                mem.close()
                raise HvError(errno.EINVAL, "paged range not page aligned")
            mem.paged.append((gpa >> 12, (gpa + size) >> 12))
        dom = Domain(domid, name or f"guest{domid}", vcpus, mem, a, paused=paused)
        self._adopt(dom)
        log.info("created d%d (%s, %d vCPUs, %d MiB, %s%s)", domid, dom.name, vcpus, mem_bytes >> 20, a.value,
                 ", paused" if paused else "")
        return dom

    def _create_external(
        self, domid: int | None, name: str, vcpus: int, arch: str, banks: list[tuple[int, int]],
        holes: list[tuple[int, int]], ram_fd: int, paused: bool = False,
    ) -> Domain:
        if domid is None:
            domid = self._next_domid()
        if not 0 < domid < DOMID_FIRST_RESERVED or domid in self.domains:
            raise HvError(errno.EEXIST if domid in self.domains else errno.EINVAL)
        if not 1 <= vcpus <= MAX_VCPUS or not banks:
            raise HvError(errno.EINVAL, "an external-RAM domain needs vCPUs and banks")
        ends = sorted((gpa, gpa + size) for gpa, size in banks)
        if any(b[0] < a[1] for a, b in itertools.pairwise(ends)):
            raise HvError(errno.EINVAL, "overlapping RAM banks")
        total = sum(size for _gpa, size in banks)
        try:
            st = os.fstat(ram_fd)
        except OSError as exc:
            raise HvError(errno.EBADF, f"RAM fd: {exc}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size < total:
            raise HvError(errno.EINVAL, f"RAM fd is not a regular file of at least {total} bytes")
        own = os.dup(ram_fd)
        try:
            mem = GuestMemory(banks, holes, name=f"d{domid}", memfd=own)  # closes ``own`` if mmap fails
        except ValueError as exc:
            os.close(own)
            raise HvError(errno.EINVAL, str(exc)) from None
        dom = Domain(domid, name or f"guest{domid}", vcpus, mem, Arch(arch), paused=paused)
        self._adopt(dom)
        log.info("created d%d (%s, %d vCPUs, external RAM %d MiB in %d bank(s), %s)", domid, dom.name, vcpus,
                 total >> 20, len(banks), arch)
        return dom

    def _adopt(self, dom: Domain) -> None:
        self.domains[dom.domid] = dom
        dom.on_change = self.publish
        self.publish(dom)

    def domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None or dom.dying:
            raise HvError(errno.ESRCH, f"no domain {domid}")
        return dom

    def guest(self, domid: int) -> Domain:
        dom = self.domain(domid)
        if dom.memory is None:
            raise HvError(errno.EPERM, "not a guest domain")
        return dom

    def pause(self, domid: int) -> None:
        """domain_pause_by_systemcontroller: one more pause reference (EOVERFLOW past 255)."""
        dom = self.guest(domid)
        if dom.pause_count >= MAX_CONTROLLER_PAUSES:
            raise HvError(errno.EOVERFLOW, f"d{domid} already paused {dom.pause_count} times")
        dom.pause_count += 1
        dom.sync_running()

    def unpause(self, domid: int) -> None:
        """domain_unpause_by_systemcontroller: one reference less (EINVAL if there is none)."""
        dom = self.guest(domid)
        if dom.pause_count == 0:
            raise HvError(errno.EINVAL, f"d{domid} is not paused")
        dom.pause_count -= 1
        dom.sync_running()

    def shutdown(self, domid: int, reason: str = "poweroff") -> None:
        dom = self.guest(domid)
        dom.shutdown_reason = reason
        dom.sync_running()

    def destroy_domain(self, domid: int) -> None:
        dom = self.guest(domid)
        dom.dying = True
        dom.sync_running()
        for s in list(dom.servers.values()):
            s.close()
        dom.servers.clear()
        for n in list(dom.ports):
            self.close_port(domid, n)
        for waiters in [*dom.irq_waiters.values(), *dom.msi_waiters.values()]:
            for w in waiters:
                if not w.done():
                    w.cancel()
        del self.domains[domid]
        if dom.memory is not None:
            dom.memory.close()  # mappings already made by dom0 keep their pages, as on Xen
        dom.close_irq()
        if dom.ctl is not None:
            dom.ctl.close()
            os.close(dom.ctl_fd)
            dom.ctl, dom.ctl_fd = None, -1
        log.info("destroyed d%d", domid)

    # ------------------------------------------------------------------ event channels
    def alloc_unbound(self, domid: int, remote_dom: int, **kw: object) -> Port:
        self.domain(remote_dom)
        return self.domain(domid).alloc_port(remote_dom, **kw)  # type: ignore[arg-type]

    def bind_interdomain(self, domid: int, remote_dom: int, remote_port: int, *, fire: bool = True,
                         **kw: object) -> Port:
        local = self.domain(domid)
        rdom = self.domain(remote_dom)
        rp = rdom.port(remote_port)
        if rp.state != "unbound" or rp.remote_dom != domid:
            raise HvError(errno.EINVAL, f"d{remote_dom} port {remote_port} is not unbound towards d{domid}")
        lp = local.alloc_port(remote_dom, **kw)  # type: ignore[arg-type]
        lp.state, lp.remote_port = "interdomain", remote_port
        rp.state, rp.remote_dom, rp.remote_port = "interdomain", domid, lp.port
        # xen/common/event_channel.c: "We may have lost notifications on the remote unbound port.
        # Fix that up here by conservatively always setting a notification on the local port."
        # (``fire=False``: the caller fires it once its delivery route is in place.)
        if fire:
            self._fire(lp)
        return lp

    def close_port(self, domid: int, port: int) -> None:
        dom = self.domains.get(domid)
        if dom is None:
            return
        p = dom.ports.pop(port, None)
        if p is None:
            return
        if p.state == "interdomain":
            rdom = self.domains.get(p.remote_dom)
            rp = rdom.ports.get(p.remote_port) if rdom else None
            if rp is not None:
                rp.state, rp.remote_dom, rp.remote_port = "unbound", domid, 0

    def send(self, domid: int, port: int) -> None:
        """EVTCHNOP_send from ``domid``'s ``port``; an unbound port swallows the event (as Xen)."""
        p = self.domain(domid).port(port)
        if p.state != "interdomain":
            return
        rdom = self.domains.get(p.remote_dom)
        rp = rdom.ports.get(p.remote_port) if rdom else None
        if rp is not None:
            self._fire(rp)

    def fire(self, p: Port) -> None:
        if p.consumer is not None:
            p.consumer(p)

    _fire = fire

    # ------------------------------------------------------------------ ioreq servers
    def create_ioreq_server(self, domid: int, bufioreq: int, emulator: int = 0) -> IoreqServer:
        dom = self.guest(domid)
        if bufioreq not in (0, 1, 2):
            raise HvError(errno.EINVAL)
        sid = next((i for i in range(MAX_IOREQ_SERVERS) if i not in dom.servers), None)
        if sid is None:
            raise HvError(errno.ENOSPC)
        s = IoreqServer(self, dom, sid, bufioreq, emulator)
        dom.servers[sid] = s
        self.publish(dom)
        return s

    def ioreq_server(self, domid: int, sid: int, emulator: int = 0) -> IoreqServer:
        s = self.guest(domid).servers.get(sid)
        if s is None:
            raise HvError(errno.ENOENT, f"no ioreq server {sid} on d{domid}")
        if s.emulator != emulator:
            raise HvError(errno.EPERM)
        return s

    def destroy_ioreq_server(self, domid: int, sid: int, emulator: int = 0) -> None:
        s = self.ioreq_server(domid, sid, emulator)
        del s.dom.servers[sid]
        s.close()
        self.publish(s.dom)

    def map_io_range(self, domid: int, sid: int, kind: int, start: int, end: int, emulator: int = 0) -> None:
        s = self.ioreq_server(domid, sid, emulator)
        if kind not in (IoRangeType.PORT, IoRangeType.MEMORY, IoRangeType.PCI) or start > end:
            raise HvError(errno.EINVAL)
        if any(t == kind and not (end < a or b < start) for t, a, b in s.ranges):
            raise HvError(errno.EEXIST)  # rangeset_add_range of an overlapping range
        s.ranges.append((kind, start, end))
        if s.enabled and kind == IoRangeType.MEMORY:
            s.dom.history.append(("claimed", start))
        self.publish(s.dom)

    def set_ioreq_server_state(self, domid: int, sid: int, enabled: bool, emulator: int = 0) -> None:
        s = self.ioreq_server(domid, sid, emulator)
        if enabled and not s.enabled:
            s.dom.history.extend(("claimed", start) for kind, start, _end in s.ranges if kind == IoRangeType.MEMORY)
        s.enabled = enabled
        self.publish(s.dom)

    def unmap_io_range(self, domid: int, sid: int, kind: int, start: int, end: int, emulator: int = 0) -> None:
        s = self.ioreq_server(domid, sid, emulator)
        try:
            s.ranges.remove((kind, start, end))
        except ValueError:
            raise HvError(errno.ENOENT) from None
        self.publish(s.dom)

    async def mmio(self, domid: int, vcpu: int, addr: int, size: int, write: bool, value: int = 0) -> int:
        """One vCPU access; blocks (awaits) until the device model completed it."""
        return await self._access(domid, vcpu, IoRangeType.MEMORY, IoreqType.COPY, addr, addr, size, write, value)

    async def pci_config(self, domid: int, vcpu: int, sbdf: int, reg: int, size: int, write: bool,
                         value: int = 0) -> int:
        """One configuration-space access of an x86 guest (its CF8/CFC or MMCONFIG access, decoded by
        Xen): sent as IOREQ_TYPE_PCI_CONFIG with ``addr = SBDF << 32 | reg`` to the server that
        claimed function ``sbdf`` (XEN_DMOP_IO_RANGE_PCI; xen/arch/x86/hvm/ioreq.c
        arch_ioreq_server_get_type_addr). Nobody claimed: all-ones, as the primary device model
        answers for an empty slot."""
        dom = self.guest(domid)
        if dom.arch is not Arch.X86_64:
            raise HvError(errno.EOPNOTSUPP, "PCI config ioreqs are x86-only")
        if not 0 <= sbdf <= 0xFFFFFFFF or not 0 <= reg < 4096 or size not in (1, 2, 4) or (reg & 3) + size > 4:
            raise HvError(errno.EINVAL)
        return await self._access(domid, vcpu, IoRangeType.PCI, IoreqType.PCI_CONFIG, sbdf, sbdf << 32 | reg,
                                  size, write, value)

    async def _access(self, domid: int, vcpu: int, kind: int, ioreq_type: int, key: int, addr: int, size: int,
                      write: bool, value: int) -> int:
        dom = self.guest(domid)
        if not 0 <= vcpu < dom.nr_vcpus or size not in (1, 2, 4, 8):
            raise HvError(errno.EINVAL)
        mask = (1 << (8 * size)) - 1
        v = dom.vcpus[vcpu]
        async with v.lock:
            await dom.running.wait()
            if dom.dying:
                raise HvError(errno.ESRCH, "domain destroyed")
            # The most recently created server first (xen/common/ioreq.c FOR_EACH_IOREQ_SERVER counts
            # ids down; ranges of different servers may overlap, ioreq_server_map_io_range checks
            # only the server's own)
            server = next((s for _, s in sorted(dom.servers.items(), reverse=True)
                           if s.claims(kind, key, 1 if kind == IoRangeType.PCI else size)), None)
            if server is None:
                log.debug("d%d vcpu%d unclaimed %s %s %#x/%d", domid, vcpu, IoRangeType(kind).name,
                          "W" if write else "R", addr, size)
                return 0 if write else mask
            slot = server.slot(vcpu)
            # Xen on Arm copies the whole source register into data without masking (docs/xen-abi.md §10.8)
            wdata = value & (0xFFFFFFFFFFFFFFFF if dom.arch is Arch.ARM64 else mask)
            slot.addr, slot.data, slot.count, slot.size = addr, wdata if write else 0, 1, size
            slot.type = ioreq_type
            slot.flags = (ioreq_t.DIR if not write else 0) | IoreqState.READY  # state last (wmb)
            del slot  # a ctypes view pins the page's mmap: destroying the domain must be able to unmap it
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[int] = loop.create_future()
            v.pending, v.pending_server = fut, server
            wake = server.wake[vcpu]
            loop.add_reader(wake, server.woken, v)  # a notify that went straight to the wake eventfd
            v.watching = loop
            try:
                self.send(domid, server.ports[vcpu])
                data = await fut
            finally:
                if v.watching is not None:
                    v.watching.remove_reader(wake)
                    v.watching = None
                v.pending, v.pending_server = None, None
            return 0 if write else (mask if data == -1 else data & mask)

    def pending_access(self, domid: int, vcpu: int) -> bool:
        dom = self.guest(domid)
        v = dom.vcpus[vcpu]
        in_guest = dom.ctl is not None and vcpu < vcpu_channel.PAGE - vcpu_channel.BUSY_OFF \
            and dom.ctl[vcpu_channel.BUSY_OFF + vcpu] != 0  # an access the guest's process made itself
        return in_guest or (v.pending is not None and not v.pending.done())

    # ------------------------------------------------------------------ interrupts
    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        dom = self.guest(domid)
        if dom.arch is not Arch.ARM64:
            raise HvError(errno.EOPNOTSUPP, "set_irq_level is Arm-only")
        if not 32 <= irq < 32 + NR_SPIS or level not in (0, 1):
            raise HvError(errno.EINVAL)
        if not level:
            return  # a falling edge, ignored (xen/arch/arm/vgic.c vgic_inject_irq; libxl declares the SPI edge-rising)
        dom.set_irq_line(irq, True)  # pending until the guest takes it (wait_irq)
        if irq in dom.irq_waiters:
            dom.wake_irq_waiters()

    def inject_msi(self, domid: int, addr: int, data: int) -> None:
        dom = self.guest(domid)
        if dom.arch is not Arch.X86_64:
            raise HvError(errno.EOPNOTSUPP, "inject_msi is x86-only")
        dom.msis.append((addr, data))
        dom.msi_pending[(addr, data)] = dom.msi_pending.get((addr, data), 0) + 1
        for w in dom.msi_waiters.pop((addr, data), []):
            if not w.done():
                w.set_result(None)

    async def wait_msi(self, domid: int, addr: int, data: int) -> None:
        """SIM-ONLY: the guest takes one MSI ``(addr, data)``: at once if one arrived since it last
        took one (the local APIC's IRR holds it), else when the next is injected."""
        dom = self.guest(domid)
        while not dom.msi_pending.get((addr, data)):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            dom.msi_waiters.setdefault((addr, data), []).append(fut)
            try:
                await fut
            finally:
                w = dom.msi_waiters.get((addr, data))
                if w is not None and fut in w:
                    w.remove(fut)
                    if not w:
                        del dom.msi_waiters[(addr, data)]
        dom.msi_pending[(addr, data)] -= 1

    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int, intx: int, level: int) -> None:
        """XEN_DMOP_set_pci_intx_level (xen/arch/x86/hvm/dm.c): only segment 0 bus 0, device
        0..31, INTA..INTD, level 0/1 (else EINVAL); the line is the GSI the HVM PCI link
        routing gives that pin (hvm_pci_intx_gsi, xen/arch/x86/include/asm/hvm/irq.h)."""
        dom = self.guest(domid)
        if dom.arch is not Arch.X86_64:
            raise HvError(errno.EOPNOTSUPP, "set_pci_intx_level is x86-only")
        if segment or bus or device > 0x1F or intx > 3 or level not in (0, 1):
            raise HvError(errno.EINVAL)
        gsi = pci_intx_gsi(device, intx)
        dom.set_irq_line(gsi, bool(level))
        if level and gsi in dom.irq_waiters:
            dom.wake_irq_waiters()

    async def wait_irq(self, domid: int, irq: int) -> None:
        """SIM-ONLY: the guest takes interrupt ``irq``: at once if it is pending, else when it is
        raised. An Arm SPI is an edge (set_irq_level): taking it clears it, as the GIC's
        acknowledge does; an x86 GSI (set_pci_intx_level) is a level, which stays."""
        dom = self.guest(domid)
        while not dom.irq_level(irq):
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            dom.irq_waiters.setdefault(irq, []).append(fut)
            if dom.irq_watching is None and dom.irq_host_efd >= 0:
                loop.add_reader(dom.irq_host_efd, dom.wake_irq_waiters)  # a SimKernel's assert
                dom.irq_watching = loop
            try:
                await fut
            finally:
                w = dom.irq_waiters.get(irq)
                if w is not None and fut in w:
                    w.remove(fut)
                    if not w:
                        del dom.irq_waiters[irq]
        if dom.arch is Arch.ARM64:
            dom.take_irq(irq)

    # ------------------------------------------------------------------ grants
    def grant(self, domid: int, gfn: int, readonly: bool) -> int:
        dom = self.guest(domid)
        assert dom.memory is not None
        if dom.memory.extent_of(gfn) is None:
            raise HvError(errno.EINVAL, f"gfn {gfn:#x} is not RAM")
        return dom.new_grant(gfn, readonly)

    def revoke(self, domid: int, ref: int) -> None:
        g = self.guest(domid).grants.get(ref)
        if g is None or g.revoked:
            raise HvError(errno.EINVAL)
        g.revoked = True

    def grant_pages(self, domid: int, refs: list[int], writable: bool) -> list[int]:
        """Validate a gntdev mapping (GNTTABOP_map_grant_ref); memfd page offsets or HvError."""
        dom = self.domains.get(domid)
        if dom is None or dom.memory is None or dom.dying:
            raise HvError(errno.EINVAL, "GNTST_bad_domain")
        out = []
        for ref in refs:
            g = dom.grants.get(ref)
            if g is None or g.revoked:
                raise HvError(errno.EINVAL, f"GNTST_bad_gntref {ref}")
            if writable and g.readonly:
                raise HvError(errno.EINVAL, f"GNTST_permission_denied: ref {ref} is read-only")
            ext = dom.memory.extent_of(g.gfn)
            assert ext is not None
            out.append(ext.page_offset + g.gfn - ext.gfn)
        for ref in refs:
            dom.grants[ref].maps += 1
        return out

    def close(self) -> None:
        for domid in [d for d in self.domains if d != 0]:
            self.destroy_domain(domid)

