"""SimKernel: the Linux Xen drivers' part, played against the simulated Xen host.

It implements :class:`~xen_vhost_master.xen.kernel.Kernel` and receives exactly what the real
drivers receive: the ioctl number and a user pointer to the argument. Like the drivers it reads and
writes the caller's memory by address (copy_from_user / copy_to_user: EFAULT, never a crash, for a
bad pointer; an argument passed as a ctypes object is read as it is, since it cannot fault), validates what ``privcmd.c`` / ``evtchn.c`` / ``gntdev.c`` validate, and forwards the
hypervisor-level part to the simulated host over the node's own connection.

Every fd it returns is real:
* privcmd, gntdev: a Unix socket connected to the simulated host (so a privcmd fd passed to another
  process over SCM_RIGHTS is still meaningful there: that process's SimKernel adopts it);
* evtchn: an epoll fd whose reads return pending local ports as u32 and whose writes unmask them,
  exactly as /dev/xen/evtchn (``asyncio`` ``add_reader`` works on it). It polls the host's "ring"
  socket (events the host delivers, unmasks and posted notifies it reads) and, for each port bound
  to a vCPU's IOREQ port, the port's *deliver* eventfd (sim.vcpu_channel, edge-triggered): such a
  port's mask lives here (the counter is the pending bit; an edge seen while masked is held and
  raised again by the unmask) and IOCTL_EVTCHN_NOTIFY
  on it writes the vCPU's *wake* eventfd, so the IOREQ hot path never goes through the host. The
  ioctl channel is a second, internal connection;
* xenbus: a client connection of the simulated xenstored (xs_wire on read/write).

Memory: ``mmap`` on privcmd reserves an inaccessible range (the empty privcmd VMA); MMAPBATCH_V2
and MMAP_RESOURCE fill it with ``MAP_FIXED`` mappings of memfds the host sends over SCM_RIGHTS. The
memfds are closed at once and never reach the caller; pages that failed stay inaccessible.
"""

from __future__ import annotations

import array
import ctypes
import errno
import functools
import logging
import mmap
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xen_vhost_sim import rpc, vcpu_channel
from xen_vhost_master.xen.abi import (
    XEN_PAGE_SHIFT,
    XEN_PAGE_SIZE,
    DmOp,
    EvtchnIoctl,
    GntdevIoctl,
    Hypercall,
    PrivcmdIoctl,
    XenMem,
    ioc_size,
    privcmd_dm_op,
    privcmd_hypercall,
    privcmd_ioeventfd,
    privcmd_irqfd,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
    xen_domctl,
)
from xen_vhost_master.xen.kernel import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    IoctlArg,
    Mapping,
    address_of,
    copy_from_user,
    copy_to_user,
    libc_mmap,
    libc_munmap,
)

__all__ = ["SimKernel", "gfn_runs"]

log = logging.getLogger(__name__)

RPC_TIMEOUT = 30.0  # a simulated host that does not answer an ioctl in this time is hung: EIO
DM_OP_MAX_NR_BUFS = 16  # privcmd module parameter dm_op_max_nr_bufs
DM_OP_BUF_MAX_SIZE = 4096  # privcmd module parameter dm_op_buf_max_size
IRQFD_DM_OP_MAX = 1 << 22  # kzalloc(sizeof(kirqfd) + size) fails with ENOMEM beyond this
IOEVENTFD_MAX_VCPUS = 4096
_NODES = {
    "/dev/xen/privcmd": "privcmd",
    "/dev/xen/evtchn": "evtchn",
    "/dev/xen/gntdev": "gntdev",
    "/dev/xen/xenbus": "xenbus",
    "/proc/xen/privcmd": "privcmd",
    "/proc/xen/xenbus": "xenbus",
    "/proc/xen/capabilities": "capabilities",
}


_NOTIFY = int(EvtchnIoctl.NOTIFY)
#: MMAPBATCH_V2 entries read or written at a time (64 KiB of u64 GFNs): no temporary of the ioctl
#: grows with the guest (a large one's pages would stay in the calling process's heap: mallopt(3),
#: M_MMAP_THRESHOLD).
FRAME_STEP = 8192
_ZERO_ERRS = bytes(4 * FRAME_STEP)
_ONES = b"\x01" * FRAME_STEP
_PORT = struct.Struct("=I")  # a port as evtchn reads and writes them: a native u32 (as array "I")
_Own = ctypes.Structure | ctypes.Array | None  # type: ignore[type-arg]  # an ioctl argument passed as a ctypes object


def _arg_bytes(own: _Own, addr: int, length: int) -> bytes:
    """copy_from_user of ``length`` bytes of an ioctl argument at ``addr``. One passed as a ctypes
    object (``own``) is this process's own memory, mapped and at least its size long: its bytes
    are the bytes at ``addr`` and cannot fault. Otherwise (a bare address) they are read with
    the fault check (EFAULT); so are the addresses inside any argument."""
    if own is not None and length <= ctypes.sizeof(own):
        return bytes(own)[:length]
    return copy_from_user(addr, length)
