"""L2 back-end API, protocol side: :class:`BackendServer` serves one front-end connection for a
:class:`~vhost_user.aio.device.VhostUserDevice`.

It decodes requests with the sans-IO :class:`~vhost_user.backend.BackendConnection`, keeps the
vrings and the mmap'd memory table, polls kick eventfds with ``loop.add_reader``, and owns every
fd the front-end sends (closing them when replaced or at the end). :func:`serve_unix` listens on
a path and serves connections one after the other (qemu-storage-daemon behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import cast

from ..backend import BackendChannelRequester, BackendConnection
from ..errors import BackendFailed, Disconnected, InflightRegionError, LocalProtocolError, PeerTimeout, VhostUserError
from ..events import RequestReceived
from ..inflight import InflightRegion, format_region, region_size
from ..wire.enums import (
    VRING_IDX_MASK,
    FrontendRequest,
    ProtocolFeatures,
    VirtioFeatures,
)
from ..wire.payloads import ConfigSpace, Inflight, U64, VringState, XenMemoryRegion
from .device import VhostUserDevice, Vring
from .transport import FdSocket, UnixListener, close_fds

__all__ = ["BackendServer", "serve_unix", "BACKEND_CHANNEL_TIMEOUT"]

log = logging.getLogger("vhost_user.aio.server")

# How long the front-end may take to ACK a back-end request (CONFIG_CHANGE_MSG with NEED_REPLY).
BACKEND_CHANNEL_TIMEOUT = 5.0

F = FrontendRequest


class BackendServer:
    """Serve one connected front-end for ``device`` until it hangs up (:meth:`run`)."""

    def __init__(self, device: VhostUserDevice, sock: FdSocket, *, logger: logging.Logger | None = None) -> None:
        self.device = device
        self.sock = sock
        self.log = logger or log
        offered = ProtocolFeatures(device.protocol_features) & ~ProtocolFeatures.XEN_MMAP
        if device.xen_mapper is not None:
            offered |= ProtocolFeatures.XEN_MMAP
        self.conn = BackendConnection(protocol_features=offered)
        self.vrings = [Vring(i, device.memory) for i in range(device.num_queues)]
        self.owner = False
        self.channel_sock: FdSocket | None = None
        self.channel: BackendChannelRequester | None = None
        device.server = self
        self._loop: asyncio.AbstractEventLoop | None = None
        self._plain_under_xen_logged = False
        self._handlers: dict[FrontendRequest, Callable[[RequestReceived], object]] = {
            F.GET_FEATURES: self._get_features,
            F.SET_FEATURES: self._set_features,
            F.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            F.SET_PROTOCOL_FEATURES: lambda ev: None,
            F.SET_OWNER: self._set_owner,
            F.RESET_OWNER: self._reset,
            F.RESET_DEVICE: self._reset,
            F.GET_QUEUE_NUM: lambda ev: U64(value=self.device.num_queues),
            F.GET_MAX_MEM_SLOTS: lambda ev: U64(value=self.device.max_mem_slots),
            F.SET_MEM_TABLE: self._set_mem_table,
            F.ADD_MEM_REG: self._add_mem_reg,
            F.REM_MEM_REG: self._rem_mem_reg,
            F.SET_VRING_NUM: self._set_vring_num,
            F.SET_VRING_ADDR: self._set_vring_addr,
            F.SET_VRING_BASE: self._set_vring_base,
            F.GET_VRING_BASE: self._get_vring_base,
            F.SET_VRING_KICK: self._set_vring_kick,
            F.SET_VRING_CALL: self._set_vring_call,
            F.SET_VRING_ERR: self._set_vring_err,
            F.SET_VRING_ENABLE: self._set_vring_enable,
            F.GET_CONFIG: self._get_config,
            F.SET_CONFIG: self._set_config,
            F.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            F.SET_STATUS: self._set_status,
            F.GET_STATUS: lambda ev: U64(value=self.device.status),
            F.GET_INFLIGHT_FD: self._get_inflight_fd,
            F.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        self.inflight: InflightRegion | None = None  # SET_INFLIGHT_FD (or our own GET_INFLIGHT_FD area)
        self._inflight_map: mmap.mmap | None = None

    # -- main loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the front-end disconnects (returns) or breaks the protocol (raises
        a :class:`~vhost_user.errors.RemoteProtocolError`). Always cleans up."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data, fds = await self.sock.recv(max(1, self.conn.bytes_needed))
                except Disconnected as exc:
                    self.log.info("front-end connection ended: %s", exc)
                    return
                if not data:
                    close_fds(fds, self.conn.take_unclaimed_fds())
                    self.log.info("front-end disconnected")
                    return
                try:
                    events = self.conn.receive(data, fds)
                except VhostUserError:
                    close_fds(fds, self.conn.take_unclaimed_fds())
                    raise
                for event in events:
                    assert isinstance(event, RequestReceived)
                    await self._dispatch(event)
        finally:
            self.close()

    async def _dispatch(self, event: RequestReceived) -> None:
        self.log.debug("request %s %s fds=%s", event.request.name, event.payload, event.fds)
        self.device.observe(event)
        handler = self._handlers.get(cast(FrontendRequest, event.request))  # a back-end hears front-end requests
        result: object = None
        ok = True
        taken = False
        try:
            if handler is None:
                self.log.info("unsupported request %s", event.request.name)
                ok = False
            else:
                result = handler(event)
                taken = True
                if result is False:
                    ok = False
        except VhostUserError as exc:
            self.log.warning("%s failed: %s", event.request.name, exc)
            ok = False
            result = None
        finally:
            if not taken:
                close_fds(event.fds)
        if event.answer == "ack":
            out = self.conn.ack(event.request, 0 if ok else 1)
            await self.sock.send(out.data, out.fds)
        elif event.answer == "reply":
            if result is None or result is False or result is True:
                if event.request == F.GET_CONFIG:  # size 0 = failure (vhost-user.rst)
                    result = ConfigSpace(offset=event.payload.offset, size=0, flags=0, payload=b"")
                elif event.request == F.GET_VRING_BASE:
                    result = VringState(index=event.payload.index, num=0)
                elif event.request == F.GET_INFLIGHT_FD:
                    # The reply must carry an fd; refusing means closing the connection.
                    raise LocalProtocolError("GET_INFLIGHT_FD failed or is not supported by this back-end")
                else:
                    result = U64(value=0 if ok else 1)
            fds: tuple[int, ...] = ()
            if isinstance(result, tuple):
                result, fds = result  # fds we created for the reply: ours to close after sending
            try:
                out = self.conn.reply(event.request, result, fds)
                await self.sock.send(out.data, out.fds)
            finally:
                close_fds(fds)

    # -- handlers (return a payload for replies, False for failure) ----------------------
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise BackendFailed(f"vring index {index}", 1)
        return self.vrings[index]

    def _get_features(self, ev: RequestReceived) -> U64:
        return U64(value=int(self.device.device_features) | VirtioFeatures.PROTOCOL_FEATURES)

    def _set_features(self, ev: RequestReceived) -> None:
        features = int(ev.payload.value)
        self.device.set_features(features & ~int(VirtioFeatures.PROTOCOL_FEATURES))
        if not features & VirtioFeatures.PROTOCOL_FEATURES:
            # vhost-user.rst: without PROTOCOL_FEATURES rings are enabled on start.
            for v in self.vrings:
                v.enabled = True
        for v in self.vrings:
            v.event_idx = bool(features & VirtioFeatures.RING_EVENT_IDX)

    def _get_protocol_features(self, ev: RequestReceived) -> U64:
        return U64(value=int(self.conn.offered_protocol_features))

    def _set_owner(self, ev: RequestReceived) -> None:
        self.owner = True

    def _reset(self, ev: RequestReceived) -> None:
        for v in self.vrings:
            self._stop(v)
            v.close()
            v.enabled = False
        self.device.reset()

    def _map(self, region: object, fd: int) -> None:
        """Map one region (takes ``fd``): the device's Xen mapper for a Xen region, else mmap.
        A plain region under XEN_MMAP (QEMU 8.2 and later acknowledge the feature without
        implementing it, see vhost_user.wire.codec) is mapped only from shared memory (a memfd or
        file), never from a device node such as /dev/xen/privcmd, which needs its ioctl first."""
        if isinstance(region, XenMemoryRegion):
            mapper = self.device.xen_mapper
            if mapper is None:  # pragma: no cover - XEN_MMAP is only offered with a mapper
                os.close(fd)
                raise LocalProtocolError("XEN_MMAP negotiated without a mapper")
            self.device.memory.add_backing(region, mapper(region, fd))
            return
        if self.conn.xen_mmap:
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                os.close(fd)
                raise
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise ValueError("a plain memory region under XEN_MMAP must come with a memfd or file, "
                                 f"not a {stat.filemode(mode)[0]!r} file")
            if not self._plain_under_xen_logged:
                self._plain_under_xen_logged = True
                self.log.warning("the front-end acknowledged XEN_MMAP but sends plain memory regions "
                                 "(as QEMU 8.2 and later do): mapping them as shared memory")
        self.device.memory.add(region, fd)  # type: ignore[arg-type]

    def _set_mem_table(self, ev: RequestReceived) -> bool:
        for vring in self.vrings:
            if vring.queue is not None:
                vring.base = vring.last_avail_idx
                vring.drop_queue()
        self.device.memory.clear()
        fds = list(ev.fds)
        try:
            while fds:
                region = ev.payload.regions[len(ev.payload.regions) - len(fds)]
                self._map(region, fds.pop(0))
        except (OSError, ValueError, VhostUserError) as exc:
            self.log.warning("SET_MEM_TABLE: mmap failed: %s", exc)
            for fd in fds:
                os.close(fd)
            self.device.memory.clear()
            return False
        self._remap_started()
        self.device.memory_changed()
        return True

    def _add_mem_reg(self, ev: RequestReceived) -> bool:
        if len(self.device.memory) >= self.device.max_mem_slots:
            os.close(ev.fds[0])
            return False
        try:
            self._map(ev.payload.region, ev.fds[0])
        except (OSError, ValueError, VhostUserError) as exc:
            self.log.warning("ADD_MEM_REG: mmap failed: %s", exc)
            return False
        self.device.memory_changed()
        return True

    def _rem_mem_reg(self, ev: RequestReceived) -> bool:
        for fd in ev.fds:
            os.close(fd)
        for vring in self.vrings:
            if vring.queue is not None:
                vring.base = vring.last_avail_idx
                vring.drop_queue()
        found = self.device.memory.remove(ev.payload.region)
        self.device.memory_changed()
        return found

    def _set_vring_num(self, ev: RequestReceived) -> bool:
        num = ev.payload.num
        if num == 0 or num > 32768 or num & (num - 1):
            return False  # split ring size: power of 2, <= 32768 (virtio 1.2 §2.7)
        self._vring(ev.payload.index).num = num
        return True

    def _set_vring_addr(self, ev: RequestReceived) -> None:
        self._vring(ev.payload.index).addr = ev.payload

    def _set_vring_base(self, ev: RequestReceived) -> None:
        self._vring(ev.payload.index).base = ev.payload.num

    def _get_vring_base(self, ev: RequestReceived) -> VringState:
        vring = self._vring(ev.payload.index)
        base = self._suspend(vring)
        # vhost-user.rst: GET_VRING_BASE stops the ring; kick fd is no longer polled.
        vring.set_fd("kick_fd", None)
        return VringState(index=vring.index, num=base)

    def _fd_payload(self, ev: RequestReceived) -> tuple[Vring, int | None]:
        vring = self._vring(ev.payload.value & VRING_IDX_MASK)  # raises before taking the fd
        return vring, (ev.fds[0] if ev.fds else None)

    def _set_vring_kick(self, ev: RequestReceived) -> bool:
        vring, fd = self._fd_payload(ev)
        self._stop(vring)
        vring.set_fd("kick_fd", fd)
        if fd is None:
            return False  # polling mode is not supported by Python devices
        os.set_blocking(fd, False)
        return self._start(vring)

    def _set_vring_call(self, ev: RequestReceived) -> None:
        vring, fd = self._fd_payload(ev)
        vring.set_fd("call_fd", fd)

    def _set_vring_err(self, ev: RequestReceived) -> None:
        vring, fd = self._fd_payload(ev)
        vring.set_fd("err_fd", fd)

    def _set_vring_enable(self, ev: RequestReceived) -> None:
        vring = self._vring(ev.payload.index)
        vring.enabled = bool(ev.payload.num)
        self.device.vring_enabled(vring, vring.enabled)
        if vring.enabled and vring.started:
            self._on_kick(vring, drain=False)  # kicks may have arrived while disabled

    def _get_config(self, ev: RequestReceived) -> ConfigSpace | None:
        data = self.device.get_config(ev.payload.offset, ev.payload.size)
        if len(data) != ev.payload.size:
            return None
        return ConfigSpace(offset=ev.payload.offset, size=len(data), flags=ev.payload.flags, payload=bytes(data))

    def _set_config(self, ev: RequestReceived) -> bool:
        return bool(self.device.set_config(ev.payload.offset, bytes(ev.payload.payload), ev.payload.flags))

    def _set_backend_req_fd(self, ev: RequestReceived) -> None:
        if self.channel_sock is not None:
            self.channel_sock.close()
        self.channel_sock = FdSocket(socket.socket(fileno=ev.fds[0]))
        self.channel = BackendChannelRequester(
            reply_ack=bool(self.conn.protocol_features & ProtocolFeatures.REPLY_ACK),
            send_fd=bool(self.conn.protocol_features & ProtocolFeatures.BACKEND_SEND_FD),
        )

    def _get_inflight_fd(self, ev: RequestReceived) -> tuple[Inflight, tuple[int, ...]] | None:
        """A fresh memfd for the split-ring inflight area (libvhost-user's layout, every queue
        region zeroed, version 1), mapped as ours as well until SET_INFLIGHT_FD replaces it."""
        if not self.conn.protocol_features & ProtocolFeatures.INFLIGHT_SHMFD:
            return None
        num_queues, queue_size = ev.payload.num_queues, ev.payload.queue_size
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
        ok = False
        try:
            size = region_size(num_queues, queue_size)
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as mm:
                format_region(mm, num_queues, queue_size)
            if not any(v.started for v in self.vrings):  # (running rings keep their area)
                self._map_inflight(fd, size, 0, num_queues, queue_size)
            ok = True
        except (OSError, ValueError, InflightRegionError) as exc:
            self.log.warning("GET_INFLIGHT_FD(%d queues of %d): %s", num_queues, queue_size, exc)
            return None
        finally:
            if not ok:
                os.close(fd)
        payload = Inflight(mmap_size=size, mmap_offset=0, num_queues=num_queues, queue_size=queue_size, padding=0)
        return payload, (fd,)

    def _set_inflight_fd(self, ev: RequestReceived) -> bool:
        fd = ev.fds[0]
        p = ev.payload
        try:
            if any(v.started for v in self.vrings):
                raise InflightRegionError("SET_INFLIGHT_FD while a ring runs")
            self._map_inflight(fd, p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size)
        except (OSError, ValueError, InflightRegionError) as exc:
            self.log.warning("SET_INFLIGHT_FD refused: %s", exc)
            return False
        finally:
            os.close(fd)
        return True

    def _map_inflight(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int) -> None:
        """Map ``[offset, offset+size)`` of ``fd`` (not taken) as the inflight area for the rings."""
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise InflightRegionError(f"mmap_offset {offset:#x} is not page aligned")
        if size < region_size(max(num_queues, 1), max(queue_size, 1)) or size == 0:
            raise InflightRegionError(f"mmap_size {size} too small for {num_queues} queue(s) of {queue_size}")
        if os.fstat(fd).st_size < offset + size:
            raise InflightRegionError(f"fd holds {os.fstat(fd).st_size} bytes, {offset + size} announced")
        mm = mmap.mmap(fd, size, offset=offset)
        try:
            region = InflightRegion(mm, num_queues, queue_size)
        except InflightRegionError:
            mm.close()
            raise
        self._unmap_inflight()
        self.inflight, self._inflight_map = region, mm
        for vring in self.vrings:
            vring.inflight = region.queues[vring.index] if vring.index < num_queues else None

    def _unmap_inflight(self) -> None:
        region, mm = self.inflight, self._inflight_map
        self.inflight = self._inflight_map = None
        for vring in self.vrings:
            if vring.inflight is not None:
                vring.drop_queue()  # (the ring object refers to the region)
                vring.inflight = None
        if region is not None:
            region.release()
        if mm is not None:
            mm.close()

    def _recover_inflight(self, vring: Vring) -> None:
        """libvhost-user ``vu_check_queue_inflights``: on ring start, find what a previous
        back-end left in flight; consumption resumes at used idx + that many."""
        if vring.inflight is None:
            return
        if vring.num > vring.inflight.desc_num:
            # QEMU on virtio-mmio offers rings of up to 1024 entries (VIRTIO_MMIO_QUEUE_NUM_MAX answers
            # VIRTQUEUE_MAX_SIZE) but sizes the area by vhost-user-blk's queue-size: the area cannot
            # track this ring's heads, so the ring runs without it rather than not at all.
            self.log.warning("vring %d: ring of %d entries, the inflight area tracks %d: running it without "
                             "inflight tracking (a back-end restart would not resubmit its requests)",
                             vring.index, vring.num, vring.inflight.desc_num)
            vring.inflight = None
            return
        with self.device.memory.view(vring.gpa_used + 2, 2) as view:
            (used_idx,) = struct.unpack("<H", view)
        base = vring.inflight.recover(used_idx, vring.num)
        if base is None:
            return
        if vring.inflight.pending_resubmit:
            self.log.info(
                "vring %d: resubmitting %d chain(s) left in flight (used idx %d, resuming at avail %d)",
                vring.index, vring.inflight.pending_resubmit, used_idx, base,
            )
        vring.base = base

    def _set_status(self, ev: RequestReceived) -> None:
        """Status 0 stops every ring but keeps its position: QEMU 7.2 and 8.0 send SET_STATUS(0)
        *before* GET_VRING_BASE when they stop a device (``vhost_dev_stop`` calls
        ``vhost_dev_start(false)`` first), QEMU 8.1 and later after it; either way GET_VRING_BASE
        must answer where the ring stopped, or the front-end restarts it at a stale index. The
        front-end sets every ring's base (SET_VRING_BASE) before it starts it again."""
        self.device.status = int(ev.payload.value)
        if self.device.status == 0:
            for vring in self.vrings:
                self._suspend(vring)
                vring.enabled = False
            self.device.reset()

    # -- vring start/stop and kicks ----------------------------------------------------------
    def _start(self, vring: Vring) -> bool:
        if vring.addr is None or vring.num == 0 or vring.kick_fd is None:
            return False
        try:
            vring.gpa_desc = self.device.memory.uva_to_gpa(vring.addr.desc_user_addr)
            vring.gpa_avail = self.device.memory.uva_to_gpa(vring.addr.avail_user_addr)
            vring.gpa_used = self.device.memory.uva_to_gpa(vring.addr.used_user_addr)
        except VhostUserError as exc:
            self.log.warning("vring %d: ring address not in memory table: %s", vring.index, exc)
            return False
        vring.drop_queue()
        try:
            self._recover_inflight(vring)
        except (VhostUserError, ValueError) as exc:
            self.log.warning("vring %d: inflight area unusable, ring not started: %s", vring.index, exc)
            return False
        vring.started = True
        self.device.vring_started(vring)
        assert self._loop is not None
        self._loop.add_reader(vring.kick_fd, self._on_kick, vring)
        if vring.inflight is not None and vring.inflight.pending_resubmit:
            os.eventfd_write(vring.kick_fd, 1)  # libvhost-user: "in case of I/O hang after reconnecting"
        return True

    def _remap_started(self) -> None:
        # QEMU may re-send SET_MEM_TABLE while rings run (reference trace B #31).
        for vring in self.vrings:
            if vring.started and vring.addr is not None:
                try:
                    vring.gpa_desc = self.device.memory.uva_to_gpa(vring.addr.desc_user_addr)
                    vring.gpa_avail = self.device.memory.uva_to_gpa(vring.addr.avail_user_addr)
                    vring.gpa_used = self.device.memory.uva_to_gpa(vring.addr.used_user_addr)
                except VhostUserError:
                    self._stop(vring)
                    continue
                if vring.queue is not None:
                    base = vring.last_avail_idx
                    vring.drop_queue()
                    vring.base = base

    def _suspend(self, vring: Vring) -> int:
        """Stop ``vring`` and keep its position in :attr:`Vring.base`; returns that position."""
        self._stop(vring)
        base = vring.last_avail_idx
        vring.base = base
        vring.drop_queue()
        return base

    def _stop(self, vring: Vring) -> None:
        if vring.kick_fd is not None and self._loop is not None:
            self._loop.remove_reader(vring.kick_fd)
        if vring.started:
            vring.started = False
            self.device.vring_stopped(vring)

    def _on_kick(self, vring: Vring, drain: bool = True) -> None:
        if drain and vring.kick_fd is not None:
            try:  # (not contextlib.suppress: this runs once per kick)
                os.eventfd_read(vring.kick_fd)
            except BlockingIOError:
                pass
        if not (vring.started and vring.enabled):
            return
        try:
            self.device.handle_kick(vring)
        except (VhostUserError, ValueError) as exc:
            # Bad guest data (out-of-range descriptor, malformed chain): never crash the
            # server; stop the ring, as libvhost-user's vu_panic would mark the device broken.
            self.log.error("vring %d: device error, stopping ring: %s", vring.index, exc)
            self._stop(vring)

    # -- back-end requests -------------------------------------------------------------
    async def send_config_change(self) -> None:
        """Send CONFIG_CHANGE_MSG on the back-end channel (NEED_REPLY if REPLY_ACK)."""
        if self.channel is None or self.channel_sock is None:
            raise LocalProtocolError("no back-end channel (SET_BACKEND_REQ_FD not received)")
        out = self.channel.config_change(need_reply=self.channel.reply_ack)
        await self.channel_sock.send(out.data, out.fds)
        if self.channel.pending is None:
            return
        try:
            async with asyncio.timeout(BACKEND_CHANNEL_TIMEOUT):
                while True:
                    data, fds = await self.channel_sock.recv(max(1, self.channel.bytes_needed))
                    for fd in fds:
                        os.close(fd)
                    if not data:
                        raise Disconnected("front-end closed the back-end channel")
                    events = self.channel.receive(data)
                    if events:
                        if not events[0].ok:  # type: ignore[attr-defined]
                            raise BackendFailed(events[0].request, events[0].status)  # type: ignore[attr-defined]
                        return
        except TimeoutError as exc:
            raise PeerTimeout("the ACK of CONFIG_CHANGE_MSG", BACKEND_CHANNEL_TIMEOUT) from exc

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        for vring in self.vrings:
            self._stop(vring)
            vring.close()
        if self.channel_sock is not None:
            self.channel_sock.close()
            self.channel_sock = None
        self._unmap_inflight()
        self.device.close()
        self.sock.close()


async def serve_unix(
    device_factory: Callable[[], VhostUserDevice],
    path: str | os.PathLike[str] | UnixListener,
    *,
    connections: int | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Listen on ``path`` (or on a :class:`UnixListener` given instead, e.g. one from
    :meth:`UnixListener.from_fd`; closed at the end) and serve front-ends one after another
    (``connections`` of them, or forever). Each connection gets a fresh device from
    ``device_factory``. A connection that breaks the protocol is logged and dropped; the server
    keeps listening."""
    with path if isinstance(path, UnixListener) else UnixListener(path) as listener:
        if ready is not None:
            ready()
        served = 0
        while connections is None or served < connections:
            sock = await listener.accept(timeout=None)
            served += 1
            try:
                await BackendServer(device_factory(), sock).run()
            except VhostUserError as exc:
                log.warning("front-end connection dropped: %s", exc)
