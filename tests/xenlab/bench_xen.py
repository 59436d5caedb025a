#!/usr/bin/env python3
"""`make bench-xen`: read a bench boot's serial log (run-lab.sh with XENLAB_BENCH=1) and report.

    bench_xen.py LOG [LOG...] [--out bench-xen-results.json] [--host-load FILE]
        exit 0 = every phase ran, 1 = not

(Several logs: the scenarios of several bench boots, e.g. XENLAB_SCENARIOS=qsd run on its own.
--host-load: the host's /proc/loadavg sampled during the boot, one "EPOCH L1 L5 L15" line each;
run-lab.sh writes it.)

One domU per scenario, one after the other, each with two disks on the same dom0: ``vda`` virtio
through the daemon and the scenario's back-end (``pyblk``: the project's XEN_MMAP back-end, the
daemon relaying every notification in user space (``--no-kernel-fast-path``); ``fastpath``: the same
back-end with the queue's notifications left to the lab's dom0 kernel (privcmd ioeventfd/irqfd);
``qsd``: qemu-storage-daemon through shadow virtqueues), ``xvdb`` a Xen PV disk (blkfront/blkback
over a loop device), the anchor. The guest runs the same fio job (Debian's fio, libaio, direct=1,
its JSON report on a ``DOMU-BENCH-FIO`` line) on each: 1 MiB sequential write/read at queue depth 1,
4 KiB random write/read at queue depth 1 and 32. A guest without a working fio runs busybox ``dd``
with O_DIRECT instead (queue depth 1, the ``DD_TESTS``), and its rows say ``method: dd``. dom0 reads
its CPU counters at each phase's edges. Ratios are virtio throughput / blkback throughput in the
same guest; the targets (issue 18) apply to the daemon + XEN_MMAP back-end. Each row says whether
its instance was on the kernel fast path (its log line); a ``fastpath`` row that was not is
incomplete.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field

__all__ = ["FIO_TESTS", "DD_TESTS", "TARGETS", "FioResult", "fio_result", "parse", "methods", "rows", "host_load", "main"]

_TS = re.compile(r"^\[\s*[0-9.]+\] ?")
_END = re.compile(r"BENCH\[(\S+)\]\| DOMU-BENCH-END (\S+) (\S+) rc=(-?\d+)(.*)$")
_FIO = re.compile(r"BENCH\[(\S+)\]\| DOMU-BENCH-FIO (\S+) (\S+) ?(.*)$")
_METHOD = re.compile(r"BENCH\[(\S+)\]\| DOMU-BENCH-METHOD (\S+)")
_CPU = re.compile(r"XENLAB-BENCH-CPU (\S+) DOMU-BENCH-(BEGIN|END) (\S+) (\S+) (.*)$")
# name: (fio's rw, block size, queue depth), in the guest's order
FIO_TESTS = {"seqwrite-1M": ("write", "1M", 1), "seqread-1M": ("read", "1M", 1),
             "randwrite-4k-qd1": ("randwrite", "4k", 1), "randread-4k-qd1": ("randread", "4k", 1),
             "randwrite-4k-qd32": ("randwrite", "4k", 32), "randread-4k-qd32": ("randread", "4k", 32)}
DD_TESTS = ("seqwrite-1M", "seqread-1M", "write-4k", "read-4k")  # the fallback: dd O_DIRECT, QD1
# daemon + XEN_MMAP back-end against blkback (issue 18's real-Xen targets: 1M sequential, 4k QD1)
TARGETS = {("pyblk", t): 0.8 for t in ("seqwrite-1M", "seqread-1M")}
TARGETS.update({("pyblk", t): 0.5 for t in ("randwrite-4k-qd1", "randread-4k-qd1", "write-4k", "read-4k")})
PATHS = {"pyblk": "daemon + XEN_MMAP back-end (pyblk), notifications relayed by the daemon",
         "fastpath": "daemon + XEN_MMAP back-end (pyblk), kernel fast path (privcmd ioeventfd/irqfd)",
         "qsd": "daemon + qemu-storage-daemon (shadow)"}
TARGETS.update({("fastpath", t): v for (s, t), v in list(TARGETS.items()) if s == "pyblk"})
_SHADOW = re.compile(r"DAEMON\[(\S+)\](?:@[0-9.]+)?\| .*: shadow virtqueues")
_DAEMON = re.compile(r"DAEMON\[(\S+)\](?:@[0-9.]+)?\| .*kernel fast path (available|\(privcmd ioeventfd/irqfd\) not)")


@dataclass(frozen=True)
class FioResult:
    """One fio job's figures, both directions summed (a phase is one direction)."""
    ios: int
    io_bytes: int
    runtime_ms: int
    iops: float
    bw_bytes: float          # bytes per second (fio's bw_bytes; its "bw" is KiB/s)
    clat_p50_us: float | None
    clat_p99_us: float | None


