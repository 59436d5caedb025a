"""A tiny test guest for the protocol tests: memfd RAM, one split ring (driver side from
vhost_user.virtqueue), kick/call eventfds, virtio-blk request helpers."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

from vhost_user.virtqueue import FlatMemory, SplitQueueDriver, split_ring_layout
from vhost_user.wire import MemoryRegion

GPA_BASE = 0x4000_0000  # guest-physical base (non-zero: GPA/offset mix-ups fail)
UADDR_BASE = 0x7F00_0000_0000  # front-end "user address" of the same RAM
CALL_TIMEOUT = 5.0  # how long the device may take to signal the call eventfd


class Guest:
    def __init__(self, size: int = 1 << 20, queue_size: int = 16, event_idx: bool = False) -> None:
        self.size = size
        self.fd = os.memfd_create("proto-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.mem = FlatMemory(self.map, base=GPA_BASE)
        self._next = 0
        base = self.alloc(split_ring_layout(queue_size)[3] + 16, align=4096)
        self.desc, self.avail, self.used, _ = split_ring_layout(queue_size, base)
        self.drv = SplitQueueDriver(self.mem, queue_size, self.desc, self.avail, self.used, event_idx=event_idx)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def alloc(self, length: int, align: int = 64) -> int:
        off = (self._next + align - 1) & ~(align - 1)
        assert off + length <= self.size
        self._next = off + length
        return GPA_BASE + off

    def uaddr(self, gpa: int) -> int:
        return gpa - GPA_BASE + UADDR_BASE

    def region(self) -> MemoryRegion:
        return MemoryRegion(guest_phys_addr=GPA_BASE, memory_size=self.size, userspace_addr=UADDR_BASE, mmap_offset=0)

    def vring_args(self) -> dict[str, Any]:
        return {"num": self.drv.size, "desc": self.uaddr(self.desc), "avail": self.uaddr(self.avail),
                "used": self.uaddr(self.used), "kick_fd": self.kick, "call_fd": self.call}

    def write(self, gpa: int, data: bytes) -> None:
        self.map[gpa - GPA_BASE : gpa - GPA_BASE + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.map[gpa - GPA_BASE : gpa - GPA_BASE + n])

    def blk(self, req_type: int, sector: int, length: int, payload: bytes = b"", token: Any = None) -> dict[str, int]:
        hdr = self.alloc(16)
        self.write(hdr, struct.pack("<IIQ", req_type, 0, sector))
        data = self.alloc(max(length, 1), align=512)
        status = self.alloc(1)
        self.write(status, b"\xff")
        if req_type == 1:
            self.write(data, payload)
            self.drv.add(readable=[(hdr, 16), (data, length)], writable=[(status, 1)], token=token)
        elif length:
            self.drv.add(readable=[(hdr, 16)], writable=[(data, length), (status, 1)], token=token)
        else:
            self.drv.add(readable=[(hdr, 16)], writable=[(status, 1)], token=token)
        return {"hdr": hdr, "data": data, "status": status}

    def notify(self) -> None:
        if self.drv.kick_needed():
            os.eventfd_write(self.kick, 1)

    async def complete(self, tokens: set[Any]) -> dict[Any, int]:
        done: dict[Any, int] = {}
        async with asyncio.timeout(CALL_TIMEOUT):
            while True:
                for tok, n in self.drv.get_used():
                    done[tok] = n
                if tokens <= done.keys():
                    return done
                await wait_eventfd(self.call)

    def close(self) -> None:
        self.drv.release()
        self.mem.release()
        self.map.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)


@contextlib.contextmanager
def guest(**kw: Any) -> Iterator[Guest]:
    g = Guest(**kw)
    try:
        yield g
    finally:
        g.close()


async def wait_eventfd(fd: int) -> int:
    """Wait (bounded by the caller) until ``fd`` is signalled; consume its counter."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(fd)
