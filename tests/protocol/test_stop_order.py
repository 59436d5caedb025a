"""The library's back-end under every QEMU stop order, over a real socketpair with real fds.

QEMU pauses a vhost-user device (QMP ``stop``, guest reset) with ``vhost_dev_stop``. With the
STATUS protocol feature, QEMU 7.2 and 8.0 send SET_STATUS(0) *first* (``vhost_dev_start(false)``
ahead of the rings' stop), then SET_VRING_ENABLE(0) per ring, then GET_VRING_BASE per ring;
QEMU 8.1 and later move SET_STATUS(0) after the GET_VRING_BASEs (``vhost_reset_status``).
Without STATUS (qemu-storage-daemon never offers it) no SET_STATUS is sent. QEMU keeps
GET_VRING_BASE's answer as the ring's next avail index and hands it back with SET_VRING_BASE on
``cont``; a wrong answer restarts the ring at a stale index and replays old requests.

The start sequence is the one QEMU sends (vhost_user_blk_start, vhost_dev_start, and
vhost_user_set_features adding FEATURES_OK through GET/SET_STATUS): GET/SET_INFLIGHT_FD when
the back-end offers inflight tracking, SET_FEATURES (+ status), SET_VRING_CALL, SET_FEATURES
again, the memory table on the first start only, SET_VRING_NUM/BASE/ADDR/KICK, SET_VRING_ENABLE(1),
then status DRIVER_OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from vhost_user import AsyncFrontend, ProtocolFeatures, VirtioFeatures
from vhost_user.aio.client import InflightFd
from vhost_user.testing import RamDiskBlk, connected_pair
from vhost_user.testing.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT

from tests.protocol.guestmem import Guest, guest

TEST_TIMEOUT = 20.0
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8  # virtio 1.2 §2.1 device status

ORDERS = ["qemu-7.2-status-first", "qemu-8.1-status-last", "no-status"]


class QemuLikeFrontend:
    """Drives one vring the way QEMU's vhost-user-blk does across ``stop``/``cont``."""

    def __init__(self, fe: AsyncFrontend, g: Guest, order: str) -> None:
        self.fe, self.g, self.order = fe, g, order
        self.status = order != "no-status"
        self.inflight: InflightFd | None = None
        self.started_once = False
        self.last_avail = 0  # what QEMU keeps from GET_VRING_BASE
        # vhost-user-blk sizes the inflight area by its queue-size property (hw/block/vhost-user-blk.c)
        self.inflight_queue_size = g.drv.size

    async def add_status(self, bits: int) -> None:
        """vhost_user_add_status: GET_STATUS, then SET_STATUS only if a bit is missing."""
        if not self.status:
            return
        now = await self.fe.get_status()
        if now & bits != bits:
            await self.fe.set_status(now | bits)

    async def start(self) -> None:
        fe, g = self.fe, self.g
        if fe.has_protocol_feature(ProtocolFeatures.INFLIGHT_SHMFD):
            if self.inflight is None:
                self.inflight = await fe.get_inflight_fd(num_queues=1, queue_size=self.inflight_queue_size)
            i = self.inflight
            await fe.set_inflight_fd(i.fd, mmap_size=i.mmap_size, mmap_offset=i.mmap_offset,
                                     num_queues=1, queue_size=self.inflight_queue_size)
        features = int(VirtioFeatures.VERSION_1)
        await fe.set_features(features)
        await self.add_status(FEATURES_OK)
        await fe.set_vring_call(0, g.call)
        await fe.set_features(features)
        await self.add_status(FEATURES_OK)
        if not self.started_once:
            await fe.add_mem_reg(g.region(), g.fd)
            self.started_once = True
        args = g.vring_args()
        await fe.set_vring_num(0, args["num"])
        await fe.set_vring_base(0, self.last_avail)
        await fe.set_vring_addr(0, desc=args["desc"], used=args["used"], avail=args["avail"])
        await fe.set_vring_kick(0, g.kick)
        await fe.set_vring_enable(0, True)
        await self.add_status(ACKNOWLEDGE | DRIVER | DRIVER_OK)

    async def stop(self) -> int:
        fe = self.fe
        if self.order == "qemu-7.2-status-first":
            await fe.set_status(0)
        await fe.set_vring_enable(0, False)
        self.last_avail = await fe.get_vring_base(0)
        if self.order == "qemu-8.1-status-last":
            await fe.set_status(0)
        return self.last_avail

    def close(self) -> None:
        if self.inflight is not None:
            os.close(self.inflight.fd)
            self.inflight = None


