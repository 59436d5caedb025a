"""The guest's RAM as the daemon itself sees it: foreign mappings through /dev/xen/privcmd.

The shadow data path (:mod:`.shadow`) copies between guest buffers and its own bounce buffers, so
it needs nothing from guest memory but ``view(gpa, length) -> memoryview`` (the
:class:`vhost_user.virtqueue.GuestMemory` protocol). :class:`ForeignGuestMemory` offers that for
every RAM bank, mapped once, up front (one MMAPBATCH_V2 per bank; paged-out frames are retried).
Frames Xen refuses to map (holes, ballooned-out pages) are never touched: a view that covers one raises
:class:`~vhost_user.errors.GuestMemoryError` (a ``ValueError``, which the ring code turns into a
:class:`~vhost_user.virtqueue.RingError`), as does any range outside the banks.

Grant-mapped memory (gntdev) slots in behind the same ``view()``: a grant memory object resolves
grant addresses instead of guest-physical ones. The shadow engine takes views only while it copies
(copy-in when a chain is published, copy-back when it completes) and releases them at once, so a
grant memory may map a request's pages on the first view and unmap them on :meth:`close` or when its
own cache evicts them.
"""

from __future__ import annotations

import array
import bisect
import logging
from collections.abc import Sequence

from vhost_user import GuestMemoryError

from .errors import XenError
from .xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from .xen.privcmd import ForeignMapping, PrivCmd

__all__ = ["ForeignGuestMemory", "GuestMemoryError", "PAGED_RETRIES"]

log = logging.getLogger(__name__)

#: MMAPBATCH_V2 retries of frames that answered ENOENT (paged out or shared: Xen pages them in).
PAGED_RETRIES = 3


class _Bank:
    """One RAM bank foreign-mapped in one batch; frames that failed are refused on access.

    (The same refusal rule as :class:`~.xen_mapper.ForeignBacking`, which cannot be reused here:
    it needs an fd of its own per region and does not retry paged-out frames.)
    """

    def __init__(self, privcmd: PrivCmd, domid: int, gpa: int, size: int) -> None:
        first, count = gpa >> XEN_PAGE_SHIFT, size >> XEN_PAGE_SHIFT
        gfns = array.array("Q", range(first, first + count))
        try:
            self.fm: ForeignMapping = privcmd.map_foreign(domid, gfns)
        except XenError as e:
            raise GuestMemoryError(gpa, size, f"RAM bank of domain {domid} ({e})") from None
        try:
            for _ in range(PAGED_RETRIES):
                if not privcmd.retry_paged(self.fm, domid, gfns):
                    break
        except XenError as e:
            log.warning("domain %d: retrying paged frames at %#x failed: %s", domid, gpa, e)
        self.bad = self.fm.failed()  # sorted frame indices
        if self.bad:
            log.warning("domain %d: %d of %d frames at %#x could not be mapped; they are refused",
                        domid, len(self.bad), count, gpa)
        self.gpa, self.end = gpa, gpa + size
        self.mv = self.fm.view()

    def slice(self, offset: int, length: int) -> memoryview:
        if self.bad:
            first, last = offset >> XEN_PAGE_SHIFT, (offset + max(length, 1) - 1) >> XEN_PAGE_SHIFT
            i = bisect.bisect_left(self.bad, first)
            if i < len(self.bad) and self.bad[i] <= last:
                raise GuestMemoryError(self.gpa + offset, length, "guest-physical (frame not mapped)")
        return self.mv[offset : offset + length]

    def close(self) -> None:
        self.mv.release()
        self.fm.close()


class ForeignGuestMemory:
    """All RAM banks of domain ``domid`` foreign-mapped through ``privcmd``; ``view(gpa, length)``.

    Every bank is mapped at once (one MMAPBATCH_V2 each, paged-out frames retried); frames that
    still fail are refused on access (never touched). ``privcmd`` stays the caller's and must
    outlive this object. Raises :class:`GuestMemoryError` when a bank cannot be mapped at all.
    """

    def __init__(self, privcmd: PrivCmd, domid: int, banks: Sequence[tuple[int, int]]) -> None:
        self.domid = domid
        self._starts: list[int] = []
        self._banks: list[_Bank] = []  # sorted by gpa
        mapped = False
        try:
            for gpa, size in sorted(banks):
                if gpa % XEN_PAGE_SIZE or size % XEN_PAGE_SIZE or size <= 0:
                    raise GuestMemoryError(gpa, size, "RAM bank (not page aligned)")
                if self._banks and gpa < self._banks[-1].end:
                    raise GuestMemoryError(gpa, size, "RAM bank (overlapping the previous one)")
                self._banks.append(_Bank(privcmd, domid, gpa, size))
                self._starts.append(gpa)
            mapped = True
        finally:
            if not mapped:  # unmap the banks mapped so far
                self.close()
        log.debug("domain %d: %d RAM bank(s) foreign-mapped", domid, len(self._banks))

    def banks(self) -> list[tuple[int, int]]:
        return [(b.gpa, b.end - b.gpa) for b in self._banks]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical ``[gpa, gpa+length)``; GuestMemoryError outside RAM
        or over a frame that could not be mapped."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            bank = self._banks[i]
            if gpa + length <= bank.end:
                return bank.slice(gpa - bank.gpa, length)
        raise GuestMemoryError(gpa, length, "guest-physical")

    def close(self) -> None:
        """Unmap everything (views still held by callers must have been released). Idempotent."""
        banks, self._banks, self._starts = self._banks, [], []
        for bank in banks:
            bank.close()
