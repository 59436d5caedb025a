"""Property test of the shadow engine: random chain shapes (direct/indirect, zero-length buffers),
random back-end completion order and written lengths, small pools (back-pressure), a back-end that
dies mid-way with chains popped but not completed. Every chain completes exactly once, the guest's
writable buffers hold exactly the bytes the back-end wrote up to the length it reported, and no
other guest byte changes."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon.test_shadow_engine import EVENT_IDX, GBASE, INDIRECT, Rig
from tests.daemon.test_shadow_hostile import changed
from vhost_user.virtqueue import SplitQueueDevice, read_buffers, split_ring_layout

NUM = 32
PATTERN = bytes(range(256)) * 120  # longer than any chain's writable bytes (3 × 9000) + 251
# no zero-length buffer: the shadow path refuses one as a guest error (test_replay_bound.py)
size = st.one_of(st.sampled_from([1, 4096, 9000]), st.integers(1, 9000))
chain = st.tuples(st.lists(size, max_size=3), st.lists(size, max_size=3), st.booleans())


def payload(k: int, n: int) -> bytes:
    out = PATTERN[k % 251 : k % 251 + n]
    assert len(out) == n
    return out


def gather(mem, bufs, limit: int) -> bytes:
    """The first ``limit`` bytes of ``bufs`` (zero-length buffers skipped, not a stop)."""
    out = b"".join(bytes(mem.view(a, n)) for a, n in bufs if n)
    return out[:limit]


def scatter(mem, bufs, data: bytes) -> None:
    for a, n in bufs:
        chunk, data = data[:n], data[n:]
        if chunk:
            mem.view(a, len(chunk))[:] = chunk


def run_case(chains, features: int, pool_pages: int, seed: int, die_at: int) -> tuple[int, int]:
    """One case; returns (chains resubmitted, times a queue was held for lack of space)."""
    rnd = random.Random(seed)  # not st.randoms(): its randbytes would eat Hypothesis' entropy budget
    r = Rig(num=NUM, features=features, pool=pool_pages * 4096)
    try:
        drv = r.drivers[0]
        writable: dict[int, list[tuple[int, int]]] = {}
        for k, (rd, wr, indirect) in enumerate(chains):
            rbufs = [r.buf(struct.pack("<I", k))] + [r.buf(rnd.randbytes(n)) for n in rd]  # tagged with k
            wbufs = [r.buf(n) for n in wr]
            if drv.num_free < (1 if indirect else len(rbufs) + len(wbufs)):
                continue
            if indirect:
                drv.add_indirect(r.buf(16 * (len(rbufs) + len(wbufs)))[0], rbufs, wbufs, token=k)
            else:
                drv.add(rbufs, wbufs, token=k)
            writable[k] = wbufs
        before = bytes(r.ram)
        r.dp.notify(0)
        at_backend: list = []
        got: dict[int, int] = {}
        for step in range(1, 400):
            be = r.backends[0]
            while (c := be.pop()) is not None:
                at_backend.append(c)
            rnd.shuffle(at_backend)
            for c in at_backend[: rnd.randint(1, max(1, len(at_backend)))]:
                k = struct.unpack("<I", read_buffers(r.dp.shadow, c.readable, 4))[0]
                n = rnd.randint(0, c.writable_len)
                scatter(r.dp.shadow, [(b.addr, b.length) for b in c.writable], payload(k, n))
                be.push(c.head, n)
                at_backend.remove(c)
            if step == die_at and at_backend:  # dies holding chains it never completed
                be.release()
                at_backend.clear()
                rings = r.dp.open_queue(r.configs[0], features, r.kick[0], resume=True)
                r.backends[0] = SplitQueueDevice(r.dp.shadow, NUM, rings.desc, rings.avail, rings.used,
                                                 event_idx=bool(features & EVENT_IDX), last_avail_idx=rings.base)
            r.dp.used(0)
            for k, n in drv.get_used():
                assert k not in got, f"chain {k} completed twice"
                got[k] = n
            if len(got) == len(writable):
                break
            r.dp.notify(0)
        assert set(got) == set(writable), "chains lost"
        allowed = [(r.configs[0].desc, split_ring_layout(NUM, r.configs[0].desc)[3])]
        for k, wbufs in writable.items():
            n = got[k]
            assert n <= sum(m for _, m in wbufs)
            assert gather(r.mem, wbufs, n) == payload(k, n)
            for a, m in wbufs:
                allowed.append((a, min(m, n)))
                n -= min(m, n)
        for i in changed(before, r.ram):
            assert any(a <= GBASE + i < a + m for a, m in allowed), f"byte at {GBASE + i:#x} changed"
        assert r.dp.pool.used_pages == 0 and r.dp.inflight(0) == 0 and not r.errors, r.errors
        return r.dp.stats(0).resubmitted, r.dp.stats(0).held
    finally:
        r.close()



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(chain, min_size=1, max_size=20),
    features=st.sampled_from([0, INDIRECT, EVENT_IDX | INDIRECT, EVENT_IDX]),
    pool_pages=st.integers(16, 40),  # a chain needs at most 15 pages; 20 chains need more than 40
    seed=st.integers(0, 2**32 - 1),
    die_at=st.integers(1, 12),
)
def test_every_chain_completes_once_with_exactly_the_reported_bytes(chains, features, pool_pages, seed, die_at):
    run_case(chains, features, pool_pages, seed, die_at)


def test_a_case_with_back_pressure_and_a_dying_backend():
    """A fixed case that surely goes through both: the pool holds the big chain back, and the
    back-end dies holding chains it never completed."""
    chains = [([], [], False)] * 5 + [([], [4096], False), ([9000], [9000, 9000, 9000], False)]
    for features in (0, EVENT_IDX | INDIRECT):
        resubmitted, held = run_case(chains, features, 16, 0, 1)
        assert resubmitted > 0 and held > 0
