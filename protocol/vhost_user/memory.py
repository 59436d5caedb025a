"""Back-end view of the front-end's memory: the regions of SET_MEM_TABLE / ADD_MEM_REG, mmap'd.

A region maps ``[guest_phys_addr, +memory_size)`` (guest-physical, what descriptors carry) and
``[userspace_addr, +memory_size)`` (front-end virtual, what SET_VRING_ADDR carries) onto
``[mmap_offset, +memory_size)`` of the region's fd. :class:`GuestMemory` translates both and
hands out ``memoryview`` slices; anything not fully inside one region raises
:class:`~vhost_user.errors.GuestMemoryError` (a ``ValueError`` too, so ring code that expects
``ValueError`` works).
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from collections.abc import Callable
from typing import Protocol

from .errors import GuestMemoryError
from .wire.payloads import MemoryRegion, XenMemoryRegion

__all__ = ["GuestMemory", "MappedRegion", "GuestMemoryError", "RegionBacking", "MmapBacking", "XenMapper"]

log = logging.getLogger("vhost_user.memory")


class RegionBacking(Protocol):
    """Where a region's bytes live. ``slice(offset, length)`` is relative to the region start
    (guest_phys_addr / userspace_addr), already bounds-checked by :class:`GuestMemory`."""

    def slice(self, offset: int, length: int) -> memoryview: ...

    def close(self) -> None: ...


#: Maps a Xen region (XEN_MMAP negotiated) onto memory; takes ownership of ``fd`` (e.g. a
#: /dev/xen/privcmd fd for FOREIGN regions). The library ships none: the caller provides one.
XenMapper = Callable[[XenMemoryRegion, int], RegionBacking]


class MmapBacking:
    """``mmap`` of ``[mmap_offset, +memory_size)`` of an fd (memfd, file, UML physmem). Closes
    the fd after mapping, as libvhost-user does."""

    def __init__(self, region: MemoryRegion | XenMemoryRegion, fd: int) -> None:
        page = mmap.ALLOCATIONGRANULARITY
        aligned = region.mmap_offset - region.mmap_offset % page
        self._skew = region.mmap_offset - aligned
        try:
            self._mmap = mmap.mmap(
                fd, region.memory_size + self._skew, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned
            )
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)

    def slice(self, offset: int, length: int) -> memoryview:
        start = self._skew + offset
        return self._view[start : start + length]

    def close(self) -> None:
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds a memoryview slice; the mapping goes when they drop it.
            log.debug("mapping still has exported views; leaving unmap to GC")


class MappedRegion:
    """One region of the memory table and its backing."""

    def __init__(self, region: MemoryRegion | XenMemoryRegion, backing: RegionBacking) -> None:
        self.guest_phys_addr = region.guest_phys_addr
        self.memory_size = region.memory_size
        self.userspace_addr = region.userspace_addr
        self.mmap_offset = region.mmap_offset
        self.xen_mmap_flags = getattr(region, "xen_mmap_flags", None)
        self.domid = getattr(region, "domid", None)
        self.backing = backing

    def same_as(self, region: MemoryRegion | XenMemoryRegion) -> bool:
        return (
            self.guest_phys_addr == region.guest_phys_addr
            and self.memory_size == region.memory_size
            and self.userspace_addr == region.userspace_addr
        )

    def slice(self, offset: int, length: int) -> memoryview:
        return self.backing.slice(offset, length)

    def close(self) -> None:
        self.backing.close()

    def __repr__(self) -> str:
        return (
            f"MappedRegion(gpa={self.guest_phys_addr:#x}, size={self.memory_size:#x}, "
            f"uva={self.userspace_addr:#x}, offset={self.mmap_offset:#x})"
        )


class GuestMemory:
    """The memory table as the back-end sees it. ``view(addr, length)`` takes guest-physical
    addresses (what virtqueue descriptors hold)."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []

    def __len__(self) -> int:
        return len(self.regions)

    def add(self, region: MemoryRegion | XenMemoryRegion, fd: int) -> MappedRegion:
        """mmap ``fd`` for ``region`` (takes ownership of ``fd``)."""
        return self.add_backing(region, MmapBacking(region, fd))

    def add_backing(self, region: MemoryRegion | XenMemoryRegion, backing: RegionBacking) -> MappedRegion:
        """Add a region whose bytes come from ``backing`` (e.g. a Xen foreign mapping)."""
        mapped = MappedRegion(region, backing)
        keys = [r.guest_phys_addr for r in self.regions]
        self.regions.insert(bisect.bisect(keys, mapped.guest_phys_addr), mapped)
        return mapped

    def remove(self, region: MemoryRegion | XenMemoryRegion) -> bool:
        """Unmap the region matching ``region`` (gpa, size, uva). Returns False if none does."""
        for i, r in enumerate(self.regions):
            if r.same_as(region):
                del self.regions[i]
                r.close()
                return True
        return False

    def clear(self) -> None:
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()

    close = clear

    def _find(self, addr: int, length: int, attr: str, space: str) -> tuple[MappedRegion, int]:
        if length < 0:
            raise GuestMemoryError(addr, length, space)
        for r in self.regions:
            base = getattr(r, attr)
            if base <= addr and addr + length <= base + r.memory_size:
                return r, addr - base
        raise GuestMemoryError(addr, length, space)

    def view(self, addr: int, length: int) -> memoryview:
        """A writable memoryview of guest-physical ``[addr, addr+length)``."""
        if length >= 0:  # (_find and slice inline: once per buffer of every request)
            for r in self.regions:
                base = r.guest_phys_addr
                if base <= addr and addr + length <= base + r.memory_size:
                    return r.backing.slice(addr - base, length)
        raise GuestMemoryError(addr, length, "guest-physical")

    def view_uva(self, uva: int, length: int) -> memoryview:
        """A writable memoryview of front-end user-address ``[uva, uva+length)``."""
        r, off = self._find(uva, length, "userspace_addr", "user")
        return r.slice(off, length)

    def uva_to_gpa(self, uva: int) -> int:
        """Translate a front-end user address (SET_VRING_ADDR) to guest-physical."""
        r, off = self._find(uva, 1, "userspace_addr", "user")
        return r.guest_phys_addr + off

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        self.view(addr, len(data))[:] = data
