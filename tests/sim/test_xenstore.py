"""The asyncio xenstore client against the simulated xenstored, over real sockets, on both loops."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import uvloop

from xen_vhost_sim.xenstore_libxl import (
    VirtioDeviceSpec,
    add_virtio_device,
    create_domain,
    destroy_domain,
    remove_virtio_device,
)
from xen_vhost_sim.xenstore_tree import NodeAccess
from xen_vhost_sim.xenstored import SimXenstored, XenstoreQuota
from xen_vhost_master.xen.xenstore import (
    XenstoreClient,
    XenstoreConflict,
    XenstoreDisconnected,
    XenstoreError,
    XenstoreExists,
    XenstoreNotFound,
    XenstorePermissionError,
    XsAccess,
    XsPerm,
    XsTransaction,
    XsType,
)

# Generous bound for anything that should happen "at once" on a loaded 2-core machine.
WAIT = 5.0


@pytest.fixture(scope="module", autouse=True)
def _uvloop_warmed_up() -> None:
    """uvloop opens a process-wide pipe the first time a loop runs; do that before ``no_fd_leak``
    takes its snapshot, or the first uvloop test of the session reports it as a leak."""
    uvloop.run(asyncio.sleep(0))


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for Unix socket paths (sun_path is 108 bytes; tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="xs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def xenstored() -> AsyncIterator[SimXenstored]:
    xs = SimXenstored(XenstoreQuota(max_nodes_per_domain=50, max_watches_per_domain=4))
    yield xs
    await xs.close()


async def connect(xs: SimXenstored, domid: int = 0, timeout: float = WAIT) -> XenstoreClient:
    return XenstoreClient(xs.connection_socket(domid), timeout=timeout, name=f"dom{domid}")


async def sync(client: XenstoreClient) -> None:
    """A round trip on ``client``'s connection: every event sent before its reply has now arrived."""
    await client.get_domain_path(0)


@pytest.mark.asyncio
async def test_read_write_directory_rm_over_the_unix_socket(no_fd_leak: None, short_dir: str) -> None:
    xs = SimXenstored()
    path = os.path.join(short_dir, "socket")
    await xs.serve_unix(path)
    try:
        async with await XenstoreClient.open([path], device_paths=(), timeout=WAIT) as c:
            await c.write("/vm/a/b", b"hello")  # implicit parents
            assert await c.read("/vm/a/b") == b"hello"
            assert await c.read("/vm/a") == b""
            assert await c.directory("/vm") == ["a"]
            await c.write("/vm/a/c", "x")
            await c.mkdir("/vm/a/d")
            await c.mkdir("/vm/a/d")  # existing: fine
            assert await c.directory("/vm/a") == ["b", "c", "d"]
            assert xs.read("/vm/a/c") == b"x"  # the in-process view agrees
            await c.rm("/vm/a")  # recursive
            with pytest.raises(XenstoreNotFound) as info:
                await c.read("/vm/a/b")
            assert isinstance(info.value, FileNotFoundError) and info.value.path == "/vm/a/b"
            await c.rm("/vm/a")  # missing but parent exists: OK, as xenstored
            with pytest.raises(XenstoreNotFound):
                await c.rm("/nope/at/all")
            assert await c.directory("/vm") == []
            assert await c.get_domain_path(7) == "/local/domain/7"
            assert await c.is_domain_introduced(0) and not await c.is_domain_introduced(9)
            with pytest.raises(XenstoreError) as bad:
                await c.write("/bad path", b"")
            assert bad.value.errno == 22  # EINVAL for characters outside xenstored's valid_chars
    finally:
        await xs.close()
    assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_domu_connection_sees_only_what_perms_allow(no_fd_leak: None, xenstored: SimXenstored) -> None:
    create_domain(xenstored, 5, "guest")
    dom0, domu = await connect(xenstored, 0), await connect(xenstored, 5)
    try:
        await dom0.write("/local/domain/0/secret", b"s")
        with pytest.raises(XenstorePermissionError) as info:
            await domu.read("/local/domain/0/secret")
        assert info.value.errno == 13
        # A missing node under an unreadable parent is EACCES too (no existence leak).
        with pytest.raises(XenstorePermissionError):
            await domu.read("/local/domain/0/secret/missing")
        with pytest.raises(XenstorePermissionError):
            await domu.write("/local/domain/0/x", b"1")
        # The domain's home is readable but owned by dom0; data/ is the domain's own.
        assert await domu.read("name") == b"guest"  # relative path
        with pytest.raises(XenstorePermissionError):
            await domu.write("name", b"evil")
        await domu.write("data/k", b"v")
        assert await dom0.get_perms("/local/domain/5/data/k") == [XsPerm(5, XsAccess.NONE)]
        # Granting read access lets the domain in.
        await dom0.set_perms("/local/domain/0/secret", [XsPerm(0, XsAccess.NONE), XsPerm(5, XsAccess.READ)])
        assert await domu.read("/local/domain/0/secret") == b"s"
        with pytest.raises(XenstorePermissionError):
            await domu.write("/local/domain/0/secret", b"w")
        # An unprivileged owner may not give its node away.
        with pytest.raises(XenstorePermissionError) as eperm:
            await domu.set_perms("data/k", [XsPerm(0, XsAccess.NONE)])
        assert eperm.value.errno == 1
    finally:
        await dom0.close()
        await domu.close()


