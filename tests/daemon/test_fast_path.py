"""The kernel fast path (privcmd ioeventfd/irqfd, Linux >= 6.7) through the daemon's code against
the simulator's model of the kernel: with it, the guest's notifies and the back-end's interrupts
bypass the daemon (counted in the simulator); without it (ENOTTY: Debian 12's 6.1, EOPNOTSUPP: not
configured) the user-space relay does the same work. I/O verified either way."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from vhost_user import AsyncFrontend
from vhost_user.aio.server import serve_unix
from vhost_user.testing import RamDiskBlk
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.fastpath import KernelFastPath, NotifyRoutes
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.zerocopy import XenMmapExport
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.memory import Arch, bank_layout
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_master.backend.mapper import XenRegionMapper

BASE, IRQ, TIMEOUT = 0x0200_0000, 33, 30.0


@pytest.mark.parametrize("kernel_mode", ["on", "enotty", "eopnotsupp"])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_io_with_and_without_the_kernel_fast_path(sim_dir, kernel_mode):
    with SimHost(os.path.join(sim_dir, "xen.sock"), privcmd_eventfd=kernel_mode) as host, host.control() as ctl:
        kernel = SimKernel(host.path)
        domid = ctl.create_domain(mem_bytes=32 << 20)
        disk = RamDiskBlk(4 << 20)
        disk.xen_mapper = XenRegionMapper(kernel)
        sock = os.path.join(sim_dir, "blk.sock")
        ready = asyncio.Event()
        backend = asyncio.ensure_future(serve_unix(lambda: disk, sock, connections=1, ready=ready.set))
        privcmd, evtchn = PrivCmd(kernel), EventChannel(kernel)
        log = device_logger("xvm.test", domid, "blk0")
        ioreq = IoreqServer(privcmd, evtchn, domid, log)
        kserver = IoreqServer(privcmd, EventChannel(kernel), domid, log)  # the kernel's (fastpath.py)
        device = Device(DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=sock),
                        connect=lambda: AsyncFrontend.connect(sock),
                        memory=XenMmapExport(domid, bank_layout(Arch.ARM64, 32 << 20), privcmd.fileno()),
                        set_irq=lambda level: ioreq.set_irq(IRQ, level), log=log)
        guest = await SimGuest.connect(host.path, domid)
        try:
            await asyncio.wait_for(ready.wait(), TIMEOUT)
            ioreq.create()
            await device.start()
            ioreq.add_window(BASE, 0x200, device)
            ioreq.enable()
            available = privcmd.eventfd_ioctls_supported()
            assert available == (kernel_mode == "on")
            if available:
                kserver.create()
                kserver.enable()
                device.use_fast_path(KernelFastPath(privcmd, domid, NotifyRoutes(lambda: kserver), log).for_device(BASE, IRQ))
            blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
            data = random.Random(7).randbytes(256 << 10)
            for i in range(4):  # several rounds: interrupts must keep arriving
                chunk = data[i * 65536:(i + 1) * 65536]
                await asyncio.wait_for(blk.batch([BlkOp("write", 128 * i, data=chunk)]), TIMEOUT)
            got = await asyncio.wait_for(blk.batch([BlkOp("read", 128 * i, count=128) for i in range(4)]), TIMEOUT)
            assert b"".join(got) == data and bytes(disk.disk[: len(data)]) == data
            counters = ctl.domain_info(domid)["fastpath"]
            assert sorted(device.fastpath.assigned if device.fastpath else ()) == ([0] if available else [])
            if available:
                assert counters["ioeventfd_consumed"] > 0 and counters["irqfd_injected"] > 0
                # The kernel's handler saw no write it does not own (InterruptACK, Status...): in a
                # slot it shares with user space it would store READY back over the daemon's answer.
                assert counters["ioeventfd_passed"] == 0
                assert device.stats.notifies == 0  # every QueueNotify was completed by the kernel
                assert device.stats.per_queue_calls == {}  # and every interrupt raised by it
            else:
                assert counters["ioeventfd_consumed"] == 0 and device.stats.notifies > 0
            await blk.close()  # reset: the fast path is deassigned with the stopped queue
            assert device.fastpath is None or device.fastpath.assigned == {}
            assert ctl.domain_info(domid)["fastpath"]["ioeventfds"] in (0, [], {})
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


@pytest.mark.parametrize("use,memory", [(True, "xen-mmap"), (False, "xen-mmap"), (True, "shadow")],
                         ids=["default", "no-kernel-fast-path", "shadow"])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_the_daemon_leaves_the_kernel_fast_path_unused_when_told(platform, sim_host, sim_control, sim_dir, use,
                                                                      memory):
    """``--no-kernel-fast-path`` (Options.kernel_fast_path): on a kernel with privcmd
    ioeventfd/irqfd, a zero-copy device's notifies and interrupts are relayed by the daemon, as on
    a kernel without it (``make bench-xen`` compares both in one boot); by default the kernel takes them.
    A shadow-path device never uses it (the daemon must see every kick to copy), and its guest
    gets no kernel server."""
    from test_waiting_backend import running

    from xen_vhost_master.config import parse_device_arg
    from xen_vhost_master.supervisor import Options

    assert sim_control.set_privcmd_eventfd("on") == "on"
    domid = 5
    sim_control.create_domain(domid, mem_bytes=32 << 20, vcpus=2)
    disk = RamDiskBlk(4 << 20)
    disk.xen_mapper = XenRegionMapper(SimKernel(sim_host.path))
    sock = os.path.join(sim_dir, "blk.sock")
    ready = asyncio.Event()
    backend = asyncio.ensure_future(serve_unix(lambda: disk, sock, ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        cfg = parse_device_arg(f"type=blk,base={BASE:#x},irq={IRQ},socket={sock},memory={memory}")
        opt = Options(domid=domid, devices=(cfg,), xenstore=False, guest_arch="arm64", kernel_fast_path=use)
        async with running(platform, opt) as daemon:
            guest = await SimGuest.connect(sim_host.path, domid)
            try:
                blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
                data = random.Random(5).randbytes(64 << 10)
                await asyncio.wait_for(blk.batch([BlkOp("write", 8, data=data)]), TIMEOUT)
                (got,) = await asyncio.wait_for(blk.batch([BlkOp("read", 8, count=128)]), TIMEOUT)
                assert got == data and bytes(disk.disk[8 * 512:8 * 512 + len(data)]) == data
                status = daemon.sup.status()
                shown = daemon.device(0)
                kernel = use and memory == "xen-mmap"
                assert shown["data_path"] == memory
                assert status["kernel_fast_path"] is use
                assert shown["kernel_queues"] == ([0] if kernel else [])
                counters = sim_control.domain_info(domid)["fastpath"]
                served = daemon.sup.devices[BASE].device.stats
                # the kernel's own server (fastpath.py) exists once a queue took the fast path
                assert len(sim_control.domain_info(domid)["servers"]) == (2 if kernel else 1)
                if kernel:
                    assert counters["ioeventfd_consumed"] > 0 and served.notifies == 0
                else:
                    assert counters["ioeventfd_consumed"] == 0 and served.notifies > 0 and served.interrupts > 0
                await blk.close()
            finally:
                guest.close()
    finally:
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)


@pytest.mark.parametrize(("argv", "use"), [([], True), (["--no-kernel-fast-path"], False)])
def test_the_cli_flag_reaches_the_options(tmp_path, argv, use):
    from xen_vhost_master import cli
    from xen_vhost_master.instance import GuestDomain

    args = cli.parse_args(["--domain", "5", "--config-dir", str(tmp_path), "--runtime-dir", str(tmp_path), *argv])
    assert cli._options(args, GuestDomain(5, "g")).kernel_fast_path is use


@pytest.mark.parametrize("how", ["SIGKILL", "SIGHUP"])
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemons run uvloop in their own processes
async def test_a_daemon_gone_with_a_queue_on_the_kernel_fast_path_leaves_its_successor_every_access(
        start_sim, sim_dir, tmp_path, how):
    """The fast path's notify registers live on an IOREQ server of their own (fastpath.py). A
    daemon SIGKILLed with its queue there leaves that server enabled with the register routed to
    it; the guest's next kick blocks its vCPU in it (no ioeventfd answers it any more). The
    successor adopts both servers (as the daemon's own after any crash), serves that kick through
    its own window, and I/O goes on with the kernel answering kicks on the adopted server again.
    A SIGHUP handover (the process re-executes itself) gives its queues back and leaves the
    server to the next image the same way. Never more than the two servers; a clean stop leaves
    none."""
    import signal
    import subprocess

    from tests.daemon.test_daemon_cli import BIN, DOMID, DaemonLog, daemon_env, stop
    from xen_vhost_sim.guest import SimControl

    _sim, sim_path = start_sim(sim_dir)
    with SimControl(sim_path) as ctl:
        assert ctl.set_privcmd_eventfd("on") == "on"
    runtime = tmp_path / "run"
    runtime.mkdir()
    disk = RamDiskBlk(8 << 20)
    disk.xen_mapper = XenRegionMapper(SimKernel(sim_path))
    ready = asyncio.Event()
    backend = asyncio.ensure_future(serve_unix(lambda: disk, str(runtime / "0.sock"), ready=ready.set))
    cmd = [str(BIN / "xen-vhost-master"), "--domid", str(DOMID), "--runtime-dir", str(runtime)]
    first = subprocess.Popen(cmd, env=daemon_env(sim_path), stderr=subprocess.PIPE)
    second = None
    guest = None
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        await DaemonLog(first).wait_for("serving: ")
        guest = await SimGuest.connect(sim_path, DOMID)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
        data = random.Random(3).randbytes(64 << 10)
        await asyncio.wait_for(blk.batch([BlkOp("write", 0, data=data)]), TIMEOUT)
        with SimControl(sim_path) as ctl:
            info = ctl.domain_info(DOMID)
            assert info["fastpath"]["ioeventfd_consumed"] > 0 and info["fastpath"]["ioeventfd_passed"] == 0
            assert len(info["servers"]) == 2  # the daemon's and the kernel's
        more = random.Random(4).randbytes(64 << 10)
        if how == "SIGKILL":
            first.kill()
            first.wait(TIMEOUT)
            pending = asyncio.ensure_future(blk.batch([BlkOp("write", 2048, data=more)]))
            second = subprocess.Popen(cmd, env=daemon_env(sim_path), stderr=subprocess.PIPE)
            log = DaemonLog(second)
        else:
            first.send_signal(signal.SIGHUP)
            pending = asyncio.ensure_future(blk.batch([BlkOp("write", 2048, data=more)]))
            second, first = first, None
            log = DaemonLog(second)
        await log.wait_for("ioreq server 0 adopted")
        await log.wait_for("ioreq server 1 adopted")
        await log.wait_for("kernel fast path available")
        try:
            await asyncio.wait_for(pending, TIMEOUT)
        except Exception as e:
            raise AssertionError(f"the kick left in the old kernel server was not served ({e!r}):\n"
                                 + await log.ended()) from None
        got = await asyncio.wait_for(blk.batch([BlkOp("read", 0, count=128), BlkOp("read", 2048, count=128)]), TIMEOUT)
        assert got == [data, more] and bytes(disk.disk[2048 * 512:2048 * 512 + len(more)]) == more
        with SimControl(sim_path) as ctl:
            info = ctl.domain_info(DOMID)
            assert info["servers"] == [0, 1]
            assert info["fastpath"]["ioeventfd_passed"] == 0
        kicked = info["fastpath"]["ioeventfd_consumed"]
        await asyncio.wait_for(blk.batch([BlkOp("write", 4096, data=more)]), TIMEOUT)
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["fastpath"]["ioeventfd_consumed"] > kicked  # the kernel's again
        await asyncio.wait_for(blk.close(), TIMEOUT)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, second.wait, TIMEOUT) == 0
        with SimControl(sim_path) as ctl:
            assert ctl.domain_info(DOMID)["servers"] == []
    finally:
        if guest is not None:
            guest.close()
        for proc in (first, second):
            if proc is not None:
                stop(proc)
                if proc.stderr is not None:
                    proc.stderr.close()
        backend.cancel()
        await asyncio.gather(backend, return_exceptions=True)
