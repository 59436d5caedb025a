"""The xenstore client through /dev/xen/xenbus of the simulated Xen host (SimKernel → host → xenstored)."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.xenstore import XenstoreClient, XenstoreDisconnected, XsTransaction

WAIT = 5.0


@pytest.fixture(scope="module", autouse=True)
def _uvloop_warmed_up() -> None:
    """uvloop opens a process-wide pipe on first use; do it before ``no_fd_leak`` takes its snapshot."""
    uvloop.run(asyncio.sleep(0))


async def open_xenbus(kernel: SimKernel) -> XenstoreClient:
    return await XenstoreClient.open(socket_paths=(), timeout=WAIT, opener=kernel.open)


def fd_identity(client: XenstoreClient) -> str:
    return os.readlink(f"/proc/self/fd/{client._fd}")


def fd_still_open(fd: int, identity: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == identity
    except FileNotFoundError:
        return False


@pytest.mark.asyncio
async def test_watch_fires_on_write_and_on_commit_through_the_xenbus_device(kernel: SimKernel) -> None:
    # (no ``no_fd_leak`` here: the host thread closes its ends asynchronously; the client's own fds
    # are checked by identity instead)
    watcher = await open_xenbus(kernel)
    writer = await open_xenbus(kernel)
    fds = [(c._fd, fd_identity(c)) for c in (watcher, writer)]
    try:
        be = "/local/domain/0/backend/virtio"
        watch = await watcher.watch(be, "be")
        assert (await watch.get(WAIT)).path == be
        await writer.write(f"{be}/5/0/type", "virtio,device2")
        assert (await watch.get(WAIT)).path == f"{be}/5/0/type"

        async def add_device(tx: XsTransaction) -> None:
            for key, value in (("base", "0x2000200"), ("irq", "34"), ("state", "1")):
                await tx.write(f"{be}/5/1/{key}", value)

        await writer.transaction(add_device)
        paths = {(await watch.get(WAIT)).path for _ in range(3)}
        assert paths == {f"{be}/5/1/base", f"{be}/5/1/irq", f"{be}/5/1/state"}
        assert await watcher.directory(f"{be}/5") == ["0", "1"]
        assert int(await watcher.read_str(f"{be}/5/1/base"), 0) == 0x2000200
    finally:
        await watcher.close()
        await writer.close()
    with pytest.raises(XenstoreDisconnected):
        await watcher.read("/")
    assert not any(fd_still_open(fd, ident) for fd, ident in fds)


@pytest.mark.asyncio
async def test_domain_creation_fires_introduce_domain(kernel: SimKernel, sim_control: SimControl) -> None:
    c = await open_xenbus(kernel)
    try:
        watch = await c.watch("@introduceDomain", "intro")
        assert (await watch.get(WAIT)).path == "@introduceDomain"
        domid = await asyncio.to_thread(sim_control.create_domain, mem_bytes=16 << 20)
        assert (await watch.get(WAIT)).token == "intro"
        assert await c.is_domain_introduced(domid)
    finally:
        await c.close()


def test_open_without_any_xenstore_names_every_path_tried() -> None:
    async def attempt() -> None:
        await XenstoreClient.open(["/nonexistent/xs.sock"], ["/nonexistent/xenbus"], timeout=WAIT)

    with pytest.raises(XenstoreDisconnected) as info:
        asyncio.run(attempt())
    assert "/nonexistent/xs.sock" in str(info.value) and "/nonexistent/xenbus" in str(info.value)
    assert not os.path.exists("/nonexistent")
