"""Guest RAM of a simulated domain: banks backed by one sparse memfd, with unpopulated holes.

Layouts (docs/xen-abi.md §6): Arm64 (default) puts up to 3 GiB in RAM0 at 0x40000000 and the rest in RAM1 at
0x200000000; x86 HVM puts low RAM below 0xF0000000 and the rest above 4 GiB. Holes are GFN ranges
inside a bank that are not populated (ballooned out): foreign-mapping them fails per page with
EINVAL, as Xen's ``xenmem_add_foreign_to_p2m`` / ``p2m_add_foreign`` does for a GFN without a page.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import mmap
import os
from dataclasses import dataclass

from xen_vhost_master.xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE

__all__ = ["Arch", "Extent", "GuestMemory", "bank_layout"]

GIB = 1 << 30
ARM_RAM0_BASE, ARM_RAM0_SIZE = 0x40000000, 0xC0000000  # xen/arch-arm.h GUEST_RAM0_*
ARM_RAM1_BASE = 0x200000000  # GUEST_RAM1_BASE
X86_LOWMEM_END = 0xF0000000  # libxl default MMIO hole start
X86_HIGHMEM_BASE = 1 << 32


class Arch(enum.Enum):
    ARM64 = "arm64"
    X86_64 = "x86_64"


def bank_layout(arch: Arch, mem_bytes: int) -> list[tuple[int, int]]:
    """The (gpa, size) RAM banks libxl gives a guest of ``mem_bytes``."""
    if arch is Arch.ARM64:
        low = min(mem_bytes, ARM_RAM0_SIZE)
        banks = [(ARM_RAM0_BASE, low)]
        if mem_bytes > low:
            banks.append((ARM_RAM1_BASE, mem_bytes - low))
        return banks
    low = min(mem_bytes, X86_LOWMEM_END)
    banks = [(0, low)]
    if mem_bytes > low:
        banks.append((X86_HIGHMEM_BASE, mem_bytes - low))
    return banks


@dataclass(frozen=True)
class Extent:
    """Populated GFNs ``[gfn, gfn + npages)`` backed by memfd pages from ``page_offset``."""

    gfn: int
    npages: int
    page_offset: int

    @property
    def end(self) -> int:
        return self.gfn + self.npages


class GuestMemory:
    """RAM banks in one memfd (sparse: only touched pages cost memory)."""

    def __init__(
        self,
        banks: list[tuple[int, int]],
        holes: list[tuple[int, int]] = (),  # type: ignore[assignment]
        name: str = "guest",
        memfd: int | None = None,
    ) -> None:
        """A new RAM memfd, or (``memfd`` given) a view of an existing one (taken over: closed by close())."""
        for gpa, size in list(banks) + list(holes):
            if gpa % XEN_PAGE_SIZE or size % XEN_PAGE_SIZE or size <= 0:
                raise ValueError(f"bank/hole ({gpa:#x}, {size:#x}) is not page aligned")
        self.banks = sorted(banks)
        self.holes = sorted(holes)
        total = sum(size for _gpa, size in self.banks)
        if memfd is None:
            memfd = os.memfd_create(f"xen-sim-{name}-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(memfd, total)
            except OSError:
                os.close(memfd)
                raise
        self.memfd = memfd
        self.size = total
        extents: list[Extent] = []
        offset = 0
        for gpa, size in self.banks:
            start, end = gpa >> XEN_PAGE_SHIFT, (gpa + size) >> XEN_PAGE_SHIFT
            cuts = [(h >> XEN_PAGE_SHIFT, (h + hs) >> XEN_PAGE_SHIFT) for h, hs in self.holes]
            cur = start
            for hs, he in sorted(cuts):
                if he <= cur or hs >= end:
                    continue
                if hs > cur:
                    extents.append(Extent(cur, hs - cur, offset + (cur - start)))
                cur = max(cur, he)
            if cur < end:
                extents.append(Extent(cur, end - cur, offset + (cur - start)))
            offset += end - start
        self.extents = extents
        self._starts = [e.gfn for e in extents]
        self.paged: list[tuple[int, int]] = []  # [start, end) GFNs currently paged out (see page_in)
        try:
            self._map = mmap.mmap(self.memfd, total) if total else None
        except OSError:
            os.close(self.memfd)
            raise

    def close(self) -> None:
        if self._map is not None:
            # A guest driver still holding ring views (its close() never ran, e.g. a failed test) must
            # not turn this into a second error: the mapping then goes when the last view does.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def extent_of(self, gfn: int) -> Extent | None:
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0 and self.extents[i].gfn <= gfn < self.extents[i].end:
            return self.extents[i]
        return None

    def next_extent_start(self, gfn: int) -> int | None:
        i = bisect.bisect_right(self._starts, gfn)
        return self.extents[i].gfn if i < len(self.extents) else None

    def max_gfn(self) -> int:
        return self.extents[-1].end - 1 if self.extents else 0

    def populated_pages(self) -> int:
        return sum(e.npages for e in self.extents)

    def resolve(self, gfn: int, count: int) -> list[tuple[int, int, int]]:
        """Split ``[gfn, gfn+count)`` into ``(count, page_offset or -1 for a hole, ...)`` pieces."""
        out: list[tuple[int, int, int]] = []
        cur, end = gfn, gfn + count
        while cur < end:
            ext = self.extent_of(cur)
            if ext is not None:
                n = min(end, ext.end) - cur
                out.append((cur, n, ext.page_offset + (cur - ext.gfn)))
            else:
                nxt = self.next_extent_start(cur)
                n = (min(end, nxt) if nxt is not None else end) - cur
                out.append((cur, n, -1))
            cur += n
        return out

    def page_in(self, gfn: int, count: int) -> list[tuple[int, int]]:
        """The paged-out sub-ranges of ``[gfn, gfn+count)`` as (gfn, n); they are paged in now
        (a foreign map of a paged-out frame fails with ENOENT and triggers the page-in, as
        xenpaging does: the caller retries)."""
        hit: list[tuple[int, int]] = []
        keep: list[tuple[int, int]] = []
        end = gfn + count
        for ps, pe in self.paged:
            lo, hi = max(ps, gfn), min(pe, end)
            if lo < hi:
                hit.append((lo, hi - lo))
                if ps < lo:
                    keep.append((ps, lo))
                if hi < pe:
                    keep.append((hi, pe))
            else:
                keep.append((ps, pe))
        self.paged = keep
        return hit

    def view(self, gpa: int, length: int) -> memoryview:
        """GuestRam.view: writable view of populated RAM; ValueError if any byte is a hole/outside."""
        if length <= 0 or gpa < 0:
            raise ValueError("empty or negative range")
        first, last = gpa >> XEN_PAGE_SHIFT, (gpa + length - 1) >> XEN_PAGE_SHIFT
        ext = self.extent_of(first)
        if ext is None or last >= ext.end or self._map is None:
            raise ValueError(f"[{gpa:#x}, {gpa + length:#x}) is not (all) guest RAM")
        off = ((ext.page_offset + first - ext.gfn) << XEN_PAGE_SHIFT) + (gpa & (XEN_PAGE_SIZE - 1))
        return memoryview(self._map)[off : off + length]

    def page_view(self, page_offset: int) -> memoryview:
        assert self._map is not None
        return memoryview(self._map)[page_offset << XEN_PAGE_SHIFT : (page_offset + 1) << XEN_PAGE_SHIFT]
