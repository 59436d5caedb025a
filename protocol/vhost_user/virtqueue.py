"""Split virtqueues (virtio 1.2 §2.7), both the device side and the driver side.

Both sides work over any *memory object* with ``view(addr: int, length: int) -> memoryview``
(a writable view of guest memory at guest address ``addr``; it raises when the range is not
covered, e.g. :class:`~vhost_user.errors.GuestMemoryError`). Nothing here does I/O, logs or reads
a clock: notifications (eventfds, event channels) are the caller's business, this module only
says whether one is needed.

Layout (all little-endian; ``N`` = queue size, a power of two ≤ 32768)::

    descriptor table  N × {addr u64, len u32, flags u16, next u16}        align 16, 16·N bytes
    available ring    flags u16, idx u16, ring u16[N], used_event u16      align 2,  6+2·N bytes
    used ring         flags u16, idx u16, ring {id u32, len u32}[N],
                      avail_event u16                                      align 4,  6+8·N bytes

The device side is a security boundary: the driver (a guest) may be hostile. Every chain is
walked with bounds on its length, every buffer is checked against the memory object, and any
violation raises :class:`RingError` (the queue state is left unchanged; the caller should treat the
device as broken, e.g. set virtio NEEDS_RESET, rather than retry).

Memory ordering. The spec needs (driver) "descriptors and ring entry visible before avail idx",
(device) "read avail idx, then the ring entry and descriptors" and "used element visible before
used idx". This module performs the accesses in exactly that program order. Each access is a
separate ``struct.pack_into``/``unpack_from`` call into C, which the compiler cannot reorder, and on
the x86-64 TSO model stores are seen in program order and loads are not reordered with older loads,
so no explicit fence is needed there. On weakly ordered CPUs (arm64) Python offers no fence;
a peer there still relies on the syscall (eventfd write/read) between publish and consume acting
as a full barrier, which it does.

Single stores. A word the other side polls while we run (avail idx, flags, ring entries and
used_event; used idx, flags and avail_event) must go to memory in one store, or the poller may read
a value we never wrote. ``struct.pack_into`` does not do that: CPython's ``s_pack_internal`` first
``memset``s the whole target to 0 and then writes the value, so a back-end polling from another
process (DPDK's data-path lcore) can read avail idx = 0 in between. DPDK 22.11
(``virtio_dev_tx_split``) takes ``avail->idx - last_avail_idx`` as the number of new chains without
a bound check, so 0 seen after ``last_avail_idx`` 1 means 65535 chains: it re-reads every stale
avail slot for a whole index wrap (re-sending the last transmitted frame thousands of times) and
moves the used idx by as much. The driver side therefore stores its shared words through a ``"H"``
cast of the ring view (one aligned 16-bit ``memcpy`` in CPython's memoryview item assignment).
"""

from __future__ import annotations

import functools
import operator
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple, Protocol

from vhost_user.errors import GuestMemoryError, VhostUserError

__all__ = [
    "GuestMemory",
    "FlatMemory",
    "Buffer",
    "Chain",
    "RingError",
    "QueueFull",
    "SplitQueueDevice",
    "SplitQueueDriver",
    "split_ring_layout",
    "read_buffers",
    "read_into",
    "widest_span",
    "write_buffers",
    "vring_need_event",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "MAX_QUEUE_SIZE",
    "MAX_INDIRECT_DESCRIPTORS",
]

# virtio 1.2 §2.7.5 / linux/virtio_ring.h
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
VRING_USED_F_NO_NOTIFY: Final = 1

#: virtio 1.2 §2.7: "Queue Size ... maximum 32768".
MAX_QUEUE_SIZE: Final = 32768
#: Upper bound on the entries of one indirect table. The spec sets none; a table of 2**28
#: zero-length descriptors would otherwise make pop() spin. Linux drivers never exceed the
#: queue size (and QEMU caps a chain at 1024 iovecs), so the maximum queue size is generous.
MAX_INDIRECT_DESCRIPTORS: Final = MAX_QUEUE_SIZE
#: Total length of one chain must fit the u32 ``len`` of a used element (virtio 1.2 §2.7.8).
MAX_CHAIN_BYTES: Final = 0xFFFF_FFFF

DESC_SIZE: Final = 16
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4
USED_ELEM_SIZE: Final = 8

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_LITTLE_ENDIAN_HOST: Final = sys.byteorder == "little"
_U16X2 = struct.Struct("<HH")
_USED_ELEM = struct.Struct("<II")
_U64_MAX: Final = (1 << 64) - 1


class RingError(VhostUserError):
    """The ring contents (written by the other side) violate the virtio spec."""


class QueueFull(VhostUserError):
    """Driver side: not enough free descriptors for the chain."""


class GuestMemory(Protocol):
    """What the queues need from guest memory. A memory may also offer ``check(addr, length)``
    (raises as ``view`` would, makes no view): the device side then validates a chain's buffers
    with it instead of a view of each (cheaper; and a memory that maps on demand, Xen grants, maps
    nothing: the chain's user maps them later, all at once).

    And ``spans()``: ``[(start, view), ...]``, ranges mapped for good in one writable view each,
    over which ``view(addr, length)`` is ``view[addr - start : addr - start + length]`` and
    ``check`` passes; :meth:`SplitQueueDevice.pop_many` then checks a buffer inside one with two
    comparisons (``check`` still decides for any other). A memory that maps on demand has none."""

    def view(self, addr: int, length: int) -> memoryview: ...


# What a memory object may raise for an address it does not cover. Converted to RingError.
_MEMORY_FAULTS: Final = (GuestMemoryError, LookupError, ValueError, OverflowError, OSError, BufferError)


