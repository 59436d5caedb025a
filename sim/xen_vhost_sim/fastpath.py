"""The simulated dom0 kernel's privcmd eventfd fast paths: IOCTL_PRIVCMD_IRQFD / IOCTL_PRIVCMD_IOEVENTFD.

Modelled on Linux ``drivers/xen/privcmd.c`` (>= 6.7, ``CONFIG_XEN_PRIVCMD_EVENTFD``). It runs in the
simulated *host's* event loop, not in the caller's process: SimKernel passes the caller's eventfd
over the privcmd connection (SCM_RIGHTS), and this "kernel" reads/signals its own reference of it,
so the fast path keeps working while the caller (the daemon) is busy or blocked, as in Linux.

Which kernel is emulated is a per-host setting (:class:`EventfdMode`): a 6.1 kernel (``enotty``:
Debian 12, the default), a >= 6.7 kernel built without the option (``eopnotsupp``), or one with it
(``on``).

IRQFD (``privcmd_irqfd_assign``): the dm_op buffer is copied once; whenever the eventfd becomes
readable the kernel reads (clears) it and issues that dm_op verbatim (errors are only logged, as
``pr_err_ratelimited``). A counter already pending at assign time is injected at once. The same
eventfd twice is EBUSY; DEASSIGN matches by eventfd only and succeeds even if nothing matched.

IOEVENTFD (``privcmd_ioeventfd_assign`` / ``ioeventfd_interrupt``): one "kioreq" per (ioreq user
address): its page is page 0 of the privcmd VMA holding that address, and it binds every
``ports[i]`` (dom0 local ports) as a *shared* handler next to the evtchn device's own binding. On
each event on port ``i`` it looks at slot ``i``: only READY + COPY + WRITE at ``addr + 0x50`` with
``size == addr_len`` and ``data & 0xffff == vq`` is consumed (eventfd signalled, IORESP_READY,
port notified); anything else is left READY for user space, which still receives the event.
The ports are late-EOI interrupts that only the evtchn device's user re-enables (by writing the
port back), so while a port is masked for user space the kernel handler does not run either.

On a vCPU port with the eventfd route (sim.vcpu_channel) the vCPU plays the IOEVENTFD handler
itself (:meth:`FastPath.guest_handlers` says which eventfds it signals), with the same matching and
the same late-EOI wait; ``port_event`` then runs only for accesses that take the host's path.

Divergence (documented): Linux keeps ioeventfds until DEASSIGN (and irqfds until the eventfd's
last close); the simulation also releases those assigned through a privcmd fd when that fd's
connection closes, so a dead client leaves nothing behind. The daemon must DEASSIGN explicitly.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import platform
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xen_vhost_sim.hypervisor import HvError, Hypervisor, IoreqServer
from xen_vhost_master.xen.abi import IoreqDir, IoreqState, IoreqType

__all__ = ["EventfdMode", "FastPath", "VIRTIO_MMIO_QUEUE_NOTIFY", "eventfd_identity"]

log = logging.getLogger(__name__)

VIRTIO_MMIO_QUEUE_NOTIFY = 0x50
QUEUE_NOTIFY_VQ_MASK = 0xFFFF
MAX_VCPUS = 4096  # privcmd_ioeventfd_assign's limit
_U64 = (1 << 64) - 1


class EventfdMode(enum.Enum):
    """Which dom0 kernel the simulated host plays for the eventfd ioctls."""

    ENOTTY = "enotty"  # Linux < 6.7 (Debian 12's 6.1): unknown ioctl
    EOPNOTSUPP = "eopnotsupp"  # >= 6.7 without CONFIG_XEN_PRIVCMD_EVENTFD
    ON = "on"  # >= 6.7 with CONFIG_XEN_PRIVCMD_EVENTFD

    @classmethod
    def parse(cls, text: str | EventfdMode) -> EventfdMode:
        if isinstance(text, EventfdMode):
            return text
        aliases = {"6.1": cls.ENOTTY, "not-configured": cls.EOPNOTSUPP, "eventfd": cls.ON}
        t = str(text).strip().lower()
        if t in aliases:
            return aliases[t]
        try:
            return cls(t)
        except ValueError:
            raise ValueError(f"privcmd eventfd mode {text!r}: expected enotty, eopnotsupp or on") from None


# ---- eventfd identity (the kernel compares eventfd_ctx pointers) ----------------------------------------

_KCMP_FILE = 0
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())


def eventfd_identity(fd: int) -> int | None:
    """The eventfd's ``eventfd-id`` from fdinfo (Linux >= 6.2); None if not shown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("eventfd-id:"):
                    return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        return None
    return None