@pytest.mark.asyncio
async def test_quotas_answer_enospc_and_e2big(no_fd_leak: None, xenstored: SimXenstored) -> None:
    create_domain(xenstored, 3, "q")
    domu = await connect(xenstored, 3)
    try:
        with pytest.raises(XenstoreError) as big:
            await domu.write("data/big", b"x" * 2049)
        assert big.value.errno == 28  # ENOSPC
        with pytest.raises(XenstoreError) as many:
            for i in range(60):
                await domu.write(f"data/n{i}", b"")
        assert many.value.errno == 28
        watches = [await domu.watch("data", f"t{i}") for i in range(4)]
        with pytest.raises(XenstoreError) as w:
            await domu.watch("data", "one-too-many")
        assert w.value.errno == 7  # E2BIG
        assert len(watches) == 4
        with pytest.raises(XenstoreExists):
            with pytest.raises(ValueError):
                await domu.watch("other", "t0")  # tokens are unique per connection, checked locally
            # The client refuses a reused token locally, so ask the daemon directly: EEXIST.
            await domu._call(XsType.WATCH, b"data\0t0\0", tx_id=0)
    finally:
        await domu.close()


@pytest.mark.asyncio
async def test_watch_fires_initially_on_write_and_on_ancestor_rm(no_fd_leak: None, xenstored: SimXenstored) -> None:
    dom0, other = await connect(xenstored), await connect(xenstored)
    try:
        watch = await dom0.watch("/w/dev", "tok")
        first = await watch.get(WAIT)
        assert (first.path, first.token) == ("/w/dev", "tok")
        await other.write("/w/dev/0/state", b"1")
        ev = await watch.get(WAIT)
        assert (ev.path, ev.token) == ("/w/dev/0/state", "tok")
        await other.write("/w/unrelated", b"1")
        await other.rm("/w")
        ev = await watch.get(WAIT)
        assert ev.path == "/w/dev"  # a watch below a removed node reports its own path
        await sync(dom0)
        assert watch.pending() == 0  # nothing for /w/unrelated
        await watch.unwatch()
        await other.write("/w/dev/1", b"")
        await sync(dom0)
        assert watch.pending() == 0
    finally:
        await dom0.close()
        await other.close()


@pytest.mark.asyncio
async def test_relative_watch_of_a_domu_and_permission_filtered_events(xenstored: SimXenstored) -> None:
    create_domain(xenstored, 4, "g")
    domu = await connect(xenstored, 4)
    try:
        watch = await domu.watch("device", "d")
        assert (await watch.get(WAIT)).path == "device"
        spec = VirtioDeviceSpec(domid=4, devid=0, device_id=2, base=0x2000000, irq=33)
        add_virtio_device(xenstored, spec)
        ev = await watch.get(WAIT)
        assert ev.path.startswith("device/virtio/0")  # relative, as registered
        # dom0's private node under the domain's home: the domain may not hear of it.
        def private(acc: NodeAccess) -> None:
            acc.write("/local/domain/4/device/private", b"x")
            acc.set_perms("/local/domain/4/device/private", [XsPerm(0, XsAccess.NONE)])

        xenstored.atomically(private)
        xenstored.write("/local/domain/4/device/public", b"y")
        await sync(domu)
        seen = [watch._events.popleft().path for _ in range(watch.pending())]
        assert "device/private" not in seen
        assert "device/public" in seen
    finally:
        await domu.close()


