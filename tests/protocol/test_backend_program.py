"""The project's back-end programs follow vhost-user.rst's "Backend program conventions":
``--socket-path`` or ``--fd`` (an inherited listening socket), ``--print-capabilities`` (JSON, other
options ignored, nothing served), SIGTERM ends them cleanly; plus ``--version``. Each runs as a
real process; ``python -m vhost_user.testing.blk`` starts without runpy's RuntimeWarning."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_user import AsyncFrontend, VirtioFeatures
from vhost_user.testing import RamDiskBlk, connected_pair
from vhost_user.testing.blk import VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

from tests.protocol.guestmem import guest

TEST_TIMEOUT = 30.0
BLK = [sys.executable, "-m", "vhost_user.testing.blk"]
XEN_BLK = [sys.executable, "-m", "xen_vhost_master.backend.blk"]
PROGRAMS = pytest.mark.parametrize("program", [BLK, XEN_BLK], ids=["vhost_user.testing.blk", "backend.blk"])
# QEMU docs/interop/vhost-user.json: VHostUserBackendType and, for "block",
# VHostUserBackendBlockFeature.
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng", "rpmb",
                 "rproc-serial", "scsi", "vsock", "fs"}
BLOCK_FEATURES = {"read-only", "blk-file"}


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TEST_TIMEOUT, check=False, **kw)  # type: ignore[call-overload,no-any-return]


@PROGRAMS
def test_print_capabilities_is_the_spec_json_and_ignores_everything_else(program: list[str], tmp_path: Path) -> None:
    sock = tmp_path / "never.sock"
    done = run([*program, "--socket-path", str(sock), "--bogus-option", "--print-capabilities", "--size", "x"])
    assert done.returncode == 0, done.stderr
    caps = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert set(caps) <= {"type", "features"} and caps["type"] in BACKEND_TYPES
    assert caps["type"] == "block" and set(caps["features"]) <= BLOCK_FEATURES
    assert len(caps["features"]) == len(set(caps["features"]))
    assert not sock.exists() and done.stderr == ""  # nothing served, nothing said


@PROGRAMS
def test_version_and_help(program: list[str]) -> None:
    done = run([*program, "--version"])
    assert done.returncode == 0 and done.stdout.strip().endswith("0.1.0"), done
    helped = run([*program, "--help"])
    assert helped.returncode == 0
    for option in ("--socket-path", "--fd", "--print-capabilities", "--version", "--blk-file", "--read-only"):
        assert option in helped.stdout
    assert "RuntimeWarning" not in done.stderr + helped.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "one of the arguments --socket-path --socket --fd is required"),
     (["--socket-path", "/nonexistent/x.sock", "--fd", "3"], "not allowed with"),
     (["--fd", "0"], "--fd 0: fd 0 is not a socket")],
    ids=["no-socket", "path-and-fd", "fd-not-a-socket"],
)
def test_bad_socket_options_are_one_clear_error(args: list[str], message: str) -> None:
    done = run([*BLK, *args], stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].count("error:") == 1


def test_fd_that_is_not_listening_is_refused(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        done = run([*BLK, "--fd", str(a.fileno())], pass_fds=(a.fileno(),))
    assert done.returncode == 2 and "not a listening AF_UNIX stream socket" in done.stderr


@pytest.mark.asyncio
async def test_fd_serves_a_real_connection_on_the_inherited_listening_socket(tmp_path: Path, no_fd_leak: None) -> None:
    """The socket is bound and listening before the program starts (what a management layer
    hands over): the front-end connects at once, negotiates, reads config and does I/O; the
    program leaves the path alone (it did not create it)."""
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    try:
        proc = await asyncio.create_subprocess_exec(
            *BLK, "--fd", str(fd), "--size", "2M", "--connections", "1",
            pass_fds=(fd,), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    finally:
        listener.close()  # the child has its own copy
    try:
        with guest() as g:
            async with asyncio.timeout(TEST_TIMEOUT):
                fe = await AsyncFrontend.connect(path)
                try:
                    await fe.negotiate()
                    cfg = await fe.get_config(0, 60)
                    assert struct.unpack_from("<Q", cfg)[0] == (2 << 20) // 512
                    await fe.set_features(int(VirtioFeatures.VERSION_1))
                    await fe.set_mem_table([g.region()], [g.fd])
                    await fe.start_vring(0, **g.vring_args())
                    data = os.urandom(512)
                    w = g.blk(VIRTIO_BLK_T_OUT, 3, 512, data, token="w")
                    r = g.blk(VIRTIO_BLK_T_IN, 3, 512, token="r")
                    g.notify()
                    await g.complete({"w", "r"})
                    assert g.read(w["status"], 1)[0] == g.read(r["status"], 1)[0] == VIRTIO_BLK_S_OK
                    assert g.read(r["data"], 512) == data
                finally:
                    await fe.close()
                assert await proc.wait() == 0
                assert proc.stderr is not None
                assert b"RuntimeWarning" not in await proc.stderr.read()
        assert path.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.asyncio
async def test_sigterm_ends_the_program_cleanly_and_removes_its_socket(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "blk.sock"
    proc = await asyncio.create_subprocess_exec(
        *BLK, "--socket-path", str(path), "--size", "1M",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            fe = await AsyncFrontend.connect(path, attempts=200, backoff_initial=0.02, backoff_max=0.2)
            try:
                await fe.negotiate()  # serving a front-end when the signal comes
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
                await fe.lost.wait()
            finally:
                await fe.close()
            assert proc.stderr is not None
            err = await proc.stderr.read()
        assert not path.exists()
        assert b"RuntimeWarning" not in err and b"Traceback" not in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.asyncio
async def test_read_only_disk_offers_ro_and_refuses_writes(no_fd_leak: None) -> None:
    dev = RamDiskBlk(1 << 20, read_only=True)
    with guest() as g:
        async with asyncio.timeout(TEST_TIMEOUT), connected_pair(dev) as (fe, _):
            neg = await fe.negotiate()
            assert neg.features & VIRTIO_BLK_F_RO
            await fe.set_features(int(VirtioFeatures.VERSION_1 | VIRTIO_BLK_F_RO))
            await fe.set_mem_table([g.region()], [g.fd])
            await fe.start_vring(0, **g.vring_args())
            w = g.blk(VIRTIO_BLK_T_OUT, 0, 512, b"\x55" * 512, token="w")
            g.notify()
            await g.complete({"w"})
            assert g.read(w["status"], 1)[0] == VIRTIO_BLK_S_IOERR
            assert bytes(dev.disk[:512]) == bytes(512)
