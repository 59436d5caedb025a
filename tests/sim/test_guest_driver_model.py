"""Cross-check: the spec-following guest driver against the daemon's own pure virtio-mmio model.

Two independent readings of virtio 1.2 §4.2 meet here: ``sim.guest_driver`` (the guest) drives
``xen_vhost_master.virtio_mmio.VirtioMmioDevice`` (what the daemon emulates), whose actions (line
level, notify, activate, reset) are carried out by a small adapter with ``SplitQueueDevice`` rings and
the RAM disk of ``test_guest_driver``.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from test_guest_driver import BASE, IRQ, Disk, FakeBus, blk_config

from vhost_user.virtqueue import SplitQueueDevice
from xen_vhost_master import virtio_mmio as vm
from xen_vhost_sim.guest_devices import SECTOR_SIZE, BlkFeature, BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import DeviceNeedsReset, Feature, FeaturesRejected, GuestPageAllocator


class ModelAdapter:
    """Carries out the pure model's actions, as the daemon's IOREQ bridge would."""

    def __init__(self, model: vm.VirtioMmioDevice, disk: Disk) -> None:
        self.model = model
        self.disk = disk
        self.bus: FakeBus | None = None
        self.rings: dict[int, SplitQueueDevice] = {}
        self.activations: list[vm.Activate] = []
        self.guest_errors: list[str] = []

    def read(self, off: int, size: int) -> int:
        value, actions = self.model.read(off, size)
        self._apply(actions)
        return value

    def write(self, off: int, size: int, value: int) -> None:
        self._apply(self.model.write(off, size, value))

    def _apply(self, actions: list[vm.Action]) -> None:
        assert self.bus is not None
        for action in actions:
            if isinstance(action, vm.IrqLevel):
                self.bus.set_line(IRQ, action.level)
            elif isinstance(action, vm.Activate):
                self.activations.append(action)
                event_idx = bool(action.features & Feature.RING_EVENT_IDX)
                for q in action.queues:
                    self.rings[q.index] = SplitQueueDevice(self.bus.ram, q.num, q.desc, q.driver, q.device, event_idx=event_idx)
            elif isinstance(action, vm.Reset):
                for ring in self.rings.values():
                    ring.release()
                self.rings.clear()
            elif isinstance(action, vm.Notify):
                self._serve(action.index)
            elif isinstance(action, vm.GuestError):
                self.guest_errors.append(action.reason)

    def _serve(self, index: int) -> None:
        ring = self.rings[index]
        while (chain := ring.pop()) is not None:
            ring.push(chain.head, self.disk.handle(self, index, chain))  # type: ignore[arg-type]
        if ring.needs_notify():
            self._apply(self.model.used_buffer())


def attach_model(bus: FakeBus, features: int, sectors: int = 256) -> ModelAdapter:
    model = vm.VirtioMmioDevice(
        device_id=2, device_features=features, queue_sizes=[64], config=bytes(blk_config(sectors)),
        ram=bus.ram.banks(),
    )
    adapter = ModelAdapter(model, Disk(sectors))
    bus.devices[BASE] = adapter  # type: ignore[assignment]
    adapter.bus = bus
    return adapter


FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | BlkFeature.FLUSH | BlkFeature.BLK_SIZE)


@pytest.mark.asyncio
@pytest.mark.parametrize("sel_order", [(1, 0), (0, 1)])
async def test_guest_driver_and_daemon_model_agree(sel_order: tuple[int, int]) -> None:
    bus = FakeBus()
    adapter = attach_model(bus, FEATURES)
    blk = await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram),
                                 features=FEATURES, queue_size=64, features_sel_order=sel_order)
    try:
        assert len(adapter.activations) == 1
        assert adapter.activations[0].features == FEATURES
        assert blk.capacity == 256
        payloads = [os.urandom(SECTOR_SIZE * (i + 1)) for i in range(8)]
        await blk.batch([BlkOp("write", 16 * i, data=p) for i, p in enumerate(payloads)])
        assert await blk.batch([BlkOp("read", 16 * i, len(p) // SECTOR_SIZE) for i, p in enumerate(payloads)]) == payloads
        await blk.flush()
        assert adapter.disk.flushes == 1
        assert not bus.irq_level(IRQ)
        assert adapter.guest_errors == []  # the driver never did anything the model calls a spec violation
        # A back-end loss as the daemon reports it: NEEDS_RESET + config interrupt.
        adapter._apply(adapter.model.needs_reset("back-end gone"))
        async with asyncio.timeout(5.0):
            await blk.driver.config_changed.wait()
        assert blk.driver.needs_reset
        with pytest.raises(DeviceNeedsReset):
            await blk.read(0, 1)
    finally:
        await blk.close()
    assert adapter.guest_errors == ["back-end gone"]


@pytest.mark.asyncio
async def test_model_refusing_features_is_seen_by_the_driver() -> None:
    bus = FakeBus()
    attach_model(bus, int(BlkFeature.FLUSH))  # no VERSION_1 offered
    with pytest.raises(FeaturesRejected):
        await VirtioBlk.attach(bus, BASE, IRQ, GuestPageAllocator(bus.ram), features=FEATURES)
