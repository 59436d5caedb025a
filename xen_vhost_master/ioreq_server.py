"""The guest's IOREQ server: its MMIO accesses to our virtio-mmio windows arrive here.

Start order (xen-vhost-frontend ``guest.rs``, QEMU ``xen-hvm-common.c``): nr_vcpus → create (no
buffered ioreqs) → map the ioreq page (MMAP_RESOURCE) → enable → bind one interdomain event channel
per vCPU (to the ``vp_eport`` Xen wrote into the page) → map each device's window. Teardown in
reverse order, on every exit path.

Serving one request follows docs/xen-abi.md §5: take a READY slot (INPROCESS), handle it, publish the data,
IORESP_READY, notify the vCPU's port. Slots not in READY are skipped without notify (spurious
wakeups, or, on the kernel fast path's own server, the kernel's ioeventfd completed them). Each
vCPU has at most one request outstanding; requests of different vCPUs are served concurrently, and
each device serialises its own accesses.

A daemon runs one of these for its windows and, on the kernel fast path, a second one whose
ranges are only the notify registers the kernel answers (fastpath.py): its slots are the only ones
the kernel's handler stores into, and what it leaves there goes ``through`` the first's windows.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from vhost_user.aio import cancel_and_wait

from .errors import XenError
from .log import DeviceLogger, RateLimit
from .xen.abi import IoRangeType, IoreqState, IoreqType
from .xen.dmop import DeviceModel
from .xen.evtchn import PORT, EventChannel, ports_of
from .xen.ioreq import IoreqPage, IoreqRequest
from .xen.privcmd import PrivCmd

__all__ = ["IoreqServer", "IoreqStats", "MmioHandler", "PciHandler"]

_COPY, _INVALIDATE, _PCI_CONFIG = int(IoreqType.COPY), int(IoreqType.INVALIDATE), int(IoreqType.PCI_CONFIG)  # plain ints: compared on every access
_STATE_READY, _STATE_INPROCESS = int(IoreqState.READY), int(IoreqState.INPROCESS)
_SIZES = frozenset((1, 2, 4, 8))  # the access sizes of an MMIO load or store
ALL_ONES = 0xFFFFFFFFFFFFFFFF
_GONE = (errno.ENOENT, errno.ESRCH)  # the server, or its whole domain, no longer exists
#: How long a going device's window is still answered, as a removed device, after its interrupt
#: line is raised no more: an interrupt handler the guest entered on its last edge (Linux ``vm_interrupt``
#: reads InterruptStatus, then writes InterruptACK unconditionally) finds the window claimed for
#: both accesses; once the window is unclaimed, Xen on Arm answers an access with a data abort
#: (tests/xenlab/README.md: a fatal oops in interrupt context when this window was not kept).
REMOVED_GRACE = 0.5
#: How often a slot the kernel may hold is looked at again (16 at once, then backing off to 0.1 s:
#: about half a second in all) before it is left to its next event.
KERNEL_WATCH_TRIES = 28


class _Removed:
    """The answer of a going device's window: no interrupt pending, status 0, writes dropped."""

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None:
        return None if is_write else 0


_REMOVED = _Removed()


