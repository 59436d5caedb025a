"""The lifecycle matrix of issue 16: device type × data path × event, with real peers, the daemon
as an operator runs it (``xen-vhost-master``, its own process) and the simulated guest's spec
drivers. After each event data must flow again:

* blk × qemu-storage-daemon: 64 KiB written, read back equal, and in the raw file;
* net × dpdk-testpmd (io forwarding, port looped): traffic flows through the event, BURST frames
  in flight (TX posted in batches with one notify, RX buffers posted, each poisoned first); across
  a daemon restart (which the guest cannot see) every frame completes and comes back exactly once
  with its bytes; across a back-end restart or a guest reset frames inside may be lost (as on a
  real NIC: the count is printed, ``-rP`` shows it) but none comes back twice, none with stale
  bytes; then frames one at a time, each waited for and the only one back; no feature bit is
  withheld by the harness, the guest asks for what the daemon's policy offers;
* fs × the C virtiofsd: a FUSE session (INIT, LOOKUP, OPEN, READ, DESTROY) reads a file of the
  shared directory with the right contents.

Data paths: zero copy over the simulator's RAM memfd (``--memory sim-memfd``), shadow virtqueues
over privcmd (``--memory shadow``), and a grant-based guest (``grants=1``: shadow virtqueues over
gntdev). Events: the guest's driver resets the device and brings it up again; the back-end is
SIGKILLed and started again on the same socket; the daemon is SIGKILLed and a new process adopts
the IOREQ server; the daemon hands over to its re-executed self (SIGHUP).

virtiofsd serves one connection and exits when it ends, and keeps the guest's FUSE session in it:
the daemon's restart must go on with that connection (xen_vhost_master/fdstore.py). A handover
passes it to the re-executed image; a killed daemon's connection is kept by the holder of its file
descriptor store, here the dispatcher (``watch --spawn``), which restarts the instance and hands it
back (the ``daemon-crash`` cells run the daemon under it). The ``-mounted`` cells keep the session
open through the event, as a guest with the file system mounted does; after a back-end restart no
front-end could keep it (skipped, with the reason). The other fs cells check a whole session
(INIT … DESTROY, as a mount and unmount).

Each cell also resets the guest's driver after its event and checks again (the next driver load
on the connection the event left). The real-guest cells (User-Mode Linux through the bridge:
``rmmod``/``insmod`` of virtio_blk and virtio_net) are at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon.test_shadow_sim import _ATTR, _ENTRY, FUSE_DESTROY, FUSE_INIT, FUSE_LOOKUP, FUSE_OPEN, FUSE_READ, VIRTIO_ID_FS, Fuse
from tests.peers import programs
from tests.peers.harness import TESTPMD_FORWARDING_LOG, PeerProcess, Peers
from xen_vhost_sim.guest import SimControl, SimGuest
from xen_vhost_sim.guest_devices import NetFeature, VirtioBlk, VirtioNet
from xen_vhost_sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator, VirtioMmioDriver
from xen_vhost_sim.host import SimHost

pytestmark = [pytest.mark.peer, pytest.mark.timeout(90)]

BASE, IRQ = 0x0200_0000, 33
STEP = 25.0  # bound on each wait
BIN = Path(sys.executable).parent
# virtio 1.2 §5.1.3: CTRL_VQ 17, CTRL_RX 18, CTRL_VLAN 19, GUEST_ANNOUNCE 21, MQ 22, CTRL_MAC_ADDR 23
NET_FRONT_END_ONLY = sum(1 << b for b in (17, 18, 19, 21, 22, 23))
NET_ALL_BUT_RING_LAYOUTS = ((1 << 64) - 1) & ~(Feature.RING_PACKED | 1 << 35 | Feature.NOTIFICATION_DATA)  # 35: IN_ORDER
FRAMES = 4
BURST = 32  # TX frames in flight through each event (rings of 64: every frame has an RX buffer)
RX_POISON = 0xA5  # what an RX buffer holds until the device writes a frame into it
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental ethertype 1
SHARE_FILE = "matrix.bin"

TYPES = {"blk": 2, "net": 1, "fs": VIRTIO_ID_FS}
PATHS = ["zerocopy", "shadow", "grant"]
EVENTS = ["guest-reset", "backend-restart", "daemon-crash", "daemon-reload"]


FS_BACKEND_SESSION = ("virtiofsd keeps the FUSE session in its process: a restarted virtiofsd starts a new "
                      "one, whatever the front-end does (the guest mounts again: the backend-restart cell)")


def cells() -> Iterator[object]:
    for kind in TYPES:
        for path in PATHS:
            for event in EVENTS:
                yield pytest.param(kind, path, event, id=f"{kind}-{path}-{event}")
    # virtio-fs with the guest's file system mounted through the event: its FUSE session goes on
    for path in PATHS:
        yield pytest.param("fs", path, "backend-restart-mounted", id=f"fs-{path}-backend-restart-mounted-SKIP",
                           marks=pytest.mark.skip(reason=FS_BACKEND_SESSION))
        for event in ("daemon-crash-mounted", "daemon-reload-mounted"):
            yield pytest.param("fs", path, event, id=f"fs-{path}-{event}")


# --- the daemon, its own process ------------------------------------------------------------------


class Daemon:
    """``xen-vhost-master`` for one guest and one device; its stderr is drained by a thread into
    ``lines`` (a log file too), so the process never blocks on a full pipe."""

    def __init__(self, sim_path: str, domid: int, runtime: Path, device: str, memory: str, log_path: Path) -> None:
        self.cmd = [str(BIN / "xen-vhost-master"), "--domid", str(domid), "--no-xenstore", "--memory", memory,
                    "--runtime-dir", str(runtime), "--device", device, *os.environ.get("XVM_MATRIX_V", "").split()]
        self.env = dict(os.environ, XEN_VHOST_SIM=sim_path)
        self.log_path = log_path
        self.lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stderr=subprocess.PIPE)
        t = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        t.start()
        self._threads.append(t)

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with open(self.log_path, "ab") as out:
            for raw in proc.stderr:
                out.write(raw)
                out.flush()
                self._loop.call_soon_threadsafe(self._line, raw.decode(errors="replace"))
        proc.stderr.close()
        self._loop.call_soon_threadsafe(self._line, "")

    def _line(self, line: str) -> None:
        if line:
            self.lines.append(line)
        self._changed.set()

    def mark(self) -> int:
        return len(self.lines)

    async def wait_log(self, text: str, since: int = 0) -> str:
        """The first line from ``since`` on that holds ``text``; fails with the log if the process ends."""
        assert self.proc is not None
        async with asyncio.timeout(STEP):
            while True:
                for line in self.lines[since:]:
                    if text in line:
                        return line
                if self.proc.poll() is not None and not self._threads[-1].is_alive():
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging {text!r}:\n"
                                         + self.tail())
                self._changed.clear()
                await self._changed.wait()

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait, STEP)

    def restart(self) -> None:
        """After :meth:`kill`: what the service manager does, here the test."""
        self.start()

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> int | None:
        """SIGTERM: the full teardown; its exit status (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, STEP)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, STEP)
        for t in self._threads:
            await asyncio.to_thread(t.join, STEP)
        return self.proc.returncode


