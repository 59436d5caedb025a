"""/dev/xen/evtchn: bind/unbind/notify/reset/restrict; pending ports are read from the fd (u32 each,
each delivered port stays masked) and unmasked by writing them back. The fd works with
``loop.add_reader`` (see :meth:`EventChannel.wait`)."""

from __future__ import annotations

import array
import asyncio
import errno
import os
import struct

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

__all__ = ["EVTCHN_PATH", "EventChannel"]

EVTCHN_PATH = "/dev/xen/evtchn"
MAX_PORTS_PER_READ = 1024  # the driver caps a read at one page of u32 ports
_NOTIFY = int(EvtchnIoctl.NOTIFY)
_PORT = struct.Struct("=I")  # a port as read from and written to the fd: a native u32 (as array "I")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class EventChannel(XenDeviceFile):
    """One open /dev/xen/evtchn (non-blocking)."""

    def __init__(self, kernel: Kernel, path: str = EVTCHN_PATH) -> None:
        super().__init__(kernel, path, os.O_RDWR | os.O_NONBLOCK)
        # NOTIFY's argument per port, built once (the hot path: every answered IOREQ notifies).
        self._notify_args: dict[int, ioctl_evtchn_notify] = {}

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
        arg = self._notify_args.get(port)
        if arg is None:
            arg = self._notify_args[port] = ioctl_evtchn_notify(port)
        try:
            self.kernel.ioctl(self.fd, _NOTIFY, arg)
        except OSError as exc:
            raise XenError("evtchn notify", exc.errno or errno.EIO) from None

    def reset(self) -> None:
        self._notify_args.clear()
        self._ioctl("evtchn reset", EvtchnIoctl.RESET, None)

    def restrict_domid(self, domid: int) -> None:
        self._ioctl("evtchn restrict_domid", EvtchnIoctl.RESTRICT_DOMID, ioctl_evtchn_restrict_domid(domid))

    def read_pending(self) -> list[int]:
        """The ports that fired ([] if none). They stay masked until :meth:`unmask`."""
        try:
            data = self.kernel.read(self.fd, 4 * MAX_PORTS_PER_READ)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise XenError("evtchn read", exc.errno or errno.EIO) from None
        if not data:  # /dev/xen/evtchn never reaches EOF; a simulated host that died does
            raise XenError("evtchn read", errno.ENODEV)
        if len(data) == 4:  # one port: the usual case
            return [_PORT.unpack(data)[0]]
        ports = array.array("I")
        ports.frombytes(data[: len(data) - len(data) % 4])
        return list(ports)

    def unmask(self, *ports: int) -> None:
        if ports:
            try:
                self.kernel.write(self.fd, _PORT.pack(ports[0]) if len(ports) == 1 else array.array("I", ports).tobytes())
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
