"""The simulated ``xl create`` / ``xl reboot`` (SimControl.xl_create / xl_reboot), as libxl does
them: created paused with a name, devices written, Xen 4.17 ``virtio_disk`` waiting for InitWait
and ``virtio`` (>= 4.18) not, the toolstack's pause dropped; a reboot is the destroy handshake and
a new domid with the same name and devices (Xen's domid rover never hands out the old one)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient

TIMEOUT = 10.0
DEV = {"device_id": 2, "base": 0x2000000, "irq": 33, "devid": 0}
DISK = {"device_id": 2, "base": 0x2000000, "irq": 33, "devid": 51712, "kind": "virtio_disk"}


async def xl(sim_host: SimHost, method: str, *args: object, **kw: object) -> object:
    def call() -> object:
        with SimControl(sim_host.path) as ctl:
            return getattr(ctl, method)(*args, **kw)

    return await asyncio.get_running_loop().run_in_executor(None, call)


async def answer(xs: XenstoreClient, path: str, wanted: str, value: str) -> None:
    """A back-end: once ``path`` reads ``wanted``, write ``value`` there."""
    async with await xs.watch(path) as w:
        async for _ in w:
            try:
                if await xs.read_str(path) == wanted:
                    await xs.write(path, value)
                    return
            except FileNotFoundError:
                pass


@pytest.mark.asyncio
async def test_create_paused_then_unpaused_with_name_and_devices(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.xl_create("vm1", [DEV], paused=True)
    info = sim_control.domain_info(domid)
    assert info["name"] == "vm1" and info["pause_count"] == 1  # `xl create -p`: libxl's reference
    xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=kernel.open)
    try:
        assert await xs.read_str(f"/local/domain/{domid}/name") == "vm1"
        assert await xs.read_str(f"/local/domain/0/backend/virtio/{domid}/0/state") == "1"  # nobody waited
    finally:
        await xs.close()
    sim_control.unpause(domid)
    assert sim_control.domain_info(domid)["history"] == [["running", True]]  # it never ran before
    other = sim_control.xl_create("vm2", [])
    assert sim_control.domain_info(other)["pause_count"] == 0
    with pytest.raises(OSError) as ei:
        sim_control.xl_create("vm1", [])
    assert ei.value.errno == errno.EEXIST  # one live domain per name


@pytest.mark.asyncio
async def test_a_4_17_disk_waits_for_initwait(sim_host: SimHost, kernel: SimKernel) -> None:
    xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=kernel.open)
    try:
        # Nobody answers: creation fails after the timeout, the domain is gone, its name free.
        with pytest.raises(OSError) as ei:
            await xl(sim_host, "xl_create", "vm1", [DISK], timeout=0.5)
        assert ei.value.errno == errno.ETIMEDOUT
        assert await xs.directory("/local/domain/0/backend/virtio_disk") == []
        # A back-end answering InitWait: the creation completes (domids are not reused at once).
        backend = asyncio.ensure_future(answer(xs, "/local/domain/0/backend/virtio_disk/2/51712/state", "1", "2"))
        domid = await xl(sim_host, "xl_create", "vm1", [DISK])
        assert domid == 2
        await asyncio.wait_for(backend, TIMEOUT)
    finally:
        await xs.close()


@pytest.mark.asyncio
async def test_reboot_is_a_new_domid_with_the_same_name_and_devices(sim_host: SimHost, kernel: SimKernel) -> None:
    xs = await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=kernel.open)
    try:
        domid = await xl(sim_host, "xl_create", "vm1", [DEV])
        assert isinstance(domid, int)
        be = f"/local/domain/0/backend/virtio/{domid}/0"
        closed = asyncio.ensure_future(answer(xs, f"{be}/state", "5", "6"))  # Closing → Closed
        new = await xl(sim_host, "xl_reboot", domid)
        assert isinstance(new, int) and new != domid
        assert closed.done()  # the destroy handshake ran first
        assert not await xs.exists(f"/local/domain/{domid}") and not await xs.exists(be)
        assert await xs.read_str(f"/local/domain/{new}/name") == "vm1"
        assert await xs.read_str(f"/local/domain/0/backend/virtio/{new}/0/base") == "0x2000000"
        with SimControl(sim_host.path) as ctl:
            assert ctl.domain_info(new)["pause_count"] == 0
            with pytest.raises(OSError) as ei:
                ctl.xl_reboot(domid)
            assert ei.value.errno == errno.ENOENT
    finally:
        await xs.close()
