"""XEN_DOMCTL_pausedomain / unpausedomain through privcmd's HYPERCALL ioctl (docs/xen-domctl.md).

domctl is the toolstack's interface and is *not* stable: Xen refuses a ``struct xen_domctl``
whose ``interface_version`` is not its own with EACCES (xen/common/domctl.c), and the version
changes between releases. The commands used here and the fields they read (cmd, version,
domain) have not changed, so :class:`Domctl` tries the known versions, the one matching
XENVER_version first, and keeps the first one Xen accepts. If every one is refused it raises
:class:`DomctlInterfaceUnknown`.

Pauses are counted by Xen (``controller_pause_count``, xen/common/domain.c): a new domain
starts at 1 (libxl unpauses it once it is built); each pause adds one (at most 255, then
EOVERFLOW), each unpause takes one away (below 0: EINVAL); the domain runs at 0. So a pause
taken here holds the guest however often the toolstack pauses and unpauses it.
Pausing the calling domain is EINVAL; an unknown domain is ESRCH.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap

from xen_vhost_master.errors import XenError
from xen_vhost_master.xen.abi import DomctlCmd, Hypercall, xen_domctl
from xen_vhost_master.xen.privcmd import PrivCmd

__all__ = ["INTERFACE_VERSIONS", "Domctl", "DomctlInterfaceUnknown"]

log = logging.getLogger(__name__)

# XEN_DOMCTL_INTERFACE_VERSION per release (xen/include/public/domctl.h at the RELEASE-x.y.0 and
# latest x.y tags; docs/xen-domctl.md). 0x18 is the development branch after 4.21.
INTERFACE_VERSIONS: dict[tuple[int, int], int] = {
    (4, 16): 0x14,
    (4, 17): 0x15,
    (4, 18): 0x16,
    (4, 19): 0x17,
    (4, 20): 0x17,
    (4, 21): 0x17,
}
UNRELEASED_VERSION = 0x18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class DomctlInterfaceUnknown(XenError):
    """Xen answered EACCES to every known XEN_DOMCTL_INTERFACE_VERSION (a release newer than
    this table, or an XSM policy refusing domctl altogether)."""

    def __init__(self, op: str) -> None:
        super().__init__(op, errno.EACCES)


class Domctl:
    """The two domctl commands the dispatcher needs, over one (unrestricted) :class:`PrivCmd`."""

    def __init__(self, privcmd: PrivCmd) -> None:
        self.privcmd = privcmd
        self.interface_version: int | None = None  # the one Xen accepted, once known
        # The hypercall argument must stay resident while Xen copies it (privcmd pins nothing;
        # libxencall uses locked buffers for the same reason): a page of its own, locked if allowed.
        self._page = mmap.mmap(-1, mmap.PAGESIZE)
        self._arg: xen_domctl | None = xen_domctl.from_buffer(self._page)
        if _libc.mlock(ctypes.addressof(self._arg), mmap.PAGESIZE) != 0:
            log.debug("mlock of the domctl buffer failed: %s", errno.errorcode.get(ctypes.get_errno(), "?"))

    def close(self) -> None:
        self._arg = None
        self._page.close()

    def pause(self, domid: int) -> None:
        """Add one to ``domid``'s pause count (its vCPUs are descheduled before this returns)."""
        self._call(DomctlCmd.pausedomain, domid)

    def unpause(self, domid: int) -> None:
        """Take one away from ``domid``'s pause count (the guest runs again at 0)."""
        self._call(DomctlCmd.unpausedomain, domid)

    def candidates(self) -> list[int]:
        """Versions to try, most likely first: the running Xen's own release, then newest first."""
        if self.interface_version is not None:
            return [self.interface_version]
        order = sorted(set(INTERFACE_VERSIONS.values()) | {UNRELEASED_VERSION}, reverse=True)
        try:
            release = self.privcmd.xen_version()
        except XenError as e:
            log.debug("XENVER_version failed (%s): probing every domctl interface version", e)
            return order
        mine = INTERFACE_VERSIONS.get(release)
        if mine is None and release > max(INTERFACE_VERSIONS):
            mine = UNRELEASED_VERSION
        return [mine] + [v for v in order if v != mine] if mine is not None else order

    def _call(self, cmd: DomctlCmd, domid: int) -> None:
        assert self._arg is not None, "Domctl is closed"
        op = f"domctl {cmd.name} d{domid}"
        known = self.interface_version is not None
        for version in self.candidates():
            ctypes.memset(ctypes.addressof(self._arg), 0, ctypes.sizeof(self._arg))
            self._arg.cmd, self._arg.interface_version, self._arg.domain = cmd, version, domid
            try:
                self.privcmd.hypercall(Hypercall.domctl, ctypes.addressof(self._arg))
            except XenError as e:
                if e.errno == errno.EACCES and not known:
                    continue  # not this version
                self._accept(version)
                raise XenError(op, e.errno or errno.EIO) from None
            self._accept(version)
            return
        raise DomctlInterfaceUnknown(op)

    def _accept(self, version: int) -> None:
        if self.interface_version is None:
            log.info("Xen accepts domctl interface version %#x", version)
            self.interface_version = version
