"""Inflight I/O tracking for split rings (vhost-user.rst "Inflight I/O tracking"), back-end side.

With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD the back-end keeps, in a shared memory area that the
front-end holds on to across back-end restarts, which descriptor chains it has taken from the
available ring and not yet put in the used ring. A restarted back-end gets the area back
(SET_INFLIGHT_FD) and submits those chains again, so an out-of-order back-end that dies loses
and repeats nothing, where restarting at the used index would (chains completed out of order
ahead of an older one would run twice, and the older one never).

Layout (libvhost-user ``VuVirtqInflight`` / ``VuDescStateSplit``; little-endian, one region per
queue, each region's size rounded up to ``INFLIGHT_ALIGNMENT``)::

    struct DescStateSplit {            /* 16 bytes */
        uint8_t  inflight;             /* 1: taken from the avail ring, not yet used */
        uint8_t  padding[5];
        uint16_t next;                 /* packed rings only */
        uint64_t counter;              /* order in which chains were taken */
    };
    struct QueueRegionSplit {          /* 16-byte header */
        uint64_t features;
        uint16_t version;              /* 1; 0 = never used: initialise, nothing to resubmit */
        uint16_t desc_num;             /* queue size */
        uint16_t last_batch_head;      /* head of the last chain being put in the used ring */
        uint16_t used_idx;             /* used idx as of the last completed put */
        struct DescStateSplit desc[desc_num];
    };

The update order is libvhost-user's (``vu_queue_inflight_get``/``pre_put``/``post_put``): set the
counter, then ``inflight = 1``, before the chain is processed; on completion write the used
element, set ``last_batch_head``, publish the used idx, then clear ``inflight`` and copy the used
idx. On restart (``vu_check_queue_inflights``): if the region's used idx differs from the ring's,
the back-end died between publishing and clearing, so ``desc[last_batch_head]`` is done; the
chains still marked are resubmitted in counter order and consumption resumes at
``used_idx + in flight``.

Pure: works on a writable buffer (an mmap of the fd), no I/O, no logging.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

from .errors import InflightRegionError
from .virtqueue import MAX_QUEUE_SIZE

__all__ = [
    "INFLIGHT_VERSION",
    "INFLIGHT_ALIGNMENT",
    "InflightQueue",
    "InflightRegion",
    "queue_region_size",
    "region_size",
    "format_region",
]

#: vhost-user.rst: "version: the version of this region; current version is 1".
INFLIGHT_VERSION: Final = 1
#: libvhost-user ``INFLIGHT_ALIGNMENT``: each queue region starts on a 64-byte boundary.
INFLIGHT_ALIGNMENT: Final = 64
#: The u16 num_queues field allows more; libvhost-user's VHOST_USER_MAX_QUEUES-like bound.
MAX_QUEUES: Final = 1024

_HDR = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
_DESC = struct.Struct("<B5xHQ")  # inflight, padding[5], next, counter
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_VERSION_OFF, _DESC_NUM_OFF, _LAST_BATCH_OFF, _USED_IDX_OFF = 8, 10, 12, 14
_COUNTER_OFF = 8  # within a DescStateSplit
assert _HDR.size == 16 and _DESC.size == 16


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: header + 16 bytes per descriptor, rounded up to 64."""
    raw = _HDR.size + _DESC.size * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) & ~(INFLIGHT_ALIGNMENT - 1)


