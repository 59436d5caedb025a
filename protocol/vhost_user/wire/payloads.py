"""Every vhost-user payload as a typed construct struct, each with its C definition.

Source: QEMU ``docs/interop/vhost-user.rst`` section "Message types"/"payloads"; sizes are the
C sizes listed in ``docs/vhost-user-wire.md`` §2.
All integers are native (little) endian; padding is spelled out as a named field.
"""

from __future__ import annotations

import dataclasses

from construct import Array, Bytes, Int8un, Int16un, Int32un, Int64un, this
from construct_typed import DataclassMixin, DataclassStruct, csfield

__all__ = [
    "U64",
    "VringState",
    "VringAddr",
    "MemoryRegion",
    "XenMemoryRegion",
    "MemoryTable",
    "XenMemoryTable",
    "MemRegMsg",
    "XenMemRegMsg",
    "LogPayload",
    "IotlbMsg",
    "ConfigSpace",
    "VringArea",
    "Inflight",
    "SharedObject",
    "DeviceStateParams",
    "STRUCTS",
    "VHOST_VRING_F_LOG",
    "CONFIG_HDR_SIZE",
]

VHOST_VRING_F_LOG = 0x1  # vring address flags bit 0 (linux/vhost_types.h VHOST_VRING_F_LOG = 0)
CONFIG_HDR_SIZE = 12  # VHOST_USER_CONFIG_HDR_SIZE


@dataclasses.dataclass
class U64(DataclassMixin):
    """``uint64_t u64;`` — features, status, queue counts, REPLY_ACK status, kick/call index."""

    value: int = csfield(Int64un)


@dataclasses.dataclass
class VringState(DataclassMixin):
    """Vring state (= ``struct vhost_vring_state``, 8 bytes)::

    struct vhost_vring_state { unsigned int index; unsigned int num; };
    """

    index: int = csfield(Int32un)
    num: int = csfield(Int32un)


@dataclasses.dataclass
class VringAddr(DataclassMixin):
    """Vring address (= ``struct vhost_vring_addr``, 40 bytes; note desc, *used*, avail order)::

    struct vhost_vring_addr {
        unsigned int index;
        unsigned int flags;          /* VHOST_VRING_F_LOG */
        __u64 desc_user_addr;
        __u64 used_user_addr;
        __u64 avail_user_addr;
        __u64 log_guest_addr;
    };
    """

    index: int = csfield(Int32un)
    flags: int = csfield(Int32un)
    desc_user_addr: int = csfield(Int64un)
    used_user_addr: int = csfield(Int64un)
    avail_user_addr: int = csfield(Int64un)
    log_guest_addr: int = csfield(Int64un)


@dataclasses.dataclass
class MemoryRegion(DataclassMixin):
    """Memory region description (32 bytes)::

    typedef struct VhostUserMemoryRegion {
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
        uint64_t mmap_offset;
    } VhostUserMemoryRegion;
    """

    guest_phys_addr: int = csfield(Int64un)
    memory_size: int = csfield(Int64un)
    userspace_addr: int = csfield(Int64un)
    mmap_offset: int = csfield(Int64un)


@dataclasses.dataclass
class XenMemoryRegion(DataclassMixin):
    """Memory region when ``VHOST_USER_PROTOCOL_F_XEN_MMAP`` is negotiated (40 bytes)::

    typedef struct {
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
        uint64_t mmap_offset;
        uint32_t xen_mmap_flags;   /* XenMmapFlags: FOREIGN 0x1, GRANT 0x2, NO_ADVANCE_MAP */
        uint32_t domid;
    } VhostUserMemoryRegionXen;
    """

    guest_phys_addr: int = csfield(Int64un)
    memory_size: int = csfield(Int64un)
    userspace_addr: int = csfield(Int64un)
    mmap_offset: int = csfield(Int64un)
    xen_mmap_flags: int = csfield(Int32un)
    domid: int = csfield(Int32un)


@dataclasses.dataclass
class MemoryTable(DataclassMixin):
    """SET_MEM_TABLE payload: 8 + nregions * 32 bytes (full C struct: 264)::

    typedef struct VhostUserMemory {
        uint32_t nregions;
        uint32_t padding;
        VhostUserMemoryRegion regions[VHOST_MEMORY_BASELINE_NREGIONS];  /* only nregions sent */
    } VhostUserMemory;
    """

    nregions: int = csfield(Int32un)
    padding: int = csfield(Int32un)
    regions: list[MemoryRegion] = csfield(Array(this.nregions, DataclassStruct(MemoryRegion)))


@dataclasses.dataclass
class XenMemoryTable(DataclassMixin):
    """SET_MEM_TABLE payload with XEN_MMAP: 8 + nregions * 40 bytes (full C struct: 328)."""

    nregions: int = csfield(Int32un)
    padding: int = csfield(Int32un)
    regions: list[XenMemoryRegion] = csfield(Array(this.nregions, DataclassStruct(XenMemoryRegion)))


