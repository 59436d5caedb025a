"""verdict.sh (the x86 lab's daemon scenarios) on synthetic serial logs: a complete log passes;
without any one of its lines, or checked as a scenario it is not (INTx as MSI-X, one vCPU as two),
it fails naming the check (so a boot cannot pass by accident)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

VERDICT = Path(__file__).parent / "verdict.sh"
STATUS = ('[  325.7] XENLAB-X86-STATUS-IO-END {{"devices":[{{"devid":0,"base":"PCI00:04.0","irq":"{irq}",'
          '"backend":"connected","attempts":1,"data_path":"{path}","kicks":{{"0":23}},"interrupts":22}}],'
          '"ioreqs":{{"served":449,"per_vcpu":{per_vcpu}}}}}')
COMMON = [
    "[   62.1] XENLAB-X86-T 42.20 daemon serving",
    "[   62.0] XENLAB-X86-DAEMON INFO xen_vhost_master: dom1: QEMU's PCI functions (00:00, 00:01, 00:02, 00:06) leave slot(s) 00:04 free",
    "[   55.0] XENLAB-X86-CONFLICT ERROR xen_vhost_master: dom1: configuration error: device 0 (transport=pci, "
    "bdf=00:06.0): slot 00:06 is QEMU's (the guest's device model): 00:06.0 8086:100e (Ethernet controller); "
    "choose a free slot",
    "[   55.1] XENLAB-X86-CONFLICT-RC 78 errors=1",
    "[  287.5] XENLAB-X86-DOMU| DOMU-INIT uptime=15.2",
    "[  311.0] XENLAB-X86-DOMU| DOMU-VIRTIO virtio0 device=0x0002 vendor=0x1af4 status=0x0000000f features=011 driver=virtio_blk",
    "[  323.2] XENLAB-X86-DOMU| DOMU-IO-OK md5=6e33 mark=XENLAB-PATTERN-06",
    "[  330.0] XENLAB-X86-CHECK image-has-pattern ok mark=XENLAB-PATTERN-06",
    "[  419.7] XENLAB-X86-T 400.39 daemon exit rc=0",
]
MSIX = ["[  309.8] XENLAB-X86-DOMU| DOMU-FN 00:04.0 driver=virtio-pci irq=32 msi_irqs=55,56, enable=1 resource0=0xf1000000",
        "[  323.2] XENLAB-X86-DOMU| DOMU-IRQ-KIND msi=22 intx=0"]
INTX = ["[  309.8] XENLAB-X86-DOMU| DOMU-FN 00:04.0 driver=virtio-pci irq=5 msi_irqs= enable=1 resource0=0xf1000000",
        "[  323.2] XENLAB-X86-DOMU| DOMU-IRQ-KIND msi=0 intx=25"]
QSD = ["[   45.5] XENLAB-X86-QSD qemu-storage-daemon version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"]
SMP = ["[  324.0] XENLAB-X86-DOMU| DOMU-VCPU-IO cpu=0 ok=1 want=aa got=aa",
       "[  324.1] XENLAB-X86-DOMU| DOMU-VCPU-IO cpu=1 ok=1 want=bb got=bb",
       "[  324.2] XENLAB-X86-DOMU| DOMU-NCPU 2"]


def log_of(scenario: str) -> list[str]:
    qsd, intx, smp = "qsd" in scenario, "-intx" in scenario, "-smp" in scenario
    return [*COMMON, *(QSD if qsd else []), *(INTX if intx else MSIX), *(SMP if smp else []),
            STATUS.format(irq="intx" if intx else "msi-x", path="shadow" if qsd else "xen-mmap",
                          per_vcpu="[300,149]" if smp else "[449]")]


def verdict(scenario: str, lines: list[str], tmp_path: Path) -> tuple[int, list[str]]:
    log = tmp_path / "boot.log"
    log.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["bash", str(VERDICT), scenario, str(log)], capture_output=True, text=True, timeout=60)
    return r.returncode, [ln.split()[2] for ln in r.stdout.splitlines() if ln.endswith(" FAIL")]


SCENARIOS = ["pci-pyblk", "pci-qsd", "pci-pyblk-intx", "pci-qsd-smp", "pci-qsd-intx-smp"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_complete_log_passes_and_each_missing_line_fails_a_check(scenario, tmp_path):
    lines = log_of(scenario)
    assert verdict(scenario, lines, tmp_path) == (0, [])
    for i in range(len(lines)):
        rc, failed = verdict(scenario, lines[:i] + lines[i + 1:], tmp_path)
        assert rc == 1 and failed, f"{scenario} passes without {lines[i]!r}"


@pytest.mark.parametrize(("scenario", "checked_as", "fails"), [
    ("pci-pyblk-intx", "pci-pyblk", ["msix-vectors", "guest-msix-interrupts", "daemon-msix"]),
    ("pci-pyblk", "pci-pyblk-intx", ["no-msi-vectors", "guest-intx-interrupts", "daemon-intx"]),
    ("pci-qsd", "pci-qsd-smp", ["domu-two-vcpus", "vcpu0-io", "vcpu1-io", "daemon-ioreqs-both-vcpus"]),
    ("pci-pyblk", "pci-qsd", ["backend-qsd", "data-path-shadow"]),
])
def test_a_log_checked_as_another_scenario_fails_the_checks_that_tell_them_apart(scenario, checked_as, fails,
                                                                                  tmp_path):
    assert verdict(checked_as, log_of(scenario), tmp_path) == (1, fails)


def test_a_vcpu_that_served_no_ioreq_fails(tmp_path):
    lines = [ln.replace("[300,149]", "[449,0]") for ln in log_of("pci-qsd-smp")]
    assert verdict("pci-qsd-smp", lines, tmp_path) == (1, ["daemon-ioreqs-both-vcpus"])


def test_an_unknown_scenario_or_log_is_a_usage_error(tmp_path):
    assert verdict("pci-virtiofs", log_of("pci-qsd"), tmp_path)[0] == 2
    r = subprocess.run(["bash", str(VERDICT), "pci-qsd", str(tmp_path / "none.log")], capture_output=True, timeout=60)
    assert r.returncode == 2
