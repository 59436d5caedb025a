"""vhost-user-dump relays a real session (fds included, back-end channel spliced) and prints
each message decoded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_user import AsyncFrontend, VirtioFeatures
from vhost_user.aio import serve_unix
from vhost_user.testing import DummyBackend
from vhost_user.trace import Tracer
from vhost_user.wire import BackendRequest

from tests.peers import programs
from tests.protocol.guestmem import guest, wait_eventfd

TEST_TIMEOUT = 10.0


@pytest.mark.asyncio
async def test_trace_relays_session_with_fds_and_backend_channel(tmp_path: Path, no_fd_leak: None) -> None:
    backend_path, front_path = tmp_path / "backend.sock", tmp_path / "front.sock"
    devices: list[DummyBackend] = []

    def factory() -> DummyBackend:
        devices.append(DummyBackend(num_queues=1))
        return devices[-1]

    lines: list[str] = []
    ready = asyncio.Event()
    server_task = asyncio.create_task(serve_unix(factory, backend_path, connections=1, ready=ready.set))
    tracer = Tracer(front_path, backend_path, emit=lines.append)
    tracer.start_listening()
    trace_task = asyncio.create_task(tracer.serve(connections=1))
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await ready.wait()
            with guest() as g:
                fe = await AsyncFrontend.connect(front_path)
                try:
                    neg = await fe.negotiate()
                    assert neg.backend_channel
                    await fe.set_features(int(VirtioFeatures.VERSION_1))
                    await fe.set_mem_table([g.region()], [g.fd])
                    await fe.start_vring(0, **g.vring_args())
                    g.write(g.desc, b"through-the-relay")
                    # the memfd crossed two hops: the device maps the same pages
                    assert devices[0].memory.read(g.desc, 17) == b"through-the-relay"
                    import os

                    os.eventfd_write(g.kick, 1)  # kick eventfd crossed too: the device calls back
                    await wait_eventfd(g.call)
                    await devices[0].server.send_config_change()
                    assert (await fe.backend_events.get()).request == BackendRequest.CONFIG_CHANGE_MSG
                    assert await fe.stop_vring(0) == 0
                finally:
                    await fe.close()
            await trace_task
            await server_task
    finally:
        for t in (trace_task, server_task):
            t.cancel()
        await asyncio.gather(trace_task, server_task, return_exceptions=True)
    text = "\n".join(lines)
    assert "F->B GET_FEATURES(1) flags=0x1[v1] size=0" in text
    assert "B->F GET_FEATURES(1) flags=0x5[v1,REPLY] size=8" in text
    assert "F->B SET_BACKEND_REQ_FD(21) flags=0x9[v1,NEED_REPLY] size=0 fds=[unix-socket]" in text
    assert "fds=[memfd(proto-test-ram)]" in text and "guest_phys_addr=0x40000000" in text
    assert "SET_VRING_KICK(12)" in text and "fds=[eventfd]" in text
    assert "B=>F CONFIG_CHANGE_MSG(2)" in text and "F=>B CONFIG_CHANGE_MSG(2) flags=0x5[v1,REPLY]" in text
    assert "REPLY_ACK u64=0x0 (success)" in text
    assert "GET_VRING_BASE(11)" in text and "!!" not in text


@pytest.mark.asyncio
async def test_a_reply_to_a_front_end_that_has_hung_up_ends_the_session_with_a_line(
        tmp_path: Path, no_fd_leak: None) -> None:
    """A front-end that stops reading (here: shut down for reading) before the back-end's reply
    comes: the reply cannot be delivered, which the relay says in one line before it ends the
    session; it raised out of ``serve`` (Broken pipe) and ended the command."""
    import socket
    import struct

    backend_path, front_path = tmp_path / "backend.sock", tmp_path / "front.sock"
    loop = asyncio.get_running_loop()
    lines: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front:
        listener.bind(str(backend_path))
        listener.listen()
        listener.setblocking(False)
        tracer = Tracer(front_path, backend_path, emit=lines.append)
        tracer.start_listening()
        trace_task = asyncio.create_task(tracer.serve(connections=1))
        try:
            async with asyncio.timeout(TEST_TIMEOUT):
                front.connect(str(front_path))
                front.sendall(struct.pack("<III", 1, 1, 0))  # GET_FEATURES, version 1
                back, _ = await loop.sock_accept(listener)
                with back:
                    assert await loop.sock_recv(back, 12) == struct.pack("<III", 1, 1, 0)
                    front.shutdown(socket.SHUT_RD)
                    await loop.sock_sendall(back, struct.pack("<IIIQ", 1, 5, 8, 1 << 32))
                    await trace_task
        finally:
            trace_task.cancel()
            await asyncio.gather(trace_task, return_exceptions=True)
    assert any(line.startswith("B->F not delivered, the front-end is gone: ") for line in lines), lines
    assert lines[-1] == "session closed", lines


def test_trace_command_line_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhost_user.trace", "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "--listen" in out.stdout and "--connect" in out.stdout


@pytest.mark.peer
@pytest.mark.asyncio
async def test_trace_between_our_frontend_and_qemu_storage_daemon(tmp_path: Path, no_fd_leak: None) -> None:
    """The relay in front of a real, independently written back-end."""
    qsd = programs.require("qemu-storage-daemon")
    backend_path, front_path = tmp_path / "qsd.sock", tmp_path / "front.sock"
    proc = await asyncio.create_subprocess_exec(
        qsd, "--blockdev", "driver=null-co,node-name=null0,size=8388608",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={backend_path},num-queues=1,writable=on",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    lines: list[str] = []
    tracer = Tracer(front_path, backend_path, emit=lines.append)
    tracer.start_listening()
    trace_task = asyncio.create_task(tracer.serve(connections=1))
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            while not backend_path.exists():
                await asyncio.sleep(0.02)  # qsd creates its socket when ready
            fe = await AsyncFrontend.connect(front_path)
            try:
                neg = await fe.negotiate()
                config = await fe.get_config(0, 60)
                assert int.from_bytes(config[:8], "little") == 8388608 // 512
                assert neg.backend_channel
            finally:
                await fe.close()
            await trace_task
    finally:
        trace_task.cancel()
        await asyncio.gather(trace_task, return_exceptions=True)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    text = "\n".join(lines)
    assert "B->F GET_PROTOCOL_FEATURES(15)" in text and "CONFIGURE_MEM_SLOTS" in text
    assert "B->F GET_CONFIG(24) flags=0x5[v1,REPLY] size=72" in text
    assert "!!" not in text
