"""A virtio-blk vhost-user back-end for a real dom0: the project's RAM disk with XEN_MMAP.

``vhost_user.testing.RamDiskBlk`` serves a file (mmap'd shared, so what the guest writes is in
the file) or RAM; here its ``xen_mapper`` is :class:`~xen_vhost_master.xen_mapper.XenRegionMapper`
on the real kernel, so the guest's RAM regions the daemon describes (FOREIGN, with the daemon's
/dev/xen/privcmd fd) are foreign-mapped here. This is what the real-Xen lab (tests/xenlab) runs in
dom0::

    python3 -m xen_vhost_master.xen_blk_backend --socket /run/xen-vhost-master/1/51712.sock --image /root/disk.img

Same options as ``python -m vhost_user.testing.blk``. ``XEN_VHOST_SIM`` selects the simulated
host's kernel instead of /dev/xen, for tests.
"""

from __future__ import annotations

from vhost_user.testing.blk import RamDiskBlk
from vhost_user.testing.blk import main as blk_main

from .xen.kernel import kernel_from_env
from .xen_mapper import XenRegionMapper

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    mapper = XenRegionMapper(kernel_from_env())

    def with_xen_mmap(device: RamDiskBlk) -> None:
        device.xen_mapper = mapper

    return blk_main(argv, prog="xen-blk-backend", configure=with_xen_mmap)


if __name__ == "__main__":
    raise SystemExit(main())