def fio_result(text: str) -> FioResult:
    """fio's ``--output-format=json`` report of one job: its totals over read and write, and the
    completion-latency percentiles of the direction that did the I/O. ValueError with the reason
    when the report is not one, or says the job failed."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at {e.pos} of {len(text)} characters)") from None
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list) or len(jobs) != 1 or not isinstance(jobs[0], dict):
        raise ValueError("not one fio job (no 'jobs' list of one)")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio's job failed: error {job['error']}")
    dirs = [job[d] for d in ("read", "write") if isinstance(job.get(d), dict) and job[d].get("total_ios")]
    if not dirs:
        raise ValueError("fio's job did no I/O")
    try:
        main_dir = max(dirs, key=lambda d: int(d["total_ios"]))
        pct = main_dir.get("clat_ns", {}).get("percentile", {})
        p50, p99 = pct.get("50.000000"), pct.get("99.000000")
        return FioResult(ios=sum(int(d["total_ios"]) for d in dirs), io_bytes=sum(int(d["io_bytes"]) for d in dirs),
                         runtime_ms=max(int(d["runtime"]) for d in dirs), iops=sum(float(d["iops"]) for d in dirs),
                         bw_bytes=sum(float(d["bw_bytes"]) for d in dirs),
                         clat_p50_us=None if p50 is None else p50 / 1000, clat_p99_us=None if p99 is None else p99 / 1000)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"fio's job report lacks a figure ({e!r})") from None


@dataclass
class Phase:
    rc: int = -1
    method: str = "dd"
    bs: int = 0
    ios: int = 0
    ms: int = 0                       # the guest's wall time around the phase (dd: the measure)
    fio: FioResult | None = None
    error: str | None = None          # why the phase has no figures
    cpu: dict[str, dict[str, int]] = field(default_factory=dict)  # BEGIN/END -> counter -> jiffies

    def ok(self) -> bool:
        return self.rc == 0 and (self.fio is not None if self.method == "fio" else self.ms > 0 and self.ios > 0)

    def n_ios(self) -> int:
        return self.fio.ios if self.fio else self.ios

    def mbps(self) -> float | None:
        if not self.ok():
            return None
        return self.fio.bw_bytes / 1e6 if self.fio else self.bs * self.ios / (self.ms / 1000) / 1e6

    def iops(self) -> float | None:
        if not self.ok():
            return None
        return self.fio.iops if self.fio else self.ios / (self.ms / 1000)

    def delta(self, counter: str) -> int | None:
        """How much ``counter`` moved over the phase (None when an edge lacks it)."""
        b, e = self.cpu.get("BEGIN", {}), self.cpu.get("END", {})
        return e[counter] - b[counter] if counter in b and counter in e else None

    def cpu_us_per_io(self, counter: str) -> float | None:
        d = self.delta(counter)
        if d is None or not self.n_ios():
            return None
        return d / (self.cpu["END"].get("hz") or 100) * 1e6 / self.n_ios()

    def per_io(self, counter: str) -> float | None:
        """``counter``'s move per I/O the guest did (the instance's wake-ups)."""
        d = self.delta(counter)
        return None if d is None or not self.n_ios() else d / self.n_ios()

    def sys_share(self, counter: str) -> float | None:
        """The kernel's share of ``counter``'s CPU time (``<counter>_sys`` of ``<counter>``):
        system calls, and on a Xen dom0 the hypercalls they make."""
        total, kernel = self.delta(counter), self.delta(f"{counter}_sys")
        return None if not total or kernel is None else kernel / total


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
    """(scenario, test, disk) -> its phase: the guest's END line (rc, method; dd's block size and
    count), fio's JSON report, dom0's CPU counters at both edges."""
    phases: dict[tuple[str, str, str], Phase] = {}
    for raw in text.splitlines():
        line = _TS.sub("", raw, count=1).rstrip("\r")
        if m := _END.search(line):
            p = phases.setdefault((m.group(1), m.group(2), m.group(3)), Phase())
            kv = dict(tok.split("=", 1) for tok in m.group(5).split() if "=" in tok)
            p.rc = int(m.group(4))
            p.method = kv.get("method", "dd")
            p.bs, p.ios, p.ms = (int(kv[k]) if kv.get(k, "").isdigit() else 0 for k in ("bs", "ios", "ms"))
        elif m := _FIO.search(line):
            p = phases.setdefault((m.group(1), m.group(2), m.group(3)), Phase(method="fio"))
            try:
                p.fio, p.error = fio_result(m.group(4)), None
            except ValueError as e:
                p.fio, p.error = None, f"fio's report: {e}"
        elif m := _CPU.search(line):
            p = phases.setdefault((m.group(1), m.group(3), m.group(4)), Phase())
            kv = dict(tok.split("=", 1) for tok in m.group(5).split() if "=" in tok)
            p.cpu[m.group(2)] = {k: int(v) for k, v in kv.items() if v.lstrip("-").isdigit()}
    return phases


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def methods(text: str) -> dict[str, str]:
    """Per scenario, what its guest said it measures with (its DOMU-BENCH-METHOD line)."""
    return {m.group(1): m.group(2) for m in _METHOD.finditer(text)}


def rows(phases: dict[tuple[str, str, str], Phase], fast: dict[str, bool] | None = None,
         said: dict[str, str] | None = None) -> list[dict[str, object]]:
    """One row per scenario and test of its method (fio's when its guest said so or ran fio, else
    dd's), the virtio disk beside blkback's in the same guest."""
    out: list[dict[str, object]] = []
    order = {name: i for i, name in enumerate(PATHS)}
    for scenario in sorted({k[0] for k in phases} | set(said or {}), key=lambda n: (order.get(n, len(order)), n)):
        mine = {k: p for k, p in phases.items() if k[0] == scenario}
        method = "fio" if (said or {}).get(scenario) == "fio" or any(p.method == "fio" for p in mine.values()) else "dd"
        for test in (FIO_TESTS if method == "fio" else DD_TESTS):
            v, b = mine.get((scenario, test, "vda")), mine.get((scenario, test, "xvdb"))
            vm, bm = (v.mbps() if v else None), (b.mbps() if b else None)
            ratio = vm / bm if vm and bm else None
            target = TARGETS.get((scenario, test))
            rw, bs, qd = FIO_TESTS.get(test) or (("write" if "write" in test else "read"), test.rsplit("-", 1)[-1], 1)
            out.append({
                "path": PATHS.get(scenario, scenario), "scenario": scenario, "test": test, "method": method,
                "rw": rw, "bs": bs, "iodepth": qd, "kernel_fast_path": (fast or {}).get(scenario),
                "virtio_iops": _r(v.iops() if v else None, 1), "blkback_iops": _r(b.iops() if b else None, 1),
                "virtio_MBps": _r(vm, 3), "blkback_MBps": _r(bm, 3), "ratio": _r(ratio, 3),
                "target": target, "met": None if target is None or ratio is None else ratio >= target,
                "virtio_clat_p50_us": _r(v.fio.clat_p50_us if v and v.fio else None, 0),
                "blkback_clat_p50_us": _r(b.fio.clat_p50_us if b and b.fio else None, 0),
                "virtio_clat_p99_us": _r(v.fio.clat_p99_us if v and v.fio else None, 0),
                "blkback_clat_p99_us": _r(b.fio.clat_p99_us if b and b.fio else None, 0),
                "virtio_ios": v.n_ios() if v else None, "blkback_ios": b.n_ios() if b else None,
                "dom0_cpu_us_per_io_virtio": _r(v.cpu_us_per_io("dom0") if v else None, 0),
                "dom0_cpu_us_per_io_blkback": _r(b.cpu_us_per_io("dom0") if b else None, 0),
                "instance_cpu_us_per_io": _r(v.cpu_us_per_io("instance") if v else None, 0),
                "backend_cpu_us_per_io": _r(v.cpu_us_per_io("backend") if v else None, 0),
                "instance_sys_share": _r(v.sys_share("instance") if v else None, 2),
                "backend_sys_share": _r(v.sys_share("backend") if v else None, 2),
                "instance_wakeups_per_io": _r(v.per_io("instance_wake") if v else None, 1),
                "blkback_thread_cpu_us_per_io": _r(b.cpu_us_per_io("blkback") if b else None, 0),
                "errors": [f"{d}: {p.error}" for d, p in (("vda", v), ("xvdb", b)) if p and p.error] or None,
            })
    return out


def host_load(text: str) -> dict[str, float | int] | None:
    """The host's 1-minute load average over the run, from /proc/loadavg samples ("EPOCH L1 L5 L15")."""
    l1 = []
    for line in text.splitlines():
        parts = line.split()
        try:
            l1.append(float(parts[1]))
        except (IndexError, ValueError):
            continue
    if not l1:
        return None
    return {"min": min(l1), "median": round(statistics.median(l1), 2), "max": max(l1), "samples": len(l1)}


def table(result: list[dict[str, object]]) -> str:
    cols = ("scenario", "kernel_fast_path", "test", "method", "virtio_iops", "blkback_iops", "virtio_MBps",
            "blkback_MBps", "ratio", "target", "virtio_clat_p50_us", "blkback_clat_p50_us", "dom0_cpu_us_per_io_virtio",
            "dom0_cpu_us_per_io_blkback", "instance_cpu_us_per_io", "instance_sys_share", "instance_wakeups_per_io",
            "backend_cpu_us_per_io", "backend_sys_share")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


METHOD = {"fio": "Debian's fio in the domU ({}, ioengine=libaio, direct=1, JSON report): 1M sequential at QD1, 4k random "
                 "at QD1 and QD32; each phase ends at its I/O count or after 15 s; one run each",
          "dd": "busybox dd O_DIRECT in the domU (QD1), one run each (fio did not run in the guest)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Report the real-Xen benchmark from a bench boot's serial log.")
    p.add_argument("log", nargs="+")
    p.add_argument("--out", default="bench-xen-results.json")
    p.add_argument("--host-load", help="the host's /proc/loadavg samples during the boot")
    a = p.parse_args(argv)
    text = ""
    for path in a.log:
        with open(path, errors="replace") as f:
            text += f.read() + "\n"
    fast = fast_paths(text)
    result = rows(parse(text), fast, methods(text))
    complete = bool(result) and all(r["ratio"] is not None for r in result)
    for r in result:
        if r["ratio"] is None:
            errors = r["errors"] if isinstance(r["errors"], list) else ["a disk's phase did not run or failed"]
            print(f"{r['scenario']} {r['test']}: no ratio ({'; '.join(errors)})", file=sys.stderr)
    if any(r["scenario"] == "fastpath" for r in result) and fast.get("fastpath") is not True:
        print("the fastpath guest's instance was not on the kernel fast path (Debian's dom0 kernel?)", file=sys.stderr)
        complete = False
    used = sorted({str(r["method"]) for r in result})
    version = next(iter(re.findall(r"DOMU-BENCH-METHOD fio (fio-\S+)", text)), "fio")
    load = None
    if a.host_load:
        with open(a.host_load, errors="replace") as f:
            load = host_load(f.read())
    with open(a.out, "w") as f:
        json.dump({"complete": complete, "rows": result,
                   "method": "; ".join(METHOD[m].format(version) for m in used) + "; ratio = virtio / blkback "
                             "throughput in the same guest; CPU from dom0 /proc/stat (all dom0 CPUs) and /proc/PID/stat "
                             "at each phase's edges, per I/O the guest did; sys_share: the part of that CPU spent in dom0's kernel "
                             "(system calls and the hypercalls they make); the instance's wake-ups: voluntary context "
                             "switches of its threads (/proc/PID/task/*/status)",
                   "host_load_1min": load},
                  f, indent=2)
        f.write("\n")
    print(table(result))
    if load:
        print(f"host load average (1 min) during the run: {load['min']}-{load['max']}, median {load['median']}")
    print(f"written {a.out}" + ("" if complete else " (INCOMPLETE: a phase did not run or failed)"))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
