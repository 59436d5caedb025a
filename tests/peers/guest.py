"""A tiny "guest" for the front-end peer tests: memfd RAM, split rings, eventfds, virtio-blk/net
requests. Everything here is the test's own driver code, written against the virtio spec
(virtio 1.2 §2.7, §5.1, §5.2), not against any peer."""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from vhost_user.virtqueue import FlatMemory, SplitQueueDriver, split_ring_layout

__all__ = [
    "GuestRam",
    "GuestQueue",
    "guest_ram",
    "wait_eventfd",
    "BLK_T_IN",
    "BLK_T_OUT",
    "BLK_S_OK",
    "NET_HDR_LEN",
]

#: Guest-physical base of the test RAM: non-zero, so a peer mixing up GPA and offset fails.
GPA_BASE: Final = 0x4000_0000
#: Front-end "user address" of the same RAM as announced in the memory table. Deliberately not
#: our real mmap address and not the GPA: ring addresses travel in this space, descriptors in GPA.
UADDR_BASE: Final = 0x7F00_0000_0000
#: How long a peer may take to process a request and signal the call eventfd.
CALL_TIMEOUT: Final = 10.0

BLK_T_IN: Final = 0  # virtio 1.2 §5.2.6
BLK_T_OUT: Final = 1
BLK_S_OK: Final = 0
NET_HDR_LEN: Final = 12  # struct virtio_net_hdr with num_buffers (VERSION_1), §5.1.6


@dataclass
class GuestRam:
    """memfd-backed guest RAM with a bump allocator."""

    fd: int
    size: int
    map: mmap.mmap
    mem: FlatMemory
    gpa: int = GPA_BASE
    uaddr: int = UADDR_BASE
    _next: int = 0
    queues: list[GuestQueue] = field(default_factory=list)

    def alloc(self, length: int, align: int = 64) -> int:
        """Reserve ``length`` bytes; returns their guest-physical address."""
        off = (self._next + align - 1) & ~(align - 1)
        if off + length > self.size:
            raise MemoryError("test guest RAM exhausted")
        self._next = off + length
        return self.gpa + off

    def to_uaddr(self, gpa: int) -> int:
        return gpa - self.gpa + self.uaddr

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.map[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa
        return bytes(self.map[off : off + length])

    def region(self) -> Any:
        """The vhost-user memory-table entry for this RAM (fd: :attr:`fd`)."""
        from vhost_user.wire.payloads import MemoryRegion

        return MemoryRegion(guest_phys_addr=self.gpa, memory_size=self.size, userspace_addr=self.uaddr, mmap_offset=0)

    def queue(self, size: int, event_idx: bool = False, indirect: bool = False) -> GuestQueue:
        _, _, _, total = split_ring_layout(size)
        base = self.alloc(total + 16, align=4096)
        desc, avail, used, _ = split_ring_layout(size, base)
        q = GuestQueue(self, SplitQueueDriver(self.mem, size, desc, avail, used, event_idx=event_idx), desc, avail, used,
                       indirect=indirect)
        self.queues.append(q)
        return q


@dataclass
class GuestQueue:
    """One driver-side split queue plus its kick/call eventfds."""

    ram: GuestRam
    drv: SplitQueueDriver
    desc: int
    avail: int
    used: int
    kick: int = -1
    call: int = -1
    indirect: bool = False  # put each chain in an indirect table (needs RING_INDIRECT_DESC)

    def __post_init__(self) -> None:
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def vring_args(self) -> dict[str, int]:
        """Keyword arguments for ``AsyncFrontend.start_vring`` (addresses in user space)."""
        r = self.ram
        return {"num": self.drv.size, "desc": r.to_uaddr(self.desc), "avail": r.to_uaddr(self.avail),
                "used": r.to_uaddr(self.used), "kick_fd": self.kick, "call_fd": self.call}

    def kick_if_needed(self) -> bool:
        if self.drv.kick_needed():
            os.eventfd_write(self.kick, 1)
            return True
        return False

    async def complete(self, tokens: set[Any], timeout: float = CALL_TIMEOUT) -> dict[Any, int]:
        """Wait (on the call eventfd, bounded) until every token in ``tokens`` is used."""
        done: dict[Any, int] = {}
        async with asyncio.timeout(timeout):
            while True:
                for tok, written in self.drv.get_used():
                    done[tok] = written
                if tokens <= done.keys():
                    return done
                await wait_eventfd(self.call)

    def blk_request(self, req_type: int, sector: int, data_len: int, payload: bytes = b"", token: Any = None) -> dict[str, int]:
        """Queue one virtio-blk request: header (readable), data, status byte (writable)."""
        ram = self.ram
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", req_type, 0, sector))
        data = ram.alloc(data_len, align=512)
        status = ram.alloc(1)
        ram.write(status, b"\xff")
        if req_type == BLK_T_OUT:
            ram.write(data, payload)
            readable, writable = [(hdr, 16), (data, data_len)], [(status, 1)]
        else:
            readable, writable = [(hdr, 16)], [(data, data_len), (status, 1)]
        if self.indirect:
            table = ram.alloc(16 * (len(readable) + len(writable)), align=16)
            self.drv.add_indirect(table, readable=readable, writable=writable, token=token)
        else:
            self.drv.add(readable=readable, writable=writable, token=token)
        return {"hdr": hdr, "data": data, "status": status}

    def close(self) -> None:
        for fd in (self.kick, self.call):
            if fd >= 0:
                os.close(fd)
        self.kick = self.call = -1


@contextmanager
def guest_ram(size: int = 1 << 20) -> Iterator[GuestRam]:
    """memfd RAM shared with the peer via SET_MEM_TABLE; everything closed on exit."""
    fd = os.memfd_create("vhp-guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        ram = GuestRam(fd, size, m, FlatMemory(m, base=GPA_BASE))
        try:
            yield ram
        finally:
            for q in ram.queues:
                q.drv.release()
                q.close()
            ram.mem.release()
            m.close()
    finally:
        os.close(fd)


async def wait_eventfd(fd: int, timeout: float = CALL_TIMEOUT) -> int:
    """Wait until the eventfd is signalled (bounded), consume and return its counter."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return os.eventfd_read(fd)
                except BlockingIOError:
                    await fut
                    fut = loop.create_future()
    finally:
        loop.remove_reader(fd)
