"""The virtio-pci modern transport as a pure state machine (virtio 1.2 §4.1), on the device core
it shares with virtio-mmio (:class:`~.virtio_mmio.VirtioCore`).

No I/O, no clock, no logging: PCI configuration-space accesses (:meth:`VirtioPciDevice.config_read`,
:meth:`~VirtioPciDevice.config_write`) and memory accesses inside the device's one BAR
(:meth:`~VirtioPciDevice.bar_read`, :meth:`~VirtioPciDevice.bar_write`, offsets from the BAR's
base) go in, values and *actions* come out. Besides virtio-mmio's actions there are
:class:`~.virtio_mmio.Msi` (send an MSI-X message), :class:`~.virtio_mmio.IrqLevel` (the INTx
line, level-triggered as PCI's is) and :class:`BarMap` (the BAR now decodes at an address, or
no longer decodes: claim or release the range).

The function (a PCI type-0 header, ``include/uapi/linux/pci_regs.h``):

* vendor 0x1AF4, device 0x1040 + virtio device id, revision 1 (non-transitional, virtio 1.2
  §4.1.2), subsystem 0x1AF4 / device id, class code by device type, INTA.
* BAR0+1: one 64-bit prefetchable memory BAR (as QEMU's modern virtio-pci BAR) holding every
  region: common config, ISR, device config, notify (``notify_off_multiplier`` 4, queue *i*
  notifies at 4 *i*), the MSI-X table and PBA. The other BARs, the expansion ROM and the I/O
  space are absent (read as zero, writes ignored).
* capabilities: the five virtio ones (§4.1.4: common, notify, ISR, device, PCI cfg access) and
  MSI-X (PCI Local Bus 3.0 §6.8.2) with one vector per queue plus one for config changes.

Configuration space is a byte array with a write mask per byte (as QEMU's ``wmask``), so any
access of 1, 2 or 4 bytes within a dword behaves as hardware: BAR sizing (all ones read back as
the size mask) falls out of the mask.

Interrupts (§4.1.5.3-4): with MSI-X enabled, the queue's or config vector's message, held as
pending while the vector or the whole function is masked and sent when unmasked; without,
ISR bits and the INTx line (unless the command register disables it). A config change sets
the ISR config bit either way (§4.1.4.5.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from .virtio_mmio import (
    INT_CONFIG,
    INT_VRING,
    Action,
    GuestError,
    IrqLevel,
    Msi,
    VirtioCore,
    check_snapshot,
)
from .virtio_mmio import restore as restore_core

__all__ = [
    "BAR_SIZE_MIN",
    "NO_VECTOR",
    "BarMap",
    "Cap",
    "Common",
    "Layout",
    "PciAction",
    "VirtioPciDevice",
    "class_code",
    "restore",
    "snapshot",
]

VENDOR_ID = 0x1AF4  # virtio 1.2 §4.1.2: PCI vendor of virtio devices
DEVICE_ID_BASE = 0x1040  # non-transitional device id = 0x1040 + virtio device id
REVISION = 1  # §4.1.2.1: non-transitional devices SHOULD have revision 1 or higher
NO_VECTOR = 0xFFFF  # VIRTIO_MSI_NO_VECTOR
CONFIG_SIZE = 256  # conventional configuration space; 256..4095 (PCIe extended) reads as zero
EXT_CONFIG_SIZE = 4096
MAX_QUEUES = 1024  # notify region: 4 bytes a queue in one 4 KiB page
BAR_SIZE_MIN = 0x8000

# Configuration-space registers (include/uapi/linux/pci_regs.h).
PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_REVISION_ID, PCI_CLASS_PROG, PCI_CLASS_DEVICE = 0x08, 0x09, 0x0A
PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER, PCI_HEADER_TYPE = 0x0C, 0x0D, 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBSYSTEM_ID = 0x2C, 0x2E
PCI_CAPABILITY_LIST, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN = 0x34, 0x3C, 0x3D
PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER, PCI_COMMAND_INTX_DISABLE = 0x2, 0x4, 0x400
PCI_STATUS_INTERRUPT, PCI_STATUS_CAP_LIST = 0x08, 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_MEM_PREFETCH = 0x04, 0x08
PCI_CAP_ID_VNDR, PCI_CAP_ID_MSIX = 0x09, 0x11
PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_FLAGS_ENABLE = 0x4000, 0x8000
PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_CTRL_MASKBIT = 16, 1
MSI_ADDRESS_BASE = 0xFEE0_0000  # x86 MSI message address, bits 31:20 (Xen: xen/include/asm-x86/msi.h)


class Cap:
    """virtio_pci_cap cfg_type values (include/uapi/linux/virtio_pci.h, virtio 1.2 §4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


class Common:
    """struct virtio_pci_common_cfg offsets (include/uapi/linux/virtio_pci.h, virtio 1.2 §4.1.4.3)."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    MSIX_CONFIG = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38  # virtio 1.2 (NOTIF_CONFIG_DATA, not offered): reads 0
    QUEUE_RESET = 0x3A  # virtio 1.2 (RING_RESET, not offered): reads 0
    SIZE = 0x3C


# Each field's width: the driver accesses it with that width (§4.1.3.1), 64-bit ones also as
# two 32-bit halves, low then high.
_COMMON_WIDTH = {
    Common.DEVICE_FEATURE_SELECT: 4, Common.DEVICE_FEATURE: 4, Common.DRIVER_FEATURE_SELECT: 4,
    Common.DRIVER_FEATURE: 4, Common.MSIX_CONFIG: 2, Common.NUM_QUEUES: 2, Common.DEVICE_STATUS: 1,
    Common.CONFIG_GENERATION: 1, Common.QUEUE_SELECT: 2, Common.QUEUE_SIZE: 2, Common.QUEUE_MSIX_VECTOR: 2,
    Common.QUEUE_ENABLE: 2, Common.QUEUE_NOTIFY_OFF: 2, Common.QUEUE_DESC: 8, Common.QUEUE_DRIVER: 8,
    Common.QUEUE_DEVICE: 8, Common.QUEUE_NOTIFY_DATA: 2, Common.QUEUE_RESET: 2,
}
_COMMON_RO = {Common.DEVICE_FEATURE, Common.NUM_QUEUES, Common.CONFIG_GENERATION, Common.QUEUE_NOTIFY_OFF,
              Common.QUEUE_NOTIFY_DATA}

# PCI class code (class, subclass) per virtio device type, as QEMU's virtio-pci devices report them
# (include/hw/pci/pci_ids.h); any other type is "other" (0xff, 0).
_CLASSES = {1: (0x02, 0x00), 2: (0x01, 0x00), 3: (0x07, 0x80), 4: (0xFF, 0x00), 8: (0x01, 0x00),
            9: (0x01, 0x80), 16: (0x03, 0x80), 18: (0x09, 0x00), 19: (0x07, 0x80), 26: (0x01, 0x80)}


def class_code(device_id: int) -> tuple[int, int]:
    """(base class, subclass) the function reports for virtio device type ``device_id``."""
    return _CLASSES.get(device_id, (0xFF, 0x00))


@dataclass(frozen=True)
class BarMap:
    """The BAR now decodes guest-physical [``address``, +``size``) (claim it), or decodes nothing
    (``address`` None: release what was claimed)."""

    address: int | None
    size: int


PciAction = Action | BarMap


@dataclass(frozen=True)
class Layout:
    """Where each region lies in the BAR (offsets) and where each capability lies in config space."""

    common: int = 0x0000
    isr: int = 0x1000
    device: int = 0x2000
    notify: int = 0x3000
    msix_table: int = 0x4000
    msix_pba: int = 0
    bar_size: int = BAR_SIZE_MIN
    notify_multiplier: int = 4
    cap_common: int = 0x40
    cap_notify: int = 0x50
    cap_isr: int = 0x64
    cap_device: int = 0x74
    cap_pci: int = 0x84
    cap_msix: int = 0x98

    @staticmethod
    def for_vectors(vectors: int) -> Layout:
        table = 0x4000
        pba = table + _round_up(vectors * PCI_MSIX_ENTRY_SIZE, 0x1000)
        end = pba + _round_up((vectors + 63) // 64 * 8, 0x1000)
        size = BAR_SIZE_MIN
        while size < end:
            size *= 2
        return Layout(msix_table=table, msix_pba=pba, bar_size=size)


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass
class VirtioPciDevice(VirtioCore):
    """One virtio-pci modern function: configuration space, its BAR's regions, MSI-X and INTx.

    The core's ``interrupt_status`` is the ISR status (read-to-clear). Queues start with
    ``queue_size`` at their maximum (§4.1.4.3: the driver may lower it).
    """

    layout: Layout = field(init=False)
    config_vector: int = NO_VECTOR
    queue_vectors: list[int] = field(init=False)
    _cfg: bytearray = field(init=False)
    _wmask: bytearray = field(init=False)
    _table: bytearray = field(init=False)
    _pending: int = field(init=False, default=0)
    _mapped: int | None = field(init=False, default=None)
    _intx: bool = field(init=False, default=False)
    # counts the driver's changes to where and whether interrupts go: an MSI-X table entry's bytes,
    # MSI-X enable and function mask, the command register's INTx disable (what a successor must
    # restore from the snapshot to deliver as the driver expects)
    routing_changes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < len(self.queues) <= MAX_QUEUES:
            raise ValueError(f"a virtio-pci function has 1..{MAX_QUEUES} queues, not {len(self.queues)}")
        if len(self._config) > 0x1000:
            raise ValueError(f"device config of {len(self._config)} bytes does not fit its 4 KiB region")
        for q in self.queues:
            q.num = q.num_max
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.layout = Layout.for_vectors(self.vectors)
        self._table = bytearray(self.vectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(self.vectors):  # every vector starts masked (PCI 3.0 §6.8.2.9)
            self._table[v * PCI_MSIX_ENTRY_SIZE + 12] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self._build_config_space()

    @property
    def vectors(self) -> int:
        """MSI-X table size: one vector per queue and one for config changes."""
        return len(self.queues) + 1

    # --- configuration space --------------------------------------------------------------------

    def _build_config_space(self) -> None:
        cfg = self._cfg = bytearray(CONFIG_SIZE)
        wmask = self._wmask = bytearray(CONFIG_SIZE)
        lay = self.layout

        def put(offset: int, size: int, value: int, mask: int = 0) -> None:
            cfg[offset : offset + size] = value.to_bytes(size, "little")
            wmask[offset : offset + size] = mask.to_bytes(size, "little")

        base_class, subclass = class_code(self.device_id)
        put(PCI_VENDOR_ID, 2, VENDOR_ID)
        put(PCI_DEVICE_ID, 2, DEVICE_ID_BASE + self.device_id)
        put(PCI_COMMAND, 2, 0, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        put(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        put(PCI_REVISION_ID, 1, REVISION)
        put(PCI_CLASS_DEVICE, 2, base_class << 8 | subclass)
        put(PCI_CACHE_LINE_SIZE, 1, 0, 0xFF)
        put(PCI_LATENCY_TIMER, 1, 0, 0xFF)
        put(PCI_BASE_ADDRESS_0, 4, PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH,
            ~(lay.bar_size - 1) & 0xFFFFFFF0)
        put(PCI_BASE_ADDRESS_0 + 4, 4, 0, 0xFFFFFFFF)
        put(PCI_SUBSYSTEM_VENDOR_ID, 2, VENDOR_ID)
        put(PCI_SUBSYSTEM_ID, 2, self.device_id)
        put(PCI_CAPABILITY_LIST, 1, lay.cap_common)
        put(PCI_INTERRUPT_LINE, 1, 0, 0xFF)
        put(PCI_INTERRUPT_PIN, 1, 1)  # INTA#

        def vendor_cap(at: int, nxt: int, length: int, cfg_type: int, offset: int, size: int) -> None:
            # struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
            put(at, 1, PCI_CAP_ID_VNDR)
            put(at + 1, 1, nxt)
            put(at + 2, 1, length)
            put(at + 3, 1, cfg_type)
            put(at + 4, 1, 0)  # BAR0
            put(at + 8, 4, offset)
            put(at + 12, 4, size)

        vendor_cap(lay.cap_common, lay.cap_notify, 16, Cap.COMMON, lay.common, Common.SIZE)
        vendor_cap(lay.cap_notify, lay.cap_isr, 20, Cap.NOTIFY, lay.notify, lay.notify_multiplier * len(self.queues))
        put(lay.cap_notify + 16, 4, lay.notify_multiplier)
        vendor_cap(lay.cap_isr, lay.cap_device, 16, Cap.ISR, lay.isr, 1)
        vendor_cap(lay.cap_device, lay.cap_pci, 16, Cap.DEVICE, lay.device, max(len(self._config), 1))
        # virtio_pci_cfg_cap: the driver writes bar, offset, length and then accesses pci_cfg_data
        vendor_cap(lay.cap_pci, lay.cap_msix, 20, Cap.PCI, 0, 0)
        wmask[lay.cap_pci + 4] = 0xFF
        wmask[lay.cap_pci + 8 : lay.cap_pci + 20] = b"\xff" * 12
        put(lay.cap_msix, 1, PCI_CAP_ID_MSIX)
        put(lay.cap_msix + 1, 1, 0)
        put(lay.cap_msix + 2, 2, self.vectors - 1, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        put(lay.cap_msix + 4, 4, lay.msix_table)  # BIR 0
        put(lay.cap_msix + 8, 4, lay.msix_pba)

    def _cfg_word(self, offset: int, size: int) -> int:
        return int.from_bytes(self._cfg[offset : offset + size], "little")

    @property
    def command(self) -> int:
        return self._cfg_word(PCI_COMMAND, 2)

    @property
    def bar_address(self) -> int:
        """BAR0's programmed address (whether or not memory decoding is on)."""
        return self._cfg_word(PCI_BASE_ADDRESS_0, 8) & ~0xF

    @property
    def decoding(self) -> int | None:
        """Where the BAR decodes now: its address with memory space enabled, else None."""
        return self._mapped

    @property
    def msix_enabled(self) -> bool:
        return bool(self._cfg_word(self.layout.cap_msix + 2, 2) & PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self._cfg_word(self.layout.cap_msix + 2, 2) & PCI_MSIX_FLAGS_MASKALL)

    @property
    def intx(self) -> bool:
        """The level this function drives INTA# to."""
        return self._intx

    def _check_config_access(self, offset: int, size: int) -> str | None:
        if size not in (1, 2, 4):
            return f"config space access of size {size} at {offset:#x}: only 1, 2 or 4 bytes"
        if (offset & 3) + size > 4:  # CF8/CFC reaches the bytes of one dword; MMCONFIG is aligned
            return f"config space access at {offset:#x} of size {size} crosses a dword"
        if not 0 <= offset < EXT_CONFIG_SIZE:
            return f"config space access at {offset:#x} beyond the 4 KiB configuration space"
        return None

    def config_read(self, offset: int, size: int) -> tuple[int, list[PciAction]]:
        """A configuration-space read of ``size`` bytes at ``offset``: (value, actions)."""
        problem = self._check_config_access(offset, size)
        if problem:
            return 0, [GuestError(problem)]
        if offset >= CONFIG_SIZE:
            return 0, []  # no extended capabilities (not a PCI Express function)
        cap_data = self.layout.cap_pci + 16
        if offset == cap_data:
            return self._cfg_access(None, size)
        if cap_data < offset < cap_data + 4:
            return 0, [GuestError(f"pci_cfg_data read at {offset:#x}: only from its start")]
        value = self._cfg_word(offset, size)
        if offset <= PCI_STATUS < offset + size and self._intx:
            value |= PCI_STATUS_INTERRUPT << (8 * (PCI_STATUS - offset))
        return value, []

    def config_write(self, offset: int, size: int, value: int) -> list[PciAction]:
        """A configuration-space write of the low ``size`` bytes of ``value`` at ``offset``."""
        problem = self._check_config_access(offset, size)
        if problem:
            return [GuestError(problem)]
        if offset >= CONFIG_SIZE:
            return [GuestError(f"config space write at {offset:#x}: no extended configuration space")]
        value &= (1 << (8 * size)) - 1
        cap_data = self.layout.cap_pci + 16
        if offset == cap_data:
            return self._cfg_access(value, size)[1]
        if cap_data < offset < cap_data + 4:
            return [GuestError(f"pci_cfg_data write at {offset:#x}: only at its start")]
        msix_before = self.msix_enabled, self.msix_function_masked
        intx_disabled_before = bool(self.command & PCI_COMMAND_INTX_DISABLE)
        for i, byte in enumerate(value.to_bytes(size, "little")):
            mask = self._wmask[offset + i]
            self._cfg[offset + i] = (self._cfg[offset + i] & ~mask) | (byte & mask)
        actions: list[PciAction] = []
        actions += self._remap()
        if (self.msix_enabled, self.msix_function_masked) != msix_before:
            self.routing_changes += 1
            actions += self._msix_changed()
        elif bool(self.command & PCI_COMMAND_INTX_DISABLE) != intx_disabled_before:
            self.routing_changes += 1
            actions += self._update_intx()
        return actions

    def _remap(self) -> list[PciAction]:
        """A BarMap when where the BAR decodes changed (memory space enable, or its address)."""
        want: int | None = self.bar_address if self.command & PCI_COMMAND_MEMORY else None
        if want == self._mapped:
            return []
        actions: list[PciAction] = []
        if want is not None and (problem := self._bar_problem(want)):
            actions.append(GuestError(f"BAR0 not decoded: {problem}"))
            want = None
            if self._mapped is None:
                return actions
        self._mapped = want
        actions.append(BarMap(want, self.layout.bar_size))
        return actions

    def _bar_problem(self, address: int) -> str | None:
        size = self.layout.bar_size
        if address == 0:
            return "address 0"
        for base, length in self.ram:
            if address < base + length and base < address + size:
                return f"[{address:#x}, +{size:#x}) overlaps guest RAM [{base:#x}, +{length:#x})"
        return None

    def _cfg_access(self, value: int | None, size: int) -> tuple[int, list[PciAction]]:
        """An access through the PCI configuration access capability (§4.1.4.8): to the BAR at
        the capability's offset, of its length."""
        cap = self.layout.cap_pci
        bar = self._cfg[cap + 4]
        offset = self._cfg_word(cap + 8, 4)
        length = self._cfg_word(cap + 12, 4)
        what = "write" if value is not None else "read"
        if bar != 0:
            return 0, [GuestError(f"pci_cfg_data {what} through BAR{bar}, which does not exist")]
        if length not in (1, 2, 4) or offset % length or size < length:
            return 0, [GuestError(f"pci_cfg_data {what} of length {length} at BAR offset {offset:#x} (access size "
                                  f"{size}): length must be 1, 2 or 4, aligned, within the access")]
        if value is None:
            return self.bar_read(offset, length)
        return 0, self.bar_write(offset, length, value & ((1 << (8 * length)) - 1))

    # --- the BAR's regions ------------------------------------------------------------------------

    def bar_read(self, offset: int, size: int) -> tuple[int, list[PciAction]]:
        """A memory read of ``size`` bytes at ``offset`` from the BAR's base: (value, actions)."""
        lay = self.layout
        if size not in (1, 2, 4, 8) or not 0 <= offset <= lay.bar_size - size:
            return 0, [GuestError(f"BAR read at {offset:#x} of size {size}")]
        if lay.common <= offset < lay.common + Common.SIZE:
            return self._common_read(offset - lay.common, size)
        if offset == lay.isr:
            if size != 1:
                return 0, [GuestError(f"ISR read of size {size}: one byte")]
            return self._isr_read()
        if lay.device <= offset < lay.device + 0x1000:
            value, core = self._config_read(offset - lay.device, size)
            return value, list(core)
        if lay.msix_table <= offset < lay.msix_table + len(self._table):
            return self._table_read(offset - lay.msix_table, size)
        if lay.msix_pba <= offset < lay.msix_pba + 0x1000:
            return self._pba_read(offset - lay.msix_pba, size)
        if lay.notify <= offset < lay.notify + 0x1000:
            return 0, []
        return 0, [GuestError(f"BAR read at {offset:#x}: no register there")]

    def bar_write(self, offset: int, size: int, value: int) -> list[PciAction]:
        """A memory write of the low ``size`` bytes of ``value`` at ``offset`` from the BAR's base."""
        lay = self.layout
        if size not in (1, 2, 4, 8) or not 0 <= offset <= lay.bar_size - size:
            return [GuestError(f"BAR write at {offset:#x} of size {size}")]
        value &= (1 << (8 * size)) - 1
        if lay.common <= offset < lay.common + Common.SIZE:
            return self._common_write(offset - lay.common, size, value)
        if lay.notify <= offset < lay.notify + 0x1000:
            return self._notify_write(offset - lay.notify, size, value)
        if lay.device <= offset < lay.device + 0x1000:
            return list(self._config_write(offset - lay.device, size, value))
        if lay.msix_table <= offset < lay.msix_table + len(self._table):
            return self._table_write(offset - lay.msix_table, size, value)
        if lay.msix_pba <= offset < lay.msix_pba + 0x1000:
            return [GuestError(f"write to the MSI-X PBA at {offset - lay.msix_pba:#x}: read-only")]
        return [GuestError(f"BAR write at {offset:#x}: no writable register there")]

    # --- common configuration -----------------------------------------------------------------

    def _common_field(self, offset: int, size: int) -> tuple[int, int] | None:
        """(field offset, 32-bit half or -1 for the whole field) of a well-formed access."""
        width = _COMMON_WIDTH.get(offset)
        if width is not None and size == width:
            return offset, -1
        if width == 8 and size == 4:
            return offset, 0
        if size == 4 and _COMMON_WIDTH.get(offset - 4) == 8:
            return offset - 4, 1
        return None

    def _common_read(self, offset: int, size: int) -> tuple[int, list[PciAction]]:
        found = self._common_field(offset, size)
        if found is None:
            return 0, [GuestError(f"common config read at {offset:#x} of size {size}: not a field of that width")]
        reg, half = found
        q = self._selected()
        value: int
        match reg:
            case Common.DEVICE_FEATURE_SELECT:
                value = self.device_features_sel
            case Common.DEVICE_FEATURE:
                value = self._device_features_word()
            case Common.DRIVER_FEATURE_SELECT:
                value = self.driver_features_sel
            case Common.DRIVER_FEATURE:
                value = (self.driver_features >> (32 * self.driver_features_sel)) & 0xFFFFFFFF \
                    if self.driver_features_sel <= 1 else 0
            case Common.MSIX_CONFIG:
                value = self.config_vector
            case Common.NUM_QUEUES:
                value = len(self.queues)
            case Common.DEVICE_STATUS:
                value = int(self.status)
            case Common.CONFIG_GENERATION:
                value = self.config_generation & 0xFF
            case Common.QUEUE_SELECT:
                value = self.queue_sel
            case Common.QUEUE_SIZE:
                value = q.num if q else 0  # an absent queue reads size 0 (§4.1.4.3.2)
            case Common.QUEUE_MSIX_VECTOR:
                value = self.queue_vectors[self.queue_sel] if q else NO_VECTOR
            case Common.QUEUE_ENABLE:
                value = int(q.ready) if q else 0
            case Common.QUEUE_NOTIFY_OFF:
                value = self.queue_sel if q else 0
            case Common.QUEUE_DESC:
                value = q.desc if q else 0
            case Common.QUEUE_DRIVER:
                value = q.driver if q else 0
            case Common.QUEUE_DEVICE:
                value = q.device if q else 0
            case _:
                value = 0
        if half >= 0:
            value = (value >> (32 * half)) & 0xFFFFFFFF
        return value, []

    def _common_write(self, offset: int, size: int, value: int) -> list[PciAction]:
        found = self._common_field(offset, size)
        if found is None:
            return [GuestError(f"common config write at {offset:#x} of size {size}: not a field of that width")]
        reg, half = found
        if reg in _COMMON_RO:
            return [GuestError(f"write to read-only common config field {reg:#x} ignored")]
        match reg:
            case Common.DEVICE_FEATURE_SELECT:
                self.device_features_sel = value
            case Common.DRIVER_FEATURE_SELECT:
                self.driver_features_sel = value
            case Common.DRIVER_FEATURE:
                return list(self._driver_features(value))
            case Common.MSIX_CONFIG:
                return self._set_vector(None, value)
            case Common.DEVICE_STATUS:
                return list(self._status_write(value))
            case Common.QUEUE_SELECT:
                self.queue_sel = value
            case Common.QUEUE_RESET:
                if value:
                    return [GuestError("queue_reset written without RING_RESET negotiated: ignored")]
            case _:
                return self._queue_field(reg, half, value)
        return []

    def _queue_field(self, reg: int, half: int, value: int) -> list[PciAction]:
        q = self._selected()
        if q is None:
            return [GuestError(f"queue field {reg:#x} written for absent queue {self.queue_sel}")]
        if reg == Common.QUEUE_MSIX_VECTOR:
            return self._set_vector(self.queue_sel, value)
        if reg == Common.QUEUE_ENABLE:
            return list(self._queue_ready(q, value))
        if q.ready:
            return [GuestError(f"queue {self.queue_sel} field {reg:#x} written while enabled: ignored")]
        if reg == Common.QUEUE_SIZE:
            q.num = value  # checked when the queue is enabled (power of two, at most the maximum)
            return []
        name = {Common.QUEUE_DESC: "desc", Common.QUEUE_DRIVER: "driver", Common.QUEUE_DEVICE: "device"}[reg]
        old: int = getattr(q, name)
        new = value if half < 0 else (old & ~(0xFFFFFFFF << (32 * half))) | (value << (32 * half))
        setattr(q, name, new)
        return []

    def _set_vector(self, index: int | None, value: int) -> list[PciAction]:
        """config_msix_vector / queue_msix_vector: a vector outside the table reads back
        NO_VECTOR (§4.1.4.3.1: the device MUST return NO_VECTOR when it cannot map it)."""
        actions: list[PciAction] = []
        if value != NO_VECTOR and value >= self.vectors:
            actions.append(GuestError(f"MSI-X vector {value} beyond the table's {self.vectors}: NO_VECTOR"))
            value = NO_VECTOR
        if index is None:
            self.config_vector = value
        else:
            self.queue_vectors[index] = value
        return actions

    # --- notify, ISR ----------------------------------------------------------------------------

    def _notify_write(self, offset: int, size: int, value: int) -> list[PciAction]:
        mult = self.layout.notify_multiplier
        index = offset // mult
        if size not in (2, 4) or offset % mult or index >= len(self.queues):
            return [GuestError(f"notify write at {offset:#x} of size {size}: no queue notifies there")]
        if value & 0xFFFF != index:
            # without NOTIFICATION_DATA the driver writes the queue's index (§4.1.5.2); the
            # address says which queue
            return [GuestError(f"notify of queue {index} carries {value:#x}, not its index"),
                    *self._queue_notified(index)]
        return list(self._queue_notified(index))

    def _isr_read(self) -> tuple[int, list[PciAction]]:
        """ISR status: read-to-clear, which de-asserts INTx (§4.1.4.5)."""
        value, self.interrupt_status = self.interrupt_status, 0
        return value, list(self._update_intx())

    def _update_intx(self) -> list[Action]:
        level = bool(self.interrupt_status) and not self.msix_enabled \
            and not self.command & PCI_COMMAND_INTX_DISABLE
        if level == self._intx:
            return []
        self._intx = level
        return [IrqLevel(level)]

    # --- MSI-X ----------------------------------------------------------------------------------

    def _entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of a table entry."""
        at = vector * PCI_MSIX_ENTRY_SIZE
        address = int.from_bytes(self._table[at : at + 8], "little")
        data = int.from_bytes(self._table[at + 8 : at + 12], "little")
        return address, data, bool(self._table[at + 12] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _masked(self, vector: int) -> bool:
        """Whether ``vector`` is held back now: its entry's mask bit or the function mask, except
        for a Xen PIRQ message (vector field 0, the PIRQ in the destination id: Xen's
        ``hvm_inject_msi``). A Linux HVM guest on Xen that maps MSI-X to PIRQs masks them through
        event channels and never writes the table's mask bits (``pci_msi_ignore_mask``,
        ``arch/x86/pci/xen.c``), so they keep their reset value, masked; QEMU's
        ``msix_vector_masked`` (``hw/pci/msix.c``) ignores both masks for such a message."""
        address, data, masked = self._entry(vector)
        if data & 0xFF == 0 and address & 0xFFF0_0000 == MSI_ADDRESS_BASE:
            return False
        return masked or self.msix_function_masked

    def _fire(self, vector: int) -> list[Action]:
        if vector == NO_VECTOR or vector >= self.vectors:
            return []
        if self._masked(vector):
            self._pending |= 1 << vector
            return []
        address, data, _ = self._entry(vector)
        return [Msi(address, data, vector)]

    def pending(self, vector: int) -> bool:
        """The vector's Pending Bit (PBA)."""
        return bool(self._pending >> vector & 1)

    def _deliver_pending(self) -> list[PciAction]:
        """Send the pending messages whose vector (and function) are no longer masked."""
        actions: list[PciAction] = []
        if not self.msix_enabled:
            return actions
        for vector in range(self.vectors):
            if self._pending >> vector & 1 and not self._masked(vector):
                self._pending &= ~(1 << vector)
                address, data, _ = self._entry(vector)
                actions.append(Msi(address, data, vector))
        return actions

    def _msix_changed(self) -> list[PciAction]:
        return [*self._update_intx(), *self._deliver_pending()]

    def _table_read(self, offset: int, size: int) -> tuple[int, list[PciAction]]:
        if size not in (4, 8) or offset % size:
            return 0, [GuestError(f"MSI-X table read at {offset:#x} of size {size}: aligned 4 or 8 bytes")]
        return int.from_bytes(self._table[offset : offset + size], "little"), []

    def _table_write(self, offset: int, size: int, value: int) -> list[PciAction]:
        if size not in (4, 8) or offset % size:
            return [GuestError(f"MSI-X table write at {offset:#x} of size {size}: aligned 4 or 8 bytes")]
        before = bytes(self._table[offset : offset + size])
        for i, byte in enumerate(value.to_bytes(size, "little")):
            at = offset + i
            if at % PCI_MSIX_ENTRY_SIZE >= 12:  # Vector Control: only the mask bit is writable
                if at % PCI_MSIX_ENTRY_SIZE == 12:
                    self._table[at] = byte & PCI_MSIX_ENTRY_CTRL_MASKBIT
                continue
            if at % PCI_MSIX_ENTRY_SIZE == 0:
                byte &= 0xFC  # Message Address bits 1:0 are zero (DWORD aligned)
            self._table[at] = byte
        if self._table[offset : offset + size] != before:
            self.routing_changes += 1
        return self._deliver_pending()

    def _pba_read(self, offset: int, size: int) -> tuple[int, list[PciAction]]:
        if size not in (4, 8) or offset % size:
            return 0, [GuestError(f"MSI-X PBA read at {offset:#x} of size {size}: aligned 4 or 8 bytes")]
        return (self._pending >> (8 * offset)) & ((1 << (8 * size)) - 1), []

    # --- the core's transport hooks -----------------------------------------------------------

    def _interrupt(self, kind: int, index: int | None) -> list[Action]:
        if kind & INT_CONFIG:
            self.interrupt_status |= INT_CONFIG  # §4.1.4.5.1, with or without MSI-X
        if self.msix_enabled:
            if index is None and kind & INT_VRING:  # a used buffer of an unknown queue: every queue's vector
                return [a for v in sorted(set(self.queue_vectors)) for a in self._fire(v)]
            return self._fire(self.config_vector if index is None else self.queue_vectors[index])
        self.interrupt_status |= kind
        return list(self._update_intx())

    def _transport_reset(self) -> list[Action]:
        for q in self.queues:
            q.num = q.num_max
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        return self._update_intx()

    @property
    def line(self) -> bool:
        """The INTx level (as virtio-mmio's ``line``)."""
        return self._intx


