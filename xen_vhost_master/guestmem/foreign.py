"""Guest RAM foreign-mapped through /dev/xen/privcmd, in both roles: one mapping rule.

:class:`ForeignRange` is the rule: a range of a domain's frames mapped with one MMAPBATCH_V2
(frames that answer ENOENT — paged out or shared — are retried :data:`PAGED_RETRIES` times).
Frames Xen still refuses to map (holes, ballooned-out pages) are never touched: touching one would
fault the process, so a slice that covers one raises :class:`~vhost_user.errors.GuestMemoryError`
(a ``ValueError``, which the ring code turns into a :class:`~vhost_user.virtqueue.RingError`).

* The daemon: :class:`ForeignGuestMemory`, every RAM bank mapped once, up front, behind
  ``view(gpa, length) -> memoryview`` (the :class:`vhost_user.virtqueue.GuestMemory` protocol),
  all the shadow data path needs; :func:`foreign_reader` for a few bytes now and then.
* A back-end (XEN_MMAP FOREIGN regions, :mod:`xen_vhost_master.backend.mapper`):
  :class:`ForeignBacking`, one region over the privcmd fd the front-end passed.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Final

from vhost_user import GuestMemoryError, XenMemoryRegion

from ..errors import GuestFault, XenError
from ..xen.abi import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from ..xen.kernel import Kernel
from ..xen.privcmd import ForeignMapping, FrameArray, PrivCmd

__all__ = ["PAGED_RETRIES", "ForeignBacking", "ForeignGuestMemory", "ForeignRange", "GuestMemoryError", "foreign_reader"]

log = logging.getLogger(__name__)

#: MMAPBATCH_V2 retries of frames that answered ENOENT (paged out or shared: Xen pages them in).
PAGED_RETRIES: Final = 3


class ForeignRange:
    """Guest-physical ``[gpa, gpa + size)`` of ``domid`` mapped in one batch; frames that failed
    are refused on access. GuestMemoryError if the range is not page aligned or cannot be mapped."""

    def __init__(self, privcmd: PrivCmd, domid: int, gpa: int, size: int, *, what: str = "RAM bank") -> None:
        if gpa % XEN_PAGE_SIZE or size % XEN_PAGE_SIZE or size <= 0:
            raise GuestMemoryError(gpa, size, f"{what} (not page aligned)")
        first, count = gpa >> XEN_PAGE_SHIFT, size >> XEN_PAGE_SHIFT
        with FrameArray.consecutive(first, count) as gfns:
            try:
                self.fm: ForeignMapping = privcmd.map_foreign(domid, gfns.frames)
            except XenError as e:
                log.error("cannot map domain %d at %#x: %s", domid, gpa, e)
                raise GuestMemoryError(gpa, size, f"{what} of domain {domid} ({e.strerror})") from None
            try:
                for _ in range(PAGED_RETRIES):
                    if not privcmd.retry_paged(self.fm, domid, gfns.frames):
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
            self.check(offset, length)
        return self.mv[offset : offset + length]

    def check(self, offset: int, length: int) -> None:
        """GuestMemoryError if ``[offset, offset + length)`` covers a frame that failed to map."""
        if self.bad:
            first, last = offset >> XEN_PAGE_SHIFT, (offset + max(length, 1) - 1) >> XEN_PAGE_SHIFT
            i = bisect.bisect_left(self.bad, first)
            if i < len(self.bad) and self.bad[i] <= last:
                raise GuestMemoryError(self.gpa + offset, length, "guest-physical (a frame Xen did not map)")

    def close(self) -> None:
        self.mv.release()
        self.fm.close()


class ForeignGuestMemory:
    """All RAM banks of domain ``domid`` foreign-mapped through ``privcmd``; ``view(gpa, length)``.

    Every bank is mapped at once (:class:`ForeignRange`). ``privcmd`` stays the caller's and must
    outlive this object. Raises :class:`GuestMemoryError` when a bank cannot be mapped at all.
    """

    def __init__(self, privcmd: PrivCmd, domid: int, banks: Sequence[tuple[int, int]]) -> None:
        self.domid = domid
        self._starts: list[int] = []
        self._banks: list[ForeignRange] = []  # sorted by gpa
        mapped = False
        try:
            for gpa, size in sorted(banks):
                if self._banks and gpa < self._banks[-1].end:
                    raise GuestMemoryError(gpa, size, "RAM bank (overlapping the previous one)")
                self._banks.append(ForeignRange(privcmd, domid, gpa, size))
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
                offset = gpa - bank.gpa
                if bank.bad:
                    bank.check(offset, length)
                return bank.mv[offset : offset + length]  # (ForeignRange.slice, one call less per buffer)
        raise GuestMemoryError(gpa, length, "guest-physical")

    def check(self, gpa: int, length: int) -> None:
        """Raise as :meth:`view` would for ``[gpa, gpa+length)``, without making a view (what the
        ring walk validates a chain's buffers with: vhost_user.virtqueue.GuestMemory)."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            bank = self._banks[i]
            if gpa + length <= bank.end:
                if bank.bad:
                    bank.check(gpa - bank.gpa, length)
                return
        raise GuestMemoryError(gpa, length, "guest-physical")

    def spans(self) -> list[tuple[int, memoryview]]:
        """``(gpa, view)`` of every bank whose frames all mapped: ``view(gpa + o, n)`` is
        ``view[o : o + n]`` there (vhost_user.virtqueue.GuestMemory)."""
        return [(b.gpa, b.mv) for b in self._banks if not b.bad]

    def close(self) -> None:
        """Unmap everything (views still held by callers must have been released). Idempotent."""
        banks, self._banks, self._starts = self._banks, [], []
        for bank in banks:
            bank.close()


class ForeignBacking:
    """A back-end's XEN_MMAP FOREIGN region (flag 0x1): the guest's ``[guest_phys_addr, +size)``
    of ``domid`` mapped through the privcmd fd the front-end passed, which this object owns."""

    def __init__(self, kernel: Kernel, region: XenMemoryRegion, fd: int) -> None:
        self._privcmd = PrivCmd(kernel, fd=fd)
        try:
            self._range = ForeignRange(self._privcmd, region.domid, region.guest_phys_addr, region.memory_size,
                                       what="Xen region")
        except GuestMemoryError:
            self._privcmd.close()  # we own the fd, mapped or not
            raise

    def slice(self, offset: int, length: int) -> memoryview:
        return self._range.slice(offset, length)

    def close(self) -> None:
        self._range.close()
        self._privcmd.close()


def _short_lived(privcmd: PrivCmd, domid: int, gpa: int, length: int,
                 use: Callable[[memoryview], bytes | None]) -> bytes | None:
    """``use`` on the ``length`` bytes at ``gpa``, through a foreign mapping of their pages that
    lives for the call only."""
    first = gpa >> XEN_PAGE_SHIFT
    count = ((gpa + length - 1) >> XEN_PAGE_SHIFT) - first + 1
    fm = privcmd.map_foreign_range(domid, first, count)
    try:
        if not fm.ok():
            raise GuestFault(gpa, "not mapped")
        with fm.view() as view:
            start = gpa & (XEN_PAGE_SIZE - 1)
            return use(view[start : start + length])
    finally:
        fm.close()


def foreign_reader(privcmd: PrivCmd, domid: int) -> Callable[[int, int], bytes]:
    """Read a few bytes of guest memory through a short-lived foreign mapping (rare, small reads:
    e.g. a ring's used index when a back-end must be resumed)."""

    def read(gpa: int, length: int) -> bytes:
        return _short_lived(privcmd, domid, gpa, length, bytes) or b""

    return read


def foreign_writer(privcmd: PrivCmd, domid: int) -> Callable[[int, bytes], None]:
    """Write a few bytes of guest memory through a short-lived foreign mapping (rare, small
    writes: e.g. a going device's notification suppression in a ring the back-end owned)."""

    def write(gpa: int, data: bytes) -> None:
        def put(view: memoryview) -> None:
            view[:] = data

        _short_lived(privcmd, domid, gpa, len(data), put)

    return write
