"""A virtio-blk vhost-user back-end for a real dom0: the project's RAM disk with XEN_MMAP.

``vhost_user.testing.RamDiskBlk`` serves a file (mmap'd shared, so what the guest writes is in
the file) or RAM; its ``xen_mapper`` is :class:`~xen_vhost_master.xen_mapper.XenRegionMapper` on
the real kernel, so the guest's RAM regions the daemon describes (FOREIGN, with the daemon's
/dev/xen/privcmd fd) are foreign-mapped here. This is what the real-Xen lab (tests/xenlab) runs in
dom0::

    python3 -m xen_vhost_master.xen_blk_backend --socket /run/xen-vhost-master/1/51712.sock --image /root/disk.img

It listens on ``--socket`` and serves front-ends one after the other (``--connections N``: exit
after N), like qemu-storage-daemon. ``XEN_VHOST_SIM`` selects the simulated host's kernel instead
of /dev/xen, for tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vhost_user.aio.server import serve_unix
from vhost_user.testing.blk import RamDiskBlk

from .xen.kernel import kernel_from_env
from .xen_mapper import XenRegionMapper

__all__ = ["main", "make_device", "parse_size"]

log = logging.getLogger("xen_vhost_master.xen_blk_backend")

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``64M`` → 67108864; plain numbers are bytes."""
    s = text.strip().upper()
    try:
        return int(s[:-1]) * _UNITS[s[-1]] if s and s[-1] in _UNITS else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use a number of bytes or K/M/G") from None


def make_device(size: int, image: str | None, queues: int, mapper: XenRegionMapper) -> RamDiskBlk:
    dev = RamDiskBlk(size, image=image, num_queues=queues)
    dev.xen_mapper = mapper
    return dev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xen-blk-backend", description="virtio-blk vhost-user back-end with XEN_MMAP (foreign mapping)")
    p.add_argument("--socket", required=True, help="AF_UNIX path to listen on")
    p.add_argument("--image", help="serve this file (shared mmap: guest writes land in it)")
    p.add_argument("--size", type=parse_size, default=parse_size("64M"), help="RAM disk size without --image (default 64M)")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--connections", type=int, default=None, help="exit after N front-ends")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.image is not None and not os.path.isfile(args.image):
        log.error("--image %s: no such file", args.image)
        return 2
    mapper = XenRegionMapper(kernel_from_env())
    ram: dict[str, object] = {}

    def factory() -> RamDiskBlk:
        dev = make_device(args.size, args.image, args.queues, mapper)
        if args.image is None:  # a RAM disk keeps its content across reconnects
            dev.disk = ram.setdefault("disk", dev.disk)
        return dev

    os.makedirs(os.path.dirname(os.path.abspath(args.socket)), mode=0o700, exist_ok=True)
    import uvloop

    try:
        uvloop.run(serve_unix(factory, args.socket, connections=args.connections))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
