"""No lost wake-up in the shadow engine: a guest driver adding requests one by one while the daemon
pumps, a back-end completing them one by one while the daemon harvests, every notification
honoured and suppressed as the other side asks (virtio 1.2 §2.7.10), in many orders.

Each run is a sequence of atomic steps chosen by a seeded random generator: the guest adds a
request (and kicks only if ``kick_needed``, Linux ``virtqueue_kick_prepare``) or takes an interrupt
(Linux ``virtblk_done``: interrupts off, harvest, interrupts on, harvest again); the daemon serves a
pending kick (``notify``) or call (``used``); the back-end takes a pending kick (pops every chain,
libvhost-user's ``avail_event`` after each pop) or completes one chain (any order, a call only if
``needs_notify``). Guest and back-end steps also run in the middle of the daemon's own work: in
its copies and between its ring calls (``pop``, ``enable_notify``, ``get_used``, ``kick_needed``...).
Then no new request is added and every pending notification is served until none is left: at
that point every request must have completed. A request that waits for an unrelated later event
(a kick lost after kicks were asked for again, an interrupt judged unneeded against a stale
``used_event``, a held chain nobody retries) is left outstanding with nothing pending, which fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.daemon.test_shadow_engine import EVENT_IDX, INDIRECT, Rig, _chosen_shadow, rig  # noqa: F401  (fixture)
from vhost_user.virtqueue import Chain, write_buffers
from xen_vhost_master.datapath.shadow import ShadowDataPath

QD = 32
STEPS = 300


class _Interleaving:
    def __init__(self, seed: int, features: int, num: int, pool: int, kicks_when_idle: bool) -> None:
        self.rnd = random.Random(seed)
        self.r = Rig(num=num, features=features, pool=pool,
                     make=lambda mem, banks, **kw: ShadowDataPath(mem, banks, kicks_when_idle=kicks_when_idle, **kw))
        self.drv, self.be = self.r.drivers[0], self.r.backends[0]
        self.outstanding = self.added = 0
        self.guest_kick = self.call = self.irq = self.backend_kick = False
        self.taken: list[Chain] = []  # popped by the back-end, not completed
        self.others = [self.guest_add, self.guest_interrupt, self.backend_take, self.backend_complete]
        q = self.r.dp._queues[0]
        for obj, names in ((q.guest, ("pop", "pop_many", "available", "enable_notify", "disable_notify", "push",
                                      "push_many", "needs_notify", "_write_avail_event")),
                           (q.drv, ("add", "add_many", "add_indirect", "kick_needed", "get_used", "_harvest",
                                    "_publish_used_event"))):
            for name in names:
                setattr(obj, name, self._meanwhile(getattr(obj, name)))

    def _maybe_other(self) -> None:
        if self.rnd.random() < 0.3:
            self.rnd.choice(self.others)()

    def _meanwhile(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kw: Any) -> Any:
            self._maybe_other()
            result = call(*args, **kw)
            self._maybe_other()
            return result
        return wrapped

    def view(self, addr: int, length: int) -> memoryview:  # the daemon's copies of guest buffers
        self._maybe_other()
        return self.r.mem.view(addr, length)

    # --- the guest (one driver, Linux's notification rules) ---
    def guest_add(self) -> None:
        if self.outstanding >= QD or self.drv.num_free < 3:
            return
        self.drv.add([self.r.buf(16)], [self.r.buf(512), self.r.buf(1)], token=self.added)
        self.added += 1
        self.outstanding += 1
        if self.drv.kick_needed():
            self.guest_kick = True

    def guest_interrupt(self) -> None:
        if not self.irq:
            return
        self.irq = False
        while True:
            self.drv.disable_interrupts()
            got = self.drv.get_used()
            self.drv.enable_interrupts()
            got += self.drv.get_used()
            self.outstanding -= len(got)
            if not got:
                return

    # --- the daemon ---
    def daemon_kick(self) -> None:
        if self.guest_kick:
            self.guest_kick = False
            self._as_daemon(lambda: self.r.dp.notify(0))

    def daemon_call(self) -> None:
        if self.call:
            self.call = False
            if self._as_daemon(lambda: self.r.dp.used(0)):
                self.irq = True

    def _as_daemon(self, step: Callable[[], Any]) -> Any:
        self.r.dp.memory = self
        try:
            return step()
        finally:
            self.r.dp.memory = self.r.mem

    # --- the back-end ---
    def backend_take(self) -> None:
        if self.r.kicks():
            self.backend_kick = True
        if self.backend_kick:
            self.backend_kick = False
            while (chain := self.be.pop()) is not None:
                self.taken.append(chain)

    def backend_complete(self) -> None:
        if self.taken:
            chain = self.taken.pop(self.rnd.randrange(len(self.taken)))
            write_buffers(self.r.dp.shadow, chain.writable, b"\x01" * chain.writable_len)
            self.be.push(chain.head, chain.writable_len)
            if self.be.needs_notify():
                self.call = True

    def run(self) -> None:
        steps = [*self.others, self.daemon_kick, self.daemon_call]
        for _ in range(STEPS):
            self.rnd.choice(steps)()
        self.others = [self.guest_interrupt, self.backend_take, self.backend_complete]  # no new request
        for _ in range(20 * STEPS):
            if self.r.kicks():
                self.backend_kick = True
            if self.guest_kick:
                self.daemon_kick()
            elif self.backend_kick:
                self.backend_take()
            elif self.taken:
                self.backend_complete()
            elif self.call:
                self.daemon_call()
            elif self.irq:
                self.guest_interrupt()
            else:
                return
        raise AssertionError("notifications still pending after the drain's bound")


@pytest.mark.parametrize("kicks_when_idle", [False, True], ids=["kicks", "kicks_when_idle"])
@pytest.mark.parametrize("pool", [1 << 20, 6 * 4096], ids=["pool", "tight_pool"])
@pytest.mark.parametrize("num", [128, 64], ids=["ring128", "ring64"])
@pytest.mark.parametrize("features", [EVENT_IDX | INDIRECT, EVENT_IDX, INDIRECT, 0],
                         ids=["event_idx+indirect", "event_idx", "indirect", "flags"])
def test_every_request_completes_once_nothing_is_pending(features: int, num: int, pool: int,
                                                         kicks_when_idle: bool) -> None:
    stuck = []
    for seed in range(20):
        run = _Interleaving(seed, features, num, pool, kicks_when_idle)
        try:
            run.run()
            if run.outstanding:
                stuck.append((seed, run.outstanding, run.r.dp.inflight(0), run.r.dp.held_queues))
            assert run.r.dp.broken(0) is None and not run.r.errors
        finally:
            run.r.close()
    assert not stuck, f"(seed, requests outstanding, in flight, held queues) with nothing pending: {stuck}"


@pytest.mark.parametrize("features", [EVENT_IDX | INDIRECT, INDIRECT], ids=["event_idx", "no_notify_flag"])
@pytest.mark.parametrize(("device", "when_idle"), [("type=blk", True), ("type=net", False)])
def test_a_busy_blk_queue_asks_no_kick_and_each_call_takes_what_the_guest_added(rig, features, device, when_idle):
    """On Xen a kick is a QueueNotify write the guest's vCPU waits on until the daemon answers (in
    the real-Xen bench, fio's submission time at QD32 was the whole phase: one kick per request).
    A blk queue with chains in flight leaves kicks off (virtio 1.2 §2.7.10: avail_event left
    behind, or VIRTQ_USED_F_NO_NOTIFY) and the back-end's next call takes what the guest added;
    with nothing in flight kicks are asked for again. Other types keep a kick per pass (their
    back-end may hold a chain until a later one comes: a receive buffer, a FUSE request)."""
    r = rig(num=16, features=features, make=_chosen_shadow(device))
    assert r.dp.kicks_when_idle is when_idle
    drv = r.drivers[0]

    def add(name: str) -> bool:
        drv.add([r.buf(name.encode() * 8)], [r.buf(8)], token=name)
        return drv.kick_needed()

    assert add("a")
    r.dp.notify(0)
    assert r.kicks() == 1 and r.dp.inflight(0) == 1
    if not when_idle:
        assert add("b")  # a kick per pass, as before
        return
    assert not add("b") and not add("c")  # "a" in flight: no QueueNotify for these
    assert r.serve() == 1  # "a" completes; its call takes "b" and "c" to the back-end
    assert r.dp.used(0) is True
    assert r.dp.inflight(0) == 2 and r.kicks() == 1
    assert [t for t, _ in drv.get_used()] == ["a"]
    assert r.serve() == 2
    r.dp.used(0)
    assert sorted(t for t, _ in drv.get_used()) == ["b", "c"] and r.dp.inflight(0) == 0
    assert add("d")  # nothing in flight: kicks are asked for again
    r.dp.notify(0)
    assert r.kicks() == 1 and r.dp.inflight(0) == 1