@pytest.mark.asyncio
async def test_transaction_commit_fires_watches_only_at_commit(no_fd_leak: None, xenstored: SimXenstored) -> None:
    watcher, writer = await connect(xenstored), await connect(xenstored)
    try:
        watch = await watcher.watch("/tx", "t")
        await watch.get(WAIT)
        tx = await writer.transaction_start()
        await tx.write("/tx/a", b"1")
        await tx.write("/tx/b", b"2")
        assert await tx.read("/tx/a") == b"1"
        with pytest.raises(XenstoreNotFound):
            await writer.read("/tx/a")  # isolation: not visible outside before commit
        await sync(watcher)
        assert watch.pending() == 0
        await tx.commit()
        paths = {(await watch.get(WAIT)).path, (await watch.get(WAIT)).path}
        assert paths == {"/tx/a", "/tx/b"}
        assert await writer.read("/tx/b") == b"2"
        aborted = await writer.transaction_start()
        await aborted.write("/tx/c", b"3")
        await aborted.abort()
        await sync(watcher)
        assert watch.pending() == 0
        assert not await writer.exists("/tx/c")
        with pytest.raises(XenstoreError):
            await aborted.read("/tx/a")  # ended
    finally:
        await watcher.close()
        await writer.close()


@pytest.mark.asyncio
async def test_transaction_conflict_is_eagain_and_the_helper_retries(no_fd_leak: None, xenstored: SimXenstored) -> None:
    a, b = await connect(xenstored), await connect(xenstored)
    try:
        await a.write("/cnt", b"0")
        tx = await a.transaction_start()
        await tx.read("/cnt")
        await b.write("/cnt", b"5")
        await tx.write("/cnt", b"1")
        with pytest.raises(XenstoreConflict) as info:
            await tx.commit()
        assert info.value.errno == 11
        assert await a.read("/cnt") == b"5"

        attempts = 0

        async def increment(t: XsTransaction) -> int:
            nonlocal attempts
            attempts += 1
            value = int(await t.read("/cnt"))
            if attempts == 1:
                await b.write("/cnt", b"10")  # a concurrent writer spoils the first attempt
            await t.write("/cnt", str(value + 1))
            return value + 1

        assert await a.transaction(increment) == 11
        assert attempts == 2
        assert await a.read("/cnt") == b"11"

        async def failing(t: XsTransaction) -> None:
            await t.write("/cnt", b"99")
            raise RuntimeError("body failed")

        with pytest.raises(RuntimeError):
            await a.transaction(failing)
        assert await a.read("/cnt") == b"11"  # aborted
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_write_if_present_writes_into_a_directory_that_exists_and_never_recreates_one(
        no_fd_leak: None, xenstored: SimXenstored) -> None:
    """What the daemon's XenBus state write needs: libxl removes a device's directory once the
    back-end answered Closed, and a plain write would create it again."""
    c = await connect(xenstored)
    try:
        await c.write("/be/0/state", b"4")
        async with await c.watch("/be", token="be") as w:
            await w.get(WAIT)  # (the watch's first firing)

            async def closed(tx: XsTransaction) -> bool:
                return await tx.write_if_present("/be/0", "state", "6")

            assert await c.transaction(closed) is True
            assert await c.read("/be/0/state") == b"6"
            assert (await w.get(WAIT)).path == "/be/0/state"
            await c.rm("/be/0")
            assert (await w.get(WAIT)).path == "/be/0"
            assert await c.transaction(closed) is False  # aborted by write_if_present, not committed
            assert not await c.exists("/be/0")
            await sync(c)
            assert w.pending() == 0  # nothing was written
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_read_many_gives_none_for_missing_nodes_and_raises_other_errors(
        no_fd_leak: None, xenstored: SimXenstored) -> None:
    create_domain(xenstored, 5, "guest")
    dom0, domu = await connect(xenstored, 0), await connect(xenstored, 5)
    try:
        await dom0.write("/local/domain/0/secret", b"s")
        await dom0.write("/local/domain/5/data/a", b"1")
        assert await dom0.read_many(["/local/domain/5/data/a", "/nowhere", "/local/domain/0/secret"]) == [
            b"1", None, b"s"]
        assert await dom0.read_many([]) == []
        with pytest.raises(XenstorePermissionError):
            await domu.read_many(["data/a", "/local/domain/0/secret"])
        assert await domu.read_many(["data/a"]) == [b"1"]  # (the connection goes on)
    finally:
        await dom0.close()
        await domu.close()


