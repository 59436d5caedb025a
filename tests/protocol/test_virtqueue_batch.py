"""The split virtqueue's batch operations against their one-at-a-time counterparts: ``pop_many``
takes the same chains and refuses the same hostile ones as ``pop`` (whatever the memory's spans
cover), ``add_many``/``push_many`` and the driver's harvest write and read what ``add``/``push``
and one element at a time would, across the ring's end."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    FlatMemory,
    QueueFull,
    RingError,
    SplitQueueDevice,
    SplitQueueDriver,
    split_ring_layout,
    widest_span,
)

from tests.protocol.test_virtqueue import BASE, DATA, MEM_SIZE, put_desc

SIZE = 8
TABLE = BASE + 0x4000  # an indirect table
HALF = BASE + MEM_SIZE // 2


class NarrowSpan(FlatMemory):
    """A memory whose span covers only its lower half (the rest is checked call by call)."""

    def spans(self) -> list[tuple[int, memoryview]]:
        return [(self.base, self._mv[: MEM_SIZE // 2])]


class NoSpan:
    """A memory with ``view``/``check`` only (as one that maps on demand)."""

    def __init__(self, flat: FlatMemory) -> None:
        self.flat = flat

    def view(self, addr: int, length: int) -> memoryview:
        return self.flat.view(addr, length)

    def check(self, addr: int, length: int) -> None:
        self.flat.check(addr, length)


def _memory(kind: str, ram: bytearray):
    if kind == "flat":
        return FlatMemory(ram, base=BASE)
    if kind == "narrow":
        return NarrowSpan(ram, base=BASE)
    return NoSpan(FlatMemory(ram, base=BASE))


def _drain(take, limit: int) -> tuple[list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]], str | None]:
    """Chains taken until the ring is empty or a RingError (its message), as plain tuples."""
    got: list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] = []
    for _ in range(4 * SIZE):
        try:
            chains = take()
        except RingError as e:
            return got, str(e)
        if not chains:
            return got, None
        assert len(chains) <= limit
        got += [(c.head, [tuple(b) for b in c.readable], [tuple(b) for b in c.writable]) for c in chains]
    raise AssertionError("the ring never ran dry")


_desc = st.tuples(
    st.one_of(st.integers(0, 2**64 - 1), st.integers(BASE - 64, BASE + MEM_SIZE + 64),
              st.sampled_from([DATA, HALF - 16, HALF, BASE + MEM_SIZE - 16, TABLE, BASE - 16])),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 64), st.sampled_from([0, 1, 16, 32, 48])),
    st.integers(0, 7),
    st.one_of(st.integers(0, 0xFFFF), st.integers(0, SIZE)),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(_desc, min_size=SIZE, max_size=SIZE),
    table=st.lists(_desc, min_size=4, max_size=4),
    ring=st.lists(st.integers(0, 0xFFFF) | st.integers(0, SIZE - 1), min_size=SIZE, max_size=SIZE),
    count=st.integers(0, 0xFFFF) | st.integers(0, SIZE + 1),
    last_avail=st.integers(0, 0xFFFF) | st.sampled_from([0, 0xFFFE]),
    limit=st.integers(1, SIZE + 1),
    kind=st.sampled_from(["flat", "narrow", "none"]),
)
@example(descs=[(BASE + MEM_SIZE - 16, 32, 0, 0)] * SIZE, table=[(DATA, 1, 0, 0)] * 4, ring=[0] * SIZE, count=1,
         last_avail=0, limit=SIZE, kind="flat")  # one past the end of RAM by 16 bytes
@example(descs=[(TABLE, 32, VIRTQ_DESC_F_INDIRECT, 1)] * SIZE, table=[(TABLE, 16, VIRTQ_DESC_F_INDIRECT, 0)] * 4,
         ring=[0] * SIZE, count=1, last_avail=0, limit=SIZE, kind="flat")  # a table naming a table
def test_pop_many_takes_and_refuses_what_pop_does(descs, table, ring, count, last_avail, limit, kind):
    """A hostile (random) ring: pop_many hands out the same validated chains as pop, in the same
    order, and refuses the same chain with the same reason."""
    ram = bytearray(MEM_SIZE)
    layout = split_ring_layout(SIZE, BASE)
    flat = FlatMemory(ram, base=BASE)
    for i, d in enumerate(descs):
        put_desc(flat, layout[0], i, *d)
    for i, d in enumerate(table):
        put_desc(flat, TABLE, i, *d)
    if descs[0][2] & VIRTQ_DESC_F_INDIRECT:  # head 0 points at the table
        put_desc(flat, layout[0], 0, TABLE, 16 * (1 + descs[0][3] % 4), descs[0][2])
    with flat.view(layout[1], 4 + 2 * SIZE) as v:
        struct.pack_into(f"<HH{SIZE}H", v, 0, 0, (last_avail + count) & 0xFFFF, *ring)
    snapshot = bytes(ram)

    one = SplitQueueDevice(flat, SIZE, *layout[:3], last_avail_idx=last_avail)
    expected = _drain(lambda: [c] if (c := one.pop()) is not None else [], 1)
    one.release()
    assert bytes(ram[layout[0] - BASE : layout[2] - BASE]) == snapshot[layout[0] - BASE : layout[2] - BASE]

    mem = _memory(kind, ram)
    many = SplitQueueDevice(mem, SIZE, *layout[:3], last_avail_idx=last_avail)
    assert _drain(lambda: many.pop_many(limit), limit) == expected
    many.release()
    assert bytes(ram) == snapshot  # a device without EVENT_IDX writes nothing while it takes chains


def _pair(memory_kind: str = "flat", event_idx: bool = False):
    ram = bytearray(MEM_SIZE)
    mem = _memory(memory_kind, ram)
    desc, avail, used, _ = split_ring_layout(SIZE, BASE)
    drv = SplitQueueDriver(FlatMemory(ram, base=BASE), SIZE, desc, avail, used, event_idx=event_idx)
    dev = SplitQueueDevice(mem, SIZE, desc, avail, used, event_idx=event_idx)
    return ram, drv, dev


@pytest.mark.parametrize("kind", ["flat", "narrow", "none"])
def test_hostile_chain_after_good_ones_ends_the_batch_and_is_refused_next(kind):
    """A batch stops before a bad chain (the good ones before it are taken, none after it); the
    next call refuses it."""
    _, drv, dev = _pair(kind)
    drv.add([(DATA, 16)], [(DATA + 64, 64)], token="a")
    drv.add([(HALF + 64, 16)], [(BASE + MEM_SIZE - 8, 16)], token="bad")  # crosses the end of RAM
    drv.add([(DATA + 256, 16)], token="c")
    chains = dev.pop_many(SIZE)
    assert [(c.head, c.readable, c.writable) for c in chains] == [(0, [(DATA, 16)], [(DATA + 64, 64)])]
    assert dev.last_avail_idx == 1
    with pytest.raises(RingError, match="not in guest memory"):
        dev.pop_many(SIZE)
    assert dev.last_avail_idx == 1  # nothing consumed by the refusal


@pytest.mark.parametrize("kind", ["flat", "narrow", "none"])
def test_indirect_chains_and_the_span_edges(kind):
    """Indirect tables inside and outside the span, buffers on both sides of its end: taken as
    pop takes them; a table that crosses the end of RAM is refused."""
    ram, drv, dev = _pair(kind)
    drv.add_indirect(TABLE, [(DATA, 16)], [(HALF - 8, 16), (HALF + 8, 1)], token=0)  # crosses the narrow span's end
    drv.add_indirect(HALF + 0x100, [(HALF + 0x200, 16)], [(DATA, 8)], token=1)  # table outside the narrow span
    chains = dev.pop_many(SIZE)
    assert [(c.readable, c.writable) for c in chains] == [
        ([(DATA, 16)], [(HALF - 8, 16), (HALF + 8, 1)]),
        ([(HALF + 0x200, 16)], [(DATA, 8)]),
    ]
    desc = split_ring_layout(SIZE, BASE)[0]
    put_desc(FlatMemory(ram, base=BASE), desc, 7, BASE + MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT)
    avail = split_ring_layout(SIZE, BASE)[1]
    struct.pack_into("<H", ram, avail - BASE + 4 + 2 * 2, 7)
    struct.pack_into("<H", ram, avail - BASE + 2, 3)
    with pytest.raises(RingError, match="indirect table"):
        dev.pop_many(SIZE)


def test_pop_many_honours_the_limit_and_the_event_index():
    ram, drv, dev = _pair(event_idx=True)
    for k in range(5):
        drv.add([(DATA + 64 * k, 8)], token=k)
    assert [c.head for c in dev.pop_many(2)] == [0, 1]
    used = split_ring_layout(SIZE, BASE)[2]
    assert struct.unpack_from("<H", ram, used - BASE + 4 + 8 * SIZE)[0] == 2  # avail_event follows
    dev.disable_notify()
    assert [c.head for c in dev.pop_many(SIZE)] == [2, 3, 4]
    assert struct.unpack_from("<H", ram, used - BASE + 4 + 8 * SIZE)[0] == 2  # left behind while disabled
    assert dev.pop_many(SIZE) == []


@pytest.mark.parametrize("start", [0, SIZE - 3, 0xFFFE])
def test_add_many_push_many_and_the_harvest_across_the_ring_end(start):
    """Chains added in one batch (direct and indirect), completed in one push: the device and the
    driver see what one add and one push at a time give, across the ring's end and the index wrap."""
    ram = bytearray(MEM_SIZE)
    mem = FlatMemory(ram, base=BASE)
    desc, avail, used, _ = split_ring_layout(SIZE, BASE)
    drv = SplitQueueDriver(mem, SIZE, desc, avail, used, start=start)
    dev = SplitQueueDevice(mem, SIZE, desc, avail, used, last_avail_idx=start, used_idx=start)
    batch = [([(DATA, 16)], [(DATA + 64, 64), (DATA + 256, 1)], "a", -1),
             ([(DATA + 512, 8)], [(DATA + 600, 8)], "b", TABLE),
             ([], [(DATA + 700, 4)], "c", -1)]
    heads = drv.add_many(batch)
    assert drv.num_free == SIZE - 3 - 1 - 1 and drv.avail_idx == (start + 3) & 0xFFFF
    chains = dev.pop_many(SIZE)
    assert [c.head for c in chains] == heads
    assert [(c.readable, c.writable) for c in chains] == [(r, w) for r, w, _, _ in batch]
    dev.push_many([(c.head, 5 + i) for i, c in enumerate(chains)])
    assert dev.used_idx == (start + 3) & 0xFFFF
    assert drv.get_used() == [("a", 5), ("b", 6), ("c", 7)]
    assert drv.num_free == SIZE
    with pytest.raises(QueueFull):
        drv.add_many([([(DATA, 1)] * 5, [], "x", -1), ([(DATA, 1)] * 4, [], "y", -1)])
    with pytest.raises(ValueError):
        drv.add_many([([(DATA, 1)], [], "x", -1), ([], [], "empty", -1)])
    assert drv.num_free == SIZE and drv.avail_idx == (start + 3) & 0xFFFF  # refused whole: nothing taken
    with pytest.raises(ValueError):
        dev.push_many([(0, 1), (SIZE, 1)])
    assert dev.used_idx == (start + 3) & 0xFFFF  # nothing written for a refused batch


