"""The kernel fast path (Linux >= 6.7, CONFIG_XEN_PRIVCMD_EVENTFD): privcmd completes QueueNotify
ioreqs and asserts interrupt lines itself, so the daemon leaves the notification path.

* IOCTL_PRIVCMD_IOEVENTFD, per queue: for a 4-byte write at window+0x50 whose ``data & 0xffff`` is
  the queue, the kernel signals the queue's kick eventfd and completes the ioreq. Its handler
  shares the ioreq slots with user space through plain stores (Linux drivers/xen/privcmd.c
  ``ioeventfd_interrupt``: a READY COPY write is set INPROCESS while it looks, then IORESP_READY
  if it is a notify it owns, or READY back for any other access, with no new event) and runs
  after the evtchn device's handler of the same event, which has already woken us. A daemon that
  answered an InterruptACK in that slot meanwhile had its answer overwritten with READY after Xen
  took it: the vCPU's next access found its slot not NONE, and Xen answered it with a data abort
  ("device model set bad IO state 1", tests/xenlab/README.md). So the kernel gets a slot page of
  its own: a second IOREQ server (:class:`NotifyRoutes`), created after the daemon's own, whose
  ranges are only the QueueNotify registers of queues on the fast path. Xen gives an access to
  the most recently created server whose ranges hold it (xen/common/ioreq.c
  ``FOR_EACH_IOREQ_SERVER``, iterated backwards; ranges of different servers may overlap), so
  those registers go to the kernel's page while the rest of each window stays on ours, where
  no kernel handler looks. An access the kernel leaves on its page (a queue not assigned) is
  served by the device as any other, through the daemon's window.
* IOCTL_PRIVCMD_IRQFD, per queue: when the back-end signals the call eventfd, the kernel issues the
  ``XEN_DMOP_set_irq_level(irq, 1)`` we registered. The daemon no longer sees those interrupts, so
  the device model reports InterruptStatus.VRING while the fast path is on (virtio_mmio's
  ``kernel_irq``); each raise is an edge the guest takes, so nothing lowers the line after it.

A virtio-pci function (:class:`PciKickFastPath`) hands the kernel its kicks only: its notify
address looks to the kernel like a QueueNotify (``addr + 0x50``, the queue's index as data), and
its used buffers stay in user space, where MSI-X masking and vector changes are honoured.

Only zero-copy data paths can use it: the shadow path must see every kick and call to copy.
Availability is decided once per guest (ENOTTY: kernel < 6.7, EOPNOTSUPP: not configured) and
logged. Every assignment is undone explicitly: Linux keeps them past the privcmd fd's close.
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import XenError
from .log import DeviceLogger
from .virtio_mmio import Reg
from .xen.abi import (
    PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
    PRIVCMD_IRQFD_FLAG_DEASSIGN,
    DmOp,
    privcmd_ioeventfd,
    privcmd_irqfd,
    xen_dm_op,
)
from .xen.privcmd import PrivCmd

if TYPE_CHECKING:
    from .ioreq_server import IoreqServer

__all__ = ["KernelFastPath", "NotifyRoutes", "PciKickFastPath", "QueueFastPath"]


class NotifyRoutes:
    """The kernel's IOREQ server and the notify registers routed to it: each ``(address, size)``
    once, for as long as one queue of it is on the fast path. The server (created after the
    daemon's own, enabled, serving what the kernel leaves to us ``through`` the daemon's windows)
    is opened by ``open_server`` when the first queue needs it: a guest whose devices all take
    the shadow path never has one."""

    def __init__(self, open_server: Callable[[], IoreqServer]) -> None:
        self._open = open_server
        self._server: IoreqServer | None = None
        self._routed: dict[tuple[int, int], int] = {}  # (address, size) -> queues behind it

    @property
    def server(self) -> IoreqServer:
        """The kernel's server, opened now if it is not yet (XenError if it cannot be)."""
        if self._server is None:
            self._server = self._open()
        return self._server

    def route(self, addr: int, size: int) -> None:
        n = self._routed.get((addr, size), 0)
        if n == 0:
            self.server.add_window(addr, size, None)  # what the kernel leaves there: the daemon's window
        self._routed[(addr, size)] = n + 1

    def unroute(self, addr: int, size: int) -> None:
        """(Before the kernel lets go of the queue: from here on its notifies reach the daemon's
        server, whose slots the kernel does not look at.)"""
        n = self._routed.pop((addr, size), 0)
        if n > 1:
            self._routed[(addr, size)] = n - 1
        elif n == 1:
            self.server.remove_window(addr)