@dataclasses.dataclass
class MemRegMsg(DataclassMixin):
    """ADD_MEM_REG / REM_MEM_REG payload, a single region (40 bytes)::

    typedef struct VhostUserMemRegMsg {
        uint64_t padding;
        VhostUserMemoryRegion region;
    } VhostUserMemRegMsg;
    """

    padding: int = csfield(Int64un)
    region: MemoryRegion = csfield(DataclassStruct(MemoryRegion))


@dataclasses.dataclass
class XenMemRegMsg(DataclassMixin):
    """ADD_MEM_REG / REM_MEM_REG payload with XEN_MMAP (48 bytes): u64 padding + Xen region."""

    padding: int = csfield(Int64un)
    region: XenMemoryRegion = csfield(DataclassStruct(XenMemoryRegion))


@dataclasses.dataclass
class LogPayload(DataclassMixin):
    """SET_LOG_BASE payload (16 bytes)::

    typedef struct VhostUserLog { uint64_t mmap_size; uint64_t mmap_offset; } VhostUserLog;
    """

    mmap_size: int = csfield(Int64un)
    mmap_offset: int = csfield(Int64un)


@dataclasses.dataclass
class IotlbMsg(DataclassMixin):
    """IOTLB message (= ``struct vhost_iotlb_msg``, 32 bytes, 6 bytes tail padding)::

    struct vhost_iotlb_msg {
        __u64 iova; __u64 size; __u64 uaddr;
        __u8 perm;   /* VHOST_ACCESS_RO 1, WO 2, RW 3 */
        __u8 type;   /* VHOST_IOTLB_MISS 1, UPDATE 2, INVALIDATE 3, ACCESS_FAIL 4 */
    };
    """

    iova: int = csfield(Int64un)
    size: int = csfield(Int64un)
    uaddr: int = csfield(Int64un)
    perm: int = csfield(Int8un)
    type: int = csfield(Int8un)
    padding: bytes = csfield(Bytes(6))


@dataclasses.dataclass
class ConfigSpace(DataclassMixin):
    """GET_CONFIG / SET_CONFIG payload: 12-byte header + ``size`` bytes::

    typedef struct VhostUserConfig {
        uint32_t offset;
        uint32_t size;
        uint32_t flags;     /* 0 writable, 1 live migration */
        uint8_t region[VHOST_USER_MAX_CONFIG_SIZE];   /* only size bytes sent */
    } VhostUserConfig;
    """

    offset: int = csfield(Int32un)
    size: int = csfield(Int32un)
    flags: int = csfield(Int32un)
    payload: bytes = csfield(Bytes(this.size))


@dataclasses.dataclass
class VringArea(DataclassMixin):
    """VRING_HOST_NOTIFIER_MSG payload (24 bytes)::

    typedef struct VhostUserVringArea {
        uint64_t u64;      /* bits 0-7 vring index, bit 8 no fd */
        uint64_t size;
        uint64_t offset;
    } VhostUserVringArea;
    """

    u64: int = csfield(Int64un)
    size: int = csfield(Int64un)
    offset: int = csfield(Int64un)


@dataclasses.dataclass
class Inflight(DataclassMixin):
    """GET/SET_INFLIGHT_FD payload (24 bytes: QEMU's struct is not packed, 4 bytes tail pad)::

    typedef struct VhostUserInflight {
        uint64_t mmap_size;
        uint64_t mmap_offset;
        uint16_t num_queues;
        uint16_t queue_size;
    } VhostUserInflight;
    """

    mmap_size: int = csfield(Int64un)
    mmap_offset: int = csfield(Int64un)
    num_queues: int = csfield(Int16un)
    queue_size: int = csfield(Int16un)
    padding: int = csfield(Int32un)


@dataclasses.dataclass
class SharedObject(DataclassMixin):
    """Shared object (16 bytes)::

    typedef struct VhostUserShared { unsigned char uuid[16]; } VhostUserShared;
    """

    uuid: bytes = csfield(Bytes(16))


@dataclasses.dataclass
class DeviceStateParams(DataclassMixin):
    """SET_DEVICE_STATE_FD payload (8 bytes)::

    typedef struct VhostUserTransferDeviceState {
        uint32_t transfer_direction;   /* 0 save, 1 load */
        uint32_t migration_phase;      /* 0 stopped */
    } VhostUserTransferDeviceState;
    """

    transfer_direction: int = csfield(Int32un)
    migration_phase: int = csfield(Int32un)


def _make(cls: type) -> DataclassStruct:  # type: ignore[type-arg]
    return DataclassStruct(cls)


#: payload class -> its construct. Fixed-size ones have a ``sizeof()``.
STRUCTS: dict[type, DataclassStruct] = {  # type: ignore[type-arg]
    cls: _make(cls)
    for cls in (
        U64,
        VringState,
        VringAddr,
        MemoryRegion,
        XenMemoryRegion,
        MemoryTable,
        XenMemoryTable,
        MemRegMsg,
        XenMemRegMsg,
        LogPayload,
        IotlbMsg,
        ConfigSpace,
        VringArea,
        Inflight,
        SharedObject,
        DeviceStateParams,
    )
}
