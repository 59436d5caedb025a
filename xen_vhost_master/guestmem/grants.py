"""A grant-based guest's memory: grant references mapped through /dev/xen/gntdev, in both roles.

:class:`GrantGuestMemory` is grant DMA space (``(1 << 63) | (ref << 12) | offset``, Linux
``drivers/xen/grant-dma-ops.c``) behind ``view(addr, length)`` (the
:class:`vhost_user.virtqueue.GuestMemory` protocol): mapped on demand, cached, one batch per chain,
bounded; read-only grants give read-only views. A back-end's XEN_MMAP GRANT regions
(:mod:`xen_vhost_master.backend.mapper`) are :class:`GrantBacking` (mapped in advance: the rings)
and :class:`OnDemandGrantBacking` (per access: the data buffers). The design and its reasons:
docs/datapath.md §3.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import sys
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from vhost_user import GuestMemoryError, XenMemoryRegion

from ..errors import XenError
from ..xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from ..xen.gntdev import GrantDev, GrantMapping
from ..xen.kernel import Kernel

__all__ = [
    "DEFAULT_MAX_BATCH_PAGES",
    "DEFAULT_MAX_PAGES",
    "GRANT_ADDR_BIT",
    "GRANT_SPACE",
    "GrantBacking",
    "GrantGuestMemory",
    "GrantMemoryStats",
    "ON_DEMAND_IDLE",
    "ON_DEMAND_MAX_PAGES",
    "OnDemandGrantBacking",
    "is_grant_address",
]

log = logging.getLogger(__name__)

GRANT_ADDR_BIT: Final = 1 << 63  # XEN_GRANT_DMA_ADDR_OFF, linux drivers/xen/grant-dma-ops.c
#: The device model's "RAM" for a grant device: the whole grant DMA address space.
GRANT_SPACE: Final = ((GRANT_ADDR_BIT, GRANT_ADDR_BIT - 1),)
#: Pages mapped at once by default (16 MiB: a full bounce pool's worth plus the rings).
DEFAULT_MAX_PAGES: Final = 4096
#: Pages one chain batch maps at most (1 MiB: a 128 KiB request is 33 pages, seg_max*size_max of
#: virtio-blk rarely beyond 1 MiB); also the largest MAP_GRANT_REF argument we build (16 + 8*n bytes).
DEFAULT_MAX_BATCH_PAGES: Final = 256
_MAX_REF: Final = (1 << 32) - 1  # grant_ref_t is a u32
_PAGE: Final = 1 << XEN_PAGE_SHIFT
_IDLE_REFS: Final = 2  # the entry's own reference + getrefcount's argument
#: Pages one back-end on-demand region keeps mapped at most (a single access may not be longer).
ON_DEMAND_MAX_PAGES: Final = 1024
#: Idle mappings an on-demand region keeps between :meth:`OnDemandGrantBacking.release` calls
#: (the same buffer is typically touched two or three times per request: validated, read/written).
ON_DEMAND_IDLE: Final = 8


def is_grant_address(addr: int) -> bool:
    return bool(addr & GRANT_ADDR_BIT)


@dataclass
class GrantMemoryStats:
    maps: int = 0  # gntdev mappings made (MAP_GRANT_REF + mmap), chain batches included
    read_only: int = 0  # ... of which read-only (the writable map was refused, or a chain's readable pages)
    batches: int = 0  # ... of which chain batches (map_chain)
    batch_pages: int = 0  # pages mapped in chain batches
    batch_fallbacks: int = 0  # batches not mapped (refused ref, read-only grant, no room): per buffer instead
    unmaps: int = 0
    hits: int = 0  # views served from a mapping already made
    refused: int = 0  # views that failed (not a grant address, revoked/unknown ref, limits)
    evicted: int = 0  # idle mappings unmapped to make room


class _Map:
    """One gntdev mapping: of refs ``[first, first + count)`` (a run, found by reference), or a
    chain batch (``bufs``: the ``(addr, length)`` of the buffers it holds, found by buffer)."""

    __slots__ = ("first", "count", "gm", "arr", "readonly", "bufs")

    def __init__(self, first: int, count: int, gm: GrantMapping, readonly: bool,
                 bufs: Counter[tuple[int, int]] | None = None) -> None:
        assert gm.mapping is not None
        self.first, self.count, self.gm, self.readonly, self.bufs = first, count, gm, readonly, bufs
        # Views are exports of this object: its reference count tells whether any is alive.
        self.arr: Any = (ctypes.c_char * gm.mapping.length).from_address(gm.mapping.addr)

    def idle(self) -> bool:
        return sys.getrefcount(self.arr) <= _IDLE_REFS

    def covers(self, first: int, count: int) -> bool:
        return self.first <= first and first + count <= self.first + self.count


class GrantGuestMemory:
    """Grant DMA addresses of domain ``domid`` mapped on demand through ``gntdev``.

    ``gntdev`` stays the caller's unless ``own_gntdev`` (then :meth:`close` closes it).
    ``max_pages``: pages mapped at once (also the longest single view). ``max_batch_pages``: pages
    of one :meth:`map_chain` batch (capped at ``max_pages``).
    """

    def __init__(self, gntdev: GrantDev, domid: int, *, max_pages: int = DEFAULT_MAX_PAGES,
                 max_batch_pages: int = DEFAULT_MAX_BATCH_PAGES, own_gntdev: bool = False) -> None:
        if max_pages < 1 or max_batch_pages < 1:
            raise ValueError("max_pages and max_batch_pages must be at least 1")
        self.gntdev, self.domid, self.max_pages = gntdev, domid, max_pages
        self.max_batch_pages = min(max_batch_pages, max_pages)
        self._own = own_gntdev
        self._by_ref: dict[int, _Map] = {}  # ref → the newest run mapping covering it
        # chain batches: buffer address → [(length, batch, byte offset in the batch)], oldest first
        self._slots: dict[int, list[tuple[int, _Map, int]]] = {}
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
        if self._slots and 0 <= length:
            slot = self._slot(addr, length)
            if slot is not None:  # a buffer of a chain batch (or a prefix of it)
                self.stats.hits += 1
                _n, e, start = slot
                mv = memoryview(e.arr).cast("B")[start : start + length]
                return mv.toreadonly() if e.readonly else mv
        first, count, page_off = self._refs(addr, length)
        known = self._by_ref.get(first)
        if known is not None and known.covers(first, count):
            self.stats.hits += 1
            e = known
        else:
            e = self._map(addr, length, first, count)
        start = ((first - e.first) << XEN_PAGE_SHIFT) + page_off
        mv = memoryview(e.arr).cast("B")[start : start + length]
        return mv.toreadonly() if e.readonly else mv

    def check(self, addr: int, length: int) -> None:
        """Validate ``[addr, addr + length)`` as :meth:`view` would, without mapping anything
        (GuestMemoryError otherwise): what the ring code asks of each buffer while it validates a
        chain, whose pages :meth:`map_chain` then maps together. A revoked or unknown reference is
        found when the chain is mapped (its view fails)."""
        self._refs(addr, length)

    def map_chain(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]) -> None:
        """Map the pages of a chain's buffers ahead of their views: the device-readable ones in one
        read-only batch, the device-writable ones in one writable batch (each one MAP_GRANT_REF
        with the references in buffer order, and one mmap). Never raises: a batch that cannot be
        mapped leaves its buffers to :meth:`view`, which maps (or refuses) each on its own. Empty
        buffers, buffers that :meth:`view` would refuse, and buffers longer than a batch are left
        to :meth:`view` too. Every batch ends with :meth:`release_buffers` of all its buffers."""
        for buffers, writable_batch in ((readable, False), (writable, True)):
            batch: list[tuple[int, int, int, int, int]] = []  # addr, length, first ref, pages, page offset
            pages = 0
            for addr, length in buffers:
                if length <= 0:
                    continue
                try:
                    first, count, page_off = self._refs(addr, length, count_refused=False)
                except GuestMemoryError:
                    continue
                if count > self.max_batch_pages:
                    continue
                run = self._by_ref.get(first)
                if run is not None and run.covers(first, count):
                    continue  # mapped already (a ring page, or a probe by a ring code without check())
                if pages + count > self.max_batch_pages:
                    self._map_batch(batch, pages, writable_batch)
                    batch, pages = [], 0
                batch.append((addr, length, first, count, page_off))
                pages += count
            if batch:
                self._map_batch(batch, pages, writable_batch)

    def release_buffers(self, buffers: list[tuple[int, int]]) -> None:
        """The caller holds no more views of these buffers: unmap their mappings unless a view of
        the same mapping is still alive (a ring). A chain batch goes when all its buffers are in
        ``buffers`` (one call per chain part, as the shadow engine makes). Addresses that are not
        grants are ignored."""
        if self._slots:
            buffers = self._release_batches(buffers)
        for addr, length in buffers:
            try:
                first, count, _ = self._refs(addr, length, count_refused=False)
            except GuestMemoryError:
                continue
            e = self._by_ref.get(first)
            if e is not None and e.covers(first, count) and e.idle():
                self._unmap(e)

    def trim(self, keep: int = 0) -> int:
        """Unmap the mappings no view holds, oldest first, leaving at most ``keep`` of them (0: a
        queue was reset, its rings and buffers of chains that failed validation go); returns how
        many were unmapped."""
        idle = [e for e in self._maps.values() if e.idle()]
        drop = idle[: max(len(idle) - keep, 0)]
        for e in drop:
            self._unmap(e)
        return len(drop)

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
        self._slots.clear()  # a batch still viewed serves no new view
        if busy:
            log.error("domain %d: %d grant mapping(s) still viewed at close: left mapped", self.domid, busy)
        if self._own:
            self.gntdev.close()

    # --- internals --------------------------------------------------------------------------------
    def _slot(self, addr: int, length: int) -> tuple[int, _Map, int] | None:
        """The chain batch slot of a buffer starting at ``addr`` at least ``length`` long; a
        writable one first (two chains in flight may share a buffer, one reading it, one writing)."""
        found = None
        for slot in self._slots.get(addr, ()):
            if length <= slot[0]:
                if not slot[1].readonly:
                    return slot
                found = found or slot
        return found

    def _map_batch(self, batch: list[tuple[int, int, int, int, int]], pages: int, writable: bool) -> None:
        refs = [ref for _a, _n, first, count, _o in batch for ref in range(first, first + count)]
        if not self._room(pages):
            self.stats.batch_fallbacks += 1
            return
        try:
            gm = self.gntdev.map_grant_refs(self.domid, refs, writable=writable)
        except XenError as exc:  # e.g. a revoked ref, or a read-only grant marked device-writable
            self.stats.batch_fallbacks += 1
            log.debug("domain %d: chain batch of %d grant page(s) not mapped (%s): buffer by buffer", self.domid, pages, exc)
            return
        entry = _Map(refs[0], pages, gm, not writable, Counter((a, n) for a, n, *_ in batch))
        self._maps[id(entry)] = entry
        pos = 0
        seen: set[tuple[int, int]] = set()
        for addr, length, _first, count, page_off in batch:
            if (addr, length) not in seen:  # one slot per distinct buffer (a hostile chain may repeat one)
                seen.add((addr, length))
                self._slots.setdefault(addr, []).append((length, entry, (pos << XEN_PAGE_SHIFT) + page_off))
            pos += count
        self._pages += pages
        self.stats.maps += 1
        self.stats.batches += 1
        self.stats.batch_pages += pages
        self.stats.read_only += not writable

    def _release_batches(self, buffers: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Unmap the chain batches whose buffers are all in ``buffers`` (one batch per buffer
        released: two chains holding the same buffer each release their own); return the buffers
        no batch took."""
        want = Counter(buffers)
        for addr, length in buffers:
            if not want[(addr, length)]:
                continue
            for n, e, _start in self._slots.get(addr, ()):
                if n != length or e.bufs is None:
                    continue
                need = e.bufs
                if all(want[b] >= k for b, k in need.items()):
                    want -= need
                    self._drop_slots(e)
                    if e.idle():
                        self._unmap(e)
                    break  # otherwise a view is alive: trim() unmaps it once dropped
        return list(want.elements())

    def _drop_slots(self, e: _Map) -> None:
        for addr in {a for a, _n in e.bufs or ()}:
            slots = [s for s in self._slots.get(addr, ()) if s[1] is not e]
            if slots:
                self._slots[addr] = slots
            else:
                self._slots.pop(addr, None)
        e.bufs = Counter()  # still a batch: never found by reference

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
        if not self._room(count):
            self.stats.refused += 1
            raise GuestMemoryError(addr, length, f"grant space ({self._pages} pages mapped and in use, limit {self.max_pages})")

    def _room(self, count: int) -> bool:
        """Whether ``count`` more pages fit, after unmapping idle mappings oldest first if needed
        (an idle chain batch too: its buffers are then mapped one by one when viewed)."""
        if self._pages + count <= self.max_pages:
            return True
        for e in list(self._maps.values()):
            if e.idle():
                self._unmap(e)
                self.stats.evicted += 1
                if self._pages + count <= self.max_pages:
                    return True
        return False

    def _unmap(self, e: _Map) -> None:
        del self._maps[id(e)]
        if e.bufs is not None:
            self._drop_slots(e)
        else:
            for ref in range(e.first, e.first + e.count):
                if self._by_ref.get(ref) is e:
                    del self._by_ref[ref]
        self._pages -= e.count
        e.arr = None
        self.stats.unmaps += 1
        try:
            self.gntdev.unmap(e.gm)
        except XenError as exc:  # the VMA is gone already; the kernel frees the grant handles with the fd
            log.warning("domain %d: unmapping grant refs %d+%d%s: %s", self.domid, e.first, e.count,
                        " (chain batch)" if e.bufs is not None else "", exc)


# --- a back-end's XEN_MMAP GRANT regions ---------------------------------------------------------

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
    once a request is done: :class:`~xen_vhost_master.backend.blk.XenRamDiskBlk`
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
