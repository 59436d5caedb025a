"""libxl's Closing is answered with Closed in a few xenstore round trips.

libxl gives the back-end 10 s to answer Closing (5) with Closed (6) (``xl destroy``, ``xl
block-detach``: tests/sim/test_libxl_handshake.py). On a loaded dom0 every xenstore round trip the
daemon waits for on its way there costs a scheduling delay of xenstored's and one of its own
(tests/xenlab/README.md, "Session 8" and ``closed-in-time``). Counted here on the simulated
xenstored (every request it took, :attr:`SimXenstored.seen`) and at the daemon's client (a request
sent while none of the connection's was awaiting its reply starts a round trip; requests sent
together share one): from the toolstack's Closing to the transaction end that makes Closed visible.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import pytest

from tests.daemon.test_waiting_backend import (
    BASES,
    BE,
    DOMID,
    IRQS,
    TIMEOUT,
    Backend,
    guest_domain,
    guest_of,
    io_check,
    logwatch,  # noqa: F401  (fixture)
    running,
    wait_value,
    xenstore,
)
from xen_vhost_master.ioreq_server import REMOVED_GRACE, IoreqServer
from xen_vhost_master.supervisor import Options
from xen_vhost_master.xen.xenstore import XenbusState, XenstoreClient, XsType
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator
from xen_vhost_sim.xenstored import XsSeen

DETACH_TIMEOUT = 5.0  # libxl's is 10 s
STATE = f"{BE}/0/state"
CLOSING, CLOSED = str(int(XenbusState.CLOSING)).encode(), str(int(XenbusState.CLOSED)).encode()
# From Closing to Closed: the state and online keys read together (one round trip), then a
# transaction: start, the directory's presence read and the Closed write together, commit.
MAX_ROUND_TRIPS = 4
MAX_REQUESTS = 6


@dataclass
class _Sent:
    type: XsType
    path: str
    value: bytes
    round_trip: bool  # the first of a round trip: nothing of this connection was awaiting a reply


def count_round_trips(xs: XenstoreClient) -> list[_Sent]:
    """Record every request ``xs`` sends from now on."""
    sent: list[_Sent] = []
    call = xs._call
    pending = 0

    async def counted(type_: XsType, payload: bytes, *, tx_id: int, path: str = "") -> bytes:
        nonlocal pending
        _, _, value = payload.partition(b"\0")
        sent.append(_Sent(type_, path, value if type_ == XsType.WRITE else b"", pending == 0))
        pending += 1
        try:
            return await call(type_, payload, tx_id=tx_id, path=path)
        finally:
            pending -= 1

    xs._call = counted  # type: ignore[method-assign]
    return sent


def up_to_closed(requests: list[Any]) -> list[Any]:
    """The requests up to the transaction end after the Closed write (StopIteration if there is none)."""
    write = next(i for i, r in enumerate(requests) if r.type == XsType.WRITE and r.path == STATE and r.value == CLOSED)
    end = next(i for i, r in enumerate(requests) if i > write and r.type == XsType.TRANSACTION_END)
    return requests[:end + 1]


def after_closing(seen: list[XsSeen]) -> list[XsSeen]:
    """The requests xenstored took after the toolstack's Closing (the host's write of state 5)."""
    closing = next(i for i, r in enumerate(seen) if r.conn == 0 and r.path == STATE and r.value == CLOSING)
    return seen[closing + 1:]


@pytest.mark.asyncio
async def test_closing_is_answered_with_closed_in_few_xenstore_round_trips(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):  # type: ignore[no-untyped-def]
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    xenstored = sim_host.xenstored
    assert xenstored is not None
    loop = asyncio.get_running_loop()
    try:
        with logwatch() as log:
            async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) \
                    as daemon, guest_of(sim_host) as guest:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                             TIMEOUT)
                await io_check(blk, backend, 1)
                async with xenstore(kernel) as xs:  # the daemon is done with xenstore: Connected written
                    await wait_value(xs, STATE, str(int(XenbusState.CONNECTED)))
                assert daemon.sup.xs is not None
                sent = count_round_trips(daemon.sup.xs)
                mark = len(daemon.notes.messages)
                closed = await loop.run_in_executor(None, lambda: sim_control.xl_detach_virtio_device(
                    DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0, timeout=DETACH_TIMEOUT))
                assert closed, "libxl's detach timed out"
                seen = up_to_closed(after_closing(list(xenstored.seen)))
                assert {r.conn for r in seen} == {seen[-1].conn}  # all of them the daemon's, on one connection
                # the same requests as the daemon sent them: the first starts a round trip
                ours = up_to_closed(sent)[-len(seen):]
                assert [r.type for r in ours] == [r.type for r in seen]
                trips = 1 + sum(r.round_trip for r in ours[1:])
                what = ", ".join(f"{XsType(r.type).name} {r.path}" for r in seen)
                print(f"Closing to Closed: {len(seen)} xenstore request(s), {trips} round trip(s): {what}")
                assert trips <= MAX_ROUND_TRIPS, what
                assert len(seen) <= MAX_REQUESTS, what
                assert f"dom{DOMID}: device 0: toolstack closing (state 5): tearing it down" in log.lines
                await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
                with pytest.raises(GuestDriverError):  # (the device is gone)
                    await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        await backend.stop()


@pytest.mark.asyncio
async def test_closed_is_written_before_the_removed_window_s_grace(
        no_fd_leak, platform, sim_host, sim_control, sim_dir, monkeypatch):  # type: ignore[no-untyped-def]
    """The window of a going device stays claimed for REMOVED_GRACE after its line was lowered
    (a guest's interrupt handler in flight finds it): libxl need not wait for that."""
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    order: list[str] = []
    grace = IoreqServer.remove_window_after_grace

    async def recorded_grace(self: IoreqServer, base: int, seconds: float = REMOVED_GRACE) -> None:
        order.append("grace")
        await grace(self, base, seconds)

    monkeypatch.setattr(IoreqServer, "remove_window_after_grace", recorded_grace)
    try:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"))) \
                as daemon, guest_of(sim_host) as guest:
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                         TIMEOUT)
            await io_check(blk, backend, 1)
            set_state = daemon.sup._set_state

            async def recorded_state(served: Any, state: XenbusState) -> None:
                await set_state(served, state)
                order.append(state.name)

            daemon.sup._set_state = recorded_state  # type: ignore[method-assign]
            mark = len(daemon.notes.messages)
            closed = await asyncio.get_running_loop().run_in_executor(None, lambda: sim_control.xl_detach_virtio_device(
                DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0, timeout=DETACH_TIMEOUT))
            assert closed, "libxl's detach timed out"
            await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
            assert order == ["CLOSED", "grace"]
            with pytest.raises(GuestDriverError):
                await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        await backend.stop()
