"""A simulated x86 guest's virtio-pci modern driver, written from virtio 1.2 §4.1 and the PCI Local
Bus 3.0 spec, independently of the daemon's model.

It follows the sequence of Linux's PCI core and ``drivers/virtio/virtio_pci_modern*.c``:

* enumerate: vendor 0x1AF4 and device 0x1040..0x107f at the function (all-ones: :class:`NoDevice`);
* BARs (``__pci_read_base``): memory decoding off, each BAR written all-ones and read back for its
  size (a 64-bit BAR takes two), placed size-aligned in the PCI hole, then MEMORY | MASTER on;
* capabilities (``virtio_pci_find_capability``): the list from 0x34, the first virtio capability of
  each cfg_type whose BAR exists; common, notify (with ``notify_off_multiplier``), ISR, and device
  config when present; MSI-X (``msix_capability_init``): ENABLE | MASKALL, the table programmed
  and each entry unmasked, then MASKALL cleared;
* reset (device_status 0, read back until 0), ACKNOWLEDGE, DRIVER, features through the select
  registers, FEATURES_OK read back;
* ``vp_find_vqs_msix``: config vector 0 and one vector per queue (read back: NO_VECTOR fails, and
  with ``msix=False`` the driver uses INTx and the ISR instead, as ``vp_find_vqs_intx``); per queue:
  queue_select, queue_size (0: absent), size chosen, rings, desc/driver/device as 32-bit halves,
  queue_msix_vector, queue_notify_off, queue_enable; DRIVER_OK;
* notify: the queue's index as a 16-bit write at ``notify base + queue_notify_off * multiplier``;
* interrupts: each MSI-X vector handled by its own task (config vector: config change, queue
  vectors: that queue's used ring), or INTx: wait for the GSI, read the ISR (read-to-clear).

The ring handling, request plumbing and grant mode are :class:`~xen_vhost_sim.guest_driver.VirtioMmioDriver`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from vhost_user.aio import cancel_and_wait
from vhost_user.virtqueue import RingError, SplitQueueDriver, split_ring_layout
from xen_vhost_sim.guest_api import PciBus
from xen_vhost_sim.guest_driver import (
    DEFAULT_MMIO_TIMEOUT,
    DEFAULT_QUEUE_SIZE,
    CONFIG_RETRIES_MAX,
    RESET_POLL_MAX,
    DeviceNeedsReset,
    DeviceStatus,
    Feature,
    FeaturesRejected,
    GuestDriverError,
    GuestPageAllocator,
    GuestQueue,
    GuestTimeout,
    Interrupt,
    NoDevice,
    ProbeError,
    QueueSetupError,
    VirtioMmioDriver,
)

__all__ = ["MSI_ADDRESS", "PCI_HOLE", "PciHole", "VirtioPciDriver", "sbdf"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

PCI_HOLE = (0xF000_0000, 0xFC00_0000)  # where hvmloader places BARs below 4 GiB
MSI_ADDRESS = 0xFEE0_0000  # the local APIC's MSI window, destination APIC 0
MSI_VECTOR_BASE = 0x30
NO_VECTOR = 0xFFFF
VENDOR = 0x1AF4
CAP_VNDR, CAP_MSIX = 0x09, 0x11
COMMON, NOTIFY, ISR, DEVICE = 1, 2, 3, 4

# struct virtio_pci_common_cfg (include/uapi/linux/virtio_pci.h)
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUM_QUEUES, STATUS, CFG_GEN = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF, Q_DESC, Q_AVAIL, Q_USED = 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28, 0x30


def pci_intx_gsi(device: int, intx: int) -> int:
    """The GSI bus 0's ``device`` pin ``intx`` (0 = INTA) is routed to, as the HVM firmware's ACPI
    _PRT describes it (Xen's hvm_pci_intx_gsi)."""
    return (((device << 2) + (device >> 3) + intx) & 31) + 16


def sbdf(device: int, function: int = 0, bus: int = 0, segment: int = 0) -> int:
    """XEN_DMOP_PCI_SBDF (xen/include/public/hvm/dm_op.h)."""
    return (segment & 0xFFFF) << 16 | (bus & 0xFF) << 8 | (device & 0x1F) << 3 | (function & 7)


class PciHole:
    """Hands out size-aligned guest-physical ranges for BARs (the firmware's job)."""

    def __init__(self, start: int = PCI_HOLE[0], end: int = PCI_HOLE[1]) -> None:
        self.next, self.end = start, end

    def alloc(self, size: int) -> int:
        addr = (self.next + size - 1) // size * size
        if addr + size > self.end:
            raise ProbeError(f"no room for a BAR of {size:#x} bytes in the PCI hole")
        self.next = addr + size
        return addr


class VirtioPciDriver(VirtioMmioDriver):
    """Drives the virtio-pci function ``function_sbdf`` of the guest's bus 0."""

    def __init__(self, bus: PciBus, function_sbdf: int, allocator: GuestPageAllocator, *, hole: PciHole | None = None,
                 msix: bool = True, vcpu: int = 0, mmio_timeout: float = DEFAULT_MMIO_TIMEOUT) -> None:
        device = function_sbdf >> 3 & 0x1F
        super().__init__(bus, 0, pci_intx_gsi(device, 0), allocator, vcpu=vcpu, mmio_timeout=mmio_timeout)
        self.pci: PciBus = bus
        self.sbdf = function_sbdf
        self.hole = hole or PciHole()
        self.use_msix = msix
        self.bars: dict[int, tuple[int, int]] = {}  # BAR index -> (address, size)
        self.regions: dict[int, tuple[int, int]] = {}  # cfg_type -> (address, length)
        self.notify_multiplier = 0
        self.msix_cap = 0
        self.msix_vectors = 0
        self.msix_on = False
        self.msix_table = 0  # the table's guest-physical address once MSI-X is enabled
        self.msi_data: list[int] = []  # each vector's Message Data, as programmed
        self.notify_off: dict[int, int] = {}
        self._vector_tasks: list[asyncio.Task[None]] = []

    @property
    def where(self) -> str:
        return f"PCI {self.sbdf >> 8 & 0xFF:02x}:{self.sbdf >> 3 & 0x1F:02x}.{self.sbdf & 7}"

    # ---- accesses ---------------------------------------------------------------------------------

    async def _bounded(self, aw: Awaitable[_T], what: str) -> _T:
        try:
            async with asyncio.timeout(self.mmio_timeout):
                return await aw
        except TimeoutError:
            raise GuestTimeout(f"{what} of PCI function {self.sbdf:#x} blocked for {self.mmio_timeout} s") from None

    async def cfg_read(self, reg: int, size: int = 4) -> int:
        return await self._bounded(self.pci.pci_config_read(self.sbdf, reg, size, self.vcpu), f"config read {reg:#x}")

    async def cfg_write(self, reg: int, size: int, value: int) -> None:
        await self._bounded(self.pci.pci_config_write(self.sbdf, reg, size, value, self.vcpu), f"config write {reg:#x}")

    async def mem_read(self, addr: int, size: int) -> int:
        return await self._bounded(self.bus.mmio_read(addr, size, self.vcpu), f"read {addr:#x}")

    async def mem_write(self, addr: int, size: int, value: int) -> None:
        await self._bounded(self.bus.mmio_write(addr, size, value, self.vcpu), f"write {addr:#x}")

    async def common_read(self, offset: int, size: int) -> int:
        return await self.mem_read(self.regions[COMMON][0] + offset, size)

    async def common_write(self, offset: int, size: int, value: int) -> None:
        await self.mem_write(self.regions[COMMON][0] + offset, size, value)

    async def read_status(self) -> DeviceStatus:
        return DeviceStatus(await self.common_read(STATUS, 1))

    async def _add_status(self, bit: DeviceStatus) -> None:
        self.status |= bit
        await self.common_write(STATUS, 1, int(self.status))

    # ---- enumeration ---------------------------------------------------------------------------------

    async def probe(self) -> int:
        vendor = await self.cfg_read(0x00, 2)
        if vendor == 0xFFFF:
            raise NoDevice(f"no PCI function at {self.sbdf:#x}")
        device = await self.cfg_read(0x02, 2)
        if vendor != VENDOR or not 0x1040 <= device <= 0x107F:
            raise ProbeError(f"function {self.sbdf:#x} is {vendor:04x}:{device:04x}, not a modern virtio device")
        self.device_id = device - 0x1040
        self.vendor_id = await self.cfg_read(0x2C, 2)
        await self._assign_bars()
        await self._find_capabilities()
        return self.device_id

    async def _assign_bars(self) -> None:
        command = await self.cfg_read(0x04, 2)
        await self.cfg_write(0x04, 2, command & ~0x3)  # decoding off while sizing
        index = 0
        while index < 6:
            reg = 0x10 + 4 * index
            original = await self.cfg_read(reg)
            await self.cfg_write(reg, 4, 0xFFFFFFFF)
            low = await self.cfg_read(reg)
            is64 = not low & 1 and (low >> 1 & 3) == 2
            high = 0
            if is64:
                await self.cfg_write(reg + 4, 4, 0xFFFFFFFF)
                high = await self.cfg_read(reg + 4)
            await self.cfg_write(reg, 4, original)
            if low & 1 or low == 0:  # I/O BAR (none expected) or not implemented
                index += 2 if is64 else 1
                continue
            mask = (high << 32 | (low & ~0xF)) if is64 else (0xFFFFFFFF_00000000 | (low & ~0xF))
            size = (~mask + 1) & (2**64 - 1)
            if size & (size - 1):
                raise ProbeError(f"BAR{index} of {self.sbdf:#x} sizes to {size:#x}, not a power of two")
            addr = self.hole.alloc(size)
            await self.cfg_write(reg, 4, addr & 0xFFFFFFFF)
            if is64:
                await self.cfg_write(reg + 4, 4, addr >> 32)
            self.bars[index] = (addr, size)
            index += 2 if is64 else 1
        await self.cfg_write(0x04, 2, (command & ~0x400) | 0x6)  # MEMORY | MASTER, INTx allowed

    async def _find_capabilities(self) -> None:
        if not await self.cfg_read(0x06, 2) & 0x10:
            raise ProbeError(f"function {self.sbdf:#x} has no capability list")
        pos = await self.cfg_read(0x34, 1) & ~3
        seen: set[int] = set()
        while pos:
            if pos in seen or not 0x40 <= pos < 0x100:
                raise ProbeError(f"capability list of {self.sbdf:#x} loops or leaves the header ({pos:#x})")
            seen.add(pos)
            cap_id = await self.cfg_read(pos, 1)
            if cap_id == CAP_VNDR:
                cfg_type, bar = await self.cfg_read(pos + 3, 1), await self.cfg_read(pos + 4, 1)
                offset, length = await self.cfg_read(pos + 8), await self.cfg_read(pos + 12)
                if cfg_type not in self.regions and bar in self.bars and cfg_type in (COMMON, NOTIFY, ISR, DEVICE):
                    base, size = self.bars[bar]
                    if offset + length > size:
                        raise ProbeError(f"virtio capability {cfg_type} at {pos:#x} leaves BAR{bar}")
                    self.regions[cfg_type] = (base + offset, length)
                    if cfg_type == NOTIFY:
                        self.notify_multiplier = await self.cfg_read(pos + 16)
            elif cap_id == CAP_MSIX:
                self.msix_cap = pos
            pos = await self.cfg_read(pos + 1, 1) & ~3
        for needed, name in ((COMMON, "common"), (NOTIFY, "notify"), (ISR, "ISR")):
            if needed not in self.regions:
                raise ProbeError(f"function {self.sbdf:#x} lacks the virtio {name} capability")

    async def _enable_msix(self, vectors: int) -> None:
        """``msix_capability_init``: enable with the function masked, program, unmask."""
        control = await self.cfg_read(self.msix_cap + 2, 2)
        table_size = (control & 0x7FF) + 1
        if table_size < vectors:
            raise QueueSetupError(f"MSI-X table of {table_size} vectors, {vectors} needed")
        table = await self.cfg_read(self.msix_cap + 4)
        bar = table & 7
        if bar not in self.bars:
            raise ProbeError(f"MSI-X table in BAR{bar}, which is not assigned")
        base = self.bars[bar][0] + (table & ~7)
        await self.cfg_write(self.msix_cap + 2, 2, control | 0xC000)
        self.msix_table, self.msi_data = base, [MSI_VECTOR_BASE + v for v in range(vectors)]
        for v in range(vectors):
            entry = base + 16 * v
            await self.mem_write(entry, 4, MSI_ADDRESS)
            await self.mem_write(entry + 4, 4, 0)
            await self.mem_write(entry + 8, 4, MSI_VECTOR_BASE + v)
            await self.mem_write(entry + 12, 4, 0)
        await self.cfg_write(self.msix_cap + 2, 2, (control | 0x8000) & ~0x4000)
        self.msix_vectors, self.msix_on = vectors, True

    # ---- reset / negotiation ------------------------------------------------------------------------------

    async def reset(self) -> None:
        await self._stop_isr()
        self._fail_all(GuestDriverError("device reset by the driver"))
        await self.common_write(STATUS, 1, 0)
        for _ in range(RESET_POLL_MAX):
            if await self.common_read(STATUS, 1) == 0:
                break
        else:
            raise GuestDriverError(f"PCI function {self.sbdf:#x} did not complete its reset")
        self.status = DeviceStatus(0)
        self._release_queues()
        self.needs_reset = False
        self.broken = None
        self.features = 0

    async def read_device_features(self) -> int:
        features = 0
        for sel in self.features_sel_order:
            await self.common_write(DFSELECT, 4, sel)
            features |= await self.common_read(DF, 4) << (32 * sel)
        return features

    async def negotiate(self, wanted: int) -> int:
        await self.reset()
        await self._add_status(DeviceStatus.ACKNOWLEDGE)
        await self._add_status(DeviceStatus.DRIVER)
        self.device_features = await self.read_device_features()
        if not self.device_features & Feature.VERSION_1:
            await self._add_status(DeviceStatus.FAILED)
            raise FeaturesRejected(f"function {self.sbdf:#x} does not offer VERSION_1")
        features = (wanted | Feature.VERSION_1) & self.device_features
        for sel in self.features_sel_order:
            await self.common_write(GFSELECT, 4, sel)
            await self.common_write(GF, 4, features >> (32 * sel) & 0xFFFFFFFF)
        await self._add_status(DeviceStatus.FEATURES_OK)
        if not await self.read_status() & DeviceStatus.FEATURES_OK:
            await self._add_status(DeviceStatus.FAILED)
            raise FeaturesRejected(f"function {self.sbdf:#x} refused features {features:#x}")
        self.features = features
        return features

    # ---- queues ---------------------------------------------------------------------------------------

    async def setup_queues(self, sizes: Sequence[int]) -> list[GuestQueue]:
        """``vp_find_vqs``: vectors (MSI-X unless refused or ``msix=False``), then each queue."""
        num = await self.common_read(NUM_QUEUES, 2)
        if len(sizes) > num:
            raise QueueSetupError(f"{len(sizes)} queues wanted, the function has {num}")
        if self.use_msix and self.msix_cap:
            if not self.msix_on:
                await self._enable_msix(len(sizes) + 1)
            await self.common_write(MSIX_CONFIG, 2, 0)
            if await self.common_read(MSIX_CONFIG, 2) == NO_VECTOR:
                raise QueueSetupError("the device refused MSI-X vector 0 for config changes")
        return [await self.setup_queue(i, size) for i, size in enumerate(sizes)]

    async def setup_queue(self, index: int, size: int = DEFAULT_QUEUE_SIZE) -> GuestQueue:
        await self.common_write(Q_SELECT, 2, index)
        if await self.common_read(Q_ENABLE, 2):
            raise QueueSetupError(f"queue {index} is already enabled before setup")
        num_max = await self.common_read(Q_SIZE, 2)
        if num_max == 0:
            raise QueueSetupError(f"queue {index} does not exist")
        num = min(size, num_max, 32768)
        num = 1 << (num.bit_length() - 1)
        _, _, _, total = split_ring_layout(num, 0)
        gpa = self.allocator.alloc(total)
        desc, avail, used, _ = split_ring_layout(num, gpa)
        try:
            ring = SplitQueueDriver(self.bus.ram, num, desc, avail, used, event_idx=self.has(Feature.RING_EVENT_IDX))
        except RingError:
            self.allocator.free(gpa)
            raise
        queue = GuestQueue(index, num, gpa, desc, avail, used, ring, asyncio.Event())
        self.queues[index] = queue
        await self.common_write(Q_SIZE, 2, num)
        for reg, addr in ((Q_DESC, desc), (Q_AVAIL, avail), (Q_USED, used)):
            await self.common_write(reg, 4, addr & 0xFFFFFFFF)
            await self.common_write(reg + 4, 4, addr >> 32)
        if self.msix_on:
            await self.common_write(Q_MSIX, 2, index + 1)
            if await self.common_read(Q_MSIX, 2) == NO_VECTOR:
                raise QueueSetupError(f"the device refused MSI-X vector {index + 1} for queue {index}")
        self.notify_off[index] = await self.common_read(Q_NOFF, 2)
        if self.notify_off[index] * self.notify_multiplier + 2 > self.regions[NOTIFY][1]:
            raise QueueSetupError(f"queue {index}'s notify address is outside the notify region")
        await self.common_write(Q_ENABLE, 2, 1)
        return queue

    async def initialize(self, wanted: int, queue_sizes: Sequence[int]) -> int:
        await self.probe()
        features = await self.negotiate(wanted)
        await self.setup_queues(queue_sizes)
        await self.driver_ok()
        return features

    async def driver_ok(self) -> None:
        await self._add_status(DeviceStatus.DRIVER_OK)
        if self.msix_on:
            if not self._vector_tasks:
                self._vector_tasks = [asyncio.create_task(self._serve_vector(v), name=f"virtio-pci-msi{v}")
                                      for v in range(len(self.queues) + 1)]
        elif self._isr is None:
            self._isr = asyncio.create_task(self._service_interrupts(), name=f"virtio-pci-intx@{self.sbdf:#x}")

    # ---- config space -------------------------------------------------------------------------------

    async def config_read(self, fields: Sequence[tuple[int, int]]) -> list[int]:
        if DEVICE not in self.regions:
            raise GuestDriverError(f"function {self.sbdf:#x} has no device config")
        base = self.regions[DEVICE][0]
        for _ in range(CONFIG_RETRIES_MAX):
            gen = await self.common_read(CFG_GEN, 1)
            values = []
            for offset, size in fields:
                if size == 8:
                    low = await self.mem_read(base + offset, 4)
                    values.append(low | await self.mem_read(base + offset + 4, 4) << 32)
                else:
                    values.append(await self.mem_read(base + offset, size))
            if await self.common_read(CFG_GEN, 1) == gen:
                return values
        raise GuestDriverError(f"config space of {self.sbdf:#x} kept changing")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        await self.mem_write(self.regions[DEVICE][0] + offset, size, value)

    # ---- notification, interrupts ----------------------------------------------------------------------

    async def kick(self, index: int) -> None:
        queue = self.queues[index]
        if not queue.ring.kick_needed():
            return
        addr = self.regions[NOTIFY][0] + self.notify_off[index] * self.notify_multiplier
        await self.mem_write(addr, 2, index)

    async def _config_interrupt(self) -> None:
        self.config_changes += 1
        if await self.read_status() & DeviceStatus.DEVICE_NEEDS_RESET:
            self.needs_reset = True
            exc = DeviceNeedsReset(f"PCI function {self.sbdf:#x} needs a reset")
            self.broken = exc
            self._fail_all(exc)
        self.config_changed.set()
        if self.on_config_change is not None:
            self.on_config_change()

    def _harvest(self, queues: Sequence[GuestQueue]) -> None:
        for queue in queues:
            try:
                while queue.complete():
                    pass
            except RingError as exc:
                self.broken = GuestDriverError(f"queue {queue.index}: {exc}")
                self._fail_all(self.broken)

    async def handle_interrupt(self) -> Interrupt:
        """``vp_interrupt`` (INTx): the ISR read clears it and de-asserts the line."""
        bits = Interrupt(await self.mem_read(self.regions[ISR][0], 1) & 3)
        if not bits:
            return bits
        self.interrupts += 1
        if bits & Interrupt.CONFIG_CHANGE:
            await self._config_interrupt()
        if bits & Interrupt.USED_BUFFER:
            self._harvest(list(self.queues.values()))
        return bits

    async def retarget_vector(self, vector: int, data: int) -> None:
        """Move a running vector to another Message Data, as Linux does on a new CPU affinity
        (``__pci_write_msi_msg``: the entry rewritten while the device runs): the handler waits
        for the new message from before the entry says it."""
        if not self.msix_on or not 0 <= vector < len(self._vector_tasks):
            raise GuestDriverError(f"vector {vector} is not running")
        old = self._vector_tasks[vector]
        self.msi_data[vector] = data
        self._vector_tasks[vector] = asyncio.create_task(self._serve_vector(vector), name=f"virtio-pci-msi{vector}")
        await self.mem_write(self.msix_table + 16 * vector + 8, 4, data)
        await cancel_and_wait(old)

    async def _serve_vector(self, vector: int) -> None:
        """One MSI-X vector's handler: 0 config changes (``vp_config_changed``), i+1 queue i."""
        data = self.msi_data[vector]
        while True:
            try:
                await self.pci.wait_msi(MSI_ADDRESS, data)
            except ConnectionError:
                return  # the simulated machine went away
            self.interrupts += 1
            try:
                if vector == 0:
                    await self._config_interrupt()
                elif vector - 1 in self.queues:
                    self._harvest([self.queues[vector - 1]])
            except GuestDriverError as exc:
                logger.error("virtio-pci %#x: vector %d: %s", self.sbdf, vector, exc)
                self.broken = exc
                self._fail_all(exc)
                return

    async def _stop_isr(self) -> None:
        tasks, self._vector_tasks = self._vector_tasks, []
        for task in tasks:
            await cancel_and_wait(task)
        await super()._stop_isr()
