"""The daemon serving a virtio-pci function to an x86 HVM guest (issue 20): ``--device
type=blk,transport=pci,bdf=00:08.0`` claims the function's SBDF, answers its configuration space,
claims the BAR where the guest places it, interrupts with MSI-X (or INTx when the guest's driver
does not enable MSI-X), and the simulated guest's virtio-pci driver (sim/xen_vhost_sim/guest_pci.py,
written independently of the daemon's model) does I/O through it, to the project's RAM-disk
back-end and to qemu-storage-daemon.

The daemon (:class:`~xen_vhost_master.supervisor.Supervisor`) runs in the test's event loop over the
in-process simulated host, as in tests/daemon/test_waiting_backend.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import replace

import pytest
from test_waiting_backend import TIMEOUT, Backend, running

from xen_vhost_master.config import parse_device_arg
from xen_vhost_master.errors import ExitCode
from xen_vhost_master.supervisor import Options
from xen_vhost_master.xen.abi import XEN_DMOP_PCI_SBDF
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.guest_pci import MSI_ADDRESS, VirtioPciDriver, pci_intx_gsi, sbdf

DOMID = 9
DEV = 8


def pci_options(sock: str, *, arch: str = "x86_64") -> Options:
    device = parse_device_arg(f"type=blk,transport=pci,bdf=00:{DEV:02x}.0,socket={sock}")
    return Options(domid=DOMID, devices=(device,), xenstore=False, guest_arch=arch)


async def disk_io(guest: SimGuest, *, msix: bool, check) -> tuple[VirtioPciDriver, VirtioBlk]:  # type: ignore[no-untyped-def]
    driver = VirtioPciDriver(guest, sbdf(DEV), GuestPageAllocator(guest.ram, reserve=1 << 20), msix=msix)
    blk = await asyncio.wait_for(VirtioBlk.bring_up(driver, queue_size=64), TIMEOUT)
    rng = random.Random(msix)
    data = rng.randbytes(128 << 10)
    await asyncio.wait_for(blk.write(64, data), TIMEOUT)
    assert await asyncio.wait_for(blk.read(64, len(data) // 512), TIMEOUT) == data
    check(64 * 512, data)
    payloads = [rng.randbytes(4096) for _ in range(8)]
    await asyncio.wait_for(blk.batch([BlkOp("write", 1000 + 8 * i, data=p) for i, p in enumerate(payloads)]), TIMEOUT)
    assert await asyncio.wait_for(blk.batch([BlkOp("read", 1000 + 8 * i, 8) for i in range(8)]), TIMEOUT) == payloads
    await asyncio.wait_for(blk.flush(), TIMEOUT)
    return driver, blk


@pytest.mark.asyncio
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
async def test_an_x86_guest_does_io_through_a_virtio_pci_function(platform, sim_host, sim_control, sim_dir, msix):
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    sock = os.path.join(sim_dir, "blk.sock")
    backend = Backend(sock)
    await backend.start()
    try:
        async with running(platform, pci_options(sock)) as daemon:
            guest = await SimGuest.connect(sim_host.path, DOMID)
            try:
                await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")

                def check(offset: int, data: bytes) -> None:
                    assert bytes(backend.disk[offset:offset + len(data)]) == data  # reached the back-end

                driver, blk = await disk_io(guest, msix=msix, check=check)
                shown = daemon.device(0)
                assert (shown["base"], shown["irq"]) == (f"PCI 00:{DEV:02x}.0", "msi-x" if msix else "intx")
                served = daemon.sup.devices[next(iter(daemon.sup.devices))]
                assert served.bar == driver.bars[0][0]  # the BAR is claimed where the guest put it
                stats = served.device.stats
                assert stats.notifies > 0 and stats.interrupts > 0 and stats.guest_errors == 0
                assert daemon.sup.ioreq is not None and daemon.sup.ioreq.stats.refused == 0
                msis = sim_control.domain_info(DOMID)["msis"]
                if msix:
                    assert [MSI_ADDRESS, 0x31] in msis and driver.interrupts >= 5  # queue 0's vector
                else:
                    assert msis == [] and driver.interrupts >= 5
                    assert not guest.irq_level(pci_intx_gsi(DEV, 0))
                await asyncio.wait_for(blk.close(), TIMEOUT)
                assert daemon.device(0)["status"] == 0  # the driver's reset reached the daemon
            finally:
                guest.close()
        info = sim_control.domain_info(DOMID)
        assert info["servers"] == []  # SBDF, BAR and server released
        guest = await SimGuest.connect(sim_host.path, DOMID)
        try:
            assert await guest.pci_config_read(XEN_DMOP_PCI_SBDF(0, 0, DEV, 0), 0, 4) == 0xFFFFFFFF
        finally:
            guest.close()
    finally:
        await backend.stop()


async def saved_bar(path: str, want: list[int] | None) -> None:
    """Until the daemon's state file says the function's BAR is at ``want``."""
    import json

    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                devices = json.loads(open(path).read())["devices"]
            except (OSError, ValueError):
                devices = {}
            if [d.get("bar") for d in devices.values()] == [want]:
                return
            await asyncio.sleep(0.01)  # (the file is written by the daemon's task; no event to wait on)


@pytest.mark.asyncio
async def test_the_bar_follows_the_guest_and_is_released_when_decoding_stops(platform, sim_host, sim_control, sim_dir,
                                                                            tmp_path):
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, arch="x86_64")
    sock = os.path.join(sim_dir, "blk.sock")
    backend = Backend(sock)
    await backend.start()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    state = str(run / "state.json")
    try:
        async with running(platform, replace(pci_options(sock), state_file=state)) as daemon:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            guest = await SimGuest.connect(sim_host.path, DOMID)
            try:
                fn = sbdf(DEV)
                served = next(iter(daemon.sup.devices.values()))
                await guest.pci_config_write(fn, 0x10, 4, 0xE000_0000)
                await guest.pci_config_write(fn, 0x14, 4, 0)
                assert served.bar is None  # memory decoding is still off
                await guest.pci_config_write(fn, 0x04, 2, 0x2)
                assert served.bar == 0xE000_0000
                assert await guest.mmio_read(0xE000_0000 + 0x12, 2) == 1  # num_queues, through the BAR
                await guest.pci_config_write(fn, 0x10, 4, 0xE100_0000)  # moved while decoding
                assert served.bar == 0xE100_0000
                await saved_bar(state, [0xE100_0000, 0x8000])  # a successor would claim it there
                assert await guest.mmio_read(0xE000_0000 + 0x12, 2) == 0xFFFF  # the old place is nobody's
                await guest.pci_config_write(fn, 0x04, 2, 0)
                assert served.bar is None
                assert await guest.mmio_read(0xE100_0000 + 0x12, 2) == 0xFFFF
            finally:
                guest.close()
    finally:
        await backend.stop()


@pytest.mark.asyncio
async def test_a_pci_device_for_an_arm_guest_is_refused_with_a_reason(platform, sim_host, sim_control, sim_dir,
                                                                       caplog):
    from xen_vhost_master.supervisor import Supervisor

    sim_control.create_domain(DOMID, mem_bytes=64 << 20)
    sup = Supervisor(pci_options(os.path.join(sim_dir, "blk.sock"), arch="arm64"), platform)
    assert await asyncio.wait_for(sup.run(), TIMEOUT) == ExitCode.CONFIG
    assert "device 0 is transport=pci: virtio-pci functions are served to x86 HVM guests" in caplog.text
    assert sim_control.domain_info(DOMID)["servers"] == []  # nothing left behind


@pytest.mark.peer
@pytest.mark.asyncio
async def test_virtio_pci_to_qemu_storage_daemon(platform, sim_host, sim_control, peers):
    qsd = peers.qsd_raw(size=16 << 20)
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    async with running(platform, pci_options(str(qsd.sock))) as daemon:
        guest = await SimGuest.connect(sim_host.path, DOMID)
        try:
            await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")

            def check(offset: int, data: bytes) -> None:
                with open(qsd.image, "rb") as f:
                    f.seek(offset)
                    assert f.read(len(data)) == data

            driver, blk = await disk_io(guest, msix=True, check=check)
            assert blk.capacity == (16 << 20) // 512 and driver.interrupts >= 5
            await asyncio.wait_for(blk.close(), TIMEOUT)
        finally:
            guest.close()


def test_an_x86_guest_s_ram_is_below_the_pci_hole_and_above_4_gib(platform):
    from xen_vhost_master.supervisor import Supervisor

    sup = Supervisor(Options(domid=DOMID, guest_arch="x86_64"), platform)
    assert sup._layout(64 << 20) == [(0, 64 << 20)]
    assert sup._layout(5 << 30) == [(0, 0xF000_0000), (1 << 32, (5 << 30) - 0xF000_0000)]  # libxl's default hole


@pytest.mark.asyncio
async def test_a_handover_keeps_the_function_its_bar_and_its_vectors(platform, sim_host, sim_control, sim_dir,
                                                                     tmp_path):
    """SIGHUP: the next image adopts the IOREQ server, restores the function (configuration
    space, MSI-X table, vectors, queues) and its BAR claim; the guest's driver, never reset, goes
    on with I/O and MSIs."""
    import signal

    from test_waiting_backend import Daemon

    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    sock = os.path.join(sim_dir, "blk.sock")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    device = parse_device_arg(f"type=blk,transport=pci,bdf=00:{DEV:02x}.0,socket={sock}")
    opts = Options(domid=DOMID, devices=(device,), xenstore=False, guest_arch="x86_64",
                   state_file=str(run / "state.json"))
    backend = Backend(sock)
    await backend.start()
    guest = await SimGuest.connect(sim_host.path, DOMID)
    try:
        first = Daemon(platform, opts)
        await first.start()
        await first.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
        driver, blk = await disk_io(guest, msix=True, check=lambda o, d: None)
        sid = first.sup.ioreq.server_id  # type: ignore[union-attr]
        bar = driver.bars[0][0]
        first.sup._signalled(signal.SIGHUP)
        assert await asyncio.wait_for(first.task, TIMEOUT) == 0  # type: ignore[arg-type]
        assert sim_control.domain_info(DOMID)["servers"] == [sid]  # left enabled for the next image
        # a vCPU reads the function's num_queues between the two images: it waits in the server's page
        early = asyncio.ensure_future(guest.mmio_read(bar + 0x12, 2, vcpu=1))
        async with asyncio.timeout(TIMEOUT):
            while not await asyncio.to_thread(sim_control.pending_access, DOMID, 1):
                await asyncio.sleep(0.01)  # polls the host's state (no event for it)
        async with running(platform, opts, handed=dict(first.sup.handed_over)) as second:  # (what the exec passes)
            assert await asyncio.wait_for(early, TIMEOUT) == 1  # served by the restored function, not all-ones
            await second.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
            served = next(iter(second.sup.devices.values()))
            assert second.sup.ioreq.adopted and served.bar == bar  # type: ignore[union-attr]
            interrupts = driver.interrupts
            data = random.Random(5).randbytes(64 << 10)
            await asyncio.wait_for(blk.write(4096, data), TIMEOUT)  # the same driver, not reset
            assert await asyncio.wait_for(blk.read(4096, len(data) // 512), TIMEOUT) == data
            assert bytes(backend.disk[4096 * 512:4096 * 512 + len(data)]) == data
            assert driver.interrupts > interrupts and served.device.stats.guest_errors == 0
            await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        guest.close()
        await backend.stop()


@pytest.mark.asyncio
async def test_two_functions_placed_over_each_other_leave_the_second_unclaimed(platform, sim_host, sim_control,
                                                                                sim_dir, caplog):
    """A guest that programs two BARs at one address: the first claim stands, the second is refused
    with a logged reason (Xen's rangeset refuses an overlapping range: EEXIST), nothing breaks."""
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, arch="x86_64")
    socks = [os.path.join(sim_dir, f"blk{i}.sock") for i in range(2)]
    backends = [Backend(sock) for sock in socks]
    for backend in backends:
        await backend.start()
    devices = tuple(parse_device_arg(f"type=blk,transport=pci,bdf=00:{DEV + i:02x}.0,socket={sock}", i)
                    for i, sock in enumerate(socks))
    try:
        async with running(platform, Options(domid=DOMID, devices=devices, xenstore=False,
                                             guest_arch="x86_64")) as daemon:
            await daemon.notes.status_says(f"dom{DOMID}: 2 device(s) serving, 0 waiting")
            guest = await SimGuest.connect(sim_host.path, DOMID)
            try:
                for dev in (DEV, DEV + 1):
                    await guest.pci_config_write(sbdf(dev), 0x10, 4, 0xE000_0000)
                    await guest.pci_config_write(sbdf(dev), 0x04, 2, 0x2)
                first, second = (daemon.sup.devices[k] for k in sorted(daemon.sup.devices))
                assert first.bar == 0xE000_0000 and second.bar is None
                assert "BAR at 0xe0000000 (+0x8000) not claimed" in caplog.text
                assert await guest.mmio_read(0xE000_0000 + 0x12, 2) == 1  # the first function answers
                await guest.pci_config_write(sbdf(DEV), 0x04, 2, 0)  # the first stops decoding ...
                await guest.pci_config_write(sbdf(DEV + 1), 0x10, 4, 0xE001_0000)  # ... the second moves
                assert first.bar is None and second.bar == 0xE001_0000
            finally:
                guest.close()
    finally:
        for backend in backends:
            await backend.stop()