@pytest.mark.asyncio
async def test_special_domain_watches_and_release_drops_the_domain(no_fd_leak: None, xenstored: SimXenstored) -> None:
    dom0 = await connect(xenstored)
    try:
        intro = await dom0.watch("@introduceDomain", "i")
        rel = await dom0.watch("@releaseDomain", "r")
        assert (await intro.get(WAIT)).path == "@introduceDomain"
        assert (await rel.get(WAIT)).path == "@releaseDomain"
        await dom0.introduce(6, 0x1234, 3)
        assert (await intro.get(WAIT)).token == "i"
        assert await dom0.is_domain_introduced(6)
        domu = await connect(xenstored, 6)
        watch = await domu.watch("@releaseDomain", "x")
        await watch.get(WAIT)
        with pytest.raises(XenstorePermissionError):
            await domu.introduce(7, 1, 1)  # only dom0 may
        await dom0.release(6)
        assert (await rel.get(WAIT)).path == "@releaseDomain"
        with pytest.raises(XenstoreDisconnected):
            await domu.read("/local")  # the released domain's connection is gone
        with pytest.raises(XenstoreDisconnected):
            await watch.get(WAIT)
        await domu.close()
        with pytest.raises(XenstoreNotFound):
            await dom0.release(6)
    finally:
        await dom0.close()


@pytest.mark.asyncio
async def test_large_directory_falls_back_to_directory_part(xenstored: SimXenstored) -> None:
    c = await connect(xenstored)
    try:
        names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]  # ~8.7 KiB of names

        def fill(acc: object) -> None:
            for n in names:
                acc.write(f"/big/{n}", b"")  # type: ignore[attr-defined]

        xenstored.atomically(fill)
        assert await c.directory("/big") == names
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_libxl_layout_for_a_virtio_device(xenstored: SimXenstored) -> None:
    create_domain(xenstored, 5, "guest")
    c = await connect(xenstored)
    try:
        watch = await c.watch("/local/domain/0/backend/virtio", "be")
        await watch.get(WAIT)
        spec = VirtioDeviceSpec(domid=5, devid=0, device_id=0x1A, base=0x2000200, irq=34)
        be = add_virtio_device(xenstored, spec)
        assert be == "/local/domain/0/backend/virtio/5/0"
        keys = {k: (await c.read(f"{be}/{k}")).decode() for k in await c.directory(be)}
        assert keys["type"] == "virtio,device1a" and int(keys["base"], 0) == 0x2000200
        assert keys["irq"] == "34" and keys["transport"] == "mmio" and keys["grant_usage"] == "0"
        assert keys["frontend"] == "/local/domain/5/device/virtio/0" and keys["state"] == "1"
        assert await c.get_perms(be) == [XsPerm(0, XsAccess.NONE), XsPerm(5, XsAccess.READ)]
        assert (await watch.get(WAIT)).path.startswith(be)
        remove_virtio_device(xenstored, spec)
        assert not await c.exists(be)
        assert not await c.exists("/local/domain/5/device/virtio/0")
        # Xen 4.17's virtio_disk: decimal base, no type key, specification=virtio.
        disk = VirtioDeviceSpec(domid=5, devid=51712, device_id=2, base=0x2000000, irq=33,
                                kind="virtio_disk", base_decimal=True)
        be = add_virtio_device(xenstored, disk)
        assert be == "/local/domain/0/backend/virtio_disk/5/51712"
        assert await c.read(f"{be}/base") == b"33554432" and await c.read(f"{be}/specification") == b"virtio"
        assert not await c.exists(f"{be}/type")
        destroy_domain(xenstored, 5)
        assert not await c.exists("/local/domain/5")
        assert not await c.exists("/local/domain/0/backend/virtio_disk/5")
        assert not await c.is_domain_introduced(5)
    finally:
        await c.close()


# ---- a hostile or broken xenstored --------------------------------------------------------------


