#!/usr/bin/env python3
"""Read the lab's serial log and decide: every scenario must show every check.

    verdict.py LOG [--scenarios "pyblk qsd"] [--json]     exit 0 = pass, 1 = fail

The dom0 script only reports facts (``XENLAB-CHECK <scenario> <check> ok=0|1 <detail>``, the
guest's ``DOMU-*`` lines, the daemon's status JSON); the decision is taken here, from those lines:

- ``driver-ok``: the guest's /sys/bus/virtio/devices/*/status has ACKNOWLEDGE|DRIVER|FEATURES_OK|
  DRIVER_OK (0xf) for a virtio-blk device (device=0x0002) bound to virtio_blk;
- ``data-path``: the daemon gave the back-end guest memory the scenario's way (pyblk: XEN_MMAP,
  foreign mapping in the back-end; qsd: shadow virtqueues);
- ``guest-io``: the guest read back what it wrote to /dev/vda after sync + drop_caches (md5);
- ``image-has-pattern``: the same bytes are in the back-end's disk image in dom0;
- ``interrupts``: the guest counted virtio interrupts and the daemon raised them (set_irq_level);
- ``xl-create`` / ``xl-destroy``: rc 0, no error or timeout from libxl, and libxl's own debug line
  that the back-end reached the state it waited for (``wanted state 2 ok`` / ``wanted state 6 ok``:
  the xenstore handshake with the daemon, not a timeout);
- ``closed-in-time``: at ``xl destroy`` the device's XenBus state went from libxl's Closing to the
  daemon's Closed (or its directory went, after libxl saw the Closed) within ``XENLAB_CLOSED_MS``
  (default libxl's 10 s; dom0's time of each xenstore watch event), or was Closed already (the
  instance stopped by SIGTERM); ``XENLAB_CLOSED_MS=0`` fails it on purpose;
- ``second-guest``: every scenario's guest ran and did its I/O at the same time as the others,
  each served by its own instance;
- ``reboot-served``: ``xl reboot`` gave the guest a new domid, the old domain's instance exited 0,
  the dispatcher started one for the new domid and the rebooted guest's I/O landed in the image;
- ``daemon-exit`` (the instance's rc 0 after xl destroy during guest I/O), ``ioreq-server-destroyed``,
  ``domain-gone`` (no dying domain held by dom0 mappings), ``backend-alive``;
- ``vcpus-io``: a 2-vCPU guest's I/O pinned to each vCPU (taskset, O_DIRECT) reads back what it
  wrote, and the daemon's status counts ioreqs served from every vCPU's slot and event channel;
- ``net`` (virtio-net, Xen >= 4.18's ``virtio = [...]``, dpdk-testpmd in dom0) has ``net-frames``
  instead of ``image-has-pattern`` and no ``vcpus-io``: the guest's pings, turned back by testpmd's
  5tswap, all answered (``guest-io``), and testpmd counted frames both ways; ``driver-ok`` wants
  device 0x0001 bound to virtio_net;
- the last scenario's guest also has its instance stopped by SIGTERM while it lives and does I/O
  (``systemctl stop``): ``term-exit`` (exit 0), ``term-closed`` (XenBus Closed while the domain
  lives), ``term-ioreq-destroyed`` (the daemon's own "ioreq server N destroyed", not "went with its
  domain"), ``term-not-restarted`` (an exit 0 is an operator's stop: the dispatcher starts nothing for that
  domain), ``term-guest-alive`` (the guest's disk-independent heartbeats, one per vCPU, go on after
  the stop on every vCPU that beat before it, none held by the daemon, no kernel panic: the daemon
  answers its window as a removed device before the server goes, README.md);
- ``multi-queue`` (the ``qsd`` scenario, its back-end exporting 2 queues): the guest's virtio_blk
  made one blk-mq hardware queue per vCPU (``/sys/block/vda/mq``, each with its own CPU), and the
  daemon saw kicks on every virtqueue and relayed the back-end's calls of every one (status
  ``kicks``/``calls`` per queue), while the I/O pinned to each vCPU read back what it wrote.

Nothing in dom0 starts ``xen-vhost-master`` for a domain: the dispatcher (``xen-vhost-master watch
--spawn``) does, as its unit would, and the back-ends are started by guest name before the guests.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field

__all__ = ["Verdict", "parse", "REQUIRED", "TERM_REQUIRED", "FAST_PATH", "GRANTS", "NET", "MULTI_QUEUE", "required",
           "main"]

REQUIRED = ("xl-create", "driver-ok", "data-path", "guest-io", "image-has-pattern", "interrupts", "vcpus-io",
            "second-guest", "reboot-served", "xl-destroy", "closed-in-time", "daemon-exit", "ioreq-server-destroyed", "domain-gone",
            "backend-alive")
# the daemon stopped by SIGTERM under a live guest: run on the last scenario's guest only
TERM_REQUIRED = ("term-exit", "term-closed", "term-ioreq-destroyed", "term-not-restarted", "term-guest-alive")
DRIVER_OK_ALL = 0x1 | 0x2 | 0x8 | 0x4
_TS = re.compile(r"^\[\s*[0-9.]+\] ?")
_CHECK = re.compile(r"XENLAB-CHECK (\S+) (\S+) ok=([01])\s*(.*)$")
_DOMU = re.compile(r"^DOMU\[(\S+)\]\| (.*)$")
_STATUS = re.compile(r"XENLAB-STATUS (\S+) (.*)$")
_DAEMON = re.compile(r"^DAEMON\[(\S+)\](?:@[0-9.]+)?\| (.*)$")  # (@: dom0's time of the line)
# how guest memory must reach each scenario's back-end (the daemon's own log line)
DATA_PATH = {"pyblk": "back-end maps guest memory itself (XEN_MMAP)", "qsd": "shadow virtqueues",
             "grant": "grant-based guest: shadow virtqueues over gntdev",
             "grantmmap": "grant-based guest: back-end maps the grants itself (XEN_MMAP grant regions",
             "net": "shadow virtqueues"}
# zero-copy scenarios: with the lab's dom0 kernel, notifications go through privcmd ioeventfd/irqfd
FAST_PATH = ("pyblk", "grantmmap")
# grant-based guests (the lab's domU kernel, CONFIG_XEN_VIRTIO_FORCE_GRANT)
GRANTS = ("grant", "grantmmap")
# virtio-net through dpdk-testpmd (Xen >= 4.18): frames, not a disk image
NET = ("net",)
NET_REPLACED = {"image-has-pattern": "net-frames", "vcpus-io": None}
# multi-queue blk: the back-end exports MQ_QUEUES queues (qemu-storage-daemon's num-queues), one per guest vCPU
MULTI_QUEUE = ("qsd",)
MQ_QUEUES = 2
FAST_PATH_LINE = "kernel fast path available: privcmd ioeventfd/irqfd"


@dataclass
class Scenario:
    name: str
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    guest: list[str] = field(default_factory=list)
    daemon: list[str] = field(default_factory=list)
    status: dict[str, object] | None = None

    def set(self, check: str, ok: bool, detail: str) -> None:
        self.checks[check] = (ok, detail)


@dataclass
class Verdict:
    scenarios: dict[str, Scenario]
    finished: bool
    boot_end: str
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        out = []
        names = list(self.scenarios)
        for s in self.scenarios.values():
            for check in required(s.name, names):
                ok, detail = s.checks.get(check, (False, "not reported"))
                out.append(f"{'PASS' if ok else 'FAIL'} {s.name:9} {check:24} {detail}")
        out.append(f"{'PASS' if self.finished else 'FAIL'} lab       finished                 {self.boot_end}")
        out.append("VERDICT " + ("PASS" if self.ok else "FAIL: " + "; ".join(self.failures)))
        return "\n".join(out)


def required(name: str, scenarios: list[str]) -> tuple[str, ...]:
    """The checks scenario ``name`` must pass: every scenario's, ``fast-path`` for the zero-copy
    ones, ``grants`` for the grant-based ones, ``multi-queue`` for the multi-queue one, and the
    SIGTERM ones for the last."""
    base: tuple[str, ...] = REQUIRED
    if name in NET:
        base = tuple(n for c in REQUIRED if (n := NET_REPLACED.get(c, c)) is not None)
    return (base + (("fast-path",) if name in FAST_PATH else ()) + (("grants",) if name in GRANTS else ())
            + (("multi-queue",) if name in MULTI_QUEUE else ())
            + (TERM_REQUIRED if scenarios and name == scenarios[-1] else ()))


def _devices(s: Scenario) -> list[dict[str, object]]:
    devices = s.status.get("devices") if s.status else None
    return [d for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []


def _guest_irqs(s: Scenario) -> int:
    """The guest's /proc/interrupts count for its virtio device (the first boot's line)."""
    for ln in s.guest:
        if ln.startswith("DOMU-IRQ "):
            # "DOMU-IRQ  14:  11  GICv3  33 Edge  virtio0": per-CPU counts follow the "N:" column
            total = 0
            for tok in ln.split()[2:]:
                if not tok.isdigit():
                    break
                total += int(tok)
            return total
    return 0


def _fast_path_checks(s: Scenario) -> None:
    """``fast-path``: the daemon found privcmd ioeventfd/irqfd (its log and status), handed the
    device's queues to the kernel (status ``kernel_queues``), and the guest's interrupts came from
    the kernel: the guest counted more than the daemon raised itself (relayed, each guest interrupt
    is one of the daemon's set_irq_level calls, so never more)."""
    line = next((ln for ln in s.daemon if FAST_PATH_LINE in ln), None)
    relay = next((ln for ln in s.daemon if "kernel fast path" in ln and "not available" in ln), None)
    on = bool(s.status and s.status.get("kernel_fast_path") is True)
    queues: list[object] = []
    daemon_irqs = calls = 0
    for d in _devices(s):
        q = d.get("kernel_queues")
        queues += q if isinstance(q, list) else []
        n = d.get("interrupts")
        daemon_irqs += n if isinstance(n, int) else 0
        c = d.get("calls")
        calls += sum(v for v in c.values() if isinstance(v, int)) if isinstance(c, dict) else 0
    guest = _guest_irqs(s)
    s.set("fast-path", line is not None and on and bool(queues) and guest > daemon_irqs,
          f"status_kernel_fast_path={on} kernel_queues={queues} guest_irqs={guest} daemon_set_irq={daemon_irqs} "
          f"daemon_relayed_calls={calls} log={'yes' if line else (relay or 'no fast-path line')!r}")


def _grant_checks(s: Scenario) -> None:
    """``grants``: the guest's kernel put grant addresses in its rings (grant-dma-ops.c: "Using
    dom0 as backend"), the daemon served the device over grants (status ``data_path``), and where the
    daemon maps them itself (shadow over gntdev) it mapped grants, the device-readable ones read-only."""
    # Xen >= 4.18's grant_usage=1 gives the device-tree node its iommus (libxl_arm.c), and Linux then
    # takes the back-end's domid from it silently; without it (4.17) the lab kernel's FORCE_GRANT says
    # "Using dom0 as backend" (drivers/xen/grant-dma-ops.c)
    dma = next((ln for ln in s.guest if (ln.startswith("DOMU-GRANT-DMA") and "Using dom0 as backend" in ln)
                or (ln.startswith("DOMU-DT ") and "iommus=yes" in ln)), None)
    dev = next(iter(_devices(s)), {})
    path = str(dev.get("data_path", "none"))
    stats = dev.get("data_path_stats")
    grants = stats.get("grants") if isinstance(stats, dict) else None
    ok = dma is not None and "grants" in path
    said = "grant DMA" if dma else "no 'Using dom0 as backend' and no iommus"
    detail = f"data_path={path!r} guest={said}"
    if path.startswith("shadow"):
        maps = grants.get("maps", 0) if isinstance(grants, dict) else 0
        ro = grants.get("read_only", 0) if isinstance(grants, dict) else 0
        ok = ok and isinstance(maps, int) and isinstance(ro, int) and maps > 0 and ro > 0
        detail += f" gntdev_maps={maps} read_only_maps={ro}"
    dt = next((ln for ln in s.guest if ln.startswith("DOMU-DT ")), "")
    s.set("grants", ok, detail + (f" ({dt.split(' ', 1)[1]})" if dt else ""))


def _per_queue(d: dict[str, object], key: str) -> dict[int, int]:
    counts = d.get(key)
    if not isinstance(counts, dict):
        return {}
    return {int(q): n for q, n in counts.items() if isinstance(q, str) and q.isdigit() and isinstance(n, int)}


def _mq_checks(s: Scenario) -> None:
    """``multi-queue``: the guest's blk-mq has one hardware queue per vCPU (``DOMU-MQ``: how many
    under /sys/block/vda/mq, each one's cpu_list, and how often each was run when debugfs says),
    and the daemon saw the guest kick every virtqueue and relayed the back-end's calls on each."""
    line = next((ln for ln in s.guest if ln.startswith("DOMU-MQ ")), "")
    kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
    queues = int(kv["queues"]) if kv.get("queues", "").isdigit() else 0
    runs = [int(n) for n in kv.get("runs", "").split(",") if n.isdigit()]
    cpus = [c for c in kv.get("cpus", "").split("/") if c]  # each hardware queue's cpu_list
    guest_ok = queues >= MQ_QUEUES and len(set(cpus)) == queues and (not runs or (len(runs) == queues and min(runs) > 0))
    dev = next(iter(_devices(s)), {})
    kicks, calls = _per_queue(dev, "kicks"), _per_queue(dev, "calls")
    want = set(range(max(queues, MQ_QUEUES)))
    daemon_ok = all(kicks.get(q, 0) > 0 and calls.get(q, 0) > 0 for q in want)
    pinned = [ln for ln in s.guest if ln.startswith("DOMU-VCPU-IO ")]
    io_ok = len(pinned) >= MQ_QUEUES and all(" ok=1 " in ln for ln in pinned)
    s.set("multi-queue", guest_ok and daemon_ok and io_ok,
          f"guest_queues={queues} queue_cpus={'/'.join(cpus) or 'none'} hctx_runs={runs or 'n/a'} "
          f"daemon_kicks={dict(sorted(kicks.items()))} daemon_calls={dict(sorted(calls.items()))} "
          f"pinned_io_ok={int(io_ok)}")


def _vcpu_checks(s: Scenario) -> None:
    """``vcpus-io``: the guest has >= 2 vCPUs, I/O pinned to each (taskset, O_DIRECT) read back what
    it wrote, and the daemon served ioreqs from every vCPU's slot (one event channel per vCPU)."""
    ncpu = next((ln.split()[1] for ln in s.guest if ln.startswith("DOMU-NCPU ")), "0")
    per_cpu = [ln for ln in s.guest if ln.startswith("DOMU-VCPU-IO ")]  # the console holds every boot's
    cpus = {ln.split()[1] for ln in per_cpu}
    guest_ok = (ncpu.isdigit() and int(ncpu) >= 2 and cpus == {f"cpu={c}" for c in range(int(ncpu))}
                and all(" ok=1 " in ln for ln in per_cpu))
    per_vcpu: object = None
    if s.status:
        ioreqs = s.status.get("ioreqs")
        per_vcpu = ioreqs.get("per_vcpu") if isinstance(ioreqs, dict) else None
    # With the queue on the kernel fast path, a vCPU whose only accesses are QueueNotify writes
    # (the pinned writer's; the interrupt handler runs where the SPI goes) is served by the dom0
    # kernel alone, through that vCPU's slot and event channel: the daemon then counts none for it.
    devices = s.status.get("devices") if s.status else None
    kernel = isinstance(devices, list) and any(isinstance(d, dict) and d.get("kernel_queues") for d in devices)
    daemon_ok = (isinstance(per_vcpu, list) and len(per_vcpu) >= 2
                 and all(isinstance(n, int) and (n > 0 or kernel) for n in per_vcpu) and any(
                     isinstance(n, int) and n > 0 for n in per_vcpu))
    bad = [ln.split()[1] for ln in per_cpu if " ok=1 " not in ln]
    s.set("vcpus-io", guest_ok and daemon_ok,
          f"guest_vcpus={ncpu} pinned_io={len(per_cpu)} cpus={','.join(sorted(cpus))} failed={','.join(bad) or 'none'} daemon_ioreqs_per_vcpu={per_vcpu}"
          + (" (notifies answered by the kernel fast path)" if kernel else ""))


def _guest_checks(s: Scenario) -> None:
    virtio = [ln for ln in s.guest if ln.startswith("DOMU-VIRTIO ")]
    best = ""
    ok = False
    for ln in virtio:
        kv = dict(p.split("=", 1) for p in ln.split()[2:] if "=" in p)
        try:
            status = int(kv.get("status", "0"), 16)
        except ValueError:
            status = 0
        device, driver = ("0x0001", "virtio_net") if s.name in NET else ("0x0002", "virtio_blk")
        if kv.get("device") == device and status & DRIVER_OK_ALL == DRIVER_OK_ALL and kv.get("driver") == driver:
            ok, best = True, ln
            break
        best = best or ln
    s.set("driver-ok", ok, best or "guest saw no virtio device")
    ok_tag, fail_tags = ("DOMU-NET-OK", ("DOMU-NET-FAIL", "DOMU-NET ")) if s.name in NET else ("DOMU-IO-OK", ("DOMU-IO-FAIL", "DOMU-IO "))
    io = next((ln for ln in s.guest if ln.startswith(ok_tag)), None)
    fail = next((ln for ln in s.guest if ln.startswith(fail_tags)), None)
    s.set("guest-io", io is not None, io or fail or "no DOMU-IO line")
    guest_irqs = _guest_irqs(s)
    want = DATA_PATH.get(s.name)
    path_line = next((ln for ln in s.daemon if want and want in ln), None)
    s.set("data-path", path_line is not None, path_line or f"daemon never said {want!r}")
    daemon_irqs = served = 0
    kernel = False
    if s.status:
        ioreqs = s.status.get("ioreqs")
        if isinstance(ioreqs, dict) and isinstance(ioreqs.get("served"), int):
            served = ioreqs["served"]
    for d in _devices(s):
        n = d.get("interrupts")
        daemon_irqs += n if isinstance(n, int) else 0
        kernel = kernel or bool(d.get("kernel_queues"))
    # on the kernel fast path, privcmd's irqfd raises the line (set_irq_level) instead of the daemon
    s.set("interrupts", guest_irqs > 0 and (daemon_irqs > 0 or kernel),
          f"guest_count={guest_irqs} daemon_set_irq={daemon_irqs} kernel_irqfd={'yes' if kernel else 'no'} "
          f"ioreqs_served_via_evtchn={served}")


def parse(text: str, scenarios: list[str]) -> Verdict:
    found: dict[str, Scenario] = {name: Scenario(name) for name in scenarios}
    finished, boot_end = False, "no BOOT-END line"
    for raw in text.splitlines():
        line = _TS.sub("", raw, count=1).rstrip("\r")
        if m := _DOMU.match(line):
            if m.group(1) in found:
                found[m.group(1)].guest.append(m.group(2).rstrip("\r"))
            continue
        if m := _DAEMON.match(line):
            if m.group(1) in found:
                found[m.group(1)].daemon.append(m.group(2))
            continue
        if m := _CHECK.search(line):
            name = m.group(1)
            if name in found:
                found[name].set(m.group(2), m.group(3) == "1", m.group(4))
        elif m := _STATUS.search(line):
            if m.group(1) in found:
                try:
                    found[m.group(1)].status = json.loads(m.group(2))
                except ValueError:
                    found[m.group(1)].status = {"unparsed": m.group(2)[:200]}
        elif "XENLAB-FINISHED" in line:
            finished = True
        elif line.startswith("BOOT-END"):
            boot_end = line
    failures = []
    for s in found.values():
        _guest_checks(s)
        if s.name not in NET:
            _vcpu_checks(s)
        if s.name in FAST_PATH:
            _fast_path_checks(s)
        if s.name in GRANTS:
            _grant_checks(s)
        if s.name in MULTI_QUEUE:
            _mq_checks(s)
        for check in required(s.name, scenarios):
            ok, detail = s.checks.get(check, (False, "not reported"))
            if not ok:
                failures.append(f"{s.name}/{check}: {detail}")
    if not finished:
        failures.append(f"lab did not finish ({boot_end})")
    return Verdict(found, finished, boot_end, failures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Decide the real-Xen lab's result from its serial log.")
    p.add_argument("log")
    p.add_argument("--scenarios", default="pyblk")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with open(a.log, errors="replace") as f:
        v = parse(f.read(), a.scenarios.split())
    if a.json:
        print(json.dumps({"ok": v.ok, "failures": v.failures,
                          "checks": {n: {c: ok for c, (ok, _) in s.checks.items()} for n, s in v.scenarios.items()}}))
    else:
        print(v.summary())
    return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
