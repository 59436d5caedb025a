"""virtio-net on an unmodified dpdk-testpmd (net_vhost, io forwarding, port looped to itself)
across the events of a device's life:

* through the shadow data path (guest RAM reached only through privcmd, as on real Xen), the
  guest's driver resets the device and brings it up again on the same back-end connection;
  frames flow again, each exactly once;
* testpmd has no CONFIG protocol feature: the daemon serves the net config space (MAC, link up,
  one queue pair), the same MAC for the same guest and device across daemon restarts (each a new
  back-end connection), the configured ``mac=`` when there is one.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.devtypes import stable_mac
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import sim_memfd_export
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import NetFeature, VirtioNet
from xen_vhost_sim.guest_driver import GuestDriverError, GuestPageAllocator

from tests.daemon.test_shadow_sim import ShadowDaemon, shadow_guest
from tests.peers.harness import TESTPMD_FORWARDING_LOG, PeerProcess, Peers

# every test here: testpmd, bounded, on uvloop alone (testpmd burns a CPU: run each once)
pytestmark = [pytest.mark.peer, pytest.mark.timeout(120), pytest.mark.asyncio(loop_factories=["uvloop"])]

BASE, IRQ, TIMEOUT = 0x0200_0000, 35, 25.0
FRAMES = 6
RESETS = 2


def start_testpmd_net(sim_control: SimControl, peers: Peers,
                sim_dir: str) -> tuple[int, str, UnixListener, PeerProcess, DeviceConfig]:
    """A 64 MiB domain and, for its net device (two queues, the daemon listening), testpmd
    connecting as a client to the socket: (domid, socket path, listener, testpmd, config)."""
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    sock = os.path.join(sim_dir, "net.sock")
    listener = UnixListener(sock)
    pmd, _ = peers.testpmd(sock=sock, client=True)
    return domid, sock, listener, pmd, DeviceConfig(devid=0, device_id=1, base=BASE, irq=IRQ, listen=True, num_queues=2)


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


async def test_frames_flow_again_after_guest_driver_resets_on_the_shadow_path(
        sim_host, sim_control, kernel, peers, sim_dir):
    """Each DRIVER_OK after a reset hands testpmd the memory table again. DPDK compares only the
    regions' geometry and keeps its old mapping when it is unchanged ("memory regions not
    changed"): the shadow memory must be the same memfd for every start on one connection, or the
    back-end reads rings the daemon no longer writes and no frame comes back."""
    domid, sock, listener, pmd, cfg = start_testpmd_net(sim_control, peers, sim_dir)
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT))
    async with shadow_guest(daemon, sim_host, domid, listener) as guest:
        alloc = GuestPageAllocator(guest.ram)
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


async def daemon_run(kernel, sim_control, guest: SimGuest, domid: int, listener: UnixListener, cfg: DeviceConfig,
                     pmd: PeerProcess, *, first: bool) -> tuple[bytes, list[int], int]:
    """One daemon's life for the guest (zero copy over the simulator's RAM memfd): serve the
    device, let the guest's driver bring it up and read its config, loop one frame through
    testpmd, stop. Returns (the MAC the guest read, [status, max_virtqueue_pairs], guest errors)."""
    privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
    log = device_logger("xvm.test", domid, "net0")
    ioreq = IoreqServer(privcmd, evtchn, domid, log)
    banks, memfd = sim_control.sim_only_ram_memfd(domid)
    device = Device(cfg, connect=lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT),
                    memory=sim_memfd_export(banks, memfd), set_irq=lambda level: ioreq.set_irq(cfg.irq, level),
                    log=log, guest_name="web1")
    try:
        ioreq.create()
        await device.start()
        ioreq.add_window(cfg.base, 0x200, device)
        ioreq.enable()
        net = await VirtioNet.attach(guest, cfg.base, cfg.irq, GuestPageAllocator(guest.ram), queue_size=64,
                                     features=VirtioNet.DEFAULT_FEATURES, mmio_timeout=TIMEOUT)
        assert net.driver.has(NetFeature.MAC) and net.driver.has(NetFeature.STATUS), f"{net.driver.features:#x}"
        fields = await net.driver.config_read([(6, 2), (8, 2)])
        if first:
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)  # after testpmd's RX drain, not before
        sent = frame(1)
        await net.send(sent)
        assert await net.recv(TIMEOUT) == sent
        mac = net.mac
        await net.close()
        return mac, fields, device.stats.guest_errors
    finally:
        await ioreq.close()
        await device.close()
        os.close(memfd)
        evtchn.close()
        privcmd.close()


async def test_the_guest_reads_one_stable_mac_across_daemon_restarts_and_the_configured_one(
        sim_host, sim_control, kernel, peers, sim_dir):
    """testpmd offers no CONFIG: the guest's driver is offered MAC and STATUS and reads a MAC, link
    up and one queue pair from the daemon; the MAC is the same after the daemon is restarted (a new
    back-end connection), and is the one of the guest's configuration when it has ``mac=``."""
    domid, sock, listener, pmd, cfg = start_testpmd_net(sim_control, peers, sim_dir)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        async with asyncio.timeout(TIMEOUT * 4):
            seen = [await daemon_run(kernel, sim_control, guest, domid, listener, cfg, pmd, first=run == 0)
                    for run in range(2)]
            assert seen[0] == seen[1] == (stable_mac("web1", 0), [1, 1], 0)  # LINK_UP, one pair, no guest error
            configured = DeviceConfig(devid=0, device_id=1, base=BASE, irq=IRQ, listen=True, num_queues=2,
                                      mac="00:16:3e:0a:0b:0c")
            got = await daemon_run(kernel, sim_control, guest, domid, listener, configured, pmd, first=False)
            assert got == (bytes.fromhex("00163e0a0b0c"), [1, 1], 0)
    finally:
        guest.close()
        listener.close()


