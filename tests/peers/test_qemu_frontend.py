"""Real QEMU as the vhost-user front-end of the library's back-end, with QMP ``stop``/``cont`` while a
real Linux guest does block I/O.

QEMU 7.2 (Debian 12's) stops a vhost-user device with SET_STATUS(0) *before* SET_VRING_ENABLE(0) and
GET_VRING_BASE (hw/virtio/vhost.c ``vhost_dev_stop`` calls ``vhost_dev_start(false)`` first); QEMU
8.1 and later send it after. QEMU restarts the ring on ``cont`` at the index GET_VRING_BASE
answered. A back-end that forgets the ring's position on status 0 answers a stale index and the
guest's I/O breaks after the first ``cont``.

One harness, two machines, both under TCG (QEMU's vhost-user code, hw/virtio/vhost*.c, is the same
on every target):

* ``x86_64``: qemu-system-x86_64 ``-M q35`` with ``vhost-user-blk-pci``, booting Debian's own amd64
  kernel (``linux-image-amd64``'s package, fetched and cached by tests/peers/debian_kernel.py) with
  its virtio_pci and virtio_blk modules and the host's static busybox as the initramfs;
* ``aarch64``: qemu-system-aarch64 ``-M virt`` with ``vhost-user-blk`` on virtio-mmio, booting the
  real-Xen lab's artefacts (tests/xenlab/prepare.sh caches Debian's arm64 kernel, its
  virtio_mmio/virtio_blk modules and busybox).

The back-end serves a file: the library's ``python -m vhost_user.testing.blk``, and on x86 also the
project's dom0 RAM disk ``python -m xen_vhost_master.backend.blk`` (what the real-Xen lab runs; QEMU's
regions are plain fds, so its Xen mapper stays idle). The guest writes 64 KiB of random
data with O_DIRECT into one of 64 slots, reads it back and prints ``ROUND n OK <md5>`` per round,
forever; the test pauses and resumes the VM between rounds, checks that QEMU restarts the ring
further on each time and that the guest's rounds go on with correct data, and at the end that the
back-end's file holds what the guest last wrote in every slot.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import debian_kernel, programs
from tests.peers.harness import PeerProcess, Peers

pytestmark = [pytest.mark.peer, pytest.mark.timeout(600 + 1800)]

BOOT_TIMEOUT = 300.0  # TCG boot of a distribution kernel on a shared 2-CPU box
ROUNDS_TIMEOUT = 120.0  # 3 guest I/O rounds after a ``cont``
QMP_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0  # QMP ``quit`` until QEMU has exited
PAUSES = 3
SLOTS = 64  # the guest writes round n into slot n % SLOTS
SLOT_BLOCKS = 16  # 4 KiB blocks per slot: 64 KiB
DISK_SIZE = 16 << 20
LAB_CACHE = os.environ.get("XENLAB_CACHE", "/var/cache/xen-vhost-master-lab")
PREPARE = Path(__file__).resolve().parents[1] / "xenlab" / "prepare.sh"
PREPARE_TIMEOUT = 1800.0  # cold: apt, downloads and the Xen build (tests/xenlab/test_real_xen.py's bound)

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "GUEST-FAIL insmod $m"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
[ -b /dev/vda ] || { echo "GUEST-FAIL no /dev/vda"; poweroff -f; }
echo GUEST-READY
n=0
while true; do
  n=$((n+1)); at=$(( (n % @SLOTS@) * @SLOT_BLOCKS@ ))
  head -c $((@SLOT_BLOCKS@ * 4096)) /dev/urandom > /tmp/p
  dd if=/tmp/p of=/dev/vda bs=4096 seek=$at oflag=direct 2>/dev/null || echo "ROUND $n WRITE-ERROR"
  dd if=/dev/vda of=/tmp/q bs=4096 skip=$at count=@SLOT_BLOCKS@ iflag=direct 2>/dev/null || echo "ROUND $n READ-ERROR"
  if cmp -s /tmp/p /tmp/q; then echo "ROUND $n OK $(md5sum < /tmp/p | cut -d' ' -f1)"; else echo "ROUND $n BAD"; fi
done
""".replace("@SLOTS@", str(SLOTS)).replace("@SLOT_BLOCKS@", str(SLOT_BLOCKS))


