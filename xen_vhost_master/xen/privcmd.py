"""/dev/xen/privcmd: hypercalls, foreign mapping (MMAPBATCH_V2), DM_OP, MMAP_RESOURCE, RESTRICT,
and the Linux >= 6.7 IRQFD / IOEVENTFD (detect with :meth:`PrivCmd.eventfd_ioctls_supported`).

All access goes through a :class:`~xen_vhost_master.xen.kernel.Kernel`; failures raise
:class:`~xen_vhost_master.errors.XenError`.
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import mmap as _mmap
import os
from dataclasses import dataclass

from xen_vhost_master.errors import XenError
from xen_vhost_master.xen.abi import (
    XEN_PAGE_SHIFT,
    Hypercall,
    PrivcmdIoctl,
    XenMem,
    XenVer,
    privcmd_dm_op,
    privcmd_dm_op_buf,
    privcmd_hypercall,
    privcmd_ioeventfd,
    privcmd_irqfd,
    privcmd_mmap_resource,
    privcmd_mmapbatch_v2,
    PRIVCMD_IRQFD_FLAG_DEASSIGN,
)
from xen_vhost_master.xen.device_file import XenDeviceFile
from xen_vhost_master.xen.kernel import PROT_READ, PROT_WRITE, Kernel, Mapping

__all__ = ["ForeignMapping", "PreparedDmOp", "PrivCmd", "PRIVCMD_PATH"]

log = logging.getLogger(__name__)

PRIVCMD_PATH = "/dev/xen/privcmd"


def _vma_length(num_frames: int) -> int:
    """privcmd VMA size for ``num_frames`` Xen 4 KiB frames (64 KiB-page arm64 kernels round up)."""
    page = _mmap.PAGESIZE
    return -(-(num_frames << XEN_PAGE_SHIFT) // page) * page


@dataclass
class ForeignMapping:
    """A foreign mapping of ``num`` guest frames; ``errors[i]`` is 0 or ``-errno`` for frame ``i``."""

    mapping: Mapping
    num: int
    errors: array.array[int]

    def ok(self) -> bool:
        return not any(self.errors)

    def failed(self) -> list[int]:
        """Indices of frames that did not map (their bytes are inaccessible)."""
        if not any(self.errors):
            return []
        return [i for i, e in enumerate(self.errors) if e]

    def view(self) -> memoryview:
        return self.mapping.view()

    def close(self) -> None:
        self.mapping.close()


class PrivCmd(XenDeviceFile):
    """One open /dev/xen/privcmd."""

    def __init__(self, kernel: Kernel, path: str = PRIVCMD_PATH, *, fd: int | None = None) -> None:
        super().__init__(kernel, path, os.O_RDWR, fd=fd)

    def __enter__(self) -> PrivCmd:
        return self

    # ------------------------------------------------------------ hypercalls
    def hypercall(self, op: int, *args: int) -> int:
        h = privcmd_hypercall(op, (ctypes.c_uint64 * 5)(*args))
        return self._ioctl(f"hypercall {op}", PrivcmdIoctl.HYPERCALL, h)

    def xen_version(self) -> tuple[int, int]:
        v = self.hypercall(Hypercall.xen_version, XenVer.version, 0)
        return v >> 16, v & 0xFFFF

    def maximum_gpfn(self, domid: int) -> int:
        """XENMEM_maximum_gpfn: the highest GFN of ``domid`` (an upper bound of its RAM)."""
        dom = ctypes.c_uint16(domid)
        return self.hypercall(Hypercall.memory_op, XenMem.maximum_gpfn, ctypes.addressof(dom))

    def restrict(self, domid: int) -> None:
        """IOCTL_PRIVCMD_RESTRICT: this fd may only target ``domid`` from now on (and no hypercalls)."""
        dom = ctypes.c_uint16(domid)
        self._ioctl("restrict", PrivcmdIoctl.RESTRICT, dom)

    # ------------------------------------------------------------ dm_op
    def dm_op(self, domid: int, *bufs: ctypes.Structure | ctypes.Array) -> int:  # type: ignore[type-arg]
        """IOCTL_PRIVCMD_DM_OP with ``bufs`` (bufs[0] is the xen_dm_op); OUT fields land in place."""
        return self.prepare_dm_op(domid, *bufs)()

    def prepare_dm_op(self, domid: int, *bufs: ctypes.Structure | ctypes.Array) -> PreparedDmOp:  # type: ignore[type-arg]
        """:meth:`dm_op`'s argument built once: each call of the result issues it again, with
        ``bufs`` as they are then (a dm_op the hot path repeats, e.g. an interrupt line change)."""
        return PreparedDmOp(self, domid, bufs)

    # ------------------------------------------------------------ foreign mapping
    def map_foreign(self, domid: int, gfns: array.array[int] | memoryview, *, prot: int = PROT_READ | PROT_WRITE) -> ForeignMapping:
        """mmap + MMAPBATCH_V2 of ``gfns`` (a u64 array, used in place). Per-frame errors are reported
        in ``errors``; the ioctl's ENOENT (paged-out frames) is reported there too, not raised."""
        mv = memoryview(gfns).cast("B").cast("Q") if not isinstance(gfns, memoryview) else gfns
        num = len(mv)
        if num == 0:
            raise XenError("mmapbatch_v2", errno.EINVAL)
        src = gfns if isinstance(gfns, array.array) and gfns.typecode == "Q" else array.array("Q", mv.tobytes())
        errs = array.array("i", bytes(4 * num))
        try:
            mapping = self.kernel.mmap(self.fd, _vma_length(num), prot)
        except OSError as exc:
            raise XenError("mmap privcmd", exc.errno or errno.EIO) from None
        m = privcmd_mmapbatch_v2(
            num=num, dom=domid, addr=mapping.addr, arr=src.buffer_info()[0], err=errs.buffer_info()[0]
        )
        try:
            self.kernel.ioctl(self.fd, PrivcmdIoctl.MMAPBATCH_V2, m)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                mapping.close()
                raise XenError("mmapbatch_v2", exc.errno or errno.EIO) from None
        return ForeignMapping(mapping, num, errs)

    def retry_paged(self, fm: ForeignMapping, domid: int, gfns: array.array[int]) -> int:
        """Re-issue MMAPBATCH_V2 for the frames of ``fm`` that failed with ENOENT (paged out or
        shared: Xen pages them in, retry later), run by run on the same VMA. Updates ``fm.errors``;
        returns how many frames still fail with ENOENT."""
        idx = [i for i, e in enumerate(fm.errors) if e == -errno.ENOENT]
        runs: list[tuple[int, int]] = []
        for i in idx:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        left = 0
        for first, n in runs:
            sub = array.array("Q", gfns[first : first + n])
            errs = array.array("i", bytes(4 * n))
            m = privcmd_mmapbatch_v2(
                num=n, dom=domid, addr=fm.mapping.addr + (first << XEN_PAGE_SHIFT),
                arr=sub.buffer_info()[0], err=errs.buffer_info()[0],
            )
            try:
                self.kernel.ioctl(self.fd, PrivcmdIoctl.MMAPBATCH_V2, m)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise XenError("mmapbatch_v2 retry", exc.errno or errno.EIO) from None
            fm.errors[first : first + n] = errs
            left += sum(1 for e in errs if e == -errno.ENOENT)
        return left

    def map_foreign_range(self, domid: int, first_gfn: int, count: int, *, prot: int = PROT_READ | PROT_WRITE) -> ForeignMapping:
        """Foreign-map ``count`` consecutive frames from ``first_gfn`` (array built in C, not a list)."""
        return self.map_foreign(domid, array.array("Q", range(first_gfn, first_gfn + count)), prot=prot)

    # ------------------------------------------------------------ resources
    def resource_size(self, domid: int, rtype: int, rid: int) -> int:
        r = privcmd_mmap_resource(dom=domid, type=rtype, id=rid, idx=0, num=0, addr=0)
        self._ioctl("mmap_resource size", PrivcmdIoctl.MMAP_RESOURCE, r)
        return int(r.num)

    def map_resource(self, domid: int, rtype: int, rid: int, idx: int, num: int) -> Mapping:
        """mmap + MMAP_RESOURCE: e.g. the ioreq page is (type=ioreq_server, id=server, idx=1, num=1)."""
        try:
            mapping = self.kernel.mmap(self.fd, _vma_length(num))
        except OSError as exc:
            raise XenError("mmap privcmd", exc.errno or errno.EIO) from None
        r = privcmd_mmap_resource(dom=domid, type=rtype, id=rid, idx=idx, num=num, addr=mapping.addr)
        try:
            self._ioctl("mmap_resource", PrivcmdIoctl.MMAP_RESOURCE, r)
        except XenError:
            mapping.close()
            raise
        return mapping

    # ------------------------------------------------------------ eventfd fast paths (Linux >= 6.7)
    def irqfd(self, arg: privcmd_irqfd) -> None:
        self._ioctl("irqfd", PrivcmdIoctl.IRQFD, arg)

    def ioeventfd(self, arg: privcmd_ioeventfd) -> None:
        self._ioctl("ioeventfd", PrivcmdIoctl.IOEVENTFD, arg)

    def eventfd_ioctls_supported(self) -> bool:
        """Cheap probe: a DEASSIGN of a never-assigned fd. ENOTTY (kernel < 6.7) or EOPNOTSUPP
        (no CONFIG_XEN_PRIVCMD_EVENTFD) mean absent; any other answer means present."""
        probe = privcmd_irqfd(dm_op=0, size=0, fd=0xFFFFFFFF, flags=PRIVCMD_IRQFD_FLAG_DEASSIGN, dom=0)
        try:
            self.kernel.ioctl(self.fd, PrivcmdIoctl.IRQFD, probe)
        except OSError as exc:
            return exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP)
        return True


class PreparedDmOp:
    """One IOCTL_PRIVCMD_DM_OP argument (``privcmd_dm_op`` and its buffer array) for ``bufs``,
    which it keeps alive; calling it issues the ioctl (XenError on failure)."""

    __slots__ = ("_privcmd", "_keep", "_arg")

    def __init__(self, privcmd: PrivCmd, domid: int, bufs: tuple[ctypes.Structure | ctypes.Array, ...]) -> None:  # type: ignore[type-arg]
        arr = (privcmd_dm_op_buf * max(len(bufs), 1))()
        for i, b in enumerate(bufs):
            arr[i].uptr, arr[i].size = ctypes.addressof(b), ctypes.sizeof(b)
        k = privcmd_dm_op(dom=domid, num=len(bufs), ubufs=ctypes.addressof(arr))
        self._privcmd, self._keep, self._arg = privcmd, (bufs, arr), k

    def __call__(self) -> int:
        pc = self._privcmd
        try:
            return pc.kernel.ioctl(pc.fd, _DM_OP, self._arg)
        except OSError as exc:
            raise XenError("dm_op", exc.errno or errno.EIO) from None


_DM_OP = int(PrivcmdIoctl.DM_OP)
