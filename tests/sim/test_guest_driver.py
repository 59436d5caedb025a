"""The simulated guest's virtio-mmio driver against a small, independently written fake device.

The fake device below is written from the virtio 1.2 register table (not from the daemon's
``virtio_mmio`` model) and consumes the rings with ``vhost_user.virtqueue.SplitQueueDevice``; the fake
bus is a RAM bytearray in two banks plus level-triggered interrupt lines. Every register access is
logged so the tests can check the probe sequence Linux's virtio_mmio.c performs.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from vhost_user.virtqueue import Chain, SplitQueueDevice, read_buffers, write_buffers
from xen_vhost_sim.guest_devices import (
    NET_HDR_SIZE,
    SECTOR_SIZE,
    BlkFeature,
    BlkIoError,
    BlkOp,
    VirtioBlk,
    VirtioNet,
    attach_device,
)
from xen_vhost_sim.guest_driver import (
    DeviceNeedsReset,
    DeviceStatus,
    Feature,
    GuestDriverError,
    FeaturesRejected,
    GuestPageAllocator,
    GuestTimeout,
    MmioReg,
    NoDevice,
    OutOfGuestMemory,
    ProbeError,
    QueueSetupError,
    VirtioMmioDriver,
)

WAIT = 5.0
RAM_BANKS = ((0x4000_0000, 4 << 20), (0x4800_0000, 1 << 20))  # Arm-like RAM0 plus a small second bank
BASE, IRQ = 0x0200_0000, 33
BASE2, IRQ2 = 0x0200_0200, 34


# ---- fake machine ---------------------------------------------------------------------------------


class FakeRam:
    def __init__(self) -> None:
        self._banks = [(gpa, bytearray(size)) for gpa, size in RAM_BANKS]

    def banks(self) -> list[tuple[int, int]]:
        return [(gpa, len(buf)) for gpa, buf in self._banks]

    def view(self, gpa: int, length: int) -> memoryview:
        for base, buf in self._banks:
            if base <= gpa and gpa + length <= base + len(buf) and length >= 0:
                return memoryview(buf)[gpa - base : gpa - base + length]
        raise ValueError(f"[{gpa:#x}, +{length:#x}) is not guest RAM")


class FakeBus:
    """GuestBus: MMIO routed to fake devices by window, RAM, level-triggered lines."""

    def __init__(self) -> None:
        self._ram = FakeRam()
        self.devices: dict[int, FakeMmioDevice] = {}
        self.lines: dict[int, bool] = {}
        self._line_events: dict[int, asyncio.Event] = {}
        self.hang = False

    @property
    def ram(self) -> FakeRam:
        return self._ram

    def attach(self, base: int, dev: FakeMmioDevice) -> None:
        self.devices[base] = dev
        dev.bus = self

    def _route(self, addr: int) -> tuple[FakeMmioDevice, int]:
        for base, dev in self.devices.items():
            if base <= addr < base + 0x200:
                return dev, addr - base
        raise AssertionError(f"MMIO access to {addr:#x} hits no device")

    async def mmio_read(self, addr: int, size: int, vcpu: int = 0) -> int:
        if self.hang:
            await asyncio.Event().wait()
        dev, off = self._route(addr)
        return dev.read(off, size)

    async def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        dev, off = self._route(addr)
        dev.write(off, size, value)

    def set_line(self, irq: int, level: bool) -> None:
        self.lines[irq] = level
        ev = self._line_events.setdefault(irq, asyncio.Event())
        if level:
            ev.set()
        else:
            ev.clear()

    def irq_level(self, irq: int) -> bool:
        return self.lines.get(irq, False)

    async def wait_irq(self, irq: int) -> None:
        ev = self._line_events.setdefault(irq, asyncio.Event())
        while not self.lines.get(irq, False):
            await ev.wait()

    def grant(self, gfn: int, *, readonly: bool = False) -> int:
        return gfn

    def revoke(self, ref: int) -> None:
        pass


@dataclass
class FakeQueue:
    num_max: int
    num: int = 0
    ready: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ring: SplitQueueDevice | None = None


@dataclass
class FakeMmioDevice:
    """A virtio-mmio v2 device: the register file of virtio 1.2 Table 4.1, nothing more."""

    device_id: int
    features: int
    config: bytearray
    queue_max: list[int]
    handler: Callable[[FakeMmioDevice, int, Chain], int] | None = None
    magic: int = 0x74726976
    version: int = 2
    refuse_features: bool = False
    bus: FakeBus | None = None
    irq: int = IRQ
    log: list[tuple[str, int, int]] = field(default_factory=list)
    bad_widths: list[tuple[int, int]] = field(default_factory=list)
    status: int = 0
    dev_sel: int = 0
    drv_sel: int = 0
    driver_features: int = 0
    queue_sel: int = 0
    isr: int = 0
    generation: int = 0
    on_config_read: Callable[[FakeMmioDevice, int], None] | None = None
    max_available: int = 0
    notifies: int = 0
    passive_queues: tuple[int, ...] = ()  # kicks only recorded (e.g. a NIC's receiveq)
    queues: list[FakeQueue] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queues = [FakeQueue(n) for n in self.queue_max]

    # registers
    def read(self, off: int, size: int) -> int:
        if off >= 0x100:
            if self.on_config_read is not None:
                self.on_config_read(self, off - 0x100)
            raw = bytes(self.config[off - 0x100 : off - 0x100 + size]).ljust(size, b"\0")
            value = int.from_bytes(raw, "little")
            self.log.append(("rc", off, value))
            return value
        if size != 4 or off % 4:
            self.bad_widths.append((off, size))
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        value = {
            0x000: self.magic, 0x004: self.version, 0x008: self.device_id, 0x00C: 0x554D4551,
            0x010: (self.features >> (32 * self.dev_sel)) & 0xFFFFFFFF if self.dev_sel < 2 else 0,
            0x034: q.num_max if q else 0, 0x044: q.ready if q else 0,
            0x060: self.isr, 0x070: self.status, 0x0FC: self.generation,
        }.get(off, 0)
        self.log.append(("r", off, value))
        return value

    def write(self, off: int, size: int, value: int) -> None:
        self.log.append(("w", off, value))
        if off >= 0x100:
            self.config[off - 0x100 : off - 0x100 + size] = value.to_bytes(size, "little")
            return
        if size != 4 or off % 4:
            self.bad_widths.append((off, size))
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if off == 0x014:
            self.dev_sel = value
        elif off == 0x024:
            self.drv_sel = value
        elif off == 0x020 and self.drv_sel < 2:
            mask = 0xFFFFFFFF << (32 * self.drv_sel)
            self.driver_features = (self.driver_features & ~mask) | (value << (32 * self.drv_sel))
        elif off == 0x030:
            self.queue_sel = value
        elif q is not None and off in (0x038, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x044):
            self._queue_write(q, off, value)
        elif off == 0x050:
            self.notifies += 1
            self.process(value & 0xFFFF)
        elif off == 0x064:
            self.isr &= ~value
            self._line()
        elif off == 0x070:
            self._status(value)

    def _queue_write(self, q: FakeQueue, off: int, value: int) -> None:
        if off == 0x038:
            q.num = value
        elif off == 0x044:
            q.ready = value & 1
            if q.ready:
                assert self.bus is not None
                q.ring = SplitQueueDevice(
                    self.bus.ram, q.num, q.desc, q.driver, q.device,
                    event_idx=bool(self.driver_features & Feature.RING_EVENT_IDX),
                )
        else:
            attr = {0x080: "desc", 0x084: "desc", 0x090: "driver", 0x094: "driver", 0x0A0: "device", 0x0A4: "device"}[off]
            shift = 32 if off & 4 else 0
            cur = getattr(q, attr)
            setattr(q, attr, (cur & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & DeviceStatus.FEATURES_OK and not self.status & DeviceStatus.FEATURES_OK:
            ok = (
                not self.refuse_features
                and self.driver_features & ~self.features == 0
                and self.driver_features & Feature.VERSION_1
            )
            if not ok:
                value &= ~DeviceStatus.FEATURES_OK
        self.status = value

    def reset(self) -> None:
        for q in self.queues:
            if q.ring is not None:
                q.ring.release()
        self.queues = [FakeQueue(n) for n in self.queue_max]
        self.status = self.driver_features = self.isr = self.dev_sel = self.drv_sel = self.queue_sel = 0
        self._line()

    def _line(self) -> None:
        if self.bus is not None:
            self.bus.set_line(self.irq, self.isr != 0)

    def interrupt(self, bits: int) -> None:
        self.isr |= bits
        self._line()

    def process(self, index: int) -> None:
        q = self.queues[index]
        if q.ring is None or self.handler is None or index in self.passive_queues:
            return
        self.max_available = max(self.max_available, q.ring.available())
        while (chain := q.ring.pop()) is not None:
            q.ring.push(chain.head, self.handler(self, index, chain))
        if q.ring.needs_notify():
            self.interrupt(1)

    def change_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data
        self.generation += 1
        self.interrupt(2)

    def need_reset(self) -> None:
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        self.interrupt(2)


# ---- a virtio-blk back-end for the fake device ------------------------------------------------------


class Disk:
    def __init__(self, sectors: int) -> None:
        self.data = bytearray(os.urandom(sectors * SECTOR_SIZE))
        self.flushes = 0
        self.requests = 0

    def handle(self, dev: FakeMmioDevice, index: int, chain: Chain) -> int:
        assert dev.bus is not None
        mem = dev.bus.ram
        self.requests += 1
        header = read_buffers(mem, chain.readable, 16)
        rtype, _, sector = struct.unpack("<IIQ", header)
        status_buf = chain.writable[-1]
        off = sector * SECTOR_SIZE
        written = 1
        status = 0
        if rtype == 0:  # IN
            length = sum(b.length for b in chain.writable[:-1])
            if off + length > len(self.data):
                status = 1
            else:
                written += write_buffers(mem, chain.writable[:-1], bytes(self.data[off : off + length]))
        elif rtype == 1:  # OUT
            payload = read_buffers(mem, chain.readable)[16:]
            if off + len(payload) > len(self.data):
                status = 1
            else:
                self.data[off : off + len(payload)] = payload
        elif rtype == 4:
            self.flushes += 1
        elif rtype == 8:
            written += write_buffers(mem, chain.writable[:-1], b"fake-disk-serial".ljust(20, b"\0"))
        else:
            status = 2
        with mem.view(status_buf.addr, 1) as mv:
            mv[0] = status
        return written


def blk_config(sectors: int, *, size_max: int = 0, blk_size: int = 512) -> bytearray:
    cfg = bytearray(0x100)
    struct.pack_into("<QII", cfg, 0, sectors, size_max, 8)
    struct.pack_into("<I", cfg, 20, blk_size)
    return cfg


BLK_FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | BlkFeature.FLUSH | BlkFeature.BLK_SIZE | BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX)


def make_blk(bus: FakeBus, sectors: int = 2048, **kw: object) -> tuple[FakeMmioDevice, Disk]:
    disk = Disk(sectors)
    dev = FakeMmioDevice(2, kw.pop("features", BLK_FEATURES), blk_config(sectors, size_max=kw.pop("size_max", 0)),  # type: ignore[arg-type]
                         [kw.pop("queue_max", 128)], disk.handle, **kw)  # type: ignore[arg-type]
    bus.attach(BASE, dev)
    return dev, disk


@pytest.fixture
def bus() -> FakeBus:
    return FakeBus()


def offsets(dev: FakeMmioDevice) -> list[tuple[str, int]]:
    return [(op, off) for op, off, _ in dev.log]


# ---- tests ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_probe_negotiation_and_queue_setup_follow_linux_order(bus: FakeBus) -> None:
    dev, _ = make_blk(bus)
    alloc = GuestPageAllocator(bus.ram)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, alloc, features=VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX)
    try:
        R = MmioReg
        log = dev.log
        ops = [(op, off) for op, off, _ in log if op != "rc"]
        expected_head = [
            ("r", R.MAGIC_VALUE), ("r", R.VERSION), ("r", R.DEVICE_ID), ("r", R.VENDOR_ID),
            ("w", R.STATUS), ("r", R.STATUS),  # reset and wait for 0
            ("w", R.STATUS), ("w", R.STATUS),  # ACKNOWLEDGE, DRIVER
            ("w", R.DEVICE_FEATURES_SEL), ("r", R.DEVICE_FEATURES), ("w", R.DEVICE_FEATURES_SEL), ("r", R.DEVICE_FEATURES),
            ("w", R.DRIVER_FEATURES_SEL), ("w", R.DRIVER_FEATURES), ("w", R.DRIVER_FEATURES_SEL), ("w", R.DRIVER_FEATURES),
            ("w", R.STATUS), ("r", R.STATUS),  # FEATURES_OK and its read-back
        ]
        assert ops[: len(expected_head)] == expected_head
        status_writes = [v for op, off, v in log if op == "w" and off == R.STATUS]
        assert status_writes == [0, 1, 3, 0xB, 0xF]
        sel_writes = [v for op, off, v in log if op == "w" and off in (R.DEVICE_FEATURES_SEL, R.DRIVER_FEATURES_SEL)]
        assert sel_writes == [1, 0, 1, 0]
        # Queue setup: sel, ready must be 0, num max, num, the six address halves, ready=1, then DRIVER_OK.
        q_start = ops.index(("w", R.QUEUE_SEL))
        assert ops[q_start : q_start + 12] == [
            ("w", R.QUEUE_SEL), ("r", R.QUEUE_READY), ("r", R.QUEUE_NUM_MAX), ("w", R.QUEUE_NUM),
            ("w", R.QUEUE_DESC_LOW), ("w", R.QUEUE_DESC_HIGH), ("w", R.QUEUE_DRIVER_LOW), ("w", R.QUEUE_DRIVER_HIGH),
            ("w", R.QUEUE_DEVICE_LOW), ("w", R.QUEUE_DEVICE_HIGH), ("w", R.QUEUE_READY), ("w", R.STATUS),
        ]
        # Config space was read inside a generation bracket, 64-bit capacity as two 32-bit reads.
        gen_reads = [i for i, (op, off, _) in enumerate(log) if op == "r" and off == R.CONFIG_GENERATION]
        cfg_reads = [i for i, (op, _, _) in enumerate(log) if op == "rc"]
        assert gen_reads and cfg_reads and gen_reads[0] < cfg_reads[0] < cfg_reads[-1] < gen_reads[1]
        assert not dev.bad_widths
        assert dev.driver_features == BLK_FEATURES  # wanted ∩ offered, including EVENT_IDX
        assert blk.capacity == 2048 and dev.queues[0].num == 128 and dev.queues[0].ready == 1
        q = blk.driver.queues[0]
        assert (dev.queues[0].desc, dev.queues[0].driver, dev.queues[0].device) == (q.desc, q.avail, q.used)
        assert q.desc % 16 == 0 and q.avail % 2 == 0 and q.used % 4 == 0
    finally:
        await blk.close()
    assert dev.status == 0  # close() resets


@pytest.mark.asyncio
async def test_feature_select_order_is_a_parameter(bus: FakeBus) -> None:
    dev, _ = make_blk(bus)
    drv = VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram), features_sel_order=(0, 1))
    await drv.probe()
    features = await drv.negotiate(BLK_FEATURES)
    assert features == BLK_FEATURES
    sels = [v for op, off, v in dev.log if op == "w" and off in (MmioReg.DEVICE_FEATURES_SEL, MmioReg.DRIVER_FEATURES_SEL)]
    assert sels == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram), features_sel_order=(1, 1))


@pytest.mark.asyncio
async def test_device_clearing_features_ok_fails_cleanly(bus: FakeBus) -> None:
    dev, _ = make_blk(bus, refuse_features=True)
    drv = VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    await drv.probe()
    with pytest.raises(FeaturesRejected):
        await drv.negotiate(BLK_FEATURES)
    assert dev.status & DeviceStatus.FAILED and not dev.status & DeviceStatus.FEATURES_OK
    assert not drv.queues
    # A device that offers no VERSION_1 (legacy only) is refused before FEATURES_OK.
    dev.refuse_features = False
    dev.features = int(BlkFeature.FLUSH)
    with pytest.raises(FeaturesRejected):
        await drv.negotiate(BLK_FEATURES)
    assert not any(op == "w" and off == MmioReg.DRIVER_FEATURES for op, off, _ in dev.log[-4:])


@pytest.mark.asyncio
async def test_probe_rejects_bad_magic_version_and_empty_windows(bus: FakeBus) -> None:
    dev, _ = make_blk(bus)
    drv = VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    dev.magic = 0x12345678
    with pytest.raises(ProbeError):
        await drv.probe()
    dev.magic, dev.version = 0x74726976, 1
    with pytest.raises(ProbeError):
        await drv.probe()
    dev.version, dev.device_id = 2, 0
    with pytest.raises(NoDevice):
        await drv.probe()


@pytest.mark.asyncio
async def test_absent_or_already_ready_queue_is_refused(bus: FakeBus) -> None:
    dev, _ = make_blk(bus, queue_max=0)
    alloc = GuestPageAllocator(bus.ram)
    before = alloc.free_bytes
    drv = VirtioMmioDriver(bus, BASE, IRQ, alloc)
    await drv.probe()
    await drv.negotiate(BLK_FEATURES)
    with pytest.raises(QueueSetupError):
        await drv.setup_queue(0)
    dev.queue_max = [100]  # not a power of two: rounded down
    dev.queues[0].num_max = 100
    q = await drv.setup_queue(0, 256)
    assert q.size == 64 and dev.queues[0].num == 64
    with pytest.raises(QueueSetupError):
        await drv.setup_queue(0)  # ready already 1
    await drv.close()
    assert alloc.free_bytes == before  # rings freed


@pytest.mark.asyncio
async def test_config_generation_change_mid_read_is_retried(bus: FakeBus) -> None:
    dev, _ = make_blk(bus, sectors=8)
    struct.pack_into("<Q", dev.config, 0, 0xFFFF_FFFF)
    changed = []

    def tear(d: FakeMmioDevice, off: int) -> None:
        # Between the low and the high half of capacity the device grows: 0xffffffff -> 0x100000000.
        if off == 4 and not changed:
            changed.append(True)
            struct.pack_into("<Q", d.config, 0, 0x1_0000_0000)
            d.generation += 1

    dev.on_config_read = tear
    drv = VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    (capacity,) = await drv.config_read([(0, 8)])
    assert changed and capacity == 0x1_0000_0000  # a torn read would give 0x1_ffff_ffff
    gens = [1 for op, off, _ in dev.log if op == "r" and off == MmioReg.CONFIG_GENERATION]
    assert len(gens) == 4  # two brackets

    def always(d: FakeMmioDevice, off: int) -> None:
        d.generation += 1

    dev.on_config_read = always
    with pytest.raises(Exception, match="kept changing"):
        await drv.config_read([(0, 8)])


@pytest.mark.asyncio
@pytest.mark.parametrize("event_idx", [False, True])
async def test_blk_round_trip_at_queue_depth_1(bus: FakeBus, event_idx: bool) -> None:
    dev, disk = make_blk(bus)
    features = VirtioBlk.DEFAULT_FEATURES | (Feature.RING_EVENT_IDX if event_idx else 0)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram), features=features)
    try:
        assert bool(dev.driver_features & Feature.RING_EVENT_IDX) == event_idx
        for i in range(40):  # wraps nothing yet, but reuses descriptors many times
            data = os.urandom(SECTOR_SIZE * (1 + i % 4))
            await blk.write(i * 4, data)
            assert bytes(disk.data[i * 4 * SECTOR_SIZE : i * 4 * SECTOR_SIZE + len(data)]) == data
            assert await blk.read(i * 4, len(data) // SECTOR_SIZE) == data
        untouched = await blk.read(1000, 2)
        assert untouched == bytes(disk.data[1000 * SECTOR_SIZE : 1002 * SECTOR_SIZE])
        await blk.flush()
        assert disk.flushes == 1
        assert await blk.get_id() == b"fake-disk-serial"
        assert blk.driver.interrupts >= 80
        assert dev.isr == 0 and not bus.irq_level(IRQ)  # every interrupt was acknowledged
        acks = [v for op, off, v in dev.log if op == "w" and off == MmioReg.INTERRUPT_ACK]
        isr_reads = [v for op, off, v in dev.log if op == "r" and off == MmioReg.INTERRUPT_STATUS and v]
        assert acks == isr_reads  # ACK carries exactly the bits read
    finally:
        await blk.close()


@pytest.mark.asyncio
async def test_blk_queue_depth_8_and_queue_wrap(bus: FakeBus) -> None:
    dev, disk = make_blk(bus, queue_max=32, size_max=1024)
    alloc = GuestPageAllocator(bus.ram)
    free_before = alloc.free_bytes
    blk = await VirtioBlk.attach(bus, BASE, IRQ, alloc, queue_size=32)
    try:
        for round_ in range(12):  # 12 × 8 chains of 3-6 descriptors: the 32-entry ring wraps many times
            payloads = [os.urandom(SECTOR_SIZE * (1 + (round_ + i) % 6)) for i in range(8)]
            ops = [BlkOp("write", 64 * i, data=p) for i, p in enumerate(payloads)]
            writes = await blk.batch(ops[:4])
            writes += await blk.batch(ops[4:])
            assert writes == [None] * 8
            reads = await blk.batch([BlkOp("read", 64 * i, len(p) // SECTOR_SIZE) for i, p in enumerate(payloads)])
            assert reads == payloads
        assert dev.max_available >= 4
        # Eight single-segment reads really are in flight together.
        dev.max_available = 0
        reads = await blk.batch([BlkOp("read", 8 * i, 1) for i in range(8)])
        assert dev.max_available == 8
        assert reads == [bytes(disk.data[8 * i * SECTOR_SIZE : (8 * i + 1) * SECTOR_SIZE]) for i in range(8)]
        # size_max=1024 splits a 4 KiB write into four data descriptors.
        seen: list[int] = []
        orig = disk.handle

        def spy(d: FakeMmioDevice, index: int, chain: Chain) -> int:
            seen.append(len(chain.readable))
            return orig(d, index, chain)

        dev.handler = spy
        await blk.write(0, bytes(4096))
        assert seen == [5]  # header + 4 segments
        # Concurrent callers also share the queue.
        datas = [os.urandom(SECTOR_SIZE) for _ in range(8)]
        await asyncio.gather(*(blk.write(500 + i, d) for i, d in enumerate(datas)))
        assert await blk.read(500, 8) == b"".join(datas)
    finally:
        await blk.close()
    assert alloc.free_bytes == free_before  # every request buffer and the rings came back


@pytest.mark.asyncio
async def test_batch_larger_than_the_ring_waits_for_free_descriptors(bus: FakeBus) -> None:
    dev, disk = make_blk(bus, queue_max=8)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram), queue_size=8)
    try:
        # 10 reads of 3 descriptors each need 30 descriptors; the ring has 8.
        reads = await blk.batch([BlkOp("read", i, 1) for i in range(10)])
        assert reads == [bytes(disk.data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]) for i in range(10)]
        assert dev.notifies >= 4 and dev.max_available <= 2
    finally:
        await blk.close()


@pytest.mark.asyncio
async def test_blk_errors_are_typed(bus: FakeBus) -> None:
    dev, disk = make_blk(bus, sectors=16)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    try:
        with pytest.raises(ValueError):
            await blk.read(15, 2)  # beyond capacity: refused before reaching the device
        disk.data = disk.data[: 8 * SECTOR_SIZE]  # the medium shrank behind the driver's back
        with pytest.raises(BlkIoError) as info:
            await blk.read(10, 1)
        assert info.value.status == 1
        assert await blk.read(0, 1) == bytes(disk.data[:SECTOR_SIZE])  # the queue still works
    finally:
        await blk.close()


@pytest.mark.asyncio
async def test_config_change_interrupt_and_device_needs_reset(bus: FakeBus) -> None:
    dev, disk = make_blk(bus)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    try:
        dev.change_config(0, struct.pack("<Q", 4096))
        async with asyncio.timeout(WAIT):
            await blk.driver.config_changed.wait()
        await blk.refresh_config()
        assert blk.capacity == 4096 and not blk.driver.needs_reset
        # The device stops answering and flags NEEDS_RESET: the outstanding request fails, typed.
        handler, dev.handler = dev.handler, None
        task = asyncio.create_task(blk.read(0, 1))
        async with asyncio.timeout(WAIT):
            while dev.notifies == 0 or not dev.queues[0].ring or not dev.queues[0].ring.available():
                await asyncio.sleep(0)
        dev.need_reset()
        with pytest.raises(DeviceNeedsReset):
            await asyncio.wait_for(task, WAIT)
        assert blk.driver.needs_reset
        with pytest.raises(DeviceNeedsReset):
            await blk.read(0, 1)
        # Reset and bring the device up again: I/O works.
        dev.handler = handler
        await blk.driver.negotiate(VirtioBlk.DEFAULT_FEATURES)
        await blk.driver.setup_queue(0, 64)
        await blk.driver.driver_ok()
        assert not blk.driver.needs_reset
        await blk.write(3, b"\x5a" * SECTOR_SIZE)
        assert await blk.read(3, 1) == b"\x5a" * SECTOR_SIZE
    finally:
        await blk.close()


@pytest.mark.asyncio
async def test_hung_device_gives_a_timeout(bus: FakeBus) -> None:
    make_blk(bus)
    drv = VirtioMmioDriver(bus, BASE, IRQ, GuestPageAllocator(bus.ram), mmio_timeout=0.1)
    bus.hang = True
    with pytest.raises(GuestTimeout):
        await drv.probe()


def test_page_allocator_first_fit_merge_and_banks() -> None:
    ram = FakeRam()
    alloc = GuestPageAllocator(ram, reserve=0x1000)
    total = alloc.free_bytes
    assert total == (4 << 20) - 0x1000 + (1 << 20)
    a = alloc.alloc(100)
    assert a == 0x4000_1000
    b = alloc.alloc(5000, align=0x4000)
    assert b % 0x4000 == 0 and b >= a + 0x1000
    ram.view(a, 4)[:] = b"junk"
    alloc.free(a)
    a2 = alloc.alloc(10)
    assert a2 == a and bytes(ram.view(a2, 4)) == b"\0" * 4  # zeroed on allocation
    big = alloc.alloc(3 << 20)
    second = alloc.alloc(1 << 20)  # no longer fits the first bank; fills the second exactly
    assert second == 0x4800_0000
    with pytest.raises(OutOfGuestMemory):
        alloc.alloc(2 << 20)
    for gpa in (a2, b, big, second):
        alloc.free(gpa)
    assert alloc.free_bytes == total
    with pytest.raises(ValueError):
        alloc.free(a2)


# ---- virtio-net ------------------------------------------------------------------------------------------


class Wire:
    """The other end of the fake NIC: frames the guest sent, and a way to deliver frames to it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def handle(self, dev: FakeMmioDevice, index: int, chain: Chain) -> int:
        assert dev.bus is not None and index == 1  # only the transmitq is consumed on kick
        raw = read_buffers(dev.bus.ram, chain.readable)
        assert raw[:NET_HDR_SIZE] == bytes(NET_HDR_SIZE)
        self.sent.append(raw[NET_HDR_SIZE:])
        return 0

    @staticmethod
    def deliver(dev: FakeMmioDevice, frame: bytes) -> bool:
        rx = dev.queues[0].ring
        assert rx is not None and dev.bus is not None
        chain = rx.pop()
        if chain is None:
            return False
        hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)  # num_buffers = 1
        n = write_buffers(dev.bus.ram, chain.writable, hdr + frame)
        rx.push(chain.head, n)
        if rx.needs_notify():
            dev.interrupt(1)
        return True


