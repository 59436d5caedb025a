"""``make demo``: the daemon serving a (simulated) Xen guest's disk from qemu-storage-daemon.

What runs, each as its own process, exactly as on a dom0 except that Xen is simulated:

1. ``xen-vhost-sim``: the simulated Xen host, with guest domain 1 named ``demo`` (256 MiB, Arm64 layout) and a
   virtio-mmio disk slot written into its xenstore the way ``xl create`` (libxl) does;
2. ``qemu-storage-daemon``: an unmodified vhost-user-blk back-end exporting a raw image;
3. ``xen-vhost-master --domain=demo``: the daemon, the systemd unit's command line; it finds the disk in
   xenstore, registers an IOREQ server, connects to the back-end;
4. the guest: this process plays the guest's CPU, running a virtio-mmio driver that follows Linux's
   ``virtio_mmio.c``: it probes the device, negotiates, writes random data, reads it back.

At the end the raw image on disk is checked too, then everything is stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xen_vhost_sim.guest import SimGuest
from xen_vhost_sim.guest_devices import BlkOp, VirtioBlk
from xen_vhost_sim.guest_driver import GuestPageAllocator

__all__ = ["main"]

DOMID, BASE, IRQ = 1, 0x0200_0000, 33
NAME = "demo"  # the guest's name: what the instance is keyed by, as under systemd
DISK = 64 << 20
TOTAL = 16 << 20  # bytes the guest writes and reads back
REQUEST = 64 << 10
DEPTH = 8
DEADLINE = 60.0  # seconds for any single wait


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not create {path}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


async def _print_status(status_cmd: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*status_cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    say("the daemon's view (xen-vhost-master status):")
    print(out.decode(), end="", flush=True)


async def guest_io(sim_socket: str, status_cmd: list[str]) -> tuple[bytes, float, int]:
    """The guest's part: probe the disk and write/read TOTAL bytes. Returns (data, seconds, requests)."""
    guest = await SimGuest.connect(sim_socket, DOMID)
    try:
        alloc = GuestPageAllocator(guest.ram)
        blk = await asyncio.wait_for(VirtioBlk.attach(guest, BASE, IRQ, alloc), DEADLINE)
        say(f"guest: virtio-blk probed at {BASE:#x}: {blk.capacity * 512 >> 20} MiB, features {blk.driver.features:#x}")
        data = random.Random(2026).randbytes(TOTAL)
        per = REQUEST // 512
        start = time.perf_counter()
        nreq = TOTAL // REQUEST
        for phase in ("write", "read"):
            got = []
            for i in range(0, nreq, DEPTH):
                ops = [
                    BlkOp("write", j * per, data=data[j * REQUEST:(j + 1) * REQUEST]) if phase == "write"
                    else BlkOp("read", j * per, count=per)
                    for j in range(i, min(i + DEPTH, nreq))
                ]
                got += await asyncio.wait_for(blk.batch(ops), DEADLINE)
                done = min(i + DEPTH, nreq) * REQUEST
                if sys.stdout.isatty():
                    print(f"\rdemo: guest: {phase:5} {done >> 20:3d}/{TOTAL >> 20} MiB", end="", flush=True)
                elif done % (4 << 20) == 0:
                    say(f"guest: {phase:5} {done >> 20:3d}/{TOTAL >> 20} MiB")
            if sys.stdout.isatty():
                print(flush=True)
            if phase == "read" and b"".join(chunk or b"" for chunk in got) != data:
                raise SystemExit("demo: FAILED: the guest read back different data")
        await asyncio.wait_for(blk.flush(), DEADLINE)
        seconds = time.perf_counter() - start
        await _print_status(status_cmd)
        await blk.close()
        return data, seconds, 2 * nreq
    finally:
        guest.close()


def main() -> int:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        print("demo: qemu-storage-daemon is missing (Debian 12: qemu-system-common, Debian 13: qemu-utils; `make demo` installs it)", file=sys.stderr)
        return 1
    bindir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="xvm-demo-"))
    sim_socket = work / "xen.sock"
    runtime = work / "run"
    runtime.mkdir()
    image = work / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(DISK)
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: open(work / f"{name}.log", "wb") for name in ("sim", "qsd", "daemon")}  # noqa: SIM115
    try:
        say(f"working in {work}")
        say(f"starting the simulated Xen host: domain {DOMID}, 256 MiB, virtio disk at {BASE:#x} irq {IRQ}")
        sim = subprocess.Popen(
            [str(bindir / "xen-vhost-sim"), "--socket", str(sim_socket), "--domain", f"domid={DOMID},name={NAME},mem=256M,vcpus=2",
             "--virtio", f"domid={DOMID},device_id=2,base={BASE:#x},irq={IRQ}", "-v"],
            stdout=logs["sim"], stderr=subprocess.STDOUT)
        procs.append(sim)
        _wait_for_socket(sim_socket, sim, "xen-vhost-sim")
        say("starting qemu-storage-daemon (vhost-user-blk) on a 64 MiB raw image")
        backend_sock = runtime / "0.sock"  # the daemon's default: <runtime-dir>/<devid>.sock
        backend = subprocess.Popen(
            [qsd, "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=raw,node-name=disk0,file=file0",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={backend_sock},num-queues=1,writable=on"],
            stdout=logs["qsd"], stderr=subprocess.STDOUT)
        procs.append(backend)
        _wait_for_socket(backend_sock, backend, "qemu-storage-daemon")
        cmd = [str(bindir / "xen-vhost-master"), f"--domain={NAME}", "--runtime-dir", str(runtime)]
        memory = os.environ.get("DEMO_MEMORY")  # e.g. sim-memfd, the simulator-only zero-copy baseline
        if memory:
            cmd += ["--memory", memory]
        say("starting: " + " ".join(["xen-vhost-master", *cmd[1:]]))
        say("  (qemu-storage-daemon knows nothing of Xen: guest memory reaches it through shadow virtqueues,")
        say("   the daemon copying between the guest's foreign-mapped buffers and memory it shares with it)")
        env = dict(os.environ, XEN_VHOST_SIM=str(sim_socket))
        daemon = subprocess.Popen(cmd, env=env, stdout=logs["daemon"], stderr=subprocess.STDOUT)
        procs.append(daemon)
        _wait_for_socket(runtime / "status.sock", daemon, "xen-vhost-master")
        status_cmd = [str(bindir / "xen-vhost-master"), "status", f"--domain={NAME}", "--runtime-dir", str(runtime)]
        data, seconds, nreq = asyncio.run(guest_io(str(sim_socket), status_cmd))
        digest = hashlib.sha256(data).hexdigest()[:16]
        with open(image, "rb") as f:
            on_disk = f.read(len(data))
        if on_disk != data:
            say("FAILED: the raw image does not hold what the guest wrote")
            return 1
        say(f"verified: {TOTAL >> 20} MiB written and read back, sha256 {digest}… identical in the guest and in {image.name}")
        say(f"{nreq} requests of {REQUEST >> 10} KiB at queue depth {DEPTH}: {nreq / seconds:.0f} IOPS, "
            f"{2 * TOTAL / seconds / 1e6:.1f} MB/s (Python guest + simulated Xen: a functional demo, see `make bench`)")
        rc = _stop(daemon)
        logs["daemon"].flush()
        say("what the daemon logged:")
        for line in (work / "daemon.log").read_text().splitlines():
            print(f"  | {line}")
        say(f"xen-vhost-master stopped with exit code {rc}")
        return 0 if rc == 0 else 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs.values():
            log.close()
        if os.environ.get("KEEP_DEMO"):
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
