#!/usr/bin/env python3
"""`make bench-xen`: read a bench boot's serial log (run-lab.sh with XENLAB_BENCH=1) and report.

    bench_xen.py LOG [LOG...] [--out bench-xen-results.json]     exit 0 = every phase ran, 1 = not

(Several logs: the scenarios of several bench boots, e.g. XENLAB_SCENARIOS=qsd run on its own.)

One domU per scenario, one after the other, each with two disks on the same dom0: ``vda`` virtio
through the daemon and the scenario's back-end (``pyblk``: the project's XEN_MMAP back-end, the
daemon relaying every notification in user space (``--no-kernel-fast-path``); ``fastpath``: the same
back-end with the queue's notifications left to the lab's dom0 kernel (privcmd ioeventfd/irqfd);
``qsd``: qemu-storage-daemon through shadow virtqueues), ``xvdb`` a Xen PV disk (blkfront/blkback
over a loop device), the anchor. The guest runs the same ``dd`` with O_DIRECT (one request per
block, queue depth 1) on each: 1 MiB sequential write/read, 4 KiB write/read; dom0 reads its CPU
counters at each phase's edges. Ratios are virtio throughput / blkback throughput in the same
guest; the targets (issue 18) apply to the daemon + XEN_MMAP back-end. Each row says whether its
instance was on the kernel fast path (its log line); a ``fastpath`` row that was not is incomplete.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field

__all__ = ["parse", "TARGETS", "main"]

_TS = re.compile(r"^\[\s*[0-9.]+\] ?")
_END = re.compile(r"BENCH\[(\S+)\]\| DOMU-BENCH-END (\S+) (\S+) rc=(-?\d+) bs=(\d+) ios=(\d+) ms=(\d+)")
_CPU = re.compile(r"XENLAB-BENCH-CPU (\S+) DOMU-BENCH-(BEGIN|END) (\S+) (\S+) (.*)$")
TESTS = ("seqwrite-1M", "seqread-1M", "write-4k", "read-4k")
# daemon + XEN_MMAP back-end against blkback (issue 18's real-Xen targets)
TARGETS = {("pyblk", "seqwrite-1M"): 0.8, ("pyblk", "seqread-1M"): 0.8, ("pyblk", "write-4k"): 0.5,
           ("pyblk", "read-4k"): 0.5}
PATHS = {"pyblk": "daemon + XEN_MMAP back-end (pyblk), notifications relayed by the daemon",
         "fastpath": "daemon + XEN_MMAP back-end (pyblk), kernel fast path (privcmd ioeventfd/irqfd)",
         "qsd": "daemon + qemu-storage-daemon (shadow)"}
for _t in TESTS:
    TARGETS[("fastpath", _t)] = TARGETS[("pyblk", _t)]
_SHADOW = re.compile(r"DAEMON\[(\S+)\](?:@[0-9.]+)?\| .*: shadow virtqueues")
_DAEMON = re.compile(r"DAEMON\[(\S+)\](?:@[0-9.]+)?\| .*kernel fast path (available|\(privcmd ioeventfd/irqfd\) not)")


@dataclass
class Phase:
    rc: int = -1
    bs: int = 0
    ios: int = 0
    ms: int = 0
    cpu: dict[str, dict[str, int]] = field(default_factory=dict)  # BEGIN/END -> counter -> jiffies

    def mbps(self) -> float | None:
        return self.bs * self.ios / (self.ms / 1000) / 1e6 if self.ms > 0 and self.rc == 0 else None

    def cpu_us_per_io(self, counter: str) -> float | None:
        b, e = self.cpu.get("BEGIN", {}), self.cpu.get("END", {})
        if counter not in b or counter not in e or not self.ios:
            return None
        hz = e.get("hz") or 100
        return (e[counter] - b[counter]) / hz * 1e6 / self.ios


def fast_paths(text: str) -> dict[str, bool]:
    """Per scenario, whether its device was on the kernel fast path: its instance said "kernel
    fast path available" (else "... not available" or "... not used": relayed by the daemon) and
    the device is a zero-copy one (a shadow path sees every kick and call itself)."""
    said: dict[str, bool] = {}
    shadow: set[str] = set()
    for raw in text.splitlines():
        if m := _DAEMON.search(raw):
            said[m.group(1)] = m.group(2) == "available"
        elif m := _SHADOW.search(raw):
            shadow.add(m.group(1))
    return {name: on and name not in shadow for name, on in said.items()}


def parse(text: str) -> dict[tuple[str, str, str], Phase]:
    phases: dict[tuple[str, str, str], Phase] = {}
    for raw in text.splitlines():
        line = _TS.sub("", raw, count=1).rstrip("\r")
        if m := _END.search(line):
            p = phases.setdefault((m.group(1), m.group(2), m.group(3)), Phase())
            p.rc, p.bs, p.ios, p.ms = (int(m.group(i)) for i in range(4, 8))
        elif m := _CPU.search(line):
            p = phases.setdefault((m.group(1), m.group(3), m.group(4)), Phase())
            kv = dict(tok.split("=", 1) for tok in m.group(5).split() if "=" in tok)
            p.cpu[m.group(2)] = {k: int(v) for k, v in kv.items() if v.lstrip("-").isdigit()}
    return phases


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def rows(phases: dict[tuple[str, str, str], Phase], fast: dict[str, bool] | None = None) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    order = {name: i for i, name in enumerate(PATHS)}
    for scenario in sorted({k[0] for k in phases}, key=lambda n: (order.get(n, len(order)), n)):
        for test in TESTS:
            v, b = phases.get((scenario, test, "vda")), phases.get((scenario, test, "xvdb"))
            vm, bm = (v.mbps() if v else None), (b.mbps() if b else None)
            ratio = vm / bm if vm and bm else None
            target = TARGETS.get((scenario, test))
            out.append({
                "path": PATHS.get(scenario, scenario), "scenario": scenario, "test": test,
                "kernel_fast_path": (fast or {}).get(scenario),
                "virtio_MBps": _r(vm, 3), "blkback_MBps": _r(bm, 3), "ratio": _r(ratio, 3),
                "virtio_ms_per_io": _r(v.ms / v.ios if v and v.ios else None, 2),
                "blkback_ms_per_io": _r(b.ms / b.ios if b and b.ios else None, 2),
                "target": target, "met": None if target is None or ratio is None else ratio >= target,
                "dom0_cpu_us_per_io_virtio": _r(v.cpu_us_per_io("dom0") if v else None, 0),
                "dom0_cpu_us_per_io_blkback": _r(b.cpu_us_per_io("dom0") if b else None, 0),
                "instance_cpu_us_per_io": _r(v.cpu_us_per_io("instance") if v else None, 0),
                "backend_cpu_us_per_io": _r(v.cpu_us_per_io("backend") if v else None, 0),
                "blkback_thread_cpu_us_per_io": _r(b.cpu_us_per_io("blkback") if b else None, 0),
            })
    return out


def table(result: list[dict[str, object]]) -> str:
    cols = ("scenario", "kernel_fast_path", "test", "virtio_MBps", "blkback_MBps", "ratio", "target", "virtio_ms_per_io",
            "blkback_ms_per_io", "dom0_cpu_us_per_io_virtio", "dom0_cpu_us_per_io_blkback", "instance_cpu_us_per_io",
            "backend_cpu_us_per_io")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Report the real-Xen benchmark from a bench boot's serial log.")
    p.add_argument("log", nargs="+")
    p.add_argument("--out", default="bench-xen-results.json")
    a = p.parse_args(argv)
    text = ""
    for path in a.log:
        with open(path, errors="replace") as f:
            text += f.read() + "\n"
    fast = fast_paths(text)
    result = rows(parse(text), fast)
    complete = bool(result) and all(r["ratio"] is not None for r in result)
    if any(r["scenario"] == "fastpath" for r in result) and fast.get("fastpath") is not True:
        print("the fastpath guest's instance was not on the kernel fast path (Debian's dom0 kernel?)", file=sys.stderr)
        complete = False
    with open(a.out, "w") as f:
        json.dump({"complete": complete, "rows": result,
                   "method": "dd O_DIRECT in the domU (QD1), one run each; ratio = virtio / blkback in the same boot; "
                             "CPU from dom0 /proc/stat (all dom0 CPUs) and /proc/PID/stat at each phase's edges"},
                  f, indent=2)
        f.write("\n")
    print(table(result))
    print(f"written {a.out}" + ("" if complete else " (INCOMPLETE: a phase did not run or failed)"))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
