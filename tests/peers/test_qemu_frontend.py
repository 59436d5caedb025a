"""Real QEMU as the vhost-user front-end of the library's back-end, with QMP ``stop``/``cont`` while a
real Linux guest does block I/O.

QEMU 7.2 (Debian 12's) stops a vhost-user device with SET_STATUS(0) *before* SET_VRING_ENABLE(0) and
GET_VRING_BASE (hw/virtio/vhost.c ``vhost_dev_stop`` calls ``vhost_dev_start(false)`` first); QEMU
restarts the ring on ``cont`` at the index GET_VRING_BASE answered. A back-end that forgets the
ring's position on status 0 answers a stale index and the guest's I/O breaks after the first
``cont``.

Guest: the real-Xen lab's artefacts (tests/xenlab/prepare.sh caches Debian's arm64 kernel, its
virtio_mmio/virtio_blk modules and busybox), booted by qemu-system-aarch64 under TCG with
``vhost-user-blk`` on virtio-mmio; QEMU's vhost-user code (hw/virtio/vhost*.c) is the same on every
target. The guest writes 64 KiB of random data with O_DIRECT, reads it back and prints one
``ROUND n OK`` line per round, forever; the test pauses and resumes the VM between rounds.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import programs
from tests.peers.harness import PeerProcess, Peers

pytestmark = [pytest.mark.peer, pytest.mark.timeout(600 + 1800)]

BOOT_TIMEOUT = 300.0  # TCG boot of a distribution kernel on a shared 2-CPU box
ROUNDS_TIMEOUT = 120.0  # 3 guest I/O rounds after a ``cont``
QMP_TIMEOUT = 60.0
PAUSES = 3
# virtio-mmio offers QueueNumMax 1024 whatever the device's queue-size (hw/virtio/virtio-mmio.c), and
# vhost-user-blk sizes the inflight area (GET_INFLIGHT_FD) by queue-size: make both the same.
QUEUE_SIZE = 1024
LAB_CACHE = os.environ.get("XENLAB_CACHE", "/var/cache/xen-vhost-master-lab")
PREPARE = Path(__file__).resolve().parents[1] / "xenlab" / "prepare.sh"
PREPARE_TIMEOUT = 1800.0  # cold: apt, downloads and the Xen build (tests/xenlab/test_real_xen.py's bound)

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
insmod /lib/modules/virtio_mmio.ko; insmod /lib/modules/virtio_blk.ko
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
[ -b /dev/vda ] || { echo "GUEST-FAIL no /dev/vda"; poweroff -f; }
echo GUEST-READY
n=0
while true; do
  n=$((n+1)); at=$(( (n % 64) * 16 ))
  head -c 65536 /dev/urandom > /tmp/p
  dd if=/tmp/p of=/dev/vda bs=4096 seek=$at oflag=direct 2>/dev/null || echo "ROUND $n WRITE-ERROR"
  dd if=/dev/vda of=/tmp/q bs=4096 skip=$at count=16 iflag=direct 2>/dev/null || echo "ROUND $n READ-ERROR"
  if cmp -s /tmp/p /tmp/q; then echo "ROUND $n OK"; else echo "ROUND $n BAD"; fi
done
"""


def _cached_guest() -> tuple[Path, Path] | None:
    for art in sorted(glob.glob(os.path.join(LAB_CACHE, "*", "kernel.done")), key=os.path.getmtime, reverse=True):
        a = Path(art).parent
        need = [a / "Image", a / "modules" / "virtio_mmio.ko", a / "modules" / "virtio_blk.ko", a / "rootfs" / "bin" / "busybox"]
        if all(p.is_file() for p in need):
            return a / "Image", a
    return None