class FlatMemory:
    """A contiguous guest-physical range ``[base, base+len(buf))`` backed by one writable buffer
    (bytearray, mmap, memoryview). Raises :class:`GuestMemoryError` outside it."""

    def __init__(self, buf: Any, base: int = 0) -> None:
        self._mv = memoryview(buf).cast("B")
        if self._mv.readonly:
            raise ValueError("guest memory must be writable")
        self.base = base
        self.size = len(self._mv)

    def view(self, addr: int, length: int) -> memoryview:
        off = addr - self.base
        if length < 0 or off < 0 or off + length > self.size:
            raise GuestMemoryError(addr, length)
        return self._mv[off : off + length]

    def check(self, addr: int, length: int) -> None:
        """Raise as :meth:`view` would, without making a view."""
        off = addr - self.base
        if length < 0 or off < 0 or off + length > self.size:
            raise GuestMemoryError(addr, length)

    def spans(self) -> list[tuple[int, memoryview]]:
        """The whole range, one view (see :class:`GuestMemory`)."""
        return [(self.base, self._mv)]

    def release(self) -> None:
        """Drop the underlying export (so an mmap behind it can be closed)."""
        self._mv.release()


class Buffer(NamedTuple):
    """One guest buffer of a chain: guest address and length in bytes."""

    addr: int
    length: int


class Chain(NamedTuple):
    """One descriptor chain popped by the device: device-readable buffers, then device-writable."""

    head: int
    readable: list[Buffer]
    writable: list[Buffer]

    @property
    def readable_len(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)


_new = tuple.__new__  # builds a Buffer/Chain without NamedTuple's Python-level __new__ (the hot path)


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


#: Convert between a little-endian ring u16 and the host's native u16 (an ``"H"`` cast view
#: stores and loads native words): the identity on x86-64 and arm64, there a call into C.
_le16: Callable[[int], int] = operator.index if _LITTLE_ENDIAN_HOST else _swap16


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _check_size(size: int) -> None:
    if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
        raise RingError(f"queue size {size} is not a power of two in [1, {MAX_QUEUE_SIZE}]")


def split_ring_layout(size: int, base: int = 0) -> tuple[int, int, int, int]:
    """Place a split ring of ``size`` entries at ``base``: ``(desc, avail, used, total_bytes)``.

    Addresses honour the alignments 16/2/4; ``total_bytes`` counts from ``base`` to the end of
    the used ring (event-idx fields included).
    """
    _check_size(size)
    desc = _align(base, DESC_ALIGN)
    avail = desc + DESC_SIZE * size
    used = _align(avail + 6 + 2 * size, USED_ALIGN)
    end = used + 6 + USED_ELEM_SIZE * size
    return desc, avail, used, end - base


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 §2.7.10 / linux ``vring_need_event``: did ``old→new`` cross ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def _ring_view(mem: GuestMemory, addr: int, length: int, align: int, what: str, *, writable: bool = True) -> memoryview:
    """``writable=False``: the device only reads it (an indirect table: device-readable, which a
    guest may grant read-only, e.g. Linux ``xen_grant_dma`` for a DMA_TO_DEVICE mapping)."""
    if addr % align:
        raise RingError(f"{what} address {addr:#x} is not {align}-byte aligned")
    try:
        view = mem.view(addr, length)
    except _MEMORY_FAULTS as exc:
        raise RingError(f"{what} [{addr:#x}, +{length:#x}) is not in guest memory: {exc}") from exc
    if len(view) != length or (writable and view.readonly):
        raise RingError(f"{what} at {addr:#x}: memory returned an unusable view")
    return view


def read_buffers(mem: GuestMemory, buffers: Iterable[Buffer], limit: int | None = None) -> bytes:
    """Gather the bytes of ``buffers`` (at most ``limit``). Memory faults raise RingError."""
    out = bytearray()
    for buf in buffers:
        n = buf.length if limit is None else min(buf.length, limit - len(out))
        if n <= 0:
            break
        try:
            view = mem.view(buf.addr, n)
        except _MEMORY_FAULTS as exc:
            raise RingError(f"buffer [{buf.addr:#x}, +{n:#x}) is not in guest memory: {exc}") from exc
        with view:
            out += view
    return bytes(out)


def read_into(mem: GuestMemory, buffers: Iterable[Buffer], dest: memoryview, skip: int = 0) -> int:
    """Copy the bytes of ``buffers`` after the first ``skip`` into ``dest`` (at most its length),
    with no copy in between; returns the bytes copied. Every buffer is looked up before the first
    byte is copied, so a memory fault (RingError) leaves ``dest`` untouched."""
    views: list[tuple[memoryview, int]] = []
    want = len(dest)
    for buf in buffers:
        if want <= 0:
            break
        if skip >= buf.length:
            skip -= buf.length
            continue
        n = min(buf.length - skip, want)
        try:
            view = mem.view(buf.addr + skip, n)
        except _MEMORY_FAULTS as exc:
            for v, _ in views:
                v.release()
            raise RingError(f"buffer [{buf.addr + skip:#x}, +{n:#x}) is not in guest memory: {exc}") from exc
        views.append((view, n))
        want -= n
        skip = 0
    done = 0
    for view, n in views:
        with view:
            dest[done : done + n] = view
        done += n
    return done


def write_buffers(mem: GuestMemory, buffers: Iterable[Buffer], data: bytes | memoryview) -> int:
    """Scatter ``data`` over ``buffers`` in order; returns the number of bytes written."""
    src = memoryview(data).cast("B")
    done = 0
    for buf in buffers:
        n = min(buf.length, len(src) - done)
        if n <= 0:
            break
        try:
            view = mem.view(buf.addr, n)
        except _MEMORY_FAULTS as exc:
            raise RingError(f"buffer [{buf.addr:#x}, +{n:#x}) is not in guest memory: {exc}") from exc
        with view:
            if view.readonly:  # e.g. a read-only grant mapping: the device may not write there
                raise RingError(f"device-writable buffer [{buf.addr:#x}, +{n:#x}) is mapped read-only")
            view[:] = src[done : done + n]
        done += n
    return done


