"""Shadow virtqueues: any vhost-user back-end on guest memory it cannot map (real Xen).

:class:`ShadowDataPath` is the copying :class:`~.base.DataPath`: the back-end's only memory region
is a memfd of ours (:mod:`.shadow_pool`) holding one split ring per queue and a bounce pool; guest
chains are validated, copied in, published on the shadow ring, and copied back when the back-end
completes them. Back-pressure, guest errors, grant-mapped memory, reconnect and restart (the
in-flight record): docs/datapath.md §2.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import operator
import os
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, NamedTuple

from vhost_user import GuestMemoryError, InflightRegionError, MemoryRegion, ProtocolFeatures
from vhost_user.inflight import InflightQueue, InflightRegion, region_size
from vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    Chain,
    GuestMemory,
    RingError,
    SplitQueueDevice,
    SplitQueueDriver,
    split_ring_layout,
    widest_span,
)

from ..errors import DaemonError
from ..log import DeviceLogger, LimitedLogger
from ..virtio_mmio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, QueueConfig
from .base import RingAddresses
from .shadow_pool import HEAD_MAP_HEADER, ShadowMemory

__all__ = [
    "DEFAULT_POOL_SIZE",
    "LATENCY_BOUNDS_NS",
    "MAX_LOSSES_IN_FLIGHT",
    "GuestInflightRecord",
    "ShadowDataPath",
    "ShadowError",
    "ShadowQueueError",
    "ShadowQueueStats",
]

DEFAULT_POOL_SIZE: Final = 16 << 20
SMALL: Final = 512  # buffers shorter than this are packed at 16-byte alignment, longer ones at 512
# Upper bounds of the request latency buckets: 50 µs (a copy and a back-end's round trip) to 1 s.
LATENCY_BOUNDS_NS: Final = tuple(int(ms * 1e6) for ms in (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000))

# A chain still in flight when the back-end has dropped the connection this many times in a row
# is not published again (the queue stops, the device goes to DEVICE_NEEDS_RESET): a chain that
# crashes its back-end would otherwise be replayed to every new one, forever.
MAX_LOSSES_IN_FLIGHT: Final = 3

_FLAGS = struct.Struct("<H")
_U16 = struct.Struct("<H")
# What a guest memory object may raise for a range it does not cover (as vhost_user.virtqueue).
_FAULTS: Final = (GuestMemoryError, LookupError, ValueError, OverflowError, OSError, BufferError)

Logger = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]


class ShadowError(DaemonError):
    """The shadow data path cannot serve a request (configuration, capacity)."""


class ShadowQueueError(ShadowError):
    """Queue ``index`` was stopped: the guest broke the virtio rules (or the back-end did)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"queue {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class ShadowQueueStats:
    chains: int = 0  # published to the back-end
    completed: int = 0  # pushed to the guest
    bytes_in: int = 0  # copied guest → bounce
    bytes_out: int = 0  # copied bounce → guest
    kicks: int = 0
    held: int = 0  # times the queue stopped pulling for lack of pool or ring space
    resubmitted: int = 0
    overlong: int = 0  # completions whose reported length exceeded the writable buffers
    # Request latency, guest chain popped (its kick) → its used element pushed: a count per
    # LATENCY_BOUNDS_NS bucket (not cumulative; the last one is +Inf) and the sum.
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_sum_ns: int = 0

    def add(self, other: ShadowQueueStats) -> None:
        """Add ``other``'s counts to these."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                setattr(self, f.name, [a + b for a, b in zip(mine, theirs, strict=True)])
            else:
                setattr(self, f.name, mine + theirs)


def _places(runs: Sequence[tuple[int, int]], bufs: Sequence[tuple[int, int]]) -> list[int] | None:
    """The shadow address of each of a guest chain's ``bufs`` (one direction) in the shadow
    chain's ``runs`` (the same direction: each run one or more of them back to back, as
    :func:`_layout` lays them out, merged or not), or None if they do not line up."""
    out: list[int] = []
    it = iter(bufs)
    for addr, size in runs:
        at = 0
        while at < size:
            b = next(it, None)
            if b is None or at + b[1] > size:
                return None
            out.append(addr + at)
            at += b[1]
    return out if next(it, None) is None else None


class _InFlight(NamedTuple):
    """One guest chain published on the shadow ring (its bounce extent and both shapes)."""

    head: int
    offset: int  # memfd offset of the extent
    nbytes: int
    table: int  # back-end address of the indirect table, or -1
    readable: list[tuple[int, int]]  # shadow (addr, len)
    writable: list[tuple[int, int]]
    copy_back: list[tuple[int, int, int]]  # (guest addr, memfd offset, len) of the writable buffers
    writable_len: int
    popped: int  # time.monotonic_ns() when the chain was taken from the guest's ring (0: unknown)


_new = tuple.__new__  # builds an _InFlight without NamedTuple's Python-level __new__ (the hot path)


class _Layout(NamedTuple):
    """:func:`_lay_out`'s answer for one shape of chain, kept for the next chain of that shape."""

    offsets: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    nrr: int
    size: int
    woffsets: tuple[int, ...]  # the device-writable buffers' offsets (offsets[nr:])
    wlens: tuple[int, ...]  # and lengths
    wlen: int  # their sum
    rlen: int  # the device-readable buffers' sum


#: Layouts by shape (the buffers' lengths, how many are device-readable, merged or not): a driver
#: sends few shapes (Linux's virtio-blk: header, n pages, status), so a chain's layout is one
#: lookup instead of a Python step per buffer. Bounded: chains of at most LAYOUT_CACHE_BUFFERS
#: buffers, at most LAYOUT_CACHE_SHAPES shapes (then forgotten at once: a guest that sends ever
#: new shapes costs what every chain cost before the cache, and no memory).
_LAYOUTS: dict[tuple[tuple[int, ...], int, bool], _Layout] = {}
LAYOUT_CACHE_SHAPES: Final = 32
LAYOUT_CACHE_BUFFERS: Final = 256  # a chain as long as a 256-entry queue (QEMU's virtio-blk queue size)
_len_of = operator.itemgetter(1)
_addr_of = operator.itemgetter(0)


