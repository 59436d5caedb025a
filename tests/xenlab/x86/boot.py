"""Boot the x86 scout: Xen 4.17 (multiboot, QEMU's -kernel) + Debian's amd64 dom0 kernel and
initramfs under qemu-system-x86_64 TCG, timestamp every serial line with the seconds since QEMU
started, stop QEMU (its own pid) on a Xen panic, on the timeout, or when dom0 does not power off
after it said it finished. Prints the measured figures at the end.

usage: boot.py ART_DIR INITRAMFS LOG [--timeout S] [--cpu MODEL] [--smp N] [--mem MiB] [--xen-args ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

PANIC = re.compile(r"Panic on CPU|\*\*\*\* Panic|Kernel panic - not syncing")
DOM0_END = "XENLAB-X86-DOM0-END"
# the first serial line containing each pattern marks a phase (seconds since QEMU started)
MARKS = (
    ("xen-start", "Xen version"),
    ("hvm-svm", "HVM: SVM enabled"),
    ("dom0-kernel", "Linux version"),
    ("dom0-userspace", "XENLAB-X86-DOM0-UP"),
    ("xl-create-start", "xl-create-start"),
    ("xl-create-done", "xl-create rc="),
    ("domu-firmware", "(d1) HVM Loader"),
    ("domu-kernel-entry", "Booting from ROM"),
    ("domu-upcall", "upcall vector"),
    ("domu-userspace", "DOMU-INIT"),
    ("dom0-end", DOM0_END),
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("art")
    ap.add_argument("initramfs")
    ap.add_argument("log")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--cpu", default="max,-smap,-smep,-rdtscp")
    ap.add_argument("--accel", default="tcg,thread=multi", help="QEMU's -accel (tcg,thread=single: one host thread)")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--mem", type=int, default=2048)
    ap.add_argument("--xen-args", default="")
    ap.add_argument("--dom0-mem", default="1024M")
    a = ap.parse_args()
    xen_cmd = (
        "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot "
        f"dom0_mem={a.dom0_mem},max:{a.dom0_mem} dom0_max_vcpus=1 {a.xen_args}"
    ).strip()
    dom0_cmd = "console=hvc0 earlyprintk=xen loglevel=4 rdinit=/init"
    # QEMU's multiboot modules: "file args,file args" (a comma inside an argument is doubled)
    modules = f"{a.art}/vmlinuz {dom0_cmd},{a.initramfs}"
    argv = [
        "nice", "-n", "-10",  # ahead of the host's other load, as the arm64 lab's QEMU (tests/xenlab/boot.py PRIORITY)
        "qemu-system-x86_64", "-machine", "pc", "-accel", a.accel,
        "-cpu", a.cpu, "-smp", str(a.smp), "-m", str(a.mem),
        "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none",
        "-net", "none", "-kernel", f"{a.art}/xen", "-append", xen_cmd, "-initrd", modules,
    ]
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    with open(a.log, "w", encoding="utf-8", errors="replace") as log:
        log.write("# " + " ".join(argv) + "\n")
        log.write(f"# host load at start: {os.getloadavg()}\n")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        reason = "qemu exited"
        end_at: float | None = None
        while True:
            now = time.monotonic() - t0
            chunk = b""
            try:
                chunk = proc.stdout.read() or b""
            except BlockingIOError:
                pass
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                log.write(f"[{now:8.2f}] {line}\n")
                for key, pat in MARKS:
                    if pat in line and key not in marks:
                        marks[key] = now
                if PANIC.search(line):
                    reason = "panic"
                    end_at = end_at or now + 3
                if DOM0_END in line:
                    end_at = now + 30
            log.flush()
            if proc.poll() is not None and not chunk:
                break
            if now > a.timeout:
                reason = "timeout"
                end_at = now
            if end_at is not None and now >= end_at:
                if reason == "qemu exited":
                    reason = "dom0 did not power off"
                proc.kill()
                proc.wait()
                break
            if not chunk:
                time.sleep(0.1)
        total = time.monotonic() - t0
        summary = [f"# end: {reason}, qemu rc={proc.returncode}, {total:.1f} s",
                   f"# host load at end: {os.getloadavg()}"]
        summary += [f"# mark {k} {v:.1f}" for k, v in marks.items()]
        for s in summary:
            log.write(s + "\n")
            print(s)
    return 0 if "domu-userspace" in marks else 1


if __name__ == "__main__":
    sys.exit(main())