class _Rings:
    """The three ring views shared by both sides. Views are taken once; release() drops them."""

    def __init__(
        self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int, used_addr: int
    ) -> None:
        _check_size(size)
        self.mem = mem
        self.size = size
        self.mask = size - 1
        views: list[memoryview] = []
        try:
            views.append(_ring_view(mem, desc_addr, DESC_SIZE * size, DESC_ALIGN, "descriptor table"))
            views.append(_ring_view(mem, avail_addr, 6 + 2 * size, AVAIL_ALIGN, "available ring"))
            views.append(_ring_view(mem, used_addr, 6 + USED_ELEM_SIZE * size, USED_ALIGN, "used ring"))
        except RingError:
            for v in views:
                v.release()
            raise
        self.desc, self.avail, self.used = views
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        # Offsets of the event-idx fields.
        self.used_event_off = 4 + 2 * size  # in the available ring
        self.avail_event_off = 4 + USED_ELEM_SIZE * size  # in the used ring

    def release(self) -> None:
        for v in (self.desc, self.avail, self.used):
            v.release()


def _probe_of(mem: GuestMemory) -> Any:
    """``probe(addr, length)``: raises as ``mem.view`` would for a range ``mem`` does not cover.
    A memory that offers ``check`` validates without a view (and one that maps on demand, gntdev
    grants, maps nothing: the user of the chain maps its buffers later, all at once); otherwise
    a view of the buffer is taken, its length checked and released."""
    check = getattr(mem, "check", None)
    if check is not None:
        return check
    view = mem.view

    def probe(addr: int, length: int) -> None:
        with view(addr, length) as v:
            if len(v) != length:
                raise GuestMemoryError(addr, length, "memory returned a short view")

    return probe


def widest_span(mem: GuestMemory) -> tuple[int, int, memoryview | None]:
    """``(start, end, view)`` of the widest of ``mem.spans()``, or ``(0, 0, None)`` without any."""
    spans = getattr(mem, "spans", None)
    best: tuple[int, int, memoryview | None] = (0, 0, None)
    for start, view in spans() if spans is not None else ():
        if len(view) > best[1] - best[0]:
            best = (start, start + len(view), view)
    return best


_U16_RUNS: dict[int, struct.Struct] = {}


def _u16_run(count: int) -> struct.Struct:
    """``count`` little-endian u16 (cached per count)."""
    run = _U16_RUNS.get(count)
    if run is None:
        run = _U16_RUNS[count] = struct.Struct(f"<{count}H")
    return run


_DESC_RUNS: dict[int, struct.Struct] = {}
#: Indirect tables shorter than this are walked descriptor by descriptor: below it the walk costs
#: fewer instructions than :func:`_linear_table`'s whole-table passes (callgrind, CPython 3.11:
#: about 4.7k per entry and 14k per table walked, 2.7k and 33k in those passes).
_LINEAR_MIN: Final = 12
_new_buffer = functools.partial(tuple.__new__, Buffer)  # Buffer((addr, length)) without its Python-level __new__


def _linear_table(head: int, mem: memoryview, offset: int, entries: int, lo: int, hi: int) -> Chain | None:
    """The chain that an indirect table of ``entries`` descriptors at ``mem[offset:]`` holds when
    it is laid out as drivers lay tables out: entry i links to i + 1, the last ends the chain,
    device-readable buffers before device-writable ones, no other flag, every buffer inside
    ``[lo, hi)`` (the memory's widest span) and the total within a u32. Read with one unpack and
    checked with a few whole-table comparisons instead of a Python step per descriptor (a 34-entry
    table of Linux's virtio-blk: a 128 KiB request); None for any other table, which the
    descriptor-by-descriptor walk then takes or refuses (with its precise reason)."""
    run = _DESC_RUNS.get(entries)
    if run is None:
        run = _DESC_RUNS[entries] = struct.Struct("<" + "QIHH" * entries)
    t = run.unpack_from(mem, offset)
    last = entries - 1
    if last and t[3 : 4 * last : 4] != tuple(range(1, entries)):
        return None
    flags = t[2::4]
    try:
        k = flags.index(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)  # the first device-writable buffer
    except ValueError:
        k = last if flags[last] == VIRTQ_DESC_F_WRITE else entries
    if k < entries:
        expect = (VIRTQ_DESC_F_NEXT,) * k + (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,) * (last - k) + (VIRTQ_DESC_F_WRITE,)
    else:
        expect = (VIRTQ_DESC_F_NEXT,) * last + (0,)
    if flags != expect:
        return None
    addrs, lengths = t[0::4], t[1::4]
    if min(addrs) < lo or max(map(operator.add, addrs, lengths)) > hi or sum(lengths) > MAX_CHAIN_BYTES:
        return None
    return _new(Chain, (head, list(map(_new_buffer, zip(addrs[:k], lengths[:k]))),
                        list(map(_new_buffer, zip(addrs[k:], lengths[k:])))))


_U32_RUNS: dict[int, struct.Struct] = {}


def _u32_run(count: int) -> struct.Struct:
    """``count`` little-endian u32 (cached per count)."""
    run = _U32_RUNS.get(count)
    if run is None:
        run = _U32_RUNS[count] = struct.Struct(f"<{count}I")
    return run


