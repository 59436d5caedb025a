"""Grant mode of the UML bridge (SIM-ONLY): UML's rings re-published in grant DMA space.

A grant-based Xen guest (Linux ``CONFIG_XEN_VIRTIO``, xl ``grant_usage=1``) puts
``(1 << 63) | (ref << 12) | offset`` addresses in its rings, grants every page a request touches to
the back-end domain (device-readable buffers read-only) and ends the grants when the device gives
the request back. UML's ``virtio_uml`` knows nothing of Xen grants: its rings hold UML-physical
addresses. So in grant mode the bridge is the guest's grant DMA layer (``grant-dma-ops.c``):

* each of UML's queues gets a *bridge ring* of the same size in pages the bridge owns (an area
  appended to UML's memory file, which UML never maps), granted read-write to dom0 for the queue's
  lifetime; the device is given its grant addresses;
* on a kick, every new chain of UML's ring is walked, the pages of each buffer granted (consecutive
  references, read-only unless the descriptor is device-writable) and the chain written at the same
  descriptor indices of the bridge ring with grant addresses, then made available there;
* on a used-buffer interrupt, the bridge ring's used entries are copied to UML's used ring and the
  chains' grants released.

The descriptor indices are UML's own, so no free list is needed. UML is offered neither
INDIRECT_DESC nor EVENT_IDX in this mode (indirect tables would need translating too; without
EVENT_IDX, kicks and interrupts are driven by the ring flags, which both sides leave at 0).

Granting costs a round trip to the simulated host per page, so grants are kept for reuse
(**persistent grants**, as blkfront's ``feature-persistent``): a run of pages granted with a given
access stays granted while cached; at most :data:`GRANT_CACHE_RUNS` idle runs are kept, the oldest
ended first. With ``cache_runs=0`` every request's grants end when it completes (Linux's behaviour).
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["GRANT_CACHE_RUNS", "GrantRing", "GrantRingError", "GrantStats", "RingArea", "grant_address"]

log = logging.getLogger(__name__)

PAGE: Final = 4096
GRANT_ADDR_BIT: Final = 1 << 63  # XEN_GRANT_DMA_ADDR_OFF
GRANT_CACHE_RUNS: Final = 1024
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT = 1, 2, 4
_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")


def grant_address(ref: int, offset: int = 0) -> int:
    return GRANT_ADDR_BIT | ((ref << 12) + offset)


class GrantRingError(Exception):
    """UML's ring holds something the grant layer cannot translate (the queue is then stuck)."""


@dataclass
class GrantStats:
    chains: int = 0
    granted_pages: int = 0  # grants made (round trips to the host)
    reused_runs: int = 0  # buffers served by a persistent grant
    ended: int = 0  # grants ended


class RingArea:
    """Bump allocator over the bridge's private pages ``[gpa, gpa + size)`` (per queue index, reused)."""

    def __init__(self, gpa: int, size: int) -> None:
        self.gpa, self.size, self.next = gpa, size, gpa
        self.by_queue: dict[int, tuple[int, int]] = {}

    def for_queue(self, index: int, pages: int) -> int:
        got = self.by_queue.get(index)
        if got is not None and got[1] >= pages:
            return got[0]
        if self.next + pages * PAGE > self.gpa + self.size:
            raise GrantRingError(f"no room for the rings of queue {index} ({pages} pages)")
        start, self.next = self.next, self.next + pages * PAGE
        self.by_queue[index] = (start, pages)
        return start


class _Run:
    __slots__ = ("refs", "users")

    def __init__(self, refs: list[int]) -> None:
        self.refs, self.users = refs, 0


