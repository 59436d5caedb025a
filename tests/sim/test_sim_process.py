"""``xen-vhost-sim`` as its own process: a device model process is SIGKILLed mid-request and a
restarted one serves the guest's still-pending MMIO access."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sim.simproc import sim_command, start_sim_process, stop_process
from xen_vhost_sim.guest import SimControl, SimGuest

TIMEOUT = 10.0
DOMID = 5
BASE = 0x02000000
CLIENT = str(Path(__file__).with_name("dm_client.py"))


@pytest.fixture
def sim_process(sim_dir: str) -> Iterator[str]:
    path = os.path.join(sim_dir, "xen.sock")
    proc = start_sim_process(
        [*sim_command(), "--socket", path, "--domain", f"domid={DOMID},mem=64M,vcpus=2,name=sim-guest",
         "--virtio", f"domid={DOMID},device_id=2,base={BASE:#x},irq=33",
         "--xenstore-socket", os.path.join(sim_dir, "xenstored.sock")], TIMEOUT)
    try:
        yield path
    finally:
        stop_process(proc, TIMEOUT)
    assert proc.returncode == 0


async def start_client(path: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "XEN_VHOST_SIM": path, "PYTHONPATH": os.pathsep.join(sys.path)}
    return await asyncio.create_subprocess_exec(
        sys.executable, CLIENT, *args, env=env, stdout=asyncio.subprocess.PIPE
    )


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()


@pytest.mark.asyncio
async def test_pending_mmio_survives_sigkill_of_the_device_model(sim_process: str) -> None:
    guest = await SimGuest.connect(sim_process, DOMID)
    first = second = None
    try:
        first = await start_client(sim_process, "first", str(DOMID), hex(BASE))
        assert (await line(first)).startswith("attached ")
        read = asyncio.ensure_future(guest.mmio_read(BASE + 0x8, 4, vcpu=1))
        assert await line(first) == f"took {BASE + 0x8:#x}"
        first.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), TIMEOUT) == -signal.SIGKILL
        with SimControl(sim_process) as ctl:
            assert ctl.pending_access(DOMID, vcpu=1)
            assert not read.done()
            assert ctl.domain_info(DOMID)["servers"] == [0]
        second = await start_client(sim_process, "again", str(DOMID), "0xcafe")
        assert await line(second) == f"served {BASE + 0x8:#x}"
        assert await asyncio.wait_for(read, TIMEOUT) == 0xCAFE
        assert await line(second) == "done 1"
        assert await asyncio.wait_for(second.wait(), TIMEOUT) == 0
    finally:
        for p in (first, second):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()
        guest.close()


@pytest.mark.asyncio
async def test_process_serves_xenstore_on_its_socket_and_xenbus(sim_process: str) -> None:
    from xen_vhost_sim.simkernel import SimKernel
    from xen_vhost_master.xen.xenstore import XenstoreClient

    sock = os.path.join(os.path.dirname(sim_process), "xenstored.sock")
    for client in (
        await XenstoreClient.open(socket_paths=(sock,), timeout=TIMEOUT),
        await XenstoreClient.open(socket_paths=(), timeout=TIMEOUT, opener=SimKernel(sim_process).open),
    ):
        try:
            assert await client.read_str(f"/local/domain/{DOMID}/name") == "sim-guest"
            be = f"/local/domain/0/backend/virtio/{DOMID}/0"
            assert int(await client.read_str(f"{be}/base"), 0) == BASE
            assert await client.read_str(f"{be}/irq") == "33"
        finally:
            await client.close()