class KernelFastPath:
    """The guest-wide part: the kernel's IOREQ server, its page and its vCPUs' local ports."""

    def __init__(self, privcmd: PrivCmd, domid: int, routes: NotifyRoutes, log: DeviceLogger) -> None:
        self.privcmd = privcmd
        self.domid = domid
        self.routes = routes
        self.log = log
        # The kernel reads ports[vcpus] from our memory at assign time: kept alive here.
        self._ports: array.array[int] | None = None

    def for_device(self, base: int, irq: int) -> QueueFastPath:
        return QueueFastPath(self, base, irq)

    def for_function(self) -> PciKickFastPath:
        return PciKickFastPath(self)

    def _ioeventfd(self, base: int, index: int, kick_fd: int, flags: int, addr_len: int = 4) -> None:
        server = self.routes.server
        page = server.page
        assert page is not None
        if self._ports is None:
            self._ports = array.array("I", server.ports)
        ports = self._ports

        def arg(flags: int) -> privcmd_ioeventfd:
            return privcmd_ioeventfd(
                ioreq=page.mapping.addr, ports=ports.buffer_info()[0], addr=base, addr_len=addr_len,
                event_fd=kick_fd, vcpus=len(ports), vq=index, flags=flags, dom=self.domid,
            )

        notify = (base + QueueFastPath.NOTIFY_OFFSET, addr_len, index)  # what the kernel answers from now on
        if flags & PRIVCMD_IOEVENTFD_FLAG_DEASSIGN:
            self.routes.unroute(notify[0], addr_len)
            self.privcmd.ioeventfd(arg(flags))
            page.kernel_notifies.discard(notify)
            return
        page.kernel_notifies.add(notify)  # (before: the kernel may answer at once)
        try:
            self.privcmd.ioeventfd(arg(flags))
        except XenError:  # refused (ENOTTY, EOPNOTSUPP, EEXIST...): the daemon keeps answering it
            page.kernel_notifies.discard(notify)
            raise
        try:
            self.routes.route(notify[0], addr_len)
        except XenError:  # the register stays on the daemon's server: nothing reaches the kernel's
            self.privcmd.ioeventfd(arg(PRIVCMD_IOEVENTFD_FLAG_DEASSIGN))
            page.kernel_notifies.discard(notify)
            raise

    def _irqfd(self, irq: int, call_fd: int, flags: int) -> None:
        op = xen_dm_op(op=DmOp.set_irq_level)
        op.u.set_irq_level.irq, op.u.set_irq_level.level = irq, 1
        arg = privcmd_irqfd(dm_op=ctypes.addressof(op), size=ctypes.sizeof(op), fd=call_fd, flags=flags, dom=self.domid)
        self.privcmd.irqfd(arg)


class QueueFastPath:
    """One device's queues on the fast path (window ``base``, interrupt line ``irq``)."""

    NOTIFY_OFFSET = int(Reg.QUEUE_NOTIFY)  # the kernel matches base + 0x50 itself
    takes_calls = True  # the kernel raises the interrupt too (irqfd)

    def __init__(self, guest: KernelFastPath, base: int, irq: int) -> None:
        self.guest, self.base, self.irq = guest, base, irq
        self.assigned: dict[int, tuple[int, int]] = {}  # queue -> (kick fd, call fd)

    def assign(self, index: int, kick_fd: int, call_fd: int) -> None:
        both = False
        self.guest._irqfd(self.irq, call_fd, 0)
        try:
            self.guest._ioeventfd(self.base, index, kick_fd, 0)  # (last: it routes the notifies)
            both = True
        finally:
            if not both:  # all or nothing: undo the irqfd
                self.guest._irqfd(self.irq, call_fd, PRIVCMD_IRQFD_FLAG_DEASSIGN)
        self.assigned[index] = (kick_fd, call_fd)

    def deassign(self, index: int) -> None:
        fds = self.assigned.pop(index, None)
        if fds is None:
            return
        kick_fd, call_fd = fds
        self.guest._ioeventfd(self.base, index, kick_fd, PRIVCMD_IOEVENTFD_FLAG_DEASSIGN)
        self.guest._irqfd(self.irq, call_fd, PRIVCMD_IRQFD_FLAG_DEASSIGN)


class PciKickFastPath:
    """A virtio-pci function's kicks on the fast path: per queue an ioeventfd whose ``addr + 0x50``
    is the queue's notify address, matching the 2-byte write of its index (Linux ``vp_notify``:
    ``iowrite16``). ``notify_address(index)`` says where that is now (None while the BAR does not
    decode); the device re-assigns when the guest moves the BAR."""

    NOTIFY_SIZE = 2
    takes_calls = False  # used buffers stay in user space: MSI-X vectors are masked and moved at will

    def __init__(self, guest: KernelFastPath) -> None:
        self.guest = guest
        self.notify_address: Callable[[int], int | None] = lambda _index: None
        self.assigned: dict[int, tuple[int, int]] = {}  # queue -> (kick fd, ioeventfd addr)

    def assign(self, index: int, kick_fd: int, call_fd: int) -> None:
        """Kick of queue ``index`` to the kernel, if the function's notify region decodes."""
        address = self.notify_address(index)
        if address is None or address < QueueFastPath.NOTIFY_OFFSET:
            return
        base = address - QueueFastPath.NOTIFY_OFFSET
        self.guest._ioeventfd(base, index, kick_fd, 0, self.NOTIFY_SIZE)
        self.assigned[index] = (kick_fd, base)

    def deassign(self, index: int) -> None:
        got = self.assigned.pop(index, None)
        if got is None:
            return
        kick_fd, base = got
        self.guest._ioeventfd(base, index, kick_fd, PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, self.NOTIFY_SIZE)

