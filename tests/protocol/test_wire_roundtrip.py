"""Every wire struct round-trips (parse/build/sizeof) and has the C size from docs/vhost-user-wire.md §2."""

from __future__ import annotations

import dataclasses

import pytest

from vhost_user.wire import (
    HEADER,
    STRUCTS,
    BackendRequest,
    ConfigSpace,
    DeviceStateParams,
    FrontendRequest,
    Header,
    Inflight,
    IotlbMsg,
    LogPayload,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    ProtocolFeatures,
    SharedObject,
    U64,
    VringAddr,
    VringArea,
    VringState,
    XenMemoryRegion,
    XenMemoryTable,
    XenMemRegMsg,
    encode,
    encode_payload,
)

# docs/vhost-user-wire.md §2 (the C sizes of the rst's structs).
C_SIZES = {
    U64: 8,
    VringState: 8,
    VringAddr: 40,
    MemoryRegion: 32,
    XenMemoryRegion: 40,
    MemRegMsg: 40,
    XenMemRegMsg: 48,
    LogPayload: 16,
    IotlbMsg: 32,
    VringArea: 24,
    Inflight: 24,
    SharedObject: 16,
    DeviceStateParams: 8,
}

REGION = MemoryRegion(guest_phys_addr=0x4000_0000, memory_size=0x10_0000, userspace_addr=0x7F00_0000_0000, mmap_offset=0x1000)
XREGION = XenMemoryRegion(
    guest_phys_addr=0x4000_0000, memory_size=0x10_0000, userspace_addr=0x4000_0000, mmap_offset=0, xen_mmap_flags=1, domid=7
)

SAMPLES = [
    U64(value=0x1_7500_7E46),
    VringState(index=1, num=256),
    VringAddr(index=0, flags=1, desc_user_addr=0x1000, used_user_addr=0x3000, avail_user_addr=0x2000, log_guest_addr=0xFFDE000),
    REGION,
    XREGION,
    MemRegMsg(padding=0, region=REGION),
    XenMemRegMsg(padding=0, region=XREGION),
    LogPayload(mmap_size=4096, mmap_offset=0),
    IotlbMsg(iova=0x1000, size=0x2000, uaddr=0x3000, perm=3, type=2, padding=bytes(6)),
    VringArea(u64=0x101, size=4096, offset=0),
    Inflight(mmap_size=8192, mmap_offset=0, num_queues=2, queue_size=128, padding=0),
    SharedObject(uuid=bytes(range(16))),
    DeviceStateParams(transfer_direction=1, migration_phase=0),
    MemoryTable(nregions=2, padding=0, regions=[REGION, dataclasses.replace(REGION, guest_phys_addr=0x8000_0000)]),
    XenMemoryTable(nregions=1, padding=0, regions=[XREGION]),
    ConfigSpace(offset=0, size=8, flags=0, payload=b"\x00\x20\x00\x00\x00\x00\x00\x00"),
]


@pytest.mark.parametrize("cls,size", sorted(C_SIZES.items(), key=lambda kv: kv[0].__name__), ids=lambda x: getattr(x, "__name__", str(x)))
def test_fixed_struct_sizeof_matches_c(cls: type, size: int) -> None:
    assert STRUCTS[cls].sizeof() == size


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_struct_round_trips(sample: object) -> None:
    struct = STRUCTS[type(sample)]
    data = struct.build(sample)
    parsed = struct.parse(data)
    assert parsed == sample
    assert struct.build(parsed) == data


def test_header_is_12_packed_native_bytes() -> None:
    assert HEADER.sizeof() == 12
    data = HEADER.build(Header(request=24, flags=0x9, size=69))
    assert data == (24).to_bytes(4, "little") + (9).to_bytes(4, "little") + (69).to_bytes(4, "little")


def test_variable_sizes_match_spec() -> None:
    # QEMU sends only 8 + n*sizeof(region) (docs/vhost-user-wire.md §2); full C structs are 264 / 328.
    assert len(encode_payload(MemoryTable(nregions=0, padding=0, regions=[REGION] * 8))) == 264
    assert len(encode_payload(XenMemoryTable(nregions=0, padding=0, regions=[XREGION] * 8))) == 328
    assert len(encode_payload(MemoryTable(nregions=0, padding=0, regions=[REGION] * 2))) == 8 + 64
    assert len(encode_payload(ConfigSpace(offset=0, size=0, flags=0, payload=bytes(57)))) == 12 + 57


def test_vring_addr_field_order_is_desc_used_avail() -> None:
    data = STRUCTS[VringAddr].build(SAMPLES[2])
    assert int.from_bytes(data[8:16], "little") == 0x1000  # desc
    assert int.from_bytes(data[16:24], "little") == 0x3000  # used
    assert int.from_bytes(data[24:32], "little") == 0x2000  # avail


def test_encode_sets_version_and_flags() -> None:
    msg = encode(FrontendRequest.SET_VRING_NUM, VringState(index=0, num=128), need_reply=True)
    assert msg[:12] == bytes.fromhex("08000000" "09000000" "08000000")
    reply = encode(FrontendRequest.GET_FEATURES, U64(value=1), reply=True)
    assert reply[4:8] == (5).to_bytes(4, "little")


def test_request_codes_match_spec_numbers() -> None:
    assert [r.value for r in FrontendRequest] == list(range(1, 44))
    assert [r.value for r in BackendRequest] == list(range(1, 9))
    assert FrontendRequest.SET_BACKEND_REQ_FD == 21 and FrontendRequest.CHECK_DEVICE_STATE == 43
    assert [f.value.bit_length() - 1 for f in ProtocolFeatures] == list(range(20))
    assert ProtocolFeatures.XEN_MMAP == 1 << 17


def test_unknown_request_code_is_a_pseudo_member_not_an_exception() -> None:
    unknown = FrontendRequest(99)
    assert int(unknown) == 99 and not unknown.known
    assert FrontendRequest(5).known
    assert BackendRequest.from_code(0).name == "UNKNOWN_0"
