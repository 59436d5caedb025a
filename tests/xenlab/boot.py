#!/usr/bin/env python3
"""Boot the lab: Xen + the dom0 initramfs under qemu-system-aarch64 (TCG), serial log to a file.

    boot.py --xen XEN --kernel Image --initrd dom0.cpio.gz --log LOG [--timeout 600] [--stall 0]

Xen boots from QEMU's own virt DTB with /chosen edited (fdtput): Xen and dom0 command lines and
two ``multiboot,module`` nodes for dom0's kernel and initramfs, loaded by ``-device loader``.
Every serial line is written to LOG prefixed with seconds since QEMU started. QEMU is stopped
(its own pid, SIGTERM then SIGKILL) on a Xen or Linux panic, at the timeout, when no check has
been reported (a ``XENLAB-CHECK`` line) for ``--stall`` seconds (0: no such bound), or a few seconds
after dom0 says XENLAB-DOM0-END if it does not power off by itself. The stall bound is what ends a
stuck boot on a loaded machine, where a whole boot may take several times as long as on an idle
one; the timeout caps it. Exit status: 0 when dom0
finished (XENLAB-DOM0-END), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time

PANIC = re.compile(r"crashed on cpu|Panic on CPU|Kernel panic|Unable to handle kernel|\bBUG: ")
# a domU's console, shown by dom0 (its dumps, and the heartbeat's last line of each guest console):
# not dom0 or Xen failing
GUEST_DUMP = re.compile(r"(DOMU|TERM-FAULT|STUCK-DOMU)\[|XENLAB-HB-GUEST ")


def dom0_panic(line: str) -> bool:
    """``line`` (a console line, the host's timestamp taken off) says dom0 or Xen failed."""
    return bool(PANIC.search(line)) and not GUEST_DUMP.match(line)


KADDR, IADDR = 0x50000000, 0x56000000
MACHINE = "virt,virtualization=on,gic-version=3"
# The emulated machine's vCPU threads ahead of whatever else the host runs (nice(1); without the
# privilege nice says so on the serial log and runs QEMU as it is): a Xen pCPU, and with it a
# dom0 or domU vCPU, that the host deschedules for seconds, which real hardware never does, made
# the guests report RCU stalls and soft lockups beside two CPU hogs, once go silent for 900 s, and
# stretched the boot from ~100 s to 340-935 s (tests/xenlab/README.md, "The lab on a loaded host").
PRIORITY = ("nice", "-n", "-10")


def _fdtput(dtb: str, *args: str) -> None:
    subprocess.run(["fdtput", dtb, *args], check=True)


def make_dtb(workdir: str, kernel: str, initrd: str, *, mem: int, smp: int, dom0_mem: str, dom0_args: str) -> str:
    dtb = os.path.join(workdir, "virt.dtb")
    subprocess.run(["qemu-system-aarch64", "-machine", f"{MACHINE},dumpdtb={dtb}", "-cpu", "cortex-a57",
                    "-smp", str(smp), "-m", str(mem), "-nographic", "-nic", "none"],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ksz, isz = os.path.getsize(kernel), os.path.getsize(initrd)
    if KADDR + ksz > IADDR:
        raise SystemExit(f"kernel {kernel} ({ksz} bytes) overlaps the initramfs load address")
    _fdtput(dtb, "-t", "s", "/chosen", "xen,xen-bootargs",
            f"console=dtuart dtuart=/pl011@9000000 dom0_mem={dom0_mem} dom0_max_vcpus={smp} bootscrub=0")
    _fdtput(dtb, "-t", "s", "/chosen", "xen,dom0-bootargs", f"console=hvc0 earlycon=xen rdinit=/init loglevel=4 {dom0_args}")
    _fdtput(dtb, "-t", "i", "/chosen", "#address-cells", "2")
    _fdtput(dtb, "-t", "i", "/chosen", "#size-cells", "2")
    for addr, size, kind in ((KADDR, ksz, "kernel"), (IADDR, isz, "ramdisk")):
        node = f"/chosen/module@{addr:x}"
        _fdtput(dtb, "-c", node)
        _fdtput(dtb, "-t", "s", node, "compatible", f"multiboot,{kind}", "multiboot,module")
        _fdtput(dtb, "-t", "x", node, "reg", "0", hex(addr), "0", hex(size))
    return dtb


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_command(args: argparse.Namespace, dtb: str) -> list[str]:
    return [*PRIORITY, "qemu-system-aarch64", "-machine", MACHINE, "-cpu", "cortex-a57", "-smp", str(args.smp),
            "-m", str(args.mem), "-nographic", "-nic", "none", "-no-reboot", "-dtb", dtb, "-kernel", args.xen,
            "-device", f"loader,file={args.kernel},addr={KADDR:#x},force-raw=on",
            "-device", f"loader,file={args.initrd},addr={IADDR:#x},force-raw=on"]


def boot(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="xenlab-boot.") as w:
        dtb = make_dtb(w, args.kernel, args.initrd, mem=args.mem, smp=args.smp, dom0_mem=args.dom0_mem, dom0_args=args.dom0_args)
        cmd = qemu_command(args, dtb)
        t0 = time.monotonic()
        finished = False
        reason = "qemu exited"
        with open(args.log, "w", buffering=1, errors="replace") as log:
            log.write(f"[{0:7.1f}] BOOT {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            buf, deadline, end_at = b"", t0 + args.timeout, None
            stalled_at = t0 + args.stall if args.stall > 0 else float("inf")
            try:
                while True:
                    now = time.monotonic()
                    if now > deadline:
                        reason = f"timeout after {args.timeout} s"
                        break
                    if now > stalled_at and end_at is None:
                        reason = f"no check reported for {args.stall} s"
                        break
                    if end_at is not None and now > end_at:
                        reason = "dom0 finished but did not power off"
                        break
                    if not sel.select(timeout=0.5):
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        log.write(f"[{time.monotonic() - t0:7.1f}] {line}\n")
                        if "XENLAB-CHECK" in line and args.stall > 0:
                            stalled_at = time.monotonic() + args.stall
                        if "XENLAB-DOM0-END" in line:
                            finished, end_at = True, time.monotonic() + 15
                        elif end_at is None and dom0_panic(line):
                            reason, end_at = f"panic: {line.strip()[:120]}", time.monotonic() + 2
            finally:
                sel.close()
                _stop(proc)
                proc.stdout.close()
            if buf:
                log.write(f"[{time.monotonic() - t0:7.1f}] {buf.decode('utf-8', 'replace')}\n")
            log.write(f"[{time.monotonic() - t0:7.1f}] BOOT-END rc={proc.returncode} finished={int(finished)} reason={reason} "
                      f"wall={time.monotonic() - t0:.1f}s\n")
    return 0 if finished else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--xen", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--stall", type=float, default=0)
    p.add_argument("--mem", type=int, default=3072)
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--dom0-mem", default="1024M")
    p.add_argument("--dom0-args", default="")
    return boot(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