@pytest.mark.peer
@pytest.mark.timeout(90)
@pytest.mark.asyncio(loop_factories=["uvloop"])  # testpmd burns a CPU: run it once
async def test_virtio_pci_net_frames_loop_back_through_testpmd(platform, sim_host, sim_control, peers):
    """virtio-net over virtio-pci with MSI-X: frames the guest transmits come back from dpdk-testpmd
    (io forwarding, port looped), each once and in order, one at a time and in a burst."""
    from test_device_sim_testpmd import frame

    from tests.peers.harness import TESTPMD_FORWARDING_LOG
    from xen_vhost_sim.guest_devices import VirtioNet

    pmd, sock = peers.testpmd()
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    device = parse_device_arg(f"type=net,transport=pci,bdf=00:{DEV + 1:02x}.0,socket={sock},queues=2")
    async with running(platform, Options(domid=DOMID, devices=(device,), xenstore=False, guest_arch="x86_64")) as daemon:
        await daemon.notes.status_says(f"dom{DOMID}: 1 device(s) serving, 0 waiting")
        guest = await SimGuest.connect(sim_host.path, DOMID)
        try:
            driver = VirtioPciDriver(guest, sbdf(DEV + 1), GuestPageAllocator(guest.ram, reserve=1 << 20))
            net = await asyncio.wait_for(VirtioNet.bring_up(driver, queue_size=64), TIMEOUT)
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)
            sent = [frame(i) for i in range(8)]
            received = []
            for f in sent:
                await net.send(f)
                received.append(await net.recv(TIMEOUT))
            assert received == sent
            burst = [frame(i) for i in range(8, 16)]
            await asyncio.gather(*(net.send(f) for f in burst))
            assert [await net.recv(TIMEOUT) for _ in burst] == burst
            served = next(iter(daemon.sup.devices.values()))
            assert served.device.stats.interrupts > 0 and driver.interrupts > 0
            assert [MSI_ADDRESS, 0x31] in sim_control.domain_info(DOMID)["msis"]  # receiveq's vector
            await asyncio.wait_for(net.close(), TIMEOUT)
        finally:
            guest.close()


