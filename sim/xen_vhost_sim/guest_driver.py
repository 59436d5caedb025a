"""A simulated guest's virtio-mmio v2 driver, written from virtio 1.2 §4.2.2/§4.2.3.

It follows the sequence of Linux's ``drivers/virtio/virtio_mmio.c`` + ``virtio.c``:

* probe: MagicValue 0x74726976, Version 2, DeviceID (0 = no device: :class:`NoDevice`), VendorID;
* reset: Status = 0, read back until 0; then ACKNOWLEDGE, DRIVER (each status write carries every
  bit set so far, as ``add_status`` does);
* features: DeviceFeaturesSel 1 then 0 (the order is a parameter), driver features = wanted ∩
  offered (VERSION_1 required), written the same way; FEATURES_OK, read back; a device that clears
  it gets FAILED and :class:`FeaturesRejected`;
* per queue: QueueSel, QueueReady must read 0, QueueNumMax (0 = absent), choose the size, allocate
  the rings in guest RAM, QueueNum, QueueDesc/Driver/Device Low/High, QueueReady = 1;
* DRIVER_OK; QueueNotify with the queue index (plus the avail index with NOTIFICATION_DATA);
* interrupts (``vm_interrupt``): wait for the line, read InterruptStatus, write InterruptACK with those
  bits, then config change (bit 1: DEVICE_NEEDS_RESET is checked there) and used rings (bit 0);
* config space through the ConfigGeneration loop (``__virtio_cread_many``);
* grant mode (``grants=True``), as Linux's Xen grant DMA ops (``drivers/xen/grant-dma-ops.c``,
  ``CONFIG_XEN_VIRTIO``, xl ``grant_usage=1``) do it: VIRTIO_F_ACCESS_PLATFORM is required (a device
  without it fails probe with FAILED), every page the device may touch is granted to the back-end
  domain and addressed as ``XEN_GRANT_DMA_ADDR_OFF | (ref << 12) | offset`` in the ring registers and
  descriptors: the rings for the queue's lifetime (read-write), each request's buffers for that
  request only (device-readable ones read-only, device-writable ones read-write), revoked once the
  device has returned the chain. A buffer spanning pages gets consecutive references (one address).

It touches the machine only through :class:`~xen_vhost_sim.guest_api.GuestBus` and
``GuestRam``; the rings are ``vhost_user.virtqueue.SplitQueueDriver``. Device helpers (virtio-blk,
virtio-net) live in ``sim.guest_devices``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vhost_user.aio import cancel_and_wait
from vhost_user.virtqueue import RingError, SplitQueueDriver, split_ring_layout
from xen_vhost_sim.guest_api import GuestBus, GuestRam

__all__ = [
    "MMIO_MAGIC",
    "MmioReg",
    "DeviceStatus",
    "Feature",
    "Interrupt",
    "GuestDriverError",
    "ProbeError",
    "NoDevice",
    "FeaturesRejected",
    "QueueSetupError",
    "DeviceNeedsReset",
    "DeviceWasReset",
    "GuestTimeout",
    "OutOfGuestMemory",
    "GrantError",
    "GuestPageAllocator",
    "GuestQueue",
    "VirtioMmioDriver",
    "XEN_GRANT_DMA_ADDR_OFF",
    "grant_dma_address",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MMIO_MAGIC = 0x74726976  # "virt", little-endian
MMIO_VERSION = 2  # modern transport
PAGE_SIZE = 4096
# How long one MMIO access may block the vCPU before the simulated guest calls it a hang.
DEFAULT_MMIO_TIMEOUT = 10.0
# Reads of Status after writing 0 before giving up on the reset (Linux polls with msleep(1), forever).
RESET_POLL_MAX = 1000
# ConfigGeneration retries before giving up (the device keeps changing its config).
CONFIG_RETRIES_MAX = 100
# Back-to-back interrupts that showed InterruptStatus 0 before the ISR starts to yield the CPU.
SPURIOUS_IRQ_BACKOFF_AFTER = 100
DEFAULT_QUEUE_SIZE = 256
XEN_GRANT_DMA_ADDR_OFF = 1 << 63  # linux drivers/xen/grant-dma-ops.c
XEN_PAGE_SHIFT = 12


def grant_dma_address(ref: int, offset: int = 0) -> int:
    """The DMA address of byte ``offset`` of the (consecutive) grants starting at ``ref``."""
    return XEN_GRANT_DMA_ADDR_OFF | ((ref << XEN_PAGE_SHIFT) + offset)


class MmioReg(enum.IntEnum):
    """virtio-mmio register offsets (virtio 1.2 Table 4.1; linux/virtio_mmio.h). Written out here
    on purpose rather than taken from the device model's ``virtio_mmio.Reg``: the simulated guest
    checks the model, so a wrong offset there must not be shared by the guest."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class DeviceStatus(enum.IntFlag):
    """Device status field (virtio 1.2 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class Feature(enum.IntFlag):
    """Transport feature bits (virtio 1.2 §6) the driver knows about."""

    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    NOTIFICATION_DATA = 1 << 38


class Interrupt(enum.IntFlag):
    """InterruptStatus bits."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


