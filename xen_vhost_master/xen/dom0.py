"""Is this a dom0 the daemon can work in? Asked once, before anything else touches Xen, so that a
host that can never serve a guest gets a one-line answer and a permanent exit code
(:class:`~xen_vhost_master.errors.HostError`) instead of a restart loop.

* ``/proc/xen/capabilities`` (xenfs, drivers/xen/xenfs/super.c) reads ``control_d`` in the
  control domain and nothing in any other; without xenfs mounted it is absent and says nothing.
* ``/dev/xen/privcmd`` must open: missing means no Xen or no xen-privcmd driver, EACCES/EPERM that
  this user may not use it.
"""

from __future__ import annotations

import errno
import os

from xen_vhost_master.errors import ExitCode, HostError, XenError, host_error
from xen_vhost_master.xen.kernel import Kernel

__all__ = ["CAPABILITIES", "PRIVCMD", "check_dom0"]

CAPABILITIES = "/proc/xen/capabilities"
PRIVCMD = "/dev/xen/privcmd"
CONTROL_D = b"control_d"  # drivers/xen/xenfs/super.c capabilities_read


def _capabilities(kernel: Kernel) -> bytes | None:
    """The file's text, None when it is not there (xenfs not mounted: no verdict)."""
    try:
        fd = kernel.open(CAPABILITIES, os.O_RDONLY)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return None
        raise HostError(ExitCode.NOPERM, f"cannot read {CAPABILITIES} ({errno.errorcode.get(e.errno or 0, e.errno)}): "
                                         "run as root, as the unit does") from None
    try:
        return kernel.read(fd, 4096)
    finally:
        kernel.close(fd)


def check_dom0(kernel: Kernel) -> None:
    """Raise :class:`HostError` unless this is a dom0 whose privcmd this process may open."""
    caps = _capabilities(kernel)
    if caps is not None and CONTROL_D not in caps.split():
        raise HostError(ExitCode.NOT_DOM0, f"not a Xen dom0: {CAPABILITIES} lacks control_d: run the daemon in "
                                           "the control domain (dom0)")
    try:
        fd = kernel.open(PRIVCMD)
    except OSError as e:
        problem = host_error(XenError(f"open {PRIVCMD}", e.errno or errno.EIO))
        if problem is not None:
            raise problem from None
        raise XenError(f"open {PRIVCMD}", e.errno or errno.EIO) from None
    kernel.close(fd)
