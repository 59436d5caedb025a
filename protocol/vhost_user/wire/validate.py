"""Boundary checks, one named check per field (rust-vmm ``VhostUserMsgValidator`` analogue).

Each check raises :class:`~vhost_user.errors.MalformedMessage` naming the offending field,
or :class:`~vhost_user.errors.FdCountMismatch` for SCM_RIGHTS counts. They run in
:mod:`vhost_user.wire.codec` before anything reaches a state machine.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FdCountMismatch, MalformedMessage
from .enums import VHOST_USER_VERSION, VRING_IDX_MASK, VRING_NOFD_MASK, HeaderFlags
from .header import CONFIG_SPACE_MAX, MAX_PAYLOAD_SIZE, VHOST_MEMORY_BASELINE_NREGIONS, Header
from .payloads import (
    VHOST_VRING_F_LOG,
    ConfigSpace,
    MemoryRegion,
    U64,
    VringAddr,
    XenMemoryRegion,
)

__all__ = [
    "RESERVED_FLAG_BITS",
    "DESC_ALIGN",
    "AVAIL_ALIGN",
    "USED_ALIGN",
    "MAX_VRING_INDEX",
    "check_header",
    "check_fd_count",
    "check_vring_index_u64",
    "check_vring_addr",
    "check_regions",
    "check_config",
]

# Bits of the header flags the spec does not define (bits 4-31).
RESERVED_FLAG_BITS = ~0xF & 0xFFFFFFFF

# Split virtqueue alignment (virtio 1.2 §2.7; linux VRING_{DESC,AVAIL,USED}_ALIGN_SIZE; docs/xen-abi.md §8).
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# The kick/call/err payload carries the index in 8 bits (VHOST_USER_VRING_IDX_MASK).
MAX_VRING_INDEX = VRING_IDX_MASK


def check_header(header: Header, *, expect_reply: bool | None) -> None:
    """Version, reserved flag bits, REPLY bit and size cap.

    ``expect_reply``: True when this is a reply (REPLY must be set), False for a request (REPLY
    must be clear), None to accept either (the trace tool).
    """
    version = header.flags & HeaderFlags.VERSION_MASK
    if version != VHOST_USER_VERSION:
        raise MalformedMessage("flags.version", version, f"only version {VHOST_USER_VERSION} exists")
    if header.flags & RESERVED_FLAG_BITS:
        raise MalformedMessage("flags", hex(header.flags), "reserved bits 4-31 set")
    is_reply = bool(header.flags & HeaderFlags.REPLY)
    if expect_reply is not None and is_reply != expect_reply:
        raise MalformedMessage(
            "flags.reply", is_reply, "reply expected" if expect_reply else "request must not set REPLY"
        )
    if header.size > MAX_PAYLOAD_SIZE:
        raise MalformedMessage("size", header.size, f"exceeds {MAX_PAYLOAD_SIZE}")


def check_fd_count(request: object, fds: Sequence[int], lo: int, hi: int) -> None:
    """The number of SCM_RIGHTS fds must be within ``[lo, hi]``."""
    if not lo <= len(fds) <= hi:
        expected = str(lo) if lo == hi else f"{lo}..{hi}"
        raise FdCountMismatch(request, expected, len(fds))


def check_vring_index_u64(payload: U64) -> int:
    """SET_VRING_KICK/CALL/ERR u64: bits 0-7 index, bit 8 NOFD, all others must be 0.

    Returns the number of fds that must accompany it (0 with NOFD, else 1).
    """
    if payload.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise MalformedMessage("u64", hex(payload.value), "only bits 0-8 (index, no-fd) may be set")
    return 0 if payload.value & VRING_NOFD_MASK else 1


def check_vring_addr(addr: VringAddr) -> None:
    """Alignment of the three rings (desc 16, avail 2, used 4) and known flag bits."""
    if addr.flags & ~VHOST_VRING_F_LOG:
        raise MalformedMessage("flags", hex(addr.flags), "only VHOST_VRING_F_LOG is defined")
    if addr.desc_user_addr % DESC_ALIGN:
        raise MalformedMessage("desc_user_addr", hex(addr.desc_user_addr), f"not {DESC_ALIGN}-byte aligned")
    if addr.avail_user_addr % AVAIL_ALIGN:
        raise MalformedMessage("avail_user_addr", hex(addr.avail_user_addr), f"not {AVAIL_ALIGN}-byte aligned")
    if addr.used_user_addr % USED_ALIGN:
        raise MalformedMessage("used_user_addr", hex(addr.used_user_addr), f"not {USED_ALIGN}-byte aligned")


def _check_region(i: int, region: MemoryRegion | XenMemoryRegion) -> None:
    if region.memory_size == 0:
        raise MalformedMessage(f"regions[{i}].memory_size", 0, "empty region")
    limit = 1 << 64
    if region.guest_phys_addr + region.memory_size > limit:
        raise MalformedMessage(f"regions[{i}].guest_phys_addr", hex(region.guest_phys_addr), "range wraps")
    if region.userspace_addr + region.memory_size > limit:
        raise MalformedMessage(f"regions[{i}].userspace_addr", hex(region.userspace_addr), "range wraps")
    if region.mmap_offset + region.memory_size > limit:
        raise MalformedMessage(f"regions[{i}].mmap_offset", hex(region.mmap_offset), "range wraps")


def check_regions(
    regions: Sequence[MemoryRegion | XenMemoryRegion], *, max_regions: int = VHOST_MEMORY_BASELINE_NREGIONS
) -> None:
    """Region count, non-empty, no wrap-around, no overlap in guest-physical or user space."""
    if len(regions) > max_regions:
        raise MalformedMessage("nregions", len(regions), f"at most {max_regions}")
    for i, region in enumerate(regions):
        _check_region(i, region)
    for space in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, space), r.memory_size, i) for i, r in enumerate(regions))
        for (a, alen, _), (b, _, j) in zip(spans, spans[1:]):
            if b < a + alen:
                raise MalformedMessage(f"regions[{j}].{space}", hex(b), "overlaps another region")


def check_config(config: ConfigSpace, *, allow_empty: bool = False) -> None:
    """Config space window: size ≤ 256, offset + size ≤ 256, flags 0 (writable) or 1 (migration)."""
    if config.size > CONFIG_SPACE_MAX:
        raise MalformedMessage("size", config.size, f"config space is at most {CONFIG_SPACE_MAX} bytes")
    if config.offset + config.size > CONFIG_SPACE_MAX:
        raise MalformedMessage("offset", config.offset, "window ends past the config space")
    if config.flags & ~0x1:
        raise MalformedMessage("flags", hex(config.flags), "only bit 0 (migration) is defined")
    if config.size == 0 and not allow_empty:
        raise MalformedMessage("size", 0, "empty config window")
