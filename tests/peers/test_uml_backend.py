"""User-Mode Linux's virtio_uml (a real Linux vhost-user front-end) and its virtio_blk driver
drive the library's back-end (BackendServer + the RAM-disk virtio-blk device) in this process.

UML writes a random pattern to /dev/vda with O_DIRECT, reads it back and compares (its verdict
comes over the console); it also reads bytes we put on the disk beforehand and reports their
md5. We check both against the RAM disk itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from tests.peers.harness import UML_TIMEOUT, Peers
from vhost_user.aio.server import BackendServer
from vhost_user.aio.transport import UnixListener
from vhost_user.testing.blk import RamDiskBlk
from vhost_user.wire.enums import ProtocolFeatures

pytestmark = [pytest.mark.peer, pytest.mark.timeout(30)]

DISK_SIZE = 8 << 20
SERVER_EXIT_TIMEOUT = 5.0
TEST_DEADLINE = 25.0  # brief: each peer test bounded < 30 s (pytest-timeout 30 s is the backstop)


def backend_api():
    # Linux 6.1's virtio_uml only allocates its interrupt number while setting up the back-end
    # request channel: without BACKEND_REQ offered, the vring call fd is requested on IRQ 0 (the
    # timer), "genirq: Flags mismatch irq 0", and the virtio_blk probe fails with -EBUSY.
    assert RamDiskBlk.protocol_features & ProtocolFeatures.BACKEND_REQ
    return BackendServer, UnixListener, RamDiskBlk


@pytest.mark.asyncio
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
async def test_uml_virtio_blk_reads_and_writes_our_ram_disk(
    no_fd_leak: None, peers: Peers, tmp_path, event_idx: bool
) -> None:
    BackendServer, UnixListener, RamDiskBlk = backend_api()
    device = RamDiskBlk(DISK_SIZE, event_idx=event_idx)
    host_bytes = os.urandom(16 * 512)
    device.disk[2048 * 512 : 2048 * 512 + len(host_bytes)] = host_bytes
    pattern = os.urandom(128 * 512)  # 64 KiB: multi-segment requests
    (tmp_path / "pattern.bin").write_bytes(pattern)
    wsector = 4096

    path = peers.sock_path("ramdisk.sock")
    with UnixListener(path) as listener:
        run = peers.uml(path, mode="blkrw", env={
            "UMLT_PATTERN": str(tmp_path / "pattern.bin"), "UMLT_WSECTOR": str(wsector),
            "UMLT_RSECTOR": "2048", "UMLT_RCOUNT": "16",
        })
        async with asyncio.timeout(TEST_DEADLINE):
            sock = await listener.accept(timeout=UML_TIMEOUT)
            server = BackendServer(device, sock)
            serving = asyncio.get_running_loop().create_task(server.run())
            try:
                verdicts = await run.finish()
                # UML powered off: its end of the socket is gone, the server notices and returns.
                async with asyncio.timeout(SERVER_EXIT_TIMEOUT):
                    await serving
            finally:
                if not serving.done():
                    serving.cancel()
                    await asyncio.gather(serving, return_exceptions=True)
                server.close()

    log_tail = run.process.log_tail(60)
    assert "DONE 0" in verdicts, log_tail
    assert run.value("SECTORS") == str(DISK_SIZE // 512), log_tail
    assert run.value("WRITE-READ-OK") == "128", log_tail
    assert run.value("READ-MD5") == hashlib.md5(host_bytes).hexdigest(), log_tail
    assert bytes(device.disk[wsector * 512 : wsector * 512 + len(pattern)]) == pattern
    assert device.requests[1] >= 1 and device.requests[0] >= 2  # OUT and IN requests really came
    if event_idx:
        assert device.features & (1 << 29), "UML should have accepted EVENT_IDX"
    else:
        assert not device.features & (1 << 29)
