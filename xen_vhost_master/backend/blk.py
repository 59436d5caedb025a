"""A virtio-blk vhost-user back-end for a real dom0: the project's RAM disk with XEN_MMAP.

``vhost_user.testing.RamDiskBlk`` serves a file (mmap'd shared, so what the guest writes is in
the file) or RAM; here its ``xen_mapper`` is :class:`~xen_vhost_master.backend.mapper.XenRegionMapper`
on the real kernel, so the guest's memory the daemon describes is mapped here: FOREIGN regions
(RAM, with the daemon's /dev/xen/privcmd fd) or, for a grant-based guest, GRANT regions (grant
space, with the daemon's /dev/xen/gntdev fd: rings in advance, data buffers per access). This is
what the real-Xen lab (tests/xenlab) runs in dom0::

    python3 -m xen_vhost_master.backend.blk --socket-path /run/vhost-user/guest1/51712.sock --blk-file /root/disk.img

Same options as ``python -m vhost_user.testing.blk`` (vhost-user.rst's back-end program
conventions: ``--socket-path`` or ``--fd``, ``--print-capabilities``, ``--version``), plus ``--xen-no-advance rust-vmm|spec``
(the "no advance map" flag value the front-end uses for grant regions: 0x8, the default, or 0x100).
``XEN_VHOST_SIM`` asks for the simulated host (an installed platform, ``xen_vhost_master/platform.py``)
instead of /dev/xen, for tests.

A grant the guest gave read-only is mapped read-only: a request that would write into one (a
device-writable descriptor on a read-only grant) is refused and logged (used length 0, nothing
written), the queue keeps serving (:func:`refuse_read_only_writes`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

from vhost_user import GuestMemoryError
from vhost_user.testing.blk import RamDiskBlk
from vhost_user.testing.blk import main as blk_main

from ..errors import ConfigError
from ..log import RateLimit
from ..platform import Platform, announce, platform_from_env
from .mapper import XenRegionMapper, no_advance_flag

__all__ = ["ReadOnlyRefusals", "XenRamDiskBlk", "main"]

log = logging.getLogger(__name__)


@dataclass
class ReadOnlyRefusals:
    count: int = 0
    last: str = ""


class XenRamDiskBlk(RamDiskBlk):
    """:class:`RamDiskBlk` on Xen memory: it refuses any request with a device-writable buffer on
    read-only memory (a read-only grant): logged, used length 0, the page untouched; the ring keeps
    going. With ``release_mapper``, on-demand grant mappings left idle are unmapped after each
    request."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.refusals = ReadOnlyRefusals()
        self.release_mapper: XenRegionMapper | None = None
        self._limit = RateLimit(time.monotonic)  # a guest granting read-only on purpose must not flood the log

    def handle_request(self, chain: Any, read_buffers: Any, write_buffers: Any) -> int:
        mapper = self.release_mapper
        try:
            # Only grant regions can be read-only: with none mapped (a guest's RAM through
            # privcmd), a request's buffers are not looked at twice (a view each: 256 per 1 MiB).
            for buf in chain.writable if mapper is None or mapper.grants else ():
                try:
                    with self.memory.view(buf.addr, buf.length) as view:
                        read_only = view.readonly
                except GuestMemoryError:
                    continue  # not mapped at all: the handler's own error path reports it
                if read_only:
                    self.refusals.count += 1
                    self.refusals.last = (f"chain {chain.head}: device-writable buffer [{buf.addr:#x}, "
                                          f"+{buf.length:#x}) is read-only")
                    allowed, suppressed = self._limit.allow("read-only grant")
                    if allowed:
                        more = f" ({suppressed} similar lines suppressed)" if suppressed else ""
                        log.error("refusing request: %s (a read-only grant)%s", self.refusals.last, more)
                    return 0
            return super().handle_request(chain, read_buffers, write_buffers)
        finally:
            if mapper is not None:
                mapper.release()


def main(argv: list[str] | None = None, platform: Platform | None = None) -> int:
    """``platform``: whose kernel maps the guest's memory; None = the one the environment asks for."""
    xen = argparse.ArgumentParser(add_help=False)  # listed in --help by the back-end's parser
    xen.add_argument("--xen-no-advance", default="rust-vmm", help="rust-vmm (0x8, default) or spec (0x100)")
    pre = argparse.ArgumentParser(add_help=False, parents=[xen])
    pre.add_argument("-v", "--verbose", action="store_true")
    ours, rest = pre.parse_known_args(argv)
    if {"--version", "--print-capabilities"} & set(rest):
        return blk_main(rest, prog="xen-blk-backend", parents=[xen])  # exits before any platform
    if ours.verbose:
        rest.append("-v")
    # the platform is said before the back-end starts (blk_main's own basicConfig is then a no-op)
    logging.basicConfig(level=logging.DEBUG if ours.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        no_advance = no_advance_flag(ours.xen_no_advance)
    except ValueError as e:
        pre.error(str(e))
    try:
        platform = platform if platform is not None else platform_from_env()
    except ConfigError as e:
        pre.error(str(e))
    announce(platform, log)
    mapper = XenRegionMapper(platform.kernel, no_advance=no_advance)

    def with_xen_mmap(device: RamDiskBlk) -> None:
        assert isinstance(device, XenRamDiskBlk)
        device.xen_mapper = device.release_mapper = mapper

    return blk_main(rest, prog="xen-blk-backend", configure=with_xen_mmap, parents=[xen], device_class=XenRamDiskBlk)


if __name__ == "__main__":
    raise SystemExit(main())