@pytest.mark.asyncio
async def test_enumeration_before_the_backend_answers_holds_the_vcpu_until_it_does(platform, sim_host, sim_control,
                                                                                   sim_dir, caplog):
    """The daemon claims the function before any back-end answers (``xl create -p``, then unpause):
    the guest's firmware reading its vendor id then waits, and reads the virtio function once the
    back-end is there, not all-ones (an empty slot it would skip for good)."""
    caplog.set_level(logging.INFO)
    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    sock = os.path.join(sim_dir, "blk.sock")
    backend = Backend(sock)
    try:
        async with running(platform, pci_options(sock)) as daemon:
            guest = await SimGuest.connect(sim_host.path, DOMID)
            try:
                vendor = asyncio.ensure_future(guest.pci_config_read(sbdf(DEV), 0, 4, vcpu=1))
                await daemon.notes.status_says("waiting for back-end")
                async with asyncio.timeout(TIMEOUT):
                    while "touched device 0 before its back-end was ready: holding it" not in caplog.text:
                        await asyncio.sleep(0.01)  # (the log line is the event; caplog has no waiter)
                assert not vendor.done()
                await backend.start()
                assert await asyncio.wait_for(vendor, TIMEOUT) == (0x1040 + 2) << 16 | 0x1AF4
            finally:
                guest.close()
    finally:
        await backend.stop()


