"""Inflight I/O tracking, pure: the region layout (libvhost-user's), the update order, and a
back-end "killed" mid-flight with chains completed out of order, recovered from the region
alone (vhost_user.inflight + the device side of vhost_user.virtqueue, no I/O)."""

from __future__ import annotations

import struct

import pytest

from vhost_user.errors import InflightRegionError
from vhost_user.inflight import (
    INFLIGHT_VERSION,
    InflightRegion,
    format_region,
    queue_region_size,
    region_size,
)
from vhost_user.virtqueue import FlatMemory, RingError, SplitQueueDevice, SplitQueueDriver, split_ring_layout

QSIZE = 16


def test_region_sizes_follow_libvhost_user_layout() -> None:
    # 16-byte header + 16 bytes per DescStateSplit, each queue region rounded up to 64 bytes
    assert queue_region_size(1) == 64
    assert queue_region_size(4) == 128  # 16 + 64 = 80 -> 128
    assert queue_region_size(128) == 2112  # 16 + 2048 = 2064 -> 2112
    assert region_size(2, 128) == 2 * 2112
    assert region_size(3, 256) == 3 * ((16 + 16 * 256 + 63) & ~63)


def test_format_region_writes_version_1_and_desc_num_per_queue_and_zeroes_the_rest() -> None:
    buf = bytearray(b"\xaa" * region_size(2, QSIZE))
    format_region(buf, 2, QSIZE)
    step = queue_region_size(QSIZE)
    for q in range(2):
        features, version, desc_num, last_batch, used = struct.unpack_from("<QHHHH", buf, q * step)
        assert (features, version, desc_num, last_batch, used) == (0, INFLIGHT_VERSION, QSIZE, 0, 0)
        assert buf[q * step + 16 : (q + 1) * step] == bytes(step - 16)


def test_begin_and_put_write_the_documented_fields_in_place() -> None:
    buf = bytearray(region_size(1, QSIZE))
    format_region(buf, 1, QSIZE)
    region = InflightRegion(buf, 1, QSIZE)
    q = region.queues[0]
    q.begin(5)
    q.begin(3)
    # DescStateSplit {u8 inflight; u8 padding[5]; u16 next; u64 counter} at 16 + 16*head
    assert struct.unpack_from("<B5xHQ", buf, 16 + 16 * 5) == (1, 0, 0)
    assert struct.unpack_from("<B5xHQ", buf, 16 + 16 * 3) == (1, 0, 1)
    assert q.in_flight() == [5, 3]
    q.pre_put(3)
    assert struct.unpack_from("<H", buf, 12)[0] == 3  # last_batch_head
    q.post_put(3, 1)
    assert struct.unpack_from("<H", buf, 14)[0] == 1 and buf[16 + 16 * 3] == 0  # used_idx, flag cleared
    assert q.in_flight() == [5]
    region.release()


class Ring:
    """A guest (driver side) and a back-end (device side) on one flat memory, with an inflight
    area the "front-end" keeps while back-ends come and go."""

    def __init__(self, *, inflight: bool = True) -> None:
        self.ram = bytearray(64 << 10)
        self.mem = FlatMemory(self.ram)
        self.desc, self.avail, self.used, _ = split_ring_layout(QSIZE, 0)
        self.drv = SplitQueueDriver(self.mem, QSIZE, self.desc, self.avail, self.used)
        self.area = bytearray(region_size(1, QSIZE)) if inflight else None
        if self.area is not None:
            format_region(self.area, 1, QSIZE)
        self.region: InflightRegion | None = None
        self.dev = self.start_backend(0)

    def start_backend(self, base: int) -> SplitQueueDevice:
        """A fresh back-end: SET_INFLIGHT_FD maps the area, the ring start recovers from it."""
        tracker = None
        if self.area is not None:
            if self.region is not None:
                self.region.release()
            self.region = InflightRegion(self.area, 1, QSIZE)
            tracker = self.region.queues[0]
            ring_used = struct.unpack_from("<H", self.ram, self.used + 2)[0]
            resume = tracker.recover(ring_used, QSIZE)
            base = base if resume is None else resume
        return SplitQueueDevice(self.mem, QSIZE, self.desc, self.avail, self.used, last_avail_idx=base, inflight=tracker)

    def submit(self, n: int, first: int = 0) -> list[int]:
        return [self.drv.add(readable=[(0x8000 + 64 * i, 16)], token=first + i) for i in range(n)]

    def close(self) -> None:
        self.dev.release()
        self.drv.release()
        if self.region is not None:
            self.region.release()
        self.mem.release()


def test_backend_killed_with_out_of_order_completions_resubmits_exactly_what_was_in_flight() -> None:
    r = Ring()
    r.submit(6)
    popped = [r.dev.pop() for _ in range(6)]
    assert [c.head for c in popped if c] == r.region.queues[0].in_flight()  # marked in pop order
    for c in (popped[1], popped[3], popped[4]):  # younger chains completed, older ones not
        r.dev.push(c.head, 0)
    done = sorted(t for t, _ in r.drv.get_used())
    assert done == [1, 3, 4]
    # SIGKILL: the device object is gone; the guest's used idx is 3. A new back-end starts with
    # SET_VRING_BASE = used idx (what the front-end knows) and the same inflight area.
    r.dev.release()
    r.dev = r.start_backend(base=3)
    assert r.dev.last_avail_idx == 6  # used idx 3 + 3 in flight: nothing re-read from the avail ring
    again = []
    while (c := r.dev.pop()) is not None:
        again.append(c.head)
    assert again == [popped[0].head, popped[2].head, popped[5].head]  # oldest first (counter order)
    for head in again:
        r.dev.push(head, 0)
    assert sorted(t for t, _ in r.drv.get_used()) == [0, 2, 5]  # each exactly once
    assert r.region.queues[0].in_flight() == []
    # and the ring carries on normally
    r.submit(2, first=6)
    assert [c.head for c in (r.dev.pop(), r.dev.pop())] and r.dev.pop() is None
    r.close()


