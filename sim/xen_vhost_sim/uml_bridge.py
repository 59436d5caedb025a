"""A User-Mode Linux guest as a simulated Xen domain (SIM-ONLY).

UML's ``virtio_uml`` is a real Linux vhost-user FRONT-END: it connects to a socket, shares its
whole physical memory as one fd region and puts real Linux vrings in it. The bridge accepts that
connection as a vhost-user back-end and plays, on the simulated domain's vCPUs, the virtio-mmio
register accesses Linux's ``virtio_mmio`` driver would make for the same driver actions, so the
daemon serves a real Linux guest through the same IOREQ path as any other guest::

    UML virtio_blk ─ virtio_uml ══vhost-user══▶ UmlBridge ── SimGuest (vCPU MMIO, IRQ line) ──▶
        simulated Xen (domain RAM = UML's memory file) ── IOREQ ──▶ xen-vhost-master ──▶ back-end

The guest's memory: UML's physical memory is a (deleted) file that virtio_uml only hands over in
SET_MEM_TABLE, which comes after feature negotiation, when a driver binds. The domain must exist
with its RAM before the first register access, so the bridge takes the file from UML's process at
connect time (``SO_PEERCRED`` → ``/proc/<pid>/fd``, the largest unlinked regular file) and makes
it the domain's RAM: one bank at guest-physical 0 with file offset = physical address, which is
how UML maps it (``phys_mapping``: offset = phys). SET_MEM_TABLE is then checked against it (same
inode, ``mmap_offset == guest_phys_addr``, inside the bank); anything else is refused.

What each vhost-user request becomes (Linux ``virtio_mmio.c`` order):

* GET_FEATURES: reset (Status 0, read back), ACKNOWLEDGE, DRIVER, DeviceFeaturesSel 1/0 +
  DeviceFeatures. The answer drops what UML cannot use through this bridge (packed rings,
  NOTIFICATION_DATA); bit 30 (PROTOCOL_FEATURES) is vhost-user's and added by the server.
* SET_FEATURES: DriverFeaturesSel 1/0 + DriverFeatures (bit 30 removed), FEATURES_OK, Status read
  back; a device that clears FEATURES_OK fails the request (NACK with REPLY_ACK).
* GET_CONFIG / SET_CONFIG: config space accesses (aligned 4-byte, else 1-byte) in a
  ConfigGeneration loop.
* SET_VRING_NUM/ADDR/KICK + ENABLE(1): UML's ring addresses are user addresses; they are translated
  through its region table to guest-physical, then QueueSel, QueueReady (must be 0), QueueNumMax,
  QueueNum, QueueDesc/Driver/Device Low/High, QueueReady = 1.
* DRIVER_OK: virtio_uml keeps the status byte to itself (no message), so the bridge writes
  DRIVER_OK at the first kick after queue setup, before the QueueNotify (a virtio driver kicks only
  after DRIVER_OK, and every queue is set up by then).
* kick eventfd → QueueNotify (queue index) on vCPU 0; kicks arriving during a notify are coalesced.
* the guest's interrupt line (set_irq_level by the daemon) → on vCPU 1: InterruptStatus,
  InterruptACK; USED_BUFFER → every live ring's call fd; CONFIG_CHANGE → CONFIG_CHANGE_MSG on the
  back-end channel.
* SET_VRING_ENABLE(0) of a live ring (driver removal) → Status 0 (reset).

Grant mode (``grants=True``): the bridge plays a grant-based Xen guest (``grant_usage=1``): it
accepts VIRTIO_F_ACCESS_PLATFORM for UML, and the device sees UML's chains re-published in grant
DMA space, every page UML's chains point at granted to dom0 (:mod:`.uml_grants`). The bridge's own
ring pages are an area appended to UML's memory file (UML never maps past its physical memory);
the domain's RAM bank covers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vhost_user.aio.device import VhostUserDevice, Vring
from vhost_user.aio.server import BackendServer
from vhost_user.aio.transport import FdSocket, UnixListener
from vhost_user.events import RequestReceived
from vhost_user.wire.enums import FrontendRequest, ProtocolFeatures
from xen_vhost_sim.guest import SimControl, SimGuest, SimHostError
from xen_vhost_sim.guest_driver import MMIO_MAGIC, DeviceStatus, Feature, Interrupt, MmioReg
from xen_vhost_sim.uml_grants import GRANT_CACHE_RUNS, GrantRing, GrantRingError, GrantStats, RingArea

__all__ = [
    "BRIDGE_MASKED_FEATURES",
    "BridgeStats",
    "UmlBridge",
    "UmlBridgeError",
    "UmlMemory",
    "UmlMemoryError",
    "find_uml_memory",
    "no_aslr",
    "offered_to_uml",
]

log = logging.getLogger(__name__)

F = FrontendRequest
PAGE = 4096
#: Feature bits the bridge never offers UML: RING_PACKED (34) and NOTIFICATION_DATA (38) (its
#: kick is an eventfd without data), and bit 30, which on the vhost-user side is
#: VHOST_USER_F_PROTOCOL_FEATURES (the server adds it; the virtio-mmio device must not offer it).
BRIDGE_MASKED_FEATURES = (1 << 30) | int(Feature.RING_PACKED | Feature.NOTIFICATION_DATA)
MAX_QUEUES = 16
#: Grant mode: not offered to UML (indirect tables and event-idx fields would need translating),
#: nor ACCESS_PLATFORM (the bridge is UML's grant DMA layer: it accepts it towards the device).
GRANT_MASKED_FEATURES = int(Feature.RING_INDIRECT_DESC | Feature.RING_EVENT_IDX | Feature.ACCESS_PLATFORM)
F_ACCESS_PLATFORM = int(Feature.ACCESS_PLATFORM)
GRANT_AREA = 1 << 20  # the bridge's ring pages in grant mode (appended to UML's memory file)
CONFIG_RETRIES = 100
MMIO_TIMEOUT = 10.0
KICK_VCPU, IRQ_VCPU = 0, 1
# InterruptStatus bits as plain ints: ``int & IntFlag`` builds a new IntFlag through the enum
# machinery (1.8 µs against 0.1, twice per interrupt on the bench's hot path).
_USED_BUFFER, _CONFIG_CHANGE = int(Interrupt.USED_BUFFER), int(Interrupt.CONFIG_CHANGE)
T = TypeVar("T")


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired[0] = True
    task.cancel()


async def _bounded(access: Awaitable[T]) -> T:
    """``access``, TimeoutError if it takes more than MMIO_TIMEOUT: asyncio.timeout's effect with
    one timer and no context manager (a third of its cost; three of them per guest request)."""
    task = asyncio.current_task()
    assert task is not None
    expired = [False]
    handle = asyncio.get_running_loop().call_later(MMIO_TIMEOUT, _expire, task, expired)
    try:
        return await access
    except asyncio.CancelledError:
        if expired[0] and task.uncancel() == 0:
            raise TimeoutError(f"MMIO access not answered in {MMIO_TIMEOUT} s") from None
        raise
    finally:
        handle.cancel()


class UmlBridgeError(Exception):
    """The bridge cannot make this UML connection a simulated guest (reason in the message)."""


class UmlMemoryError(UmlBridgeError):
    """UML's memory file could not be found or does not match UML's memory table."""


@dataclass(frozen=True)
class UmlMemory:
    """UML's physical memory file, reopened from its process (``fd`` is ours to close)."""

    pid: int
    fd: int
    size: int
    dev: int
    ino: int


