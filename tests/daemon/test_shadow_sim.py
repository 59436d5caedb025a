"""Shadow virtqueues end to end over the simulated Xen host, WITHOUT the sim-only memfd: the daemon
reaches guest RAM only through privcmd foreign mappings (:class:`ForeignGuestMemory`), as on real
Xen, and the back-ends only ever see the daemon's shadow memfd.

Real peers: qemu-storage-daemon (raw file), dpdk-testpmd (io forwarding, looped port), the C
virtiofsd (FUSE INIT / LOOKUP / GETATTR / READ about a real directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import stat
import struct
from collections.abc import AsyncIterator

import pytest

from vhost_user import AsyncFrontend, UnixListener
from xen_vhost_master.config import DeviceConfig
from xen_vhost_master.device import Device
from xen_vhost_master.guestmem.foreign import ForeignGuestMemory
from xen_vhost_master.ioreq_server import IoreqServer
from xen_vhost_master.log import device_logger
from xen_vhost_master.datapath.shadow import ShadowDataPath
from xen_vhost_master.datapath.shadow_pool import SHADOW_BASE
from xen_vhost_master.virtio_mmio import IrqLevel
from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.host import SimHost
from xen_vhost_sim.guest_devices import BlkFeature, BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import Feature, GuestDriverError, GuestPageAllocator
from xen_vhost_master.xen.evtchn import EventChannel
from xen_vhost_master.xen.privcmd import PrivCmd

from tests.peers import programs
from tests.peers.harness import TESTPMD_FORWARDING_LOG

BASE, IRQ = 0x0200_0000, 33
TIMEOUT = 25.0


class ShadowDaemon:
    """The daemon's pieces for one guest and one device, on the shadow data path."""

    def __init__(self, kernel, control, domid: int, cfg: DeviceConfig, connect, *, pool_size: int = 8 << 20,
                 needs_reset: bool = False) -> None:
        self.privcmd, self.evtchn = PrivCmd(kernel), EventChannel(kernel)
        self.log = device_logger("xvm.test", domid, "shadow")
        self.ioreq = IoreqServer(self.privcmd, self.evtchn, domid, self.log)
        banks = [(int(a), int(b)) for a, b in control.domain_info(domid)["banks"]]
        self.guest_mem = ForeignGuestMemory(self.privcmd, domid, banks)
        self.errors: list[tuple[int, str]] = []
        self.shadow = ShadowDataPath(self.guest_mem, banks, pool_size=pool_size, max_queues=4, max_queue_size=256,
                                     on_error=self._queue_failed, log=self.log)
        self._needs_reset = needs_reset
        self.device = Device(cfg, connect=connect, memory=self.shadow,
                             set_irq=lambda level: self.ioreq.set_irq(cfg.irq, level), log=self.log)

    def _queue_failed(self, index: int, reason: str) -> None:
        """What the lead's wiring does: the device goes to DEVICE_NEEDS_RESET."""
        self.errors.append((index, reason))
        if self._needs_reset and self.device.model is not None:
            for action in self.device.model.needs_reset(f"queue {index}: {reason}"):
                if isinstance(action, IrqLevel):
                    self.ioreq.set_irq(self.device.config.irq, action.level)

    async def start(self) -> None:
        self.ioreq.create()
        await self.device.start()
        self.ioreq.add_window(self.device.config.base, 0x200, self.device)
        self.ioreq.enable()

    async def close(self) -> None:
        await self.ioreq.close()
        await self.device.close()
        self.shadow.close()
        self.guest_mem.close()
        self.evtchn.close()
        self.privcmd.close()


@contextlib.asynccontextmanager
async def shadow_guest(daemon: ShadowDaemon, sim_host: SimHost, domid: int,
                       listener: UnixListener | None = None) -> AsyncIterator[SimGuest]:
    """The guest of ``daemon``'s domain, connected; however the body ends the guest is closed, then
    the daemon, then ``listener`` (the back-end's, when the daemon listens)."""
    guest = await SimGuest.connect(sim_host.path, domid)
    try:
        yield guest
    finally:
        try:
            try:
                guest.close()
            finally:
                await daemon.close()
        finally:
            if listener is not None:
                listener.close()


