"""The shared synchronous ioreq page (``ioreq_t[nr_vcpus]``, xen/hvm/ioreq.h) viewed in place.

Memory ordering (docs/xen-abi.md §5): Xen writes the request fields, then (after a write barrier) the state
READY; the device model must read the state *before* the fields, and publish ``data`` *before*
IORESP_READY. CPython's loads/stores from an mmap happen in program order and each is a C access;
on x86 (TSO) that is enough. On arm64 Python offers no fence: the system calls around an access
order it instead, as protocol/vhost_user/virtqueue.py relies on its eventfd writes. The request's
fields are read after the evtchn read that returned its port (Xen stores them, then READY, then
sends the event), and the answer is followed by the NOTIFY (a system call and a hypercall, whose
locks order every earlier store of this CPU before Xen wakes the vCPU). The state byte is written
with one byte store (``(byte30 & 0xf0) | state``).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from xen_vhost_master.xen.abi import (
    IOREQ_SLOT_SIZE,
    XEN_PAGE_SIZE,
    IoreqState,
    IoreqType,
    ResourceType,
    XENMEM_resource_ioreq_server_frame_ioreq,
    ioreq_t,
)
from xen_vhost_master.xen.kernel import Mapping
from xen_vhost_master.xen.privcmd import PrivCmd

__all__ = ["IoreqPage", "IoreqRequest"]

# struct ioreq (abi.ioreq_t): addr, data, count, size, vp_eport, _pad0, flags, type
_SLOT = struct.Struct("<QQIIIHBB")
_DATA = struct.Struct("<Q")
_DATA_OFF: Final = ioreq_t.data.offset
_FLAGS_OFF: Final = ioreq_t.flags.offset  # type: ignore[attr-defined]  # the state byte: one store changes it
_STATE_MASK: Final = ioreq_t.STATE_MASK
_DIR: Final = ioreq_t.DIR
_DATA_IS_PTR: Final = ioreq_t.DATA_IS_PTR
_READY: Final = int(IoreqState.READY)
_COPY: Final = int(IoreqType.COPY)
_INPROCESS: Final = int(IoreqState.INPROCESS)
_IORESP_READY: Final = int(IoreqState.IORESP_READY)
_new = tuple.__new__  # an IoreqRequest without NamedTuple's Python-level __new__ (once per access)


class IoreqRequest(NamedTuple):
    vcpu: int
    addr: int
    size: int
    is_write: bool
    data: int  # for writes: masked to ``size`` bytes (Arm does not mask)
    type: int
    count: int  # type: ignore[assignment]  # the field shadows tuple.count (never called)
    data_is_ptr: bool


class IoreqPage:
    """The ioreq page of one IOREQ server, mapped with MMAP_RESOURCE (frame ioreq(0))."""

    def __init__(self, mapping: Mapping, nr_vcpus: int) -> None:
        if nr_vcpus * IOREQ_SLOT_SIZE > XEN_PAGE_SIZE or nr_vcpus <= 0:
            raise ValueError(f"{nr_vcpus} vCPUs do not fit one ioreq page")
        self.mapping, self.nr_vcpus = mapping, nr_vcpus
        self._slots = [ioreq_t.from_address(mapping.addr + i * IOREQ_SLOT_SIZE) for i in range(nr_vcpus)]
        self._raw = [memoryview(s).cast("B") for s in self._slots]  # the same bytes, for one-shot reads
        # (address, size, queue) of the QueueNotify writes the dom0 kernel answers (privcmd
        # ioeventfd): Linux drivers/xen/privcmd.c ioeventfd_interrupt takes a READY COPY write
        # with addr == ioeventfd addr + 0x50, size == addr_len and (data & 0xFFFF) == vq.
        self.kernel_notifies: set[tuple[int, int, int]] = set()

    @classmethod
    def map(cls, privcmd: PrivCmd, domid: int, server_id: int, nr_vcpus: int) -> IoreqPage:
        m = privcmd.map_resource(
            domid, ResourceType.ioreq_server, server_id, XENMEM_resource_ioreq_server_frame_ioreq(0), 1
        )
        return cls(m, nr_vcpus)

    def close(self) -> None:
        for raw in self._raw:
            raw.release()
        self._raw = []
        self._slots = []
        self.mapping.close()

    def slot(self, vcpu: int) -> ioreq_t:
        return self._slots[vcpu]

    def vp_eport(self, vcpu: int) -> int:
        return int(self._slots[vcpu].vp_eport)

    def state(self, vcpu: int) -> int:
        return self._slots[vcpu].state

    def ready(self) -> list[int]:
        """vCPUs whose slot is READY (scan this after (re)attaching: the event may be long gone)."""
        return [i for i, s in enumerate(self._slots) if s.state == IoreqState.READY]

    def unfinished(self) -> list[int]:
        """vCPUs whose slot is READY or INPROCESS: what a restarted device model must serve (a
        predecessor that died mid-request leaves INPROCESS behind; Xen keeps the vCPU blocked)."""
        return [i for i, s in enumerate(self._slots) if s.state in (IoreqState.READY, IoreqState.INPROCESS)]

    def take(self, vcpu: int, *, recover: bool = False) -> IoreqRequest | None:
        """If vCPU's slot is READY (or, with ``recover``, INPROCESS left by a dead predecessor):
        read it, mark INPROCESS and return it; else None (spurious wakeup: do not notify). A
        QueueNotify the dom0 kernel answers (:attr:`kernel_notifies`) is left as it is: the
        kernel's handler and this one share the slot with plain stores, and two answers to one
        request leave Xen a slot in a bad state (tests/xenlab/README.md)."""
        raw = self._raw[vcpu]
        state = raw[_FLAGS_OFF] & _STATE_MASK
        if state != _READY and not (recover and state == _INPROCESS):
            return None
        # (the state before the fields: see the module doc on ordering)
        addr, data, count, size, _port, _pad, flags, rtype = _SLOT.unpack(raw)
        is_write = not flags & _DIR  # dir bit clear: IOREQ_WRITE (abi.IoreqDir.WRITE = 0)
        if is_write and self.kernel_notifies and rtype == _COPY and (addr, size, data & 0xFFFF) in self.kernel_notifies:
            return None
        if is_write and 0 < size < 8:
            data &= (1 << (8 * size)) - 1
        req = _new(IoreqRequest, (vcpu, addr, size, is_write, data, rtype, count, bool(flags & _DATA_IS_PTR)))
        raw[_FLAGS_OFF] = (flags & ~_STATE_MASK & 0xFF) | _INPROCESS
        return req

    def complete(self, vcpu: int, data: int | None = None) -> None:
        """Publish the response (``data`` for reads), then IORESP_READY. Notify the port afterwards."""
        raw = self._raw[vcpu]
        if data is not None:
            _DATA.pack_into(raw, _DATA_OFF, data & 0xFFFFFFFFFFFFFFFF)  # one 8-byte store, as the ctypes field
        raw[_FLAGS_OFF] = (raw[_FLAGS_OFF] & ~_STATE_MASK & 0xFF) | _IORESP_READY  # after the data
