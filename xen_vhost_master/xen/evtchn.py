"""/dev/xen/evtchn: bind/unbind/notify/reset/restrict; pending ports are read from the fd (u32 each,
each delivered port stays masked) and unmasked by writing them back. The fd works with
``loop.add_reader`` (see :meth:`EventChannel.wait`).

The IOREQ loop reads, unmasks and notifies once per guest access: for it, :attr:`EventChannel.read_ports`,
:attr:`EventChannel.unmask_bytes` and :meth:`EventChannel.notifier` are the kernel calls prepared
once (``functools.partial`` of the Kernel's read and write, and its ``prepare_ioctl``: on a real
dom0 ``os.read``, ``os.write`` and ``fcntl.ioctl`` themselves, no Python frame between the caller
and the kernel), raising the kernel's :class:`OSError` as it is."""

from __future__ import annotations

import array
import asyncio
import errno
import functools
import os
import struct
from collections.abc import Callable

from xen_vhost_master.errors import XenError
from xen_vhost_master.xen.abi import (
    EvtchnIoctl,
    ioctl_evtchn_bind_interdomain,
    ioctl_evtchn_bind_unbound_port,
    ioctl_evtchn_notify,
    ioctl_evtchn_restrict_domid,
    ioctl_evtchn_unbind,
)
from xen_vhost_master.xen.device_file import XenDeviceFile
from xen_vhost_master.xen.kernel import Kernel

__all__ = ["EVTCHN_PATH", "PORT", "EventChannel", "ports_of"]

EVTCHN_PATH = "/dev/xen/evtchn"
MAX_PORTS_PER_READ = 1024  # the driver caps a read at one page of u32 ports
_NOTIFY = int(EvtchnIoctl.NOTIFY)
PORT = struct.Struct("=I")  # a port as read from and written to the fd: a native u32 (as array "I")


def ports_of(data: bytes) -> list[int]:
    """The ports in what the fd read (:attr:`EventChannel.read_ports`)."""
    if len(data) == 4:  # one port: the usual case
        return [PORT.unpack(data)[0]]
    ports = array.array("I")
    ports.frombytes(data[: len(data) - len(data) % 4])
    return list(ports)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class EventChannel(XenDeviceFile):
    """One open /dev/xen/evtchn (non-blocking)."""

    def __init__(self, kernel: Kernel, path: str = EVTCHN_PATH) -> None:
        super().__init__(kernel, path, os.O_RDWR | os.O_NONBLOCK)
        # NOTIFY's argument per port, built once (the hot path: every answered IOREQ notifies).
        self._notify_args: dict[int, ioctl_evtchn_notify] = {}
        self._prepare()

    def _prepare(self) -> None:
        #: The pending ports as the driver's read gives them (native u32s, at most
        #: MAX_PORTS_PER_READ), each left masked; BlockingIOError when none is pending.
        self.read_ports: Callable[[], bytes] = functools.partial(self.kernel.read, self.fd, 4 * MAX_PORTS_PER_READ)
        #: Unmask the ports in ``data``, bytes as :attr:`read_ports` returned them (a write of u32s).
        self.unmask_bytes: Callable[[bytes], int] = functools.partial(self.kernel.write, self.fd)

    def close(self) -> None:
        super().close()
        self._notify_args.clear()
        self._prepare()  # on the closed fd (-1): EBADF, never another file that reuses the number

    def __enter__(self) -> EventChannel:
        return self

    def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        """Bind to ``remote_domain``'s unbound ``remote_port``; returns the local port."""
        return self._ioctl(
            "evtchn bind_interdomain", EvtchnIoctl.BIND_INTERDOMAIN,
            ioctl_evtchn_bind_interdomain(remote_domain, remote_port),
        )

    def bind_unbound_port(self, remote_domain: int) -> int:
        """Allocate a local port that ``remote_domain`` may bind to."""
        return self._ioctl(
            "evtchn bind_unbound_port", EvtchnIoctl.BIND_UNBOUND_PORT, ioctl_evtchn_bind_unbound_port(remote_domain)
        )

    def unbind(self, port: int) -> None:
        self._notify_args.pop(port, None)
        self._ioctl("evtchn unbind", EvtchnIoctl.UNBIND, ioctl_evtchn_unbind(port))

    def notify(self, port: int) -> None:
        try:
            self.kernel.ioctl(self.fd, _NOTIFY, self._notify_arg(port))
        except OSError as exc:
            raise XenError("evtchn notify", exc.errno or errno.EIO) from None

    def notifier(self, port: int) -> Callable[[], int]:
        """:meth:`notify` of ``port`` as a prepared call, raising the kernel's OSError; valid
        while ``port`` stays bound and the fd open."""
        return self.kernel.prepare_ioctl(self.fd, _NOTIFY, self._notify_arg(port))

    def _notify_arg(self, port: int) -> ioctl_evtchn_notify:
        arg = self._notify_args.get(port)
        if arg is None:
            arg = self._notify_args[port] = ioctl_evtchn_notify(port)
        return arg

    def reset(self) -> None:
        self._notify_args.clear()
        self._ioctl("evtchn reset", EvtchnIoctl.RESET, None)

    def restrict_domid(self, domid: int) -> None:
        self._ioctl("evtchn restrict_domid", EvtchnIoctl.RESTRICT_DOMID, ioctl_evtchn_restrict_domid(domid))

    def read_pending(self) -> list[int]:
        """The ports that fired ([] if none). They stay masked until :meth:`unmask`."""
        try:
            data = self.read_ports()
        except BlockingIOError:
            return []
        except OSError as exc:
            raise XenError("evtchn read", exc.errno or errno.EIO) from None
        if not data:  # /dev/xen/evtchn never reaches EOF; a simulated host that died does
            raise XenError("evtchn read", errno.ENODEV)
        return ports_of(data)

    def unmask(self, *ports: int) -> None:
        if ports:
            try:
                self.unmask_bytes(PORT.pack(ports[0]) if len(ports) == 1 else array.array("I", ports).tobytes())
            except OSError as exc:
                raise XenError("evtchn unmask", exc.errno or errno.EIO) from None

    async def wait(self) -> list[int]:
        """Wait (add_reader) until at least one port is pending; returns them (still masked)."""
        loop = asyncio.get_running_loop()
        while True:
            ports = self.read_pending()
            if ports:
                return ports
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(self.fd)
