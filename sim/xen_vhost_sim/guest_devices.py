"""Device drivers of the simulated guest on top of :class:`VirtioMmioDriver`: virtio-blk and virtio-net.

Request layouts follow virtio 1.2 §5.2 (block: ``struct virtio_blk_req`` = header, data, status) and
§5.1 (network: ``struct virtio_net_hdr`` of 12 bytes with VERSION_1, receiveq 0 / transmitq 1).
End-to-end tests drive real vhost-user back-ends (qemu-storage-daemon, testpmd) through these.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from xen_vhost_sim.guest_api import GuestBus
from xen_vhost_sim.guest_driver import (
    PAGE_SIZE,
    Feature,
    GuestDriverError,
    GuestPageAllocator,
    GuestTimeout,
    VirtioMmioDriver,
)

__all__ = [
    "VIRTIO_ID_NET",
    "VIRTIO_ID_BLOCK",
    "SECTOR_SIZE",
    "BlkFeature",
    "BlkRequestType",
    "BlkStatus",
    "BlkIoError",
    "BlkOp",
    "VirtioBlk",
    "NetFeature",
    "NET_HDR_SIZE",
    "VirtioNet",
    "attach_device",
]

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512  # virtio-blk sectors are always 512 bytes (§5.2.6)


class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits (§5.2.3)."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12


class BlkRequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


# struct virtio_blk_req header: le32 type, le32 reserved, le64 sector (§5.2.6).
_BLK_HDR = struct.Struct("<IIQ")
# virtio_blk_config offsets (§5.2.4): capacity le64 @0, size_max le32 @8, seg_max le32 @12,
# geometry @16 (cylinders le16, heads u8, sectors u8), blk_size le32 @20.
_CFG_CAPACITY, _CFG_SIZE_MAX, _CFG_SEG_MAX, _CFG_BLK_SIZE = 0, 8, 12, 20
BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES


class BlkIoError(GuestDriverError):
    """The device completed a request with a status other than OK."""

    def __init__(self, op: str, status: int) -> None:
        super().__init__(f"virtio-blk {op} failed with status {status}")
        self.status = status


@dataclass(frozen=True)
class BlkOp:
    """One request of a batch: ``read`` (``count`` sectors) or ``write`` (``data``) at ``sector``."""

    kind: str  # "read" | "write" | "flush"
    sector: int = 0
    count: int = 0
    data: bytes = b""


class VirtioBlk:
    """A virtio-blk disk as a guest sees it: ``read``, ``write``, ``flush``, batches for queue depth > 1."""

    DEFAULT_FEATURES = Feature.VERSION_1 | BlkFeature.FLUSH | BlkFeature.BLK_SIZE | BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.RO

    def __init__(self, driver: VirtioMmioDriver) -> None:
        self.driver = driver
        self.capacity = 0  # sectors
        self.blk_size = SECTOR_SIZE
        self.size_max = 0  # 0: no per-segment limit
        self.seg_max = 0

    @classmethod
    async def attach(
        cls, bus: GuestBus, base: int, irq: int, allocator: GuestPageAllocator, *,
        features: int = DEFAULT_FEATURES, queue_size: int = 128, **driver_kw: object,
    ) -> VirtioBlk:
        driver = VirtioMmioDriver(bus, base, irq, allocator, **driver_kw)  # type: ignore[arg-type]
        return await cls.bring_up(driver, features=features, queue_size=queue_size)

    @classmethod
    async def bring_up(cls, driver: VirtioMmioDriver, *, features: int = DEFAULT_FEATURES,
                       queue_size: int = 128) -> VirtioBlk:
        """Probe, negotiate, read the config, set up the request queue, DRIVER_OK: on any transport's driver."""
        if await driver.probe() != VIRTIO_ID_BLOCK:
            raise GuestDriverError(f"device {driver.where} is id {driver.device_id}, not a block device")
        blk = cls(driver)
        await driver.negotiate(features)
        await blk.refresh_config()
        await driver.setup_queues([queue_size])
        await driver.driver_ok()
        return blk

    @property
    def read_only(self) -> bool:
        return self.driver.has(BlkFeature.RO)

    async def refresh_config(self) -> None:
        fields = [(_CFG_CAPACITY, 8), (_CFG_SIZE_MAX, 4), (_CFG_SEG_MAX, 4), (_CFG_BLK_SIZE, 4)]
        capacity, size_max, seg_max, blk_size = await self.driver.config_read(fields)
        self.capacity = capacity
        self.size_max = size_max if self.driver.has(BlkFeature.SIZE_MAX) else 0
        self.seg_max = seg_max if self.driver.has(BlkFeature.SEG_MAX) else 0
        self.blk_size = blk_size if self.driver.has(BlkFeature.BLK_SIZE) and blk_size else SECTOR_SIZE

    def _segments(self, gpa: int, length: int) -> list[tuple[int, int]]:
        step = self.size_max or length
        return [(gpa + off, min(step, length - off)) for off in range(0, length, step)]

    def _free_when_done(self, gpa: int, _fut: asyncio.Future[int]) -> None:
        self.driver.allocator.free(gpa)

    async def _post(self, op: BlkOp, kick: bool) -> tuple[asyncio.Future[int], int, int]:
        """Build and post one request; returns (future, buffer gpa, data length)."""
        if op.kind == "read":
            rtype, length = BlkRequestType.IN, op.count * SECTOR_SIZE
        elif op.kind == "write":
            if self.read_only:
                raise GuestDriverError("write to a read-only virtio-blk device")
            rtype, length = BlkRequestType.OUT, len(op.data)
            if length % SECTOR_SIZE:
                raise ValueError("write length must be a multiple of 512")
        elif op.kind == "flush":
            rtype, length = BlkRequestType.FLUSH, 0
        elif op.kind == "get_id":
            rtype, length = BlkRequestType.GET_ID, BLK_ID_BYTES
        else:
            raise ValueError(f"unknown block op {op.kind!r}")
        if op.kind in ("read", "write") and (length == 0 or op.sector + length // SECTOR_SIZE > self.capacity):
            raise ValueError(f"{op.kind} of {length} bytes at sector {op.sector} outside capacity {self.capacity}")
        # One allocation: header @0, status @16, data from the next page.
        gpa = self.driver.allocator.alloc(PAGE_SIZE + max(length, 1))
        ram = self.driver.bus.ram
        with ram.view(gpa, _BLK_HDR.size) as hdr:
            _BLK_HDR.pack_into(hdr, 0, rtype, 0, op.sector)
        with ram.view(gpa + 16, 1) as st:
            st[0] = 0xFF  # so a device that never writes the status is noticed
        data_gpa = gpa + PAGE_SIZE
        if op.kind == "write":
            with ram.view(data_gpa, length) as mv:
                mv[:] = op.data
        segments = self._segments(data_gpa, length) if length else []
        readable = [(gpa, _BLK_HDR.size)] + (segments if op.kind == "write" else [])
        writable = (segments if op.kind in ("read", "get_id") else []) + [(gpa + 16, 1)]
        submitted = False
        try:
            fut = await self.driver.submit(0, readable, writable, kick=kick)
            submitted = True
        finally:
            if not submitted:  # the device never saw these pages
                self.driver.allocator.free(gpa)
        return fut, gpa, length

    async def _finish(self, op: BlkOp, fut: asyncio.Future[int], gpa: int, length: int) -> bytes | None:
        try:
            await self.driver.wait(fut)
            ram = self.driver.bus.ram
            with ram.view(gpa + 16, 1) as st:
                status = st[0]
            if status != BlkStatus.OK:
                raise BlkIoError(op.kind, status)
            if op.kind in ("read", "get_id"):
                with ram.view(gpa + PAGE_SIZE, length) as mv:
                    return bytes(mv)
            return None
        finally:
            if fut.done():
                self.driver.allocator.free(gpa)
            else:  # timed out: the device still owns the buffers; free them once it gives them back
                fut.add_done_callback(lambda _f: self.driver.allocator.free(gpa))

    async def batch(self, ops: Sequence[BlkOp]) -> list[bytes | None]:
        """Post every request, notify once, then wait for all: queue depth = ``len(ops)``."""
        posted = []
        kicked = False
        try:
            for op in ops:
                posted.append((op, *await self._post(op, kick=False)))
            await self.driver.kick(0)
            kicked = True
        finally:
            if not kicked:
                for _op, fut, gpa, _length in posted:
                    # Posted chains stay in the ring until the device returns them; keep their memory.
                    fut.add_done_callback(functools.partial(self._free_when_done, gpa))
        results: list[bytes | None] = []
        errors: list[BaseException] = []
        for op, fut, gpa, length in posted:
            try:
                results.append(await self._finish(op, fut, gpa, length))
            except (GuestDriverError, asyncio.CancelledError) as exc:
                errors.append(exc)
                results.append(None)
        if errors:
            raise errors[0]
        return results

    async def read(self, sector: int, count: int) -> bytes:
        (data,) = await self.batch([BlkOp("read", sector, count)])
        assert data is not None
        return data

    async def write(self, sector: int, data: bytes) -> None:
        await self.batch([BlkOp("write", sector, data=bytes(data))])

    async def flush(self) -> None:
        if not self.driver.has(BlkFeature.FLUSH):
            return  # no volatile write cache to flush
        await self.batch([BlkOp("flush")])

    async def get_id(self) -> bytes:
        (raw,) = await self.batch([BlkOp("get_id")])
        assert raw is not None
        return raw.split(b"\0", 1)[0]

    async def close(self) -> None:
        await self.driver.close()


# ---- virtio-net -------------------------------------------------------------------------------------


class NetFeature(enum.IntFlag):
    """virtio-net feature bits (§5.1.3)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MTU = 1 << 3
    MAC = 1 << 5
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    MQ = 1 << 22


NET_HDR_SIZE = 12  # struct virtio_net_hdr with num_buffers: always this size with VERSION_1
NET_RX_QUEUE, NET_TX_QUEUE = 0, 1
_NET_CFG_MAC, _NET_CFG_STATUS = 0, 6
NET_LINK_UP = 1  # VIRTIO_NET_S_LINK_UP
NET_BUFFER_SIZE = 2048  # header + a 1514-byte frame, with room


class VirtioNet:
    """A virtio-net NIC: :meth:`send` a frame on the transmitq, :meth:`recv` from pre-posted rx buffers."""

    DEFAULT_FEATURES = Feature.VERSION_1 | NetFeature.MAC | NetFeature.STATUS

    def __init__(self, driver: VirtioMmioDriver, buffer_size: int = NET_BUFFER_SIZE, rx_poison: int | None = None) -> None:
        self.driver = driver
        self.buffer_size = buffer_size
        self.rx_poison = rx_poison  # each rx buffer is filled with this byte before it is posted
        self.mac = b""
        self.link_up = True
        self._rx_region = 0
        self._rx_done: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()
        self._rx_ready = asyncio.Event()  # set while _rx_done holds a completed buffer
        self.sent = 0
        self.received = 0

    @classmethod
    async def attach(
        cls, bus: GuestBus, base: int, irq: int, allocator: GuestPageAllocator, *,
        features: int = DEFAULT_FEATURES, queue_size: int = 256, rx_buffers: int | None = None,
        rx_poison: int | None = None, **driver_kw: object,
    ) -> VirtioNet:
        """Bring the NIC up; ``rx_poison``: a byte every rx buffer is filled with before it is
        posted (a completion that did not write the frame then shows as poison, not as an old frame)."""
        driver = VirtioMmioDriver(bus, base, irq, allocator, **driver_kw)  # type: ignore[arg-type]
        return await cls.bring_up(driver, features=features, queue_size=queue_size, rx_buffers=rx_buffers,
                                  rx_poison=rx_poison)

    @classmethod
    async def bring_up(cls, driver: VirtioMmioDriver, *, features: int = DEFAULT_FEATURES, queue_size: int = 256,
                       rx_buffers: int | None = None, rx_poison: int | None = None) -> VirtioNet:
        """Probe, negotiate, read the config, set up receiveq and transmitq, DRIVER_OK, post receive
        buffers: on any transport's driver."""
        if await driver.probe() != VIRTIO_ID_NET:
            raise GuestDriverError(f"device {driver.where} is id {driver.device_id}, not a network device")
        net = cls(driver, rx_poison=rx_poison)
        await driver.negotiate(features)
        await net.refresh_config()
        assert (NET_RX_QUEUE, NET_TX_QUEUE) == (0, 1)
        rxq, _txq = await driver.setup_queues([queue_size, queue_size])
        await driver.driver_ok()
        count = min(rx_buffers or rxq.size, rxq.size)
        net._rx_region = driver.allocator.alloc(count * net.buffer_size)
        for i in range(count):
            await net._post_rx(net._rx_region + i * net.buffer_size, kick=False)
        await driver.kick(NET_RX_QUEUE)
        return net

    async def refresh_config(self) -> None:
        if self.driver.has(NetFeature.MAC):
            self.mac = await self.driver.config_bytes(_NET_CFG_MAC, 6)
        if self.driver.has(NetFeature.STATUS):
            (status,) = await self.driver.config_read([(_NET_CFG_STATUS, 2)])
            self.link_up = bool(status & NET_LINK_UP)

    async def _post_rx(self, gpa: int, *, kick: bool = True) -> None:
        if self.rx_poison is not None:
            with self.driver.bus.ram.view(gpa, self.buffer_size) as mv:
                mv[:] = bytes([self.rx_poison]) * self.buffer_size
        fut = await self.driver.submit(NET_RX_QUEUE, writable=[(gpa, self.buffer_size)], kick=kick)
        fut.add_done_callback(lambda f: self._rx_completed(gpa, f))

    def _rx_completed(self, gpa: int, fut: asyncio.Future[int]) -> None:
        self._rx_done.put_nowait((gpa, fut))
        self._rx_ready.set()

    async def wait_received(self) -> None:
        """Until a frame is there for :meth:`recv` (which then does not wait for one); taking
        nothing, so cancelling this loses nothing (cancelling :meth:`recv` may lose its frame)."""
        await self._rx_ready.wait()

    async def post(self, frame: bytes, *, kick: bool = True) -> asyncio.Future[int]:
        """Put one Ethernet frame (a zeroed header: no offloads) on the transmitq without waiting:
        the future resolves when the device has taken it (the TX completion). With ``kick=False``
        several frames go out with one :meth:`kick`."""
        if len(frame) + NET_HDR_SIZE > self.buffer_size:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the buffer")
        gpa = self.driver.allocator.alloc(NET_HDR_SIZE + len(frame))
        fut: asyncio.Future[int] | None = None
        try:
            with self.driver.bus.ram.view(gpa, NET_HDR_SIZE + len(frame)) as mv:
                mv[:NET_HDR_SIZE] = bytes(NET_HDR_SIZE)
                mv[NET_HDR_SIZE:] = frame
            fut = await self.driver.submit(NET_TX_QUEUE, readable=[(gpa, NET_HDR_SIZE + len(frame))], kick=kick)
        finally:
            if fut is None:
                self.driver.allocator.free(gpa)
            else:  # the device owns the buffer until it completes (or the queue is failed)
                fut.add_done_callback(lambda _f: self.driver.allocator.free(gpa))
        return fut

    async def kick(self) -> None:
        """Notify the transmitq (after frames posted with ``kick=False``)."""
        await self.driver.kick(NET_TX_QUEUE)

    async def send(self, frame: bytes) -> None:
        """Transmit one Ethernet frame (a zeroed header: no offloads) and wait until the device took it."""
        fut = await self.post(frame)
        await self.driver.wait(fut)
        self.sent += 1

    async def recv_ready(self) -> list[bytes]:
        """The frames already received (their rx buffers completed), without waiting; each buffer
        is posted again. What a driver's NAPI poll takes before the driver is removed."""
        frames = []
        while not self._rx_done.empty():
            frames.append(await self.recv())
        return frames

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next received frame (without its virtio-net header); the buffer is posted again."""
        try:
            async with asyncio.timeout(self.driver.mmio_timeout if timeout is None else timeout):
                gpa, fut = await self._rx_done.get()
            if self._rx_done.empty():
                self._rx_ready.clear()
        except TimeoutError:
            raise GuestTimeout("no frame received in time") from None
        written = fut.result()  # raises the driver error if the queue was failed
        if not NET_HDR_SIZE <= written <= self.buffer_size:
            raise GuestDriverError(f"device wrote {written} bytes into a {self.buffer_size}-byte rx buffer")
        with self.driver.bus.ram.view(gpa + NET_HDR_SIZE, written - NET_HDR_SIZE) as mv:
            frame = bytes(mv)
        await self._post_rx(gpa)
        self.received += 1
        return frame

    async def close(self) -> None:
        try:
            await self.driver.close()
        finally:
            if self._rx_region:
                self.driver.allocator.free(self._rx_region)
                self._rx_region = 0


async def attach_device(
    bus: GuestBus, base: int, irq: int, allocator: GuestPageAllocator, **kw: object
) -> VirtioBlk | VirtioNet:
    """Probe the window at ``base`` and bring up the matching helper (as a guest kernel binds a driver
    by DeviceID). GuestDriverError for a device type without a helper; NoDevice for an empty window."""
    probe = VirtioMmioDriver(bus, base, irq, allocator)
    device_id = await probe.probe()
    if device_id == VIRTIO_ID_BLOCK:
        return await VirtioBlk.attach(bus, base, irq, allocator, **kw)  # type: ignore[arg-type]
    if device_id == VIRTIO_ID_NET:
        return await VirtioNet.attach(bus, base, irq, allocator, **kw)  # type: ignore[arg-type]
    raise GuestDriverError(f"no simulated guest driver for virtio device id {device_id} at {base:#x}")