def _layout(head: int, bufs: Sequence[tuple[int, int]], nr: int, merge: bool) -> _Layout:
    """:func:`_lay_out` of ``bufs``, from :data:`_LAYOUTS` when a chain of the same shape came before."""
    lens = tuple(map(_len_of, bufs))
    key = (lens, nr, merge)
    got = _LAYOUTS.get(key)
    if got is not None:
        return got
    offsets, runs, nrr, size = _lay_out(head, bufs, nr, merge)  # (raises for a refused chain: not kept)
    wlens = lens[nr:]
    got = _Layout(tuple(offsets), tuple(runs), nrr, size, tuple(offsets[nr:]), wlens, sum(wlens), sum(lens[:nr]))
    if len(lens) <= LAYOUT_CACHE_BUFFERS:
        if len(_LAYOUTS) >= LAYOUT_CACHE_SHAPES:
            _LAYOUTS.clear()
        _LAYOUTS[key] = got
    return got


def _lay_out(head: int, bufs: Sequence[tuple[int, int]], nr: int, merge: bool) -> tuple[list[int], list[tuple[int, int]], int, int]:
    """Where a chain's buffers go in its bounce extent, and the shadow chain that describes them.

    ``bufs``: the guest chain's buffers, the first ``nr`` device-readable. Returns the extent
    offset of each buffer (buffers of 512 bytes or more 512-aligned, for back-ends that do
    O_DIRECT I/O straight from them; smaller ones 16-aligned), the shadow chain's buffers as
    (extent offset, length) runs, how many of those runs are device-readable, and the extent's
    size. With ``merge`` a buffer that lands right after the one before it, in the same
    direction, joins that one's run, except the chain's first and last buffers, which keep
    descriptors of their own: a request of 32 scattered 4 KiB pages reaches the back-end as
    three descriptors (header, data, status) instead of 34.
    The driver may frame a request as it likes (virtio 1.2 §2.7.4, Message Framing: the device
    must not assume a particular arrangement of descriptors, VIRTIO_F_VERSION_1); keeping the
    first and the last apart also suits back-ends that expect the header and the status (or a
    response) in descriptors of their own."""
    offsets: list[int] = []
    runs: list[tuple[int, int]] = []
    pos = nrr = i = 0
    last = len(bufs) - 1
    merge = merge and last >= 3  # (else no two buffers between the first and the last)
    for _addr, length in bufs:
        # A zero-sized buffer: every back-end built on QEMU's virtio core or libvhost-user
        # (e.g. qemu-storage-daemon) refuses it for any device type ("virtio: zero sized
        # buffers are not allowed") and drops the connection; no virtio-blk request part is
        # empty (virtio 1.2 §5.2.6: a 16-byte header, data in 512-byte sectors, a 1-byte status).
        if not length:
            raise RingError(f"chain {head}: buffer {i} has length 0 (zero-sized buffers are not allowed)")
        a = SMALL - 1 if length >= SMALL else 15
        at = (pos + a) & ~a
        offsets.append(at)
        if merge and at == pos and 1 < i < last and i != nr:
            start, size = runs[-1]
            runs[-1] = (start, size + length)
        else:
            runs.append((at, length))
        pos = at + length
        i += 1
        if i == nr:
            nrr = len(runs)
    return offsets, runs, nrr, pos


def _copy_in(buf: memoryview, extent: int, readable: Sequence[tuple[int, int]], offsets: Sequence[int],
             span: tuple[int, int, memoryview | None], view: Callable[[int, int], memoryview]) -> None:
    """Copy a chain's device-readable buffers to their ``offsets`` in its bounce extent: sliced
    from the memory's widest ``span`` (lo, hi, view of [lo, hi)) where they lie in it, else
    through ``view``."""
    lo, hi, mem = span
    for (addr, length), off in zip(readable, offsets):  # (offsets: the readable ones come first)
        off += extent
        at = addr - lo
        if 0 <= at and addr + length <= hi:
            buf[off : off + length] = mem[at : at + length]  # type: ignore[index]
        else:
            buf[off : off + length] = view(addr, length)


def _clip(copy_back: list[tuple[int, int, int]], written: int) -> list[tuple[int, int, int]]:
    """The part of a chain's ``copy_back`` (guest address, extent offset, length) that the
    back-end's first ``written`` bytes cover (the device-writable buffers fill in order)."""
    out = []
    for gaddr, off, length in copy_back:
        if written <= 0:
            break
        m = length if length < written else written
        out.append((gaddr, off, m))
        written -= m
    return out


def _shadow_chain(at: int, runs: Sequence[tuple[int, int]], nrr: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The readable and writable buffers of a shadow chain whose extent the back-end sees at
    ``at``: :func:`_layout`'s ``runs``, the first ``nrr`` readable."""
    return [(at + o, m) for o, m in runs[:nrr]], [(at + o, m) for o, m in runs[nrr:]]


class _Queue:
    __slots__ = ("config", "kick_fd", "guest", "guest_desc", "drv", "rings", "event_idx", "indirect", "merge",
                 "pending", "popped", "inflight", "losses", "broken", "unreported", "unsignalled", "stats", "heads")

    def __init__(self, config: QueueConfig, kick_fd: int, rings: RingAddresses, event_idx: bool, indirect: bool,
                 heads: int, merge: bool = False) -> None:
        self.config = config
        self.kick_fd = kick_fd
        self.rings = rings
        self.heads = heads  # memfd offset of the queue's head map (shadow_pool.py)
        self.event_idx = event_idx
        self.indirect = indirect
        self.merge = merge  # contiguous buffers share a shadow descriptor (_layout)
        self.guest: SplitQueueDevice | None = None
        self.guest_desc: memoryview | None = None
        self.drv: SplitQueueDriver | None = None
        self.pending: list[Chain] = []  # popped from the guest, waiting for pool/ring space (in order)
        self.popped = 0  # time.monotonic_ns() when the chains being published were popped
        self.inflight: dict[int, _InFlight] = {}  # guest head → chain, in publication order
        self.losses: dict[int, int] = {}  # guest head → back-end connections lost while it was in flight
        self.broken: str | None = None
        self.unreported = False  # broken without on_error: notify() raises once
        self.unsignalled = False  # used elements a predecessor pushed may not have been signalled
        self.stats = ShadowQueueStats()

    def release(self) -> None:
        for obj in (self.guest, self.drv):
            if obj is not None:
                obj.release()
        if self.guest_desc is not None:
            self.guest_desc.release()
        self.guest = self.drv = self.guest_desc = None


class GuestInflightRecord:
    """The guest side's in-flight chains, per queue, in a file (``path``, created 0600, e.g. in the
    daemon's runtime directory, which systemd keeps across restarts): what a restarted daemon needs
    to resume a shadow queue exactly. A file of another shape is started afresh."""

    def __init__(self, path: str, num_queues: int, queue_size: int, *, dir_fd: int | None = None) -> None:
        """``path`` relative to the directory ``dir_fd`` when given (never through a symbolic
        link; a file that is not a regular one is refused with OSError)."""
        self.path = path
        size = region_size(num_queues, queue_size)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600,
                           dir_fd=dir_fd)
        done = False
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            self.fresh = st.st_size != size
            if self.fresh:
                os.ftruncate(self._fd, 0)  # zero: never used
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            self.region = InflightRegion(self._map, num_queues, queue_size)
            done = True
        finally:
            if not done:
                os.close(self._fd)

    def queue(self, index: int, num: int) -> InflightQueue | None:
        r = self.region
        return r.queues[index] if index < r.num_queues and num <= r.queue_size else None

    def close(self) -> None:
        """Unmap and close (the file stays: removing it is the owner's decision)."""
        if self._fd < 0:
            return
        self.region.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1