def regions_are_shadow_only(daemon: ShadowDaemon) -> None:
    region = daemon.shadow.shadow.region()  # (regions() itself is once per back-end connection)
    assert region.guest_phys_addr == SHADOW_BASE and region.memory_size == daemon.shadow.shadow.size


async def run_blk(blk: VirtioBlk, rng: random.Random, plan, disk_bytes: int) -> dict[int, bytes]:
    """Random-offset write then read-back for each (request size, depth, total) of ``plan``; each
    entry has its own part of the disk (so later checks of the whole set stay valid)."""
    written: dict[int, bytes] = {}
    part = disk_bytes // len(plan)
    for n, (req, depth, total) in enumerate(plan):
        slots = [n * part // req + s for s in rng.sample(range(part // req), total // req)]
        ops = []
        for s in slots:
            data = rng.randbytes(req)
            written[s * req] = data
            ops.append(BlkOp("write", s * req // 512, data=data))
        for i in range(0, len(ops), depth):
            await asyncio.wait_for(blk.batch(ops[i : i + depth]), TIMEOUT)
        reads = [BlkOp("read", s * req // 512, count=req // 512) for s in slots]
        for i in range(0, len(reads), depth):
            got = await asyncio.wait_for(blk.batch(reads[i : i + depth]), TIMEOUT)
            for op, data in zip(reads[i : i + depth], got):
                assert data == written[op.sector * 512], f"read-back differs at {op.sector * 512:#x} (req {req}, QD {depth})"
    return written


@pytest.mark.peer
@pytest.mark.asyncio
async def test_qsd_4mib_random_write_read_back_at_qd_1_8_32_and_mixed(no_fd_leak, sim_host, sim_control, kernel, peers, caplog):
    caplog.set_level(logging.WARNING)
    disk = 32 << 20
    qsd = peers.qsd_raw(size=disk)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=str(qsd.sock))
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(qsd.sock)))
    async with shadow_guest(daemon, sim_host, domid) as guest:
        await daemon.start()
        regions_are_shadow_only(daemon)
        features = VirtioBlk.DEFAULT_FEATURES | Feature.RING_EVENT_IDX
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram), features=features), TIMEOUT)
        assert blk.driver.has(BlkFeature.FLUSH) and blk.driver.has(Feature.RING_EVENT_IDX)
        rng = random.Random(6)
        plan = [(4096, 1, 256 << 10), (4096, 8, 256 << 10), (4096, 32, 256 << 10),
                (65536, 1, 1 << 20), (65536, 8, 1 << 20), (65536, 32, 1 << 20)]
        written = await run_blk(blk, rng, plan, disk - (1 << 20))  # the last MiB is for the mixed phase
        # mixed: reads of what is there and new writes in the same batches (QD 16), 256 KiB of writes
        keys = list(written)
        ops, expect = [], []
        for i in range(64):
            if i % 2:
                off = rng.choice(keys)
                ops.append(BlkOp("read", off // 512, count=len(written[off]) // 512))
                expect.append(written[off])
            else:
                off = (disk - (1 << 20)) + (i // 2) * 8192  # a region the plan above never wrote
                data = rng.randbytes(8192)
                written[off] = data
                ops.append(BlkOp("write", off // 512, data=data))
                expect.append(None)
        for i in range(0, len(ops), 16):
            got = await asyncio.wait_for(blk.batch(ops[i : i + 16]), TIMEOUT)
            assert got == expect[i : i + 16]
        assert sum(len(d) for d in written.values()) == 4 << 20
        await asyncio.wait_for(blk.flush(), TIMEOUT)
        with open(qsd.image, "rb") as f:
            for off, data in written.items():
                f.seek(off)
                assert f.read(len(data)) == data, f"raw file differs at {off:#x}"
        st = daemon.shadow.stats(0)
        assert st.completed == st.chains > 300 and st.bytes_out >= 4 << 20 and st.bytes_in >= 4 << 20
        assert st.kicks < st.chains  # one kick per batch
        assert daemon.errors == [] and daemon.shadow.pool.used_pages == 0
        await blk.close()


def frame(n: int) -> bytes:
    return b"\xff" * 6 + bytes([0x02, 0, 0, 0, 0, n]) + b"\x88\xb5" + os.urandom(60 + 37 * n)


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_factories=["uvloop"])  # testpmd burns a CPU: run it once
async def test_testpmd_frames_out_and_back_through_the_shadow_path(sim_host, sim_control, kernel, peers, sim_dir):
    from xen_vhost_sim.guest_devices import VirtioNet

    domid = sim_control.create_domain(mem_bytes=64 << 20)
    sock = os.path.join(sim_dir, "net.sock")
    listener = UnixListener(sock)
    pmd, _ = peers.testpmd(sock=sock, client=True)
    cfg = DeviceConfig(devid=0, device_id=1, base=BASE, irq=IRQ + 1, listen=True, num_queues=2)
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.accept(listener, accept_timeout=TIMEOUT))
    async with shadow_guest(daemon, sim_host, domid, listener) as guest:
        async with asyncio.timeout(TIMEOUT):
            await daemon.start()
            regions_are_shadow_only(daemon)
            net = await VirtioNet.attach(guest, BASE, IRQ + 1, GuestPageAllocator(guest.ram), queue_size=64,
                                         features=VirtioNet.DEFAULT_FEATURES | Feature.RING_EVENT_IDX,
                                         mmio_timeout=TIMEOUT)  # testpmd shares CPU 0 with any other
            await pmd.wait_log_async(TESTPMD_FORWARDING_LOG)  # after testpmd's RX drain, not before
            sent = [frame(i) for i in range(16)]
            try:
                received = []
                for f in sent:  # one frame in flight at a time, as in test_device_sim_testpmd.py
                    await net.send(f)
                    received.append(await net.recv(TIMEOUT))
            except GuestDriverError as e:  # say where the frames stopped
                raise AssertionError(f"{e}: device {daemon.device.stats}, rx {daemon.shadow.stats(0)}, "
                                     f"tx {daemon.shadow.stats(1)}, testpmd log: {pmd.log_tail(8)}") from e
            assert sorted(received) == sorted(sent)
            rx, tx = daemon.shadow.stats(0), daemon.shadow.stats(1)
            assert tx.completed == 16 and tx.bytes_in == sum(12 + len(f) for f in sent)
            assert rx.completed >= 16 and rx.bytes_out == sum(12 + len(f) for f in sent[: rx.completed])
            assert daemon.errors == []
            await net.close()


# --- virtio-fs: a tiny FUSE client (include/uapi/linux/fuse.h, protocol 7.31) ---------------------

VIRTIO_ID_FS = 26
FUSE_LOOKUP, FUSE_GETATTR, FUSE_OPEN, FUSE_READ, FUSE_INIT, FUSE_DESTROY = 1, 3, 14, 15, 26, 38
_IN_HDR = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
_OUT_HDR = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: ino size blocks a/m/ctime, nsecs, mode nlink uid gid rdev blksize flags
_ENTRY = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid + nsecs, then fuse_attr


class Fuse:
    """FUSE requests over the request queue (1) of a virtio-fs device (virtio 1.2 §5.11)."""

    def __init__(self, driver, alloc) -> None:
        self.driver, self.alloc, self.unique = driver, alloc, 0

    async def call(self, opcode: int, nodeid: int, body: bytes, out_size: int, data_size: int = 0) -> tuple[int, bytes, bytes]:
        """One request; returns (error, reply body, data). ``data_size``: a second writable buffer."""
        self.unique += 1
        ram = self.driver.bus.ram
        req = _IN_HDR.pack(_IN_HDR.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0) + body
        ra, wa = self.alloc.alloc(len(req)), self.alloc.alloc(_OUT_HDR.size + out_size)
        da = self.alloc.alloc(data_size) if data_size else 0
        try:
            ram.view(ra, len(req))[:] = req
            ram.view(wa, _OUT_HDR.size + out_size)[:] = b"\xee" * (_OUT_HDR.size + out_size)
            writable = [(wa, _OUT_HDR.size + out_size)] + ([(da, data_size)] if data_size else [])
            fut = await self.driver.submit(1, [(ra, len(req))], writable)
            written = await asyncio.wait_for(fut, TIMEOUT)
            if written == 0 and opcode == FUSE_DESTROY:
                return 0, b"", b""  # Debian 13's Rust virtiofsd answers DESTROY with no reply, the C one with a header
            head = bytes(ram.view(wa, _OUT_HDR.size + out_size))
            length, error, unique = _OUT_HDR.unpack_from(head)
            assert unique == self.unique and length == written, (unique, length, written)
            body_len = min(out_size, length - _OUT_HDR.size)
            data = bytes(ram.view(da, length - _OUT_HDR.size - out_size)) if data_size and length > _OUT_HDR.size + out_size else b""
            if written < _OUT_HDR.size + out_size:  # nothing beyond the reported length was copied back
                assert head[written:] == b"\xee" * (len(head) - written)
            return error, head[_OUT_HDR.size : _OUT_HDR.size + body_len], data
        finally:
            for a in (ra, wa, da):
                if a:
                    self.alloc.free(a)


@pytest.mark.peer
@pytest.mark.asyncio
async def test_virtiofsd_answers_fuse_init_lookup_getattr_read_about_a_real_directory(
        sim_host, sim_control, kernel, peers, tmp_path):
    from xen_vhost_sim.guest_driver import VirtioMmioDriver

    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    content = os.urandom(10000)
    (share / "hello.bin").write_bytes(content)
    sock = peers.sock_path("fs.sock")
    virtiofsd = programs.require("virtiofsd")
    fsd = peers.start("virtiofsd", [virtiofsd, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=none"])
    fsd.wait_listening(sock)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    cfg = DeviceConfig(devid=0, device_id=VIRTIO_ID_FS, base=BASE, irq=IRQ, socket=str(sock), num_queues=2)
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(sock)))
    async with shadow_guest(daemon, sim_host, domid) as guest:
        async with asyncio.timeout(TIMEOUT):
            await daemon.start()
            regions_are_shadow_only(daemon)
            alloc = GuestPageAllocator(guest.ram)
            driver = VirtioMmioDriver(guest, BASE, IRQ, alloc)
            assert await driver.probe() == VIRTIO_ID_FS
            await driver.negotiate(int(Feature.VERSION_1 | Feature.RING_EVENT_IDX))
            await driver.setup_queue(0, 64)  # hiprio
            await driver.setup_queue(1, 64)  # request
            await driver.driver_ok()
            fuse = Fuse(driver, alloc)

            err, body, _ = await fuse.call(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0), 64)
            assert err == 0
            major, minor = struct.unpack_from("<II", body)
            assert major == 7 and minor >= 27

            err, body, _ = await fuse.call(FUSE_LOOKUP, 1, b"hello.bin\0", _ENTRY.size + _ATTR.size)
            assert err == 0
            nodeid = _ENTRY.unpack_from(body)[0]
            attr = _ATTR.unpack_from(body, _ENTRY.size)
            st = os.stat(share / "hello.bin")
            assert (attr[0], attr[1]) == (st.st_ino, 10000) and stat.S_ISREG(attr[9])

            err, body, _ = await fuse.call(FUSE_GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0), 16 + _ATTR.size)
            assert err == 0
            attr = _ATTR.unpack_from(body, 16)
            assert attr[0] == st.st_ino and attr[1] == 10000 and attr[9] == st.st_mode

            err, body, _ = await fuse.call(FUSE_LOOKUP, 1, b"sub\0", _ENTRY.size + _ATTR.size)
            assert err == 0 and stat.S_ISDIR(_ATTR.unpack_from(body, _ENTRY.size)[9])
            err, _, _ = await fuse.call(FUSE_LOOKUP, 1, b"missing\0", _ENTRY.size + _ATTR.size)
            assert err == -errno.ENOENT

            err, body, _ = await fuse.call(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0), 16)
            assert err == 0
            fh = struct.unpack_from("<Q", body)[0]
            # header in one writable buffer, the file's bytes in a second one (multi-buffer copy back)
            err, _, data = await fuse.call(FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 1000, 8192, 0, 0, 0, 0), 0,
                                          data_size=8192)
            assert err == 0 and data == content[1000:9192]
            st1 = daemon.shadow.stats(1)
            assert st1.completed == 7 and daemon.shadow.stats(0).chains == 0 and daemon.errors == []
            await driver.close()