def test_without_inflight_the_used_index_restart_repeats_and_loses_chains() -> None:
    """The control: the same history restarted at the used index double-completes a younger
    chain (the driver refuses it) and never returns the oldest one."""
    r = Ring(inflight=False)
    r.submit(4)
    popped = [r.dev.pop() for _ in range(4)]
    r.dev.push(popped[1].head, 0)
    assert [t for t, _ in r.drv.get_used()] == [1]
    r.dev.release()
    r.dev = r.start_backend(base=1)  # QEMU's rule without inflight: restart at used idx
    heads = []
    while (c := r.dev.pop()) is not None:
        heads.append(c.head)
    assert popped[0].head not in heads  # lost for good
    assert popped[1].head in heads  # already completed: served again
    for head in heads:
        r.dev.push(head, 0)
    with pytest.raises(RingError, match="not in flight"):
        r.drv.get_used()
    r.close()


def test_kill_between_used_idx_publish_and_flag_clear_is_not_resubmitted() -> None:
    r = Ring()
    r.submit(2)
    a, b = r.dev.pop(), r.dev.pop()
    r.dev.push(b.head, 0)
    # Undo the post_put of b: the back-end died after publishing used idx 1, before clearing.
    area = r.area
    area[16 + 16 * b.head] = 1
    struct.pack_into("<H", area, 14, 0)
    r.dev.release()
    r.dev = r.start_backend(base=1)
    assert r.dev.pop().head == a.head and r.dev.pop() is None  # b is done (last_batch_head)
    assert r.dev.last_avail_idx == 2
    r.close()


def test_kill_before_the_used_idx_publish_resubmits_the_chain() -> None:
    r = Ring()
    r.submit(1)
    a = r.dev.pop()
    r.region.queues[0].pre_put(a.head)  # used element written, used idx not yet published
    r.dev.release()
    r.dev = r.start_backend(base=0)
    assert r.dev.pop().head == a.head and r.dev.pop() is None
    r.close()


def test_fresh_version_0_area_is_initialised_and_keeps_the_vring_base() -> None:
    area = bytearray(region_size(1, QSIZE))  # all zero: a front-end that did not format it
    region = InflightRegion(area, 1, QSIZE)
    assert region.queues[0].recover(ring_used_idx=7, ring_size=QSIZE) is None
    assert struct.unpack_from("<HHHH", area, 8) == (INFLIGHT_VERSION, QSIZE, 0, 7)
    region.release()


@pytest.mark.parametrize(
    ("poke", "match"),
    [
        (lambda a: struct.pack_into("<H", a, 8, 9), "version 9"),
        (lambda a: a.__setitem__(16 + 16 * 2, 7), "inflight byte 7"),
        (lambda a: struct.pack_into("<H", a, 12, 999), "head 999 out of range"),
    ],
    ids=["version", "flag", "last_batch_head"],
)
def test_garbage_in_the_area_is_a_typed_error(poke, match) -> None:  # type: ignore[no-untyped-def]
    area = bytearray(region_size(1, QSIZE))
    format_region(area, 1, QSIZE)
    poke(area)
    region = InflightRegion(area, 1, QSIZE)
    with pytest.raises(InflightRegionError, match=match):
        region.queues[0].recover(ring_used_idx=1, ring_size=QSIZE)
    region.release()


def test_entries_beyond_the_ring_and_duplicate_counters_are_refused() -> None:
    area = bytearray(region_size(1, QSIZE))
    format_region(area, 1, QSIZE)
    region = InflightRegion(area, 1, QSIZE)
    q = region.queues[0]
    q.begin(12)
    with pytest.raises(InflightRegionError, match="descriptor 12 in flight on a ring of 8"):
        q.recover(0, 8)
    with pytest.raises(InflightRegionError, match="ring of 32 entries"):
        q.recover(0, 32)
    q.counter = 0
    q.begin(1)  # counter 0 again (12 has 0)
    with pytest.raises(InflightRegionError, match="same counter"):
        q.recover(0, QSIZE)
    region.release()


@pytest.mark.parametrize(
    ("size", "queues", "qsize", "match"),
    [
        (100, 1, QSIZE, "100 bytes"),
        (4096, 1, 12, "power of two"),
        (4096, 0, QSIZE, "num_queues 0"),
    ],
)
def test_undersized_or_misshapen_area_is_refused(size: int, queues: int, qsize: int, match: str) -> None:
    with pytest.raises(InflightRegionError, match=match):
        InflightRegion(bytearray(size), queues, qsize)


def test_read_only_area_is_refused() -> None:
    with pytest.raises(InflightRegionError, match="read-only"):
        InflightRegion(bytes(region_size(1, QSIZE)), 1, QSIZE)
