"""The simulated toolstack: domains and virtio devices appear in xenstore as libxl writes them,
read back through /dev/xen/xenbus of the simulated host; CLI spec parsing."""

from __future__ import annotations

import argparse

import pytest

from xen_vhost_sim.cli import parse_domain_spec, parse_size, parse_virtio_spec
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

WAIT = 5.0


@pytest.mark.asyncio
async def test_domain_and_virtio_device_nodes_through_xenbus(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=64 << 20, name="vm1")
    be = sim_control.add_virtio_device(domid, device_id=2, base=0x2000000, irq=33)
    assert be == f"/local/domain/0/backend/virtio/{domid}/0"
    xs = await XenstoreClient.open(socket_paths=(), timeout=WAIT, opener=kernel.open)
    try:
        assert await xs.read_str(f"/local/domain/{domid}/name") == "vm1"
        assert int(await xs.read_str(f"/local/domain/{domid}/memory/static-max")) == 64 << 10
        assert await xs.read_str(f"{be}/type") == "virtio,device2"
        assert int(await xs.read_str(f"{be}/base"), 0) == 0x2000000
        assert await xs.read_str(f"{be}/irq") == "33"
        sim_control.destroy_domain(domid)
        assert await xs.directory("/local/domain/0/backend/virtio") == []
    finally:
        await xs.close()


def test_cli_specs() -> None:
    assert parse_size("1G") == 1 << 30 and parse_size("512M") == 512 << 20 and parse_size("0x1000") == 4096
    assert parse_domain_spec("domid=3,mem=2G,vcpus=2,arch=x86_64,hole=0x50000000+1M") == {
        "domid": 3, "mem_bytes": 2 << 30, "vcpus": 2, "arch": "x86_64", "holes": [(0x50000000, 1 << 20)]
    }
    assert parse_virtio_spec("domid=1,device_id=0x1a,base=0x2000200,irq=34,devid=1") == {
        "domid": 1, "device_id": 0x1A, "base": 0x2000200, "irq": 34, "devid": 1
    }
    assert parse_domain_spec("mem=1M,paged=0x40001000+4K")["paged"] == [(0x40001000, 4096)]
    for bad in ("domid=1,base=0x2000000,irq=33", "domid=1,device_id=2,base=0x2000000,irq=33,bogus=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_virtio_spec(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_domain_spec("domid=1,colour=blue")
