"""Split virtqueue: driver ↔ device round trips over bytearray memory, and a hostile driver."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user.errors import GuestMemoryError
from vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Buffer,
    Chain,
    FlatMemory,
    QueueFull,
    RingError,
    SplitQueueDevice,
    SplitQueueDriver,
    read_buffers,
    split_ring_layout,
    vring_need_event,
    write_buffers,
)

BASE = 0x10000  # guest-physical base of the test memory: addresses below it are unmapped
MEM_SIZE = 0x20000
DATA = BASE + 0x8000  # data buffers live here


def make_pair(size: int = 8, event_idx: bool = False, last_avail_idx: int = 0):
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, total = split_ring_layout(size, BASE)
    assert total < 0x8000
    drv = SplitQueueDriver(mem, size, desc, avail, used, event_idx=event_idx)
    dev = SplitQueueDevice(mem, size, desc, avail, used, event_idx=event_idx, last_avail_idx=last_avail_idx)
    return mem, drv, dev, (desc, avail, used)


def put_desc(mem, desc_addr, i, addr, length, flags, nxt=0):
    with mem.view(desc_addr + 16 * i, 16) as v:
        struct.pack_into("<QIHH", v, 0, addr, length, flags, nxt)


def publish(mem, avail_addr, size, heads, start_idx=0):
    """Write avail ring entries for ``heads`` starting at ``start_idx`` and bump avail idx."""
    idx = start_idx
    for h in heads:
        with mem.view(avail_addr + 4 + 2 * (idx % size), 2) as v:
            struct.pack_into("<H", v, 0, h)
        idx = (idx + 1) & 0xFFFF
    with mem.view(avail_addr + 2, 2) as v:
        struct.pack_into("<H", v, 0, idx)


# --- layout -------------------------------------------------------------------------------------
def test_layout_aligns_and_sizes_areas():
    desc, avail, used, total = split_ring_layout(256, 0x1003)
    assert desc == 0x1010 and desc % 16 == 0
    assert avail == desc + 16 * 256
    assert used % 4 == 0 and used >= avail + 6 + 2 * 256
    assert 0x1003 + total == used + 6 + 8 * 256


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_layout_rejects_bad_queue_size(size):
    with pytest.raises(RingError, match="power of two"):
        split_ring_layout(size)


def test_vring_need_event_matches_linux_formula():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wraps


# --- round trips ---------------------------------------------------------------------------------
def test_round_trip_readable_and_writable_buffers():
    mem, drv, dev, _ = make_pair()
    write_buffers(mem, [Buffer(DATA, 5)], b"hello")
    head = drv.add(readable=[(DATA, 5)], writable=[(DATA + 0x100, 3), (DATA + 0x200, 4)], token="req1")
    assert drv.kick_needed()
    chain = dev.pop()
    assert chain == Chain(head, [Buffer(DATA, 5)], [Buffer(DATA + 0x100, 3), Buffer(DATA + 0x200, 4)])
    assert chain.readable_len == 5 and chain.writable_len == 7
    assert read_buffers(mem, chain.readable) == b"hello"
    assert write_buffers(mem, chain.writable, b"WORLD!!") == 7
    dev.push(chain.head, 7)
    assert dev.needs_notify()
    assert dev.pop() is None
    assert drv.get_used() == [("req1", 7)]
    assert read_buffers(mem, [Buffer(DATA + 0x100, 3), Buffer(DATA + 0x200, 4)]) == b"WORLD!!"
    assert drv.num_free == 8
    assert dev.last_avail_idx == 1


def test_queue_full_and_descriptors_are_recycled():
    mem, drv, dev, _ = make_pair(size=4)
    drv.add(readable=[(DATA, 1), (DATA, 1), (DATA, 1)], token=1)
    with pytest.raises(QueueFull):
        drv.add(readable=[(DATA, 1), (DATA, 1)], token=2)
    drv.add(writable=[(DATA, 1)], token=3)
    chains = [dev.pop(), dev.pop()]
    dev.push_many([(c.head, 0) for c in reversed(chains)])
    assert sorted(t for t, _ in drv.get_used()) == [1, 3]
    drv.add(readable=[(DATA, 1)] * 4, token=4)  # all four free again
    assert len(dev.pop().readable) == 4


def test_indices_wrap_around_16_bits():
    """Indices are free-running u16: start both sides at 0xFFFD and cross 0xFFFF -> 0."""
    mem, drv, dev, (desc, avail, used) = make_pair(size=4)
    # Emulate a ring that has already carried 65533 requests: driver and device indices agree.
    start = 0xFFFD
    drv._avail_idx = drv._kicked_avail = drv._last_used = start
    with mem.view(used + 2, 2) as v:
        struct.pack_into("<H", v, 0, start)
    dev = SplitQueueDevice(mem, 4, desc, avail, used, last_avail_idx=start)
    assert dev.used_idx == start
    seen = []
    for n in range(10):
        drv.add(readable=[(DATA + n, 1)], token=n)
        c = dev.pop()
        assert c.readable == [Buffer(DATA + n, 1)]
        dev.push(c.head, n)
        seen += drv.get_used()
    assert seen == [(n, n) for n in range(10)]
    assert dev.last_avail_idx == (start + 10) & 0xFFFF == 7
    assert dev.used_idx == 7


def test_device_resumes_from_last_avail_idx():
    mem, drv, dev, rings = make_pair()
    for n in range(3):
        drv.add(readable=[(DATA, n + 1)], token=n)
    assert dev.pop().readable_len == 1
    # A new device (reconnect, SET_VRING_BASE=1) continues with the second chain.
    dev2 = SplitQueueDevice(mem, 8, *rings, last_avail_idx=dev.last_avail_idx)
    assert [dev2.pop().readable_len, dev2.pop().readable_len] == [2, 3]
    assert dev2.pop() is None


def test_notification_flags_without_event_idx():
    mem, drv, dev, _ = make_pair()
    dev.disable_notify()
    drv.add(readable=[(DATA, 1)])
    assert not drv.kick_needed()  # VRING_USED_F_NO_NOTIFY
    assert dev.enable_notify() is True  # a chain arrived while notifications were off
    drv.add(readable=[(DATA, 1)])
    assert drv.kick_needed()
    assert not drv.kick_needed()  # nothing new since
    drv.disable_interrupts()
    c = dev.pop()
    dev.push(c.head, 0)
    assert not dev.needs_notify()  # VRING_AVAIL_F_NO_INTERRUPT
    drv.enable_interrupts()
    c = dev.pop()
    dev.push(c.head, 0)
    assert dev.needs_notify()
    assert not dev.needs_notify()


def test_event_idx_both_sides():
    mem, drv, dev, (desc, avail, used) = make_pair(event_idx=True)
    drv.add(readable=[(DATA, 1)], token="a")
    assert drv.kick_needed()  # avail_event 0: first add crosses it
    c = dev.pop()  # device publishes avail_event = 1
    with mem.view(used + 4 + 8 * 8, 2) as v:
        assert struct.unpack("<H", v)[0] == 1
    drv.add(readable=[(DATA, 1)], token="b")
    drv.add(readable=[(DATA, 1)], token="c")
    assert drv.kick_needed()  # 1 -> 3 crosses avail_event 1
    dev.disable_notify()  # with EVENT_IDX: avail_event stays, no more updates
    c2 = dev.pop()
    c3 = dev.pop()
    drv.add(readable=[(DATA, 1)], token="d")
    assert not drv.kick_needed()  # avail_event still 1 (device did not move it): 3 -> 4 does not cross
    assert dev.enable_notify() is True
    # Used side: driver has not consumed anything, used_event = 0 → first push notifies.
    dev.push(c.head, 1)
    assert dev.needs_notify()
    dev.push(c2.head, 2)
    assert not dev.needs_notify()  # used_event 0 already passed; driver did not ask again
    assert drv.get_used() == [("a", 1), ("b", 2)]  # driver sets used_event = 2
    dev.push(c3.head, 3)
    assert dev.needs_notify()  # 2 -> 3 crosses used_event 2
    drv.disable_interrupts()
    assert drv.get_used() == [("c", 3)]
    drv.disable_interrupts()
    dev.push(dev.pop().head, 4)
    assert not dev.needs_notify()


def test_event_idx_driver_harvests_chains_pushed_while_it_moved_used_event(monkeypatch):
    """The device pushes a second chain after the driver read used idx but before it published
    used_event: that push was not worth an interrupt (old used_event), so get_used must pick it
    up itself or the driver sleeps forever (lost wake-up)."""
    mem, drv, dev, _ = make_pair(event_idx=True)
    drv.add(readable=[(DATA, 1)], token="a")
    drv.add(readable=[(DATA, 1)], token="b")
    a, b = dev.pop(), dev.pop()
    dev.push(a.head, 1)
    assert dev.needs_notify()
    real = drv._publish_used_event
    raced = []

    def racing_publish():
        if not raced:
            dev.push(b.head, 2)
            raced.append(dev.needs_notify())
        real()

    monkeypatch.setattr(drv, "_publish_used_event", racing_publish)
    assert drv.get_used() == [("a", 1), ("b", 2)]
    assert raced == [False]  # the device did not interrupt for "b"


def test_indirect_chain_round_trip():
    mem, drv, dev, _ = make_pair(size=2)
    table = BASE + 0x4000
    drv.add_indirect(table, readable=[(DATA, 16)] * 3, writable=[(DATA + 64, 1)] * 5, token="ind")
    assert drv.num_free == 1
    c = dev.pop()
    assert len(c.readable) == 3 and len(c.writable) == 5
    dev.push(c.head, 1)
    assert drv.get_used() == [("ind", 1)]
    assert drv.num_free == 2


class _ReadOnlyRange(FlatMemory):
    """Guest memory whose ``[lo, hi)`` is mapped read-only (a read-only grant)."""

    def __init__(self, buf: bytearray, base: int, lo: int, hi: int) -> None:
        super().__init__(buf, base=base)
        self.lo, self.hi = lo, hi

    def view(self, addr: int, length: int) -> memoryview:
        v = super().view(addr, length)
        return v.toreadonly() if self.lo <= addr < self.hi else v


def test_indirect_table_the_guest_granted_read_only_is_walked():
    """A device only reads an indirect table: Linux's xen_grant_dma grants it read-only
    (DMA_TO_DEVICE), as seen on real Xen; the ring areas themselves must stay writable views."""
    buf = bytearray(MEM_SIZE)
    desc, avail, used, _ = split_ring_layout(2, BASE)
    table = BASE + 0x4000
    drv = SplitQueueDriver(FlatMemory(buf, base=BASE), 2, desc, avail, used)
    drv.add_indirect(table, readable=[(DATA, 16)], writable=[(DATA + 64, 1)], token="ind")
    dev = SplitQueueDevice(_ReadOnlyRange(buf, BASE, table, table + 0x1000), 2, desc, avail, used)
    c = dev.pop()
    assert len(c.readable) == 1 and len(c.writable) == 1
    with pytest.raises(RingError, match="used ring at .*unusable view"):
        SplitQueueDevice(_ReadOnlyRange(buf, BASE, used, used + 1), 2, desc, avail, used)


def test_indirect_table_is_released_once_walked():
    """A memory that maps on demand (``release_buffers``: grants) is told the indirect table is
    read: the guest ends that grant when the chain completes, and must find it unmapped."""

    class Releasing(FlatMemory):
        released: list[list[tuple[int, int]]] = []

        def release_buffers(self, buffers: list[tuple[int, int]]) -> None:
            self.released.append(buffers)

    buf = bytearray(MEM_SIZE)
    desc, avail, used, _ = split_ring_layout(2, BASE)
    table = BASE + 0x4000
    SplitQueueDriver(FlatMemory(buf, base=BASE), 2, desc, avail, used).add_indirect(
        table, readable=[(DATA, 16)], writable=[(DATA + 64, 1)], token="ind")
    mem = Releasing(buf, base=BASE)
    SplitQueueDevice(mem, 2, desc, avail, used).pop()
    assert mem.released == [[(table, 32)]]


def test_direct_descriptors_followed_by_indirect_table():
    """§2.7.5.3.2: the device must handle direct descriptors followed by one indirect one."""
    mem, _, dev, (desc, avail, used) = make_pair()
    table = BASE + 0x4000
    put_desc(mem, table, 0, DATA, 4, VIRTQ_DESC_F_WRITE)
    put_desc(mem, desc, 0, DATA + 8, 2, VIRTQ_DESC_F_NEXT, 1)
    put_desc(mem, desc, 1, table, 16, VIRTQ_DESC_F_INDIRECT)
    publish(mem, avail, 8, [0])
    assert dev.pop() == Chain(0, [Buffer(DATA + 8, 2)], [Buffer(DATA, 4)])


def test_chain_of_exactly_queue_size_is_accepted():
    mem, drv, dev, _ = make_pair(size=4)
    drv.add(readable=[(DATA, 1)] * 2, writable=[(DATA, 1)] * 2)
    c = dev.pop()
    assert len(c.readable) == len(c.writable) == 2


def test_driver_rejects_bogus_used_head():
    mem, drv, dev, (desc, avail, used) = make_pair()
    drv.add(readable=[(DATA, 1)], token=1)
    dev.push(5, 0)  # head 5 was never made available
    with pytest.raises(RingError, match="not in flight"):
        drv.get_used()


# --- hostile driver ---------------------------------------------------------------------------
def hostile(setup, size=8):
    mem, _, _, (desc, avail, used) = make_pair(size=size)
    dev = SplitQueueDevice(mem, size, desc, avail, used)
    setup(mem, desc, avail)
    return dev


def test_descriptor_loop_is_rejected():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, DATA, 1, VIRTQ_DESC_F_NEXT, 1)
        put_desc(mem, desc, 1, DATA, 1, VIRTQ_DESC_F_NEXT, 0)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="loop"):
        hostile(setup).pop()


def test_self_loop_is_rejected():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 3, DATA, 0, VIRTQ_DESC_F_NEXT, 3)
        publish(mem, avail, 8, [3])

    with pytest.raises(RingError, match="loop"):
        hostile(setup).pop()


def test_chain_longer_than_queue_is_rejected():
    """All 8 descriptors chained, the last one pointing back: 9 hops."""

    def setup(mem, desc, avail):
        for i in range(8):
            put_desc(mem, desc, i, DATA, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 8)
        publish(mem, avail, 8, [0])

    dev = hostile(setup)
    with pytest.raises(RingError, match="longer than"):
        dev.pop()
    assert dev.last_avail_idx == 0  # state unchanged


def test_head_out_of_range():
    def setup(mem, desc, avail):
        publish(mem, avail, 8, [8])

    with pytest.raises(RingError, match="head 8 out of range"):
        hostile(setup).pop()


def test_next_out_of_range():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, DATA, 1, VIRTQ_DESC_F_NEXT, 200)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="next index 200"):
        hostile(setup).pop()


@pytest.mark.parametrize(
    "addr,length",
    [
        (0x1000, 16),  # below guest RAM
        (BASE + MEM_SIZE - 8, 16),  # straddles the end
        (BASE + MEM_SIZE, 1),  # just past the end
        ((1 << 64) - 8, 16),  # wraps the address space
        (DATA, 0xFFFF_FFFF),  # huge
    ],
)
def test_buffer_outside_guest_memory(addr, length):
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, addr, length, VIRTQ_DESC_F_WRITE)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="not in guest memory|wraps"):
        hostile(setup).pop()


def test_total_length_overflow():
    """Each buffer is in memory, but the chain adds up to more than 4 GiB - 1."""

    class Huge:
        def view(self, addr, length):
            if addr < 1 << 40:
                return real.view(addr, length)
            return memoryview(bytearray(0))[0:0] if length == 0 else _Fake(length)

    class _Fake:  # a memoryview-like object of the asked length (no real allocation)
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return None

    real = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(8, BASE)
    dev = SplitQueueDevice(Huge(), 8, desc, avail, used)
    put_desc(real, desc, 0, 1 << 40, 0xC000_0000, VIRTQ_DESC_F_NEXT, 1)
    put_desc(real, desc, 1, 1 << 41, 0x4000_0000, 0)
    publish(real, avail, 8, [0])
    with pytest.raises(RingError, match="exceeds 4 GiB"):
        dev.pop()


def test_readable_after_writable_is_rejected():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, DATA, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
        put_desc(mem, desc, 1, DATA, 1, 0)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="readable descriptor after a device-writable"):
        hostile(setup).pop()


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_length_not_multiple_of_16(length):
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, BASE + 0x4000, length, VIRTQ_DESC_F_INDIRECT)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="multiple of 16"):
        hostile(setup).pop()


def test_nested_indirect_is_rejected():
    def setup(mem, desc, avail):
        table = BASE + 0x4000
        put_desc(mem, table, 0, BASE + 0x5000, 16, VIRTQ_DESC_F_INDIRECT)
        put_desc(mem, desc, 0, table, 16, VIRTQ_DESC_F_INDIRECT)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="nested indirect"):
        hostile(setup).pop()


def test_indirect_with_next_is_rejected():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, BASE + 0x4000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
        put_desc(mem, desc, 1, DATA, 1, 0)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="both INDIRECT and NEXT"):
        hostile(setup).pop()


def test_indirect_table_outside_memory():
    def setup(mem, desc, avail):
        put_desc(mem, desc, 0, 0x100, 32, VIRTQ_DESC_F_INDIRECT)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="indirect table .* not in guest memory"):
        hostile(setup).pop()


def test_loop_inside_indirect_table():
    def setup(mem, desc, avail):
        table = BASE + 0x4000
        put_desc(mem, table, 0, DATA, 1, VIRTQ_DESC_F_NEXT, 1)
        put_desc(mem, table, 1, DATA, 1, VIRTQ_DESC_F_NEXT, 0)
        put_desc(mem, desc, 0, table, 32, VIRTQ_DESC_F_INDIRECT)
        publish(mem, avail, 8, [0])

    with pytest.raises(RingError, match="indirect table .*loop"):
        hostile(setup).pop()


def test_avail_idx_too_far_ahead():
    def setup(mem, desc, avail):
        with mem.view(avail + 2, 2) as v:
            struct.pack_into("<H", v, 0, 9)

    dev = hostile(setup)
    with pytest.raises(RingError, match="ahead"):
        dev.pop()


def test_rings_outside_memory_or_misaligned():
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(8, BASE)
    with pytest.raises(RingError, match="descriptor table"):
        SplitQueueDevice(mem, 8, 0x100, avail, used)
    with pytest.raises(RingError, match="aligned"):
        SplitQueueDevice(mem, 8, desc + 8, avail, used)
    with pytest.raises(RingError, match="used ring"):
        SplitQueueDevice(mem, 8, desc, avail, BASE + MEM_SIZE - 16)


def test_flat_memory_bounds():
    mem = FlatMemory(bytearray(16), base=0x100)
    assert len(mem.view(0x100, 16)) == 16
    for addr, n in [(0xFF, 1), (0x10F, 2), (0x100, -1)]:
        with pytest.raises(GuestMemoryError):
            mem.view(addr, n)


def test_ring_views_are_released():
    """After release() the memory's buffer has no exports left (an mmap could be closed)."""
    import mmap

    m = mmap.mmap(-1, MEM_SIZE)
    mem = FlatMemory(m, base=BASE)
    desc, avail, used, _ = split_ring_layout(8, BASE)
    drv = SplitQueueDriver(mem, 8, desc, avail, used)
    dev = SplitQueueDevice(mem, 8, desc, avail, used)
    drv.add_indirect(BASE + 0x4000, readable=[(DATA, 4)])
    dev.push(dev.pop().head, 0)
    drv.get_used()
    dev.release()
    drv.release()
    mem.release()
    m.close()  # raises BufferError if any view leaked


