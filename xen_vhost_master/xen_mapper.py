"""The back-end side of XEN_MMAP: map a Xen memory region the front-end described.

A vhost-user back-end written with ``vhost_user`` (our Python devices) sets
``device.xen_mapper = XenRegionMapper(kernel)``; each region of SET_MEM_TABLE then arrives with an
fd of the front-end's and is mapped here, as rust-vmm's vm-memory ``xen`` feature
(``mmap/xen.rs``: MmapXenForeign, MmapXenGrant, MmapXenUnix) does:

* FOREIGN (0x1): the fd is /dev/xen/privcmd; the guest's range ``[guest_phys_addr, +size)`` of
  ``domid`` is mapped once with MMAPBATCH_V2. Frames Xen refuses to map (holes, ballooned-out
  pages) are inaccessible: touching them would fault the process, so
  :meth:`ForeignBacking.slice` refuses any range that covers one.
* GRANT (0x2): the fd is /dev/xen/gntdev and the region lies in grant DMA space
  (``(1 << 63) | (ref << 12)``). Mapped in advance (the rings): MAP_GRANT_REF of the consecutive
  refs from ``(guest_phys_addr & ~(1 << 63)) >> 12`` covering the region, then mmap of the gntdev
  fd at the returned index (:class:`GrantBacking`). With the "no advance map" flag (the rest of
  grant space, i.e. the data buffers): nothing is mapped up front; each access maps the refs it
  covers and the mapping goes once the access's view is dropped (:class:`OnDemandGrantBacking`,
  over :class:`~xen_vhost_master.grant_memory.GrantGuestMemory`). A read-only grant is mapped
  read-only and its views are read-only memoryviews: a write attempt is a Python error, never a
  fault (the device refuses that request: :func:`xen_vhost_master.xen_blk_backend.refuse_read_only_writes`).
* 0 (UNIX): a plain shareable fd (e.g. a front-end's shadow memfd), mmap'd as without XEN_MMAP.

The "no advance map" bit differs between the spec (bit 8, 0x100) and rust-vmm (0x8, what existing
Xen back-ends put on the wire); the mapper takes the value as a setting (default 0x8), exactly
like the front-end does, and refuses a region carrying the other one.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from typing import Final

from vhost_user import GuestMemoryError, XenMemoryRegion, XenMmapFlags
from vhost_user.memory import MmapBacking

from .errors import XenError
from .grant_memory import GRANT_ADDR_BIT, GrantGuestMemory
from .xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from .xen.gntdev import GrantDev, GrantMapping
from .xen.kernel import Kernel
from .xen.privcmd import ForeignMapping, PrivCmd

__all__ = [
    "DEFAULT_NO_ADVANCE",
    "ON_DEMAND_IDLE",
    "ON_DEMAND_MAX_PAGES",
    "ForeignBacking",
    "GrantBacking",
    "OnDemandGrantBacking",
    "XenRegionMapper",
    "no_advance_flag",
]

log = logging.getLogger(__name__)

#: rust-vmm vm-memory ``MmapXenFlags::NO_ADVANCE_MAP``: what existing Xen back-ends expect (docs/vhost-user-wire.md §3).
DEFAULT_NO_ADVANCE: Final = XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM
_NO_ADVANCE_VALUES: Final = {
    "rust-vmm": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM, "0x8": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM,
    "8": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM,
    "spec": XenMmapFlags.NO_ADVANCE_MAP_SPEC, "0x100": XenMmapFlags.NO_ADVANCE_MAP_SPEC,
    "256": XenMmapFlags.NO_ADVANCE_MAP_SPEC,
}
#: Pages one on-demand region keeps mapped at most (a single access may not be longer).
ON_DEMAND_MAX_PAGES: Final = 1024
#: Idle mappings an on-demand region keeps between :meth:`OnDemandGrantBacking.release` calls
#: (the same buffer is typically touched two or three times per request: validated, read/written).
ON_DEMAND_IDLE: Final = 8
_KNOWN: Final = XenMmapFlags.FOREIGN | XenMmapFlags.GRANT


def no_advance_flag(text: str | int) -> XenMmapFlags:
    """``rust-vmm`` / ``0x8`` or ``spec`` / ``0x100`` → the "no advance map" flag value."""
    key = str(text).strip().lower() if not isinstance(text, int) else str(text)
    flag = _NO_ADVANCE_VALUES.get(key)
    if flag is None:
        raise ValueError(f"no-advance flag {text!r}: use rust-vmm (0x8) or spec (0x100)")
    return flag


class ForeignBacking:
    """A FOREIGN region mapped through privcmd; owns the privcmd fd it was given."""

    def __init__(self, kernel: Kernel, region: XenMemoryRegion, fd: int) -> None:
        self._privcmd = PrivCmd(kernel, fd=fd)
        mapped = False
        try:
            if region.guest_phys_addr % XEN_PAGE_SIZE or region.memory_size % XEN_PAGE_SIZE or not region.memory_size:
                raise GuestMemoryError(region.guest_phys_addr, region.memory_size, "Xen region (not page aligned)")
            self._fm: ForeignMapping = self._privcmd.map_foreign_range(
                region.domid, region.guest_phys_addr >> XEN_PAGE_SHIFT, region.memory_size >> XEN_PAGE_SHIFT
            )
            mapped = True
        except XenError as e:
            log.error("cannot map domain %d at %#x: %s", region.domid, region.guest_phys_addr, e)
            raise GuestMemoryError(region.guest_phys_addr, region.memory_size, f"domain {region.domid} ({e.strerror})") from None
        finally:
            if not mapped:
                self._privcmd.close()  # we own the fd, mapped or not
        self._bad = self._fm.failed()  # sorted frame indices
        if self._bad:
            log.warning("domain %d: %d of %d frames at %#x could not be mapped; they are refused",
                        region.domid, len(self._bad), self._fm.num, region.guest_phys_addr)
        self._view = self._fm.view()

    def slice(self, offset: int, length: int) -> memoryview:
        if self._bad:
            first, last = offset >> XEN_PAGE_SHIFT, (offset + max(length, 1) - 1) >> XEN_PAGE_SHIFT
            i = bisect.bisect_left(self._bad, first)
            if i < len(self._bad) and self._bad[i] <= last:
                raise GuestMemoryError(offset, length, "region offset (a frame Xen did not map)")
        return self._view[offset : offset + length]

    def close(self) -> None:
        self._view.release()
        self._fm.close()
        self._privcmd.close()


def _grant_span(region: XenMemoryRegion) -> tuple[int, int, int]:
    """(first ref, page count, offset in the first page) of a region of grant space."""
    addr, size = region.guest_phys_addr, region.memory_size
    if not addr & GRANT_ADDR_BIT or not size or addr + size > (1 << 64):
        raise GuestMemoryError(addr, size, "GRANT region (not in grant DMA space)")
    off = addr & ~GRANT_ADDR_BIT
    first, page_off = off >> XEN_PAGE_SHIFT, off & (XEN_PAGE_SIZE - 1)
    count = (page_off + size + XEN_PAGE_SIZE - 1) >> XEN_PAGE_SHIFT
    if first + count - 1 > 0xFFFF_FFFF:
        raise GuestMemoryError(addr, size, "GRANT region (references beyond u32)")
    return first, count, page_off


class GrantBacking:
    """A GRANT region mapped in advance (a ring): its consecutive refs through gntdev, for the
    region's lifetime. Owns the gntdev fd. A read-only grant among them is mapped read-only (the
    ring code then refuses the ring: its views must be writable)."""

    def __init__(self, kernel: Kernel, region: XenMemoryRegion, fd: int) -> None:
        self._gntdev = GrantDev(kernel, fd=fd)
        mapped = False
        try:
            first, count, self._skew = _grant_span(region)
            refs = list(range(first, first + count))
            try:
                try:
                    self._gm: GrantMapping = self._gntdev.map_grant_refs(region.domid, refs, writable=True)
                    self.readonly = False
                except XenError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: a read-only grant asked for writable
                        raise
                    self._gm = self._gntdev.map_grant_refs(region.domid, refs, writable=False)
                    self.readonly = True
            except XenError as e:
                log.error("domain %d: cannot map grant refs %d..%d: %s", region.domid, first, first + count - 1, e)
                raise GuestMemoryError(region.guest_phys_addr, region.memory_size,
                                       f"grant refs {first}..{first + count - 1} of domain {region.domid} ({e.strerror})") from None
            mapped = True
        finally:
            if not mapped:
                self._gntdev.close()
        self._view = self._gm.view()
        self.size = region.memory_size

    def slice(self, offset: int, length: int) -> memoryview:
        start = self._skew + offset
        return self._view[start : start + length]

    def close(self) -> None:
        self._view.release()
        try:
            self._gntdev.unmap(self._gm)
        except XenError as e:  # the kernel frees the grant handles with the fd anyway
            log.warning("unmapping grant refs at index %#x: %s", self._gm.index, e)
        finally:
            self._gntdev.close()


class OnDemandGrantBacking:
    """A GRANT region that cannot be mapped in advance (the data buffers' grant space): each
    access maps the refs it covers through gntdev (an access inside a mapping still held reuses
    it). Mappings whose views are all dropped are unmapped by :meth:`release` (a device calls it
    once a request is done: :func:`~xen_vhost_master.xen_blk_backend.refuse_read_only_writes`
    does) and, for devices that never do, beyond :data:`ON_DEMAND_IDLE` idle ones at the next
    access. Read-only grants give read-only views. Owns the gntdev fd."""

    def __init__(self, kernel: Kernel, region: XenMemoryRegion, fd: int, *, max_pages: int = ON_DEMAND_MAX_PAGES) -> None:
        gntdev = GrantDev(kernel, fd=fd)
        try:
            _grant_span(region)
            self.memory = GrantGuestMemory(gntdev, region.domid, max_pages=max_pages, own_gntdev=True)
        except GuestMemoryError:
            gntdev.close()
            raise
        self.base = region.guest_phys_addr

    def slice(self, offset: int, length: int) -> memoryview:
        if self.memory.mappings > ON_DEMAND_IDLE:
            self.memory.trim(keep=ON_DEMAND_IDLE)  # what earlier accesses no longer view
        return self.memory.view(self.base + offset, length)

    def release(self) -> int:
        """Unmap every mapping no view holds; returns how many."""
        return self.memory.trim()

    def close(self) -> None:
        self.memory.close()


XenBacking = ForeignBacking | GrantBacking | OnDemandGrantBacking | MmapBacking


class XenRegionMapper:
    """``vhost_user`` XenMapper: FOREIGN regions through privcmd, GRANT regions through gntdev
    (in advance, or on demand with the ``no_advance`` flag), UNIX (0) regions with plain mmap.

    ``no_advance``: the "can not be mapped in advance" flag this back-end understands (0x8 as
    rust-vmm, the default, or 0x100 as the spec); a region with the other value is refused.
    """

    def __init__(self, kernel: Kernel, *, no_advance: XenMmapFlags = DEFAULT_NO_ADVANCE) -> None:
        if no_advance not in (XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM, XenMmapFlags.NO_ADVANCE_MAP_SPEC):
            raise ValueError(f"no_advance={int(no_advance):#x}: use 0x8 (rust-vmm) or 0x100 (spec)")
        self.kernel = kernel
        self.no_advance = no_advance
        self.on_demand: list[OnDemandGrantBacking] = []  # live on-demand regions (see release())

    def __call__(self, region: XenMemoryRegion, fd: int) -> XenBacking:
        flags = XenMmapFlags(region.xen_mmap_flags)
        unknown = flags & ~(_KNOWN | self.no_advance)
        kind = flags & _KNOWN
        if unknown or kind == _KNOWN or (flags & self.no_advance and kind != XenMmapFlags.GRANT):
            os.close(fd)  # the mapper owns the fd, even when it refuses the region
            raise GuestMemoryError(
                region.guest_phys_addr, region.memory_size,
                f"Xen region with flags {int(flags):#x} (FOREIGN, GRANT, GRANT|{int(self.no_advance):#x} or 0 expected)",
            )
        if kind == XenMmapFlags.FOREIGN:
            return ForeignBacking(self.kernel, region, fd)
        if kind == XenMmapFlags.GRANT and flags & self.no_advance:
            backing = OnDemandGrantBacking(self.kernel, region, fd)
            self.on_demand = [b for b in self.on_demand if not b.memory.closed] + [backing]
            return backing
        if kind == XenMmapFlags.GRANT:
            return GrantBacking(self.kernel, region, fd)
        return MmapBacking(region, fd)  # UNIX: a plain shareable fd

    def release(self) -> int:
        """Unmap the on-demand grant mappings no view holds (e.g. after a batch of requests)."""
        self.on_demand = [b for b in self.on_demand if not b.memory.closed]
        return sum(b.release() for b in self.on_demand)
