"""A device whose back-end was replaced while its rings ran: what the next stop asks of the new
back-end (no simulator: recording back-ends over socketpairs, RAM in a memfd)."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from vhost_user import AsyncFrontend, FrontendRequest
from vhost_user.testing import connected_pair
from vhost_user.testing.dummy_backend import DummyBackend
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_mmio import Reg

from tests.daemon.test_faults import RAM_BASE, RAM_SIZE, _bring_up, ram_memfd  # noqa: F401  (fixture)

TIMEOUT = 20.0


@pytest.mark.asyncio
async def test_a_queue_resumed_on_a_new_backend_is_stopped_once_when_the_guest_resets(no_fd_leak, ram_memfd):
    """The back-end goes away with queue 0 running; the device reconnects to a new one and resumes
    the queue there; the guest's driver then resets the device. The new back-end is asked for the
    queue's base once (QEMU's stop: one GET_VRING_BASE per started vring). A second one, for a
    vring already stopped, ends the C virtiofsd, whose queue thread is gone by then."""
    backends: list[DummyBackend] = []
    async with contextlib.AsyncExitStack() as stack:
        async def connect() -> AsyncFrontend:
            backend = DummyBackend(num_queues=1)
            fe, _server = await stack.enter_async_context(connected_pair(backend))
            backends.append(backend)
            return fe

        def read_guest(gpa: int, size: int) -> bytes:  # (the resume reads the used index)
            return os.pread(ram_memfd, size, gpa - RAM_BASE)

        memory = FdExport([FdRegion(RAM_BASE, RAM_SIZE, ram_memfd)], read_guest)
        device = Device(DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=64, num_queues=1),
                        connect=connect, memory=memory,
                        set_irq=lambda level: None, log=device_logger("xvm.test.resume", 1, "blk0"))
        async with asyncio.timeout(TIMEOUT):
            await device.start()
            try:
                await _bring_up(device)
                assert device.frontend is not None and device.model is not None and device.model.active
                device.backend_lost("the back-end went away")  # as the connection's on_lost reports it
                reconnecting = device.reconnecting
                assert reconnecting is not None
                await reconnecting
                assert device.stats.reconnects == 1 and len(backends) == 2
                assert backends[1].requests().count(FrontendRequest.SET_VRING_KICK) == 1  # resumed there
                result = device.mmio(Reg.STATUS, 4, True, 0)  # the guest's driver resets the device
                if result is not None:
                    await result
                assert backends[1].requests().count(FrontendRequest.GET_VRING_BASE) == 1, backends[1].requests()
            finally:
                await device.close()
