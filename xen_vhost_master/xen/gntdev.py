"""/dev/xen/gntdev: map a guest's grant references (MAP_GRANT_REF + mmap), unmap, unmap notify.

A read-only grant can only be mapped without PROT_WRITE: asking for a writable mapping fails
(EINVAL, as ``gntdev_mmap`` reports a GNTST_permission_denied), and a read-only mapping's view is a
read-only memoryview.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from xen_vhost_master.errors import XenError
from xen_vhost_master.xen.abi import (
    XEN_PAGE_SHIFT,
    GntdevIoctl,
    GntdevUnmapNotify,
    ioctl_gntdev_unmap_grant_ref,
    ioctl_gntdev_unmap_notify,
    map_grant_ref_type,
)
from xen_vhost_master.xen.device_file import XenDeviceFile
from xen_vhost_master.xen.kernel import PROT_READ, PROT_WRITE, Kernel, Mapping

__all__ = ["GNTDEV_PATH", "GrantDev", "GrantMapping"]

GNTDEV_PATH = "/dev/xen/gntdev"


@dataclass
class GrantMapping:
    index: int
    count: int
    mapping: Mapping | None

    def view(self) -> memoryview:
        if self.mapping is None:
            raise ValueError("grant mapping is not mmapped")
        return self.mapping.view()


class GrantDev(XenDeviceFile):
    """One open /dev/xen/gntdev."""

    def __init__(self, kernel: Kernel, path: str = GNTDEV_PATH, *, fd: int | None = None) -> None:
        """Opens ``path``, or adopts ``fd`` (e.g. a gntdev fd a front-end passed over vhost-user)."""
        super().__init__(kernel, path, os.O_RDWR, fd=fd)

    def __enter__(self) -> GrantDev:
        return self

    def map_grant_refs(self, domid: int, refs: list[int], *, writable: bool = True) -> GrantMapping:
        """MAP_GRANT_REF then mmap of ``refs`` of ``domid``, pages in order.

        One call maps any list of references (they need not be consecutive, nor distinct): one
        ioctl with the array of (domid, ref) pairs, one mmap at the returned index of
        ``len(refs)`` pages. The protection is the whole mapping's: ``writable`` maps every page
        writable, so one read-only grant among ``refs`` makes the mmap fail (EINVAL) and nothing
        stays mapped; map read-only and writable pages in separate calls."""
        if not refs:
            raise XenError("gntdev map_grant_ref", errno.EINVAL)
        req = map_grant_ref_type(len(refs))()
        req.count = len(refs)
        for i, ref in enumerate(refs):
            req.refs[i].domid, req.refs[i].ref = domid, ref
        self._ioctl("gntdev map_grant_ref", GntdevIoctl.MAP_GRANT_REF, req)
        gm = GrantMapping(int(req.index), len(refs), None)
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        try:
            gm.mapping = self.kernel.mmap(self.fd, len(refs) << XEN_PAGE_SHIFT, prot, offset=gm.index)
        except OSError as exc:
            self._unmap_index(gm)
            raise XenError("gntdev mmap", exc.errno or errno.EIO) from None
        return gm

    def set_unmap_notify(self, gm: GrantMapping, offset: int, action: GntdevUnmapNotify, port: int = 0) -> None:
        """At unmap: clear the byte at ``offset`` and/or notify local event channel ``port``."""
        arg = ioctl_gntdev_unmap_notify(gm.index + offset, int(action), port)
        self._ioctl("gntdev set_unmap_notify", GntdevIoctl.SET_UNMAP_NOTIFY, arg)

    def unmap(self, gm: GrantMapping) -> None:
        if gm.mapping is not None:
            gm.mapping.close()
            gm.mapping = None
        self._unmap_index(gm)

    def _unmap_index(self, gm: GrantMapping) -> None:
        self._ioctl("gntdev unmap_grant_ref", GntdevIoctl.UNMAP_GRANT_REF, ioctl_gntdev_unmap_grant_ref(gm.index, gm.count))