def _walk_table(probe: Any, head: int, readable: list[Buffer], writable: list[Buffer], total: int,
                table: memoryview, entries: int, idx: int, where: str, allow_indirect: bool) -> tuple[int, int, int] | None:
    """Follow NEXT links from ``idx`` of chain ``head``, validating each buffer with ``probe`` (in
    guest memory, no address wrap, readable before writable, the chain's ``total`` within a
    u32) into ``readable``/``writable``; returns (addr, len, total so far) of a final indirect
    descriptor, None at the chain's end."""
    unpack = _DESC.unpack_from
    for _ in range(entries):
        addr, length, flags, nxt = unpack(table, DESC_SIZE * idx)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not allow_indirect:
                raise RingError(f"chain {head}: nested indirect descriptor")
            if flags & VIRTQ_DESC_F_NEXT:
                raise RingError(f"chain {head}: descriptor {idx} has both INDIRECT and NEXT")
            return addr, length, total
        if addr + length > _U64_MAX + 1:
            raise RingError(f"chain {head}: buffer {addr:#x}+{length:#x} wraps the address space")
        if length:
            try:
                probe(addr, length)
            except _MEMORY_FAULTS as exc:
                raise RingError(
                    f"chain {head}: buffer [{addr:#x}, +{length:#x}) is not in guest memory: {exc}"
                ) from exc
        total += length
        if total > MAX_CHAIN_BYTES:
            raise RingError(f"chain {head}: total length {total} exceeds 4 GiB - 1")
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append(_new(Buffer, (addr, length)))
        elif writable:
            raise RingError(f"chain {head}: device-readable descriptor after a device-writable one")
        else:
            readable.append(_new(Buffer, (addr, length)))
        if not flags & VIRTQ_DESC_F_NEXT:
            return None
        if nxt >= entries:
            raise RingError(f"chain {head}: next index {nxt} out of range of the {where} ({entries})")
        idx = nxt
    raise RingError(f"chain {head} is longer than its {where} ({entries} entries): descriptor loop")


