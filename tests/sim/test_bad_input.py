"""Bad input from the daemon's side gets the errno Linux/Xen would give; the simulator survives."""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno

import pytest

from xen_vhost_master.errors import XenError
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import (
    DmOp,
    PrivcmdIoctl,
    ResourceType,
    ioc,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
    xen_dm_op,
)
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.gntdev import GrantDev
from xen_vhost_master.xen.privcmd import PrivCmd

RAM0 = 0x40000000
MIB = 1 << 20


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)  # type: ignore[operator]
    return int(ei.value.errno or 0)


def test_wrong_domid_gives_esrch(sim_control: SimControl, kernel: SimKernel) -> None:
    with PrivCmd(kernel) as pc, EventChannel(kernel) as ev:
        assert errno_of(DeviceModel(pc, 99).nr_vcpus) == errno.ESRCH
        assert errno_of(DeviceModel(pc, 0).nr_vcpus) == errno.EPERM  # dom0 is not a remote domain
        assert errno_of(ev.bind_interdomain, 99, 1) == errno.ESRCH
        domid = sim_control.create_domain(mem_bytes=16 * MIB)
        assert errno_of(ev.bind_interdomain, domid, 1234) == errno.EINVAL  # port not allocated
        assert errno_of(pc.maximum_gpfn, 99) == errno.ESRCH
        assert pc.maximum_gpfn(domid) == ((RAM0 + 16 * MIB) >> 12) - 1


def test_unmapped_pfns_fail_per_page(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=16 * MIB)
    last = ((RAM0 + 16 * MIB) >> 12) - 1
    with PrivCmd(kernel) as pc:
        fm = pc.map_foreign(domid, array.array("Q", [0, RAM0 >> 12, last, last + 1, 1 << 40]))
        try:
            assert list(fm.failures) == [0, 1, -errno.EINVAL, 3, 2, -errno.EINVAL]  # runs: frame, count, -errno
            assert fm.failed() == [0, 3, 4]
        finally:
            fm.close()


def test_bad_mmapbatch_payloads(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=16 * MIB)
    with PrivCmd(kernel) as pc:
        m = kernel.mmap(pc.fileno(), 4 * 4096)
        try:
            gfns = array.array("Q", range(RAM0 >> 12, (RAM0 >> 12) + 4))
            errs = array.array("i", [0] * 4)
            good = dict(num=4, dom=domid, addr=m.addr, arr=gfns.buffer_info()[0], err=errs.buffer_info()[0])
            for bad, code in [
                (dict(arr=0), errno.EFAULT),
                (dict(err=8), errno.EFAULT),
                (dict(num=0), errno.EINVAL),
                (dict(num=3), errno.EINVAL),  # must cover the VMA exactly
                (dict(addr=m.addr + 4096), errno.EINVAL),
                (dict(addr=gfns.buffer_info()[0]), errno.EINVAL),  # not a privcmd VMA
            ]:
                arg = privcmd_mmapbatch_v2(**{**good, **bad})
                assert errno_of(kernel.ioctl, pc.fileno(), PrivcmdIoctl.MMAPBATCH_V2, arg) == code, bad
            assert kernel.ioctl(pc.fileno(), PrivcmdIoctl.MMAPBATCH_V2, privcmd_mmapbatch_v2(**good)) == 0
            assert list(errs) == [0, 0, 0, 0]
            # a second batch over already-mapped pages is refused
            again = privcmd_mmapbatch_v2(**good)
            assert errno_of(kernel.ioctl, pc.fileno(), PrivcmdIoctl.MMAPBATCH_V2, again) == errno.EINVAL
        finally:
            m.close()


def test_bad_dm_op_payloads(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=16 * MIB)
    with PrivCmd(kernel) as pc:
        fd = pc.fileno()

        def dm_op(op: ctypes.Array | ctypes.Structure | None, num: int = 1, size: int | None = None, ubufs: int | None = None) -> int:  # type: ignore[type-arg]
            bufs = (privcmd_dm_op_buf * 17)()
            for i in range(17):
                bufs[i].uptr = ctypes.addressof(op) if op is not None else 0
                bufs[i].size = ctypes.sizeof(op) if size is None and op is not None else (size or 0)
            arg = privcmd_dm_op(dom=domid, num=num, ubufs=ctypes.addressof(bufs) if ubufs is None else ubufs)
            return kernel.ioctl(fd, PrivcmdIoctl.DM_OP, arg)

        good = xen_dm_op(op=DmOp.nr_vcpus)
        assert dm_op(good) == 0 and good.u.nr_vcpus.vcpus == 1
        assert dm_op(None, num=0) == 0  # num == 0: nothing to do
        assert errno_of(dm_op, good, 17) == errno.E2BIG
        assert errno_of(dm_op, good, 1, 5000) == errno.E2BIG
        assert errno_of(dm_op, good, 1, None, 16) == errno.EFAULT
        assert errno_of(dm_op, good, 1, 4) == errno.EFAULT  # shorter than the op header
        assert errno_of(dm_op, xen_dm_op(op=99)) == errno.EOPNOTSUPP
        assert errno_of(dm_op, xen_dm_op(op=DmOp.nr_vcpus, pad=1)) == errno.EINVAL
        dm = DeviceModel(pc, domid)
        assert errno_of(dm.set_irq_level, 5, 1) == errno.EINVAL  # not an SPI
        assert errno_of(dm.set_irq_level, 33, 2) == errno.EINVAL
        assert errno_of(dm.inject_msi, 0xFEE00000, 0) == errno.EOPNOTSUPP  # x86-only op on an Arm guest
        assert errno_of(dm.destroy_ioreq_server, 3) == errno.ENOENT
        assert errno_of(dm.map_io_range, 3, 0x1000, 0x1FFF) == errno.ENOENT
        sid = dm.create_ioreq_server()
        dm.map_io_range(sid, 0x2000000, 0x20001FF)
        assert errno_of(dm.map_io_range, sid, 0x2000100, 0x20002FF) == errno.EEXIST
        assert errno_of(dm.map_io_range, sid, 0x3000, 0x2000) == errno.EINVAL


