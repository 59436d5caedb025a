"""Virtio device-type facts, one home: id, name, config-space size, and the feature policy of a
vhost-user front-end for the type (what QEMU keeps in its per-device tables: ``user_feature_bits``
in hw/net/vhost_net.c, ``user_feature_bits`` in hw/block/vhost-user-blk.c, the config sizes of
hw/virtio/virtio.c's ``virtio_get_config_size`` parameters).

* :meth:`DeviceType.offer` — the device feature bits the front-end may offer the guest, given
  what the back-end offers: bits a front-end would have to implement itself are withheld (net:
  the control queue and everything that needs it; QEMU's virtio-net serves its control queue
  itself and never hands it to a vhost-user back-end).
* :meth:`DeviceType.config_size` — the size of the type's config struct for the features the
  back-end offers (virtio 1.2: fields guarded by a feature bit exist only with it), the one
  GET_CONFIG a front-end sends.
* :func:`net_config` — the net config space a front-end emulates for a back-end without the
  CONFIG protocol feature (DPDK): MAC, link up, one queue pair.
* :func:`vsock_config` — the vsock config space (the guest's CID) a front-end emulates for a
  back-end without CONFIG, as QEMU's vhost-vsock takes ``guest-cid=``.
* :func:`feeds_lower` — whether a back-end of the type may complete what it takes from one
  queue by filling a buffer of a lower one (net, vsock: transmitq 2n+1 feeds receiveq 2n on a
  looped port or a local peer); a copying front-end then takes the lower queues' completions
  before a higher queue's.

An unknown device id has no entry (:func:`lookup` returns None): its bits pass as they are.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BLK",
    "NET",
    "DeviceType",
    "Offer",
    "NET_CTRL_FEATURES",
    "NET_CONFIG_SIZE",
    "NET_EMULATED_FEATURES",
    "NET_UNKNOWN_FEATURES",
    "TYPES",
    "VSOCK",
    "VSOCK_CID_MAX",
    "VSOCK_CID_MIN",
    "feeds_lower",
    "lookup",
    "net_config",
    "offer",
    "parse_cid",
    "parse_mac",
    "stable_mac",
    "vsock_config",
]


def _bits(*bits: int) -> int:
    return sum(1 << b for b in bits)


@dataclass(frozen=True)
class DeviceType:
    """One virtio device type as a vhost-user front-end serves it.

    ``config_min``: bytes of config the type always has; ``config_ends``: ``(feature bit, end of
    the fields it guards)`` (QEMU's ``VirtIOFeature`` tables); the config size is the largest end
    among the offered features, at least ``config_min``. ``withheld``: device feature bits never
    offered to the guest (the front-end would have to implement them, and does not).
    ``feeds_lower``: what the device takes from a queue may come back to the guest in a buffer
    of a lower-numbered queue (virtio 1.2 §5.1.2 net: receiveq 2n, transmitq 2n+1; §5.10.2
    vsock: rx 0, tx 1): a packet looped back, or delivered to a local peer.
    """

    id: int
    name: str
    config_min: int
    config_ends: tuple[tuple[int, int], ...] = ()
    withheld: int = 0
    feeds_lower: bool = False

    @property
    def config_max(self) -> int:
        return max((end for _, end in self.config_ends), default=self.config_min)

    def config_size(self, features: int) -> int:
        """The config struct's size with ``features`` offered (virtio_get_config_size)."""
        size = self.config_min
        for bit, end in self.config_ends:
            if features >> bit & 1:
                size = max(size, end)
        return size

    def offer(self, features: int) -> int:
        """The back-end's device features less what this front-end withholds for the type."""
        return features & ~self.withheld


# --- virtio-net (virtio 1.2 §5.1; linux/virtio_net.h) --------------------------------------------
NET_F_CSUM, NET_F_CTRL_GUEST_OFFLOADS, NET_F_MTU, NET_F_MAC = 0, 2, 3, 5
NET_F_STATUS, NET_F_CTRL_VQ, NET_F_CTRL_RX, NET_F_CTRL_VLAN, NET_F_CTRL_RX_EXTRA = 16, 17, 18, 19, 20
NET_F_GUEST_ANNOUNCE, NET_F_MQ, NET_F_CTRL_MAC_ADDR = 21, 22, 23
NET_F_VQ_NOTF_COAL, NET_F_NOTF_COAL, NET_F_HASH_REPORT, NET_F_RSS, NET_F_SPEED_DUPLEX = 52, 53, 57, 60, 63
#: The control queue and every feature that needs it (virtio 1.2 §5.1.3.1 "Requires
#: VIRTIO_NET_F_CTRL_VQ"; Linux's virtnet_validate_features refuses them without it). A vhost-user
#: net back-end does not serve a control queue for a front-end: QEMU's virtio-net keeps it.
NET_CTRL_FEATURES: Final = _bits(
    NET_F_CTRL_GUEST_OFFLOADS, NET_F_CTRL_VQ, NET_F_CTRL_RX, NET_F_CTRL_VLAN, NET_F_CTRL_RX_EXTRA,
    NET_F_GUEST_ANNOUNCE, NET_F_MQ, NET_F_CTRL_MAC_ADDR, NET_F_VQ_NOTF_COAL, NET_F_NOTF_COAL,
    NET_F_HASH_REPORT, NET_F_RSS,
)
#: Offered when the front-end emulates the config (:func:`net_config`): the fields it fills.
NET_EMULATED_FEATURES: Final = _bits(NET_F_MAC, NET_F_STATUS)
#: Not offered when the front-end emulates the config: fields only the back-end could know.
NET_UNKNOWN_FEATURES: Final = _bits(NET_F_MTU, NET_F_SPEED_DUPLEX)
NET_S_LINK_UP: Final = 1
#: struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (le16 each), speed (le32),
#: duplex, rss_max_key_size (u8), rss_max_indirection_table_length (le16), supported_hash_types (le32).
_NET_CONFIG = struct.Struct("<6sHHHIBBHI")
NET_CONFIG_SIZE: Final = _NET_CONFIG.size  # 24
_SPEED_UNKNOWN, _DUPLEX_UNKNOWN = 0xFFFFFFFF, 0xFF  # linux/ethtool.h SPEED_UNKNOWN, DUPLEX_UNKNOWN

# --- virtio-blk (virtio 1.2 §5.2; linux/virtio_blk.h) --------------------------------------------
BLK_F_DISCARD, BLK_F_WRITE_ZEROES, BLK_F_SECURE_ERASE, BLK_F_ZONED = 13, 14, 16, 17
#: hw/block/virtio-blk-common.c: the config up to (not including) max_discard_sectors always,
#: then the fields each feature guards (ends: discard_sector_alignment 48, write_zeroes_may_unmap
#: and its padding 60, secure_erase_sector_alignment 72, the zoned characteristics 96).
BLK: Final = DeviceType(2, "blk", 36, ((BLK_F_DISCARD, 48), (BLK_F_WRITE_ZEROES, 60),
                                      (BLK_F_SECURE_ERASE, 72), (BLK_F_ZONED, 96)))

#: hw/net/virtio-net.c's cfg_size_params: the MAC always, then the fields each feature guards.
NET: Final = DeviceType(1, "net", 6, ((NET_F_MAC, 6), (NET_F_STATUS, 8), (NET_F_MQ, 10), (NET_F_MTU, 12),
                                      (NET_F_SPEED_DUPLEX, 17), (NET_F_RSS, 24), (NET_F_HASH_REPORT, 24)),
                        withheld=NET_CTRL_FEATURES, feeds_lower=True)

# --- virtio-vsock (virtio 1.2 §5.10; linux/virtio_vsock.h) ---------------------------------------
#: struct virtio_vsock_config: le64 guest_cid (its upper 32 bits reserved and zero).
_VSOCK_CONFIG = struct.Struct("<Q")
#: virtio 1.2 §5.10.4: CIDs 0, 1, 2 and 0xffffffff are reserved (linux/vm_sockets.h:
#: VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_ANY).
VSOCK_CID_MIN: Final = 3
VSOCK_CID_MAX: Final = 2**32 - 2
VSOCK: Final = DeviceType(19, "vsock", _VSOCK_CONFIG.size, feeds_lower=True)

TYPES: Final[dict[int, DeviceType]] = {t.id: t for t in (
    NET,
    BLK,
    VSOCK,
    DeviceType(3, "console", 12),  # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
    DeviceType(4, "rng", 0),  # no config space
    DeviceType(8, "scsi", 36),  # struct virtio_scsi_config
    DeviceType(16, "gpu", 16),  # struct virtio_gpu_config: events_read/clear, num_scanouts, num_capsets
    DeviceType(18, "input", 136),  # struct virtio_input_config: select, subsel, size, reserved[5], u[128]
    DeviceType(25, "sound", 12, ((0, 16),)),  # virtio_snd_config: jacks, streams, chmaps (+ controls, F_CTLS)
    DeviceType(26, "fs", 40, ((0, 44),)),  # virtio_fs_config: tag[36], num_request_queues (+ notify_buf_size)
    DeviceType(32, "scmi", 0),  # no config space
    DeviceType(34, "i2c", 0),  # no config space
    DeviceType(41, "gpio", 8),  # struct virtio_gpio_config: ngpio, padding[2], gpio_names_size
)}


def lookup(device_id: int) -> DeviceType | None:
    """The entry for ``device_id`` (linux/virtio_ids.h), None for a type without one."""
    return TYPES.get(device_id)


def feeds_lower(device_id: int) -> bool:
    """Whether a back-end of type ``device_id`` may complete a chain of one queue into a buffer of
    a lower one (:attr:`DeviceType.feeds_lower`). A type without an entry is assumed to."""
    t = TYPES.get(device_id)
    return t is None or t.feeds_lower


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """``00:16:3e:12:34:56`` → 6 bytes (xl.cfg's ``mac=``); ValueError for anything else, a
    multicast address included (a NIC's address is unicast)."""
    s = text.strip().lower()
    if not _MAC.match(s):
        raise ValueError(f"mac={text!r} is not six colon-separated hex bytes (e.g. 00:16:3e:12:34:56)")
    mac = bytes.fromhex(s.replace(":", ""))
    if mac[0] & 1:
        raise ValueError(f"mac={text!r} is a multicast address")
    return mac


def stable_mac(guest: str, devid: int) -> bytes:
    """A locally administered unicast address that is the same for the same guest name and device
    id, on every boot and every daemon (IEEE 802: bit 1 of the first byte set, bit 0 clear)."""
    digest = hashlib.sha256(f"xen-vhost-master/{guest}/{devid}".encode(errors="surrogateescape")).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def parse_cid(text: str) -> int:
    """A vsock guest CID, decimal or 0x-hex, in ``VSOCK_CID_MIN..VSOCK_CID_MAX``; ValueError
    (starting ``cid=``) for anything else."""
    try:
        cid = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"cid={text!r} is not a number (decimal or 0x-hex)") from None
    if not VSOCK_CID_MIN <= cid <= VSOCK_CID_MAX:
        raise ValueError(f"cid={text!r} is out of range {VSOCK_CID_MIN}..{VSOCK_CID_MAX} "
                         "(0, 1, 2 and 0xffffffff are reserved: virtio 1.2 §5.10.4)")
    return cid


