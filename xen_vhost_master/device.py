"""One virtio device of a guest: the transport's model wired to a vhost-user back-end.

The IOREQ server hands guest register accesses to :meth:`Device.mmio` (and, for a virtio-pci
function, configuration-space accesses to :meth:`Device.pci_config`); the pure model
(:mod:`.virtio_mmio`, :mod:`.virtio_pci`) answers and returns actions, which this class carries out:
start or stop the back-end's rings, forward config writes, kick queue eventfds, drive the
interrupt line. Accesses are served one at a time per device. The driver's DRIVER_OK write waits
for the back-end's start for START_WAIT at most (one that behaves is done by then, so the write
completes after the start, as with QEMU): a back-end that hangs or maps slowly at SET_MEM_TABLE must
not hold the guest's vCPU. The start then goes on alone (bounded by START_TIMEOUT); the guest's
notifies meanwhile are handed to the queues once they run, and a start that fails puts the device
in DEVICE_NEEDS_RESET and drops the back-end (reconnected for the next bring-up). The
driver's reset waits for the back-end's rings to stop for RESET_WAIT at most: virtio 1.2 §4.2.2.1
has the driver read Status back until it is 0, so a back-end that hangs or fails at GET_VRING_BASE
must not hold the guest's vCPU. The stop then finishes on its own (bounded by RESET_STOP_TIMEOUT,
then the back-end is dropped and reconnected), and the next start waits for it. A reconnect's
start of the rings (which the device's writes wait for) is abandoned when the driver resets the
device: its connection is dropped, and a new one serves the next bring-up. A config-space write
waits for the back-end's SET_CONFIG ack for CONFIG_REPLY_TIMEOUT at most (it must precede the
requests the driver makes next); a back-end silent that long is dropped (reconnected) and the
device put in DEVICE_NEEDS_RESET. One made while a start outlives the DRIVER_OK write is answered
at once and sent before the start's rings (one made as they start: before the notifies made
meanwhile, which wait for the start too), so a back-end slow to map holds no vCPU through it either.

The user-space notification relay lives here too: QueueNotify → ``eventfd_write(kick)``, the
back-end's call eventfd (add_reader) → InterruptStatus + interrupt line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vhost_user import (
    AsyncFrontend,
    BackendRequest,
    FdSocket,
    InflightFd,
    Negotiated,
    ProtocolFeatures,
    RequestReceived,
    VhostUserError,
)
from vhost_user.aio import DEFAULT_PROTOCOL_FEATURES, REQUEST_TIMEOUT, cancel_and_wait

from . import devtypes
from .config import DeviceConfig
from .datapath.base import DataPath, DataPathChooser
from .errors import DaemonError, GuestFault, XenError
from .fdstore import FD_KINDS, Keeper, Kept, SessionMeta, kept_name, new_meta_fd, read_snapshot, write_snapshot
from .fastpath import PciKickFastPath, QueueFastPath
from .log import DeviceLogger, LimitedLogger
from .virtio_mmio import (
    F_ACCESS_PLATFORM,
    F_VERSION_1,
    Activate,
    ConfigWrite,
    GuestError,
    IrqLevel,
    Msi,
    Notify,
    QueueConfig,
    Reg,
    Reset,
    Status,
    VirtioMmioDevice,
    guest_features,
)
from .virtio_mmio import restore as restore_model
from .virtio_mmio import snapshot
from .virtio_pci import BarMap, Common, VirtioPciDevice
from .virtio_pci import restore as restore_function

__all__ = ["BackendAbsent", "Device", "DeviceError", "DeviceStats"]

MAX_CONFIG_SIZE = 256  # virtio-mmio config window 0x100..0x1ff; QEMU's VHOST_USER_MAX_CONFIG_SIZE too
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")
_REG_STATUS, _REG_QUEUE_READY = int(Reg.STATUS), int(Reg.QUEUE_READY)  # (plain ints: compared on every register write)
RECONNECT_WINDOW = 60.0  # seconds a lost back-end may take to come back before NEEDS_RESET
RECONNECT_BACKOFF = 0.05  # first pause between reconnect attempts (doubling, capped)
RECONNECT_BACKOFF_MAX = 1.0
# After close() dropped the back-end's connection, how long a back-end operation of a guest access
# may still hold the device (it fails at once: its connection is gone) before the release waits no more.
RELEASE_WAIT = 1.0
# A back-end may answer each request just inside the request timeout: the whole negotiation of a
# connection is bounded too (then TimeoutError, an OSError: the device waits and tries again). As
# long as one answer may take: a back-end slow on a loaded dom0 is waited for (the library logs it
# after SLOW_REPLY_AFTER), a dead one fails the negotiation at once (its socket's EOF or ECONNRESET).
NEGOTIATION_TIMEOUT = REQUEST_TIMEOUT
# Each step of the check of a connection kept from the previous process (fdstore.py): GET_FEATURES
# and stopping the rings it left running, then reading its config. The guest's accesses are held
# meanwhile, and a failed check costs only a fresh connection (negotiated under NEGOTIATION_TIMEOUT):
# a kept back-end silent this long is given up on rather than waited for.
KEPT_TIMEOUT = 5.0
# While the device stops (close: removal, the daemon stopped; suspend: a handover), each back-end
# reply is waited for this long at most, so that a stop stays bounded: the back-end that has not
# answered by then is dropped.
STOP_REPLY_TIMEOUT = 5.0
# Seconds the driver's reset write waits for the back-end's rings to stop. One that behaves stops in
# milliseconds, and waiting for it keeps a driver that frees its rings after the reset from racing
# a back-end that maps guest RAM (zero copy); a vCPU held longer looks like a lockup to the guest.
RESET_WAIT = 1.0
RESET_STOP_TIMEOUT = 5.0  # the stop's bound after that: the back-end is dropped and reconnected
# Seconds a guest's config-space write waits for the back-end's SET_CONFIG ack (REPLY_ACK); the
# guest's vCPU is held meanwhile. Not answered early with the rest left to a task, as a reset or
# DRIVER_OK is: the device acts on the field written for the requests the driver makes next
# (virtio 1.2 §5.2.5: virtio-blk's cache mode, set through the writeback field), and the guest's
# notifies reach the back-end's kick eventfds at once, not behind the write. A back-end silent this
# long fails the write: its connection is broken (PeerTimeout) and the device set DEVICE_NEEDS_RESET.
CONFIG_REPLY_TIMEOUT = 5.0
# Seconds the driver's DRIVER_OK write waits for the back-end's start (SET_FEATURES, SET_MEM_TABLE,
# SET_VRING_*). One that behaves answers in milliseconds, and the write completing after the start
# keeps QEMU's order; a back-end may take up to the library's MEM_TABLE_TIMEOUT (120 s) to map guest
# RAM, and a vCPU held that long looks like a soft lockup to the guest.
START_WAIT = 1.0
# The whole start's bound (each request has its own): then DEVICE_NEEDS_RESET, the back-end dropped.
# Above MEM_TABLE_TIMEOUT: a Linux guest does not recover a device from NEEDS_RESET by itself, so a
# slow back-end is waited for rather than failed.
START_TIMEOUT = 180.0
# At a handover, how long a back-end may take, after GET_VRING_BASE, to complete what it took from a
# shadow ring (the spec's "suspended" back-end has: a conforming one drains before it answers); one
# that has not by then gets its connection closed rather than completions into the next image's rings.
SUSPEND_DRAIN = 2.0
# Back-end losses in a row delay the next reconnect: from the second loss of a streak on,
# RECONNECT_BACKOFF doubled per loss, at most LOSS_BACKOFF_MAX, so a back-end that accepts and
# drops (or floods) at once cannot make the daemon spin. A completion relayed to the guest, or a
# connection that lived LOSS_STREAK_FORGET seconds, ends a streak. (What is replayed to the new
# back-end is bounded by the data path: datapath.shadow.MAX_LOSSES_IN_FLIGHT.)
LOSS_BACKOFF_MAX = 10.0
LOSS_STREAK_FORGET = 60.0


class DeviceError(Exception):
    """The device cannot be served (e.g. the back-end lacks a capability we need)."""


class BackendAbsent(Exception):
    """Nobody answers at the back-end's socket yet (no socket file, connection refused, or in
    server mode no back-end has connected): worth trying again later, unlike :class:`DeviceError`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class DeviceStats:
    reads: int = 0
    writes: int = 0
    notifies: int = 0
    interrupts: int = 0
    guest_errors: int = 0
    starts: int = 0
    stops: int = 0
    reconnects: int = 0
    last_error: str = ""
    per_queue_kicks: dict[int, int] = field(default_factory=dict)
    per_queue_calls: dict[int, int] = field(default_factory=dict)


_Read = Callable[[int, int], tuple[int, list[Any]]]  # (offset, size) -> (value, actions)
_Write = Callable[[int, int, int], list[Any]]  # (offset, size, value) -> actions
_CFG_ON_MMIO = "PCI configuration access to a virtio-mmio device"


def _mmio_config_read(offset: int, size: int) -> tuple[int, list[Any]]:
    return (1 << (8 * size)) - 1, [GuestError(_CFG_ON_MMIO)]


def _mmio_config_write(offset: int, size: int, value: int) -> list[Any]:
    return [GuestError(_CFG_ON_MMIO)]


def _no_model_read(offset: int, size: int) -> tuple[int, list[Any]]:
    return (1 << (8 * size)) - 1, []


def _no_model_write(offset: int, size: int, value: int) -> list[Any]:
    return []


def _no_device(size: int, is_write: bool) -> int | None:
    """What an access to a window without a device gets: reads all ones, writes ignored."""
    return None if is_write else (1 << (8 * size)) - 1


