"""The virtio-mmio v2 transport as a pure state machine (virtio 1.2 §4.2.2), on the
transport-independent device core (:class:`VirtioCore`) it shares with ``virtio_pci``.

No I/O, no clock, no logging: register accesses go in, values and *actions* come out. The caller (the
IOREQ bridge) carries the actions out: talk to the vhost-user back-end, drive the guest's interrupt
line, log guest errors.

Negotiation is driven by architectural state, not by the order of register writes: features are
checked when the driver sets FEATURES_OK and the device is activated when it sets DRIVER_OK, whatever
order the feature-select and queue registers were written in before (docs/design.md §3 rule 9).

Interrupt line: level semantics (``line = InterruptStatus != 0``). libxl declares virtio-mmio SPIs
edge-triggered in the guest's device tree, so when an InterruptACK leaves bits set (a new event raced
with the driver's ACK) the line is pulsed low then high again: a guest that treats the line as an
edge still sees the new event, and a level-sensitive one sees no spurious change. Xen on Arm ignores a
falling edge, so only the rises are sent to it (ioreq_server.py ``set_irq``).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

__all__ = [
    "MAGIC",
    "Activate",
    "ConfigWrite",
    "GuestError",
    "INT_CONFIG",
    "INT_VRING",
    "IrqLevel",
    "Msi",
    "Notify",
    "QueueConfig",
    "Reg",
    "Reset",
    "Status",
    "VirtioCore",
    "VirtioMmioDevice",
    "check_snapshot",
    "guest_features",
    "restore",
    "snapshot",
]

MAGIC = 0x74726976  # "virt"
VERSION = 2  # modern virtio-mmio
VENDOR_ID = 0x4E455858  # "XXEN": any value is allowed; this one names us
WINDOW_SIZE = 0x200  # libxl's per-device MMIO window (xen/include/public/arch-arm.h GUEST_VIRTIO_MMIO_SIZE; config 0x100..0x1ff)
CONFIG_OFFSET = 0x100
MAX_QUEUE_SIZE = 32768  # virtio 1.2 §2.7: split queue size ≤ 32768
NO_SHM = 0xFFFFFFFF  # SHMLenLow/High: "no such region"


class Reg(enum.IntEnum):
    """Register offsets (linux/virtio_mmio.h; virtio 1.2 Table 4.1)."""

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
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


class Status(enum.IntFlag):
    """Device status bits (virtio 1.2 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


INT_VRING = 1  # VIRTIO_MMIO_INT_VRING: used buffer notification
INT_CONFIG = 2  # VIRTIO_MMIO_INT_CONFIG: configuration change

# Feature bits the transport cares about (virtio 1.2 §6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36

# Bits we pass from the back-end to the guest: device-specific ranges 0-23 and 50-63, and the
# transport features that need nothing from the transport itself. Everything else is dropped:
# vhost-user's own bits (26 LOG_ALL, 30 PROTOCOL_FEATURES), legacy 24/27, and transport features
# virtio-mmio would have to implement (37 SR_IOV, 38 NOTIFICATION_DATA, 39 NOTIF_CONFIG_DATA,
# 40 RING_RESET).
_DEVICE_BITS = ((1 << 24) - 1) | (((1 << 14) - 1) << 50)
_PASSED_TRANSPORT_BITS = sum(
    1 << b for b in (F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1, F_RING_PACKED, F_IN_ORDER, F_ORDER_PLATFORM)
)


def guest_features(backend_features: int, *, grants: bool = False, packed: bool = True) -> int:
    """The features to offer the guest's driver, given what the back-end offers.

    ``grants``: the device uses grant mappings, so the driver must accept ACCESS_PLATFORM.
    ``packed``: whether the data path passes the guest's rings through (zero copy). A copying
    data path (shadow virtqueues) does split rings only, and no IN_ORDER: a back-end may then
    answer a whole in-order batch with one used entry, which the shadow ring cannot split.
    """
    offered = backend_features & (_DEVICE_BITS | _PASSED_TRANSPORT_BITS)
    if not packed:
        offered &= ~((1 << F_RING_PACKED) | (1 << F_IN_ORDER))
    if grants:
        offered |= 1 << F_ACCESS_PLATFORM
    return offered


# --- actions: what the caller must do after an access ---------------------------------------


@dataclass(frozen=True)
class IrqLevel:
    """Drive the guest's interrupt line to ``level``."""

    level: bool


@dataclass(frozen=True)
class Msi:
    """Send the message-signalled interrupt ``data`` to ``address`` (a PCI transport's MSI-X
    vector ``vector``; x86: XEN_DMOP_inject_msi)."""

    address: int
    data: int
    vector: int


@dataclass(frozen=True)
class Notify:
    """The driver notified queue ``index`` (QueueNotify): kick the back-end."""

    index: int


@dataclass(frozen=True)
class QueueConfig:
    """A queue as the driver set it up: guest-physical ring addresses."""

    index: int
    num: int
    desc: int
    driver: int
    device: int


@dataclass(frozen=True)
class Activate:
    """The driver set DRIVER_OK: start the back-end with these features and ready queues."""

    features: int
    queues: tuple[QueueConfig, ...]


@dataclass(frozen=True)
class Reset:
    """The driver reset the device (Status = 0); ``was_active``: DRIVER_OK had been set."""

    was_active: bool


@dataclass(frozen=True)
class ConfigWrite:
    """The driver wrote device config space: forward with SET_CONFIG."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class GuestError:
    """The driver did something the spec forbids; the device stays safe. For the log."""

    reason: str


Action = IrqLevel | Msi | Notify | Activate | Reset | ConfigWrite | GuestError


@dataclass
class _Queue:
    num_max: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def clear(self) -> None:
        self.num, self.ready, self.desc, self.driver, self.device = 0, False, 0, 0, 0


def _set_half(value: int, half: int, word: int) -> int:
    """Replace the low (half=0) or high (half=1) 32 bits of a 64-bit ``value``."""
    shift = 32 * half
    return (value & ~(0xFFFFFFFF << shift)) | ((word & 0xFFFFFFFF) << shift)


# Driver status stages in order; a status write must move forward along this chain (or reset).
_STAGES = (
    Status(0),
    Status.ACKNOWLEDGE,
    Status.ACKNOWLEDGE | Status.DRIVER,
    Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK,
    Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK,
)
_DRIVER_BITS = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
# The hot paths (every guest access) compare plain ints: reading an enum member is a Python-level
# lookup in CPython 3.11, and an IntFlag ``&`` a Python-level call.
_R = types.SimpleNamespace(**{r.name: int(r) for r in Reg})  # Reg's offsets, for the register dispatch
_DRIVER_OK = int(Status.DRIVER_OK)
_NEEDS_RESET = int(Status.DEVICE_NEEDS_RESET)
_LINE = (IrqLevel(False), IrqLevel(True))


@dataclass
class VirtioCore:
    """The transport-independent part of one virtio device (virtio 1.2 §2, §3): feature pages,
    queues and their checks, device config space, the status machine, and the driver's reset.

    A transport (:class:`VirtioMmioDevice` here, ``virtio_pci.VirtioPciDevice``) decodes its
    registers onto these and says how an interrupt reaches the driver (:meth:`_interrupt`).
    ``device_features`` is what the guest is offered (see :func:`guest_features`),
    ``queue_sizes`` the maximum size of each queue, ``config`` the device config space as last
    read from the back-end, ``ram`` the guest's RAM banks as ``(gpa, size)`` pairs (rings must lie
    inside one of them). ``interrupt_status`` holds the INT_VRING/INT_CONFIG bits the driver has
    not acknowledged yet (virtio-mmio InterruptStatus, virtio-pci ISR status).
    """

    device_id: int
    device_features: int
    queue_sizes: Sequence[int]
    config: bytes = b""
    ram: Sequence[tuple[int, int]] = ()
    required_features: int = 1 << F_VERSION_1
    status: Status = Status(0)
    interrupt_status: int = 0
    config_generation: int = 0
    driver_features: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    queues: list[_Queue] = field(init=False)
    _config: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.queues = [_Queue(num_max=n) for n in self.queue_sizes]
        self._config = bytearray(self.config)

    # --- what a transport provides ----------------------------------------------------------------

    def _interrupt(self, kind: int, index: int | None) -> list[Action]:
        """Tell the driver about ``kind`` (INT_VRING for queue ``index``, INT_CONFIG with ``index``
        None): the transport's interrupt (virtio 1.2 §4.2.3.4, §4.1.5.3-4)."""
        raise NotImplementedError

    def _transport_reset(self) -> list[Action]:
        """The transport's part of a device reset, after the core's."""
        raise NotImplementedError

    def _restored(self, transport_selector: int) -> None:
        """The transport's part of :func:`restore`, after the core's (the snapshot's fourth selector)."""

    # --- shared register semantics ------------------------------------------------------------

    def _device_features_word(self) -> int:
        if self.device_features_sel > 1:
            return 0
        return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF

    def _driver_features(self, value: int) -> list[Action]:
        if self.status & Status.FEATURES_OK:
            return [GuestError("DriverFeatures written after FEATURES_OK: ignored")]
        if self.driver_features_sel > 1:
            return [GuestError(f"DriverFeatures page {self.driver_features_sel} does not exist")] if value else []
        self.driver_features = _set_half(self.driver_features, self.driver_features_sel, value)
        return []

    def _selected(self) -> _Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _queue_ready(self, q: _Queue, value: int) -> list[Action]:
        if value == 0:
            if q.ready and self.status & Status.DRIVER_OK:
                # Disabling a live queue needs RING_RESET, which we do not offer.
                return [GuestError(f"queue {self.queue_sel} disabled while DRIVER_OK without RING_RESET: ignored")]
            q.ready = False
            return []
        problem = self._queue_problem(q)
        if problem:
            return self.needs_reset(f"queue {self.queue_sel}: {problem}")
        q.ready = True
        return []

    def _areas(self, q: _Queue) -> tuple[tuple[str, int, int, int], ...]:
        """(name, address, length, alignment) of each of a queue's three areas (virtio 1.2 §2.7.2
        for a split ring, §2.8.10 for a packed one: one event suppression structure each)."""
        if self.driver_features >> F_RING_PACKED & 1:
            return (("descriptor table", q.desc, 16 * q.num, 16), ("driver area", q.driver, 4, 4), ("device area", q.device, 4, 4))
        event_idx = 2 if self.driver_features >> F_EVENT_IDX & 1 else 0
        return (
            ("descriptor table", q.desc, 16 * q.num, 16),
            ("driver area", q.driver, 4 + 2 * q.num + event_idx, 2),
            ("device area", q.device, 4 + 8 * q.num + event_idx, 4),
        )

    def _queue_problem(self, q: _Queue) -> str | None:
        packed = bool(self.driver_features >> F_RING_PACKED & 1)
        if not 0 < q.num <= q.num_max:
            return f"QueueNum {q.num} not in 1..QueueNumMax {q.num_max}"
        if not packed and q.num & (q.num - 1):
            return f"QueueNum {q.num} is not a power of two (split ring)"
        areas = self._areas(q)
        for name, addr, length, align in areas:
            if addr % align:
                return f"{name} at {addr:#x} not {align}-byte aligned"
            if not self._in_ram(addr, length):
                return f"{name} [{addr:#x}, +{length:#x}) outside guest RAM"
        # Each area is its own part of guest memory (virtio 1.2 §2.7): the device writes the
        # device area, the driver the others, so areas sharing bytes, within a queue or with
        # another ready queue's, are a driver bug.
        others = [(f"queue {i} {name}", addr, length) for i, other in enumerate(self.queues)
                  if other is not q and other.ready for name, addr, length, _ in self._areas(other)]
        mine = [(name, addr, length) for name, addr, length, _ in areas]
        for k, (name, addr, length) in enumerate(mine):
            for other_name, other_addr, other_length in mine[k + 1:] + others:
                if addr < other_addr + other_length and other_addr < addr + length:
                    return f"{name} [{addr:#x}, +{length:#x}) overlaps the {other_name} [{other_addr:#x}, +{other_length:#x})"
        return None

    def _in_ram(self, addr: int, length: int) -> bool:
        return any(base <= addr and addr + length <= base + size for base, size in self.ram)

    def _queue_notified(self, index: int) -> list[Action]:
        """The driver notified queue ``index``: a kick for the back-end if the queue runs."""
        if int(self.status) & (_DRIVER_OK | _NEEDS_RESET) != _DRIVER_OK:
            return [GuestError(f"notify for queue {index} before DRIVER_OK or while NEEDS_RESET: ignored")]
        if index >= len(self.queues) or not self.queues[index].ready:
            return [GuestError(f"notify for queue {index}, which is not ready: ignored")]
        return [Notify(index)]

    def _config_read(self, offset: int, size: int) -> tuple[int, list[Action]]:
        if size not in (1, 2, 4, 8):
            return 0, [GuestError(f"config read of size {size}")]
        if offset + size > len(self._config):
            return 0, [GuestError(f"config read at {offset:#x}+{size} beyond config size {len(self._config)}")]
        return int.from_bytes(self._config[offset : offset + size], "little"), []

    def _config_write(self, offset: int, size: int, value: int) -> list[Action]:
        if size not in (1, 2, 4, 8):
            return [GuestError(f"config write of size {size}")]
        if offset + size > len(self._config):
            return [GuestError(f"config write at {offset:#x}+{size} beyond config size {len(self._config)}")]
        data = value.to_bytes(size, "little")
        self._config[offset : offset + size] = data
        return [ConfigWrite(offset, data)]

    # --- the status machine ---------------------------------------------------------------------

    def _status_write(self, value: int) -> list[Action]:
        if value == 0:
            return self._reset()
        new = Status(value & 0xFF)
        if new & Status.FAILED:
            self.status |= Status.FAILED
            return [GuestError("driver set FAILED")]
        old_stage = self.status & _DRIVER_BITS
        new_stage = new & _DRIVER_BITS
        if new_stage == old_stage:
            return []
        if new_stage not in _STAGES or old_stage not in _STAGES or _STAGES.index(new_stage) < _STAGES.index(old_stage):
            return [GuestError(f"status {int(self.status):#x} -> {value:#x} is not a forward step: ignored")]
        actions: list[Action] = []
        # Walk the stages one by one so that skipping a stage still runs its checks.
        for stage in _STAGES[_STAGES.index(old_stage) + 1 : _STAGES.index(new_stage) + 1]:
            step = stage & ~(self.status & _DRIVER_BITS)
            if step == Status.FEATURES_OK and not self._features_acceptable(actions):
                return actions
            if step == Status.DRIVER_OK:
                self.status |= step
                if self.status & Status.DEVICE_NEEDS_RESET:
                    actions.append(GuestError("DRIVER_OK while DEVICE_NEEDS_RESET: device stays stopped"))
                else:
                    actions.append(self._activate())
                continue
            self.status |= step
        return actions

    def _features_acceptable(self, actions: list[Action]) -> bool:
        extra = self.driver_features & ~self.device_features
        missing = self.required_features & ~self.driver_features
        if extra:
            actions.append(GuestError(f"driver accepted features {extra:#x} the device does not offer: FEATURES_OK refused"))
            return False
        if missing:
            actions.append(GuestError(f"driver did not accept required features {missing:#x}: FEATURES_OK refused"))
            return False
        return True

    def _activate(self) -> Activate:
        ready = tuple(
            QueueConfig(i, q.num, q.desc, q.driver, q.device) for i, q in enumerate(self.queues) if q.ready
        )
        return Activate(self.driver_features, ready)

    def _reset(self) -> list[Action]:
        was_active = bool(self.status & Status.DRIVER_OK)
        self.status = Status(0)
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        for q in self.queues:
            q.clear()
        self.interrupt_status = 0
        return [Reset(was_active), *self._transport_reset()]

    # --- events from the back-end side ------------------------------------------------------------

    def used_buffer(self, index: int | None = None) -> list[Action]:
        """The back-end signalled a used buffer in queue ``index`` (its call eventfd fired)."""
        if not int(self.status) & _DRIVER_OK:  # (a plain int: an IntFlag & is a Python-level call)
            return []
        return self._interrupt(INT_VRING, index)

    def config_changed(self, config: bytes) -> list[Action]:
        """The back-end's config space changed (CONFIG_CHANGE_MSG, then GET_CONFIG)."""
        if bytes(self._config) == config:
            return []
        self._config = bytearray(config)
        self.config_generation += 1
        if not self.status & Status.DRIVER_OK:
            return []
        return self._interrupt(INT_CONFIG, None)

    def needs_reset(self, reason: str) -> list[Action]:
        """Enter DEVICE_NEEDS_RESET (back-end lost, invalid queue setup): the driver must reset us."""
        actions: list[Action] = [GuestError(reason)]
        if self.status & Status.DEVICE_NEEDS_RESET:
            return actions
        self.status |= Status.DEVICE_NEEDS_RESET
        if self.status & Status.DRIVER_OK:
            actions += self._interrupt(INT_CONFIG, None)
        return actions

    @property
    def active(self) -> bool:
        """DRIVER_OK is set and the device has not failed."""
        return bool(self.status & Status.DRIVER_OK) and not self.status & (Status.DEVICE_NEEDS_RESET | Status.FAILED)


