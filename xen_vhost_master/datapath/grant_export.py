"""The data paths of a grant-based guest (grant DMA addresses in its rings and descriptors).

:class:`GrantShadowDataPath`: shadow virtqueues over :class:`~..guestmem.grants.GrantGuestMemory`.
:class:`GrantXenMmapExport`: zero copy, the back-end maps grant space itself through our gntdev fd
(XEN_MMAP GRANT regions laid out by :func:`grant_layout`). Design: docs/datapath.md §3.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from vhost_user import GuestMemoryError, LocalProtocolError, MemoryRegion, ProtocolFeatures, XenMemoryRegion, XenMmapFlags

from ..errors import GuestFault
from ..guestmem.grants import GRANT_ADDR_BIT, GRANT_SPACE, GrantGuestMemory
from ..virtio_mmio import QueueConfig
from ..xen.abi import XEN_PAGE_SHIFT
from ..xen.gntdev import GrantDev
from .base import DataPath, RingAddresses
from .shadow import ShadowDataPath
from .zerocopy import ask_not_to_notify

__all__ = [
    "MAX_GRANT_QUEUES",
    "MAX_REGIONS",
    "GrantRegion",
    "GrantShadowDataPath",
    "GrantXenMmapExport",
    "grant_layout",
    "ring_parts",
]


class GrantShadowDataPath(ShadowDataPath):
    """Shadow virtqueues for a grant device: rings and buffers live in grant space
    (:data:`GRANT_SPACE` is the model's RAM); the memory is closed with the data path."""

    name = "shadow (grants)"

    def __init__(self, memory: GrantGuestMemory, **kw: Any) -> None:
        super().__init__(memory, GRANT_SPACE, **kw)
        self.grant_memory = memory

    def close_queue(self, index: int) -> None:
        """Reset/stop of queue ``index``: its rings' views are gone, so their grant mappings (and
        any left idle) are unmapped: the guest may end those grants now."""
        super().close_queue(index)
        self.grant_memory.trim()

    def close(self) -> None:
        super().close()
        self.grant_memory.close()


# --- XEN_MMAP export of grant space (zero copy) ------------------------------------------------------

#: VHOST_MEMORY_BASELINE_NREGIONS: regions (and fds) one SET_MEM_TABLE may carry (docs/vhost-user-wire.md §2).
MAX_REGIONS: Final = 8
#: Queues whose rings always fit: each queue's parts merged into one region, plus the gaps.
MAX_GRANT_QUEUES: Final = (MAX_REGIONS - 1) // 2


@dataclass(frozen=True)
class GrantRegion:
    """One XEN_MMAP region of grant space: ``[addr, addr + size)`` with its xen_mmap_flags."""

    addr: int
    size: int
    flags: XenMmapFlags

    @property
    def in_advance(self) -> bool:
        return self.flags == XenMmapFlags.GRANT


def ring_parts(queue: QueueConfig) -> list[tuple[int, int]]:
    """The grant-space extents of a split queue's rings, sized as xen-vhost-frontend maps them
    (desc ``16*num``; avail and used with their trailing event-idx field)."""
    n = queue.num
    return [(queue.desc, 16 * n), (queue.driver, 4 + 2 * n + 2), (queue.device, 4 + 8 * n + 2)]


def _pages_touch(end: int, start: int) -> bool:
    """Whether an extent starting at ``start`` lies on the page after (or a page of) the one
    holding byte ``end - 1``: merging them maps no page that neither needs."""
    return start >> XEN_PAGE_SHIFT <= ((end - 1) >> XEN_PAGE_SHIFT) + 1


def grant_layout(queues: Sequence[QueueConfig], span: int, no_advance: XenMmapFlags,
                 max_regions: int = MAX_REGIONS) -> list[GrantRegion] | None:
    """The XEN_MMAP regions for grant space ``[1 << 63, 1 << 63 + span)`` with these queues' rings:
    one GRANT region per ring part (xen-vhost-frontend's layout) and GRANT|``no_advance`` regions
    for the gaps. Over ``max_regions``, ring parts whose pages touch are merged; None if even that
    does not fit. GuestFault for a ring outside the span (or two queues' rings overlapping)."""
    lo, hi = GRANT_ADDR_BIT, GRANT_ADDR_BIT + span
    parts = sorted(p for q in queues for p in ring_parts(q))
    for (a, n), q in ((p, q) for q in queues for p in ring_parts(q)):
        if not (lo <= a and a + n <= hi):
            raise GuestFault(a, f"queue {q.index}: ring [{a:#x}, +{n:#x}) is outside the exported grant space")
    for (a, n), (b, _m) in zip(parts, parts[1:]):
        if b < a + n:
            raise GuestFault(b, f"ring extents overlap at {b:#x}")
    for merge in (False, True):
        rings: list[list[int]] = []
        for a, n in parts:
            if merge and rings and _pages_touch(rings[-1][1], a):
                rings[-1][1] = max(rings[-1][1], a + n)
            else:
                rings.append([a, a + n])
        out, cur = [], lo
        for a, end in rings:
            if a > cur:
                out.append(GrantRegion(cur, a - cur, XenMmapFlags.GRANT | no_advance))
            out.append(GrantRegion(a, end - a, XenMmapFlags.GRANT))
            cur = end
        if cur < hi:
            out.append(GrantRegion(cur, hi - cur, XenMmapFlags.GRANT | no_advance))
        if len(out) <= max_regions:
            return out
    return None


class GrantXenMmapExport:
    """XEN_MMAP for a grant device: the back-end maps grant space itself through our gntdev fd.

    The memory table follows the rings of the queues being started (:meth:`regions`).
    ``fallback()`` builds the shadow data path used when the
    rings' layout does not fit in :data:`MAX_REGIONS` regions; without one, that activation fails
    (LocalProtocolError → the device shows NEEDS_RESET); rings outside grant space or overlapping
    are the guest's fault (GuestFault → NEEDS_RESET too). ``gntdev`` is closed with the export.
    """

    protocol_features = ProtocolFeatures.XEN_MMAP
    packed = False

    def __init__(self, gntdev: GrantDev, domid: int, span: int, *,
                 no_advance: XenMmapFlags = XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM,
                 fallback: Callable[[], DataPath] | None = None, log: Any = None) -> None:
        if no_advance not in (XenMmapFlags.NO_ADVANCE_MAP_RUSTVMM, XenMmapFlags.NO_ADVANCE_MAP_SPEC):
            raise ValueError(f"no_advance={int(no_advance):#x}: use 0x8 (rust-vmm) or 0x100 (spec)")
        if span <= 0 or span % (1 << XEN_PAGE_SHIFT) or span > GRANT_ADDR_BIT - 1:
            raise ValueError(f"grant span {span:#x} must be a positive number of pages")
        self.gntdev, self.domid, self.span, self.no_advance = gntdev, domid, span, no_advance
        self._fallback = fallback
        self.log = log or logging.getLogger(__name__)
        self._kick: dict[int, int] = {}
        self._rings: dict[int, tuple[QueueConfig, int]] = {}  # open queue → (its config, features)
        self._reader: GrantGuestMemory | None = None
        self.layout: list[GrantRegion] = []  # the last memory table
        self.shadow: DataPath | None = None  # built at the first layout that did not fit
        self.shadowed = False  # this activation runs on the shadow fallback
        self.fallbacks = 0

    @property
    def name(self) -> str:
        return "shadow (grants, region limit)" if self.shadowed else "xen-mmap (grants)"

    @property
    def direct(self) -> bool:
        """Zero copy (the back-end touches the guest's rings) unless on the shadow fallback."""
        return not self.shadowed

    def banks(self) -> Sequence[tuple[int, int]]:
        return [(GRANT_ADDR_BIT, self.span)]

    def new_connection(self) -> None:
        if self.shadow is not None:
            self.shadow.new_connection()

    def regions(self, queues: Sequence[QueueConfig] = ()) -> tuple[Sequence[XenMemoryRegion], Sequence[int]]:
        queues = list(queues)
        layout = grant_layout(queues, self.span, self.no_advance)  # GuestFault: the device needs a reset
        if layout is None:
            if self._fallback is None:
                raise LocalProtocolError(f"the rings of {len(queues)} queue(s) need more than {MAX_REGIONS} XEN_MMAP regions")
            if self.shadow is None:
                self.shadow = self._fallback()
            self.shadowed, self.fallbacks = True, self.fallbacks + 1
            self.log.warning("the rings of %d queues need more than %d XEN_MMAP grant regions: shadow virtqueues this time",
                             len(queues), MAX_REGIONS)
            shadow_regions, fds = self.shadow.regions(queues)
            return [_as_unix(r) for r in shadow_regions], fds
        self.shadowed = False
        self.layout = layout
        table = [
            XenMemoryRegion(guest_phys_addr=r.addr, memory_size=r.size, userspace_addr=r.addr, mmap_offset=0,
                            xen_mmap_flags=int(r.flags), domid=self.domid)
            for r in layout
        ]
        return table, [self.gntdev.fileno()] * len(table)

    def open_queue(self, queue: QueueConfig, features: int, kick_fd: int, *, resume: bool = False) -> RingAddresses:
        if self.shadowed:
            assert self.shadow is not None
            return self.shadow.open_queue(queue, features, kick_fd, resume=resume)
        self._kick[queue.index] = kick_fd
        self._rings[queue.index] = (queue, features)
        base = 0
        if resume:  # without INFLIGHT_SHMFD, QEMU's rule: restart at the guest's used index
            try:
                with self._memory().view(queue.device + 2, 2) as v:
                    base = int.from_bytes(v, "little")
            except GuestMemoryError as e:
                raise GuestFault(queue.device, f"cannot read the used index to resume: {e}") from None
            finally:
                self._memory().trim()
        return RingAddresses(queue.desc, queue.driver, queue.device, base)

    def notify(self, index: int) -> None:
        if self.shadowed:
            assert self.shadow is not None
            self.shadow.notify(index)
            return
        fd = self._kick.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def used(self, index: int) -> bool:
        if self.shadowed:
            assert self.shadow is not None
            return self.shadow.used(index)
        return True

    def also_used(self) -> list[int]:
        return self.shadow.also_used() if self.shadowed and self.shadow is not None else []

    def close_queue(self, index: int) -> None:
        if self.shadowed and self.shadow is not None:
            self.shadow.close_queue(index)
        self._kick.pop(index, None)
        self._rings.pop(index, None)

    def quiesce(self) -> list[int]:
        """The device is going while its guest runs on: ask the driver not to notify any open
        queue again. On the shadow fallback, the shadow path's own (at once); else once the
        back-end has stopped the rings (it owned their notification suppression until then),
        written as zero copy does (:func:`~.zerocopy.ask_not_to_notify`) through a writable
        gntdev mapping of the ring's grant of our own, unmapped after. A ring the guest granted
        read-only is left unwritten (logged). Returns the queues asked."""
        if self.shadowed:
            quiesce = getattr(self.shadow, "quiesce", None)
            return quiesce() if callable(quiesce) else []
        try:
            return ask_not_to_notify(self._rings, self._read, self._write, self.log)
        finally:
            if self._reader is not None:
                self._reader.trim()

    def close(self) -> None:
        self._kick.clear()
        self._rings.clear()
        try:
            if self.shadow is not None:
                self.shadow.close()
        finally:
            if self._reader is not None:
                self._reader.close()
            self.gntdev.close()

    def _read(self, addr: int, length: int) -> bytes:
        try:
            with self._memory().view(addr, length) as v:
                return bytes(v)
        except GuestMemoryError as e:
            raise GuestFault(addr, str(e)) from None

    def _write(self, addr: int, data: bytes) -> None:
        try:
            with self._memory().view(addr, len(data)) as v:
                if v.readonly:
                    raise GuestFault(addr, "the guest granted this ring page read-only to the device: left unwritten")
                v[:] = data
        except GuestMemoryError as e:
            raise GuestFault(addr, str(e)) from None

    def _memory(self) -> GrantGuestMemory:
        """The daemon's own (rare, small) reads of grant space, over a gntdev of its own: the
        exported fd belongs to the back-end's use."""
        if self._reader is None:
            self._reader = GrantGuestMemory(GrantDev(self.gntdev.kernel), self.domid, max_pages=4, own_gntdev=True)
        return self._reader


def _as_unix(r: MemoryRegion | XenMemoryRegion) -> XenMemoryRegion:
    """A shadow path's plain region in a XEN_MMAP memory table: xen_mmap_flags 0 (UNIX, an fd to mmap)."""
    return XenMemoryRegion(guest_phys_addr=r.guest_phys_addr, memory_size=r.memory_size, userspace_addr=r.userspace_addr,
                           mmap_offset=r.mmap_offset, xen_mmap_flags=0, domid=0)