ADDR_NO_RANDOMIZE = 0x0040000  # linux/personality.h


@contextlib.contextmanager
def no_aslr() -> Iterator[None]:
    """Processes started inside the block run without address-space randomisation (inherited
    across exec, as ``setarch -R``). With ASLR, UML adds a random "exec-shield gap" of up to ~1 GiB
    to its physical memory, and every back-end then maps (and DPDK walks) that much more."""
    libc = ctypes.CDLL(None, use_errno=True)
    old = libc.personality(0xFFFFFFFF)
    if old == -1 or libc.personality(old | ADDR_NO_RANDOMIZE) == -1:
        raise OSError(ctypes.get_errno(), "personality(ADDR_NO_RANDOMIZE)")
    try:
        yield
    finally:
        libc.personality(old)


def offered_to_uml(device_features: int) -> int:
    """The virtio features the bridge passes on to UML (pure)."""
    return device_features & ~BRIDGE_MASKED_FEATURES


def find_uml_memory(sock: socket.socket | int, proc: str = "/proc") -> UmlMemory:
    """UML's physical memory file, taken from the process at the other end of ``sock``.

    UML keeps it open as an unlinked regular file (O_TMPFILE or a deleted ``vm_file-*``): the
    largest such file among the peer's fds. Raises :class:`UmlMemoryError`.
    """
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    finally:
        if not isinstance(sock, socket.socket):
            s.close()
    if pid <= 0:
        raise UmlMemoryError("the peer of the vhost-user socket has no process id")
    fd_dir = os.path.join(proc, str(pid), "fd")
    best: tuple[int, str] | None = None
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        raise UmlMemoryError(f"cannot list {fd_dir}: {exc}") from None
    for name in names:
        path = os.path.join(fd_dir, name)
        try:
            st = os.stat(path)
        except OSError:
            continue  # closed meanwhile, or not ours to see
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_size >= PAGE:
            if best is None or st.st_size > best[0]:
                best = (st.st_size, path)
    if best is None:
        raise UmlMemoryError(f"process {pid} holds no unlinked memory file: is it User-Mode Linux?")
    try:
        fd = os.open(best[1], os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UmlMemoryError(f"cannot open UML's memory file {best[1]}: {exc}") from None
    st = os.fstat(fd)
    return UmlMemory(pid, fd, st.st_size & ~(PAGE - 1), st.st_dev, st.st_ino)


@dataclass
class BridgeStats:
    kicks: int = 0  # kick eventfd wake-ups from UML
    notifies: int = 0  # QueueNotify writes
    interrupts: int = 0  # line assertions handled
    spurious: int = 0  # InterruptStatus 0
    calls: int = 0  # call fd signals to UML
    config_reads: int = 0
    mmio: int = 0


@dataclass
class _Queue:
    index: int
    live: bool = False  # set up on the virtio-mmio side (QueueReady = 1)
    notifying: bool = False
    pending: bool = False  # kicked before DRIVER_OK could be written
    again: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class _BridgeDevice(VhostUserDevice):
    """The vhost-user device UML sees: answers from what the bridge read over MMIO."""

    protocol_features = ProtocolFeatures.REPLY_ACK | ProtocolFeatures.CONFIG | ProtocolFeatures.BACKEND_REQ
    num_queues = MAX_QUEUES

    def __init__(self, bridge: UmlBridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.device_features = 0
        self.config = b""

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config if len(self.config) == size else b""

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        return True  # written over MMIO before the server answers

    def handle_kick(self, vring: Vring) -> None:
        self.bridge._kick(vring)

    def vring_started(self, vring: Vring) -> None:
        if vring.call_fd is not None:
            os.set_blocking(vring.call_fd, False)  # a full pipe must never block the bridge


class _BridgeServer(BackendServer):
    """BackendServer whose requests first do their MMIO work (async) on the simulated vCPU."""

    def __init__(self, bridge: UmlBridge, device: _BridgeDevice, sock: FdSocket) -> None:
        super().__init__(device, sock, logger=log)
        self.bridge = bridge
        self._refused: set[int] = set()
        for req in (F.SET_FEATURES, F.SET_MEM_TABLE, F.SET_CONFIG):
            inner = self._handlers[req]
            self._handlers[req] = self._refusable(inner)

    def _refusable(self, inner: Callable[[RequestReceived], object]) -> Callable[[RequestReceived], object]:
        def handler(ev: RequestReceived) -> object:
            if id(ev) in self._refused:
                self._refused.discard(id(ev))
                return False
            return inner(ev)

        return handler

    async def _dispatch(self, event: RequestReceived) -> None:
        try:
            ok = await self.bridge._before(event)
        except (UmlBridgeError, SimHostError, TimeoutError) as exc:
            log.error("%s: %s", event.request.name, exc)
            if event.request == F.GET_FEATURES:  # no answer is better than a wrong feature word
                raise UmlBridgeError(f"cannot read the device's features: {exc}") from exc
            ok = False
        if not ok:
            self._refused.add(id(event))
        await super()._dispatch(event)
        self._refused.discard(id(event))
        try:
            await self.bridge._after(event)
        except (UmlBridgeError, SimHostError, TimeoutError) as exc:
            log.error("after %s: %s", event.request.name, exc)


class UmlBridge:
    """One UML virtio device as the virtio-mmio device at ``base``/``irq`` of a simulated domain.

    ``await accept(listener)`` takes UML's connection and creates the domain (its id is returned:
    start the daemon for it now); ``await serve()`` then runs until UML hangs up; ``close()``.
    """

    def __init__(self, sim_path: str, *, base: int, irq: int, device_id: int | None = None,
                 vcpus: int = 2, destroy_on_close: bool = True, withhold: int = 0, grants: bool = False,
                 grant_cache: int = GRANT_CACHE_RUNS) -> None:
        """``withhold``: device feature bits not offered to UML on top of
        :data:`BRIDGE_MASKED_FEATURES` (e.g. virtio-net's CTRL_VQ family when the back-end leaves
        the control queue to the front-end, as dpdk-testpmd does). ``grants``: play a grant-based
        guest (``grant_cache``: persistent grant runs kept, 0 = end each request's grants)."""
        self.sim_path, self.base, self.irq, self.device_id = sim_path, base, irq, device_id
        self.withhold = withhold | (GRANT_MASKED_FEATURES if grants else 0)
        self.grants, self.grant_cache = grants, grant_cache
        self.grant_stats = GrantStats()
        self._rings: dict[int, GrantRing] = {}
        self._area: RingArea | None = None
        self._ram: mmap.mmap | None = None
        self._ram_view: memoryview | None = None
        self.vcpus = max(vcpus, 1)
        self.destroy_on_close = destroy_on_close
        self.stats = BridgeStats()
        self.domid: int | None = None
        self.memory: UmlMemory | None = None
        self.guest: SimGuest | None = None
        self.server: _BridgeServer | None = None
        self._sock: FdSocket | None = None
        self._queues: dict[int, _Queue] = {}
        self._driver_ok = False
        self._status = 0
        self._irq_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ life cycle
    async def accept(self, listener: UnixListener, timeout: float = 30.0) -> int:
        """Accept UML's connection, adopt its memory and create the domain; returns the domid."""
        sock = await listener.accept(timeout=timeout)
        adopted = False
        try:
            domid = self.adopt(sock)
            adopted = True
        finally:
            if not adopted:
                sock.close()
        return domid

    def adopt(self, sock: FdSocket) -> int:
        """Make the UML process behind ``sock`` (taken over) a simulated domain; returns its id."""
        self._sock = sock
        mem = find_uml_memory(sock.fileno())
        self.memory = mem
        ram_size = mem.size
        if self.grants:  # the bridge's ring pages: past UML's memory, in the same file
            start = (os.fstat(mem.fd).st_size + PAGE - 1) & ~(PAGE - 1)
            os.ftruncate(mem.fd, start + GRANT_AREA)
            ram_size = start + GRANT_AREA
            self._area = RingArea(start, GRANT_AREA)
            self._ram = mmap.mmap(mem.fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._ram_view = memoryview(self._ram)
        with SimControl(self.sim_path) as ctl:
            try:
                self.domid = ctl.create_domain_on_fd(mem.fd, [(0, ram_size)], vcpus=self.vcpus, name=f"uml-{mem.pid}")
            except SimHostError as exc:
                raise UmlBridgeError(f"the simulated host refused UML's memory: {exc}") from exc
        log.info("UML pid %d: %d MiB of physical memory is the RAM of d%d", mem.pid, mem.size >> 20, self.domid)
        return self.domid

    async def serve(self) -> None:
        """Probe the virtio-mmio device, then serve UML until it hangs up."""
        if self._sock is None or self.domid is None:
            raise UmlBridgeError("accept() first")
        self.guest = await SimGuest.connect(self.sim_path, self.domid)
        magic, version = await self._read(MmioReg.MAGIC_VALUE), await self._read(MmioReg.VERSION)
        device_id = await self._read(MmioReg.DEVICE_ID)
        if magic != MMIO_MAGIC or version != 2 or device_id == 0:
            raise UmlBridgeError(f"no virtio-mmio v2 device at {self.base:#x} (magic {magic:#x}, version {version}, id {device_id})")
        if self.device_id is not None and device_id != self.device_id:
            raise UmlBridgeError(f"device id {device_id} at {self.base:#x}, UML expects {self.device_id}")
        device = _BridgeDevice(self)
        self.server = _BridgeServer(self, device, self._sock)
        self._sock = None  # the server owns and closes it
        self._irq_task = asyncio.get_running_loop().create_task(self._interrupts(), name="uml-bridge-irq")
        try:
            await self.server.run()
        finally:
            await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._irq_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._irq_task = None
        self._tasks.clear()

    async def close(self) -> None:
        await self._stop_tasks()
        if self.server is not None:
            self.server.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._end_grants()  # while the guest can still end them
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self.domid is not None and self.destroy_on_close:
            with contextlib.suppress(OSError), SimControl(self.sim_path) as ctl:
                ctl.destroy_domain(self.domid)
        if self._ram_view is not None:
            self._ram_view.release()
            self._ram_view = None
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        if self.memory is not None:
            os.close(self.memory.fd)
            self.memory = None

    # ------------------------------------------------------------------ MMIO helpers
    async def _read(self, reg: int, size: int = 4, vcpu: int = KICK_VCPU) -> int:
        assert self.guest is not None
        self.stats.mmio += 1
        return await _bounded(self.guest.mmio_read(self.base + reg, size, vcpu))

    async def _write(self, reg: int, value: int, size: int = 4, vcpu: int = KICK_VCPU) -> None:
        assert self.guest is not None
        self.stats.mmio += 1
        await _bounded(self.guest.mmio_write(self.base + reg, size, value, vcpu))

    async def _set_status(self, bits: int) -> None:
        self._status = bits
        await self._write(MmioReg.STATUS, bits)

    async def _reset(self, why: str) -> None:
        log.info("d%s: device reset (%s)", self.domid, why)
        await self._write(MmioReg.STATUS, 0)
        for _ in range(1000):
            if await self._read(MmioReg.STATUS) == 0:
                break
            await asyncio.sleep(0.001)  # Linux: msleep(1) until the reset is done
        else:
            raise UmlBridgeError("the device does not finish its reset")
        self._status = 0
        self._driver_ok = False
        self._end_grants()
        for q in self._queues.values():
            q.live = q.pending = False

    def _end_grants(self) -> None:
        """Grant mode: the device is reset (or gone): end the rings' and buffers' grants."""
        rings, self._rings = self._rings, {}
        for ring in rings.values():
            ring.close()

    async def _features(self) -> int:
        await self._reset("GET_FEATURES: probe, or the barrier after a driver's removal")
        await self._set_status(DeviceStatus.ACKNOWLEDGE)
        await self._set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        await self._write(MmioReg.DEVICE_FEATURES_SEL, 1)
        high = await self._read(MmioReg.DEVICE_FEATURES)
        await self._write(MmioReg.DEVICE_FEATURES_SEL, 0)
        low = await self._read(MmioReg.DEVICE_FEATURES)
        return (high << 32) | low

    async def _set_features(self, features: int) -> bool:
        features &= ~(BRIDGE_MASKED_FEATURES | self.withhold)
        if self.grants:
            features |= F_ACCESS_PLATFORM  # the grant DMA layer (the bridge) uses grant addresses
        if self._status & DeviceStatus.FEATURES_OK:
            # finalize_features again (a driver's validate() dropped a feature): virtio_mmio would
            # not have written FEATURES_OK yet; here it is, so renegotiate from a reset.
            await self._reset("SET_FEATURES again: renegotiation")
            await self._set_status(DeviceStatus.ACKNOWLEDGE)
            await self._set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        await self._write(MmioReg.DRIVER_FEATURES_SEL, 1)
        await self._write(MmioReg.DRIVER_FEATURES, features >> 32)
        await self._write(MmioReg.DRIVER_FEATURES_SEL, 0)
        await self._write(MmioReg.DRIVER_FEATURES, features & 0xFFFFFFFF)
        await self._set_status(self._status | DeviceStatus.FEATURES_OK)
        if not await self._read(MmioReg.STATUS) & DeviceStatus.FEATURES_OK:
            await self._set_status(self._status | DeviceStatus.FAILED)
            log.error("the device refused features %#x (FEATURES_OK cleared)", features)
            return False
        return True

    async def _read_config(self, size: int) -> bytes:
        for _ in range(CONFIG_RETRIES):
            gen = await self._read(MmioReg.CONFIG_GENERATION)
            out = bytearray()
            off = 0
            while off < size:
                n = 4 if size - off >= 4 and off % 4 == 0 else 1
                out += (await self._read(MmioReg.CONFIG + off, n)).to_bytes(n, "little")
                off += n
            if await self._read(MmioReg.CONFIG_GENERATION) == gen:
                self.stats.config_reads += 1
                return bytes(out)
        raise UmlBridgeError("config space keeps changing (ConfigGeneration)")

    async def _write_config(self, offset: int, data: bytes) -> None:
        off = 0
        while off < len(data):
            n = 4 if len(data) - off >= 4 and (offset + off) % 4 == 0 else 1
            await self._write(MmioReg.CONFIG + offset + off, int.from_bytes(data[off : off + n], "little"), n)
            off += n

    async def _setup_queue(self, vring: Vring) -> None:
        q = self._queues.setdefault(vring.index, _Queue(vring.index))
        await self._write(MmioReg.QUEUE_SEL, vring.index)
        if await self._read(MmioReg.QUEUE_READY):
            raise UmlBridgeError(f"queue {vring.index} is already live on the device")
        num_max = await self._read(MmioReg.QUEUE_NUM_MAX)
        if num_max == 0 or vring.num > num_max:
            raise UmlBridgeError(f"queue {vring.index}: UML's size {vring.num} > QueueNumMax {num_max}")
        await self._write(MmioReg.QUEUE_NUM, vring.num)
        addrs = (vring.gpa_desc, vring.gpa_avail, vring.gpa_used)
        if self.grants:
            addrs = self._grant_ring(vring).addresses
        for low, gpa in zip((MmioReg.QUEUE_DESC_LOW, MmioReg.QUEUE_DRIVER_LOW, MmioReg.QUEUE_DEVICE_LOW), addrs):
            await self._write(low, gpa & 0xFFFFFFFF)
            await self._write(low + 4, gpa >> 32)
        await self._write(MmioReg.QUEUE_READY, 1)
        q.live = True
        log.info("d%d queue %d: %d entries, desc %#x avail %#x used %#x", self.domid, vring.index, vring.num, *addrs)

    def _grant_ring(self, vring: Vring) -> GrantRing:
        """Grant mode: the bridge ring of ``vring`` (its pages granted; the old one's grants ended)."""
        assert self._area is not None and self._ram_view is not None and self.guest is not None
        old = self._rings.pop(vring.index, None)
        if old is not None:
            old.close()
        n = vring.num
        pages = (16 * n + 6 + 2 * n + 3 + 6 + 8 * n + PAGE - 1) // PAGE
        guest = self.guest
        try:
            ring = GrantRing(self._ram_view, n, (vring.gpa_desc, vring.gpa_avail, vring.gpa_used),
                             self._area.for_queue(vring.index, pages),
                             lambda gfn, ro: guest.grant(gfn, readonly=ro), guest.revoke,
                             cache_runs=self.grant_cache, stats=self.grant_stats)
        except (GrantRingError, OSError) as exc:
            raise UmlBridgeError(f"queue {vring.index}: cannot grant its rings: {exc}") from exc
        self._rings[vring.index] = ring
        return ring

    # ------------------------------------------------------------------ vhost-user requests
    async def _before(self, ev: RequestReceived) -> bool:
        """MMIO work that must precede the server's answer; False refuses the request."""
        assert self.server is not None
        device = self.server.device
        assert isinstance(device, _BridgeDevice)
        req = ev.request
        if req == F.GET_FEATURES:
            device.device_features = offered_to_uml(await self._features()) & ~self.withhold
        elif req == F.SET_FEATURES:
            return await self._set_features(int(ev.payload.value))
        elif req == F.GET_CONFIG:
            device.config = b""  # a failed read answers size 0 (vhost-user's "failed"), never stale bytes
            size = int(ev.payload.offset) + int(ev.payload.size)
            data = await self._read_config(size) if size <= 256 else b""
            device.config = data[int(ev.payload.offset):]
        elif req == F.SET_CONFIG:
            await self._write_config(int(ev.payload.offset), bytes(ev.payload.payload))
        elif req == F.SET_MEM_TABLE:
            self._check_mem_table(ev)
        elif req == F.SET_VRING_ENABLE and not ev.payload.num:
            q = self._queues.get(int(ev.payload.index))
            if q is not None and q.live:
                await self._reset(f"ring {q.index} disabled: the driver is going away")
        return True

    async def _after(self, ev: RequestReceived) -> None:
        """Set a queue up on the device once UML has given it a size, addresses and a kick fd
        (SET_VRING_KICK starts the ring; SET_VRING_ENABLE only exists with PROTOCOL_FEATURES)."""
        assert self.server is not None
        if ev.request == F.SET_VRING_KICK or (ev.request == F.SET_VRING_ENABLE and ev.payload.num):
            index = int(ev.payload.value if ev.request == F.SET_VRING_KICK else ev.payload.index) & 0xFF
            vring = self.server.vrings[index] if index < MAX_QUEUES else None
            if vring is None or not vring.started:
                raise UmlBridgeError(f"ring {index} has no size, addresses or kick fd")
            q = self._queues.get(vring.index)
            if q is None or not q.live:
                await self._setup_queue(vring)
            self._release_kicks()

    def _check_mem_table(self, ev: RequestReceived) -> None:
        mem = self.memory
        assert mem is not None
        for region, fd in zip(ev.payload.regions, ev.fds):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (mem.dev, mem.ino):
                raise UmlMemoryError("SET_MEM_TABLE names another file than the domain's RAM")
            if region.mmap_offset != region.guest_phys_addr or region.guest_phys_addr + region.memory_size > mem.size:
                raise UmlMemoryError(
                    f"region gpa {region.guest_phys_addr:#x} size {region.memory_size:#x} offset "
                    f"{region.mmap_offset:#x} is not UML's identity layout inside {mem.size:#x} bytes")

    # ------------------------------------------------------------------ kicks and interrupts
    def _rings_ready(self) -> bool:
        """Every ring UML has given addresses to is set up on the device (DRIVER_OK may go)."""
        assert self.server is not None
        return all(self._queues.get(v.index, _Queue(v.index)).live for v in self.server.vrings if v.addr is not None)

    def _release_kicks(self) -> None:
        if self._driver_ok or self._rings_ready():
            for q in self._queues.values():
                if q.pending and q.live:
                    log.debug("queue %d: held kick released", q.index)
                    q.pending = False
                    self._notify_queue(q)

    def _kick(self, vring: Vring) -> None:
        self.stats.kicks += 1
        q = self._queues.setdefault(vring.index, _Queue(vring.index))
        if not q.live or not (self._driver_ok or self._rings_ready()):
            # A kick that raced the queue's setup (its eventfd is polled from SET_VRING_KICK on),
            # or one before every queue is set up: notified as soon as DRIVER_OK may be written.
            q.pending = True
            log.debug("kick on queue %d held (live %s, DRIVER_OK %s)", q.index, q.live, self._driver_ok)
            return
        self._notify_queue(q)

    def _notify_queue(self, q: _Queue) -> None:
        if q.notifying:
            q.again = True
            return
        q.notifying = True
        task = asyncio.get_running_loop().create_task(self._notify(q))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self, q: _Queue) -> None:
        try:
            if not self._driver_ok:
                log.debug("DRIVER_OK (first kick, on queue %d)", q.index)
                self._driver_ok = True
                await self._set_status(self._status | DeviceStatus.DRIVER_OK)
            while True:
                q.again = False
                ring = self._rings.get(q.index)
                if ring is not None:
                    ring.pump()  # grant mode: UML's new chains, granted, on the bridge ring
                self.stats.notifies += 1
                await self._write(MmioReg.QUEUE_NOTIFY, q.index)
                if not q.again:
                    break
        except GrantRingError as exc:
            log.error("queue %d: cannot publish UML's chains in grant space: %s", q.index, exc)
            self.error = exc
        except (SimHostError, TimeoutError, ConnectionError) as exc:
            log.error("queue %d: QueueNotify failed: %s", q.index, exc)
            self.error = exc
        finally:
            q.notifying = False

    async def _interrupts(self) -> None:
        assert self.guest is not None
        vcpu = IRQ_VCPU if self.vcpus > 1 else KICK_VCPU
        try:
            while True:
                await self.guest.wait_irq(self.irq)
                self.stats.interrupts += 1
                status = await self._read(MmioReg.INTERRUPT_STATUS, vcpu=vcpu)
                if not status:
                    self.stats.spurious += 1
                    await asyncio.sleep(0)
                    continue
                await self._write(MmioReg.INTERRUPT_ACK, status, vcpu=vcpu)
                if status & _USED_BUFFER and self.server is not None:
                    for ring in list(self._rings.values()):
                        ring.complete()  # grant mode: the device's used entries to UML's rings
                    for vring in self.server.vrings:
                        if vring.started and vring.call_fd is not None:
                            self.stats.calls += 1
                            vring.call()
                if status & _CONFIG_CHANGE and self.server is not None:
                    await self.server.send_config_change()
        except (SimHostError, ConnectionError) as exc:
            if not isinstance(exc, SimHostError) or exc.errno != errno.ESRCH:
                log.error("interrupt path stopped: %s", exc)
                self.error = exc

    @property
    def kernel_answered(self) -> int:
        """Of :attr:`BridgeStats.mmio`, the accesses the (simulated) dom0 kernel's privcmd
        ioeventfd answered: QueueNotify writes that never reached the daemon."""
        return self.guest.kernel_answered if self.guest is not None else 0

    def snapshot(self) -> dict[str, Any]:
        return {"domid": self.domid, "driver_ok": self._driver_ok, "status": self._status,
                "queues": sorted(i for i, q in self._queues.items() if q.live), **vars(self.stats),
                "kernel_answered": self.kernel_answered}