class Dispatched(Daemon):
    """The daemon under a real holder of its file descriptor store: the dispatcher
    (``xen-vhost-master watch --spawn``, dispatcher.py) spawns the guest's instance, restarts it
    when it is killed, and hands it back the fds it stored. Its stderr carries the instance's."""

    def __init__(self, sim_path: str, domid: int, runtime: Path, device: str, memory: str, log_path: Path) -> None:
        super().__init__(sim_path, domid, runtime, device, memory, log_path)
        self.domid = domid
        instance = ["--no-xenstore", "--memory", memory, "--device", device, *os.environ.get("XVM_MATRIX_V", "").split()]
        self.cmd = [str(BIN / "xen-vhost-master"), "watch", "--spawn", "--runtime-root", str(runtime),
                    "--instance-args", shlex.join(instance)]

    def instance_pid(self) -> int:
        pids = [m.group(1) for line in self.lines
                if (m := re.search(rf"started instance for domain {self.domid}: pid (\d+)", line))]
        assert pids, "the dispatcher started no instance:\n" + self.tail()
        return int(pids[-1])

    async def kill(self) -> None:
        pid = self.instance_pid()
        mark = self.mark()
        os.kill(pid, signal.SIGKILL)
        await self.wait_log(f"(pid {pid}) exited with status -9", mark)

    def restart(self) -> None:
        """The dispatcher restarts the instance itself."""

    def reload(self) -> None:
        os.kill(self.instance_pid(), signal.SIGHUP)