@pytest.mark.peer
@pytest.mark.asyncio
async def test_qsd_killed_under_io_in_flight_chains_are_resubmitted_not_lost(sim_host, sim_control, kernel, peers, tmp_path):
    """qemu-storage-daemon is SIGKILLed with shadow chains in flight and restarted on the same image:
    the daemon reconnects, the shadow ring restarts at the guest's used index with every
    uncompleted chain published again, and each request completes exactly once with the right data."""
    import signal

    first = peers.qsd_raw(size=8 << 20)
    link = tmp_path / "blk.sock"
    link.symlink_to(first.sock)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=str(link))
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(link)))
    async with shadow_guest(daemon, sim_host, domid) as guest:
        await daemon.start()
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, GuestPageAllocator(guest.ram)), TIMEOUT)
        rng = random.Random(11)
        expected = {8 * i: rng.randbytes(4096) for i in range(16)}
        kicked = asyncio.Event()
        notify = daemon.shadow.notify
        inflight = 0

        def notify_and_kill(index):
            nonlocal inflight
            notify(index)  # the batch is published and the back-end kicked…
            inflight = daemon.shadow.inflight(0)
            first.process._signal_group(signal.SIGKILL)  # …and it dies right away
            daemon.shadow.notify = notify
            kicked.set()

        daemon.shadow.notify = notify_and_kill
        task = asyncio.ensure_future(blk.batch([BlkOp("write", s, data=d) for s, d in expected.items()]))
        await asyncio.wait_for(kicked.wait(), TIMEOUT)
        second = peers.qsd_raw(image=first.image)
        tmp = tmp_path / "blk.sock.new"
        tmp.symlink_to(second.sock)
        os.replace(tmp, link)
        await asyncio.wait_for(task, TIMEOUT)
        if daemon.device.reconnecting is not None:
            await asyncio.wait_for(daemon.device.reconnecting, TIMEOUT)
        assert daemon.device.stats.reconnects == 1 and inflight == 16
        st = daemon.shadow.stats(0)
        # every chain completed exactly once (a second completion of a head would be a guest error);
        # those the killed back-end had not completed were published again on the new ring
        assert st.completed == st.chains == 16 and st.resubmitted <= inflight
        for sector, data in expected.items():
            assert await asyncio.wait_for(blk.read(sector, 8), TIMEOUT) == data
        with open(first.image, "rb") as f:
            for sector, data in expected.items():
                f.seek(sector * 512)
                assert f.read(4096) == data
        assert daemon.errors == [] and daemon.shadow.inflight(0) == 0
        await blk.close()


