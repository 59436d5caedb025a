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

__all__ = ["FrameArray", "ForeignMapping", "PreparedDmOp", "PrivCmd", "PRIVCMD_PATH"]

log = logging.getLogger(__name__)

PRIVCMD_PATH = "/dev/xen/privcmd"


def _vma_length(num_frames: int) -> int:
    """privcmd VMA size for ``num_frames`` Xen 4 KiB frames (64 KiB-page arm64 kernels round up)."""
    page = _mmap.PAGESIZE
    return -(-(num_frames << XEN_PAGE_SHIFT) // page) * page


#: Frames an MMAPBATCH_V2 array is filled or scanned by at a time (64 KiB of u64 frame numbers): no
#: temporary grows with the guest. A malloc'd array of a MiB or more is mmapped by glibc and, once
#: freed, raises its dynamic mmap threshold (mallopt(3), M_MMAP_THRESHOLD), so the large temporaries
#: after it come from the heap, whose pages stay resident.
FRAME_STEP = 8192
_ZERO_ERRS = bytes(4 * FRAME_STEP)


class FrameArray:
    """``count`` u64 guest frame numbers (MMAPBATCH_V2's ``arr``) in an anonymous mapping of their
    own, unmapped by :meth:`close` (a context manager): a large guest's array leaves nothing in
    the heap. ``frames`` is the array, a writable ``"Q"`` memoryview."""

    def __init__(self, count: int) -> None:
        self._map = _mmap.mmap(-1, 8 * max(count, 1))
        self.frames = memoryview(self._map).cast("Q")[:count]

    @classmethod
    def consecutive(cls, first: int, count: int) -> FrameArray:
        """``first, first + 1, ... first + count - 1``, built :data:`FRAME_STEP` frames at a time."""
        arr = cls(count)
        for lo in range(0, count, FRAME_STEP):
            n = min(FRAME_STEP, count - lo)
            arr.frames[lo : lo + n] = array.array("Q", range(first + lo, first + lo + n))
        return arr

    def __enter__(self) -> FrameArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.frames.release()
        self._map.close()


def _address(buf: memoryview | _mmap.mmap) -> int:
    """The address of a writable buffer's first byte (the buffer stays its owner's)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _frames_at(gfns: array.array[int] | memoryview, first: int, count: int) -> tuple[int, memoryview | FrameArray | None]:
    """The address of ``gfns[first : first + count]`` as MMAPBATCH_V2 reads it, and what to release
    after the call: nothing for a u64 array, a slice for a writable u64 view, else a copy."""
    if isinstance(gfns, array.array):
        return gfns.buffer_info()[0] + 8 * first, None
    if gfns.c_contiguous and not gfns.readonly:
        part = gfns[first : first + count]
        return _address(part), part
    copy = FrameArray(count)
    for lo in range(0, count, FRAME_STEP):
        n = min(FRAME_STEP, count - lo)
        copy.frames[lo : lo + n] = array.array("Q", gfns[first + lo : first + lo + n])
    return _address(copy.frames), copy


def _error_runs(errs: memoryview, base: int, out: array.array[int]) -> None:
    """Append to ``out`` a ``(frame, count, -errno)`` triple per run of equal non-zero entries of
    ``errs`` (MMAPBATCH_V2's ``err`` array, an ``"i"`` view; ``base`` is the index of its first
    entry), scanning it :data:`FRAME_STEP` entries at a time."""
    for lo in range(0, len(errs), FRAME_STEP):
        chunk = errs[lo : lo + FRAME_STEP]
        if chunk.cast("B") == _ZERO_ERRS[: 4 * len(chunk)]:
            continue
        for i, e in enumerate(chunk, base + lo):
            if e:
                if out and out[-1] == e and out[-3] + out[-2] == i:
                    out[-2] += 1
                else:
                    out.extend((i, 1, e))


class ForeignMapping:
    """A foreign mapping of ``num`` guest frames; the frames that did not map are kept as runs
    (``failures``: ``frame, count, -errno`` triples, ascending), not as an entry per frame."""

    def __init__(self, mapping: Mapping, num: int, failures: array.array[int]) -> None:
        self.mapping = mapping
        self.num = num
        self.failures = failures

    def ok(self) -> bool:
        return not self.failures

    def failed(self) -> list[int]:
        """Indices of frames that did not map (their bytes are inaccessible)."""
        f = self.failures
        return [i for k in range(0, len(f), 3) for i in range(f[k], f[k] + f[k + 1])]

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
        """mmap + MMAPBATCH_V2 of ``gfns`` (u64 frame numbers, used in place when a ``"Q"`` array or
        a writable ``"Q"`` view, e.g. :class:`FrameArray`'s). Frames that fail are reported in the
        result's ``failures``; the ioctl's ENOENT (paged-out frames) is reported there too, not raised."""
        if not isinstance(gfns, memoryview) and gfns.typecode != "Q":
            gfns = memoryview(gfns).cast("B").cast("Q")
        num = len(gfns)
        if num == 0:
            raise XenError("mmapbatch_v2", errno.EINVAL)
        try:
            mapping = self.kernel.mmap(self.fd, _vma_length(num), prot)
        except OSError as exc:
            raise XenError("mmap privcmd", exc.errno or errno.EIO) from None
        try:
            failures = self._mmapbatch(domid, mapping.addr, gfns, 0, num)
        except XenError:
            mapping.close()
            raise
        return ForeignMapping(mapping, num, failures)

    def _mmapbatch(self, domid: int, addr: int, gfns: array.array[int] | memoryview, first: int, num: int,
                   op: str = "mmapbatch_v2") -> array.array[int]:
        """MMAPBATCH_V2 of ``gfns[first : first + num]`` (u64s) at ``addr``; the failed frames' runs
        (indices as in ``gfns``). The ``err`` array lives in a mapping unmapped on return."""
        arr, keep = _frames_at(gfns, first, num)
        errs = _mmap.mmap(-1, 4 * num)
        try:
            m = privcmd_mmapbatch_v2(num=num, dom=domid, addr=addr, arr=arr, err=_address(errs))
            try:
                self.kernel.ioctl(self.fd, PrivcmdIoctl.MMAPBATCH_V2, m)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise XenError(op, exc.errno or errno.EIO) from None
            failures = array.array("q")
            with memoryview(errs) as raw, raw.cast("i") as view:
                _error_runs(view, first, failures)
            return failures
        finally:
            errs.close()
            if isinstance(keep, FrameArray):
                keep.close()
            elif keep is not None:
                keep.release()

    def retry_paged(self, fm: ForeignMapping, domid: int, gfns: array.array[int] | memoryview) -> int:
        """Re-issue MMAPBATCH_V2 for the frames of ``fm`` that failed with ENOENT (paged out or
        shared: Xen pages them in, retry later), run by run on the same VMA. Updates
        ``fm.failures``; returns how many frames still fail with ENOENT."""
        old, new = fm.failures, array.array("q")
        for k in range(0, len(old), 3):
            first, n, code = old[k : k + 3]
            if code != -errno.ENOENT:
                new.extend((first, n, code))
                continue
            again = self._mmapbatch(domid, fm.mapping.addr + (first << XEN_PAGE_SHIFT), gfns, first, n,
                                    "mmapbatch_v2 retry")
            for j in range(0, len(again), 3):
                if new and new[-1] == again[j + 2] and new[-3] + new[-2] == again[j]:
                    new[-2] += again[j + 1]
                else:
                    new.extend(again[j : j + 3])
        fm.failures = new
        return sum(new[k + 1] for k in range(0, len(new), 3) if new[k + 2] == -errno.ENOENT)

    def map_foreign_range(self, domid: int, first_gfn: int, count: int, *, prot: int = PROT_READ | PROT_WRITE) -> ForeignMapping:
        """Foreign-map ``count`` consecutive frames from ``first_gfn`` (their array in a mapping of
        its own, :class:`FrameArray`)."""
        with FrameArray.consecutive(first_gfn, count) as arr:
            return self.map_foreign(domid, arr.frames, prot=prot)

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
