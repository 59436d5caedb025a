"""The driver side stores each ring word a device polls with one store.

Regression test for the testpmd loop-back failure (frame0, frame1, frame1, ...; testpmd counted
65538 frames received for 2 sent): ``struct.pack_into`` zeroes its target before writing the
value (CPython's ``s_pack_internal`` memsets it), so DPDK's data-path lcore, polling the avail ring
from another process, could read avail idx 0 after having consumed index 1 and take
``0 - 1 = 65535`` chains as new (``virtio_dev_tx_split`` has no bound check): it re-sent the stale
avail slots for a whole index wrap.

Here another process polls the words one side publishes (driver: avail idx and used_event;
device: used idx and avail_event) while this one drives the queue (both sides). Those words only
grow from 0 during the run (fewer than 65536 chains), so a poller that reads 0 after it saw a
non-zero value has seen a store that was not one store.
Before the fix such reads came by the hundreds in a fraction of a second on two idle CPUs; the
test cannot fail spuriously (with single stores the value 0 never comes back), but with fewer than
two CPUs free the poller rarely runs during a store and the test then proves little.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import time
from collections.abc import Iterator

from vhost_user.virtqueue import FlatMemory, SplitQueueDevice, SplitQueueDriver, split_ring_layout

QUEUE_SIZE = 64
MEM_SIZE = 0x10000
BUF = 0x4000  # the chains' one data buffer
FLAGS = 0x8000  # shared control words: [0] stop, set by the parent
RUN_SECONDS = 0.4
STORES_PER_CHAIN = 8
MAX_CHAINS = 60_000  # below 65536: the indices never legitimately come back to 0
DEADLINE = 10.0


def _poll(words: memoryview, watched: tuple[int, ...], stop: int) -> tuple[int, int]:
    """Child: read the watched 16-bit words until told to stop; count reads of 0 after non-zero."""
    left_zero = [False] * len(watched)
    reads = torn = 0
    while not words[stop]:
        for i, index in enumerate(watched):
            value = words[index]
            if value:
                left_zero[i] = True
            elif left_zero[i]:
                torn += 1
        reads += 1
    return reads, torn


@contextlib.contextmanager
def _poller(mm: mmap.mmap, watched: tuple[int, ...], stop: int) -> Iterator[tuple[int, int]]:
    """Fork a process polling ``watched`` words of ``mm``; yields the pipe it reports on, and its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest, no asyncio; report and leave through os._exit
        status = 1
        try:
            os.close(ready_r)
            words = memoryview(mm).cast("H")
            os.write(ready_w, b"polling\n")
            reads, torn = _poll(words, watched, stop)
            os.write(ready_w, f"{reads} {torn}\n".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    try:
        yield ready_r, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)


def _read_line(fd: int, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], "poller did not answer in time"
        chunk = os.read(fd, 64)
        assert chunk, "poller exited without a result"
        out += chunk
    return out


def _drive_while_polled(side: str) -> None:
    """Run chains through a queue while another process polls ``side``'s published words."""
    mm = mmap.mmap(-1, MEM_SIZE)  # MAP_SHARED | MAP_ANONYMOUS: shared with the forked poller
    mem = FlatMemory(mm)
    desc, avail, used, _ = split_ring_layout(QUEUE_SIZE, 0)
    drv = SplitQueueDriver(mem, QUEUE_SIZE, desc, avail, used, event_idx=True)
    dev = SplitQueueDevice(mem, QUEUE_SIZE, desc, avail, used, event_idx=True)
    words = memoryview(mm).cast("H")
    if side == "driver":  # avail idx and used_event; enable_interrupts stores used_event again
        watched = ((avail + 2) // 2, (avail + 4 + 2 * QUEUE_SIZE) // 2)
        store_again = drv.enable_interrupts
    else:  # used idx and avail_event; enable_notify stores avail_event again
        watched = ((used + 2) // 2, (used + 4 + 8 * QUEUE_SIZE) // 2)
        store_again = dev.enable_notify
    stop = FLAGS // 2
    chains = 0
    try:
        with _poller(mm, watched, stop) as (fd, _pid):
            assert _read_line(fd, DEADLINE) == b"polling\n"
            end = time.monotonic() + RUN_SECONDS
            while chains < MAX_CHAINS and time.monotonic() < end:
                for _ in range(100):
                    drv.add(readable=[(BUF, 64)], token=chains)  # avail ring entry + avail idx
                    chain = dev.pop()  # avail_event
                    assert chain is not None
                    dev.push(chain.head, 0)  # used element + used idx
                    assert drv.get_used() == [(chains, 0)]  # used_event
                    chains += 1
                    for _ in range(STORES_PER_CHAIN):
                        store_again()  # the same value again: more stores to catch
            words[stop] = 1
            reads, torn = map(int, _read_line(fd, DEADLINE).split())
        assert chains > 1000 and reads > 0
        assert torn == 0, f"the poller read a word we never wrote (0) {torn} times in {reads} polls of {chains} chains"
    finally:
        words.release()
        drv.release()
        dev.release()
        mem.release()
        mm.close()


def test_driver_side_polled_words_are_never_seen_half_written() -> None:
    _drive_while_polled("driver")


def test_device_side_polled_words_are_never_seen_half_written() -> None:
    _drive_while_polled("device")