class RawPeer:
    """The far end of the client's socket, driven by the test byte by byte."""

    def __init__(self, accepted: socket.socket | None = None) -> None:
        """The far end of a socketpair, or ``accepted``: a connection the test accepted."""
        self.theirs: socket.socket | None = None
        if accepted is None:
            self.ours, self.theirs = socket.socketpair()
        else:
            self.ours = accepted
        self.ours.setblocking(False)

    def client(self, timeout: float = WAIT) -> XenstoreClient:
        sock, self.theirs = self.theirs, None
        assert sock is not None
        return XenstoreClient(sock, timeout=timeout, name="raw")

    async def request(self) -> tuple[int, int, int, bytes]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            head = b""
            while len(head) < 16:
                head += await loop.sock_recv(self.ours, 16 - len(head))
            t, req, tx, n = (int.from_bytes(head[i : i + 4], "little") for i in range(0, 16, 4))
            body = b""
            while len(body) < n:
                body += await loop.sock_recv(self.ours, n - len(body))
        return t, req, tx, body

    def send(self, type_: int, req_id: int, payload: bytes, length: int | None = None) -> None:
        n = len(payload) if length is None else length
        head = b"".join(v.to_bytes(4, "little") for v in (type_, req_id, 0, n))
        self.ours.sendall(head + payload)

    def close(self) -> None:
        self.ours.close()
        if self.theirs is not None:
            self.theirs.close()


@pytest.fixture
def raw_peer() -> Iterator[RawPeer]:
    peer = RawPeer()
    yield peer
    peer.close()


@pytest.mark.asyncio
async def test_malformed_replies_give_typed_errors(raw_peer: RawPeer, no_fd_leak: None) -> None:
    from xen_vhost_master.xen.xenstore import XenstoreProtocolError

    c = raw_peer.client()
    try:
        task = asyncio.create_task(c.directory("/x"))
        t, req, _, body = await raw_peer.request()
        assert (t, body) == (1, b"/x\0")
        raw_peer.send(1, req, b"a\0b")  # last child not NUL-terminated
        with pytest.raises(XenstoreProtocolError):
            await task
        task = asyncio.create_task(c.read("/x"))
        _, req, _, _ = await raw_peer.request()
        raw_peer.send(11, req, b"OK\0")  # a WRITE reply to a READ
        with pytest.raises(XenstoreProtocolError):
            await task
        task = asyncio.create_task(c.read("/x"))
        _, req, _, _ = await raw_peer.request()
        raw_peer.send(16, req, b"EWHATEVER\0")  # unknown errno name: EINVAL, as libxenstore
        with pytest.raises(XenstoreError) as info:
            await task
        assert info.value.errno == 22
        task = asyncio.create_task(c.read("/x"))
        _, req, _, _ = await raw_peer.request()
        raw_peer.send(16, req, b"ENOENT\0")
        with pytest.raises(XenstoreNotFound):
            await task
        # The connection survived all of that.
        task = asyncio.create_task(c.read("/y"))
        _, req, _, _ = await raw_peer.request()
        raw_peer.send(2, req, b"value")
        assert await task == b"value"
        # An oversized frame breaks the stream: pending requests fail, later ones too.
        task = asyncio.create_task(c.read("/z"))
        await raw_peer.request()
        raw_peer.send(2, 999, b"", length=5000)
        with pytest.raises(XenstoreProtocolError):
            await task
        assert c.closed
        with pytest.raises(XenstoreProtocolError):
            await c.read("/z")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_reply_to_unknown_request_breaks_the_connection(raw_peer: RawPeer, no_fd_leak: None) -> None:
    from xen_vhost_master.xen.xenstore import XenstoreProtocolError

    c = raw_peer.client()
    task = asyncio.create_task(c.read("/x"))
    _, req, _, _ = await raw_peer.request()
    raw_peer.send(2, req + 1000, b"x")
    with pytest.raises(XenstoreProtocolError):
        await task
    await c.close()