@dataclass
class VirtioMmioDevice(VirtioCore):
    """Register file and interrupt line of one virtio-mmio v2 device (on :class:`VirtioCore`)."""

    shm_sel: int = 0
    # The kernel's irqfd raises the line for used buffers behind our back (fast path): report
    # VRING while running. Its raises are edges the guest takes (ioreq_server.py set_irq): no
    # lowering follows them.
    kernel_irq: bool = False
    _line: bool = field(init=False, default=False)

    # --- reads ----------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> tuple[int, list[Action]]:
        """A guest load of ``size`` bytes at ``offset`` in the window: (value, actions)."""
        value = self.read_register(offset, size)
        if value is not None:
            return value, []
        if offset >= CONFIG_OFFSET:
            return self._config_read(offset - CONFIG_OFFSET, size)
        return 0, [GuestError(f"register read at {offset:#x} of size {size}: only aligned 32-bit reads")]

    def read_register(self, offset: int, size: int) -> int | None:
        """The value of an aligned 32-bit load of a register (below the config space), which
        has no actions; None for any other load (:meth:`read` serves it)."""
        if size != 4 or offset & 3 or offset >= CONFIG_OFFSET:
            return None
        match offset:
            case _R.MAGIC_VALUE:
                return MAGIC
            case _R.VERSION:
                return VERSION
            case _R.DEVICE_ID:
                return self.device_id
            case _R.VENDOR_ID:
                return VENDOR_ID
            case _R.DEVICE_FEATURES:
                return self._device_features_word()
            case _R.QUEUE_NUM_MAX:
                q = self._selected()
                return q.num_max if q else 0
            case _R.QUEUE_READY:
                q = self._selected()
                return int(q.ready) if q else 0
            case _R.INTERRUPT_STATUS:
                if self.kernel_irq and int(self.status) & _DRIVER_OK:
                    return self.interrupt_status | INT_VRING
                return self.interrupt_status
            case _R.STATUS:
                return int(self.status)
            case _R.SHM_LEN_LOW | _R.SHM_LEN_HIGH | _R.SHM_BASE_LOW | _R.SHM_BASE_HIGH:
                return NO_SHM
            case _R.CONFIG_GENERATION:
                return self.config_generation & 0xFFFFFFFF
            case _R.QUEUE_DESC_LOW | _R.QUEUE_DESC_HIGH:
                q = self._selected()
                return (q.desc >> (32 * ((offset - _R.QUEUE_DESC_LOW) // 4))) & 0xFFFFFFFF if q else 0
            case _R.QUEUE_DRIVER_LOW | _R.QUEUE_DRIVER_HIGH:
                q = self._selected()
                return (q.driver >> (32 * ((offset - _R.QUEUE_DRIVER_LOW) // 4))) & 0xFFFFFFFF if q else 0
            case _R.QUEUE_DEVICE_LOW | _R.QUEUE_DEVICE_HIGH:
                q = self._selected()
                return (q.device >> (32 * ((offset - _R.QUEUE_DEVICE_LOW) // 4))) & 0xFFFFFFFF if q else 0
            case _:
                # Write-only and reserved registers read as zero.
                return 0

    # --- writes ---------------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> list[Action]:
        """A guest store of the low ``size`` bytes of ``value`` at ``offset``; returns actions."""
        value &= (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0
        if offset >= CONFIG_OFFSET:
            return self._config_write(offset - CONFIG_OFFSET, size, value)
        if size != 4 or offset % 4:
            return [GuestError(f"register write at {offset:#x} of size {size}: only aligned 32-bit writes")]
        match offset:
            case _R.DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            case _R.DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            case _R.DRIVER_FEATURES:
                return self._driver_features(value)
            case _R.QUEUE_SEL:
                self.queue_sel = value
            case _R.QUEUE_NUM | _R.QUEUE_READY | _R.QUEUE_DESC_LOW | _R.QUEUE_DESC_HIGH | _R.QUEUE_DRIVER_LOW | _R.QUEUE_DRIVER_HIGH | _R.QUEUE_DEVICE_LOW | _R.QUEUE_DEVICE_HIGH:
                return self._queue_write(offset, value)
            case _R.QUEUE_NOTIFY:
                return self._notify(value)
            case _R.INTERRUPT_ACK:
                return self._ack(value)
            case _R.STATUS:
                return self._status_write(value)
            case _R.SHM_SEL:
                self.shm_sel = value
            case _:
                return [GuestError(f"write to read-only or reserved register {offset:#x} ignored")]
        return []

    def _queue_write(self, offset: int, value: int) -> list[Action]:
        q = self._selected()
        if q is None:
            return [GuestError(f"queue register {offset:#x} written for absent queue {self.queue_sel}")]
        if offset == _R.QUEUE_READY:
            return self._queue_ready(q, value)
        if q.ready:
            return [GuestError(f"queue {self.queue_sel} register {offset:#x} written while ready: ignored")]
        match offset:
            case _R.QUEUE_NUM:
                q.num = value
            case _R.QUEUE_DESC_LOW | _R.QUEUE_DESC_HIGH:
                q.desc = _set_half(q.desc, (offset - _R.QUEUE_DESC_LOW) // 4, value)
            case _R.QUEUE_DRIVER_LOW | _R.QUEUE_DRIVER_HIGH:
                q.driver = _set_half(q.driver, (offset - _R.QUEUE_DRIVER_LOW) // 4, value)
            case _R.QUEUE_DEVICE_LOW | _R.QUEUE_DEVICE_HIGH:
                q.device = _set_half(q.device, (offset - _R.QUEUE_DEVICE_LOW) // 4, value)
        return []

    def _notify(self, value: int) -> list[Action]:
        return self._queue_notified(value & 0xFFFF)

    def _ack(self, value: int) -> list[Action]:
        before = self.interrupt_status
        self.interrupt_status &= ~value & (INT_VRING | INT_CONFIG)
        if self.interrupt_status and self.interrupt_status != before:
            # Some bits remain: pulse so that an edge-triggered line sees the remaining event.
            self._line = True
            return [_LINE[False], _LINE[True]]
        return self._update_line()

    def _update_line(self) -> list[Action]:
        level = self.interrupt_status != 0
        if level == self._line:
            return []
        self._line = level
        return [_LINE[level]]

    def _transport_reset(self) -> list[Action]:
        self.shm_sel = 0
        return self._update_line()

    def _interrupt(self, kind: int, index: int | None) -> list[Action]:
        self.interrupt_status |= kind
        return self._update_line()

    def _restored(self, transport_selector: int) -> None:
        self.shm_sel = transport_selector
        self._line = self.interrupt_status != 0

    @property
    def line(self) -> bool:
        """The level this device drives its interrupt line to."""
        return self._line



def snapshot(dev: VirtioMmioDevice) -> dict[str, object]:
    """The driver-visible state of ``dev``, JSON-serialisable: what a restarted daemon restores so
    that a guest whose device model process died carries on (``restore``)."""
    return {
        "status": int(dev.status),
        "driver_features": dev.driver_features,
        "interrupt_status": dev.interrupt_status,
        "config_generation": dev.config_generation,
        "selectors": [dev.device_features_sel, dev.driver_features_sel, dev.queue_sel, dev.shm_sel],
        "queues": [[q.num, int(q.ready), q.desc, q.driver, q.device] for q in dev.queues],
    }


U32, U64 = (1 << 32) - 1, (1 << 64) - 1
_SNAPSHOT_NUMBERS = {"status": 0xFF, "driver_features": U64, "interrupt_status": U32, "config_generation": U32}
_QUEUE_FIELDS = (("num", MAX_QUEUE_SIZE), ("ready", 1), ("desc", U64), ("driver", U64), ("device", U64))


def _int(value: object, what: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"snapshot's {what} is {value!r}, not a number")
    if not 0 <= value <= top:
        raise ValueError(f"snapshot's {what} {value} is not in 0..{top:#x}")
    return value


def _list(value: object, what: str, length: int | None = None) -> list[object]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(f"snapshot's {what} is {value!r}, not a list" + (f" of {length}" if length is not None else ""))
    return value


def check_snapshot(state: object) -> dict[str, object]:
    """``state`` if it has the shape and ranges of a :func:`snapshot` (ValueError naming what is
    wrong if not): what a state file read back must be checked against before :func:`restore`."""
    if not isinstance(state, dict):
        raise ValueError(f"snapshot is {state!r}, not an object")
    missing = sorted({*_SNAPSHOT_NUMBERS, "selectors", "queues"} - state.keys())
    if missing:
        raise ValueError(f"snapshot lacks {', '.join(missing)}")
    for key, top in _SNAPSHOT_NUMBERS.items():
        _int(state[key], key, top)
    for i, sel in enumerate(_list(state["selectors"], "selectors", 4)):
        _int(sel, f"selector {i}", U32)
    for n, queue in enumerate(_list(state["queues"], "queues")):
        for (name, top), value in zip(_QUEUE_FIELDS, _list(queue, f"queue {n}", len(_QUEUE_FIELDS))):
            _int(value, f"queue {n} {name}", top)
    return state


def _status_problem(value: int, features: int, required: int) -> Status:
    """``value`` as a Status a driver can have reached (virtio 1.2 §3.1.1: ACKNOWLEDGE, DRIVER,
    FEATURES_OK with the features the device requires, DRIVER_OK, in this order), else ValueError."""
    if value & ~sum(Status):
        raise ValueError(f"snapshot's status {value:#x} has bits no status defines")
    status = Status(value)
    order = (Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK)
    for before, after in zip(order, order[1:]):
        if status & after and not status & before:
            raise ValueError(f"snapshot's status {value:#x} has {after.name} without {before.name}")
    if status & Status.FEATURES_OK and required & ~features:
        raise ValueError(f"snapshot's status has FEATURES_OK without the required features {required & ~features:#x}")
    return status


def restore(dev: VirtioCore, state: dict[str, object]) -> None:
    """Load a :func:`snapshot` into a freshly built ``dev`` of the same shape (ValueError if not)."""
    check_snapshot(state)
    queues = cast(list[list[int]], state["queues"])
    if len(queues) != len(dev.queues):
        raise ValueError(f"snapshot has {len(queues)} queues, the device {len(dev.queues)}")
    features = cast(int, state["driver_features"])
    if features & ~dev.device_features:
        raise ValueError(f"snapshot's driver features {features:#x} exceed what the back-end offers")
    status = _status_problem(cast(int, state["status"]), features, dev.required_features)
    for n, (q, (num, ready, *_)) in enumerate(zip(dev.queues, queues)):
        if not ready and num > q.num_max:  # (a ready queue's whole setup is checked below)
            raise ValueError(f"snapshot's queue {n} num {num} exceeds QueueNumMax {q.num_max}")
    dev.status = status
    dev.driver_features = features
    dev.interrupt_status = cast(int, state["interrupt_status"]) & (INT_VRING | INT_CONFIG)
    dev.config_generation = cast(int, state["config_generation"])
    sel = cast(list[int], state["selectors"])
    dev.device_features_sel, dev.driver_features_sel, dev.queue_sel = sel[:3]
    for q, (num, ready, desc, driver, device) in zip(dev.queues, queues):
        q.num, q.ready, q.desc, q.driver, q.device = num, bool(ready), desc, driver, device
        if q.ready and dev._queue_problem(q):
            raise ValueError(f"snapshot's queue is invalid: {dev._queue_problem(q)}")
    dev._restored(sel[3])
