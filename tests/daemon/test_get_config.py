"""GET_CONFIG as a front-end with per-device tables sends it: one request of the size the device
type's config struct has with the features the back-end offers, seen on the wire (the library's
vhost-user-dump relay between the daemon's device and an unmodified qemu-storage-daemon).
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct

import pytest

from vhost_user import AsyncFrontend
from vhost_user.trace import Tracer
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.devtypes import lookup
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import FdExport

BASE, IRQ, TIMEOUT = 0x0200_0000, 33, 25.0
DISK = 4 << 20
_GET_CONFIG = re.compile(r"(F->B|B->F) GET_CONFIG\(24\) .*size=(\d+)")


async def probe_through_the_tracer(peers, device_id: int) -> tuple[bytes, list[tuple[str, int]], int]:
    """Start a device of ``device_id`` on qemu-storage-daemon through the tracer: (the config the
    guest would see, the GET_CONFIG messages (direction, payload size), the back-end's features)."""
    qsd = peers.qsd_raw(size=DISK)
    front = peers.sock_path(f"trace{device_id}.sock")
    lines: list[str] = []
    tracer = Tracer(front, qsd.sock, emit=lines.append)
    tracer.start_listening()
    serving = asyncio.create_task(tracer.serve(connections=1))
    device = Device(DeviceConfig(devid=0, device_id=device_id, base=BASE, irq=IRQ), connect=lambda: AsyncFrontend.connect(str(front)),
                    memory=FdExport([]), set_irq=lambda level: None, log=device_logger("xvm.test", 1, "cfg"))
    try:
        async with asyncio.timeout(TIMEOUT):
            await device.start()
            assert device.model is not None and device.frontend is not None
            config, features = bytes(device.model.config), device.frontend.features
            await device.close()
            await serving  # the session ended: every message is in the trace
    finally:
        await device.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert features is not None
    return config, [(m[1], int(m[2])) for line in lines if (m := _GET_CONFIG.search(line))], features


@pytest.mark.peer
@pytest.mark.asyncio
async def test_blk_config_is_one_get_config_of_the_virtio_blk_config_size(peers):
    """qemu-storage-daemon 7.2 offers DISCARD and WRITE_ZEROES: struct virtio_blk_config up to
    write_zeroes_may_unmap and its padding, 60 bytes (hw/block/virtio-blk-common.c), asked once
    and answered (a VhostUserConfig payload is 12 bytes of header, then the config)."""
    config, messages, features = await probe_through_the_tracer(peers, 2)
    blk = lookup(2)
    assert blk is not None and blk.config_size(features) == 60
    assert messages == [("F->B", 12 + 60), ("B->F", 12 + 60)]
    assert len(config) == 60 and struct.unpack_from("<Q", config)[0] == DISK // 512  # capacity in sectors


@pytest.mark.peer
@pytest.mark.asyncio
async def test_a_type_without_an_entry_or_refused_at_its_size_falls_back_to_the_search(peers, caplog):
    """A device id the table does not know: the size the back-end accepts is searched for, as
    before. A known type whose size the back-end refuses (qemu-storage-daemon serving a device
    declared as virtio-input, 136 bytes): logged, then the same search."""
    caplog.set_level(logging.WARNING)
    unknown, messages, _ = await probe_through_the_tracer(peers, 0xEE)
    asked = [size for way, size in messages if way == "F->B"]
    assert len(asked) == 8 and len(unknown) >= 60
    config, messages, _ = await probe_through_the_tracer(peers, 18)
    asked = [size for way, size in messages if way == "F->B"]
    assert asked[0] == 12 + 136 and len(asked) == 9 and config == unknown
    assert any("GET_CONFIG of 136 bytes (the input config struct) refused" in r.getMessage() for r in caplog.records)
