"""FrontendConnection <-> BackendConnection in memory (h11 ConnectionPair / aioquic roundtrip):
negotiation, preconditions, REPLY_ACK only when negotiated, sticky broken state."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user.backend import BackendChannelRequester, BackendConnection
from vhost_user.errors import (
    FeatureNotNegotiated,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    UnexpectedReply,
    VhostUserError,
)
from vhost_user.events import Ack, Outgoing, Reply, RequestReceived
from vhost_user.frontend import BackendChannelResponder, FrontendConnection
from vhost_user.state import ChannelState, Negotiation
from vhost_user.wire import BackendRequest, FrontendRequest, MemoryRegion, ProtocolFeatures, VirtioFeatures, encode
from vhost_user.wire.payloads import U64

PF = ProtocolFeatures
FEATURES = int(VirtioFeatures.VERSION_1 | VirtioFeatures.PROTOCOL_FEATURES)


class Pair:
    def __init__(self, offered: ProtocolFeatures = PF.REPLY_ACK | PF.MQ | PF.CONFIG) -> None:
        self.fe = FrontendConnection()
        self.be = BackendConnection(protocol_features=offered)
        self.offered = offered

    def send(self, out: Outgoing) -> list[RequestReceived]:
        events = self.be.receive(out.data, out.fds)
        assert all(isinstance(e, RequestReceived) for e in events)
        return events  # type: ignore[return-value]

    def answer(self, out: Outgoing) -> list:  # type: ignore[type-arg]
        return self.fe.receive(out.data, out.fds)

    def negotiate(self, wanted: ProtocolFeatures) -> None:
        self.send(self.fe.get_features())
        assert self.answer(self.be.reply_u64(FrontendRequest.GET_FEATURES, FEATURES)) == [
            Reply(FrontendRequest.GET_FEATURES, U64(value=FEATURES))
        ]
        self.send(self.fe.get_protocol_features())
        self.answer(self.be.reply_u64(FrontendRequest.GET_PROTOCOL_FEATURES, int(self.offered)))
        (ev,) = self.send(self.fe.set_protocol_features(wanted))
        assert ev.answer is None


def test_full_negotiation_and_ack_only_when_negotiated() -> None:
    p = Pair()
    p.send(p.fe.get_features())
    p.answer(p.be.reply_u64(FrontendRequest.GET_FEATURES, FEATURES))
    # before REPLY_ACK is negotiated, SET_OWNER carries no NEED_REPLY and needs no answer
    (ev,) = p.send(p.fe.set_owner())
    assert not ev.need_reply and ev.answer is None and p.fe.pending is None
    p.send(p.fe.get_protocol_features())
    p.answer(p.be.reply_u64(FrontendRequest.GET_PROTOCOL_FEATURES, int(p.offered)))
    p.send(p.fe.set_protocol_features(PF.REPLY_ACK | PF.MQ))
    assert p.fe.negotiation is Negotiation.PROTOCOL_SET and p.be.reply_ack
    (ev,) = p.send(p.fe.set_vring_num(0, 256))
    assert ev.need_reply and ev.answer == "ack"
    assert p.answer(p.be.ack(FrontendRequest.SET_VRING_NUM, 0)) == [Ack(FrontendRequest.SET_VRING_NUM, 0)]
    (ev,) = p.send(p.fe.get_queue_num())
    assert ev.answer == "reply" and not ev.need_reply
    (reply,) = p.answer(p.be.reply_u64(FrontendRequest.GET_QUEUE_NUM, 4))
    assert reply.value == 4


def test_preconditions_raise_feature_not_negotiated_and_keep_connection_usable() -> None:
    p = Pair()
    p.negotiate(PF.REPLY_ACK)
    for call in (lambda: p.fe.get_config(0, 8), lambda: p.fe.get_queue_num(), lambda: p.fe.reset_device(),
                 lambda: p.fe.add_mem_reg(MemoryRegion(guest_phys_addr=0, memory_size=4096, userspace_addr=0, mmap_offset=0), 3),
                 lambda: p.fe.set_status(8), lambda: p.fe.get_inflight_fd(1, 128)):
        with pytest.raises(FeatureNotNegotiated):
            call()
    assert not p.fe.broken
    p.send(p.fe.set_owner())
    assert p.answer(p.be.ack(FrontendRequest.SET_OWNER)) == [Ack(FrontendRequest.SET_OWNER, 0)]


def test_protocol_features_need_bit_30_and_only_stable_offered_bits() -> None:
    fe = FrontendConnection()
    with pytest.raises(LocalProtocolError):
        fe.get_protocol_features()  # before GET_FEATURES
    be = BackendConnection()
    out = fe.get_features()
    be.receive(out.data)
    fe.receive(be.reply_u64(FrontendRequest.GET_FEATURES, int(VirtioFeatures.VERSION_1)).data)
    with pytest.raises(FeatureNotNegotiated):
        fe.get_protocol_features()
    with pytest.raises(FeatureNotNegotiated):
        fe.set_vring_enable(0, True)
    p = Pair(PF.MQ)
    p.send(p.fe.get_features())
    p.answer(p.be.reply_u64(FrontendRequest.GET_FEATURES, FEATURES))
    p.send(p.fe.get_protocol_features())
    p.answer(p.be.reply_u64(FrontendRequest.GET_PROTOCOL_FEATURES, int(PF.MQ) | (1 << 20)))
    with pytest.raises(LocalProtocolError):
        p.fe.set_protocol_features(1 << 20)  # bit 20+ never offered
    with pytest.raises(LocalProtocolError):
        p.fe.set_protocol_features(PF.CONFIG)  # not offered


def test_one_request_in_flight_at_a_time() -> None:
    p = Pair()
    p.send(p.fe.get_features())
    with pytest.raises(LocalProtocolError):
        p.fe.get_features()


def test_wrong_reply_code_breaks_connection_for_good() -> None:
    p = Pair()
    p.send(p.fe.get_features())
    with pytest.raises(UnexpectedReply):
        p.fe.receive(encode(FrontendRequest.GET_QUEUE_NUM, U64(value=1), reply=True))
    assert p.fe.broken and p.fe.state is ChannelState.BROKEN
    with pytest.raises(LocalProtocolError, match="broken"):
        p.fe.set_owner()
    with pytest.raises(LocalProtocolError, match="broken"):
        p.fe.receive(b"")


def test_reply_without_request_is_remote_error() -> None:
    fe = FrontendConnection()
    with pytest.raises(RemoteProtocolError):
        fe.receive(encode(FrontendRequest.GET_FEATURES, U64(value=1), reply=True))
    assert fe.broken


def test_backend_rejects_unoffered_protocol_features_and_stays_broken() -> None:
    be = BackendConnection(protocol_features=PF.MQ)
    with pytest.raises(MalformedMessage) as exc:
        be.receive(encode(FrontendRequest.SET_PROTOCOL_FEATURES, U64(value=int(PF.CONFIG))))
    assert exc.value.field == "u64"
    with pytest.raises(LocalProtocolError):
        be.receive(encode(FrontendRequest.GET_FEATURES))


def test_backend_answers_in_order_and_refuses_unowed_answers() -> None:
    be = BackendConnection()
    events = be.receive(encode(FrontendRequest.SET_OWNER) + encode(FrontendRequest.GET_FEATURES))
    assert [e.answer for e in events] == [None, "reply"]
    with pytest.raises(LocalProtocolError):
        be.ack(FrontendRequest.SET_OWNER)
    be.reply_u64(FrontendRequest.GET_FEATURES, 1)
    assert be.owed is None


def test_xen_mmap_switches_region_layout_both_sides() -> None:
    from vhost_user.wire import XenMemoryRegion

    p = Pair(PF.XEN_MMAP | PF.REPLY_ACK)
    p.negotiate(PF.XEN_MMAP | PF.REPLY_ACK)
    region = XenMemoryRegion(guest_phys_addr=0x4000_0000, memory_size=1 << 20, userspace_addr=0x4000_0000,
                             mmap_offset=0, xen_mmap_flags=1, domid=3)
    (ev,) = p.send(p.fe.set_mem_table([region], [9]))
    assert ev.payload.regions[0].domid == 3 and ev.fds == (9,)
    p.answer(p.be.ack(FrontendRequest.SET_MEM_TABLE))
    with pytest.raises(LocalProtocolError):
        p.fe.set_mem_table([MemoryRegion(guest_phys_addr=0, memory_size=4096, userspace_addr=0, mmap_offset=0)], [9])


def test_backend_channel_config_change_with_ack() -> None:
    req = BackendChannelRequester(reply_ack=True)
    resp = BackendChannelResponder(reply_ack=True)
    (ev,) = resp.receive(req.config_change(need_reply=True).data)
    assert ev.request == BackendRequest.CONFIG_CHANGE_MSG and ev.answer == "ack"
    (ack,) = req.receive(resp.ack(ev.request, 0).data)
    assert ack == Ack(BackendRequest.CONFIG_CHANGE_MSG, 0)
    (ev,) = resp.receive(req.vring_call(1).data)
    assert ev.answer is None and ev.payload.index == 1


OPS = st.lists(st.sampled_from(["features", "owner", "num", "queue_num", "garbage", "answer"]), max_size=12)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_state_machine_random_sequences_only_raise_library_errors(ops: list[str]) -> None:
    """Hypothesis over (state x input) (h2 test_state_machines): any order of calls either works
    or raises a VhostUserError, and once broken the connection stays broken."""
    p = Pair()
    was_broken = False
    for op in ops:
        try:
            if op == "features":
                p.send(p.fe.get_features())
            elif op == "owner":
                p.send(p.fe.set_owner())
            elif op == "num":
                p.send(p.fe.set_vring_num(0, 8))
            elif op == "queue_num":
                p.send(p.fe.get_queue_num())
            elif op == "garbage":
                p.fe.receive(b"\x01\x00\x00\x00\x05\x00\x00\x00\x08\x00\x00\x00" + bytes(8))
            elif op == "answer":
                owed = p.be.owed
                if owed is not None:
                    out = p.be.reply_u64(owed.request, FEATURES) if owed.kind == "reply" else p.be.ack(owed.request)
                    p.answer(out)
        except VhostUserError:
            pass
        if was_broken:
            assert p.fe.broken
        was_broken = p.fe.broken


def test_set_protocol_features_enabling_reply_ack_with_need_reply_is_acked() -> None:
    """Linux virtio_uml sets NEED_REPLY on the SET_PROTOCOL_FEATURES that negotiates REPLY_ACK
    and blocks until the ACK arrives (found against linux.uml 6.1)."""
    be = BackendConnection(protocol_features=PF.REPLY_ACK | PF.CONFIG)
    (ev,) = be.receive(encode(FrontendRequest.SET_PROTOCOL_FEATURES, U64(value=int(PF.REPLY_ACK)), need_reply=True))
    assert ev.answer == "ack"
    be2 = BackendConnection(protocol_features=PF.REPLY_ACK | PF.CONFIG)
    (ev,) = be2.receive(encode(FrontendRequest.SET_PROTOCOL_FEATURES, U64(value=int(PF.CONFIG)), need_reply=True))
    assert ev.answer is None  # REPLY_ACK not negotiated: no ACK


@settings(max_examples=int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "300")), deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8), st.booleans())
def test_connections_fed_random_chunks_only_raise_library_errors(chunks: list[bytes], frontend: bool) -> None:
    """Random bytes, in random chunking, into receive(): typed errors only, then sticky broken."""
    if frontend:
        conn: FrontendConnection | BackendConnection = FrontendConnection()
        conn.get_features()  # something in flight, so replies are expected
    else:
        conn = BackendConnection(protocol_features=PF.REPLY_ACK | PF.XEN_MMAP)
    failed = False
    for chunk in chunks:
        try:
            conn.receive(chunk)
        except VhostUserError:
            failed = True
        if failed:
            assert conn.broken or conn.state is ChannelState.BROKEN
