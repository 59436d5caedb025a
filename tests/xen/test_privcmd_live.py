"""The adapters against a real dom0 (root, /dev/xen/*): skipped everywhere else."""

from __future__ import annotations

import errno
import os

import pytest

from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.kernel import RealKernel
from xen_vhost_master.xen.privcmd import PrivCmd

pytestmark = [
    pytest.mark.requires_xen,
    pytest.mark.skipif(not os.access("/dev/xen/privcmd", os.R_OK | os.W_OK), reason="needs a Xen dom0 (/dev/xen/privcmd)"),
]


def test_live_xen_version_and_eventfd_probe() -> None:
    with PrivCmd(RealKernel()) as pc:
        major, minor = pc.xen_version()
        assert major >= 4
        assert isinstance(pc.eventfd_ioctls_supported(), bool)


def test_live_evtchn_unbind_of_unbound_port_is_enotconn() -> None:
    with EventChannel(RealKernel()) as ev:
        with pytest.raises(OSError) as ei:
            ev.unbind(4000)
        assert ei.value.errno == errno.ENOTCONN