# ---- errors ----------------------------------------------------------------------------------------


class GuestDriverError(Exception):
    """The simulated guest driver could not drive the device."""


class ProbeError(GuestDriverError):
    """Not a virtio-mmio v2 device (bad magic or version)."""


class NoDevice(GuestDriverError):
    """DeviceID 0: a placeholder window with no device behind it."""


class FeaturesRejected(GuestDriverError):
    """The device cleared FEATURES_OK (or does not offer VERSION_1)."""


class QueueSetupError(GuestDriverError):
    """A queue is absent (QueueNumMax 0) or already live (QueueReady 1 before setup)."""


class DeviceNeedsReset(GuestDriverError):
    """The device set DEVICE_NEEDS_RESET; outstanding requests failed."""


class DeviceWasReset(GuestDriverError):
    """The driver reset the device while the request was outstanding."""


class GuestTimeout(GuestDriverError, TimeoutError):
    """An MMIO access (or a wait) took longer than the driver's timeout."""


class OutOfGuestMemory(GuestDriverError, MemoryError):
    """The page allocator has no free range large enough."""


class GrantError(GuestDriverError):
    """Granting the pages of a ring or buffer failed (grant mode)."""


# ---- guest RAM page allocator ------------------------------------------------------------------------


class GuestPageAllocator:
    """First-fit page allocator over the guest's RAM banks (for rings and I/O buffers).

    ``reserve`` bytes at the start of the first bank are left alone (where a real guest's kernel
    would be).  Allocations never span banks, so each one is one ``GuestRam.view``.
    """

    def __init__(self, ram: GuestRam, *, reserve: int = 0) -> None:
        self.ram = ram
        self._free: list[tuple[int, int]] = []  # (start, end), sorted, page-aligned
        self._sizes: dict[int, int] = {}
        for i, (gpa, size) in enumerate(ram.banks()):
            start = _align_up(gpa + (reserve if i == 0 else 0), PAGE_SIZE)
            end = (gpa + size) & ~(PAGE_SIZE - 1)
            if end > start:
                self._free.append((start, end))

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        """GPA of ``size`` bytes (rounded up to pages), zeroed, aligned to ``align`` (a power of 2)."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size {size} / alignment {align}")
        size = _align_up(size, PAGE_SIZE)
        align = max(align, PAGE_SIZE)
        for i, (start, end) in enumerate(self._free):
            gpa = _align_up(start, align)
            if gpa + size <= end:
                pieces = [(s, e) for s, e in ((start, gpa), (gpa + size, end)) if e > s]
                self._free[i : i + 1] = pieces
                self._sizes[gpa] = size
                with self.ram.view(gpa, size) as mv:
                    mv[:] = bytes(size)
                return gpa
        raise OutOfGuestMemory(f"no free guest range of {size} bytes (aligned {align:#x})")

    def free(self, gpa: int) -> None:
        size = self._sizes.pop(gpa, None)
        if size is None:
            raise ValueError(f"{gpa:#x} was not allocated here")
        self._free.append((gpa, gpa + size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, end in self._free:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._free = merged


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


# ---- queues ----------------------------------------------------------------------------------------------


@dataclass
class GuestQueue:
    """One live virtqueue: the rings in guest RAM plus the futures of its outstanding chains."""

    index: int
    size: int
    ring_gpa: int
    desc: int
    avail: int
    used: int
    ring: SplitQueueDriver
    free_slot: asyncio.Event
    pending: set[asyncio.Future[int]] = field(default_factory=set)
    grant_refs: list[int] = field(default_factory=list)  # grant mode: the rings' pages

    def complete(self) -> int:
        """Harvest the used ring; resolve each chain's future with its written length."""
        done = self.ring.get_used()
        for token, written in done:
            self.pending.discard(token)
            if isinstance(token, asyncio.Future) and not token.done():
                token.set_result(written)
        if done:
            self.free_slot.set()
        return len(done)


