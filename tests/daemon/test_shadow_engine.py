"""The shadow virtqueue engine without Xen: guest RAM is a bytearray, the guest is
``SplitQueueDriver`` on it, the back-end is ``SplitQueueDevice`` on the shadow memfd (what a real
back-end maps). Fast; every test checks bytes, lengths, order or counts."""

from __future__ import annotations

import os
import struct

import pytest

from vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    Buffer,
    FlatMemory,
    RingError,
    SplitQueueDevice,
    SplitQueueDriver,
    read_buffers,
    split_ring_layout,
    write_buffers,
)
from xen_vhost_master.datapath.shadow import GuestInflightRecord, ShadowDataPath, ShadowError
from xen_vhost_master.datapath.shadow_pool import PAGE, SHADOW_BASE, PagePool
from xen_vhost_master.virtio_mmio import QueueConfig

GBASE, GSIZE = 0x4000_0000, 4 << 20
INDIRECT, EVENT_IDX = 1 << 28, 1 << 29
CANARY = 0xA5


class Rig:
    """Guest RAM + guest drivers + the data path + a fake back-end per queue."""

    def __init__(self, *, queues: int = 1, num: int = 16, features: int = INDIRECT, pool: int = 1 << 20,
                 on_error: bool = True, inflight: GuestInflightRecord | None = None,
                 make=None) -> None:
        """``make(memory, banks, **kw)``: builds the data path (default :class:`ShadowDataPath`)."""
        self.ram = bytearray([CANARY]) * GSIZE
        self.mem = FlatMemory(self.ram, GBASE)
        self.errors: list[tuple[int, str]] = []
        self.dp = (make or ShadowDataPath)(
            self.mem, [(GBASE, GSIZE)], pool_size=pool, max_queues=4, max_queue_size=256,
            on_error=(lambda i, r: self.errors.append((i, r))) if on_error else None, inflight=inflight)
        self.features = features
        self.num = num
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(queues)]
        self.drivers: list[SplitQueueDriver] = []
        self.backends: list[SplitQueueDevice] = []
        self.configs: list[QueueConfig] = []
        self.next = GBASE + (1 << 20)  # buffers from here; rings below
        for i in range(queues):
            desc, avail, used, _ = split_ring_layout(num, GBASE + i * 0x10000)
            cfg = QueueConfig(i, num, desc, avail, used)
            self.configs.append(cfg)
            self.drivers.append(SplitQueueDriver(self.mem, num, desc, avail, used, event_idx=bool(features & EVENT_IDX)))
            rings = self.dp.open_queue(cfg, features, self.kick[i])
            assert rings.desc >= SHADOW_BASE  # the back-end never gets guest addresses
            self.backends.append(SplitQueueDevice(self.dp.shadow, num, rings.desc, rings.avail, rings.used,
                                                  event_idx=bool(features & EVENT_IDX)))

    def buf(self, data: bytes | int) -> tuple[int, int]:
        n = data if isinstance(data, int) else len(data)
        addr = self.next
        self.next += (n + 63) & ~63
        if not isinstance(data, int):
            self.mem.view(addr, n)[:] = data
        return addr, n

    def kicks(self, i: int = 0) -> int:
        try:
            return os.eventfd_read(self.kick[i])
        except BlockingIOError:
            return 0

    def serve(self, i: int = 0, reply=lambda data, room: data[::-1][:room], order=None, report=None) -> int:
        """Fake back-end: pop every shadow chain, write ``reply(readable, writable_len)``, push."""
        be = self.backends[i]
        chains = []
        while (c := be.pop()) is not None:
            chains.append(c)
        if order is not None:
            chains = [chains[k] for k in order]
        for c in chains:
            data = read_buffers(self.dp.shadow, c.readable)
            out = reply(data, c.writable_len)
            n = write_buffers(self.dp.shadow, c.writable, out)
            be.push(c.head, n if report is None else report(n))
        return len(chains)

    def close(self) -> None:
        for b in self.backends:
            b.release()
        for d in self.drivers:
            d.release()
        self.dp.close()
        for fd in self.kick:
            os.close(fd)


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kw) -> Rig:
        made.append(Rig(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_chains_bounce_through_the_shadow_ring_with_one_kick_per_batch(rig):
    r = rig(num=32)
    drv = r.drivers[0]
    reqs = []
    for k in range(6):
        data = os.urandom(100 + 700 * k)
        rd = [r.buf(data[:50]), r.buf(data[50:])]
        wr = [r.buf(60), r.buf(len(data))]
        drv.add(rd, wr, token=(k, data, wr))
        reqs.append((data, wr))
    r.dp.notify(0)
    assert r.kicks() == 1  # six chains, one kick
    assert r.serve() == 6
    assert r.dp.used(0) is True
    got = drv.get_used()
    assert [t[0] for t, _ in got] == list(range(6))
    for (k, data, wr), written in got:
        assert written == min(len(data), 60 + len(data))
        back = read_buffers(r.mem, [Buffer(a, n) for a, n in wr], written)
        assert back == data[::-1]
    assert r.dp.pool.used_pages == 0 and r.dp.inflight(0) == 0
    st = r.dp.stats(0)
    assert st.chains == 6 and st.completed == 6 and st.bytes_in == sum(len(d) for d, _ in reqs)


def test_only_the_reported_length_is_copied_back(rig):
    r = rig()
    wa, wn = r.buf(4096)
    r.drivers[0].add([r.buf(b"x" * 16)], [(wa, wn)])
    r.dp.notify(0)
    r.serve(reply=lambda d, room: b"\x11" * room, report=lambda n: 100)  # writes 4096, reports 100
    r.dp.used(0)
    [(_, written)] = r.drivers[0].get_used()
    assert written == 100
    assert bytes(r.mem.view(wa, 100)) == b"\x11" * 100
    assert bytes(r.mem.view(wa + 100, wn - 100)) == bytes([CANARY]) * (wn - 100)


def test_overlong_report_is_clamped_to_the_writable_buffers(rig):
    r = rig()
    rd = r.buf(b"q" * 8)
    wa, wn = r.buf(64)
    r.drivers[0].add([rd], [(wa, wn)])
    r.dp.notify(0)
    r.serve(reply=lambda d, room: b"\x22" * room, report=lambda n: 1 << 20)
    r.dp.used(0)
    assert r.drivers[0].get_used()[0][1] == 64
    assert r.ram[wa - GBASE + 64] == CANARY and r.dp.stats(0).overlong == 1


def test_indirect_guest_chain_is_published_indirect_and_completes(rig):
    r = rig()
    table = r.buf(16 * 3)[0]
    data = os.urandom(3000)
    wa, wn = r.buf(3000)
    r.drivers[0].add_indirect(table, [r.buf(data[:1000]), r.buf(data[1000:])], [(wa, wn)])
    r.dp.notify(0)
    be = r.backends[0]
    head = struct.unpack_from("<H", r.dp.shadow.view(be._r.avail_addr + 4, 2))[0]
    flags = struct.unpack_from("<H", r.dp.shadow.view(be._r.desc_addr + 16 * head + 12, 2))[0]
    assert flags & VIRTQ_DESC_F_INDIRECT
    r.serve()
    r.dp.used(0)
    assert r.drivers[0].get_used()[0][1] == 3000 and bytes(r.mem.view(wa, 3000)) == data[::-1]


def test_indirect_chains_without_the_feature_are_flattened_and_wait_for_ring_space(rig):
    r = rig(num=8, features=0)  # a guest using indirect tables it did not negotiate
    for k in range(2):  # 2 chains of 5 descriptors: the 8-entry shadow ring takes one at a time
        table = r.buf(16 * 5)[0]
        r.drivers[0].add_indirect(table, [r.buf(b"a" * 10) for _ in range(4)], [r.buf(40)], token=k)
    r.dp.notify(0)
    assert r.dp.inflight(0) == 1 and r.dp.stats(0).held == 1
    assert r.serve() == 1
    r.dp.used(0)  # frees descriptors: the held chain goes out
    assert r.dp.inflight(0) == 1 and r.serve() == 1
    r.dp.used(0)
    assert r.drivers[0].get_used() == [(0, 40), (1, 40)]


def test_completion_order_is_the_backends(rig):
    r = rig()
    for k in range(4):
        r.drivers[0].add([r.buf(bytes([k]) * 8)], [r.buf(8)], token=k)
    r.dp.notify(0)
    r.serve(order=[2, 0, 3, 1])
    r.dp.used(0)
    assert [t for t, _ in r.drivers[0].get_used()] == [2, 0, 3, 1]


def test_backpressure_when_the_pool_is_full_then_resume(rig):
    r = rig(pool=3 * PAGE)
    for k in range(7):
        r.drivers[0].add([r.buf(bytes([k]) * 16)], [r.buf(3000)], token=k)  # one page each
    r.dp.notify(0)
    assert r.dp.inflight(0) == 3 and r.dp.stats(0).held == 1
    done: list[int] = []
    while len(done) < 7:
        assert r.serve() > 0
        r.dp.used(0)  # frees pages and publishes the held chains
        done += [t for t, _ in r.drivers[0].get_used()]
    assert done == list(range(7)) and r.dp.pool.used_pages == 0


def test_backpressure_on_one_queue_resumes_when_another_completes(rig):
    r = rig(queues=2, pool=2 * PAGE)
    r.drivers[1].add([r.buf(b"1" * 16)], [r.buf(3000)], token="b0")
    r.drivers[1].add([r.buf(b"1" * 16)], [r.buf(3000)], token="b1")
    r.dp.notify(1)
    r.drivers[0].add([r.buf(b"0" * 16)], [r.buf(3000)], token="a")
    r.dp.notify(0)
    assert r.dp.inflight(0) == 0  # held: queue 1 owns the pool
    r.serve(1)
    r.dp.used(1)
    assert r.dp.inflight(0) == 1 and r.kicks(0) == 1
    r.serve(0)
    r.dp.used(0)
    assert [t for t, _ in r.drivers[0].get_used()] == ["a"]


def test_event_idx_on_both_sides(rig):
    r = rig(features=EVENT_IDX | INDIRECT)
    drv, be = r.drivers[0], r.backends[0]
    drv.add([r.buf(b"a" * 8)], [r.buf(8)])
    r.dp.notify(0)
    assert r.kicks() == 1
    be.disable_notify()  # EVENT_IDX: avail_event stays behind, so the next chain needs no kick
    drv.add([r.buf(b"b" * 8)], [r.buf(8)])
    r.dp.notify(0)
    assert r.kicks() == 0 and r.dp.inflight(0) == 2
    drv.disable_interrupts()  # guest: used_event far away
    r.serve()
    assert r.dp.used(0) is False
    assert len(drv.get_used()) == 2  # publishes used_event = last_used
    drv.add([r.buf(b"c" * 8)], [r.buf(8)])
    be.enable_notify()
    r.dp.notify(0)
    r.serve()
    assert r.dp.used(0) is True


class _GuestAddsDuringCopy:
    """Guest memory as the data path copies from it; on the first copy the guest's vCPU adds one
    more chain and asks whether it must kick (what a guest running beside the daemon does)."""

    def __init__(self, r, add) -> None:
        self.r, self.add, self.kick_asked = r, add, []

    def view(self, addr: int, length: int) -> memoryview:
        if not self.kick_asked:
            self.kick_asked.append(self.add())
        return self.r.mem.view(addr, length)


@pytest.mark.parametrize("features", [EVENT_IDX | INDIRECT, INDIRECT], ids=["event_idx", "no_notify_flag"])
def test_a_chain_added_while_the_queue_is_pumped_needs_no_kick(rig, features):
    """virtio 1.2 §2.7.10: while a pass takes chains the guest is asked not to kick (avail_event
    left behind, or VIRTQ_USED_F_NO_NOTIFY); the pass takes what came meanwhile, and the next
    chain after it asks for a kick again."""
    r = rig(features=features)
    drv = r.drivers[0]

    def add() -> bool:
        drv.add([r.buf(b"b" * 8)], [r.buf(8)])
        return drv.kick_needed()

    drv.add([r.buf(b"a" * 8)], [r.buf(8)])
    assert drv.kick_needed()
    r.dp.memory = guest = _GuestAddsDuringCopy(r, add)
    r.dp.notify(0)
    assert guest.kick_asked == [False]
    assert r.kicks() == 1 and r.dp.inflight(0) == 2  # both chains, one back-end kick
    r.dp.memory = r.mem
    r.serve()
    r.dp.used(0)
    assert len(drv.get_used()) == 2
    drv.add([r.buf(b"c" * 8)], [r.buf(8)])
    assert drv.kick_needed()


def test_no_interrupt_flag_without_event_idx(rig):
    r = rig(features=0)
    drv = r.drivers[0]
    drv.disable_interrupts()
    drv.add([r.buf(b"a" * 8)], [r.buf(8)])
    r.dp.notify(0)
    r.serve()
    assert r.dp.used(0) is False
    drv.enable_interrupts()
    drv.add([r.buf(b"a" * 8)], [r.buf(8)])
    r.dp.notify(0)
    r.serve()
    assert r.dp.used(0) is True


def test_reconnect_harvests_completions_and_resubmits_the_rest_exactly_once(rig):
    r = rig(num=16)
    drv = r.drivers[0]
    for k in range(5):
        drv.add([r.buf(bytes([k]) * 32)], [r.buf(32)], token=k)
    r.dp.notify(0)
    be = r.backends[0]
    chains = [be.pop() for _ in range(5)]
    for c in chains[:2]:  # completes two, then dies without a call
        write_buffers(r.dp.shadow, c.writable, read_buffers(r.dp.shadow, c.readable))
        be.push(c.head, 32)
    be.release()
    base = struct.unpack_from("<H", r.mem.view(r.configs[0].device + 2, 2))[0]
    assert base == 0  # what the device model reads as the new back-end's SET_VRING_BASE
    rings = r.dp.open_queue(r.configs[0], r.features, r.kick[0], resume=True)  # same queue, not closed
    assert rings.base == base
    assert r.dp.stats(0).resubmitted == 3
    new = SplitQueueDevice(r.dp.shadow, 16, rings.desc, rings.avail, rings.used, last_avail_idx=base)
    r.backends[0] = new
    assert new.used_idx == base and new.available() == 3
    r.serve(reply=lambda d, room: d)
    assert r.dp.used(0) is True
    got = drv.get_used()
    assert sorted(t for t, _ in got) == list(range(5)) and len(got) == 5
    assert r.dp.inflight(0) == 0 and r.dp.pool.used_pages == 0


def test_reconnect_at_a_nonzero_base(rig):
    r = rig(num=8)
    drv = r.drivers[0]
    for round_ in range(3):  # move the indices on
        drv.add([r.buf(b"z" * 8)], [r.buf(8)])
        r.dp.notify(0)
        r.serve()
        r.dp.used(0)
        drv.get_used()
    drv.add([r.buf(b"y" * 8)], [r.buf(8)], token="late")
    r.dp.notify(0)
    r.backends[0].release()
    base = struct.unpack_from("<H", r.mem.view(r.configs[0].device + 2, 2))[0]
    assert base == 3
    rings = r.dp.open_queue(r.configs[0], r.features, r.kick[0], resume=True)
    assert rings.base == 3
    r.backends[0] = SplitQueueDevice(r.dp.shadow, 8, rings.desc, rings.avail, rings.used, last_avail_idx=base)
    assert r.backends[0].used_idx == 3 and r.serve() == 1
    assert r.dp.used(0) is True
    assert drv.get_used() == [("late", 8)]


def test_explicit_resubmit(rig):
    r = rig()
    r.drivers[0].add([r.buf(b"r" * 8)], [r.buf(8)], token="t")
    r.dp.notify(0)
    r.kicks()
    assert r.dp.resubmit(0) == 1 and r.kicks() == 1
    rings = r.backends[0]._r
    r.backends[0].release()
    r.backends[0] = SplitQueueDevice(r.dp.shadow, r.num, rings.desc_addr, rings.avail_addr, rings.used_addr)
    assert r.serve() == 1 and r.dp.used(0)
    assert r.drivers[0].get_used() == [("t", 8)]


def test_close_queue_drops_inflight_and_frees_the_pool(rig):
    r = rig()
    r.drivers[0].add([r.buf(b"a" * 8)], [r.buf(9000)])
    r.dp.notify(0)
    assert r.dp.pool.used_pages == 3
    r.dp.close_queue(0)
    r.dp.close_queue(0)  # idempotent (the device model may stop twice)
    assert r.dp.pool.used_pages == 0 and r.dp.inflight(0) == 0
    assert r.dp.used(0) is False
    r.dp.notify(0)  # a late notify is ignored
    rings = r.dp.open_queue(r.configs[0], r.features, r.kick[0])  # driver re-probes
    r.drivers[0] = SplitQueueDriver(r.mem, r.num, r.configs[0].desc, r.configs[0].driver, r.configs[0].device)
    r.backends[0].release()
    r.backends[0] = SplitQueueDevice(r.dp.shadow, r.num, rings.desc, rings.avail, rings.used)
    r.drivers[0].add([r.buf(b"b" * 8)], [r.buf(8)], token="again")
    r.dp.notify(0)
    r.serve()
    r.dp.used(0)
    assert r.drivers[0].get_used() == [("again", 8)]


def test_queue_too_big_for_the_ring_slots_is_refused(rig):
    r = rig()
    with pytest.raises(ShadowError):
        r.dp.open_queue(QueueConfig(1, 512, GBASE, GBASE + 0x2000, GBASE + 0x3000), 0, r.kick[0])


def test_page_pool_next_fit_free_and_double_free():
    pool = PagePool(0x10000, 8)
    a = pool.alloc(1)
    b = pool.alloc(3 * PAGE)
    c = pool.alloc(4 * PAGE)
    assert (a, b, c) == (0x10000, 0x11000, 0x14000) and pool.alloc(1) is None
    pool.free(b, 3 * PAGE)
    assert pool.alloc(4 * PAGE) is None  # 3 free pages, not 4
    assert pool.alloc(2 * PAGE) == 0x11000 and pool.free_bytes == PAGE
    with pytest.raises(ValueError):
        pool.free(b, 3 * PAGE)  # pages 0x13000.. were never allocated again: double free
    with pytest.raises(ValueError):
        pool.free(0x9000, PAGE)


class MapOnDemand(FlatMemory):
    """A guest memory that "maps" on view and expects release_buffers() (as a grant memory would)."""

    def __init__(self, buf, base: int) -> None:
        super().__init__(buf, base)
        self.released: list[tuple[int, int]] = []

    def release_buffers(self, buffers: list[tuple[int, int]]) -> None:
        self.released += buffers


def test_buffers_are_released_readable_after_copy_in_writable_after_copy_back():
    ram = bytearray(GSIZE)
    mem = MapOnDemand(ram, GBASE)
    dp = ShadowDataPath(mem, [(GBASE, GSIZE)], pool_size=1 << 20, max_queues=1, max_queue_size=16)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    desc, avail, used, _ = split_ring_layout(16, GBASE)
    drv = SplitQueueDriver(mem, 16, desc, avail, used)
    try:
        rings = dp.open_queue(QueueConfig(0, 16, desc, avail, used), 0, kick)
        be = SplitQueueDevice(dp.shadow, 16, rings.desc, rings.avail, rings.used)
        rd, wr1, wr2 = (GBASE + 0x10000, 100), (GBASE + 0x20000, 200), (GBASE + 0x30000, 300)
        drv.add([rd], [wr1, wr2])
        dp.notify(0)
        assert mem.released == [rd]  # copied in: released at once
        c = be.pop()
        be.push(c.head, 250)
        dp.used(0)
        assert mem.released == [rd, wr1, wr2]
        drv.add([rd], [wr1])
        dp.notify(0)
        dp.close_queue(0)  # dropped in flight: released too
        assert mem.released == [rd, wr1, wr2, rd, wr1]
        be.release()
    finally:
        drv.release()
        dp.close()
        os.close(kick)


def test_resume_without_inflight_table_restarts_at_the_guests_used_index(rig):
    """A restarted daemon resumes a running queue it never opened: chains after the guest's used
    index are taken again (QEMU's rule without INFLIGHT_SHMFD), the shadow ring starts at 0."""
    r = rig(num=16)
    drv = r.drivers[0]
    for k in range(5):
        drv.add([r.buf(bytes([k]) * 8)], [r.buf(8)], token=k)
    r.dp.notify(0)
    r.serve()  # the old daemon's back-end completes all five…
    r.dp.used(0)
    assert [t for t, _ in drv.get_used()] == [0, 1, 2, 3, 4]
    for k in range(5, 8):
        drv.add([r.buf(bytes([k]) * 8)], [r.buf(8)], token=k)
    r.dp.close()  # …then the daemon dies with chains 5..7 available but not completed
    r.dp = ShadowDataPath(r.mem, [(GBASE, GSIZE)], pool_size=1 << 20, max_queues=4, max_queue_size=256)
    rings = r.dp.open_queue(r.configs[0], r.features, r.kick[0], resume=True)
    assert rings.base == 0
    r.backends[0].release()
    r.backends[0] = SplitQueueDevice(r.dp.shadow, 16, rings.desc, rings.avail, rings.used)
    r.dp.notify(0)
    assert r.serve() == 3 and r.dp.used(0)
    assert [t for t, _ in drv.get_used()] == [5, 6, 7]


def test_a_replaced_back_end_still_alive_cannot_write_into_its_successor(rig):
    """A back-end that missed a deadline may be stopped, not dead, and wake up later. Each back-end
    connection gets its own memfd: the old one's late used elements and buffer writes land in memory
    the daemon no longer reads, the chains it held are resubmitted to the new one with their bytes,
    and the guest gets each completion once, with the new back-end's data."""
    import mmap

    r = rig(num=16)
    drv = r.drivers[0]
    (old_region,), (old_fd,) = r.dp.regions()  # first connection
    mapping = mmap.mmap(os.dup(old_fd), old_region.memory_size)  # the old back-end's own mapping
    old_mem = FlatMemory(mapping, old_region.guest_phys_addr)
    desc, avail, used, _ = split_ring_layout(16, r.dp.shadow.ring_slot(0))
    old = SplitQueueDevice(old_mem, 16, desc, avail, used)
    replies = []
    for k in range(3):
        replies.append(r.buf(32))
        drv.add([r.buf(bytes([k + 1]) * 28)], [replies[-1]], token=k)
    r.dp.notify(0)
    chains = [old.pop() for _ in range(3)]
    write_buffers(old_mem, chains[0].writable, b"old:" + bytes([1]) * 28)
    old.push(chains[0].head, 32)  # completed before it stalled

    r.dp.new_connection()  # the replacement connects
    (new_region,), (new_fd,) = r.dp.regions()
    assert new_fd != old_fd and new_region.guest_phys_addr == old_region.guest_phys_addr
    rings = r.dp.open_queue(r.configs[0], r.features, r.kick[0], resume=True)
    assert [t for t, _ in drv.get_used()] == [0]  # harvested from the old memfd before the switch
    for c in chains[1:]:  # the stale one wakes up: garbage into its buffers, used elements pushed
        write_buffers(old_mem, c.writable, b"\xee" * 32)
        old.push(c.head, 32)
    r.dp.used(0)
    assert drv.get_used() == [] and r.dp.inflight(0) == 2  # never read

    new = SplitQueueDevice(r.dp.shadow, 16, rings.desc, rings.avail, rings.used, last_avail_idx=rings.base)
    r.backends[0].release()
    r.backends[0] = new
    assert r.serve(reply=lambda data, room: b"new:" + data[: room - 4]) == 2  # got the guest's bytes
    assert r.dp.used(0) is True
    assert sorted(t for t, _ in drv.get_used()) == [1, 2]
    expected = [b"old:" + bytes([1]) * 28, b"new:" + bytes([2]) * 28, b"new:" + bytes([3]) * 28]
    assert [bytes(r.mem.view(a, n)) for a, n in replies] == expected
    old.release()
    old_mem.release()
    mapping.close()
    assert r.dp.inflight(0) == 0 and r.dp.pool.used_pages == 0


@pytest.mark.parametrize("record", [True, False])
def test_a_restarted_daemon_resumes_exactly_from_the_guest_inflight_record(rig, tmp_path, record):
    """The daemon dies (nothing closed) after the back-end completed chains 2 and 0 of 0..3, out of
    order. A new daemon process resumes the queue. With the in-flight record (a file) it takes
    exactly 1 and 3 again; without it, QEMU's rule (resume at the guest's used index, 2) takes 2 a
    second time and never 1 -- the guest sees a completion for a chain not in flight."""
    path = str(tmp_path / "shadow-0.inflight")
    r = rig(num=16, inflight=GuestInflightRecord(path, 4, 256) if record else None)
    drv = r.drivers[0]
    for k in range(4):
        drv.add([r.buf(bytes([k + 1]) * 16)], [r.buf(16)], token=k)
    r.dp.notify(0)
    be = r.backends[0]
    chains = [be.pop() for _ in range(4)]
    for c in (chains[2], chains[0]):
        write_buffers(r.dp.shadow, c.writable, b"old!" * 4)
        be.push(c.head, 16)
    r.dp.used(0)
    assert sorted(t for t, _ in drv.get_used()) == [0, 2]

    # SIGKILL: the old process's objects are simply gone; a new one starts from the guest's RAM
    # (and the record file, when there is one).
    rec2 = GuestInflightRecord(path, 4, 256) if record else None
    assert rec2 is None or not rec2.fresh
    dp2 = ShadowDataPath(r.mem, [(GBASE, GSIZE)], pool_size=1 << 20, max_queues=4, max_queue_size=256, inflight=rec2)
    try:
        rings = dp2.open_queue(r.configs[0], r.features, r.kick[0], resume=True)
        new = SplitQueueDevice(dp2.shadow, 16, rings.desc, rings.avail, rings.used, last_avail_idx=rings.base)
        try:
            dp2.notify(0)
            got = []
            while (c := new.pop()) is not None:
                data = read_buffers(dp2.shadow, c.readable)
                write_buffers(dp2.shadow, c.writable, b"new:" + data[:12])
                new.push(c.head, 16)
                got.append(data[0])
            dp2.used(0)
            if record:
                assert sorted(got) == [2, 4]  # chains 1 and 3 (their bytes are k + 1)
                assert sorted(t for t, _ in drv.get_used()) == [1, 3]
                assert dp2.inflight(0) == 0
            else:
                assert sorted(got) == [3, 4]  # chain 2 again, chain 3; chain 1 is lost
                with pytest.raises(RingError, match="not in flight"):
                    drv.get_used()
        finally:
            new.release()
    finally:
        dp2.close()


def test_one_memfd_for_every_start_on_one_connection(rig):
    """A guest reset restarts the rings on the same back-end connection: the memory table is the
    same memfd (DPDK keeps its mapping when the geometry is unchanged); a new connection gets a
    fresh one, at the same geometry."""
    r = rig(num=16)
    (first,), (fd,) = r.dp.regions()
    r.dp.close_queue(0)  # the driver reset the device
    (again,), (fd_again,) = r.dp.regions()
    assert fd_again == fd and again == first
    r.dp.new_connection()
    (fresh,), (fresh_fd,) = r.dp.regions()
    assert fresh_fd != fd and fresh == first
    r.dp.new_connection()  # a connection that never started the rings, then another
    r.dp.new_connection()
    assert r.dp.regions()[1] != [fresh_fd]


def test_a_transmitq_completion_reaches_the_guest_after_the_receipt_it_fed_on_a_lower_queue(rig):
    """A looped net back-end (dpdk-testpmd io forwarding) takes a frame from transmitq 1, puts it
    in a buffer of receiveq 0, and signals queue 1 first. The call of queue 1 brings queue 0's
    completion to the guest too, first: were the daemon killed between the two, the guest would
    hold a TX completion for a frame whose receipt died with the shadow memory."""
    r = rig(queues=2, num=16, features=EVENT_IDX)
    rx, tx = r.drivers
    rx.add([], [r.buf(2048)], token="rx")
    frame = os.urandom(200)
    tx.add([r.buf(frame)], [], token="tx")
    r.dp.notify(0)
    r.dp.notify(1)
    taken = r.backends[1].pop()
    room = r.backends[0].pop()
    assert taken is not None and room is not None
    data = read_buffers(r.dp.shadow, taken.readable)
    r.backends[1].push(taken.head, 0)  # transmitq done (its call first) ...
    r.backends[0].push(room.head, write_buffers(r.dp.shadow, room.writable, data))  # ... then the receipt
    assert r.dp.used(1) is True
    assert rx.get_used() == [("rx", len(frame))], "the receipt did not reach the guest with the TX completion"
    assert tx.get_used() == [("tx", 0)]
    assert r.dp.used(0) is False  # nothing left for queue 0's own call


def test_a_restarted_daemon_interrupts_the_guest_for_what_its_predecessor_pushed_unsignalled(rig, tmp_path):
    """The daemon pushed a completion to the guest's used ring and died before the interrupt. A
    driver that waits for it sends nothing more (a NIC whose receive buffers are all used), so
    no later completion would bring the interrupt: the restarted daemon's first call says to."""
    path = str(tmp_path / "shadow-0.inflight")
    r = rig(num=16, features=EVENT_IDX, inflight=GuestInflightRecord(path, 4, 256))
    drv = r.drivers[0]
    drv.add([], [r.buf(16)], token="rx")
    r.dp.notify(0)
    be = r.backends[0]
    c = be.pop()
    assert c is not None
    be.push(c.head, write_buffers(r.dp.shadow, c.writable, b"frame!" * 2))
    assert r.dp.used(0) is True  # pushed to the guest; SIGKILL before the daemon raised the interrupt
    dp2 = ShadowDataPath(r.mem, [(GBASE, GSIZE)], pool_size=1 << 20, max_queues=4, max_queue_size=256,
                         inflight=GuestInflightRecord(path, 4, 256))
    try:
        dp2.open_queue(r.configs[0], r.features, r.kick[0], resume=True)
        dp2.notify(0)
        assert dp2.used(0) is True  # (the device writes the call eventfd on a resume)
        assert dp2.used(0) is False
        assert drv.get_used() == [("rx", 12)]
    finally:
        dp2.close()


def _chosen_shadow(device: str):
    """A data path builder that goes through the data-path policy (GuestDataPaths.shadow) for
    ``--device device``, over the rig's guest memory."""
    import logging

    from xen_vhost_master.config import parse_device_arg
    from xen_vhost_master.datapath.choose import GuestDataPaths, GuestResources

    cfg = parse_device_arg(device + ",base=0x2000000,irq=33,socket=/nonexistent.sock")

    def make(mem, banks, *, pool_size, max_queues, max_queue_size, on_error, inflight):
        res = GuestResources(platform=None, privcmd=None, domid=1, banks=banks, grant_span=0,  # type: ignore[arg-type]
                             inflight_record=lambda c, n: None, queue_failed=lambda c, i, r: None,
                             log=logging.getLogger("test"))
        paths = GuestDataPaths(res)
        paths.guest_memory = mem  # (mapped once per guest: here the rig's bytearray)
        return paths.shadow(cfg, max_queues)

    return make


@pytest.mark.parametrize(("device", "harvests"), [("type=net", True), ("type=vsock", True), ("type=blk,queues=2", False)])
def test_a_call_takes_lower_queues_completions_only_for_types_that_feed_them(rig, device, harvests):
    """net and vsock back-ends may complete what a transmit queue takes into a receive queue below
    it, so a queue's call brings the lower queues' completions first (in order: test_a_transmitq_
    completion_reaches_the_guest_after_the_receipt_it_fed_on_a_lower_queue). A blk back-end never does: a call of queue 1 reads queue 1's used ring only, whatever
    queue 0 has completed meanwhile (no O(queues) extra ring reads per call of multi-queue blk)."""
    r = rig(queues=2, num=16, features=EVENT_IDX, make=_chosen_shadow(device))
    assert r.dp.harvest_lower is harvests
    q0, q1 = r.drivers
    q0.add([], [r.buf(64)], token="q0")
    q1.add([], [r.buf(64)], token="q1")
    r.dp.notify(0)
    r.dp.notify(1)
    for be in r.backends:
        c = be.pop()
        assert c is not None
        be.push(c.head, write_buffers(r.dp.shadow, c.writable, b"done"))
    assert r.dp.used(1) is True
    assert q1.get_used() == [("q1", 4)]
    if harvests:
        assert q0.get_used() == [("q0", 4)] and r.dp.also_used() == [0]
        assert r.dp.used(0) is False
    else:
        assert q0.get_used() == [] and r.dp.also_used() == [], "queue 0's ring was read on queue 1's call"
        assert r.dp.used(0) is True
        assert q0.get_used() == [("q0", 4)]


@pytest.mark.parametrize("features", [INDIRECT, INDIRECT | EVENT_IDX], ids=["flags", "event-idx"])
def test_a_quiesced_queue_takes_nothing_more_and_its_driver_is_never_asked_to_notify_again(rig, features):
    """The device is going (the daemon's stop under a live guest): completions of what the
    back-end had still reach the guest, but a held chain is not published, and taking it back
    does not ask the driver for notifications again."""
    r = rig(pool=3 * PAGE, features=features)
    drv = r.drivers[0]
    for k in range(5):
        drv.add([r.buf(bytes([k]) * 16)], [r.buf(3000)], token=k)  # one page each
    assert drv.kick_needed()
    r.dp.notify(0)
    assert r.dp.inflight(0) == 3 and r.dp.held_queues == 1
    assert r.dp.quiesce() == [0]
    assert r.serve() == 3
    r.dp.used(0)
    assert sorted(t for t, _ in drv.get_used()) == [0, 1, 2]
    assert r.dp.inflight(0) == 0 and r.serve() == 0  # the held chains stay with the guest
    kicks = 0
    while drv.num_free:
        drv.add([r.buf(16)], token="more")
        kicks += drv.kick_needed()
    assert kicks == 0


VERSION_1 = 1 << 32


def _shadow_shape(r: Rig) -> tuple[list[int], list[int], bool]:
    """The one chain on queue 0's shadow ring as the back-end sees it: readable and writable
    lengths, and whether it came through an indirect table."""
    be = r.backends[0]
    head = struct.unpack_from("<H", r.dp.shadow.view(be._r.avail_addr + 4 + 2 * (be._last_avail % r.num), 2))[0]
    flags = struct.unpack_from("<H", r.dp.shadow.view(be._r.desc_addr + 16 * head + 12, 2))[0]
    chain = be.chain(head)
    return [b.length for b in chain.readable], [b.length for b in chain.writable], bool(flags & VIRTQ_DESC_F_INDIRECT)


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_a_scattered_read_reaches_the_backend_as_header_data_status(rig, indirect):
    """A virtio-blk read of four scattered 4 KiB pages (a 16-byte header, the pages, a status
    byte): with VIRTIO_F_VERSION_1 the back-end gets three descriptors, the pages as one buffer
    (virtio 1.2 §2.7.4: any framing), the header and the status apart; a guest's indirect chain
    goes direct when the shadow ring has room. Each page gets its own part of what the back-end
    wrote, the status its byte, nothing around them is touched."""
    r = rig(features=INDIRECT | VERSION_1)
    pages = [r.buf(4096 + 64)[0] for _ in range(4)]  # 64-byte gaps: scattered in guest RAM
    hdr, status = r.buf(b"H" * 16), r.buf(1)
    wr = [*((a, 4096) for a in pages), status]
    if indirect:
        r.drivers[0].add_indirect(r.buf(16 * 6)[0], [hdr], wr)
    else:
        r.drivers[0].add([hdr], wr)
    r.dp.notify(0)
    assert _shadow_shape(r) == ([16], [4 * 4096, 1], False)
    data = os.urandom(4 * 4096)
    assert r.serve(reply=lambda d, room: data + b"\x00") == 1
    r.dp.used(0)
    assert r.drivers[0].get_used()[0][1] == 4 * 4096 + 1
    for k, a in enumerate(pages):
        assert bytes(r.mem.view(a, 4096)) == data[4096 * k : 4096 * (k + 1)]
        assert bytes(r.mem.view(a + 4096, 64)) == bytes([CANARY]) * 64
    assert bytes(r.mem.view(status[0], 1)) == b"\x00"
    assert r.dp.pool.used_pages == 0


def test_a_scattered_write_reaches_the_backend_as_header_data_status(rig):
    r = rig(features=INDIRECT | VERSION_1)
    data = os.urandom(3 * 4096)
    rd = [r.buf(b"W" * 16), *(r.buf(data[4096 * k : 4096 * (k + 1)]) for k in range(3))]
    r.drivers[0].add(rd, [r.buf(1)])
    r.dp.notify(0)
    assert _shadow_shape(r) == ([16, 3 * 4096], [1], False)
    seen: list[bytes] = []
    r.serve(reply=lambda d, room: seen.append(d) or b"\x00")
    assert seen == [b"W" * 16 + data]


def test_without_version_1_the_guests_framing_is_kept(rig):
    r = rig(features=INDIRECT)
    r.drivers[0].add([r.buf(b"H" * 16)], [*(r.buf(4096) for _ in range(4)), r.buf(1)])
    r.dp.notify(0)
    assert _shadow_shape(r) == ([16], [4096] * 4 + [1], False)


def test_a_merged_chain_goes_indirect_when_the_ring_lacks_room(rig):
    """Three 3-descriptor chains on an 8-entry shadow ring: two go direct, the third through an
    indirect table (one descriptor) rather than waiting."""
    r = rig(num=8, features=INDIRECT | VERSION_1)
    for k in range(3):
        r.drivers[0].add_indirect(r.buf(16 * 5)[0], [r.buf(b"H" * 16)], [*(r.buf(4096) for _ in range(3)), r.buf(1)],
                                  token=k)
    r.dp.notify(0)
    assert r.dp.inflight(0) == 3 and r.dp.stats(0).held == 0
    be = r.backends[0]
    heads = struct.unpack_from("<3H", r.dp.shadow.view(be._r.avail_addr + 4, 6))
    flags = [struct.unpack_from("<H", r.dp.shadow.view(be._r.desc_addr + 16 * h + 12, 2))[0] for h in heads]
    assert [bool(f & VIRTQ_DESC_F_INDIRECT) for f in flags] == [False, False, True]
    assert r.serve(reply=lambda d, room: b"\x07" * room) == 3
    r.dp.used(0)
    assert [(t, n) for t, n in r.drivers[0].get_used()] == [(0, 3 * 4096 + 1), (1, 3 * 4096 + 1), (2, 3 * 4096 + 1)]