@pytest.mark.peer
@pytest.mark.asyncio
async def test_hostile_chain_needs_reset_then_the_driver_recovers_on_the_same_backend(sim_host, sim_control, kernel, peers):
    """A descriptor loop written straight into the guest's ring: the daemon stops the queue, the
    device shows DEVICE_NEEDS_RESET, nothing reaches the back-end; after the driver's reset and
    re-probe, I/O works again on the same back-end connection."""
    from xen_vhost_sim.guest_driver import DeviceStatus, MmioReg

    qsd = peers.qsd_raw(size=8 << 20)
    domid = sim_control.create_domain(mem_bytes=64 << 20)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=str(qsd.sock))
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(qsd.sock)), needs_reset=True)
    async with shadow_guest(daemon, sim_host, domid) as guest:
        await daemon.start()
        frontend = daemon.device.frontend
        alloc = GuestPageAllocator(guest.ram)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), TIMEOUT)
        await asyncio.wait_for(blk.write(0, b"\x5a" * 4096), TIMEOUT)
        q = blk.driver.queues[0]
        buf = alloc.alloc(4096)
        ram = guest.ram
        for i, nxt in ((5, 6), (6, 5)):  # 5 → 6 → 5 → …
            ram.view(q.desc + 16 * i, 16)[:] = struct.pack("<QIHH", buf, 512, 1 | 2, nxt)
        idx = struct.unpack_from("<H", ram.view(q.avail + 2, 2))[0]
        ram.view(q.avail + 4 + 2 * (idx % q.size), 2)[:] = struct.pack("<H", 5)
        ram.view(q.avail + 2, 2)[:] = struct.pack("<H", (idx + 1) & 0xFFFF)
        chains = daemon.shadow.stats(0).chains
        await blk.driver.write_reg(MmioReg.QUEUE_NOTIFY, 0)
        assert daemon.errors and daemon.errors[0][0] == 0 and "loop" in daemon.errors[0][1]
        assert await blk.driver.read_status() & DeviceStatus.DEVICE_NEEDS_RESET
        assert daemon.shadow.stats(0).chains == chains  # nothing published for the hostile chain
        assert bytes(ram.view(buf, 4096)) == bytes(4096)  # nothing written into it
        await asyncio.wait_for(blk.close(), TIMEOUT)  # reset: the daemon stops the ring
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), TIMEOUT)
        assert await asyncio.wait_for(blk.read(0, 8), TIMEOUT) == b"\x5a" * 4096
        assert daemon.device.frontend is frontend and not frontend.broken
        await blk.close()


