"""virtio-net on an unmodified dpdk-testpmd (net_vhost, io forwarding, port looped to itself)
through the shadow data path (guest RAM reached only through privcmd, as on real Xen), across
the events of a device's life: the guest's driver resets the device and brings it up again on
the same back-end connection; frames flow again, each exactly once.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.config import DeviceConfig
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import VirtioNet
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator

from tests.daemon.test_shadow_sim import ShadowDaemon
from tests.peers.harness import TESTPMD_FORWARDING_LOG, PeerProcess

BASE, IRQ, TIMEOUT = 0x0200_0000, 35, 25.0
FRAMES = 6
RESETS = 2


def frame(n: int) -> bytes:
    return b"\xff" * 6 + bytes([0x02, 0, 0, 0, 0, n]) + b"\x88\xb5" + os.urandom(60 + 11 * (n % 16))


async def frames_come_back_once(net: VirtioNet, first: int, daemon: ShadowDaemon, pmd: PeerProcess) -> None:
    """FRAMES frames, one in flight at a time: each comes back as the next frame received (a
    duplicate or a loss shows as a mismatch), and a last marker frame proves nothing trails."""
    for n in range(first, first + FRAMES + 1):
        sent = frame(n % 256)
        try:
            await net.send(sent)
            got = await net.recv(TIMEOUT)
        except GuestDriverError as e:
            raise AssertionError(f"frame {n - first} of {FRAMES}: {e}; device {daemon.device.stats}, "
                                 f"rx {daemon.shadow.stats(0)}, tx {daemon.shadow.stats(1)}, "
                                 f"testpmd log: {pmd.log_tail(8)}") from e
        assert got == sent, f"frame {n - first}: another frame came back (a duplicate, or one of before the reset)"


@pytest.mark.peer
@pytest.mark.timeout(120)
@pytest.mark.asyncio(loop_factories=["uvloop"])  # testpmd burns a CPU: run it once
async def test_frames_flow_again_after_guest_driver_resets_on_the_shadow_path(
        sim_host, sim_control, kernel, peers, sim_dir):
    """Each DRIVER_OK after a reset hands testpmd the memory table again. DPDK compares only the
    regions' geometry and keeps its old mapping when it is unchanged ("memory regions not
    changed"): the shadow memory must be the same memfd for every start on one connection, or the
    back-end reads rings the daemon no longer writes and no frame comes back."""
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    sock = os.path.join(sim_dir, "net.sock")
    listener = UnixListener(sock)
    pmd, _ = peers.testpmd(sock=sock, client=True)
    cfg = DeviceConfig(devid=0, device_id=1, base=BASE, irq=IRQ, listen=True, num_queues=2)
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT))
    guest = await SimGuest.connect(sim_host.path, domid)
    alloc = GuestPageAllocator(guest.ram)
    try:
        async with asyncio.timeout(TIMEOUT * (RESETS + 2)):
            await daemon.start()
            frontend = daemon.device.frontend
            for round_ in range(RESETS + 1):
                # attach() resets the device first (the driver reloaded), then brings it up again
                net = await VirtioNet.attach(guest, BASE, IRQ, alloc, queue_size=64, mmio_timeout=TIMEOUT)
                if round_ == 0:
                    await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)  # after testpmd's RX drain, not before
                await frames_come_back_once(net, 100 * round_, daemon, pmd)
                await net.close()
            assert daemon.device.frontend is frontend and not frontend.broken  # one connection throughout
            assert daemon.device.stats.starts == RESETS + 1
            assert daemon.errors == []
    finally:
        try:
            guest.close()
        finally:
            await daemon.close()
        listener.close()