_U32 = struct.Struct("<I")


_BUF = struct.Struct("<QQ")  # struct privcmd_dm_op_buf {uptr; size}
_DM_OP = int(PrivcmdIoctl.DM_OP)
_DM_OP_IRQ = struct.Struct("<IIIB3s")  # struct xen_dm_op {op; pad; u.set_irq_level {irq; level; pad[3]}}
_SET_IRQ_LEVEL = int(DmOp.set_irq_level)
_ROUTE_MASKED, _ROUTE_WAITING = vcpu_channel.ROUTE_MASKED, vcpu_channel.ROUTE_WAITING


def _irq_level_op(blob: bytes) -> tuple[int, int] | None:
    """(irq, level) of a well-formed XEN_DMOP_set_irq_level buffer, else None."""
    if len(blob) < _DM_OP_IRQ.size:
        return None
    op, pad, irq, level, pad3 = _DM_OP_IRQ.unpack_from(blob)
    if op != _SET_IRQ_LEVEL or pad or pad3 != b"\0\0\0":
        return None
    return irq, level


def _err(code: int, why: str = "") -> OSError:
    return OSError(code, why or os.strerror(code))


def gfn_runs(gfns: memoryview, start: int = 0, out: array.array[int] | None = None) -> array.array[int]:
    """Split a u64 GFN array into maximal runs of consecutive GFNs: (page_index, gfn, count) triples,
    appended to ``out`` (a new array by default); ``start`` is the page index of ``gfns[0]``, and a
    run that continues ``out``'s last one is merged with it.

    Vectorised: a range is accepted whole when its bytes equal ``array('Q', range(first, first+n))``
    (one C-level comparison); otherwise it is halved. MMAPBATCH_V2 passes :data:`FRAME_STEP` GFNs
    at a time, so the comparison's temporaries stay small.
    """
    if out is None:
        out = array.array("Q")
    n = len(gfns)
    stack = [(0, n)] if n else []
    while stack:
        lo, hi = stack.pop()
        first = gfns[lo]
        cnt = hi - lo
        if cnt == 1 or (
            gfns[hi - 1] == first + cnt - 1
            and first + cnt <= 1 << 64
            and gfns[lo:hi].tobytes() == array.array("Q", range(first, first + cnt)).tobytes()
        ):
            page = start + lo
            if out and out[-3] + out[-1] == page and out[-2] + out[-1] == first:
                out[-1] += cnt  # merge with the previous run
            else:
                out.extend((page, first, cnt))
        else:
            mid = (lo + hi) // 2
            stack.append((mid, hi))
            stack.append((lo, mid))
    return out


@dataclass
class _Vma:
    addr: int
    length: int
    prot: int
    mapped: bytearray
    filled: bool = False  # the first MMAPBATCH/MMAP_RESOURCE has run
    # what backs each page mapped by MMAP_RESOURCE: page index -> (dom, type, id, frame)
    resources: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)

    def page0(self) -> dict[str, Any] | None:
        """What privcmd's ``vm_private_data`` pages[0] holds (IOEVENTFD takes that page)."""
        res = self.resources.get(0)
        if res is not None:
            dom, rtype, rid, frame = res
            if rtype == 0 and frame == 1:  # XENMEM_resource_ioreq_server, frame ioreq(0)
                return {"kind": "ioreq", "dom": dom, "id": rid}
            return {"kind": "resource", "dom": dom, "type": rtype, "id": rid, "frame": frame}
        return {"kind": "foreign" if self.mapped[:1] == b"\x01" else "empty"}

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


class _IrqRoute:
    """A domain's interrupt lines as the host handed them to this privcmd fd (sim.vcpu_channel)."""

    __slots__ = ("host_efd", "page", "guest_efd")

    def __init__(self, fds: list[int]) -> None:
        try:
            self.page = mmap.mmap(fds[0], vcpu_channel.PAGE)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(fds[0])
        self.guest_efd, self.host_efd = fds[1], fds[2]

    def close(self) -> None:
        self.page.close()
        os.close(self.guest_efd)
        os.close(self.host_efd)