def snapshot(dev: VirtioPciDevice) -> dict[str, object]:
    """The driver-visible state of ``dev``, JSON-serialisable (as ``virtio_mmio.snapshot``, plus
    the function's configuration space, MSI-X table and pending bits, and vectors)."""
    return {
        "status": int(dev.status),
        "driver_features": dev.driver_features,
        "interrupt_status": dev.interrupt_status,
        "config_generation": dev.config_generation,
        "selectors": [dev.device_features_sel, dev.driver_features_sel, dev.queue_sel, 0],
        "queues": [[q.num, int(q.ready), q.desc, q.driver, q.device] for q in dev.queues],
        "pci": {
            "config": dev._cfg.hex(),
            "msix_table": dev._table.hex(),
            "pending": dev._pending,
            "config_vector": dev.config_vector,
            "queue_vectors": list(dev.queue_vectors),
        },
    }


def restore(dev: VirtioPciDevice, state: dict[str, object]) -> list[PciAction]:
    """Load a :func:`snapshot` into a freshly built ``dev`` of the same shape (ValueError naming
    what is wrong if not). Returns what the caller must do: claim the BAR where the guest had it
    (:class:`BarMap`), drive INTx as it was."""
    check_snapshot(state)
    pci = state.get("pci")
    if not isinstance(pci, dict):
        raise ValueError("snapshot has no PCI function state (a virtio-mmio device's?)")
    try:
        cfg = bytes.fromhex(str(pci["config"]))
        table = bytes.fromhex(str(pci["msix_table"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"snapshot's PCI state is malformed: {e}") from None
    if len(cfg) != CONFIG_SIZE or len(table) != len(dev._table):
        raise ValueError(f"snapshot's PCI state has {len(cfg)} config bytes and a {len(table)}-byte MSI-X table, "
                         f"the function {CONFIG_SIZE} and {len(dev._table)}")
    fixed = [i for i in range(CONFIG_SIZE) if (cfg[i] ^ dev._cfg[i]) & ~dev._wmask[i]]
    if fixed:
        raise ValueError(f"snapshot's configuration space differs in read-only bytes from {fixed[0]:#x}: "
                         "another device's")
    vectors = pci.get("queue_vectors")
    config_vector, pending = pci.get("config_vector"), pci.get("pending")
    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and (v == NO_VECTOR or 0 <= v < dev.vectors)

    if not isinstance(vectors, list) or len(vectors) != len(dev.queues) or not all(ok(v) for v in vectors) \
            or not ok(config_vector):
        raise ValueError(f"snapshot's MSI-X vectors {config_vector!r}, {vectors!r} do not fit a table of {dev.vectors}")
    if not isinstance(pending, int) or isinstance(pending, bool) or not 0 <= pending < 1 << dev.vectors:
        raise ValueError(f"snapshot's pending bits {pending!r} do not fit a table of {dev.vectors}")
    restore_core(dev, state)
    dev._cfg[:] = cfg
    for v in range(dev.vectors):  # only the writable bits of each entry (as _table_write)
        at = v * PCI_MSIX_ENTRY_SIZE
        dev._table[at : at + 12] = table[at : at + 12]
        dev._table[at] &= 0xFC
        dev._table[at + 12] = table[at + 12] & PCI_MSIX_ENTRY_CTRL_MASKBIT
    dev._pending = pending
    dev.config_vector = cast(int, config_vector)
    dev.queue_vectors = [int(v) for v in vectors]
    dev._mapped = None
    return [*dev._remap(), *dev._update_intx()]