@pytest.mark.parametrize("kernel_mode", ["on", "enotty"])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_functions_kicks_go_through_the_kernel_fast_path_and_follow_its_bar(sim_dir, kernel_mode):
    """With privcmd ioeventfd (Linux >= 6.7) and a zero-copy back-end, the guest's notifies of a
    virtio-pci function are completed by the kernel (the daemon sees none), also after the guest
    moved the BAR; its MSIs stay the daemon's. Without it, the user-space relay does the same."""
    from vhost_user import AsyncFrontend
    from vhost_user.aio.server import serve_unix
    from vhost_user.testing import RamDiskBlk

    from xen_vhost_master.backend.mapper import XenRegionMapper
    from xen_vhost_master.datapath.zerocopy import XenMmapExport
    from xen_vhost_master.device import Device
    from xen_vhost_master.fastpath import KernelFastPath, NotifyRoutes
    from xen_vhost_master.ioreq_server import IoreqServer
    from xen_vhost_master.log import device_logger
    from xen_vhost_master.xen.evtchn import EventChannel
    from xen_vhost_master.xen.privcmd import PrivCmd
    from xen_vhost_sim.host import SimHost
    from xen_vhost_sim.memory import Arch, bank_layout
    from xen_vhost_sim.simkernel import SimKernel

    with SimHost(os.path.join(sim_dir, "xen.sock"), privcmd_eventfd=kernel_mode) as host, host.control() as ctl:
        kernel = SimKernel(host.path)
        domid = ctl.create_domain(mem_bytes=32 << 20, arch="x86_64")
        disk = RamDiskBlk(4 << 20)
        disk.xen_mapper = XenRegionMapper(kernel)
        sock = os.path.join(sim_dir, "blk.sock")
        ready = asyncio.Event()
        backend = asyncio.ensure_future(serve_unix(lambda: disk, sock, connections=1, ready=ready.set))
        privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
        log = device_logger("xvm.test", domid, "blk0")
        ioreq = IoreqServer(privcmd, evtchn, domid, log)
        kserver = IoreqServer(privcmd, EventChannel(kernel), domid, log)  # the kernel's (fastpath.py)
        cfg = parse_device_arg(f"type=blk,transport=pci,bdf=00:{DEV:02x}.0,socket={sock}")
        bars: list[int | None] = []

        def on_bar(address: int | None, size: int) -> None:
            if bars and bars[-1] is not None:
                ioreq.remove_window(bars[-1])
            if address is not None:
                ioreq.add_window(address, size, device)
            bars.append(address)

        device = Device(cfg, connect=lambda: AsyncFrontend.connect(sock),
                        memory=XenMmapExport(domid, bank_layout(Arch.X86_64, 32 << 20), privcmd.fileno()),
                        set_irq=lambda level: ioreq.set_pci_intx(DEV, level), log=log,
                        inject_msi=ioreq.inject_msi, on_bar=on_bar)
        guest = await SimGuest.connect(host.path, domid)
        try:
            await asyncio.wait_for(ready.wait(), TIMEOUT)
            ioreq.create()
            await device.start()
            ioreq.add_function(cfg.bdf, device)
            ioreq.enable()
            available = privcmd.eventfd_ioctls_supported()
            assert available == (kernel_mode == "on")
            if available:
                kserver.create()
                kserver.enable()
                device.use_fast_path(KernelFastPath(privcmd, domid, NotifyRoutes(lambda: kserver), log).for_function())
            driver = VirtioPciDriver(guest, sbdf(DEV), GuestPageAllocator(guest.ram, reserve=1 << 20))
            blk = await asyncio.wait_for(VirtioBlk.bring_up(driver, queue_size=64), TIMEOUT)
            data = random.Random(7).randbytes(64 << 10)
            await asyncio.wait_for(blk.write(0, data), TIMEOUT)
            assert await asyncio.wait_for(blk.read(0, 128), TIMEOUT) == data
            # the guest moves the BAR (decoding off, new address, on): kicks follow it
            old = driver.bars[0][0]
            await guest.pci_config_write(sbdf(DEV), 0x04, 2, 0x4)
            await guest.pci_config_write(sbdf(DEV), 0x10, 4, old + 0x10_0000)
            await guest.pci_config_write(sbdf(DEV), 0x04, 2, 0x6)
            moved = old + 0x10_0000
            driver.bars[0] = (moved, driver.bars[0][1])
            driver.regions = {t: (a - old + moved, n) for t, (a, n) in driver.regions.items()}
            assert bars[-1] == moved
            await asyncio.wait_for(blk.write(256, data), TIMEOUT)
            assert await asyncio.wait_for(blk.read(256, 128), TIMEOUT) == data
            counters = ctl.domain_info(domid)["fastpath"]
            if available:
                assert counters["ioeventfd_consumed"] >= 4 and counters["irqfd_injected"] == 0
                assert counters["ioeventfd_passed"] == 0  # the kernel's slots hold its notifies only
                assert device.stats.notifies == 0  # every notify was completed by the kernel
                assert device.stats.per_queue_calls.get(0, 0) > 0  # used buffers: the daemon's MSIs
                assert device.fastpath is not None and set(device.fastpath.assigned) == {0}
            else:
                assert counters["ioeventfd_consumed"] == 0 and device.stats.notifies > 0
            await asyncio.wait_for(blk.close(), TIMEOUT)
            assert device.fastpath is None or device.fastpath.assigned == {}
        finally:
            guest.close()
            await ioreq.close()
            await device.close()
            await kserver.close()
            kserver.evtchn.close()
            evtchn.close()
            privcmd.close()
            backend.cancel()
            await asyncio.gather(backend, return_exceptions=True)


