"""The shadow data path's own memory: one memfd the back-end maps as its only region.

Layout (offsets in the memfd; the back-end sees its region at :data:`SHADOW_BASE`, both as
guest-physical and as user address)::

    [0, ring_area)                one fixed slot per queue index: split ring desc/avail/used
    [ring_area, size)             bounce pool, page granular (:class:`PagePool`)
    [size, file_size)             one head map per queue index (:meth:`ShadowMemory.head_map`),
                                  after the back-end's region: the daemon's alone

A head map says, for each shadow descriptor heading a published chain, which guest chain it
carries (u16 guest head per shadow descriptor, after a 16-byte header whose first u16 is the
shadow used index minus the guest's used index of the ring laid out last; little-endian): what a
next process of the daemon, handed this memfd, needs to give the guest what the back-end
completed into it (what it reads back is still checked against both rings before use).

:class:`PagePool` is a first-fit allocator over a one-byte-per-page bitmap (a ``bytearray``):
finding a run of ``k`` free pages is one ``bytearray.find`` (C, no per-page Python work), freeing
is one slice assignment. First fit keeps reusing the lowest pages, so the memfd pages ever touched
(resident, counted in the daemon's RSS) stay those of the peak in-flight bytes, not the whole
pool. Requests never allocate memory: the pool is fixed when the data path is
built (bounded, configurable) and allocation failure is the back-pressure signal.
"""

from __future__ import annotations

import mmap
import os
from typing import Final

from vhost_user import GuestMemoryError, MemoryRegion
from vhost_user.virtqueue import split_ring_layout

__all__ = ["HEAD_MAP_HEADER", "PAGE", "SHADOW_BASE", "PagePool", "ShadowMemory"]

PAGE: Final = 4096
#: Where the back-end sees the shadow memfd. Far above any guest RAM bank, so a guest address
#: that leaked into a shadow descriptor would be refused by the back-end, not silently used.
SHADOW_BASE: Final = 1 << 40
HEAD_MAP_HEADER: Final = 16  # bytes before a head map's entries


def _pages(nbytes: int) -> int:
    return (nbytes + PAGE - 1) // PAGE


class PagePool:
    """Page-granular allocator over ``[offset, offset + pages*PAGE)`` of the memfd."""

    def __init__(self, offset: int, pages: int) -> None:
        if pages <= 0:
            raise ValueError("the bounce pool needs at least one page")
        self.offset = offset
        self.pages = pages
        self._map = bytearray(pages)  # 0 free, 1 used
        self._ones = memoryview(b"\x01" * pages)
        self._zeros = memoryview(bytes(pages))
        self._needle: dict[int, bytes] = {}
        self.used_pages = 0

    @property
    def capacity(self) -> int:
        return self.pages * PAGE

    @property
    def free_bytes(self) -> int:
        return (self.pages - self.used_pages) * PAGE

    def alloc(self, nbytes: int) -> int | None:
        """Memfd offset of ``nbytes`` (rounded up to pages) of contiguous pool, or None if full."""
        k = (nbytes + PAGE - 1) // PAGE or 1  # _pages(max(nbytes, 1)), once per chain
        if k > self.pages - self.used_pages:
            return None
        needle = self._needle.get(k)
        if needle is None:
            needle = self._needle[k] = bytes(k)
        i = self._map.find(needle)
        if i < 0:
            return None
        self._map[i : i + k] = self._ones[:k]
        self.used_pages += k
        return self.offset + i * PAGE

    def free(self, offset: int, nbytes: int) -> None:
        k = (nbytes + PAGE - 1) // PAGE or 1
        i = (offset - self.offset) // PAGE
        if not (0 <= i and i + k <= self.pages) or (offset - self.offset) % PAGE:
            raise ValueError(f"free of [{offset:#x}, +{nbytes:#x}) outside the pool")
        if self._map.count(1, i, i + k) != k:
            raise ValueError(f"double free in the pool at {offset:#x}")
        self._map[i : i + k] = self._zeros[:k]
        self.used_pages -= k

    def free_many(self, extents: list[tuple[int, int]]) -> None:
        """:meth:`free` each ``(offset, nbytes)`` in turn (checked as it does), in one call."""
        pool_map, zeros, start, pages = self._map, self._zeros, self.offset, self.pages
        for offset, nbytes in extents:
            k = (nbytes + PAGE - 1) // PAGE or 1
            i = (offset - start) // PAGE
            if not (0 <= i and i + k <= pages) or (offset - start) % PAGE:
                raise ValueError(f"free of [{offset:#x}, +{nbytes:#x}) outside the pool")
            if pool_map.count(1, i, i + k) != k:
                raise ValueError(f"double free in the pool at {offset:#x}")
            pool_map[i : i + k] = zeros[:k]
            self.used_pages -= k