# --- fuzz ---------------------------------------------------------------------------------------
FUZZ_SIZE = 8
_desc_entry = st.tuples(
    st.one_of(st.integers(0, 2**64 - 1), st.integers(BASE - 64, BASE + MEM_SIZE + 64)),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 64), st.sampled_from([16, 32, 48])),
    st.integers(0, 7),
    st.one_of(st.integers(0, 0xFFFF), st.integers(0, FUZZ_SIZE)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(_desc_entry, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    indirect=st.lists(_desc_entry, min_size=4, max_size=4),
    ring=st.lists(st.integers(0, 0xFFFF) | st.integers(0, FUZZ_SIZE), min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    avail_idx=st.integers(0, 0xFFFF) | st.integers(0, FUZZ_SIZE + 1),
    last_avail=st.integers(0, 0xFFFF) | st.just(0),
    used_idx=st.integers(0, 0xFFFF),
    event_idx=st.booleans(),
)
def test_fuzz_device_side_only_raises_ring_error(descs, indirect, ring, avail_idx, last_avail, used_idx, event_idx):
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(FUZZ_SIZE, BASE)
    table = BASE + 0x4000
    for i, d in enumerate(descs):
        put_desc(mem, desc, i, *d)
    for i, d in enumerate(indirect):
        put_desc(mem, table, i, *d)
    # Point some descriptors at the indirect table so that path gets exercised.
    if descs[0][2] & VIRTQ_DESC_F_INDIRECT:
        put_desc(mem, desc, 0, table, 16 * (1 + descs[0][3] % 4), descs[0][2])
    with mem.view(avail, 4 + 2 * FUZZ_SIZE) as v:
        struct.pack_into(f"<HH{FUZZ_SIZE}H", v, 0, 0, avail_idx, *ring)
    with mem.view(used, 4) as v:
        struct.pack_into("<HH", v, 0, 0, used_idx)
    dev = SplitQueueDevice(mem, FUZZ_SIZE, desc, avail, used, event_idx=event_idx, last_avail_idx=last_avail)
    for _ in range(FUZZ_SIZE + 2):
        try:
            chain = dev.pop()
        except RingError:
            break
        if chain is None:
            break
        # Whatever was accepted is well formed.
        assert 0 <= chain.head < FUZZ_SIZE
        assert sum(b.length for b in chain.readable + chain.writable) <= 0xFFFF_FFFF
        for b in chain.readable + chain.writable:
            assert b.length == 0 or BASE <= b.addr and b.addr + b.length <= BASE + MEM_SIZE
        dev.push(chain.head, chain.writable_len)
        dev.needs_notify()
    dev.release()



@settings(max_examples=200, deadline=None)
@given(
    inflight=st.integers(0, FUZZ_SIZE),
    used_idx=st.integers(0, 0xFFFF) | st.integers(0, FUZZ_SIZE + 1),
    elems=st.lists(st.tuples(st.integers(0, 2**32 - 1) | st.integers(0, FUZZ_SIZE), st.integers(0, 2**32 - 1)),
                   min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    event_idx=st.booleans(),
)
def test_fuzz_driver_side_only_raises_ring_error(inflight, used_idx, elems, event_idx):
    """A hostile device writing arbitrary used elements cannot crash the driver or make it
    free descriptors twice."""
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(FUZZ_SIZE, BASE)
    drv = SplitQueueDriver(mem, FUZZ_SIZE, desc, avail, used, event_idx=event_idx)
    for n in range(inflight):
        drv.add(readable=[(DATA, 1)], token=n)
    with mem.view(used, 4 + 8 * FUZZ_SIZE) as v:
        struct.pack_into("<HH", v, 0, 0, used_idx)
        for i, (head, length) in enumerate(elems):
            struct.pack_into("<II", v, 4 + 8 * i, head, length)
    try:
        got = drv.get_used()
    except RingError:
        got = None
    if got is not None:
        assert len({tok for tok, _ in got}) == len(got)
    assert drv.num_free + len(drv._inflight) == FUZZ_SIZE
    assert len(set(drv._free)) == len(drv._free)
    drv.release()


def test_write_into_a_read_only_mapping_is_a_ring_error_not_a_type_error():
    """A device-writable buffer that maps read-only (a read-only Xen grant) fails that write with
    the library's RingError (which stops the ring cleanly), never an uncaught TypeError."""

    class ReadOnlyAbove:
        def __init__(self, ram: bytearray, limit: int) -> None:
            self.ram, self.limit = ram, limit

        def view(self, addr: int, length: int) -> memoryview:
            mv = memoryview(self.ram)[addr : addr + length]
            return mv.toreadonly() if addr >= self.limit else mv

    ram = bytearray(0x2000)
    mem = ReadOnlyAbove(ram, 0x1000)
    assert write_buffers(mem, [Buffer(0x100, 4)], b"okay") == 4
    with pytest.raises(RingError, match="read-only"):
        write_buffers(mem, [Buffer(0x200, 4), Buffer(0x1800, 4)], b"abcdefgh")
    assert ram[0x1800:0x1804] == bytes(4)


@pytest.mark.parametrize("event_idx", [False, True])
def test_a_driver_started_at_an_index_pairs_with_a_device_resumed_there(event_idx):
    """SET_VRING_BASE n on the device side, ``start=n`` on the driver side: the rings carry on
    from n (here across the 16-bit wrap) as if n chains had gone round already."""
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(8, BASE)
    drv = SplitQueueDriver(mem, 8, desc, avail, used, event_idx=event_idx, start=65534)
    dev = SplitQueueDevice(mem, 8, desc, avail, used, event_idx=event_idx, last_avail_idx=65534)
    words = [(avail + 2, "avail idx"), (used + 2, "used idx"), (avail + 4 + 2 * 8, "used_event"),
             (used + 4 + 8 * 8, "avail_event")]
    for addr, what in words:
        with mem.view(addr, 2) as v:
            assert struct.unpack("<H", v)[0] == 65534, what
    assert drv.avail_idx == 65534 and dev.pop() is None  # nothing new: no stale chains
    for n in range(3):  # 65534, 65535, 0
        head = drv.add(writable=[(DATA, 4)], token=n)
        assert drv.kick_needed()
        chain = dev.pop()
        assert chain is not None and chain.head == head
        dev.push(head, 4)
        assert drv.get_used() == [(n, 4)]
    assert drv.avail_idx == dev.last_avail_idx == 1


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [0, 0x7FF0, 0xFFFA])
@pytest.mark.parametrize(("in_flight", "unkicked"), [(0, 0), (3, 0), (0, 5), (4, 4), (8, 0)])
def test_suppress_notify_silences_the_driver_for_good(event_idx, start, in_flight, unkicked):
    """A going device asks once (virtio 1.2 §2.7.10); its driver, given back what was in flight and
    refilling the whole ring, never has to notify again, whatever it had added without a kick."""
    size = 8
    mem = FlatMemory(bytearray(MEM_SIZE), base=BASE)
    desc, avail, used, _ = split_ring_layout(size, BASE)
    drv = SplitQueueDriver(mem, size, desc, avail, used, event_idx=event_idx, start=start)
    dev = SplitQueueDevice(mem, size, desc, avail, used, event_idx=event_idx, last_avail_idx=start)
    for n in range(in_flight):
        drv.add(readable=[(DATA, 1)], token=n)
    if in_flight:
        assert drv.kick_needed()  # notifications were on: the device was serving
    taken = [dev.pop() for _ in range(in_flight)]
    for n in range(min(unkicked, drv.num_free)):
        drv.add(readable=[(DATA, 1)], token=100 + n)  # added, its kick not decided yet
    dev.suppress_notify()
    kicks = 0
    for c in taken:  # the back-end's last completions still reach the guest
        dev.push(c.head, 0)
    for _ in range(3):
        drv.get_used()
        while drv.num_free:
            drv.add(readable=[(DATA, 1)])
            kicks += drv.kick_needed()
    assert kicks == 0
    assert dev.enable_notify() is True  # asked for again: the chains are there