@pytest.mark.asyncio
async def test_an_msix_entry_rewritten_after_driver_ok_survives_a_daemon_crash(sim_host, sim_control, sim_dir,
                                                                                tmp_path):
    """The running driver moves queue 0's vector to another message (Linux does on a new CPU
    affinity); the daemon records it in its state file; it is SIGKILLed, the next process adopts the
    guest and interrupts with the new message: the driver, never reset, completes its I/O."""
    import json

    from test_lifecycle_matrix import Daemon as Program

    sim_control.create_domain(DOMID, mem_bytes=64 << 20, vcpus=2, arch="x86_64")
    sock = os.path.join(sim_dir, "blk.sock")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    daemon = Program(sim_host.path, DOMID, run, f"type=blk,transport=pci,bdf=00:{DEV:02x}.0,socket={sock}", "auto",
                     tmp_path / "daemon.log")
    daemon.cmd += ["--guest-arch", "x86_64", "--qmp-socket", ""]
    backend = Backend(sock)
    await backend.start()
    guest = await SimGuest.connect(sim_host.path, DOMID)
    try:
        daemon.start()
        await daemon.wait_log("serving virtio device")
        driver, blk = await disk_io(guest, msix=True, check=lambda o, d: None)

        def table() -> bytes:
            (device,) = json.loads((run / "state.json").read_text())["devices"].values()
            return bytes.fromhex(device["pci"]["msix_table"])

        before = table()
        await driver.retarget_vector(1, 0x41)  # vector 1: queue 0's (same address, the new CPU's vector)
        async with asyncio.timeout(TIMEOUT):
            while table() == before:
                await asyncio.sleep(0.01)  # (the state file is written by the daemon's task; no event to wait on)
        assert table()[16 + 8] == 0x41
        await daemon.kill()
        mark = daemon.mark()
        daemon.restart()
        await daemon.wait_log("taking over", mark)
        await daemon.wait_log("serving virtio device", mark)
        interrupts = driver.interrupts
        data = random.Random(7).randbytes(64 << 10)
        await asyncio.wait_for(blk.write(4096, data), TIMEOUT)  # completed only if the MSI comes as 0x41
        assert await asyncio.wait_for(blk.read(4096, len(data) // 512), TIMEOUT) == data
        assert driver.interrupts > interrupts
        assert [MSI_ADDRESS, 0x41] in sim_control.domain_info(DOMID)["msis"]
        await asyncio.wait_for(blk.close(), TIMEOUT)
    finally:
        guest.close()
        await daemon.stop()
        await backend.stop()
