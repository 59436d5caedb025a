"""The Xen / Linux ABI the daemon uses, declared once (ctypes: these carry user pointers or live in
shared pages). Every struct cites its header; padding is explicit; sizes and offsets are checked
against the real headers by ``tests/xen/test_abi_conformance.py``.

Headers: Linux UAPI ``include/uapi/xen/{privcmd,evtchn,gntdev}.h`` (6.1; IRQFD/IOEVENTFD from
mainline >= 6.7), Xen public ``xen/hvm/{dm_op,ioreq,hvm_op}.h``, ``xen/memory.h``, ``xen/xen.h`` (4.17).
All layouts are identical on x86_64 and arm64 (LP64, little-endian); see docs/xen-abi.md §10.14.
"""

from __future__ import annotations

import ctypes
import enum
import sys

__all__ = [
    "DOMID_FIRST_RESERVED",
    "DOMID_INVALID",
    "DOMID_SELF",
    "XEN_PAGE_SHIFT",
    "XEN_PAGE_SIZE",
    "BufIoreq",
    "DmOp",
    "DomctlCmd",
    "EvtchnIoctl",
    "GntdevIoctl",
    "GntdevUnmapNotify",
    "Hypercall",
    "IoRangeType",
    "IoreqDir",
    "IoreqState",
    "IoreqType",
    "PrivcmdIoctl",
    "ResourceType",
    "XENMEM_resource_ioreq_server_frame_ioreq",
    "XenMem",
    "XenVer",
    "ioc",
    "ioc_size",
    "ioctl_evtchn_bind_interdomain",
    "ioctl_evtchn_bind_unbound_port",
    "ioctl_evtchn_bind_virq",
    "ioctl_evtchn_notify",
    "ioctl_evtchn_restrict_domid",
    "ioctl_evtchn_unbind",
    "ioctl_gntdev_grant_ref",
    "ioctl_gntdev_map_grant_ref",
    "ioctl_gntdev_unmap_grant_ref",
    "ioctl_gntdev_unmap_notify",
    "ioreq_t",
    "map_grant_ref_type",
    "privcmd_dm_op",
    "privcmd_dm_op_buf",
    "privcmd_hypercall",
    "privcmd_ioeventfd",
    "privcmd_irqfd",
    "privcmd_mmap_resource",
    "privcmd_mmapbatch_v2",
    "xen_dm_op",
    "xen_dm_op_create_ioreq_server",
    "xen_dm_op_destroy_ioreq_server",
    "xen_dm_op_get_ioreq_server_info",
    "xen_dm_op_inject_msi",
    "xen_dm_op_set_pci_intx_level",
    "XEN_DMOP_PCI_SBDF",
    "xen_dm_op_ioreq_server_range",
    "xen_dm_op_nr_vcpus",
    "xen_dm_op_set_ioreq_server_state",
    "xen_dm_op_set_irq_level",
    "xen_domctl",
]

assert sys.byteorder == "little", "the Xen ABI structs here assume a little-endian host"

# xen/include/public/xen.h: XEN_PAGE_SHIFT (Linux include/xen/page.h). Units of MMAPBATCH/grant frames.
XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT

# xen/include/public/xen.h
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_INVALID = 0x7FF4