def vsock_config(cid: int) -> bytes:
    """The virtio-vsock config space a front-end emulates: the guest's CID."""
    return _VSOCK_CONFIG.pack(cid)


def net_config(mac: bytes) -> bytes:
    """The virtio-net config space a front-end emulates: ``mac``, link up, one queue pair, MTU and
    speed/duplex unknown (their feature bits are not offered), no RSS."""
    return _NET_CONFIG.pack(mac, NET_S_LINK_UP, 1, 0, _SPEED_UNKNOWN, _DUPLEX_UNKNOWN, 0, 0, 0)


@dataclass(frozen=True)
class Offer:
    """What the guest sees of a device: its feature bits (before the transport's own rules) and
    its config space. ``emulated``: the config is the front-end's, not the back-end's."""

    features: int
    config: bytes
    emulated: bool = False


def offer(device_id: int, features: int, config: bytes | None, *, mac: bytes, cid: int | None = None) -> Offer:
    """The guest's view of a device whose back-end offers ``features`` and ``config`` (None: the
    back-end has no CONFIG protocol feature). Unknown types pass as they are (config empty
    without CONFIG); a net back-end without CONFIG gets :func:`net_config` with ``mac``, a vsock
    one :func:`vsock_config` with ``cid`` when given (the back-end's own config wins when it
    has one: it routes by the CID it was started with)."""
    t = lookup(device_id)
    if t is None:
        return Offer(features, config or b"")
    offered = t.offer(features)
    if config is None and t.id == NET.id:
        return Offer(offered & ~NET_UNKNOWN_FEATURES | NET_EMULATED_FEATURES, net_config(mac), emulated=True)
    if config is None and t.id == VSOCK.id and cid is not None:
        return Offer(offered, vsock_config(cid), emulated=True)
    return Offer(offered, config or b"")
