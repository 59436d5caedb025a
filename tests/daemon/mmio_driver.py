"""A guest driver's register accesses to a Device's virtio-mmio window (virtio 1.2, 4.2.2 and 4.2.3)."""

from __future__ import annotations

import asyncio

from xen_vhost_master.device import Device
from xen_vhost_master.virtio_mmio import Reg


async def write(device: Device, reg: int, value: int, bound: float | None = None) -> None:
    """A 4-byte guest write; with ``bound``, one not answered by then is a held vCPU: AssertionError."""
    result = device.mmio(reg, 4, True, value)
    if result is None:
        return
    if bound is None:
        await result  # type: ignore[misc]
        return
    try:
        await asyncio.wait_for(result, bound)  # type: ignore[arg-type]
    except TimeoutError as e:
        raise AssertionError(f"guest write of {value:#x} at {reg:#x} held its vCPU {bound} s") from e


def read(device: Device, reg: int) -> int:
    result = device.mmio(reg, 4, False, 0)
    assert isinstance(result, int)
    return result


async def bring_up(device: Device, rings: tuple[int, int, int], num: int, bound: float | None = None) -> None:
    """A driver's bring-up of queue 0 (``num`` entries, its descriptor, driver and device areas at
    ``rings``) by register writes, each bounded by ``bound`` as in write()."""
    for value in (0, 1, 3):
        await write(device, Reg.STATUS, value, bound)
    for sel, value in ((0, 0), (1, 1)):  # VERSION_1
        await write(device, Reg.DRIVER_FEATURES_SEL, sel, bound)
        await write(device, Reg.DRIVER_FEATURES, value, bound)
    await write(device, Reg.STATUS, 11, bound)
    await write(device, Reg.QUEUE_SEL, 0, bound)
    await write(device, Reg.QUEUE_NUM, num, bound)
    for reg, addr in zip((Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW), rings, strict=True):
        await write(device, reg, addr, bound)
        await write(device, reg + 4, 0, bound)
    await write(device, Reg.QUEUE_READY, 1, bound)
    await write(device, Reg.STATUS, 15, bound)
