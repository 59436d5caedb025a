"""Boundary validation: each violation is a typed RemoteProtocolError naming the field; random
input never raises anything but the library's own errors (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user.errors import FdCountMismatch, MalformedMessage, RemoteProtocolError, UnknownRequest, VhostUserError
from vhost_user.wire import (
    FRONTEND_SPECS,
    ConfigSpace,
    FrontendRequest,
    Header,
    MemoryRegion,
    MemoryTable,
    MessageFramer,
    U64,
    VringAddr,
    decode_header,
    decode_reply,
    decode_request,
    encode,
    BackendRequest,
)

R0 = MemoryRegion(guest_phys_addr=0, memory_size=0x1000, userspace_addr=0x10000, mmap_offset=0)


def frame(data: bytes, fds: tuple[int, ...] = ()) -> tuple[Header, bytes, list[int]]:
    (out,) = MessageFramer(expect_reply=False).feed(data, fds)
    return out


def test_bad_version_names_field() -> None:
    with pytest.raises(MalformedMessage) as exc:
        decode_header(bytes.fromhex("01000000" "02000000" "00000000"), expect_reply=False)
    assert exc.value.field == "flags.version"


def test_reserved_flag_bits_rejected() -> None:
    with pytest.raises(MalformedMessage) as exc:
        decode_header(bytes.fromhex("01000000" "11000000" "00000000"), expect_reply=False)
    assert exc.value.field == "flags"


def test_oversized_size_rejected_before_reading_payload() -> None:
    with pytest.raises(MalformedMessage) as exc:
        MessageFramer(expect_reply=False).feed(bytes.fromhex("05000000" "01000000" "00001000"))
    assert exc.value.field == "size"


def test_request_with_reply_bit_rejected() -> None:
    with pytest.raises(MalformedMessage) as exc:
        decode_header(bytes.fromhex("01000000" "05000000" "00000000"), expect_reply=False)
    assert exc.value.field == "flags.reply"


def test_plain_memory_messages_decode_plain_under_xen_mmap() -> None:
    """QEMU 8.2 and later acknowledge XEN_MMAP (bit 17, which they only reserve) and send the
    plain layout: a memory message of exactly the plain size is read as plain, the Xen sizes as Xen."""
    from vhost_user.wire import MemRegMsg, XenMemoryRegion, XenMemoryTable, XenMemRegMsg

    x0 = XenMemoryRegion(guest_phys_addr=0, memory_size=0x1000, userspace_addr=0x10000, mmap_offset=0,
                         xen_mmap_flags=1, domid=5)
    r1 = dataclasses.replace(R0, guest_phys_addr=0x1000, userspace_addr=0x11000)
    x1 = dataclasses.replace(x0, guest_phys_addr=0x1000, userspace_addr=0x11000)
    cases = [
        (FrontendRequest.ADD_MEM_REG, MemRegMsg(padding=0, region=R0), MemRegMsg, (3,)),
        (FrontendRequest.ADD_MEM_REG, XenMemRegMsg(padding=0, region=x0), XenMemRegMsg, (3,)),
        (FrontendRequest.REM_MEM_REG, MemRegMsg(padding=0, region=R0), MemRegMsg, ()),
        (FrontendRequest.SET_MEM_TABLE, MemoryTable(nregions=2, padding=0, regions=[R0, r1]), MemoryTable, (3, 4)),
        (FrontendRequest.SET_MEM_TABLE, XenMemoryTable(nregions=2, padding=0, regions=[x0, x1]), XenMemoryTable, (3, 4)),
    ]
    for request, payload, cls, fds in cases:
        msg = decode_request(*frame(encode(request, payload), fds), xen_mmap=True)
        assert type(msg.payload) is cls, (request, cls)
        assert msg.payload == payload
    # without XEN_MMAP the Xen layout is still a size error
    with pytest.raises(MalformedMessage):
        decode_request(*frame(encode(FrontendRequest.ADD_MEM_REG, XenMemRegMsg(padding=0, region=x0)), (3,)))


def test_unknown_request_code_is_typed_error() -> None:
    with pytest.raises(UnknownRequest) as exc:
        decode_request(*frame(bytes.fromhex("63000000" "01000000" "00000000")))
    assert exc.value.code == 99 and isinstance(exc.value, RemoteProtocolError)


def test_payload_size_must_match_request() -> None:
    with pytest.raises(MalformedMessage) as exc:
        decode_request(*frame(encode(FrontendRequest.SET_FEATURES, None)[:8] + (4).to_bytes(4, "little") + bytes(4)))
    assert exc.value.field == "size"


@pytest.mark.parametrize(
    "field,kw",
    [
        ("desc_user_addr", {"desc_user_addr": 0x1008}),
        ("avail_user_addr", {"avail_user_addr": 0x2001}),
        ("used_user_addr", {"used_user_addr": 0x3002}),
        ("flags", {"flags": 2}),
    ],
)
def test_vring_alignment_checked(field: str, kw: dict[str, int]) -> None:
    addr = VringAddr(index=0, flags=0, desc_user_addr=0x1000, used_user_addr=0x3000, avail_user_addr=0x2000, log_guest_addr=0)
    decode_request(*frame(encode(FrontendRequest.SET_VRING_ADDR, addr)))
    with pytest.raises(MalformedMessage) as exc:
        decode_request(*frame(encode(FrontendRequest.SET_VRING_ADDR, dataclasses.replace(addr, **kw))))
    assert exc.value.field == field


def test_mem_table_needs_one_fd_per_region() -> None:
    table = MemoryTable(nregions=2, padding=0, regions=[R0, dataclasses.replace(R0, guest_phys_addr=0x1000, userspace_addr=0x20000)])
    msg = decode_request(*frame(encode(FrontendRequest.SET_MEM_TABLE, table), (10, 11)))
    assert msg.fds == (10, 11)
    with pytest.raises(FdCountMismatch) as exc:
        decode_request(*frame(encode(FrontendRequest.SET_MEM_TABLE, table), (10,)))
    assert exc.value.field == "fds" and isinstance(exc.value, RemoteProtocolError)


def test_mem_table_region_overlap_and_count() -> None:
    overlap = MemoryTable(nregions=2, padding=0, regions=[R0, dataclasses.replace(R0, userspace_addr=0x20000)])
    with pytest.raises(MalformedMessage) as exc:
        decode_request(*frame(encode(FrontendRequest.SET_MEM_TABLE, overlap), (3, 4)))
    assert exc.value.field == "regions[1].guest_phys_addr"
    body = (9).to_bytes(4, "little") + bytes(4) + bytes(9 * 32)
    header = Header(request=5, flags=1, size=len(body))
    with pytest.raises(MalformedMessage) as exc:
        decode_request(header, body, ())
    assert exc.value.field == "nregions"
    empty = MemoryTable(nregions=1, padding=0, regions=[dataclasses.replace(R0, memory_size=0)])
    with pytest.raises(MalformedMessage, match="memory_size"):
        decode_request(*frame(encode(FrontendRequest.SET_MEM_TABLE, empty), (3,)))


@pytest.mark.parametrize("request_", [FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR])
def test_kick_call_err_fd_rules(request_: FrontendRequest) -> None:
    assert decode_request(*frame(encode(request_, U64(value=1)), (5,))).fds == (5,)
    assert decode_request(*frame(encode(request_, U64(value=0x101)))).fds == ()
    with pytest.raises(FdCountMismatch):
        decode_request(*frame(encode(request_, U64(value=1))))
    with pytest.raises(FdCountMismatch):
        decode_request(*frame(encode(request_, U64(value=0x101)), (5,)))
    with pytest.raises(MalformedMessage) as exc:
        decode_request(*frame(encode(request_, U64(value=0x201)), (5,)))
    assert exc.value.field == "u64"


def test_config_window_capped() -> None:
    bad = ConfigSpace(offset=250, size=10, flags=0, payload=bytes(10))
    with pytest.raises(MalformedMessage) as exc:
        decode_request(*frame(encode(FrontendRequest.SET_CONFIG, bad)))
    assert exc.value.field == "offset"


def test_wrong_reply_code_is_unexpected_reply() -> None:
    from vhost_user.errors import UnexpectedReply

    data = encode(FrontendRequest.GET_PROTOCOL_FEATURES, U64(value=1), reply=True)
    (header, body, fds), = MessageFramer(expect_reply=True).feed(data)
    with pytest.raises(UnexpectedReply):
        decode_reply(header, body, fds, expected=FrontendRequest.GET_FEATURES, ack=False)


def test_framer_keeps_fds_with_their_message_and_splits_anywhere() -> None:
    a = encode(FrontendRequest.SET_VRING_CALL, U64(value=0))
    b = encode(FrontendRequest.GET_FEATURES)
    for cut in range(1, len(a) + len(b)):
        framer = MessageFramer(expect_reply=False)
        stream = a + b
        out = framer.feed(stream[:cut], (42,)) + framer.feed(stream[cut:])
        assert [h.request for h, _, _ in out] == [13, 1]
        assert out[0][2] == [42] and out[1][2] == []


ALLOWED = (VhostUserError,)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans(), st.booleans())
def test_random_bytes_only_raise_library_errors(data: bytes, expect_reply: bool, xen: bool) -> None:
    framer = MessageFramer(expect_reply=expect_reply)
    try:
        frames = framer.feed(data)
    except ALLOWED:
        return
    for header, body, fds in frames:
        try:
            if expect_reply:
                decode_reply(header, body, fds, expected=FrontendRequest.from_code(header.request), ack=xen)
            else:
                decode_request(header, body, fds, xen_mmap=xen)
        except ALLOWED:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([int(r) for r in FRONTEND_SPECS] + [0, 44, 99, 0xFFFFFFFF]),
    st.sampled_from([0x1, 0x9]),
    st.binary(max_size=360),
    st.integers(min_value=0, max_value=8),
    st.booleans(),
    st.booleans(),
)
def test_valid_header_garbage_payload_only_raises_library_errors(
    code: int, flags: int, body: bytes, nfds: int, xen: bool, backend_channel: bool
) -> None:
    header = Header(request=code, flags=flags, size=len(body))
    fds = list(range(100, 100 + nfds))
    try:
        decode_request(header, body, fds, xen_mmap=xen, channel="back-end" if backend_channel else "front-end")
    except ALLOWED:
        pass
    try:
        decode_reply(
            header, body, fds,
            expected=(BackendRequest if backend_channel else FrontendRequest).from_code(code),
            ack=xen, channel="back-end" if backend_channel else "front-end",
        )
    except ALLOWED:
        pass


def test_mem_table_with_zero_padded_tail_is_accepted_up_to_full_struct() -> None:
    """Linux virtio_uml sends SET_MEM_TABLE with size 72 for one region (found against
    linux.uml 6.1); trailing bytes up to the 264-byte C struct are ignored, beyond it rejected."""
    one = encode(FrontendRequest.SET_MEM_TABLE, MemoryTable(nregions=1, padding=0, regions=[R0]))
    body = one[12:] + bytes(32)
    msg = decode_request(Header(request=5, flags=1, size=len(body)), body, (3,))
    assert msg.payload.nregions == 1 and msg.payload.regions[0] == R0
    body = one[12:] + bytes(8 * 32)
    with pytest.raises(MalformedMessage) as exc:
        decode_request(Header(request=5, flags=1, size=len(body)), body, (3,))
    assert exc.value.field == "size"