@dataclass
class _Node:
    kind: str
    sock: socket.socket  # RPC channel to the simulated host
    ring: int = -1  # evtchn: the fd given to the caller
    vmas: dict[int, _Vma] = field(default_factory=dict)
    gmaps: dict[int, int] = field(default_factory=dict)  # gntdev index -> count
    adopted: bool = False  # received from another process: ``sock`` is our dup of the fd
    ports: set[int] = field(default_factory=set)  # evtchn: ports bound through this node
    broken: bool = False
    # evtchn: the poll set, and the eventfd route of ports bound to vCPU IOREQ ports
    ep: select.epoll | None = None
    fast: dict[int, tuple[int, int]] = field(default_factory=dict)  # port -> (deliver, wake)
    rpages: dict[int, mmap.mmap] = field(default_factory=dict)  # port -> its route page (mask shown)
    by_fd: dict[int, int] = field(default_factory=dict)  # deliver fd -> port
    masked: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)  # masked ports whose event came meanwhile
    blocking: bool = False
    # privcmd: per domain, the interrupt-line route (sim.vcpu_channel)
    irq: dict[int, _IrqRoute] = field(default_factory=dict)

    def drop_irq_routes(self) -> None:
        for route in self.irq.values():
            route.close()
        self.irq.clear()

    def call(
        self, obj: dict[str, Any], blob: bytes = b"", fds: list[int] | None = None
    ) -> tuple[dict[str, Any], bytes, list[int]]:
        if self.broken:
            raise _err(errno.EIO, "connection to the simulated host is broken")
        if fds:
            obj = {**obj, "nfds": len(fds)}
        try:
            rpc.send_blocking(self.sock, obj, blob, fds)
            reply, rblob, fds = rpc.recv_blocking(self.sock)
        except (OSError, rpc.RpcError) as exc:
            self.broken = True  # a late or partial reply would desynchronise the stream
            raise _err(errno.EIO, f"simulated host: {exc}") from None
        code = int(reply.get("errno", errno.EIO))
        if code:
            for fd in fds:
                os.close(fd)
            raise _err(code, reply.get("why", ""))
        return reply, rblob, fds