def region_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole area for ``num_queues`` queues of ``queue_size`` (what GET_INFLIGHT_FD sizes)."""
    return num_queues * queue_region_size(queue_size)


def _check_shape(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= MAX_QUEUES:
        raise InflightRegionError(f"num_queues {num_queues} not in [1, {MAX_QUEUES}]")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise InflightRegionError(f"queue_size {queue_size} is not a power of two in [1, {MAX_QUEUE_SIZE}]")


def format_region(buf: Any, num_queues: int, queue_size: int) -> None:
    """Zero ``buf`` and write each queue's header (version 1, ``desc_num``): a fresh area."""
    _check_shape(num_queues, queue_size)
    mv = memoryview(buf).cast("B")
    with mv:
        need = region_size(num_queues, queue_size)
        if len(mv) < need:
            raise InflightRegionError(f"{len(mv)} bytes, {need} needed for {num_queues} x {queue_size}")
        mv[:need] = bytes(need)
        step = queue_region_size(queue_size)
        for q in range(num_queues):
            _HDR.pack_into(mv, q * step, 0, INFLIGHT_VERSION, queue_size, 0, 0)


class InflightQueue:
    """One queue's tracking region (a writable view of ``queue_region_size(desc_num)`` bytes).

    Keeps, besides the shared bytes, the resubmission list found by :meth:`recover` and the
    next counter value. Both survive re-creating the ring object (a memory table re-sent while
    the ring runs), so only a ring (re)start calls :meth:`recover`.
    """

    __slots__ = ("_mv", "desc_num", "counter", "_resubmit", "resubmitted")

    def __init__(self, view: memoryview, desc_num: int) -> None:
        if len(view) < queue_region_size(desc_num):
            raise InflightRegionError(f"queue region of {len(view)} bytes for {desc_num} descriptors")
        self._mv = view
        self.desc_num = desc_num
        self.counter = 0
        self._resubmit: deque[int] = deque()
        self.resubmitted = 0  # chains handed out again by next_resubmit() (a statistic)

    # -- header fields --------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(_U16.unpack_from(self._mv, _VERSION_OFF)[0])

    @property
    def used_idx(self) -> int:
        return int(_U16.unpack_from(self._mv, _USED_IDX_OFF)[0])

    @property
    def last_batch_head(self) -> int:
        return int(_U16.unpack_from(self._mv, _LAST_BATCH_OFF)[0])

    def _desc_off(self, head: int) -> int:
        if not 0 <= head < self.desc_num:
            raise InflightRegionError(f"head {head} out of range ({self.desc_num} descriptors)")
        return _HDR.size + _DESC.size * head

    def is_inflight(self, head: int) -> bool:
        return bool(self._mv[self._desc_off(head)])

    def in_flight(self) -> list[int]:
        """Heads marked in flight, oldest (lowest counter) first."""
        marked = []
        for head in range(self.desc_num):
            flag, _next, counter = _DESC.unpack_from(self._mv, _HDR.size + _DESC.size * head)
            if flag:
                marked.append((counter, head))
        return [head for _c, head in sorted(marked)]

    # -- restart ----------------------------------------------------------------------------
    def recover(self, ring_used_idx: int, ring_size: int) -> int | None:
        """A ring (re)starts with this region; ``ring_used_idx`` is the used ring's idx now.

        Returns the avail index to resume at (``used_idx + chains in flight``), or None when
        the region was never used (version 0: it is initialised, the SET_VRING_BASE value
        stands). Queues the in-flight heads for :meth:`next_resubmit`, oldest first.
        Raises :class:`InflightRegionError` for contents no back-end could have written.
        """
        ring_used_idx &= 0xFFFF
        if ring_size > self.desc_num:
            raise InflightRegionError(f"ring of {ring_size} entries, region tracks {self.desc_num}")
        self._resubmit.clear()
        self.counter = 0
        version = self.version
        if version == 0:
            _U16.pack_into(self._mv, _DESC_NUM_OFF, self.desc_num)
            _U16.pack_into(self._mv, _USED_IDX_OFF, ring_used_idx)
            _U16.pack_into(self._mv, _VERSION_OFF, INFLIGHT_VERSION)
            return None
        if version != INFLIGHT_VERSION:
            raise InflightRegionError(f"version {version}, expected {INFLIGHT_VERSION}")
        if self.used_idx != ring_used_idx:
            # Died after publishing the used idx, before clearing the chain's flag: it is done.
            last = self.last_batch_head
            self._mv[self._desc_off(last)] = 0
            _U16.pack_into(self._mv, _USED_IDX_OFF, ring_used_idx)
        marked: list[tuple[int, int]] = []
        for head in range(self.desc_num):
            flag, _next, counter = _DESC.unpack_from(self._mv, _HDR.size + _DESC.size * head)
            if flag == 0:
                continue
            if flag != 1:
                raise InflightRegionError(f"descriptor {head}: inflight byte {flag}")
            if head >= ring_size:
                raise InflightRegionError(f"descriptor {head} in flight on a ring of {ring_size}")
            marked.append((counter, head))
        if len({c for c, _h in marked}) != len(marked):
            raise InflightRegionError("two chains in flight with the same counter")
        marked.sort()
        self._resubmit.extend(head for _c, head in marked)
        if marked:
            self.counter = marked[-1][0] + 1
        return (ring_used_idx + len(marked)) & 0xFFFF

    @property
    def pending_resubmit(self) -> int:
        return len(self._resubmit)

    def next_resubmit(self) -> int | None:
        """The next chain to submit again (it stays marked in flight), or None."""
        if not self._resubmit:
            return None
        self.resubmitted += 1
        return self._resubmit.popleft()

    # -- running ----------------------------------------------------------------------------
    def begin(self, head: int) -> None:
        """Chain ``head`` was taken from the avail ring: counter first, then the flag."""
        off = self._desc_off(head)
        _U64.pack_into(self._mv, off + _COUNTER_OFF, self.counter & 0xFFFF_FFFF_FFFF_FFFF)
        self.counter += 1
        self._mv[off] = 1

    def pre_put(self, head: int) -> None:
        """About to publish the used idx for ``head`` (its used element is written)."""
        self._desc_off(head)
        _U16.pack_into(self._mv, _LAST_BATCH_OFF, head)

    def post_put(self, head: int, used_idx: int) -> None:
        """The used idx (now ``used_idx``) covers ``head``: clear its flag, then record the idx."""
        self._mv[self._desc_off(head)] = 0
        _U16.pack_into(self._mv, _USED_IDX_OFF, used_idx & 0xFFFF)

    def clear(self) -> None:
        """Forget everything (a reset queue has nothing in flight): the region reads as never used,
        so the next :meth:`recover` initialises it."""
        self._mv[:] = bytes(len(self._mv))
        _U16.pack_into(self._mv, _DESC_NUM_OFF, self.desc_num)
        self._resubmit.clear()
        self.counter = 0

    def release(self) -> None:
        self._mv.release()