# --- the peers ------------------------------------------------------------------------------------


@dataclass
class Peer:
    kind: str
    peers: Peers
    sock: Path
    tmp: Path
    process: PeerProcess | None = None

    def start(self) -> None:
        """The peer listening on ``sock`` (the same path every time)."""
        if self.sock.exists():  # a SIGKILLed peer leaves its socket file; DPDK will not bind over it
            self.sock.unlink()
        if self.kind == "blk":
            image = self.tmp / "disk.raw"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(8 << 20)
            self.process = self.peers.start("qsd", [
                programs.require("qemu-storage-daemon"),
                "--blockdev", f"driver=file,node-name=file0,filename={image}",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--export", f"type=vhost-user-blk,id=exp1,node-name=disk0,addr.type=unix,addr.path={self.sock},"
                            "num-queues=1,writable=on,logical-block-size=512"])
            self.process.wait_listening(self.sock)
        elif self.kind == "net":
            self.process, _ = self.peers.testpmd(sock=self.sock, client=False)
            self.process.wait_log(TESTPMD_FORWARDING_LOG)  # forwarding (and its RX drain) before any frame
        else:
            self.process = self.peers.start("virtiofsd", [
                programs.require("virtiofsd"), f"--socket-path={self.sock}", "-o", f"source={self.share}",
                "-o", "cache=none"])
            # (not the listening socket: a reconnecting daemon may take the one connection, upon
            # which virtiofsd stops listening, before a poll of /proc/net/unix sees it)
            self.process.wait_log("Waiting for vhost-user socket connection")

    @property
    def share(self) -> Path:
        return self.tmp / "share"

    async def kill(self) -> None:
        assert self.process is not None
        self.process._signal_group(signal.SIGKILL)
        await asyncio.to_thread(self.process.stop)


# --- the guest's side: bring up, and data flowing -------------------------------------------------