def test_bad_resource_requests(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=16 * MIB)
    with PrivCmd(kernel) as pc:
        sid = DeviceModel(pc, domid).create_ioreq_server()
        assert pc.resource_size(domid, ResourceType.ioreq_server, sid) == 2
        assert errno_of(pc.map_resource, domid, ResourceType.ioreq_server, sid, 0, 1) == errno.ENOENT  # BUFIOREQ_OFF
        assert errno_of(pc.map_resource, domid, ResourceType.ioreq_server, sid + 1, 1, 1) == errno.ENOENT
        assert errno_of(pc.map_resource, domid, ResourceType.ioreq_server, sid, 1, 2) == errno.EINVAL
        half = privcmd_mmap_resource(dom=domid, type=0, id=sid, idx=1, num=1, addr=0)
        assert errno_of(kernel.ioctl, pc.fileno(), PrivcmdIoctl.MMAP_RESOURCE, half) == errno.EINVAL
        assert pc.map_resource(domid, ResourceType.ioreq_server, sid, 1, 1).length == 4096


def test_unknown_and_absent_ioctls(sim_control: SimControl, kernel: SimKernel) -> None:
    with PrivCmd(kernel) as pc, EventChannel(kernel) as ev, GrantDev(kernel) as gd:
        assert errno_of(kernel.ioctl, pc.fileno(), ioc(0, "P", 0x42, 8), 0) == errno.ENOTTY
        assert pc.eventfd_ioctls_supported() is False  # the simulated kernel is a 6.1 one
        assert errno_of(kernel.ioctl, ev.fileno(), ioc(0, "E", 0x42, 4), bytearray(4)) == errno.ENOSYS
        assert errno_of(kernel.ioctl, gd.fileno(), ioc(0, "G", 3, 4), bytearray(4)) == errno.ENOTTY
        assert errno_of(pc.hypercall, 999, 0) == errno.ENOSYS
        assert pc.xen_version() == (4, 17)
        assert errno_of(ev.restrict_domid, 0) == errno.EINVAL
        ev.restrict_domid(5)
        assert errno_of(ev.bind_unbound_port, 5) == errno.EACCES
        assert errno_of(ev.unbind, 77) == errno.ENOTCONN
        assert errno_of(gd.map_grant_refs, 1, []) == errno.EINVAL
        assert errno_of(kernel.open, "/dev/xen/nonsense") == errno.ENOENT
        # the simulator is still fine
        domid = sim_control.create_domain(mem_bytes=16 * MIB)
        assert DeviceModel(pc, domid).nr_vcpus() == 1


def test_garbage_on_the_wire_drops_only_that_connection(sim_control: SimControl, kernel: SimKernel) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(kernel.path)
    s.sendall(b"\xff" * 64)
    s.settimeout(5)
    assert s.recv(16) == b""  # closed by the host
    s.close()
    assert isinstance(sim_control.create_domain(mem_bytes=MIB), int)


def test_xen_error_is_an_oserror_with_op() -> None:
    e = XenError("dm_op", errno.ESRCH)
    assert isinstance(e, OSError) and e.errno == errno.ESRCH and "dm_op" in str(e) and not e.not_supported
    assert XenError("irqfd", errno.ENOTTY).not_supported


@pytest.mark.asyncio
async def test_absurd_requests_on_the_control_node(sim_control: SimControl) -> None:
    from xen_vhost_sim.guest import SimGuest

    for kw, code in [
        (dict(mem_bytes=1 << 62), None),  # memfd/mmap refuse: some errno, no crash
        (dict(mem_bytes=4097), errno.EINVAL),
        (dict(vcpus=0), errno.EINVAL),
        (dict(holes=[(0x40000001, 4096)]), errno.EINVAL),
        (dict(arch="sparc"), errno.EINVAL),
        (dict(domid=0x7FF0), errno.EINVAL),
    ]:
        with pytest.raises(OSError) as ei:
            sim_control.create_domain(**kw)  # type: ignore[arg-type]
        assert code is None or ei.value.errno == code, kw
    domid = sim_control.create_domain(mem_bytes=MIB)
    with pytest.raises(OSError) as ei:
        sim_control.create_domain(domid=domid)
    assert ei.value.errno == errno.EEXIST
    guest = await SimGuest.connect(sim_control.path, domid)
    try:
        with pytest.raises(OSError) as ei:
            await guest.mmio_read(0x1000, 3)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            await guest.mmio_read(0x1000, 4, vcpu=9)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            guest.grant(0x10)  # not RAM
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            guest.revoke(12345)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            guest.ram.view(RAM0 + MIB - 2, 4)  # runs past the end of RAM
        sim_control.pause(domid)
        pending = asyncio.ensure_future(guest.mmio_read(0x1000, 4))
        done, _ = await asyncio.wait({pending}, timeout=0.1)
        assert not done
        sim_control.destroy_domain(domid)
        with pytest.raises(OSError) as ei:
            await asyncio.wait_for(pending, 5.0)
        assert ei.value.errno == errno.ESRCH
    finally:
        guest.close()
    assert sim_control.create_domain(mem_bytes=MIB) > 0
