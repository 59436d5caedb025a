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
* **One batch per chain** (:meth:`map_chain`, called by the shadow engine before it copies a
  chain in): the pages of all the chain's device-readable buffers are mapped with ONE
  MAP_GRANT_REF (an array of references, in buffer order; they need not be consecutive) and ONE
  read-only mmap, those of its device-writable buffers with one more, writable (a gntdev mapping
  has one protection for all its pages, and a guest grants device-readable buffers read-only, so
  one mapping cannot serve both). Each buffer is then one contiguous slice of its batch, and
  :meth:`view` of a buffer (or a prefix of it: a partial copy-back) is served from it without an
  ioctl; :meth:`release_buffers` of the buffers of a batch unmaps it in one go. Per request this
  replaces one map (plus a refused writable attempt for each read-only grant), mmap and unmap per
  buffer — each a round trip to the simulated host, a hypercall and a TLB shootdown on real Xen —
  by at most two of each. A batch holds at most ``max_batch_pages`` pages (more: several
  batches; a buffer longer than that is mapped on its own when viewed). A batch that cannot be
  mapped (a revoked or unknown reference, a read-only grant among the writable buffers, no room)
  is not an error here: its buffers are then mapped one by one when viewed, which fails exactly
  the buffer at fault as before (a GuestMemoryError; a read-only view of a device-writable
  buffer), so the guest's chain is refused with the same reason.
* A mapping is never unmapped while a view of it is alive (the rings' long-lived views, or a
  hostile buffer aliasing a ring): every view is a fresh export of the mapping's own ctypes array,
  so its reference count says whether any view is still held. Unmapping a page under a live view
  would turn the next access into a segfault.
* Bounded: at most ``max_pages`` pages mapped at once; idle mappings are unmapped oldest first
  to make room, and when nothing is idle the view fails (GuestMemoryError), never the daemon.

:class:`GrantShadowDataPath` is the shadow data path of a grant device; it owns its memory.

:class:`GrantXenMmapExport` is the zero-copy data path of a grant device whose back-end negotiated
XEN_MMAP (as xen-vhost-frontend exports grant guests to rust-vmm back-ends, docs/prior-art.md "Guest
memory: foreign vs grant"): at each activation, one GRANT (0x2) region per vring part (desc
``16*num``, avail ``4+2*num+2``, used ``4+8*num+2``; parts whose pages touch are merged) mapped in
advance by the back-end, and GRANT|NO_ADVANCE_MAP regions filling the rest of grant space
``[1 << 63, 1 << 63 + span)``, which the back-end maps per access; every region carries our
/dev/xen/gntdev fd, ``mmap_offset`` 0 and the guest's domid (:func:`grant_layout`). The "no
advance map" value is a per-device setting (0x8 as rust-vmm, the default, or 0x100 as the spec).
A layout that needs more than :data:`MAX_REGIONS` regions (rings of several queues scattered
over grant space) is served by shadow virtqueues for that activation instead (logged).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from vhost_user import GuestMemoryError, LocalProtocolError, MemoryRegion, ProtocolFeatures, XenMemoryRegion, XenMmapFlags

from .errors import GuestFault, XenError
from .shadow import ShadowDataPath
from .xen.abi import XEN_PAGE_SHIFT
from .xen.gntdev import GrantDev, GrantMapping

if TYPE_CHECKING:
    from .device import DataPath, RingAddresses
    from .virtio_mmio import QueueConfig

__all__ = [
    "DEFAULT_MAX_BATCH_PAGES",
    "DEFAULT_MAX_PAGES",
    "GRANT_ADDR_BIT",
    "GRANT_SPACE",
    "GrantGuestMemory",
    "GrantMemoryStats",
    "GrantRegion",
    "GrantShadowDataPath",
    "GrantXenMmapExport",
    "MAX_REGIONS",
    "grant_layout",
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
        from .device import RingAddresses  # noqa: PLC0415 - device imports the data paths

        if self.shadowed:
            assert self.shadow is not None
            return self.shadow.open_queue(queue, features, kick_fd, resume=resume)
        self._kick[queue.index] = kick_fd
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

    def close_queue(self, index: int) -> None:
        if self.shadowed and self.shadow is not None:
            self.shadow.close_queue(index)
        self._kick.pop(index, None)

    def close(self) -> None:
        self._kick.clear()
        try:
            if self.shadow is not None:
                self.shadow.close()
        finally:
            if self._reader is not None:
                self._reader.close()
            self.gntdev.close()

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
