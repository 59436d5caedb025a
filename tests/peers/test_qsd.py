"""The library's front-end against qemu-storage-daemon (vhost-user-blk export of a raw file).

Guest memory is a memfd; the virtqueue is driven by vhost_user.virtqueue.SplitQueueDriver; the
data path is checked against the raw file on disk.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from tests.peers.guest import BLK_S_OK, BLK_T_IN, BLK_T_OUT, GuestQueue, GuestRam, guest_ram
from tests.peers.harness import Peers
from vhost_user.aio.client import AsyncFrontend
from vhost_user.wire.enums import ProtocolFeatures, VirtioFeatures

pytestmark = [pytest.mark.peer, pytest.mark.timeout(30)]

QUEUE_SIZE = 16
IMAGE_SIZE = 4 << 20
TEST_DEADLINE = 25.0  # brief: each peer test bounded < 30 s (pytest-timeout 30 s is the backstop)


def frontend_api():
    return AsyncFrontend, VirtioFeatures, ProtocolFeatures


async def blk_round(fe, ram: GuestRam, q: GuestQueue, image, *, sector: int, host_sector: int) -> None:
    """One write + one read of host-written bytes, then a read-back of the write."""
    payload = os.urandom(4096)
    host_bytes = os.urandom(1024)
    os.pwrite(image, host_bytes, host_sector * 512)

    w = q.blk_request(BLK_T_OUT, sector, len(payload), payload, token="write")
    r1 = q.blk_request(BLK_T_IN, host_sector, len(host_bytes), token="read-host")
    assert q.kick_if_needed()
    done = await q.complete({"write", "read-host"})
    assert ram.read(w["status"], 1)[0] == BLK_S_OK
    assert ram.read(r1["status"], 1)[0] == BLK_S_OK
    assert done["read-host"] == len(host_bytes) + 1  # data + status byte written
    assert ram.read(r1["data"], len(host_bytes)) == host_bytes
    assert os.pread(image, len(payload), sector * 512) == payload  # landed at the right offset

    r2 = q.blk_request(BLK_T_IN, sector, len(payload), token="read-back")
    q.kick_if_needed()
    await q.complete({"read-back"})
    assert ram.read(r2["status"], 1)[0] == BLK_S_OK
    assert ram.read(r2["data"], len(payload)) == payload


@pytest.mark.asyncio
@pytest.mark.parametrize("ring", ["flags", "event_idx", "indirect"])
async def test_blk_io_through_qemu_storage_daemon_and_reconnect(no_fd_leak: None, peers: Peers, ring: str) -> None:
    event_idx, indirect = ring == "event_idx", ring == "indirect"
    AsyncFrontend, VF, PF = frontend_api()
    qsd = peers.qsd_raw(size=IMAGE_SIZE)
    image = os.open(qsd.image, os.O_RDWR | os.O_CLOEXEC)
    try:
        async with asyncio.timeout(TEST_DEADLINE):
            with guest_ram() as ram:
                q = ram.queue(QUEUE_SIZE, event_idx=event_idx, indirect=indirect)
                base = 0
                for round_no in range(2):  # connect, I/O, disconnect; reconnect, same again
                    fe = await AsyncFrontend.connect(qsd.sock)
                    try:
                        neg = await fe.negotiate()
                        assert neg.features & VF.VERSION_1
                        assert neg.protocol_features & PF.CONFIG
                        assert neg.queue_num == 1
                        config = await fe.get_config(0, 60)
                        capacity, = struct.unpack_from("<Q", config, 0)
                        assert capacity == IMAGE_SIZE // 512
                        features = VF.VERSION_1 | (VF.RING_EVENT_IDX if event_idx else 0)
                        if indirect:
                            assert neg.features & VF.RING_INDIRECT_DESC
                            features |= VF.RING_INDIRECT_DESC
                        await fe.set_features(int(features))
                        await fe.set_mem_table([ram.region()], [ram.fd])
                        await fe.start_vring(0, base=base, **q.vring_args())
                        await blk_round(fe, ram, q, image, sector=64 + 8 * round_no, host_sector=512 + 8 * round_no)
                        base = await fe.stop_vring(0)
                        # The back-end consumed exactly what the driver made available.
                        assert base == q.drv.avail_idx
                    finally:
                        await fe.close()
                assert qsd.process.exit_status() is None, "qsd must survive front-end disconnects"
    finally:
        os.close(image)


@pytest.mark.asyncio
async def test_get_config_reports_capacity_of_null_device(no_fd_leak: None, peers: Peers) -> None:
    AsyncFrontend, VF, PF = frontend_api()
    qsd = peers.qsd_null(size=8 << 20, num_queues=2)
    async with asyncio.timeout(TEST_DEADLINE):
        fe = await AsyncFrontend.connect(qsd.sock)
        try:
            neg = await fe.negotiate()
            assert neg.queue_num == 2
            config = await fe.get_config(0, 60)
            assert struct.unpack_from("<Q", config, 0)[0] == (8 << 20) // 512
            # virtio_blk_config.num_queues (u16 @34)
            assert struct.unpack_from("<H", config, 34)[0] == 2
        finally:
            await fe.close()
