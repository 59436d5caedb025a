"""A grant-based guest's memory as the daemon sees it: grant references mapped through /dev/xen/gntdev.

A guest that does not trust dom0 with all its RAM (Linux ``CONFIG_XEN_VIRTIO``, xl
``grant_usage=1``) accepts VIRTIO_F_ACCESS_PLATFORM and puts *grant DMA addresses* in its ring
registers and descriptors: ``(1 << 63) | (first_ref << 12) | offset`` (``grant-dma-ops.c``), a
buffer that spans pages using consecutive references. :class:`GrantGuestMemory` offers the
:class:`vhost_user.virtqueue.GuestMemory` protocol (``view(addr, length)``) over that space, which
is all the shadow data path (:mod:`.shadow`) needs; :data:`GRANT_SPACE` is the "RAM bank" the
virtio-mmio model must accept ring addresses in.

* Only grant addresses: anything without bit 63 is a :class:`~vhost_user.errors.GuestMemoryError`.
* The references covering ``[addr, addr + length)`` are mapped together, writable first; a
  read-only grant (the writable map fails with EINVAL) is mapped read-only and its views are
  **read-only memoryviews**: a write attempt raises ``TypeError`` instead of faulting the process
  (the pages are PROT_READ). A revoked or unknown reference fails that view (GuestMemoryError),
  which the ring code turns into a RingError for that request only.
* Mappings are cached (a view inside a mapped range reuses it): the rings stay mapped for the
  queue's lifetime. :meth:`release_buffers` (called by the shadow engine once a request's buffers
  are copied in / back) unmaps the data buffers' mappings, so a data page is mapped only while its
  request is in flight and a reference the guest re-grants later is mapped afresh.
* A mapping is never unmapped while a view of it is alive (the rings' long-lived views, or a
  hostile buffer aliasing a ring): every view is a fresh export of the mapping's own ctypes array,
  so its reference count says whether any view is still held. Unmapping a page under a live view
  would turn the next access into a segfault.
* Bounded: at most ``max_pages`` pages mapped at once; idle mappings are unmapped oldest first
  to make room, and when nothing is idle the view fails (GuestMemoryError), never the daemon.

:class:`GrantShadowDataPath` is the shadow data path of a grant device; it owns its memory.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from vhost_user import GuestMemoryError

from .errors import XenError
from .shadow import ShadowDataPath
from .xen.abi import XEN_PAGE_SHIFT
from .xen.gntdev import GrantDev, GrantMapping

__all__ = [
    "DEFAULT_MAX_PAGES",
    "GRANT_ADDR_BIT",
    "GRANT_SPACE",
    "GrantGuestMemory",
    "GrantMemoryStats",
    "GrantShadowDataPath",
    "is_grant_address",
]

log = logging.getLogger(__name__)

GRANT_ADDR_BIT: Final = 1 << 63  # XEN_GRANT_DMA_ADDR_OFF, linux drivers/xen/grant-dma-ops.c
#: The device model's "RAM" for a grant device: the whole grant DMA address space.
GRANT_SPACE: Final = ((GRANT_ADDR_BIT, GRANT_ADDR_BIT - 1),)
#: Pages mapped at once by default (16 MiB: a full bounce pool's worth plus the rings).
DEFAULT_MAX_PAGES: Final = 4096
_MAX_REF: Final = (1 << 32) - 1  # grant_ref_t is a u32
_PAGE: Final = 1 << XEN_PAGE_SHIFT
_IDLE_REFS: Final = 2  # the entry's own reference + getrefcount's argument


def is_grant_address(addr: int) -> bool:
    return bool(addr & GRANT_ADDR_BIT)


@dataclass
class GrantMemoryStats:
    maps: int = 0  # gntdev mappings made
    read_only: int = 0  # ... of which read-only (the writable map was refused)
    unmaps: int = 0
    hits: int = 0  # views served from a mapping already made
    refused: int = 0  # views that failed (not a grant address, revoked/unknown ref, limits)
    evicted: int = 0  # idle mappings unmapped to make room


class _Map:
    """One gntdev mapping of refs ``[first, first + count)``."""

    __slots__ = ("first", "count", "gm", "arr", "readonly")

    def __init__(self, first: int, count: int, gm: GrantMapping, readonly: bool) -> None:
        assert gm.mapping is not None
        self.first, self.count, self.gm, self.readonly = first, count, gm, readonly
        # Views are exports of this object: its reference count tells whether any is alive.
        self.arr: Any = (ctypes.c_char * gm.mapping.length).from_address(gm.mapping.addr)

    def idle(self) -> bool:
        return sys.getrefcount(self.arr) <= _IDLE_REFS

    def covers(self, first: int, count: int) -> bool:
        return self.first <= first and first + count <= self.first + self.count


class GrantGuestMemory:
    """Grant DMA addresses of domain ``domid`` mapped on demand through ``gntdev``.

    ``gntdev`` stays the caller's unless ``own_gntdev`` (then :meth:`close` closes it).
    ``max_pages``: pages mapped at once (also the longest single view).
    """

    def __init__(self, gntdev: GrantDev, domid: int, *, max_pages: int = DEFAULT_MAX_PAGES,
                 own_gntdev: bool = False) -> None:
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self.gntdev, self.domid, self.max_pages = gntdev, domid, max_pages
        self._own = own_gntdev
        self._by_ref: dict[int, _Map] = {}  # ref → the newest mapping covering it
        self._maps: OrderedDict[int, _Map] = OrderedDict()  # id → mapping, least recently made first
        self._pages = 0
        self.stats = GrantMemoryStats()
        self.closed = False

    @property
    def mapped_pages(self) -> int:
        return self._pages

    @property
    def mappings(self) -> int:
        return len(self._maps)

    # --- GuestMemory ------------------------------------------------------------------------------
    def view(self, addr: int, length: int) -> memoryview:
        """``[addr, addr + length)`` of grant space; read-only when the grant is. GuestMemoryError
        for a non-grant address, a revoked or unknown reference, or beyond the mapping limits."""
        first, count, page_off = self._refs(addr, length)
        e = self._by_ref.get(first)
        if e is not None and e.covers(first, count):
            self.stats.hits += 1
        else:
            e = self._map(addr, length, first, count)
        start = ((first - e.first) << XEN_PAGE_SHIFT) + page_off
        mv = memoryview(e.arr).cast("B")[start : start + length]
        return mv.toreadonly() if e.readonly else mv

    def release_buffers(self, buffers: list[tuple[int, int]]) -> None:
        """The caller holds no more views of these buffers: unmap their mappings unless a view of
        the same mapping is still alive (a ring). Addresses that are not grants are ignored."""
        for addr, length in buffers:
            try:
                first, count, _ = self._refs(addr, length, count_refused=False)
            except GuestMemoryError:
                continue
            e = self._by_ref.get(first)
            if e is not None and e.covers(first, count) and e.idle():
                self._unmap(e)

    def trim(self) -> int:
        """Unmap every mapping no view holds (a queue was reset: its rings, and buffers of chains
        that failed validation); returns how many were unmapped."""
        idle = [e for e in self._maps.values() if e.idle()]
        for e in idle:
            self._unmap(e)
        return len(idle)

    def close(self) -> None:
        """Unmap everything no view holds (a mapping still viewed is left mapped and logged, never
        pulled from under its view); close the gntdev if owned. Idempotent."""
        if self.closed:
            return
        self.closed = True
        busy = 0
        for e in list(self._maps.values()):
            if e.idle():
                self._unmap(e)
            else:
                busy += 1
        if busy:
            log.error("domain %d: %d grant mapping(s) still viewed at close: left mapped", self.domid, busy)
        if self._own:
            self.gntdev.close()

    # --- internals --------------------------------------------------------------------------------
    def _refs(self, addr: int, length: int, *, count_refused: bool = True) -> tuple[int, int, int]:
        if not addr & GRANT_ADDR_BIT or length < 0 or self.closed:
            if count_refused:
                self.stats.refused += 1
            raise GuestMemoryError(addr, length, "grant space (not a grant address)" if not self.closed else "grant space (closed)")
        off = addr & ~GRANT_ADDR_BIT
        first, page_off = off >> XEN_PAGE_SHIFT, off & (_PAGE - 1)
        count = max(1, (page_off + length + _PAGE - 1) >> XEN_PAGE_SHIFT)
        if first + count - 1 > _MAX_REF or count > self.max_pages:
            if count_refused:
                self.stats.refused += 1
            raise GuestMemoryError(addr, length, f"grant space (refs {first}+{count} beyond the limits)")
        return first, count, page_off

    def _map(self, addr: int, length: int, first: int, count: int) -> _Map:
        self._make_room(addr, length, count)
        refs = list(range(first, first + count))
        readonly = False
        try:
            try:
                gm = self.gntdev.map_grant_refs(self.domid, refs, writable=True)
            except XenError as e:
                if e.errno != errno.EINVAL:
                    raise
                gm = self.gntdev.map_grant_refs(self.domid, refs, writable=False)  # a read-only grant
                readonly = True
        except XenError as e:
            self.stats.refused += 1
            raise GuestMemoryError(addr, length, f"grant refs {first}..{first + count - 1} of domain {self.domid} ({e})") from None
        entry = _Map(first, count, gm, readonly)
        self._maps[id(entry)] = entry
        for ref in refs:
            self._by_ref[ref] = entry
        self._pages += count
        self.stats.maps += 1
        self.stats.read_only += readonly
        return entry

    def _make_room(self, addr: int, length: int, count: int) -> None:
        if self._pages + count <= self.max_pages:
            return
        for e in list(self._maps.values()):
            if e.idle():
                self._unmap(e)
                self.stats.evicted += 1
                if self._pages + count <= self.max_pages:
                    return
        self.stats.refused += 1
        raise GuestMemoryError(addr, length, f"grant space ({self._pages} pages mapped and in use, limit {self.max_pages})")

    def _unmap(self, e: _Map) -> None:
        del self._maps[id(e)]
        for ref in range(e.first, e.first + e.count):
            if self._by_ref.get(ref) is e:
                del self._by_ref[ref]
        self._pages -= e.count
        e.arr = None
        self.stats.unmaps += 1
        try:
            self.gntdev.unmap(e.gm)
        except XenError as exc:  # the VMA is gone already; the kernel frees the grant handles with the fd
            log.warning("domain %d: unmapping grant refs %d+%d: %s", self.domid, e.first, e.count, exc)


class GrantShadowDataPath(ShadowDataPath):
    """Shadow virtqueues for a grant device: rings and buffers live in grant space
    (:data:`GRANT_SPACE` is the model's RAM); the memory is closed with the data path."""

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