# --------------------------------------------------------------------------------------------
# ioctl encoding: asm-generic/ioctl.h (x86_64 and arm64): dir<<30 | size<<16 | type<<8 | nr
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)`` from asm-generic/ioctl.h."""
    return (direction << 30) | (size << 16) | (ord(type_) << 8) | nr


def ioc_size(request: int) -> int:
    """``_IOC_SIZE(request)``: the argument size encoded in an ioctl number."""
    return (request >> 16) & 0x3FFF


# --------------------------------------------------------------------------------------------
# privcmd: include/uapi/xen/privcmd.h (Xen's copy: xen/sys/privcmd.h, same layout)


class privcmd_hypercall(ctypes.Structure):
    """``struct privcmd_hypercall { __u64 op; __u64 arg[5]; };`` (48 bytes)"""

    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


class privcmd_mmapbatch_v2(ctypes.Structure):
    """``struct privcmd_mmapbatch_v2 { unsigned int num; domid_t dom; __u64 addr;
    const xen_pfn_t __user *arr; int __user *err; };`` (32 bytes; num in 4 KiB Xen frames)"""

    _fields_ = [
        ("num", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("addr", ctypes.c_uint64),
        ("arr", ctypes.c_uint64),  # const xen_pfn_t __user * (u64 GFNs)
        ("err", ctypes.c_uint64),  # int __user * (per-frame errno, 0 or negative)
    ]


class privcmd_dm_op_buf(ctypes.Structure):
    """``struct privcmd_dm_op_buf { void __user *uptr; size_t size; };`` (16 bytes)"""

    _fields_ = [("uptr", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class privcmd_dm_op(ctypes.Structure):
    """``struct privcmd_dm_op { domid_t dom; __u16 num; const struct privcmd_dm_op_buf __user *ubufs; };``"""

    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("num", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
        ("ubufs", ctypes.c_uint64),
    ]


class privcmd_mmap_resource(ctypes.Structure):
    """``struct privcmd_mmap_resource { domid_t dom; __u32 type; __u32 id; __u32 idx; __u64 num;
    __u64 addr; };`` (32 bytes)"""

    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("idx", ctypes.c_uint32),
        ("num", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


class privcmd_irqfd(ctypes.Structure):
    """``struct privcmd_irqfd { __u64 dm_op; __u32 size; __u32 fd; __u32 flags; domid_t dom;
    __u8 pad[2]; };`` (Linux >= 6.7, 24 bytes)"""

    _fields_ = [
        ("dm_op", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    ]


class privcmd_ioeventfd(ctypes.Structure):
    """``struct privcmd_ioeventfd { __u64 ioreq; __u64 ports; __u64 addr; __u32 addr_len;
    __u32 event_fd; __u32 vcpus; __u32 vq; __u32 flags; domid_t dom; __u8 pad[2]; };`` (Linux >= 6.7, 48)"""

    _fields_ = [
        ("ioreq", ctypes.c_uint64),
        ("ports", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("addr_len", ctypes.c_uint32),
        ("event_fd", ctypes.c_uint32),
        ("vcpus", ctypes.c_uint32),
        ("vq", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    ]


PRIVCMD_IRQFD_FLAG_DEASSIGN = 1
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1


class PrivcmdIoctl(enum.IntEnum):
    """include/uapi/xen/privcmd.h. NB: IRQFD and IOEVENTFD are ``_IOW`` (docs/xen-abi.md §10.1), the rest ``_IOC_NONE``."""

    HYPERCALL = ioc(_IOC_NONE, "P", 0, ctypes.sizeof(privcmd_hypercall))
    MMAPBATCH_V2 = ioc(_IOC_NONE, "P", 4, ctypes.sizeof(privcmd_mmapbatch_v2))
    DM_OP = ioc(_IOC_NONE, "P", 5, ctypes.sizeof(privcmd_dm_op))
    RESTRICT = ioc(_IOC_NONE, "P", 6, ctypes.sizeof(ctypes.c_uint16))
    MMAP_RESOURCE = ioc(_IOC_NONE, "P", 7, ctypes.sizeof(privcmd_mmap_resource))
    IRQFD = ioc(_IOC_WRITE, "P", 8, ctypes.sizeof(privcmd_irqfd))
    IOEVENTFD = ioc(_IOC_WRITE, "P", 9, ctypes.sizeof(privcmd_ioeventfd))


# --------------------------------------------------------------------------------------------
# evtchn: include/uapi/xen/evtchn.h


class ioctl_evtchn_bind_virq(ctypes.Structure):
    """``struct ioctl_evtchn_bind_virq { unsigned int virq; };``"""

    _fields_ = [("virq", ctypes.c_uint32)]


class ioctl_evtchn_bind_interdomain(ctypes.Structure):
    """``struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; };``"""

    _fields_ = [("remote_domain", ctypes.c_uint32), ("remote_port", ctypes.c_uint32)]


class ioctl_evtchn_bind_unbound_port(ctypes.Structure):
    """``struct ioctl_evtchn_bind_unbound_port { unsigned int remote_domain; };``"""

    _fields_ = [("remote_domain", ctypes.c_uint32)]


class ioctl_evtchn_unbind(ctypes.Structure):
    """``struct ioctl_evtchn_unbind { unsigned int port; };``"""

    _fields_ = [("port", ctypes.c_uint32)]


class ioctl_evtchn_notify(ctypes.Structure):
    """``struct ioctl_evtchn_notify { unsigned int port; };``"""

    _fields_ = [("port", ctypes.c_uint32)]


class ioctl_evtchn_restrict_domid(ctypes.Structure):
    """``struct ioctl_evtchn_restrict_domid { domid_t domid; };`` (2 bytes: u16, unlike the others)"""

    _fields_ = [("domid", ctypes.c_uint16)]


class EvtchnIoctl(enum.IntEnum):
    """include/uapi/xen/evtchn.h (all ``_IOC_NONE``, type 'E'). Unknown ioctls answer ENOSYS."""

    BIND_VIRQ = ioc(_IOC_NONE, "E", 0, ctypes.sizeof(ioctl_evtchn_bind_virq))
    BIND_INTERDOMAIN = ioc(_IOC_NONE, "E", 1, ctypes.sizeof(ioctl_evtchn_bind_interdomain))
    BIND_UNBOUND_PORT = ioc(_IOC_NONE, "E", 2, ctypes.sizeof(ioctl_evtchn_bind_unbound_port))
    UNBIND = ioc(_IOC_NONE, "E", 3, ctypes.sizeof(ioctl_evtchn_unbind))
    NOTIFY = ioc(_IOC_NONE, "E", 4, ctypes.sizeof(ioctl_evtchn_notify))
    RESET = ioc(_IOC_NONE, "E", 5, 0)
    RESTRICT_DOMID = ioc(_IOC_NONE, "E", 6, ctypes.sizeof(ioctl_evtchn_restrict_domid))


# --------------------------------------------------------------------------------------------
# gntdev: include/uapi/xen/gntdev.h


class ioctl_gntdev_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_grant_ref { __u32 domid; __u32 ref; };``"""

    _fields_ = [("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32)]


class ioctl_gntdev_map_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_map_grant_ref { __u32 count; __u32 pad; __u64 index;
    struct ioctl_gntdev_grant_ref refs[1]; };`` (sizeof 24; the real buffer is 16 + 8*count)"""

    _fields_ = [
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("refs", ioctl_gntdev_grant_ref * 1),
    ]


def map_grant_ref_type(count: int) -> type[ctypes.Structure]:
    """The variable-length ``ioctl_gntdev_map_grant_ref`` with ``refs[count]``."""
    return type(
        f"ioctl_gntdev_map_grant_ref_{count}",
        (ctypes.Structure,),
        {
            "_fields_": [
                ("count", ctypes.c_uint32),
                ("pad", ctypes.c_uint32),
                ("index", ctypes.c_uint64),
                ("refs", ioctl_gntdev_grant_ref * max(count, 1)),
            ]
        },
    )


class ioctl_gntdev_unmap_grant_ref(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_grant_ref { __u64 index; __u32 count; __u32 pad; };``"""

    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ioctl_gntdev_unmap_notify(ctypes.Structure):
    """``struct ioctl_gntdev_unmap_notify { __u64 index; __u32 action; __u32 event_channel_port; };``"""

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


class GntdevUnmapNotify(enum.IntFlag):
    """gntdev.h ``UNMAP_NOTIFY_*``."""

    CLEAR_BYTE = 0x1
    SEND_EVENT = 0x2


class GntdevIoctl(enum.IntEnum):
    """include/uapi/xen/gntdev.h (``_IOC_NONE``, type 'G'). MAP_GRANT_REF always encodes sizeof = 24."""

    MAP_GRANT_REF = ioc(_IOC_NONE, "G", 0, ctypes.sizeof(ioctl_gntdev_map_grant_ref))
    UNMAP_GRANT_REF = ioc(_IOC_NONE, "G", 1, ctypes.sizeof(ioctl_gntdev_unmap_grant_ref))
    SET_UNMAP_NOTIFY = ioc(_IOC_NONE, "G", 7, ctypes.sizeof(ioctl_gntdev_unmap_notify))


# --------------------------------------------------------------------------------------------
# DM ops: xen/include/public/hvm/dm_op.h (Xen 4.17)


class DmOp(enum.IntEnum):
    """``XEN_DMOP_*`` (dm_op.h)."""

    create_ioreq_server = 1
    get_ioreq_server_info = 2
    map_io_range_to_ioreq_server = 3
    unmap_io_range_from_ioreq_server = 4
    set_ioreq_server_state = 5
    destroy_ioreq_server = 6
    set_pci_intx_level = 8
    inject_msi = 14
    set_irq_level = 19
    nr_vcpus = 20


class IoRangeType(enum.IntEnum):
    """``XEN_DMOP_IO_RANGE_*``."""

    PORT = 0
    MEMORY = 1
    PCI = 2


# hvm_op.h (__XEN_TOOLS__): HVM_IOREQSRV_BUFIOREQ_{OFF,LEGACY,ATOMIC}
HVM_IOREQSRV_BUFIOREQ_OFF = 0
HVM_IOREQSRV_BUFIOREQ_LEGACY = 1
HVM_IOREQSRV_BUFIOREQ_ATOMIC = 2
XEN_DMOP_no_gfns = 1


class xen_dm_op_create_ioreq_server(ctypes.Structure):
    """``struct xen_dm_op_create_ioreq_server { uint8_t handle_bufioreq; uint8_t pad[3];
    ioservid_t id; /* OUT */ };`` (6 bytes)"""

    _fields_ = [("handle_bufioreq", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("id", ctypes.c_uint16)]


class xen_dm_op_get_ioreq_server_info(ctypes.Structure):
    """``struct xen_dm_op_get_ioreq_server_info { ioservid_t id; uint16_t flags;
    evtchn_port_t bufioreq_port; uint64_aligned_t ioreq_gfn; uint64_aligned_t bufioreq_gfn; };``"""

    _fields_ = [
        ("id", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("bufioreq_port", ctypes.c_uint32),
        ("ioreq_gfn", ctypes.c_uint64),
        ("bufioreq_gfn", ctypes.c_uint64),
    ]


class xen_dm_op_ioreq_server_range(ctypes.Structure):
    """``struct xen_dm_op_ioreq_server_range { ioservid_t id; uint16_t pad; uint32_t type;
    uint64_aligned_t start, end; /* inclusive */ };``"""

    _fields_ = [
        ("id", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("type", ctypes.c_uint32),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
    ]


class xen_dm_op_set_ioreq_server_state(ctypes.Structure):
    """``struct xen_dm_op_set_ioreq_server_state { ioservid_t id; uint8_t enabled; uint8_t pad; };``"""

    _fields_ = [("id", ctypes.c_uint16), ("enabled", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class xen_dm_op_destroy_ioreq_server(ctypes.Structure):
    """``struct xen_dm_op_destroy_ioreq_server { ioservid_t id; uint16_t pad; };``"""

    _fields_ = [("id", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class xen_dm_op_set_pci_intx_level(ctypes.Structure):
    """``struct xen_dm_op_set_pci_intx_level { uint16_t domain; uint8_t bus, device, intx;
    uint8_t level; };`` (6 bytes, x86; ``domain`` is the PCI segment)"""

    _fields_ = [("domain", ctypes.c_uint16), ("bus", ctypes.c_uint8), ("device", ctypes.c_uint8),
                ("intx", ctypes.c_uint8), ("level", ctypes.c_uint8)]


def XEN_DMOP_PCI_SBDF(s: int, b: int, d: int, f: int) -> int:  # noqa: N802 (the header's macro)
    """``XEN_DMOP_PCI_SBDF(s,b,d,f)`` (dm_op.h): the ``start``/``end`` of an IO_RANGE_PCI claim,
    and the upper 32 bits of an IOREQ_TYPE_PCI_CONFIG request's ``addr``."""
    return (s & 0xFFFF) << 16 | (b & 0xFF) << 8 | (d & 0x1F) << 3 | (f & 7)


class xen_dm_op_inject_msi(ctypes.Structure):
    """``struct xen_dm_op_inject_msi { uint32_t data; uint32_t pad; uint64_aligned_t addr; };``"""

    _fields_ = [("data", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("addr", ctypes.c_uint64)]


class xen_dm_op_set_irq_level(ctypes.Structure):
    """``struct xen_dm_op_set_irq_level { uint32_t irq; uint8_t level; uint8_t pad[3]; };`` (Arm SPIs)"""

    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class xen_dm_op_nr_vcpus(ctypes.Structure):
    """``struct xen_dm_op_nr_vcpus { uint32_t vcpus; /* OUT */ };``"""

    _fields_ = [("vcpus", ctypes.c_uint32)]


class _xen_dm_op_u(ctypes.Union):
    _fields_ = [
        ("create_ioreq_server", xen_dm_op_create_ioreq_server),
        ("get_ioreq_server_info", xen_dm_op_get_ioreq_server_info),
        ("map_io_range_to_ioreq_server", xen_dm_op_ioreq_server_range),
        ("unmap_io_range_from_ioreq_server", xen_dm_op_ioreq_server_range),
        ("set_ioreq_server_state", xen_dm_op_set_ioreq_server_state),
        ("destroy_ioreq_server", xen_dm_op_destroy_ioreq_server),
        ("set_pci_intx_level", xen_dm_op_set_pci_intx_level),
        ("inject_msi", xen_dm_op_inject_msi),
        ("set_irq_level", xen_dm_op_set_irq_level),
        ("nr_vcpus", xen_dm_op_nr_vcpus),
        ("_size", ctypes.c_uint8 * 24),  # largest member of the 4.17 union is 24 bytes
    ]


class xen_dm_op(ctypes.Structure):
    """``struct xen_dm_op { uint32_t op; uint32_t pad; union { ... } u; };`` (32 bytes, align 8)"""

    _fields_ = [("op", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("u", _xen_dm_op_u)]


# --------------------------------------------------------------------------------------------
# IOREQ: xen/include/public/hvm/ioreq.h


class IoreqState(enum.IntEnum):
    """``STATE_IOREQ_*`` / ``STATE_IORESP_READY``."""

    NONE = 0
    READY = 1
    INPROCESS = 2
    IORESP_READY = 3


class IoreqDir(enum.IntEnum):
    """``IOREQ_READ`` / ``IOREQ_WRITE``."""

    WRITE = 0
    READ = 1


class IoreqType(enum.IntEnum):
    """``IOREQ_TYPE_*``."""

    PIO = 0
    COPY = 1
    PCI_CONFIG = 2
    TIMEOFFSET = 7
    INVALIDATE = 8


class ioreq_t(ctypes.Structure):
    """``struct ioreq { uint64_t addr; uint64_t data; uint32_t count; uint32_t size;
    uint32_t vp_eport; uint16_t _pad0; uint8_t state:4; uint8_t data_is_ptr:1; uint8_t dir:1;
    uint8_t df:1; uint8_t _pad1:1; uint8_t type; };`` (32 bytes). The bitfield byte at offset 30 is
    ``flags`` here (LSB first: state 0x0f, data_is_ptr 0x10, dir 0x20, df 0x40), so that a state
    change is one byte store as in QEMU and Linux."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("data", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("vp_eport", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
    ]

    flags: int  # (for type checkers: ctypes fields carry no annotations)

    STATE_MASK = 0x0F
    DATA_IS_PTR = 0x10
    DIR = 0x20
    DF = 0x40

    @property
    def state(self) -> int:
        return int(self.flags) & self.STATE_MASK

    @state.setter
    def state(self, value: int) -> None:
        self.flags = (int(self.flags) & ~self.STATE_MASK & 0xFF) | (value & self.STATE_MASK)

    @property
    def dir(self) -> int:
        return 1 if int(self.flags) & self.DIR else 0

    @property
    def data_is_ptr(self) -> bool:
        return bool(int(self.flags) & self.DATA_IS_PTR)


IOREQ_SLOT_SIZE = ctypes.sizeof(ioreq_t)  # 32; one slot per vCPU in the shared ioreq page


class BufIoreq(enum.IntEnum):
    """Buffered ioreq constants (ioreq.h); unused by the daemon (BUFIOREQ_OFF)."""

    SLOT_NUM = 511


# --------------------------------------------------------------------------------------------
# Hypercalls: xen/include/public/{xen,memory,version}.h


class Hypercall(enum.IntEnum):
    """``__HYPERVISOR_*`` (the same numbers on x86 and Arm)."""

    memory_op = 12
    xen_version = 17
    grant_table_op = 20
    event_channel_op = 32
    hvm_op = 34
    domctl = 36
    dm_op = 41


class XenMem(enum.IntEnum):
    """``XENMEM_*`` memory_op sub-commands (memory.h)."""

    maximum_ram_page = 2
    current_reservation = 3
    maximum_reservation = 4
    maximum_gpfn = 14
    acquire_resource = 28


class XenVer(enum.IntEnum):
    """``XENVER_*`` (version.h)."""

    version = 0
    pagesize = 7


class ResourceType(enum.IntEnum):
    """``XENMEM_resource_*`` (memory.h)."""

    ioreq_server = 0
    grant_table = 1


XENMEM_resource_ioreq_server_frame_bufioreq = 0


# --------------------------------------------------------------------------------------------
# domctl: xen/include/public/domctl.h (a tools-only, *unstable* interface: docs/xen-domctl.md)


class DomctlCmd(enum.IntEnum):
    """``XEN_DOMCTL_*`` commands used here (the same number in every release, 4.0 to 4.21)."""

    pausedomain = 3
    unpausedomain = 4


class xen_domctl(ctypes.Structure):
    """``struct xen_domctl { uint32_t cmd; uint32_t interface_version; domid_t domain;
    uint16_t _pad[3]; union { ...; uint8_t pad[128]; } u; };`` (144 bytes; the union holds
    64-bit-aligned members, so it starts at 16). pause/unpause read nothing from ``u``."""

    _fields_ = [
        ("cmd", ctypes.c_uint32),
        ("interface_version", ctypes.c_uint32),
        ("domain", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16 * 3),
        ("u", ctypes.c_uint8 * 128),
    ]


def XENMEM_resource_ioreq_server_frame_ioreq(n: int) -> int:
    """``XENMEM_resource_ioreq_server_frame_ioreq(n) = 1 + n`` (memory.h)."""
    return 1 + n