class SimKernel:
    """A :class:`~xen_vhost_master.xen.kernel.Kernel` for the simulated Xen host at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._nodes: dict[int, _Node] = {}

    # ------------------------------------------------------------------ fds
    def _connect(self, node: str) -> tuple[socket.socket, list[int]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(RPC_TIMEOUT)
        try:
            sock.connect(self.path)
            rpc.send_blocking(sock, {"op": "open", "node": node})
            reply, _blob, fds = rpc.recv_blocking(sock)
        except rpc.RpcError as exc:
            sock.close()
            raise _err(errno.EIO, str(exc)) from None
        except OSError:
            sock.close()
            raise
        code = int(reply.get("errno", errno.EIO))
        if code:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise _err(code)
        return sock, fds

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        kind = _NODES.get(path)
        if kind is None:
            raise _err(errno.ENOENT, f"{path}: no such simulated device")
        try:
            sock, fds = self._connect(kind)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _err(errno.ENOENT, f"simulated Xen host not reachable at {self.path}: {exc}") from None
        if kind in ("xenbus", "capabilities"):
            sock.close()
            fd = fds[0]
            os.set_blocking(fd, not flags & os.O_NONBLOCK)
            return fd
        if kind == "evtchn":
            ring = fds[0]
            os.set_blocking(ring, False)
            try:
                ep = select.epoll()
            except OSError:
                os.close(ring)
                sock.close()
                raise
            ep.register(ring, select.EPOLLIN)
            fd = ep.fileno()
            os.set_blocking(fd, not flags & os.O_NONBLOCK)
            self._nodes[fd] = _Node(kind, sock, ring=ring, ep=ep, blocking=not flags & os.O_NONBLOCK)
            return fd
        fd = sock.fileno()
        self._nodes[fd] = _Node(kind, sock)
        return fd

    def _node(self, fd: int) -> _Node:
        node = self._nodes.get(fd)
        if node is None:
            node = self._adopt(fd)
        return node

    def _adopt(self, fd: int) -> _Node:
        """A privcmd/gntdev fd received from another process: ask the host what it is."""
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            raise _err(errno.EBADF) from None
        sock.settimeout(RPC_TIMEOUT)
        try:
            if sock.family != socket.AF_UNIX or sock.getpeername() != self.path:
                raise _err(errno.ENOTTY, "not a simulated Xen device fd")
            rpc.send_blocking(sock, {"op": "whoami"})
            reply, _b, _f = rpc.recv_blocking(sock)
        except rpc.RpcError as exc:
            sock.close()
            raise _err(errno.EIO, str(exc)) from None
        except OSError:
            sock.close()
            raise
        if reply.get("errno") or reply.get("node") not in ("privcmd", "gntdev"):
            sock.close()
            raise _err(errno.ENOTTY)
        node = _Node(str(reply["node"]), sock, adopted=True)
        self._nodes[fd] = node
        return node

    def close(self, fd: int) -> None:
        node = self._nodes.pop(fd, None)
        if node is None:
            os.close(fd)
            return
        if node.kind == "evtchn":
            os.close(node.ring)
            for port in list(node.fast):
                self._drop_fast(node, port)
            assert node.ep is not None
            node.ep.close()
        node.drop_irq_routes()
        node.sock.close()
        if node.adopted:
            os.close(fd)

    def read(self, fd: int, length: int) -> bytes:
        node = self._nodes.get(fd)
        if node is None or node.kind != "evtchn":
            return os.read(fd, length)
        return self._evtchn_read(node, length)

    def write(self, fd: int, data: bytes) -> int:
        node = self._nodes.get(fd)
        if node is None or node.kind != "evtchn" or not node.fast:
            return os.write(node.ring if node is not None and node.kind == "evtchn" else fd, data)
        if len(data) == 4:  # the usual unmask: one port, of a vCPU's route
            (port,) = _PORT.unpack(data)
            route = node.fast.get(port)
            if route is not None:
                if port in node.masked:  # (_unmask_fast, inline: once per IOREQ)
                    node.masked.discard(port)
                    page = node.rpages[port]
                    page[_ROUTE_MASKED] = 0
                    if page[_ROUTE_WAITING]:
                        os.eventfd_write(route[1], 1)
                    if port in node.held:
                        node.held.discard(port)
                        os.eventfd_write(route[0], 1)
                return 4
        ports = array.array("I")
        ports.frombytes(data[: len(data) - len(data) % 4])
        rest = array.array("I")
        assert node.ep is not None
        for port in ports:
            route = node.fast.get(port)
            if route is None:
                rest.append(port)
            elif port in node.masked:
                self._unmask_fast(node, port, route)
        if rest:
            os.write(node.ring, rest.tobytes())
        return len(data)

    def _evtchn_read(self, node: _Node, length: int) -> bytes:
        """evtchn_read: the pending ports (at most ``length`` // 4), each left masked."""
        assert node.ep is not None
        limit = length // 4
        if limit <= 0:
            raise _err(errno.EINVAL)
        while True:
            events = node.ep.poll(0, limit + 1)  # (edge-triggered: what it returns is consumed)
            if len(events) == 1 and (port := node.by_fd.get(events[0][0])) is not None and port not in node.masked:
                try:  # the usual read: one vCPU's event
                    os.eventfd_read(events[0][0])
                except BlockingIOError:
                    pass  # (nothing there after all: as below)
                else:
                    node.masked.add(port)
                    node.rpages[port][_ROUTE_MASKED] = 1
                    return _PORT.pack(port)
            out = array.array("I")
            for fd, _ev in events:
                if fd == node.ring:
                    if len(out) >= limit:
                        continue  # level-triggered: still readable for the next read
                    try:
                        data = os.read(node.ring, 4 * (limit - len(out)))
                    except BlockingIOError:
                        continue
                    if not data:
                        return b""  # the simulated host died (a real evtchn never ends)
                    out.frombytes(data[: len(data) - len(data) % 4])
                    continue
                port = node.by_fd.get(fd)
                if port is None:
                    continue
                if port in node.masked:
                    node.held.add(port)  # this edge is consumed: the unmask raises it again
                    continue
                if len(out) >= limit:
                    os.eventfd_write(fd, 1)  # no room in this read: a new edge for the next one
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                node.masked.add(port)
                node.rpages[port][vcpu_channel.ROUTE_MASKED] = 1
                out.append(port)
            if out:
                return out.tobytes()
            if not node.blocking:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            node.ep.poll(-1, 1)

    @staticmethod
    def _unmask_fast(node: _Node, port: int, route: tuple[int, int]) -> None:
        """Unmask a routed port: a held edge is raised again, and a vCPU that waits to play the
        dom0 kernel's handler on it (sim.vcpu_channel route page) is woken."""
        node.masked.discard(port)
        page = node.rpages[port]
        page[vcpu_channel.ROUTE_MASKED] = 0
        if page[vcpu_channel.ROUTE_WAITING]:
            os.eventfd_write(route[1], 1)
        if port in node.held:  # pending while masked: a new edge delivers it
            node.held.discard(port)
            os.eventfd_write(route[0], 1)

    def _add_fast(self, node: _Node, port: int, deliver: int, wake: int, page_fd: int) -> None:
        assert node.ep is not None
        try:
            node.rpages[port] = mmap.mmap(page_fd, vcpu_channel.ROUTE_PAGE)
        finally:
            os.close(page_fd)
        node.fast[port] = (deliver, wake)
        node.by_fd[deliver] = port
        node.ep.register(deliver, select.EPOLLIN | select.EPOLLET)

    def _drop_fast(self, node: _Node, port: int) -> None:
        route = node.fast.pop(port, None)
        if route is None:
            return
        assert node.ep is not None
        node.by_fd.pop(route[0], None)
        node.masked.discard(port)
        node.held.discard(port)
        node.ep.unregister(route[0])
        os.close(route[0])
        os.close(route[1])
        page = node.rpages.pop(port, None)
        if page is not None:
            page.close()

    # ------------------------------------------------------------------ mmap
    def mmap(
        self, fd: int, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED, offset: int = 0
    ) -> Mapping:
        try:
            node = self._node(fd)
        except OSError:
            raise _err(errno.ENODEV) from None
        if node.kind not in ("privcmd", "gntdev"):
            raise _err(errno.ENODEV)
        if length <= 0 or length % XEN_PAGE_SIZE or not flags & MAP_SHARED:
            raise _err(errno.EINVAL)
        if node.kind == "privcmd":
            if offset:
                raise _err(errno.EINVAL)
            addr = libc_mmap(0, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            node.vmas[addr] = _Vma(addr, length, prot, bytearray(length >> XEN_PAGE_SHIFT))
            return Mapping(self, fd, addr, length, prot, 0)
        count = length >> XEN_PAGE_SHIFT
        if node.gmaps.get(offset) != count:
            raise _err(errno.EINVAL, "no grant map at this offset with this size")
        reply, _b, fds = node.call({"op": "mmap", "index": offset, "count": count, "writable": bool(prot & PROT_WRITE)})
        addr = libc_mmap(0, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        try:
            for i, (which, page) in enumerate(reply["pages"]):
                libc_mmap(addr + (i << XEN_PAGE_SHIFT), XEN_PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fds[which], page << XEN_PAGE_SHIFT)
        finally:
            for f in fds:
                os.close(f)
        return Mapping(self, fd, addr, length, prot, offset)

    def munmap(self, mapping: Mapping) -> None:
        libc_munmap(mapping.addr, mapping.length)
        mapping.closed = True
        node = self._nodes.get(mapping.fd)
        if node is not None:
            node.vmas.pop(mapping.addr, None)

    # ------------------------------------------------------------------ ioctl
    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> int:
        node = self._nodes.get(fd) or self._node(fd)
        if request == _NOTIFY and node.fast:
            # the hot path first (no frame of _evtchn, no enum lookup): NOTIFY of a port with the
            # eventfd route, its argument read in place (a bare address as _arg_bytes reads it)
            (port,) = _U32.unpack_from(arg) if isinstance(arg, (ctypes.Structure, ctypes.Array)) \
                and ctypes.sizeof(arg) >= 4 else _U32.unpack(copy_from_user(address_of(arg), 4))
            route = node.fast.get(port)
            if route is not None and port in node.ports:
                os.eventfd_write(route[1], 1)  # the vCPU's port fires (sim.vcpu_channel)
                return 0
        own: _Own = None
        if isinstance(arg, (ctypes.Structure, ctypes.Array)):
            own, addr = arg, ctypes.addressof(arg)
        else:
            addr = address_of(arg)
        if node.kind == "privcmd":
            if request == _DM_OP:  # (the hot path's interrupt line changes: before the other ioctls)
                return self._dm_op(node, own if type(own) is privcmd_dm_op else self._struct(privcmd_dm_op, addr, own))
            return self._privcmd(node, request, addr, own)
        if node.kind == "evtchn":
            return self._evtchn(node, request, addr, own)
        if node.kind == "gntdev":
            return self._gntdev(node, request, addr)
        raise _err(errno.ENOTTY)

    def prepare_ioctl(self, fd: int, request: int, arg: IoctlArg) -> Callable[[], int]:
        return functools.partial(self.ioctl, fd, request, arg)

    def _struct(self, cls: type[ctypes.Structure], addr: int, own: _Own = None) -> Any:
        return cls.from_buffer_copy(_arg_bytes(own, addr, ctypes.sizeof(cls)))

    # privcmd.c ----------------------------------------------------------
    def _privcmd(self, node: _Node, request: int, addr: int, own: _Own = None) -> int:
        if request == PrivcmdIoctl.HYPERCALL:
            h = self._struct(privcmd_hypercall, addr)
            obj: dict[str, Any] = {"op": "hypercall", "nr": h.op, "cmd": h.arg[0]}
            if h.op == Hypercall.memory_op and h.arg[0] in (
                XenMem.maximum_gpfn, XenMem.current_reservation, XenMem.maximum_reservation
            ):
                obj["domid"] = struct.unpack("<H", copy_from_user(h.arg[1], 2))[0]
            elif h.op == Hypercall.domctl:
                # arg[0] is the struct xen_domctl itself: Xen copies it in whole (copy_from_guest)
                d = self._struct(xen_domctl, h.arg[0])
                obj["domctl"] = {"cmd": int(d.cmd), "interface_version": int(d.interface_version),
                                 "domain": int(d.domain)}
            return int(node.call(obj)[0]["ret"])
        if request == PrivcmdIoctl.MMAPBATCH_V2:
            return self._mmapbatch_v2(node, self._struct(privcmd_mmapbatch_v2, addr))
        if request == PrivcmdIoctl.RESTRICT:
            dom = struct.unpack("<H", copy_from_user(addr, 2))[0]
            node.call({"op": "restrict", "dom": dom})
            node.drop_irq_routes()  # fetched under the old restriction
            return 0
        if request == PrivcmdIoctl.MMAP_RESOURCE:
            return self._mmap_resource(node, addr)
        if request in (PrivcmdIoctl.IRQFD, PrivcmdIoctl.IOEVENTFD):
            # Which kernel this is (6.1: ENOTTY, no CONFIG_XEN_PRIVCMD_EVENTFD: EOPNOTSUPP) is the
            # host's setting; both answers come before the argument is read.
            node.call({"op": "eventfd_probe"})
            if request == PrivcmdIoctl.IRQFD:
                return self._irqfd(node, addr)
            return self._ioeventfd(node, addr)
        raise _err(errno.ENOTTY)

    @staticmethod
    def _eventfd_arg(fd: int) -> tuple[list[int], int]:
        """fdget + eventfd_ctx_fileget: ([fd] to pass to the host, 0) or ([], EBADF / EINVAL)."""
        if fd > 0x7FFFFFFF:
            return [], errno.EBADF
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return [], errno.EBADF
        if target != "anon_inode:[eventfd]":
            return [], errno.EINVAL
        return [fd], 0

    def _irqfd(self, node: _Node, addr: int) -> int:
        k = self._struct(privcmd_irqfd, addr)
        obj: dict[str, Any] = {"op": "irqfd", "flags": int(k.flags), "dom": int(k.dom), "size": int(k.size)}
        dm_op = b""
        if not k.flags & 1 and not k.flags & ~1:
            if k.size > IRQFD_DM_OP_MAX:
                obj["dm_op_errno"] = errno.ENOMEM
            else:
                try:
                    dm_op = copy_from_user(k.dm_op, int(k.size)) if k.size else b""
                except OSError:
                    obj["dm_op_errno"] = errno.EFAULT
        fds, obj["fd_errno"] = self._eventfd_arg(int(k.fd))
        node.call(obj, dm_op, fds)  # the host takes its own reference of the eventfd
        return 0

    def _ioeventfd(self, node: _Node, addr: int) -> int:
        k = self._struct(privcmd_ioeventfd, addr)
        obj: dict[str, Any] = {
            "op": "ioeventfd", "ioreq": int(k.ioreq), "addr": int(k.addr), "addr_len": int(k.addr_len),
            "vcpus": int(k.vcpus), "vq": int(k.vq), "flags": int(k.flags), "dom": int(k.dom),
        }
        fds, obj["fd_errno"] = self._eventfd_arg(int(k.event_fd))
        if not k.flags & 1:
            # alloc_ioreq: the VMA holding ``ioreq`` (this process's mm), its pages[0], then ports[]
            vma = next((v for n in self._nodes.values() if n.kind == "privcmd"
                        for v in n.vmas.values() if v.addr <= k.ioreq < v.addr + v.length), None)
            obj["page0"] = vma.page0() if vma is not None and vma.filled else None
            if 1 <= k.vcpus <= IOEVENTFD_MAX_VCPUS:
                try:
                    obj["ports"] = list(memoryview(copy_from_user(k.ports, 4 * int(k.vcpus))).cast("I"))
                except OSError:
                    obj["ports_errno"] = errno.EFAULT
        node.call(obj, b"", fds)
        return 0

    def _find_vma(self, node: _Node, addr: int) -> _Vma | None:
        for vma in node.vmas.values():
            if vma.addr <= addr < vma.addr + vma.length:
                return vma
        return None

    def _mmapbatch_v2(self, node: _Node, m: privcmd_mmapbatch_v2) -> int:
        num = int(m.num)
        if num <= 0 or num > (1 << 31):
            raise _err(errno.EINVAL)
        length = num << XEN_PAGE_SHIFT
        vma = self._find_vma(node, m.addr)
        if vma is None:
            raise _err(errno.EINVAL, "addr is not in a privcmd mapping")
        first_page = (m.addr - vma.addr) >> XEN_PAGE_SHIFT
        if not vma.filled:
            if m.addr != vma.addr or length != vma.length:
                raise _err(errno.EINVAL, "first MMAPBATCH must cover the privcmd VMA exactly")
        elif not vma.contains(m.addr, length) or vma.mapped.find(1, first_page, first_page + num) != -1:
            raise _err(errno.EINVAL, "range already mapped")
        # (after the VMA checks, which bound num by a mapping the caller really made; the arrays
        # FRAME_STEP entries at a time)
        for lo in range(0, num, FRAME_STEP):  # the kernel clears err[] first (EFAULT if bad)
            copy_to_user(m.err + 4 * lo, _ZERO_ERRS[: 4 * min(FRAME_STEP, num - lo)])
        gfns = array.array("Q")
        for lo in range(0, num, FRAME_STEP):
            gfn_runs(memoryview(copy_from_user(m.arr + 8 * lo, 8 * min(FRAME_STEP, num - lo))).cast("Q"), lo, gfns)
        _reply, rblob, fds = node.call({"op": "map_foreign", "dom": int(m.dom)}, gfns.tobytes())
        vma.filled = True
        enoent = False
        runs = array.array("q")
        runs.frombytes(rblob[: len(rblob) - len(rblob) % 32])
        try:
            for i in range(0, len(runs), 4):
                page, count, code, off = runs[i : i + 4]
                if code == 0:
                    libc_mmap(
                        m.addr + (page << XEN_PAGE_SHIFT), count << XEN_PAGE_SHIFT, vma.prot,
                        MAP_SHARED | MAP_FIXED, fds[0], off << XEN_PAGE_SHIFT,
                    )
                    for lo in range(first_page + page, first_page + page + count, FRAME_STEP):
                        n = min(FRAME_STEP, first_page + page + count - lo)
                        vma.mapped[lo : lo + n] = _ONES[:n]
                else:
                    step = (array.array("i", [code]) * min(FRAME_STEP, count)).tobytes()
                    for lo in range(page, page + count, FRAME_STEP):
                        copy_to_user(m.err + 4 * lo, step[: 4 * min(FRAME_STEP, page + count - lo)])
                    enoent = enoent or code == -errno.ENOENT
        finally:
            for f in fds:
                os.close(f)
        if enoent:
            raise _err(errno.ENOENT)
        return 0

    def _dm_op(self, node: _Node, k: privcmd_dm_op) -> int:
        """privcmd_ioctl_dm_op: the buffer array, then each buffer, read from the caller (EFAULT
        if unmapped); an interrupt line change is carried out here (sim.vcpu_channel), the rest
        by the host. ``k`` is the argument as the caller's own ctypes object or a copy of it."""
        num = k.num
        if num == 0:
            return 0
        if num > DM_OP_MAX_NR_BUFS:
            raise _err(errno.E2BIG)
        dom = k.dom
        if num == 1:  # (the usual dm_op, and every set_irq_level: one buffer)
            p, size = _BUF.unpack(copy_from_user(k.ubufs, 16))
            if size > DM_OP_BUF_MAX_SIZE:
                raise _err(errno.E2BIG)
            bufs = [(p, size)]
            blob = copy_from_user(p, size)
            irq = _irq_level_op(blob)
            if irq is not None and self._set_irq_level(node, dom, *irq):
                return 0
        else:
            raw = copy_from_user(k.ubufs, 16 * num)
            bufs = [_BUF.unpack_from(raw, 16 * i) for i in range(num)]
            if any(size > DM_OP_BUF_MAX_SIZE for _p, size in bufs):
                raise _err(errno.E2BIG)
            blob = b"".join(copy_from_user(p, size) for p, size in bufs)
            irq = None
        reply, out, _f = node.call({"op": "dm_op", "dom": dom, "sizes": [s for _p, s in bufs]}, blob)
        pos = 0
        for p, size in bufs:
            copy_to_user(p, out[pos : pos + size])
            pos += size
        if irq is not None and dom not in node.irq:
            # the host carried it out, so this fd may: from now on the line is written here
            try:
                _r, _b, fds = node.call({"op": "irq_route", "dom": dom})
                node.irq[dom] = _IrqRoute(fds)
            except OSError as exc:
                log.debug("no interrupt-line route for d%d: %s", dom, exc)
        return int(reply.get("ret", 0))

    @staticmethod
    def _set_irq_level(node: _Node, dom: int, irq: int, level: int) -> bool:
        """XEN_DMOP_set_irq_level without the host (sim.vcpu_channel); False: take the host's path
        (no route, a dying domain, or arguments the hypervisor refuses, for its error)."""
        route = node.irq.get(dom)
        if route is None:
            return False
        off = vcpu_channel.irq_offset(irq)
        if off is None or level > 1:
            return False
        if vcpu_channel.flags_of(route.page) & vcpu_channel.FLAG_DYING:
            del node.irq[dom]
            route.close()
            return False
        if level:  # (0: a falling edge, which Xen on Arm ignores: Hypervisor.set_irq_level)
            route.page[off] = 1  # pending first (the guest takes it once woken) ...
            os.eventfd_write(route.guest_efd, 1)  # ... then the events (vgic_inject_irq)
            os.eventfd_write(route.host_efd, 1)
        return True

    def _mmap_resource(self, node: _Node, addr: int) -> int:
        r = self._struct(privcmd_mmap_resource, addr)
        req = {"op": "map_resource", "dom": r.dom, "type": r.type, "id": r.id, "idx": r.idx, "num": r.num}
        if r.addr == 0 and r.num == 0:
            reply, _b, _f = node.call({**req, "query": True})
            r.num = int(reply["num"])
            copy_to_user(addr, bytes(r))
            return 0
        if r.addr == 0 or r.num == 0:
            raise _err(errno.EINVAL)
        length = int(r.num) << XEN_PAGE_SHIFT
        vma = self._find_vma(node, r.addr)
        if vma is None or not vma.contains(r.addr, length):
            raise _err(errno.EINVAL, "addr is not in a privcmd mapping")
        _reply, _b, fds = node.call(req)
        try:
            libc_mmap(r.addr, length, vma.prot, MAP_SHARED | MAP_FIXED, fds[0], 0)
        finally:
            for f in fds:
                os.close(f)
        vma.filled = True
        first = (r.addr - vma.addr) >> XEN_PAGE_SHIFT
        vma.mapped[first : first + int(r.num)] = b"\x01" * int(r.num)
        for i in range(int(r.num)):
            vma.resources[first + i] = (int(r.dom), int(r.type), int(r.id), int(r.idx) + i)
        return 0

    # evtchn.c -----------------------------------------------------------
    def _evtchn(self, node: _Node, request: int, addr: int, own: _Own = None) -> int:
        try:
            which = EvtchnIoctl(request)
        except ValueError:
            raise _err(errno.ENOSYS) from None  # evtchn answers unknown ioctls with ENOSYS
        raw = _arg_bytes(own, addr, ioc_size(request))
        if which is EvtchnIoctl.RESET:
            self._drain(node.ring)
            assert node.ep is not None
            for port, (deliver, wake) in node.fast.items():
                self._drain(deliver)
                node.held.discard(port)
                if port in node.masked:
                    self._unmask_fast(node, port, (deliver, wake))
            node.masked.clear()
            node.held.clear()
            return int(node.call({"op": "reset"})[0]["ret"])
        if which is EvtchnIoctl.RESTRICT_DOMID:
            return int(node.call({"op": "restrict_domid", "domid": struct.unpack("<H", raw)[0]})[0]["ret"])
        if which is EvtchnIoctl.BIND_INTERDOMAIN:
            rd, rp = struct.unpack("<II", raw)
            reply, _b, fds = node.call({"op": "bind_interdomain", "remote_domain": rd, "remote_port": rp})
            port = int(reply["ret"])
            node.ports.add(port)
            if len(fds) == 3:
                self._add_fast(node, port, fds[0], fds[1], fds[2])
            else:
                for f in fds:
                    os.close(f)
            return port
        (value,) = struct.unpack("<I", raw)
        if which is EvtchnIoctl.NOTIFY and not node.adopted:
            # EVTCHNOP_send is a hypercall that returns at once: post it on the evtchn ring (in
            # order with the unmasks written there) instead of a blocking round trip to the host.
            # ENOTCONN is decided here, from the ports this fd bound (the host checks again).
            if value not in node.ports:
                raise _err(errno.ENOTCONN, f"port {value} not bound on this fd")
            route = node.fast.get(value)
            if route is not None:
                os.eventfd_write(route[1], 1)  # the vCPU's port fires (sim.vcpu_channel)
                return 0
            try:
                os.write(node.ring, struct.pack("<I", value | rpc.RING_NOTIFY))
                return 0
            except BlockingIOError:
                pass  # ring full: the blocking request below
        name = {
            EvtchnIoctl.BIND_VIRQ: ("bind_virq", "virq"),
            EvtchnIoctl.BIND_UNBOUND_PORT: ("bind_unbound_port", "remote_domain"),
            EvtchnIoctl.UNBIND: ("unbind", "port"),
            EvtchnIoctl.NOTIFY: ("notify", "port"),
        }[which]
        ret = int(node.call({"op": name[0], name[1]: value})[0]["ret"])
        if which is EvtchnIoctl.BIND_UNBOUND_PORT:
            node.ports.add(ret)
        elif which is EvtchnIoctl.UNBIND:
            node.ports.discard(value)
            self._drop_fast(node, value)
        return ret

    @staticmethod
    def _drain(fd: int) -> None:
        blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(fd, blocking)

    # gntdev.c -----------------------------------------------------------
    def _gntdev(self, node: _Node, request: int, addr: int) -> int:
        if request == GntdevIoctl.MAP_GRANT_REF:
            count, _pad = struct.unpack("<II", copy_from_user(addr, 8))
            if count == 0 or count > 65536:
                raise _err(errno.EINVAL)
            refs = memoryview(copy_from_user(addr + 16, 8 * count)).cast("I")
            pairs = [[refs[2 * i], refs[2 * i + 1]] for i in range(count)]
            index = int(node.call({"op": "map_grant_ref", "refs": pairs})[0]["index"])
            copy_to_user(addr + 8, struct.pack("<Q", index))
            node.gmaps[index] = count
            return 0
        if request == GntdevIoctl.UNMAP_GRANT_REF:
            index, count, _pad = struct.unpack("<QII", copy_from_user(addr, 16))
            node.call({"op": "unmap_grant_ref", "index": index, "count": count})
            node.gmaps.pop(index, None)
            return 0
        if request == GntdevIoctl.SET_UNMAP_NOTIFY:
            index, action, port = struct.unpack("<QII", copy_from_user(addr, 16))
            node.call({"op": "set_unmap_notify", "index": index, "action": action, "port": port})
            return 0
        raise _err(errno.ENOTTY)
