"""Hostile guest chains on the shadow path: the queue stops (on_error → NEEDS_RESET), the other
queue keeps working, and no byte of guest RAM outside the legitimate writable buffers and the rings
changes (the whole RAM is compared against a canary snapshot)."""

from __future__ import annotations

import struct

import pytest

from vhost_user.virtqueue import VIRTQ_DESC_F_INDIRECT as IND
from vhost_user.virtqueue import VIRTQ_DESC_F_NEXT as NEXT
from vhost_user.virtqueue import VIRTQ_DESC_F_WRITE as WRITE
from vhost_user.virtqueue import read_buffers, split_ring_layout

from tests.daemon.test_shadow_engine import EVENT_IDX, GBASE, GSIZE, INDIRECT, rig  # noqa: F401  (fixture)
from xen_vhost_master.datapath.shadow import ShadowQueueError

NUM = 16


def post_raw(r, q: int, descs: list[tuple[int, int, int, int]], head: int = 0, *, avail_step: int = 1) -> None:
    """Write descriptors straight into queue ``q``'s guest table and make ``head`` available."""
    cfg = r.configs[q]
    for i, (addr, length, flags, nxt) in enumerate(descs):
        r.mem.view(cfg.desc + 16 * i, 16)[:] = struct.pack("<QIHH", addr, length, flags, nxt)
    idx = struct.unpack_from("<H", r.mem.view(cfg.driver + 2, 2))[0]
    r.mem.view(cfg.driver + 4 + 2 * (idx % cfg.num), 2)[:] = struct.pack("<H", head)
    r.mem.view(cfg.driver + 2, 2)[:] = struct.pack("<H", (idx + avail_step) & 0xFFFF)


