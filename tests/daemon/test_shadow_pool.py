"""The shadow bounce pool's footprint: a steady load touches the pages of its peak in-flight bytes,
not the whole pool (every memfd page ever written stays resident in the daemon)."""

from __future__ import annotations

import random

from xen_vhost_master.datapath.shadow_pool import PAGE, PagePool


def test_a_steady_load_reuses_the_lowest_pages() -> None:
    rng = random.Random(18)
    pool = PagePool(0, 4096)  # 16 MiB, the default
    touched = 0
    inflight: list[tuple[int, int]] = []
    for _ in range(3000):  # QD 8 of 1..4 pages, completed in any order
        while len(inflight) < 8:
            n = rng.randint(1, 4) * PAGE
            off = pool.alloc(n)
            assert off is not None
            inflight.append((off, n))
            touched = max(touched, off + n)
        rng.shuffle(inflight)
        done = rng.randint(1, 8)
        for off, n in inflight[:done]:
            pool.free(off, n)
        del inflight[:done]
    assert touched <= 2 * 8 * 4 * PAGE, f"{touched // PAGE} pages touched for at most 32 in flight"
