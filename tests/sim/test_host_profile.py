"""The simulated host can play hosts the daemon cannot serve from (``SimControl.set_host``),
answering as the real ones do: device nodes missing (ENOENT) or refusing the user (EACCES), a
domU's or a dom0's /proc/xen/capabilities or none (no xenfs), a Xen without CONFIG_IOREQ_SERVER
(every dm_op ENOSYS). The daemon's dom0 check (``xen/dom0.py``) reads them through the kernel object
like any other."""

from __future__ import annotations

import errno
import os

import pytest

from xen_vhost_master.errors import ExitCode, HostError, XenError
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.dom0 import check_dom0
from xen_vhost_master.xen.privcmd import PrivCmd
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel


def test_a_dom0_by_default_reads_control_d_and_opens_every_node(sim_control: SimControl, kernel: SimKernel) -> None:
    fd = kernel.open("/proc/xen/capabilities", os.O_RDONLY)
    try:
        assert kernel.read(fd, 4096) == b"control_d\n"
    finally:
        kernel.close(fd)
    check_dom0(kernel)


@pytest.mark.parametrize(("profile", "code", "message"), [
    ({"devices": "missing"}, ExitCode.NOT_DOM0, "/dev/xen/privcmd is missing (ENOENT)"),
    ({"devices": "eacces"}, ExitCode.NOPERM, "permission denied opening /dev/xen/privcmd (EACCES)"),
    ({"capabilities": ""}, ExitCode.NOT_DOM0, "/proc/xen/capabilities lacks control_d"),
])
def test_hosts_that_are_no_usable_dom0_are_named(sim_control: SimControl, kernel: SimKernel,
                                                 profile: dict[str, object], code: ExitCode, message: str) -> None:
    sim_control.set_host(**profile)
    with pytest.raises(HostError) as e:
        check_dom0(kernel)
    assert e.value.code == code and message in str(e.value) and "\n" not in str(e.value)


def test_without_xenfs_privcmd_decides(sim_control: SimControl, kernel: SimKernel) -> None:
    sim_control.set_host(capabilities=None)
    with pytest.raises(OSError) as e:
        kernel.open("/proc/xen/capabilities", os.O_RDONLY)
    assert e.value.errno == errno.ENOENT
    check_dom0(kernel)  # no verdict from the file: privcmd opens, so on we go


def test_xen_without_ioreq_server_answers_every_dm_op_enosys(sim_control: SimControl, kernel: SimKernel) -> None:
    domid = sim_control.create_domain(mem_bytes=1 << 20)
    with PrivCmd(kernel) as pc:
        dm = DeviceModel(pc, domid)
        assert dm.nr_vcpus() >= 1
        assert sim_control.set_host(ioreq_server=False)["ioreq_server"] is False
        for op in (dm.nr_vcpus, dm.create_ioreq_server):
            with pytest.raises(XenError) as e:
                op()
            assert e.value.errno == errno.ENOSYS
