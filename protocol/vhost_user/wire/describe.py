"""One-line human-readable rendering of messages (for logs and ``vhost-user-dump``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from .codec import RawPayload
from .enums import VRING_IDX_MASK, VRING_NOFD_MASK, FrontendRequest, HeaderFlags, ProtocolFeatures, VirtioFeatures
from .header import Header
from .payloads import ConfigSpace, MemoryTable, U64, XenMemoryTable

__all__ = ["describe_payload", "describe_flags", "describe_fds", "describe_header"]

_ADDR_FIELDS = {"desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr", "guest_phys_addr",
                "memory_size", "userspace_addr", "mmap_offset", "mmap_size", "iova", "uaddr", "size", "offset"}


def describe_flags(flags: int) -> str:
    names = [f"v{flags & HeaderFlags.VERSION_MASK}"]
    if flags & HeaderFlags.REPLY:
        names.append("REPLY")
    if flags & HeaderFlags.NEED_REPLY:
        names.append("NEED_REPLY")
    if flags & ~0xF:
        names.append(f"reserved={flags & ~0xF:#x}")
    return f"{flags:#x}[{','.join(names)}]"


def describe_fds(fds: Sequence[int]) -> str:
    kinds = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        if target.startswith("anon_inode:"):
            target = target[len("anon_inode:") :].strip("[]")
        elif target.startswith("/memfd:"):
            target = "memfd(" + target[len("/memfd:") :].split(" ")[0] + ")"
        elif target.startswith("socket:"):
            target = "unix-socket"
        kinds.append(target)
    return "[" + ",".join(kinds) + "]"


def _fields(obj: Any) -> str:
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "padding" and not value:
            continue
        if dataclasses.is_dataclass(value):
            parts.append(_fields(value))
        elif isinstance(value, int) and f.name in _ADDR_FIELDS:
            parts.append(f"{f.name}={value:#x}")
        elif isinstance(value, (bytes, bytearray)):
            parts.append(f"{f.name}={bytes(value).hex()}")
        else:
            parts.append(f"{f.name}={value}")
    return " ".join(parts)


def describe_payload(request: Any, payload: Any, *, reply: bool = False, ack: bool = False) -> str:
    """One line for ``payload``. ``ack``: it is a REPLY_ACK status, not the request's own u64."""
    if payload is None:
        return ""
    if ack and isinstance(payload, U64):
        return f"u64={payload.value:#x}"
    if not isinstance(request, FrontendRequest):  # back-end channel codes overlap front-end ones
        request = None
    if isinstance(payload, RawPayload):
        return f"raw[{len(payload.data)}]={payload.data[:32].hex()}"
    if isinstance(payload, U64):
        v = payload.value
        if request in (FrontendRequest.GET_FEATURES, FrontendRequest.SET_FEATURES) and (reply or request == FrontendRequest.SET_FEATURES):
            return f"u64={v:#018x} {VirtioFeatures(v)!r}"
        if request in (FrontendRequest.GET_PROTOCOL_FEATURES, FrontendRequest.SET_PROTOCOL_FEATURES):
            return f"u64={v:#x} {ProtocolFeatures(v)!r}"
        if not reply and request in (
            FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR
        ):
            return f"index={v & VRING_IDX_MASK} nofd={bool(v & VRING_NOFD_MASK)} (u64={v:#x})"
        return f"u64={v:#x}"
    if isinstance(payload, (MemoryTable, XenMemoryTable)):
        regions = "; ".join(_fields(r) for r in payload.regions)
        return f"nregions={payload.nregions} [{regions}]"
    if isinstance(payload, ConfigSpace):
        return f"offset={payload.offset} size={payload.size} flags={payload.flags:#x} data={bytes(payload.payload[:64]).hex()}"
    if dataclasses.is_dataclass(payload):
        return _fields(payload)
    return repr(payload)


def describe_header(header: Header, name: str) -> str:
    return f"{name}({header.request}) flags={describe_flags(header.flags)} size={header.size}"
