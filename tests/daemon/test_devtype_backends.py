"""Device-type policy with the library's Python back-end (``vhost_user.testing``) standing in for
back-ends no Debian package offers: vsock's guest CID (rust-vmm vhost-device-vsock), and a type
the table does not know. The guest reads the config through the device's virtio-mmio window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import pytest

from vhost_user import AsyncFrontend, ProtocolFeatures
from vhost_user.aio.device import DEFAULT_BACKEND_PROTOCOL_FEATURES
from vhost_user.testing import connected_pair
from vhost_user.testing.dummy_backend import DummyBackend
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.datapath.zerocopy import FdExport
from xen_vhost_master.device import Device
from xen_vhost_master.log import device_logger

TIMEOUT = 20.0
CONFIG_SPACE = 0x100  # virtio 1.2 §4.2.2: the device-specific config starts at offset 0x100
VSOCK, UNKNOWN = 19, 0xEE
NO_CONFIG = DEFAULT_BACKEND_PROTOCOL_FEATURES & ~ProtocolFeatures.CONFIG


@contextlib.asynccontextmanager
async def device_on(backends: list[DummyBackend], *, device_id: int,
                    cid: int | None = None, **backend_kw: object):  # type: ignore[no-untyped-def]
    """A started device of ``device_id`` whose every connection is a new DummyBackend(**backend_kw)."""
    async with contextlib.AsyncExitStack() as stack:
        async def connect() -> AsyncFrontend:
            backend = DummyBackend(num_queues=1, **backend_kw)  # type: ignore[arg-type]
            fe, _server = await stack.enter_async_context(connected_pair(backend))
            backends.append(backend)
            return fe

        device = Device(DeviceConfig(devid=0, device_id=device_id, base=0x2000000, irq=33, queue_size=64,
                                     num_queues=1, cid=cid),
                        connect=connect, memory=FdExport([]), set_irq=lambda level: None,
                        log=device_logger("xvm.test.devtype", 1, "dev0"))
        try:
            async with asyncio.timeout(TIMEOUT):
                await device.start()
            yield device
        finally:
            await device.close()


def guest_reads_config(device: Device, size: int) -> bytes:
    """The guest's 32-bit reads of the device's config space (what a driver's virtio_cread does)."""
    out = b""
    for offset in range(0, size, 4):
        value = device.mmio(CONFIG_SPACE + offset, 4, False, 0)
        assert isinstance(value, int)
        out += value.to_bytes(4, "little")
    return out


@pytest.mark.asyncio
async def test_vsock_guest_reads_the_configured_cid_from_a_backend_without_a_config_space(no_fd_leak, caplog):
    """QEMU's vhost-vsock takes guest-cid=; a vhost-user vsock back-end without the CONFIG
    protocol feature leaves it to the front-end: the guest reads ``cid=`` as le64 guest_cid."""
    caplog.set_level(logging.INFO)
    backends: list[DummyBackend] = []
    async with device_on(backends, device_id=VSOCK, cid=0x1_2345, protocol_features=NO_CONFIG) as device:
        assert guest_reads_config(device, 8) == struct.pack("<Q", 0x1_2345)
    assert backends and not any(r.request.name == "GET_CONFIG" for r in backends[0].log)
    assert any("daemon serves the guest's, CID 74565" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_vsock_backend_with_a_config_space_answers_the_cid_itself_and_a_different_cid_is_logged(
        no_fd_leak, caplog):
    """vhost-device-vsock answers GET_CONFIG with the CID it was started with (--guest-cid): it
    routes by that one, so the guest gets it; a different ``cid=`` is a warning. A back-end with
    neither is a warning too (the guest would read CID 0, reserved)."""
    caplog.set_level(logging.INFO)
    backends: list[DummyBackend] = []
    async with device_on(backends, device_id=VSOCK, cid=5, config=struct.pack("<Q", 7)) as device:
        assert guest_reads_config(device, 8) == struct.pack("<Q", 7)
    assert any("cid=5 configured, the back-end's config says 7" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with device_on(backends, device_id=VSOCK, protocol_features=NO_CONFIG) as device:
        assert guest_reads_config(device, 8) == bytes(8)
    assert any("no cid= configured: the guest reads CID 0" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_an_unknown_type_passes_as_offered_and_is_logged_once_across_reconnects(no_fd_leak, caplog):
    """A device id without a table entry: the back-end's feature bits and config reach the guest
    as they are, and one line says so, not one per back-end connection."""
    caplog.set_level(logging.INFO)
    backends: list[DummyBackend] = []
    features = (1 << 32) | (1 << 17) | (1 << 22)  # bits net would withhold: no entry, so they pass
    config = bytes(range(64))
    async with device_on(backends, device_id=UNKNOWN, features=features, config=config) as device:
        assert device.model is not None and device.model.device_features & features == features
        assert guest_reads_config(device, 64) == config
        for n in (2, 3):
            device.backend_lost("the back-end went away")  # as the connection's on_lost reports it
            reconnecting = device.reconnecting
            assert reconnecting is not None
            async with asyncio.timeout(TIMEOUT):
                await reconnecting
            assert len(backends) == n
    said = [r for r in caplog.records if "has no entry in the device-type table" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
