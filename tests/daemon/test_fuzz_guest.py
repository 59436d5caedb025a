"""Fuzz the guest-facing surface of a device: random register accesses (any offset, size, value)
mixed with valid-looking bring-ups whose queue parameters are random, against a Device connected to
a real back-end (the project's RAM disk) over a socketpair.

Invariants: nothing escapes but what the device is allowed to raise (nothing), the interrupt line
always equals "InterruptStatus != 0", a started back-end only ever gets rings inside guest RAM,
and no guest access can break the vhost-user connection. ``make fuzz`` runs it with many more
examples (HYPOTHESIS_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user.testing import RamDiskBlk, connected_pair
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.virtio_mmio import Reg, Status

RAM_BASE, RAM_SIZE = 0x4000_0000, 4 << 20
EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "150"))

registers = st.one_of(st.sampled_from([int(r) for r in Reg]), st.integers(0, 0x1FF))
access = st.tuples(st.just("access"), registers, st.sampled_from([1, 2, 4, 8, 3]), st.booleans(), st.integers(0, 2**64 - 1))
addresses = st.one_of(st.integers(RAM_BASE - 0x1000, RAM_BASE + RAM_SIZE + 0x1000), st.integers(0, 2**64 - 1))
bring_up = st.tuples(
    st.just("bring_up"),
    st.sampled_from([0, 1, 3, 64, 256, 1024]),  # queue size
    st.lists(addresses, min_size=3, max_size=3),  # desc, driver, device
    st.integers(0, 2**64 - 1),  # driver features
    st.integers(0, 3),  # queue index
)
programs = st.lists(st.one_of(access, bring_up, st.just(("notify",)), st.just(("used",))), max_size=40)


async def run(device: Device, program: list[tuple]) -> None:  # type: ignore[type-arg]
    async def do(offset: int, size: int, is_write: bool, value: int) -> None:
        result = device.mmio(offset, size, is_write, value)
        if isinstance(result, Awaitable):
            result = await result
        if not is_write:
            assert result is not None and 0 <= result < 2**64

    for op in program:
        if op[0] == "access":
            await do(op[1], op[2], op[3], op[4])
        elif op[0] == "bring_up":
            _, num, (desc, driver, dev), features, index = op
            for value in (0, 1, 3):
                await do(Reg.STATUS, 4, True, value)
            for sel in (0, 1):
                await do(Reg.DRIVER_FEATURES_SEL, 4, True, sel)
                await do(Reg.DRIVER_FEATURES, 4, True, (features | 1 << 32) >> (32 * sel) & 0xFFFFFFFF)
            await do(Reg.STATUS, 4, True, 11)
            await do(Reg.QUEUE_SEL, 4, True, index)
            await do(Reg.QUEUE_NUM, 4, True, num)
            for reg, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, driver), (Reg.QUEUE_DEVICE_LOW, dev)):
                await do(reg, 4, True, addr & 0xFFFFFFFF)
                await do(reg + 4, 4, True, addr >> 32)
            await do(Reg.QUEUE_READY, 4, True, 1)
            await do(Reg.STATUS, 4, True, 15)
        elif op[0] == "notify":
            await do(Reg.QUEUE_NOTIFY, 4, True, 0)
        else:  # the back-end signals queue 0 (its call eventfd fires)
            os.eventfd_write(device._call[0], 1)
            device._on_call(0)
        model = device.model
        assert model is not None
        assert model.line == (model.interrupt_status != 0)
        assert device.frontend is not None and not device.frontend.broken
        if model.active:
            for q in device._queues:
                assert model._in_ram(q.desc, 16 * q.num) and q.num and not q.num & (q.num - 1)


async def fuzz_once(program: list[tuple]) -> None:  # type: ignore[type-arg]
    memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, RAM_SIZE)
    try:
        async with connected_pair(RamDiskBlk(1 << 20)) as (fe, _server):
            device = Device(
                DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, queue_size=256, num_queues=2),
                connect=lambda: _ready(fe), memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)]),
                set_irq=lambda level: None, log=device_logger("xvm.fuzz", 1, "blk0"),
            )
            await device.start()
            try:
                await asyncio.wait_for(run(device, program), 30)
            finally:
                await device.close()
    finally:
        os.close(memfd)


async def _ready(fe):  # type: ignore[no-untyped-def]
    return fe


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_random_guest_programs_never_break_the_device_or_its_back_end(program):
    asyncio.run(fuzz_once(program))


def test_a_valid_bring_up_starts_the_back_end():
    """The fuzz's bring-up macro is able to start the device (so the invariants above are reached)."""

    async def main() -> None:
        memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(memfd, RAM_SIZE)
        try:
            async with connected_pair(RamDiskBlk(1 << 20)) as (fe, server):
                device = Device(
                    DeviceConfig(devid=0, device_id=2, base=0x2000000, irq=33, num_queues=2),
                    connect=lambda: _ready(fe), memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)]),
                    set_irq=lambda level: None, log=device_logger("xvm.fuzz", 1, "blk0"),
                )
                await device.start()
                await run(device, [("bring_up", 64, [RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000], 0, 0)])
                assert device.model is not None and device.model.status & Status.DRIVER_OK and device.model.active
                assert device.stats.starts == 1
                await device.close()
        finally:
            os.close(memfd)

    asyncio.run(main())
