"""The device-type table: feature policy, config sizes, emulated net config."""

from __future__ import annotations

import struct

import pytest

from xen_vhost_master import devtypes
from xen_vhost_master.config import VIRTIO_IDS
from xen_vhost_master.devtypes import NET_CTRL_FEATURES, lookup, offer

# A net back-end's offer (VERSION_1, EVENT_IDX, INDIRECT_DESC, MRG_RXBUF...) with control-queue bits.
TESTPMD = 0x1_7020_8000 | (1 << 17) | (1 << 18) | (1 << 21) | (1 << 22)


def test_net_withholds_the_control_queue_family_and_passes_the_rest() -> None:
    got = offer(1, TESTPMD | (1 << 15) | (1 << 5), b"\x00" * 6, mac=b"")
    for bit in (17, 18, 19, 20, 21, 22, 23, 2, 52, 53, 57, 60):  # CTRL_VQ and every bit needing it
        assert not got.features >> bit & 1, bit
    assert got.features >> 15 & 1 and got.features >> 5 & 1 and got.features >> 32 & 1
    assert not got.emulated and got.config == b"\x00" * 6


def test_every_named_type_the_issue_lists_has_an_entry_and_unknown_types_pass_as_they_are() -> None:
    for name in ("blk", "net", "fs", "vsock", "i2c", "gpio", "rng", "sound", "scmi"):
        t = lookup(VIRTIO_IDS[name])
        assert t is not None and t.name == name
    assert lookup(0xEE) is None
    assert offer(0xEE, NET_CTRL_FEATURES | 1, None, mac=b"") == devtypes.Offer(NET_CTRL_FEATURES | 1, b"")
    assert offer(2, NET_CTRL_FEATURES, b"x" * 60, mac=b"").features == NET_CTRL_FEATURES  # blk: bits 17-23 are blk's own


@pytest.mark.parametrize(("features", "size"), [
    (0, 36),  # up to the topology, WCE and num_queues fields (hw/block/virtio-blk-common.c)
    (1 << 13, 48),  # DISCARD
    ((1 << 13) | (1 << 14), 60),  # DISCARD + WRITE_ZEROES: qemu-storage-daemon 7.2
    (1 << 16, 72),  # SECURE_ERASE
    (1 << 17, 96),  # ZONED
])
def test_blk_config_size_follows_the_features_that_guard_its_fields(features: int, size: int) -> None:
    blk = lookup(2)
    assert blk is not None and blk.config_size(features) == size and blk.config_max == 96


def test_net_config_emulated_without_the_config_protocol_feature() -> None:
    mac = bytes.fromhex("02aabbccddee")
    got = offer(1, TESTPMD | (1 << 3) | (1 << 63), None, mac=mac)
    assert got.emulated and len(got.config) == devtypes.NET_CONFIG_SIZE == 24
    assert got.features >> 5 & 1 and got.features >> 16 & 1  # MAC and STATUS: the front-end's fields
    assert not got.features >> 3 & 1 and not got.features >> 63 & 1  # MTU, SPEED_DUPLEX: unknown here
    assert got.config[:6] == mac
    assert struct.unpack_from("<HH", got.config, 6) == (1, 1)  # VIRTIO_NET_S_LINK_UP, one queue pair


def test_stable_mac_is_locally_administered_unicast_and_per_guest_and_device() -> None:
    a = devtypes.stable_mac("web1", 0)
    assert a == devtypes.stable_mac("web1", 0) and len(a) == 6
    assert a[0] & 0b11 == 0b10
    assert len({a, devtypes.stable_mac("web1", 1), devtypes.stable_mac("web2", 0)}) == 3


@pytest.mark.parametrize("text", ["00:16:3e:12:34", "00:16:3e:12:34:5g", "01:16:3e:12:34:56", "0016.3e12.3456", ""])
def test_parse_mac_refuses_what_is_not_a_unicast_address(text: str) -> None:
    with pytest.raises(ValueError, match="mac="):
        devtypes.parse_mac(text)


def test_parse_mac_reads_the_xl_cfg_form() -> None:
    assert devtypes.parse_mac(" 00:16:3E:12:34:56 ") == bytes.fromhex("00163e123456")


def test_vsock_config_is_the_configured_cid_without_the_config_protocol_feature() -> None:
    got = offer(19, 1 << 32, None, mac=b"", cid=0x1234_5678)
    assert got.emulated and got.config == struct.pack("<Q", 0x1234_5678)  # struct virtio_vsock_config: le64 guest_cid
    assert got.features == 1 << 32
    # a back-end with a config space (vhost-device-vsock --guest-cid) answers for itself
    theirs = struct.pack("<Q", 7)
    assert offer(19, 1 << 32, theirs, mac=b"", cid=9) == devtypes.Offer(1 << 32, theirs)
    # neither: as before (the daemon logs it)
    assert offer(19, 1 << 32, None, mac=b"") == devtypes.Offer(1 << 32, b"")


@pytest.mark.parametrize("text", ["0", "2", "4294967295", "4294967296", "x", "-1"])
def test_parse_cid_refuses_the_reserved_and_out_of_range_cids(text: str) -> None:
    with pytest.raises(ValueError, match="^cid="):
        devtypes.parse_cid(text)