class ShadowMemory:
    """The memfd, its mapping, the ring slots and the bounce pool.

    ``view(addr, length)`` takes back-end addresses (``SHADOW_BASE + offset``): the
    :class:`vhost_user.virtqueue.SplitQueueDriver` of each shadow ring works over it.
    """

    def __init__(self, *, pool_size: int, max_queues: int, max_queue_size: int, base: int = SHADOW_BASE,
                 fd: int | None = None) -> None:
        """``fd``: a memfd of this shape a back-end already maps (kept from a previous process of
        the daemon): taken (closed with this object, or at once if it does not fit: ValueError)."""
        if max_queues <= 0:
            raise ValueError("max_queues must be positive")
        self.base = base
        self.slot_size = _pages(split_ring_layout(max_queue_size)[3]) * PAGE  # validates the size
        self.max_queues = max_queues
        self.max_queue_size = max_queue_size
        ring_area = self.slot_size * max_queues
        self.size = ring_area + _pages(pool_size) * PAGE  # the back-end's region
        self.pool = PagePool(ring_area, _pages(pool_size))
        self.map_stride = HEAD_MAP_HEADER + 2 * max_queue_size
        self.file_size = self.size + _pages(self.map_stride * max_queues) * PAGE
        if fd is not None:
            try:
                have = os.fstat(fd).st_size
                if have == self.size:  # an earlier daemon's, without head maps: they read as zero
                    os.ftruncate(fd, self.file_size)
            except OSError:
                os.close(fd)
                raise
            if have not in (self.size, self.file_size):
                os.close(fd)
                raise ValueError(f"the kept shadow memory holds {have} bytes, this device's takes {self.file_size}")
        self.fd = fd if fd is not None else os.memfd_create("xen-vhost-shadow", os.MFD_CLOEXEC)
        mapped = False
        try:
            if fd is None:
                os.ftruncate(self.fd, self.file_size)
            self._mmap = mmap.mmap(self.fd, self.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mapped = True
        finally:
            if not mapped:
                os.close(self.fd)
        self.mv = memoryview(self._mmap)

    def ring_slot(self, index: int) -> int:
        """Back-end address of queue ``index``'s ring slot."""
        if not 0 <= index < self.max_queues:
            raise IndexError(f"queue {index}: the shadow memory has {self.max_queues} ring slots")
        return self.base + index * self.slot_size

    def head_map(self, index: int) -> int:
        """Memfd offset of queue ``index``'s head map (its header; entry ``k`` at ``+16 + 2k``)."""
        if not 0 <= index < self.max_queues:
            raise IndexError(f"queue {index}: the shadow memory has {self.max_queues} head maps")
        return self.size + index * self.map_stride

    def view(self, addr: int, length: int) -> memoryview:
        """Back-end addresses: its region only (never the head maps after it)."""
        off = addr - self.base
        if length < 0 or off < 0 or off + length > self.size:
            raise GuestMemoryError(addr, length, "shadow")
        return self.mv[off : off + length]

    def region(self) -> MemoryRegion:
        return MemoryRegion(guest_phys_addr=self.base, memory_size=self.size, userspace_addr=self.base, mmap_offset=0)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.mv.release()
        try:
            self._mmap.close()
        except BufferError:  # a ring view not released yet: the mapping goes with it
            pass
        os.close(self.fd)
        self.fd = -1