def lab_guest() -> tuple[Path, Path]:
    """(kernel Image, directory with modules/ and rootfs/bin/busybox) from the lab's cache, which
    tests/xenlab/prepare.sh fills first when it is empty (as `make test`'s lab would: the same cache)."""
    found = _cached_guest()
    if found is not None:
        return found
    if os.environ.get("XENLAB", "1") == "0":
        pytest.skip(f"XENLAB=0 and no guest kernel in {LAB_CACHE}: the lab's artefacts are opted out")
    try:
        proc = subprocess.run(["bash", str(PREPARE)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=PREPARE_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tests/xenlab/prepare.sh did not finish within {PREPARE_TIMEOUT:.0f} s", pytrace=False)
    found = _cached_guest()
    if proc.returncode != 0 or found is None:
        pytest.fail(f"no guest kernel: tests/xenlab/prepare.sh exited {proc.returncode}:\n{proc.stdout[-2000:]}",
                    pytrace=False)
    return found


def newc_cpio(files: dict[str, tuple[int, bytes | None]]) -> bytes:
    """An initramfs: ``path -> (mode, data)`` (data None = a directory), cpio "newc" format."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(files.items(), start=1):
        entry(ino, name, mode | (stat.S_IFDIR if data is None else stat.S_IFREG), data or b"")
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def build_initramfs(art: Path, out: Path) -> None:
    files: dict[str, tuple[int, bytes | None]] = {d: (0o755, None) for d in ("bin", "proc", "sys", "dev", "tmp", "lib", "lib/modules")}
    files["bin/busybox"] = (0o755, (art / "rootfs" / "bin" / "busybox").read_bytes())
    for mod in ("virtio_mmio.ko", "virtio_blk.ko"):
        files[f"lib/modules/{mod}"] = (0o644, (art / "modules" / mod).read_bytes())
    files["init"] = (0o755, GUEST_INIT.encode())
    out.write_bytes(newc_cpio(files))


def qemu_version(qemu: str) -> tuple[int, int]:
    text = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(QMP_TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> object:
        self.file.write(json.dumps({"execute": command}) + "\n")
        self.file.flush()
        while True:  # events may come first
            reply = json.loads(self.file.readline())
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def ok_rounds(console: PeerProcess) -> int:
    rounds = [int(n) for n in re.findall(r"^ROUND (\d+) OK", console.log_text(), re.MULTILINE)]
    return max(rounds, default=0)


def wait_rounds(qemu: PeerProcess, at_least: int, timeout: float) -> None:
    def progressed() -> bool:
        broken = re.search(r"^ROUND \d+ (BAD|WRITE-ERROR|READ-ERROR)|^GUEST-FAIL", qemu.log_text(), re.MULTILINE)
        assert broken is None, f"guest I/O broke: {broken.group(0)}; console tail:\n{qemu.log_tail()}"
        return ok_rounds(qemu) >= at_least

    qemu.wait_for(progressed, f"guest I/O round {at_least}", timeout)


def stop_order(backend_log: str) -> list[str]:
    """The request names of the first device stop the back-end saw (from its -v log)."""
    names = re.findall(r"request ([A-Z_]+) ", backend_log)
    first_base = names.index("GET_VRING_BASE")
    return names[max(0, first_base - 2) : first_base + 1]


@pytest.mark.parametrize("inflight", [False, True], ids=["no-inflight", "inflight"])
def test_qemu_stop_cont_while_the_guest_does_io(peers: Peers, tmp_path: Path, inflight: bool) -> None:
    qemu_bin = programs.find("qemu-system-aarch64")
    if qemu_bin is None:
        pytest.skip(f"qemu-system-aarch64 not found: {programs.hint('qemu-system-aarch64')}")
    kernel, art = lab_guest()
    initrd = tmp_path / "initramfs.cpio"
    build_initramfs(art, initrd)
    sock, qmp_path = peers.sock_path("blk.sock"), peers.sock_path("qmp.sock")

    backend = peers.start("blk", [sys.executable, "-m", "vhost_user.testing.blk", "--socket-path", str(sock),
                                  "--size", "16M", *([] if inflight else ["--no-inflight"]), "-v"])
    backend.wait_listening(sock)
    qemu = peers.start("qemu", [
        qemu_bin, "-M", "virt", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1",
        "-nographic", "-no-reboot",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=c0,path={sock}", "-device", f"vhost-user-blk,chardev=c0,queue-size={QUEUE_SIZE}",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyAMA0 panic=-1 quiet",
    ])
    wait_rounds(qemu, 3, BOOT_TIMEOUT)
    qmp = Qmp(qmp_path)
    try:
        for _pause in range(PAUSES):
            qmp.execute("stop")  # returns after vhost_dev_stop: GET_VRING_BASE answered
            paused_at = ok_rounds(qemu)
            qmp.execute("cont")
            wait_rounds(qemu, paused_at + 3, ROUNDS_TIMEOUT)
        qmp.execute("quit")
    finally:
        qmp.close()
    log_text = backend.log_text()
    order = stop_order(log_text)
    # QEMU restarts each ring at what GET_VRING_BASE answered: the guest did I/O before every pause,
    # so each restart is further on (a back-end answering where the ring started lags behind).
    bases = [int(n) for n in re.findall(r"request SET_VRING_BASE VringState: \n\s+index = 0\n\s+num = (\d+)", log_text)]
    assert len(bases) == PAUSES + 1 and bases[0] == 0, bases
    assert all(a < b for a, b in zip(bases, bases[1:], strict=False)), bases
    if qemu_version(qemu_bin) < (8, 1):
        # what makes this the QEMU 7.2 case: status 0 reaches the back-end before GET_VRING_BASE
        assert order == ["SET_STATUS", "SET_VRING_ENABLE", "GET_VRING_BASE"], order