async def test_frames_flow_again_after_testpmd_restarts_then_the_guest_resets_on_the_shadow_path(
        sim_host, sim_control, kernel, peers, sim_dir):
    """A new testpmd (a new back-end connection) gets a memfd of its own and the running rings
    resume on it; the guest's driver then resets the device on that connection: the table is that
    connection's memfd again, and frames flow each time, exactly once."""
    domid, sock, listener, pmd, cfg = start_testpmd_net(sim_control, peers, sim_dir)
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT))
    async with shadow_guest(daemon, sim_host, domid, listener) as guest:
        alloc = GuestPageAllocator(guest.ram)
        async with asyncio.timeout(TIMEOUT * 4):
            await daemon.start()
            net = await VirtioNet.attach(guest, BASE, IRQ, alloc, queue_size=64, mmio_timeout=TIMEOUT)
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)
            await frames_come_back_once(net, 0, daemon, pmd)
            first_fd = daemon.shadow.shadow.fd
            await asyncio.to_thread(pmd.stop)
            pmd, _ = peers.testpmd(sock=sock, client=True)
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)  # connected, rings resumed, RX drained
            while daemon.device.reconnecting is not None or daemon.device.stats.reconnects == 0:
                assert daemon.device.reconnecting is not None, daemon.device.stats
                await daemon.device.reconnecting
            second_fd = daemon.shadow.shadow.fd
            assert second_fd != first_fd  # the new back-end got memory of its own
            await frames_come_back_once(net, 100, daemon, pmd)
            await net.close()
            net = await VirtioNet.attach(guest, BASE, IRQ, alloc, queue_size=64, mmio_timeout=TIMEOUT)
            assert daemon.shadow.shadow.fd == second_fd  # same connection: same memfd
            await frames_come_back_once(net, 200, daemon, pmd)
            await net.close()
            assert daemon.device.stats.reconnects == 1 and daemon.errors == []