def _same_file(a: int, b: int) -> bool:
    ia, ib = eventfd_identity(a), eventfd_identity(b)
    if ia is not None and ib is not None:
        return ia == ib
    if _SYS_KCMP is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.getpid()
    return int(libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)) == 0


def _signal(fd: int) -> None:
    """eventfd_signal: add 1 to the counter (never blocks short of a 2^64-2 overflow)."""
    try:
        os.write(fd, (1).to_bytes(8, "little"))
    except OSError as exc:
        log.warning("eventfd_signal on fd %d failed: %s", fd, exc)


# ---- registries --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Irqfd:
    fd: int  # the host's own reference to the caller's eventfd
    dom: int
    dm_op: bytes
    owner: object
    injected: int = 0


@dataclass(eq=False)
class _Ioeventfd:
    fd: int
    addr: int
    addr_len: int
    vq: int
    owner: object


@dataclass(eq=False)
class _Kioreq:
    dom: int
    vcpus: int
    uioreq: int
    server: IoreqServer | None  # None: page 0 of that VMA is not an ioreq page (never matches)
    ports: list[int]
    ioeventfds: list[_Ioeventfd] = field(default_factory=list)


@dataclass
class _Counters:
    ioeventfd_consumed: int = 0  # notify ioreqs completed by the kernel
    ioeventfd_passed: int = 0  # events on a bound port left to user space
    irqfd_injected: int = 0
    irqfd_failed: int = 0


DmOpRunner = Callable[[int, list[int], bytes], None]


