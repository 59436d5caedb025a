"""UmlBridge pieces without UML: finding a front-end's memory file through its process, the feature
mask, and the typed refusals (a peer that is not UML, no device behind the MMIO window).
The end-to-end tests with a real UML are in tests/daemon/test_uml_guest.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_user.aio.transport import FdSocket
from xen_vhost_sim.guest import SimControl, SimHostError
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.uml_bridge import (
    BRIDGE_MASKED_FEATURES,
    UmlBridge,
    UmlBridgeError,
    UmlMemoryError,
    find_uml_memory,
    offered_to_uml,
)

TIMEOUT = 10

# A stand-in for UML: holds unlinked files of the given sizes (MiB; its "physical memory"), connects
# to the socket, says its inode numbers, and waits for stdin to close.
FAKE_UML = r"""
import os, socket, sys
path, sizes = sys.argv[1], [int(x) for x in sys.argv[2:]]
fds = []
for mib in sizes:
    fd = os.open(os.path.dirname(path), os.O_TMPFILE | os.O_RDWR)
    os.ftruncate(fd, mib << 20)
    os.pwrite(fd, b"uml-%d" % mib, 0x1000)
    fds.append(fd)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
print(" ".join(str(os.fstat(fd).st_ino) for fd in fds), flush=True)
sys.stdin.read()
"""


def _connect(tmp_path: Path, sizes: list[int]) -> tuple[subprocess.Popen[str], socket.socket, list[int]]:
    path = str(tmp_path / "uml.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    lst.settimeout(TIMEOUT)
    child = subprocess.Popen([sys.executable, "-c", FAKE_UML, path, *map(str, sizes)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        conn, _ = lst.accept()
        assert child.stdout is not None
        inodes = [int(x) for x in child.stdout.readline().split()]
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        lst.close()
    return child, conn, inodes


def _end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(TIMEOUT)
    if child.stdout is not None:
        child.stdout.close()


def test_offered_to_uml_keeps_device_bits_and_drops_the_bridges() -> None:
    device = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 30) | (1 << 34) | (1 << 38)
    assert offered_to_uml(device) == (1 << 32) | (1 << 29) | (1 << 28) | (1 << 9)
    assert offered_to_uml(BRIDGE_MASKED_FEATURES) == 0


def test_find_uml_memory_takes_the_largest_unlinked_file_of_the_peer(no_fd_leak: None, tmp_path: Path) -> None:
    child, conn, inodes = _connect(tmp_path, [1, 8])
    try:
        mem = find_uml_memory(conn)
        try:
            assert mem.pid == child.pid and mem.size == 8 << 20 and mem.ino == inodes[1]
            assert os.pread(mem.fd, 5, 0x1000) == b"uml-8"  # the same file, reopened
        finally:
            os.close(mem.fd)
    finally:
        conn.close()
        _end(child)


def test_a_peer_without_a_memory_file_is_refused(no_fd_leak: None, tmp_path: Path) -> None:
    child, conn, _ = _connect(tmp_path, [])
    try:
        with pytest.raises(UmlMemoryError, match="no unlinked memory file"):
            find_uml_memory(conn)
    finally:
        conn.close()
        _end(child)


@pytest.mark.asyncio
async def test_bridge_makes_the_peer_memory_a_domain_and_refuses_an_empty_window(
    no_fd_leak: None, sim_host: SimHost, sim_control: SimControl, tmp_path: Path
) -> None:
    child, conn, _ = _connect(tmp_path, [16])
    bridge = UmlBridge(sim_host.path, base=0x0200_0000, irq=33)
    try:
        domid = bridge.adopt(FdSocket(conn))
        info = sim_control.domain_info(domid)
        assert info["banks"] == [[0, 16 << 20]] and info["vcpus"] == 2
        # No daemon serves the window: MagicValue reads as all-ones, the bridge says so (typed).
        with pytest.raises(UmlBridgeError, match="no virtio-mmio v2 device"):
            await bridge.serve()
    finally:
        await bridge.close()
        _end(child)
    with pytest.raises(SimHostError):
        sim_control.domain_info(domid)  # destroyed with the bridge


@pytest.mark.asyncio
async def test_a_bridge_access_is_bounded_and_an_outside_cancel_stays_a_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge's MMIO accesses end with TimeoutError after MMIO_TIMEOUT if the device model never
    answers (the bridge reports it instead of hanging UML); one answered in time returns its value,
    and a cancel from outside (the bridge closing) is not turned into a timeout."""
    import asyncio

    from xen_vhost_sim import uml_bridge

    monkeypatch.setattr(uml_bridge, "MMIO_TIMEOUT", 0.05)
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[int] = loop.create_future()
    loop.call_soon(answered.set_result, 7)
    assert await uml_bridge._bounded(answered) == 7
    with pytest.raises(TimeoutError, match="not answered"):
        await uml_bridge._bounded(loop.create_future())  # never answered: the timer ends it
    monkeypatch.setattr(uml_bridge, "MMIO_TIMEOUT", 60.0)
    task = asyncio.ensure_future(uml_bridge._bounded(loop.create_future()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