# ---- the transport driver -----------------------------------------------------------------------------------


class VirtioMmioDriver:
    """Drives one virtio-mmio window at ``base`` with interrupt line ``irq``."""

    def __init__(
        self,
        bus: GuestBus,
        base: int,
        irq: int,
        allocator: GuestPageAllocator,
        *,
        vcpu: int = 0,
        features_sel_order: Sequence[int] = (1, 0),
        mmio_timeout: float = DEFAULT_MMIO_TIMEOUT,
        grants: bool = False,
    ) -> None:
        if sorted(features_sel_order) != [0, 1]:
            raise ValueError("features_sel_order must be a permutation of (0, 1)")
        self.bus = bus
        self.base = base
        self.irq = irq
        self.allocator = allocator
        self.vcpu = vcpu
        self.features_sel_order = tuple(features_sel_order)
        self.mmio_timeout = mmio_timeout
        self.device_id = 0
        self.vendor_id = 0
        self.device_features = 0
        self.features = 0  # negotiated
        self.status = DeviceStatus(0)
        self.queues: dict[int, GuestQueue] = {}
        self.needs_reset = False
        self.config_changes = 0
        self.interrupts = 0
        self.config_changed = asyncio.Event()
        self._isr: asyncio.Task[None] | None = None
        self.broken: GuestDriverError | None = None
        self.on_config_change: Callable[[], None] | None = None
        self.grants = grants
        self.live_grants = 0  # grant mode: references granted and not yet revoked

    # ---- register access ------------------------------------------------------------------

    async def _bounded(self, aw: Awaitable[_T], what: str) -> _T:
        try:
            async with asyncio.timeout(self.mmio_timeout):
                return await aw
        except TimeoutError:
            raise GuestTimeout(f"{what} at {self.base:#x} blocked for {self.mmio_timeout} s") from None

    async def read_reg(self, reg: int, size: int = 4) -> int:
        return await self._bounded(self.bus.mmio_read(self.base + reg, size, self.vcpu), f"read {reg:#x}")

    async def write_reg(self, reg: int, value: int, size: int = 4) -> None:
        await self._bounded(self.bus.mmio_write(self.base + reg, size, value, self.vcpu), f"write {reg:#x}")

    async def read_status(self) -> DeviceStatus:
        return DeviceStatus(await self.read_reg(MmioReg.STATUS) & 0xFF)

    async def _add_status(self, bit: DeviceStatus) -> None:
        self.status |= bit
        await self.write_reg(MmioReg.STATUS, int(self.status))

    # ---- probe / reset / negotiation -----------------------------------------------------------

    async def probe(self) -> int:
        """Check magic, version, device id; returns the device id (NoDevice for 0)."""
        magic = await self.read_reg(MmioReg.MAGIC_VALUE)
        if magic != MMIO_MAGIC:
            raise ProbeError(f"bad magic {magic:#010x} at {self.base:#x}")
        version = await self.read_reg(MmioReg.VERSION)
        if version != MMIO_VERSION:
            raise ProbeError(f"virtio-mmio version {version} at {self.base:#x} (only 2 is supported)")
        self.device_id = await self.read_reg(MmioReg.DEVICE_ID)
        if self.device_id == 0:
            raise NoDevice(f"no device at {self.base:#x}")
        self.vendor_id = await self.read_reg(MmioReg.VENDOR_ID)
        return self.device_id

    async def reset(self) -> None:
        """Stop interrupt handling, fail outstanding requests, write Status 0 and wait for it to read 0."""
        await self._stop_isr()
        self._fail_all(DeviceWasReset("device reset by the driver"))
        await self.write_reg(MmioReg.STATUS, 0)
        for _ in range(RESET_POLL_MAX):
            if await self.read_reg(MmioReg.STATUS) == 0:
                break
        else:
            raise GuestDriverError(f"device at {self.base:#x} did not complete its reset")
        self.status = DeviceStatus(0)
        self._release_queues()
        self.needs_reset = False
        self.broken = None
        self.features = 0

    async def read_device_features(self) -> int:
        features = 0
        for sel in self.features_sel_order:
            await self.write_reg(MmioReg.DEVICE_FEATURES_SEL, sel)
            features |= (await self.read_reg(MmioReg.DEVICE_FEATURES)) << (32 * sel)
        return features

    async def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK and its read-back. Returns the features."""
        await self.reset()
        await self._add_status(DeviceStatus.ACKNOWLEDGE)
        await self._add_status(DeviceStatus.DRIVER)
        self.device_features = await self.read_device_features()
        if not self.device_features & Feature.VERSION_1:
            await self._add_status(DeviceStatus.FAILED)
            raise FeaturesRejected(f"device at {self.base:#x} does not offer VERSION_1 (legacy only)")
        if self.grants and not self.device_features & Feature.ACCESS_PLATFORM:
            # virtio_features_ok: a grant (restricted-DMA) guest needs VIRTIO_F_ACCESS_PLATFORM
            await self._add_status(DeviceStatus.FAILED)
            raise FeaturesRejected(f"device at {self.base:#x} does not offer VIRTIO_F_ACCESS_PLATFORM, "
                                   "which a grant-mode guest requires")
        if self.grants:
            wanted |= Feature.ACCESS_PLATFORM
        features = (wanted | Feature.VERSION_1) & self.device_features
        for sel in self.features_sel_order:
            await self.write_reg(MmioReg.DRIVER_FEATURES_SEL, sel)
            await self.write_reg(MmioReg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        await self._add_status(DeviceStatus.FEATURES_OK)
        if not await self.read_status() & DeviceStatus.FEATURES_OK:
            await self._add_status(DeviceStatus.FAILED)
            raise FeaturesRejected(f"device at {self.base:#x} refused features {features:#x}")
        self.features = features
        return features

    def has(self, feature: int) -> bool:
        return self.features & feature == feature

    async def setup_queue(self, index: int, size: int = DEFAULT_QUEUE_SIZE) -> GuestQueue:
        """Select queue ``index``, size it (≤ QueueNumMax, power of 2), place its rings, enable it."""
        await self.write_reg(MmioReg.QUEUE_SEL, index)
        if await self.read_reg(MmioReg.QUEUE_READY):
            raise QueueSetupError(f"queue {index} is already ready before setup")
        num_max = await self.read_reg(MmioReg.QUEUE_NUM_MAX)
        if num_max == 0:
            raise QueueSetupError(f"queue {index} does not exist")
        num = min(size, num_max, 32768)
        num = 1 << (num.bit_length() - 1)  # split rings need a power of two
        _, _, _, total = split_ring_layout(num, 0)
        gpa = self.allocator.alloc(total)
        desc, avail, used, _ = split_ring_layout(num, gpa)
        try:
            ring = SplitQueueDriver(self.bus.ram, num, desc, avail, used, event_idx=self.has(Feature.RING_EVENT_IDX))
        except RingError:
            self.allocator.free(gpa)
            raise
        refs: list[int] = []
        if self.grants:
            try:
                refs = self._grant_consecutive(gpa, total, readonly=False)
            except GrantError:
                ring.release()
                self.allocator.free(gpa)
                raise
        queue = GuestQueue(index, num, gpa, desc, avail, used, ring, asyncio.Event(), grant_refs=refs)
        self.queues[index] = queue
        await self.write_reg(MmioReg.QUEUE_NUM, num)
        for low, addr in ((MmioReg.QUEUE_DESC_LOW, desc), (MmioReg.QUEUE_DRIVER_LOW, avail), (MmioReg.QUEUE_DEVICE_LOW, used)):
            if refs:
                addr = grant_dma_address(refs[0], addr - gpa)
            await self.write_reg(low, addr & 0xFFFFFFFF)
            await self.write_reg(low + 4, addr >> 32)
        await self.write_reg(MmioReg.QUEUE_READY, 1)
        return queue

    async def setup_queues(self, sizes: Sequence[int]) -> list[GuestQueue]:
        """One queue per entry of ``sizes``, from index 0 (``vm_find_vqs``)."""
        return [await self.setup_queue(index, size) for index, size in enumerate(sizes)]

    @property
    def where(self) -> str:
        """The device's place, for messages."""
        return f"at {self.base:#x}"

    async def driver_ok(self) -> None:
        """Set DRIVER_OK and start servicing the interrupt line."""
        await self._add_status(DeviceStatus.DRIVER_OK)
        if self._isr is None:
            self._isr = asyncio.create_task(self._service_interrupts(), name=f"virtio-mmio-isr@{self.base:#x}")

    async def initialize(self, wanted: int, queue_sizes: Sequence[int]) -> int:
        """The whole bring-up: probe, negotiate, one queue per entry of ``queue_sizes``, DRIVER_OK."""
        await self.probe()
        features = await self.negotiate(wanted)
        for index, size in enumerate(queue_sizes):
            await self.setup_queue(index, size)
        await self.driver_ok()
        return features

    async def close(self) -> None:
        """Reset the device (if reachable) and free the rings."""
        try:
            await self.reset()
        finally:
            await self._stop_isr()
            self._release_queues()

    # ---- config space ---------------------------------------------------------------------------

    async def config_read(self, fields: Sequence[tuple[int, int]]) -> list[int]:
        """Read config fields ``(offset, size)`` consistently (ConfigGeneration loop). A 64-bit field is
        read as two 32-bit accesses (low first), as the spec requires on virtio-mmio."""
        for _ in range(CONFIG_RETRIES_MAX):
            gen = await self.read_reg(MmioReg.CONFIG_GENERATION)
            values = []
            for offset, size in fields:
                if size == 8:
                    low = await self.read_reg(MmioReg.CONFIG + offset, 4)
                    high = await self.read_reg(MmioReg.CONFIG + offset + 4, 4)
                    values.append(low | high << 32)
                elif size in (1, 2, 4):
                    values.append(await self.read_reg(MmioReg.CONFIG + offset, size))
                else:
                    raise ValueError(f"config field size {size}")
            if await self.read_reg(MmioReg.CONFIG_GENERATION) == gen:
                return values
        raise GuestDriverError(f"config space at {self.base:#x} kept changing")

    async def config_bytes(self, offset: int, length: int) -> bytes:
        values = await self.config_read([(offset + i, 1) for i in range(length)])
        return bytes(values)

    async def config_write(self, offset: int, size: int, value: int) -> None:
        await self.write_reg(MmioReg.CONFIG + offset, value, size)

    # ---- requests, notification, interrupts --------------------------------------------------------

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise self.broken
        if not self.status & DeviceStatus.DRIVER_OK:
            raise GuestDriverError("device is not live (DRIVER_OK not set)")

    async def submit(
        self, index: int, readable: Sequence[tuple[int, int]] = (), writable: Sequence[tuple[int, int]] = (),
        *, kick: bool = True,
    ) -> asyncio.Future[int]:
        """Post one chain on queue ``index``; the future resolves to the device's written length.

        Waits (bounded by the MMIO timeout) while the ring is full. With ``kick=False`` the caller
        batches several chains and calls :meth:`kick` once.
        """
        self._check_usable()
        queue = self.queues[index]
        need = len(readable) + len(writable)
        if need > queue.size:
            raise ValueError(f"chain of {need} buffers does not fit queue {index} of size {queue.size}")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        refs: list[int] = []
        if self.grants:
            readable, writable, refs = self._grant_chain(readable, writable)  # one address per buffer
            # the device owns the pages until it returns the chain (or the queue is failed/reset)
            fut.add_done_callback(lambda _f: self._revoke(refs))
        room = False
        try:
            await self._wait_for_room(index, queue, need)
            room = True
        finally:
            if not room:
                fut.cancel()  # revokes the grants
        queue.ring.add(readable, writable, token=fut)
        queue.pending.add(fut)
        if kick:
            await self.kick(index)
        return fut

    async def _wait_for_room(self, index: int, queue: GuestQueue, need: int) -> None:
        while queue.ring.num_free < need:
            queue.free_slot.clear()  # before the kick: a completion during it must not be missed
            await self.kick(index)
            if queue.ring.num_free < need:
                await self._bounded(queue.free_slot.wait(), f"wait for a free slot on queue {index}")
            self._check_usable()

    # ---- grant mode (Xen grant DMA ops) -----------------------------------------------------------

    def _grant_consecutive(self, gpa: int, length: int, *, readonly: bool) -> list[int]:
        """Grant the pages of ``[gpa, gpa + length)``; the refs must be consecutive (one address),
        as gnttab_alloc_grant_reference_seq gives Linux. No await in between: nothing interleaves."""
        first, last = gpa >> XEN_PAGE_SHIFT, (gpa + length - 1) >> XEN_PAGE_SHIFT
        refs: list[int] = []
        try:
            for gfn in range(first, last + 1):
                refs.append(self.bus.grant(gfn, readonly=readonly))
                self.live_grants += 1
        except OSError as exc:
            self._revoke(refs)
            raise GrantError(f"granting gfn {first + len(refs):#x}: {exc}") from exc
        if refs != list(range(refs[0], refs[0] + len(refs))):
            self._revoke(refs)
            raise GrantError(f"grant references {refs} for [{gpa:#x}, +{length:#x}) are not consecutive")
        return refs

    def _grant_chain(
        self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
        """Grant-address every buffer (readable: read-only grants, writable: read-write)."""
        refs: list[int] = []
        out: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        granted = False
        try:
            for bufs, dest, ro in ((readable, out[0], True), (writable, out[1], False)):
                for gpa, length in bufs:
                    if length <= 0:
                        raise ValueError(f"buffer of {length} bytes")
                    got = self._grant_consecutive(gpa, length, readonly=ro)
                    refs += got
                    dest.append((grant_dma_address(got[0], gpa & ((1 << XEN_PAGE_SHIFT) - 1)), length))
            granted = True
        finally:
            if not granted:
                self._revoke(refs)
        return out[0], out[1], refs

    def _revoke(self, refs: Sequence[int]) -> None:
        for ref in refs:
            try:
                self.bus.revoke(ref)
            except OSError as exc:  # the machine is gone, or the host refused: nothing to give back
                logger.info("virtio-mmio %#x: revoking grant %d failed: %s", self.base, ref, exc)
            self.live_grants -= 1

    async def kick(self, index: int) -> None:
        """QueueNotify if the device wants it (VRING_USED_F_NO_NOTIFY / avail_event)."""
        queue = self.queues[index]
        if not queue.ring.kick_needed():
            return
        value = index
        if self.has(Feature.NOTIFICATION_DATA):
            value |= queue.ring.avail_idx << 16
        await self.write_reg(MmioReg.QUEUE_NOTIFY, value)

    async def wait(self, fut: asyncio.Future[_T], timeout: float | None = None) -> _T:
        """Await a request's future, bounded by ``timeout`` (default: the MMIO timeout)."""
        try:
            async with asyncio.timeout(self.mmio_timeout if timeout is None else timeout):
                return await fut
        except TimeoutError:
            raise GuestTimeout(f"request on device at {self.base:#x} not completed in time") from None

    async def handle_interrupt(self) -> Interrupt:
        """``vm_interrupt``: read InterruptStatus, ACK those bits, then config change and used rings."""
        bits = Interrupt(await self.read_reg(MmioReg.INTERRUPT_STATUS) & 3)
        if not bits:
            return bits
        self.interrupts += 1
        await self.write_reg(MmioReg.INTERRUPT_ACK, int(bits))
        if bits & Interrupt.CONFIG_CHANGE:
            self.config_changes += 1
            status = await self.read_status()
            if status & DeviceStatus.DEVICE_NEEDS_RESET:
                self.needs_reset = True
                exc = DeviceNeedsReset(f"device at {self.base:#x} needs a reset")
                self.broken = exc
                self._fail_all(exc)
                logger.warning("virtio-mmio %#x: device needs reset", self.base)
            self.config_changed.set()
            if self.on_config_change is not None:
                self.on_config_change()
        if bits & Interrupt.USED_BUFFER:
            for queue in self.queues.values():
                try:
                    # Harvest again after get_used() moved used_event (EVENT_IDX): a chain the device
                    # pushed while we were harvesting may have been judged not worth an interrupt
                    # (virtqueue_enable_cb_prepare + virtqueue_poll in Linux).
                    while queue.complete():
                        pass
                except RingError as exc:
                    self.broken = GuestDriverError(f"queue {queue.index}: {exc}")
                    self._fail_all(self.broken)
                    logger.error("virtio-mmio %#x: bad used ring: %s", self.base, exc)
        return bits

    async def _service_interrupts(self) -> None:
        spurious = 0
        while True:
            try:
                await self.bus.wait_irq(self.irq)
            except ConnectionError:
                return  # the simulated machine went away (guest closed): nothing to service
            try:
                bits = await self.handle_interrupt()
            except GuestDriverError as exc:
                logger.error("virtio-mmio %#x: interrupt handling failed: %s", self.base, exc)
                self.broken = exc
                self._fail_all(exc)
                return
            if bits:
                spurious = 0
                continue
            spurious += 1
            # Line high but nothing pending: let the device model run; back off if it persists.
            await asyncio.sleep(0 if spurious < SPURIOUS_IRQ_BACKOFF_AFTER else 0.001)

    async def _stop_isr(self) -> None:
        task, self._isr = self._isr, None
        await cancel_and_wait(task)

    def _fail_all(self, exc: GuestDriverError) -> None:
        for queue in self.queues.values():
            for fut in queue.pending:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # whoever awaits it gets exc; one nobody awaits (a posted buffer) is not an error
            queue.pending.clear()
            queue.free_slot.set()

    def _release_queues(self) -> None:
        for queue in self.queues.values():
            queue.ring.release()
            self._revoke(queue.grant_refs)
            self.allocator.free(queue.ring_gpa)
        self.queues.clear()

    def stats(self) -> dict[str, Any]:
        return {"interrupts": self.interrupts, "config_changes": self.config_changes, "needs_reset": self.needs_reset,
                "live_grants": self.live_grants}