@pytest.mark.parametrize("start", [0, 0xFFFF])
def test_push_one_element_refuses_and_writes_as_push_many(start):
    """One used element (the QD1 path, no run built) is checked and written as push_many writes
    it, across the index wrap; a bad head or length is refused with nothing written."""
    ram = bytearray(MEM_SIZE)
    mem = FlatMemory(ram, base=BASE)
    desc, avail, used, _ = split_ring_layout(SIZE, BASE)
    drv = SplitQueueDriver(mem, SIZE, desc, avail, used, start=start)
    dev = SplitQueueDevice(mem, SIZE, desc, avail, used, last_avail_idx=start, used_idx=start)
    drv.add([(DATA, 16)], [(DATA + 64, 64)], token="a")
    (chain,) = dev.pop_many(SIZE)
    with pytest.raises(ValueError, match="out of range"):
        dev.push(SIZE, 1)
    with pytest.raises(ValueError, match="does not fit u32"):
        dev.push(chain.head, 1 << 32)
    assert dev.used_idx == start and drv.get_used() == []  # nothing written for a refused element
    dev.push(chain.head, 33)
    assert dev.used_idx == (start + 1) & 0xFFFF
    assert drv.get_used() == [("a", 33)]


def test_widest_span():
    flat = FlatMemory(bytearray(64), base=0x1000)
    assert widest_span(flat)[:2] == (0x1000, 0x1040)
    assert widest_span(NoSpan(flat)) == (0, 0, None)


