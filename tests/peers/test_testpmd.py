"""The library's front-end against dpdk-testpmd's net_vhost port, in both connection modes.

testpmd runs ``--forward-mode=io --port-topology=loop``: what the guest transmits (our TX
queue 1, testpmd's RX) comes straight back on the guest's receive queue 0. Its log is the
oracle for the control path ("virtio is now ready for processing").
"""

from __future__ import annotations

import asyncio
import os

import pytest

from vhost_user.aio.client import AsyncFrontend
from vhost_user.aio.transport import UnixListener
from vhost_user.wire.enums import ProtocolFeatures as PF
from vhost_user.wire.enums import VirtioFeatures

from tests.peers.guest import NET_HDR_LEN, GuestQueue, GuestRam, guest_ram
from tests.peers.harness import TESTPMD_FORWARDING_LOG, Peers

pytestmark = [pytest.mark.peer, pytest.mark.timeout(30)]

QUEUE_SIZE = 64
RX_BUF = 2048
TEST_DEADLINE = 25.0  # brief: each peer test bounded < 30 s (pytest-timeout 30 s is the backstop)
READY_LOG = r"virtio is now ready for processing"
# testpmd drains ("flushes") its RX queues right before it starts forwarding; a frame sent before
# the drain ends is silently eaten (see TESTPMD_FORWARDING_LOG). In client mode the device gets
# ready during testpmd's start-up, before forwarding starts, so wait for both lines.
FORWARDING_LOG = TESTPMD_FORWARDING_LOG


def api():
    return AsyncFrontend, UnixListener, VirtioFeatures


# virtio 1.2 §2.1 device status bits
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK = 1, 2, 4, 8


def frame(n: int) -> bytes:
    """An Ethernet frame: broadcast dst, locally administered src, a private ethertype, payload."""
    return b"\xff" * 6 + bytes([0x02, 0, 0, 0, 0, n]) + b"\x88\xb5" + os.urandom(60 + n)


async def bring_up(fe, ram: GuestRam, VF) -> tuple[GuestQueue, GuestQueue]:
    neg = await fe.negotiate()
    assert neg.features & VF.VERSION_1
    assert neg.queue_num is not None and neg.queue_num >= 2  # testpmd says 128 (per pair count ×2)
    await fe.set_features(int(VF.VERSION_1))
    # testpmd offers STATUS; with it negotiated DPDK holds the device back until DRIVER_OK
    # arrives by SET_STATUS (lib/vhost virtio_is_ready). QEMU 10 order: 8, rings, 15.
    status = fe.has_protocol_feature(PF.STATUS)
    if status:
        await fe.set_status(S_FEATURES_OK)
    await fe.set_mem_table([ram.region()], [ram.fd])
    rx, tx = ram.queue(QUEUE_SIZE), ram.queue(QUEUE_SIZE)
    await fe.start_vring(0, **rx.vring_args())
    await fe.start_vring(1, **tx.vring_args())
    if status:
        await fe.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    return rx, tx


async def loop_back(ram: GuestRam, rx: GuestQueue, tx: GuestQueue, count: int = 4) -> None:
    """Post RX buffers, transmit ``count`` frames, get the same frames back on RX."""
    bufs = {}
    for i in range(count):
        addr = ram.alloc(RX_BUF)
        bufs[("rx", i)] = addr
        rx.drv.add(writable=[(addr, RX_BUF)], token=("rx", i))
    rx.kick_if_needed()
    sent = []
    for i in range(count):
        f = frame(i)
        hdr, data = ram.alloc(NET_HDR_LEN), ram.alloc(len(f))
        ram.write(hdr, bytes(NET_HDR_LEN))  # no offloads
        ram.write(data, f)
        tx.drv.add(readable=[(hdr, NET_HDR_LEN), (data, len(f))], token=("tx", i))
        sent.append(f)
    tx.kick_if_needed()
    await tx.complete({("tx", i) for i in range(count)})
    got = await rx.complete({("rx", i) for i in range(count)})
    received = []
    for i in range(count):
        n = got[("rx", i)]
        assert n > NET_HDR_LEN
        packet = ram.read(bufs[("rx", i)], n)
        # num_buffers: virtio 1.2 §5.1.6.4 says it is always 1 without MRG_RXBUF, but DPDK 22.11
        # only fills it on the mergeable path and leaves our zeroed 0 (a peer deviation).
        assert int.from_bytes(packet[10:12], "little") in (0, 1)
        received.append(packet[NET_HDR_LEN:])
    assert sorted(received) == sorted(sent)


@pytest.mark.asyncio
async def test_testpmd_server_mode_rings_up_and_loops_packets_back(no_fd_leak: None, peers: Peers) -> None:
    AsyncFrontend, _, VF = api()
    pmd, sock = peers.testpmd(client=False)
    async with asyncio.timeout(TEST_DEADLINE):
        with guest_ram(2 << 20) as ram:
            fe = await AsyncFrontend.connect(sock)
            try:
                rx, tx = await bring_up(fe, ram, VF)
                await pmd.wait_log_async(READY_LOG)
                await pmd.wait_log_async(FORWARDING_LOG)
                await loop_back(ram, rx, tx)
                assert await fe.stop_vring(1) == tx.drv.avail_idx
            finally:
                await fe.close()
            # testpmd notices the disconnect and waits for the next front-end.
            await pmd.wait_log_async(r"vhost peer closed|disconnected|destroy")
    assert pmd.exit_status() is None


@pytest.mark.asyncio
async def test_testpmd_client_mode_connects_to_our_listener(no_fd_leak: None, peers: Peers) -> None:
    AsyncFrontend, UnixListener, VF = api()
    path = peers.sock_path("fe-listen.sock")
    with UnixListener(path) as listener:
        pmd, _ = peers.testpmd(path, client=True)
        async with asyncio.timeout(TEST_DEADLINE):
            with guest_ram(2 << 20) as ram:
                fe = await AsyncFrontend.accept(listener, accept_timeout=20)
                try:
                    rx, tx = await bring_up(fe, ram, VF)
                    await pmd.wait_log_async(READY_LOG)
                    await pmd.wait_log_async(FORWARDING_LOG)
                    await loop_back(ram, rx, tx, count=2)
                finally:
                    await fe.close()