@pytest.mark.asyncio
async def test_hanging_peer_times_out_and_a_late_reply_is_ignored(raw_peer: RawPeer, no_fd_leak: None) -> None:
    from xen_vhost_master.xen.xenstore import XenstoreTimeout

    c = raw_peer.client(timeout=0.2)
    try:
        task = asyncio.create_task(c.read("/slow"))
        _, req, _, _ = await raw_peer.request()
        with pytest.raises(XenstoreTimeout) as info:
            await task
        assert isinstance(info.value, TimeoutError) and info.value.op == "READ"
        raw_peer.send(2, req, b"late")  # must not be taken for the next request's reply
        task = asyncio.create_task(c.read("/next"))
        _, req2, _, body = await raw_peer.request()
        assert body == b"/next\0" and req2 != req
        raw_peer.send(2, req2, b"fresh")
        assert await task == b"fresh"
        assert not c.closed
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_peer_closing_fails_pending_requests_and_watches(raw_peer: RawPeer, no_fd_leak: None) -> None:
    c = raw_peer.client()
    try:
        wtask = asyncio.create_task(c.watch("/w", "tok"))
        _, req, _, body = await raw_peer.request()
        assert body == b"/w\0tok\0"
        raw_peer.send(15, 0, b"/w\0tok\0")  # the event may arrive before the ack
        raw_peer.send(4, req, b"OK\0")
        watch = await wtask
        assert (await watch.get(WAIT)).path == "/w"
        task = asyncio.create_task(c.read("/x"))
        await raw_peer.request()
        raw_peer.ours.close()
        with pytest.raises(XenstoreDisconnected):
            await task
        with pytest.raises(XenstoreDisconnected):
            await watch.get(WAIT)
        with pytest.raises(XenstoreDisconnected):
            await c.read("/x")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_each_write_carries_exactly_one_message(no_fd_leak: None) -> None:
    """The Linux xenbus device handles only the first message of a write(): never batch them,
    not even when the fd pushes back and messages queue up.

    A SOCK_SEQPACKET pair keeps write boundaries, so each record the peer receives is one write().
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force queueing in the client
    c = XenstoreClient(theirs, timeout=WAIT)
    loop = asyncio.get_running_loop()
    count = 40
    try:
        tasks = [asyncio.create_task(c.write(f"/n{i}", bytes([i]) * 3000)) for i in range(count)]
        await asyncio.sleep(0)  # let every task queue its request before the peer reads anything
        seen = []
        async with asyncio.timeout(WAIT):
            while len(seen) < count:
                record = await loop.sock_recv(ours, 65536)
                t, req, _tx, n = struct.unpack("=IIII", record[:16])
                assert t == XsType.WRITE and len(record) == 16 + n  # one whole message, nothing more
                seen.append(req)
                ours.sendall(struct.pack("=IIII", t, req, 0, 3) + b"OK\0")
        await asyncio.gather(*tasks)
        assert len(set(seen)) == count
    finally:
        await c.close()
        ours.close()


@pytest.mark.asyncio
async def test_daemon_answers_malformed_requests_with_errnos_and_survives(no_fd_leak: None, xenstored: SimXenstored) -> None:
    sock = xenstored.connection_socket(0)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def ask(type_: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        await loop.sock_sendall(sock, struct.pack("=IIII", type_, 77, tx_id, len(payload)) + payload)
        async with asyncio.timeout(WAIT):
            head = b""
            while len(head) < 16:
                chunk = await loop.sock_recv(sock, 16 - len(head))
                assert chunk, "daemon closed the connection"
                head += chunk
            t, req, _tx, n = struct.unpack("=IIII", head)
            body = b""
            while len(body) < n:
                body += await loop.sock_recv(sock, n - len(body))
        assert req == 77
        return t, body

    try:
        cases = [
            (XsType.READ, b"/no-nul"),  # argument not NUL-terminated
            (XsType.READ, b"\xff\xfe\0"),  # not UTF-8
            (XsType.WRITE, b"\0value"),  # empty path
            (XsType.SET_PERMS, b"/\0q7\0"),  # bad permission letter
            (XsType.WATCH, b"/only-path\0"),  # token missing
            (XsType.TRANSACTION_END, b"X\0"),
            (XsType.GET_DOMAIN_PATH, b"seven\0"),
            (XsType.DIRECTORY_PART, b"/\0-1\0"),
            (99, b""),  # unknown type
            (XsType.RESUME, b"1\0"),  # known but not modelled
        ]
        for type_, payload in cases:
            t, body = await ask(type_, payload)
            assert t == XsType.ERROR and body in (b"EINVAL\0", b"ENOSYS\0"), (type_, payload, body)
        t, body = await ask(XsType.READ, b"/local\0", tx_id=12345)  # unknown transaction
        assert (t, body) == (XsType.ERROR, b"ENOENT\0")
        t, body = await ask(XsType.TRANSACTION_START, b"\0", tx_id=1)  # nested
        assert (t, body) == (XsType.ERROR, b"EBUSY\0")
        t, body = await ask(XsType.RM, b"/\0")
        assert (t, body) == (XsType.ERROR, b"EINVAL\0")
        t, body = await ask(XsType.DIRECTORY, b"/\0")  # still serving
        assert (t, body) == (XsType.DIRECTORY, b"local\0")
        # A frame longer than XENSTORE_PAYLOAD_MAX ends the connection, as with xenstored.
        await loop.sock_sendall(sock, struct.pack("=IIII", XsType.READ, 1, 0, 5000))
        async with asyncio.timeout(WAIT):
            assert await loop.sock_recv(sock, 16) == b""
        assert xenstored.connections() == 0
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_read_many_and_write_if_present_send_their_requests_together(raw_peer: RawPeer, no_fd_leak: None) -> None:
    """One round trip each: every request is out before the first reply comes."""
    c = raw_peer.client()
    try:
        task = asyncio.create_task(c.read_many(["/a", "/b"]))
        (_, ra, _, body_a), (_, rb, _, body_b) = await raw_peer.request(), await raw_peer.request()
        assert (body_a, body_b) == (b"/a\0", b"/b\0")
        raw_peer.send(XsType.ERROR, rb, b"ENOENT\0")
        raw_peer.send(XsType.READ, ra, b"1")
        assert await task == [b"1", None]

        async def closed(tx: XsTransaction) -> bool:
            return await tx.write_if_present("/be/0", "state", "6")

        task2 = asyncio.create_task(c.transaction(closed))
        t, req, _, _ = await raw_peer.request()
        assert t == XsType.TRANSACTION_START
        raw_peer.send(t, req, b"7\0")
        (t1, r1, tx1, body1), (t2, r2, tx2, body2) = await raw_peer.request(), await raw_peer.request()
        assert (t1, tx1, body1, t2, tx2, body2) == (XsType.READ, 7, b"/be/0\0", XsType.WRITE, 7, b"/be/0/state\x006")
        raw_peer.send(XsType.ERROR, r1, b"ENOENT\0")  # the directory is gone ...
        raw_peer.send(XsType.WRITE, r2, b"OK\0")  # ... and the write re-created it in the transaction:
        t, req, tx, body = await raw_peer.request()
        assert (t, tx, body) == (XsType.TRANSACTION_END, 7, b"F\0")  # aborted
        raw_peer.send(t, req, b"OK\0")
        assert await task2 is False
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_connect_while_the_listen_backlog_is_full_waits_for_room(no_fd_leak: None, short_dir: str) -> None:
    """xenstored listens with a backlog of 1 (tools/xenstored/posix.c; the simulated one too); while
    it is busy, Linux fails a non-blocking connect with EAGAIN and leaves the socket unconnected.
    The client waits until there is room and its first request goes through; it took EAGAIN for a
    connect in progress and reported it done (loop.sock_connect), then failed its first request
    with ENOTCONN ("write failed: Transport endpoint is not connected", an instance on a loaded
    dom0)."""
    from tests.backlog import full_backlog

    path = os.path.join(short_dir, "socket")
    with full_backlog(path) as (listener, queued):
        opening = asyncio.create_task(XenstoreClient.open([path], device_paths=(), timeout=WAIT))
        try:
            for _ in range(8):  # loop iterations, the backlog still full
                await asyncio.sleep(0)
            assert not opening.done(), "the connect was reported done while the backlog was full"
            for _ in queued:  # xenstored gets to them: room
                listener.accept()[0].close()
            async with await asyncio.wait_for(opening, WAIT) as c:
                peer = RawPeer((await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), WAIT))[0])
                try:
                    reading = asyncio.create_task(c.read("/vm/backlog"))
                    t, req, _, body = await peer.request()
                    assert body == b"/vm/backlog\0"
                    peer.send(t, req, b"ok")
                    assert await asyncio.wait_for(reading, WAIT) == b"ok"
                finally:
                    peer.close()
        finally:
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                await opening.result().close()  # (a no-op once ``async with`` closed it)
            else:
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