@pytest.mark.peer
@pytest.mark.asyncio
async def test_two_queues_and_driver_resets_through_the_shadow_path(sim_host, sim_control, kernel, peers):
    """virtio-blk with two queues on qemu-storage-daemon: I/O on both, then a driver reset (the
    shadow queues are closed, bounce buffers freed) and the same again, on one back-end connection."""
    from tests.daemon.test_device_sim_qsd import blk_request
    from xen_vhost_sim.guest_driver import VirtioMmioDriver

    qsd = peers.qsd_raw(size=8 << 20, num_queues=2)
    domid = sim_control.create_domain(mem_bytes=64 << 20, vcpus=2)
    cfg = DeviceConfig(devid=0, device_id=2, base=BASE, irq=IRQ, socket=str(qsd.sock))
    daemon = ShadowDaemon(kernel, sim_control, domid, cfg, lambda: AsyncFrontend.connect(str(qsd.sock)))
    async with shadow_guest(daemon, sim_host, domid) as guest:
        await daemon.start()
        frontend = daemon.device.frontend
        alloc = GuestPageAllocator(guest.ram)
        rng = random.Random(5)
        for round_ in range(2):
            driver = VirtioMmioDriver(guest, BASE, IRQ, alloc, vcpu=round_ % 2)
            wanted = Feature.VERSION_1 | Feature.RING_EVENT_IDX | (1 << 12)  # MQ
            await asyncio.wait_for(driver.initialize(int(wanted), [64, 64]), TIMEOUT)
            for queue in (0, 1):
                data = rng.randbytes(8192)
                sector = 100 * (2 * round_ + queue)
                await blk_request(driver, alloc, queue, 1, sector, data)
                assert await blk_request(driver, alloc, queue, 0, sector, length=8192) == data
                with open(qsd.image, "rb") as f:
                    f.seek(sector * 512)
                    assert f.read(8192) == data
                assert daemon.shadow.stats(queue).completed == 2
            await asyncio.wait_for(driver.close(), TIMEOUT)
            assert daemon.shadow.stats(0) is None and daemon.shadow.pool.used_pages == 0  # closed
            assert daemon.device.frontend is frontend and not frontend.broken
        assert daemon.errors == []
