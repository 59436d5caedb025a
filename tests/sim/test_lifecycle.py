"""Domain pause/shutdown/destroy, x86 layout, evtchn RESET, platform_from_env, and a privcmd fd that
keeps working in another process (what a XEN_MMAP back-end receives)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_master.platform import host_arch, platform_from_env
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.kernel import RealKernel
from xen_vhost_master.xen.privcmd import PrivCmd

TIMEOUT = 5.0
RAM0 = 0x40000000
MIB = 1 << 20


@pytest.mark.asyncio
async def test_pause_blocks_vcpus_and_destroy_ends_the_domain(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=16 * MIB)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        guest.ram.view(RAM0, 4)[:] = b"live"
        sim_control.pause(domid)
        assert sim_control.domain_info(domid)["paused"]
        read = asyncio.ensure_future(guest.mmio_read(0x1000, 4))
        done, _ = await asyncio.wait({read}, timeout=0.2)
        assert not done  # a paused vCPU does not run
        sim_control.unpause(domid)
        assert await asyncio.wait_for(read, TIMEOUT) == 0xFFFFFFFF
        sim_control.shutdown(domid, "reboot")
        assert sim_control.domain_info(domid)["shutdown"] == "reboot"
        with PrivCmd(kernel) as pc:
            fm = pc.map_foreign_range(domid, RAM0 >> 12, 1)
            sim_control.destroy_domain(domid)
            assert bytes(fm.view()[:4]) == b"live"  # mapped pages outlive the domain, as on Xen
            fm.close()
            with pytest.raises(XenError) as ei:
                DeviceModel(pc, domid).nr_vcpus()
            assert ei.value.errno == errno.ESRCH
    finally:
        guest.close()
    with pytest.raises(OSError) as oe:
        sim_control.domain_info(domid)
    assert oe.value.errno == errno.ESRCH


def test_x86_layout_puts_ram_above_4g_and_has_msi_not_spis(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=4096 * MIB, arch="x86_64")
    info = sim_control.domain_info(domid)
    assert info["banks"] == [[0, 0xF0000000], [1 << 32, 0x10000000]]
    with PrivCmd(kernel) as pc:
        dm = DeviceModel(pc, domid)
        dm.inject_msi(0xFEE00000, 0x4041)
        with pytest.raises(XenError) as ei:
            dm.set_irq_level(33, 1)
        assert ei.value.errno == errno.EOPNOTSUPP
        assert pc.maximum_gpfn(domid) == ((1 << 32) + 0x10000000 >> 12) - 1
    assert sim_control.domain_info(domid)["msis"] == [[0xFEE00000, 0x4041]]


def test_arm_large_guest_gets_ram1_bank(sim_control: SimControl) -> None:
    domid = sim_control.create_domain(mem_bytes=4096 * MIB)
    assert sim_control.domain_info(domid)["banks"] == [[RAM0, 0xC0000000], [0x200000000, 0x40000000]]


@pytest.mark.asyncio
async def test_evtchn_reset_forgets_delivered_events(
    sim_host: SimHost, sim_control: SimControl, kernel: SimKernel
) -> None:
    domid = sim_control.create_domain(mem_bytes=MIB)
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        with EventChannel(kernel) as ev:
            gport = guest.evtchn_alloc_unbound(0)
            local = ev.bind_interdomain(domid, gport)  # raises the conservative event
            ev.reset()
            assert ev.read_pending() == []
            guest.evtchn_notify(gport)  # unmasked by the reset: delivered
            assert await asyncio.wait_for(ev.wait(), TIMEOUT) == [local]
    finally:
        guest.close()


def test_platform_from_env_picks_sim_or_real(sim_host: SimHost) -> None:
    sim = platform_from_env({"XEN_VHOST_SIM": sim_host.path})
    assert isinstance(sim.kernel, SimKernel) and sim.kernel.path == sim_host.path
    assert sim.guest_arch == "arm64" and sim.xenstore_sockets == () and sim.sim_ram_memfd is not None
    assert "SIMULATED" in sim.name and sim_host.path in sim.name
    real = platform_from_env({})
    assert isinstance(real.kernel, RealKernel) and real.xenstore_sockets is None and real.sim_ram_memfd is None
    assert real.guest_arch == host_arch()


CHILD = r"""
import sys
from xen_vhost_master.errors import XenError
from xen_vhost_master.platform import host_arch, platform_from_env
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.privcmd import PrivCmd
fd, domid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pc = PrivCmd(SimKernel(path), fd=fd)
fm = pc.map_foreign_range(domid, 0x40000, 1)
sys.stdout.write(bytes(fm.view()[:6]).decode() + "\n")
fm.view()[6:12] = b"child!"
fm.close()
try:
    pc.map_foreign_range(domid + 1, 0x40000, 1)
except XenError as e:
    sys.stdout.write(f"errno {e.errno}\n")
"""


def test_privcmd_fd_handed_to_another_process_maps_the_guest(sim_host: SimHost, sim_control: SimControl) -> None:
    domid = sim_control.create_domain(mem_bytes=MIB)
    sim_control.create_domain(mem_bytes=MIB)
    with SimControl(sim_host.path) as ctl:
        assert ctl.domain_info(domid)["banks"] == [[RAM0, MIB]]
    kernel = SimKernel(sim_host.path)
    with PrivCmd(kernel) as pc:
        own = pc.map_foreign_range(domid, RAM0 >> 12, 1)
        own.view()[:6] = b"parent"
        pc.restrict(domid)  # as a front-end does before handing the fd to a back-end
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(pc.fileno()), str(domid), sim_host.path],
            pass_fds=(pc.fileno(),), env=env, capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split("\n")
        assert out[0] == "parent"
        assert out[1] == f"errno {errno.EPERM}"
        assert bytes(own.view()[6:12]) == b"child!"
        own.close()


@pytest.mark.asyncio
async def test_a_dead_host_gives_errors_not_hangs(sim_dir: str) -> None:
    host = SimHost(os.path.join(sim_dir, "dying.sock")).start()
    kernel = SimKernel(host.path)
    try:
        with host.control() as ctl:
            domid = ctl.create_domain(mem_bytes=MIB)
        pc, ev = PrivCmd(kernel), EventChannel(kernel)
        host.stop()
        with pytest.raises(XenError) as ei:
            DeviceModel(pc, domid).nr_vcpus()
        assert ei.value.errno == errno.EIO
        with pytest.raises(XenError) as ei:
            await asyncio.wait_for(ev.wait(), TIMEOUT)
        assert ei.value.errno == errno.ENODEV
        with pytest.raises(XenError) as ei:
            PrivCmd(kernel)
        assert ei.value.errno == errno.ENOENT
        pc.close()
        ev.close()
    finally:
        host.stop()