def _drain(fd: int) -> int:
    """Read what is waiting on a kept connection (bytes meant for the previous process); the fds
    that came with them are closed. OSError if the back-end has hung up."""
    sock = socket.socket(fileno=os.dup(fd))
    total = 0
    try:
        sock.setblocking(False)
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
            except BlockingIOError:
                return total
            for got in fds:
                os.close(got)
            if not data:
                raise ConnectionResetError("the back-end has closed the connection")
            total += len(data)
    finally:
        sock.close()


def _inflight_problem(got: InflightFd, num_queues: int, queue_size: int) -> str:
    """Why a GET_INFLIGHT_FD answer cannot be used ("" if it can)."""
    if got.mmap_size == 0:
        return "the back-end offers no area (size 0)"
    if (got.num_queues, got.queue_size) != (num_queues, queue_size):
        return f"{got.num_queues} x {got.queue_size} answered, {num_queues} x {queue_size} asked"
    try:
        have = os.fstat(got.fd).st_size
    except OSError as e:
        return f"fd unusable: {e}"
    if have < got.mmap_offset + got.mmap_size:
        return f"fd holds {have} bytes, {got.mmap_offset + got.mmap_size} announced"
    return ""


class Device:
    """A guest's virtio device (a virtio-mmio window or a virtio-pci function) served by one
    vhost-user back-end through a data path."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        connect: Callable[[], Awaitable[AsyncFrontend]],
        memory: DataPath | DataPathChooser,
        set_irq: Callable[[bool], None],
        log: DeviceLogger,
        fastpath: QueueFastPath | PciKickFastPath | None = None,
        clock: Callable[[], float] = time.monotonic,
        guest_name: str = "",
        keeper: Keeper | None = None,
        inject_msi: Callable[[int, int], None] | None = None,
        on_bar: Callable[[int | None, int], None] | None = None,
    ) -> None:
        """``set_irq``: the interrupt line (a PCI function's INTx); for ``transport=pci``,
        ``inject_msi(address, data)`` sends an MSI and ``on_bar(address or None, size)`` is told
        where the guest placed the function's BAR (claim it) or that it no longer decodes."""
        self.config = config
        self._keeper = keeper  # keeps the back-end connection for the next process (fdstore.py)
        self._meta: SessionMeta | None = None  # the current connection's record (in _meta_fd)
        self._meta_fd: int | None = None
        self._stored: dict[str, int] = {}  # name → the fd stored under it (ours, not a copy)
        self._inject_msi = inject_msi
        self._on_bar = on_bar
        # net with an emulated config: the guest's MAC, as configured or stable per guest and device
        self.mac = devtypes.parse_mac(config.mac) if config.mac else devtypes.stable_mac(guest_name, config.devid)
        self.fastpath = fastpath
        self._connect = connect
        self._chooser: DataPathChooser | None = None
        if isinstance(memory, DataPathChooser):
            self._chooser = memory
        self.memory: DataPath = memory  # type: ignore[assignment]  # replaced at the first negotiation when chosen
        self._set_irq = set_irq
        # every line of a device can be caused, as often as they like, by its guest or back-end
        self.log = LimitedLogger.over(log, clock)
        self._guest_log = log  # guest errors: rate-limited per kind of complaint (_guest_error)
        self._limit = self.log.limit
        self.stats = DeviceStats()
        self.frontend: AsyncFrontend | None = None
        self.model: VirtioMmioDevice | VirtioPciDevice | None = None
        # The model's read and write of each address space, indexed by ``cfg`` (the virtio-mmio
        # window or a PCI function's BAR; PCI configuration space): chosen once per model, by
        # _bind_transport, never per access.
        self._reads: tuple[_Read, _Read] = (_no_model_read, _no_model_read)
        self._writes: tuple[_Write, _Write] = (_no_model_write, _no_model_write)
        # A virtio-mmio model's plain register read (the value, or None: ask _reads[False]).
        self._read_register: Callable[[int, int], int | None] | None = None
        self._mmio_model = False  # its status and queue readiness are in the session record
        self._lock = asyncio.Lock()
        self._slow = 0  # writes that wait for, or are, a back-end round trip
        self._kick: list[int] = []
        self._call: list[int] = []
        self._started: list[int] = []
        self._queues: tuple[QueueConfig, ...] = ()  # as the driver set them up (for a reconnect)
        self._fresh = False  # _queues were never started (the driver's start waits for a reconnect)
        self._reconnecting: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None  # the stop a driver's reset left running
        self._starting: asyncio.Task[None] | None = None  # the start a DRIVER_OK write left running
        self._resuming: asyncio.Task[None] | None = None  # a reconnect's resume (a driver's reset cuts it)
        self._early: set[int] = set()  # queues the guest notified while _starting ran
        self._early_config: list[tuple[int, bytes]] = []  # config writes made meanwhile (offset, bytes)
        self._losses = 0  # back-end losses in a row without a completion in between
        self._connected_at = 0.0  # loop time of the current connection
        self._config_dirty = False  # CONFIG_CHANGE_MSG received, GET_CONFIG not yet sent
        self._config_task: asyncio.Task[None] | None = None  # the one pending config refresh
        # GET_INFLIGHT_FD's area: kept for the device's life (every back-end restart gets it
        # back), dropped when the driver resets the device
        self._inflight: InflightFd | None = None
        self._closing = False
        self._quiescing = False  # the device goes under a live guest: its driver is asked not to notify
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()  # set when the driver starts/stops the device (for xenbus state)
        # Open once the device serves the guest (started, and restored if it was taken over), or
        # will never (refused, closed): guest accesses made before then wait for it.
        self._gate = asyncio.Event()
        self._open = False  # the gate is open (never closed again): read on every access
        self._held_logged = False
        self.refused: str | None = None  # why the back-end was refused for good

    # --- life cycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the device serves the guest's accesses with its model."""
        return self._gate.is_set() and self.model is not None and not self._closing

    async def start(self, saved: dict[str, object] | None = None, *, kept: Kept | None = None) -> None:
        """Connect to the back-end, negotiate and learn the device's shape (queues, config); with
        ``saved``, take over the state a previous daemon left (:meth:`restore`). Guest accesses
        made before are then served. One attempt: raises as the connection or negotiation fails
        (:class:`BackendAbsent` when nobody answers yet), leaving nothing open. ``kept``: the
        previous process's connection (fdstore.py), taken over if it is still good (its fds are
        this call's), else a fresh one is made."""
        chooser = self._chooser
        if kept is not None and saved is not None and (current := read_snapshot(kept.meta)) is not None:
            if (current.get("status"), current.get("queues")) != (saved.get("status"), saved.get("queues")):
                self.log.info("device state from the kept session record (state.json was behind it)")
            # The record is written at the driver's status and queue writes, not at each interrupt:
            # the guest is interrupted once more (virtio allows a spurious one; a lost one hangs it).
            rec_isr, file_isr = current.get("interrupt_status"), saved.get("interrupt_status")
            if isinstance(rec_isr, int) and isinstance(file_isr, int) and isinstance(status := current.get("status"), int):
                current = {**current, "interrupt_status": rec_isr | file_isr | (1 if status & Status.DRIVER_OK else 0)}
            saved = current
        opened = await self._take_kept(kept) if kept is not None else None
        fe, negotiated, nq, view = opened or await self._open_backend()
        self.frontend = fe
        self._connected_at = asyncio.get_running_loop().time()
        try:
            await self._started_with(fe, negotiated, nq, view, saved)
        except BaseException:  # the back-end's or the host's error, or a cancellation: nothing stays open
            await self._abandon_start(fe, chooser)
            raise

    async def _started_with(self, fe: AsyncFrontend, negotiated: Negotiated, nq: int, view: devtypes.Offer,
                            saved: dict[str, object] | None) -> None:
        """The rest of :meth:`start`, once the back-end has negotiated and the data path is chosen."""
        for fds in (self._kick, self._call):
            for _ in range(nq):
                fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        loop = asyncio.get_running_loop()
        for i, fd in enumerate(self._call):
            loop.add_reader(fd, self._on_call, i)
        self._bind_transport((VirtioPciDevice if self.config.pci else VirtioMmioDevice)(
            device_id=self.config.device_id,
            device_features=guest_features(view.features, grants=self.config.grants, packed=self.memory.packed),
            queue_sizes=[self.config.queue_size] * nq,
            config=view.config,
            ram=list(self.memory.banks()),
            # a grant device's driver must use grant DMA addresses: FEATURES_OK needs ACCESS_PLATFORM
            required_features=(1 << F_VERSION_1) | ((1 << F_ACCESS_PLATFORM) if self.config.grants else 0),
        ))
        self.log.info(
            "back-end ready: features %#x, protocol features %#x, %d queue(s), config %d bytes",
            negotiated.features, int(negotiated.protocol_features), nq, len(view.config),
        )
        dtype = devtypes.lookup(self.config.device_id)
        if dtype is None:
            self.log.info("virtio device type %d has no entry in the device-type table: its feature bits "
                          "and config pass as the back-end offers them", self.config.device_id)
        elif withheld := negotiated.features & dtype.withheld:
            self.log.info("%s: feature bits %#x withheld from the guest (the front-end would have to "
                          "implement them)", dtype.name, withheld)
        if view.emulated and self.config.device_id == devtypes.VSOCK.id:
            self.log.info("the back-end has no config space (no CONFIG protocol feature): the daemon serves "
                          "the guest's, CID %d (configured)", self.config.cid)
        elif view.emulated:
            self.log.info("the back-end has no config space (no CONFIG protocol feature): the daemon serves "
                          "the guest's, MAC %s (%s)", self.mac.hex(":"),
                          "configured" if self.config.mac else "derived from the guest's name and device id")
        elif self.config.device_id == devtypes.VSOCK.id:
            self._vsock_cid_checked(view.config)
        if saved is not None:
            await self.restore(saved)
        self._record_model()
        self._open_gate()

    def _open_gate(self) -> None:
        self._open = True
        self._gate.set()

    def _bind_transport(self, model: VirtioMmioDevice | VirtioPciDevice | None) -> None:
        """``model`` serves the guest's accesses from now on (None: none does)."""
        self.model = model
        self._mmio_model = isinstance(model, VirtioMmioDevice)
        self._read_register = model.read_register if isinstance(model, VirtioMmioDevice) else None
        if isinstance(model, VirtioPciDevice):
            self._reads = (model.bar_read, model.config_read)
            self._writes = (model.bar_write, model.config_write)
        elif isinstance(model, VirtioMmioDevice):
            self._reads = (model.read, _mmio_config_read)
            self._writes = (model.write, _mmio_config_write)
        else:
            self._reads = (_no_model_read, _no_model_read)
            self._writes = (_no_model_write, _no_model_write)

    def _vsock_cid_checked(self, config: bytes) -> None:
        """A vsock back-end's own config, against the device's ``cid=``: logged when they differ
        (the back-end's is the guest's: it routes by the CID it was started with) or when there is
        neither (the guest reads CID 0, reserved)."""
        if len(config) < devtypes.VSOCK.config_min:
            self.log.warning("vsock back-end without a config space and no cid= configured: the guest reads "
                             "CID 0 (reserved); set cid= on the device")
            return
        theirs = int.from_bytes(config[:devtypes.VSOCK.config_min], "little")
        if self.config.cid is not None and theirs != self.config.cid:
            self.log.warning("cid=%d configured, the back-end's config says %d: the guest gets the back-end's",
                             self.config.cid, theirs)

    async def _abandon_start(self, fe: AsyncFrontend, chooser: DataPathChooser | None) -> None:
        """A start that failed (or was cancelled) after the back-end negotiated: release what it
        opened (rings, eventfds, the connection, a data path chosen for this back-end) and leave
        the device as it was before, ready for another try."""
        started, self._started = self._started, []
        for index in started:
            self._user_path(index)
            self.memory.close_queue(index)
        self._queues = ()
        self._close_eventfds()
        self._bind_transport(None)
        self.frontend = None
        self._forget_kept()
        if chooser is not None and self._chooser is None:
            self.memory.close()
            self.memory, self._chooser = chooser, chooser  # type: ignore[assignment]  # chosen again next time
        await fe.close()

    def refuse(self, reason: str) -> None:
        """The back-end was refused for good: the device will not serve, and the guest's waiting
        and later accesses are answered as if no device were there."""
        self.refused = reason
        self.stats.last_error = reason
        self._open_gate()

    async def _open_backend(self) -> tuple[AsyncFrontend, Negotiated, int, devtypes.Offer]:
        """Connect and negotiate (QEMU's init order); the connection is closed on any failure."""
        fe = await self._connect()
        fe.log = self.log  # the library's lines about this connection: prefixed and rate-limited
        opened = False
        try:
            async with asyncio.timeout(NEGOTIATION_TIMEOUT):
                negotiated, nq, chosen, view = await self._negotiate(fe)
            opened = True
        finally:
            if not opened:  # refused, failed, too slow or cancelled: no half-open connection left behind
                await fe.close()
        if chosen is not None:
            self.memory, self._chooser = chosen, None
        self.memory.new_connection()
        fe.on_lost = lambda exc: self.backend_lost(str(exc), reconnect=exc.reconnect)
        self._keep_connection(fe, negotiated, nq)
        return fe, negotiated, nq, view

    # --- the connection kept for the next process (fdstore.py) ------------------------------------

    def _keep_connection(self, fe: AsyncFrontend, negotiated: Negotiated, nq: int) -> None:
        """A connection negotiated: its record written, it and its channel handed to the keeper."""
        self._meta = SessionMeta(
            socket=self.config.socket, features=negotiated.features,
            protocol_features=int(negotiated.protocol_features),
            backend_protocol_features=int(negotiated.backend_protocol_features),
            queue_num=negotiated.queue_num, max_mem_slots=negotiated.max_mem_slots,
            channel=negotiated.backend_channel, num_queues=nq, inflight=self._inflight_shape())
        try:
            if self._meta_fd is None:
                self._meta_fd = new_meta_fd()
            self._meta.write(self._meta_fd)
        except OSError as e:
            self.log.warning("cannot record the back-end session (%s): a restart of the daemon connects afresh", e)
            self._forget_kept()
            return
        self._store("meta", self._meta_fd)
        self._store("conn", fe.sock.fileno())
        chan = fe.backend_channel_fileno()
        if chan is not None:
            self._store("chan", chan)
        else:
            self._unstore("chan")
        if self._inflight is not None:
            self._store("inflight", self._inflight.fd)

    def _inflight_shape(self) -> list[int] | None:
        area = self._inflight
        return None if area is None else [area.mmap_size, area.mmap_offset, area.num_queues, area.queue_size]

    def _note_inflight(self) -> None:
        """The inflight area (or its absence), in the record and the keeper."""
        if self._meta is None or self._meta_fd is None:
            return
        self._meta.inflight = self._inflight_shape()
        try:
            self._meta.write(self._meta_fd)
        except OSError as e:
            self.log.warning("cannot update the back-end session record: %s", e)
        if self._inflight is not None:
            self._store("inflight", self._inflight.fd)
        else:
            self._unstore("inflight")

    def _routing(self) -> int:
        """A PCI function's count of interrupt routing changes (before a write: see :meth:`_recorded`)."""
        return self.model.routing_changes if isinstance(self.model, VirtioPciDevice) else 0

    def _recorded(self, cfg: bool, offset: int, routing: int) -> bool:
        """The write changes what the session record holds of the model: a virtio-mmio model's
        status or a queue's readiness; a running PCI function's interrupt routing (an MSI-X entry
        the driver rewrites after DRIVER_OK, e.g. for a new CPU affinity: what it wrote before is
        recorded when the device starts). ``routing``: :meth:`_routing` before the write (0 for
        a virtio-mmio model, which has none)."""
        if self._mmio_model:
            return not cfg and (offset == _REG_STATUS or offset == _REG_QUEUE_READY)
        model = self.model
        return isinstance(model, VirtioPciDevice) and model.routing_changes != routing and bool(model.status & Status.DRIVER_OK)

    def _record_model(self) -> None:
        """The driver-visible state, in the session record (a crash's successor resumes from it):
        a virtio-mmio model's in the record's fd; a PCI function's in the supervisor's state file,
        which follows :attr:`changed`."""
        if isinstance(self.model, VirtioPciDevice):
            self.changed.set()
            return
        if self._meta_fd is None or not isinstance(self.model, VirtioMmioDevice):
            return
        try:
            write_snapshot(self._meta_fd, snapshot(self.model))
        except OSError as e:
            self.log.warning("cannot update the back-end session record: %s", e)

    def _note_rings(self, stopped: dict[int, int] | None = None) -> None:
        """The running rings, in the record (a new process stops them before it resumes), and
        where a handover ``stopped`` the others (queue → GET_VRING_BASE's answer: a zero-copy
        ring restarts there on the kept connection, as after a crash)."""
        if self._meta is None or self._meta_fd is None:
            return
        self._meta.running = sorted(self._started)
        self._meta.stopped = [[i, b & 0xFFFF] for i, b in sorted((stopped or {}).items())]
        sizes = {q.index: q.num for q in self._queues}
        self._meta.sizes = [sizes.get(i, 0) for i in self._meta.running]
        try:
            self._meta.write(self._meta_fd)
        except OSError as e:
            self.log.warning("cannot update the back-end session record: %s", e)
        memory_fd = getattr(self.memory, "memory_fd", None)
        if callable(memory_fd) and (fd := memory_fd()) is not None:
            self._store("shadow", fd)

    def _store(self, what: str, fd: int) -> None:
        """``fd`` kept as ``dev<devid>.<what>``, in place of whatever the store held under that
        name (systemd keeps every fd stored under a name, until FDSTOREREMOVE)."""
        if self._stored.get(what) == fd or self._keeper is None:
            return
        name = kept_name(self.config.devid, what)
        self._keeper.remove_fds(name)
        self._stored[what] = fd
        self._keeper.store_fds(name, [fd])

    def _unstore(self, what: str) -> None:
        if self._stored.pop(what, None) is not None and self._keeper is not None:
            self._keeper.remove_fds(kept_name(self.config.devid, what))

    def _forget_kept(self) -> None:
        """Nothing of this device is to be resumed by a next process any more."""
        for what in list(self._stored):
            self._unstore(what)
        fd, self._meta_fd, self._meta = self._meta_fd, None, None
        if fd is not None:
            os.close(fd)

    def _kept_fds(self) -> list[tuple[str, int]]:
        """Copies of what a next image needs to go on with the connection (handover)."""
        fds = []
        for what in FD_KINDS:
            fd = {"conn": self.frontend.sock.fileno() if self.frontend else None,
                  "chan": self.frontend.backend_channel_fileno() if self.frontend else None,
                  "meta": self._meta_fd, "inflight": self._inflight.fd if self._inflight else None}.get(what)
            if what == "shadow":
                memory_fd = getattr(self.memory, "memory_fd", None)
                fd = memory_fd() if callable(memory_fd) else None
            if fd is not None:
                fds.append((kept_name(self.config.devid, what), os.dup(fd)))
        return fds

    async def _take_kept(self, kept: Kept) -> tuple[AsyncFrontend, Negotiated, int, devtypes.Offer] | None:
        """Go on with the connection the previous process kept (None: it is unusable, logged in
        one line, everything of it closed; the caller connects afresh). Nothing is negotiated
        again: GET_FEATURES proves the back-end is there and in step (its answer must be what was
        negotiated), the rings the previous process left running are stopped (GET_VRING_BASE),
        and the device's restore restarts them as QEMU's ``cont`` does."""
        fe: AsyncFrontend | None = None
        chosen: DataPath | None = None
        self._take_inflight(kept)
        try:
            meta = kept.check()
            if meta.socket != self.config.socket:
                raise ValueError(f"it was made to {meta.socket!r}, the device's back-end is {self.config.socket!r}")
            if self.config.num_queues and meta.num_queues != self.config.num_queues:
                raise ValueError(f"{meta.num_queues} queue(s), the device has {self.config.num_queues}")
            stale = _drain(kept.conn)
            if stale:
                self.log.warning("kept back-end connection: %d byte(s) meant for the previous process discarded "
                                 "(an answer it did not live to read)", stale)
            conn, kept.conn = kept.conn, -1
            chan, kept.chan = kept.chan, None
            negotiated = Negotiated(meta.features, ProtocolFeatures(meta.protocol_features),
                                    ProtocolFeatures(meta.backend_protocol_features), meta.queue_num,
                                    meta.max_mem_slots, meta.channel)
            fe = AsyncFrontend.adopt(FdSocket(socket.socket(fileno=conn)), negotiated,
                                     backend_sock=FdSocket(socket.socket(fileno=chan)) if chan is not None else None,
                                     backend_handler=self._backend_request)
            fe.log = self.log
            bases: dict[int, int] = {}
            async with asyncio.timeout(KEPT_TIMEOUT):
                features = await fe.get_features()
                if features != meta.features:
                    raise ValueError(f"the back-end offers features {features:#x}, {meta.features:#x} were "
                                     "negotiated: another back-end")
                for index in meta.running:
                    bases[index] = await fe.stop_vring(index)
            if meta.running:
                self.log.info("kept back-end connection: rings %s the previous process left running stopped, the "
                              "back-end at avail index %s", meta.running, [bases[i] for i in meta.running])
            nq = meta.num_queues
            if self._chooser is not None:
                chosen = self._chooser(negotiated.protocol_features, nq)
            memory = chosen or self.memory
            adopt = getattr(memory, "adopt_memory", None)
            if kept.shadow is not None:
                if not callable(adopt):
                    raise ValueError("a shadow memory was kept, the device's data path has none")
                shadow, kept.shadow = kept.shadow, None
                adopt(shadow)
                await self._backend_done(memory, bases, dict(zip(meta.running, meta.sizes, strict=False)))
            elif callable(adopt) and meta.running:
                raise ValueError("its shadow memory was not kept")
            resume_at = getattr(memory, "resume_at", None)
            if callable(resume_at):  # (rings stopped by a handover, or just now after a crash)
                resume_at({**dict((i, b) for i, b in meta.stopped), **bases}, self.log)
            async with asyncio.timeout(KEPT_TIMEOUT):
                config = await self._probe_config(fe, meta.features)
            view = devtypes.offer(self.config.device_id, meta.features, config, mac=self.mac)
        except (OSError, ValueError, VhostUserError, TimeoutError) as e:
            reason = "no answer" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            self.log.warning("the back-end connection kept from the previous process is unusable (%s): "
                             "connecting afresh", reason)
            if fe is not None:
                await fe.close()
            if chosen is not None:
                chosen.close()
            kept.close()
            if self._keeper is not None:
                for what in FD_KINDS:
                    if what != "inflight" or self._inflight is None:
                        self._keeper.remove_fds(kept_name(self.config.devid, what))
            return None
        if chosen is not None:
            self.memory, self._chooser = chosen, None
        self._meta_fd, kept.meta = kept.meta, -1
        self._meta = meta
        self._meta.running = []
        self._meta.write(self._meta_fd)
        self._stored = {}
        self._store("meta", self._meta_fd)
        self._store("conn", fe.sock.fileno())
        chan_fd = fe.backend_channel_fileno()
        if chan_fd is not None:
            self._store("chan", chan_fd)
        self._note_inflight()
        fe.on_lost = lambda exc: self.backend_lost(str(exc), reconnect=exc.reconnect)
        self.log.info("going on with the back-end connection kept from the previous process (nothing "
                      "renegotiated): features %#x, protocol features %#x", meta.features, meta.protocol_features)
        return fe, negotiated, nq, view

    def _take_inflight(self, kept: Kept) -> None:
        """The inflight area the previous process shared with the back-end, taken whatever becomes
        of the kept connection: the back-end (or the one that replaced it) gets it back at the
        next start (SET_INFLIGHT_FD) and submits again what was left in flight. One that does not
        fit the device is logged in one line and closed (the back-end then gets a fresh one)."""
        fd, kept.inflight = kept.inflight, None
        if fd is None:
            return
        try:
            shape = SessionMeta.read(kept.meta).inflight
            if shape is None:
                raise ValueError("the session record does not describe it")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a memory file")
            area = InflightFd(fd, *shape)
            problem = _inflight_problem(area, self.config.num_queues or area.num_queues, self.config.queue_size)
            if problem:
                raise ValueError(problem)
        except (OSError, ValueError) as e:
            os.close(fd)
            self.log.warning("the inflight area kept from the previous process is unusable (%s): the back-end "
                             "gets a fresh one", e)
            if self._keeper is not None:
                self._keeper.remove_fds(kept_name(self.config.devid, "inflight"))
            return
        self._drop_inflight()
        self._inflight = area

    async def _negotiate(self, fe: AsyncFrontend) -> tuple[Negotiated, int, DataPath | None, devtypes.Offer]:
        """Negotiate, choose the data path (if not given), read the config; the chosen data path
        (returned) is closed if anything after the choice fails."""
        negotiated = await fe.negotiate(
            protocol_features=DEFAULT_PROTOCOL_FEATURES | self.memory.protocol_features,
            backend_handler=self._backend_request,
        )
        nq = self.config.num_queues or negotiated.queue_num or 1
        chosen = self._chooser(negotiated.protocol_features, nq) if self._chooser is not None else None
        try:
            missing = (chosen or self.memory).protocol_features & ~negotiated.protocol_features
            if missing:
                raise DeviceError(
                    f"the back-end does not offer {missing!r}, needed to hand it guest memory "
                    "(use a back-end built with Xen support, or memory=shadow)"
                )
            config = await self._probe_config(fe, negotiated.features)
            view = devtypes.offer(self.config.device_id, negotiated.features, config, mac=self.mac,
                                  cid=self.config.cid)
        except BaseException:  # a refused or broken negotiation, or a cancellation: the chosen path is not kept
            if chosen is not None:
                chosen.close()
            raise
        return negotiated, nq, chosen, view

    async def _probe_config(self, fe: AsyncFrontend, features: int) -> bytes | None:
        """The back-end's config space (None without the CONFIG protocol feature): one GET_CONFIG
        of the size the device type's config struct has with the back-end's ``features``
        (:mod:`.devtypes`, as QEMU's per-device config sizes)."""
        if not fe.has_protocol_feature(ProtocolFeatures.CONFIG):
            return None  # the device type's front-end part may emulate it (devtypes.offer)
        dtype = devtypes.lookup(self.config.device_id)
        if dtype is None:
            return await self._search_config(fe)
        size = dtype.config_size(features)
        if size == 0:
            return b""  # the type has no config space
        try:
            return await fe.get_config(0, size)
        except VhostUserError as e:
            if fe.broken:
                raise
            self.log.warning("GET_CONFIG of %d bytes (the %s config struct) refused (%s): looking for the size "
                             "the back-end accepts", size, dtype.name, e)
        return await self._search_config(fe)

    async def _search_config(self, fe: AsyncFrontend) -> bytes:
        """A config of a type without a table entry (or refused at its size): the largest size the
        back-end accepts. Back-ends refuse GET_CONFIG beyond their config struct (an empty reply),
        so binary-search the size: about eight round trips."""
        good, bad = 0, MAX_CONFIG_SIZE + 1
        data = b""
        while bad - good > 1:
            mid = (good + bad) // 2
            try:
                data = await fe.get_config(0, mid)
                good = mid
            except VhostUserError as e:
                if fe.broken:
                    raise
                self.log.debug("GET_CONFIG size %d refused: %s", mid, e)
                bad = mid
        return data  # from the last successful probe, whose size is `good`

    def quiesce(self) -> None:
        """The device is going while its guest runs on: the data path asks the driver not to
        notify any queue again, so that the guest stops touching the window before it is
        unclaimed; a shadow path at once (``ShadowDataPath.quiesce``: its back-end sees shadow
        rings only), zero copy once :meth:`close` has stopped the back-end's rings (the back-end
        owns the guest's notification suppression until then). Idempotent."""
        if self._quiescing:
            return
        self._quiescing = True
        if not getattr(self.memory, "direct", True):  # (a data path not chosen yet has no queues)
            self._ask_quiet()

    def _ask_quiet(self) -> None:
        quiesce = getattr(self.memory, "quiesce", None)
        if callable(quiesce):
            asked = quiesce()
            if asked:
                self.log.info("queues %s: the driver is asked not to notify any more", asked)

    async def close(self, stop_timeout: float | None = None) -> None:
        """Stop the back-end's rings (if running) and release everything. Idempotent. Guest
        accesses still waiting for the back-end are answered as if no device were there. A
        back-end that has not stopped within ``stop_timeout`` s, or leaves one request unanswered
        for STOP_REPLY_TIMEOUT, is dropped (its connection closed) and the device released all
        the same."""
        self._closing = True
        self._open_gate()
        await cancel_and_wait(self._starting)
        await cancel_and_wait(self._stopping)
        await cancel_and_wait(self._reconnecting)
        try:
            async with asyncio.timeout(stop_timeout), self._lock:
                if self.frontend is not None and not self.frontend.broken:
                    self.frontend.timeout = min(self.frontend.timeout, STOP_REPLY_TIMEOUT)
                    try:
                        await self._stop_backend()
                    except VhostUserError as e:
                        self.log.warning("back-end did not stop (%s): dropping its connection", e)
        except TimeoutError:
            self.log.warning("back-end did not stop within %g s: dropping its connection", stop_timeout)
        if self.frontend is not None:
            await self.frontend.close()
        try:  # a guest access's back-end operation may hold the device: it fails now, without a connection
            async with asyncio.timeout(RELEASE_WAIT):
                await self._lock.acquire()
        except TimeoutError:
            self.log.warning("a back-end operation still runs %g s after its connection was closed: "
                             "the device's eventfds and data path stay open", RELEASE_WAIT)
            return
        try:
            self._release()
        finally:
            self._lock.release()
        self._forget_kept()

    def _release(self) -> None:
        """What :meth:`close` releases once the back-end is stopped or dropped. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        for index in list(self.fastpath.assigned if self.fastpath else ()):
            self._user_path(index)
        self._close_eventfds()
        if self._chooser is None:
            self.memory.close()

    async def suspend(self) -> list[tuple[str, int]]:
        """Handover to the next image of this process (which resumes the device with
        :meth:`restore`, on the same connection): the back-end's rings are stopped
        (GET_VRING_BASE, no reset: the back-end keeps the device as the guest configured it, and
        its session), the kernel fast path given back. Returns copies of the connection's fds
        for the next image (fdstore.py; empty if the connection is gone or broken: the next image
        connects afresh). The model and the data path stay as they are: a shadow path's
        in-flight record (a file) still holds the chains in flight, which the next image takes
        again; a zero-copy ring restarts where the back-end stopped it (the session record keeps
        GET_VRING_BASE's answers), so what the back-end took is not submitted twice; the rest
        goes with this image. Each of the back-end's replies is waited for STOP_REPLY_TIMEOUT at
        most (then its connection is closed and the next image connects afresh)."""
        self._closing = True
        await self._settle()
        await cancel_and_wait(self._reconnecting)
        kept: list[tuple[str, int]] = []
        async with self._lock:
            fe = self.frontend
            stopped = fe is not None and not fe.broken
            bases: dict[int, int] = {}
            if fe is not None and stopped:
                fe.timeout = min(fe.timeout, STOP_REPLY_TIMEOUT)
                try:
                    # Last queue first: what a back-end takes from a queue it may put on a lower
                    # one (net and vsock: transmitq 2n+1 feeds receiveq 2n on a looped port or a
                    # local peer); stopped before it, that would be dropped with the guest told
                    # it went out, and nothing in the next image could give it back.
                    for index in sorted(self._started, reverse=True):
                        bases[index] = await fe.stop_vring(index)
                except VhostUserError as e:
                    stopped = False
                    self.log.warning("handover: stopping the back-end's rings: %s", e)
            if stopped and not await self._drained(bases):
                stopped = False
                self.log.warning("handover: the back-end still has requests it took in flight %g s after GET_VRING_BASE "
                                 "(it does not drain): its connection is closed (it drops them) and the next image "
                                 "connects afresh and takes them from the guest again", SUSPEND_DRAIN)
            started, self._started = self._started, []
            self._note_rings(bases if stopped else None)
            self._record_model()
            if stopped and self._meta is not None:
                kept = self._kept_fds()
            self.frontend = None
            for index in list(self.fastpath.assigned if self.fastpath else ()):
                self._user_path(index)
            if fe is not None:
                await fe.close()
        for task in list(self._tasks):
            task.cancel()
        loop = asyncio.get_running_loop()
        for fd in self._call:
            loop.remove_reader(fd)
        self.log.info("handed over: queues %s stopped, device state kept, back-end connection %s", started,
                      "passed on" if kept else "closed")
        return kept

    async def _backend_done(self, memory: object, bases: dict[int, int], sizes: dict[int, int]) -> None:
        """After a crash: the back-end has completed, into the previous process's shadow rings,
        all it took before GET_VRING_BASE answered ``bases``, within SUSPEND_DRAIN (what the
        previous process had not taken back from there goes to the guest when the queues resume:
        ``give_back_kept``); else ValueError (its connection is dropped: a late completion must
        not land in the rings laid out anew)."""
        used_idx = getattr(memory, "backend_used", None)
        if not callable(used_idx) or not bases:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUSPEND_DRAIN
        while True:
            behind = {i: (base - used_idx(i, sizes[i])) & 0xFFFF for i, base in bases.items()
                      if sizes.get(i) and used_idx(i, sizes[i]) != base & 0xFFFF}
            if not behind:
                give_back = getattr(memory, "give_back_kept", None)
                if callable(give_back):
                    give_back({i: sizes[i] for i in bases if sizes.get(i)})
                return
            if loop.time() >= deadline:
                raise ValueError(f"the back-end still has requests in flight ({behind} by queue) {SUSPEND_DRAIN:g} s "
                                 "after GET_VRING_BASE (it does not drain)")
            await asyncio.sleep(0.01)  # the back-end writes its used rings in memory: nothing to wait on

    async def _drained(self, bases: dict[int, int]) -> bool:
        """Whether the back-end has completed, and the data path taken back, every chain it took
        from the rings stopped at ``bases`` (their GET_VRING_BASE answers), waiting SUSPEND_DRAIN
        at most (its completions arrive through :meth:`_on_call`). True for a data path that does
        not know (zero copy: the back-end completes into the guest's own ring)."""
        harvested = getattr(self.memory, "harvested", None)
        if not callable(harvested):
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUSPEND_DRAIN
        while True:
            behind = [i for i, base in bases.items() if (done := harvested(i)) is not None and done != base & 0xFFFF]
            if not behind or loop.time() >= deadline:
                return not behind
            await asyncio.sleep(0.01)  # completions come through the call eventfds' readers meanwhile

    # --- guest register accesses (from the IOREQ server) ---------------------------------------

    def mmio(self, offset: int, size: int, is_write: bool, value: int,
             vcpu: int | None = None) -> int | None | Awaitable[int | None]:
        """A guest access from the IOREQ server (the virtio-mmio window; a PCI function's BAR,
        offsets from its base). Served at once unless it starts, stops or
        reconfigures the back-end: then a coroutine is returned, and writes that follow it wait
        their turn behind it (the vCPU that made it stays blocked until the back-end is done, or
        for START_WAIT / RESET_WAIT at most when it starts or resets the device,
        CONFIG_REPLY_TIMEOUT when it writes config space).
        Before the device serves (its back-end has not answered yet), the access waits for it,
        for as long as the device lives."""
        if not is_write and self._open and self.model is not None:  # a register read: _access's, one call less
            self.stats.reads += 1
            if self._read_register is not None and (got := self._read_register(offset, size)) is not None:
                return got
            result, actions = self._reads[False](offset, size)
            if actions:  # reads produce guest errors, interrupt changes (ISR), BAR moves
                self._carry_out_now(actions)
            return result
        return self._access(False, offset, size, is_write, value, vcpu)

    def pci_config(self, reg: int, size: int, is_write: bool, value: int,
                   vcpu: int | None = None) -> int | None | Awaitable[int | None]:
        """A PCI configuration-space access of the guest (``transport=pci``), served as :meth:`mmio`."""
        return self._access(True, reg, size, is_write, value, vcpu)

    def _access(self, cfg: bool, offset: int, size: int, is_write: bool, value: int,
                vcpu: int | None) -> int | None | Awaitable[int | None]:
        if not self._open:
            return self._held(cfg, offset, size, is_write, value, vcpu)
        if self.model is None:
            return _no_device(size, is_write)
        if not is_write:
            self.stats.reads += 1
            result, actions = self._reads[cfg](offset, size)
            if actions:  # reads produce guest errors, interrupt changes (ISR), BAR moves
                self._carry_out_now(actions)
            return result
        self.stats.writes += 1
        if self._slow:
            return self._write_in_turn(cfg, offset, size, value)
        routing = 0 if self._mmio_model else self._routing()
        actions = self._writes[cfg](offset, size, value)
        if self._recorded(cfg, offset, routing):
            self._record_model()
        if not actions:
            return None
        for a in actions:
            if isinstance(a, (Activate, Reset, ConfigWrite)):
                self._slow += 1
                return self._carry_out_in_turn(actions)
        self._carry_out_now(actions)
        return None

    def _resets(self, cfg: bool, offset: int, size: int, value: int) -> bool:
        """The write is the driver's reset (device status 0)."""
        if isinstance(self.model, VirtioPciDevice):
            return not cfg and offset == self.model.layout.common + Common.DEVICE_STATUS and value & 0xFF == 0
        return not cfg and offset == Reg.STATUS and value == 0

    async def _held(self, cfg: bool, offset: int, size: int, is_write: bool, value: int, vcpu: int | None) -> int | None:
        """An access made before the device serves: the vCPU stays blocked until the back-end
        answers (then the model serves it), or the device is refused or removed (then it reads
        as no device)."""
        if not self._held_logged:
            self._held_logged = True
            self.log.info("guest vCPU %s touched device %d before its back-end was ready: holding it",
                             "?" if vcpu is None else vcpu, self.config.devid)
        await self._gate.wait()
        if self.model is None or self._closing:
            return _no_device(size, is_write)
        result = self._access(cfg, offset, size, is_write, value, vcpu)
        if isinstance(result, Awaitable):
            return await result
        return result

    async def _write_in_turn(self, cfg: bool, offset: int, size: int, value: int) -> None:
        assert self.model is not None
        if self._resets(cfg, offset, size, value):
            self._cut_resume()
        self._slow += 1
        try:
            async with self._lock:
                routing = 0 if self._mmio_model else self._routing()
                actions = self._writes[cfg](offset, size, value)
                if self._recorded(cfg, offset, routing):
                    self._record_model()
                await self._carry_out(actions)
        finally:
            self._slow -= 1

    async def _carry_out_in_turn(self, actions: list) -> None:  # type: ignore[type-arg]
        if any(isinstance(a, Reset) for a in actions):
            self._cut_resume()
        try:
            async with self._lock:
                await self._carry_out(actions)
        finally:
            self._slow -= 1

    def _cut_resume(self) -> None:
        """The driver resets the device: a reconnect's start of its rings (which holds the device's
        writes, up to the library's MEM_TABLE_TIMEOUT with a back-end slow to map) is pointless now.
        The reconnect drops that connection and connects again; the next bring-up starts afresh."""
        if self._resuming is not None:
            self._resuming.cancel()

    def _carry_out_now(self, actions: list) -> None:  # type: ignore[type-arg]
        for action in actions:
            match action:
                case Notify(index):
                    self.stats.notifies += 1
                    self.stats.per_queue_kicks[index] = self.stats.per_queue_kicks.get(index, 0) + 1
                    if self._starting is not None:
                        self._early.add(index)  # its queue is not open yet: handed over once it is
                    else:
                        self.memory.notify(index)
                case IrqLevel(level):
                    self._irq(level)
                case Msi(address, data):
                    self._msi(address, data)
                case BarMap(address, size):
                    self._bar_moved(address, size)
                case GuestError(reason):
                    self._guest_error(reason)

    async def _carry_out(self, actions: list) -> None:  # type: ignore[type-arg]
        for action in actions:
            match action:
                case Notify() | IrqLevel() | Msi() | BarMap() | GuestError():
                    self._carry_out_now([action])
                case Activate():
                    await self._activate(action)
                    self.changed.set()
                case Reset(was_active):
                    self.changed.set()
                    self.log.info("driver reset the device%s", " (stopping the back-end)" if was_active else "")
                    if was_active:
                        await self._reset_backend()
                    elif self._stopping is None:
                        self._drop_inflight()  # nothing is in flight any more: a fresh area next start
                case ConfigWrite(offset, data):
                    if self._starting is not None:
                        # the start a DRIVER_OK write left running (a back-end slow to map): the write
                        # is answered now rather than holding the vCPU for up to START_TIMEOUT, and
                        # sent before the rings start (or, written later, before the notifies)
                        self._early_config.append((offset, data))
                        continue
                    await self._settle()
                    if self.frontend is not None and self._reconnecting is None and self.frontend.has_protocol_feature(ProtocolFeatures.CONFIG):
                        await self._guarded(self.frontend.set_config(offset, data, timeout=CONFIG_REPLY_TIMEOUT))

    def _irq(self, level: bool) -> None:
        if level:
            self.stats.interrupts += 1
        self._set_irq(level)

    def _msi(self, address: int, data: int) -> None:
        self.stats.interrupts += 1
        if self._inject_msi is not None:
            self._inject_msi(address, data)

    def _signal(self, actions: Sequence[object]) -> None:
        """Carry out the interrupts among ``actions`` (line levels, MSIs)."""
        for action in actions:
            if isinstance(action, IrqLevel):
                self._irq(action.level)
            elif isinstance(action, Msi):
                self._msi(action.address, action.data)

    def _guest_error(self, reason: str) -> None:
        self.stats.guest_errors += 1
        self.stats.last_error = reason
        # One budget per kind of complaint, whatever the numbers in it (a guest cycling through
        # queue indices or offsets must not get a fresh budget each time).
        allowed, suppressed = self._limit.allow("guest:" + _NUMBERS.sub("#", reason.split(":")[0]))
        if allowed:
            more = f" ({suppressed} similar lines suppressed)" if suppressed else ""
            self._guest_log.warning("guest: %s%s", reason, more)

    async def _guarded(self, op: Awaitable[None]) -> None:
        """Run a back-end operation; on failure the device goes to DEVICE_NEEDS_RESET. A guest
        fault found on the way (e.g. a ring it revoked, read to resume a back-end) does the same."""
        try:
            await op
        except VhostUserError as e:
            self.fail(f"back-end failed: {e}")  # one line: the back-end's failure is not the guest's error
        except GuestFault as e:  # logged (rate-limited, as every guest error) by needs_reset's GuestError
            assert self.model is not None
            await self._carry_out(self.model.needs_reset(f"fault while starting the back-end: {e}"))

    # --- back-end start/stop, in QEMU's order (reference trace) ----------------------------------

    async def _reset_backend(self) -> None:
        """The driver reset a running device: stop the back-end's rings, waiting RESET_WAIT at
        most; the rest of the stop goes on alone (:meth:`_settle` waits for it)."""
        task = asyncio.get_running_loop().create_task(self._stop_after_reset())
        self._stopping = task
        await asyncio.wait([task], timeout=RESET_WAIT)

    async def _stop_after_reset(self) -> None:
        fe = self.frontend
        try:
            async with asyncio.timeout(RESET_STOP_TIMEOUT):
                if self._starting is not None:  # the start the driver's DRIVER_OK left running ends first
                    await asyncio.wait([self._starting])
                await self._stop_backend()
        except (VhostUserError, TimeoutError) as e:
            await cancel_and_wait(self._starting)
            reason = str(e) if isinstance(e, VhostUserError) else f"no answer within {RESET_STOP_TIMEOUT:g} s"
            if fe is not None and fe is self.frontend:  # (a lost connection is being replaced already)
                self.backend_lost(f"its rings did not stop at the driver's reset: {reason}")
        finally:
            self._drop_inflight()  # nothing is in flight any more: a fresh area next start
            self._stopping = None

    async def _settle(self) -> None:
        """Wait for the start a DRIVER_OK write left running (bounded by START_TIMEOUT) and the
        stop a driver's reset left running (bounded by RESET_STOP_TIMEOUT)."""
        for task in (self._starting, self._stopping):
            if task is not None:
                await asyncio.wait([task])

    async def _activate(self, action: Activate) -> None:
        await self._settle()
        fe = self.frontend
        if fe is None or fe.broken or self._reconnecting is not None:
            if self._reconnecting is not None:
                self._queues, self._fresh = action.queues, True  # started once the back-end is back
                return
            assert self.model is not None
            await self._carry_out(self.model.needs_reset("DRIVER_OK but the back-end is not connected"))
            return
        task = asyncio.get_running_loop().create_task(self._start_after_activate(fe, action))
        self._starting = task
        await asyncio.wait([task], timeout=START_WAIT)
        if task.done():
            task.result()  # what no back-end or guest caused surfaces in the guest's access, as before
        else:
            task.add_done_callback(self._started_late)

    def _started_late(self, task: asyncio.Task[None]) -> None:
        """A start that outlived the DRIVER_OK write ended with an error nobody awaits: the device
        goes to DEVICE_NEEDS_RESET with the reason."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fail(f"starting the back-end failed: {exc!r}")

    async def _start_after_activate(self, fe: AsyncFrontend, action: Activate) -> None:
        """The start the driver's DRIVER_OK asked for, bounded by START_TIMEOUT. On success the
        notifies the guest made meanwhile are handed to the queues; on failure the device goes to
        DEVICE_NEEDS_RESET, what was opened is closed and the back-end is dropped (reconnected for the
        next bring-up, which starts afresh)."""
        reason = ""
        try:
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    await self._start_backend(fe, action.features, action.queues)
                    await self._send_early_config(fe)  # (those written while the rings started)
            except VhostUserError as e:
                reason = f"back-end failed: {e}"
            except TimeoutError:
                reason = f"back-end failed: its start did not end within {START_TIMEOUT:g} s"
            except GuestFault as e:
                self._drop_queues()
                assert self.model is not None
                self._carry_out_now(self.model.needs_reset(f"fault while starting the back-end: {e}"))
                return
            except asyncio.CancelledError:
                self._drop_queues()
                await fe.close()  # cut mid-request: the connection cannot carry another one
                raise
            except BaseException:  # a bug's exception: the queues opened are closed, the caller's log says it
                self._drop_queues()
                raise
            if reason:
                await self._start_failed(fe, reason)
                return
            early, self._early = self._early, set()
            self._starting = None
            for index in sorted(early):
                self._notify_early(index)
        finally:
            self._early.clear()
            self._early_config.clear()
            if self._starting is asyncio.current_task():
                self._starting = None
            self.changed.set()

    def _notify_early(self, index: int) -> None:
        """A notify the guest made while its queue's start ran, handed over now that it runs."""
        if index not in self._started:
            return
        try:
            self.memory.notify(index)
        except DaemonError as e:
            self.fail(str(e))

    async def _start_failed(self, fe: AsyncFrontend, reason: str) -> None:
        """DEVICE_NEEDS_RESET (unless the driver reset the device meanwhile), the reason logged,
        the back-end dropped and reconnected (a request cut by START_TIMEOUT leaves its connection
        unusable, and a back-end refusing its start is in a state nobody knows)."""
        self._drop_queues()
        self.stats.last_error = reason
        self.log.error("%s", reason)
        assert self.model is not None
        if self.model.status & Status.DRIVER_OK:  # (not reset meanwhile)
            self._signal(self.model.needs_reset(reason))
        if fe is self.frontend:  # (a lost connection is being replaced already)
            self.backend_lost(f"dropped after its start failed: {reason}")
            await fe.close()

    def _drop_queues(self) -> None:
        """Close the queues a start opened (the next start opens them afresh)."""
        started, self._started = self._started, []
        self._queues = ()
        for index in started:
            self._user_path(index)
            self.memory.close_queue(index)

    async def _start_backend(self, fe: AsyncFrontend, features: int, queues: Sequence[QueueConfig], *,
                             resume: bool = False) -> None:
        """QEMU's start order. ``resume``: the rings were running with a back-end that is gone;
        the data path says where each restarts (and what it queued meanwhile is looked at)."""
        if self.config.grants:  # ACCESS_PLATFORM is between the guest and us (grant addresses): the
            features &= ~(1 << F_ACCESS_PLATFORM)  # the back-end sees shadow memory only
        if fe.features is not None:  # bits the daemon serves itself (an emulated config) stay with it
            features &= fe.features
        await fe.set_features(features)
        status = fe.has_protocol_feature(ProtocolFeatures.STATUS)
        if status:
            # QEMU 10's order (net trace): FEATURES_OK before the memory table, the driver's full
            # status once the rings run. DPDK holds the device back until it sees DRIVER_OK here.
            await fe.set_status(int(Status.FEATURES_OK))
        regions, fds = self.memory.regions(queues)
        await fe.set_mem_table(regions, fds)
        await self._share_inflight(fe)
        await self._send_early_config(fe)  # before the rings: a back-end may serve what they hold at once
        resume_kept = getattr(self.memory, "resume_kept", None) if resume else None
        if callable(resume_kept):  # (what a crash left in a kept shadow memory, before any ring takes chains)
            resume_kept(queues, features)
        for q in queues:
            rings = self.memory.open_queue(q, features, self._kick[q.index], resume=resume)
            if q.index not in self._started:  # a resumed queue was started once already
                self._started.append(q.index)
            await fe.start_vring(
                q.index, num=q.num, desc=rings.desc, avail=rings.avail, used=rings.used,
                kick_fd=self._kick[q.index], call_fd=self._call[q.index], base=rings.base,
            )
            if resume:
                # Look at what the guest queued meanwhile (its notify may have gone to the old
                # process): through the data path, so a copying one pulls the guest's ring too,
                # and kick the back-end, which may have been handed chains again.
                self.memory.notify(q.index)
                os.eventfd_write(self._kick[q.index], 1)
                os.eventfd_write(self._call[q.index], 1)  # and re-check its used ring for lost interrupts
            self._kernel_path(q.index)
        if status:
            await fe.set_status(int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK))
        self._queues = tuple(queues)
        self.stats.starts += 1
        self._note_rings()
        self.log.info("%s: features %#x, queues %s", "resumed" if resume else "started", features, [q.index for q in queues])

    async def _send_early_config(self, fe: AsyncFrontend) -> None:
        """The config writes the guest made while the start ran (answered then), in their order."""
        while self._early_config:  # (more may come while one is sent)
            offset, data = self._early_config.pop(0)
            if fe.has_protocol_feature(ProtocolFeatures.CONFIG):
                await fe.set_config(offset, data, timeout=CONFIG_REPLY_TIMEOUT)

    async def _share_inflight(self, fe: AsyncFrontend) -> None:
        """Inflight I/O tracking (INFLIGHT_SHMFD) on a zero-copy data path, in QEMU's order: the
        first start asks the back-end for an area (GET_INFLIGHT_FD), every start hands it over
        (SET_INFLIGHT_FD) before the rings, so a restarted back-end resubmits exactly what its
        predecessor left in flight. (The shadow path resubmits its own chains and needs none.)
        A back-end that answers badly is logged; the device carries on without tracking."""
        if not self.memory.direct or not fe.has_protocol_feature(ProtocolFeatures.INFLIGHT_SHMFD):
            return
        nq, qsize = len(self._kick), self.config.queue_size
        if self._inflight is not None and (self._inflight.num_queues, self._inflight.queue_size) != (nq, qsize):
            self.log.warning("the kept inflight area tracks %d queue(s) of %d, the device has %d of %d: the back-end "
                             "gets a fresh one", self._inflight.num_queues, self._inflight.queue_size, nq, qsize)
            self._drop_inflight()
        if self._inflight is None:
            try:
                got = await fe.get_inflight_fd(nq, qsize)
            except VhostUserError as e:
                if fe.broken:
                    raise
                self.log.warning("GET_INFLIGHT_FD failed (%s): no inflight tracking", e)
                return
            problem = _inflight_problem(got, nq, qsize)
            if problem:
                os.close(got.fd)
                self.log.warning("GET_INFLIGHT_FD answer unusable (%s): no inflight tracking", problem)
                return
            self._inflight = got
            self._note_inflight()
        area = self._inflight
        try:
            await fe.set_inflight_fd(area.fd, mmap_size=area.mmap_size, mmap_offset=area.mmap_offset,
                                     num_queues=area.num_queues, queue_size=area.queue_size)
        except VhostUserError as e:
            if fe.broken:
                raise
            self.log.warning("SET_INFLIGHT_FD refused (%s): the rings restart without inflight tracking", e)

    def _close_eventfds(self) -> None:
        """Close the queues' kick and call eventfds and drop the inflight area (start and release)."""
        loop = asyncio.get_running_loop()
        for fd in self._call:
            loop.remove_reader(fd)
        for fd in (*self._kick, *self._call):
            os.close(fd)
        self._kick, self._call = [], []
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        area, self._inflight = self._inflight, None
        if area is not None:
            self._note_inflight()
            os.close(area.fd)

    @property
    def inflight(self) -> InflightFd | None:
        """The inflight area shared with the back-end (None: no tracking)."""
        return self._inflight

    def use_fast_path(self, fastpath: QueueFastPath | PciKickFastPath) -> None:
        """The kernel fast path became available: use it, for running queues too."""
        self.fastpath = fastpath
        if isinstance(fastpath, PciKickFastPath):
            fastpath.notify_address = self._notify_address
        for index in self._started:
            self._kernel_path(index)

    def _notify_address(self, index: int) -> int | None:
        """Where a PCI function's queue ``index`` is notified now (None: the BAR does not decode)."""
        model = self.model
        if not isinstance(model, VirtioPciDevice) or model.decoding is None:
            return None
        return model.decoding + model.layout.notify + index * model.layout.notify_multiplier

    def _kernel_path(self, index: int) -> None:
        """Hand queue ``index``'s notifications to the kernel (privcmd ioeventfd/irqfd), if it can."""
        fp = self.fastpath
        if fp is None or not self.memory.direct or index in fp.assigned:
            return
        try:
            fp.assign(index, self._kick[index], self._call[index])
        except XenError as e:
            self.log.warning("kernel fast path refused for queue %d (%s): user-space relay", index, e)
            return
        if not fp.takes_calls or index not in fp.assigned:
            return  # (a PCI function: its used buffers stay here)
        asyncio.get_running_loop().remove_reader(self._call[index])  # the kernel reads it now
        assert isinstance(self.model, VirtioMmioDevice)
        self.model.kernel_irq = True

    def _user_path(self, index: int) -> None:
        """Take queue ``index``'s notifications back from the kernel."""
        fp = self.fastpath
        if fp is None or index not in fp.assigned:
            return
        try:
            fp.deassign(index)
        except XenError as e:
            self.log.warning("kernel fast path: deassign of queue %d failed: %s", index, e)
        if not fp.takes_calls:
            return
        asyncio.get_running_loop().add_reader(self._call[index], self._on_call, index)
        if isinstance(self.model, VirtioMmioDevice) and not fp.assigned:
            self.model.kernel_irq = False

    def _bar_moved(self, address: int | None, size: int) -> None:
        """The guest placed a PCI function's BAR elsewhere (or stopped its decoding): the claim
        follows it, and so do the kernel's kick assignments."""
        if self._on_bar is not None:
            self._on_bar(address, size)
        self.changed.set()  # (the state file follows: a successor claims the BAR where it is)
        if isinstance(self.fastpath, PciKickFastPath) and self._started:
            for index in list(self.fastpath.assigned):
                self._user_path(index)
            for index in self._started:
                self._kernel_path(index)

    async def _stop_backend(self) -> None:
        fe = self.frontend
        started, self._started = self._started, []
        self._queues, self._fresh = (), False
        if fe is None or fe.broken:
            for index in started:
                self._user_path(index)
                self.memory.close_queue(index)
            return
        try:
            for index in started:
                base = await fe.stop_vring(index)
                self.log.debug("queue %d stopped at avail index %d", index, base)
            if self._quiescing and getattr(self.memory, "direct", False):
                self._ask_quiet()
        finally:
            for index in started:
                self._user_path(index)
                self.memory.close_queue(index)
        if started:
            self.stats.stops += 1
        self._note_rings()
        if fe.has_protocol_feature(ProtocolFeatures.RESET_DEVICE):
            await fe.reset_device()
        elif fe.has_protocol_feature(ProtocolFeatures.STATUS):
            await fe.set_status(0)

    # --- notifications from the back-end ----------------------------------------------------------

    def _on_call(self, index: int) -> None:
        try:
            os.eventfd_read(self._call[index])
        except BlockingIOError:
            return
        self.stats.per_queue_calls[index] = self.stats.per_queue_calls.get(index, 0) + 1
        if self.model is None:
            return
        mine = self.memory.used(index)
        for other in self.memory.also_used():  # (before this queue's: they were completed first)
            self._signal(self.model.used_buffer(other))
        if not mine:
            return
        self._losses = 0  # the back-end completes what it is given
        self._signal(self.model.used_buffer(index))

    def _backend_note(self, level: int, key: str, msg: str, *args: object) -> None:
        """A line caused by the back-end: at most the rate limit's burst per ``key`` and window."""
        allowed, suppressed = self._limit.allow(f"back-end {key}")
        if allowed:
            self.log.log(level, msg + (f" ({suppressed} similar lines suppressed)" if suppressed else ""), *args)

    async def _backend_request(self, event: RequestReceived) -> int:
        for fd in event.fds:
            os.close(fd)
        if event.request == BackendRequest.CONFIG_CHANGE_MSG:
            # Answer at once: the back-end may wait for our ACK before it serves our GET_CONFIG.
            # Coalesced: one refresh pending at most, whatever the number of messages.
            self._config_dirty = True
            if self._config_task is None:
                task = self._config_task = asyncio.get_running_loop().create_task(self._refresh_config())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return 0
        self._backend_note(logging.INFO, "refused", "refusing back-end request %s", event.request.name)
        return 1

    async def _refresh_config(self) -> None:
        """GET_CONFIG until no CONFIG_CHANGE_MSG came in meanwhile; the guest gets one config
        interrupt per change it can see (``config_changed`` ignores an unchanged config)."""
        try:
            while self._config_dirty:
                await self._settle()  # not under the lock: a guest's reset must not wait for a start
                async with self._lock:
                    if self._starting is not None or self._stopping is not None:
                        continue  # one began meanwhile: wait for it too
                    self._config_dirty = False
                    fe, model = self.frontend, self.model
                    if fe is None or model is None or fe.broken:
                        return
                    try:
                        config = await fe.get_config(0, len(model.config) or MAX_CONFIG_SIZE)
                    except VhostUserError as e:
                        self._backend_note(logging.WARNING, "config", "config change announced but GET_CONFIG failed: %s", e)
                        return
                    generation = model.config_generation
                    actions = model.config_changed(config)
                    if model.config_generation != generation:
                        self._backend_note(logging.INFO, "config", "back-end config changed")
                    await self._carry_out(actions)
        finally:
            self._config_task = None

    async def restore(self, state: dict[str, object]) -> None:
        """Take over a device whose previous daemon died: the driver-visible state saved by that
        daemon (``virtio_mmio.snapshot``) is loaded and, if the driver had the device running, the
        back-end's rings are resumed at the guest's used indices."""
        assert self.model is not None and self.frontend is not None
        restored: list[object] = []  # a PCI function's: its BAR claim, its INTx level
        try:
            if isinstance(self.model, VirtioPciDevice):
                restored = list(restore_function(self.model, state))
            else:
                restore_model(self.model, state)
        except ValueError as e:
            self.log.warning("saved state not usable (%s): the guest's driver must reset the device", e)
            await self._carry_out(self.model.needs_reset(f"device state lost: {e}"))
            return
        self.changed.set()
        if self.model.active:
            self._queues = tuple(
                QueueConfig(i, q.num, q.desc, q.driver, q.device) for i, q in enumerate(self.model.queues) if q.ready
            )
            async with self._lock:
                await self._guarded(self._start_backend(self.frontend, self.model.driver_features, self._queues, resume=True))
            self.log.info("resumed the device a previous run left running (queues %s)", [q.index for q in self._queues])
        if isinstance(self.model, VirtioPciDevice):
            self._carry_out_now(restored)
        elif self.model.line:
            self._set_irq(True)

    def fail(self, reason: str) -> None:
        """Something outside the model broke the device (e.g. the shadow path stopped a queue
        the guest corrupted): DEVICE_NEEDS_RESET, the config interrupt, a log line."""
        if self.model is None:
            return
        self.log.error("%s", reason)
        self.stats.last_error = reason
        self._signal(self.model.needs_reset(reason))

    @property
    def starting(self) -> asyncio.Task[None] | None:
        """The start a DRIVER_OK write left running, if any (await it to know it ended; it
        raises only if cancelled: a failure is the device's DEVICE_NEEDS_RESET)."""
        return self._starting

    @property
    def reconnecting(self) -> asyncio.Task[None] | None:
        """The reconnect in progress, if any (await it to know the outcome)."""
        return self._reconnecting

    def backend_lost(self, reason: str, *, reconnect: bool = True) -> None:
        """The back-end connection broke: reconnect and resume, or tell the guest (NEEDS_RESET).
        ``reconnect``: the library's verdict on the error (``VhostUserError.reconnect``); when
        it says connecting again will not help, the device fails at once, without a retry loop."""
        if self.model is None or self._closing or self._reconnecting is not None:
            return
        self.stats.last_error = f"back-end lost: {reason}"
        if not reconnect:
            self._give_up(f"back-end lost ({reason}); not reconnecting: the error is not one a new connection cures")
            if self.frontend is not None:  # its socket goes now, not with the device
                task = asyncio.get_running_loop().create_task(self.frontend.close())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        pause = self._count_loss()
        self.log.warning("back-end lost (%s): reconnecting%s", reason,
                         f" in {pause:g} s ({self._losses} losses in a row)" if pause else "")
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(pause))

    def _count_loss(self) -> float:
        """One more loss in the streak: the pause before reconnecting (0 for the first)."""
        if asyncio.get_running_loop().time() - self._connected_at >= LOSS_STREAK_FORGET:
            self._losses = 0
        self._losses += 1
        return 0.0 if self._losses < 2 else min(RECONNECT_BACKOFF * 2 ** (self._losses - 2), LOSS_BACKOFF_MAX)

    async def _reconnect(self, pause: float = 0.0) -> None:
        """Reconnect within RECONNECT_WINDOW, replay features, memory and rings, and resume.

        The guest sees at most a pause: its queue state lives in the model, its notifies keep
        accumulating on the kick eventfds the new back-end is given, and the rings restart at the
        used index (QEMU's rule: what was in flight is submitted again; exact for an out-of-order
        back-end only with INFLIGHT_SHMFD, whose area the new back-end gets back). A back-end
        lost again while being resumed counts as one more loss of the streak.
        """
        assert self.model is not None
        loop = asyncio.get_running_loop()
        old, self.frontend = self.frontend, None
        if old is not None:
            await old.close()
        try:
            while True:
                opened = await self._open_again(pause)
                if opened is None:
                    return
                fe, nq, view = opened
                async with self._lock:
                    missing = self.model.driver_features & ~guest_features(view.features, grants=self.config.grants)
                    if nq != len(self._kick) or missing:
                        await fe.close()
                        self._give_up(f"the back-end came back different ({nq} queues, lacking features {missing:#x})")
                        return
                    self.frontend = fe
                    self._connected_at = loop.time()
                    self.stats.reconnects += 1
                    await self._carry_out(self.model.config_changed(view.config))
                    if self.model.active and self._queues:
                        resume, self._fresh = not self._fresh, False  # never-started queues start afresh
                        try:
                            if not await self._resume(fe, resume):
                                self.frontend = None
                                await fe.close()  # cut mid-request: the connection cannot carry another one
                                pause = 0.0
                                self.log.warning("the driver reset the device while the back-end was being "
                                                 "resumed: resume abandoned, reconnecting")
                                continue
                        except VhostUserError as e:
                            if not (fe.broken and e.reconnect):
                                await self._guarded(self._reraise(e))
                            else:
                                self.frontend = None
                                self._fresh = not resume  # (never-started queues stay so)
                                await fe.close()
                                pause = self._count_loss()
                                self.stats.last_error = f"back-end lost: {e}"
                                self.log.warning("back-end lost again while resuming (%s): reconnecting in %g s "
                                                 "(%d losses in a row)", e, pause, self._losses)
                                continue
                        except GuestFault as e:
                            await self._guarded(self._reraise(e))
                    self.log.info("back-end reconnected%s", " and resumed" if self._started else "")
                    return
        finally:
            self._reconnecting = None
            current = self.frontend
            if current is not None and current.error is not None and not self._closing:
                # lost again once resumed, while this task still ran (backend_lost ignored it)
                self.backend_lost(str(current.error), reconnect=current.error.reconnect)

    async def _resume(self, fe: AsyncFrontend, resume: bool) -> bool:
        """A reconnect's start of the rings, as a task a driver's reset cancels (False: it did)."""
        assert self.model is not None
        task = asyncio.get_running_loop().create_task(
            self._start_backend(fe, self.model.driver_features, self._queues, resume=resume))
        self._resuming = task
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            await cancel_and_wait(task)
            raise
        finally:
            self._resuming = None
        if task.cancelled():
            return False
        task.result()
        return True

    @staticmethod
    async def _reraise(exc: Exception) -> None:
        raise exc

    async def _open_again(self, pause: float) -> tuple[AsyncFrontend, int, devtypes.Offer] | None:
        """After ``pause``, connect and negotiate within RECONNECT_WINDOW (None: gave up, the
        device is in NEEDS_RESET)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pause + RECONNECT_WINDOW
        delay = RECONNECT_BACKOFF
        if pause:
            await asyncio.sleep(pause)  # back-off after losses in a row, not synchronisation
        while True:
            try:
                fe, _negotiated, nq, view = await self._open_backend()
                return fe, nq, view
            except (VhostUserError, DeviceError, BackendAbsent, OSError) as e:
                if isinstance(e, VhostUserError) and not e.reconnect:
                    self._give_up(f"back-end came back but refused ({e}); not reconnecting again")
                    return None
                if loop.time() + delay > deadline:
                    self._give_up(f"back-end did not come back within {RECONNECT_WINDOW:.0f} s: {e}")
                    return None
                self.log.debug("reconnect attempt failed: %s", e)
                await asyncio.sleep(delay)  # back-off between attempts, not synchronisation
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX)

    def _give_up(self, reason: str) -> None:
        assert self.model is not None
        self.log.error("%s", reason)
        started, self._started = self._started, []
        for index in started:
            self._user_path(index)
            self.memory.close_queue(index)
        self.changed.set()
        actions = self.model.needs_reset(reason)
        self._signal(actions)
        for action in actions:
            if isinstance(action, GuestError):
                self.stats.last_error = action.reason
