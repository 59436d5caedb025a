"""The back-end side of XEN_MMAP: map a Xen memory region the front-end described.

A vhost-user back-end written with ``vhost_user`` (our Python devices) sets
``device.xen_mapper = XenRegionMapper(kernel)``; FOREIGN regions then arrive with the front-end's
/dev/xen/privcmd fd, the guest's domid and its guest-physical range, and are mapped here with
MMAPBATCH_V2, as rust-vmm's vm-memory ``xen`` feature does.

Frames Xen refuses to map (holes, ballooned-out pages) are inaccessible: touching them would fault
the process, so :meth:`ForeignBacking.slice` refuses any range that covers one.
"""

from __future__ import annotations

import bisect
import logging
import os

from vhost_user import GuestMemoryError, XenMemoryRegion, XenMmapFlags

from .errors import XenError
from .xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from .xen.kernel import Kernel
from .xen.privcmd import ForeignMapping, PrivCmd

__all__ = ["ForeignBacking", "XenRegionMapper"]

log = logging.getLogger(__name__)


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


class XenRegionMapper:
    """``vhost_user`` XenMapper: FOREIGN regions through privcmd (grants come with gntdev later)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def __call__(self, region: XenMemoryRegion, fd: int) -> ForeignBacking:
        flags = XenMmapFlags(region.xen_mmap_flags)
        if flags & XenMmapFlags.GRANT or not flags & XenMmapFlags.FOREIGN:
            os.close(fd)  # the mapper owns the fd, even when it refuses the region
            raise GuestMemoryError(region.guest_phys_addr, region.memory_size, f"Xen region with flags {int(flags):#x} (only FOREIGN is supported)")
        return ForeignBacking(self.kernel, region, fd)