class SplitQueueDevice:
    """Device side of a split virtqueue: pops chains the driver made available, pushes used ones.

    ``last_avail_idx`` is where consumption starts (vhost-user SET_VRING_BASE); the used index is
    read from the used ring (as libvhost-user does on SET_VRING_ADDR) unless ``used_idx`` is given.

    ``inflight`` (a :class:`vhost_user.inflight.InflightQueue`, already :meth:`recovered
    <vhost_user.inflight.InflightQueue.recover>`): chains it lists for resubmission are popped
    first; every chain taken from the avail ring is marked in flight, and each push publishes its
    own used idx between ``pre_put`` and ``post_put`` (libvhost-user's order).
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        inflight: Any = None,
    ) -> None:
        self._r = _Rings(mem, size, desc_addr, avail_addr, used_addr)
        self._probe = _probe_of(mem)
        # A memory that maps on demand (grants) is told when an indirect table may be unmapped.
        self._release_table: Callable[[list[tuple[int, int]]], None] | None = getattr(mem, "release_buffers", None)
        # The words the driver polls (used idx, flags, avail_event) are stored with one 16-bit
        # store each, never through struct (see "Single stores" in the module docstring).
        self._used_w = self._r.used.cast("H")
        # pop_many: buffers inside it need no check call (none for a memory that maps on demand)
        self._span = widest_span(mem) if self._release_table is None else (0, 0, None)
        self.inflight = inflight
        self.event_idx = event_idx
        self._last_avail = last_avail_idx & 0xFFFF
        self._avail_seen = self._last_avail  # the avail idx last read (validated by available())
        self._used_idx = (_U16.unpack_from(self._r.used, 2)[0] if used_idx is None else used_idx) & 0xFFFF
        self._signalled_used = self._used_idx
        self._notify_enabled = True

    # --- state -------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._r.size

    @property
    def last_avail_idx(self) -> int:
        """Next available-ring index to consume (what GET_VRING_BASE reports)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    def release(self) -> None:
        """Drop the ring views (call before unmapping guest memory). The queue is unusable after."""
        self._used_w.release()
        self._r.release()
        self._span = (0, 0, None)

    # --- consuming -----------------------------------------------------------------------------
    def available(self) -> int:
        """Number of chains the driver has made available and we have not popped yet."""
        avail_idx: int = _U16.unpack_from(self._r.avail, 2)[0]
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending > self._r.size:
            raise RingError(
                f"avail idx {avail_idx} is {pending} entries ahead of last_avail_idx "
                f"{self._last_avail} (queue size {self._r.size})"
            )
        self._avail_seen = avail_idx
        return pending

    def pop(self) -> Chain | None:
        """Take the next available chain, validated; ``None`` when the ring is empty.
        With inflight tracking, chains left in flight by a previous back-end come first."""
        inflight = self.inflight
        if inflight is not None:
            again = inflight.next_resubmit()
            if again is not None:
                return self._walk(again)
        # Chains up to the avail idx read last are there without reading it again.
        if self._avail_seen == self._last_avail and not self.available():
            return None
        # Read barrier here (avail idx before the ring entry) — see the module docstring.
        slot = self._last_avail & self._r.mask
        head = _U16.unpack_from(self._r.avail, 4 + 2 * slot)[0]
        chain = self._walk(head)
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        if inflight is not None:
            inflight.begin(head)
        if self.event_idx and self._notify_enabled:
            self._write_avail_event()
        return chain

    def pop_many(self, limit: int) -> list[Chain]:
        """Take up to ``limit`` available chains, as that many :meth:`pop` calls would: the same
        chains, the same checks, the same refusals, in one pass (the heads read with one unpack,
        every chain walked inline; a buffer inside the memory's widest span is checked by two
        comparisons instead of a ``check`` call, an indirect table there is sliced from it).
        A chain that fails a check raises RingError when it is the first; after good ones the
        batch ends before it, which stays available (the next call raises)."""
        inflight = self.inflight
        out: list[Chain] = []
        if inflight is not None and inflight.pending_resubmit:
            while len(out) < limit:
                try:
                    chain = self.pop()
                except RingError:
                    if out:
                        break
                    raise
                if chain is None:
                    break
                out.append(chain)
            return out
        r = self._r
        last = self._last_avail
        pending = (self._avail_seen - last) & 0xFFFF
        if pending < limit:  # (available(), inline)
            avail_idx: int = _U16.unpack_from(r.avail, 2)[0]
            pending = (avail_idx - last) & 0xFFFF
            if pending > r.size:
                raise RingError(f"avail idx {avail_idx} is {pending} entries ahead of last_avail_idx "
                                f"{last} (queue size {r.size})")
            self._avail_seen = avail_idx
        if pending > limit:
            pending = limit
        if pending <= 0:
            return []
        # Read barrier here (avail idx before the ring entries) — see the module docstring.
        size, avail = r.size, r.avail
        slot = last & r.mask
        if pending == 1:
            heads = _U16.unpack_from(avail, 4 + 2 * slot)
        elif slot + pending <= size:
            heads = _u16_run(pending).unpack_from(avail, 4 + 2 * slot)
        else:
            heads = _u16_run(size - slot).unpack_from(avail, 4 + 2 * slot) + \
                _u16_run(slot + pending - size).unpack_from(avail, 4)
        unpack, desc, probe = _DESC.unpack_from, r.desc, self._probe
        lo, hi, span = self._span
        for head in heads:
            try:
                if head >= size:
                    raise RingError(f"chain head {head} out of range (queue size {size})")
                readable: list[Buffer] = []
                writable: list[Buffer] = []
                table, entries, nested, idx, seen, total = desc, size, False, head, 0, 0
                while True:
                    if seen == entries:
                        where = "indirect table" if nested else "descriptor table"
                        raise RingError(f"chain {head} is longer than its {where} ({entries} entries): descriptor loop")
                    seen += 1
                    addr, length, flags, nxt = unpack(table, idx << 4)
                    if flags & VIRTQ_DESC_F_INDIRECT:
                        if nested or flags & VIRTQ_DESC_F_NEXT or span is None or not lo <= addr or addr + length > hi:
                            chain = self._walk(head)  # refusals and tables outside the span: the general walk
                            break
                        if length == 0 or length % DESC_SIZE:
                            raise RingError(f"chain {head}: indirect table length {length} is not a non-zero multiple of 16")
                        entries = length // DESC_SIZE
                        if entries > MAX_INDIRECT_DESCRIPTORS:
                            raise RingError(f"chain {head}: indirect table of {entries} entries is too big")
                        if seen == 1 and entries >= _LINEAR_MIN:  # the head itself: the table is the whole chain
                            linear = _linear_table(head, span, addr - lo, entries, lo, hi)
                            if linear is not None:
                                chain = linear
                                break
                        table, nested, idx, seen = span[addr - lo : addr - lo + length], True, 0, 0
                        continue
                    if not (lo <= addr and addr + length <= hi):
                        if addr + length > _U64_MAX + 1:
                            raise RingError(f"chain {head}: buffer {addr:#x}+{length:#x} wraps the address space")
                        if length:
                            try:
                                probe(addr, length)
                            except _MEMORY_FAULTS as exc:
                                raise RingError(
                                    f"chain {head}: buffer [{addr:#x}, +{length:#x}) is not in guest memory: {exc}"
                                ) from exc
                    total += length
                    if total > MAX_CHAIN_BYTES:
                        raise RingError(f"chain {head}: total length {total} exceeds 4 GiB - 1")
                    if flags & VIRTQ_DESC_F_WRITE:
                        writable.append(_new(Buffer, (addr, length)))
                    elif writable:
                        raise RingError(f"chain {head}: device-readable descriptor after a device-writable one")
                    else:
                        readable.append(_new(Buffer, (addr, length)))
                    if not flags & VIRTQ_DESC_F_NEXT:
                        chain = _new(Chain, (head, readable, writable))
                        break
                    if nxt >= entries:
                        where = "indirect table" if nested else "descriptor table"
                        raise RingError(f"chain {head}: next index {nxt} out of range of the {where} ({entries})")
                    idx = nxt
            except RingError:
                if out:
                    break
                raise
            out.append(chain)
            if inflight is not None:
                inflight.begin(head)
        self._last_avail = (last + len(out)) & 0xFFFF
        if self.event_idx and self._notify_enabled:
            self._write_avail_event()
        return out

    def chain(self, head: int) -> Chain:
        """The chain at ``head`` as :meth:`pop` returns it (validated), nothing consumed: e.g. one
        in flight whose completion a restarted front-end gives back."""
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        size = self._r.size
        if head >= size:
            raise RingError(f"chain head {head} out of range (queue size {size})")
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        indirect = _walk_table(self._probe, head, readable, writable, 0, self._r.desc, size, head, "descriptor table", True)
        if indirect is not None:
            addr, length, total = indirect
            if length == 0 or length % DESC_SIZE:
                raise RingError(f"chain {head}: indirect table length {length} is not a non-zero multiple of 16")
            entries = length // DESC_SIZE
            if entries > MAX_INDIRECT_DESCRIPTORS:
                raise RingError(f"chain {head}: indirect table of {entries} entries is too big")
            lo, hi, span = self._span
            if not readable and not writable and entries >= _LINEAR_MIN and span is not None \
                    and lo <= addr and addr + length <= hi:  # the head itself: the table is the whole chain
                linear = _linear_table(head, span, addr - lo, entries, lo, hi)
                if linear is not None:
                    return linear
            try:
                with _ring_view(self._r.mem, addr, length, 1, f"chain {head}: indirect table", writable=False) as table:
                    _walk_table(self._probe, head, readable, writable, total, table, entries, 0, "indirect table", False)
            finally:
                # A memory that maps on demand (grants) unmaps the table now: the guest ends its
                # grant when the chain completes, and Linux's xen_grant_dma gives up on a device
                # whose grant is still mapped then ("Grant still in use by backend domain").
                if self._release_table is not None:
                    self._release_table([(addr, length)])
        return _new(Chain, (head, readable, writable))

    # --- producing -----------------------------------------------------------------------------
    def push(self, head: int, written_len: int) -> None:
        """Return chain ``head`` to the driver with ``written_len`` bytes written."""
        if self.inflight is not None:
            self.push_many(((head, written_len),))
            return
        r = self._r
        if not 0 <= head < r.size:
            raise ValueError(f"head {head} out of range (queue size {r.size})")
        if not 0 <= written_len <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written_len} does not fit u32")
        idx = self._used_idx
        _USED_ELEM.pack_into(r.used, 4 + USED_ELEM_SIZE * (idx & r.mask), head, written_len)
        idx = (idx + 1) & 0xFFFF
        # Write barrier here (element before idx) — see the module docstring.
        self._used_w[1] = _le16(idx)
        self._used_idx = idx

    def push_many(self, items: Iterable[tuple[int, int]]) -> None:
        """Write several used elements, then publish the used index once (with inflight
        tracking: once per element, so a restart can tell which one was being put)."""
        used = self._r.used
        idx = self._used_idx
        inflight = self.inflight
        if inflight is None:
            self._push_run(items)
            return
        for head, written in items:
            if not 0 <= head < self._r.size:
                raise ValueError(f"head {head} out of range (queue size {self._r.size})")
            if not 0 <= written <= 0xFFFF_FFFF:
                raise ValueError(f"written length {written} does not fit u32")
            _USED_ELEM.pack_into(used, 4 + USED_ELEM_SIZE * (idx & self._r.mask), head, written)
            idx = (idx + 1) & 0xFFFF
            if inflight is not None:
                inflight.pre_put(head)
                self._used_w[1] = _le16(idx)  # (elements before idx, as below)
                self._used_idx = idx
                inflight.post_put(head, idx)
        if inflight is not None:
            return
        # Write barrier here (elements before idx) — see the module docstring.
        self._used_w[1] = _le16(idx)  # one store: a polling driver must never see 0 here
        self._used_idx = idx

    def _push_run(self, items: Iterable[tuple[int, int]]) -> None:
        """push_many without in-flight tracking: the elements (checked first: nothing is written
        for a bad one) with one pack per contiguous run of the ring, then the used idx."""
        size, idx = self._r.size, self._used_idx
        flat: list[int] = []
        for head, written in items:
            if not 0 <= head < size:
                raise ValueError(f"head {head} out of range (queue size {size})")
            if not 0 <= written <= 0xFFFF_FFFF:
                raise ValueError(f"written length {written} does not fit u32")
            flat += (head, written)
        count = len(flat) >> 1
        if not count:
            return
        used, mask, done = self._r.used, self._r.mask, 0
        if count == 1:
            _USED_ELEM.pack_into(used, 4 + USED_ELEM_SIZE * (idx & mask), *flat)
            done = 1
        while done < count:
            slot = (idx + done) & mask
            run = count - done if count - done <= size - slot else size - slot
            _u32_run(2 * run).pack_into(used, 4 + USED_ELEM_SIZE * slot, *flat[2 * done : 2 * (done + run)])
            done += run
        idx = (idx + count) & 0xFFFF
        # Write barrier here (elements before idx) — see the module docstring.
        self._used_w[1] = _le16(idx)  # one store: a polling driver must never see 0 here
        self._used_idx = idx

    # --- notifications -------------------------------------------------------------------------
    def needs_notify(self) -> bool:
        """Should the driver be notified (call eventfd) about what was pushed since the last call?

        Honours VRING_AVAIL_F_NO_INTERRUPT, or ``used_event`` with EVENT_IDX (§2.7.10).
        """
        old, new = self._signalled_used, self._used_idx
        self._signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            used_event = _U16.unpack_from(self._r.avail, self._r.used_event_off)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._r.avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    def disable_notify(self) -> None:
        """Ask the driver not to kick (VRING_USED_F_NO_NOTIFY; a no-op hint with EVENT_IDX)."""
        self._notify_enabled = False
        if not self.event_idx:
            self._used_w[0] = _le16(VRING_USED_F_NO_NOTIFY)

    def enable_notify(self) -> bool:
        """Ask for kicks again. Returns True if chains arrived meanwhile (pop them: no kick comes)."""
        self._notify_enabled = True
        if self.event_idx:
            self._write_avail_event()
        else:
            self._used_w[0] = 0
        return self.available() > 0

    def suppress_notify(self) -> None:
        """Ask the driver to stop notifying for good (the device is going while its driver runs
        on), until :meth:`enable_notify`. virtio 1.2 §2.7.10.1: without EVENT_IDX a driver that
        sees VRING_USED_F_NO_NOTIFY in the used ring's flags SHOULD NOT notify; with EVENT_IDX it
        ignores that bit and MUST notify only when its avail idx passes ``avail_event``, which is
        put half the index space away from the driver's avail idx: a driver whose device returns
        nothing more stays within a queue size of where it is, and never gets there."""
        self._notify_enabled = False
        self._used_w[0] = _le16(VRING_USED_F_NO_NOTIFY)
        if self.event_idx:
            avail_idx: int = _U16.unpack_from(self._r.avail, 2)[0]
            self._used_w[self._r.avail_event_off // 2] = _le16((avail_idx + 0x8000) & 0xFFFF)

    def _write_avail_event(self) -> None:
        self._used_w[self._r.avail_event_off // 2] = _le16(self._last_avail)


class SplitQueueDriver:
    """Driver side of a split virtqueue (a test front-end / simulated guest driver).

    The constructor initialises the rings (zeroes all three areas), as a driver does when it
    allocates a queue; with ``start`` the indices begin there instead of 0. Free descriptors and in-flight chains are tracked in Python, never read back
    from shared memory; used elements from the device are validated (RingError).
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        event_idx: bool = False,
        start: int = 0,
    ) -> None:
        self._r = _Rings(mem, size, desc_addr, avail_addr, used_addr)
        self.event_idx = event_idx
        for v in (self._r.desc, self._r.avail, self._r.used):
            v[:] = bytes(len(v))
        # 16-bit word views of the rings: every word the device polls is stored (and every word it
        # updates is loaded) with one access, never through struct (see "Single stores" above).
        self._avail_w = self._r.avail.cast("H")
        self._used_w = self._r.used.cast("H")
        self._used_event_w = self._r.used_event_off // 2
        self._avail_event_w = self._r.avail_event_off // 2
        self._free: list[int] = list(range(size - 1, -1, -1))  # a stack; pops 0 first
        self._inflight: dict[int, tuple[list[int], Any]] = {}
        # ``start``: the rings continue at that index (a back-end resumed with SET_VRING_BASE
        # ``start``): avail idx, used idx, used_event and avail_event all hold it.
        start &= 0xFFFF
        self._avail_idx = self._kicked_avail = self._last_used = start
        if start:
            self._avail_w[1] = self._used_w[1] = _le16(start)
            self._avail_w[self._used_event_w] = self._used_w[self._avail_event_w] = _le16(start)

    @property
    def size(self) -> int:
        return self._r.size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @property
    def last_used(self) -> int:
        """The used index up to which the device's completions have been taken (:meth:`get_used`)."""
        return self._last_used

    def release(self) -> None:
        self._avail_w.release()
        self._used_w.release()
        self._r.release()

    def add(
        self,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        token: Any = None,
    ) -> int:
        """Expose a chain (readable buffers first) and make it available. Returns its head."""
        n = len(readable) + len(writable)
        if not n:
            raise ValueError("a chain needs at least one buffer")
        free = self._free
        if n > len(free):
            raise QueueFull(f"chain of {n} descriptors, {len(free)} free")
        indices = free[-n:]  # the stack's top n, popped in order
        indices.reverse()
        del free[-n:]
        pack, table = _DESC.pack_into, self._r.desc
        i, last = 0, n - 1
        for flags, bufs in ((0, readable), (VIRTQ_DESC_F_WRITE, writable)):
            for addr, length in bufs:
                if i == last:
                    pack(table, DESC_SIZE * indices[i], addr, length, flags, 0)
                else:
                    pack(table, DESC_SIZE * indices[i], addr, length, flags | VIRTQ_DESC_F_NEXT, indices[i + 1])
                i += 1
        # (_publish, inline: one call less per chain)
        head = indices[0]
        self._inflight[head] = (indices, token)
        avail_w, avail_idx = self._avail_w, self._avail_idx
        avail_w[2 + (avail_idx & self._r.mask)] = _le16(head)
        # Write barrier here (descriptors + ring entry before idx) — see the module docstring.
        self._avail_idx = avail_idx = (avail_idx + 1) & 0xFFFF
        avail_w[1] = _le16(avail_idx)  # one store: a poller must never see 0 here
        return head

    def add_many(self, chains: Sequence[tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]], Any, int]]) -> list[int]:
        """Expose several chains ``(readable, writable, token, table)`` in order, each as
        :meth:`add` would (``table`` < 0) or as :meth:`add_indirect` would at address ``table``,
        and make them all available with one avail idx store. Returns their heads. Every chain is
        checked first (ValueError, QueueFull): nothing is written then."""
        free = self._free
        need = 0
        for readable, writable, _token, table in chains:
            n = len(readable) + len(writable)
            if not n:
                raise ValueError("a chain needs at least one buffer")
            need += 1 if table >= 0 else n
        if need > len(free):
            raise QueueFull(f"chains of {need} descriptors, {len(free)} free")
        pack, ring, inflight, mask = _DESC.pack_into, self._r.desc, self._inflight, self._r.mask
        avail_w, avail_idx = self._avail_w, self._avail_idx
        heads = []
        for readable, writable, token, table in chains:
            if table >= 0:
                n = len(readable) + len(writable)
                with _ring_view(self._r.mem, table, DESC_SIZE * n, DESC_ALIGN, "indirect table") as view:
                    self._lay(pack, view, list(range(n)), readable, writable)
                indices = [free.pop()]
                pack(ring, DESC_SIZE * indices[0], table, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
            else:  # (_lay, inline: one call less per chain)
                n = len(readable) + len(writable)
                indices = free[-n:]  # the stack's top n, popped in order
                indices.reverse()
                del free[-n:]
                i, last = 0, n - 1
                for addr, length in readable:
                    if i == last:
                        pack(ring, DESC_SIZE * indices[i], addr, length, 0, 0)
                    else:
                        pack(ring, DESC_SIZE * indices[i], addr, length, VIRTQ_DESC_F_NEXT, indices[i + 1])
                    i += 1
                for addr, length in writable:
                    if i == last:
                        pack(ring, DESC_SIZE * indices[i], addr, length, VIRTQ_DESC_F_WRITE, 0)
                    else:
                        pack(ring, DESC_SIZE * indices[i], addr, length, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                             indices[i + 1])
                    i += 1
            head = indices[0]
            inflight[head] = (indices, token)
            avail_w[2 + (avail_idx & mask)] = _le16(head)
            avail_idx = (avail_idx + 1) & 0xFFFF
            heads.append(head)
        # Write barrier here (descriptors + ring entries before idx) — see the module docstring.
        if heads:
            self._avail_idx = avail_idx
            avail_w[1] = _le16(avail_idx)  # one store: a poller must never see 0 here
        return heads

    @staticmethod
    def _lay(pack: Any, table: memoryview, indices: list[int], readable: Sequence[tuple[int, int]],
             writable: Sequence[tuple[int, int]]) -> None:
        i, last = 0, len(indices) - 1
        for flags, bufs in ((0, readable), (VIRTQ_DESC_F_WRITE, writable)):
            for addr, length in bufs:
                if i == last:
                    pack(table, DESC_SIZE * indices[i], addr, length, flags, 0)
                else:
                    pack(table, DESC_SIZE * indices[i], addr, length, flags | VIRTQ_DESC_F_NEXT, indices[i + 1])
                i += 1

    def add_indirect(
        self,
        table_addr: int,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        token: Any = None,
    ) -> int:
        """Like :meth:`add`, but the chain lives in an indirect table the caller placed at
        ``table_addr`` (16 bytes per buffer, 16-aligned); uses one ring descriptor."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if not self._free:
            raise QueueFull("no free descriptor")
        table = _ring_view(self._r.mem, table_addr, DESC_SIZE * len(bufs), DESC_ALIGN, "indirect table")
        with table:
            for i, (addr, length, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                _DESC.pack_into(
                    table, DESC_SIZE * i, addr, length,
                    flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1,
                )
        slot = self._free.pop()
        _DESC.pack_into(self._r.desc, DESC_SIZE * slot, table_addr, DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        return self._publish([slot], token)

    def _publish(self, indices: list[int], token: Any) -> int:
        head = indices[0]
        self._inflight[head] = (indices, token)
        self._avail_w[2 + (self._avail_idx & self._r.mask)] = _le16(head)
        # Write barrier here (descriptors + ring entry before idx) — see the module docstring.
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._avail_w[1] = _le16(self._avail_idx)  # one store: a poller must never see 0 here
        return head

    def kick_needed(self) -> bool:
        """Must the device be notified about the chains added since the last call?

        Honours VRING_USED_F_NO_NOTIFY, or ``avail_event`` with EVENT_IDX (§2.7.10).
        """
        old, new = self._kicked_avail, self._avail_idx
        self._kicked_avail = new
        if old == new:
            return False
        if self.event_idx:
            avail_event = _le16(self._used_w[self._avail_event_w])
            return vring_need_event(avail_event, new, old)
        return not _le16(self._used_w[0]) & VRING_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[Any, int]]:
        """Collect the chains the device returned: ``[(token, written_len), ...]`` in used order.

        With EVENT_IDX it then publishes ``used_event`` and harvests again if the device pushed
        meanwhile: such a chain may have been judged not worth an interrupt against the old
        ``used_event`` (Linux ``virtqueue_enable_cb_prepare`` + ``virtqueue_poll``), so returning
        without it would lose a wake-up.
        """
        out: list[tuple[Any, int]] = []
        while True:
            self._harvest(out)
            if not self.event_idx:
                return out
            self._publish_used_event()
            if _le16(self._used_w[1]) == self._last_used:
                return out

    def _publish_used_event(self) -> None:
        self._avail_w[self._used_event_w] = _le16(self._last_used)

    def _harvest(self, out: list[tuple[Any, int]]) -> None:
        last, inflight = self._last_used, self._inflight
        used_idx = _le16(self._used_w[1])
        pending = (used_idx - last) & 0xFFFF
        if pending > len(inflight):
            raise RingError(f"used idx {used_idx} is {pending} ahead, only {len(inflight)} chains in flight")
        if not pending:
            return
        # Read barrier here (used idx before the elements) — see the module docstring.
        used, size, slot = self._r.used, self._r.size, last & self._r.mask
        run = pending if pending <= size - slot else size - slot  # the elements, one unpack per contiguous run
        if run == 1:
            elems = _USED_ELEM.unpack_from(used, 4 + USED_ELEM_SIZE * slot)
        else:
            elems = _u32_run(2 * run).unpack_from(used, 4 + USED_ELEM_SIZE * slot)
        if run < pending:
            elems += _u32_run(2 * (pending - run)).unpack_from(used, 4)
        free, it, taken = self._free, iter(elems), 0
        for head, written in zip(it, it):
            entry = inflight.pop(head, None)
            if entry is None:
                self._last_used = (last + taken) & 0xFFFF  # (the elements before it are taken)
                raise RingError(f"device returned head {head}, which is not in flight")
            indices, token = entry
            free.extend(reversed(indices))
            out.append((token, written))
            taken += 1
        self._last_used = (last + taken) & 0xFFFF

    def disable_interrupts(self) -> None:
        """VRING_AVAIL_F_NO_INTERRUPT (without EVENT_IDX); with EVENT_IDX move used_event far away."""
        if self.event_idx:
            self._avail_w[self._used_event_w] = _le16((self._last_used - 1) & 0xFFFF)
        else:
            self._avail_w[0] = _le16(VRING_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> None:
        if self.event_idx:
            self._avail_w[self._used_event_w] = _le16(self._last_used)
        else:
            self._avail_w[0] = 0
