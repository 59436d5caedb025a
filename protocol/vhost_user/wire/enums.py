"""Request codes, header flags and feature bits of the vhost-user protocol.

Every number here is from QEMU ``docs/interop/vhost-user.rst`` (restated and compiled in
``docs/vhost-user-wire.md``). Unknown request codes are not an error at
this layer: :meth:`FrontendRequest.from_code` returns a *pseudo-member* (``UNKNOWN_<n>``) so
that the codec can reject it with a typed error instead of ``ValueError``/``KeyError``.
"""

from __future__ import annotations

import enum

__all__ = [
    "FrontendRequest",
    "BackendRequest",
    "HeaderFlags",
    "ProtocolFeatures",
    "VirtioFeatures",
    "STABLE_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "XenMmapFlags",
    "IotlbType",
    "IotlbPerm",
]


class _OpenIntEnum(enum.IntEnum):
    """IntEnum whose unknown values parse as pseudo-members ``UNKNOWN_<n>`` (never raise).

    Same trick as ``construct_typed.tenum.EnumBase._missing_``: the pseudo-member is an
    instance of the enum but is not in ``cls.__members__``; :attr:`known` tells them apart.
    """

    @classmethod
    def _missing_(cls, value: object) -> _OpenIntEnum | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member

    @classmethod
    def from_code(cls, code: int) -> _OpenIntEnum:
        return cls(code)

    @property
    def known(self) -> bool:
        return self._name_ in type(self).__members__


class FrontendRequest(_OpenIntEnum):
    """Front-end -> back-end requests (``VHOST_USER_*``, vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4  # deprecated
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(_OpenIntEnum):
    """Back-end -> front-end requests on the SET_BACKEND_REQ_FD channel (``VHOST_USER_BACKEND_*``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


# vhost-user.rst "Header": bits 0-1 version; VHOST_USER_VERSION = 0x1.
VHOST_USER_VERSION = 0x1


class HeaderFlags(enum.IntFlag, boundary=enum.KEEP):
    """The header ``flags`` word (vhost-user.rst "Header")."""

    VERSION_MASK = 0x3  # bits 0-1: version, must equal VHOST_USER_VERSION
    REPLY = 0x4  # bit 2: set by the back-end on every reply
    NEED_REPLY = 0x8  # bit 3: REPLY_ACK requested


# Payload of SET_VRING_KICK/CALL/ERR: bits 0-7 vring index, bit 8 "no fd" (vhost-user.rst).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# Virtio feature bit 30 reused by vhost-user to gate GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 30


class ProtocolFeatures(enum.IntFlag, boundary=enum.KEEP):
    """``VHOST_USER_PROTOCOL_F_*`` as bit masks (vhost-user.rst "Protocol features").

    Bits 20 and above are not stable across implementations (docs/vhost-user-wire.md §5); this library
    never offers or accepts them (:data:`STABLE_PROTOCOL_FEATURES`).
    """

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


STABLE_PROTOCOL_FEATURES = ProtocolFeatures((1 << 20) - 1)


class VirtioFeatures(enum.IntFlag, boundary=enum.KEEP):
    """Device-independent virtio feature bits (virtio 1.2 §6; docs/xen-abi.md §8) plus vhost's own."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


class XenMmapFlags(enum.IntFlag, boundary=enum.KEEP):
    """``xen_mmap_flags`` of a Xen memory region (docs/vhost-user-wire.md §3).

    NO_ADVANCE_MAP differs: the spec says bit 8 (0x100), rust-vmm puts 0x8 on the wire.
    """

    FOREIGN = 0x1
    GRANT = 0x2
    NO_ADVANCE_MAP_RUSTVMM = 0x8
    NO_ADVANCE_MAP_SPEC = 0x100


class IotlbType(_OpenIntEnum):
    """``struct vhost_iotlb_msg.type`` (linux/vhost_types.h)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(_OpenIntEnum):
    """``struct vhost_iotlb_msg.perm`` (linux/vhost_types.h)."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3
