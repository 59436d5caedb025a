"""The 12-byte vhost-user message header and the size limits around it.

C definition (QEMU ``docs/interop/vhost-user.rst`` "Header"; docs/vhost-user-wire.md §1: 12 bytes, packed,
native byte order, the payload starts at offset 12)::

    typedef struct {
        uint32_t request;
        uint32_t flags;   /* bits 0-1 version, bit 2 REPLY, bit 3 NEED_REPLY */
        uint32_t size;    /* payload bytes that follow */
    } __attribute__((packed)) VhostUserHeader;
"""

from __future__ import annotations

import dataclasses
import sys

from construct import Int32un
from construct_typed import DataclassMixin, DataclassStruct, csfield

__all__ = [
    "Header",
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_FDS",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "CONFIG_SPACE_MAX",
]

# Every layout here is native little-endian (docs/vhost-user-wire.md); construct's Int*un is
# native, so refuse to run on a big-endian host rather than silently differ from the C side.
assert sys.byteorder == "little", "vhost_user.wire assumes a little-endian host"

HEADER_SIZE = 12

# vhost-user.rst: at most 8 regions in SET_MEM_TABLE, and at most 8 fds per message.
VHOST_MEMORY_BASELINE_NREGIONS = 8
MAX_FDS = 8

# QEMU caps device config space at 256 bytes (VHOST_USER_MAX_CONFIG_SIZE, vhost-user.rst
# "config space"); virtio-mmio's window leaves 256 bytes of config too (docs/xen-abi.md §8).
CONFIG_SPACE_MAX = 256

# Largest payload of any message: the Xen memory table, 8 + 8 * 40 = 328 bytes
# (docs/vhost-user-wire.md §2). Config space is 12 + 256 = 268. Round up to a page, as
# the largest size the receiver will buffer before rejecting the header (QEMU's
# vhost_user_read_header checks ``size > VHOST_USER_PAYLOAD_SIZE`` the same way).
MAX_PAYLOAD_SIZE = 4096


@dataclasses.dataclass
class Header(DataclassMixin):
    """``VhostUserHeader``: request code, flags, payload size (see module docstring)."""

    request: int = csfield(Int32un)
    flags: int = csfield(Int32un)
    size: int = csfield(Int32un)


HEADER = DataclassStruct(Header)
