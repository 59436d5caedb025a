"""The guest's RAM as the daemon itself sees it: foreign mappings through /dev/xen/privcmd.

The shadow data path (:mod:`.shadow`) copies between guest buffers and its own bounce buffers, so
it needs nothing from guest memory but ``view(gpa, length) -> memoryview`` (the
:class:`vhost_user.virtqueue.GuestMemory` protocol). :class:`ForeignGuestMemory` offers that for
every RAM bank, mapped once, up front (one MMAPBATCH_V2 per bank). Frames Xen refuses to map (holes,
ballooned-out or paged-out pages) are never touched: a view that covers one raises
:class:`~vhost_user.errors.GuestMemoryError` (a ``ValueError``, which the ring code turns into a
:class:`~vhost_user.virtqueue.RingError`), as does any range outside the banks.

Grant-mapped memory (gntdev) slots in behind the same ``view()``: a grant memory object resolves
grant addresses instead of guest-physical ones. The shadow engine takes views only while it copies
(copy-in when a chain is published, copy-back when it completes) and releases them at once, so a
grant memory may map a request's pages on the first view and unmap them on :meth:`close` or when its
own cache evicts them.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence

from vhost_user import GuestMemoryError, XenMemoryRegion, XenMmapFlags

from .xen.abi import XEN_PAGE_SIZE
from .xen.privcmd import PRIVCMD_PATH, PrivCmd
from .xen_mapper import ForeignBacking

__all__ = ["ForeignGuestMemory", "GuestMemoryError"]

log = logging.getLogger(__name__)


class ForeignGuestMemory:
    """All RAM banks of domain ``domid`` foreign-mapped through privcmd; ``view(gpa, length)``.

    Each bank gets its own privcmd file (opened through ``privcmd``'s kernel, so the simulator's
    host answers it as it answers the daemon's) owned by a :class:`~.xen_mapper.ForeignBacking`,
    which maps it in one batch and refuses access to frames that failed. ``privcmd`` itself is not
    kept. Raises :class:`GuestMemoryError` when a bank cannot be mapped at all.
    """

    def __init__(self, privcmd: PrivCmd, domid: int, banks: Sequence[tuple[int, int]]) -> None:
        self.domid = domid
        self._starts: list[int] = []
        self._banks: list[tuple[int, int, ForeignBacking]] = []  # (gpa, end, backing), sorted by gpa
        try:
            for gpa, size in sorted(banks):
                if gpa % XEN_PAGE_SIZE or size % XEN_PAGE_SIZE or size <= 0:
                    raise GuestMemoryError(gpa, size, "RAM bank (not page aligned)")
                if self._banks and gpa < self._banks[-1][1]:
                    raise GuestMemoryError(gpa, size, "RAM bank (overlapping the previous one)")
                region = XenMemoryRegion(
                    guest_phys_addr=gpa, memory_size=size, userspace_addr=gpa, mmap_offset=0,
                    xen_mmap_flags=int(XenMmapFlags.FOREIGN), domid=domid,
                )
                fd = privcmd.kernel.open(PRIVCMD_PATH, os.O_RDWR)
                backing = ForeignBacking(privcmd.kernel, region, fd)  # owns fd, even when it raises
                self._banks.append((gpa, gpa + size, backing))
                self._starts.append(gpa)
        except BaseException:
            self.close()
            raise
        log.debug("domain %d: %d RAM bank(s) foreign-mapped", domid, len(self._banks))

    def banks(self) -> list[tuple[int, int]]:
        return [(gpa, end - gpa) for gpa, end, _ in self._banks]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical ``[gpa, gpa+length)``; GuestMemoryError outside RAM
        or over a frame that could not be mapped."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            start, end, backing = self._banks[i]
            if gpa + length <= end:
                try:
                    return backing.slice(gpa - start, length)
                except ValueError:  # a frame Xen refused to map (ForeignBacking's refusal)
                    raise GuestMemoryError(gpa, length, "guest-physical (unmapped frame)") from None
        raise GuestMemoryError(gpa, length, "guest-physical")

    def close(self) -> None:
        """Unmap everything (views still held by callers must have been released). Idempotent."""
        banks, self._banks, self._starts = self._banks, [], []
        for _, _, backing in banks:
            backing.close()