async def first_of(done: asyncio.Future[None], wake: Coroutine[object, object, object],
                   timeout: float | None = None) -> None:
    """Until ``done`` is done or ``wake`` returns (or ``timeout``); ``wake`` does not outlive it."""
    waker = asyncio.ensure_future(wake)
    try:
        await asyncio.wait([done, waker], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waker.cancel()


class FrameLedger:
    """Every frame the guest sent (numbered, its bytes kept) and which came back: a frame back
    twice, or RX bytes that are no frame sent (stale, poison, torn), fail at once."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: dict[int, bytes] = {}
        self.got: set[int] = set()
        self.latest = 0  # the newest frame back (the loop keeps their order: older ones not back are lost)

    def new(self, mac: bytes, size: int) -> tuple[int, bytes]:
        no = len(self.sent) + 1
        frame = b"\xff" * 6 + mac + ETHERTYPE + no.to_bytes(4, "big") + self.rng.randbytes(size)
        self.sent[no] = frame
        return no, frame

    def take(self, frame: bytes, what: str) -> int:
        no = int.from_bytes(frame[14:18], "big") if len(frame) >= 18 and frame[12:14] == ETHERTYPE else 0
        if self.sent.get(no) != frame:
            raise AssertionError(f"{what}: an RX buffer completed with bytes that are no frame sent (stale, poison "
                                 f"or torn): {len(frame)} bytes, {frame[:20].hex()}...")
        if no in self.got:
            raise AssertionError(f"{what}: frame {no} came back twice")
        self.got.add(no)
        self.latest = max(self.latest, no)
        return no


class GuestDevice:
    """The simulated guest's driver for one device type; :meth:`check` proves data flows."""

    def __init__(self, kind: str, guest: SimGuest, grants: bool, peer: Peer) -> None:
        self.kind, self.guest, self.grants, self.peer = kind, guest, grants, peer
        self.alloc = GuestPageAllocator(guest.ram)
        self.dev: VirtioBlk | VirtioNet | VirtioMmioDriver | None = None
        self.rng = random.Random(f"{kind}{grants}")
        self.frames = FrameLedger(self.rng)
        self.tx: dict[int, asyncio.Future[int]] = {}  # the traffic's frames (start_traffic)
        self.given_up = 0  # frames up to this one are no longer waited for (back_end_restarted)
        self.fuse: Fuse | None = None

    @property
    def driver(self) -> VirtioMmioDriver:
        assert self.dev is not None
        return self.dev if isinstance(self.dev, VirtioMmioDriver) else self.dev.driver

    async def attach(self) -> None:
        """Probe, reset, negotiate (every feature the driver knows that the device offers), rings, DRIVER_OK."""
        kw: dict[str, object] = {"grants": self.grants, "mmio_timeout": STEP}
        if self.kind == "blk":
            self.dev = await VirtioBlk.attach(self.guest, BASE, IRQ, self.alloc, queue_size=64,
                                              features=VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX, **kw)
        elif self.kind == "net":
            # every bit the device offers, as a Linux driver takes them, but the ring layouts this
            # driver does not implement: what the guest gets is the daemon's policy, nothing withheld here
            self.dev = await VirtioNet.attach(self.guest, BASE, IRQ, self.alloc, queue_size=64,
                                              features=NET_ALL_BUT_RING_LAYOUTS, rx_poison=RX_POISON, **kw)
            offered = self.dev.driver.device_features
            assert not offered & NET_FRONT_END_ONLY, f"control-queue bits offered to the guest: {offered:#x}"
            assert self.dev.driver.has(NetFeature.MAC | NetFeature.STATUS), f"{self.dev.driver.features:#x}"
            assert self.dev.link_up and len(self.dev.mac) == 6, "net config served by the daemon"
        else:
            driver = VirtioMmioDriver(self.guest, BASE, IRQ, self.alloc, grants=self.grants, mmio_timeout=STEP)
            assert await driver.probe() == VIRTIO_ID_FS
            await driver.negotiate(int(Feature.VERSION_1 | Feature.RING_EVENT_IDX))
            await driver.setup_queue(0, 64)  # hiprio
            await driver.setup_queue(1, 64)  # requests
            await driver.driver_ok()
            self.dev = driver

    async def reset(self) -> None:
        """The driver unloaded (device reset) and loaded again; net: the frames received until
        then are taken first (a frame still inside the device when it resets may be lost)."""
        if isinstance(self.dev, VirtioNet):
            for frame in await self.dev.recv_ready():
                self.frames.take(frame, "received before the guest's reset")
        await self.close()
        await self.attach()

    async def close(self) -> None:
        if self.dev is not None:
            dev, self.dev = self.dev, None
            await dev.close()

    async def check(self, what: str, *, fs_session: str = "") -> None:
        """Data flows. virtio-fs: a whole session (INIT … DESTROY), or with ``fs_session`` "open"
        a session is started and left open, "reuse" reads on the open one."""
        step = {"blk": self._blk, "net": self._net, "fs": lambda: self._fs(fs_session)}[self.kind]
        try:
            async with asyncio.timeout(STEP * 2):
                await step()
        except (GuestDriverError, TimeoutError) as e:
            raise AssertionError(f"{self.kind}: data does not flow {what}: {e!r}") from e

    async def _blk(self) -> None:
        assert isinstance(self.dev, VirtioBlk)
        sector = self.rng.randrange(0, (8 << 20) // 512 - 128, 8)
        data = self.rng.randbytes(64 << 10)
        await self.dev.write(sector, data)
        assert await self.dev.read(sector, len(data) // 512) == data, "blocks read back differ"
        await self.dev.flush()
        with open(self.peer.tmp / "disk.raw", "rb") as f:
            f.seek(sector * 512)
            assert f.read(len(data)) == data, "the written blocks are not in the raw file"

    async def _net(self, *, late: bool = False) -> None:
        """Frames one at a time, each waited for: the one sent comes back, nothing else; with
        ``late`` frames of the traffic still on their way may come first (once, with their bytes)."""
        assert isinstance(self.dev, VirtioNet)
        for n in range(FRAMES + 1):
            no, sent = self.frames.new(self.dev.mac, 60 + 13 * n)
            await self.dev.send(sent)
            while no not in self.frames.got:
                got = self.frames.take(await self.dev.recv(STEP), f"frame {no}")
                assert got == no or late and got in self.tx, \
                    f"frame {got} came back where {no} was sent alone (a frame from before the event)"

    # Traffic through the event: a sender keeps BURST frames in flight (posted in batches, one
    # notify each; a frame is in flight until it, or a newer one, is back: no more than the RX
    # buffers can take, so the loop itself never drops), a receiver takes every frame back as it
    # comes (its buffer posted again).

    async def start_traffic(self) -> None:
        """Frames flowing, BURST in flight; returns once 2 * BURST have come back (steady state)."""
        assert isinstance(self.dev, VirtioNet)
        self.tx = {}
        self._stop_sending = asyncio.Event()
        self._stop_receiving = asyncio.Event()
        self._took = asyncio.Event()
        self._posted = asyncio.Event()
        self._sender = asyncio.ensure_future(self._send_frames(self.dev))
        self._receiver = asyncio.ensure_future(self._receive_frames(self.dev))
        await self.frames_back(len(self.frames.got) + 2 * BURST, "before the event")
        self._posted.clear()  # and a window just posted: the event fires now
        await first_of(self._sender, self._posted.wait(), timeout=STEP)
        if self._sender.done():
            self._sender.result()
        self.at_event = self.in_flight()

    def in_flight(self) -> int:
        return sum(no > max(self.frames.latest, self.given_up) for no in self.tx)

    def back_end_restarted(self) -> None:
        """The restarted back-end is forwarding: the frames posted before may be lost for good
        (dpdk-testpmd drains what it receives before its forwarding starts, tests/peers/README.md,
        and the daemon hands it the frames in flight as soon as it connects); like a guest's
        network stack, the sender stops waiting for them and sends new ones (any of them still
        coming back is taken as usual)."""
        self.given_up = max(self.tx, default=0)
        self._took.set()  # the sender looks again at once

    async def _send_frames(self, dev: VirtioNet) -> None:
        stop = asyncio.ensure_future(self._stop_sending.wait())
        try:
            while not self._stop_sending.is_set():
                in_flight = self.in_flight()
                for _ in range(BURST - in_flight):
                    no, frame = self.frames.new(dev.mac, 46 + (len(self.frames.sent) * 41) % 1400)
                    self.tx[no] = await dev.post(frame, kick=False)
                if in_flight < BURST:
                    await dev.kick()
                    self._posted.set()
                self._took.clear()
                await first_of(stop, self._took.wait(), timeout=STEP)
        finally:
            stop.cancel()

    async def _receive_frames(self, dev: VirtioNet) -> None:
        """Until told to stop, between two frames (a frame taken is always taken whole, its
        buffer posted again: a cancelled recv could lose it half way)."""
        stop = asyncio.ensure_future(self._stop_receiving.wait())
        try:
            while True:
                await first_of(stop, dev.wait_received(), timeout=STEP * 4)
                if stop.done():
                    return
                self.frames.take(await dev.recv(STEP), "traffic")
                self._took.set()
        finally:
            stop.cancel()

    async def frames_back(self, count: int, what: str) -> None:
        """Until ``count`` frames in all have come back (the receiver's failure is raised)."""
        try:
            async with asyncio.timeout(STEP * 2):
                while len(self.frames.got) < count:
                    if self._receiver.done():
                        self._receiver.result()
                        raise AssertionError(f"net: the receiver ended {what}")
                    self._took.clear()
                    await first_of(self._receiver, self._took.wait())
        except TimeoutError as e:
            raise AssertionError(f"net: traffic stopped {what}: {self.missing()}") from e

    def missing(self) -> str:
        """The frames sent that did not come back, and which of them the guest has a TX completion for."""
        missing = sorted(set(self.tx) - self.frames.got)
        done = [no for no in missing if self.tx[no].done() and not self.tx[no].cancelled() and self.tx[no].exception() is None]
        return (f"{len(missing)} of {len(self.tx)} frames not back, {len(done)} of them with a TX completion "
                f"{done[:8]}{'...' if len(done) > 8 else ''}")

    async def stop_sending(self) -> None:
        """No more frames posted (those in flight stay in flight)."""
        self._stop_sending.set()
        await self._sender

    async def stop_traffic(self) -> None:
        """Sender and receiver gone, whatever their state (a failed cell's teardown)."""
        for task in (getattr(self, "_sender", None), getattr(self, "_receiver", None)):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def stop_receiving(self) -> None:
        self._stop_receiving.set()
        async with asyncio.timeout(STEP * 2):
            await self._receiver  # (its failure raised)

    async def settle_traffic(self, what: str, *, exact: bool) -> None:
        """After the event. ``exact`` (a daemon restart, which the guest cannot see): every frame
        sent completes on TX and comes back exactly once. Otherwise (back-end restart, guest
        reset) the frames the device held may be lost, never duplicated: frames one at a time
        then show what is still to come."""
        assert isinstance(self.dev, VirtioNet)
        if exact:
            await self.stop_sending()
            try:
                async with asyncio.timeout(STEP * 2):
                    for fut in self.tx.values():
                        await fut
                await self.frames_back(len(self.frames.sent), f"after {what}")
            except (GuestDriverError, TimeoutError) as e:
                raise AssertionError(f"net: through {what}: {self.missing()}: {e!r}") from e
            await self.stop_receiving()
        else:
            traffic_on = not self._receiver.done()  # (a guest reset stopped it: nothing may be late)
            if traffic_on:
                await self.stop_sending()
                await self.stop_receiving()
            await self._net(late=traffic_on)
        completed = sum(f.done() and not f.cancelled() and f.exception() is None for f in self.tx.values())
        lost = [no for no in self.tx if no not in self.frames.got]
        print(f"net {what}: {len(self.tx)} frames sent, {self.at_event} in flight at the event, {completed} "
              f"TX-completed, {len(lost)} lost, 0 duplicated")

    async def _fs(self, session: str) -> None:
        if session != "reuse":
            self.fuse = Fuse(self.driver, self.alloc)
            err, body, _ = await self.fuse.call(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0), 64)
            assert err == 0, f"FUSE_INIT: {err}"
        fuse = self.fuse
        try:
            err, body, _ = await fuse.call(FUSE_LOOKUP, 1, SHARE_FILE.encode() + b"\0", _ENTRY.size + _ATTR.size)
            assert err == 0, f"FUSE_LOOKUP: {err}"
            nodeid = _ENTRY.unpack_from(body)[0]
            err, body, _ = await fuse.call(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0), 16)
            assert err == 0, f"FUSE_OPEN: {err}"
            fh = struct.unpack_from("<Q", body)[0]
            content = (self.peer.share / SHARE_FILE).read_bytes()
            off = self.rng.randrange(0, len(content) - 4096)
            err, _, data = await fuse.call(FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, off, 4096, 0, 0, 0, 0), 0,
                                          data_size=4096)
            assert err == 0 and data == content[off:off + 4096], f"FUSE_READ: {err}, {len(data)} bytes"
        finally:
            if not session:  # the session ends (as an unmount does): the next check starts one with INIT
                err, _, _ = await fuse.call(FUSE_DESTROY, 0, b"", 0)
                assert err == 0, f"FUSE_DESTROY: {err}"