class FastPath:
    """The host-wide (like Linux's global lists) privcmd irqfd/ioeventfd state."""

    def __init__(self, hv: Hypervisor, run_dm_op: DmOpRunner, mode: EventfdMode | str = EventfdMode.ENOTTY) -> None:
        self.hv = hv
        self.run_dm_op = run_dm_op
        self.mode = EventfdMode.parse(mode)
        self.irqfds: list[_Irqfd] = []
        self.kioreqs: list[_Kioreq] = []
        self.by_port: dict[int, list[tuple[_Kioreq, int]]] = {}
        self.counters: dict[int, _Counters] = {}
        self._loop: Any = None
        #: called with a domain whose irqfds were assigned or dropped (sim.vcpu_channel)
        self.on_irqfd_change: Callable[[int], None] = lambda _dom: None

    # ------------------------------------------------------------------ ioctl entry (privcmd_ioctl)
    def check_present(self) -> None:
        """What privcmd_ioctl answers before reading the argument."""
        if self.mode is EventfdMode.ENOTTY:
            raise HvError(errno.ENOTTY, "IRQFD/IOEVENTFD: the simulated dom0 kernel is a 6.1 one")
        if self.mode is EventfdMode.EOPNOTSUPP:
            raise HvError(errno.EOPNOTSUPP, "kernel built without CONFIG_XEN_PRIVCMD_EVENTFD")

    @staticmethod
    def _client_errno(o: dict[str, Any], key: str) -> None:
        code = int(o.get(key) or 0)
        if code:
            raise HvError(code, key.replace("_errno", ""))

    def _counters(self, dom: int) -> _Counters:
        return self.counters.setdefault(dom, _Counters())

    # ------------------------------------------------------------------ irqfd
    def irqfd(self, o: dict[str, Any], blob: bytes, fds: list[int], restrict: int | None, owner: object, loop: Any) -> None:
        """privcmd_ioctl_irqfd. ``fds``: the caller's eventfd (taken over on success, else closed)."""
        self.check_present()
        flags, dom = int(o["flags"]), int(o["dom"])
        try:
            if flags & ~1:
                raise HvError(errno.EINVAL, "unknown irqfd flags")
            if restrict is not None and restrict != dom:
                raise HvError(errno.EPERM, f"privcmd fd restricted to d{restrict}")
            if flags & 1:
                self._client_errno(o, "fd_errno")
                for k in [k for k in self.irqfds if _same_file(k.fd, fds[0])][:1]:
                    self._drop_irqfd(k)
                return  # Linux answers 0 even when nothing matched
            self._client_errno(o, "dm_op_errno")
            self._client_errno(o, "fd_errno")
            if any(_same_file(k.fd, fds[0]) for k in self.irqfds):
                raise HvError(errno.EBUSY, "eventfd already assigned as an irqfd")
            k = _Irqfd(fds.pop(0), dom, bytes(blob[: int(o["size"])]), owner)
        finally:
            for fd in fds:
                os.close(fd)
        self.irqfds.append(k)
        self.on_irqfd_change(dom)
        self._loop = loop
        loop.add_reader(k.fd, self._irqfd_ready, k)  # fires at once for a counter already pending
        log.info("irqfd assigned: d%d, %d-byte dm_op", dom, len(k.dm_op))

    def _irqfd_ready(self, k: _Irqfd) -> None:
        if k not in self.irqfds:
            return
        try:
            poller = select.poll()  # (select() would fail for fds >= FD_SETSIZE)
            poller.register(k.fd, select.POLLIN)
            if not poller.poll(0):
                return  # someone else read it first
            os.read(k.fd, 8)  # eventfd_ctx_do_read: clear the counter
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("irqfd read failed (%s): deactivating", exc)
            self._drop_irqfd(k)
            return
        c = self._counters(k.dom)
        try:
            self.run_dm_op(k.dom, [len(k.dm_op)], k.dm_op)
        except HvError as exc:
            c.irqfd_failed += 1
            log.warning("irqfd: dm_op for d%d failed: %s", k.dom, exc)
            return
        k.injected += 1
        c.irqfd_injected += 1

    def _drop_irqfd(self, k: _Irqfd) -> None:
        if k in self.irqfds:
            self.irqfds.remove(k)
            self.on_irqfd_change(k.dom)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(k.fd)
        os.close(k.fd)

    # ------------------------------------------------------------------ ioeventfd
    def ioeventfd(self, o: dict[str, Any], fds: list[int], restrict: int | None, owner: object) -> None:
        """privcmd_ioctl_ioeventfd."""
        self.check_present()
        flags, dom = int(o["flags"]), int(o["dom"])
        try:
            if flags & ~1:
                raise HvError(errno.EINVAL, "unknown ioeventfd flags")
            if restrict is not None and restrict != dom:
                raise HvError(errno.EPERM, f"privcmd fd restricted to d{restrict}")
            if flags & 1:
                self._deassign(o, fds)
                return
            kev = self._assign(o, fds, owner)
        finally:
            for fd in fds:
                os.close(fd)
        log.info("ioeventfd assigned: d%d base %#x vq %d len %d", dom, kev.addr, kev.vq, kev.addr_len)

    def _assign(self, o: dict[str, Any], fds: list[int], owner: object) -> _Ioeventfd:
        addr, addr_len, vcpus = int(o["addr"]), int(o["addr_len"]), int(o["vcpus"])
        dom, uioreq = int(o["dom"]), int(o["ioreq"])
        if addr + addr_len > _U64:
            raise HvError(errno.EINVAL, "address range overflows")
        if addr_len not in (1, 2, 4, 8):
            raise HvError(errno.EINVAL, "addr_len must be 1, 2, 4 or 8")
        if not 1 <= vcpus <= MAX_VCPUS:
            raise HvError(errno.EINVAL, "vcpus must be 1..4096")
        self._client_errno(o, "fd_errno")
        kioreq = next((k for k in self.kioreqs if k.uioreq == uioreq), None)
        if kioreq is not None:
            if kioreq.dom != dom or kioreq.vcpus != vcpus:
                raise HvError(errno.EINVAL, "ioeventfd configuration mismatch (dom/vcpus) for this ioreq page")
            if any(_same_file(e.fd, fds[0]) for e in kioreq.ioeventfds):
                raise HvError(errno.EBUSY, "eventfd already assigned for this guest")
        else:
            kioreq = self._alloc_kioreq(o)
        kev = _Ioeventfd(fds.pop(0), addr, addr_len, int(o["vq"]), owner)
        kioreq.ioeventfds.append(kev)
        return kev

    def _alloc_kioreq(self, o: dict[str, Any]) -> _Kioreq:
        page0 = o.get("page0")
        if page0 is None:
            raise HvError(errno.EFAULT, "no privcmd mapping at the ioreq address")
        self._client_errno(o, "ports_errno")
        dom, vcpus = int(o["dom"]), int(o["vcpus"])
        ports = [int(p) for p in o["ports"]][:vcpus]
        if len(ports) != vcpus:
            raise HvError(errno.EFAULT, "short ports array")
        dom0 = self.hv.domains[0].ports
        for p in ports:
            if p not in dom0:
                raise HvError(errno.EINVAL, f"port {p} is not a bound dom0 event channel")
        server: IoreqServer | None = None
        if page0.get("kind") == "ioreq":
            try:
                server = self.hv.ioreq_server(int(page0["dom"]), int(page0["id"]))
            except HvError:
                server = None
        if server is None:
            # Linux takes pages[0] of that VMA whatever it holds: here it never looks like a notify.
            log.warning("ioeventfd: page 0 of the VMA at %#x is not an ioreq page (%s): the fast path "
                        "will never fire", int(o["ioreq"]), page0)
        k = _Kioreq(dom, vcpus, int(o["ioreq"]), server, ports)
        self.kioreqs.append(k)
        for vcpu, p in enumerate(ports):
            self.by_port.setdefault(p, []).append((k, vcpu))
        return k

    def _deassign(self, o: dict[str, Any], fds: list[int]) -> None:
        self._client_errno(o, "fd_errno")
        dom, uioreq, vcpus = int(o["dom"]), int(o["ioreq"]), int(o["vcpus"])
        for k in self.kioreqs:
            if k.dom != dom or k.uioreq != uioreq or k.vcpus != vcpus:
                continue
            for e in k.ioeventfds:
                if _same_file(e.fd, fds[0]):
                    self._drop_ioeventfd(k, e)
                    return
            break
        raise HvError(errno.ENODEV, "ioeventfd is not assigned")

    def _drop_ioeventfd(self, k: _Kioreq, e: _Ioeventfd) -> None:
        k.ioeventfds.remove(e)
        os.close(e.fd)
        if not k.ioeventfds:
            self.kioreqs.remove(k)
            for vcpu, p in enumerate(k.ports):
                lst = self.by_port.get(p, [])
                if (k, vcpu) in lst:
                    lst.remove((k, vcpu))
                if not lst:
                    self.by_port.pop(p, None)

    def irqfds_of(self, dom: int) -> list[tuple[bytes, int]]:
        """(dm_op, the host's reference eventfd) of each irqfd assigned for ``dom``."""
        return [(k.dm_op, k.fd) for k in self.irqfds if k.dom == dom]

    def guest_handlers(self, port: int, server: IoreqServer, vcpu: int) -> list[_Ioeventfd] | None:
        """The ioeventfds the handlers of dom0 ``port`` would signal, if vCPU ``vcpu`` of ``server``
        can play them itself (sim.vcpu_channel): every handler on that port watches that server's
        slot of that vCPU. None if some handler watches another page or slot (the host plays it)."""
        out: list[_Ioeventfd] = []
        for k, i in self.by_port.get(port, ()):
            if k.server is not server or i != vcpu:
                return None
            out.extend(k.ioeventfds)
        return out

    def add_guest_counts(self, dom: int, consumed: int, passed: int) -> None:
        """Fold what a route's guest-played handler counted into ``dom``'s counters (route closing)."""
        c = self._counters(dom)
        c.ioeventfd_consumed += consumed
        c.ioeventfd_passed += passed

    def port_event(self, port: int) -> None:
        """The shared handlers of dom0 ``port`` (called before the evtchn device's own)."""
        for k, vcpu in list(self.by_port.get(port, ())):
            self._ioeventfd_interrupt(k, vcpu, port)

    def _ioeventfd_interrupt(self, k: _Kioreq, vcpu: int, port: int) -> None:
        s = k.server
        if s is None or s.dom.servers.get(s.id) is not s or vcpu >= s.dom.nr_vcpus:
            return
        slot = s.slot(vcpu)
        if slot.state != IoreqState.READY or slot.type != IoreqType.COPY or slot.dir != IoreqDir.WRITE:
            return
        c = self._counters(k.dom)
        for e in k.ioeventfds:
            if (slot.addr == e.addr + VIRTIO_MMIO_QUEUE_NOTIFY and slot.size == e.addr_len
                    and (int(slot.data) & QUEUE_NOTIFY_VQ_MASK) == e.vq):
                slot.state = IoreqState.INPROCESS
                _signal(e.fd)
                slot.state = IoreqState.IORESP_READY
                c.ioeventfd_consumed += 1
                try:
                    self.hv.send(0, port)
                except HvError as exc:
                    log.warning("ioeventfd: notify of port %d failed: %s", port, exc)
                return
        c.ioeventfd_passed += 1

    # ------------------------------------------------------------------ life cycle / inspection
    def release_owner(self, owner: object) -> None:
        """The privcmd connection ``owner`` closed: drop what it assigned (sim divergence, see doc)."""
        dropped = 0
        for k in [k for k in self.irqfds if k.owner is owner]:
            self._drop_irqfd(k)
            dropped += 1
        for kio in list(self.kioreqs):
            for e in [e for e in kio.ioeventfds if e.owner is owner]:
                self._drop_ioeventfd(kio, e)
                dropped += 1
        if dropped:
            log.info("privcmd fd closed with %d irqfd/ioeventfd still assigned: released "
                     "(Linux would keep them until DEASSIGN)", dropped)

    def info(self, dom: int, guest_counts: tuple[int, int, int] = (0, 0, 0)) -> dict[str, Any]:
        """``dom``'s counters; ``guest_counts``: (consumed, passed, injected) of the handlers its
        vCPUs and its guest play on the routes still open (sim.vcpu_channel)."""
        c = self._counters(dom)
        return {
            "mode": self.mode.value,
            "ioeventfd_consumed": c.ioeventfd_consumed + guest_counts[0],
            "ioeventfd_passed": c.ioeventfd_passed + guest_counts[1],
            "irqfd_injected": c.irqfd_injected + guest_counts[2],
            "irqfd_failed": c.irqfd_failed,
            "ioeventfds": sum(len(k.ioeventfds) for k in self.kioreqs if k.dom == dom),
            "irqfds": sum(1 for k in self.irqfds if k.dom == dom),
        }

    def close(self) -> None:
        for k in list(self.irqfds):
            self._drop_irqfd(k)
        for kio in list(self.kioreqs):
            for e in list(kio.ioeventfds):
                self._drop_ioeventfd(kio, e)
