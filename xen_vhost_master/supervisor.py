"""One guest, all its devices: ordered start, hot add/remove, status, single-path teardown.

Start (docs/design.md §3 rule 10, with the guest first): Xen handles → IOREQ server created or adopted →
devices discovered, each device's window mapped → IOREQ server enabled → privcmd/evtchn
restricted → XenBus InitWait for each device → READY=1. Only then are the back-ends contacted, all
at once, each in a task of its own: a device serves the guest once its back-end has answered and
negotiated. Until then it is *waiting*: the guest's window is claimed, an access to it holds the
vCPU until the back-end is there, and the back-end is tried again with backoff for as long as the
guest lives (a back-end unit may start after the guest, or restart). A back-end that answers but is
refused for good (the wrong user, a capability the configuration requires) leaves the device
*failed*: logged, shown in ``status``, its XenBus state Closed, the guest's accesses answered as
if no device were there.

Teardown is the reverse, one step at a time, each bounded by a timeout, whatever ended the run:
SIGTERM or SIGINT, the domain going away, or a fatal error.

Devices come from the command line / TOML file and from libxl's xenstore layout
(``/local/domain/<backend>/backend/{virtio,virtio_disk}/<domid>/<devid>``), watched so that devices
added or removed at run time appear or disappear. The backend ``state`` node follows XenBus:
InitWait (2) once we serve the window (``xl create`` waits for it), Connected (4) while the guest's
driver is live, Closed (6) when the device is torn down (``xl destroy`` waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from vhost_user import (
    AsyncFrontend,
    FdSocket,
    UnixListener,
    VhostUserError,
)
from vhost_user.aio import cancel_and_wait, connect_unix_stream

from . import __version__
from .config import DeviceConfig, MemoryMode, device_from_xenstore, merge
from .datapath.base import DataPath
from .datapath.choose import GuestDataPaths, GuestResources
from .device import BackendAbsent, Device, DeviceError
from .errors import ConfigError, ExitCode, HostError, XenError, host_error
from .fastpath import KernelFastPath, NotifyRoutes
from .fdstore import FD_KINDS, Kept, group_by_device, kept_name, take_listen_fds
from .instance import RuntimeDir
from .ioreq_server import REMOVED_GRACE, IoreqServer
from .log import device_logger
from .platform import Platform
from .sd_notify import Notifier
from .status import STATUS_SCHEMA, driver_status_names, type_name
from .virtio_mmio import WINDOW_SIZE, Status, VirtioMmioDevice, check_snapshot, snapshot
from .virtio_pci import VirtioPciDevice
from .virtio_pci import snapshot as pci_snapshot
from .xen.abi import DOMID_FIRST_RESERVED
from .xen.evtchn import EventChannel
from .xen.privcmd import PrivCmd
from .xen.qmp import QMP_SOCKET_TEMPLATE, QmpError, query_pci
from .xen.xenstore import XenbusState, XenstoreClient, XenstoreError, XsTransaction

if TYPE_CHECKING:
    from .datapath.shadow import GuestInflightRecord

__all__ = ["ExitCode", "Options", "Supervisor"]

STEP_TIMEOUT = 10.0  # seconds for each teardown step
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A waiting device's back-end is tried again after WAIT_BACKOFF s, doubling up to WAIT_BACKOFF_MAX:
# a back-end that starts after the guest is served within 2 s, an absent one costs a connect()
# every 2 s. In server mode each try is a wait of WAIT_BACKOFF_MAX s for the back-end to connect.
WAIT_BACKOFF = 0.05
WAIT_BACKOFF_MAX = 2.0
QMP_TIMEOUT = 10.0  # QEMU's monitor answering query-pci (a dom0 under load, QEMU busy starting the guest)
CONNECT_TIMEOUT = 5.0  # one connect() to an AF_UNIX path: it works at once or the backlog is full
# connect() errors that mean "no back-end there yet" (no socket file, or nobody listening on it)
_ABSENT = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}
KINDS = ("virtio", "virtio_disk")


@dataclass(frozen=True)
class Options:
    domid: int
    name: str = ""  # the guest's name (the instance key); "" = the domid
    devices: tuple[DeviceConfig, ...] = ()
    xenstore: bool = True
    memory: MemoryMode = MemoryMode.AUTO
    socket_template: str | None = None  # socket of devices without socket= (None: config.SOCKET_TEMPLATE)
    backend_domid: int = 0
    runtime_dir: str | None = None  # lock, state file, status socket
    status_socket: str | None = None
    state_file: str | None = None  # what a restarted daemon needs to take over a running guest
    backend_uids: tuple[int, ...] = ()  # besides our own uid and root, who may be a back-end
    guest_arch: str | None = None  # arm64 | x86_64; default: the platform's (Platform.guest_arch)
    qmp_socket: str | None = None  # QEMU's QMP socket, to check PCI slots against; None: libxl's, "": not asked
    kernel_fast_path: bool = True  # False: privcmd ioeventfd/irqfd left unused (--no-kernel-fast-path)


@dataclass
class _Served:
    config: DeviceConfig
    device: Device
    path: str | None  # xenstore backend directory, if discovered there
    listener: UnixListener | None = None
    state_task: asyncio.Task[None] | None = field(default=None, repr=False)
    start_task: asyncio.Task[None] | None = field(default=None, repr=False)
    attempts: int = 0  # tries to reach the back-end before it answered
    waiting_since: str = ""  # the reason last logged while waiting ("" = none logged yet)
    bar: int | None = None  # transport=pci: where the function's BAR is claimed

    @property
    def backend(self) -> str:
        """connecting | waiting | failed | connected | lost, as ``status`` shows it: connecting
        until the first try at its back-end failed, waiting from then on until it answers."""
        d = self.device
        if d.refused is not None:
            return "failed"
        if not d.ready:
            return "waiting" if self.waiting_since else "connecting"
        return "lost" if d.frontend is None or d.frontend.broken else "connected"


def _check_state(state: object) -> dict[str, Any]:
    """``state`` if it has the shape :meth:`Supervisor._save_state` writes (ValueError naming what
    is wrong if not)."""
    if not isinstance(state, dict):
        raise ValueError(f"{state!r} is not an object")
    # ("name" came later than the rest: a predecessor's file may lack it; nothing reads it back)
    missing = sorted({"domid", "ioreq_server", "devices"} - state.keys())
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    domid, server, name, devices = state["domid"], state["ioreq_server"], state.get("name", ""), state["devices"]
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"domid {domid!r} is not a domain id")
    # ioservid_t is a uint16_t (xen/include/public/hvm/dm_op.h)
    if isinstance(server, bool) or not isinstance(server, int) or not 0 <= server <= 0xFFFF:
        raise ValueError(f"ioreq_server {server!r} is not an IOREQ server id")
    if not isinstance(name, str):
        raise ValueError(f"name {name!r} is not a string")
    kernel = state.get("kernel_server")  # (later still: absent in older files)
    if kernel is not None and (isinstance(kernel, bool) or not isinstance(kernel, int) or not 0 <= kernel <= 0xFFFF):
        raise ValueError(f"kernel_server {kernel!r} is not an IOREQ server id")
    if not isinstance(devices, dict):
        raise ValueError(f"devices {devices!r} is not an object")
    for base, device in devices.items():
        if not base.isdigit():
            raise ValueError(f"device key {base!r} is not a window base address")
        try:
            check_snapshot(device)
        except ValueError as e:
            raise ValueError(f"device at {int(base):#x}: {e}") from None
    return state


class Supervisor:
    def __init__(self, options: Options, platform: Platform, *, notifier: Notifier | None = None,
                 runtime: RuntimeDir | None = None, handed: dict[str, int] | None = None) -> None:
        """``runtime``: the state file's directory, opened and checked (the caller keeps it);
        without it the supervisor opens and checks it itself (:meth:`RuntimeDir.open`).
        ``handed``: the stored fds handed to this supervisor, by name (the previous image's
        :attr:`handed_over`); by default those of ``LISTEN_FDS`` (fdstore.take_listen_fds)."""
        self.opt = options
        self.domid = options.domid
        self.name = options.name or str(options.domid)
        self.platform = platform
        self.kernel = platform.kernel
        self.notifier = notifier or Notifier()
        self.log = device_logger("xen_vhost_master", options.domid)
        self.privcmd: PrivCmd | None = None
        self.evtchn: EventChannel | None = None
        self.xs: XenstoreClient | None = None
        self.ioreq: IoreqServer | None = None
        self.banks: list[tuple[int, int]] = []
        self.devices: dict[int, _Served] = {}  # by MMIO base
        self._stop = asyncio.Event()
        self._exit = ExitCode.OK
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_server: asyncio.AbstractServer | None = None
        self._saved: dict[str, Any] = {}
        self._skipped: set[str] = set()  # malformed xenstore devices already reported
        self._rejected: dict[str, tuple[str, dict[str, str], str]] = {}  # path → kind, keys, why (in status)
        self._started_at = time.time()  # (wall clock: what status shows an operator)
        self._started_mono = time.monotonic()
        self.fastpath: KernelFastPath | None = None
        self._kernel_server: IoreqServer | None = None  # the fast path's own (fastpath.py), on its own evtchn fd
        self._paths: GuestDataPaths | None = None  # once the guest's RAM layout is known
        self.restricted = False
        self.handover = False  # SIGHUP: the guest is left to the next image of this process
        self.handed_over: list[tuple[str, int]] = []  # fds for the next image (fdstore.py), by name
        self._kept: dict[int, Kept] = {}  # back-end connections the previous process kept, by devid
        self._handed = handed
        self._serving = False
        self._gone = False
        self._devices_known = False  # discovery done: the state file's devices are those of self.devices
        self.runtime = runtime
        self._own_runtime = False  # opened here, so closed here

    # --- the one entry point ---------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, the domain's end or a fatal error (full teardown), or until
        SIGHUP (handover: :attr:`handover` is then True and the caller re-executes the program)."""
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._signalled, sig)
        gone = asyncio.ensure_future(self._watch_domain()) if self.opt.xenstore else None
        try:
            await self._start_watched(gone)
            if not self._stop.is_set():
                self._serving = True
                self.notifier.ready(self._status_line())
                self.log.info("serving: %s", self._device_counts())
                await self._serve(gone)
        except ConfigError as e:
            self.log.error("configuration error: %s", e)
            self._exit = ExitCode.CONFIG
        except HostError as e:
            self.log.error("%s", e)
            self._exit = e.code
        except _DomainGone as e:
            if self.opt.xenstore:  # resolved through xenstore moments ago: it went away since
                self.log.info("%s: nothing to serve", e)
            else:
                self.log.error("%s", e)
                self._exit = ExitCode.UNAVAILABLE
        except (XenError, XenstoreError, VhostUserError, DeviceError, OSError) as e:
            if not self._serving and await self._domain_vanished():
                self.log.info("domain %d is gone (during start-up: %s): nothing to serve", self.domid, e)
            else:
                self.log.error("failed: %s", e)
                self._exit = ExitCode.TEMPFAIL
        finally:
            if gone is not None:
                self._gone = self._gone or (gone.done() and not gone.cancelled() and gone.exception() is None)
                await self._reap([gone])
            if self.handover and not self._gone and self._exit is ExitCode.OK:
                await self._hand_over()
            else:
                self.handover = False
                self.notifier.stopping()
                await self._teardown()
            for sig in SIGNALS:  # a stop asked for now finds nothing left to stop (the default would kill: 143)
                loop.add_signal_handler(sig, self._signalled_after_end, sig)
            self.notifier.close()
        return int(self._exit)

    def _signalled_after_end(self, sig: int) -> None:
        self.log.info("%s after the end: already stopped", signal.Signals(sig).name)

    def _signalled(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            if not self._serving:
                self.log.info("SIGHUP during start-up: ignored (the program starting is the current one)")
                return
            self.log.info("SIGHUP: handing the guest over to a new image of this program")
            self.handover = True
        else:
            self.log.info("%s: shutting down", signal.Signals(sig).name)
        self._stop.set()

    async def _start_watched(self, gone: asyncio.Task[None] | None) -> None:
        """:meth:`_start`, abandoned (and torn down like any failed start) on SIGTERM/SIGINT or
        if the domain goes away meanwhile: a start-up waiting on something (a back-end) must
        neither outlive its guest nor ignore the service manager."""
        start = asyncio.ensure_future(self._start())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({start, stop, *([gone] if gone else [])}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._reap([stop])
        if start.done():
            start.result()
            return
        await self._reap([start])
        if gone is not None and gone.done():
            gone.result()  # the watch's own failure, if it failed
            self._gone = True
            raise _DomainGone(f"domain {self.domid} is gone (during start-up)")
        self.log.info("start-up abandoned")

    async def _domain_vanished(self) -> bool:
        """After a failure during start-up: did it fail because the domain went away?"""
        if self.xs is not None and not self.xs.closed:
            try:
                return not await self.xs.exists(f"/local/domain/{self.domid}")
            except XenstoreError:
                pass
        if self.privcmd is not None:
            try:
                self.privcmd.maximum_gpfn(self.domid)
            except XenError as e:
                return e.errno == errno.ESRCH
        return False

    def stop(self) -> None:
        """Ask :meth:`run` to tear down and return (as SIGTERM does)."""
        self._stop.set()

    # --- start ----------------------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            self.privcmd = PrivCmd(self.kernel)
            self.evtchn = EventChannel(self.kernel)
        except XenError as e:
            raise (host_error(e) or e) from None
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, self.domid, self.log)
        self._take_kept()
        self._open_runtime()
        self._saved = self._load_state()
        self._starting("creating the IOREQ server")
        try:
            self.ioreq.create(adopt=self._saved.get("ioreq_server"))
        except XenError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
                raise _DomainGone(f"domain {self.domid} does not exist ({e})") from None
            problem = host_error(XenError("dm_op create_ioreq_server", e.errno or errno.EIO) if e.op == "dm_op" else e)
            if problem is not None:
                raise problem from None
            raise
        self._save_state()
        discovered: list[tuple[DeviceConfig, str]] = []
        if self.opt.xenstore:
            self._starting("reading the guest's devices from xenstore")
            self.xs = await self.platform.open_xenstore()
            self.banks = await self._ram_banks()
            discovered = await self._discover()
        elif self.opt.devices:
            self.banks = self._layout(await self._ram_size_from_hypervisor())
        paths = {cfg.key: path for cfg, path in discovered}
        configs = merge([c for c, _ in discovered], [self._adjust(d) for d in self.opt.devices])
        if not configs and not self.opt.xenstore:
            raise ConfigError("no devices: give --device or --config, or let xenstore discovery run")
        pci = [c for c in configs if c.pci]
        if pci and self._arch() != "x86_64":
            raise ConfigError(f"device {pci[0].devid} is transport=pci: virtio-pci functions are served to x86 HVM "
                              f"guests (--guest-arch x86_64), this guest is {self._arch()}")
        if pci and not self.ioreq.adopted:  # (a server taken over had its slots checked when it claimed them)
            await self._check_qemu_slots(pci)
        # xen-vhost-frontend: grant space as large as the guest's RAM; with RAM not where the layout
        # expects it (e.g. a UML guest at 0), up to its top frame. Asked now: once restricted,
        # privcmd only takes dm_op and foreign mappings (IOCTL_PRIVCMD_RESTRICT).
        grant_span = sum(size for _gpa, size in self.banks) or (self.privcmd.maximum_gpfn(self.domid) + 1) << 12
        self._paths = GuestDataPaths(GuestResources(
            self.platform, self.privcmd, self.domid, self.banks, grant_span,
            inflight_record=self._inflight_record, queue_failed=self._shadow_failed, log=self.log,
        ))
        self._starting(f"claiming windows of {len(configs)} device(s)")
        for cfg in configs:
            self._add_device(self._adjust(cfg), paths.get(cfg.key))
        self._devices_known = True
        self._drop_unclaimed_kept()
        self._starting("enabling the IOREQ server")
        self.ioreq.enable()
        self._adopt_kernel_server(self._saved.get("kernel_server"))
        self._restrict()
        self._detect_fast_path()
        for served in self.devices.values():
            await self._set_state(served, XenbusState.INIT_WAIT)
        if self.opt.status_socket:
            await self._start_status_socket(self.opt.status_socket)
        for served in self.devices.values():  # run once READY=1 is out (no await before it)
            self._launch(served)

    async def _check_qemu_slots(self, pci: list[DeviceConfig]) -> None:
        """Refuse (ConfigError) a function in a slot of one of QEMU's devices: Xen would route
        that function's configuration space to us and take it away from the guest's device model.
        QEMU is asked over its QMP socket (xen/qmp.py); without one the slots are not checked."""
        path = QMP_SOCKET_TEMPLATE.format(domid=self.domid) if self.opt.qmp_socket is None else self.opt.qmp_socket
        if not path:
            return
        self._starting("asking QEMU for its PCI functions")
        try:
            theirs = await query_pci(path, QMP_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.log.info("no QEMU monitor at %s (%s): PCI slots not checked against QEMU's devices", path,
                          e.strerror or e)
            return
        except (OSError, QmpError, TimeoutError) as e:
            self.log.warning("QEMU's monitor at %s did not list its PCI functions (%s): PCI slots not checked "
                             "against QEMU's devices", path, str(e) or f"no answer in {QMP_TIMEOUT:g} s")
            return
        for cfg in pci:
            slot = cfg.bdf >> 3
            taken = [f for f in theirs if f.bus == 0 and f.slot == slot]
            if taken:
                raise ConfigError(f"device {cfg.devid} (transport=pci, bdf=00:{slot:02x}.{cfg.bdf & 7}): slot 00:{slot:02x} "
                                  f"is QEMU's (the guest's device model): {', '.join(map(str, taken))}; choose a free slot")
        used = sorted({f.slot for f in theirs if f.bus == 0})
        self.log.info("QEMU's PCI functions (%s) leave slot(s) %s free", ", ".join(f"00:{s:02x}" for s in used),
                      ", ".join(f"00:{c.bdf >> 3:02x}" for c in pci))

    def _take_kept(self) -> None:
        """The back-end connections handed to this process (fdstore.py: by the service manager
        after a crash, or by this process's previous image at a handover)."""
        kept, problems = group_by_device(take_listen_fds() if self._handed is None else self._handed)
        for problem in problems:
            self.log.error("%s", problem)
        if kept:
            self.log.info("back-end connection(s) of device(s) %s handed back", sorted(kept))
        self._kept = kept

    def _drop_unclaimed_kept(self) -> None:
        """Kept connections of devices this process does not serve: closed, and dropped from the store."""
        served = {s.config.devid for s in self.devices.values()}
        for devid in [d for d in self._kept if d not in served]:
            self.log.warning("a back-end connection was kept for device %d, which is not served any more: closed",
                             devid)
            self._kept.pop(devid).close()
            for what in FD_KINDS:
                self.notifier.remove_fds(kept_name(devid, what))

    def _restrict(self) -> None:
        """Least privilege: from now on our privcmd and evtchn fds only reach this guest, and so
        does the privcmd fd that XEN_MMAP back-ends receive (IOCTL_PRIVCMD_RESTRICT,
        IOCTL_EVTCHN_RESTRICT_DOMID)."""
        assert self.privcmd is not None and self.evtchn is not None
        try:
            self.privcmd.restrict(self.domid)
            self.evtchn.restrict_domid(self.domid)
            if self._kernel_server is not None:
                self._kernel_server.evtchn.restrict_domid(self.domid)
        except XenError as e:
            self.log.warning("could not restrict privcmd/evtchn to domain %d: %s", self.domid, e)
            return
        self.restricted = True
        self.log.info("privcmd and evtchn restricted to domain %d", self.domid)

    def _detect_fast_path(self) -> None:
        """Linux >= 6.7 privcmd ioeventfd/irqfd, decided once per guest (after RESTRICT, where
        EPERM would mean "present") and logged; zero-copy devices then leave notifications to
        the kernel, their notify registers on the kernel's IOREQ server (fastpath.py)."""
        assert self.privcmd is not None and self.ioreq is not None and self.ioreq.page is not None
        if not self.opt.kernel_fast_path:
            self.log.info("kernel fast path (privcmd ioeventfd/irqfd) not used (--no-kernel-fast-path): user-space relay")
            return
        if not self.privcmd.eventfd_ioctls_supported():
            self.log.info("kernel fast path (privcmd ioeventfd/irqfd) not available: user-space relay")
            return
        self.fastpath = KernelFastPath(self.privcmd, self.domid, NotifyRoutes(self._open_kernel_server), self.log)
        self.log.info("kernel fast path available: privcmd ioeventfd/irqfd for zero-copy devices")
        for served in self.devices.values():
            cfg = served.config
            served.device.use_fast_path(self.fastpath.for_function() if cfg.pci else self.fastpath.for_device(cfg.base, cfg.irq))

    def _open_kernel_server(self) -> IoreqServer:
        """The kernel's own IOREQ server (fastpath.py), when a first queue goes on the fast path:
        the one a predecessor left, else a new one (XenError if it cannot take the notify
        registers: the queue stays on the user-space relay)."""
        assert self.privcmd is not None and self.ioreq is not None and self.ioreq.server_id is not None
        server = self._kernel_server
        if server is None:
            server = IoreqServer(self.privcmd, EventChannel(self.kernel), self.domid, self.log, through=self.ioreq)
            self._kernel_server = server  # (teardown closes it, however far it got)
            if self.restricted:
                server.evtchn.restrict_domid(self.domid)
            server.create()
            server.enable()
            self._save_state()
        if server.server_id is None:
            raise XenError("the kernel fast path's ioreq server, which could not be created", errno.EIO)
        if server.server_id < self.ioreq.server_id:
            # Xen gives an access to the most recent server holding it: the registers would stay ours
            raise XenError(f"ioreq server {server.server_id} for the kernel is not newer than ours ({self.ioreq.server_id})",
                           errno.EEXIST)
        return server

    async def _close_kernel_server(self, what: str) -> None:
        """The kernel's server destroyed (the devices gave their queues back: nothing of ours is
        routed to it), its event-channel fd closed."""
        server, self._kernel_server = self._kernel_server, None
        if server is not None:
            await self._bounded(what, server.close())
            server.evtchn.close()

    def _adopt_kernel_server(self, sid: int | None) -> None:
        """The kernel's server a predecessor left (it crashed or handed over with queues on the
        fast path): notify registers may still be routed to it, and a vCPU may wait in it (Linux
        keeps a dead process's ioeventfds; the simulator drops them). Taken over like ours:
        what reaches it is served through our windows until the fast path routes registers to
        it again, or until we stop."""
        if sid is None or self.privcmd is None or self.ioreq is None or sid == self.ioreq.server_id:
            return
        try:
            self.ioreq.dm.get_ioreq_server_info(sid)
        except XenError as e:
            self.log.info("kernel fast path server %d of a previous run is gone (%s)", sid, e)
            return
        try:
            self._kernel_server = IoreqServer(self.privcmd, EventChannel(self.kernel), self.domid, self.log,
                                              through=self.ioreq)
            self._kernel_server.create(adopt=sid)
            self._kernel_server.enable()
        except XenError as e:
            self.log.warning("kernel fast path server %d of a previous run left as it is: %s", sid, e)
            if self._kernel_server is not None:
                self._kernel_server.evtchn.close()
            self._kernel_server = None

    def _adjust(self, cfg: DeviceConfig) -> DeviceConfig:
        if cfg.memory is MemoryMode.AUTO and self.opt.memory is not MemoryMode.AUTO:
            cfg = replace(cfg, memory=self.opt.memory)
        if not cfg.socket and self.opt.socket_template:
            cfg = replace(cfg, socket=self.opt.socket_template)
        return cfg

    async def _ram_banks(self) -> list[tuple[int, int]]:
        assert self.xs is not None
        try:
            kib = int(await self.xs.read_str(f"/local/domain/{self.domid}/memory/static-max"))
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                if not await self.xs.exists(f"/local/domain/{self.domid}"):
                    raise _DomainGone(f"domain {self.domid} has no xenstore directory: is it running?") from None
                return self._layout(await self._ram_size_from_hypervisor())
            raise
        except ValueError:
            return self._layout(await self._ram_size_from_hypervisor())
        return self._layout(kib << 10)

    async def _ram_size_from_hypervisor(self) -> int:
        assert self.privcmd is not None
        top = (self.privcmd.maximum_gpfn(self.domid) + 1) << 12
        base = 0x40000000 if self._arch() == "arm64" else 0
        return max(top - base, 0)

    def _arch(self) -> str:
        return self.opt.guest_arch or self.platform.guest_arch

    def _layout(self, size: int) -> list[tuple[int, int]]:
        """libxl's RAM banks for a guest of ``size`` bytes (xen/include/public/arch-arm.h; x86 HVM)."""
        if self._arch() == "arm64":
            ram0, ram0_max, ram1 = 0x40000000, 0xC0000000, 0x200000000
        else:
            ram0, ram0_max, ram1 = 0, 0xF0000000, 1 << 32
        low = min(size, ram0_max)
        return [(ram0, low)] + ([(ram1, size - low)] if size > low else [])

    def _backend_dir(self, kind: str) -> str:
        return f"/local/domain/{self.opt.backend_domid}/backend/{kind}/{self.domid}"

    async def _discover(self) -> list[tuple[DeviceConfig, str]]:
        found = []
        self._rejected.clear()  # (each pass finds the malformed entries still there again)
        for kind in KINDS:
            for devid in await self._directory(self._backend_dir(kind)):
                cfg = await self._read_device(kind, devid)
                if cfg is not None:
                    found.append((cfg, f"{self._backend_dir(kind)}/{devid}"))
        return found

    async def _directory(self, path: str) -> list[str]:
        assert self.xs is not None
        try:
            return await self.xs.directory(path)
        except XenstoreError as e:
            if e.errno == errno.ENOENT:
                return []
            raise

    async def _read_device(self, kind: str, devid: str) -> DeviceConfig | None:
        """A device's backend keys; malformed or vanished entries are logged and skipped."""
        assert self.xs is not None
        path = f"{self._backend_dir(kind)}/{devid}"
        keys: dict[str, str] = {}
        for key in ("type", "base", "irq", "transport", "grant_usage", "specification", "state", "online"):
            try:
                keys[key] = await self.xs.read_str(f"{path}/{key}")
            except XenstoreError as e:
                if e.errno != errno.ENOENT:
                    raise
        if keys.get("online") == "0" or keys.get("state") in (str(int(XenbusState.CLOSING)), str(int(XenbusState.CLOSED))):
            return None
        if "state" not in keys:
            # libxl writes a device's directory (state included) in one transaction and removes it
            # with one rm, but these reads are separate: no state means the directory went away
            # while we read it (seen on real Xen at `xl destroy`), or it is not libxl's. Not a device.
            return None
        try:
            if not devid.isdigit():
                raise ConfigError(f"xenstore {path}: device id {devid!r} is not a number")
            return device_from_xenstore(kind, int(devid), keys)
        except ConfigError as e:
            self._rejected[path] = (kind, keys, str(e))
            # Every xenstore event re-reads the directory: say it once per distinct problem.
            if str(e) not in self._skipped:
                self._skipped.add(str(e))
                self.log.error("skipping device: %s", e)
            return None

    def _add_device(self, cfg: DeviceConfig, path: str | None) -> _Served | None:
        """Claim the device's window (or PCI function) at once; its back-end is reached later (:meth:`_launch`)."""
        assert self.ioreq is not None and self.privcmd is not None
        if cfg.key in self.devices:
            return None
        log = device_logger("xen_vhost_master.device", self.domid, cfg.devid)
        served = _Served(cfg, None, path)  # type: ignore[arg-type]
        ioreq, paths = self.ioreq, self._paths
        assert paths is not None
        if cfg.pci:
            device = Device(
                cfg, connect=lambda: self._connect(served), memory=paths.for_device(cfg),
                set_irq=lambda level: ioreq.set_pci_intx(cfg.bdf >> 3, level), log=log, guest_name=self.name,
                inject_msi=ioreq.inject_msi, on_bar=lambda address, size: self._place_bar(served, address, size),
                keeper=self.notifier,
            )
            served.device = device
            if self.fastpath is not None:
                device.use_fast_path(self.fastpath.for_function())
            ioreq.add_function(cfg.bdf, device)
            bar = self._saved_bar(cfg)
            if bar is not None:  # the guest's accesses to it wait for the device, not all-ones
                self._place_bar(served, *bar)
        else:
            device = Device(
                cfg, connect=lambda: self._connect(served), memory=paths.for_device(cfg),
                set_irq=lambda level: ioreq.set_irq(cfg.irq, level), log=log, guest_name=self.name,
                keeper=self.notifier,
            )
            served.device = device
            if self.fastpath is not None:
                device.use_fast_path(self.fastpath.for_device(cfg.base, cfg.irq))
            ioreq.add_window(cfg.base, WINDOW_SIZE, device)
        self.devices[cfg.key] = served
        log.info("virtio device %d %s claimed; back-end %s", cfg.device_id, cfg.where,
                 cfg.socket_path(self.name, self.domid))
        return served

    def _saved_bar(self, cfg: DeviceConfig) -> tuple[int, int] | None:
        """Where a PCI function a previous run served had its BAR claimed (adopted server only)."""
        assert self.ioreq is not None
        saved = self._saved.get("devices", {}).get(str(cfg.key)) if self.ioreq.adopted else None
        bar = saved.get("bar") if isinstance(saved, dict) else None
        if isinstance(bar, list) and len(bar) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in bar) \
                and 0 < bar[1] and 0 <= bar[0] < bar[0] + bar[1] <= 1 << 64:
            return bar[0], bar[1]
        return None

    def _place_bar(self, served: _Served, address: int | None, size: int) -> None:
        """The guest moved a PCI function's BAR (or turned its decoding off): claim where it is now."""
        assert self.ioreq is not None
        if address is not None and address == served.bar:
            return  # claimed there already (taken over from a previous run)
        if served.bar is not None:
            self.ioreq.remove_window(served.bar)
            served.bar = None
        if address is None:
            return
        try:
            self.ioreq.add_window(address, size, served.device)
        except XenError as e:
            served.device.log.error("BAR at %#x (+%#x) not claimed: %s", address, size, e)
            return
        served.bar = address
        served.device.log.info("BAR at %#x (+%#x) claimed", address, size)

    def _launch(self, served: _Served) -> None:
        if served.start_task is None:
            served.start_task = self._spawn(self._bring_up(served))

    async def _bring_up(self, served: _Served) -> None:
        """Reach the device's back-end, for as long as the device lives, and start serving."""
        cfg, device = served.config, served.device
        assert self.ioreq is not None
        saved = self._saved.get("devices", {}).get(str(cfg.key)) if self.ioreq.adopted else None
        kept = self._kept.pop(cfg.devid, None)
        if kept is not None and saved is None:
            self.log.warning("device %d: a back-end connection was kept but no device state: connecting afresh",
                             cfg.devid)
            kept.close()
            kept = None
        delay = WAIT_BACKOFF
        while True:
            served.attempts += 1
            paced = not cfg.listen  # (in server mode the try itself waited)
            try:
                await device.start(saved, kept=kept)
                break
            except BackendAbsent as e:
                self._waiting(served, e.reason)
            except VhostUserError as e:
                if not e.reconnect:  # the back-end refused a request: asking again will not help
                    await self._refuse(served, f"back-end refused: {e}")
                    return
                self._waiting(served, f"negotiation failed: {e}")
            except OSError as e:  # this host ran short (fds, memory, a mapping): a later try may not
                if saved is None:  # (its start released the data path) a fresh record held nothing
                    self._forget_inflight(cfg)
                self._waiting(served, f"start failed: {e}")
                paced = True
            except DeviceError as e:
                await self._refuse(served, str(e))
                return
            except Exception as e:  # a bug must not leave the guest's vCPUs held forever
                self.log.exception("device %d: starting it failed", cfg.devid)
                await self._refuse(served, f"internal error: {e!r}")
                return
            finally:
                kept = None  # (start took its fds, whatever the outcome)
            if paced:
                await asyncio.sleep(delay)  # the retry pace, not synchronisation
            delay = min(delay * 2, WAIT_BACKOFF_MAX)
        if cfg.pci and isinstance(device.model, VirtioPciDevice) and served.bar != device.model.decoding:
            self._place_bar(served, device.model.decoding, device.model.layout.bar_size)  # a BAR claimed for a state not restored
        if device.stats.last_error == served.waiting_since:
            device.stats.last_error = ""  # what kept it waiting is over
        served.state_task = self._spawn(self._follow_device(served))
        self._save_state()
        device.log.info("serving virtio device %d %s, back-end %s%s", cfg.device_id, cfg.where,
                        cfg.socket_path(self.name, self.domid), f" (after {served.attempts} tries)" if served.waiting_since else "")
        self.notifier.status(self._status_line())

    def _waiting(self, served: _Served, reason: str) -> None:
        """Log a waiting device when it starts waiting and when the reason changes."""
        served.device.stats.last_error = reason
        if reason != served.waiting_since:
            first = not served.waiting_since
            served.waiting_since = reason
            self.log.log(logging.WARNING if first else logging.INFO, "device %d: waiting for back-end at %s (%s)",
                         served.config.devid, served.config.socket_path(self.name, self.domid), reason)
        else:
            self.log.debug("device %d: back-end still not there after %d tries: %s", served.config.devid,
                           served.attempts, reason)
        self.notifier.status(self._status_line())

    async def _refuse(self, served: _Served, reason: str) -> None:
        """The back-end answered but cannot be used: the device is failed (kept in ``status``)."""
        self.log.error("device %d: not serving this device: %s", served.config.devid, reason)
        served.device.refuse(reason)
        if served.listener is not None:
            served.listener.close()
            served.listener = None
        self._forget_inflight(served.config)  # (its start released the data path) nothing will resume
        await self._set_state(served, XenbusState.CLOSED)
        self.notifier.status(self._status_line())

    def _inflight_name(self, cfg: DeviceConfig) -> str | None:
        """The device's in-flight record in the runtime directory (None without one)."""
        return f"shadow-{cfg.devid}.inflight" if self.runtime is not None else None

    def _inflight_record(self, cfg: DeviceConfig, num_queues: int) -> GuestInflightRecord | None:
        """The shadow path's guest-side in-flight record, next to state.json (kept across a
        restart like it): a restarted daemon resumes the device's queues exactly from it."""
        name = self._inflight_name(cfg)
        if name is None or self.runtime is None:
            return None
        from .datapath.shadow import GuestInflightRecord  # noqa: PLC0415

        try:
            return GuestInflightRecord(name, num_queues, cfg.queue_size, dir_fd=self.runtime.fd)
        except OSError as e:
            self.log.warning("device %d: no in-flight record (%s): a restarted daemon would resume at "
                             "the guest's used index", cfg.devid, e)
            return None

    def _shadow_failed(self, cfg: DeviceConfig, index: int, reason: str) -> None:
        served = self.devices.get(cfg.key)
        if served is not None:
            served.device.fail(f"shadow queue {index} stopped: {reason}")

    async def _connect(self, served: _Served) -> AsyncFrontend:
        """One try to reach the device's back-end; :class:`BackendAbsent` if nobody answers yet."""
        cfg = served.config
        path = cfg.socket_path(self.name, self.domid)
        if not cfg.listen:
            fe = await _connect_once(path)
            self._check_peer(fe, path)  # a socket some other user put there is not our back-end
            return fe
        if served.listener is None:
            make_socket_dir(os.path.dirname(path))
            served.listener = UnixListener(path)
            os.chmod(path, 0o600)
            if not served.waiting_since and served.device.model is None:
                self._waiting(served, "listening for it to connect")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_BACKOFF_MAX
        while True:
            try:
                fe = await AsyncFrontend.accept(served.listener, accept_timeout=max(deadline - loop.time(), 0.01))
            except VhostUserError as e:  # (PeerTimeout)
                raise BackendAbsent(path, "listening for it to connect") from e
            try:
                self._check_peer(fe, path)
            except DeviceError as e:  # any local process may connect, as often as it likes
                served.device.log.warning("%s: connection refused", e)
                await fe.close()
                continue
            return fe

    def _check_peer(self, fe: AsyncFrontend, path: str) -> None:
        """SO_PEERCRED against the allow-list: our own uid, root, and --backend-user."""
        pid, uid, _gid = fe.peer_credentials()
        if uid not in (os.getuid(), 0, *self.opt.backend_uids):
            asyncio.ensure_future(fe.close())
            raise DeviceError(f"the peer on {path} (pid {pid}) runs as uid {uid}, which is not allowed "
                              "(allow it with --backend-user)")

    async def _set_state(self, served: _Served, state: XenbusState) -> None:
        """Write the backend state, only while the toolstack's directory exists: a plain write
        would re-create a directory libxl already removed (``xl destroy`` removes it once we
        answered Closed, and the domain's end races with our teardown) and leave it behind."""
        if self.xs is None or served.path is None:
            return
        path = served.path

        async def body(tx: XsTransaction) -> bool:
            return await tx.write_if_present(path, "state", str(int(state)))

        try:
            if not await self.xs.transaction(body):
                self.log.info("xenstore %s is gone: backend state %d not written", path, state)
        except XenstoreError as e:
            self.log.warning("xenstore %s/state <- %d: %s", path, state, e)

    async def _follow_device(self, served: _Served) -> None:
        """On every start/stop of the device: save the state file, and set the XenBus state
        (Connected while the guest's driver has DRIVER_OK, InitWait otherwise)."""
        device = served.device
        shown = XenbusState.INIT_WAIT
        while True:
            await device.changed.wait()
            device.changed.clear()
            self._save_state()
            model = device.model
            want = XenbusState.CONNECTED if model is not None and model.status & Status.DRIVER_OK else XenbusState.INIT_WAIT
            if want != shown:
                await self._set_state(served, want)
                shown = want

    def _open_runtime(self) -> None:
        """The state file's directory, unless the caller handed it over: refused (exit 74) unless
        it is ours and nobody else's to write (:meth:`RuntimeDir.open`)."""
        if self.runtime is not None or not self.opt.state_file:
            return
        where = os.path.dirname(os.path.abspath(self.opt.state_file))
        try:
            self.runtime = RuntimeDir.open(where)
        except OSError as e:
            raise HostError(ExitCode.RUNTIME_DIR, f"cannot open the runtime directory {where}: "
                                                  f"{e.strerror or e}") from None
        self._own_runtime = True

    def _state_name(self) -> str | None:
        return os.path.basename(self.opt.state_file) if self.opt.state_file and self.runtime is not None else None

    def _load_state(self) -> dict[str, Any]:
        path, name = self.opt.state_file, self._state_name()
        if not path or name is None or self.runtime is None:
            return {}
        try:
            data = self.runtime.read(name)
            if data is None:
                return {}
            state = json.loads(data)
        except (OSError, ValueError) as e:
            self.log.warning("ignoring unreadable state file %s: %s", path, e)
            return {}
        try:
            state = _check_state(state)
        except ValueError as e:
            self.log.warning("ignoring malformed state file %s: %s", path, e)
            return {}
        if state["domid"] != self.domid:
            return {}
        self.log.info("state file of a previous run found: taking over")
        return state

    def _save_state(self) -> None:
        """Atomically record the IOREQ server and each device's driver-visible state."""
        path = self.opt.state_file
        if not path or self.ioreq is None or self.ioreq.server_id is None:
            return
        # A device taken over but still waiting for its back-end keeps the state it was left in
        # (all of them until the devices are known).
        pending: dict[str, Any] = self._saved.get("devices", {}) if self.ioreq.adopted else {}
        devices = {} if self._devices_known else dict(pending)
        for base, s in self.devices.items():
            # a device suspended for a handover is no longer ready, and its model is what the
            # next image restores
            if s.device.model is not None and (s.device.ready or self.handover):
                model = s.device.model
                if isinstance(model, VirtioMmioDevice):
                    devices[str(base)] = snapshot(model)
                else:
                    bar = model.decoding
                    devices[str(base)] = {**pci_snapshot(model),
                                          "bar": None if bar is None else [bar, model.layout.bar_size]}
            elif s.device.refused is None and str(base) in pending:
                devices[str(base)] = pending[str(base)]
        state = {"domid": self.domid, "name": self.name, "ioreq_server": self.ioreq.server_id, "devices": devices}
        if self._kernel_server is not None and self._kernel_server.server_id is not None:
            state["kernel_server"] = self._kernel_server.server_id
        name = self._state_name()
        if name is None or self.runtime is None:
            return
        try:
            self.runtime.write_atomic(name, json.dumps(state).encode())
        except OSError as e:
            self.log.warning("cannot save state to %s: %s", path, e)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- running --------------------------------------------------------------------------------

    async def _serve(self, gone: asyncio.Task[None] | None) -> None:
        waits: list[Callable[[], Awaitable[Any]]] = [self._stop.wait]
        if self.xs is not None:
            waits.append(self._watch_devices)
        if self.notifier.watchdog_interval:
            waits.append(self._watchdog)
        tasks = [asyncio.ensure_future(w()) for w in waits]
        try:
            done, _ = await asyncio.wait([*tasks, *([gone] if gone else [])], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise a watcher's failure
            if gone is not None and gone in done:
                self._gone = True
        finally:
            await self._reap(tasks)

    async def _reap(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel ``tasks`` and wait for them, bounded. A task can swallow its cancellation (an
        awaited cancel-and-wait below it, e.g. a device teardown, consumes the CancelledError) and
        go on waiting for events: it is cancelled again until it ends (seen when the domain went
        away while a device removal ran: the daemon never exited)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_TIMEOUT
        pending = {t for t in tasks if not t.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if pending and loop.time() > deadline:
                self.log.warning("%d watcher task(s) ignore cancellation; leaving them", len(pending))
                break
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.log.debug("watcher ended with %r", task.exception())

    async def _watch_devices(self) -> None:
        """Hot add/remove: xenstored fires on any change below the backend directories."""
        assert self.xs is not None
        watches = [await self.xs.watch(self._backend_dir(kind), token=f"dev-{kind}") for kind in KINDS]
        queue: asyncio.Queue[str] = asyncio.Queue()

        async def pump(w: Any) -> None:
            async for ev in w:
                queue.put_nowait(ev.path)

        pumps = [asyncio.ensure_future(pump(w)) for w in watches]
        try:
            while True:
                paths = [await queue.get()]
                while not queue.empty():
                    paths.append(queue.get_nowait())
                await self._on_events(paths)
        finally:
            for p in pumps:
                p.cancel()
            for w in watches:
                with contextlib.suppress(XenstoreError):
                    await w.unwatch()

    async def _on_events(self, paths: list[str]) -> None:
        """An event on a served device's ``state`` or ``online`` key (or its directory) decides
        that device's removal at once, from those two keys: libxl's Closing is answered without
        a rescan first (libxl waits 10 s for Closed, each xenstore round trip is slow on a loaded
        dom0: tests/daemon/test_removal_rounds.py). Any other event (a device added, a directory
        the daemon refused, the watch's first firing) rescans the backend directories."""
        rescan = False
        checked: list[_Served] = []
        for path in paths:
            served = self._served_by(path)
            if served is None:
                rescan = True
            elif served not in checked:
                checked.append(served)
        changed = False
        for served in checked:
            changed = await self._check_removed(served) or changed
        if rescan:
            await self._reconcile()
        elif changed:
            self.notifier.status(self._status_line())

    def _served_by(self, path: str) -> _Served | None:
        """The served device ``path`` is the state or online key (or the directory) of, unless
        its directory was refused as malformed: only a rescan decides about such a device."""
        for served in self.devices.values():
            if served.path is not None and served.path not in self._rejected and path in (
                    served.path, f"{served.path}/state", f"{served.path}/online"):
                return served
        return None

    async def _check_removed(self, served: _Served, *, listed: bool = True) -> bool:
        """Tear the device down if the toolstack closes it or its directory is gone (or, with
        ``listed`` False, a rescan did not find it as a device any more); True if it did."""
        assert self.xs is not None and served.path is not None
        state, online = (None if v is None else v.decode("utf-8", "replace")
                         for v in await self.xs.read_many([f"{served.path}/state", f"{served.path}/online"]))
        why = _removal(state, online, refused=served.device.refused is not None, listed=listed)
        if why is None:
            return False
        self.log.info("device %d%s: tearing it down", served.config.devid, why)
        await self._remove_device(served.config.key)
        return True

    async def _reconcile(self) -> None:
        assert self.ioreq is not None
        found = {cfg.key: (cfg, path) for cfg, path in await self._discover()}
        explicit = {d.key for d in self.opt.devices}
        for base, served in list(self.devices.items()):
            # A configured device matched with a xenstore directory is the toolstack's too: its
            # Closing (or its directory gone) removes it. Only while the entry is one the daemon
            # cannot parse does it stay served from the configuration, whose settings win anyway.
            configured_only = base in explicit and served.path in self._rejected
            if served.path is not None and base not in found and not configured_only:
                await self._check_removed(served, listed=False)
        for base, (cfg, path) in found.items():
            if base not in self.devices:
                self.log.info("device %d added in xenstore", cfg.devid)
                added = self._add_device(self._adjust(cfg), path)
                if added is not None:
                    await self._set_state(added, XenbusState.INIT_WAIT)
                    self._launch(added)
        self.notifier.status(self._status_line())

    async def _remove_device(self, base: int) -> None:
        """Tear one device down. Its entry stays in :attr:`devices` until its back-end, data path
        and socket are released: a removal cancelled before (the watcher that started it is
        reaped because the domain went away) is done again, in full, by the teardown. From its
        Closed write on it goes, and the guest's RAM is unmapped, even if cancelled (the window
        then goes with the IOREQ server)."""
        assert self.ioreq is not None
        served = self.devices.get(base)
        if served is None:
            return
        if served.config.pci:
            self.ioreq.remove_function(served.config.bdf)
            if served.bar is not None:
                self.ioreq.remove_window(served.bar)
                served.bar = None
        else:
            self._retire(base, served)
        if served.state_task is not None:
            served.state_task.cancel()
        try:
            await cancel_and_wait(served.start_task)  # a waiting device stops trying
        except Exception as e:  # noqa: BLE001 - _bring_up catches what a try raises; this is a bug
            self.log.error("device %d: its start ended with %r", served.config.devid, e)
        try:
            async with asyncio.timeout(2 * STEP_TIMEOUT):  # (the device bounds its back-end's stop itself)
                await served.device.close(stop_timeout=STEP_TIMEOUT)
        except TimeoutError:
            self.log.warning("device %d: not released within %.0f s", served.config.devid, 2 * STEP_TIMEOUT)
        if served.listener is not None:
            served.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(served.config.socket_path(self.name, self.domid))
            served.listener = None
        # Closed now: nothing of the device touches guest RAM any more, and libxl gives the
        # back-end 10 s for it (tests/xenlab/README.md, "Xen 4.20"). The window's grace for a
        # guest interrupt handler in flight, and unmapping the guest's RAM (slow on real Xen: the
        # foreign mapping goes page by page), come after.
        try:
            await self._set_state(served, XenbusState.CLOSED)
            await self.ioreq.remove_window_after_grace(base, 0 if self._gone else REMOVED_GRACE)
        finally:  # cancelled or failed: the guest's pages must not stay mapped all the same
            self.devices.pop(base, None)
            self._forget_inflight(served.config)  # the device is gone: nothing to resume
            self._release_guest_memory()

    def _retire(self, base: int, served: _Served) -> None:
        """A device goes while its guest may run on: its virtio-mmio window answers as a removed
        device with its line raised no more, and its driver is asked not to notify again, so that
        nothing touches the window any more by the time it is unclaimed."""
        assert self.ioreq is not None
        self.ioreq.retire_window(base, served.config.irq)
        if not self._gone:
            served.device.quiesce()

    def _forget_inflight(self, cfg: DeviceConfig) -> None:
        name = self._inflight_name(cfg)
        if name is not None and self.runtime is not None:
            try:
                self.runtime.unlink(name)
            except OSError as e:
                self.log.warning("device %d: cannot remove its in-flight record %s: %s", cfg.devid, name, e)

    def _release_guest_memory(self) -> None:
        """Unmap the guest's RAM as soon as no shadow device needs it: `xl destroy` removes the
        devices first and Xen cannot finish destroying a domain whose pages dom0 still maps."""
        began = time.monotonic()
        if self._paths is not None and self._paths.release_guest_memory([s.device.memory for s in self.devices.values()]):
            self.log.info("guest RAM unmapped in %.1f s", time.monotonic() - began)

    async def _watch_domain(self) -> None:
        """Return when the domain is gone (destroyed, or shut down and released). On a xenstore
        connection of its own, so that it watches from the first moment of start-up on."""
        xs = await self.platform.open_xenstore()
        async with xs, await xs.watch("@releaseDomain", token="release") as w:
            async for _ in w:  # xenstored fires a new watch once at once: the first check
                if not await xs.exists(f"/local/domain/{self.domid}"):
                    self.log.info("domain %d is gone", self.domid)
                    return

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``status`` shows (status.py renders it; its keys are STATUS_SCHEMA's): every
        device, whatever its state, and the xenstore entries refused as malformed (failed)."""
        devices = []
        for served in self.devices.values():
            d, cfg = served.device, served.config
            status = int(d.model.status) if d.model else 0
            devices.append({
                "devid": cfg.devid, "device_id": cfg.device_id, "type": type_name(cfg.device_id),
                "base": cfg.where if cfg.pci else hex(cfg.base), "irq": _irq_name(d) if cfg.pci else cfg.irq,
                "socket": cfg.socket_path(self.name, self.domid), "mode": "server" if cfg.listen else "client",
                "backend": served.backend, "attempts": served.attempts,
                "data_path": d.memory.name,
                "status": status, "driver_status": driver_status_names(status),
                "features": hex(d.model.driver_features) if d.model else "0x0",
                "kicks": d.stats.per_queue_kicks, "calls": d.stats.per_queue_calls,
                "reads": d.stats.reads, "writes": d.stats.writes, "interrupts": d.stats.interrupts,
                "reconnects": d.stats.reconnects, "guest_errors": d.stats.guest_errors, "last_error": d.stats.last_error,
                "data_path_stats": _data_path_stats(d.memory),
                "kernel_queues": sorted(d.fastpath.assigned) if d.fastpath else [],
            })
        for path, (kind, keys, reason) in sorted(self._rejected.items()):
            devid = path.rsplit("/", 1)[1]
            devices.append({
                "devid": int(devid) if devid.isdigit() else devid, "device_id": None, "type": keys.get("type", "?"),
                "base": keys.get("base", "?"), "irq": keys.get("irq", "?"), "socket": "", "mode": "",
                "backend": "failed", "attempts": 0, "data_path": "none", "status": 0, "driver_status": [],
                "features": "0x0", "kicks": {}, "calls": {}, "reads": 0, "writes": 0, "interrupts": 0,
                "reconnects": 0, "guest_errors": 0, "last_error": f"xenstore {kind} entry refused: {reason}",
                "data_path_stats": None, "kernel_queues": [],
            })
        ioreq = self.ioreq.stats if self.ioreq else None
        waiting = sorted({v for server in (self.ioreq, self._kernel_server) if server for v in server.waiting()})
        return {"schema": STATUS_SCHEMA, "version": __version__,
                "domid": self.domid, "name": self.name, "pid": os.getpid(),
                "started": round(self._started_at, 3), "uptime": round(time.monotonic() - self._started_mono, 3),
                "devices": devices, "restricted": self.restricted,
                "kernel_fast_path": self.fastpath is not None,
                "ioreqs": {"served": ioreq.served, "spurious": ioreq.spurious, "refused": ioreq.refused,
                           "per_vcpu": list(ioreq.per_vcpu), "waiting": waiting} if ioreq else {}}

    def _starting(self, step: str) -> None:
        """``STATUS=`` during start-up, before READY: the step under way."""
        self.notifier.status(f"dom{self.domid}: {step}")

    def _device_counts(self) -> str:
        """e.g. "1 device(s) serving, 1 waiting" (", N connecting" and ", N failed" when there are)."""
        states = [s.backend for s in self.devices.values()]
        serving = sum(state in ("connected", "lost") for state in states)
        line = f"{serving} device(s) serving, {states.count('waiting')} waiting"
        for state in ("connecting", "failed"):
            if n := states.count(state):
                line += f", {n} {state}"
        return line

    def _status_line(self) -> str:
        """``STATUS=``: the device counts, and what the first waiting device waits for, e.g. "dom5:
        1 device(s) serving, 1 waiting; waiting for back-end /run/vhost-user/web1/51712.sock
        (attempt 3)"."""
        line = f"dom{self.domid}: {self._device_counts()}"
        waiting = [s for s in self.devices.values() if s.backend == "waiting"]
        if waiting:
            first = waiting[0]
            line += (f"; waiting for back-end {first.config.socket_path(self.name, self.domid)} "
                     f"(attempt {first.attempts})")
            if len(waiting) > 1:
                line += f" and {len(waiting) - 1} more"
        return line

    async def _start_status_socket(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(json.dumps(self.status()).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        self._status_server = await asyncio.start_unix_server(answer, path)
        os.chmod(path, 0o600)

    # --- teardown -------------------------------------------------------------------------------

    def _stop_tasks_and_status(self) -> None:
        """The first step of both ends (teardown, handover): our tasks and the status socket (and
        kept back-end connections no device took: a device not brought up yet connects afresh)."""
        for task in list(self._tasks):
            task.cancel()
        for kept in self._kept.values():
            kept.close()
        self._kept.clear()
        if self._status_server is not None:
            self._status_server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.opt.status_socket or "")

    async def _teardown(self) -> None:
        """Reverse order, one step at a time, each bounded."""
        self._stop_tasks_and_status()
        if self.ioreq is not None:  # every device goes at once: answered as removed, lines low
            for base, served in self.devices.items():
                self._retire(base, served)
        for base in list(self.devices):
            try:
                await self._remove_device(base)
            except Exception:  # noqa: BLE001 - a bug in one device's teardown must not keep the rest
                self.log.exception("device at %#x: its teardown failed", base)
                self.devices.pop(base, None)
        await self._close_kernel_server("kernel fast path server teardown")
        if self.ioreq is not None:
            await self._bounded("ioreq server teardown", self.ioreq.close())
            name = self._state_name()
            if self.ioreq.server_id is None and name is not None and self.runtime is not None:
                with contextlib.suppress(OSError):
                    self.runtime.unlink(name)  # a clean stop: nothing to take over
        if self.xs is not None:
            await self.xs.close()
        if self._paths is not None:
            self._paths.close()
        for handle in (self.evtchn, self.privcmd):
            if handle is not None:
                handle.close()
        self._close_runtime()
        self.log.info("stopped")

    async def _hand_over(self) -> None:
        """SIGHUP: leave the guest to the next image of this process, which adopts it the way a
        restarted daemon does (state.json): guest accesses stop being taken (the vCPUs wait in
        the IOREQ server, which stays enabled with its ranges), each device's back-end rings are
        stopped without a reset and its connection closed (the model's state and the shadow
        path's in-flight record stay), the state is saved, and every handle is closed without
        destroying the server or writing XenBus Closed."""
        assert self.ioreq is not None
        self.notifier.reloading()
        self.log.info("handover: keeping ioreq server %s and %d device(s) for the next image",
                      self.ioreq.server_id, len(self.devices))
        self._stop_tasks_and_status()
        await self._bounded("handover: guest accesses in progress", self.ioreq.stop_serving(STEP_TIMEOUT))
        for served in self.devices.values():
            await self._bounded(f"handover: device {served.config.devid}", self._suspend(served.device))
            if served.listener is not None:
                served.listener.close()
        self._save_state()
        self.ioreq.detach()
        if self._kernel_server is not None:  # (the next image adopts it as well)
            self._kernel_server.detach()
            self._kernel_server.evtchn.close()
            self._kernel_server = None
        if self.xs is not None:
            await self.xs.close()
        if self._paths is not None:
            self._paths.close(unmap=False)  # the shadow paths' views of guest RAM stay as they are
        for handle in (self.evtchn, self.privcmd):
            if handle is not None:
                handle.close()
        self._close_runtime()
        self.notifier.keep_for_exec()
        self.log.info("handover: state saved, handing over")

    async def _suspend(self, device: Device) -> None:
        self.handed_over += await device.suspend()

    def _close_runtime(self) -> None:
        if self._own_runtime and self.runtime is not None:
            self.runtime.close()
            self.runtime, self._own_runtime = None, False

    async def _bounded(self, what: str, op: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await op
        except TimeoutError:
            self.log.warning("%s did not finish within %.0f s", what, STEP_TIMEOUT)
        except XenError as e:
            self.log.warning("%s: %s", what, e)


def _irq_name(device: Device) -> str:
    """How a PCI function interrupts now: msi-x or intx (as ``status`` shows it)."""
    model = device.model
    return "msi-x" if isinstance(model, VirtioPciDevice) and model.msix_enabled else "intx"


def _data_path_stats(path: DataPath) -> dict[str, Any] | None:
    """The copying path's own figures, summed over its queues (None for a path that does not
    see the requests: zero-copy back-ends read the guest's rings themselves)."""
    from .datapath.grant_export import GrantShadowDataPath  # noqa: PLC0415
    from .datapath.shadow import LATENCY_BOUNDS_NS, ShadowDataPath  # noqa: PLC0415  (loaded with the first shadow device)

    if not isinstance(path, ShadowDataPath):
        return None
    total = path.totals()
    return {
        "requests": total.completed, "published": total.chains,
        "bytes_read": total.bytes_in, "bytes_written": total.bytes_out,
        "inflight": path.inflight_total(), "held": total.held, "held_now": path.held_queues,
        "resubmitted": total.resubmitted,
        "pool_bytes": path.pool.capacity, "pool_used_bytes": path.pool.capacity - path.pool.free_bytes,
        "latency_bounds": [b / 1e9 for b in LATENCY_BOUNDS_NS], "latency_counts": total.latency,
        "latency_sum": total.latency_sum_ns / 1e9,
        "grants": asdict(path.grant_memory.stats) if isinstance(path, GrantShadowDataPath) else None,
    }


def _removal(state: str | None, online: str | None, *, refused: bool, listed: bool) -> str | None:
    """Why a device whose backend directory has these ``state`` and ``online`` keys (None:
    absent) goes, as its log line says it after "device N" (None: it stays). libxl's removal
    (``xl destroy``, ``xl block-detach``) writes online 0 and state Closing in one transaction
    (tests/xenlab/README.md, "Real Xen vs the simulator"); a failed device's Closed is its own
    answer to its refused back-end, not a removal; ``listed`` False: a rescan no longer finds
    the directory as a device (its keys changed)."""
    if state is None:  # libxl removes a directory in one rm; without state it is not libxl's
        return " removed from xenstore"
    if state == str(int(XenbusState.CLOSING)):
        return f": toolstack closing (state {state})"
    if online == "0":
        return ": toolstack closing (online 0)"
    if state == str(int(XenbusState.CLOSED)):
        return None if refused else f": closed in xenstore (state {state})"
    return None if listed else ": no longer listed in xenstore"


class _DomainGone(Exception):
    pass


def make_socket_dir(path: str) -> None:
    """Create a server-mode socket's directory (e.g. ``/run/vhost-user/<name>``) and any missing
    parent, each 0755 whatever the umask (the unit's is 0077): a back-end running as another user
    must be able to reach the socket, whose own mode (0600) says who may connect."""
    if not path or os.path.isdir(path):
        return
    make_socket_dir(os.path.dirname(path))
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return
    os.chmod(path, 0o755)


async def _connect_once(path: str) -> AsyncFrontend:
    """Client mode: one connect() to the back-end's socket (:class:`BackendAbsent` if there is no
    socket or nobody listens on it); the socket is closed on every failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    connected = False
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await connect_unix_stream(sock, path)  # (a back-end's full backlog waited out)
        connected = True
    except TimeoutError:
        raise BackendAbsent(path, f"connect() did not complete within {CONNECT_TIMEOUT:g} s (its listen backlog stayed full)") from None
    except OSError as e:
        if e.errno in _ABSENT:
            raise BackendAbsent(path, e.strerror or str(e)) from None
        raise
    finally:
        if not connected:
            sock.close()
    return AsyncFrontend(FdSocket(sock))