# --- the cells ------------------------------------------------------------------------------------


def device_spec(kind: str, path: str, sock: Path) -> str:
    spec = f"type={kind},base={BASE:#x},irq={IRQ},socket={sock}"
    if kind in ("net", "fs"):
        spec += ",queues=2"
    if path == "grant":
        spec += ",grants=1"
    return spec


async def peer_restarted_if_gone(peer: Peer, daemon: Daemon, mark: int) -> None:
    """virtiofsd ends with its connection: once it has, start it again (as its service manager
    would). Should the daemon's new process carry on with the same connection, it resumes on it."""
    assert peer.process is not None
    gone = asyncio.ensure_future(peer.process.wait_exit_async(STEP))
    resumed = asyncio.ensure_future(daemon.wait_log("resumed: features", mark))
    done, pending = await asyncio.wait({gone, resumed}, timeout=STEP * 2, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert done, "virtiofsd neither ended nor was resumed on"
    if gone in done:
        gone.result()
        await asyncio.to_thread(peer.process.stop)
        peer.start()


MEMORY = {"zerocopy": "sim-memfd", "shadow": "shadow", "grant": "auto"}
DATA_PATH_LOG = {  # what the daemon says it chose
    "zerocopy": "SIM-ONLY: guest RAM exposed to back-ends as a memfd",
    "shadow": "shadow virtqueues (the back-end knows only shared memory)",
    "grant": "grant-based guest: shadow virtqueues over gntdev",
}


@pytest.mark.parametrize(("kind", "path", "event"), list(cells()))
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon runs uvloop in its own process
async def test_data_flows_again_after(kind: str, path: str, event: str, sim_host: SimHost, sim_control: SimControl,
                                      peers: Peers, tmp_path: Path) -> None:
    if kind == "fs":
        share = tmp_path / "share"
        share.mkdir()
        (share / SHARE_FILE).write_bytes(os.urandom(64 << 10))
    peer = Peer(kind, peers, peers.sock_path(f"{kind}.sock"), tmp_path)
    peer.start()
    runtime = tmp_path / "run"
    runtime.mkdir()
    if event.startswith("daemon-crash"):
        # what restarts a killed daemon and keeps its back-end connections meanwhile: the dispatcher
        # (a guest made the libxl way, so that it finds the guest and spawns its instance)
        domid = sim_control.xl_create("matrix", [{"device_id": TYPES[kind], "base": BASE, "irq": IRQ, "devid": 0}],
                                      mem_bytes=64 << 20)
        daemon: Daemon = Dispatched(sim_host.path, domid, runtime, device_spec(kind, path, peer.sock), MEMORY[path],
                                    tmp_path / "daemon.log")
    else:
        domid = sim_control.create_domain(mem_bytes=64 << 20)
        daemon = Daemon(sim_host.path, domid, runtime, device_spec(kind, path, peer.sock), MEMORY[path],
                        tmp_path / "daemon.log")
    guest = await SimGuest.connect(sim_host.path, domid)
    dev = GuestDevice(kind, guest, path == "grant", peer)
    try:
        daemon.start()
        await daemon.wait_log("serving")
        await dev.attach()
        await daemon.wait_log(DATA_PATH_LOG[path])
        mounted = event.endswith("-mounted")
        event = event.removesuffix("-mounted")
        await dev.check("before the event", fs_session="open" if mounted else "")
        traffic = kind == "net"
        if traffic:  # frames flow while the event fires
            await dev.start_traffic()
        if event == "guest-reset":
            if traffic:  # the driver's removal: it stops sending, and takes what has come back
                await dev.stop_sending()
                await dev.stop_receiving()
            await dev.reset()
        elif event == "backend-restart":
            mark = daemon.mark()
            await peer.kill()
            peer.start()
            await daemon.wait_log("back-end reconnected and resumed", mark)
            if traffic:
                dev.back_end_restarted()
        elif event == "daemon-crash":
            mark = daemon.mark()
            await daemon.kill()
            daemon.restart()
            if kind == "fs":
                await peer_restarted_if_gone(peer, daemon, mark)
            await daemon.wait_log("ioreq server 0 adopted", mark)
        else:
            mark = daemon.mark()
            daemon.reload()
            await daemon.wait_log("handover: re-executing", mark)
            if kind == "fs":
                await peer_restarted_if_gone(peer, daemon, mark)
            await daemon.wait_log("ioreq server 0 adopted", mark)
        if traffic:
            if event != "guest-reset":  # and on after it
                await dev.frames_back(len(dev.frames.got) + 2 * BURST, f"after {event}")
            await dev.settle_traffic(f"{path} {event}", exact=event.startswith("daemon-"))
        await dev.check(f"after {event}", fs_session="reuse" if mounted else "")
        await dev.reset()  # and the next driver load on the same connection
        await dev.check(f"after {event} and a guest reset")
        await dev.close()
        assert await daemon.stop() == 0, daemon.tail()
    except BaseException:
        print(daemon.tail(80))
        if peer.process is not None:
            print(peer.process.log_tail(30))
        raise
    finally:
        await dev.stop_traffic()
        try:
            await dev.close()
        except GuestDriverError:
            pass
        guest.close()
        await daemon.stop()


# --- a real Linux guest: its driver unloaded and loaded again --------------------------------------

UML_FRAMES = 16


def uml_cells() -> Iterator[object]:
    for kind in ("blk", "net"):
        for path in PATHS:
            yield pytest.param(kind, path, id=f"uml-{kind}-{path}-driver-reload")


@pytest.mark.parametrize(("kind", "path"), list(uml_cells()))
@pytest.mark.asyncio(loop_factories=["asyncio"])  # the daemon runs uvloop in its own process
async def test_real_linux_guest_reloads_its_driver_and_data_flows_again(
        kind: str, path: str, sim_host: SimHost, sim_control: SimControl, peers: Peers, tmp_path: Path) -> None:
    """User-Mode Linux (tests/daemon/test_uml_guest.py: virtio_uml through the bridge, a simulated
    Xen domain, the daemon, a real peer): the guest's virtio_blk or virtio_net checks data, is
    rmmod'ed (the driver's removal resets the device), insmod'ed again (a new probe, features,
    rings) and checks data once more. Net: the daemon's feature policy as it is."""
    from tests.daemon.test_uml_guest import serve_uml
    from xen_vhost_sim.uml_bridge import UmlBridge

    grants = path == "grant"
    uml_sock = peers.sock_path("uml.sock")
    extra = (",queues=2" if kind == "net" else "") + (",grants=1" if grants else "")
    bridge = UmlBridge(sim_host.path, base=BASE, irq=IRQ, device_id=TYPES[kind], grants=grants)
    if kind == "blk":
        qsd = peers.qsd_raw(size=16 << 20)
        backend, image = Path(qsd.sock), qsd.image
        assert image is not None
        pattern = os.urandom(256 * 512)
        (tmp_path / "pattern.bin").write_bytes(pattern)
        env = {"UMLT_PATTERN": str(tmp_path / "pattern.bin"), "UMLT_WSECTOR": "8192", "UMLT_WSECTOR2": "16384",
               "UMLT_RELOAD": "1"}
        start = lambda: peers.uml(uml_sock, mode="blkrw", env=env)  # noqa: E731
    else:
        pmd, backend = peers.testpmd()
        start = lambda: peers.uml(uml_sock, mode="net", device_id=1, mem="64M",  # noqa: E731
                                  env={"UMLT_NET_FRAMES": str(UML_FRAMES), "UMLT_RELOAD": "1"})
    # UML's RAM is one bank at guest-physical 0: libxl's layout of an x86 HVM guest, which the
    # shadow path maps RAM by (the simulator's default guest is an arm64 one, RAM at 1 GiB)
    run, verdicts, rc, _ = await serve_uml(bridge, uml_sock, start, sim_host.path, backend, tmp_path, kind=kind,
                                           extra=extra, memory=MEMORY[path], guest_arch="x86_64")
    daemon_log = (tmp_path / "daemon.log").read_text()
    tail = run.process.log_tail(60) + "\n" + daemon_log[-4000:]
    assert "DONE 0" in verdicts, tail
    if kind == "blk":
        assert run.value("WRITE-READ-OK") == "256" and run.value("RELOAD-WRITE-READ-OK") == "256", tail
        with open(image, "rb") as f:
            for sector in (8192, 16384):
                f.seek(sector * 512)
                assert f.read(len(pattern)) == pattern, f"UML's pattern is not at sector {sector} of the raw file"
    else:
        tail += "\n" + pmd.log_tail(20)
        want = f"sent={UML_FRAMES} looped={UML_FRAMES}"
        assert run.value("NET") == want and run.value("RELOAD-NET") == want, tail
    assert DATA_PATH_LOG[path] in daemon_log, tail
    # the reload went through the daemon: a reset that stopped the back-end, a second start
    assert daemon_log.count("driver reset the device (stopping the back-end)") >= 1, tail
    assert daemon_log.count("started: features") >= 2, tail
    assert bridge.error is None, bridge.error
    assert rc == 0, tail
