"""A removed device answers libxl's Closing before the daemon unmaps the guest's RAM.

libxl gives the back-end 10 s to answer Closing with Closed (``xl destroy``, ``xl block-detach``:
tests/sim/test_libxl_handshake.py). A shadow path's instance maps all of the guest's RAM, and on
real Xen unmapping it takes a hypercall per page: on Xen 4.20 under TCG a net guest's instance
wrote Closed 10.6 s after libxl's Closing, the device itself gone 0.7 s after it was retired
(tests/xenlab/README.md). Here the unmap is held until the toolstack's detach has returned: the
detach sees Closed only if it is written before the unmap.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from tests.daemon.test_waiting_backend import (  # noqa: F401  (logwatch: a fixture)
    BASES,
    BE,
    DOMID,
    IRQS,
    TIMEOUT,
    Backend,
    guest_domain,
    guest_of,
    io_check,
    logwatch,
    running,
    xenstore,
)
from xen_vhost_master.config import DeviceConfig, MemoryMode
from xen_vhost_master.supervisor import Options
from xen_vhost_master.xen.xenstore import XenbusState
from xen_vhost_sim.guest_devices import VirtioBlk
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator

DETACH_TIMEOUT = 5.0  # libxl's is 10 s; the fixed order answers in well under a second of daemon work


@pytest.mark.asyncio
async def test_removed_shadow_device_is_closed_before_guest_ram_is_unmapped(
        no_fd_leak, platform, sim_host, sim_control, sim_dir):  # type: ignore[no-untyped-def]
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    detached = threading.Event()
    unmap_calls: list[bool] = []
    try:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"),
                                             memory=MemoryMode.SHADOW)) as daemon, guest_of(sim_host) as guest:
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                         TIMEOUT)
            await io_check(blk, backend, 1)
            assert daemon.device(0)["data_path"] == "shadow"
            paths = daemon.sup._paths
            assert paths is not None and paths.guest_memory is not None  # the daemon maps the guest's RAM
            release = paths.release_guest_memory

            def slow_release(in_use: Sequence[object]) -> bool:
                # as slow as real Xen's unmap, for as long as the toolstack waits (blocking, as munmap is)
                detached.wait(2 * TIMEOUT)
                unmapped = release(in_use)  # type: ignore[arg-type]
                unmap_calls.append(unmapped)
                return unmapped

            paths.release_guest_memory = slow_release  # type: ignore[method-assign]

            def detach() -> bool:
                try:
                    return sim_control.xl_detach_virtio_device(DOMID, device_id=2, base=BASES[0], irq=IRQS[0], devid=0,
                                                               timeout=DETACH_TIMEOUT)
                finally:
                    detached.set()

            mark = len(daemon.notes.messages)
            closed = await asyncio.get_running_loop().run_in_executor(None, detach)
            assert closed, "libxl's detach timed out: Closed came after the guest's RAM was unmapped"
            await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
            assert unmap_calls == [True]  # unmapped once Closed was written, all the same
            assert paths.guest_memory is None
            with pytest.raises(GuestDriverError, match="did not complete its reset"):  # (the device is gone)
                await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        detached.set()
        await backend.stop()


@pytest.mark.asyncio
async def test_guest_ram_is_unmapped_even_when_the_closed_write_is_cancelled(
        no_fd_leak, platform, sim_host, sim_control, sim_dir):  # type: ignore[no-untyped-def]
    """The removal is cancelled while it writes Closed (the watcher that started it reaped as the
    domain goes, or a teardown step's bound): the guest's pages are unmapped all the same, since
    Xen cannot finish destroying a domain whose pages dom0 still maps."""
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    released = threading.Event()
    try:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"),
                                             memory=MemoryMode.SHADOW)) as daemon, guest_of(sim_host) as guest:
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                         TIMEOUT)
            await io_check(blk, backend, 1)
            sup = daemon.sup
            paths = sup._paths
            assert paths is not None and paths.guest_memory is not None
            release, set_state = paths.release_guest_memory, sup._set_state

            def watched_release(in_use: Sequence[object]) -> bool:
                unmapped = release(in_use)  # type: ignore[arg-type]
                released.set()
                return unmapped

            async def cancelled_closed(served: Any, state: XenbusState) -> None:
                if state == XenbusState.CLOSED:
                    raise asyncio.CancelledError
                await set_state(served, state)

            paths.release_guest_memory = watched_release  # type: ignore[method-assign]
            sup._set_state = cancelled_closed  # type: ignore[method-assign]
            detach = asyncio.get_running_loop().run_in_executor(
                None, lambda: sim_control.xl_detach_virtio_device(DOMID, device_id=2, base=BASES[0], irq=IRQS[0],
                                                                  devid=0, timeout=DETACH_TIMEOUT))
            got = await asyncio.get_running_loop().run_in_executor(None, released.wait, TIMEOUT)
            assert got, "the guest's RAM stayed mapped after a cancelled Closed"
            assert paths.guest_memory is None
            await detach  # (libxl's detach times out: no Closed was written)
            with pytest.raises(GuestDriverError):
                await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        released.set()
        await backend.stop()


@pytest.mark.asyncio
async def test_a_configured_device_the_toolstack_closes_is_closed(
        no_fd_leak, platform, sim_host, sim_control, sim_dir):  # type: ignore[no-untyped-def]
    """A device the operator's configuration describes (a TOML file's ``grants = true`` for Xen
    4.17, whose libxl writes no grant_usage key) is also libxl's, through the xenstore directory it
    was matched with: the toolstack's Closing removes it like any discovered device. On real Xen
    4.17 such a grant guest's `xl destroy` waited libxl's 10 s for a Closed that never came
    (tests/xenlab/README.md, closed-in-time)."""
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    configured = DeviceConfig(devid=5, device_id=2, base=BASES[0], irq=IRQS[0], source="config")
    try:
        async with running(platform, Options(domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"),
                                             devices=(configured,))) as daemon, guest_of(sim_host) as guest:
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0], GuestPageAllocator(guest.ram)),
                                         TIMEOUT)
            await io_check(blk, backend, 1)  # (served as the discovered devid 0: socket 0.sock)
            mark = len(daemon.notes.messages)
            closed = await asyncio.get_running_loop().run_in_executor(
                None, lambda: sim_control.xl_detach_virtio_device(DOMID, device_id=2, base=BASES[0], irq=IRQS[0],
                                                                  devid=0, timeout=DETACH_TIMEOUT))
            assert closed, "libxl's detach timed out: the configured device never answered Closing"
            await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
            with pytest.raises(GuestDriverError):  # (the device is gone)
                await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        await backend.stop()


@pytest.mark.asyncio
async def test_a_configured_device_whose_directory_turns_malformed_is_kept_until_the_toolstack_closes_it(
        no_fd_leak, platform, sim_host, sim_control, kernel, sim_dir, logwatch):  # type: ignore[no-untyped-def]
    """While the directory a configured device was matched with is one the daemon cannot parse,
    the configuration serves the device on (a discovered device would go); libxl's Closing still
    removes it."""
    guest_domain(sim_control)
    backend = Backend(os.path.join(sim_dir, "0.sock"))
    await backend.start()
    configured = DeviceConfig(devid=5, device_id=2, base=BASES[0], irq=IRQS[0], source="config")
    try:
        with logwatch() as log:
            async with xenstore(kernel) as xs, running(platform, Options(
                    domid=DOMID, socket_template=os.path.join(sim_dir, "{devid}.sock"),
                    devices=(configured,))) as daemon, guest_of(sim_host) as guest:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASES[0], IRQS[0],
                                                              GuestPageAllocator(guest.ram)), TIMEOUT)
                await io_check(blk, backend, 1)
                await xs.write(f"{BE}/0/base", "banana")
                await log.wait_for(lambda line: "skipping device" in line and "banana" in line)
                await xs.write(f"{BE}/0/state", str(int(XenbusState.CONNECTED)))  # (an event on its own key)
                await io_check(blk, backend, 2)  # still served
                assert daemon.sup.devices[BASES[0]].backend == "connected"
                assert not any("tearing it down" in line for line in log.lines)
                mark = len(daemon.notes.messages)
                closed = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: sim_control.xl_detach_virtio_device(DOMID, device_id=2, base=BASES[0], irq=IRQS[0],
                                                                      devid=0, timeout=DETACH_TIMEOUT))
                assert closed, "libxl's detach timed out"
                await daemon.notes.status_says(f"dom{DOMID}: 0 device(s) serving, 0 waiting", after=mark)
                with pytest.raises(GuestDriverError):
                    await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        await backend.stop()
