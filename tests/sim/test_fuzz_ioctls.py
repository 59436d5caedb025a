"""Random ioctl payloads from the daemon's side: always a clean errno, the simulated host survives,
and no fd leaks from the SimKernel plumbing."""

from __future__ import annotations

import ctypes
import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.simkernel import SimKernel
from xen_vhost_master.xen.abi import EvtchnIoctl, GntdevIoctl, PrivcmdIoctl, ioc_size, xen_dm_op
from xen_vhost_master.xen.dmop import DeviceModel
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.gntdev import GrantDev
from xen_vhost_master.xen.privcmd import PrivCmd

ALLOWED = {
    errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.ESRCH, errno.EPERM, errno.ENOSPC, errno.EEXIST,
    errno.EFAULT, errno.E2BIG, errno.ENOTCONN, errno.EACCES, errno.ENOSYS, errno.ENOTTY,
}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def domid(sim_control: SimControl) -> int:
    """One small guest (created before ``no_fd_leak`` snapshots: its RAM memfd lives in the host)."""
    return sim_control.create_domain(mem_bytes=1 << 20)


@SETTINGS
@given(payload=st.binary(min_size=32, max_size=32))
def test_random_dm_op_buffers(kernel: SimKernel, domid: int, payload: bytes) -> None:
    with PrivCmd(kernel) as pc:
        op = xen_dm_op.from_buffer_copy(payload)
        try:
            pc.dm_op(domid, op)
        except OSError as exc:
            assert exc.errno in ALLOWED, exc
        assert DeviceModel(pc, domid).nr_vcpus() == 1  # still answering


@SETTINGS
@given(which=st.sampled_from(list(EvtchnIoctl) + list(GntdevIoctl) + [PrivcmdIoctl.RESTRICT, PrivcmdIoctl.MMAP_RESOURCE]),
       payload=st.binary(min_size=48, max_size=48))
def test_random_small_payloads(sim_control: SimControl, kernel: SimKernel, domid: int, which: int, payload: bytes) -> None:
    buf = ctypes.create_string_buffer(payload, 48 + 8 * 256)
    cls = PrivCmd if isinstance(which, PrivcmdIoctl) else EventChannel if isinstance(which, EvtchnIoctl) else GrantDev
    dev = cls(kernel)
    try:
        kernel.ioctl(dev.fileno(), which, buf)
    except OSError as exc:
        assert exc.errno in ALLOWED, (which, exc)
    finally:
        dev.close()
    assert ioc_size(which) <= 48
    assert sim_control.domain_info(domid)["domid"] == domid  # the host still answers


def test_open_map_close_leaks_no_fd(sim_control: SimControl, kernel: SimKernel, domid: int, no_fd_leak: None) -> None:
    for _ in range(3):
        with PrivCmd(kernel) as pc, EventChannel(kernel) as ev, GrantDev(kernel):
            fm = pc.map_foreign_range(domid, 0x40000, 16)
            sid = DeviceModel(pc, domid).create_ioreq_server()
            page = pc.map_resource(domid, 0, sid, 1, 1)
            page.close()
            fm.close()
            DeviceModel(pc, domid).destroy_ioreq_server(sid)
            ev.bind_unbound_port(domid)
    # The host (a thread of this process here) closes its ends when it sees EOF; a control round
    # trip after our closes is a barrier: those EOFs were readable before the request arrived.
    assert sim_control.domain_info(domid)["servers"] == []
