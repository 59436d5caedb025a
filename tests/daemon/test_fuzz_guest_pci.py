"""Fuzz a virtio-pci function's guest-facing surface, as tests/daemon/test_fuzz_guest.py does for
virtio-mmio: random configuration-space and BAR accesses (any offset, size, value) mixed with
valid-looking bring-ups whose BAR address and queue parameters are random, against a Device
connected to a real back-end (the project's RAM disk) over a socketpair.

Invariants: nothing escapes, reads fit their size, the BAR is never claimed over guest RAM and the
claim follows the model, a started back-end only gets rings inside guest RAM, MSIs go out only
while MSI-X is enabled, and no guest access breaks the vhost-user connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user.testing import RamDiskBlk, connected_pair
from xen_vhost_master.config import parse_device_arg
from xen_vhost_master.datapath.zerocopy import FdExport, FdRegion
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger
from xen_vhost_master.virtio_pci import Common, VirtioPciDevice

RAM_BASE, RAM_SIZE = 0, 4 << 20
EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "150"))

cfg_access = st.tuples(st.just("cfg"), st.one_of(st.integers(0, 0x100), st.sampled_from([0x04, 0x10, 0x14, 0x9A])),
                       st.sampled_from([1, 2, 4, 3]), st.booleans(), st.integers(0, 2**32 - 1))
bar_access = st.tuples(st.just("bar"), st.one_of(st.integers(0, 0x8000), st.integers(0, 0x3F)),
                       st.sampled_from([1, 2, 4, 8, 3]), st.booleans(), st.integers(0, 2**64 - 1))
addresses = st.one_of(st.integers(RAM_BASE, RAM_BASE + RAM_SIZE + 0x1000), st.integers(0, 2**64 - 1))
bring_up = st.tuples(
    st.just("bring_up"),
    st.sampled_from([0xF000_0000, 0x1000, 0x10_0000_0000, 0xFFFF_FFFF_FFFF_8000]),  # BAR address
    st.sampled_from([0, 1, 3, 64, 256, 1024]),  # queue size
    st.lists(addresses, min_size=3, max_size=3),  # desc, driver, device
    st.integers(0, 2**64 - 1),  # driver features
    st.booleans(),  # MSI-X
)
programs = st.lists(st.one_of(cfg_access, bar_access, bring_up, st.just(("notify",)), st.just(("used",))), max_size=40)


class Guest:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.bar: int | None = None
        self.msis = 0

    async def do(self, cfg: bool, offset: int, size: int, is_write: bool, value: int) -> int | None:
        if cfg:
            result = self.device.pci_config(offset, size, is_write, value)
        else:
            result = self.device.mmio(offset, size, is_write, value)
        if isinstance(result, Awaitable):
            result = await result
        if not is_write:
            assert result is not None and 0 <= result < 1 << (8 * size)
        return result


async def run(guest: Guest, program: list[tuple]) -> None:  # type: ignore[type-arg]
    device = guest.device
    for op in program:
        if op[0] in ("cfg", "bar"):
            await guest.do(op[0] == "cfg", op[1], op[2], op[3], op[4])
        elif op[0] == "bring_up":
            _, bar, num, (desc, driver, dev), features, msix = op
            await guest.do(True, 0x04, 2, True, 0)
            await guest.do(True, 0x10, 4, True, bar & 0xFFFFFFFF)
            await guest.do(True, 0x14, 4, True, bar >> 32)
            await guest.do(True, 0x04, 2, True, 0x6)
            if msix:
                model = device.model
                assert isinstance(model, VirtioPciDevice)
                for v in range(model.vectors):
                    await guest.do(False, model.layout.msix_table + 16 * v, 4, True, 0xFEE0_0000)
                    await guest.do(False, model.layout.msix_table + 16 * v + 8, 4, True, 0x30 + v)
                    await guest.do(False, model.layout.msix_table + 16 * v + 12, 4, True, 0)
                await guest.do(True, model.layout.cap_msix + 2, 2, True, 0x8000)
            for value in (0, 1, 3):
                await guest.do(False, Common.DEVICE_STATUS, 1, True, value)
            for sel in (0, 1):
                await guest.do(False, Common.DRIVER_FEATURE_SELECT, 4, True, sel)
                await guest.do(False, Common.DRIVER_FEATURE, 4, True, (features | 1 << 32) >> (32 * sel) & 0xFFFFFFFF)
            await guest.do(False, Common.DEVICE_STATUS, 1, True, 11)
            await guest.do(False, Common.MSIX_CONFIG, 2, True, 0)
            await guest.do(False, Common.QUEUE_SELECT, 2, True, 0)
            await guest.do(False, Common.QUEUE_SIZE, 2, True, num)
            for reg, addr in ((Common.QUEUE_DESC, desc), (Common.QUEUE_DRIVER, driver), (Common.QUEUE_DEVICE, dev)):
                await guest.do(False, reg, 4, True, addr & 0xFFFFFFFF)
                await guest.do(False, reg + 4, 4, True, addr >> 32)
            await guest.do(False, Common.QUEUE_MSIX_VECTOR, 2, True, 1)
            await guest.do(False, Common.QUEUE_ENABLE, 2, True, 1)
            await guest.do(False, Common.DEVICE_STATUS, 1, True, 15)
        elif op[0] == "notify":
            model = device.model
            assert isinstance(model, VirtioPciDevice)
            await guest.do(False, model.layout.notify, 2, True, 0)
        else:  # the back-end signals queue 0 (its call eventfd fires)
            os.eventfd_write(device._call[0], 1)
            device._on_call(0)
        model = device.model
        assert isinstance(model, VirtioPciDevice)
        assert device.frontend is not None and not device.frontend.broken
        assert guest.bar == model.decoding
        if guest.bar is not None:
            assert not guest.bar < RAM_BASE + RAM_SIZE  # never over guest RAM (which starts at 0)
        assert model.intx == (model.interrupt_status != 0 and not model.msix_enabled and not model.command & 0x400)
        if model.active:
            for q in device._queues:
                assert model._in_ram(q.desc, 16 * q.num) and q.num and not q.num & (q.num - 1)


async def fuzz_once(program: list[tuple]) -> None:  # type: ignore[type-arg]
    memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, RAM_SIZE)
    try:
        async with connected_pair(RamDiskBlk(1 << 20)) as (fe, _server):
            guest: Guest

            def on_bar(address: int | None, size: int) -> None:
                guest.bar = address

            def msi(address: int, data: int) -> None:
                model = guest.device.model
                assert isinstance(model, VirtioPciDevice) and model.msix_enabled
                guest.msis += 1

            device = Device(
                parse_device_arg("type=blk,transport=pci,bdf=00:08.0,queues=2,queue-size=256"),
                connect=lambda: _ready(fe), memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)]),
                set_irq=lambda level: None, log=device_logger("xvm.fuzz", 1, "pci0"),
                inject_msi=msi, on_bar=on_bar,
            )
            guest = Guest(device)
            await device.start()
            try:
                await asyncio.wait_for(run(guest, program), 30)
            finally:
                await device.close()
    finally:
        os.close(memfd)


async def _ready(fe):  # type: ignore[no-untyped-def]
    return fe


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_random_guest_programs_never_break_the_function_or_its_back_end(program):
    asyncio.run(fuzz_once(program))


def test_a_valid_bring_up_starts_the_back_end():
    """The fuzz's bring-up macro is able to start the device and interrupt by MSI-X."""

    async def main() -> None:
        memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(memfd, RAM_SIZE)
        try:
            async with connected_pair(RamDiskBlk(1 << 20)) as (fe, _server):
                msis: list[tuple[int, int]] = []
                bars: list[int | None] = []
                device = Device(
                    parse_device_arg("type=blk,transport=pci,bdf=00:08.0,queues=2"),
                    connect=lambda: _ready(fe), memory=FdExport([FdRegion(RAM_BASE, RAM_SIZE, memfd)]),
                    set_irq=lambda level: None, log=device_logger("xvm.fuzz", 1, "pci0"),
                    inject_msi=lambda a, d: msis.append((a, d)),
                    on_bar=lambda a, s: (bars.append(a), setattr(guest, "bar", a)),
                )
                guest = Guest(device)
                await device.start()
                await run(guest, [("bring_up", 0xF000_0000, 64, [0x1000, 0x2000, 0x3000], 0, True), ("used",)])
                assert bars == [0xF000_0000] and isinstance(device.model, VirtioPciDevice) and device.model.active
                assert device.stats.starts == 1 and msis == [(0xFEE0_0000, 0x31)]
                await device.close()
        finally:
            os.close(memfd)

    asyncio.run(main())