@pytest.mark.asyncio
async def test_net_send_and_receive_with_preposted_buffers(bus: FakeBus) -> None:
    wire = Wire()
    cfg = bytearray(0x100)
    cfg[0:6] = bytes.fromhex("52540012345a")
    struct.pack_into("<H", cfg, 6, 1)  # link up
    features = int(Feature.VERSION_1 | (1 << 5) | (1 << 16))
    dev = FakeMmioDevice(1, features, cfg, [64, 64], wire.handle, irq=IRQ2, passive_queues=(0,))
    bus.attach(BASE2, dev)
    net = await VirtioNet.attach(bus, BASE2, IRQ2, GuestPageAllocator(bus.ram), queue_size=64, rx_buffers=8)
    try:
        assert net.mac == bytes.fromhex("52540012345a") and net.link_up
        assert dev.queues[0].ring is not None and dev.queues[0].ring.available() == 8  # pre-posted
        frame = bytes.fromhex("ffffffffffff52540012345a0806") + os.urandom(46)
        await net.send(frame)
        assert wire.sent == [frame]
        incoming = [os.urandom(60 + i) for i in range(20)]  # more than the 8 buffers: they get reposted
        for f in incoming:
            assert Wire.deliver(dev, f)
            assert await net.recv(WAIT) == f
        # With no buffer posted the device has nowhere to put a frame.
        for _ in range(8):
            assert Wire.deliver(dev, b"x" * 60)
        assert not Wire.deliver(dev, b"y" * 60)
        with pytest.raises(GuestTimeout):
            for _ in range(9):
                await net.recv(0.2)
    finally:
        await net.close()


@pytest.mark.asyncio
async def test_attach_device_binds_by_device_id(bus: FakeBus) -> None:
    make_blk(bus)
    blk = await attach_device(bus, BASE, IRQ, GuestPageAllocator(bus.ram))
    try:
        assert isinstance(blk, VirtioBlk) and blk.capacity == 2048
    finally:
        await blk.close()
    bus.attach(BASE2, FakeMmioDevice(4, int(Feature.VERSION_1), bytearray(0x100), [8], irq=IRQ2))  # an rng
    with pytest.raises(GuestDriverError, match="device id 4"):
        await attach_device(bus, BASE2, IRQ2, GuestPageAllocator(bus.ram))