def _driver_at(mem: GuestMemory, size: int, rings: RingAddresses, event_idx: bool, start: int) -> SplitQueueDriver:
    """A fresh shadow ring whose avail and used indices start at ``start`` (a resumed back-end's
    SET_VRING_BASE)."""
    return SplitQueueDriver(mem, size, rings.desc, rings.avail, rings.used, event_idx=event_idx, start=start)


class ShadowDataPath:
    """The copying :class:`~.device.DataPath` (split rings only).

    ``memory``: the guest's RAM as the daemon maps it (``view(gpa, length)``, e.g.
    :class:`~..guestmem.foreign.ForeignGuestMemory`; not closed here). ``banks``: its RAM banks.
    ``pool_size``: bytes of bounce pool (bounded; a chain longer than the pool is refused as a
    guest error). ``max_queues``/``max_queue_size``: ring slots reserved in the memfd.
    ``on_error(index, reason)``: a queue was stopped (set NEEDS_RESET). ``harvest_lower``: a
    queue's call also takes the lower queues' completions to the guest, first (the device type
    may complete what one queue takes into a lower one: :func:`~..devtypes.feeds_lower`).
    ``kicks_when_idle``: the guest is asked to kick a queue only while none of its chains is in
    flight; meanwhile each call of the back-end takes what the guest added (a device type whose
    requests never wait for a later one of the same queue, e.g. virtio-blk). On Xen a kick is a
    QueueNotify write the guest's vCPU waits on until the daemon has answered it.
    """

    name = "shadow"
    protocol_features = ProtocolFeatures(0)
    packed = False
    direct = False  # the back-end sees shadow rings only: notifications go through the daemon

    def __init__(
        self,
        memory: GuestMemory,
        banks: Sequence[tuple[int, int]],
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_queues: int = 8,
        max_queue_size: int = 1024,
        on_error: Callable[[int, str], None] | None = None,
        log: Logger | None = None,
        inflight: GuestInflightRecord | None = None,
        harvest_lower: bool = True,
        kicks_when_idle: bool = False,
    ) -> None:
        self._memory = memory
        self.harvest_lower = harvest_lower
        self.kicks_when_idle = kicks_when_idle
        self.inflight_record = inflight  # closed with the data path
        # Optional: a memory that maps on demand (grants) learns when it may unmap guest buffers.
        self._release: Callable[[list[tuple[int, int]]], None] | None = getattr(memory, "release_buffers", None)
        # Optional too: such a memory may map a whole chain's pages at once (see the module docstring).
        self._map_chain: Callable[[list[tuple[int, int]], list[tuple[int, int]]], None] | None = \
            getattr(memory, "map_chain", None)
        # Memory mapped for good (no grants): chains are taken in one pass, the copies of buffers
        # inside its widest span sliced from it (vhost_user.virtqueue.GuestMemory.spans).
        self._direct = self._release is None and self._map_chain is None
        self._span = widest_span(memory) if self._direct else (0, 0, None)
        self._banks = tuple((int(a), int(b)) for a, b in banks)
        self.shadow = ShadowMemory(pool_size=pool_size, max_queues=max_queues, max_queue_size=max_queue_size)
        self.pool = self.shadow.pool
        self._buf = self.shadow.mv  # the whole memfd, for the copies
        self._base = self.shadow.base
        self.on_error = on_error
        # what the guest's chains and the back-end's completions make it say: rate-limited
        self.log: Logger = LimitedLogger.over(log, time.monotonic) if isinstance(log, DeviceLogger) else (
            log if log is not None else logging.getLogger(__name__))
        self._queues: dict[int, _Queue] = {}
        self._retired = ShadowQueueStats()  # the counts of the queues closed so far
        self._held: set[int] = set()  # queues waiting for pool space
        self._also_used: list[int] = []  # lower queues completed by the last used(), to interrupt too
        self._handed_out = False  # a back-end has been given the current memfd
        self._fresh = False  # a new back-end connected since: its first table gets a fresh memfd
        self._kept: dict[int, int] = {}  # queue → ring size: drained rings of an adopted memfd (give_back_kept)
        self._given: dict[int, tuple[int, int, str | None]] = {}  # queue → (chains, bytes, fault) given back
        self._quiesced = False  # the device is going: nothing more is taken from the guest (quiesce)

    @property
    def memory(self) -> GuestMemory:
        """The guest's RAM (another one may be set: its span is taken anew)."""
        return self._memory

    @memory.setter
    def memory(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._span = widest_span(memory) if self._direct else (0, 0, None)

    # --- DataPath ---------------------------------------------------------------------------
    def banks(self) -> Sequence[tuple[int, int]]:
        return self._banks

    def new_connection(self) -> None:
        """The next :meth:`regions` is for a new back-end: a fresh memfd if one was handed out
        (what :meth:`give_back_kept` said of the old one no longer applies)."""
        self._fresh = self._handed_out
        self._kept, self._given = {}, {}

    def regions(self, queues: Sequence[QueueConfig] = ()) -> tuple[Sequence[MemoryRegion], Sequence[int]]:
        """The memory table: the same memfd for every start on one back-end connection (a guest
        reset), a fresh one from the second connection on (:meth:`new_connection`)."""
        if self._fresh:
            self._new_memory()
            self._fresh = False
        self._handed_out = True
        return [self.shadow.region()], [self.shadow.fd]

    def harvested(self, index: int) -> int | None:
        """How far queue ``index``'s shadow used ring has been taken back to the guest (None
        without such a queue): the back-end has completed every chain it took once this reaches
        the index GET_VRING_BASE answered."""
        q = self._queues.get(index)
        return None if q is None or q.drv is None or q.broken is not None else q.drv.last_used

    def backend_used(self, index: int, num: int) -> int:
        """The used index the back-end wrote in queue ``index``'s shadow ring of ``num`` entries,
        as it lies in the memory now (a previous process's ring, before it is laid out anew)."""
        if not 0 < num <= self.shadow.max_queue_size or not 0 <= index < self.shadow.max_queues:
            raise ValueError(f"queue {index} of {num} entries has no ring slot in the shadow memory")
        _, _, used, _ = split_ring_layout(num, self.shadow.ring_slot(index))
        with self.shadow.view(used + 2, 2) as v:
            return int(_U16.unpack_from(v)[0])

    def memory_fd(self) -> int | None:
        """The memfd the back-end maps (kept for a next process of the daemon: fdstore.py)."""
        return self.shadow.fd if self.shadow.fd >= 0 else None

    def adopt_memory(self, fd: int) -> None:
        """Go on with the memfd a previous process of the daemon gave this back-end connection
        (taken; ValueError if it is not of this path's shape), before any queue is opened: its
        rings are laid out afresh when the queues open, its bounce pool starts empty (the
        chains in flight are taken from the guest again)."""
        if self._queues:
            raise ValueError("shadow memory adopted while queues are open")
        old = self.shadow
        new = ShadowMemory(pool_size=old.pool.capacity, max_queues=old.max_queues,
                           max_queue_size=old.max_queue_size, base=old.base, fd=fd)
        old.close()
        self.shadow, self.pool, self._buf = new, new.pool, new.mv
        self._handed_out, self._fresh = True, False
        self._kept, self._given = {}, {}

    def give_back_kept(self, sizes: dict[int, int]) -> None:
        """The back-end has completed everything it took from these rings (queue → size) of the
        adopted memory: at the resume (:meth:`resume_kept`), what it completed there after the
        previous process last harvested goes to the guest, instead of being taken from the guest
        again."""
        self._kept = {i: n for i, n in sizes.items() if 0 <= i < self.shadow.max_queues}

    def resume_kept(self, queues: Sequence[QueueConfig], features: int) -> None:
        """Before the rings of a resume are opened: the completions :meth:`give_back_kept` spoke
        of go to the guest, every queue's before any queue takes new chains into the bounce pool
        (which starts empty, over bytes those completions still hold)."""
        kept, self._kept = self._kept, {}
        event_idx = bool(features >> F_EVENT_IDX & 1)
        for queue in queues:
            if kept.get(queue.index) == queue.num and queue.index not in self._queues:
                record = self.inflight_record.queue(queue.index, queue.num) if self.inflight_record is not None else None
                self._given[queue.index] = self._give_back(queue, event_idx, record)

    def open_queue(self, queue: QueueConfig, features: int, kick_fd: int, *, resume: bool = False) -> RingAddresses:
        """Shadow rings for ``queue``. ``resume``: the back-end was replaced while the queue ran;
        the returned ``base`` is where the new one starts reading our shadow ring."""
        index = queue.index
        if queue.num > self.shadow.max_queue_size or not 0 <= index < self.shadow.max_queues:
            raise ShadowError(f"queue {index} of size {queue.num}: the shadow memory has ring slots for "
                              f"{self.shadow.max_queues} queue(s) of up to {self.shadow.max_queue_size}")
        desc, avail, used, _ = split_ring_layout(queue.num, self.shadow.ring_slot(index))
        rings = RingAddresses(desc, avail, used)
        event_idx = bool(features >> F_EVENT_IDX & 1)
        indirect = bool(features >> F_INDIRECT_DESC & 1)
        old = self._queues.get(index)
        if resume and old is not None and old.config == queue and old.broken is None and old.guest is not None \
                and old.event_idx == event_idx:
            return self._reopen(old, kick_fd, indirect)
        if old is not None:
            self.close_queue(index)
        q = _Queue(queue, kick_fd, rings, event_idx, indirect, self.shadow.head_map(index),
                   merge=bool(features >> F_VERSION_1 & 1))
        self._queues[index] = q
        record = self.inflight_record.queue(index, queue.num) if self.inflight_record is not None else None
        given = self._given.pop(index, None)
        q.drv = _driver_at(self.shadow, queue.num, rings, event_idx, 0)
        try:
            # A queue resumed without its in-flight table (e.g. a restarted daemon): QEMU's rule
            # without INFLIGHT_SHMFD, chains after the guest's used index are taken again.
            first = None
            if resume:
                with self.memory.view(queue.device + 2, 2) as v:
                    first = _U16.unpack_from(v)[0]
                # A predecessor that died between pushing used elements and the interrupt left
                # the guest unaware of them, and the next may never come (a driver waiting for
                # them sends nothing more): the first call after the resume interrupts the guest.
                q.unsignalled = True
                if given is not None:
                    q.stats.completed, q.stats.bytes_out = given[0], given[1]
                    if given[2] is not None:
                        self._break(q, given[2])
                if record is not None:
                    first = self._recover(index, record, first, queue.num)
            elif record is not None:
                record.clear()
                record.recover(0, queue.num)  # a fresh start: used idx 0, nothing in flight
            q.guest = SplitQueueDevice(self.memory, queue.num, queue.desc, queue.driver, queue.device,
                                       event_idx=event_idx, last_avail_idx=first or 0, inflight=record)
            q.guest_desc = self.memory.view(queue.desc, 16 * queue.num)
            self._laid_out(q)
        except (RingError, *_FAULTS) as e:
            self._break(q, f"guest rings unusable: {e}")
        return rings

    def _laid_out(self, q: _Queue) -> None:
        """A shadow ring was laid out for ``q``: its head map's header says how its used index
        relates to the guest's (each harvested element is pushed to the guest: they move together)."""
        assert q.drv is not None and q.guest is not None
        _U16.pack_into(self._buf, q.heads, (q.drv.last_used - q.guest.used_idx) & 0xFFFF)

    def _give_back(self, cfg: QueueConfig, event_idx: bool, record: InflightQueue | None) -> tuple[int, int, str | None]:
        """A restarted daemon's queue ``cfg`` on the memory its predecessor shared with the same
        back-end (drained: :meth:`give_back_kept`), before its shadow ring is laid out anew: the
        chains the back-end completed into that ring after the predecessor last harvested it are
        completed to the guest (their device-writable bytes copied back, their used elements
        pushed, through the guest's in-flight record when there is one), exactly once, instead of
        being taken from the guest and run again. What does not match the guest's ring is logged
        in one line and taken from the guest again, as before. Returns the chains and bytes given
        back, and why the queue must stop (a guest buffer it could not write) or None."""
        num, index = cfg.num, cfg.index
        desc, avail, used, _ = split_ring_layout(num, self.shadow.ring_slot(index))
        heads = self.shadow.head_map(index)
        guest: SplitQueueDevice | None = None
        shadow: SplitQueueDevice | None = None
        walked: list[Chain] = []  # the guest's (a memory that maps on demand releases them)
        chains: list[tuple[list[int], Chain, int]] = []  # (shadow address of each writable buffer, guest chain, bytes written)
        try:
            tracked = False
            if record is not None:
                with self.memory.view(cfg.device + 2, 2) as v:
                    used_idx = _U16.unpack_from(v)[0]
                try:  # (settles a push the predecessor died in, so that the record follows the pushes below)
                    tracked = record.recover(used_idx, num) is not None
                except InflightRegionError:
                    tracked = False  # (open_queue's recovery says so and starts it afresh)
            guest = SplitQueueDevice(self.memory, num, cfg.desc, cfg.driver, cfg.device, event_idx=event_idx,
                                     inflight=record if tracked else None)
            shadow = SplitQueueDevice(self.shadow, num, desc, avail, used)
            start = (guest.used_idx + _U16.unpack_from(self._buf, heads)[0]) & 0xFFFF
            count = (shadow.used_idx - start) & 0xFFFF
            if count > num:
                raise RingError(f"{count} completions to give back on a ring of {num}")
            taken: set[int] = set()
            for k in range(count):
                with self.shadow.view(used + 4 + 8 * ((start + k) % num), 8) as v:
                    sid, written = struct.unpack_from("<II", v)
                if sid >= num:
                    raise RingError(f"shadow used element {start + k} names descriptor {sid}")
                head = _U16.unpack_from(self._buf, heads + HEAD_MAP_HEADER + 2 * sid)[0]
                if head >= num or head in taken or tracked and record is not None and not record.is_inflight(head):
                    raise RingError(f"shadow descriptor {sid} names guest chain {head}, which is not in flight")
                taken.add(head)
                s_chain = shadow.chain(sid)
                g_chain = guest.chain(head)
                walked.append(g_chain)
                places = _places(s_chain.writable, g_chain.writable)
                if _places(s_chain.readable, g_chain.readable) is None or places is None:
                    raise RingError(f"shadow chain {sid} is not the guest's chain {head}")
                chains.append((places, g_chain, written))
        except (RingError, *_FAULTS) as e:
            self.log.warning("queue %d: what the back-end completed before the daemon restarted is not usable (%s): "
                             "the chains in flight are taken from the guest again", index, e)
            chains = []
        finally:
            if shadow is not None:
                shadow.release()
            if not chains:
                if guest is not None:
                    guest.release()
                if self._release is not None:
                    for chain in walked:
                        self._release([(b.addr, b.length) for b in (*chain.readable, *chain.writable)])
        if not chains:
            return 0, 0, None
        assert guest is not None
        pushes: list[tuple[int, int]] = []
        fault: str | None = None
        out = 0
        try:
            for places, g_chain, written in chains:
                left = min(written, g_chain.writable_len)
                if fault is None:
                    try:
                        for at, gb in zip(places, g_chain.writable, strict=True):
                            if left <= 0:
                                break
                            m = min(left, gb.length)
                            self.memory.view(gb.addr, m)[:] = self.shadow.view(at, m)
                            left -= m
                            out += m
                    except (*_FAULTS, TypeError) as e:  # TypeError: a read-only view
                        fault = f"chain {g_chain.head}: guest buffer unwritable: {e}"
                if self._release is not None:
                    self._release([(b.addr, b.length) for b in (*g_chain.readable, *g_chain.writable)])
                pushes.append((g_chain.head, min(written, g_chain.writable_len)))
            guest.push_many(pushes)
        finally:
            guest.release()
        self.log.info("queue %d: %d chain(s) the back-end completed before the daemon restarted given to the guest",
                      index, len(pushes))
        return len(pushes), out, fault

    def _recover(self, index: int, record: InflightQueue, used_idx: int, num: int) -> int:
        """Where a restarted daemon resumes queue ``index``: after the chains its predecessor left
        in flight (taken again first), or at the guest's used index without a usable record."""
        try:
            again = record.recover(used_idx, num)
        except InflightRegionError as e:
            self.log.warning("queue %d: in-flight record unusable (%s): resuming at the guest's used index", index, e)
            record.clear()
            record.recover(used_idx, num)
            return used_idx
        if again is None:
            return used_idx
        self.log.info("queue %d: resuming from the in-flight record: %d chain(s) taken again", index, record.pending_resubmit)
        return again

    def notify(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None:
            return
        if q.broken is None:
            self._pump(q)
        if q.unreported:
            q.unreported = False
            raise ShadowQueueError(index, q.broken or "")

    def used(self, index: int) -> bool:
        q = self._queues.get(index)
        if q is None or q.broken is not None or q.drv is None or q.guest is None:
            return False
        # The lower queues' completions first (device types whose back-end may put what it takes
        # from a queue on a lower one: net, vsock, transmitq 2n+1 feeding receiveq 2n on a looped
        # port or a local peer), which may signal the transmitq first. Reported done before its receipt reached the
        # guest, a frame would be lost if this process died in between (its receive buffer is
        # taken again from the in-flight record, the bytes in it gone with the shadow memory).
        notify, q.unsignalled = q.unsignalled, False
        if self.harvest_lower:
            for lower in range(index):
                other = self._queues.get(lower)
                if other is not None and self._harvest(other) and other.guest is not None and other.guest.needs_notify():
                    self._also_used.append(lower)
                if self.kicks_when_idle and other is not None and other.broken is None:
                    self._pump(other)
        if not self._harvest(q):
            return notify
        if self._held:
            for i in sorted(self._held):
                held = self._queues.get(i)
                if held is not None and held is not q and held.broken is None:
                    self._pump(held)
        if (q.pending or self.kicks_when_idle) and q.broken is None:
            self._pump(q)
        return (q.guest is not None and q.broken is None and q.guest.needs_notify()) or notify

    def _harvest(self, q: _Queue) -> bool:
        """The back-end's completions on ``q`` to the guest; False if the queue is (now) broken."""
        if q.broken is not None or q.drv is None or q.guest is None:
            return False
        try:
            done = q.drv.get_used()
        except RingError as e:
            self._break(q, f"back-end: {e}")
            return False
        if done:
            self._complete(q, done)
        return q.broken is None

    def also_used(self) -> list[int]:
        also, self._also_used = self._also_used, []
        return also

    def close_queue(self, index: int) -> None:
        q = self._queues.pop(index, None)
        self._held.discard(index)
        if q is None:
            return
        for f in q.inflight.values():
            self.pool.free(f.offset, f.nbytes)
            if self._release is not None:
                self._release([(a, n) for a, _, n in f.copy_back])
        if self._release is not None:
            for chain in q.pending:
                self._release([(b.addr, b.length) for b in (*chain.readable, *chain.writable)])
        if q.inflight:
            self.log.debug("queue %d closed with %d chain(s) in flight (dropped)", index, len(q.inflight))
        q.inflight.clear()
        q.pending = []
        self._retired.add(q.stats)
        record = self.inflight_record.queue(index, q.config.num) if self.inflight_record is not None else None
        if record is not None:
            record.clear()  # nothing of it is in flight any more
        q.release()

    def quiesce(self) -> list[int]:
        """The device is going while its guest runs on: take nothing more from the guest's rings
        and ask its driver not to notify any queue again (``SplitQueueDevice.suppress_notify``),
        so that it does not touch the device's window once the window is gone (on Xen on Arm an
        access nobody claims is a data abort in the guest). Completions still reach the guest.
        Returns the queues asked."""
        self._quiesced = True
        asked = []
        for index, q in sorted(self._queues.items()):
            if q.guest is not None:
                try:
                    q.guest.suppress_notify()
                except _FAULTS as e:
                    self.log.warning("queue %d: cannot ask the driver not to notify: %s", index, e)
                    continue
                asked.append(index)
        return asked

    # --- extras -----------------------------------------------------------------------------
    def stats(self, index: int) -> ShadowQueueStats | None:
        q = self._queues.get(index)
        return None if q is None else q.stats

    def inflight(self, index: int) -> int:
        q = self._queues.get(index)
        return 0 if q is None else len(q.inflight)

    def totals(self) -> ShadowQueueStats:
        """Every queue's counts since the data path was made, closed queues' included."""
        total = ShadowQueueStats()
        for stats in (self._retired, *(q.stats for q in self._queues.values())):
            total.add(stats)
        return total

    def inflight_total(self) -> int:
        """Chains in flight on all queues."""
        return sum(len(q.inflight) for q in self._queues.values())

    @property
    def held_queues(self) -> int:
        """Queues stopped for lack of pool or shadow-ring space right now (back-pressure)."""
        return len(self._held)

    def broken(self, index: int) -> str | None:
        q = self._queues.get(index)
        return None if q is None else q.broken

    def resubmit(self, index: int) -> int:
        """Publish every chain of queue ``index`` still in flight again on a fresh shadow ring
        starting at the guest's used index (for a back-end restarted at that base without a
        queue re-open); kicks. Returns the number of chains resubmitted."""
        q = self._queues.get(index)
        if q is None or q.broken is not None or q.guest is None:
            return 0
        self._reopen(q, q.kick_fd, q.indirect)  # the caller restarts its back-end at the guest's used index
        if q.inflight:
            self._kick(q)
        return len(q.inflight)

    def close(self) -> None:
        """Drop every queue and the memfd (after the back-end has stopped). Idempotent."""
        for index in list(self._queues):
            self.close_queue(index)
        self.shadow.close()
        if self.inflight_record is not None:
            self.inflight_record.close()

    # --- engine -----------------------------------------------------------------------------
    def _new_memory(self) -> None:
        """Give the next back-end a memfd of its own. The one being replaced may be stopped rather
        than dead (it missed a reply deadline) and still write into what it mapped: a late used
        element or buffer must not land in the rings or bounce buffers of its successor. Harvest
        what it completed so far, carry the bytes of the chains still in flight over at the same
        offsets, and never read the old memfd again."""
        old = self.shadow
        for q in self._queues.values():
            if q.drv is None:
                continue
            if q.broken is None and q.guest is not None:
                try:
                    done = q.drv.get_used()
                except RingError as e:
                    self.log.warning("queue %d: old shadow used ring unreadable (%s); resubmitting all in flight",
                                     q.config.index, e)
                    done = []
                if done:
                    self._complete(q, done)
            q.drv.release()
            q.drv = None  # rebuilt on the new memory when the queue is resumed
        new = ShadowMemory(pool_size=old.pool.capacity, max_queues=old.max_queues,
                           max_queue_size=old.max_queue_size, base=old.base)
        new.pool = old.pool  # same extents, same offsets
        for q in self._queues.values():
            for f in q.inflight.values():
                new.mv[f.offset : f.offset + f.nbytes] = old.mv[f.offset : f.offset + f.nbytes]
        self.shadow, self._buf = new, new.mv
        old.close()

    def _break(self, q: _Queue, reason: str) -> None:
        if q.broken is not None:
            return
        q.broken = reason
        q.pending = []
        self._held.discard(q.config.index)
        if self.on_error is not None:  # its owner says it (one line per event)
            self.log.debug("queue %d stopped: %s", q.config.index, reason)
            self.on_error(q.config.index, reason)
        else:
            self.log.error("queue %d stopped: %s", q.config.index, reason)
            q.unreported = True

    def _pump(self, q: _Queue) -> None:
        """Publish every available guest chain that fits; one kick for the batch.

        The guest is asked not to kick while the pass takes chains (virtio 1.2 §2.7.10: with
        EVENT_IDX its avail_event is left where it was, else VIRTQ_USED_F_NO_NOTIFY is set), as
        vhost does: a chain it adds meanwhile is taken by this pass, and its kick would be one
        more IOREQ for nothing. Kicks are asked for again before the pass ends, and the ring is
        looked at once more after that (what came in between gets no kick)."""
        guest, drv = q.guest, q.drv
        if guest is None or drv is None or self._quiesced:
            return
        index = q.config.index
        try:
            guest.disable_notify()
            while True:
                chains = q.pending
                free = drv.num_free
                limit = 0
                if not chains:
                    limit = free or 1  # (each chain takes a shadow descriptor at least)
                    chains = guest.pop_many(limit)
                    if not chains:
                        if self.kicks_when_idle and q.inflight:
                            break  # kicks stay off: the back-end's next call takes what comes (used)
                        if guest.enable_notify():
                            guest.disable_notify()
                            continue
                        break
                    q.popped = time.monotonic_ns()
                taken = self._publish_many(q, chains, drv, free)
                if taken < len(chains):
                    if taken or chains is not q.pending:
                        q.stats.held += 1
                    q.pending = chains[taken:]
                    self._held.add(index)
                    guest.enable_notify()  # a kick retries the held chains, as before this pass
                    break
                q.pending = []
                # Fewer than asked for: every chain seen was taken; what came since, enable_notify
                # says (the next turn takes it), as an empty pop_many would.
                if len(chains) < limit:
                    if self.kicks_when_idle and q.inflight:
                        break  # (kicks stay off, as above)
                    if guest.enable_notify():
                        guest.disable_notify()
                        continue
                    break
            if not q.pending:
                self._held.discard(index)
        except RingError as e:
            self._break(q, str(e))
        if drv.kick_needed():
            self._kick(q)

    def _kick(self, q: _Queue) -> None:
        q.stats.kicks += 1
        os.eventfd_write(q.kick_fd, 1)

    def _publish_many(self, q: _Queue, chains: list[Chain], drv: SplitQueueDriver, free: int) -> int:
        """Check, bounce and publish ``chains`` in order, as :meth:`_publish` does each, on the
        shadow ring (``free`` descriptors) with one avail idx store; returns how many (the rest
        wait for pool or ring space). Guest memory mapped for good (no grants) takes them in one pass, its copies
        sliced from the memory's widest span; a single chain (queue depth 1) takes the chain-at-a-time
        path, which has no batch set-up to pay."""
        if len(chains) == 1:
            if not self._publish(q, chains[0], drv, free):
                return 0
            q.stats.chains += 1
            return 1
        if not self._direct:
            taken = 0
            try:
                for chain in chains:
                    if not self._publish(q, chain, drv):
                        break
                    taken += 1
            finally:
                q.stats.chains += taken
            return taken
        num, desc, inflight, pool = q.config.num, q.guest_desc, q.inflight, self.pool
        assert desc is not None
        alloc, capacity = pool.alloc, pool.capacity
        buf, base, view, widest, copy_in = self._buf, self._base, self._memory.view, self._span, _copy_in
        popped, indirect_ok, merge = q.popped, q.indirect, q.merge
        flags_of = _FLAGS.unpack_from
        adds: list[tuple[list[tuple[int, int]], list[tuple[int, int]], _InFlight, int]] = []
        copied = 0
        try:
            for head, readable, writable in chains:
                bufs = readable + writable
                if len(bufs) > num:
                    raise RingError(f"chain {head}: {len(bufs)} descriptors, longer than the queue ({num})")
                offsets, runs, nrr, pos, woffsets, wlens, wlen, rlen = _layout(head, bufs, len(readable), merge)
                r = len(runs)
                indirect = indirect_ok and r > 1 and (
                    r > free or not merge and flags_of(desc, 16 * head + 12)[0] & VIRTQ_DESC_F_INDIRECT != 0)
                table = -1
                if indirect:  # (the table after the buffers)
                    table = (pos + 15) & ~15
                    pos = table + 16 * r
                if head in inflight:
                    raise RingError(f"chain {head} made available again while still in flight")
                need = 1 if indirect else r
                if need > free:
                    break
                if pos > capacity:
                    raise RingError(f"chain {head}: {pos} bytes do not fit the bounce pool ({capacity} bytes)")
                extent = alloc(pos)
                if extent is None:
                    break
                try:
                    copy_in(buf, extent, readable, offsets, widest, view)
                except _FAULTS as e:
                    pool.free(extent, pos)
                    raise RingError(f"chain {head}: guest buffer unreadable: {e}") from e
                copy_back = list(zip(map(_addr_of, writable), map(extent.__add__, woffsets), wlens))
                at = base + extent
                shadow_r, shadow_w = _shadow_chain(at, runs, nrr)
                if indirect:
                    table += at
                f: _InFlight = _new(_InFlight, (head, extent, pos, table, shadow_r, shadow_w, copy_back, wlen, popped))
                inflight[head] = f
                adds.append((shadow_r, shadow_w, f, table))
                free -= need
                copied += rlen
        finally:
            if adds:
                pack, where = _U16.pack_into, q.heads + HEAD_MAP_HEADER
                for sid, add in zip(drv.add_many(adds), adds, strict=True):
                    pack(buf, where + 2 * sid, add[2].head)
                q.stats.chains += len(adds)
                q.stats.bytes_in += copied
        return len(adds)

    def _publish(self, q: _Queue, chain: Chain, drv: SplitQueueDriver, free: int = -1) -> bool:
        """Check ``chain``, bounce it and publish it on the shadow ring (``free`` descriptors, -1:
        ask ``drv``); False when out of pool or ring space (nothing of it taken: it is offered again)."""
        head, readable, writable = chain
        bufs = readable + writable
        n = len(bufs)
        if n > q.config.num:
            raise RingError(f"chain {head}: {n} descriptors, longer than the queue ({q.config.num})")
        assert q.guest_desc is not None
        if free < 0:
            free = drv.num_free
        nr = len(readable)
        offsets, runs, nrr, pos, woffsets, wlens, wlen, rlen = _layout(head, bufs, nr, q.merge)
        r = len(runs)
        indirect = q.indirect and r > 1 and (
            r > free or not q.merge and bool(_FLAGS.unpack_from(q.guest_desc, 16 * head + 12)[0] & VIRTQ_DESC_F_INDIRECT))
        table = -1
        if indirect:  # (the table after the buffers)
            table = (pos + 15) & ~15
            pos = table + 16 * r
        if head in q.inflight:
            raise RingError(f"chain {head} made available again while still in flight")
        if (1 if indirect else r) > free:
            return False
        if pos > self.pool.capacity:
            raise RingError(f"chain {head}: {pos} bytes do not fit the bounce pool ({self.pool.capacity} bytes)")
        extent = self.pool.alloc(pos)
        if extent is None:
            return False  # held: nothing of the chain is mapped yet
        if self._map_chain is not None:  # one mapping per access mode for the chain's views below
            self._map_chain([(b.addr, b.length) for b in readable], [(b.addr, b.length) for b in writable])
        if self._release is not None and writable:
            try:
                self._check_writable(chain)  # releases the chain's buffers when it refuses
            except RingError:
                self.pool.free(extent, pos)
                raise
        buf = self._buf
        try:
            _copy_in(buf, extent, readable, offsets, self._span, self._memory.view)
        except _FAULTS as e:
            self.pool.free(extent, pos)
            if self._release is not None:  # what was mapped for it goes now, not at the queue's reset
                self._release([(b.addr, b.length) for b in readable])
                self._release([(b.addr, b.length) for b in writable])
            raise RingError(f"chain {head}: guest buffer unreadable: {e}") from e
        if self._release is not None and readable:
            self._release([(b.addr, b.length) for b in readable])  # copied: no longer needed
        copy_back = list(zip(map(_addr_of, writable), map(extent.__add__, woffsets), wlens))
        at = self._base + extent
        shadow_r, shadow_w = _shadow_chain(at, runs, nrr)
        if indirect:
            table += at
        f: _InFlight = _new(_InFlight, (head, extent, pos, table, shadow_r, shadow_w, copy_back, wlen, q.popped))
        if indirect:
            sid = drv.add_indirect(table, shadow_r, shadow_w, token=f)
        else:
            sid = drv.add(shadow_r, shadow_w, token=f)
        _U16.pack_into(self._buf, q.heads + HEAD_MAP_HEADER + 2 * sid, head)
        q.inflight[head] = f
        q.stats.bytes_in += rlen
        return True

    def _check_writable(self, chain: Chain) -> None:
        """On-demand memory (grants) may map a buffer read-only (a read-only grant): refuse a chain
        that marks one device-writable before the back-end sees it (its buffers are released)."""
        bad: str | None = None
        for b in chain.writable:
            if b.length:
                try:
                    with self.memory.view(b.addr, b.length) as v:
                        if v.readonly:
                            bad = f"device-writable buffer [{b.addr:#x}, +{b.length:#x}) is read-only (a read-only grant)"
                except _FAULTS as e:
                    bad = f"device-writable buffer unusable: {e}"
                if bad is not None:
                    break
        if bad is not None:
            assert self._release is not None
            self._release([(b.addr, b.length) for b in (*chain.readable, *chain.writable)])
            raise RingError(f"chain {chain.head}: {bad}")

    def _add(self, q: _Queue, drv: SplitQueueDriver, f: _InFlight) -> None:
        if f.table >= 0:
            sid = drv.add_indirect(f.table, f.readable, f.writable, token=f)
        else:
            sid = drv.add(f.readable, f.writable, token=f)
        _U16.pack_into(self._buf, q.heads + HEAD_MAP_HEADER + 2 * sid, f.head)

    def _complete(self, q: _Queue, done: list[tuple[Any, int]]) -> None:
        """Copy back what the back-end wrote, free the extents, push the guest's used elements."""
        assert q.guest is not None
        buf, view, inflight, release = self._buf, self._memory.view, q.inflight, self._release
        lo, hi, span = self._span
        pushes: list[tuple[int, int]] = []
        extents: list[tuple[int, int]] = []
        out = 0
        fault: str | None = None
        now, latency, spent, bounds = time.monotonic_ns(), q.stats.latency, 0, LATENCY_BOUNDS_NS
        for f, written in done:
            head, offset, nbytes, _, _, _, copy_back, wlen, popped = f
            if popped:  # (0: resumed from a predecessor's record, its kick time unknown)
                latency[bisect.bisect_left(bounds, now - popped)] += 1
                spent += now - popped
            if written > wlen:
                q.stats.overlong += 1
                if q.stats.overlong == 1:
                    self.log.warning("queue %d: back-end reported %d bytes written into %d writable bytes (clamped)",
                                     q.config.index, written, wlen)
                written = wlen
            if fault is None:
                try:
                    for gaddr, off, length in copy_back if written == wlen else _clip(copy_back, written):
                        at = gaddr - lo
                        if 0 <= at and gaddr + length <= hi:
                            span[at : at + length] = buf[off : off + length]  # type: ignore[index]
                        else:
                            view(gaddr, length)[:] = buf[off : off + length]
                    out += written
                except (*_FAULTS, TypeError) as e:  # TypeError: a read-only view
                    fault = f"chain {head}: guest buffer unwritable: {e}"
            extents.append((offset, nbytes))
            if release is not None:
                release([(a, n) for a, _, n in copy_back])
            del inflight[head]
            pushes.append((head, written))
        self.pool.free_many(extents)
        if q.losses:
            for head, _ in pushes:
                q.losses.pop(head, None)
        if len(pushes) == 1:
            q.guest.push(*pushes[0])
        else:
            q.guest.push_many(pushes)
        q.stats.completed += len(pushes)
        q.stats.bytes_out += out
        q.stats.latency_sum_ns += spent
        if fault is not None:
            self._break(q, fault)

    def _reopen(self, q: _Queue, kick_fd: int, indirect: bool) -> RingAddresses:
        """The back-end was replaced: harvest the old shadow ring, rebuild it at the guest's used
        index, publish what is still in flight again, in order."""
        assert q.guest is not None
        start = q.guest.used_idx  # what the device model reads as the new back-end's base
        done: list[tuple[Any, int]] = []
        if q.drv is not None:  # same memfd (resubmit()): harvest the old ring here
            try:
                done = q.drv.get_used()
            except RingError as e:
                self.log.warning("queue %d: old shadow used ring unreadable (%s); resubmitting all in flight",
                                 q.config.index, e)
            if done:
                self._complete(q, done)
            q.drv.release()
        q.drv = _driver_at(self.shadow, q.config.num, q.rings, q.event_idx, start)
        self._laid_out(q)
        q.kick_fd = kick_fd
        q.indirect = indirect
        if not indirect and any(f.table >= 0 for f in q.inflight.values()):
            self._break(q, "the reconnected back-end lacks indirect descriptors, needed by chains in flight")
            return RingAddresses(q.rings.desc, q.rings.avail, q.rings.used, start)
        losses = q.losses
        q.losses = {head: losses.get(head, 0) + 1 for head in q.inflight}
        stuck = [head for head, n in q.losses.items() if n >= MAX_LOSSES_IN_FLIGHT]
        if stuck:
            self._break(q, f"chain {stuck[0]} was in flight each of the {q.losses[stuck[0]]} times in a row the "
                           "back-end dropped the connection: not publishing it again")
            return RingAddresses(q.rings.desc, q.rings.avail, q.rings.used, start)
        for f in q.inflight.values():
            self._add(q, q.drv, f)
        q.stats.resubmitted += len(q.inflight)
        if q.inflight or done:
            self.log.info("queue %d resumed at %d: %d completion(s) harvested, %d chain(s) resubmitted",
                          q.config.index, start, len(done), len(q.inflight))
        return RingAddresses(q.rings.desc, q.rings.avail, q.rings.used, start)