class MmioHandler(Protocol):
    """A device behind a window: offsets are relative to the window base."""

    def mmio(self, offset: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None | Awaitable[int | None]:
        """Serve ``vcpu``'s access: the read value (None for writes), or an awaitable of it when
        the device must first talk to its back-end (the vCPU stays blocked until it finishes)."""
        ...


class PciHandler(Protocol):
    """A PCI function: configuration-space accesses (IOREQ_TYPE_PCI_CONFIG), ``reg`` 0..4095."""

    def pci_config(self, reg: int, size: int, is_write: bool, value: int,
                   vcpu: int) -> int | None | Awaitable[int | None]:
        """As :meth:`MmioHandler.mmio`, for the function's configuration space."""
        ...


@dataclass
class IoreqStats:
    spurious: int = 0
    refused: int = 0
    per_vcpu: list[int] = field(default_factory=list)  # served, by the vCPU (and event channel) they came from

    @property
    def served(self) -> int:
        """Accesses answered, of all vCPUs."""
        return sum(self.per_vcpu)


class IoreqServer:
    """One IOREQ server of one guest, and the loop that serves it."""

    def __init__(self, privcmd: PrivCmd, evtchn: EventChannel, domid: int, log: DeviceLogger,
                 clock: Callable[[], float] | None = None, through: IoreqServer | None = None) -> None:
        """``through``: the server whose windows serve the accesses none of ours holds (on the
        kernel fast path's own server, fastpath.py: the notify registers the kernel leaves to us,
        and a predecessor's ranges, which are not known here)."""
        self.privcmd = privcmd
        self.evtchn = evtchn
        self.domid = domid
        self.log = log
        self.dm = DeviceModel(privcmd, domid)
        self.through = through
        self.stats = IoreqStats()
        self._limit = RateLimit(clock or asyncio.get_event_loop().time)
        self.nr_vcpus = 0
        self.adopted = False
        self.server_id: int | None = None
        self.page: IoreqPage | None = None
        self.enabled = False
        self._ports: list[int] = []
        self._notifiers: list[Callable[[], object]] = []  # NOTIFY of each vCPU's port, prepared
        self._vcpu_of: dict[int, int] = {}
        self._bases: list[int] = []  # sorted window bases
        self._windows: dict[int, tuple[int, MmioHandler | None]] = {}  # base -> (size, handler; None: ``through``'s)
        self._functions: dict[int, PciHandler] = {}  # SBDF -> handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = False
        self._busy: set[int] = set()  # vCPUs whose request this loop took and has not answered yet
        self._kernel_watch: set[int] = set()  # vCPUs whose slot is looked at again (_watch_kernel)
        self._kernel_tries: dict[int, int] = {}
        self._retired: dict[int, tuple[int, float]] = {}  # window base -> (irq, since when)

    # --- life cycle -----------------------------------------------------------------------------

    def create(self, adopt: int | None = None) -> None:
        """Create the server and map its page; not yet enabled (the guest's accesses still go
        nowhere, so devices can connect their back-ends first).

        ``adopt``: the id of the server a predecessor daemon left behind (IOREQ servers belong to
        dom0, not to a process, so they outlive a crashed daemon): reuse it if it still exists,
        so that the guest's blocked accesses are served instead of lost.
        """
        self.nr_vcpus = self.dm.nr_vcpus()
        if adopt is not None:
            try:
                self.dm.get_ioreq_server_info(adopt)
            except XenError as e:
                self.log.info("ioreq server %d of a previous run is gone (%s): creating a new one", adopt, e)
            else:
                self.server_id, self.adopted = adopt, True
        if self.server_id is None:
            self.server_id = self.dm.create_ioreq_server()
        self.page = IoreqPage.map(self.privcmd, self.domid, self.server_id, self.nr_vcpus)
        self.stats.per_vcpu = [0] * self.nr_vcpus
        self.log.info("ioreq server %d %s for %d vCPU(s)", self.server_id,
                      "adopted" if self.adopted else "created", self.nr_vcpus)

    def enable(self) -> None:
        """Enable the server, bind the vCPUs' event channels and start serving."""
        assert self.server_id is not None and self.page is not None
        self.dm.set_ioreq_server_state(self.server_id, True)
        self.enabled = True
        for vcpu in range(self.nr_vcpus):
            port = self.evtchn.bind_interdomain(self.domid, self.page.vp_eport(vcpu))
            self._ports.append(port)
            self._notifiers.append(self.evtchn.notifier(port))
            self._vcpu_of[port] = vcpu
        asyncio.get_running_loop().add_reader(self.evtchn.fileno(), self._on_event)
        self._reading = True
        # A restarted daemon finds requests its predecessor took but never answered (INPROCESS)
        # or never saw (READY): Xen keeps those vCPUs blocked, so serve them now.
        for vcpu in self.page.unfinished():
            self._dispatch(vcpu, recover=True)

    def waiting(self) -> list[int]:
        """vCPUs stopped in Xen on an access in this server's page that is not answered yet
        (READY or INPROCESS): what ``status`` shows, so that a guest whose vCPU stopped can be
        told apart from a guest this daemon holds."""
        return self.page.unfinished() if self.page is not None else []

    @property
    def ports(self) -> list[int]:
        """Our local event-channel port of each vCPU (bound by :meth:`enable`)."""
        return list(self._ports)

    def add_window(self, base: int, size: int, handler: MmioHandler | None) -> None:
        """Route ``[base, base + size)`` to ``handler``; None: to the window of ``through`` that
        holds it (the kernel's server: the notify registers it leaves to us, fastpath.py)."""
        assert self.server_id is not None
        try:
            self.dm.map_io_range(self.server_id, base, base + size - 1)
        except XenError as e:
            # An adopted server still has its predecessor's ranges.
            if not (self.adopted and e.errno == errno.EEXIST):
                raise
        bisect.insort(self._bases, base)
        self._windows[base] = (size, handler)

    def retire_window(self, base: int, irq: int) -> None:
        """The device at ``base`` is going: its window answers as a removed device from now on
        (reads 0, writes dropped: the device's own handler is no longer called) and its
        interrupt line ``irq`` is raised no more. An interrupt raised before (by the device, or
        by a kernel irqfd until the device lets go of it) is an edge the guest still takes: its
        handler then reads InterruptStatus 0 here and acks into the void (:meth:`set_irq`).
        :meth:`remove_window_after_grace` unclaims the window. No-op for an unknown window."""
        window = self._windows.get(base)
        if window is None or base in self._retired:
            return
        self._windows[base] = (window[0], _REMOVED)
        self._retired[base] = (irq, asyncio.get_running_loop().time())

    async def remove_window_after_grace(self, base: int, grace: float = REMOVED_GRACE) -> None:
        """Unclaim a retired window once it has answered as a removed device for ``grace`` seconds
        (a handler that took the line's last edge finds it for its InterruptStatus read and its
        ACK). Without a guest reading any more (the server no longer serves, ``grace`` 0: the
        domain is gone) the window goes at once."""
        retired = self._retired.get(base)
        if retired is not None and self._reading and grace > 0:
            irq, since = retired
            now = asyncio.get_running_loop().time()
            wait = max(since + grace, now + grace / 5) - now
            await asyncio.sleep(wait)
            self.log.info("window at %#x answered as a removed device for %.1f s, line %d raised no more: unclaiming it",
                          base, asyncio.get_running_loop().time() - since, irq)
        self.remove_window(base)

    def remove_window(self, base: int) -> None:
        """Stop serving the window at ``base`` (no-op if it is not served)."""
        window = self._windows.pop(base, None)
        self._retired.pop(base, None)
        if window is None:
            return
        size, _ = window
        self._bases.remove(base)
        if self.server_id is not None:
            with contextlib.suppress(XenError):
                self.dm.unmap_io_range(self.server_id, base, base + size - 1)

    def add_function(self, sbdf: int, handler: PciHandler) -> None:
        """Route PCI function ``sbdf``'s configuration space to ``handler`` (XEN_DMOP_IO_RANGE_PCI)."""
        assert self.server_id is not None
        try:
            self.dm.map_io_range(self.server_id, sbdf, sbdf, IoRangeType.PCI)
        except XenError as e:
            if not (self.adopted and e.errno == errno.EEXIST):
                raise
        self._functions[sbdf] = handler

    def remove_function(self, sbdf: int) -> None:
        """Stop serving PCI function ``sbdf`` (no-op if it is not served)."""
        if self._functions.pop(sbdf, None) is None:
            return
        if self.server_id is not None:
            with contextlib.suppress(XenError):
                self.dm.unmap_io_range(self.server_id, sbdf, sbdf, IoRangeType.PCI)

    @property
    def reading(self) -> bool:
        """Guest accesses are being taken (from :meth:`enable` until :meth:`stop_reading`)."""
        return self._reading

    def stop_reading(self) -> None:
        """Take no more guest accesses: they wait in the ioreq page, their vCPUs blocked. Those
        in progress go on. Idempotent."""
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.evtchn.fileno())
            self._reading = False

    async def close(self) -> None:
        """Reverse teardown; each step runs even if an earlier one failed (the domain may be gone)."""
        self.stop_reading()
        for task in list(self._tasks):
            await cancel_and_wait(task)
        for base in list(self._bases):
            self.remove_window(base)
        for sbdf in list(self._functions):
            self.remove_function(sbdf)
        self._answer_waiting()
        self._unbind_ports()
        if self.server_id is not None:
            sid = self.server_id
            gone: XenError | None = None
            if self.enabled:
                try:
                    self.dm.set_ioreq_server_state(sid, False)
                except XenError as e:
                    if e.errno not in _GONE:
                        self.log.warning("teardown: disable ioreq server failed: %s", e)
            if self.page is not None:
                self.page.close()
                self.page = None
            try:
                self.dm.destroy_ioreq_server(sid)
            except XenError as e:
                if e.errno not in _GONE:
                    self.log.warning("teardown: destroy ioreq server failed: %s", e)
                else:
                    gone = e
            if gone is not None:
                # Real Xen destroys a dying domain's servers itself: ENOENT while the domain lingers
                # (pages still mapped by dom0), ESRCH once it is released (tests/xenlab).
                self.log.info("ioreq server %d went with its domain (%s)", sid, gone.strerror or gone)
            else:
                self.log.info("ioreq server %d destroyed", sid)
            self.server_id = None
        self.enabled = False

    async def stop_serving(self, timeout: float) -> None:
        """Take no more guest accesses (they wait in the ioreq page, their vCPUs blocked) and let
        the ones in progress finish, for ``timeout`` seconds at most (then they are answered as
        failed, like any access whose device gave up)."""
        self.stop_reading()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                await cancel_and_wait(task)

    def _answer_waiting(self) -> None:
        """Answer the accesses still in the page (taken by no one once reading stopped) as failed
        ones (reads all-ones, writes dropped) and wake their vCPUs, before the server goes: Xen
        does not wake a vCPU blocked on a destroyed server's request (tests/xenlab: a guest
        stopped for good when its daemon was stopped under it). The windows are unmapped first, so
        no new access comes to this server; the guest's next access to them faults instead."""
        if self.page is None:
            return
        for vcpu in self.page.unfinished():
            req = self.page.take(vcpu, recover=True)
            if req is None or vcpu >= len(self._ports):
                continue
            self.page.complete(vcpu, None if req.is_write else ALL_ONES)
            self._step(f"notify vCPU {vcpu}", functools.partial(self.evtchn.notify, self._ports[vcpu]))
            self.log.info("teardown: vCPU %d's %s at %#x answered as failed", vcpu,
                          "write" if req.is_write else "read", req.addr)

    def detach(self) -> None:
        """Let go of the server without destroying it (a handover): it stays enabled with its
        MMIO ranges, so the guest's accesses queue in its page until the next device model
        process adopts it (:meth:`create` with ``adopt``). Our event-channel ports are unbound and
        the page unmapped."""
        self.stop_reading()
        self._unbind_ports()
        self._bases, self._windows, self._functions = [], {}, {}
        if self.page is not None:
            self.page.close()
            self.page = None
        self.log.info("ioreq server %s left enabled for the next device model", self.server_id)
        self.server_id = None
        self.enabled = False

    def _unbind_ports(self) -> None:
        for port in self._ports:
            self._step("unbind event channel", functools.partial(self.evtchn.unbind, port))
        self._ports, self._notifiers, self._vcpu_of = [], [], {}

    def _step(self, what: str, op: Callable[[], None]) -> None:
        try:
            op()
        except XenError as e:
            self.log.warning("%s failed: %s", what, e)

    # --- serving --------------------------------------------------------------------------------

    def _on_event(self) -> None:
        evtchn = self.evtchn
        try:
            data = evtchn.read_ports()
        except BlockingIOError:
            return  # nothing pending after all
        except OSError as e:
            self.log.error("event channel read failed: %s", XenError("evtchn read", e.errno or errno.EIO))
            return
        if not data:  # /dev/xen/evtchn never reaches EOF; a simulated host that died does
            self.log.error("event channel read failed: %s", XenError("evtchn read", errno.ENODEV))
            return
        try:
            evtchn.unmask_bytes(data)  # the ports read, written back (docs/xen-abi.md §5 step 1)
        except OSError as e:  # their requests are still served: the vCPUs wait for nothing else
            self.log.error("event channel unmask failed: %s", XenError("evtchn unmask", e.errno or errno.EIO))
        for port in PORT.unpack(data) if len(data) == 4 else ports_of(data):
            vcpu = self._vcpu_of.get(port)
            if vcpu is not None:
                self._dispatch(vcpu)

    def _dispatch(self, vcpu: int, *, recover: bool = False) -> None:
        """Serve one vCPU's request: at once when the device can (register reads, notifies,
        interrupt ACKs: the hot path creates no task), else in a task for the slow part."""
        page = self.page
        assert page is not None
        if vcpu in self._busy:  # ours, in a task (a kernel handler may have stored READY back)
            self.stats.spurious += 1
            return
        req = page.take(vcpu, recover=recover)
        if req is None:
            self.stats.spurious += 1
            if page.kernel_notifies:
                self._watch_kernel(vcpu)
            return
        if self._kernel_tries:
            self._kernel_tries.pop(vcpu, None)
        _, addr, size, is_write, data, rtype, count, data_is_ptr = req
        try:
            window = None
            if rtype == _COPY and size in _SIZES and count == 1 and not data_is_ptr:
                bases = self._bases  # the window lookup, inline: once per access
                i = bisect.bisect_right(bases, addr) - 1
                if i >= 0:
                    base = bases[i]
                    wsize, window = self._windows[base]
                    if addr + size > base + wsize:
                        window = None
            if window is not None:
                result = window.mmio(addr - base, size, is_write, data, vcpu)
            else:
                result = self._handle(req)
        except Exception:  # noqa: BLE001 - the vCPU's lifeline: a device bug must not block it forever
            self._failed(req)
            result = None if is_write else ALL_ONES
        if result is not None and type(result) is not int and isinstance(result, Awaitable):
            self._busy.add(vcpu)
            task = asyncio.get_running_loop().create_task(self._finish(req, result, None if is_write else ALL_ONES))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        # _complete's steps, inline: once per access served at once
        self.stats.per_vcpu[vcpu] += 1
        page.complete(vcpu, result)
        try:
            self._notifiers[vcpu]()
        except OSError as e:
            self.log.error("notify vCPU %d: %s", vcpu, XenError("evtchn notify", e.errno or errno.EIO))

    async def _finish(self, req: IoreqRequest, pending: Awaitable[int | None], default: int | None) -> None:
        data = default
        try:
            data = await pending
        except Exception:  # noqa: BLE001 - as above: always answer the vCPU
            self._failed(req)
        finally:
            self._complete(req, data)

    def _failed(self, req: IoreqRequest) -> None:
        self.log.exception("serving %s of %d bytes at %#x failed", "write" if req.is_write else "read", req.size, req.addr)

    def _watch_kernel(self, vcpu: int) -> None:
        """On the kernel fast path's own server (fastpath.py), whose QueueNotify writes the dom0
        kernel answers (privcmd ioeventfd), a slot this loop did not take may be the kernel's for
        a moment: READY with a notify it answers, or
        INPROCESS while its handler looks, after which it stores READY back, with no new event,
        for any other access (Linux drivers/xen/privcmd.c ioeventfd_interrupt). Such a slot is
        looked at again, soon and then less often, until it is answered or taken."""
        assert self.page is not None
        if self.page.state(vcpu) not in (_STATE_READY, _STATE_INPROCESS):
            self._kernel_tries.pop(vcpu, None)  # answered, or nothing there
            return
        if vcpu in self._kernel_watch:
            return
        tries = self._kernel_tries.get(vcpu, 0)
        if tries >= KERNEL_WATCH_TRIES:
            self._kernel_tries.pop(vcpu, None)
            self._refuse(f"vCPU {vcpu}'s slot stays state {self.page.state(vcpu)}, neither the kernel's "
                         f"answer nor taken here, after {tries} looks: left to its next event")
            return
        self._kernel_tries[vcpu] = tries + 1
        self._kernel_watch.add(vcpu)
        delay = 0.0 if tries < 16 else min(0.0005 * 2 ** (tries - 16), 0.1)
        asyncio.get_running_loop().call_later(delay, self._kernel_look, vcpu)

    def _kernel_look(self, vcpu: int) -> None:
        self._kernel_watch.discard(vcpu)
        if self._reading and self.page is not None:
            self._dispatch(vcpu)

    def _complete(self, req: IoreqRequest, data: int | None) -> None:
        """Publish the response and wake the vCPU (docs/xen-abi.md §5 steps 6-8)."""
        self._busy.discard(req.vcpu)
        self.stats.per_vcpu[req.vcpu] += 1
        if self.page is None:
            return
        self.page.complete(req.vcpu, data)
        try:
            self._notifiers[req.vcpu]()
        except OSError as e:
            self.log.error("notify vCPU %d: %s", req.vcpu, XenError("evtchn notify", e.errno or errno.EIO))

    def _handle(self, req: IoreqRequest) -> int | None | Awaitable[int | None]:
        """An access :meth:`_dispatch` does not route to a window itself: a mapcache
        invalidation, a PCI configuration access, or a refused one."""
        if req.type == _INVALIDATE:
            return None  # x86 mapcache invalidation: nothing cached here
        if req.type == _PCI_CONFIG and not req.data_is_ptr and req.count == 1 and req.size in (1, 2, 4):
            # addr = SBDF << 32 | register (xen/arch/x86/hvm/ioreq.c arch_ioreq_server_get_type_addr)
            function = self._functions.get(req.addr >> 32)
            if function is None:
                self._refuse(f"configuration access of function {req.addr >> 32:#x}, which is not ours")
                return ALL_ONES if not req.is_write else None
            return function.pci_config(req.addr & 0xFFF, req.size, req.is_write, req.data, req.vcpu)
        if req.type != _COPY or req.data_is_ptr or req.count != 1 or req.size not in _SIZES:
            self._refuse(f"unsupported ioreq type={req.type} size={req.size} count={req.count} ptr={req.data_is_ptr} at {req.addr:#x}")
        elif self.through is not None:
            return self.through.serve_at(req.addr, req.size, req.is_write, req.data, req.vcpu)
        else:
            self._refuse(f"access at {req.addr:#x} outside every device window")
        return ALL_ONES if not req.is_write else None

    def serve_at(self, addr: int, size: int, is_write: bool, value: int, vcpu: int) -> int | None | Awaitable[int | None]:
        """An access another server took at ``addr`` (the kernel's, fastpath.py), served by the
        window holding it here, or refused."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            wsize, handler = self._windows[self._bases[i]]
            if addr + size <= self._bases[i] + wsize and handler is not None:
                return handler.mmio(addr - self._bases[i], size, is_write, value, vcpu)
        self._refuse(f"access at {addr:#x} outside every device window")
        return None if is_write else ALL_ONES

    def _refuse(self, reason: str) -> None:
        self.stats.refused += 1
        allowed, suppressed = self._limit.allow(reason.split(" ")[0])  # "unsupported" / "access"
        if allowed:
            self.log.warning("%s%s", reason, f" ({suppressed} similar suppressed)" if suppressed else "")

    def inject_msi(self, address: int, data: int) -> None:
        """x86: send an MSI into the guest (XEN_DMOP_inject_msi)."""
        try:
            self.dm.inject_msi(address, data)
        except XenError as e:
            self.log.error("inject_msi(%#x, %#x): %s", address, data, e)

    def set_pci_intx(self, device: int, level: bool) -> None:
        """x86: drive INTA# of bus 0's ``device`` (XEN_DMOP_set_pci_intx_level)."""
        try:
            self.dm.set_pci_intx_level(0, device, 0, int(level))
        except XenError as e:
            self.log.error("set_pci_intx_level(00:%02x, %d): %s", device, level, e)

    def set_irq(self, irq: int, level: bool) -> None:
        """Raise the guest's interrupt line (XEN_DMOP_set_irq_level, 1); a retired window's is
        raised no more. Lowering it is no hypercall: Xen on Arm takes level 0 of an SPI as a falling edge and
        ignores it (xen/arch/arm/vgic.c vgic_inject_irq: "For edge triggered interrupts we always
        ignore a 'falling edge'. For level triggered interrupts we shouldn't, but do anyways";
        the new vGIC's vgic_validate_injection does so for an edge SPI), and libxl declares each
        virtio-mmio SPI edge-rising in the guest's device tree (libxl_arm.c make_virtio_mmio_node).
        Each raise is an edge the guest takes once; the transport's level (virtio_mmio.py) still
        decides when to raise: at 0 → nonzero InterruptStatus, and again after an ACK that leaves
        bits set."""
        if not level:
            return
        if self._retired and any(r[0] == irq for r in self._retired.values()):
            return
        try:
            self.dm.set_irq_level(irq, 1)
        except XenError as e:
            self.log.error("set_irq_level(%d, 1): %s", irq, e)