_NEXT, _WRITE = 1, 2
# One change a hostile or buggy driver may make to an otherwise linear table: (entry, field, value).
_mutation = st.tuples(
    st.integers(0, 47),
    st.sampled_from(["addr", "length", "flags", "next"]),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(
        [0, 1, 2, 3, 4, 5, 6, 7, 8, BASE - 1, BASE, HALF - 16, HALF, BASE + MEM_SIZE - 1, BASE + MEM_SIZE,
         2**32 - 1, 2**31, 47, 48, 12])),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.integers(1, 48),
    readable=st.integers(0, 48),
    length=st.sampled_from([1, 16, 512, 4096]),
    mutations=st.lists(_mutation, max_size=3),
    kind=st.sampled_from(["flat", "narrow"]),
)
@example(entries=34, readable=1, length=4096, mutations=[], kind="flat")  # Linux's 128 KiB read
@example(entries=34, readable=33, length=4096, mutations=[(33, "flags", 0)], kind="flat")  # a write
@example(entries=20, readable=1, length=512, mutations=[(5, "flags", _NEXT)], kind="flat")  # readable after writable
@example(entries=20, readable=1, length=512, mutations=[(19, "next", 3), (19, "flags", 3)], kind="flat")  # a loop
@example(entries=20, readable=1, length=2**31, mutations=[], kind="flat")  # over 4 GiB in all
@example(entries=20, readable=1, length=512, mutations=[(7, "flags", 7)], kind="flat")  # a nested table
def test_a_whole_indirect_table_is_taken_and_refused_as_the_walk_does(entries, readable, length, mutations, kind):
    """An indirect table of up to 48 descriptors at the chain's head, laid out as drivers lay
    them out (entry i links to i + 1, readable first) with up to three hostile changes: the
    chain pop and pop_many hand out, or the reason they refuse it, is the descriptor-by-descriptor
    walk's (a memory without spans), whether or not the table is read in whole-table passes."""
    readable = min(readable, entries)
    ram = bytearray(MEM_SIZE)
    layout = split_ring_layout(SIZE, BASE)
    flat = FlatMemory(ram, base=BASE)
    table = [[DATA + (i * 64 if length < 4096 else 0), length, (_NEXT if i < entries - 1 else 0) | (_WRITE if i >= readable else 0),
              i + 1 if i < entries - 1 else 0] for i in range(entries)]
    fields = {"addr": 0, "length": 1, "flags": 2, "next": 3}
    for i, field, value in mutations:
        if i < entries:
            table[i][fields[field]] = value & ((1 << (64, 32, 16, 16)[fields[field]]) - 1)
    for i, d in enumerate(table):
        put_desc(flat, TABLE, i, *d)
    put_desc(flat, layout[0], 0, TABLE, 16 * entries, VIRTQ_DESC_F_INDIRECT)
    with flat.view(layout[1], 4 + 2 * SIZE) as v:
        struct.pack_into(f"<HH{SIZE}H", v, 0, 0, 1, *[0] * SIZE)

    walk = SplitQueueDevice(NoSpan(flat), SIZE, *layout[:3])
    expected = _drain(lambda: [c] if (c := walk.pop()) is not None else [], 1)
    walk.release()
    for take in ("pop", "pop_many"):
        dev = SplitQueueDevice(_memory(kind, ram), SIZE, *layout[:3])
        got = _drain((lambda: [c] if (c := dev.pop()) is not None else []) if take == "pop" else
                     (lambda: dev.pop_many(SIZE)), SIZE)
        dev.release()
        assert got == expected, take


@pytest.mark.parametrize("take", ["pop", "pop_many"])
def test_a_whole_indirect_table_over_4_gib_in_all_is_refused(take):
    """Twelve 512 MiB buffers, each inside a 1 GiB memory (the same bytes, as a hostile driver
    may name them): 6 GiB in all is more than a chain may hold (a u32 length) and the chain is
    refused with the walk's reason."""
    import mmap  # noqa: PLC0415

    size = 1 << 30
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)) as m:
        flat = FlatMemory(m, base=BASE)
        layout = split_ring_layout(SIZE, BASE)
        table = BASE + 0x4000
        for i in range(12):
            put_desc(flat, table, i, BASE + 0x10000, 512 << 20, _NEXT | _WRITE if i < 11 else _WRITE, i + 1)
        put_desc(flat, layout[0], 0, table, 16 * 12, VIRTQ_DESC_F_INDIRECT)
        with flat.view(layout[1], 4) as v:
            struct.pack_into("<HH", v, 0, 0, 1)
        dev = SplitQueueDevice(flat, SIZE, *layout[:3])
        with pytest.raises(RingError, match="exceeds 4 GiB - 1"):
            dev.pop() if take == "pop" else dev.pop_many(SIZE)
        dev.release()
        flat.release()
