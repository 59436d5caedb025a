"""The back-end side of XEN_MMAP: map a Xen memory region the front-end described.

A vhost-user back-end written with ``vhost_user`` (our Python devices) sets
``device.xen_mapper = XenRegionMapper(kernel)``; each region of SET_MEM_TABLE then arrives with an
fd of the front-end's and is mapped here, as rust-vmm's vm-memory ``xen`` feature
(``mmap/xen.rs``: MmapXenForeign, MmapXenGrant, MmapXenUnix) does:

* FOREIGN (0x1): the fd is /dev/xen/privcmd; the guest's range ``[guest_phys_addr, +size)`` of
  ``domid`` is mapped once with MMAPBATCH_V2, by the daemon's own rule
  (:class:`~xen_vhost_master.guestmem.foreign.ForeignRange`: paged-out frames retried, frames Xen
  refuses to map never touched, a slice covering one refused).
* GRANT (0x2): the fd is /dev/xen/gntdev and the region lies in grant DMA space
  (``(1 << 63) | (ref << 12)``). Mapped in advance (the rings): MAP_GRANT_REF of the consecutive
  refs from ``(guest_phys_addr & ~(1 << 63)) >> 12`` covering the region, then mmap of the gntdev
  fd at the returned index (:class:`GrantBacking`). With the "no advance map" flag (the rest of
  grant space, i.e. the data buffers): nothing is mapped up front; each access maps the refs it
  covers and the mapping goes once the access's view is dropped (:class:`OnDemandGrantBacking`,
  over :class:`~xen_vhost_master.guestmem.grants.GrantGuestMemory`). A read-only grant is mapped
  read-only and its views are read-only memoryviews: a write attempt is a Python error, never a
  fault (the device refuses that request: :class:`xen_vhost_master.backend.blk.XenRamDiskBlk`).
* 0 (UNIX): a plain shareable fd (e.g. a front-end's shadow memfd), mmap'd as without XEN_MMAP.

The "no advance map" bit differs between the spec (bit 8, 0x100) and rust-vmm (0x8, what existing
Xen back-ends put on the wire); the mapper takes the value as a setting (default 0x8), exactly
like the front-end does, and refuses a region carrying the other one.
"""

from __future__ import annotations

import os
from typing import Final

from vhost_user import GuestMemoryError, XenMemoryRegion, XenMmapFlags
from vhost_user.memory import MmapBacking

from ..guestmem.foreign import ForeignBacking
from ..guestmem.grants import GrantBacking, OnDemandGrantBacking
from ..xen.kernel import Kernel

__all__ = [
    "DEFAULT_NO_ADVANCE",
    "XenBacking",
    "XenRegionMapper",
    "no_advance_flag",
]

#: rust-vmm vm-memory ``MmapXenFlags::NO_ADVANCE_MAP``: what existing Xen back-ends expect (docs/vhost-user-wire.md §3).
DEFAULT_NO_ADVANCE: Final = XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM
_NO_ADVANCE_VALUES: Final = {
    "rust-vmm": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM, "0x8": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM,
    "8": XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM,
    "spec": XenMmapFlags.NO_ADVANCE_MAP_SPEC, "0x100": XenMmapFlags.NO_ADVANCE_MAP_SPEC,
    "256": XenMmapFlags.NO_ADVANCE_MAP_SPEC,
}
_KNOWN: Final = XenMmapFlags.FOREIGN | XenMmapFlags.GRANT


def no_advance_flag(text: str | int) -> XenMmapFlags:
    """``rust-vmm`` / ``0x8`` or ``spec`` / ``0x100`` → the "no advance map" flag value."""
    key = str(text).strip().lower() if not isinstance(text, int) else str(text)
    flag = _NO_ADVANCE_VALUES.get(key)
    if flag is None:
        raise ValueError(f"no-advance flag {text!r}: use rust-vmm (0x8) or spec (0x100)")
    return flag


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
        #: A GRANT region was mapped: guest memory may be read-only here (a grant the guest gave
        #: read-only); FOREIGN and UNIX regions are always mapped writable.
        self.grants = False

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
        if kind == XenMmapFlags.GRANT:
            self.grants = True
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