def table(r, entries: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    addr, n = r.buf(16 * len(entries))
    for i, e in enumerate(entries):
        r.mem.view(addr + 16 * i, 16)[:] = struct.pack("<QIHH", *e)
    return addr, n


def hostile_cases(r):
    """name → function that posts the hostile chain on queue 0."""
    rd, wr = r.buf(b"r" * 64), r.buf(64)
    ram_end = GBASE + GSIZE
    return {
        "loop": lambda: post_raw(r, 0, [(rd[0], 64, NEXT, 1), (wr[0], 64, WRITE | NEXT, 0)]),
        "out of RAM": lambda: post_raw(r, 0, [(rd[0], 64, NEXT, 1), (ram_end - 8, 4096, WRITE, 0)]),
        "below RAM": lambda: post_raw(r, 0, [(0x1000, 64, WRITE, 0)]),
        "over 4 GiB": lambda: post_raw(r, 0, [(table(r, [(GBASE, GSIZE, NEXT | WRITE, i + 1) for i in range(1100)])[0], 16 * 1100, IND, 0)]),
        "write before read": lambda: post_raw(r, 0, [(wr[0], 64, WRITE | NEXT, 1), (rd[0], 64, 0, 0)]),
        "oversize indirect": lambda: post_raw(r, 0, [(GBASE + 0x100000, 16 * 40000, IND, 0)]),
        "ragged indirect": lambda: post_raw(r, 0, [(rd[0], 24, IND, 0)]),
        "nested indirect": lambda: post_raw(r, 0, [(table(r, [(rd[0], 32, IND, 0)])[0], 16, IND, 0)]),
        "longer than the queue": lambda: post_raw(r, 0, [(table(r, [(rd[0], 1, NEXT, i + 1) for i in range(NUM)] + [(wr[0], 1, WRITE, 0)])[0], 16 * (NUM + 1), IND, 0)]),
        "head out of range": lambda: post_raw(r, 0, [(rd[0], 64, 0, 0)], head=NUM + 3),
        "avail idx far ahead": lambda: post_raw(r, 0, [(rd[0], 64, 0, 0)], avail_step=NUM + 1),
        "indirect and next": lambda: post_raw(r, 0, [(rd[0], 32, IND | NEXT, 1), (wr[0], 64, WRITE, 0)]),
        "zero-length buffer": lambda: post_raw(r, 0, [(rd[0], 64, NEXT, 1), (wr[0], 0, WRITE, 0)]),
        "zero-length indirect buffer": lambda: post_raw(
            r, 0, [(table(r, [(rd[0], 0, NEXT, 1), (wr[0], 64, WRITE, 0)])[0], 32, IND, 0)]),
    }


CASES = [
    "loop", "out of RAM", "below RAM", "over 4 GiB", "write before read", "oversize indirect", "ragged indirect",
    "nested indirect", "longer than the queue", "head out of range", "avail idx far ahead", "indirect and next",
    "zero-length buffer", "zero-length indirect buffer",
]


def changed(before: bytes, after: bytearray) -> list[int]:
    """Offsets of the bytes that differ (page by page, then byte by byte in differing pages)."""
    out = []
    for p in range(0, len(before), 4096):
        if before[p : p + 4096] != after[p : p + 4096]:
            out += [i for i in range(p, min(p + 4096, len(before))) if before[i] != after[i]]
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("features", [INDIRECT, INDIRECT | EVENT_IDX])
def test_hostile_chain_stops_its_queue_only_and_writes_nothing_outside(rig, case, features):
    r = rig(queues=2, num=NUM, features=features)
    post = hostile_cases(r)[case]
    legit_w = r.buf(256)
    legit_r = r.buf(b"L" * 256)
    post()
    before = bytes(r.ram)
    r.dp.notify(0)
    assert r.errors and r.errors[0][0] == 0, r.errors
    assert r.dp.broken(0) is not None and r.dp.inflight(0) == 0 and r.kicks(0) == 0
    r.dp.notify(0)  # a stopped queue stays stopped, quietly
    assert len(r.errors) == 1
    # the other queue keeps running
    r.drivers[1].add([legit_r], [legit_w], token="ok")
    r.dp.notify(1)
    assert r.serve(1) == 1 and r.dp.used(1)
    assert r.drivers[1].get_used() == [("ok", 256)]
    assert bytes(r.mem.view(legit_w[0], 256)) == b"L" * 256
    # no byte changed outside: the legit buffer, queue 1's rings (its driver wrote them too) and
    # queue 0's used ring (avail_event); queue 0's descriptors and available ring are untouched
    q0, q1 = r.configs
    allowed = [(legit_w[0], 256), (q1.desc, split_ring_layout(NUM, q1.desc)[3]), (q0.device, 6 + 8 * NUM)]
    for i in changed(before, r.ram):
        gpa = GBASE + i
        assert any(a <= gpa < a + n for a, n in allowed), f"byte at {gpa:#x} changed"
    assert r.dp.pool.used_pages == 0


def test_same_head_twice_in_flight_stops_the_queue(rig):
    r = rig(num=NUM)
    rd = r.buf(b"x" * 8)
    post_raw(r, 0, [(rd[0], 8, 0, 0)])
    r.dp.notify(0)
    assert r.dp.inflight(0) == 1 and not r.errors
    post_raw(r, 0, [(rd[0], 8, 0, 0)])  # head 0 again, never completed
    r.dp.notify(0)
    assert r.errors and "in flight" in r.errors[0][1]
    r.serve()
    assert r.dp.used(0) is False  # a stopped queue completes nothing more


def test_without_on_error_notify_raises_a_typed_error(rig):
    r = rig(num=NUM, on_error=False)
    post_raw(r, 0, [(GBASE - 4096, 8, 0, 0)])
    with pytest.raises(ShadowQueueError) as info:
        r.dp.notify(0)
    assert info.value.index == 0 and "guest memory" in info.value.reason
    r.dp.notify(0)  # reported once


def test_backend_returning_a_head_never_published_stops_the_queue(rig):
    r = rig(num=NUM)
    r.drivers[0].add([r.buf(b"x" * 8)], [r.buf(8)])
    r.dp.notify(0)
    r.backends[0].push(7, 8)  # not in flight
    assert r.dp.used(0) is False
    assert r.errors and r.errors[0][1].startswith("back-end")


def test_chain_larger_than_the_pool_is_a_guest_error(rig):
    r = rig(num=NUM, pool=4 * 4096)
    r.drivers[0].add([r.buf(b"x" * 8)], [r.buf(5 * 4096)])
    r.dp.notify(0)
    assert r.errors and "bounce pool" in r.errors[0][1]


class _NarrowRam:
    """The rig's RAM with a span over its first half only: buffers beyond it go through the
    memory's view/check calls, as on a guest with several RAM banks."""

    def __init__(self, mem) -> None:
        self.mem = mem

    def view(self, addr: int, length: int) -> memoryview:
        return self.mem.view(addr, length)

    def check(self, addr: int, length: int) -> None:
        self.mem.check(addr, length)

    def spans(self) -> list[tuple[int, memoryview]]:
        return [(GBASE, self.mem.view(GBASE, GSIZE // 2))]


def test_the_rig_takes_chains_in_one_pass():
    """The hostile cases above go through the one-pass path (guest memory mapped for good, a span
    over all of it): each is refused there."""
    from tests.daemon.test_shadow_engine import Rig

    r = Rig(num=NUM)
    try:
        assert r.dp._direct and r.dp._span[:2] == (GBASE, GBASE + GSIZE)
        assert r.drivers[0] is not None and r.dp._queues[0].guest._span[:2] == (GBASE, GBASE + GSIZE)
    finally:
        r.close()


@pytest.mark.parametrize("narrow", [False, True], ids=["one span", "half in a span"])
@pytest.mark.parametrize("features", [INDIRECT, INDIRECT | EVENT_IDX])
def test_a_hostile_chain_amid_good_ones_in_one_pass(rig, features, narrow):
    """One notify, three chains: a good one, one whose writable buffer runs past the end of RAM,
    another good one. The good one before it reaches the back-end, the queue stops at the bad
    one, nothing after it is taken, and no guest byte changes outside the rings; with a span
    over half the RAM, buffers in the other half are checked and copied through the memory's calls."""
    r = rig(num=NUM, features=features)
    if narrow:
        r.dp.memory = _NarrowRam(r.mem)  # (the guest ring's walk keeps the rig's memory and its span)
    far = GBASE + GSIZE // 2 + 4096  # outside the narrow span
    r.mem.view(far, 16)[:] = b"F" * 16
    drv = r.drivers[0]
    drv.add([(far, 16)], [r.buf(64)], token="good")
    drv.add([r.buf(b"h" * 16)], [(GBASE + GSIZE - 32, 64)], token="bad")
    drv.add([r.buf(b"g" * 16)], [r.buf(64)], token="after")
    before = bytes(r.ram)
    r.dp.notify(0)
    assert r.errors and r.errors[0][0] == 0 and "not in guest memory" in r.errors[0][1], r.errors
    assert r.dp.inflight(0) == 1 and r.kicks(0) == 1  # the good one was published
    chain = r.backends[0].pop()
    assert chain is not None and read_buffers(r.dp.shadow, chain.readable) == b"F" * 16
    assert r.backends[0].pop() is None
    q0 = r.configs[0]
    for i in changed(before, r.ram):
        gpa = GBASE + i
        assert q0.device <= gpa < q0.device + 6 + 8 * NUM, f"byte at {gpa:#x} changed"
