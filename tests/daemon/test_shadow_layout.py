"""The shadow engine's layouts kept by chain shape (xen_vhost_master/datapath/shadow.py
``_layout``): a kept layout is exactly what laying the chain out again gives, whatever shapes
came before, a refused chain is refused every time, and the cache stays within its bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user.virtqueue import RingError
from xen_vhost_master.datapath import shadow
from xen_vhost_master.datapath.shadow import LAYOUT_CACHE_BUFFERS, LAYOUT_CACHE_SHAPES, _lay_out, _layout

length = st.one_of(st.sampled_from([0, 1, 16, 511, 512, 513, 4096, 8192]), st.integers(0, 70_000))
shape = st.tuples(st.lists(length, min_size=1, max_size=40), st.integers(0, 40), st.booleans())


def expected(bufs: list[tuple[int, int]], nr: int, merge: bool) -> object:
    try:
        offsets, runs, nrr, size = _lay_out(7, bufs, nr, merge)
    except RingError as e:
        return str(e)
    wlens = tuple(n for _a, n in bufs[nr:])
    return tuple(offsets), tuple(runs), nrr, size, tuple(offsets[nr:]), wlens, sum(wlens), sum(n for _a, n in bufs[:nr])


def got(bufs: list[tuple[int, int]], nr: int, merge: bool) -> object:
    try:
        return tuple(_layout(7, bufs, nr, merge))
    except RingError as e:
        return str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(shape, min_size=1, max_size=80), st.randoms(use_true_random=False))
def test_a_kept_layout_is_the_layout_of_the_chain(shapes, rnd) -> None:
    shadow._LAYOUTS.clear()
    seen = []
    for lengths, nr, merge in shapes:
        bufs = [(0x4000_0000 + 0x10_0000 * i, n) for i, n in enumerate(lengths)]  # (addresses play no part)
        nr = min(nr, len(bufs))
        seen.append((bufs, nr, merge))
        for b, r, m in (seen[-1], rnd.choice(seen)):  # this shape, and one seen before (kept or forgotten)
            assert got(b, r, m) == expected(b, r, m)
        assert len(shadow._LAYOUTS) <= LAYOUT_CACHE_SHAPES
        assert all(len(key[0]) <= LAYOUT_CACHE_BUFFERS for key in shadow._LAYOUTS)


def test_linux_128k_read_is_laid_out_once_and_a_refused_chain_never_kept() -> None:
    shadow._LAYOUTS.clear()
    read = [(0x1000, 16), *((0x4000_0000 + 8192 * i, 4096) for i in range(32)), (0x2000, 1)]
    first = _layout(1, read, 1, True)
    assert first.runs == ((0, 16), (512, 32 * 4096), (512 + 32 * 4096, 1))  # header, data, status
    assert (first.nrr, first.wlen, len(first.woffsets)) == (1, 32 * 4096 + 1, 33)
    other_pages = [(0x9000, 16), *((0x5000_0000 + 4096 * i, 4096) for i in range(32)), (0xA000, 1)]
    assert _layout(2, other_pages, 1, True) is first  # same shape, other addresses: the kept layout
    assert _layout(3, read, 33, True) is not first  # a write of the same lengths: its own layout
    empty = [(0x1000, 16), (0x2000, 0), (0x3000, 1)]
    for _ in range(2):
        with pytest.raises(RingError, match="buffer 1 has length 0"):
            _layout(4, empty, 1, True)
    assert len(shadow._LAYOUTS) == 2
    many = [(0x1000 * i, 512) for i in range(LAYOUT_CACHE_BUFFERS + 1)]
    assert _layout(5, many, 1, True).size == 512 * len(many)
    assert len(shadow._LAYOUTS) == 2  # a chain longer than LAYOUT_CACHE_BUFFERS: laid out, not kept
    for k in range(3 * LAYOUT_CACHE_SHAPES):  # a guest sending ever new shapes
        bufs = [(0x1000, 16), (0x2000, 512 * (k + 1)), (0x3000, 1)]
        assert tuple(_layout(6, bufs, 1, True)) == expected(bufs, 1, True)
        assert len(shadow._LAYOUTS) <= LAYOUT_CACHE_SHAPES