@contextlib.asynccontextmanager
async def qemu_like(dev: RamDiskBlk, g: Guest, order: str) -> AsyncIterator[tuple[QemuLikeFrontend, RamDiskBlk]]:
    async with connected_pair(dev) as (fe, _server):
        neg = await fe.negotiate()
        assert bool(neg.protocol_features & ProtocolFeatures.STATUS)
        q = QemuLikeFrontend(fe, g, order)
        try:
            yield q, dev
        finally:
            q.close()


async def write_batch(g: Guest, first: int, count: int, disk: dict[int, bytes]) -> None:
    """``count`` 512-byte writes to sectors ``first..``; waits until each completed OK."""
    reqs = {}
    for t in range(first, first + count):
        data = os.urandom(512)
        disk[t] = data
        reqs[t] = g.blk(VIRTIO_BLK_T_OUT, t, 512, data, token=t)
    g.notify()
    await g.complete(set(reqs))
    assert [g.read(r["status"], 1)[0] for r in reqs.values()] == [VIRTIO_BLK_S_OK] * count


@pytest.mark.asyncio
@pytest.mark.parametrize("inflight", [False, True], ids=["no-inflight", "inflight"])
@pytest.mark.parametrize("order", ORDERS)
async def test_get_vring_base_answers_where_the_ring_stopped_in_every_stop_order(
        no_fd_leak: None, order: str, inflight: bool) -> None:
    """QMP stop/cont three times, 3 writes per round: every GET_VRING_BASE answers the guest's
    avail index, every restart resumes there (no request is served twice), the data is on disk."""
    dev = RamDiskBlk(1 << 20, inflight=inflight)
    disk: dict[int, bytes] = {}
    with guest(queue_size=16) as g:
        async with asyncio.timeout(TEST_TIMEOUT), qemu_like(dev, g, order) as (q, dev):
            await q.start()
            token = 0
            for _round in range(3):
                await write_batch(g, token, 3, disk)
                token += 3
                assert await q.stop() == g.drv.avail_idx == token
                if q.status:
                    assert await q.fe.get_status() == 0
                await q.start()
            await write_batch(g, token, 3, disk)
            token += 3
            assert await q.stop() == token
            assert dev.requests[VIRTIO_BLK_T_OUT] == token  # none replayed
            for sector, data in disk.items():
                assert bytes(dev.disk[sector * 512 : (sector + 1) * 512]) == data


@pytest.mark.asyncio
@pytest.mark.parametrize("order", ORDERS[:2])
async def test_status_0_keeps_the_ring_fds_and_a_second_get_vring_base_answers_the_same(
        no_fd_leak: None, order: str) -> None:
    """Status 0 stops the ring but does not drop what the front-end set once at init
    (SET_VRING_ERR is sent only then) nor what GET_VRING_BASE reports, however often asked."""
    dev = RamDiskBlk(1 << 20, inflight=False)
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with guest(queue_size=16) as g:
            async with asyncio.timeout(TEST_TIMEOUT), qemu_like(dev, g, order) as (q, dev):
                await q.fe.set_vring_err(0, err)
                await q.start()
                await write_batch(g, 0, 5, {})
                assert await q.stop() == 5
                assert await q.fe.get_vring_base(0) == 5
                vring = dev.server.vrings[0]
                assert vring.err_fd is not None and vring.call_fd is not None
                assert not vring.started and not vring.enabled
    finally:
        os.close(err)


@pytest.mark.asyncio
async def test_a_ring_larger_than_the_inflight_area_runs_without_inflight_tracking(
        no_fd_leak: None, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU on virtio-mmio offers QueueNumMax 1024 whatever vhost-user-blk's queue-size
    (hw/virtio/virtio-mmio.c VIRTIO_MMIO_QUEUE_NUM_MAX answers VIRTQUEUE_MAX_SIZE) but sizes the
    inflight area by queue-size: a guest that takes the larger ring must still be served (the ring
    runs without inflight tracking, said at each start), not left hanging on a ring that never starts."""
    dev = RamDiskBlk(1 << 20, inflight=True)
    disk: dict[int, bytes] = {}
    with guest(queue_size=16) as g:
        async with asyncio.timeout(TEST_TIMEOUT), qemu_like(dev, g, "qemu-7.2-status-first") as (q, dev):
            q.inflight_queue_size = 8
            await q.start()
            await write_batch(g, 0, 3, disk)
            assert await q.stop() == 3
            await q.start()
            await write_batch(g, 3, 3, disk)
            assert await q.stop() == 6
    assert dev.requests[VIRTIO_BLK_T_OUT] == 6
    warned = [r for r in caplog.records if "without inflight tracking" in r.getMessage()]
    assert len(warned) == 2, [r.getMessage() for r in caplog.records]  # one per start