class GrantRing:
    """One UML queue re-published in grant space. ``ram`` is a writable memoryview of the domain's
    RAM (guest-physical = offset); ``grant(gfn, readonly) -> ref`` and ``end(ref)`` are the
    guest's grant-table operations."""

    def __init__(self, ram: memoryview, num: int, uml: tuple[int, int, int], area_gpa: int,
                 grant: Callable[[int, bool], int], end: Callable[[int], None], *, cache_runs: int = GRANT_CACHE_RUNS,
                 stats: GrantStats | None = None) -> None:
        self.ram, self.num = ram, num
        # Words the other side polls (the bridge ring's avail idx and entries, UML's used idx) are
        # stored through this "H" cast: one 16-bit store each. struct.pack_into zeroes its target
        # before writing, so a poller in another process could read 0 (see vhost_user.virtqueue).
        self._w16 = ram.cast("H")
        self.uml_desc, self.uml_avail, self.uml_used = uml
        self._grant, self._end = grant, end
        self.cache_runs = cache_runs
        self.stats = stats or GrantStats()
        # the bridge ring: desc | avail | used, in granted pages
        self.desc = area_gpa
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) & ~3
        end_b = self.used + 6 + 8 * num
        self.ram[self.desc:end_b] = bytes(end_b - self.desc)
        self.ring_refs = self._grant_pages(self.desc >> 12, ((end_b - 1) >> 12) - (self.desc >> 12) + 1, False)
        self.ring_base = self.desc & ~(PAGE - 1)
        self.uml_used_idx = self._u16(self.uml_used + 2)
        self.uml_last_avail = self.uml_used_idx  # what UML made available and got no answer for yet comes next
        self.avail_idx = 0
        self.used_last = 0
        self._inflight: dict[int, list[_Run]] = {}  # head -> the runs its buffers use
        self._runs: OrderedDict[tuple[int, int, bool], _Run] = OrderedDict()  # (gfn, pages, readonly)
        self.closed = False

    # --- addresses the device is given ----------------------------------------------------------
    def grant_addr(self, gpa: int) -> int:
        return grant_address(self.ring_refs[0], gpa - self.ring_base)

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.grant_addr(self.desc), self.grant_addr(self.avail), self.grant_addr(self.used)

    # --- driver side: UML's new chains → the bridge ring -------------------------------------------
    def pump(self) -> int:
        """Publish UML's newly available chains on the bridge ring; returns how many."""
        if self.closed:
            return 0
        idx = self._u16(self.uml_avail + 2)
        n = 0
        while self.uml_last_avail != idx:
            head = self._u16(self.uml_avail + 4 + 2 * (self.uml_last_avail % self.num))
            if head >= self.num or head in self._inflight:
                raise GrantRingError(f"UML made descriptor {head} available twice or out of range")
            self._translate(head)
            self._w16[(self.avail + 4 + 2 * (self.avail_idx % self.num)) >> 1] = head
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self.uml_last_avail = (self.uml_last_avail + 1) & 0xFFFF
            n += 1
        if n:
            self._w16[(self.avail + 2) >> 1] = self.avail_idx  # after the entries (x86 TSO), one store
            self.stats.chains += n
        return n

    def _translate(self, head: int) -> None:
        runs: list[_Run] = []
        i, seen = head, 0
        done = False
        try:
            while True:
                seen += 1
                if seen > self.num:
                    raise GrantRingError(f"chain {head} loops")
                addr, length, flags, nxt = _DESC.unpack_from(self.ram, self.uml_desc + 16 * i)
                if flags & VRING_DESC_F_INDIRECT:
                    raise GrantRingError(f"chain {head}: indirect descriptor (not offered in grant mode)")
                gaddr = GRANT_ADDR_BIT
                if length:
                    run = self._run(addr, length, readonly=not flags & VRING_DESC_F_WRITE)
                    runs.append(run)
                    gaddr = grant_address(run.refs[0], addr & (PAGE - 1))
                _DESC.pack_into(self.ram, self.desc + 16 * i, gaddr, length, flags, nxt)
                if not flags & VRING_DESC_F_NEXT:
                    break
                if nxt >= self.num:
                    raise GrantRingError(f"chain {head}: next {nxt} out of range")
                i = nxt
            done = True
        finally:
            if not done:  # a bad chain or a refused grant: give back what this chain granted so far
                self._release(runs)
        self._inflight[head] = runs

    def _run(self, addr: int, length: int, *, readonly: bool) -> _Run:
        first = addr >> 12
        pages = ((addr + length - 1) >> 12) - first + 1
        if addr + length > len(self.ram):
            raise GrantRingError(f"buffer [{addr:#x}, +{length:#x}) is outside UML's memory")
        key = (first, pages, readonly)
        run = self._runs.get(key)
        if run is not None:
            self._runs.move_to_end(key)
            self.stats.reused_runs += 1
        else:
            run = _Run(self._grant_pages(first, pages, readonly))
            if self.cache_runs:
                self._runs[key] = run
        run.users += 1
        return run

    def _grant_pages(self, first: int, pages: int, readonly: bool) -> list[int]:
        refs: list[int] = []
        done = False
        try:
            for gfn in range(first, first + pages):
                refs.append(self._grant(gfn, readonly))
            done = True
        finally:
            if not done:  # the grant table refused a page: end the ones granted before it
                self._end_refs(refs)
        self.stats.granted_pages += pages
        if refs != list(range(refs[0], refs[0] + pages)):
            self._end_refs(refs)
            raise GrantRingError(f"grant references {refs} are not consecutive")
        return refs

    # --- device side: the bridge ring's used entries → UML's used ring -----------------------------
    def complete(self) -> int:
        """Copy the device's new used entries to UML's used ring; returns how many."""
        if self.closed:
            return 0
        idx = self._u16(self.used + 2)
        n = 0
        while self.used_last != idx:
            head, written = _USED.unpack_from(self.ram, self.used + 4 + 8 * (self.used_last % self.num))
            _USED.pack_into(self.ram, self.uml_used + 4 + 8 * (self.uml_used_idx % self.num), head, written)
            self.uml_used_idx = (self.uml_used_idx + 1) & 0xFFFF
            self.used_last = (self.used_last + 1) & 0xFFFF
            self._release(self._inflight.pop(head, []))
            n += 1
        if n:
            self._w16[(self.uml_used + 2) >> 1] = self.uml_used_idx  # one store: UML polls it
        return n

    def _release(self, runs: list[_Run]) -> None:
        for run in runs:
            run.users -= 1
            if not self.cache_runs:
                self._end_refs(run.refs)
        while len(self._runs) > self.cache_runs:
            key, oldest = next(iter(self._runs.items()))
            if oldest.users:
                break  # still in flight: trimmed once it completes
            del self._runs[key]
            self._end_refs(oldest.refs)

    def close(self) -> None:
        """The queue is reset: end every grant (ring and buffers), as the guest does at reset."""
        if self.closed:
            return
        self.closed = True
        self._w16.release()
        ended = set()
        for runs in self._inflight.values():
            for run in runs:
                if id(run) not in ended and not self.cache_runs:
                    ended.add(id(run))
                    self._end_refs(run.refs)
        self._inflight.clear()
        for run in self._runs.values():
            self._end_refs(run.refs)
        self._runs.clear()
        self._end_refs(self.ring_refs)

    def _end_refs(self, refs: list[int]) -> None:
        for ref in refs:
            try:
                self._end(ref)
            except OSError as exc:  # the domain is gone: nothing to give back
                log.info("ending grant %d failed: %s", ref, exc)
            self.stats.ended += 1

    def _u16(self, gpa: int) -> int:
        return int(self._w16[gpa >> 1])
