"""The simulated host's Unix-socket server: one connection per opened /dev/xen/* node.

SimKernel (the daemon-side "driver") opens a connection per ``open()`` and says which node it is;
the connection then carries that node's hypervisor-level requests (see ``sim.rpc``). The connection
is the fd's identity: restrictions (privcmd RESTRICT, evtchn RESTRICT_DOMID), bound ports and grant
maps die with it, as they die with a closed fd on Linux; IOREQ servers belong to dom0 and survive.

Node kinds: ``privcmd``, ``evtchn`` (plus a socketpair "ring" handed to the client: the fd the
daemon reads pending ports from and writes unmasks to), ``gntdev``, ``xenbus`` (a client connection
of the simulated xenstored, handed over as an fd) and ``control`` (sim-only: domain admin and the
guest's side of things, used by ``sim.guest.SimGuest`` and ``SimControl``).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import dataclasses
import errno
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from xen_vhost_sim import rpc, vcpu_channel
from xen_vhost_sim.fastpath import EventfdMode, FastPath
from xen_vhost_sim.hypervisor import Domain, HvError, Hypervisor, IoreqServer, Port
from xen_vhost_sim.memory import Arch
from xen_vhost_master.xen.abi import (
    DOMID_FIRST_RESERVED,
    XEN_PAGE_SHIFT,
    DmOp,
    DomctlCmd,
    GntdevUnmapNotify,
    Hypercall,
    ResourceType,
    XenMem,
    XenVer,
    xen_dm_op,
)

__all__ = ["SimServer", "Toolstack"]

log = logging.getLogger(__name__)

XEN_VERSION = (4, 17)
DOMCTL_INTERFACE_VERSION = 0x15  # Xen 4.17's XEN_DOMCTL_INTERFACE_VERSION (docs/xen-domctl.md)
GNTDEV_LIMIT = 65536  # gntdev.limit module parameter default (pages per fd)
_U32 = struct.Struct("<I")
Reply = tuple[dict[str, Any], bytes, list[int]]


class Toolstack(Protocol):
    """What the simulated host asks of the simulated toolstack + xenstored (``sim.toolstack``)."""

    def xenbus_fd(self, domid: int) -> int:
        """A new xenstored client connection of ``domid`` (the caller sends and closes it)."""
        ...

    def domain_created(self, dom: Domain) -> None: ...

    def domain_destroyed(self, domid: int) -> None: ...

    def add_virtio_device(self, spec: dict[str, Any]) -> str: ...

    def remove_virtio_device(self, spec: dict[str, Any]) -> None: ...

    async def wait_backend_state(self, be: str, state: int, timeout: float) -> bool:
        """True once ``be``/state reads ``state`` within ``timeout`` s (libxl__ev_devstate_wait)."""
        ...


def _ok(**kw: Any) -> Reply:
    return ({"errno": 0, **kw}, b"", [])


class _EvtchnBinding:
    __slots__ = ("masked", "pending")

    def __init__(self) -> None:
        self.masked = False
        self.pending = False


def _reroute(hv: Hypervisor) -> None:
    """A dom0 kernel handler came or went: every route is fetched again (it carries the handlers)."""
    for dom in hv.domains.values():
        for srv in dom.servers.values():
            srv.route_gen += 1
    hv.publish_all()


def _guest_counts(d: Domain) -> tuple[int, int, int]:
    """(consumed, passed, injected) counted by the handlers ``d``'s vCPUs play on its open routes
    and by the irqfds its guest plays (sim.vcpu_channel)."""
    consumed = passed = 0
    for srv in d.servers.values():
        for page in srv.route_pages:
            if page is not None:
                c, p = vcpu_channel.route_counters(page[1])
                consumed, passed = consumed + c, passed + p
    return consumed, passed, vcpu_channel.irqfd_count(d.ctl) if d.ctl is not None else 0


class Conn:
    """One client connection (one opened device node)."""

    def __init__(self, server: SimServer, sock: socket.socket) -> None:
        self.server, self.hv, self.sock = server, server.hv, sock
        self.loop = asyncio.get_running_loop()
        self.reader = rpc.MessageReader()
        self.queue: asyncio.Queue[tuple[dict[str, Any], bytes] | None] = asyncio.Queue()
        self.kind: str | None = None
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.close_after_send: list[int] = []
        self.in_fds: list[int] = []  # fds received from the client, not yet claimed by a request
        self.tasks: set[asyncio.Task[None]] = set()
        # privcmd
        self.restrict: int | None = None
        # evtchn
        self.ring: socket.socket | None = None
        self.ring_buf = bytearray()
        self.bound: dict[int, _EvtchnBinding] = {}
        self.evtchn_restrict: int | None = None
        # ports with the eventfd route (sim.vcpu_channel): port -> (server, vCPU, deliver eventfd)
        self.fast: dict[int, tuple[IoreqServer, int, int]] = {}
        # gntdev: index -> {"refs": [(domid, ref)], "notify": (action, offset, port) | None}
        self.gmaps: dict[int, dict[str, Any]] = {}
        self.next_gindex = 0
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        self.worker = self.loop.create_task(self._work())

    # -------------------------------------------------------------- I/O plumbing
    def _readable(self) -> None:
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(rpc.MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                self.in_fds.extend(fds)
        if not data:
            self.close()
            return
        try:
            for obj, blob in self.reader.feed(data):
                # A client passes fds only with a request that says how many (``nfds``): they
                # are the next ones received, in order (SCM_RIGHTS rides on the header bytes).
                n = obj.pop("nfds", 0)
                if not isinstance(n, int) or not 0 <= n <= min(rpc.MAX_FDS, len(self.in_fds)):
                    raise rpc.RpcError(f"request claims {n!r} fds, {len(self.in_fds)} received")
                obj["_fds"] = self.in_fds[:n]
                del self.in_fds[:n]
                self.queue.put_nowait((obj, blob))
            if len(self.in_fds) > rpc.MAX_FDS:
                raise rpc.RpcError("fds received without a request claiming them")
        except rpc.RpcError as exc:
            log.warning("dropping connection: %s", exc)
            self.close()

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            obj, blob = item
            op = obj.get("op")
            if op in _ASYNC_OPS and self.kind == "control":
                for fd in obj.pop("_fds", ()):
                    os.close(fd)
                t = self.loop.create_task(self._run_async(obj))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
                continue
            try:
                reply = self._dispatch(obj, blob)
            finally:
                for fd in obj.pop("_fds", ()):  # handlers take the fds they keep (set to -1)
                    if fd >= 0:
                        os.close(fd)
            await self.send(*reply, tag=obj.get("tag"))
            while self.close_after_send:
                os.close(self.close_after_send.pop())

    def _dispatch(self, obj: dict[str, Any], blob: bytes) -> Reply:
        op = obj.get("op")
        handler: Callable[[dict[str, Any], bytes], Reply] | None
        if op == "open":
            handler = self._open
        else:
            handler = getattr(self, f"_{self.kind}_{op}", None) if self.kind and isinstance(op, str) else None
        if handler is None:
            return ({"errno": errno.ENOTTY}, b"", [])
        try:
            return handler(obj, blob)
        except HvError as exc:
            return ({"errno": exc.errno, "why": str(exc.args[1])}, b"", [])
        except (KeyError, TypeError, ValueError, OverflowError, IndexError) as exc:
            log.info("bad request %r: %s", op, exc)
            return ({"errno": errno.EINVAL, "why": f"bad request: {exc}"}, b"", [])
        except OSError as exc:  # e.g. memfd/mmap of an absurd guest size
            log.info("request %r failed: %s", op, exc)
            return ({"errno": exc.errno or errno.EIO, "why": str(exc)}, b"", [])

    async def _run_async(self, obj: dict[str, Any]) -> None:
        try:
            result = await _ASYNC_OPS[obj["op"]](self, obj)
            reply: dict[str, Any] = {"errno": 0, "value": result}
        except HvError as exc:
            reply = {"errno": exc.errno}
        except (KeyError, TypeError, ValueError, OverflowError, IndexError) as exc:
            reply = {"errno": errno.EINVAL, "why": str(exc)}
        if not self.closed:
            await self.send(reply, b"", [], tag=obj.get("tag"))

    async def send(self, obj: dict[str, Any], blob: bytes, fds: list[int], tag: Any = None) -> None:
        if self.closed:
            return
        if tag is not None:
            obj = {**obj, "tag": tag}
        head, tail = rpc.encode(obj, blob)
        async with self.send_lock:
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    while True:
                        try:
                            sent = self.sock.sendmsg([head], anc)
                            break
                        except BlockingIOError:
                            await self._writable()
                    head = head[sent:]
                await self.loop.sock_sendall(self.sock, bytes(head) + bytes(tail))
            except OSError as exc:
                log.info("client went away while replying: %s", exc)
                self.close()

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(self.sock.fileno(), wake)
        try:
            await fut
        finally:
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.queue.put_nowait(None)
        for t in list(self.tasks):
            t.cancel()
        for port in list(self.bound):
            self.hv.close_port(0, port)
        self.bound.clear()
        for port in list(self.fast):
            self._drop_fast(port)
        if self.ring is not None:
            self.loop.remove_reader(self.ring.fileno())
            self.ring.close()
            self.ring = None
        for index in list(self.gmaps):
            self._gntdev_release(index)
        if self.kind == "privcmd":
            self.server.fastpath.release_owner(self)
            _reroute(self.hv)
        while self.in_fds:
            os.close(self.in_fds.pop())
        self.sock.close()
        self.server.conns.discard(self)
        log.debug("closed %s connection", self.kind)

    # -------------------------------------------------------------- open
    def _open(self, obj: dict[str, Any], _blob: bytes) -> Reply:
        if self.kind is not None:
            return ({"errno": errno.EBUSY}, b"", [])
        node = obj["node"]
        host = self.server.host
        if node in ("privcmd", "evtchn", "gntdev", "xenbus") and host.devices != "ok":
            # SIM-ONLY (set_host): a host without the xen device nodes, or a user not let in
            code = errno.ENOENT if host.devices == "missing" else errno.EACCES
            return ({"errno": code, "why": f"/dev/xen/{node}: {os.strerror(code)}"}, b"", [])
        if node == "capabilities":
            return self._open_capabilities(host.capabilities)
        if node in ("privcmd", "gntdev", "control"):
            self.kind = node
            return _ok()
        if node == "evtchn":
            self.kind = node
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            mine.setblocking(False)
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            self.ring = mine
            self.loop.add_reader(mine.fileno(), self._ring_readable)
            fd = theirs.detach()
            self.close_after_send.append(fd)
            return ({"errno": 0}, b"", [fd])
        if node == "xenbus":
            if self.server.toolstack is None:
                return ({"errno": errno.ENOENT, "why": "no simulated xenstored"}, b"", [])
            fd = self.server.toolstack.xenbus_fd(0)
            self.kind = node
            self.close_after_send.append(fd)
            return ({"errno": 0}, b"", [fd])
        return ({"errno": errno.ENOENT}, b"", [])

    def _open_capabilities(self, text: str | None) -> Reply:
        """/proc/xen/capabilities (xenfs): a read-only file with ``text``; absent without xenfs."""
        if text is None:
            return ({"errno": errno.ENOENT}, b"", [])
        rd, wr = os.pipe()
        os.write(wr, text.encode())
        os.close(wr)
        self.close_after_send.append(rd)
        return ({"errno": 0}, b"", [rd])

    # -------------------------------------------------------------- privcmd
    def _check_dom(self, dom: int) -> None:
        if self.restrict is not None and dom != self.restrict:
            raise HvError(errno.EPERM, f"fd restricted to d{self.restrict}")

    def _privcmd_whoami(self, _o: dict[str, Any], _b: bytes) -> Reply:
        return _ok(node=self.kind)

    _gntdev_whoami = _privcmd_whoami  # a gntdev fd passed to a back-end (XEN_MMAP grant regions)

    def _privcmd_restrict(self, o: dict[str, Any], _b: bytes) -> Reply:
        dom = int(o["dom"])
        if self.restrict is not None and self.restrict != dom:
            raise HvError(errno.EINVAL, "already restricted to another domain")
        self.restrict = dom
        return _ok()

    def _privcmd_hypercall(self, o: dict[str, Any], _b: bytes) -> Reply:
        if self.restrict is not None:
            raise HvError(errno.EPERM, "hypercalls are refused on a restricted fd")
        nr, cmd = int(o["nr"]), int(o["cmd"])
        if nr == Hypercall.xen_version:
            if cmd == XenVer.version:
                return _ok(ret=(XEN_VERSION[0] << 16) | XEN_VERSION[1])
            if cmd == XenVer.pagesize:
                return _ok(ret=4096)
        elif nr == Hypercall.memory_op and cmd in (XenMem.maximum_gpfn, XenMem.current_reservation, XenMem.maximum_reservation):
            dom = self.hv.guest(int(o["domid"]))
            assert dom.memory is not None
            if cmd == XenMem.maximum_gpfn:
                return _ok(ret=dom.memory.max_gfn())
            return _ok(ret=dom.memory.populated_pages())
        elif nr == Hypercall.domctl:
            return self._domctl(o["domctl"])
        raise HvError(errno.ENOSYS, f"hypercall {nr}/{cmd} not simulated")

    def _domctl(self, d: dict[str, Any]) -> Reply:
        """do_domctl (xen/common/domctl.c): the interface version first (EACCES), then the domain
        (ESRCH), then the command; only pause/unpause are simulated (others ENOSYS)."""
        if int(d["interface_version"]) != self.server.domctl_interface:
            raise HvError(errno.EACCES, f"domctl interface {int(d['interface_version']):#x} is not "
                                        f"{self.server.domctl_interface:#x}")
        cmd, domid = int(d["cmd"]), int(d["domain"])
        if cmd not in (DomctlCmd.pausedomain, DomctlCmd.unpausedomain):
            raise HvError(errno.ENOSYS, f"domctl {cmd} not simulated")
        if domid == 0:
            raise HvError(errno.EINVAL, "a domain cannot pause itself")  # d == current->domain
        self.hv.domain(domid)  # ESRCH
        (self.hv.pause if cmd == DomctlCmd.pausedomain else self.hv.unpause)(domid)
        return _ok(ret=0)

    def _privcmd_dm_op(self, o: dict[str, Any], blob: bytes) -> Reply:
        dom = int(o["dom"])
        sizes = [int(s) for s in o["sizes"]]
        self._check_dom(dom)
        if not self.server.host.ioreq_server:
            # Xen on Arm built without CONFIG_IOREQ_SERVER has no dm_op hypercall (xen/arch/arm/Makefile)
            raise HvError(errno.ENOSYS, "HYPERVISOR_dm_op: no such hypercall (Xen without CONFIG_IOREQ_SERVER)")
        return ({"errno": 0, "ret": 0}, self.run_dm_op(dom, sizes, blob), [])

    def run_dm_op(self, dom: int, sizes: list[int], blob: bytes) -> bytes:
        """HYPERVISOR_dm_op itself (no privcmd restriction check): the buffers back, OUT fields filled."""
        if not sizes:
            raise HvError(errno.EINVAL)
        if sizes[0] < 8:
            raise HvError(errno.EFAULT, "buf[0] shorter than xen_dm_op header")
        if dom >= DOMID_FIRST_RESERVED or dom == 0:
            raise HvError(errno.EPERM)
        op = xen_dm_op()
        raw = blob[: min(sizes[0], ctypes.sizeof(op))]
        ctypes.memmove(ctypes.addressof(op), raw, len(raw))
        self.hv.guest(dom)  # ESRCH for an unknown domain
        self._do_dm_op(dom, op)
        out = bytearray(blob)
        n = min(sizes[0], ctypes.sizeof(op))
        out[:n] = bytes(op)[:n]
        return bytes(out)

    def _privcmd_irq_route(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY (sim.vcpu_channel): what lets the caller's SimKernel carry out
        XEN_DMOP_set_irq_level on ``dom`` by itself: the vCPU channel page (the levels), the guest's
        and the host's irq eventfds. Only for what this fd's dm_op could do: same checks, in order."""
        dom = int(o["dom"])
        self._check_dom(dom)
        if not self.server.host.ioreq_server:
            raise HvError(errno.ENOSYS)
        if dom >= DOMID_FIRST_RESERVED or dom == 0:
            raise HvError(errno.EPERM)
        d = self.hv.guest(dom)
        if d.arch is not Arch.ARM64 or d.dying or d.irq_efd < 0:
            raise HvError(errno.EOPNOTSUPP, "no interrupt-line route for this domain")
        fds = [os.dup(d.ctl_fd), os.dup(d.irq_efd), os.dup(d.irq_host_efd)]
        self.close_after_send.extend(fds)
        return ({"errno": 0}, b"", fds)

    # privcmd IRQFD / IOEVENTFD (sim.fastpath: the dom0 kernel's part, run here in the host)
    def _privcmd_eventfd_probe(self, _o: dict[str, Any], _b: bytes) -> Reply:
        self.server.fastpath.check_present()
        return _ok()

    def _take_fds(self, o: dict[str, Any]) -> list[int]:
        fds = [fd for fd in o.get("_fds", ()) if fd >= 0]
        o["_fds"] = []  # the fast path owns them now (keeps or closes each)
        return fds

    def _privcmd_irqfd(self, o: dict[str, Any], blob: bytes) -> Reply:
        self.server.fastpath.irqfd(o, blob, self._take_fds(o), self.restrict, self, self.loop)
        return _ok()

    def _privcmd_ioeventfd(self, o: dict[str, Any], _b: bytes) -> Reply:
        try:
            self.server.fastpath.ioeventfd(o, self._take_fds(o), self.restrict, self)
        finally:
            _reroute(self.hv)
        return _ok()

    def _do_dm_op(self, dom: int, op: xen_dm_op) -> None:
        u = op.u
        hv = self.hv
        if op.pad:
            raise HvError(errno.EINVAL)
        if op.op == DmOp.nr_vcpus:
            u.nr_vcpus.vcpus = hv.guest(dom).nr_vcpus
        elif op.op == DmOp.create_ioreq_server:
            c = u.create_ioreq_server
            if any(c.pad):
                raise HvError(errno.EINVAL)
            c.id = hv.create_ioreq_server(dom, c.handle_bufioreq).id
        elif op.op == DmOp.get_ioreq_server_info:
            g = u.get_ioreq_server_info
            if g.flags & ~1:
                raise HvError(errno.EINVAL)
            hv.ioreq_server(dom, g.id)
            g.bufioreq_port = 0
            if not g.flags & 1:
                raise HvError(errno.EOPNOTSUPP, "legacy ioreq GFNs are not simulated; use MMAP_RESOURCE")
        elif op.op in (DmOp.map_io_range_to_ioreq_server, DmOp.unmap_io_range_from_ioreq_server):
            r = u.map_io_range_to_ioreq_server
            if r.pad:
                raise HvError(errno.EINVAL)
            fn = hv.map_io_range if op.op == DmOp.map_io_range_to_ioreq_server else hv.unmap_io_range
            fn(dom, r.id, r.type, r.start, r.end)
        elif op.op == DmOp.set_ioreq_server_state:
            s = u.set_ioreq_server_state
            if s.pad:
                raise HvError(errno.EINVAL)
            hv.set_ioreq_server_state(dom, s.id, bool(s.enabled))
        elif op.op == DmOp.destroy_ioreq_server:
            d = u.destroy_ioreq_server
            if d.pad:
                raise HvError(errno.EINVAL)
            hv.destroy_ioreq_server(dom, d.id)
        elif op.op == DmOp.set_irq_level:
            lv = u.set_irq_level
            if any(lv.pad):
                raise HvError(errno.EINVAL)
            hv.set_irq_level(dom, lv.irq, lv.level)
        elif op.op == DmOp.set_pci_intx_level:
            x = u.set_pci_intx_level
            hv.set_pci_intx_level(dom, x.domain, x.bus, x.device, x.intx, x.level)
        elif op.op == DmOp.inject_msi:
            m = u.inject_msi
            if m.pad:
                raise HvError(errno.EINVAL)
            hv.inject_msi(dom, m.addr, m.data)
        else:
            raise HvError(errno.EOPNOTSUPP, f"dm_op {op.op} not simulated")

    def _privcmd_map_foreign(self, o: dict[str, Any], blob: bytes) -> Reply:
        """runs blob: u64 triples (page_index, gfn, count) → reply blob: i64 quadruples
        (page_index, count, err, memfd page offset or -1)."""
        dom = int(o["dom"])
        self._check_dom(dom)
        runs = array.array("Q")
        runs.frombytes(blob[: len(blob) - len(blob) % 24])
        out = array.array("q")
        d = self.hv.domains.get(dom)
        mem = d.memory if d is not None and not d.dying else None
        for i in range(0, len(runs), 3):
            page, gfn, count = runs[i], runs[i + 1], runs[i + 2]
            if mem is None:
                out.extend((page, count, -errno.ESRCH if d is None else -errno.EINVAL, -1))
                continue
            for start, n, off in mem.resolve(gfn, count):
                if off < 0:
                    out.extend((page + (start - gfn), n, -errno.EINVAL, -1))
                    continue
                cur = start
                for pstart, pn in mem.page_in(start, n):  # paged out: ENOENT now, there on retry
                    if pstart > cur:
                        out.extend((page + (cur - gfn), pstart - cur, 0, off + (cur - start)))
                    out.extend((page + (pstart - gfn), pn, -errno.ENOENT, -1))
                    cur = pstart + pn
                if cur < start + n:
                    out.extend((page + (cur - gfn), start + n - cur, 0, off + (cur - start)))
        fds = [mem.memfd] if mem is not None and any(out[i] >= 0 for i in range(3, len(out), 4)) else []
        return ({"errno": 0}, out.tobytes(), fds)

    def _privcmd_map_resource(self, o: dict[str, Any], _b: bytes) -> Reply:
        dom, rtype, rid, idx, num = (int(o[k]) for k in ("dom", "type", "id", "idx", "num"))
        self._check_dom(dom)
        if rtype != ResourceType.ioreq_server:
            raise HvError(errno.EOPNOTSUPP, "only ioreq server resources are simulated")
        s = self.hv.ioreq_server(dom, rid)
        if o.get("query"):
            return _ok(num=2)
        if idx == 0:
            raise HvError(errno.ENOENT if s.bufioreq == 0 else errno.EOPNOTSUPP, "no buffered ioreq page")
        if idx != 1 or num != 1:
            raise HvError(errno.EINVAL, "Xen >= 4.17 has one synchronous ioreq page (idx 1)")
        return ({"errno": 0}, b"", [s.memfd])

    # -------------------------------------------------------------- evtchn
    def _deliver(self, p: Port) -> None:
        fast = self.fast.get(p.port)
        if fast is not None:
            # eventfd route: the daemon's SimKernel keeps the mask (a masked port is an eventfd it
            # does not poll; its counter is the pending bit) and shows it in the route page
            page = fast[0].route_pages[fast[1]]
            if page is None or not page[1][vcpu_channel.ROUTE_MASKED]:
                self.server.fastpath.port_event(p.port)
            if page is not None:
                page[1][vcpu_channel.ROUTE_MASKED] = 1  # the evtchn device masks as it queues
            try:
                os.eventfd_write(fast[2], 1)
            except OSError as exc:
                log.warning("evtchn port %d: deliver eventfd: %s", p.port, exc)
            return
        st = self.bound.setdefault(p.port, _EvtchnBinding())
        if st.masked or self.ring is None:
            st.pending = True
            return
        st.masked = True
        # Shared handlers of the same (late-EOI) interrupt: privcmd ioeventfd runs in the kernel
        # before user space can look at the slot.
        self.server.fastpath.port_event(p.port)
        try:
            self.ring.send(_U32.pack(p.port))
        except OSError as exc:
            log.warning("evtchn ring overflow/closed (%s): port %d left pending", exc, p.port)
            st.masked, st.pending = False, True

    def _ring_readable(self) -> None:
        assert self.ring is not None
        try:
            data = self.ring.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.ring_buf += data
        n = len(self.ring_buf) // 4 * 4
        ports = array.array("I")
        ports.frombytes(bytes(self.ring_buf[:n]))
        del self.ring_buf[:n]
        for port in ports:
            if port & rpc.RING_NOTIFY:  # a posted IOCTL_EVTCHN_NOTIFY (see SimKernel._evtchn)
                port &= ~rpc.RING_NOTIFY
                p = self.hv.domains[0].ports.get(port)
                if p is None or p.owner is not self:
                    log.info("posted notify of port %d not bound on this evtchn fd: dropped", port)
                else:
                    try:
                        self.hv.send(0, port)
                    except HvError as exc:
                        log.info("posted notify of port %d: %s", port, exc)
                continue
            st = self.bound.get(port)
            if st is None:
                continue
            st.masked = False
            if st.pending:
                st.pending = False
                p = self.hv.domains[0].ports.get(port)
                if p is not None:
                    self._deliver(p)

    def _owned(self, port: int) -> None:
        p = self.hv.domains[0].ports.get(port)
        if p is None or p.owner is not self:
            raise HvError(errno.ENOTCONN, f"port {port} not bound on this fd")

    def _evtchn_bind_interdomain(self, o: dict[str, Any], _b: bytes) -> Reply:
        rd, rp = int(o["remote_domain"]), int(o["remote_port"])
        if self.evtchn_restrict is not None and rd != self.evtchn_restrict:
            raise HvError(errno.EACCES)
        p = self.hv.bind_interdomain(0, rd, rp, consumer=self._deliver, owner=self, fire=False)
        self.bound.setdefault(p.port, _EvtchnBinding())
        fds: list[int] = []
        target = self._vcpu_port(rd, rp)
        if target is not None:
            # A vCPU's IOREQ port gets the eventfd route (sim.vcpu_channel): its events reach
            # the daemon's evtchn fd, and the daemon's notifies the vCPU, without this host.
            srv, vcpu = target
            deliver = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            page_fd = os.memfd_create(f"xen-sim-route-p{p.port}", os.MFD_CLOEXEC)
            os.ftruncate(page_fd, vcpu_channel.ROUTE_PAGE)
            self.fast[p.port] = (srv, vcpu, deliver)
            srv.deliver[vcpu] = deliver
            srv.route_pages[vcpu] = (page_fd, mmap.mmap(page_fd, vcpu_channel.ROUTE_PAGE))
            srv.route_gen += 1
            fds = [os.dup(deliver), os.dup(srv.wake[vcpu]), os.dup(page_fd)]
            self.close_after_send.extend(fds)
            self.hv.publish(srv.dom)
        self.hv.fire(p)  # the bind-time pending event (see Hypervisor.bind_interdomain)
        return ({"errno": 0, "ret": p.port}, b"", fds)

    def _vcpu_port(self, domid: int, port: int) -> tuple[IoreqServer, int] | None:
        dom = self.hv.domains.get(domid)
        for srv in dom.servers.values() if dom is not None else ():
            if port in srv.ports and not srv.closed:
                return srv, srv.ports.index(port)
        return None

    def _drop_fast(self, port: int) -> None:
        srv, vcpu, deliver = self.fast.pop(port)
        if srv.deliver[vcpu] == deliver:
            srv.deliver[vcpu] = None
            page = srv.route_pages[vcpu]
            srv.route_pages[vcpu] = None
            if page is not None:
                self.server.fastpath.add_guest_counts(srv.dom.domid, *vcpu_channel.route_counters(page[1]))
                page[1].close()
                os.close(page[0])
            srv.route_gen += 1
            self.hv.publish(srv.dom)
        os.close(deliver)

    def _evtchn_bind_unbound_port(self, o: dict[str, Any], _b: bytes) -> Reply:
        if self.evtchn_restrict is not None:
            raise HvError(errno.EACCES)
        p = self.hv.alloc_unbound(0, int(o["remote_domain"]), consumer=self._deliver, owner=self)
        self.bound[p.port] = _EvtchnBinding()
        return _ok(ret=p.port)

    def _evtchn_bind_virq(self, _o: dict[str, Any], _b: bytes) -> Reply:
        if self.evtchn_restrict is not None:
            raise HvError(errno.EACCES)
        raise HvError(errno.EINVAL, "VIRQs are not simulated")

    def _evtchn_unbind(self, o: dict[str, Any], _b: bytes) -> Reply:
        port = int(o["port"])
        self._owned(port)
        self.hv.close_port(0, port)
        self.bound.pop(port, None)
        if port in self.fast:
            self._drop_fast(port)
        return _ok(ret=0)

    def _evtchn_notify(self, o: dict[str, Any], _b: bytes) -> Reply:
        port = int(o["port"])
        self._owned(port)
        self.hv.send(0, port)
        return _ok(ret=0)

    def _evtchn_reset(self, _o: dict[str, Any], _b: bytes) -> Reply:
        for st in self.bound.values():
            st.masked = st.pending = False
        return _ok(ret=0)

    def _evtchn_restrict_domid(self, o: dict[str, Any], _b: bytes) -> Reply:
        dom = int(o["domid"])
        if dom == 0 or dom >= DOMID_FIRST_RESERVED:
            raise HvError(errno.EINVAL)
        if self.evtchn_restrict is not None:
            raise HvError(errno.EACCES)
        self.evtchn_restrict = dom
        return _ok(ret=0)

    # -------------------------------------------------------------- gntdev
    def _gntdev_map_grant_ref(self, o: dict[str, Any], _b: bytes) -> Reply:
        refs = [(int(d), int(r)) for d, r in o["refs"]]
        if not refs or len(refs) > GNTDEV_LIMIT:
            raise HvError(errno.EINVAL)
        index = self.next_gindex
        self.next_gindex += len(refs) << XEN_PAGE_SHIFT
        self.gmaps[index] = {"refs": refs, "notify": None, "mapped": False}
        return _ok(index=index)

    def _gntdev_find(self, index: int) -> tuple[int, dict[str, Any]]:
        for start, m in self.gmaps.items():
            if start <= index < start + (len(m["refs"]) << XEN_PAGE_SHIFT):
                return start, m
        raise HvError(errno.ENOENT)

    def _gntdev_unmap_grant_ref(self, o: dict[str, Any], _b: bytes) -> Reply:
        index, count = int(o["index"]), int(o["count"])
        m = self.gmaps.get(index)
        if m is None or len(m["refs"]) != count:
            raise HvError(errno.ENOENT)
        self._gntdev_release(index)
        return _ok()

    def _gntdev_release(self, index: int) -> None:
        m = self.gmaps.pop(index)
        if m["notify"] is not None:
            action, offset, port = m["notify"]
            if action & GntdevUnmapNotify.CLEAR_BYTE:
                domid, ref = m["refs"][offset >> XEN_PAGE_SHIFT]
                dom = self.hv.domains.get(domid)
                g = dom.grants.get(ref) if dom else None
                if dom is not None and dom.memory is not None and g is not None:
                    ext = dom.memory.extent_of(g.gfn)
                    if ext is not None:
                        dom.memory.page_view(ext.page_offset + g.gfn - ext.gfn)[offset & 0xFFF] = 0
            if action & GntdevUnmapNotify.SEND_EVENT:
                try:
                    self.hv.send(0, port)
                except HvError:
                    pass  # the port went away first: nothing to notify, as in Linux
        if m["mapped"]:
            for domid, ref in m["refs"]:
                dom = self.hv.domains.get(domid)
                g = dom.grants.get(ref) if dom else None
                if g is not None:
                    g.maps -= 1

    def _gntdev_set_unmap_notify(self, o: dict[str, Any], _b: bytes) -> Reply:
        index, action, port = int(o["index"]), int(o["action"]), int(o["port"])
        if action & ~int(GntdevUnmapNotify.CLEAR_BYTE | GntdevUnmapNotify.SEND_EVENT):
            raise HvError(errno.EINVAL)
        start, m = self._gntdev_find(index)
        if action & GntdevUnmapNotify.SEND_EVENT and port not in self.hv.domains[0].ports:
            raise HvError(errno.EINVAL, f"port {port} is not a bound event channel")
        m["notify"] = (action, index - start, port)
        return _ok()

    def _gntdev_mmap(self, o: dict[str, Any], _b: bytes) -> Reply:
        index, count, writable = int(o["index"]), int(o["count"]), bool(o["writable"])
        m = self.gmaps.get(index)
        if m is None or len(m["refs"]) != count:
            raise HvError(errno.EINVAL, "no grant map at this offset with this size")
        if m["mapped"]:
            raise HvError(errno.EINVAL, "already mapped")
        domids = {d for d, _r in m["refs"]}
        pages: list[int] = []
        fds: list[int] = []
        for domid in sorted(domids):
            refs = [r for d, r in m["refs"] if d == domid]
            offs = iter(self.hv.grant_pages(domid, refs, writable))
            dom = self.hv.domains[domid]
            assert dom.memory is not None
            fds.append(dom.memory.memfd)
            pages.extend([len(fds) - 1, next(offs)] for d, _r in m["refs"] if d == domid)  # type: ignore[misc]
        m["mapped"] = True
        return ({"errno": 0, "pages": pages}, b"", fds)

    # -------------------------------------------------------------- control (sim-only)
    def _control_create_domain(self, o: dict[str, Any], _b: bytes) -> Reply:
        holes = [(int(a), int(b)) for a, b in o.get("holes", [])]
        paged = [(int(a), int(b)) for a, b in o.get("paged", [])]
        fds: list[int] = o.get("_fds", [])
        ram_fd: int | None = None
        banks: list[tuple[int, int]] | None = None
        if o.get("external_ram"):  # SIM-ONLY: RAM is the client's fd (User-Mode Linux's memory)
            if len(fds) != 1:
                raise HvError(errno.EBADF, "external_ram needs exactly one fd")
            banks = [(int(a), int(b)) for a, b in o.get("banks", [])]
        name, mem_bytes, vcpus, arch = str(o.get("name", "")), int(o.get("mem_bytes", 1 << 30)), int(o.get("vcpus", 1)), str(o.get("arch", "arm64"))
        if banks is not None:
            ram_fd, fds[0] = fds[0], -1  # create_domain takes it
        try:
            dom = self.hv.create_domain(
                o.get("domid"), name=name, mem_bytes=mem_bytes, vcpus=vcpus, arch=arch, holes=holes, paged=paged,
                ram_fd=ram_fd, banks=banks,
            )
        except ValueError as exc:
            raise HvError(errno.EINVAL, str(exc)) from None
        if self.server.toolstack is not None:
            self.server.toolstack.domain_created(dom)
        return _ok(domid=dom.domid)

    def _control_destroy_domain(self, o: dict[str, Any], _b: bytes) -> Reply:
        domid = int(o["domid"])
        self.hv.destroy_domain(domid)
        self.server.xl_configs.pop(domid, None)
        if self.server.toolstack is not None:
            self.server.toolstack.domain_destroyed(domid)
        return _ok()

    def _control_pause(self, o: dict[str, Any], _b: bytes) -> Reply:
        (self.hv.unpause if o.get("unpause") else self.hv.pause)(int(o["domid"]))
        return _ok()

    def _control_set_domctl_interface(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY: the XEN_DOMCTL_INTERFACE_VERSION the simulated Xen accepts from now on."""
        self.server.domctl_interface = int(o["version"])
        return _ok(value=self.server.domctl_interface)

    def _control_set_host(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY: play another host (:class:`HostProfile`); applies to later opens and dm_ops."""
        host = self.server.host
        if "devices" in o:
            if o["devices"] not in ("ok", "missing", "eacces"):
                raise ValueError(f"devices={o['devices']!r}: ok, missing or eacces")
            host.devices = str(o["devices"])
        if "capabilities" in o:
            host.capabilities = None if o["capabilities"] is None else str(o["capabilities"])
        if "ioreq_server" in o:
            host.ioreq_server = bool(o["ioreq_server"])
        return _ok(value=dataclasses.asdict(host))

    def _control_shutdown(self, o: dict[str, Any], _b: bytes) -> Reply:
        self.hv.shutdown(int(o["domid"]), str(o.get("reason", "poweroff")))
        return _ok()

    def _control_add_virtio_device(self, o: dict[str, Any], _b: bytes) -> Reply:
        """Simulated ``xl``: write a virtio device's backend/frontend nodes as libxl does."""
        if self.server.toolstack is None:
            raise HvError(errno.ENOENT, "no simulated xenstored")
        self.hv.guest(int(o["domid"]))
        return _ok(value=self.server.toolstack.add_virtio_device(o))

    def _control_remove_virtio_device(self, o: dict[str, Any], _b: bytes) -> Reply:
        if self.server.toolstack is None:
            raise HvError(errno.ENOENT, "no simulated xenstored")
        self.server.toolstack.remove_virtio_device(o)
        return _ok()

    def _control_domain_info(self, o: dict[str, Any], _b: bytes) -> Reply:
        d = self.hv.guest(int(o["domid"]))
        assert d.memory is not None
        return _ok(
            domid=d.domid, name=d.name, vcpus=d.nr_vcpus, arch=d.arch.value, banks=d.memory.banks,
            holes=d.memory.holes, paused=not d.running.is_set(), pause_count=d.pause_count,
            history=[list(h) for h in d.history], shutdown=d.shutdown_reason,
            servers=sorted(d.servers), msis=list(d.msis),
            fastpath=self.server.fastpath.info(d.domid, _guest_counts(d)),
        )

    def _control_set_privcmd_eventfd(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY: which dom0 kernel answers IRQFD/IOEVENTFD from now on (enotty|eopnotsupp|on)."""
        try:
            self.server.fastpath.mode = EventfdMode.parse(str(o["mode"]))
        except ValueError as exc:
            raise HvError(errno.EINVAL, str(exc)) from None
        return _ok(value=self.server.fastpath.mode.value)

    def _control_vcpu_channel(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY (sim.vcpu_channel): the domain's vCPU channel page and its guest irq eventfd."""
        d = self.hv.guest(int(o["domid"]))
        fds = [os.dup(d.ctl_fd), os.dup(d.irq_efd)]
        self.close_after_send.extend(fds)
        return ({"errno": 0}, b"", fds)

    def _control_irqfds(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY (sim.vcpu_channel): the domain's irqfds the guest may play (a well-formed
        set_irq_level of a line the page holds, on a domain and host whose dm_op would do just
        that), each as [irq, level] with its eventfd, after the host's irq eventfd."""
        d = self.hv.guest(int(o["domid"]))
        lines: list[list[int]] = []
        fds = [os.dup(d.irq_host_efd)] if d.irq_host_efd >= 0 else []
        playable = self.server.host.ioreq_server and d.arch is Arch.ARM64 and not d.dying and bool(fds)
        for dm_op, fd in self.server.fastpath.irqfds_of(d.domid) if playable else ():
            op = xen_dm_op()
            raw = dm_op[: ctypes.sizeof(op)]
            ctypes.memmove(ctypes.addressof(op), raw, len(raw))
            lv = op.u.set_irq_level
            if len(dm_op) < 16 or op.op != DmOp.set_irq_level or op.pad or any(lv.pad) \
                    or vcpu_channel.irq_offset(lv.irq) is None or lv.level > 1:
                continue
            lines.append([int(lv.irq), int(lv.level)])
            fds.append(os.dup(fd))
        self.close_after_send.extend(fds)
        return ({"errno": 0, "lines": lines}, b"", fds)

    def _control_vcpu_server(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY (sim.vcpu_channel): server ``uid``'s ioreq page, and vCPU ``vcpu``'s wake and
        deliver eventfds (ENOENT: no such live server; EAGAIN: the vCPU has no eventfd route)."""
        d = self.hv.guest(int(o["domid"]))
        uid, vcpu = int(o["uid"]), int(o["vcpu"])
        srv = next((x for x in d.servers.values() if x.uid == uid and not x.closed), None)
        if srv is None or not 0 <= vcpu < d.nr_vcpus:
            raise HvError(errno.ENOENT, f"no live ioreq server {uid} with vCPU {vcpu}")
        deliver, page = srv.deliver[vcpu], srv.route_pages[vcpu]
        if deliver is None or page is None:
            raise HvError(errno.EAGAIN, "no eventfd route for this vCPU")
        port = srv.dom.ports.get(srv.ports[vcpu])
        kevs = self.server.fastpath.guest_handlers(port.remote_port, srv, vcpu) if port is not None else None
        if kevs is None:
            raise HvError(errno.EAGAIN, "a dom0 kernel handler of this vCPU's port watches another slot")
        fds = [os.dup(srv.memfd), os.dup(srv.wake[vcpu]), os.dup(deliver), os.dup(page[0]),
               *(os.dup(e.fd) for e in kevs)]
        self.close_after_send.extend(fds)
        return ({"errno": 0, "ioeventfds": [[e.addr, e.addr_len, e.vq] for e in kevs]}, b"", fds)

    def _control_guest_ram(self, o: dict[str, Any], _b: bytes) -> Reply:
        """SIM-ONLY: the guest's RAM memfd (for the guest's own view and for baselines)."""
        d = self.hv.guest(int(o["domid"]))
        assert d.memory is not None
        return ({"errno": 0, "size": d.memory.size, "banks": d.memory.banks, "holes": d.memory.holes}, b"", [d.memory.memfd])

    def _control_grant(self, o: dict[str, Any], _b: bytes) -> Reply:
        return _ok(value=self.hv.grant(int(o["domid"]), int(o["gfn"]), bool(o.get("readonly"))))

    def _control_revoke(self, o: dict[str, Any], _b: bytes) -> Reply:
        self.hv.revoke(int(o["domid"]), int(o["ref"]))
        return _ok()

    def _control_irq_level(self, o: dict[str, Any], _b: bytes) -> Reply:
        return _ok(value=self.hv.guest(int(o["domid"])).irq_level(int(o["irq"])))

    def _control_pending_access(self, o: dict[str, Any], _b: bytes) -> Reply:
        return _ok(value=self.hv.pending_access(int(o["domid"]), int(o.get("vcpu", 0))))

    def _guest_consumer(self, domid: int) -> Callable[[Port], None]:
        dom = self.hv.guest(domid)

        def consumer(p: Port) -> None:
            dom.user_events.setdefault(p.port, asyncio.Event()).set()

        return consumer

    def _control_evtchn_alloc_unbound(self, o: dict[str, Any], _b: bytes) -> Reply:
        domid = int(o["domid"])
        p = self.hv.alloc_unbound(domid, int(o.get("remote", 0)), consumer=self._guest_consumer(domid))
        self.hv.guest(domid).user_events[p.port] = asyncio.Event()
        return _ok(value=p.port)

    def _control_evtchn_bind_interdomain(self, o: dict[str, Any], _b: bytes) -> Reply:
        domid = int(o["domid"])
        p = self.hv.bind_interdomain(domid, int(o["remote"]), int(o["remote_port"]), consumer=self._guest_consumer(domid))
        return _ok(value=p.port)

    def _control_evtchn_notify(self, o: dict[str, Any], _b: bytes) -> Reply:
        self.hv.send(int(o["domid"]), int(o["port"]))
        return _ok()


async def _a_mmio(conn: Conn, o: dict[str, Any]) -> int:
    return await conn.hv.mmio(
        int(o["domid"]), int(o.get("vcpu", 0)), int(o["addr"]), int(o["size"]), bool(o["write"]), int(o.get("value", 0))
    )


async def _a_wait_irq(conn: Conn, o: dict[str, Any]) -> None:
    await conn.hv.wait_irq(int(o["domid"]), int(o["irq"]))


async def _a_pci_config(conn: Conn, o: dict[str, Any]) -> int:
    return await conn.hv.pci_config(int(o["domid"]), int(o.get("vcpu", 0)), int(o["sbdf"]), int(o["reg"]),
                                    int(o["size"]), bool(o["write"]), int(o.get("value", 0)))


async def _a_wait_msi(conn: Conn, o: dict[str, Any]) -> None:
    await conn.hv.wait_msi(int(o["domid"]), int(o["addr"]), int(o["data"]))


async def _a_evtchn_wait(conn: Conn, o: dict[str, Any]) -> None:
    dom = conn.hv.guest(int(o["domid"]))
    ev = dom.user_events.get(int(o["port"]))
    if ev is None:
        raise HvError(errno.EINVAL)
    await ev.wait()
    ev.clear()


async def _a_xl_destroy(conn: Conn, o: dict[str, Any]) -> dict[str, bool]:
    """``xl destroy`` as libxl 4.17 does it (seen in tests/xenlab): pause the domain, remove every
    device with the Closing → Closed handshake (each waits up to ``timeout`` s for its backend),
    then destroy the domain. Returns backend path → whether the backend answered Closed."""
    domid = int(o["domid"])
    toolstack = conn.server.toolstack
    conn.hv.pause(domid)
    answered: dict[str, bool] = {}
    detach = getattr(toolstack, "detach_all_devices", None)
    if detach is not None:
        answered = await detach(domid, float(o.get("timeout", 10.0)))
    conn.hv.destroy_domain(domid)
    conn.server.xl_configs.pop(domid, None)
    if toolstack is not None:
        toolstack.domain_destroyed(domid)
    return answered


async def _a_xl_create(conn: Conn, o: dict[str, Any]) -> int:
    """``xl create`` as libxl does it (libxl_create.c; docs in SimControl.xl_create): the domain
    is created with the toolstack's pause reference, introduced to xenstore with its name, its
    devices written; a Xen 4.17 ``virtio_disk`` waits up to ``timeout`` s for its backend's
    InitWait (libxl__wait_device_connection, LIBXL_INIT_TIMEOUT), a ``virtio`` device (Xen
    >= 4.18, ``skip_attach``) does not; then libxl drops its pause reference unless ``paused``
    (``xl create -p``). A device that never reaches InitWait fails the creation: the domain is
    destroyed (ETIMEDOUT)."""
    toolstack = conn.server.toolstack
    if toolstack is None:
        raise HvError(errno.ENOENT, "no simulated xenstored")
    name = str(o["name"])
    if not name or any(d.name == name and not d.dying for d in conn.hv.domains.values()):
        raise HvError(errno.EEXIST if name else errno.EINVAL, f"domain with name {name!r} already exists")
    devices = [dict(d) for d in o.get("devices", [])]
    dom = conn.hv.create_domain(
        None, name=name, mem_bytes=int(o.get("mem_bytes", 64 << 20)), vcpus=int(o.get("vcpus", 1)),
        arch=str(o.get("arch", "arm64")), paused=True,
    )
    toolstack.domain_created(dom)
    config = {"name": name, "mem_bytes": o.get("mem_bytes", 64 << 20), "vcpus": o.get("vcpus", 1),
              "arch": o.get("arch", "arm64"), "devices": devices, "timeout": o.get("timeout", 10.0)}
    try:
        disks = []
        for spec in devices:
            be = toolstack.add_virtio_device({**spec, "domid": dom.domid})
            if spec.get("kind", "virtio") == "virtio_disk":
                disks.append(be)
        timeout = float(o.get("timeout", 10.0))
        results = await asyncio.gather(*(toolstack.wait_backend_state(be, 2, timeout) for be in disks))
    except BaseException:
        _destroy_now(conn, dom.domid)
        raise
    late = [be for be, ok in zip(disks, results) if not ok]
    if late:
        log.warning("xl create %s: unable to initialize device(s) %s: destroying d%d", name, late, dom.domid)
        _destroy_now(conn, dom.domid)
        raise HvError(errno.ETIMEDOUT, f"unable to initialize device {late[0]}")
    conn.server.xl_configs[dom.domid] = config
    if not o.get("paused"):
        conn.hv.unpause(dom.domid)
    return dom.domid


def _destroy_now(conn: Conn, domid: int) -> None:
    """A failed creation's clean-up, without the device handshake (a forced destroy)."""
    if domid in conn.hv.domains:
        conn.hv.destroy_domain(domid)
        if conn.server.toolstack is not None:
            conn.server.toolstack.domain_destroyed(domid)


async def _a_xl_reboot(conn: Conn, o: dict[str, Any]) -> dict[str, Any]:
    """``xl reboot`` with ``on_reboot = "restart"``: the guest shuts down (reason reboot), xl
    destroys it the libxl way (every device Closing → wait for Closed → removed, then the domain)
    and creates it again from the same configuration: same name and devices, a NEW domid."""
    domid = int(o["domid"])
    config = conn.server.xl_configs.get(domid)
    if config is None:
        raise HvError(errno.ENOENT, f"d{domid} was not created with xl_create")
    conn.hv.shutdown(domid, "reboot")
    answered = await _a_xl_destroy(conn, {"domid": domid, "timeout": float(o.get("timeout", 10.0))})
    new = await _a_xl_create(conn, config)
    return {"domid": new, "answered": answered}


async def _a_xl_detach_virtio_device(conn: Conn, o: dict[str, Any]) -> bool:
    """``xl block-detach``: Closing, wait for Closed (``timeout`` s), remove. True if answered."""
    detach = getattr(conn.server.toolstack, "detach_virtio_device", None)
    if detach is None:
        raise HvError(errno.ENOENT, "no simulated xenstored")
    return bool(await detach(o, float(o.get("timeout", 10.0))))


_ASYNC_OPS = {"mmio": _a_mmio, "wait_irq": _a_wait_irq, "evtchn_wait": _a_evtchn_wait,
              "pci_config": _a_pci_config, "wait_msi": _a_wait_msi,
              "xl_destroy": _a_xl_destroy, "xl_detach_virtio_device": _a_xl_detach_virtio_device,
              "xl_create": _a_xl_create, "xl_reboot": _a_xl_reboot}


class _KernelCaller:
    """The dom0 kernel as a dm_op caller (no privcmd fd, no restriction): all that
    ``Conn.run_dm_op`` / ``Conn._do_dm_op`` use of a connection is the hypervisor."""

    _do_dm_op = Conn._do_dm_op

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv


@dataclasses.dataclass
class HostProfile:
    """SIM-ONLY: the host the clients find (``SimControl.set_host``), a dom0 by default.

    ``devices``: ok, missing (no /dev/xen/* nodes: ENOENT, as without the drivers) or eacces (the
    nodes refuse this user). ``capabilities``: what /proc/xen/capabilities reads (``control_d`` in
    dom0, empty in a domU), None = no xenfs mounted. ``ioreq_server``: False plays a Xen built
    without CONFIG_IOREQ_SERVER (Debian's arm64 Xen): every dm_op answers ENOSYS."""

    devices: str = "ok"
    capabilities: str | None = "control_d\n"
    ioreq_server: bool = True


class SimServer:
    """Listens on ``path``; serves any number of SimKernel / SimGuest / SimControl clients."""

    def __init__(
        self,
        hv: Hypervisor,
        path: str,
        *,
        toolstack: Toolstack | None = None,
        privcmd_eventfd: EventfdMode | str = EventfdMode.ENOTTY,
    ) -> None:
        self.hv, self.path = hv, path
        self.toolstack = toolstack
        self.fastpath = FastPath(hv, self._run_dm_op, privcmd_eventfd)
        hv.kernel_handles = lambda port, srv, vcpu: self.fastpath.guest_handlers(port, srv, vcpu) is None
        self.fastpath.on_irqfd_change = self._irqfds_changed
        self.conns: set[Conn] = set()
        self.listener: socket.socket | None = None
        self.domctl_interface = DOMCTL_INTERFACE_VERSION  # SIM-ONLY setting: which Xen answers domctl
        self.host = HostProfile()  # SIM-ONLY setting: what kind of host the daemon finds
        self.xl_configs: dict[int, dict[str, Any]] = {}  # domid -> what xl_create was given (xl_reboot)

    def _irqfds_changed(self, dom: int) -> None:
        d = self.hv.domains.get(dom)
        if d is not None and d.ctl is not None and not d.ctl.closed:
            vcpu_channel.bump_irqfd_gen(d.ctl)

    def _run_dm_op(self, dom: int, sizes: list[int], blob: bytes) -> None:
        """A dm_op the dom0 kernel issues by itself (irqfd injection): HYPERVISOR_dm_op, no fd."""
        Conn.run_dm_op(_KernelCaller(self.hv), dom, sizes, blob)  # type: ignore[arg-type]

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(self.path)
        lst.listen(64)
        lst.setblocking(False)
        self.listener = lst
        asyncio.get_running_loop().add_reader(lst.fileno(), self._accept)
        log.info("simulated Xen host listening on %s", self.path)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.conns.add(Conn(self, sock))

    async def close(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for c in list(self.conns):
            c.close()
            c.worker.cancel()
        self.fastpath.close()
        self.hv.close()