class InflightRegion:
    """The whole area (a writable buffer, e.g. the mmap of the SET_INFLIGHT_FD fd) split into
    one :class:`InflightQueue` per queue. Writes ``desc_num`` into each header, as libvhost-user
    does on SET_INFLIGHT_FD. :meth:`release` before closing the buffer."""

    def __init__(self, buf: Any, num_queues: int, queue_size: int) -> None:
        _check_shape(num_queues, queue_size)
        mv = memoryview(buf).cast("B")
        need = region_size(num_queues, queue_size)
        if mv.readonly or len(mv) < need:
            have, readonly = len(mv), mv.readonly
            mv.release()
            raise InflightRegionError(
                f"{have} bytes{' read-only' if readonly else ''}, {need} needed for "
                f"{num_queues} queue(s) of {queue_size}"
            )
        self._mv = mv
        self.num_queues = num_queues
        self.queue_size = queue_size
        step = queue_region_size(queue_size)
        self.queues: Sequence[InflightQueue] = tuple(
            InflightQueue(mv[q * step : (q + 1) * step], queue_size) for q in range(num_queues)
        )
        for q in range(num_queues):
            _U16.pack_into(mv, q * step + _DESC_NUM_OFF, queue_size)

    def release(self) -> None:
        for q in self.queues:
            q.release()
        self._mv.release()
