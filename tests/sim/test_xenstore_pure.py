"""Pure tiers of xenstore: the sans-IO client core and the simulated store's semantics (no sockets)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xen_vhost_sim.xenstore_tree import Store, XenstoreQuota
from xen_vhost_master.xen.xenstore_wire import (
    XENSTORE_PAYLOAD_MAX,
    XSD_ERRORS,
    XenstoreConflict,
    XenstoreError,
    XenstoreNotFound,
    XenstorePermissionError,
    XenstoreProtocolError,
    XsAccess,
    XsClientProtocol,
    XsFramer,
    XsHeader,
    XsPerm,
    XsReply,
    XsType,
    XsWatchEvent,
    encode_message,
)


def test_header_is_the_16_byte_xsd_sockmsg() -> None:
    raw = XsHeader(XsType.WRITE, 7, 3, 9).pack()
    assert raw == struct.pack("=IIII", 11, 7, 3, 9) and len(raw) == 16 == XsHeader.SIZE
    assert XsHeader.unpack(raw) == XsHeader(11, 7, 3, 9)
    with pytest.raises(ValueError):
        encode_message(XsType.WRITE, 1, 0, bytes(XENSTORE_PAYLOAD_MAX + 1))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8), st.integers(min_value=1, max_value=40))
def test_framer_reassembles_any_split(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode_message(XsType.READ, i + 1, 0, p) for i, p in enumerate(payloads))
    framer = XsFramer()
    out = []
    for i in range(0, len(stream), chunk):
        out += framer.feed(stream[i : i + chunk])
    assert [m.payload for m in out] == payloads and [m.req_id for m in out] == list(range(1, len(payloads) + 1))
    assert framer.buffered == 0


def test_client_core_matches_replies_and_demultiplexes_events() -> None:
    proto = XsClientProtocol()
    r1, out1 = proto.request(XsType.READ, b"/a\0")
    r2, _ = proto.request(XsType.DIRECTORY, b"/b\0")
    assert r1 != r2 and out1[16:] == b"/a\0"
    stream = (
        encode_message(XsType.WATCH_EVENT, 0, 0, b"/b/c\0tok\0")
        + encode_message(XsType.DIRECTORY, r2, 0, b"c\0")
        + encode_message(XsType.ERROR, r1, 0, b"EACCES\0")
    )
    events = [ev for b in stream for ev in proto.receive_data(bytes([b]))]  # byte by byte
    assert events[0] == XsWatchEvent("/b/c", "tok")
    assert events[1] == XsReply(r2, XsType.DIRECTORY, b"c\0")
    assert isinstance(events[2], XsReply) and isinstance(events[2].error, XenstorePermissionError)
    assert proto.pending == {}


@pytest.mark.parametrize("name", sorted(XSD_ERRORS))
def test_every_xsd_error_name_maps_to_its_errno(name: str) -> None:
    proto = XsClientProtocol()
    req, _ = proto.request(XsType.READ, b"/x\0")
    (reply,) = proto.receive_data(encode_message(XsType.ERROR, req, 0, name.encode() + b"\0"))
    assert isinstance(reply, XsReply) and isinstance(reply.error, XenstoreError)
    assert reply.error.errno == getattr(errno, name)
    if name == "ENOENT":
        assert isinstance(reply.error, FileNotFoundError)
    if name == "EAGAIN":
        assert isinstance(reply.error, XenstoreConflict)


def test_client_core_violations_are_sticky() -> None:
    proto = XsClientProtocol()
    proto.request(XsType.READ, b"/x\0")
    with pytest.raises(XenstoreProtocolError):
        proto.receive_data(encode_message(XsType.READ, 4242, 0, b"x"))  # nobody asked
    with pytest.raises(XenstoreProtocolError):
        proto.receive_data(b"")
    with pytest.raises(XenstoreProtocolError):
        proto.request(XsType.READ, b"/y\0")
    bad_event = XsClientProtocol()
    with pytest.raises(XenstoreProtocolError):
        bad_event.receive_data(encode_message(XsType.WATCH_EVENT, 0, 0, b"/only-a-path\0"))


def test_abandoned_request_reply_is_dropped_once() -> None:
    proto = XsClientProtocol()
    req, _ = proto.request(XsType.READ, b"/x\0")
    proto.abandon(req)
    assert proto.receive_data(encode_message(XsType.READ, req, 0, b"late")) == []
    with pytest.raises(XenstoreProtocolError):
        proto.receive_data(encode_message(XsType.READ, req, 0, b"again"))


def test_perm_strings() -> None:
    assert str(XsPerm(5, XsAccess.BOTH)) == "b5"
    assert XsPerm.parse("r0") == XsPerm(0, XsAccess.READ)
    for bad in ("x1", "r", "r-1", "r70000", "rr1"):
        with pytest.raises(ValueError):
            XsPerm.parse(bad)


# ---- the store ----------------------------------------------------------------------------------------


def test_disjoint_transactions_both_commit_overlapping_ones_conflict() -> None:
    store = Store()
    live = store.access(0)
    live.write("/a", b"0")
    live.write("/b", b"0")
    t1, t2 = store.begin(1, 0), store.begin(2, 0)
    store.access(0, t1).write("/a", b"1")
    store.access(0, t2).write("/b", b"2")
    store.commit(t1)
    store.commit(t2)
    assert live.read("/a") == b"1" and live.read("/b") == b"2"
    t3, t4 = store.begin(3, 0), store.begin(4, 0)
    assert store.access(0, t3).read("/a") == b"1"
    store.access(0, t3).write("/c", b"from t3")
    store.access(0, t4).write("/a", b"4")
    store.commit(t4)
    with pytest.raises(XenstoreConflict):
        store.commit(t3)
    with pytest.raises(XenstoreNotFound):
        live.read("/c")  # nothing of the failed transaction leaked
    # A transaction that saw a node missing conflicts with its creation.
    t5 = store.begin(5, 0)
    with pytest.raises(XenstoreNotFound):
        store.access(0, t5).read("/d")
    live.write("/d", b"")
    store.access(0, t5).write("/e", b"")
    with pytest.raises(XenstoreConflict):
        store.commit(t5)


def test_rm_inside_a_transaction_is_atomic_and_reports_removed_perms() -> None:
    store = Store()
    live = store.access(0)
    for p in ("/x/1/a", "/x/1/b", "/x/2"):
        live.write(p, b"v")
    tx = store.begin(1, 0)
    store.access(0, tx).rm("/x/1")
    assert live.directory("/x/1") == ["a", "b"]  # untouched until commit
    (change,) = store.commit(tx)
    assert change.path == "/x/1" and change.recursive and set(change.removed) == {"/x/1", "/x/1/a", "/x/1/b"}
    assert live.directory("/x") == ["2"]
    assert "/x/1/a" not in store.nodes


def test_unprivileged_creation_owns_nodes_and_counts_against_the_quota() -> None:
    store = Store(XenstoreQuota(max_nodes_per_domain=3))
    store.access(0).mkdir("/local/domain/7")
    store.access(0).set_perms("/local/domain/7", [XsPerm(7, XsAccess.NONE)])
    dom7 = store.access(7)
    dom7.write("a/b", b"x")  # creates a and a/b
    assert dom7.get_perms("a/b") == [XsPerm(7, XsAccess.NONE)]
    with pytest.raises(XenstoreError) as info:
        dom7.write("c/d", b"")  # two more: 1 (home) + 2 + 2 > 3
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(XenstorePermissionError):
        store.access(8).read("/local/domain/7/a")
    with pytest.raises(XenstoreError) as inval:
        dom7.write("/local/domain/7/trailing/", b"")
    assert inval.value.errno == errno.EINVAL


_PATHS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(lambda parts: "/t/" + "/".join(parts))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _PATHS, st.binary(max_size=4)),
        st.tuples(st.just("mkdir"), _PATHS, st.just(b"")),
        st.tuples(st.just("rm"), _PATHS, st.just(b"")),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(_OPS, st.booleans())
def test_store_matches_a_flat_model(ops: list[tuple[str, str, bytes]], in_transaction: bool) -> None:
    """Implicit parents, recursive rm and listings agree with a dict of paths, live or in a transaction."""
    store = Store()
    store.access(0).mkdir("/t")
    tx = store.begin(1, 0) if in_transaction else None
    acc = store.access(0, tx)
    model: dict[str, bytes] = {"/t": b""}
    for op, path, value in ops:
        if op == "write":
            acc.write(path, value)
            parts = path.split("/")
            for i in range(3, len(parts)):
                model.setdefault("/".join(parts[:i]), b"")
            model[path] = value
        elif op == "mkdir":
            acc.mkdir(path)
            parts = path.split("/")
            for i in range(3, len(parts) + 1):
                model.setdefault("/".join(parts[:i]), b"")
        else:
            parent = path.rsplit("/", 1)[0]
            if path not in model and parent not in model:
                with pytest.raises(XenstoreNotFound):
                    acc.rm(path)
                continue
            acc.rm(path)
            for p in [p for p in model if p == path or p.startswith(path + "/")]:
                del model[p]
    if tx is not None:
        store.commit(tx)
    live = store.access(0)
    for path, value in model.items():
        assert live.read(path) == value
        kids = sorted(p.rsplit("/", 1)[1] for p in model if p.rsplit("/", 1)[0] == path)
        assert sorted(live.directory(path)) == kids
    assert {p for p in store.nodes if p.startswith("/t")} == set(model)