@dataclass(frozen=True)
class Guest:
    kernel: Path
    busybox: Path
    modules: tuple[Path, ...]  # insmod'ed in this order


@dataclass(frozen=True)
class Machine:
    """One QEMU target: its binary (a need of tests/tools/debian-packages.tsv), its machine options,
    its vhost-user-blk device model and where its guest comes from."""

    need: str
    options: tuple[str, ...]
    device: str
    console: str
    guest: Callable[[], Guest]


# --- aarch64: the real-Xen lab's guest ---------------------------------------------------------
def _cached_lab_guest() -> Guest | None:
    for art in sorted(glob.glob(os.path.join(LAB_CACHE, "*", "kernel.done")), key=os.path.getmtime, reverse=True):
        a = Path(art).parent
        modules = (a / "modules" / "virtio_mmio.ko", a / "modules" / "virtio_blk.ko")
        g = Guest(a / "Image", a / "rootfs" / "bin" / "busybox", modules)
        if all(p.is_file() for p in (g.kernel, g.busybox, *g.modules)):
            return g
    return None


def lab_guest() -> Guest:
    """Kernel, modules and busybox from the lab's cache, which tests/xenlab/prepare.sh fills first
    when it is empty (as `make test`'s lab would: the same cache)."""
    found = _cached_lab_guest()
    if found is not None:
        return found
    if os.environ.get("XENLAB", "1") == "0":
        pytest.skip(f"XENLAB=0 and no guest kernel in {LAB_CACHE}: the lab's artefacts are opted out")
    try:
        proc = subprocess.run(["bash", str(PREPARE)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=PREPARE_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tests/xenlab/prepare.sh did not finish within {PREPARE_TIMEOUT:.0f} s", pytrace=False)
    found = _cached_lab_guest()
    if proc.returncode != 0 or found is None:
        pytest.fail(f"no guest kernel: tests/xenlab/prepare.sh exited {proc.returncode}:\n{proc.stdout[-2000:]}",
                    pytrace=False)
    return found


# --- x86_64: Debian's amd64 kernel and the host's static busybox ---------------------------------
def debian_amd64_guest() -> Guest:
    busybox = Path(programs.require("busybox-static"))
    try:
        machine, static = debian_kernel.elf_info(busybox)
    except (OSError, ValueError) as exc:
        pytest.fail(f"{busybox}: {exc}", pytrace=False)
    if machine != debian_kernel.EM_X86_64 or not static:
        programs.missing(f"{busybox} is not a static x86-64 busybox (the amd64 guest's initramfs needs one): "
                         f"{programs.hint('busybox-static')}")
    for need in ("dpkg-deb",):
        programs.require(need)
    try:
        k = debian_kernel.debian_amd64_kernel()
    except debian_kernel.KernelUnavailable as exc:
        if not exc.known:
            programs.missing(f"no Debian amd64 kernel for the guest: {exc}")
        pytest.fail(f"no Debian amd64 kernel for the guest: {exc}", pytrace=False)
    return Guest(k.vmlinuz, busybox, k.modules)


MACHINES = {
    "x86_64": Machine(
        need="qemu-system-x86_64",
        options=("-M", "q35", "-cpu", "max", "-nodefaults", "-display", "none", "-serial", "stdio"),
        # the library's back-end serves one queue; QEMU 10 defaults num-queues to the vCPU count
        device="vhost-user-blk-pci,num-queues=1,queue-size=128",
        console="ttyS0",
        guest=debian_amd64_guest,
    ),
    "aarch64": Machine(
        need="qemu-system-aarch64",
        options=("-M", "virt", "-cpu", "max", "-nographic"),
        # virtio-mmio offers QueueNumMax 1024 whatever the device's queue-size (hw/virtio/virtio-mmio.c),
        # and vhost-user-blk sizes the inflight area (GET_INFLIGHT_FD) by queue-size: make both the same.
        device="vhost-user-blk,num-queues=1,queue-size=1024",
        console="ttyAMA0",
        guest=lab_guest,
    ),
}


# --- initramfs ----------------------------------------------------------------------------------
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


def build_initramfs(guest: Guest, out: Path) -> None:
    files: dict[str, tuple[int, bytes | None]] = {d: (0o755, None) for d in ("bin", "proc", "sys", "dev", "tmp", "lib", "lib/modules")}
    files["bin/busybox"] = (0o755, guest.busybox.read_bytes())
    names = [p.name.removesuffix(".ko") for p in guest.modules]
    for name, path in zip(names, guest.modules, strict=True):
        files[f"lib/modules/{name}.ko"] = (0o644, path.read_bytes())
    files["lib/modules/order"] = (0o644, "".join(f"{n}\n" for n in names).encode())
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


# --- what the guest and the back-end said ---------------------------------------------------------
def ok_rounds(console: PeerProcess) -> dict[int, str]:
    """round -> md5 of the 64 KiB the guest wrote and read back equal."""
    return {int(n): md5 for n, md5 in re.findall(r"^ROUND (\d+) OK ([0-9a-f]{32})", console.log_text(), re.MULTILINE)}


def last_ok(console: PeerProcess) -> int:
    return max(ok_rounds(console), default=0)


#: What QEMU prints when the vhost-user device cannot start (the guest would wait for its disk forever).
QEMU_VHOST_FAILED = r"^qemu-system-\S+: .*(vhost|msg header).*"


def wait_rounds(qemu: PeerProcess, at_least: int, timeout: float, backend: PeerProcess) -> None:
    def progressed() -> bool:
        text = qemu.log_text()
        broken = re.search(r"^ROUND \d+ (BAD|WRITE-ERROR|READ-ERROR)|^GUEST-FAIL.*", text, re.MULTILINE)
        assert broken is None, f"guest I/O broke: {broken.group(0)}; console tail:\n{qemu.log_tail()}"
        failed = re.search(QEMU_VHOST_FAILED, text, re.MULTILINE)
        assert failed is None, (f"QEMU's vhost-user device failed: {failed.group(0)}; console tail:\n{qemu.log_tail()}\n"
                                f"back-end log tail:\n{backend.log_tail(5)}")
        return last_ok(qemu) >= at_least

    qemu.wait_for(progressed, f"guest I/O round {at_least}", timeout)


def vring_bases(backend_log: str) -> list[int]:
    """The avail index QEMU started ring 0 at, per start (SET_VRING_BASE in the back-end's -v log)."""
    return [int(n) for n in re.findall(r"request SET_VRING_BASE VringState: \n\s+index = 0\n\s+num = (\d+)", backend_log)]


def wait_restarted(backend: PeerProcess, starts: int, boot: int) -> list[int]:
    """Wait for the ``starts``-th SET_VRING_BASE and return the bases from the ``boot``-th on (the
    guest's own driver; the firmware's driver used the disk before and was reset). QEMU restarts
    the ring at what GET_VRING_BASE answered, and the guest did I/O before every pause, so each
    restart must be further on."""
    backend.wait_for(lambda: len(vring_bases(backend.log_text())) >= starts, f"SET_VRING_BASE #{starts}", QMP_TIMEOUT)
    bases = vring_bases(backend.log_text())[boot - 1 :]
    assert all(a < b for a, b in zip(bases, bases[1:], strict=False)), (
        f"QEMU restarted the ring at {bases[-1]} after a pause, not further on than its previous start "
        f"{bases[-2]}: GET_VRING_BASE answered a stale position (starts since boot: {bases})")
    return bases


def stop_order(backend_log: str, start: int) -> list[str]:
    """The requests around the stop that followed the ``start``-th ring start (the back-end's -v log)."""
    names = re.findall(r"request ([A-Z_]+) ", backend_log)
    started = [i for i, n in enumerate(names) if n == "SET_VRING_BASE"][start - 1]
    base = names.index("GET_VRING_BASE", started)
    return names[base - 2 : base + 2]


def check_image(image: Path, rounds: dict[int, str]) -> int:
    """Every slot holds what the guest's last completed round wrote there; the slot of the round
    after the last completed one is left out (QEMU quit while it may have been under way).
    Returns the number of slots checked."""
    latest: dict[int, int] = {}
    for n in sorted(rounds):
        latest[n % SLOTS] = n
    busy = (max(rounds) + 1) % SLOTS
    data = image.read_bytes()
    size = SLOT_BLOCKS * 4096
    checked = 0
    for slot, n in sorted(latest.items()):
        if slot == busy:
            continue
        got = hashlib.md5(data[slot * size : (slot + 1) * size]).hexdigest()
        assert got == rounds[n], f"slot {slot} of the back-end's file: md5 {got}, the guest's round {n} wrote {rounds[n]}"
        checked += 1
    return checked


#: back-end name -> the module ``python -m`` runs (both take vhost_user.testing.blk's options).
BACKENDS = {"library": "vhost_user.testing.blk", "xen-blk": "xen_vhost_master.backend.blk"}
#: (machine, back-end, inflight): the library's back-end both ways on both machines; the project's
#: RAM disk (the same BackendServer under a subclass of the library's device) once, as it runs in dom0.
CASES = [
    ("x86_64", "library", False),
    ("x86_64", "library", True),
    ("x86_64", "xen-blk", True),
    ("aarch64", "library", False),
    ("aarch64", "library", True),
]


@pytest.mark.parametrize(("arch", "backend_name", "inflight"), CASES,
                         ids=[f"{a}-{b}-{'inflight' if i else 'no-inflight'}" for a, b, i in CASES])
def test_qemu_stop_cont_while_the_guest_does_io(peers: Peers, tmp_path: Path, arch: str, backend_name: str,
                                                inflight: bool) -> None:
    machine = MACHINES[arch]
    qemu_bin = programs.require(machine.need)
    guest = machine.guest()
    initrd = tmp_path / "initramfs.cpio"
    build_initramfs(guest, initrd)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    sock, qmp_path = peers.sock_path("blk.sock"), peers.sock_path("qmp.sock")

    env = {k: v for k, v in os.environ.items() if k != "XEN_VHOST_SIM"}  # xen-blk: no simulated host
    backend = peers.start("blk", [sys.executable, "-m", BACKENDS[backend_name], "--socket-path", str(sock),
                                  "--blk-file", str(image), *([] if inflight else ["--no-inflight"]), "-v"], env=env)
    backend.wait_listening(sock)
    qemu = peers.start("qemu", [
        qemu_bin, *machine.options, "-accel", "tcg", "-m", "256M", "-smp", "1", "-no-reboot",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=c0,path={sock}", "-device", f"{machine.device},chardev=c0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-kernel", str(guest.kernel), "-initrd", str(initrd), "-append", f"console={machine.console} panic=-1 quiet",
    ])
    wait_rounds(qemu, 3, BOOT_TIMEOUT, backend)
    boot = len(vring_bases(backend.log_text()))  # SeaBIOS's virtio-blk driver starts the ring once first
    assert boot >= 1
    qmp = Qmp(qmp_path)
    try:
        for pause in range(PAUSES):
            qmp.execute("stop")  # returns after vhost_dev_stop: GET_VRING_BASE answered
            paused_at = last_ok(qemu)
            qmp.execute("cont")  # SET_VRING_BASE with that answer, then the ring runs again
            wait_restarted(backend, boot + pause + 1, boot)
            wait_rounds(qemu, paused_at + 3, ROUNDS_TIMEOUT, backend)
        qmp.execute("quit")
    finally:
        qmp.close()
    qemu.wait_for(lambda: qemu.exit_status() is not None, "exit after QMP quit", EXIT_TIMEOUT, allow_exit=True)
    assert len(wait_restarted(backend, boot + PAUSES, boot)) == PAUSES + 1
    assert check_image(image, ok_rounds(qemu)) >= 3 * (PAUSES + 1) - 1

    order = stop_order(backend.log_text(), boot)  # the first QMP stop
    if qemu_version(qemu_bin) < (8, 1):
        # what makes this the QEMU 7.2 case: status 0 reaches the back-end before GET_VRING_BASE
        assert order[:3] == ["SET_STATUS", "SET_VRING_ENABLE", "GET_VRING_BASE"], order
    else:
        assert order[-1] == "SET_STATUS", order  # vhost_reset_status after the rings' stop
