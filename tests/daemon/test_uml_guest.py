"""A real Linux guest in the simulator: User-Mode Linux's virtio_blk → virtio_uml (vhost-user) →
UmlBridge (UML's memory is the RAM of a simulated Xen domain; its driver actions become virtio-mmio
accesses on the domain's vCPUs) → IOREQ → ``xen-vhost-master`` (the CLI, its own process, sim-memfd
exposure) → qemu-storage-daemon exporting a raw file.

UML writes a random pattern with O_DIRECT, reads it back and compares, and reports the md5 of bytes
we put in the raw file beforehand; we check the pattern landed in the raw file and that the path
really went through the daemon (its IOREQ server and the bridge's notifies and interrupts).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers.harness import Peers, UmlRun
from tests.sim.simproc import stop_process
from vhost_user.aio.transport import UnixListener
from xen_vhost_sim.guest import SimControl
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.uml_bridge import UmlBridge, no_aslr

pytestmark = [pytest.mark.peer, pytest.mark.timeout(60)]

BASE, IRQ = 0x0200_0000, 33
STEP = 20.0  # bound on each wait; the whole test must stay < 60 s
BIN = Path(sys.executable).parent


def start_daemon(sim_path: str, domid: int, backend: Path, tmp_path: Path, kind: str = "blk",
                 extra: str = "", memory: str = "sim-memfd", guest_arch: str = "",
                 ) -> tuple[subprocess.Popen[bytes], socket.socket]:
    runtime = tmp_path / "run"
    runtime.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    env = dict(os.environ, XEN_VHOST_SIM=sim_path, NOTIFY_SOCKET=str(tmp_path / "notify"))
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "xen-vhost-master"), "--domid", str(domid), "--no-xenstore", "--memory", memory,
             "--runtime-dir", str(runtime), "--device", f"type={kind},base={BASE:#x},irq={IRQ},socket={backend}{extra}",
             *(["--guest-arch", guest_arch] if guest_arch else [])],
            env=env, stderr=log,
        )
    return proc, notify


def stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STEP)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


async def serve_uml(
    bridge: UmlBridge, path: Path, start_uml: Callable[[], UmlRun], sim_path: str, backend: Path, tmp_path: Path,
    on_ready: Callable[[int], None] = lambda domid: None, **daemon_kw: str,
) -> tuple[UmlRun, str, int | None, int]:
    """UML connects to ``bridge`` listening on ``path``; the daemon is started for the bridge's
    domain (``on_ready(domid)`` once it said READY=1); the bridge serves until UML powers off.
    Returns (the UML run, its verdicts, the daemon's exit status, the domid)."""
    daemon = notify = None
    serving: asyncio.Task[None] | None = None
    with UnixListener(str(path)) as listener:
        with no_aslr():  # a small, fixed physical memory (no random exec-shield gap)
            run = start_uml()
        try:
            domid = await bridge.accept(listener, timeout=STEP)
            daemon, notify = start_daemon(sim_path, domid, backend, tmp_path, **daemon_kw)
            loop = asyncio.get_running_loop()
            while not (msg := await asyncio.wait_for(loop.sock_recv(notify, 4096), STEP)).startswith(b"READY=1"):
                assert msg.startswith(b"STATUS="), msg  # start-up steps come before READY=1
            on_ready(domid)
            serving = asyncio.get_running_loop().create_task(bridge.serve())
            verdicts = await run.finish(timeout=STEP)
            await asyncio.wait_for(serving, STEP)  # UML powered off: the bridge's server returns
        finally:
            if serving is not None and not serving.done():
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
            rc = stop_daemon(daemon) if daemon is not None else None
            if notify is not None:
                notify.close()
            await bridge.close()
    return run, verdicts, rc, domid


@pytest.mark.parametrize("memory, bs", [("sim-memfd", 512), ("shadow", 512), ("shadow", 65536)])
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon runs uvloop in its own process
async def test_uml_virtio_blk_through_bridge_sim_and_daemon_to_qsd(
    no_fd_leak: None, sim_host: SimHost, sim_control: SimControl, peers: Peers, tmp_path: Path, memory: str,
    bs: int,
) -> None:
    """Linux's virtio-blk (UML) writes a 128 KiB pattern and reads it back through the daemon
    (``bs`` bytes per request, O_DIRECT), then reads sectors the host wrote: zero copy (the
    simulator's memfd exposure) and shadow virtqueues, where Linux's 64 KiB requests of a page
    per descriptor reach qemu-storage-daemon as header, data and status (shadow.py ``_layout``)
    and the data goes back page by page."""
    qsd = peers.qsd_raw(size=16 << 20)
    host_bytes = os.urandom(16 * 512)
    assert qsd.image is not None
    with open(qsd.image, "r+b") as f:
        f.seek(2048 * 512)
        f.write(host_bytes)
    pattern = os.urandom(256 * 512)  # 128 KiB: multi-segment requests
    (tmp_path / "pattern.bin").write_bytes(pattern)
    wsector = 8192

    bridge = UmlBridge(sim_host.path, base=BASE, irq=IRQ, device_id=2)

    def on_ready(domid: int) -> None:
        info = sim_control.domain_info(domid)
        assert info["banks"][0][0] == 0 and info["vcpus"] == 2  # UML's physical memory, at 0
        assert info["servers"] == [0]  # the daemon's IOREQ server

    run, verdicts, rc, domid = await serve_uml(
        bridge, peers.sock_path("uml.sock"),
        lambda: peers.uml(peers.sock_path("uml.sock"), mode="blkrw", env={
            "UMLT_PATTERN": str(tmp_path / "pattern.bin"), "UMLT_WSECTOR": str(wsector), "UMLT_BS": str(bs),
            "UMLT_RSECTOR": "2048", "UMLT_RCOUNT": "16",
        }),
        sim_host.path, Path(qsd.sock), tmp_path, on_ready, memory=memory,
        # (UML's RAM starts at guest-physical 0: x86's layout, which the shadow path maps)
        guest_arch="x86_64" if memory == "shadow" else "")

    tail = run.process.log_tail(60) + "\n" + (tmp_path / "daemon.log").read_text()[-3000:]
    assert "DONE 0" in verdicts, tail
    assert run.value("SECTORS") == str((16 << 20) // 512), tail  # config space, through the daemon
    assert run.value("WRITE-READ-OK") == "256", tail
    assert run.value("READ-MD5") == hashlib.md5(host_bytes).hexdigest(), tail
    with open(qsd.image, "rb") as f:
        f.seek(wsector * 512)
        assert f.read(len(pattern)) == pattern  # UML's pattern is in the raw file
    s = bridge.stats
    assert s.notifies > 0 and s.interrupts > 0 and s.calls > 0 and s.config_reads > 0, vars(s)
    assert bridge.error is None, bridge.error
    assert rc == 0, tail
    with pytest.raises(OSError):
        sim_control.domain_info(domid)  # the bridge destroyed the domain


FRAMES = 32


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_uml_virtio_net_frames_loop_back_through_the_daemon_and_testpmd(
    no_fd_leak: None, sim_host: SimHost, sim_control: SimControl, peers: Peers, tmp_path: Path
) -> None:
    pmd, pmd_sock = peers.testpmd()  # listens; io forwarding, the port looped to itself
    path = peers.sock_path("umlnet.sock")
    bridge = UmlBridge(sim_host.path, base=BASE, irq=IRQ, device_id=1)  # the daemon's feature policy, as is
    # no_aslr: UML's memory stays ~64 MiB, so dpdk-testpmd maps it in ~0.1 s, not seconds
    run, verdicts, rc, _ = await serve_uml(
        bridge, path,
        lambda: peers.uml(path, mode="net", device_id=1, mem="64M", env={"UMLT_NET_FRAMES": str(FRAMES)}),
        sim_host.path, pmd_sock, tmp_path, kind="net", extra=",queues=2")
    tail = run.process.log_tail(60) + "\n" + (tmp_path / "daemon.log").read_text()[-3000:] + "\n" + pmd.log_tail(20)
    assert "DONE 0" in verdicts, tail
    assert run.value("NET") == f"sent={FRAMES} looped={FRAMES}", tail  # every frame came back intact
    assert bridge.stats.notifies > 0 and bridge.stats.calls > 0, vars(bridge.stats)
    assert bridge.error is None, bridge.error
    assert rc == 0, tail


@pytest.mark.parametrize("path", ["shadow-qsd", "xen-mmap-python"])
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_uml_grant_guest_blk_through_the_bridge_in_grant_mode(
    no_fd_leak: None, sim_host: SimHost, sim_control: SimControl, peers: Peers, tmp_path: Path, path: str
) -> None:
    """UML as a grant-based guest: the bridge grants every page UML's chains point at and gives the
    device grant addresses only. The daemon reaches the guest through gntdev: shadow virtqueues to
    qemu-storage-daemon, or XEN_MMAP grant regions to the project's Python back-end (its own
    process), which maps the grants itself. Same I/O checks as the plain test."""
    size = 16 << 20
    backend_proc = None
    if path == "shadow-qsd":
        qsd = peers.qsd_raw(size=size)
        assert qsd.image is not None
        image, sock = Path(qsd.image), Path(qsd.sock)
    else:
        image, sock = tmp_path / "disk.img", tmp_path / "xblk.sock"
        image.write_bytes(bytes(size))
    host_bytes = os.urandom(16 * 512)
    with open(image, "r+b") as f:
        f.seek(2048 * 512)
        f.write(host_bytes)
    if path == "xen-mmap-python":
        with open(tmp_path / "backend.log", "wb") as blog:
            backend_proc = subprocess.Popen(
                [sys.executable, "-m", "xen_vhost_master.backend.blk", "--socket", str(sock), "--image", str(image)],
                env=dict(os.environ, XEN_VHOST_SIM=sim_host.path), stderr=blog)
    pattern = os.urandom(256 * 512)
    (tmp_path / "pattern.bin").write_bytes(pattern)
    wsector = 8192
    uml_sock = peers.sock_path("umlg.sock")
    bridge = UmlBridge(sim_host.path, base=BASE, irq=IRQ, device_id=2, grants=True)
    try:
        run, verdicts, rc, _ = await serve_uml(
            bridge, uml_sock,
            lambda: peers.uml(uml_sock, mode="blkrw", env={
                "UMLT_PATTERN": str(tmp_path / "pattern.bin"), "UMLT_WSECTOR": str(wsector),
                "UMLT_RSECTOR": "2048", "UMLT_RCOUNT": "16",
            }),
            sim_host.path, sock, tmp_path, extra=",grants=1", memory="auto")
    finally:
        if backend_proc is not None:
            stop_process(backend_proc, STEP)

    daemon_log = (tmp_path / "daemon.log").read_text()
    tail = run.process.log_tail(60) + "\n" + daemon_log[-3000:]
    assert "DONE 0" in verdicts, tail
    assert run.value("SECTORS") == str(size // 512), tail
    assert run.value("WRITE-READ-OK") == "256", tail
    assert run.value("READ-MD5") == hashlib.md5(host_bytes).hexdigest(), tail
    with open(image, "rb") as f:
        f.seek(wsector * 512)
        assert f.read(len(pattern)) == pattern
    expect = ("grant-based guest: shadow virtqueues over gntdev" if path == "shadow-qsd"
              else "back-end maps the grants itself (XEN_MMAP grant regions")
    assert expect in daemon_log, tail
    g = bridge.grant_stats
    assert g.chains > 0 and g.granted_pages > 0 and g.ended >= g.granted_pages, vars(g)  # every grant ended
    assert bridge.stats.notifies > 0 and bridge.stats.calls > 0, vars(bridge.stats)
    assert bridge.error is None, bridge.error
    assert rc == 0, tail
